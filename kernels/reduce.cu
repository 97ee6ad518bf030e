// Reductions over one axis and the row-wise fused ops: sum_axis, max_axis (+ backward), softmax,
// log_softmax, cross_entropy and rms_norm (each with its backward), and two forwards that fuse a
// row op with its neighbour: add_rms_norm (the residual add before the norm) and softmax_topk (the
// router's top-k after its softmax).
//
// Row-wise ops give each row one block (grid-stride over rows), with a block size chosen from the
// row length alone (row_threads): the threads stride over the row so reads coalesce, and
// block_reduce combines their partials with a warp-shuffle tree and then the warp totals in warp
// order. The order of every sum depends only on the shape, so results are deterministic. As on the
// CPU, the softmax row sums, the log-sum-exp and the rms_norm sums of squares and dot products
// are accumulated in double; the rows with no softmax (all -inf, or a +inf) come out as NaN
// instead of throwing. sum_axis and max_axis over a middle axis (inner > 1) give each output
// element one thread that walks the axis in order, exactly as the CPU loop does (coalesced across
// the inner index); over the last axis (inner == 1) they use the row scheme. cross_entropy writes
// per-row losses, then its last block sums them in double in a fixed tree; bad targets are reported
// through an ErrorFlag. rms_norm's dw is a column sum: rows are cut into fixed chunks whose partial
// sums (double, in row order) are made beside dx and added in chunk order by the last block to
// finish them (last_to_finish, common.cuh).
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "topk_row.cuh"

namespace rex::cuda::detail {
namespace {

// Threads per block for rows of n elements (a multiple of 32, at most 512).
int row_threads(int64_t n) {
  if (n <= 64) return 32;
  if (n <= 256) return 64;
  if (n <= 1024) return 128;
  if (n <= 4096) return 256;
  return 512;
}

// Blocks for one block per row; the kernels loop over rows past gridDim.x.
unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>(std::min<int64_t>(rows, 65535 * 32));
}

struct Add {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

struct Max {
  __device__ float operator()(float a, float b) const { return b > a ? b : a; }
};

// Combines one value per thread over the whole block and returns the result to every thread. All
// threads of the block must call it (blockDim.x a multiple of 32).
template <class T, class Op>
__device__ T block_reduce(T value, Op op) {
  __shared__ T partial[32];
  for (int offset = 16; offset > 0; offset /= 2)
    value = op(value, __shfl_down_sync(0xffffffffu, value, offset));
  __syncthreads();  // an earlier call's readers of partial are done
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = value;
  __syncthreads();
  T total = partial[0];
  for (unsigned int w = 1; w < blockDim.x / 32; ++w) total = op(total, partial[w]);
  return total;
}

// The maximum of a row over the block (NaN aside: a row holding NaN gives NaN downstream anyway).
__device__ float block_row_max(const float* row, int64_t n) {
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = Max{}(m, row[j]);
  return block_reduce(m, Max{});
}

// sum_j exp(row_j - m) over the block, in double.
__device__ double block_exp_sum(const float* row, int64_t n, float m) {
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += expf(row[j] - m);
  return block_reduce(s, Add{});
}

// ---- sum_axis ----

__global__ void sum_rows_kernel(const float* x, float* out, int64_t rows, int64_t n) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float s = 0.0f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += x[r * n + j];
    s = block_reduce(s, Add{});
    if (threadIdx.x == 0) out[r] = s;
  }
}

__global__ void sum_middle_kernel(const float* x, float* out, int64_t outer, int64_t n,
                                  int64_t inner) {
  for (int64_t item = thread_index(); item < outer * inner; item += thread_count()) {
    const float* p = x + item / inner * n * inner + item % inner;
    float s = 0.0f;
    for (int64_t j = 0; j < n; ++j) s += p[j * inner];
    out[item] = s;
  }
}

void sum_axis(const float* x, float* out, int64_t outer, int64_t n, int64_t inner) {
  if (outer == 0 || inner == 0) return;
  if (inner == 1) {
    REX_LAUNCH(sum_rows_kernel, row_blocks(outer), row_threads(n), 0, x, out, outer, n);
  } else {
    REX_LAUNCH(sum_middle_kernel, blocks_for(outer * inner), kThreads, 0, x, out, outer, n, inner);
  }
}

