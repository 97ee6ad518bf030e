// Host-side view of the CUDA runtime, implemented in kernels/runtime.cu (link rex::cuda).
// Tests and programs ask here whether a GPU is present before touching CUDA tensors, and skip with
// a message when it is not. The CUDA tensor backend is the table in rex/backend/cuda/backend.hpp.
#pragma once

#include <string>

namespace rex::cuda {

// Number of CUDA devices the driver reports; 0 when there is no GPU or no usable driver.
int device_count();

// "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)" for device `index`; throws rex::Error if it is absent.
std::string device_description(int index = 0);

}  // namespace rex::cuda
