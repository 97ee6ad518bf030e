// Gradient clipping by global L2 norm, with torch.nn.utils.clip_grad_norm_ semantics: every
// gradient is multiplied by min(1, max_norm / (norm + 1e-6)), in place.
//
// The norm is accumulated in double over all defined gradients (parameters without one are
// skipped), so it does not depend on how the parameters are split into tensors. It takes the
// optimiser's named Parameters so that a non-finite norm, which would otherwise poison every weight
// on the next step, is reported with the first parameter whose gradient holds a NaN or an infinity.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "rex/backend/cpu/arrays.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/optim/adamw.hpp"

namespace rex::optim {

// Returns the norm before clipping; max_norm <= 0 only measures it. (AdamW::clip_grad_norm is the
// same rule over the optimiser's arena, which on CUDA keeps the norm and the factor on the device.)
inline double clip_grad_norm(const std::vector<Parameter>& params, double max_norm) {
  // Each parameter's sum of squares (in parallel; CUDA gradients by a deterministic double
  // reduction per tensor, all read back together: one synchronisation), then their total in
  // parameter order, so the norm does not depend on the thread count.
  const auto count = static_cast<int64_t>(params.size());
  std::vector<Tensor> grads;
  std::vector<std::string> names;
  for (const Parameter& p : params) {
    grads.push_back(p.tensor.grad());
    names.push_back(p.name);
  }
  const std::vector<double> own = detail::sums_of_squares(grads);
  double sum_sq = 0.0;
  for (int64_t i = 0; i < count; ++i) sum_sq += own[i];
  const double norm = std::sqrt(sum_sq);
  // A square of an f32 cannot overflow a double, so a non-finite sum means a non-finite element.
  if (!std::isfinite(norm)) throw detail::non_finite_norm(norm, own, names);
  const double coef = max_norm / (norm + 1e-6);
  if (max_norm > 0.0 && coef < 1.0) {
    const auto scale = static_cast<float>(coef);
    for (const Parameter& p : params) {
      const Tensor g = p.tensor.grad();
      if (g.defined() && detail::on_cuda(g))
        detail::cuda_backend().unary(detail::UnaryOp::mul_scalar, scale, g.device_data<float>(),
                                     g.device_data<float>(), g.numel());
    }
    REX_PARALLEL_FOR(schedule(dynamic))
    for (int64_t i = 0; i < count; ++i) {
      const Tensor g = params[i].tensor.grad();
      if (!g.defined() || detail::on_cuda(g)) continue;
      detail::ArrayMap(g.data<float>(), g.numel()) *= scale;
    }
  }
  return norm;
}

}  // namespace rex::optim
