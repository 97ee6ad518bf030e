// gradcheck: compares the gradients that autodiff computes with central differences.
//
// For a function f of some tensors, the scalar probed is L = sum(w * f(inputs)) with fixed random
// weights w (a plain sum would hide errors in ops whose outputs sum to a constant, like softmax).
// L is accumulated in double. For every element x_j of every input that requires a gradient:
//   numeric_j = (L(x_j + h) - L(x_j - h)) / (actual distance between the two perturbed floats)
// and the check passes when |analytic_j - numeric_j| <= atol + rtol * |numeric_j| for all j (a NaN
// on either side fails).
// Inputs should keep away from kinks (relu at 0, ties in max/top-k) by more than h. With the
// default h = 1e-2 and rtol = 1e-2 in float32 it catches gradient errors above about 1%; fused ops
// are also compared with their composed references (bounds derived in each test).
//
// Why the defaults hold (docs/testing.md, "Tolerances"): rtol is the detection threshold, and the
// central difference's own error stays below atol + rtol |numeric|. Truncation: h^2 / 6 |L3|
// (L3 the third derivative along x_j), 2e-5 at h = 1e-2 for the smooth ops on the O(1) inputs
// used. Rounding: only the outputs that x_j reaches differ between L(x + h) and L(x - h) (the
// others are the same bits and cancel), each within gamma_k of its terms, k <= 16 roundings, so
// the difference quotient is within gamma_16 sum |w_i y_i| / h over those outputs: about 1e-5 per
// O(1) output at h = 1e-2, inside atol = 1e-3 for the few dozen outputs an element reaches here.
// A smaller step (to keep a top-k choice from flipping) multiplies the rounding part by 1e-2 / h;
// its callers say how they cover it.
#pragma once

#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <rex/rex.hpp>

namespace rex::testing {

struct GradcheckOptions {
  float step = 1e-2f;
  double rtol = 1e-2;
  double atol = 1e-3;
  uint64_t seed = 1234;
};

struct GradcheckResult {
  bool ok = true;
  double worst_error = 0;  // largest |analytic - numeric| - (atol + rtol |numeric|), <= 0 when ok
  std::string report;      // where the worst element is, and its two values
};

using TensorFn = std::function<Tensor(const std::vector<Tensor>&)>;

inline GradcheckResult gradcheck(const TensorFn& f, std::vector<Tensor> inputs,
                                 const GradcheckOptions& options = {}) {
  Generator gen(options.seed);
  Tensor out = f(inputs);
  const Tensor weights = normal(out.shape(), gen);
  const float* w = weights.data<float>();
  auto probe = [&] {
    NoGradGuard no_grad;
    Tensor y = f(inputs);
    double total = 0;
    for (int64_t i = 0; i < y.numel(); ++i) total += static_cast<double>(w[i]) * y.data<float>()[i];
    return total;
  };

  for (Tensor& x : inputs)
    if (x.defined() && x.requires_grad()) x.zero_grad();
  out.backward(weights);

  GradcheckResult result;
  result.worst_error = -1e300;
  for (size_t k = 0; k < inputs.size(); ++k) {
    Tensor& x = inputs[k];
    if (!x.defined() || !x.requires_grad()) continue;
    const Tensor analytic = x.grad();
    float* px = x.data<float>();
    for (int64_t j = 0; j < x.numel(); ++j) {
      const float original = px[j];
      const float plus = original + options.step, minus = original - options.step;
      px[j] = plus;
      const double loss_plus = probe();
      px[j] = minus;
      const double loss_minus = probe();
      px[j] = original;
      const double numeric = (loss_plus - loss_minus) / (static_cast<double>(plus) - minus);
      const double got = analytic.defined() ? analytic.data<float>()[j] : 0.0;
      const double raw =
          std::abs(got - numeric) - (options.atol + options.rtol * std::abs(numeric));
      const double excess = std::isnan(raw) ? INFINITY : raw;  // a NaN on either side fails
      if (excess > result.worst_error) {
        result.worst_error = excess;
        std::ostringstream where;
        where << "input " << k << " (shape " << x.shape() << ") element " << j << ": autodiff "
              << got << ", central difference " << numeric;
        result.report = where.str();
      }
      if (excess > 0) result.ok = false;
    }
  }
  return result;
}

}  // namespace rex::testing

// CHECK_GRADIENTS(f, inputs[, options]) fails the current doctest case with the worst element.
#define CHECK_GRADIENTS(...)                                              \
  do {                                                                    \
    const auto gradcheck_result = ::rex::testing::gradcheck(__VA_ARGS__); \
    CHECK_MESSAGE(gradcheck_result.ok, gradcheck_result.report);          \
  } while (0)
