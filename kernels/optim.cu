// Optimiser kernels: the AdamW update over an optimiser arena and the global-norm clip.
//
// - adamw_prepare: per parameter with a gradient, whether it is real (its gates: the expert
//   counts of routing plans the host never read), its step count advanced on the device where it
//   is, and its step size and bias correction from the host's table of bias corrections
//   (rex::optim::AdamW keeps the counts on the device, so a gated gradient needs no host wait).
// - adamw_segments: one thread per element of the arena's span that the launch's segments cover
//   (grid-stride over arena offsets, so warps read consecutive floats as for one tensor); a thread
//   finds its element's segment by binary search in the segment table, which travels as a kernel
//   argument (a warp's lanes almost always search the same segment), skips elements between
//   segments (padding, parameters without a gradient), and does the whole update of its element
//   with the segment's scalars in rex::optim::AdamW::step's (PyTorch's) order of operations.
//   Products and sums use the _rn intrinsics so that nvcc contracts nothing into an FMA; sqrtf and
//   the division are IEEE round-to-nearest (no fast-math), so each operation rounds as the CPU's.
//   The gradient is first multiplied by the clip factor, read from device memory once per thread
//   (a factor of 1 leaves it as it is): the same rounding as scaling the gradient in place first.
//   A NaN factor (the norm was not finite) makes every thread return at once: nothing is updated.
// - clip_factor: deterministic two-level reduction in double, in one launch. A fixed grid (kBlocks
//   blocks of kThreads threads, whatever n is): each thread sums the squares of its strided
//   elements in order, each block combines its threads with a fixed shared-memory tree into one
//   partial, then the last block to finish (last_to_finish, common.cuh) combines the kBlocks
//   partials with the same tree and its thread 0 writes the norm and the clip factor (NaN for a
//   non-finite norm) to device memory. Nothing comes back to the host.
// - sum_squares: the same reduction for each of several arrays, all the sums read back to the host
//   in one copy (one synchronisation per call, not per array): the free function
//   rex::optim::clip_grad_norm and the error path that names a non-finite gradient.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.cuh"

