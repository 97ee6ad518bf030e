// The pointwise math of rex, written once for both backends: the CPU ops instantiate these
// templates per op (so each loop is a plain, vectorisable expression) and the CUDA kernels switch
// on the op code at run time. REX_HOST_DEVICE marks them callable from device code under nvcc and
// is empty for a host compiler. Only C math functions (expf, logf, ...) are used: they exist on
// both sides with the same meaning.
//
// Unary ops carry one scalar s (the exponent of pow, the operand of the scalar forms). Their
// backward is dx = g * unary_slope(op, saved, s), where `saved` is the input x or, for the ops
// whose derivative is cheaper from the output, y (the REX_UNARY_OPS list says which). The other
// shared rules live here too: the NaN-first ranking of max and topk (ranks_before), the entries a
// top-k hides and the SwiGLU value and gradients, whose templates also take Eigen arrays (the CPU's
// vectorised form).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "rex/core/host_device.hpp"

namespace rex::detail {

// Every unary op, one row each: X(name, what its backward saves). The enum, the op-code switch
// (with_unary_op) and unary_saves are generated from this list, so a new op is one row here plus
// its formula (unary_value) and its derivative (unary_slope). `saves`: input (dx = g * f'(x)),
// output (dx = g * f'(y), where the derivative is cheaper from y) or nothing (a constant slope).
#define REX_UNARY_OPS(X)              \
  X(neg, nothing)                     \
  X(exp, output)                      \
  X(log, input)                       \
  X(sqrt, output)                     \
  X(rsqrt, output)                    \
  X(pow, input)                       \
  X(tanh, output)                     \
  X(sigmoid, output)                  \
  X(silu, input)                      \
  X(relu, input)                      \
  X(gelu, input)                      \
  X(add_scalar, nothing)  /* x + s */ \
  X(sub_scalar, nothing)  /* x - s */ \
  X(rsub_scalar, nothing) /* s - x */ \
  X(mul_scalar, nothing)  /* x * s */ \
  X(div_scalar, nothing)  /* x / s */ \
  X(rdiv_scalar, input)   /* s / x */

#define REX_UNARY_ENUM_ROW(name, saves) name,
enum class UnaryOp : int32_t { REX_UNARY_OPS(REX_UNARY_ENUM_ROW) };
#undef REX_UNARY_ENUM_ROW

enum class BinaryOp : int32_t { add, sub, mul, div };

// What a unary op's backward reads.
enum class UnarySaves : int32_t { input, output, nothing };

REX_HOST_DEVICE constexpr UnarySaves unary_saves(UnaryOp op) {
  switch (op) {
#define REX_UNARY_SAVES_ROW(name, saves) \
  case UnaryOp::name:                    \
    return UnarySaves::saves;
    REX_UNARY_OPS(REX_UNARY_SAVES_ROW)
#undef REX_UNARY_SAVES_ROW
  }
  return UnarySaves::input;
}

// exp of a float (C's expf, as in device code) or, on the CPU, of an Eigen array expression (its
// vectorised exp), so that one formula template below serves the kernels and the Eigen loops.
template <class T>
REX_HOST_DEVICE inline auto exp_of(const T& v) {
  if constexpr (std::is_same_v<T, float>) {
    return expf(v);
  } else {
    return v.exp();
  }
}

template <class T>
REX_HOST_DEVICE inline auto sigmoid_of(const T& v) {
  return 1.0f / (1.0f + exp_of(-v));
}

// NaN test without a library call (the same on host and device; rex never builds with
// -ffast-math).
REX_HOST_DEVICE inline bool is_nan(float v) { return v != v; }

// The ranking of max, topk and their kernels: value a at position i ranks before value b at
// position j when a is NaN and b is not, else when a > b, ties (and NaN against NaN) to the lower
// position. A strict total order on (value, position), so any reduction tree picks the same winner.
REX_HOST_DEVICE inline bool ranks_before(float a, int64_t i, float b, int64_t j) {
  const bool a_nan = is_nan(a), b_nan = is_nan(b);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a > b;
  return i < j;
}

// Where rope reads and writes (rex/ops/rope.hpp): batch x heads x time rows of head_dim, stored
// heads first ([B, H, T, D]) or time first ([B, T, H, D], as a projection leaves them, and as
// attention reads them with AttentionLayout::time_first). With second_heads (time first only), the
// rows of two tensors, [B, T, heads, D] and [B, T, second_heads, D], packed into one: at each
// position the first's heads, then the second's (rope_qk: q's, then k's). Row r counts in the
// packed order; apart_row gives where it lies in its own tensor.
struct RopeRows {
  int64_t batch = 0, heads = 0, time = 0;
  bool time_first = false;
  int64_t second_heads = 0;

