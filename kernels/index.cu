// Indexing, routing and layout kernels: row gather / scatter-add, top-k selection and its
// backward, axis permutation, and the rotary position embedding.
//
// - gather_rows: a check kernel (one thread per index) flags the first bad index, the host reads
//   the flag (a synchronisation) and throws before anything is written; then one thread per
//   output element copies, consecutive threads along a row so reads and writes are coalesced.
// - scatter_add_rows: determinism without floating-point atomics. The index is copied to the host
//   (unless the caller has its values there already: token ids uploaded from the host), checked
//   there, and counting-sorted into a CSR: for each output row, the source positions that
//   land on it in increasing order. One block per output row then sums its sources in that order
//   (threads over the columns), starting from 0, exactly as the CPU's loop does; rows that receive
//   nothing get 0.
// - topk: one warp per row (topk_row, kernels/topk_row.cuh). Selection by repeated scan: the j-th
// pick is the best score (the
//   element, or the hidden value where the mask hides it) that
//   ranks after pick j - 1 under the CPU's strict total order (NaN first, larger values first,
//   ties to the lower position), so no "taken" marks are needed. Each lane scans a strided slice
//   of the row and the warp combines the lane candidates with shuffles; a total order makes the
//   result independent of the combination tree.
// - topk_backward: one thread per element of gx, which looks for its column among the row's k
//   indices (the last match wins, as the CPU's sequential writes do); no zero-fill pass, no races.
// - psr_keep_rows: one thread per row runs the CPU's partial Fisher-Yates (psr_mask_row, shared
//   with the host through rex/backend/psr_mask.hpp) from the row's hash, with the row's expert
//   order in a scratch buffer: a step's tokens give thousands of rows, enough threads, and each
//   row is a few dozen experts' work.
// - permute: one thread per output element; extents and input strides are passed by value.
// - rope: one thread per (row, i) pair of the "rotate half" convention (i paired with i + D/2, as
//   rope_rotate on the CPU), each row at its position (heads or time first:
//   rex::detail::RopeRows, which also packs q and k for rope_qk, or unpacks their gradients);
//   products and sums use _rn intrinsics so that no FMA is contracted and
//   the float operations are those the CPU writes.
#include <vector>

#include "common.cuh"
#include "rex/backend/counting_sort.hpp"
#include "rex/backend/psr_mask.hpp"
#include "topk_row.cuh"

namespace rex::cuda::detail {
namespace {

[[noreturn]] void throw_bad_index(const char* op, int32_t value, int64_t position,
                                  int64_t num_rows) {
  throw Error(rex::detail::concat(op, ": index value ", value, " at position ", position,
                                  " is out of range [0, ", num_rows, ")"));
}

// ---- gather_rows ----

__global__ void check_rows_kernel(const int32_t* index, int64_t m, int64_t num_rows,
                                  unsigned long long* flag) {
  for (int64_t i = thread_index(); i < m; i += thread_count()) {
    const int32_t r = index[i];
    if (r < 0 || r >= num_rows) atomicMin(flag, static_cast<unsigned long long>(i));
  }
}

__global__ void gather_rows_kernel(const float* x, const int32_t* index, float* out, int64_t m,
                                   int64_t d) {
  const int64_t total = m * d;
  for (int64_t e = thread_index(); e < total; e += thread_count()) {
    const int64_t i = e / d, j = e - i * d;
    out[e] = x[static_cast<int64_t>(index[i]) * d + j];
  }
}

void gather_rows(const float* x, const int32_t* index, float* out, int64_t m, int64_t d,
                 int64_t num_rows, const char* op) {
  if (m == 0) return;
  const ErrorFlag flag;
  REX_LAUNCH(check_rows_kernel, blocks_for(m), kThreads, 0, index, m, num_rows, flag.device());
  const int64_t bad = flag.read();
  if (bad >= 0) {
    int32_t value = 0;
    REX_CUDA(cudaMemcpyAsync(&value, index + bad, sizeof value, cudaMemcpyDeviceToHost, stream()));
    REX_CUDA(cudaStreamSynchronize(stream()));
    throw_bad_index(op, value, bad, num_rows);
  }
  if (d == 0) return;
  REX_LAUNCH(gather_rows_kernel, blocks_for(m * d), kThreads, 0, x, index, out, m, d);
}

// gather_rows for indices rex made itself (the MoE routing plan): no check kernel, no read-back.
void gather_rows_unchecked(const float* x, const int32_t* index, float* out, int64_t m, int64_t d) {
  if (m == 0 || d == 0) return;
  REX_LAUNCH(gather_rows_kernel, blocks_for(m * d), kThreads, 0, x, index, out, m, d);
}

// ---- scatter_add_rows ----

// Output row r sums src rows order[offsets[r]], ..., order[offsets[r + 1] - 1] in that order (then
// is plus's row r plus that sum, when plus is set).
__global__ void scatter_add_rows_kernel(const float* src, const int64_t* offsets,
                                        const int64_t* order, const float* plus, float* out,
                                        int64_t num_rows, int64_t d) {
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int64_t begin = offsets[r], end = offsets[r + 1];
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      float acc = 0.0f;
      for (int64_t s = begin; s < end; ++s) acc += src[order[s] * d + j];
      out[r * d + j] = plus ? __fadd_rn(plus[r * d + j], acc) : acc;
    }
  }
}

