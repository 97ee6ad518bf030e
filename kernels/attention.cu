// Causal grouped-query attention (rex::causal_attention): the forward and the backward, one query
// or key row per block, with no atomics so every result is deterministic.
//
// Layouts: rex/backend/attention_shape.hpp (heads first or time first: only where a row starts
// differs); lse is [B, Hq, T]. Query head bh = b * Hq + h reads kv head b * Hkv + h / G, G = Hq /
// Hkv; so kv head bkv serves the query heads bkv * G + member, member = 0 .. G - 1.
//
// Work split (blocks of kBlock threads, each a grid-stride loop over rows):
// - forward, one block per query row (bh, i): warp w takes the keys j = w, w + kWarps, ... <= i
//   and computes s_j = scale * q_i . k_j with its lanes over D (coalesced) and a shuffle sum; then
//   a block max, p_j = exp(s_j - max), their block sum in double (as on the CPU), p_j /= sum, and
//   out_i[d] = sum_j p_j v_j[d] with threads over d and j increasing; lse_i = max + log(sum).
// - backward pass 1, one block per query row (bh, i): p_ij = exp(s_ij - lse_i) and
//   dp_ij = g_i . v_j (warps over j as above), delta_i = sum_j p_ij dp_ij in double (kept for
//   pass 2), and when dq is wanted ds_ij = scale p_ij (dp_ij - delta_i) and
//   dq_i[d] = sum_j ds_ij k_j[d] (threads over d, j increasing).
// - backward pass 2, one block per key row (bkv, j): for each query head of the group in order,
//   warps over i >= j recompute p_ij (and ds_ij when dk is wanted); then threads over d add
//   sum_i p_ij g_i[d] to dv_j[d] and sum_i ds_ij q_i[d] to dk_j[d], i increasing. Each block owns
//   its rows of dk and dv, so no two blocks write the same element.
// Each row's vectors (q_i or k_j, ... and the score rows of T floats) live in a per-block
// workspace: dynamic shared memory when it fits, else a slice of a global scratch buffer (then
// with a smaller grid, as that buffer holds grid * workspace floats).
#include <cmath>
#include <optional>

#include "common.cuh"

