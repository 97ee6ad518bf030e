// Flash attention on bf16 tensor cores: the same causal grouped-query attention as attention.cu
// (same layouts: heads first or time first; same lse), computed tile by tile so that the T x T
// scores never reach memory.
//
// Precision: q, k, v, the output gradient g and the probabilities p (and ds in the backward) enter
// the tensor cores rounded to bf16; every product accumulates in fp32; the softmax statistics
// (running max, sum, lse, delta) and the outputs are fp32. Inputs and outputs are fp32 tensors.
//
// Tiles: a block of 8 warps takes rows of one head, a warp 32 of them (two 16-row blocks, which
// share every fragment the warp loads from shared memory) in the forward and, up to head dim 64,
// in the backward, 16 in the backward at head dim 128; the other side streams through shared
// memory in tiles (forward 32 keys, 16 at head dim 128; backward 64 rows), converted to bf16 on
// the way in (rows padded by 8 elements, so that the 8 rows an ldmatrix reads fall in distinct
// banks). Products are mma.m16n8k16 (kernels/mma.cuh). An accumulator's layout is the layout of
// an A operand (row g, columns 2t, 2t+1 and the same 8 rows and columns further on), so scores
// turn into probabilities in registers and feed the next product without a trip through shared
// memory.
// - forward, a block per (query tile, query head): q's fragments stay in registers; for each key
//   tile up to the diagonal, s = q k^T, the online softmax (running max m and sum l per row, the
//   output rescaled by exp(m_old - m_new)), o += p v. Then o / l and lse = m + log l.
// - backward queries (launched first), a block per (query tile, query head): q and g stay in
//   registers, and delta_i = g_i . o_i (fp32) is summed from g's rows as they are loaded, kept and
//   written for the keys kernel; for each key tile up to the diagonal, 16 keys at a time:
//   p = exp(q k^T scale - lse), dp = g v^T, ds = p (dp - delta), dq += ds k. Recomputing p here
//   instead of adding dq across key tiles costs two products more than one fused kernel, and
//   keeps every sum in a fixed order.
// - backward keys, a block per (key tile, kv head): the warp's k and v rows stay in registers; for
//   every query head of the group in order, and every query tile from the diagonal on, 16 queries
//   at a time: p^T = exp(k q^T scale - lse), dv += p^T g, dp^T = v g^T, ds^T = p^T (dp^T - delta),
//   dk += ds^T q. Each block owns its rows of dk and dv: no atomics, a fixed order.
// Fully masked tiles are never visited; within the diagonal tile the mask is applied per element.
// Register use per thread at head dim 128 (what the GPU must hold; the emulation does not limit
// it): forward 64 (q) + 128 (o) + 16 (s) + 8 (p) for its two row blocks, which ptxas fits in 255
// with 4 bytes spilled once the kernel's loops over the blocks are unrolled (#pragma unroll; left
// rolled, o and s went to local memory); keys 32 (k) + 32 (v) + 64 (dk) + 64 (dv) + 16; queries
// 32 (q) + 32 (g) + 64 (dq) + 16.
#include <cmath>

#include "common.cuh"
#include "mma.cuh"

