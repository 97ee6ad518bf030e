// Kernels that exercise each primitive of the CUDA emulation, and kernels broken on purpose, each
// with a host function that runs it (declared in self_test_kernels.hpp). They are compiled exactly
// as rex's kernels are for the emulation, so every access they make is checked.
#include "self_test_kernels.hpp"

#include <cuda_runtime.h>

#include "mma.cuh"  // kernels/mma.cuh, the tensor-core wrappers rex's kernels use

namespace cuda_emulation::self_test {
namespace {

// Device buffer of n T, released at scope exit.
template <class T>
class Buffer {
 public:
  explicit Buffer(size_t n, const std::vector<T>& init = {}) : n_(n) {
    cudaMalloc(reinterpret_cast<void**>(&ptr_), n * sizeof(T));
    if (!init.empty()) cudaMemcpy(ptr_, init.data(), n * sizeof(T), cudaMemcpyHostToDevice);
  }
  ~Buffer() { release(); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return ptr_; }
  void release() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
  }
  std::vector<double> read() const {
    std::vector<T> host(n_);
    cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
    return std::vector<double>(host.begin(), host.end());
  }

 private:
  T* ptr_ = nullptr;
  size_t n_;
};

// The launch's outcome; values are read from `out` when the launch succeeded.
template <class T>
Outcome finish(const Buffer<T>* out) {
  Outcome o;
  o.error = cudaGetLastError();
  o.message = cudaGetErrorString(o.error);
  if (o.error == cudaSuccess && out != nullptr) o.values = out->read();
  return o;
}

#define LAUNCH(kernel, grid, block, shared, ...) \
  ::cuda_emulation::Launch(kernel, #kernel, grid, block, shared, nullptr)(__VA_ARGS__)

// ---- primitives ----

// Block tree reduction over a grid-stride loop; one partial per block, then atomically added.
__global__ void block_sum_kernel(const float* x, int n, float* total) {
  __shared__ float partial[1024];
  float s = 0.0f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) s += x[i];
  partial[threadIdx.x] = s;
  __syncthreads();
  for (unsigned int width = blockDim.x / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(total, partial[0]);
}

// Per thread t (lane l, warp w), out[5 t ..]: the warp sum by a shuffle-down tree (lane 0 only,
// else -1), the warp sum by an xor butterfly, the inclusive prefix sum of the lanes by shuffle-up,
// lane 5's value broadcast, and within segments of 8 lanes the value of the segment's lane 3.
__global__ void warp_shuffle_kernel(float* out) {
  const int t = threadIdx.x, lane = t % 32;
  const float v = static_cast<float>(t + 1);
  float down = v, butterfly = v, scan = v;
  for (int offset = 16; offset > 0; offset /= 2) {
    down += __shfl_down_sync(0xffffffffu, down, offset);
    butterfly += __shfl_xor_sync(0xffffffffu, butterfly, offset);
  }
  for (int offset = 1; offset < 32; offset *= 2) {
    const float other = __shfl_up_sync(0xffffffffu, scan, offset);
    if (lane >= offset) scan += other;
  }
  out[5 * t] = lane == 0 ? down : -1.0f;
  out[5 * t + 1] = butterfly;
  out[5 * t + 2] = scan;
  out[5 * t + 3] = __shfl_sync(0xffffffffu, v, 5);
  out[5 * t + 4] = __shfl_sync(0xffffffffu, v, 3, 8);
}

// Hillis-Steele inclusive scan of 1..blockDim.x through two shared buffers.
__global__ void block_scan_kernel(float* out) {
  __shared__ float buffer[2][1024];
  const unsigned int t = threadIdx.x;
  int from = 0;
  buffer[0][t] = static_cast<float>(t + 1);
  __syncthreads();
  for (unsigned int offset = 1; offset < blockDim.x; offset *= 2) {
    const int to = 1 - from;
    buffer[to][t] = buffer[from][t] + (t >= offset ? buffer[from][t - offset] : 0.0f);
    __syncthreads();
    from = to;
  }
  out[t] = buffer[from][t];
}

// out: [0] the number of threads (int atomicAdd), [1] the smallest and [2] the largest global
// index (atomicMin/Max), [3] the sum of all indices by an atomicCAS loop, [4..11] a histogram of
// index % 8 counted in shared memory with atomicAdd and added to the output by one thread a block.
__global__ void atomics_kernel(int* out) {
  __shared__ int histogram[8];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (threadIdx.x < 8) histogram[threadIdx.x] = 0;
  __syncthreads();
  atomicAdd(&out[0], 1);
  atomicMin(&out[1], i);
  atomicMax(&out[2], i);
  int seen = out[3], assumed = 0;
  do {
    assumed = seen;
    seen = atomicCAS(&out[3], assumed, assumed + i);
  } while (seen != assumed);
  atomicAdd(&histogram[i % 8], 1);
  __syncthreads();
  if (threadIdx.x == 0)
    for (int b = 0; b < 8; ++b) atomicAdd(&out[4 + b], histogram[b]);
}

__global__ void reverse_kernel(const float* x, float* out, int n) {
  float* staged = static_cast<float*>(::cuda_emulation::detail::dynamic_shared_memory());
  for (int i = threadIdx.x; i < n; i += blockDim.x) staged[i] = x[i];
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = staged[n - 1 - i];
}

// Per thread: the ballot of odd lanes, whether any lane is 7, whether all lanes are below 40, and
// the ballot of lanes < 4 among the even lanes only (mask 0x55555555).
__global__ void votes_kernel(unsigned int* out) {
  const int t = threadIdx.x, lane = t % 32;
  out[4 * t] = __ballot_sync(0xffffffffu, lane % 2);
  out[4 * t + 1] = static_cast<unsigned int>(__any_sync(0xffffffffu, lane == 7));
  out[4 * t + 2] = static_cast<unsigned int>(__all_sync(0xffffffffu, t < 40));
  out[4 * t + 3] = lane % 2 == 0 ? __ballot_sync(0x55555555u, lane < 4) : 0u;
}

__global__ void coordinates_kernel(int* out) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int index = block * blockDim.x * blockDim.y * blockDim.z + thread;
  out[index] = index;
}

__global__ void grid_stride_kernel(float* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] += static_cast<float>(2 * i + 2);  // out starts at -1 everywhere
}

