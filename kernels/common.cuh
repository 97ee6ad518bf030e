// Shared by the kernels/*.cu files: the stream every launch goes to, checked CUDA and cuBLAS calls
// (a failure throws rex::Error naming the call and CUDA's message), launch-size helpers, and the
// registration functions through which each file fills its part of the backend table.
//
// The same files also compile as plain C++ against rex's CUDA emulation (tests/cuda_emulation),
// which runs every kernel on the CPU in CI. The two spellings that C++ cannot parse are written
// through REX_LAUNCH (the <<<...>>> launch) and dynamic_shared<T>() (extern __shared__); under nvcc
// they are exactly the CUDA syntax.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rex/backend/cuda/backend.hpp"
#include "rex/core/error.hpp"

namespace rex::cuda::detail {

// rex's one stream (created on first use, on device 0).
cudaStream_t stream();

[[noreturn]] void throw_cuda_error(const char* call, cudaError_t status);
[[noreturn]] void throw_cublas_error(const char* call, cublasStatus_t status);
// Throws if the last kernel launch failed (bad configuration, or an earlier asynchronous fault).
void check_launch(const char* kernel);

// Launch configuration: 256 threads per block and enough blocks for n items (at least one).
inline constexpr int kThreads = 256;
inline unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > 65535 * 32 ? 65535 * 32 : blocks));
}

// REX_LAUNCH(kernel, grid, block, shared_bytes, args...) launches on rex's stream and then checks
// the launch (check_launch with the kernel's name).
#if defined(__CUDACC__)
#define REX_LAUNCH(kernel, grid, block, shared_bytes, ...)                                   \
  do {                                                                                       \
    kernel<<<(grid), (block), (shared_bytes), ::rex::cuda::detail::stream()>>>(__VA_ARGS__); \
    ::rex::cuda::detail::check_launch(#kernel);                                              \
  } while (0)
#else
#define REX_LAUNCH(kernel, grid, block, shared_bytes, ...)                     \
  do {                                                                         \
    ::cuda_emulation::Launch(kernel, #kernel, (grid), (block), (shared_bytes), \
                             ::rex::cuda::detail::stream())(__VA_ARGS__);      \
    ::rex::cuda::detail::check_launch(#kernel);                                \
  } while (0)
#endif

// The block's dynamic shared memory (the launch's shared_bytes), as T*.
template <class T>
__device__ inline T* dynamic_shared() {
#if defined(__CUDACC__)
  extern __shared__ __align__(16) unsigned char rex_dynamic_shared[];
  return reinterpret_cast<T*>(rex_dynamic_shared);
#else
  return static_cast<T*>(::cuda_emulation::detail::dynamic_shared_memory());
#endif
}

// Grid-stride loops: for (int64_t i = thread_index(); i < n; i += thread_count()).
__device__ inline int64_t thread_index() {
  return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
}
__device__ inline int64_t thread_count() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// A device scratch buffer from the caching allocator, released when it goes out of scope.
class Scratch {
 public:
  explicit Scratch(size_t bytes);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_;
};

// The last block finishes: a launch whose blocks each make a part of a result (partial sums) can
// combine the parts itself, where a second launch would otherwise. Each block, its part written,
// takes a ticket from a counter; the block that takes the last one reads every part and combines
// them in an order the shape fixes, so the result does not depend on which block that is. The
// counters come from completion_counters: zero before a launch, and put back to zero by the block
// that finishes, so launches (one after another on rex's one stream) can share them.
//
// completion_counters(n): n counters, zero, on the device, kept for the process.
unsigned int* completion_counters(int64_t n);

// Whether this block is the last of `arrivals` to finish a part counted by *counter (every thread
// of the block calls it, after writing its share of the part). Every thread fences its writes
// before thread 0 takes the ticket, so the last block sees every part.
__device__ inline bool last_to_finish(unsigned int* counter, unsigned int arrivals) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1u) == arrivals - 1;
    if (last) *counter = 0;  // every block has arrived: ready for the next launch
  }
  __syncthreads();
  return last;
}

// Device flag for index checks inside kernels: a kernel that meets a bad index at position p does
// atomicMin(flag.device(), p). read() copies it to the host (a synchronisation) and returns the
// first bad position, or -1 when there was none.
class ErrorFlag {
 public:
  ErrorFlag();
  unsigned long long* device() const { return flag_.as<unsigned long long>(); }
  int64_t read() const;

 private:
  Scratch flag_;
};

// Copies `bytes` of host memory to the device in stream order without making the host wait
// (staged through pinned memory, kernels/memory.cu); src may be freed as soon as it returns.
void upload(void* dst, const void* src, size_t bytes);

// Each file registers its entries in the table (kernels/backend.cu calls them all once).
void register_memory(rex::detail::CudaBackend& table);
void register_elementwise(rex::detail::CudaBackend& table);
void register_reduce(rex::detail::CudaBackend& table);
void register_index(rex::detail::CudaBackend& table);
void register_routing(rex::detail::CudaBackend& table);
void register_attention(rex::detail::CudaBackend& table);
void register_flash_attention(rex::detail::CudaBackend& table);
void register_gemm(rex::detail::CudaBackend& table);
void register_grouped_gemm(rex::detail::CudaBackend& table);
void register_optim(rex::detail::CudaBackend& table);

}  // namespace rex::cuda::detail

// Checked calls: REX_CUDA(cudaMemcpyAsync(...)) and REX_CUBLAS(cublasSgemm(...)); launches go
// through REX_LAUNCH, which checks them.
#define REX_CUDA(call)                                                                         \
  do {                                                                                         \
    const cudaError_t rex_status_ = (call);                                                    \
    if (rex_status_ != cudaSuccess) ::rex::cuda::detail::throw_cuda_error(#call, rex_status_); \
  } while (0)
#define REX_CUBLAS(call)                                           \
  do {                                                             \
    const cublasStatus_t rex_status_ = (call);                     \
    if (rex_status_ != CUBLAS_STATUS_SUCCESS)                      \
      ::rex::cuda::detail::throw_cublas_error(#call, rex_status_); \
  } while (0)