namespace rex::cuda::detail {
namespace {

using rex::detail::AttentionRows;
using rex::detail::AttentionShape;

constexpr int kWarps = 8;
constexpr int kFlashThreads = 32 * kWarps;
// 16-row blocks a warp owns: two share every fragment the warp loads from shared memory. In the
// backward at head dim 128 their registers (k, v, dk, dv or q, g, dq) would pass the 255 a thread
// has, so a warp takes one there. The forward's warps take two at every head dim; at 128 the key
// tiles are 16 keys instead of 32, which keeps q, o and the scores within 255 registers.
template <int D>
constexpr int kRowBlocks = D <= 64 ? 2 : 1;
template <int D>
constexpr int kBlockRows = 16 * kRowBlocks<D>* kWarps;  // rows a backward block owns
constexpr int kForwardRowBlocks = 2;
constexpr int kForwardRows = 16 * kForwardRowBlocks * kWarps;  // rows a forward block owns
template <int D>
constexpr int kForwardKeys = D == 128 ? 16 : 32;  // keys of a streamed forward tile
constexpr int kBackwardTile = 64;                 // rows of a streamed backward tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Row stride of a bf16 tile in shared memory, in 16-bit elements.
template <int D>
constexpr int kPadded = D + 8;

// Where one block works: head `head` (of B * heads) and its rows [first, first + rows). Within a
// head, with last_first, the tiles with most work come first.
struct TileOf {
  int64_t head, first;
};
__device__ __forceinline__ TileOf block_tile(int64_t time, int64_t rows, bool last_first) {
  const int64_t tiles = (time + rows - 1) / rows, index = blockIdx.x, tile = index % tiles;
  return {index / tiles, (last_first ? tiles - 1 - tile : tile) * rows};
}

// A head's rows are a [time, D] fp32 matrix whose rows lie `stride` floats apart (D heads first, H
// D time first: rex/backend/attention_shape.hpp).

// Rows [first, first + Rows) of a head's matrix into a bf16 shared tile (zeros past time).
template <int D, int Rows>
__device__ __forceinline__ void load_tile(uint16_t* tile, const float* matrix, int64_t stride,
                                          int64_t first, int64_t time) {
  constexpr int kQuads = D / 4;
  for (int i = threadIdx.x; i < Rows * kQuads; i += kFlashThreads) {
    const int row = i / kQuads, column = (i % kQuads) * 4;
    float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (first + row < time)
      x = *reinterpret_cast<const float4*>(matrix + (first + row) * stride + column);
    *reinterpret_cast<uint2*>(tile + row * kPadded<D> + column) =
        make_uint2(pack_bf16x2(x.x, x.y), pack_bf16x2(x.z, x.w));
  }
}

// The A fragments (16 rows x D, bf16) of rows [first, first + 16) of a head's matrix,
// straight from global memory into registers (zeros past time): frag[s] covers columns 16s..16s+15.
// With dot_with, also each row's dot product with the same row of that head's matrix (with the same
// stride), in fp32 from the
// values as loaded (this lane's columns in order, then a shuffle tree over the row's four lanes):
// dots[0] for row first + g, dots[1] for first + g + 8 (0 past time).
template <int D>
__device__ __forceinline__ void load_rows_as_a(uint32_t (&frag)[D / 16][4], const float* matrix,
                                               int64_t stride, int64_t first, int64_t time,
                                               const float* dot_with = nullptr,
                                               float* dots = nullptr) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t top = first + g, bottom = first + g + 8;
  float dot[2] = {0.0f, 0.0f};
  for (int s = 0; s < D / 16; ++s) {
    const int column = 16 * s + 2 * t;
    float2 x[4] = {}, y[4] = {};
    if (top < time) {
      x[0] = *reinterpret_cast<const float2*>(matrix + top * stride + column);
      x[2] = *reinterpret_cast<const float2*>(matrix + top * stride + column + 8);
      if (dot_with) {
        y[0] = *reinterpret_cast<const float2*>(dot_with + top * stride + column);
        y[2] = *reinterpret_cast<const float2*>(dot_with + top * stride + column + 8);
      }
    }
    if (bottom < time) {
      x[1] = *reinterpret_cast<const float2*>(matrix + bottom * stride + column);
      x[3] = *reinterpret_cast<const float2*>(matrix + bottom * stride + column + 8);
      if (dot_with) {
        y[1] = *reinterpret_cast<const float2*>(dot_with + bottom * stride + column);
        y[3] = *reinterpret_cast<const float2*>(dot_with + bottom * stride + column + 8);
      }
    }
    for (int r = 0; r < 4; ++r) frag[s][r] = pack_bf16x2(x[r].x, x[r].y);
    if (dot_with)
      for (int r = 0; r < 4; ++r) dot[r % 2] += x[r].x * y[r].x + x[r].y * y[r].y;
  }
  if (!dot_with) return;
  for (int half = 0; half < 2; ++half) {
    dot[half] += __shfl_xor_sync(0xffffffffu, dot[half], 1);
    dot[half] += __shfl_xor_sync(0xffffffffu, dot[half], 2);
    dots[half] = dot[half];
  }
}

// acc[b][n] (16 x 8 each) += A_b (16 x D, registers) times B^T, for the R row blocks A_b of a warp,
// where B is 8 N rows x D of a shared tile starting at `rows` (row-major, padded): the product of
// a warp's rows with those tile rows. Each B fragment loaded serves all R row blocks.
template <int D, int R, int N>
__device__ __forceinline__ void multiply_by_rows(float (&acc)[R][N][4],
                                                 const uint32_t (&a)[R][D / 16][4],
                                                 const uint16_t* rows) {
  static_assert(N % 2 == 0, "tile rows come in pairs of 8");
  const int lane = threadIdx.x % 32, matrix = lane / 8, r = lane % 8;
  for (int s = 0; s < D / 16; ++s)
    for (int n = 0; n < N; n += 2) {
      // matrices: (rows 8n.., columns 16s..), (8n.., 16s+8..), (8n+8.., 16s..), (8n+8.., 16s+8..)
      uint32_t b[4];
      load_matrices<4>(
          b, rows + (8 * n + (matrix / 2) * 8 + r) * kPadded<D> + 16 * s + (matrix % 2) * 8);
      const uint32_t first[2] = {b[0], b[1]}, second[2] = {b[2], b[3]};
      for (int block = 0; block < R; ++block) {
        mma_bf16_16x8x16(acc[block][n], a[block][s], first);
        mma_bf16_16x8x16(acc[block][n + 1], a[block][s], second);
      }
    }
}

// acc[b][n] (16 x 8, n over D / 8) += P_b (16 x 16 K, as K A fragments) times the 16 K rows of a
// shared tile starting at `rows`, for the R row blocks of a warp: the product of probabilities (or
// score gradients) with tile rows.
template <int D, int R, int K>
__device__ __forceinline__ void multiply_into_rows(float (&acc)[R][D / 8][4],
                                                   const uint32_t (&p)[R][K][4],
                                                   const uint16_t* rows) {
  const int lane = threadIdx.x % 32, matrix = lane / 8, r = lane % 8;
  for (int s = 0; s < K; ++s)
    for (int n = 0; n < D / 8; n += 2) {
      // transposed matrices: (rows 16s.., columns 8n..), (16s+8.., 8n..), (16s.., 8n+8..),
      // (16s+8.., 8n+8..)
      uint32_t b[4];
      load_matrices_transposed<4>(
          b, rows + (16 * s + (matrix % 2) * 8 + r) * kPadded<D> + 8 * n + (matrix / 2) * 8);
      const uint32_t first[2] = {b[0], b[1]}, second[2] = {b[2], b[3]};
      for (int block = 0; block < R; ++block) {
        mma_bf16_16x8x16(acc[block][n], p[block][s], first);
        mma_bf16_16x8x16(acc[block][n + 1], p[block][s], second);
      }
    }
}

// Accumulators of 16 x (8 N) as N / 2 A fragments (bf16): the layout carries over unchanged.
template <int N>
__device__ __forceinline__ void as_a_fragments(uint32_t (&frag)[N / 2][4],
                                               const float (&acc)[N][4]) {
  for (int s = 0; s < N / 2; ++s) {
    frag[s][0] = pack_bf16x2(acc[2 * s][0], acc[2 * s][1]);
    frag[s][1] = pack_bf16x2(acc[2 * s][2], acc[2 * s][3]);
    frag[s][2] = pack_bf16x2(acc[2 * s + 1][0], acc[2 * s + 1][1]);
    frag[s][3] = pack_bf16x2(acc[2 * s + 1][2], acc[2 * s + 1][3]);
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
  for (int n = 0; n < N; ++n)
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
}

// Rows (g, g + 8) of 16 x (8 N) accumulators written to a head's matrix (D = 8 N) times
// scale_top / scale_bottom, rows past time skipped.
template <int N>
__device__ __forceinline__ void store_rows(float* matrix, int64_t stride, const float (&acc)[N][4],
                                           int64_t first, int64_t time, float scale_top,
                                           float scale_bottom) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int half = 0; half < 2; ++half) {
    const int64_t row = first + g + 8 * half;
    if (row >= time) continue;
    const float scale = half == 0 ? scale_top : scale_bottom;
    for (int n = 0; n < N; ++n)
      *reinterpret_cast<float2*>(matrix + row * stride + 8 * n + 2 * t) =
          make_float2(acc[n][2 * half] * scale, acc[n][2 * half + 1] * scale);
  }
}