// ---- broken on purpose ----

// The tree reduction without the barrier inside its loop: a thread adds in a partial sum that
// another thread may not have finished (or may be overwriting) in the same step.
__global__ void missing_syncthreads_kernel(float* out) {
  __shared__ float partial[1024];
  partial[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  for (unsigned int width = blockDim.x / 2; width > 0; width /= 2)
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
  if (threadIdx.x == 0) out[0] = partial[0];
}

// i <= n instead of i < n.
__global__ void read_past_kernel(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i % n] = x[i];
}

// A 16-lane reduction under the mask of those lanes that starts at offset 16 (it should start at
// 8): lane 0 reads lane 16, which is not in the mask.
__global__ void wrong_offset_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  float v = static_cast<float>(threadIdx.x);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0x0000ffffu, v, offset);
  if (threadIdx.x == 0) out[0] = v;
}

// Every thread writes the one shared word: a write-write race.
__global__ void write_race_kernel(int* out) {
  __shared__ int last;
  last = static_cast<int>(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[0] = last;
}

__global__ void empty_kernel(int* out) {
  if (threadIdx.x == 0 && out != nullptr) out[0] = 1;
}

// Only half of the block reaches the barrier.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();
  out[threadIdx.x] = 1;
}

// Out-of-range threads return before the barrier the others wait at.
__global__ void early_exit_kernel(const int* x, int* out, int n) {
  __shared__ int staged[64];
  if (static_cast<int>(threadIdx.x) >= n) return;
  staged[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = staged[n - 1 - threadIdx.x];
}

// Thread 0 sums 8 shared words that only threads 0..3 wrote.
__global__ void uninitialized_kernel(int* out) {
  __shared__ int values[8];
  if (threadIdx.x < 4) values[threadIdx.x] = 1;
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int i = 0; i < 8; ++i) s += values[i];
    out[0] = s;
  }
}

__global__ void read_one_kernel(const float* x, float* out) { out[0] = x[0]; }

__global__ void read_through_table_kernel(float* const* table, float* out) {
  out[threadIdx.x] = table[0][threadIdx.x];
}