namespace rex::cuda::detail {
namespace {

using rex::detail::AttentionRows;
using rex::detail::AttentionShape;

constexpr int kBlock = 128;
constexpr int kWarps = kBlock / 32;
constexpr size_t kMaxSharedBytes = 40 * 1024;  // of the 48 KiB default, leaving room for statics
constexpr int64_t kMaxGrid = int64_t{1} << 20;
constexpr int64_t kMaxSpillGrid = 1024;

// a . b over n elements with the lanes of one warp; the result is valid in lane 0.
__device__ float warp_dot(const float* a, const float* b, int64_t n, int lane) {
  float acc = 0.0f;
  for (int64_t d = lane; d < n; d += 32) acc += a[d] * b[d];
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  return acc;
}

// Block-wide max / double sum, returned to every thread; partial holds kWarps entries.
__device__ float block_max(float value, float* partial) {
  for (int offset = 16; offset > 0; offset >>= 1)
    value = fmaxf(value, __shfl_down_sync(0xffffffffu, value, offset));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = value;
  __syncthreads();
  float result = partial[0];
  for (int w = 1; w < kWarps; ++w) result = fmaxf(result, partial[w]);
  __syncthreads();  // partial may be reused at once
  return result;
}

__device__ double block_sum(double value, double* partial) {
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_down_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = value;
  __syncthreads();
  double result = partial[0];
  for (int w = 1; w < kWarps; ++w) result += partial[w];
  __syncthreads();
  return result;
}

// The workspace of this block: dynamic shared memory, or its slice of spill when spill is set.
__device__ float* block_workspace(float* spill, int64_t workspace_floats) {
  return spill ? spill + static_cast<int64_t>(blockIdx.x) * workspace_floats
               : dynamic_shared<float>();
}

// Where query row `row` (of B Hq T) starts in `rows`' tensor (q and dq, or out and g), and where
// the head it reads starts in `kv_rows`' (k or v).
__device__ inline int64_t query_row_start(const AttentionShape& shape, AttentionRows rows,
                                          int64_t row) {
  return shape.start(rows, row / shape.time) + row % shape.time * shape.stride(rows);
}
__device__ inline int64_t kv_head_start(const AttentionShape& shape, AttentionRows kv_rows,
                                        int64_t row) {
  return shape.start(kv_rows, shape.kv_head_of(row / shape.time));
}

// rows = B * Hq * T; workspace: q_i [D], p [T].
__global__ void attention_forward_kernel(const float* q, const float* k, const float* v, float* out,
                                         float* lse, AttentionShape shape, float scale,
                                         float* spill, int64_t workspace_floats) {
  const int64_t rows = shape.batch * shape.heads * shape.time, time = shape.time;
  const int64_t head_dim = shape.head_dim;
  const int64_t k_stride = shape.stride(AttentionRows::k),
                v_stride = shape.stride(AttentionRows::v);
  __shared__ float max_partial[kWarps];
  __shared__ double sum_partial[kWarps];
  float* q_row = block_workspace(spill, workspace_floats);
  float* p = q_row + head_dim;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t i = row % time, q_at = query_row_start(shape, AttentionRows::q, row);
    const int64_t out_at = query_row_start(shape, AttentionRows::out, row);
    const float* k_h = k + kv_head_start(shape, AttentionRows::k, row);
    const float* v_h = v + kv_head_start(shape, AttentionRows::v, row);
    for (int64_t d = tid; d < head_dim; d += kBlock) q_row[d] = q[q_at + d];
    __syncthreads();

    float peak = -INFINITY;
    for (int64_t j = warp; j <= i; j += kWarps) {
      const float s =
          __shfl_sync(0xffffffffu, warp_dot(q_row, k_h + j * k_stride, head_dim, lane), 0) * scale;
      if (lane == 0) p[j] = s;
      peak = fmaxf(peak, s);
    }
    peak = block_max(peak, max_partial);  // its barrier also publishes p

    double part = 0.0;
    for (int64_t j = tid; j <= i; j += kBlock) {
      const float e = expf(p[j] - peak);
      p[j] = e;
      part += e;
    }
    const double total = block_sum(part, sum_partial);
    const float inverse = static_cast<float>(1.0 / total);
    for (int64_t j = tid; j <= i; j += kBlock) p[j] *= inverse;
    __syncthreads();

    for (int64_t d = tid; d < head_dim; d += kBlock) {
      float acc = 0.0f;
      for (int64_t j = 0; j <= i; ++j) acc += p[j] * v_h[j * v_stride + d];
      out[out_at + d] = acc;
    }
    if (tid == 0) lse[row] = peak + static_cast<float>(log(total));
    __syncthreads();  // the next row overwrites q_row and p
  }
}

// rows = B * Hq * T; workspace: q_i [D], g_i [D], p [T], dp (then ds) [T]. Writes delta [rows]
// and, when dq is set, dq.
__global__ void attention_backward_query_kernel(const float* q, const float* k, const float* v,
                                                const float* lse, const float* g, float* dq,
                                                float* delta, AttentionShape shape, float scale,
                                                float* spill, int64_t workspace_floats) {
  const int64_t rows = shape.batch * shape.heads * shape.time, time = shape.time;
  const int64_t head_dim = shape.head_dim;
  const int64_t k_stride = shape.stride(AttentionRows::k),
                v_stride = shape.stride(AttentionRows::v);
  __shared__ double sum_partial[kWarps];
  float* q_row = block_workspace(spill, workspace_floats);
  float* g_row = q_row + head_dim;
  float* p = g_row + head_dim;
  float* dp = p + time;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t i = row % time, q_at = query_row_start(shape, AttentionRows::q, row);
    const int64_t g_at = query_row_start(shape, AttentionRows::out, row);
    const float* k_h = k + kv_head_start(shape, AttentionRows::k, row);
    const float* v_h = v + kv_head_start(shape, AttentionRows::v, row);
    for (int64_t d = tid; d < head_dim; d += kBlock) {
      q_row[d] = q[q_at + d];
      g_row[d] = g[g_at + d];
    }
    __syncthreads();

    const float lse_i = lse[row];
    for (int64_t j = warp; j <= i; j += kWarps) {
      const float s = warp_dot(q_row, k_h + j * k_stride, head_dim, lane);
      const float dp_j = warp_dot(g_row, v_h + j * v_stride, head_dim, lane);
      if (lane == 0) {
        p[j] = expf(s * scale - lse_i);
        dp[j] = dp_j;
      }
    }
    __syncthreads();

    double part = 0.0;
    for (int64_t j = tid; j <= i; j += kBlock)
      part += static_cast<double>(dp[j]) * static_cast<double>(p[j]);
    const float delta_i = static_cast<float>(block_sum(part, sum_partial));
    if (tid == 0) delta[row] = delta_i;

    if (dq) {  // the same for every thread of the grid
      for (int64_t j = tid; j <= i; j += kBlock) dp[j] = scale * p[j] * (dp[j] - delta_i);
      __syncthreads();
      for (int64_t d = tid; d < head_dim; d += kBlock) {
        float acc = 0.0f;
        for (int64_t j = 0; j <= i; ++j) acc += dp[j] * k_h[j * k_stride + d];
        dq[q_at + d] = acc;
      }
    }
    __syncthreads();  // the next row overwrites the workspace
  }
}

