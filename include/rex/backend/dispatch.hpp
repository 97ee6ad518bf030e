// Device-neutral entries for code above the backends (the autograd engine, the ops): each one runs
// the CPU loop (rex/backend/cpu) or the CUDA table entry (rex/backend/cuda) for its tensors'
// device, so its caller includes no backend/cuda header and writes no loop of its own.
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <string_view>

#include "rex/backend/cpu/elementwise.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/core/tensor.hpp"

namespace rex::detail {

// out = a + b for f32 tensors of one shape on one device; out may be a (in-place accumulation).
// `op` names the caller in the device check.
inline void add_into(const Tensor& a, const Tensor& b, const Tensor& out, std::string_view op) {
  common_device(op, {a, b, out});
  if (on_cuda(a)) {
    cuda_backend().binary(BinaryOp::add, a.device_data<float>(), b.device_data<float>(),
                          out.device_data<float>(),
                          cuda_broadcast_index(op, out.shape(), {a.shape(), b.shape()}));
    return;
  }
  cpu::add(a.data<float>(), b.data<float>(), out.data<float>(), out.numel());
}

// Raw memory on `device` owned by whoever holds the pointer (a graph node, say): for values that
// have no tensor dtype, such as cross_entropy's double-precision log-sum-exp.
inline std::shared_ptr<void> device_buffer(const Device& device, size_t bytes) {
  if (device.is_cuda()) return cuda_buffer(bytes);
  return std::shared_ptr<void>(::operator new(bytes), [](void* ptr) { ::operator delete(ptr); });
}

}  // namespace rex::detail