// ---- max_axis ----

// Candidates are compared with rex::detail::ranks_before (NaN first, then the larger value, ties
// to the lower position): a total order, so any reduction tree agrees with the CPU's loop.
using rex::detail::ranks_before;

__global__ void max_rows_kernel(const float* x, float* out, int32_t* argmax, int64_t rows,
                                int64_t n) {
  __shared__ float warp_value[32];
  __shared__ int32_t warp_index[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float best = -INFINITY;
    int32_t best_i = INT32_MAX;  // loses to any element
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float v = x[r * n + j];
      if (ranks_before(v, j, best, best_i)) {
        best = v;
        best_i = static_cast<int32_t>(j);
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const float v = __shfl_down_sync(0xffffffffu, best, offset);
      const int32_t i = __shfl_down_sync(0xffffffffu, best_i, offset);
      if (ranks_before(v, i, best, best_i)) {
        best = v;
        best_i = i;
      }
    }
    __syncthreads();  // the previous row's readers are done
    if (threadIdx.x % 32 == 0) {
      warp_value[threadIdx.x / 32] = best;
      warp_index[threadIdx.x / 32] = best_i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      best = warp_value[0];
      best_i = warp_index[0];
      for (unsigned int w = 1; w < blockDim.x / 32; ++w) {
        if (ranks_before(warp_value[w], warp_index[w], best, best_i)) {
          best = warp_value[w];
          best_i = warp_index[w];
        }
      }
      out[r] = best;
      argmax[r] = best_i;
    }
  }
}

__global__ void max_middle_kernel(const float* x, float* out, int32_t* argmax, int64_t outer,
                                  int64_t n, int64_t inner) {
  for (int64_t item = thread_index(); item < outer * inner; item += thread_count()) {
    const float* p = x + item / inner * n * inner + item % inner;
    float best = p[0];
    int32_t best_j = 0;
    for (int64_t j = 1; j < n; ++j) {
      const float v = p[j * inner];
      if (ranks_before(v, j, best, best_j)) {
        best = v;
        best_j = static_cast<int32_t>(j);
      }
    }
    out[item] = best;
    argmax[item] = best_j;
  }
}

// n == 0 has no maximum (the op rejects it) and launches nothing.
void max_axis(const float* x, float* out, int32_t* argmax, int64_t outer, int64_t n,
              int64_t inner) {
  if (outer == 0 || n == 0 || inner == 0) return;
  if (inner == 1) {
    REX_LAUNCH(max_rows_kernel, row_blocks(outer), row_threads(n), 0, x, out, argmax, outer, n);
  } else {
    REX_LAUNCH(max_middle_kernel, blocks_for(outer * inner), kThreads, 0, x, out, argmax, outer, n,
               inner);
  }
}

// One thread per element of gx: g where the element is its row's argmax, else 0.
__global__ void max_axis_backward_kernel(const float* g, const int32_t* argmax, float* gx,
                                         int64_t outer, int64_t n, int64_t inner) {
  for (int64_t item = thread_index(); item < outer * n * inner; item += thread_count()) {
    const int64_t at = item / (n * inner) * inner + item % inner, j = item / inner % n;
    gx[item] = argmax[at] == j ? g[at] : 0.0f;
  }
}

void max_axis_backward(const float* g, const int32_t* argmax, float* gx, int64_t outer, int64_t n,
                       int64_t inner) {
  const int64_t total = outer * n * inner;
  if (total == 0) return;
  REX_LAUNCH(max_axis_backward_kernel, blocks_for(total), kThreads, 0, g, argmax, gx, outer, n,
             inner);
}

// ---- softmax and log_softmax ----

__global__ void softmax_kernel(const float* x, float* y, int64_t rows, int64_t n) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = x + r * n;
    const float m = block_row_max(row, n);
    const auto inv = static_cast<float>(1.0 / block_exp_sum(row, n, m));
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) y[r * n + j] = expf(row[j] - m) * inv;
  }
}

