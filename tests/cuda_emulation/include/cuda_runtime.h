// rex's CUDA emulation: the subset of CUDA that kernels/*.cu use, for a host C++ compiler, so the
// same kernel sources run on the CPU in every CI run. Test infrastructure, not part of rex: it is
// on the include path only of the emulated build (tests/cuda_emulation/CMakeLists.txt).
//
// What it provides, and how (the design is in tests/cuda_emulation/execution.cpp):
// - The kernel language: __global__/__device__/__host__ and __launch_bounds__ expand to nothing;
//   __shared__ puts a variable in the ELF section rex_emu_shared, which the emulator poisons at
//   the start of every block and watches for races; threadIdx, blockIdx, blockDim, gridDim and
//   warpSize read the running fiber's coordinates.
// - Execution: a launch runs at once, on the calling thread, block after block in a fixed order;
//   each block's threads are cooperative fibers that switch only inside __syncthreads and the
//   warp intrinsics (32-lane warps, masks and lane order honoured exactly). Launches come from
//   REX_LAUNCH in kernels/common.cuh, which builds a cuda_emulation::Launch here and the real
//   <<<grid, block, shared, stream>>> under nvcc.
// - The runtime: device memory in a private address range (every access in a kernel is checked
//   against the allocation it falls in), copies whose kinds are checked against where the
//   pointers really live, in-order streams, an H200-like device with its real launch limits.
// - Tensor cores: ldmatrix and mma.sync (bf16 m16n8k16, tf32 m16n8k8) as full-warp collectives
//   that compute the PTX ISA's fragments (tensor_cores.cpp), reached through kernels/mma.cuh; the
//   bf16 type is in cuda_bf16.h.
// - Checks a GPU cannot give: out-of-bounds and freed device accesses, a __syncthreads that not
//   every thread reaches, races and reads before writes on shared memory, misused warp masks,
//   tensor-core instructions that not all 32 lanes of a warp execute together, ldmatrix rows that
//   are misaligned or outside shared memory.
//   A failed check fails the launch: cudaGetLastError returns an error whose cudaGetErrorString
//   names the check, the kernel, the block and thread, and the address.
#pragma once

#include <math.h>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "vector_types.h"

// ---- the kernel language -------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static __attribute__((section("rex_emu_shared"), aligned(16)))

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

inline constexpr int warpSize = 32;