// Lanes 16..31 exit; the others then shuffle under the full mask.
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

// Warp 0 waits in a shuffle for lane 0 of... itself split: lanes 0..15 shuffle under the full mask
// while lanes 16..31 wait at a __syncthreads: neither can finish.
__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.0f, 0);
  } else {
    __syncthreads();
  }
}

// ---- kernels whose counts (include/rex_emulation_counters.h) are known exactly ----

// Thread i copies in[i * stride] to out[i]: one load and one store request per warp.
__global__ void strided_copy_kernel(const float* in, float* out, int stride) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  out[i] = in[i * stride];
}

// A 32 x 32 tile transposed through shared memory whose rows are kPitch floats apart: warp y
// writes row y of the tile, then reads column y.
template <int kPitch>
__global__ void shared_transpose_kernel(const float* in, float* out) {
  __shared__ float tile[32 * kPitch];
  tile[threadIdx.y * kPitch + threadIdx.x] = in[threadIdx.y * 32 + threadIdx.x];
  __syncthreads();
  out[threadIdx.y * 32 + threadIdx.x] = tile[threadIdx.x * kPitch + threadIdx.y];
}

// Thread i stores i as a double in shared memory, then reads the double of thread n - 1 - i.
__global__ void shared_doubles_kernel(double* out) {
  __shared__ double values[64];
  values[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = values[blockDim.x - 1 - threadIdx.x];
}

// Every thread adds 1 to a block counter in shared memory and 1 to `total`.
__global__ void counted_atomics_kernel(int* total) {
  __shared__ int block_total;
  if (threadIdx.x == 0) block_total = 0;
  __syncthreads();
  atomicAdd(&block_total, 1);
  atomicAdd(total, 1);
}

// Thread i doubles-and-increments i, (i mod 5) times (2 FLOPs each), then fuses a multiply-add
// (2), subtracts, takes an exponential (1 special function) and adds twice (3), and divides once
// in double (1 f64 FLOP): out[i] = fma(acc, 0.5, 0.25) + exp(0) + i / 2.
__global__ void counted_arithmetic_kernel(float* out) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  float acc = static_cast<float>(i);
  for (int k = 0; k < i % 5; ++k) acc = acc * 2.0f + 1.0f;
  const float fused = fmaf(acc, 0.5f, 0.25f);
  out[i] = fused + expf(fused - fused) + static_cast<float>(static_cast<double>(i) / 2.0);
}

// ---- tensor-core instructions (kernels/mma.cuh) ----

using ::rex::cuda::detail::load_matrices;
using ::rex::cuda::detail::load_matrices_transposed;
using ::rex::cuda::detail::mma_bf16_16x8x16;
using ::rex::cuda::detail::mma_tf32_16x8x8;
using ::rex::cuda::detail::pack_bf16x2;
using ::rex::cuda::detail::to_tf32;

// Four 8x8 matrices of 16-bit values in shared memory, element (i, r, c) = 256 i + 16 r + c + 1,
// row r of matrix i at 16-byte row 8 i + r; one ldmatrix of N of them (lane 8 i + r passes row r
// of matrix i; the other lanes pass a misaligned address, which ldmatrix must ignore). Lane l
// writes its N registers to out[N l ..].
template <int N, bool kTransposed>
__global__ void ldmatrix_kernel(unsigned int* out) {
  __shared__ uint16_t tile[4 * 64];
  const int lane = static_cast<int>(threadIdx.x);
  for (int e = 0; e < 8; ++e) {
    const int index = lane * 8 + e, i = index / 64, r = index / 8 % 8, c = index % 8;
    tile[index] = static_cast<uint16_t>(256 * i + 16 * r + c + 1);
  }
  __syncthreads();
  const void* row =
      lane < 8 * N ? static_cast<const void*>(&tile[lane * 8]) : static_cast<const void*>(&tile[1]);
  uint32_t registers[N];
  if constexpr (kTransposed) {
    load_matrices_transposed(registers, row);
  } else {
    load_matrices(registers, row);
  }
  for (int i = 0; i < N; ++i) out[N * lane + i] = registers[i];
}

