// Elementwise ops: binary arithmetic with broadcasting, scalar forms, and the unary math functions.
//
// Binary ops reduce each input gradient with sum_to (the shared broadcasting helper). Unary ops are
// written through three helpers that fix what the backward saves:
//   pointwise_from_input  y = f(x), dx = g * df(x)   (saves x)
//   pointwise_from_output y = f(x), dx = g * df(y)   (saves y; exp, tanh, sigmoid, sqrt, rsqrt)
//   pointwise_linear      y = f(x), dx = g * slope   (saves nothing; scalar add/mul)
#pragma once

#include <cmath>
#include <numbers>

#include "rex/backend/cpu/arrays.hpp"
#include "rex/ops/broadcast.hpp"

namespace rex {
namespace detail {

template <class F, class DF>
Tensor pointwise_from_input(const Tensor& x, std::string_view op, F f, DF df) {
  check_f32(op, x);
  return record(map(x, f), op, {x}, [x = x.detach(), df](const Tensor& g) {
    return GradList{zip(g, x, "grad", [df](float gv, float xv) { return gv * df(xv); })};
  });
}

template <class F, class DF>
Tensor pointwise_from_output(const Tensor& x, std::string_view op, F f, DF df) {
  check_f32(op, x);
  Tensor y = map(x, f);
  return record(y, op, {x}, [y = y.detach(), df](const Tensor& g) {
    return GradList{zip(g, y, "grad", [df](float gv, float yv) { return gv * df(yv); })};
  });
}

template <class F>
Tensor pointwise_linear(const Tensor& x, std::string_view op, F f, float slope) {
  check_f32(op, x);
  return record(map(x, f), op, {x}, [slope](const Tensor& g) {
    return GradList{map(g, [slope](float gv) { return gv * slope; })};
  });
}

}  // namespace detail

// ---- binary, with broadcasting ------------------------------------------------------------------

inline Tensor add(const Tensor& a, const Tensor& b) {
  detail::check_f32("add", a), detail::check_f32("add", b);
  Tensor out = detail::zip(a, b, "add", [](float x, float y) { return x + y; });
  return detail::record(out, "add", {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor& g) {
    return detail::GradList{sum_to(g, sa), sum_to(g, sb)};
  });
}

inline Tensor sub(const Tensor& a, const Tensor& b) {
  detail::check_f32("sub", a), detail::check_f32("sub", b);
  Tensor out = detail::zip(a, b, "sub", [](float x, float y) { return x - y; });
  return detail::record(out, "sub", {a, b},
                        [sa = a.shape(), sb = b.shape()](const Tensor& g, const auto& needs) {
                          detail::GradList grads(2);
                          if (needs[0]) grads[0] = sum_to(g, sa);
                          if (needs[1]) grads[1] = sum_to(detail::map(g, std::negate<>()), sb);
                          return grads;
                        });
}

inline Tensor mul(const Tensor& a, const Tensor& b) {
  detail::check_f32("mul", a), detail::check_f32("mul", b);
  Tensor out = detail::zip(a, b, "mul", [](float x, float y) { return x * y; });
  return detail::record(out, "mul", {a, b},
                        [a = a.detach(), b = b.detach()](const Tensor& g, const auto& needs) {
                          auto times = [](float x, float y) { return x * y; };
                          detail::GradList grads(2);
                          if (needs[0])
                            grads[0] = sum_to(detail::zip(g, b, "mul", times), a.shape());
                          if (needs[1])
                            grads[1] = sum_to(detail::zip(g, a, "mul", times), b.shape());
                          return grads;
                        });
}

inline Tensor div(const Tensor& a, const Tensor& b) {
  detail::check_f32("div", a), detail::check_f32("div", b);
  Tensor out = detail::zip(a, b, "div", [](float x, float y) { return x / y; });
  return detail::record(
      out, "div", {a, b},
      [sa = a.shape(), b = b.detach(), out = out.detach()](const Tensor& g, const auto& needs) {
        // d(a/b)/da = 1/b;  d(a/b)/db = -a/b^2 = -(g/b) * out.
        Tensor g_over_b = detail::zip(g, b, "div", [](float gv, float bv) { return gv / bv; });
        detail::GradList grads(2);
        if (needs[0]) grads[0] = sum_to(g_over_b, sa);
        if (needs[1]) {
          Tensor gb = detail::zip(g_over_b, out, "div", [](float q, float o) { return -q * o; });
          grads[1] = sum_to(gb, b.shape());
        }
        return grads;
      });
}

// ---- scalar forms -------------------------------------------------------------------------------

inline Tensor add(const Tensor& x, float s) {
  return detail::pointwise_linear(
      x, "add_scalar", [s](float v) { return v + s; }, 1.0f);
}
inline Tensor sub(const Tensor& x, float s) {
  return detail::pointwise_linear(
      x, "sub_scalar", [s](float v) { return v - s; }, 1.0f);
}
inline Tensor sub(float s, const Tensor& x) {
  return detail::pointwise_linear(
      x, "rsub_scalar", [s](float v) { return s - v; }, -1.0f);
}
inline Tensor mul(const Tensor& x, float s) {
  return detail::pointwise_linear(
      x, "mul_scalar", [s](float v) { return v * s; }, s);
}
inline Tensor div(const Tensor& x, float s) {
  return detail::pointwise_linear(
      x, "div_scalar", [s](float v) { return v / s; }, 1.0f / s);
}
inline Tensor div(float s, const Tensor& x) {
  return detail::pointwise_from_input(
      x, "rdiv_scalar", [s](float v) { return s / v; }, [s](float v) { return -s / (v * v); });
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

// ---- unary math ---------------------------------------------------------------------------------

inline Tensor neg(const Tensor& x) {
  return detail::pointwise_linear(
      x, "neg", [](float v) { return -v; }, -1.0f);
}
inline Tensor operator-(const Tensor& x) { return neg(x); }

inline Tensor exp(const Tensor& x) {
  return detail::pointwise_from_output(
      x, "exp", [](float v) { return std::exp(v); }, [](float y) { return y; });
}

inline Tensor log(const Tensor& x) {
  return detail::pointwise_from_input(
      x, "log", [](float v) { return std::log(v); }, [](float v) { return 1.0f / v; });
}

inline Tensor sqrt(const Tensor& x) {
  return detail::pointwise_from_output(
      x, "sqrt", [](float v) { return std::sqrt(v); }, [](float y) { return 0.5f / y; });
}

inline Tensor rsqrt(const Tensor& x) {
  return detail::pointwise_from_output(
      x, "rsqrt", [](float v) { return 1.0f / std::sqrt(v); },
      [](float y) { return -0.5f * y * y * y; });
}

// x^p for a scalar exponent p.
inline Tensor pow(const Tensor& x, float p) {
  return detail::pointwise_from_input(
      x, "pow", [p](float v) { return std::pow(v, p); },
      [p](float v) { return p * std::pow(v, p - 1.0f); });
}

inline Tensor tanh(const Tensor& x) {
  return detail::pointwise_from_output(
      x, "tanh", [](float v) { return std::tanh(v); }, [](float y) { return 1.0f - y * y; });
}

namespace detail {
inline float sigmoid_value(float v) { return 1.0f / (1.0f + std::exp(-v)); }
}  // namespace detail

inline Tensor sigmoid(const Tensor& x) {
  return detail::pointwise_from_output(x, "sigmoid", detail::sigmoid_value,
                                       [](float y) { return y * (1.0f - y); });
}

// x * sigmoid(x); derivative s * (1 + x * (1 - s)).
inline Tensor silu(const Tensor& x) {
  return detail::pointwise_from_input(
      x, "silu", [](float v) { return v * detail::sigmoid_value(v); },
      [](float v) {
        const float s = detail::sigmoid_value(v);
        return s * (1.0f + v * (1.0f - s));
      });
}

// max(x, 0); the derivative at 0 is taken as 0.
inline Tensor relu(const Tensor& x) {
  return detail::pointwise_from_input(
      x, "relu", [](float v) { return v > 0.0f ? v : 0.0f; },
      [](float v) { return v > 0.0f ? 1.0f : 0.0f; });
}

// Exact GELU, x * Phi(x) with the normal CDF Phi (PyTorch's default, not the tanh approximation).
inline Tensor gelu(const Tensor& x) {
  constexpr float kInvSqrt2 = static_cast<float>(1.0 / std::numbers::sqrt2);
  constexpr float kInvSqrt2Pi = static_cast<float>(std::numbers::inv_sqrtpi / std::numbers::sqrt2);
  return detail::pointwise_from_input(
      x, "gelu", [](float v) { return 0.5f * v * (1.0f + std::erf(v * kInvSqrt2)); },
      [](float v) {
        return 0.5f * (1.0f + std::erf(v * kInvSqrt2)) + v * kInvSqrt2Pi * std::exp(-0.5f * v * v);
      });
}

// ---- fused -----------------------------------------------------------------------------------

// swiglu(a, b) = silu(a) * b, the gate of a SwiGLU FFN, in one pass (a and b of the same shape).
// With s = sigmoid(a):  y = a s b,  da = g b s (1 + a (1 - s)),  db = g a s.
// The backward recomputes s from a instead of saving it. Sigmoids go through Eigen's vectorised
// exp; silu(a) * b composed from two ops is the reference the tests compare against.
inline Tensor swiglu(const Tensor& a, const Tensor& b) {
  detail::check_f32("swiglu", a), detail::check_f32("swiglu", b);
  REX_CHECK(a.shape() == b.shape(), "swiglu: a ", a.shape(), " and b ", b.shape(),
            " must have the same shape");
  Tensor y = Tensor::empty(a.shape());
  const float *pa = a.data<float>(), *pb = b.data<float>();
  float* py = y.data<float>();
  detail::for_each_chunk(a.numel(), [&](int64_t first, int64_t count) {
    const detail::ConstArrayMap av(pa + first, count), bv(pb + first, count);
    detail::ArrayMap(py + first, count) = av / (1.0f + (-av).exp()) * bv;
  });
  return detail::record(
      y, "swiglu", {a, b},
      [a = a.detach(), b = b.detach()](const Tensor& g, const std::vector<bool>& needs) {
        Tensor da = needs[0] ? Tensor::empty(a.shape()) : Tensor();
        Tensor db = needs[1] ? Tensor::empty(a.shape()) : Tensor();
        const float *pa = a.data<float>(), *pb = b.data<float>(), *pg = g.data<float>();
        detail::for_each_chunk(a.numel(), [&](int64_t first, int64_t count) {
          const detail::ConstArrayMap av(pa + first, count), bv(pb + first, count),
              gv(pg + first, count);
          const Eigen::ArrayXf s = 1.0f / (1.0f + (-av).exp());
          if (da.defined())
            detail::ArrayMap(da.data<float>() + first, count) =
                gv * bv * s * (1.0f + av * (1.0f - s));
          if (db.defined()) detail::ArrayMap(db.data<float>() + first, count) = gv * av * s;
        });
        return detail::GradList{da, db};
      });
}

}  // namespace rex