__global__ void softmax_backward_kernel(const float* g, const float* y, float* dx, int64_t rows,
                                        int64_t n) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float *grow = g + r * n, *yrow = y + r * n;
    double dot = 0.0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      dot += static_cast<double>(grow[j]) * yrow[j];
    const auto d = static_cast<float>(block_reduce(dot, Add{}));
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dx[r * n + j] = yrow[j] * (grow[j] - d);
  }
}

__global__ void log_softmax_kernel(const float* x, float* y, int64_t rows, int64_t n) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = x + r * n;
    const float m = block_row_max(row, n);
    const auto log_s = static_cast<float>(log(block_exp_sum(row, n, m)));
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) y[r * n + j] = (row[j] - m) - log_s;
  }
}

__global__ void log_softmax_backward_kernel(const float* g, const float* y, float* dx, int64_t rows,
                                            int64_t n) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float *grow = g + r * n, *yrow = y + r * n;
    double total = 0.0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) total += grow[j];
    const auto t = static_cast<float>(block_reduce(total, Add{}));
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      dx[r * n + j] = grow[j] - expf(yrow[j]) * t;
  }
}

// The router's softmax and its top-k, a row a block: softmax_kernel's row, then topk_kernel's
// selection of it by the block's first warp (the bits of the two kernels).
__global__ void softmax_topk_kernel(const float* x, rex::detail::TopKHidden hidden, float* y,
                                    float* values, int32_t* indices, int64_t rows, int64_t n,
                                    int64_t k) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = x + r * n;
    float* probs = y + r * n;
    const float m = block_row_max(row, n);
    const auto inv = static_cast<float>(1.0 / block_exp_sum(row, n, m));
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) probs[j] = expf(row[j] - m) * inv;
    __syncthreads();  // the row's probabilities, written by every thread, read by the first warp
    if (threadIdx.x < kWarp)
      topk_row(probs, r, hidden, values, indices, n, k, static_cast<int>(threadIdx.x));
  }
}

void softmax_topk(const float* x, rex::detail::TopKHidden hidden, float* y, float* values,
                  int32_t* indices, int64_t rows, int64_t n, int64_t k) {
  REX_CHECK(k >= 1 && k <= n, "softmax_topk: k = ", k, " is out of range [1, ", n, "]");
  if (rows == 0) return;
  REX_LAUNCH(softmax_topk_kernel, row_blocks(rows), row_threads(n), 0, x, hidden, y, values,
             indices, rows, n, k);
}

void softmax(const float* x, float* y, int64_t rows, int64_t n) {
  if (rows == 0 || n == 0) return;
  REX_LAUNCH(softmax_kernel, row_blocks(rows), row_threads(n), 0, x, y, rows, n);
}

void log_softmax(const float* x, float* y, int64_t rows, int64_t n) {
  if (rows == 0 || n == 0) return;
  REX_LAUNCH(log_softmax_kernel, row_blocks(rows), row_threads(n), 0, x, y, rows, n);
}

void softmax_backward(const float* g, const float* y, float* dx, int64_t rows, int64_t n) {
  if (rows == 0 || n == 0) return;
  REX_LAUNCH(softmax_backward_kernel, row_blocks(rows), row_threads(n), 0, g, y, dx, rows, n);
}

void log_softmax_backward(const float* g, const float* y, float* dx, int64_t rows, int64_t n) {
  if (rows == 0 || n == 0) return;
  REX_LAUNCH(log_softmax_backward_kernel, row_blocks(rows), row_threads(n), 0, g, y, dx, rows, n);
}

// ---- cross_entropy ----

