// Reductions over one axis or over everything: sum, mean, max, each with keepdim.
//
// The reduced axis is seen as the middle of an [outer, n, inner] block. sum's backward broadcasts
// the gradient back; mean is sum / n; max routes the gradient to the first position of each maximum
// (ties go to the lowest index, as the saved i32 argmax says). NaN counts as the largest value, so
// a row holding one has maximum NaN whatever the order (as in PyTorch, and as topk ranks it: both
// use detail::ranks_before).
#pragma once

#include <vector>

#include "rex/backend/cpu/reduce.hpp"
#include "rex/ops/broadcast.hpp"
#include "rex/ops/elementwise.hpp"
#include "rex/ops/shape.hpp"

namespace rex {
namespace detail {

// The shape left after reducing `axis`: extent 1 with keepdim, removed without.
inline Shape reduced_shape(const Shape& in, int64_t axis, bool keepdim) {
  std::vector<int64_t> dims = in.dims();
  if (keepdim) {
    dims[static_cast<size_t>(axis)] = 1;
  } else {
    dims.erase(dims.begin() + axis);
  }
  return Shape(std::move(dims));
}

}  // namespace detail

inline Tensor sum(const Tensor& x, int64_t axis, bool keepdim = false) {
  detail::check_f32("sum", x);
  axis = x.shape().normalize_axis(axis, "sum");
  const int64_t outer = x.shape().numel(0, axis), n = x.shape()[axis];
  const int64_t inner = x.shape().numel(axis + 1, x.rank());
  // The CPU loop adds into zeros; the CUDA kernels write every output (no fill launch).
  const Shape shape = detail::reduced_shape(x.shape(), axis, keepdim);
  Tensor out = detail::on_cuda(x) ? Tensor::empty(shape, DType::f32, x.device()) : zeros(shape);
  const float* px = x.device_data<float>();
  float* po = out.device_data<float>();
  (detail::on_cuda(x) ? detail::cuda_backend().sum_axis : detail::cpu::sum_axis)(px, po, outer, n,
                                                                                 inner);
  return detail::record(out, "sum", {x}, [in_shape = x.shape(), axis](const Tensor& g) {
    return detail::GradList{
        broadcast_to(reshape(g, detail::reduced_shape(in_shape, axis, true).dims()), in_shape)};
  });
}

// Sum of all elements, as a 0-d tensor.
inline Tensor sum(const Tensor& x) { return sum(reshape(x, {-1}), 0); }

inline Tensor mean(const Tensor& x, int64_t axis, bool keepdim = false) {
  detail::check_f32("mean", x);
  const int64_t n = x.shape()[x.shape().normalize_axis(axis, "mean")];
  REX_CHECK(n > 0, "mean: axis ", axis, " of shape ", x.shape(), " is empty");
  return mul(sum(x, axis, keepdim), 1.0f / static_cast<float>(n));
}

inline Tensor mean(const Tensor& x) { return mean(reshape(x, {-1}), 0); }

inline Tensor max(const Tensor& x, int64_t axis, bool keepdim = false) {
  detail::check_f32("max", x);
  axis = x.shape().normalize_axis(axis, "max");
  const int64_t outer = x.shape().numel(0, axis), n = x.shape()[axis];
  const int64_t inner = x.shape().numel(axis + 1, x.rank());
  REX_CHECK(n > 0, "max: axis ", axis, " of shape ", x.shape(), " is empty");
  Tensor out =
      Tensor::empty(detail::reduced_shape(x.shape(), axis, keepdim), DType::f32, x.device());
  // The position of each maximum along the axis, on x's device, saved for the backward.
  Tensor argmax = Tensor::empty(Shape{outer * inner}, DType::i32, x.device());
  (detail::on_cuda(x) ? detail::cuda_backend().max_axis : detail::cpu::max_axis)(
      x.device_data<float>(), out.device_data<float>(), argmax.device_data<int32_t>(), outer, n,
      inner);
  return detail::record(out, "max", {x},
                        [in_shape = x.shape(), argmax, outer, n, inner](const Tensor& g) {
                          Tensor gx = Tensor::empty(in_shape, DType::f32, g.device());
                          (detail::on_cuda(g) ? detail::cuda_backend().max_axis_backward
                                              : detail::cpu::max_axis_backward)(
                              g.device_data<float>(), argmax.device_data<int32_t>(),
                              gx.device_data<float>(), outer, n, inner);
                          return detail::GradList{gx};
                        });
}

inline Tensor max(const Tensor& x) { return max(reshape(x, {-1}), 0); }

}  // namespace rex
