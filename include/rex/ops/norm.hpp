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

#include <cstdint>
#include <string_view>
#include <vector>

#include "rex/backend/cpu/reduce.hpp"
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

struct RmsNormValues {
  Tensor y;     // x's shape
  Tensor rstd;  // [rows]: r = rsqrt(mean(x^2) + eps) per row, saved for the backward
};

inline RmsNormValues rms_norm_values(const Tensor& x, const Tensor& weight, float eps, int64_t d) {
  const int64_t rows = x.numel() / d;
  RmsNormValues out{Tensor::empty(x.shape(), DType::f32, x.device()),
                    Tensor::empty(Shape{rows}, DType::f32, x.device())};
  const float *px = x.device_data<float>(), *pw = weight.device_data<float>();
  float *py = out.y.device_data<float>(), *pr = out.rstd.device_data<float>();
  if (on_cuda(x)) {
    cuda_backend().rms_norm(px, pw, py, pr, rows, d, eps);
  } else {
    cpu::rms_norm(px, pw, py, pr, rows, d, eps);
  }
  return out;
}

// The gradients of x and weight (each left undefined where `needs` says it is not wanted). On CUDA,
// x's gradient is added to the one waiting for x (the residual stream's), which it takes; the CPU's
// loop, whose products its compiler may fuse into FMAs, leaves it to the engine.
inline GradList rms_norm_grads(const Tensor& g, const Tensor& x, const Tensor& weight,
                               const Tensor& rstd, const std::vector<bool>& needs,
                               GradList& waiting) {
  const int64_t d = weight.dim(0), rows = x.numel() / d;
  GradList grads(2);
  if (needs[0]) grads[0] = Tensor::empty(x.shape(), DType::f32, x.device());
  if (needs[1]) grads[1] = Tensor::empty(weight.shape(), DType::f32, x.device());
  float* dx = needs[0] ? grads[0].device_data<float>() : nullptr;
  float* dw = needs[1] ? grads[1].device_data<float>() : nullptr;
  const float *pg = g.device_data<float>(), *px = x.device_data<float>();
  const float *pw = weight.device_data<float>(), *pr = rstd.device_data<float>();
  if (on_cuda(x)) {
    const Tensor plus = std::move(waiting[0]);  // taken: added here
    cuda_backend().rms_norm_backward(
        pg, px, pw, pr, plus.defined() ? plus.device_data<float>() : nullptr, dx, dw, rows, d);
  } else {
    cpu::rms_norm_backward(pg, px, pw, pr, dx, dw, rows, d);
  }
  return grads;
}

// values.y as rms_norm(x, weight)'s output, recorded with its backward.
inline Tensor record_rms_norm(const RmsNormValues& values, const Tensor& x, const Tensor& weight) {
  return record(values.y, "rms_norm", {x, weight},
                [x = x.detach(), weight = weight.detach(), rstd = values.rstd](
                    const Tensor& g, const std::vector<bool>& needs, GradList& waiting) {
                  return rms_norm_grads(g, x, weight, rstd, needs, waiting);
                });
}

}  // namespace detail

inline Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps = 1e-6f) {
  const int64_t d = detail::check_rms_norm_args("rms_norm", x, weight, eps);
  detail::common_device("rms_norm", {x, weight});
  return detail::record_rms_norm(detail::rms_norm_values(x, weight, eps, d), x, weight);
}

struct AddRmsNorm {
  Tensor sum;  // a + b
  Tensor y;    // rms_norm(sum, weight, eps)
};

// rms_norm(a + b) with the sum kept: a pre-norm block's residual add and the norm after it. On
// CUDA one kernel where add and rms_norm launch two, with their bits (the CPU runs the two); the
// graph is theirs (an "add" node, then an "rms_norm" node of the sum), and so is the backward.
inline AddRmsNorm add_rms_norm(const Tensor& a, const Tensor& b, const Tensor& weight,
                               float eps = 1e-6f) {
  detail::check_f32("add_rms_norm", a), detail::check_f32("add_rms_norm", b);
  REX_CHECK(a.shape() == b.shape(), "add_rms_norm: a ", a.shape(), " and b ", b.shape(),
            " differ; expected the same shape");
  const int64_t d = detail::check_rms_norm_args("add_rms_norm", a, weight, eps);
  detail::common_device("add_rms_norm", {a, b, weight});
  if (!detail::on_cuda(a)) {
    const Tensor sum = add(a, b);
    return {sum, rms_norm(sum, weight, eps)};
  }
  const int64_t rows = a.numel() / d;
  Tensor sum = Tensor::empty(a.shape(), DType::f32, a.device());
  detail::RmsNormValues values{Tensor::empty(a.shape(), DType::f32, a.device()),
                               Tensor::empty(Shape{rows}, DType::f32, a.device())};
  detail::cuda_backend().add_rms_norm(a.device_data<float>(), b.device_data<float>(),
                                      weight.device_data<float>(), sum.device_data<float>(),
                                      values.y.device_data<float>(),
                                      values.rstd.device_data<float>(), rows, d, eps);
  sum = detail::record_add(sum, a, b);
  return {sum, detail::record_rms_norm(values, sum, weight)};
}

inline Tensor rms_norm_reference(const Tensor& x, const Tensor& weight, float eps = 1e-6f) {
  detail::check_rms_norm_args("rms_norm_reference", x, weight, eps);
  const Tensor r = rsqrt(add(mean(mul(x, x), -1, /*keepdim=*/true), eps));
  return mul(mul(x, r), weight);
}

}  // namespace rex