// One row block's online softmax over a tile of scores s (16 x 8 N, unscaled, keys from
// key_first): masks keys past the row or past time, updates the log2-domain running max m and
// this lane's partial sum l of rows (row, row + 8), rescales o and leaves in s the probabilities.
template <int D, int N>
__device__ __forceinline__ void online_softmax(float (&s)[N][4], float (&o)[D / 8][4],
                                               float (&m)[2], float (&l)[2], int64_t row,
                                               int64_t key_first, int64_t time, float scale_log2) {
  const int t = threadIdx.x % 4;
  float tile_max[2] = {-INFINITY, -INFINITY};
  for (int n = 0; n < N; ++n)
    for (int e = 0; e < 4; ++e) {
      const int half = e / 2;
      const int64_t key = key_first + 8 * n + 2 * t + e % 2;
      s[n][e] = (key > row + 8 * half || key >= time) ? -INFINITY : s[n][e] * scale_log2;
      tile_max[half] = fmaxf(tile_max[half], s[n][e]);
    }
  float rescale[2];
  for (int half = 0; half < 2; ++half) {
    tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 1));
    tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 2));
    const float m_new = fmaxf(m[half], tile_max[half]);
    // a row with no key yet keeps m = -inf; exp2 of -inf - 0 is then 0
    const float base = m_new == -INFINITY ? 0.0f : m_new;
    rescale[half] = exp2f(m[half] - base);
    m[half] = m_new;
    l[half] *= rescale[half];
    for (int n = 0; n < N; ++n)
      for (int e = 2 * half; e < 2 * half + 2; ++e) {
        s[n][e] = exp2f(s[n][e] - base);
        l[half] += s[n][e];
      }
  }
  for (int n = 0; n < D / 8; ++n)
    for (int e = 0; e < 4; ++e) o[n][e] *= rescale[e / 2];
}