namespace cuda_emulation::detail {

// The coordinates of the fiber that runs now (written by the scheduler before each resume).
struct Coordinates {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern Coordinates current;

}  // namespace cuda_emulation::detail

#define threadIdx (static_cast<const uint3&>(::cuda_emulation::detail::current.thread_idx))
#define blockIdx (static_cast<const uint3&>(::cuda_emulation::detail::current.block_idx))
#define blockDim (static_cast<const dim3&>(::cuda_emulation::detail::current.block_dim))
#define gridDim (static_cast<const dim3&>(::cuda_emulation::detail::current.grid_dim))

// ---- synchronisation and warp intrinsics -------------------------------------------------------

namespace cuda_emulation::detail {

enum class WarpOp : int {
  shfl,
  shfl_up,
  shfl_down,
  shfl_xor,
  ballot,
  any,
  all,
  // the tensor-core instructions (below): full-warp, .aligned
  ldmatrix_x1,
  ldmatrix_x2,
  ldmatrix_x4,
  ldmatrix_trans_x1,
  ldmatrix_trans_x2,
  ldmatrix_trans_x4,
  mma_bf16_m16n8k16,
  mma_tf32_m16n8k8,
};

// Where a barrier or warp intrinsic is called (__builtin_FILE/LINE as default arguments give the
// caller's position in both gcc and clang).
struct Site {
  const char* file;
  unsigned int line;
};

void syncthreads(Site site);
// One lane's part in a warp-synchronous call: returns what this lane receives (the 8 bytes of
// the shuffled value, or the vote). For the tensor-core operations `value` is the address of the
// lane's TensorLane (below), whose outputs the last lane to arrive fills in, and 0 is returned.
uint64_t warp_collective(WarpOp op, unsigned int mask, uint64_t value, int operand, int width,
                         Site site);
// Dynamic shared memory of the running block (the launch's third argument), 16-byte aligned.
void* dynamic_shared_memory();

template <class T>
uint64_t to_bits(T value) {
  static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "warp shuffles move 4- or 8-byte values");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <class T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

}  // namespace cuda_emulation::detail

inline void __syncthreads(const char* file = __builtin_FILE(),
                          unsigned int line = __builtin_LINE()) {
  ::cuda_emulation::detail::syncthreads({file, line});
}

// A fence that orders this thread's writes before its later ones for the whole device. Blocks run
// one after another here, so every write of an earlier block is visible before a later one starts.
inline void __threadfence() {}

template <class T>
T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize,
              const char* file = __builtin_FILE(), unsigned int line = __builtin_LINE()) {
  using namespace ::cuda_emulation::detail;
  return from_bits<T>(
      warp_collective(WarpOp::shfl, mask, to_bits(var), src_lane, width, {file, line}));
}
template <class T>
T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                 const char* file = __builtin_FILE(), unsigned int line = __builtin_LINE()) {
  using namespace ::cuda_emulation::detail;
  return from_bits<T>(warp_collective(WarpOp::shfl_up, mask, to_bits(var), static_cast<int>(delta),
                                      width, {file, line}));
}
template <class T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                   const char* file = __builtin_FILE(), unsigned int line = __builtin_LINE()) {
  using namespace ::cuda_emulation::detail;
  return from_bits<T>(warp_collective(WarpOp::shfl_down, mask, to_bits(var),
                                      static_cast<int>(delta), width, {file, line}));
}
template <class T>
T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize,
                  const char* file = __builtin_FILE(), unsigned int line = __builtin_LINE()) {
  using namespace ::cuda_emulation::detail;
  return from_bits<T>(
      warp_collective(WarpOp::shfl_xor, mask, to_bits(var), lane_mask, width, {file, line}));
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate,
                                  const char* file = __builtin_FILE(),
                                  unsigned int line = __builtin_LINE()) {
  using namespace ::cuda_emulation::detail;
  return static_cast<unsigned int>(
      warp_collective(WarpOp::ballot, mask, predicate != 0, 0, warpSize, {file, line}));
}
inline int __any_sync(unsigned int mask, int predicate, const char* file = __builtin_FILE(),
                      unsigned int line = __builtin_LINE()) {
  using namespace ::cuda_emulation::detail;
  return static_cast<int>(
      warp_collective(WarpOp::any, mask, predicate != 0, 0, warpSize, {file, line}));
}
inline int __all_sync(unsigned int mask, int predicate, const char* file = __builtin_FILE(),
                      unsigned int line = __builtin_LINE()) {
  using namespace ::cuda_emulation::detail;
  return static_cast<int>(
      warp_collective(WarpOp::all, mask, predicate != 0, 0, warpSize, {file, line}));
}

// ---- tensor-core instructions (called by kernels/mma.cuh, which kernels use) --------------------
//
// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 and mma.sync.aligned m16n8k16 (bf16) and
// m16n8k8 (tf32), with f32 accumulators. Each is a rendezvous of all 32 lanes of the warp (the
// .aligned qualifier: every lane executes the same instruction at the same site; a warp with
// fewer lanes, an exited lane, or lanes at another instruction or site fail the launch). The last
// lane to arrive computes every lane's results (execution.cpp) from the fragment layouts of the
// PTX ISA, which kernels/mma.cuh states. ldmatrix's own 16-byte row read is made here, in the
// kernel's instrumented code, so that the access checks and the shared-memory counters see a
// 16-byte shared load of the lane that supplies the row; its address must be 16-byte aligned and
// in shared memory (checked first, failing the launch with a message naming ldmatrix).

