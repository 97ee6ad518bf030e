// Elementwise ops: binary arithmetic with broadcasting, scalar forms, and the unary math functions.
//
// Binary ops reduce each input gradient with sum_to (the shared broadcasting helper). Every unary
// op is detail::pointwise<UnaryOp::...>: its formula and derivative are written once in
// rex/backend/pointwise.hpp, shared by the CPU loops and the CUDA kernels, and its row in the
// REX_UNARY_OPS list there says what the backward saves: x (dx = g * f'(x)), y (dx = g * f'(y)) or
// nothing (a constant slope).
#pragma once

#include <cmath>
#include <numbers>

#include "rex/backend/cpu/elementwise.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/backend/pointwise.hpp"
#include "rex/ops/broadcast.hpp"

namespace rex {
namespace detail {

// y = f(x) for the pointwise op Op, on x's device; the CPU instantiates one loop per op.
template <UnaryOp Op>
Tensor unary_values(const Tensor& x, float s) {
  if (on_cuda(x)) return cuda_unary(Op, s, x);
  return map(x, [s](float v) { return unary_value<Op>(v, s); });
}

// dx = g * slope(saved) where saved is x, or y for the ops that save their output.
template <UnaryOp Op>
Tensor unary_grad(const Tensor& g, const Tensor& saved, float s) {
  common_device("backward", {g, saved});
  if (on_cuda(g)) {
    Tensor dx = Tensor::empty(g.shape(), DType::f32, g.device());
    cuda_backend().unary_backward(Op, s, g.device_data<float>(), saved.device_data<float>(),
                                  dx.device_data<float>(), g.numel());
    return dx;
  }
  return zip(g, saved, "grad", [s](float gv, float v) { return gv * unary_slope<Op>(v, s); });
}

// The pointwise op Op as a graph node: what the backward saves (x, y or nothing) follows from the
// op (see rex/backend/pointwise.hpp).
template <UnaryOp Op>
Tensor pointwise(const Tensor& x, std::string_view op, float s = 0.0f) {
  check_f32(op, x);
  Tensor y = unary_values<Op>(x, s);
  constexpr UnarySaves saves = unary_saves(Op);
  // Nothing for a constant slope; else x or y.
  const Tensor saved = saves == UnarySaves::nothing  ? Tensor()
                       : saves == UnarySaves::output ? y.detach()
                                                     : x.detach();
  return record(y, op, {x}, [saved, s](const Tensor& g) {
    if constexpr (saves == UnarySaves::nothing) {
      return GradList{unary_values<UnaryOp::mul_scalar>(g, unary_slope<Op>(0.0f, s))};
    } else {
      return GradList{unary_grad<Op>(g, saved, s)};
    }
  });
}

// a (op) b with broadcasting, on the inputs' device (the values only; no graph node).
template <BinaryOp Op>
Tensor binary_values(const Tensor& a, const Tensor& b, std::string_view name) {
  if (common_device(name, {a, b}).is_cuda()) return cuda_binary(Op, a, b, name);
  return zip(a, b, name, [](float x, float y) { return binary_value<Op>(x, y); });
}

}  // namespace detail

// ---- binary, with broadcasting ------------------------------------------------------------------

namespace detail {

// out, a + b, recorded with add's backward.
inline Tensor record_add(const Tensor& out, const Tensor& a, const Tensor& b) {
  return record(out, "add", {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor& g) {
    return GradList{sum_to(g, sa), sum_to(g, sb)};
  });
}

}  // namespace detail

inline Tensor add(const Tensor& a, const Tensor& b) {
  detail::check_f32("add", a), detail::check_f32("add", b);
  return detail::record_add(detail::binary_values<detail::BinaryOp::add>(a, b, "add"), a, b);
}

struct SumAndPrefix {
  Tensor sum;     // of all the terms
  Tensor prefix;  // of the first `prefix` terms
};

// sum_of(terms), and beside it the sum of the first `prefix` terms (1 <= prefix <= terms.size())
// from the same pass: the chain's partial sum there, so the bits of sum_of of those terms. The
// graph is that of add(sum_of(the later terms...), prefix) without its launches: the prefix's
// node takes the first terms, the sum's the later terms and then the prefix (the order in which
// the engine walks them, as add(lm, aux) listed them). The model's loss and its auxiliary part in
// one launch: sum_of_with_prefix({aux_1, ..., aux_L, lm}, L).
inline SumAndPrefix sum_of_with_prefix(const std::vector<Tensor>& terms, size_t prefix) {
  REX_CHECK(!terms.empty(), "sum_of: no terms to add");
  REX_CHECK(prefix >= 1 && prefix <= terms.size(), "sum_of: a prefix of ", prefix, " of ",
            terms.size(), " terms");
  for (const Tensor& t : terms) {
    detail::check_f32("sum_of", t);
    REX_CHECK(t.shape() == terms[0].shape(), "sum_of: the terms' shapes differ: ", terms[0].shape(),
              " and ", t.shape());
    detail::common_device("sum_of", {terms[0], t});
  }
  if (terms.size() == 1) return {terms[0], terms[0]};
  Tensor out = Tensor::empty(terms[0].shape(), DType::f32, terms[0].device());
  // A prefix of one term is that term, and of all of them the sum.
  const bool own_prefix = prefix >= 2 && prefix < terms.size();
  Tensor partial = own_prefix ? Tensor::empty(terms[0].shape(), DType::f32, terms[0].device())
                              : (prefix == 1 ? terms[0] : Tensor());
  std::vector<const float*> pointers;
  for (const Tensor& t : terms) pointers.push_back(t.device_data<float>());
  (detail::on_cuda(out) ? detail::cuda_backend().sum_of : detail::cpu::sum_of)(
      pointers.data(), static_cast<int64_t>(pointers.size()), out.device_data<float>(), out.numel(),
      own_prefix ? partial.device_data<float>() : nullptr, static_cast<int64_t>(prefix));
  const auto passes_g = [](size_t count) {
    return [count](const Tensor& g) { return detail::GradList(count, g); };
  };
  if (prefix == terms.size()) {
    out = detail::record(out, "sum_of", terms, passes_g(terms.size()));
    return {out, out};
  }
  const auto first_later = terms.begin() + static_cast<std::ptrdiff_t>(prefix);
  if (own_prefix)
    partial = detail::record(partial, "sum_of", std::vector<Tensor>(terms.begin(), first_later),
                             passes_g(prefix));
  std::vector<Tensor> inputs(first_later, terms.end());
  inputs.push_back(partial);
  out = detail::record(out, "sum_of", inputs, passes_g(inputs.size()));
  return {out, partial};
}

// ((terms[0] + terms[1]) + terms[2]) + ... for same-shape f32 tensors on one device: the bits of
// the adds chained left to right, in one pass (on CUDA one launch, where the chain takes one an
// add: the MoE layers' auxiliary losses). Every term's gradient is the output's.
inline Tensor sum_of(const std::vector<Tensor>& terms) {
  return sum_of_with_prefix(terms, terms.size()).sum;
}

inline Tensor sub(const Tensor& a, const Tensor& b) {
  detail::check_f32("sub", a), detail::check_f32("sub", b);
  Tensor out = detail::binary_values<detail::BinaryOp::sub>(a, b, "sub");
  return detail::record(
      out, "sub", {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor& g, const auto& needs) {
        detail::GradList grads(2);
        if (needs[0]) grads[0] = sum_to(g, sa);
        if (needs[1]) grads[1] = sum_to(detail::unary_values<detail::UnaryOp::neg>(g, 0.0f), sb);
        return grads;
      });
}

inline Tensor mul(const Tensor& a, const Tensor& b) {
  detail::check_f32("mul", a), detail::check_f32("mul", b);
  Tensor out = detail::binary_values<detail::BinaryOp::mul>(a, b, "mul");
  return detail::record(
      out, "mul", {a, b}, [a = a.detach(), b = b.detach()](const Tensor& g, const auto& needs) {
        using detail::BinaryOp;
        detail::GradList grads(2);
        if (needs[0])
          grads[0] = sum_to(detail::binary_values<BinaryOp::mul>(g, b, "mul"), a.shape());
        if (needs[1])
          grads[1] = sum_to(detail::binary_values<BinaryOp::mul>(g, a, "mul"), b.shape());
        return grads;
      });
}

inline Tensor div(const Tensor& a, const Tensor& b) {
  detail::check_f32("div", a), detail::check_f32("div", b);
  Tensor out = detail::binary_values<detail::BinaryOp::div>(a, b, "div");
  return detail::record(
      out, "div", {a, b},
      [sa = a.shape(), b = b.detach(), out = out.detach()](const Tensor& g, const auto& needs) {
        // d(a/b)/da = 1/b;  d(a/b)/db = -a/b^2 = -(g/b) * out.
        using detail::BinaryOp;
        Tensor g_over_b = detail::binary_values<BinaryOp::div>(g, b, "div");
        detail::GradList grads(2);
        if (needs[0]) grads[0] = sum_to(g_over_b, sa);
        if (needs[1]) {
          Tensor gb = detail::unary_values<detail::UnaryOp::neg>(
              detail::binary_values<BinaryOp::mul>(g_over_b, out, "div"), 0.0f);
          grads[1] = sum_to(gb, b.shape());
        }
        return grads;
      });
}

// ---- scalar forms -------------------------------------------------------------------------------

inline Tensor add(const Tensor& x, float s) {
  return detail::pointwise<detail::UnaryOp::add_scalar>(x, "add_scalar", s);
}
inline Tensor sub(const Tensor& x, float s) {
  return detail::pointwise<detail::UnaryOp::sub_scalar>(x, "sub_scalar", s);
}
inline Tensor sub(float s, const Tensor& x) {
  return detail::pointwise<detail::UnaryOp::rsub_scalar>(x, "rsub_scalar", s);
}
inline Tensor mul(const Tensor& x, float s) {
  return detail::pointwise<detail::UnaryOp::mul_scalar>(x, "mul_scalar", s);
}
inline Tensor div(const Tensor& x, float s) {
  return detail::pointwise<detail::UnaryOp::div_scalar>(x, "div_scalar", s);
}
inline Tensor div(float s, const Tensor& x) {
  return detail::pointwise<detail::UnaryOp::rdiv_scalar>(x, "rdiv_scalar", s);
}

inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
inline Tensor operator+(const Tensor& x, float s) { return add(x, s); }
inline Tensor operator+(float s, const Tensor& x) { return add(x, s); }
inline Tensor operator-(const Tensor& x, float s) { return sub(x, s); }
inline Tensor operator-(float s, const Tensor& x) { return sub(s, x); }
inline Tensor operator*(const Tensor& x, float s) { return mul(x, s); }
inline Tensor operator*(float s, const Tensor& x) { return mul(x, s); }
inline Tensor operator/(const Tensor& x, float s) { return div(x, s); }
inline Tensor operator/(float s, const Tensor& x) { return div(s, x); }

// ---- unary math (formulas and derivatives: rex/backend/pointwise.hpp) ---------------------------

inline Tensor neg(const Tensor& x) { return detail::pointwise<detail::UnaryOp::neg>(x, "neg"); }
inline Tensor operator-(const Tensor& x) { return neg(x); }
inline Tensor exp(const Tensor& x) { return detail::pointwise<detail::UnaryOp::exp>(x, "exp"); }
inline Tensor log(const Tensor& x) { return detail::pointwise<detail::UnaryOp::log>(x, "log"); }
inline Tensor sqrt(const Tensor& x) { return detail::pointwise<detail::UnaryOp::sqrt>(x, "sqrt"); }
inline Tensor rsqrt(const Tensor& x) {
  return detail::pointwise<detail::UnaryOp::rsqrt>(x, "rsqrt");
}
// x^p for a scalar exponent p.
inline Tensor pow(const Tensor& x, float p) {
  return detail::pointwise<detail::UnaryOp::pow>(x, "pow", p);
}
inline Tensor tanh(const Tensor& x) { return detail::pointwise<detail::UnaryOp::tanh>(x, "tanh"); }
inline Tensor sigmoid(const Tensor& x) {
  return detail::pointwise<detail::UnaryOp::sigmoid>(x, "sigmoid");
}
// x * sigmoid(x); derivative s * (1 + x * (1 - s)).
inline Tensor silu(const Tensor& x) { return detail::pointwise<detail::UnaryOp::silu>(x, "silu"); }
// max(x, 0); the derivative at 0 is taken as 0.
inline Tensor relu(const Tensor& x) { return detail::pointwise<detail::UnaryOp::relu>(x, "relu"); }
// Exact GELU, x * Phi(x) with the normal CDF Phi (PyTorch's default, not the tanh approximation).
inline Tensor gelu(const Tensor& x) { return detail::pointwise<detail::UnaryOp::gelu>(x, "gelu"); }

// ---- fused -----------------------------------------------------------------------------------

// swiglu(a, b) = silu(a) * b, the gate of a SwiGLU FFN, in one pass (a and b of the same shape).
// With s = sigmoid(a):  y = a s b,  da = g b s (1 + a (1 - s)),  db = g a s (written once, in
// rex/backend/pointwise.hpp). The backward recomputes s from a instead of saving it. On the CPU the
// sigmoids go through Eigen's vectorised exp; silu(a) * b composed from two ops is the reference
// the tests compare against.
inline Tensor swiglu(const Tensor& a, const Tensor& b) {
  detail::check_f32("swiglu", a), detail::check_f32("swiglu", b);
  REX_CHECK(a.shape() == b.shape(), "swiglu: a ", a.shape(), " and b ", b.shape(),
            " must have the same shape");
  const Device device = detail::common_device("swiglu", {a, b});
  Tensor y = Tensor::empty(a.shape(), DType::f32, device);
  (device.is_cuda() ? detail::cuda_backend().swiglu : detail::cpu::swiglu)(
      a.device_data<float>(), b.device_data<float>(), y.device_data<float>(), a.numel());
  return detail::record(
      y, "swiglu", {a, b},
      [a = a.detach(), b = b.detach()](const Tensor& g, const std::vector<bool>& needs) {
        detail::GradList grads(2);
        for (size_t i = 0; i < 2; ++i)
          if (needs[i]) grads[i] = Tensor::empty(a.shape(), DType::f32, a.device());
        auto pointer = [](const Tensor& t) {
          return t.defined() ? t.device_data<float>() : nullptr;
        };
        (detail::on_cuda(a) ? detail::cuda_backend().swiglu_backward
                            : detail::cpu::swiglu_backward)(
            a.device_data<float>(), b.device_data<float>(), g.device_data<float>(),
            pointer(grads[0]), pointer(grads[1]), a.numel());
        return grads;
      });
}

}  // namespace rex
