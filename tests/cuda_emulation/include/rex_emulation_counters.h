// rex's CUDA emulation: counters of what a stretch of host code asks of the device, for estimating
// how fast it would run on a GPU (tests/cuda_emulation/counters.cpp says how each is counted).
// Test infrastructure: only the emulated build has this header.
//
// cuda_emulation::begin_interval() starts counting, end_interval() stops and returns the counts
// of everything issued in between: kernel launches by kernel name, host waits by cause, cuBLAS
// calls by shape, and (when asked for) each kernel's work: its memory traffic as a GPU's warps
// would issue it and its arithmetic. Outside an interval nothing is recorded and the emulation
// pays one test of a flag (per access, and per basic block of kernel code that does arithmetic).
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace cuda_emulation {

// Global memory and shared memory as warp-level requests: the accesses that the threads of one
// warp make with one instruction, the k-th time each of them executes it.
struct MemoryCounts {
  uint64_t load_requests = 0, store_requests = 0;
  uint64_t load_sectors = 0, store_sectors = 0;  // global: distinct 32-byte sectors touched
  uint64_t load_bytes = 0, store_bytes = 0;      // bytes the threads asked for
  // shared: wavefronts are the passes through the 32 banks a request needs (the most distinct
  // 4-byte words any one bank holds); bank conflicts are the wavefronts past the fewest that the
  // request's distinct words need (1 per 32 words: an 8-byte request takes 2 without conflict)
  uint64_t load_wavefronts = 0, store_wavefronts = 0;
  uint64_t load_bank_conflicts = 0, store_bank_conflicts = 0;
  // global: the distinct sectors each launch touched, summed over launches (a sector read by many
  // requests of one launch counts once: what a launch needs from HBM when the L2 keeps it); 0 where
  // not known (the cost formulas give it only for some kernels)
  uint64_t unique_sectors = 0;
  uint64_t requests() const { return load_requests + store_requests; }
  uint64_t sectors() const { return load_sectors + store_sectors; }
  uint64_t wavefronts() const { return load_wavefronts + store_wavefronts; }
  uint64_t bank_conflicts() const { return load_bank_conflicts + store_bank_conflicts; }
};

// Floating-point work of a kernel's threads, as its compiled code executes it (arithmetic_pass.cpp
// says what counts): FLOPs on the CUDA cores (an FMA is 2) in float and in double, and calls of
// special functions (square root, exponential, logarithm, power, trigonometric functions). Apart:
// the tensor cores' FLOPs, 2 m n k per warp-level mma.sync (4096 for m16n8k16 bf16, 2048 for
// m16n8k8 tf32), by operand type.
struct ArithmeticCounts {
  uint64_t f32_flops = 0, f64_flops = 0, special_functions = 0;
  uint64_t tensor_bf16_flops = 0, tensor_tf32_flops = 0;
};

struct KernelCounts {
  uint64_t launches = 0, blocks = 0, threads = 0;
  // zero unless the interval counts kernel work:
  MemoryCounts global, shared;
  ArithmeticCounts arithmetic;
  uint64_t global_atomics = 0, shared_atomics = 0;  // one per thread and atomic operation
};

// One cuBLAS GEMM shape: C is m x n, the inner dimension k, `batch` products per call.
struct GemmShape {
  int64_t m = 0, n = 0, k = 0, batch = 0;
  bool transpose_a = false, transpose_b = false;
  bool tf32 = false;        // the TF32 tensor-op math mode, otherwise fp32
  bool bf16 = false;        // cublasGemmEx with bf16 A and B (fp32 C, fp32 compute)
  bool accumulate = false;  // beta != 0: C is read and added to
  auto operator<=>(const GemmShape&) const = default;
};

struct Counts {
  uint64_t launches = 0;
  // Host waits: calls after which the host cannot continue until the device has finished what was
  // issued before them.
  uint64_t stream_synchronizations = 0, device_synchronizations = 0;
  uint64_t device_to_host_copies = 0;
  uint64_t pageable_host_to_device_copies = 0;  // from host memory cudaMallocHost did not pin
  uint64_t host_waits() const {
    return stream_synchronizations + device_synchronizations + device_to_host_copies +
           pageable_host_to_device_copies;
  }
  uint64_t cublas_calls = 0;
  double cublas_flops = 0;                      // 2 m n k per product
  std::map<std::string, KernelCounts> kernels;  // by the name the launch gives
  std::map<GemmShape, uint64_t> gemms;          // calls per shape
};

// Starts an interval (intervals do not nest). With count_kernel_work, every access of every kernel
// is grouped into warp requests too (which makes kernels a few times slower to emulate), and the
// kernels' arithmetic is counted.
void begin_interval(bool count_kernel_work = false);
// Ends the interval begun last and returns its counts.
Counts end_interval();
// The counts as text: the totals, then (with by_kernel) one line per kernel and per GEMM shape.
std::string describe(const Counts& counts, bool by_kernel = true);

}  // namespace cuda_emulation
