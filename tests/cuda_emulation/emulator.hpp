// Internal interface between the parts of the CUDA emulation: errors (runtime.cpp), device memory
// (memory.cpp), kernel execution (execution.cpp), the access checks (checks.cpp), the tensor-core
// instructions (tensor_cores.cpp) and the counters (counters.cpp). Nothing here
// is seen by the kernels; they see include/cuda_runtime.h only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "include/cuda_runtime.h"
#include "include/rex_emulation_counters.h"

namespace cuda_emulation::detail {

// ---- errors (runtime.cpp) ----
// Makes `code` the last error (cudaGetLastError) and `message` its explanation, which
// cudaGetErrorString(code) appends to CUDA's own text until the next error of that code.
cudaError_t fail(cudaError_t code, const std::string& message);
// cudaSuccess for the null stream or a live one; otherwise fails `call` with an invalid handle.
cudaError_t check_stream(const char* call, cudaStream_t stream);
const cudaDeviceProp& device_properties();  // the emulated H200

// What the access checks read on every instrumented access, in plain variables so that the common
// case (a stack access, or one inside the allocation that passed last) costs a few compares.
struct FastPath {
  bool in_kernel = false;                      // a kernel thread runs (set by execution.cpp)
  uintptr_t device_begin = 0, device_end = 0;  // the device address range (memory.cpp)
  uintptr_t cached_begin = 0, cached_end = 0;  // the live allocation that passed last (memory.cpp)
  uintptr_t static_shared_begin = 0, static_shared_end = 0;    // the __shared__ section
  uintptr_t dynamic_shared_begin = 0, dynamic_shared_end = 0;  // the dynamic buffer (all of it)
  bool counting_memory = false;  // an interval counts memory accesses (counters.cpp)
};
extern FastPath fast_path;  // defined in checks.cpp

// ---- device memory (memory.cpp) ----
// Empty when [address, address + bytes) lies inside one live allocation (allow_end: bytes == 0
// at the very end counts too); otherwise what is wrong, e.g. "12 bytes past the end of the
// 400-byte device allocation at 0x...".
std::string check_device_range(uintptr_t address, size_t bytes);
std::string hex(uintptr_t value);

// ---- kernel execution (execution.cpp) ----
// "in kernel softmax_kernel, block (3,0,0), thread (31,0,0)" for the running thread.
std::string where();
int current_thread();                 // linear index of the running thread in its block
std::string thread_text(int thread);  // "(x,y,z)" of a linear thread index in the running block
// Fails the running launch with `code` and the message `describe()` + where(), and never returns
// to the faulting thread (it is abandoned, as a faulting GPU thread is).
[[noreturn]] void kernel_fault_message(cudaError_t code, std::string&& message);
template <class Describe>
[[noreturn]] void kernel_fault(cudaError_t code, Describe&& describe) {
  kernel_fault_message(code, describe());
}

// ---- the access checks (checks.cpp) ----
enum class Access : int { read, write, atomic };
// Called by every instrumented load and store and by the atomics: faults the kernel on a bad
// device access, a shared-memory race or a read of shared memory that was never written.
void check_access(uintptr_t address, size_t bytes, Access kind);
// Shared memory of the block about to run: poisons the static __shared__ storage and the first
// dynamic_bytes of the dynamic buffer, and forgets every access of the previous block.
void start_block_shared_memory(size_t dynamic_bytes);
void* dynamic_shared_base();
// A __syncthreads completed: accesses before it can no longer race with accesses after it.
void shared_memory_barrier();

// ---- the tensor-core instructions (tensor_cores.cpp) ----
// Called by the last lane of a warp to reach a tensor-core instruction, with every lane's operands:
// fills in every lane's results by the PTX fragment layouts, and counts an mma's FLOPs.
void tensor_core_results(WarpOp op, TensorLane* const (&lanes)[32]);

// ---- the counters (counters.cpp); each returns at once outside a counting interval ----
enum class HostWait : int {
  stream_synchronize,
  device_synchronize,
  device_to_host_copy,
  pageable_host_to_device_copy
};
void count_launch(const char* kernel, dim3 grid, dim3 block);  // a launch that passed its checks
void count_host_wait(HostWait cause);
void count_gemm(const GemmShape& shape);  // a cuBLAS call that passed its argument checks
// One access of kernel code by `instruction` (called when fast_path.counting_memory is set).
void count_access(const void* instruction, uintptr_t address, size_t bytes, Access kind);
void count_block_end();  // groups the finished block's accesses into warp requests
// One warp-level mma of the running kernel: 2 m n k FLOPs on the bf16 or the tf32 tensor pipes.
void count_tensor_flops(bool bf16, uint64_t flops);

}  // namespace cuda_emulation::detail