template <int D>
__global__ void flash_forward_kernel(const float* q, const float* k, const float* v, float* out,
                                     float* lse, AttentionShape shape, float scale) {
  constexpr int R = kForwardRowBlocks;
  const int64_t time = shape.time, q_stride = shape.stride(AttentionRows::q);
  const int64_t k_stride = shape.stride(AttentionRows::k),
                v_stride = shape.stride(AttentionRows::v);
  __shared__ __align__(16) uint16_t k_tile[kForwardKeys<D> * kPadded<D>];
  __shared__ __align__(16) uint16_t v_tile[kForwardKeys<D> * kPadded<D>];
  const TileOf tile = block_tile(time, kForwardRows, true);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t first = tile.first + warp * 16 * R;  // this warp's first query row
  const int64_t kv_head = shape.kv_head_of(tile.head);
  const float* k_h = k + shape.start(AttentionRows::k, kv_head);
  const float* v_h = v + shape.start(AttentionRows::v, kv_head);
  const float* q_h = q + shape.start(AttentionRows::q, tile.head);

  uint32_t q_frag[R][D / 16][4];
  float o[R][D / 8][4];
  // log2-domain statistics of rows first + 16 b + g and + 8; l sums this lane's columns only
  float m[R][2], l[R][2];
  for (int b = 0; b < R; ++b) {
    load_rows_as_a<D>(q_frag[b], q_h, q_stride, first + 16 * b, time);
    zero(o[b]);
    m[b][0] = m[b][1] = -INFINITY;
    l[b][0] = l[b][1] = 0.0f;
  }
  const float scale_log2 = scale * kLog2e;

  for (int64_t key_first = 0; key_first < tile.first + kForwardRows && key_first < time;
       key_first += kForwardKeys<D>) {
    __syncthreads();  // the previous tile is no longer read
    load_tile<D, kForwardKeys<D>>(k_tile, k_h, k_stride, key_first, time);
    load_tile<D, kForwardKeys<D>>(v_tile, v_h, v_stride, key_first, time);
    __syncthreads();
    if (key_first > first + 16 * R - 1) continue;  // every key is past this warp's rows

    float s[R][kForwardKeys<D> / 8][4];
    for (int b = 0; b < R; ++b) zero(s[b]);
    multiply_by_rows<D>(s, q_frag, k_tile);
    uint32_t p[R][kForwardKeys<D> / 16][4];
    // Unrolled (also the last loop): rolled, they index o and s at run time, which puts both in
    // local memory at head dim 128.
#pragma unroll
    for (int b = 0; b < R; ++b) {
      online_softmax<D>(s[b], o[b], m[b], l[b], first + 16 * b + g, key_first, time, scale_log2);
      as_a_fragments(p[b], s[b]);
    }
    multiply_into_rows<D>(o, p, v_tile);
  }

#pragma unroll
  for (int b = 0; b < R; ++b) {
    float inverse[2];
    for (int half = 0; half < 2; ++half) {
      l[b][half] += __shfl_xor_sync(0xffffffffu, l[b][half], 1);
      l[b][half] += __shfl_xor_sync(0xffffffffu, l[b][half], 2);
      inverse[half] = 1.0f / l[b][half];
      const int64_t row = first + 16 * b + g + 8 * half;
      if (t == 0 && row < time)
        lse[tile.head * time + row] = (m[b][half] + log2f(l[b][half])) * kLn2;
    }
    store_rows(out + shape.start(AttentionRows::out, tile.head), shape.stride(AttentionRows::out),
               o[b], first + 16 * b, time, inverse[0], inverse[1]);
  }
}