namespace cuda_emulation::detail {

// One lane's operands and results of a tensor-core instruction.
struct TensorLane {
  uint32_t row[4];      // ldmatrix: the 16-byte row this lane supplies (lanes < 8 x matrices)
  uint32_t out[4];      // ldmatrix: what this lane receives, one register per matrix
  uint32_t a[4], b[2];  // mma: this lane's A and B fragments
  float acc[4];         // mma: C in, D out
};

// Fails the launch unless `row` is 16-byte aligned and in shared memory (static or dynamic).
void check_ldmatrix_row(const void* row, int matrices, bool transposed, Site site);

template <int N>
inline void ldmatrix(uint32_t (&out)[N], const void* row, bool transposed, Site site) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  typedef uint32_t Row __attribute__((vector_size(16)));
  const int lane = static_cast<int>(
      (current.thread_idx.x +
       current.block_dim.x * (current.thread_idx.y + current.block_dim.y * current.thread_idx.z)) %
      32);
  TensorLane self{};
  if (lane < 8 * N) {
    check_ldmatrix_row(row, N, transposed, site);
    const Row value = *static_cast<const Row*>(row);  // one 16-byte load, checked and counted
    for (int i = 0; i < 4; ++i) self.row[i] = value[i];
  }
  const WarpOp op = transposed ? (N == 1   ? WarpOp::ldmatrix_trans_x1
                                  : N == 2 ? WarpOp::ldmatrix_trans_x2
                                           : WarpOp::ldmatrix_trans_x4)
                               : (N == 1   ? WarpOp::ldmatrix_x1
                                  : N == 2 ? WarpOp::ldmatrix_x2
                                           : WarpOp::ldmatrix_x4);
  warp_collective(op, 0xffffffffu, reinterpret_cast<uintptr_t>(&self), 0, 32, site);
  for (int i = 0; i < N; ++i) out[i] = self.out[i];
}

inline void mma(WarpOp op, float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                Site site) {
  TensorLane self{};
  for (int i = 0; i < 4; ++i) self.a[i] = a[i];
  for (int i = 0; i < 2; ++i) self.b[i] = b[i];
  for (int i = 0; i < 4; ++i) self.acc[i] = acc[i];
  warp_collective(op, 0xffffffffu, reinterpret_cast<uintptr_t>(&self), 0, 32, site);
  for (int i = 0; i < 4; ++i) acc[i] = self.acc[i];
}

}  // namespace cuda_emulation::detail

// ---- atomics (device or shared memory; each returns the old value) ------------------------------

int atomicAdd(int* address, int value);
unsigned int atomicAdd(unsigned int* address, unsigned int value);
unsigned long long atomicAdd(unsigned long long* address, unsigned long long value);
float atomicAdd(float* address, float value);
double atomicAdd(double* address, double value);
int atomicMin(int* address, int value);
unsigned int atomicMin(unsigned int* address, unsigned int value);
long long atomicMin(long long* address, long long value);
unsigned long long atomicMin(unsigned long long* address, unsigned long long value);
int atomicMax(int* address, int value);
unsigned int atomicMax(unsigned int* address, unsigned int value);
long long atomicMax(long long* address, long long value);
unsigned long long atomicMax(unsigned long long* address, unsigned long long value);
int atomicExch(int* address, int value);
unsigned int atomicExch(unsigned int* address, unsigned int value);
unsigned long long atomicExch(unsigned long long* address, unsigned long long value);
float atomicExch(float* address, float value);
int atomicCAS(int* address, int compare, int value);
unsigned int atomicCAS(unsigned int* address, unsigned int compare, unsigned int value);
unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare,
                             unsigned long long value);

// ---- math intrinsics (IEEE round-to-nearest; the emulated build uses -ffp-contract=off) ---------

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a); }
inline int __float_as_int(float a) { return std::bit_cast<int>(a); }
inline float __int_as_float(int a) { return std::bit_cast<float>(a); }
inline unsigned int __float_as_uint(float a) { return std::bit_cast<unsigned int>(a); }
inline float __uint_as_float(unsigned int a) { return std::bit_cast<float>(a); }
inline int __popc(unsigned int a) { return __builtin_popcount(a); }
inline int __clz(int a) { return a == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(a)); }
inline int __ffs(int a) { return __builtin_ffs(a); }
// CUDA's overloaded min and max for integers (the float forms are fminf/fmaxf from <math.h>).
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
constexpr T min(T a, T b) {
  return b < a ? b : a;
}
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
constexpr T max(T a, T b) {
  return a < b ? b : a;
}

// ---- the runtime API ---------------------------------------------------------------------------

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidPitchValue = 12,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;

enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMaxPitch = 11,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;
  int regsPerBlock;
  int warpSize;
  size_t memPitch;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  size_t totalConstMem;
  int major;
  int minor;
  int multiProcessorCount;
  int l2CacheSize;
  int maxThreadsPerMultiProcessor;
  size_t sharedMemPerMultiprocessor;
  size_t sharedMemPerBlockOptin;
};

using cudaStream_t = struct CUstream_st*;
inline constexpr unsigned int cudaStreamDefault = 0;
inline constexpr unsigned int cudaStreamNonBlocking = 1;

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t error);
const char* cudaGetErrorString(cudaError_t error);

cudaError_t cudaMalloc(void** ptr, size_t bytes);
cudaError_t cudaFree(void* ptr);
// Pinned (page-locked) host memory: a copy from it to the device does not make the host wait.
cudaError_t cudaMallocHost(void** ptr, size_t bytes);
cudaError_t cudaFreeHost(void* ptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemcpy2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                         size_t width, size_t height, cudaMemcpyKind kind);
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                              size_t width, size_t height, cudaMemcpyKind kind,
                              cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);

cudaError_t cudaStreamCreate(cudaStream_t* stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);

// Events: the emulated streams run their work at once, so a recorded event has always completed.
using cudaEvent_t = struct CUevent_st*;
inline constexpr unsigned int cudaEventDefault = 0;
inline constexpr unsigned int cudaEventDisableTiming = 2;
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaEventQuery(cudaEvent_t event);

// ---- kernel launches ---------------------------------------------------------------------------

namespace cuda_emulation {

namespace detail {

// A kernel's pointer argument, checked at launch: null, or inside a live device allocation.
struct PointerArgument {
  int position;
  const void* value;
};

// Runs body(closure) once per thread of every block and sets the last error (cudaGetLastError).
void launch(const char* kernel, dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t stream,
            void (*body)(const void*), const void* closure, const PointerArgument* pointers,
            int pointer_count);

}  // namespace detail

// Launch(kernel, "name", grid, block, shared_bytes, stream)(args...) is the emulated
// kernel<<<grid, block, shared_bytes, stream>>>(args...): the arguments are converted to the
// kernel's parameter types and copied once, as CUDA does, and every thread receives that copy.
template <class... Params>
class Launch {
 public:
  Launch(void (*kernel)(Params...), const char* name, dim3 grid, dim3 block, size_t shared,
         cudaStream_t stream)
      : kernel_(kernel),
        name_(name),
        grid_(grid),
        block_(block),
        shared_(shared),
        stream_(stream) {}

  template <class... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params),
                  "kernel launched with a wrong argument count");
    const Closure closure{kernel_, {static_cast<Params>(std::forward<Args>(args))...}};
    detail::PointerArgument pointers[sizeof...(Params) + 1];
    int count = 0;
    collect_pointers(closure.params, pointers, count, std::index_sequence_for<Params...>{});
    detail::launch(name_, grid_, block_, shared_, stream_, &run, &closure, pointers, count);
  }

 private:
  struct Closure {
    void (*kernel)(Params...);
    std::tuple<std::remove_cvref_t<Params>...> params;
  };

  static void run(const void* closure) {
    const auto& c = *static_cast<const Closure*>(closure);
    std::apply(c.kernel, c.params);
  }

  template <size_t... I>
  static void collect_pointers(const std::tuple<std::remove_cvref_t<Params>...>& params,
                               detail::PointerArgument* out, int& count,
                               std::index_sequence<I...>) {
    auto one = [&](int position, const auto& value) {
      if constexpr (std::is_pointer_v<std::remove_cvref_t<decltype(value)>>)
        out[count++] = {position, static_cast<const void*>(value)};
    };
    (one(static_cast<int>(I), std::get<I>(params)), ...);
  }

  void (*kernel_)(Params...);
  const char* name_;
  dim3 grid_, block_;
  size_t shared_;
  cudaStream_t stream_;
};

template <class... Params>
Launch(void (*)(Params...), const char*, dim3, dim3, size_t, cudaStream_t) -> Launch<Params...>;

}  // namespace cuda_emulation
