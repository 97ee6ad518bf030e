// Rounding-error bounds for the tolerances of the suites (docs/testing.md, "Tolerances").
//
// u = 2^-24 is float's unit roundoff: one correctly rounded operation is within u of exact,
// relative. gamma_n(n) = n u / (1 - n u) is Higham's bound for n of them in a chain, and for a
// float sum or dot product of n terms in any order relative to the sum of the terms' magnitudes
// (N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Lemmas 3.1 and 3.3 and
// (3.5)). Two computations of the same value in different orders are within twice the bound of
// one. One ulp of a float is at most 2u relative.
//
// A whole model's results count the chain of roundings along its longest dependency path
// (model_chain) and are compared norm-wise against the result (relative_error <= 2 gamma_N), the
// composite rule of docs/testing.md, "Tolerances".
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include <doctest/doctest.h>
#include <rex/backend/cuda/runtime.hpp>
#include <rex/rex.hpp>

namespace rex::testing {

inline constexpr double kUnitRoundoff = 0x1p-24;

// One math-library call (expf, logf, powf, tanhf, erff, Eigen's vectorised exp), on the CPU or a
// GPU: 4 ulp = 8 u. CUDA documents expf, tanhf and erff within 2 ulp, logf 1 and powf 4 (CUDA C++
// Programming Guide, "Mathematical Functions"); glibc's are within 2 ulp on x86-64 (glibc manual,
// "Known Maximum Errors in Math Functions").
inline constexpr double kCallRoundoff = 8 * kUnitRoundoff;

constexpr double gamma_n(double n) { return n * kUnitRoundoff / (1 - n * kUnitRoundoff); }

// |t| element by element, on the host (the magnitudes that bounds are relative to).
inline Tensor abs_of(const Tensor& t) {
  Tensor a = t.to(Device::cpu()).clone();
  for (int64_t i = 0; i < a.numel(); ++i) a.data<float>()[i] = std::fabs(a.data<float>()[i]);
  return a;
}

// |got - want| <= tol * magnitude element by element (a NaN fails), naming the first element
// that is not: for values whose terms cancel, where a bound relative to the result cannot hold.
inline void check_within(const Tensor& got, const Tensor& want, const Tensor& magnitude,
                         double tol) {
  REQUIRE(got.shape() == want.shape());
  REQUIRE(magnitude.shape() == want.shape());
  const std::vector<float> g = got.to_vector(), w = want.to_vector(), m = magnitude.to_vector();
  for (size_t i = 0; i < g.size(); ++i) {
    const double diff = std::abs(double{g[i]} - w[i]), limit = tol * m[i];
    if (!(diff <= limit)) {
      CHECK_MESSAGE(diff <= limit, "element ", i, ": got ", g[i], ", want ", w[i], ", bound ",
                    limit);
      return;
    }
  }
}

// ||a - b|| and ||a||, in double, copied to the host.
inline double distance(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  const std::vector<float> x = a.to_vector(), y = b.to_vector();
  double sum = 0;
  for (size_t i = 0; i < x.size(); ++i)
    sum += (static_cast<double>(x[i]) - y[i]) * (static_cast<double>(x[i]) - y[i]);
  return std::sqrt(sum);
}
inline double norm(const Tensor& a) { return distance(a, zeros(a.shape(), a.device())); }

// ||got - want|| / ||want|| (0 when both are zero).
inline double relative_error(const Tensor& got, const Tensor& want) {
  return distance(got, want) / std::max(norm(want), 1e-30);
}

// A model's forward and backward pass, chained (the composite rule): N for the logits, the loss
// and the gradients, counted as tests/reference/error_bounds.py counts them for the PyTorch twin
// (see there for each stage).
struct ModelChain {
  double logits, losses, grads;
};
inline ModelChain model_chain(const nn::ModelConfig& m, int64_t tokens) {
  constexpr int64_t kCallTerms = 4;  // a call, 2 ulp, in units of u
  const int64_t d = m.d_model, time = m.context, head_dim = m.d_model / m.n_heads;
  const int64_t norm = d + kCallTerms + 2;
  const int64_t attention = norm + d + 4 + head_dim + 1 + 1 + kCallTerms + time + 1 + time + d + 1;
  const int64_t pool = m.moe.reuse * m.moe.experts_per_layer;
  const int64_t ffn = m.ffn == "moe" ? norm + d + 1 + kCallTerms + pool + 1 + m.moe.top_k + 1 + d +
                                           kCallTerms + 3 + 1 + m.moe.d_expert + 1 + m.moe.top_k +
                                           m.moe.shared_experts + 1
                                     : norm + d + kCallTerms + 3 + 1 + m.d_ff + 1;
  const int64_t reuse = m.ffn == "moe" ? m.moe.reuse : 1;
  const int64_t logits = m.n_layers * (attention + ffn) + norm + d;
  const int64_t losses = logits + 1 + kCallTerms + m.vocab_size + kCallTerms + 1 + 1 + tokens;
  const int64_t grads = 2 * losses + tokens * std::max<int64_t>(reuse, 2);
  return {static_cast<double>(logits), static_cast<double>(losses), static_cast<double>(grads)};
}

// Whether every vector within rel ||logits|| of `logits` (2-norm) has the same arg max: the top
// value leads the next by more than 2 rel ||logits|| (each element moves by at most rel
// ||logits||).
inline bool arg_max_holds_within(const Tensor& logits, double rel) {
  std::vector<float> v = logits.to_vector();
  REQUIRE(v.size() >= 2);
  std::partial_sort(v.begin(), v.begin() + 2, v.end(), std::greater<float>());
  return double{v[0]} - v[1] > 2 * rel * norm(logits);
}

// x rounded to `bits` significant bits, to nearest even, computed in double by frexp and
// nearbyint (the default rounding mode is to nearest even): independent of rex's bit arithmetic
// (bf16 has 8 significant bits, TF32 11).
inline double rounded_to_bits(float x, int bits) {
  int exponent = 0;
  const double fraction = std::frexp(static_cast<double>(x), &exponent);  // in [0.5, 1)
  return std::ldexp(std::nearbyint(std::ldexp(fraction, bits)), exponent - bits);
}

// The CPU's matmul precision for one scope.
struct CpuPrecision {
  explicit CpuPrecision(const char* name) { set_matmul_precision(Device::cpu(), name); }
  ~CpuPrecision() { set_matmul_precision(Device::cpu(), "fp32"); }
  CpuPrecision(const CpuPrecision&) = delete;
  CpuPrecision& operator=(const CpuPrecision&) = delete;
};

}  // namespace rex::testing