template <int D>
__global__ void flash_backward_keys_kernel(const float* q, const float* k, const float* v,
                                           const float* g, const float* lse, const float* delta,
                                           float* dk, float* dv, AttentionShape shape,
                                           float scale) {
  constexpr int R = kRowBlocks<D>;
  const int64_t time = shape.time, q_stride = shape.stride(AttentionRows::q);
  const int64_t g_stride = shape.stride(AttentionRows::out);
  const int64_t k_stride = shape.stride(AttentionRows::k),
                v_stride = shape.stride(AttentionRows::v);
  const int64_t heads = shape.heads, kv_heads = shape.kv_heads, group = shape.group();
  __shared__ __align__(16) uint16_t q_tile[kBackwardTile * kPadded<D>];
  __shared__ __align__(16) uint16_t g_tile[kBackwardTile * kPadded<D>];
  __shared__ __align__(16) float lse_tile[kBackwardTile];
  __shared__ __align__(16) float delta_tile[kBackwardTile];
  const TileOf tile = block_tile(time, kBlockRows<D>, false);  // tile.head is the kv head
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g_row = lane / 4, t = lane % 4;
  const int64_t first = tile.first + warp * 16 * R;  // this warp's first key
  const int64_t k_offset = shape.start(AttentionRows::k, tile.head);
  const int64_t v_offset = shape.start(AttentionRows::v, tile.head);
  const float scale_log2 = scale * kLog2e;

  uint32_t k_frag[R][D / 16][4], v_frag[R][D / 16][4];
  float dk_acc[R][D / 8][4], dv_acc[R][D / 8][4];
  for (int b = 0; b < R; ++b) {
    load_rows_as_a<D>(k_frag[b], k + k_offset, k_stride, first + 16 * b, time);
    load_rows_as_a<D>(v_frag[b], v + v_offset, v_stride, first + 16 * b, time);
    zero(dk_acc[b]);
    zero(dv_acc[b]);
  }

  for (int64_t member = 0; member < group; ++member) {
    const int64_t bh = (tile.head / kv_heads) * heads + (tile.head % kv_heads) * group + member;
    for (int64_t query_first = tile.first; query_first < time; query_first += kBackwardTile) {
      __syncthreads();
      load_tile<D, kBackwardTile>(q_tile, q + shape.start(AttentionRows::q, bh), q_stride,
                                  query_first, time);
      load_tile<D, kBackwardTile>(g_tile, g + shape.start(AttentionRows::out, bh), g_stride,
                                  query_first, time);
      for (int i = threadIdx.x; i < kBackwardTile; i += kFlashThreads) {
        const int64_t row = query_first + i;
        lse_tile[i] = row < time ? lse[bh * time + row] * kLog2e : 0.0f;
        delta_tile[i] = row < time ? delta[bh * time + row] : 0.0f;
      }
      __syncthreads();
      for (int sub = 0; sub < kBackwardTile; sub += 16) {
        // every query before this warp's keys, or past time
        if (query_first + sub + 15 < first || query_first + sub >= time) continue;
        const uint16_t* q_rows = q_tile + sub * kPadded<D>;
        const uint16_t* g_rows = g_tile + sub * kPadded<D>;
        float p[R][2][4], dp[R][2][4];  // p^T and dp^T: 16 keys x 16 queries a row block
        for (int b = 0; b < R; ++b) {
          zero(p[b]);
          zero(dp[b]);
        }
        multiply_by_rows<D>(p, k_frag, q_rows);
        multiply_by_rows<D>(dp, v_frag, g_rows);
        // This lane's four queries (columns sub + 8n + 2t and + 1) are the same for every key it
        // holds: their lse and delta are read from shared memory once, as pairs.
        float2 lse_of[2], delta_of[2];
        for (int n = 0; n < 2; ++n) {
          lse_of[n] = *reinterpret_cast<const float2*>(lse_tile + sub + 8 * n + 2 * t);
          delta_of[n] = *reinterpret_cast<const float2*>(delta_tile + sub + 8 * n + 2 * t);
        }
        uint32_t p_frag[R][1][4], ds_frag[R][1][4];
        for (int b = 0; b < R; ++b) {
          for (int n = 0; n < 2; ++n)
            for (int e = 0; e < 4; ++e) {
              const int column = sub + 8 * n + 2 * t + e % 2;
              const int64_t key = first + 16 * b + g_row + 8 * (e / 2),
                            query = query_first + column;
              const bool kept = key <= query && query < time && key < time;
              const float row_lse = e % 2 ? lse_of[n].y : lse_of[n].x;
              const float row_delta = e % 2 ? delta_of[n].y : delta_of[n].x;
              p[b][n][e] = kept ? exp2f(p[b][n][e] * scale_log2 - row_lse) : 0.0f;
              dp[b][n][e] = p[b][n][e] * (dp[b][n][e] - row_delta);  // ds^T
            }
          as_a_fragments(p_frag[b], p[b]);
          as_a_fragments(ds_frag[b], dp[b]);
        }
        multiply_into_rows<D>(dv_acc, p_frag, g_rows);
        multiply_into_rows<D>(dk_acc, ds_frag, q_rows);
      }
    }
  }
  for (int b = 0; b < R; ++b) {
    store_rows(dk + k_offset, k_stride, dk_acc[b], first + 16 * b, time, scale, scale);
    store_rows(dv + v_offset, v_stride, dv_acc[b], first + 16 * b, time, 1.0f, 1.0f);
  }
}