namespace rex::cuda::detail {
namespace {

using rex::detail::AdamWBias;
using rex::detail::AdamWParamGates;
using rex::detail::AdamWSegment;
using rex::detail::AdamWStepScalars;
using rex::detail::kAdamWSegmentsPerLaunch;

struct SegmentTable {
  AdamWSegment segments[kAdamWSegmentsPerLaunch];
  int count;
};
// The table and the kernel's other arguments (about 80 bytes) within CUDA's 4 KiB of arguments.
static_assert(sizeof(SegmentTable) + 128 <= 4096,
              "adamw_segments_kernel's arguments are too large");

__global__ void adamw_segments_kernel(float* param, const float* grad, float* exp_avg,
                                      float* exp_avg_sq, int64_t first, int64_t last,
                                      SegmentTable table, rex::detail::AdamWScalars s,
                                      const AdamWStepScalars* step_scalars,
                                      const float* grad_scale) {
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  if (scale != scale) return;  // the clip found a non-finite norm: this step updates nothing
  for (int64_t i = first + thread_index(); i < last; i += thread_count()) {
    int lo = 0, hi = table.count - 1;  // the last segment that begins at or before i
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (table.segments[mid].begin <= i) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const AdamWSegment& seg = table.segments[lo];
    if (i >= seg.end) continue;  // between segments
    const AdamWStepScalars& own = step_scalars[seg.param];
    if (own.skip != 0) continue;  // a gated gradient that was not real
    const float g = __fmul_rn(grad[i], scale);
    const float w = __fmul_rn(param[i], seg.keep);
    const float m = __fadd_rn(__fmul_rn(exp_avg[i], s.beta1), __fmul_rn(s.one_minus_beta1, g));
    const float v =
        __fadd_rn(__fmul_rn(exp_avg_sq[i], s.beta2), __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
    const float denom = __fadd_rn(sqrtf(v) / own.bias2_sqrt, s.eps);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = __fadd_rn(w, __fmul_rn(own.neg_step_size, m) / denom);
  }
}

void adamw_segments(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                    const AdamWSegment* host_segments, int64_t count,
                    const rex::detail::AdamWScalars& scalars, const AdamWStepScalars* step_scalars,
                    const float* grad_scale) {
  for (int64_t done = 0; done < count; done += kAdamWSegmentsPerLaunch) {
    SegmentTable table{};
    table.count = static_cast<int>(std::min<int64_t>(count - done, kAdamWSegmentsPerLaunch));
    for (int j = 0; j < table.count; ++j) table.segments[j] = host_segments[done + j];
    const int64_t first = table.segments[0].begin, last = table.segments[table.count - 1].end;
    if (last <= first) continue;
    REX_LAUNCH(adamw_segments_kernel, blocks_for(last - first), kThreads, 0, param, grad, exp_avg,
               exp_avg_sq, first, last, table, scalars, step_scalars, grad_scale);
  }
}

// A warp per parameter, its lane 0 doing the work (a few loads and stores of one field each, each
// its own sector); the same accesses whatever the gates say, so that the counters do not depend
// on the routing.
__global__ void adamw_prepare_kernel(const AdamWParamGates* params, int64_t count,
                                     const int64_t* const* gates, int32_t* steps,
                                     const AdamWBias* bias, double lr,
                                     AdamWStepScalars* step_scalars) {
  const int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (threadIdx.x % 32 != 0 || item >= count) return;
  const int32_t param = params[item].param, gate_first = params[item].gate_first,
                gate_count = params[item].gate_count;
  bool real = gate_count == 0;
  for (int32_t j = 0; j < gate_count; ++j) {
    const int64_t* offsets = gates[gate_first + j];
    real = (offsets[1] != offsets[0]) | real;
  }
  const int32_t step = steps[param] + (real ? 1 : 0);
  steps[param] = step;
  const double bias1 = bias[step].bias1;
  const float bias2_sqrt = bias[step].bias2_sqrt;
  AdamWStepScalars& own = step_scalars[param];
  own.neg_step_size = real ? static_cast<float>(-(lr / bias1)) : 0.0f;
  own.bias2_sqrt = bias2_sqrt;
  own.skip = real ? 0 : 1;
}

void adamw_prepare(const AdamWParamGates* host_params, int64_t count,
                   const int64_t* const* host_gates, int64_t gates, int32_t* steps,
                   const AdamWBias* bias, double lr, AdamWStepScalars* step_scalars) {
  if (count == 0) return;
  // The parameters, then the gate pointers (8-byte aligned), in one upload.
  const size_t params_bytes = (static_cast<size_t>(count) * sizeof(AdamWParamGates) + 7) / 8 * 8;
  std::vector<unsigned char> staged(params_bytes + static_cast<size_t>(gates) * 8);
  std::memcpy(staged.data(), host_params, static_cast<size_t>(count) * sizeof(AdamWParamGates));
  if (gates > 0)
    std::memcpy(staged.data() + params_bytes, host_gates, static_cast<size_t>(gates) * 8);
  const Scratch table(staged.size());
  upload(table.as<void>(), staged.data(), staged.size());
  const auto* device_params = table.as<AdamWParamGates>();
  const auto* device_gates = reinterpret_cast<const int64_t* const*>(
      static_cast<const unsigned char*>(table.as<void>()) + params_bytes);
  REX_LAUNCH(adamw_prepare_kernel, blocks_for(count * 32), kThreads, 0, device_params, count,
             device_gates, steps, bias, lr, step_scalars);
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

// The sum of x's squares in double, in one launch of kBlocks blocks: each block sums its strided
// elements and combines its threads by block_tree_sum into partials[blockIdx.x]; the last block to
// finish (last_to_finish) combines the kBlocks partials with the same tree. Returns true in thread
// 0 of that block, with the sum in *total.
__device__ bool sum_of_squares(const float* x, int64_t n, double* partials, unsigned int* counter,
                               double* total) {
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
  if (!last_to_finish(counter, kBlocks)) return false;
  acc = 0.0;
  for (int i = static_cast<int>(threadIdx.x); i < kBlocks; i += kThreads) acc += partials[i];
  shared[threadIdx.x] = acc;
  block_tree_sum(shared);
  *total = shared[0];
  return threadIdx.x == 0;
}

__global__ void sum_squares_kernel(const float* x, int64_t n, double* partials,
                                   unsigned int* counter, double* sum) {
  double total = 0.0;
  if (sum_of_squares(x, n, partials, counter, &total)) *sum = total;
}

__global__ void clip_factor_kernel(const float* grad, int64_t n, double* partials,
                                   unsigned int* counter, double max_norm, double* norm,
                                   float* factor) {
  double squares = 0.0;
  if (!sum_of_squares(grad, n, partials, counter, &squares)) return;
  const double total = sqrt(squares);
  const double coef = max_norm / (total + 1e-6);
  *norm = total;
  const bool finite = total - total == 0.0;  // false for an infinity or a NaN
  // NaN when the norm is not finite: adamw_segments then updates nothing
  *factor = !finite ? nanf("") : max_norm > 0.0 && coef < 1.0 ? static_cast<float>(coef) : 1.0f;
}

void clip_factor(const float* grad, int64_t n, double max_norm, double* norm, float* factor) {
  const Scratch partials(kBlocks * sizeof(double));
  REX_LAUNCH(clip_factor_kernel, kBlocks, kThreads, 0, grad, n, partials.as<double>(),
             completion_counters(1), max_norm, norm, factor);
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
    REX_LAUNCH(sum_squares_kernel, kBlocks, kThreads, 0, host_arrays[i], host_sizes[i],
               partials.as<double>(), completion_counters(1), sums.as<double>() + i);
  }
  REX_CUDA(cudaMemcpyAsync(host_sums, sums.as<double>(),
                           static_cast<size_t>(count) * sizeof(double), cudaMemcpyDeviceToHost,
                           stream()));
  REX_CUDA(cudaStreamSynchronize(stream()));
}

}  // namespace

void register_optim(rex::detail::CudaBackend& table) {
  table.adamw_prepare = adamw_prepare;
  table.adamw_segments = adamw_segments;
  table.clip_factor = clip_factor;
  table.sum_squares = sum_squares;
}

}  // namespace rex::cuda::detail