// Per row: lse and the row's loss lse - logit[target] (double); both 0 on ignored rows and on rows
// with a bad target, whose index goes to the flag. Then the last block to finish (last_to_finish)
// writes the mean of the row losses over the counted rows, summed in double by its threads (rows
// strided over them, then block_reduce: a tree the shape fixes) and their number.
__global__ void cross_entropy_kernel(const float* logits, const int32_t* targets, int64_t rows,
                                     int64_t classes, int32_t ignore_index, double* lse,
                                     double* row_loss, unsigned long long* bad, float* loss,
                                     int64_t* count, unsigned int* counter) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int32_t t = targets[r];  // the same for the whole block: no divergence below
    if (t == ignore_index || t < 0 || t >= classes) {
      if (threadIdx.x == 0) {
        if (t != ignore_index) atomicMin(bad, static_cast<unsigned long long>(r));
        lse[r] = 0.0;
        row_loss[r] = 0.0;
      }
      continue;
    }
    const float* row = logits + r * classes;
    const float m = block_row_max(row, classes);
    const double row_lse = m + log(block_exp_sum(row, classes, m));
    if (threadIdx.x == 0) {
      lse[r] = row_lse;
      row_loss[r] = row_lse - row[t];
    }
  }
  if (!last_to_finish(counter, gridDim.x)) return;
  double total = 0.0;
  int64_t counted = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    total += row_loss[r];
    counted += targets[r] != ignore_index ? 1 : 0;
  }
  total = block_reduce(total, Add{});
  counted = block_reduce(counted, Add{});
  if (threadIdx.x == 0) {
    *loss = counted > 0 ? static_cast<float>(total / static_cast<double>(counted)) : 0.0f;
    *count = counted;
  }
}

// A small synchronous device-to-host copy on rex's stream.
void read_back(void* host, const void* device, size_t bytes) {
  REX_CUDA(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream()));
  REX_CUDA(cudaStreamSynchronize(stream()));
}

int64_t cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t classes,
                      int32_t ignore_index, double* lse, float* loss, int64_t known_count) {
  // What the host needs, in one copy: the first row with a bad target (all ones when none, as an
  // ErrorFlag's) and how many rows count.
  struct Status {
    unsigned long long bad_row;
    int64_t counted;
  };
  Scratch row_loss(static_cast<size_t>(rows) * sizeof(double));
  Scratch status(sizeof(Status));
  REX_CUDA(cudaMemsetAsync(status.as<void>(), 0xFF, sizeof(unsigned long long), stream()));
  REX_LAUNCH(cross_entropy_kernel, std::max(row_blocks(rows), 1u), row_threads(classes), 0, logits,
             targets, rows, classes, ignore_index, lse, row_loss.as<double>(),
             &status.as<Status>()->bad_row, loss, &status.as<Status>()->counted,
             completion_counters(1));
  if (known_count >= 0) return known_count;
  Status host{};
  read_back(&host, status.as<void>(), sizeof host);
  if (host.bad_row != ~0ull) {
    const auto bad_row = static_cast<int64_t>(host.bad_row);
    int32_t target = 0;
    read_back(&target, targets + bad_row, sizeof target);
    throw Error(rex::detail::concat("cross_entropy: target ", target, " at row ", bad_row,
                                    " is out of range [0, ", classes, ")"));
  }
  return host.counted;
}

// Per row: g / count * (exp(x - lse) - onehot(t)) on counted rows, 0 on ignored rows (and
// everywhere when count == 0).
__global__ void cross_entropy_backward_kernel(const float* logits, const int32_t* targets,
                                              const double* lse, const float* g, float* gx,
                                              int64_t rows, int64_t classes, int32_t ignore_index,
                                              int64_t count) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int32_t t = targets[r];
    float* grow = gx + r * classes;
    if (count == 0 || t == ignore_index) {
      for (int64_t j = threadIdx.x; j < classes; j += blockDim.x) grow[j] = 0.0f;
      continue;
    }
    const float scale = *g / static_cast<float>(count);
    const double row_lse = lse[r];
    const float* row = logits + r * classes;
    for (int64_t j = threadIdx.x; j < classes; j += blockDim.x) {
      const float p = scale * static_cast<float>(exp(row[j] - row_lse));
      grow[j] = j == t ? p - scale : p;
    }
  }
}

void cross_entropy_backward(const float* logits, const int32_t* targets, const double* lse,
                            const float* g, float* gx, int64_t rows, int64_t classes,
                            int32_t ignore_index, int64_t count) {
  if (rows == 0 || classes == 0) return;
  REX_LAUNCH(cross_entropy_backward_kernel, row_blocks(rows), row_threads(classes), 0, logits,
             targets, lse, g, gx, rows, classes, ignore_index, count);
}