template <int D>
__global__ void flash_backward_queries_kernel(const float* q, const float* k, const float* v,
                                              const float* out, const float* g, const float* lse,
                                              float* delta, float* dq, AttentionShape shape,
                                              float scale) {
  constexpr int R = kRowBlocks<D>;
  const int64_t time = shape.time, q_stride = shape.stride(AttentionRows::q);
  const int64_t g_stride = shape.stride(AttentionRows::out);
  const int64_t k_stride = shape.stride(AttentionRows::k),
                v_stride = shape.stride(AttentionRows::v);
  __shared__ __align__(16) uint16_t k_tile[kBackwardTile * kPadded<D>];
  __shared__ __align__(16) uint16_t v_tile[kBackwardTile * kPadded<D>];
  const TileOf tile = block_tile(time, kBlockRows<D>, true);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g_row = lane / 4, t = lane % 4;
  const int64_t first = tile.first + warp * 16 * R;  // this warp's first query row
  const int64_t kv_head = shape.kv_head_of(tile.head);
  const float* k_h = k + shape.start(AttentionRows::k, kv_head);
  const float* v_h = v + shape.start(AttentionRows::v, kv_head);
  const int64_t q_offset = shape.start(AttentionRows::q, tile.head);
  const int64_t g_offset = shape.start(AttentionRows::out, tile.head);
  const float scale_log2 = scale * kLog2e;

  uint32_t q_frag[R][D / 16][4], g_frag[R][D / 16][4];
  float row_lse[R][2], row_delta[R][2], dq_acc[R][D / 8][4];
  // Unrolled: rolled, it indexes row_delta at run time, which puts the arrays in local memory.
#pragma unroll
  for (int b = 0; b < R; ++b) {
    load_rows_as_a<D>(q_frag[b], q + q_offset, q_stride, first + 16 * b, time);
    // delta = g . o of this warp's rows, for this kernel and (written) for the keys kernel
    load_rows_as_a<D>(g_frag[b], g + g_offset, g_stride, first + 16 * b, time, out + g_offset,
                      row_delta[b]);
    for (int half = 0; half < 2; ++half) {
      const int64_t row = first + 16 * b + g_row + 8 * half;
      row_lse[b][half] = row < time ? lse[tile.head * time + row] * kLog2e : 0.0f;
      if (t == 0 && row < time) delta[tile.head * time + row] = row_delta[b][half];
    }
    zero(dq_acc[b]);
  }

  for (int64_t key_first = 0; key_first < tile.first + kBlockRows<D> && key_first < time;
       key_first += kBackwardTile) {
    __syncthreads();
    load_tile<D, kBackwardTile>(k_tile, k_h, k_stride, key_first, time);
    load_tile<D, kBackwardTile>(v_tile, v_h, v_stride, key_first, time);
    __syncthreads();
    for (int sub = 0; sub < kBackwardTile; sub += 16) {
      // every key past this warp's rows, or past time
      if (key_first + sub > first + 16 * R - 1 || key_first + sub >= time) break;
      const uint16_t* k_rows = k_tile + sub * kPadded<D>;
      float p[R][2][4], dp[R][2][4];  // 16 queries x 16 keys a row block
      for (int b = 0; b < R; ++b) {
        zero(p[b]);
        zero(dp[b]);
      }
      multiply_by_rows<D>(p, q_frag, k_rows);
      multiply_by_rows<D>(dp, g_frag, v_tile + sub * kPadded<D>);
      uint32_t ds_frag[R][1][4];
      for (int b = 0; b < R; ++b) {
        for (int n = 0; n < 2; ++n)
          for (int e = 0; e < 4; ++e) {
            const int half = e / 2;
            const int64_t row = first + 16 * b + g_row + 8 * half,
                          key = key_first + sub + 8 * n + 2 * t + e % 2;
            const bool kept = key <= row && key < time && row < time;
            p[b][n][e] = kept ? exp2f(p[b][n][e] * scale_log2 - row_lse[b][half]) : 0.0f;
            dp[b][n][e] = p[b][n][e] * (dp[b][n][e] - row_delta[b][half]);  // ds
          }
        as_a_fragments(ds_frag[b], dp[b]);
      }
      multiply_into_rows<D>(dq_acc, ds_frag, k_rows);
    }
  }
  for (int b = 0; b < R; ++b)
    store_rows(dq + q_offset, q_stride, dq_acc[b], first + 16 * b, time, scale, scale);
}

