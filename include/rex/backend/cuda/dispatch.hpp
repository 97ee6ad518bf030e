// Host-side helpers the ops use to run on CUDA: the device test, the same-device check, and the
// launch descriptions (broadcast indexing) that the backend table takes. Header-only and free of
// CUDA: everything goes through rex::detail::cuda_backend().
#pragma once

#include <initializer_list>
#include <memory>
#include <string_view>

#include "rex/backend/cpu/elementwise.hpp"
#include "rex/backend/cuda/backend.hpp"
#include "rex/core/tensor.hpp"

namespace rex::detail {

inline bool on_cuda(const Tensor& x) { return x.device().is_cuda(); }

// Every defined tensor in `tensors` must be on the first one's device; returns that device.
inline Device common_device(std::string_view op, std::initializer_list<Tensor> tensors) {
  Device device;
  bool first = true;
  for (const Tensor& t : tensors) {
    if (!t.defined()) continue;
    if (first) {
      device = t.device(), first = false;
      continue;
    }
    REX_CHECK(t.device() == device, op, ": inputs are on different devices (", device, " and ",
              t.device(), "); move them with .to(device) first");
  }
  return device;
}

// Raw device memory owned by whoever holds the pointer (a graph node, say): for values that have
// no tensor dtype, such as cross_entropy's double-precision log-sum-exp.
inline std::shared_ptr<void> cuda_buffer(size_t bytes) {
  return std::shared_ptr<void>(device_memory().allocate(bytes),
                               [](void* ptr) { device_memory().release(ptr); });
}

// The launch description of `out` (row-major) read through inputs of the shapes `ins`, each
// broadcastable to it.
inline CudaBroadcast cuda_broadcast_index(std::string_view op, const Shape& out,
                                          std::initializer_list<Shape> ins) {
  REX_CHECK(out.rank() <= kMaxCudaRank, op, ": shape ", out, " has more than ", kMaxCudaRank,
            " axes, the most the CUDA backend broadcasts over");
  CudaBroadcast index;
  index.rank = static_cast<int32_t>(out.rank());
  for (int64_t i = 0; i < out.rank(); ++i) index.dims[i] = out[i];
  int k = 0;
  for (const Shape& in : ins) {
    const std::vector<int64_t> strides = broadcast_strides(in, out);
    for (int64_t i = 0; i < out.rank(); ++i) index.strides[k][i] = strides[static_cast<size_t>(i)];
    ++k;
  }
  return index;
}

// out = a (op) b for two f32 CUDA tensors broadcast together.
inline Tensor cuda_binary(BinaryOp op, const Tensor& a, const Tensor& b, std::string_view name) {
  const Shape shape = broadcast_shapes(a.shape(), b.shape(), name);
  Tensor out = Tensor::empty(shape, DType::f32, a.device());
  cuda_backend().binary(op, a.device_data<float>(), b.device_data<float>(),
                        out.device_data<float>(),
                        cuda_broadcast_index(name, shape, {a.shape(), b.shape()}));
  return out;
}

// y = f(x) for a pointwise op on a CUDA tensor.
inline Tensor cuda_unary(UnaryOp op, float s, const Tensor& x) {
  Tensor y = Tensor::empty(x.shape(), DType::f32, x.device());
  cuda_backend().unary(op, s, x.device_data<float>(), y.device_data<float>(), x.numel());
  return y;
}

}  // namespace rex::detail
