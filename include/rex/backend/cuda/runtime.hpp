// Host-side view of the CUDA runtime. Tests and programs ask here whether a GPU is present before
// touching CUDA tensors, and skip with a message when it is not.
//
// Two levels: rex::cuda::device_count / device_description are implemented in kernels/runtime.cu
// and need rex::cuda linked. The rex:: functions below go through the backend table
// (rex/backend/cuda/backend.hpp), so a program that is built with or without rex::cuda can call
// them: without it they throw a rex::Error saying so (set_matmul_precision and synchronize do
// nothing for the CPU).
#pragma once

#include <string>

#include "rex/backend/cuda/backend.hpp"
#include "rex/core/dtype.hpp"
#include "rex/core/error.hpp"
#include "rex/core/precision.hpp"

namespace rex::cuda {

// Number of CUDA devices the driver reports; 0 when there is no GPU or no usable driver.
int device_count();

// "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)" for device `index`; throws rex::Error if it is absent.
std::string device_description(int index = 0);

// rex's CUDA stream (a cudaStream_t), for work that must be ordered with rex's kernels (NCCL).
void* stream_handle();

}  // namespace rex::cuda

namespace rex {

// CUDA devices the driver reports (0: no GPU or no driver).
inline int cuda_device_count() { return detail::cuda_backend().device_count(); }

// The name, compute capability and memory of CUDA device `index`.
inline std::string cuda_device_description(int index = 0) {
  return detail::cuda_backend().device_description(index);
}

// Waits until the work queued on `device` has finished (GPU work is asynchronous; CPU work is not).
inline void synchronize(Device device) {
  if (device.is_cuda()) detail::cuda_backend().synchronize();
}

// Matrix products on `device` (every CUDA device, or the CPU) in "fp32" (the default), "tf32" or
// "bf16": operands rounded to TF32 or bf16, sums in fp32 (rex/core/precision.hpp).
inline void set_matmul_precision(Device device, const std::string& precision) {
  const MatmulPrecision parsed = parse_matmul_precision(precision);
  detail::matmul_precision_slot(device.is_cuda()).store(parsed);
  if (device.is_cuda()) detail::cuda_backend().set_matmul_precision(parsed);
}

}  // namespace rex