// Launches `launch.template operator()<D>()` for the supported head dims.
template <class Launch>
void for_head_dim(int64_t head_dim, Launch&& launch) {
  switch (head_dim) {
    case 32:
      return launch.template operator()<32>();
    case 64:
      return launch.template operator()<64>();
    case 128:
      return launch.template operator()<128>();
    default:
      throw Error("flash attention supports head dims 32, 64 and 128, got " +
                  std::to_string(head_dim));
  }
}

// Blocks for `heads` heads of `time` rows, `rows` rows a block.
unsigned int flash_grid(int64_t heads, int64_t time, int64_t rows) {
  return static_cast<unsigned int>(heads * ((time + rows - 1) / rows));
}

void flash_attention(const float* q, const float* k, const float* v, float* out, float* lse,
                     AttentionShape shape, float scale) {
  const int64_t query_heads = shape.batch * shape.heads;
  if (query_heads * shape.time == 0) return;
  for_head_dim(shape.head_dim, [&]<int D>() {
    REX_LAUNCH(flash_forward_kernel<D>, flash_grid(query_heads, shape.time, kForwardRows),
               kFlashThreads, 0, q, k, v, out, lse, shape, scale);
  });
}

void flash_attention_backward(const float* q, const float* k, const float* v, const float* out,
                              const float* lse, const float* g, float* dq, float* dk, float* dv,
                              AttentionShape shape, float scale) {
  const int64_t query_heads = shape.batch * shape.heads, rows = query_heads * shape.time;
  if (rows == 0) return;
  const Scratch delta(static_cast<size_t>(rows) * sizeof(float));  // the queries kernel's
  for_head_dim(shape.head_dim, [&]<int D>() {
    REX_LAUNCH(flash_backward_queries_kernel<D>, flash_grid(query_heads, shape.time, kBlockRows<D>),
               kFlashThreads, 0, q, k, v, out, g, lse, delta.as<float>(), dq, shape, scale);
    REX_LAUNCH(flash_backward_keys_kernel<D>,
               flash_grid(shape.batch * shape.kv_heads, shape.time, kBlockRows<D>), kFlashThreads,
               0, q, k, v, g, lse, delta.as<float>(), dk, dv, shape, scale);
  });
}

}  // namespace

void register_flash_attention(rex::detail::CudaBackend& table) {
  table.flash_attention = flash_attention;
  table.flash_attention_backward = flash_attention_backward;
}

}  // namespace rex::cuda::detail