void scatter_add_rows(const float* src, const int32_t* index, const int32_t* host_index,
                      const float* plus, float* out, int64_t m, int64_t d, int64_t num_rows) {
  std::vector<int32_t> read_back;
  if (!host_index && m > 0) {
    read_back.resize(static_cast<size_t>(m));
    REX_CUDA(cudaMemcpyAsync(read_back.data(), index, static_cast<size_t>(m) * sizeof(int32_t),
                             cudaMemcpyDeviceToHost, stream()));
    REX_CUDA(cudaStreamSynchronize(stream()));
    host_index = read_back.data();
  }
  // The sources of each output row, in increasing order (one CSR: offsets and order).
  const rex::detail::BucketOrder by_row = rex::detail::counting_sort(
      host_index, m, num_rows,
      [num_rows](int32_t r, int64_t i) { throw_bad_index("scatter_add_rows", r, i, num_rows); });
  if (num_rows == 0 || d == 0) return;

  const Scratch device_offsets(by_row.offsets.size() * sizeof(int64_t));
  const Scratch device_order(by_row.order.size() * sizeof(int64_t));
  upload(device_offsets.as<int64_t>(), by_row.offsets.data(),
         by_row.offsets.size() * sizeof(int64_t));
  upload(device_order.as<int64_t>(), by_row.order.data(), by_row.order.size() * sizeof(int64_t));

  // One block per output row, as many threads as the row has columns (a multiple of 32, <= 256).
  const int threads = static_cast<int>(d >= kThreads ? kThreads : (d + 31) / 32 * 32);
  const auto blocks = static_cast<unsigned int>(num_rows < 65535 * 32 ? num_rows : 65535 * 32);
  REX_LAUNCH(scatter_add_rows_kernel, blocks, threads, 0, src, device_offsets.as<int64_t>(),
             device_order.as<int64_t>(), plus, out, num_rows, d);
}

// ---- topk ----

// A warp per row (topk_row, kernels/topk_row.cuh), 8 rows a block.
__global__ void topk_kernel(const float* x, rex::detail::TopKHidden hidden, float* values,
                            int32_t* indices, int64_t rows, int64_t n, int64_t k) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t first = blockIdx.x * warps_per_block + threadIdx.x / kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t r = first; r < rows; r += stride)
    topk_row(x + r * n, r, hidden, values, indices, n, k, lane);
}

void topk(const float* x, rex::detail::TopKHidden hidden, float* values, int32_t* indices,
          int64_t rows, int64_t n, int64_t k) {
  REX_CHECK(k >= 1 && k <= n, "topk: k = ", k, " is out of range [1, ", n, "]");
  if (rows == 0) return;
  const int64_t warps_per_block = kThreads / kWarp;
  const int64_t blocks = (rows + warps_per_block - 1) / warps_per_block;
  REX_LAUNCH(topk_kernel, static_cast<unsigned int>(blocks < 65535 * 32 ? blocks : 65535 * 32),
             kThreads, 0, x, hidden, values, indices, rows, n, k);
}

__global__ void topk_backward_kernel(const float* g, const int32_t* indices,
                                     rex::detail::TopKHidden hidden, const float* plus, float* gx,
                                     int64_t rows, int64_t n, int64_t k) {
  const int64_t total = rows * n;
  for (int64_t e = thread_index(); e < total; e += thread_count()) {
    const int64_t r = e / n, c = e - r * n;
    float value = 0.0f;
    for (int64_t j = 0; j < k; ++j)
      if (indices[r * k + j] == c) value = g[r * k + j];
    if (hidden.hides(r, c)) value = 0.0f;
    gx[e] = plus ? __fadd_rn(plus[e], value) : value;
  }
}

void topk_backward(const float* g, const int32_t* indices, rex::detail::TopKHidden hidden,
                   const float* plus, float* gx, int64_t rows, int64_t n, int64_t k) {
  if (rows == 0 || n == 0) return;
  REX_LAUNCH(topk_backward_kernel, blocks_for(rows * n), kThreads, 0, g, indices, hidden, plus, gx,
             rows, n, k);
}

