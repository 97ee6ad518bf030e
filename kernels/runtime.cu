// Device discovery for rex::cuda: how many GPUs the driver reports and what they are; and rex's
// stream, for libraries that queue work behind rex's kernels (NCCL, rex/dist/).
#include <cuda_runtime.h>

#include <cstdio>

#include "common.cuh"
#include "rex/backend/cuda/runtime.hpp"
#include "rex/core/error.hpp"

namespace rex::cuda {

int device_count() {
  int count = 0;
  // No driver or no device is not an error here: it means "run on the CPU".
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state
    return 0;
  }
  return count;
}

std::string device_description(int index) {
  cudaDeviceProp prop{};
  const cudaError_t status = cudaGetDeviceProperties(&prop, index);
  REX_CHECK(status == cudaSuccess, "cudaGetDeviceProperties(", index,
            ") failed: ", cudaGetErrorString(status));
  char memory[32];
  std::snprintf(memory, sizeof memory, "%.1f GiB",
                static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  return rex::detail::concat(prop.name, " (sm_", prop.major, prop.minor, ", ", memory, ")");
}

void* stream_handle() { return detail::stream(); }

}  // namespace rex::cuda
