// The device-memory hook: the four things core needs from a GPU (allocate, release, copy, fill),
// as a table of host functions that rex::cuda fills in (kernels/memory.cu). Storage and Tensor
// call only this, so core depends on nothing above it; the kernels' table for the ops is
// rex/backend/cuda/backend.hpp. A program built without rex::cuda gets a clear rex::Error the
// first time it asks for device memory.
//
// Contract: pointers named host_* or copied to the host are host memory, the others device
// memory; copies that touch the host are synchronous; work is queued on rex's one CUDA stream.
#pragma once

#include <cstddef>
#include <cstdint>

#include "rex/core/error.hpp"

namespace rex::detail {

enum class DeviceCopy : int32_t { host_to_device, device_to_host, device_to_device };

struct DeviceMemory {
  void* (*allocate)(size_t bytes);  // from the caching allocator; never null (throws)
  void (*release)(void* ptr);       // back to the cache, reusable by later launches at once
  void (*copy)(void* dst, const void* src, size_t bytes, DeviceCopy kind);
  void (*fill32)(void* out, int64_t n, uint32_t bits);  // n 32-bit words set to `bits`
};

[[noreturn]] inline void throw_built_without_cuda() {
  throw Error(
      "this program was built without rex's CUDA backend: link the rex::cuda CMake target "
      "(built when the CUDA toolkit is found) to use CUDA tensors");
}

}  // namespace rex::detail

#if defined(REX_WITH_CUDA)
namespace rex::cuda {
// Defined in kernels/memory.cu.
const rex::detail::DeviceMemory& device_memory();
}  // namespace rex::cuda
#endif

namespace rex::detail {

// The GPU's memory functions, or a rex::Error saying that this program was built without them.
inline const DeviceMemory& device_memory() {
#if defined(REX_WITH_CUDA)
  return rex::cuda::device_memory();
#else
  throw_built_without_cuda();
#endif
}

}  // namespace rex::detail