// ---- permute ----

// Output extents and, per output axis, the input stride taken when that axis advances by one.
struct PermuteIndex {
  int32_t rank;
  int64_t dims[rex::detail::kMaxCudaRank];
  int64_t in_strides[rex::detail::kMaxCudaRank];
};

__global__ void permute_kernel(const uint32_t* x, uint32_t* out, int64_t total, PermuteIndex p) {
  for (int64_t o = thread_index(); o < total; o += thread_count()) {
    int64_t rest = o, offset = 0;
    for (int axis = p.rank - 1; axis >= 0; --axis) {
      const int64_t q = rest / p.dims[axis];
      offset += (rest - q * p.dims[axis]) * p.in_strides[axis];
      rest = q;
    }
    out[o] = x[offset];
  }
}

void permute(const void* x, void* out, int32_t rank, const int64_t* host_dims,
             const int64_t* host_perm) {
  REX_CHECK(rank >= 0 && rank <= rex::detail::kMaxCudaRank, "permute: rank ", rank,
            " is more than the CUDA backend's ", rex::detail::kMaxCudaRank, " axes");
  // Row-major strides of x, then each output axis i takes extent and stride of x axis perm[i].
  int64_t x_strides[rex::detail::kMaxCudaRank] = {};
  int64_t step = 1;
  for (int axis = rank - 1; axis >= 0; --axis) {
    x_strides[axis] = step;
    step *= host_dims[axis];
  }
  PermuteIndex p{};
  p.rank = rank;
  int64_t total = 1;
  for (int i = 0; i < rank; ++i) {
    p.dims[i] = host_dims[host_perm[i]];
    p.in_strides[i] = x_strides[host_perm[i]];
    total *= p.dims[i];
  }
  if (total == 0) return;
  REX_LAUNCH(permute_kernel, blocks_for(total), kThreads, 0, static_cast<const uint32_t*>(x),
             static_cast<uint32_t*>(out), total, p);
}

// ---- rope ----

__global__ void rope_kernel(const float* x, const float* x_second, const float* cos,
                            const float* sin, float* y, float* y_second, rex::detail::RopeRows rows,
                            int64_t half, float direction) {
  const int64_t total = rows.count() * half;
  for (int64_t e = thread_index(); e < total; e += thread_count()) {
    const int64_t row = e / half, i = e - row * half;
    const int64_t t = rows.position(row), packed = row * 2 * half;
    const int64_t apart = rows.apart_row(row) * 2 * half;
    const bool second = rows.in_second(row);
    const float* in = x_second ? (second ? x_second : x) + apart : x + packed;
    float* out = y_second ? (second ? y_second : y) + apart : y + packed;
    const float c = cos[t * half + i];
    const float sn = __fmul_rn(direction, sin[t * half + i]);
    const float a = in[i], b = in[i + half];
    out[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, sn));
    out[i + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, sn));
  }
}

void rope(const float* x, const float* x_second, const float* cos, const float* sin, float* y,
          float* y_second, rex::detail::RopeRows rows, int64_t head_dim, float direction) {
  const int64_t half = head_dim / 2;
  if (rows.count() == 0 || half == 0) return;
  REX_LAUNCH(rope_kernel, blocks_for(rows.count() * half), kThreads, 0, x, x_second, cos, sin, y,
             y_second, rows, half, direction);
}

// ---- psr_keep_rows ----

__global__ void psr_keep_rows_kernel(rex::detail::PsrMaskRows rows, int32_t* order, float* keep) {
  for (int64_t r = thread_index(); r < rows.rows; r += thread_count())
    rex::detail::psr_mask_row(rows, rex::detail::psr_row_seed(rows, r), order + r * rows.pool,
                              keep + r * rows.pool);
}

void psr_keep_rows(const rex::detail::PsrMaskRows& rows, float* keep) {
  const Scratch order(static_cast<size_t>(rows.rows * rows.pool) * sizeof(int32_t));
  REX_LAUNCH(psr_keep_rows_kernel, blocks_for(rows.rows), kThreads, 0, rows, order.as<int32_t>(),
             keep);
}

}  // namespace

void register_index(rex::detail::CudaBackend& table) {
  table.gather_rows = gather_rows;
  table.gather_rows_unchecked = gather_rows_unchecked;
  table.scatter_add_rows = scatter_add_rows;
  table.topk = topk;
  table.topk_backward = topk_backward;
  table.psr_keep_rows = psr_keep_rows;
  table.permute = permute;
  table.rope = rope;
}

}  // namespace rex::cuda::detail
