// REX_HOST_DEVICE marks a function that both backends run: __host__ __device__ under nvcc, nothing
// for a host compiler (and for the CUDA emulation, which compiles kernels/ as plain C++).
#pragma once

#if defined(__CUDACC__)
#define REX_HOST_DEVICE __host__ __device__
#else
#define REX_HOST_DEVICE
#endif