// ---- rms_norm ----

// Row r's y = x r w and rstd[r] = r from the sum of its squares (each thread's part, then the
// block's), the thread's elements of x being its own (written by it, or read before).
__device__ void rms_norm_finish(const float* row, const float* w, float* y, float* rstd, int64_t r,
                                int64_t n, float eps, double squares) {
  squares = block_reduce(squares, Add{});
  const auto ri = static_cast<float>(1.0 / sqrt(squares / static_cast<double>(n) + eps));
  if (threadIdx.x == 0) rstd[r] = ri;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) y[r * n + j] = row[j] * ri * w[j];
}

__global__ void rms_norm_kernel(const float* x, const float* w, float* y, float* rstd, int64_t rows,
                                int64_t n, float eps) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = x + r * n;
    double squares = 0.0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      squares += static_cast<double>(row[j]) * row[j];
    rms_norm_finish(row, w, y, rstd, r, n, eps, squares);
  }
}

void rms_norm(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t n,
              float eps) {
  if (rows == 0 || n == 0) return;
  REX_LAUNCH(rms_norm_kernel, row_blocks(rows), row_threads(n), 0, x, w, y, rstd, rows, n, eps);
}

// sum = a + b, then rms_norm_kernel's y and rstd of sum: each thread adds its elements, writes them
// and sums their squares in rms_norm_kernel's order, so the bits are those of the two kernels.
__global__ void add_rms_norm_kernel(const float* a, const float* b, const float* w, float* sum,
                                    float* y, float* rstd, int64_t rows, int64_t n, float eps) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float* row = sum + r * n;
    double squares = 0.0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float s = __fadd_rn(a[r * n + j], b[r * n + j]);
      row[j] = s;
      squares += static_cast<double>(s) * s;
    }
    rms_norm_finish(row, w, y, rstd, r, n, eps, squares);
  }
}

void add_rms_norm(const float* a, const float* b, const float* w, float* sum, float* y, float* rstd,
                  int64_t rows, int64_t n, float eps) {
  if (rows == 0 || n == 0) return;
  REX_LAUNCH(add_rms_norm_kernel, row_blocks(rows), row_threads(n), 0, a, b, w, sum, y, rstd, rows,
             n, eps);
}

// rms_norm's backward is one launch: its first blocks make dx, the others dw. dw is a column sum:
// the rows are cut into chunks, a block sums one chunk of one tile of columns (a column per
// thread), and the last block to finish a tile adds that tile's chunk partials in chunk order
// (last_to_finish). Both parts read g, x and rstd and write apart.

// dx = r * (g w - xhat * mean(g w xhat)) for rows first, first + stride, ... (a block each), xhat =
// x r; with plus, dx is added to it.
__device__ void rms_norm_dx_rows(const float* g, const float* x, const float* w, const float* rstd,
                                 const float* plus, float* dx, int64_t rows, int64_t n,
                                 int64_t first, int64_t stride) {
  for (int64_t r = first; r < rows; r += stride) {
    const float *grow = g + r * n, *row = x + r * n;
    const float ri = rstd[r];
    double dot = 0.0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      dot += static_cast<double>(grow[j]) * w[j] * (row[j] * ri);
    const auto mean_dot = static_cast<float>(block_reduce(dot, Add{}) / static_cast<double>(n));
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float value = ri * (grow[j] * w[j] - row[j] * ri * mean_dot);
      dx[r * n + j] = plus ? __fadd_rn(plus[r * n + j], value) : value;
    }
  }
}

