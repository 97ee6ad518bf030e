// The pointwise math of rex, written once for both backends: the CPU ops instantiate these
// templates per op (so each loop is a plain, vectorisable expression) and the CUDA kernels switch
// on the op code at run time. REX_HOST_DEVICE marks them callable from device code under nvcc and
// is empty for a host compiler. Only C math functions (expf, logf, ...) are used: they exist on
// both sides with the same meaning.
//
// Unary ops carry one scalar s (the exponent of pow, the operand of the scalar forms). Their
// backward is dx = g * unary_slope(op, saved, s), where `saved` is the input x or, for the ops
// whose derivative is cheaper from the output, y (unary_saves_output says which).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define REX_HOST_DEVICE __host__ __device__
#else
#define REX_HOST_DEVICE
#endif

namespace rex::detail {

enum class UnaryOp : int32_t {
  neg,
  exp,
  log,
  sqrt,
  rsqrt,
  pow,
  tanh,
  sigmoid,
  silu,
  relu,
  gelu,
  add_scalar,   // x + s
  sub_scalar,   // x - s
  rsub_scalar,  // s - x
  mul_scalar,   // x * s
  div_scalar,   // x / s
  rdiv_scalar,  // s / x
};

enum class BinaryOp : int32_t { add, sub, mul, div };

// True where the backward reads the output y instead of the input x.
REX_HOST_DEVICE constexpr bool unary_saves_output(UnaryOp op) {
  return op == UnaryOp::exp || op == UnaryOp::sqrt || op == UnaryOp::rsqrt || op == UnaryOp::tanh ||
         op == UnaryOp::sigmoid;
}

REX_HOST_DEVICE inline float sigmoid_of(float v) { return 1.0f / (1.0f + expf(-v)); }

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

// d(output)/d(input) from `saved` (x, or y where unary_saves_output).
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
    case UnaryOp::neg:
      return f(UnaryTag<UnaryOp::neg>{});
    case UnaryOp::exp:
      return f(UnaryTag<UnaryOp::exp>{});
    case UnaryOp::log:
      return f(UnaryTag<UnaryOp::log>{});
    case UnaryOp::sqrt:
      return f(UnaryTag<UnaryOp::sqrt>{});
    case UnaryOp::rsqrt:
      return f(UnaryTag<UnaryOp::rsqrt>{});
    case UnaryOp::pow:
      return f(UnaryTag<UnaryOp::pow>{});
    case UnaryOp::tanh:
      return f(UnaryTag<UnaryOp::tanh>{});
    case UnaryOp::sigmoid:
      return f(UnaryTag<UnaryOp::sigmoid>{});
    case UnaryOp::silu:
      return f(UnaryTag<UnaryOp::silu>{});
    case UnaryOp::relu:
      return f(UnaryTag<UnaryOp::relu>{});
    case UnaryOp::gelu:
      return f(UnaryTag<UnaryOp::gelu>{});
    case UnaryOp::add_scalar:
      return f(UnaryTag<UnaryOp::add_scalar>{});
    case UnaryOp::sub_scalar:
      return f(UnaryTag<UnaryOp::sub_scalar>{});
    case UnaryOp::rsub_scalar:
      return f(UnaryTag<UnaryOp::rsub_scalar>{});
    case UnaryOp::mul_scalar:
      return f(UnaryTag<UnaryOp::mul_scalar>{});
    case UnaryOp::div_scalar:
      return f(UnaryTag<UnaryOp::div_scalar>{});
    case UnaryOp::rdiv_scalar:
      return f(UnaryTag<UnaryOp::rdiv_scalar>{});
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