  REX_HOST_DEVICE int64_t count() const { return batch * (heads + second_heads) * time; }
  // The position of row r.
  REX_HOST_DEVICE int64_t position(int64_t r) const {
    return time_first ? r / (heads + second_heads) % time : r % time;
  }
  // Whether packed row r is one of the second tensor's, and its row in its own tensor.
  REX_HOST_DEVICE bool in_second(int64_t r) const { return r % (heads + second_heads) >= heads; }
  REX_HOST_DEVICE int64_t apart_row(int64_t r) const {
    const int64_t per_position = heads + second_heads, at = r / per_position;
    const int64_t h = r % per_position;
    return h < heads ? at * heads + h : at * second_heads + h - heads;
  }
};

// The entries a top-k may not choose (rex::TopKMask on raw memory): where keep[r * keep_stride +
// i] is 0, entry i of row r ranks as `hidden`, whatever x holds there, and takes no gradient.
// keep_stride 0 gives every row the same mask; keep null hides nothing.
struct TopKHidden {
  const float* keep = nullptr;
  int64_t keep_stride = 0;
  float hidden = 0.0f;

  REX_HOST_DEVICE bool hides(int64_t r, int64_t i) const {
    return keep != nullptr && keep[r * keep_stride + i] == 0.0f;
  }
  // What the top-k of row r (its values at `row`) ranks and returns at position i.
  REX_HOST_DEVICE float score(const float* row, int64_t r, int64_t i) const {
    return hides(r, i) ? hidden : row[i];
  }
};

// SwiGLU, y = silu(a) * b, for floats (the kernels) and Eigen arrays (the CPU). With
// s = sigmoid(a), its gradients for an output gradient g are
//   da = g b s (1 + a (1 - s)),   db = g a s.
template <class A, class B>
REX_HOST_DEVICE inline auto swiglu_value(const A& a, const B& b) {
  return a / (1.0f + exp_of(-a)) * b;
}
template <class G, class A, class B, class S>
REX_HOST_DEVICE inline auto swiglu_grad_a(const G& g, const A& a, const B& b, const S& s) {
  return g * b * s * (1.0f + a * (1.0f - s));
}
template <class G, class A, class S>
REX_HOST_DEVICE inline auto swiglu_grad_b(const G& g, const A& a, const S& s) {
  return g * a * s;
}

template <UnaryOp Op>
REX_HOST_DEVICE inline float unary_value(float v, float s) {
  constexpr float kInvSqrt2 = 0.70710678118654752f;
  if constexpr (Op == UnaryOp::neg) return -v;
  if constexpr (Op == UnaryOp::exp) return expf(v);
  if constexpr (Op == UnaryOp::log) return logf(v);
  if constexpr (Op == UnaryOp::sqrt) return sqrtf(v);
  if constexpr (Op == UnaryOp::rsqrt) return 1.0f / sqrtf(v);
  if constexpr (Op == UnaryOp::pow) return powf(v, s);
  if constexpr (Op == UnaryOp::tanh) return tanhf(v);
  if constexpr (Op == UnaryOp::sigmoid) return sigmoid_of(v);
  if constexpr (Op == UnaryOp::silu) return v * sigmoid_of(v);
  if constexpr (Op == UnaryOp::relu) return v > 0.0f ? v : 0.0f;
  if constexpr (Op == UnaryOp::gelu) return 0.5f * v * (1.0f + erff(v * kInvSqrt2));
  if constexpr (Op == UnaryOp::add_scalar) return v + s;
  if constexpr (Op == UnaryOp::sub_scalar) return v - s;
  if constexpr (Op == UnaryOp::rsub_scalar) return s - v;
  if constexpr (Op == UnaryOp::mul_scalar) return v * s;
  if constexpr (Op == UnaryOp::div_scalar) return v / s;
  if constexpr (Op == UnaryOp::rdiv_scalar) return s / v;
}

// d(output)/d(input) from `saved` (x, or y where unary_saves says output).
template <UnaryOp Op>
REX_HOST_DEVICE inline float unary_slope(float saved, float s) {
  constexpr float kInvSqrt2 = 0.70710678118654752f;
  constexpr float kInvSqrt2Pi = 0.39894228040143268f;
  if constexpr (Op == UnaryOp::neg || Op == UnaryOp::rsub_scalar) return -1.0f;
  if constexpr (Op == UnaryOp::exp) return saved;
  if constexpr (Op == UnaryOp::log) return 1.0f / saved;
  if constexpr (Op == UnaryOp::sqrt) return 0.5f / saved;
  if constexpr (Op == UnaryOp::rsqrt) return -0.5f * saved * saved * saved;
  if constexpr (Op == UnaryOp::pow) return s * powf(saved, s - 1.0f);
  if constexpr (Op == UnaryOp::tanh) return 1.0f - saved * saved;
  if constexpr (Op == UnaryOp::sigmoid) return saved * (1.0f - saved);
  if constexpr (Op == UnaryOp::silu) {
    const float sg = sigmoid_of(saved);
    return sg * (1.0f + saved * (1.0f - sg));
  }
  if constexpr (Op == UnaryOp::relu) return saved > 0.0f ? 1.0f : 0.0f;
  if constexpr (Op == UnaryOp::gelu)
    return 0.5f * (1.0f + erff(saved * kInvSqrt2)) +
           saved * kInvSqrt2Pi * expf(-0.5f * saved * saved);
  if constexpr (Op == UnaryOp::add_scalar || Op == UnaryOp::sub_scalar) return 1.0f;
  if constexpr (Op == UnaryOp::mul_scalar) return s;
  if constexpr (Op == UnaryOp::div_scalar) return 1.0f / s;
  if constexpr (Op == UnaryOp::rdiv_scalar) return -s / (saved * saved);
}

template <BinaryOp Op>
REX_HOST_DEVICE inline float binary_value(float a, float b) {
  if constexpr (Op == BinaryOp::add) return a + b;
  if constexpr (Op == BinaryOp::sub) return a - b;
  if constexpr (Op == BinaryOp::mul) return a * b;
  if constexpr (Op == BinaryOp::div) return a / b;
}

// Calls f(std::integral_constant-like tag) with the op as a compile-time value, so a run-time op
// code selects one instantiated loop: with_unary_op(op, [&](auto tag) { ...unary_value<tag()>...
// }).
template <UnaryOp Op>
struct UnaryTag {
  REX_HOST_DEVICE constexpr UnaryOp operator()() const { return Op; }
};
template <BinaryOp Op>
struct BinaryTag {
  REX_HOST_DEVICE constexpr BinaryOp operator()() const { return Op; }
};

template <class F>
REX_HOST_DEVICE inline void with_unary_op(UnaryOp op, F&& f) {
  switch (op) {
#define REX_UNARY_CASE_ROW(name, saves) \
  case UnaryOp::name:                   \
    return f(UnaryTag<UnaryOp::name>{});
    REX_UNARY_OPS(REX_UNARY_CASE_ROW)
#undef REX_UNARY_CASE_ROW
  }
}

template <class F>
REX_HOST_DEVICE inline void with_binary_op(BinaryOp op, F&& f) {
  switch (op) {
    case BinaryOp::add:
      return f(BinaryTag<BinaryOp::add>{});
    case BinaryOp::sub:
      return f(BinaryTag<BinaryOp::sub>{});
    case BinaryOp::mul:
      return f(BinaryTag<BinaryOp::mul>{});
    case BinaryOp::div:
      return f(BinaryTag<BinaryOp::div>{});
  }
}

}  // namespace rex::detail