// For the (chunk, tile) pairs first, first + stride, ...: partial[chunk, j] = the sum over the
// chunk's rows (in order, double) of g * xhat at column j, for the tile's columns j (a thread
// each); the last of a tile's chunks to finish writes dw[j] = the sum of its partials in chunk
// order (counters: one per tile).
__device__ void rms_norm_dw_chunks(const float* g, const float* x, const float* rstd,
                                   double* partial, float* dw, unsigned int* counters, int64_t rows,
                                   int64_t n, int64_t rows_per_chunk, int64_t chunks, int64_t first,
                                   int64_t stride) {
  const int64_t tiles = (n + blockDim.x - 1) / blockDim.x;
  for (int64_t pair = first; pair < chunks * tiles; pair += stride) {
    const int64_t chunk = pair / tiles, tile = pair % tiles;
    const int64_t j = tile * blockDim.x + threadIdx.x;
    const int64_t chunk_first = chunk * rows_per_chunk;
    const int64_t last = min(rows, chunk_first + rows_per_chunk);
    if (j < n) {
      double s = 0.0;
      for (int64_t r = chunk_first; r < last; ++r)
        s += static_cast<double>(g[r * n + j]) * (x[r * n + j] * rstd[r]);
      partial[chunk * n + j] = s;
    }
    if (last_to_finish(&counters[tile], static_cast<unsigned int>(chunks)) && j < n) {
      double total = 0.0;
      for (int64_t c = 0; c < chunks; ++c) total += partial[c * n + j];
      dw[j] = static_cast<float>(total);
    }
  }
}

// Blocks [0, dx_blocks) make dx (none when dx is null), the rest dw (none when dw is null).
__global__ void rms_norm_backward_kernel(const float* g, const float* x, const float* w,
                                         const float* rstd, const float* plus, float* dx,
                                         double* partial, float* dw, unsigned int* counters,
                                         int64_t rows, int64_t n, int64_t rows_per_chunk,
                                         int64_t chunks, int64_t dx_blocks) {
  if (blockIdx.x < dx_blocks) {
    rms_norm_dx_rows(g, x, w, rstd, plus, dx, rows, n, blockIdx.x, dx_blocks);
  } else {
    rms_norm_dw_chunks(g, x, rstd, partial, dw, counters, rows, n, rows_per_chunk, chunks,
                       blockIdx.x - dx_blocks, gridDim.x - dx_blocks);
  }
}

void rms_norm_backward(const float* g, const float* x, const float* w, const float* rstd,
                       const float* dx_plus, float* dx, float* dw, int64_t rows, int64_t n) {
  if (n == 0) return;
  // About 2^18 (chunk, column) items, at least 16 rows each; fixed by the shape alone.
  constexpr int64_t kTargetItems = int64_t{1} << 18;
  const int64_t rows_per_chunk =
      std::max<int64_t>(16, (rows * n + kTargetItems - 1) / kTargetItems);
  const int64_t chunks = dw == nullptr ? 0 : (rows + rows_per_chunk - 1) / rows_per_chunk;
  const int threads = row_threads(n);
  const int64_t tiles = (n + threads - 1) / threads;
  const int64_t dx_blocks = dx == nullptr ? 0 : row_blocks(rows);
  const int64_t dw_blocks = std::min<int64_t>(chunks * tiles, 65535 * 32);
  if (dw != nullptr && chunks == 0)  // no rows: dw is zero (all of whose bits are 0)
    REX_CUDA(cudaMemsetAsync(dw, 0, static_cast<size_t>(n) * sizeof(float), stream()));
  if (dx_blocks + dw_blocks == 0) return;
  Scratch partial(static_cast<size_t>(chunks * n) * sizeof(double));
  REX_LAUNCH(rms_norm_backward_kernel, static_cast<unsigned int>(dx_blocks + dw_blocks), threads, 0,
             g, x, w, rstd, dx_plus, dx, partial.as<double>(), dw, completion_counters(tiles), rows,
             n, rows_per_chunk, chunks, dx_blocks);
}

}  // namespace

void register_reduce(rex::detail::CudaBackend& table) {
  table.sum_axis = sum_axis;
  table.max_axis = max_axis;
  table.max_axis_backward = max_axis_backward;
  table.softmax = softmax;
  table.softmax_topk = softmax_topk;
  table.softmax_backward = softmax_backward;
  table.log_softmax = log_softmax;
  table.log_softmax_backward = log_softmax_backward;
  table.cross_entropy = cross_entropy;
  table.cross_entropy_backward = cross_entropy_backward;
  table.rms_norm = rms_norm;
  table.add_rms_norm = add_rms_norm;
  table.rms_norm_backward = rms_norm_backward;
}

}  // namespace rex::cuda::detail
