// broadcast_to and sum_to: the one place where broadcasting is undone.
//
// broadcast_to stretches a tensor to a larger shape (NumPy rules); its backward is sum_to, which
// sums a gradient back down to the shape of the input it came from; sum_to's backward is
// broadcast_to. Every op that broadcasts (add, mul, where, ...) reduces its input gradients with
// sum_to.
#pragma once

#include "rex/backend/cpu/elementwise.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/ops/common.hpp"

namespace rex {

Tensor sum_to(const Tensor& x, const Shape& shape);

inline Tensor broadcast_to(const Tensor& x, const Shape& shape) {
  detail::check_f32("broadcast_to", x);
  REX_CHECK(detail::broadcast_shapes(x.shape(), shape, "broadcast_to") == shape,
            "broadcast_to: shape ", x.shape(), " cannot be broadcast to ", shape);
  Tensor out = Tensor::empty(shape, DType::f32, x.device());
  const float* px = x.device_data<float>();
  float* po = out.device_data<float>();
  if (detail::on_cuda(x)) {
    detail::cuda_backend().broadcast_copy(
        px, po, detail::cuda_broadcast_index("broadcast_to", shape, {x.shape()}));
  } else {
    detail::cpu::broadcast_copy(px, po, shape, x.shape());
  }
  return detail::record(out, "broadcast_to", {x}, [in_shape = x.shape()](const Tensor& g) {
    return detail::GradList{sum_to(g, in_shape)};
  });
}

// Sums x over the axes along which `shape` was broadcast to x.shape(). Returns x itself (same
// handle) when the shapes already agree.
inline Tensor sum_to(const Tensor& x, const Shape& shape) {
  detail::check_f32("sum_to", x);
  if (x.shape() == shape) return x;
  REX_CHECK(detail::broadcast_shapes(shape, x.shape(), "sum_to") == x.shape(), "sum_to: shape ",
            x.shape(), " is not a broadcast of ", shape);
  // The CPU loop adds into zeros; the CUDA kernel writes every output (no fill launch).
  Tensor out = detail::on_cuda(x) ? Tensor::empty(shape, DType::f32, x.device()) : zeros(shape);
  const float* px = x.device_data<float>();
  float* po = out.device_data<float>();
  if (detail::on_cuda(x)) {
    detail::cuda_backend().sum_to(px, po, out.numel(),
                                  detail::cuda_broadcast_index("sum_to", x.shape(), {shape}));
  } else {
    detail::cpu::sum_to(px, po, x.shape(), shape);
  }
  return detail::record(out, "sum_to", {x}, [out_shape = x.shape()](const Tensor& g) {
    return detail::GradList{broadcast_to(g, out_shape)};
  });
}

}  // namespace rex