// rows = B * Hkv * T; workspace: k_j [D], v_j [D], p [T], ds [T] (indexed by the query row i).
// dk or dv may be null (not both).
__global__ void attention_backward_key_kernel(const float* q, const float* k, const float* v,
                                              const float* lse, const float* g, const float* delta,
                                              float* dk, float* dv, AttentionShape shape,
                                              float scale, float* spill, int64_t workspace_floats) {
  const int64_t rows = shape.batch * shape.kv_heads * shape.time, time = shape.time;
  const int64_t head_dim = shape.head_dim, group = shape.group();
  const int64_t q_stride = shape.stride(AttentionRows::q),
                g_stride = shape.stride(AttentionRows::out);
  float* k_row = block_workspace(spill, workspace_floats);
  float* v_row = k_row + head_dim;
  float* p = v_row + head_dim;
  float* ds = p + time;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t bkv = row / time, j = row % time;
    const int64_t k_at = shape.start(AttentionRows::k, bkv) + j * shape.stride(AttentionRows::k);
    const int64_t v_at = shape.start(AttentionRows::v, bkv) + j * shape.stride(AttentionRows::v);
    for (int64_t d = tid; d < head_dim; d += kBlock) {
      k_row[d] = k[k_at + d];
      v_row[d] = v[v_at + d];
    }
    __syncthreads();

    for (int64_t member = 0; member < group; ++member) {
      const int64_t bh = bkv * group + member;  // = b * Hq + kv head * G + member
      const float* q_h = q + shape.start(AttentionRows::q, bh);
      const float* g_h = g + shape.start(AttentionRows::out, bh);
      const float* lse_h = lse + bh * time;
      const float* delta_h = delta + bh * time;
      for (int64_t i = j + warp; i < time; i += kWarps) {
        const float s = warp_dot(q_h + i * q_stride, k_row, head_dim, lane);
        const float dp_i = dk ? warp_dot(g_h + i * g_stride, v_row, head_dim, lane) : 0.0f;
        if (lane == 0) {
          const float p_i = expf(s * scale - lse_h[i]);
          p[i] = p_i;
          if (dk) ds[i] = scale * p_i * (dp_i - delta_h[i]);
        }
      }
      __syncthreads();

      for (int64_t d = tid; d < head_dim; d += kBlock) {
        if (dv) {
          float acc = 0.0f;
          for (int64_t i = j; i < time; ++i) acc += p[i] * g_h[i * g_stride + d];
          dv[v_at + d] = member == 0 ? acc : dv[v_at + d] + acc;
        }
        if (dk) {
          float acc = 0.0f;
          for (int64_t i = j; i < time; ++i) acc += ds[i] * q_h[i * q_stride + d];
          dk[k_at + d] = member == 0 ? acc : dk[k_at + d] + acc;
        }
      }
      __syncthreads();  // the next member (or row) overwrites p and ds
    }
  }
}

// Where a launch over `rows` rows with `floats` floats of workspace per block keeps them: dynamic
// shared memory, or (when that would pass kMaxSharedBytes) a global buffer of grid * floats.
class Workspace {
 public:
  Workspace(int64_t rows, int64_t floats) {
    const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
    const bool spilled = bytes > kMaxSharedBytes;
    const int64_t cap = spilled ? kMaxSpillGrid : kMaxGrid;
    grid_ = static_cast<unsigned int>(rows < cap ? rows : cap);
    shared_bytes_ = spilled ? 0 : bytes;
    if (spilled) spill_.emplace(grid_ * bytes);
  }
  unsigned int grid() const { return grid_; }
  size_t shared_bytes() const { return shared_bytes_; }
  float* spill() const { return spill_ ? spill_->as<float>() : nullptr; }

 private:
  unsigned int grid_;
  size_t shared_bytes_;
  std::optional<Scratch> spill_;
};

void attention(const float* q, const float* k, const float* v, float* out, float* lse,
               AttentionShape shape, float scale) {
  const int64_t rows = shape.batch * shape.heads * shape.time;
  if (rows == 0) return;
  const int64_t workspace_floats = shape.head_dim + shape.time;
  const Workspace space(rows, workspace_floats);
  REX_LAUNCH(attention_forward_kernel, space.grid(), kBlock, space.shared_bytes(), q, k, v, out,
             lse, shape, scale, space.spill(), workspace_floats);
}

void attention_backward(const float* q, const float* k, const float* v, const float* lse,
                        const float* g, float* dq, float* dk, float* dv, AttentionShape shape,
                        float scale) {
  const int64_t rows = shape.batch * shape.heads * shape.time;
  if (rows == 0 || shape.head_dim == 0 || (!dq && !dk && !dv)) return;
  const int64_t workspace_floats = 2 * shape.head_dim + 2 * shape.time;
  // delta is needed by dq (pass 1) and dk (pass 2); dv alone needs only p.
  const Scratch delta(static_cast<size_t>(rows) * sizeof(float));
  if (dq || dk) {
    const Workspace space(rows, workspace_floats);
    REX_LAUNCH(attention_backward_query_kernel, space.grid(), kBlock, space.shared_bytes(), q, k, v,
               lse, g, dq, delta.as<float>(), shape, scale, space.spill(), workspace_floats);
  }
  if (dk || dv) {
    const Workspace space(shape.batch * shape.kv_heads * shape.time, workspace_floats);
    REX_LAUNCH(attention_backward_key_kernel, space.grid(), kBlock, space.shared_bytes(), q, k, v,
               lse, g, delta.as<float>(), dk, dv, shape, scale, space.spill(), workspace_floats);
  }
}

}  // namespace

void register_attention(rex::detail::CudaBackend& table) {
  table.attention = attention;
  table.attention_backward = attention_backward;
}

}  // namespace rex::cuda::detail