// D = A B + C (16x16 by 16x8, row-major floats in a, b, c) by one mma.sync m16n8k16 bf16 per warp;
// each block's warp 0 writes D to out[128 block ..]. The fragments come from the documented
// layout, read from global memory (kViaLdmatrix false), or by ldmatrix from shared copies: A's
// four 8x8 quadrants by one x4, B (stored k-major) by one x2.trans.
template <bool kViaLdmatrix>
__global__ void mma_bf16_kernel(const float* a, const float* b, const float* c, float* out) {
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  uint32_t fa[4], fb[2];
  if constexpr (kViaLdmatrix) {
    // bf16 pairs, one 4-byte word per thread and store (the race check watches whole words)
    __shared__ uint32_t a_pairs[16 * 16 / 2];
    __shared__ uint32_t b_pairs[16 * 8 / 2];
    for (unsigned int e = threadIdx.x; e < 128; e += blockDim.x)
      a_pairs[e] = pack_bf16x2(a[2 * e], a[2 * e + 1]);
    for (unsigned int e = threadIdx.x; e < 64; e += blockDim.x)
      b_pairs[e] = pack_bf16x2(b[2 * e], b[2 * e + 1]);
    __syncthreads();
    const auto* as = reinterpret_cast<const uint16_t*>(a_pairs);
    const auto* bs = reinterpret_cast<const uint16_t*>(b_pairs);
    const int quadrant = lane / 8, r = lane % 8;
    load_matrices(fa, &as[(r + 8 * (quadrant % 2)) * 16 + 8 * (quadrant / 2)]);
    load_matrices_transposed(fb, &bs[(lane % 16) * 8]);
  } else {
    fa[0] = pack_bf16x2(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]);
    fa[1] = pack_bf16x2(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]);
    fa[2] = pack_bf16x2(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]);
    fa[3] = pack_bf16x2(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9]);
    fb[0] = pack_bf16x2(b[2 * t * 8 + g], b[(2 * t + 1) * 8 + g]);
    fb[1] = pack_bf16x2(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g]);
  }
  float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t],
                  c[(g + 8) * 8 + 2 * t + 1]};
  mma_bf16_16x8x16(acc, fa, fb);
  if (threadIdx.x < 32) {
    float* d = out + 128 * blockIdx.x;
    d[g * 8 + 2 * t] = acc[0];
    d[g * 8 + 2 * t + 1] = acc[1];
    d[(g + 8) * 8 + 2 * t] = acc[2];
    d[(g + 8) * 8 + 2 * t + 1] = acc[3];
  }
}

// D = A B + C (16x8 by 8x8, row-major) by one mma.sync m16n8k8 tf32 per warp. The low 13 bits of
// a[0] are set after the rounding: the tensor core must ignore them.
__global__ void mma_tf32_kernel(const float* a, const float* b, const float* c, float* out) {
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  const uint32_t fa[4] = {to_tf32(a[g * 8 + t]) | 0x1FFFu, to_tf32(a[(g + 8) * 8 + t]),
                          to_tf32(a[g * 8 + t + 4]), to_tf32(a[(g + 8) * 8 + t + 4])};
  const uint32_t fb[2] = {to_tf32(b[t * 8 + g]), to_tf32(b[(t + 4) * 8 + g])};
  float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t],
                  c[(g + 8) * 8 + 2 * t + 1]};
  mma_tf32_16x8x8(acc, fa, fb);
  if (threadIdx.x < 32) {
    float* d = out + 128 * blockIdx.x;
    d[g * 8 + 2 * t] = acc[0];
    d[g * 8 + 2 * t + 1] = acc[1];
    d[(g + 8) * 8 + 2 * t] = acc[2];
    d[(g + 8) * 8 + 2 * t + 1] = acc[3];
  }
}

