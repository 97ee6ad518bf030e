// RMSNorm over the last axis: fused rms_norm, and rms_norm_reference built from composed rex ops.
//
// For a row x of length d and a weight w of length d:
//   ms = mean(x^2),  r = rsqrt(ms + eps),  xhat = x * r,  y = xhat * w.
// The fused op saves x, w and r (one float per row). Its backward, with gw = g * w:
//   dr/dx_k = -r^3 x_k / d, so dx = r * (gw - xhat * mean(gw * xhat))
//   dw = sum over rows of g * xhat
// rms_norm_reference computes the same with mul, mean(keepdim), add and rsqrt, and is what the
// tests compare the fused op against (values and gradients).
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "rex/ops/elementwise.hpp"
#include "rex/ops/reduce.hpp"

namespace rex {
namespace detail {

// Checks x [..., d] against weight [d] and eps >= 0; returns d.
inline int64_t check_rms_norm_args(std::string_view op, const Tensor& x, const Tensor& weight,
                                   float eps) {
  check_f32(op, x), check_f32(op, weight);
  REX_CHECK(x.rank() >= 1 && weight.rank() == 1 && x.dim(-1) == weight.dim(0), op, ": x ",
            x.shape(), " and weight ", weight.shape(),
            " do not match; expected x [..., d] and weight [d]");
  REX_CHECK(weight.dim(0) > 0, op, ": the last axis of x ", x.shape(), " is empty");
  REX_CHECK(eps >= 0.0f, op, ": eps must be >= 0, got ", eps);
  return weight.dim(0);
}

// rms_norm on CUDA: the same formulas in the rex::cuda kernels; r stays on the device.
inline Tensor cuda_rms_norm(const Tensor& x, const Tensor& weight, float eps, int64_t d) {
  const int64_t rows = x.numel() / d;
  Tensor y = Tensor::empty(x.shape(), DType::f32, x.device());
  Tensor r = Tensor::empty(Shape{rows}, DType::f32, x.device());
  cuda_backend().rms_norm(x.device_data<float>(), weight.device_data<float>(),
                          y.device_data<float>(), r.device_data<float>(), rows, d, eps);
  return record(y, "rms_norm", {x, weight},
                [x = x.detach(), weight = weight.detach(), r, rows, d](
                    const Tensor& g, const std::vector<bool>& needs) {
                  GradList grads(2);
                  if (needs[0]) grads[0] = Tensor::empty(x.shape(), DType::f32, x.device());
                  if (needs[1]) grads[1] = Tensor::empty(weight.shape(), DType::f32, x.device());
                  cuda_backend().rms_norm_backward(
                      g.device_data<float>(), x.device_data<float>(), weight.device_data<float>(),
                      r.device_data<float>(), needs[0] ? grads[0].device_data<float>() : nullptr,
                      needs[1] ? grads[1].device_data<float>() : nullptr, rows, d);
                  return grads;
                });
}

}  // namespace detail

inline Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps = 1e-6f) {
  const int64_t d = detail::check_rms_norm_args("rms_norm", x, weight, eps);
  if (detail::common_device("rms_norm", {x, weight}).is_cuda())
    return detail::cuda_rms_norm(x, weight, eps, d);
  const int64_t rows = x.numel() / d;
  Tensor y = Tensor::empty(x.shape());
  std::vector<float> r(static_cast<size_t>(rows));  // rsqrt(mean(x^2) + eps) per row
  const float *px = x.data<float>(), *pw = weight.data<float>();
  float* py = y.data<float>();
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = px + i * d;
    double squares = 0;
    for (int64_t j = 0; j < d; ++j) squares += static_cast<double>(row[j]) * row[j];
    const auto ri = static_cast<float>(1.0 / std::sqrt(squares / static_cast<double>(d) + eps));
    r[static_cast<size_t>(i)] = ri;
    for (int64_t j = 0; j < d; ++j) py[i * d + j] = row[j] * ri * pw[j];
  }
  return detail::record(
      y, "rms_norm", {x, weight},
      [x = x.detach(), weight = weight.detach(), r = std::move(r), d](
          const Tensor& g, const std::vector<bool>& needs) {
        const int64_t rows = x.numel() / d;
        const float *px = x.data<float>(), *pw = weight.data<float>(), *pg = g.data<float>();
        Tensor gx = needs[0] ? Tensor::empty(x.shape()) : Tensor();
        std::vector<double> gw_sum(needs[1] ? static_cast<size_t>(d) : 0, 0.0);
        for (int64_t i = 0; i < rows; ++i) {
          const float ri = r[static_cast<size_t>(i)];
          const float* row = px + i * d;
          const float* grow = pg + i * d;
          if (needs[0]) {
            double dot = 0;  // sum of gw * xhat over the row
            for (int64_t j = 0; j < d; ++j)
              dot += static_cast<double>(grow[j]) * pw[j] * (row[j] * ri);
            const auto mean_dot = static_cast<float>(dot / static_cast<double>(d));
            float* gxrow = gx.data<float>() + i * d;
            for (int64_t j = 0; j < d; ++j)
              gxrow[j] = ri * (grow[j] * pw[j] - row[j] * ri * mean_dot);
          }
          if (needs[1])
            for (int64_t j = 0; j < d; ++j)
              gw_sum[static_cast<size_t>(j)] += static_cast<double>(grow[j]) * (row[j] * ri);
        }
        detail::GradList grads{gx, Tensor()};
        if (needs[1]) {
          grads[1] = Tensor::empty(weight.shape());
          for (int64_t j = 0; j < d; ++j)
            grads[1].data<float>()[j] = static_cast<float>(gw_sum[static_cast<size_t>(j)]);
        }
        return grads;
      });
}

inline Tensor rms_norm_reference(const Tensor& x, const Tensor& weight, float eps = 1e-6f) {
  detail::check_rms_norm_args("rms_norm_reference", x, weight, eps);
  const Tensor r = rsqrt(add(mean(mul(x, x), -1, /*keepdim=*/true), eps));
  return mul(mul(x, r), weight);
}

}  // namespace rex
