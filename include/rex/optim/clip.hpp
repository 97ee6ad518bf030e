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
#include <vector>

#include "rex/backend/cpu/arrays.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/optim/adamw.hpp"

namespace rex::optim {

// Returns the norm before clipping; max_norm <= 0 only measures it.
inline double clip_grad_norm(const std::vector<Parameter>& params, double max_norm) {
  // Each parameter's sum of squares in parallel, then their total in parameter order, so the norm
  // does not depend on the thread count.
  const auto count = static_cast<int64_t>(params.size());
  std::vector<double> own(params.size(), 0.0);
  REX_PARALLEL_FOR(schedule(dynamic))
  for (int64_t i = 0; i < count; ++i) {
    const Tensor g = params[i].tensor.grad();
    if (!g.defined()) continue;
    if (detail::on_cuda(g)) continue;  // summed below, on the device
    // Eigen's vectorised reduction: a fixed summation tree, so the same on every run.
    own[i] = detail::ConstArrayMap(g.data<float>(), g.numel()).cast<double>().square().sum();
  }
  // CUDA gradients: a deterministic double reduction per tensor in rex::cuda, all read back to
  // the host together (one synchronisation for the whole step).
  std::vector<const float*> cuda_arrays;
  std::vector<int64_t> cuda_sizes, cuda_positions;
  for (int64_t i = 0; i < count; ++i) {
    const Tensor g = params[i].tensor.grad();
    if (!g.defined() || !detail::on_cuda(g)) continue;
    cuda_arrays.push_back(g.device_data<float>());
    cuda_sizes.push_back(g.numel());
    cuda_positions.push_back(i);
  }
  if (!cuda_arrays.empty()) {
    std::vector<double> cuda_sums(cuda_arrays.size());
    detail::cuda_backend().sum_squares(cuda_arrays.data(), cuda_sizes.data(),
                                       static_cast<int64_t>(cuda_arrays.size()), cuda_sums.data());
    for (size_t j = 0; j < cuda_sums.size(); ++j) own[cuda_positions[j]] = cuda_sums[j];
  }
  double sum_sq = 0.0;
  const Parameter* first_non_finite = nullptr;
  for (int64_t i = 0; i < count; ++i) {
    // A square of an f32 cannot overflow a double, so a non-finite sum means a non-finite element.
    if (!std::isfinite(own[i]) && first_non_finite == nullptr) first_non_finite = &params[i];
    sum_sq += own[i];
  }
  const double norm = std::sqrt(sum_sq);
  if (first_non_finite != nullptr) {
    throw Error(
        detail::concat("clip_grad_norm: gradient norm is ", std::isnan(norm) ? "nan" : "inf",
                       "; first non-finite gradient in parameter ", first_non_finite->name));
  }
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