// Conversions, one value per thread: out[3 i ..] = the bits of __float2bfloat16_rn(x[i]), of
// to_tf32(x[i]), and pack_bf16x2(x[i], -x[i]).
__global__ void conversions_kernel(const float* x, unsigned int* out) {
  const int i = static_cast<int>(threadIdx.x);
  out[3 * i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
  out[3 * i + 1] = to_tf32(x[i]);
  out[3 * i + 2] = pack_bf16x2(x[i], -x[i]);
}

// Broken: only lanes 0..15 reach the mma (inside a branch); the other lanes exit.
__global__ void half_warp_mma_kernel(float* out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (lane < 16) {
    float acc[4] = {0, 0, 0, 0};
    const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    mma_bf16_16x8x16(acc, a, b);
    out[lane] = acc[0];
  }
}

// Broken: even and odd lanes reach the same operation from two different places.
__global__ void divergent_mma_kernel(float* out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  float acc[4] = {0, 0, 0, 0};
  const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  if (lane % 2 == 0) {
    mma_bf16_16x8x16(acc, a, b);
  } else {
    mma_bf16_16x8x16(acc, a, b);
  }
  out[lane] = acc[0];
}

// Broken: every lane passes its row 2 bytes past a 16-byte boundary.
__global__ void misaligned_ldmatrix_kernel(unsigned int* out) {
  __shared__ uint16_t tile[33 * 8];
  for (int e = 0; e < 8; ++e) tile[threadIdx.x * 8 + e] = 1;
  if (threadIdx.x == 0)
    for (int e = 0; e < 8; ++e) tile[32 * 8 + e] = 1;
  __syncthreads();
  uint32_t r[4];
  load_matrices(r, &tile[threadIdx.x * 8 + 1]);
  out[threadIdx.x] = r[0];
}

// Broken: the rows are in global memory.
__global__ void global_ldmatrix_kernel(const uint16_t* rows, unsigned int* out) {
  uint32_t r[1];
  load_matrices(r, rows + 8 * (threadIdx.x % 8));
  out[threadIdx.x] = r[0];
}
}  // namespace

Outcome block_sum(int n, int blocks, int threads) {
  std::vector<float> x(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) x[static_cast<size_t>(i)] = static_cast<float>(i);
  Buffer<float> in(static_cast<size_t>(n) + 1, x.empty() ? std::vector<float>{0.0f} : x);
  Buffer<float> total(1, {0.0f});
  LAUNCH(block_sum_kernel, blocks, threads, 0, in.get(), n, total.get());
  return finish(&total);
}

Outcome warp_shuffles(int threads) {
  Buffer<float> out(5 * static_cast<size_t>(threads));
  LAUNCH(warp_shuffle_kernel, 1, threads, 0, out.get());
  return finish(&out);
}

Outcome block_inclusive_scan(int threads) {
  Buffer<float> out(static_cast<size_t>(threads));
  LAUNCH(block_scan_kernel, 1, threads, 0, out.get());
  return finish(&out);
}

Outcome atomics(int blocks, int threads) {
  std::vector<int> init(12, 0);
  init[1] = 1 << 30;
  init[2] = -1;
  Buffer<int> out(12, init);
  LAUNCH(atomics_kernel, blocks, threads, 0, out.get());
  return finish(&out);
}

Outcome dynamic_shared_reverse(int n) {
  std::vector<float> x(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) x[static_cast<size_t>(i)] = static_cast<float>(i);
  Buffer<float> in(static_cast<size_t>(n), x), out(static_cast<size_t>(n));
  LAUNCH(reverse_kernel, 1, 96, static_cast<size_t>(n) * sizeof(float), in.get(), out.get(), n);
  return finish(&out);
}

Outcome votes(int threads) {
  Buffer<unsigned int> out(4 * static_cast<size_t>(threads));
  LAUNCH(votes_kernel, 1, threads, 0, out.get());
  return finish(&out);
}

Outcome coordinates(dim3 grid, dim3 block) {
  const size_t n = size_t{grid.x} * grid.y * grid.z * block.x * block.y * block.z;
  Buffer<int> out(n);
  LAUNCH(coordinates_kernel, grid, block, 0, out.get());
  return finish(&out);
}

Outcome grid_stride_copy(int64_t n, int blocks, int threads) {
  Buffer<float> out(static_cast<size_t>(n), std::vector<float>(static_cast<size_t>(n), -1.0f));
  LAUNCH(grid_stride_kernel, blocks, threads, 0, out.get(), n);
  return finish(&out);
}

Outcome missing_syncthreads(int threads) {
  Buffer<float> out(1);
  LAUNCH(missing_syncthreads_kernel, 1, threads, 0, out.get());
  return finish(&out);
}

