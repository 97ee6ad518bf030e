// Optimiser kernels: the AdamW update and the sum of squares behind gradient clipping.
//
// - adamw: one thread per element (grid-stride), each doing the whole update of its element with
//   the scalars the host computed, in rex::optim::AdamW::step's (PyTorch's) order of operations.
//   Products and sums use the _rn intrinsics so that nvcc contracts nothing into an FMA; sqrtf and
//   the division are IEEE round-to-nearest (no fast-math), so each operation rounds as the CPU's.
// - sum_squares: deterministic two-pass reduction in double. A fixed grid (kBlocks blocks of
//   kThreads threads, whatever n is): each thread sums the squares of its strided elements in
//   order, each block combines its threads with a fixed shared-memory tree into one partial, then
//   a single block combines the kBlocks partials with the same tree into the array's slot of a
//   device buffer. The sums of all the arrays of one call come to the host in one copy (one
//   synchronisation per call, not per array). The tree is fixed, so each sum is the same on every
//   run.
#include "common.cuh"

namespace rex::cuda::detail {
namespace {

__global__ void adamw_kernel(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                             int64_t n, rex::detail::AdamWScalars s) {
  for (int64_t i = thread_index(); i < n; i += thread_count()) {
    const float g = grad[i];
    const float w = __fmul_rn(param[i], s.keep);
    const float m = __fadd_rn(__fmul_rn(exp_avg[i], s.beta1), __fmul_rn(s.one_minus_beta1, g));
    const float v =
        __fadd_rn(__fmul_rn(exp_avg_sq[i], s.beta2), __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
    const float denom = __fadd_rn(sqrtf(v) / s.bias2_sqrt, s.eps);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = __fadd_rn(w, __fmul_rn(s.neg_step_size, m) / denom);
  }
}

void adamw(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
           const rex::detail::AdamWScalars& scalars) {
  if (n == 0) return;
  REX_LAUNCH(adamw_kernel, blocks_for(n), kThreads, 0, param, grad, exp_avg, exp_avg_sq, n,
             scalars);
}

constexpr int kBlocks = 256;

// Sums the blockDim.x (= kThreads, a power of two) values in `shared` by halving; the total ends
// in shared[0]. Every thread of the block calls it.
__device__ void block_tree_sum(double* shared) {
  for (int width = kThreads / 2; width > 0; width /= 2) {
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < width) shared[threadIdx.x] += shared[threadIdx.x + width];
  }
  __syncthreads();
}

__global__ void sum_squares_partials_kernel(const float* x, int64_t n, double* partials) {
  __shared__ double shared[kThreads];
  double acc = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(kBlocks) * kThreads) {
    const double value = x[i];
    acc += value * value;
  }
  shared[threadIdx.x] = acc;
  block_tree_sum(shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = shared[0];
}

__global__ void sum_partials_kernel(const double* partials, double* total) {
  __shared__ double shared[kThreads];
  double acc = 0.0;
  for (int i = static_cast<int>(threadIdx.x); i < kBlocks; i += kThreads) acc += partials[i];
  shared[threadIdx.x] = acc;
  block_tree_sum(shared);
  if (threadIdx.x == 0) *total = shared[0];
}

void sum_squares(const float* const* host_arrays, const int64_t* host_sizes, int64_t count,
                 double* host_sums) {
  if (count == 0) return;
  const Scratch partials(kBlocks * sizeof(double));
  const Scratch sums(static_cast<size_t>(count) * sizeof(double));
  REX_CUDA(
      cudaMemsetAsync(sums.as<double>(), 0, static_cast<size_t>(count) * sizeof(double), stream()));
  for (int64_t i = 0; i < count; ++i) {
    if (host_sizes[i] == 0) continue;
    REX_LAUNCH(sum_squares_partials_kernel, kBlocks, kThreads, 0, host_arrays[i], host_sizes[i],
               partials.as<double>());
    REX_LAUNCH(sum_partials_kernel, 1, kThreads, 0, partials.as<double>(), sums.as<double>() + i);
  }
  REX_CUDA(cudaMemcpyAsync(host_sums, sums.as<double>(),
                           static_cast<size_t>(count) * sizeof(double), cudaMemcpyDeviceToHost,
                           stream()));
  REX_CUDA(cudaStreamSynchronize(stream()));
}

}  // namespace

void register_optim(rex::detail::CudaBackend& table) {
  table.adamw = adamw;
  table.sum_squares = sum_squares;
}

}  // namespace rex::cuda::detail