Outcome read_past_allocation(int n) {
  Buffer<float> in(static_cast<size_t>(n), std::vector<float>(static_cast<size_t>(n), 1.0f));
  Buffer<float> out(static_cast<size_t>(n));
  LAUNCH(read_past_kernel, 1, n + 1, 0, in.get(), out.get(), n);
  return finish(&out);
}

Outcome wrong_shuffle_offset() {
  Buffer<float> out(1);
  LAUNCH(wrong_offset_kernel, 1, 32, 0, out.get());
  return finish(&out);
}

Outcome shared_write_race(int threads) {
  Buffer<int> out(1);
  LAUNCH(write_race_kernel, 1, threads, 0, out.get());
  return finish(&out);
}

Outcome launch_with_threads(int threads) {
  Buffer<int> out(1, {0});
  LAUNCH(empty_kernel, 1, threads, 0, out.get());
  return finish(&out);
}

Outcome launch_with_grid(dim3 grid) {
  LAUNCH(empty_kernel, grid, 1, 0, nullptr);
  return finish<int>(nullptr);
}

Outcome divergent_syncthreads(int threads) {
  Buffer<int> out(static_cast<size_t>(threads));
  LAUNCH(divergent_barrier_kernel, 1, threads, 0, out.get());
  return finish(&out);
}

Outcome exit_before_syncthreads(int threads) {
  Buffer<int> in(64, std::vector<int>(64, 3)), out(64);
  LAUNCH(early_exit_kernel, 1, threads, 0, in.get(), out.get(), threads - 8);
  return finish(&out);
}

Outcome read_uninitialized_shared() {
  Buffer<int> out(1);
  LAUNCH(uninitialized_kernel, 1, 32, 0, out.get());
  return finish(&out);
}

Outcome freed_pointer_argument() {
  Buffer<float> in(4, {1, 2, 3, 4}), out(1);
  in.release();
  float* stale = nullptr;
  cudaMalloc(reinterpret_cast<void**>(&stale), 16);
  cudaFree(stale);
  LAUNCH(read_one_kernel, 1, 1, 0, stale, out.get());
  return finish(&out);
}

Outcome host_pointer_argument() {
  std::vector<float> host(4, 1.0f);
  Buffer<float> out(1);
  LAUNCH(read_one_kernel, 1, 1, 0, host.data(), out.get());
  return finish(&out);
}

Outcome use_after_free_through_table() {
  float* stale = nullptr;
  cudaMalloc(reinterpret_cast<void**>(&stale), 32 * sizeof(float));
  Buffer<float*> table(1, {stale});
  Buffer<float> out(32);
  cudaFree(stale);
  LAUNCH(read_through_table_kernel, 1, 32, 0, table.get(), out.get());
  return finish(&out);
}

Outcome shuffle_with_exited_lane() {
  Buffer<float> out(32);
  LAUNCH(exited_lane_kernel, 1, 32, 0, out.get());
  return finish(&out);
}

Outcome too_much_dynamic_shared() {
  Buffer<float> in(1, {1.0f}), out(1);
  LAUNCH(reverse_kernel, 1, 32, 48 * 1024 + 4, in.get(), out.get(), 1);
  return finish(&out);
}

Outcome warp_deadlock() {
  Buffer<float> out(32);
  LAUNCH(deadlock_kernel, 1, 32, 0, out.get());
  return finish(&out);
}

// ---- counted kernels ----

Outcome strided_copy(int threads, int stride) {
  std::vector<float> x(static_cast<size_t>(threads) * stride);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i);
  Buffer<float> in(x.size(), x), out(static_cast<size_t>(threads));
  LAUNCH(strided_copy_kernel, 1, threads, 0, in.get(), out.get(), stride);
  return finish(&out);
}

Outcome shared_transpose(bool padded) {
  std::vector<float> x(32 * 32);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i);
  Buffer<float> in(x.size(), x), out(x.size());
  if (padded) {
    LAUNCH(shared_transpose_kernel<33>, 1, dim3(32, 32), 0, in.get(), out.get());
  } else {
    LAUNCH(shared_transpose_kernel<32>, 1, dim3(32, 32), 0, in.get(), out.get());
  }
  return finish(&out);
}

Outcome shared_doubles(int threads) {
  Buffer<double> out(static_cast<size_t>(threads));
  LAUNCH(shared_doubles_kernel, 1, threads, 0, out.get());
  return finish(&out);
}

Outcome counted_atomics(int blocks, int threads) {
  Buffer<int> total(1, {0});
  LAUNCH(counted_atomics_kernel, blocks, threads, 0, total.get());
  return finish(&total);
}

Outcome counted_arithmetic(int blocks, int threads) {
  Buffer<float> out(static_cast<size_t>(blocks) * threads);
  LAUNCH(counted_arithmetic_kernel, blocks, threads, 0, out.get());
  return finish(&out);
}

Outcome launch_loop(int launches) {
  for (int i = 0; i < launches; ++i) LAUNCH(empty_kernel, 2, 64, 0, nullptr);
  return finish<float>(nullptr);
}

// ---- tensor cores ----

Outcome ldmatrix_fragments(int matrices, bool transposed) {
  Buffer<unsigned int> out(static_cast<size_t>(32 * matrices));
  if (matrices == 1 && !transposed) LAUNCH((ldmatrix_kernel<1, false>), 1, 32, 0, out.get());
  if (matrices == 2 && !transposed) LAUNCH((ldmatrix_kernel<2, false>), 1, 32, 0, out.get());
  if (matrices == 4 && !transposed) LAUNCH((ldmatrix_kernel<4, false>), 1, 32, 0, out.get());
  if (matrices == 1 && transposed) LAUNCH((ldmatrix_kernel<1, true>), 1, 32, 0, out.get());
  if (matrices == 2 && transposed) LAUNCH((ldmatrix_kernel<2, true>), 1, 32, 0, out.get());
  if (matrices == 4 && transposed) LAUNCH((ldmatrix_kernel<4, true>), 1, 32, 0, out.get());
  return finish(&out);
}

Outcome mma_bf16(const std::vector<float>& a, const std::vector<float>& b,
                 const std::vector<float>& c, bool via_ldmatrix, int blocks, int threads) {
  Buffer<float> da(256, a), db(128, b), dc(128, c), out(128 * static_cast<size_t>(blocks));
  if (via_ldmatrix) {
    LAUNCH(mma_bf16_kernel<true>, blocks, threads, 0, da.get(), db.get(), dc.get(), out.get());
  } else {
    LAUNCH(mma_bf16_kernel<false>, blocks, threads, 0, da.get(), db.get(), dc.get(), out.get());
  }
  return finish(&out);
}

Outcome mma_tf32(const std::vector<float>& a, const std::vector<float>& b,
                 const std::vector<float>& c, int blocks, int threads) {
  Buffer<float> da(128, a), db(64, b), dc(128, c), out(128 * static_cast<size_t>(blocks));
  LAUNCH(mma_tf32_kernel, blocks, threads, 0, da.get(), db.get(), dc.get(), out.get());
  return finish(&out);
}

Outcome tensor_conversions(const std::vector<float>& x) {
  Buffer<float> in(x.size(), x);
  Buffer<unsigned int> out(3 * x.size());
  LAUNCH(conversions_kernel, 1, static_cast<unsigned int>(x.size()), 0, in.get(), out.get());
  return finish(&out);
}

Outcome half_warp_mma() {
  Buffer<float> out(32);
  LAUNCH(half_warp_mma_kernel, 1, 32, 0, out.get());
  return finish(&out);
}

Outcome partial_warp_mma() {
  Buffer<float> out(32);
  LAUNCH(half_warp_mma_kernel, 1, 16, 0, out.get());
  return finish(&out);
}

Outcome divergent_mma() {
  Buffer<float> out(32);
  LAUNCH(divergent_mma_kernel, 1, 32, 0, out.get());
  return finish(&out);
}

Outcome misaligned_ldmatrix() {
  Buffer<unsigned int> out(32);
  LAUNCH(misaligned_ldmatrix_kernel, 1, 32, 0, out.get());
  return finish(&out);
}

Outcome global_ldmatrix() {
  Buffer<uint16_t> rows(64, std::vector<uint16_t>(64, 1));
  Buffer<unsigned int> out(32);
  LAUNCH(global_ldmatrix_kernel, 1, 32, 0, rows.get(), out.get());
  return finish(&out);
}

}  // namespace cuda_emulation::self_test
