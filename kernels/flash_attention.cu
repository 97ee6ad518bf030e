// Flash attention on bf16 tensor cores: the same causal grouped-query attention as attention.cu
// (same layouts, same lse), computed tile by tile so that the T x T scores never reach memory.
//
// Precision: q, k, v, the output gradient g and the probabilities p (and ds in the backward) enter
// the tensor cores rounded to bf16; every product accumulates in fp32; the softmax statistics
// (running max, sum, lse, delta) and the outputs are fp32. Inputs and outputs are fp32 tensors.
//
// Tiles: a block of 4 warps takes 64 rows of one head, a warp 16 of them; the other side streams
// through shared memory in tiles of 64 rows, converted to bf16 on the way in (rows padded by 8
// elements, so that the 8 rows an ldmatrix reads fall in distinct banks). Products are
// mma.m16n8k16 (kernels/mma.cuh). An accumulator's layout is the layout of an A operand (row g,
// columns 2t, 2t+1 and the same 8 rows and columns further on), so scores turn into probabilities
// in registers and feed the next product without a trip through shared memory.
// - forward, a block per (query tile, query head): q's fragments stay in registers; for each key
//   tile up to the diagonal, s = q k^T, the online softmax (running max m and sum l per row, the
//   output rescaled by exp(m_old - m_new)), o += p v. Then o / l and lse = m + log l.
// - delta_i = g_i . o_i (one warp per row, fp32), needed by both backward kernels.
// - backward keys, a block per (key tile, kv head): the warp's k and v rows stay in registers; for
//   every query head of the group in order, and every query tile from the diagonal on, 16 queries
//   at a time: p^T = exp(k q^T scale - lse), dv += p^T g, dp^T = v g^T, ds^T = p^T (dp^T - delta),
//   dk += ds^T q. Each block owns its rows of dk and dv: no atomics, a fixed order.
// - backward queries, a block per (query tile, query head): q and g stay in registers; for each
//   key tile up to the diagonal, 16 keys at a time: p = exp(q k^T scale - lse), dp = g v^T,
//   ds = p (dp - delta), dq += ds k. Recomputing p here instead of adding dq across key tiles
//   costs two products more than one fused kernel, and keeps every sum in a fixed order.
// Fully masked tiles are never visited; within the diagonal tile the mask is applied per element.
// Register use per thread at head dim 128 (what the GPU must hold; the emulation does not limit
// it): forward 32 (q) + 32 (s) + 64 (o); keys 32 (k) + 32 (v) + 64 (dk) + 64 (dv) + 16; queries
// 32 (q) + 32 (g) + 64 (dq) + 16.
#include <cmath>

#include "common.cuh"
#include "mma.cuh"

namespace rex::cuda::detail {
namespace {

constexpr int kTileRows = 64;       // rows of a block's own tile and of a streamed tile
constexpr int kWarpRows = 16;       // rows a warp owns
constexpr int kFlashThreads = 128;  // 4 warps
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Row stride of a bf16 tile in shared memory, in 16-bit elements.
template <int D>
constexpr int kPadded = D + 8;

// Where one block works: head `head` (of B * heads) and the tile of rows starting at `first`. The
// blocks are numbered so that, within a head, the tiles with most work come first.
struct TileOf {
  int64_t head, first;
};
__device__ inline TileOf block_tile(int64_t tiles, bool last_first) {
  const int64_t index = blockIdx.x;
  const int64_t tile = index % tiles;
  return {index / tiles, (last_first ? tiles - 1 - tile : tile) * kTileRows};
}

// rows [first, first + 64) of a [time, D] fp32 matrix into a bf16 shared tile (zeros past time).
template <int D>
__device__ void load_tile(uint16_t* tile, const float* matrix, int64_t first, int64_t time) {
  constexpr int kQuads = D / 4;
  for (int i = threadIdx.x; i < kTileRows * kQuads; i += kFlashThreads) {
    const int row = i / kQuads, column = (i % kQuads) * 4;
    float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (first + row < time)
      x = *reinterpret_cast<const float4*>(matrix + (first + row) * D + column);
    *reinterpret_cast<uint2*>(tile + row * kPadded<D> + column) =
        make_uint2(pack_bf16x2(x.x, x.y), pack_bf16x2(x.z, x.w));
  }
}

// The A fragments (16 rows x D, bf16) of rows [first, first + 16) of a [time, D] fp32 matrix,
// straight from global memory into registers (zeros past time): frag[s] covers columns 16s..16s+15.
template <int D>
__device__ void load_rows_as_a(uint32_t (&frag)[D / 16][4], const float* matrix, int64_t first,
                               int64_t time) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t top = first + g, bottom = first + g + 8;
  for (int s = 0; s < D / 16; ++s) {
    const int column = 16 * s + 2 * t;
    float2 x[4] = {};
    if (top < time) {
      x[0] = *reinterpret_cast<const float2*>(matrix + top * D + column);
      x[2] = *reinterpret_cast<const float2*>(matrix + top * D + column + 8);
    }
    if (bottom < time) {
      x[1] = *reinterpret_cast<const float2*>(matrix + bottom * D + column);
      x[3] = *reinterpret_cast<const float2*>(matrix + bottom * D + column + 8);
    }
    for (int r = 0; r < 4; ++r) frag[s][r] = pack_bf16x2(x[r].x, x[r].y);
  }
}

// acc[n] (16 x 8 each) += A (16 x D, registers) times B^T, where B is `8 * N` rows x D of a shared
// tile starting at `rows` (row-major, padded): the product of a warp's rows with those tile rows.
template <int D, int N>
__device__ void multiply_by_rows(float (&acc)[N][4], const uint32_t (&a)[D / 16][4],
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
      mma_bf16_16x8x16(acc[n], a[s], first);
      mma_bf16_16x8x16(acc[n + 1], a[s], second);
    }
}

// acc[n] (16 x 8, n over D / 8) += P (16 x 16 * K, as K A fragments) times the K * 16 rows of a
// shared tile starting at `rows`: the product of probabilities (or score gradients) with tile rows.
template <int D, int K>
__device__ void multiply_into_rows(float (&acc)[D / 8][4], const uint32_t (&p)[K][4],
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
      mma_bf16_16x8x16(acc[n], p[s], first);
      mma_bf16_16x8x16(acc[n + 1], p[s], second);
    }
}

// Accumulators of 16 x (8 * N) as N / 2 A fragments (bf16): the layout carries over unchanged.
template <int N>
__device__ void as_a_fragments(uint32_t (&frag)[N / 2][4], const float (&acc)[N][4]) {
  for (int s = 0; s < N / 2; ++s) {
    frag[s][0] = pack_bf16x2(acc[2 * s][0], acc[2 * s][1]);
    frag[s][1] = pack_bf16x2(acc[2 * s][2], acc[2 * s][3]);
    frag[s][2] = pack_bf16x2(acc[2 * s + 1][0], acc[2 * s + 1][1]);
    frag[s][3] = pack_bf16x2(acc[2 * s + 1][2], acc[2 * s + 1][3]);
  }
}

template <int N>
__device__ void zero(float (&acc)[N][4]) {
  for (int n = 0; n < N; ++n)
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
}

// Rows (g, g + 8) of 16 x (8 * N) accumulators written to a [time, 8 * N] fp32 matrix times
// scale_top / scale_bottom, rows past time skipped.
template <int N>
__device__ void store_rows(float* matrix, const float (&acc)[N][4], int64_t first, int64_t time,
                           float scale_top, float scale_bottom) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int half = 0; half < 2; ++half) {
    const int64_t row = first + g + 8 * half;
    if (row >= time) continue;
    const float scale = half == 0 ? scale_top : scale_bottom;
    for (int n = 0; n < N; ++n)
      *reinterpret_cast<float2*>(matrix + row * (8 * N) + 8 * n + 2 * t) =
          make_float2(acc[n][2 * half] * scale, acc[n][2 * half + 1] * scale);
  }
}

// The kv head (of B * kv_heads) that query head bh (of B * heads) reads.
__device__ inline int64_t kv_head_of(int64_t bh, int64_t heads, int64_t kv_heads) {
  return (bh / heads) * kv_heads + (bh % heads) / (heads / kv_heads);
}

template <int D>
__global__ void flash_forward_kernel(const float* q, const float* k, const float* v, float* out,
                                     float* lse, int64_t heads, int64_t kv_heads, int64_t time,
                                     float scale) {
  __shared__ __align__(16) uint16_t k_tile[kTileRows * kPadded<D>];
  __shared__ __align__(16) uint16_t v_tile[kTileRows * kPadded<D>];
  const int64_t tiles = (time + kTileRows - 1) / kTileRows;
  const TileOf tile = block_tile(tiles, true);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t first = tile.first + warp * kWarpRows;  // this warp's first query row
  const int64_t kv_offset = kv_head_of(tile.head, heads, kv_heads) * time * D;
  const float* q_h = q + tile.head * time * D;

  uint32_t q_frag[D / 16][4];
  load_rows_as_a<D>(q_frag, q_h, first, time);
  float o[D / 8][4];
  zero(o);
  // log2-domain statistics of rows first + g and first + g + 8; l sums this lane's columns only.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float scale_log2 = scale * kLog2e;

  for (int64_t key_first = 0; key_first <= tile.first + kTileRows - 1 && key_first < time;
       key_first += kTileRows) {
    __syncthreads();  // the previous tile is no longer read
    load_tile<D>(k_tile, k + kv_offset, key_first, time);
    load_tile<D>(v_tile, v + kv_offset, key_first, time);
    __syncthreads();

    float s[kTileRows / 8][4];
    zero(s);
    multiply_by_rows<D>(s, q_frag, k_tile);
    // scale, mask (key past the row or past time), and the new running max of each row
    float tile_max[2] = {-INFINITY, -INFINITY};
    for (int n = 0; n < kTileRows / 8; ++n)
      for (int e = 0; e < 4; ++e) {
        const int half = e / 2;
        const int64_t row = first + g + 8 * half, key = key_first + 8 * n + 2 * t + e % 2;
        s[n][e] = (key > row || key >= time) ? -INFINITY : s[n][e] * scale_log2;
        tile_max[half] = fmaxf(tile_max[half], s[n][e]);
      }
    float rescale[2];
    for (int half = 0; half < 2; ++half) {
      tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 1));
      tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 2));
      const float m_new = fmaxf(m[half], tile_max[half]);
      // a row with no key yet (only past time) keeps m = -inf; exp2 of -inf - 0 is then 0
      const float base = m_new == -INFINITY ? 0.0f : m_new;
      rescale[half] = exp2f(m[half] - base);
      m[half] = m_new;
      l[half] *= rescale[half];
      for (int n = 0; n < kTileRows / 8; ++n)
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          s[n][e] = exp2f(s[n][e] - base);
          l[half] += s[n][e];
        }
    }
    for (int n = 0; n < D / 8; ++n)
      for (int e = 0; e < 4; ++e) o[n][e] *= rescale[e / 2];
    uint32_t p[kTileRows / 16][4];
    as_a_fragments(p, s);
    multiply_into_rows<D>(o, p, v_tile);
  }

  float inverse[2];
  for (int half = 0; half < 2; ++half) {
    l[half] += __shfl_xor_sync(0xffffffffu, l[half], 1);
    l[half] += __shfl_xor_sync(0xffffffffu, l[half], 2);
    inverse[half] = 1.0f / l[half];
    const int64_t row = first + g + 8 * half;
    if (t == 0 && row < time) lse[tile.head * time + row] = (m[half] + log2f(l[half])) * kLn2;
  }
  store_rows(out + tile.head * time * D, o, first, time, inverse[0], inverse[1]);
}

// delta[row] = g[row] . out[row] over D, one warp per row (fp32, lanes over D, a shuffle tree).
__global__ void flash_delta_kernel(const float* g, const float* out, float* delta, int64_t rows,
                                   int64_t head_dim) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = thread_count() / 32;
  for (int64_t row = thread_index() / 32; row < rows; row += warps) {
    float acc = 0.0f;
    for (int64_t d = lane; d < head_dim; d += 32)
      acc += g[row * head_dim + d] * out[row * head_dim + d];
    for (int offset = 16; offset > 0; offset >>= 1)
      acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) delta[row] = acc;
  }
}

template <int D>
__global__ void flash_backward_keys_kernel(const float* q, const float* k, const float* v,
                                           const float* g, const float* lse, const float* delta,
                                           float* dk, float* dv, int64_t heads, int64_t kv_heads,
                                           int64_t time, float scale) {
  __shared__ __align__(16) uint16_t q_tile[kTileRows * kPadded<D>];
  __shared__ __align__(16) uint16_t g_tile[kTileRows * kPadded<D>];
  __shared__ float lse_tile[kTileRows], delta_tile[kTileRows];
  const int64_t tiles = (time + kTileRows - 1) / kTileRows;
  const TileOf tile = block_tile(tiles, false);  // tile.head is the kv head
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g_row = lane / 4, t = lane % 4;
  const int64_t first = tile.first + warp * kWarpRows;  // this warp's first key
  const int64_t group = heads / kv_heads;
  const float scale_log2 = scale * kLog2e;

  uint32_t k_frag[D / 16][4], v_frag[D / 16][4];
  load_rows_as_a<D>(k_frag, k + tile.head * time * D, first, time);
  load_rows_as_a<D>(v_frag, v + tile.head * time * D, first, time);
  float dk_acc[D / 8][4], dv_acc[D / 8][4];
  zero(dk_acc);
  zero(dv_acc);

  for (int64_t member = 0; member < group; ++member) {
    const int64_t bh = (tile.head / kv_heads) * heads + (tile.head % kv_heads) * group + member;
    for (int64_t query_first = tile.first; query_first < time; query_first += kTileRows) {
      __syncthreads();
      load_tile<D>(q_tile, q + bh * time * D, query_first, time);
      load_tile<D>(g_tile, g + bh * time * D, query_first, time);
      for (int i = threadIdx.x; i < kTileRows; i += kFlashThreads) {
        const int64_t row = query_first + i;
        lse_tile[i] = row < time ? lse[bh * time + row] * kLog2e : 0.0f;
        delta_tile[i] = row < time ? delta[bh * time + row] : 0.0f;
      }
      __syncthreads();
      for (int sub = 0; sub < kTileRows; sub += 16) {
        const uint16_t* q_rows = q_tile + sub * kPadded<D>;
        const uint16_t* g_rows = g_tile + sub * kPadded<D>;
        float p[2][4], dp[2][4];  // p^T and dp^T: 16 keys x 16 queries
        zero(p);
        zero(dp);
        multiply_by_rows<D>(p, k_frag, q_rows);
        multiply_by_rows<D>(dp, v_frag, g_rows);
        for (int n = 0; n < 2; ++n)
          for (int e = 0; e < 4; ++e) {
            const int column = sub + 8 * n + 2 * t + e % 2;
            const int64_t key = first + g_row + 8 * (e / 2), query = query_first + column;
            const bool kept = key <= query && query < time && key < time;
            p[n][e] = kept ? exp2f(p[n][e] * scale_log2 - lse_tile[column]) : 0.0f;
            dp[n][e] = p[n][e] * (dp[n][e] - delta_tile[column]);  // ds^T
          }
        uint32_t p_frag[1][4], ds_frag[1][4];
        as_a_fragments(p_frag, p);
        as_a_fragments(ds_frag, dp);
        multiply_into_rows<D>(dv_acc, p_frag, g_rows);
        multiply_into_rows<D>(dk_acc, ds_frag, q_rows);
      }
    }
  }
  store_rows(dk + tile.head * time * D, dk_acc, first, time, scale, scale);
  store_rows(dv + tile.head * time * D, dv_acc, first, time, 1.0f, 1.0f);
}

template <int D>
__global__ void flash_backward_queries_kernel(const float* q, const float* k, const float* v,
                                              const float* g, const float* lse, const float* delta,
                                              float* dq, int64_t heads, int64_t kv_heads,
                                              int64_t time, float scale) {
  __shared__ __align__(16) uint16_t k_tile[kTileRows * kPadded<D>];
  __shared__ __align__(16) uint16_t v_tile[kTileRows * kPadded<D>];
  const int64_t tiles = (time + kTileRows - 1) / kTileRows;
  const TileOf tile = block_tile(tiles, true);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g_row = lane / 4, t = lane % 4;
  const int64_t first = tile.first + warp * kWarpRows;  // this warp's first query row
  const int64_t kv_offset = kv_head_of(tile.head, heads, kv_heads) * time * D;
  const float scale_log2 = scale * kLog2e;

  uint32_t q_frag[D / 16][4], g_frag[D / 16][4];
  load_rows_as_a<D>(q_frag, q + tile.head * time * D, first, time);
  load_rows_as_a<D>(g_frag, g + tile.head * time * D, first, time);
  float row_lse[2], row_delta[2];
  for (int half = 0; half < 2; ++half) {
    const int64_t row = first + g_row + 8 * half;
    row_lse[half] = row < time ? lse[tile.head * time + row] * kLog2e : 0.0f;
    row_delta[half] = row < time ? delta[tile.head * time + row] : 0.0f;
  }
  float dq_acc[D / 8][4];
  zero(dq_acc);

  for (int64_t key_first = 0; key_first <= tile.first + kTileRows - 1 && key_first < time;
       key_first += kTileRows) {
    __syncthreads();
    load_tile<D>(k_tile, k + kv_offset, key_first, time);
    load_tile<D>(v_tile, v + kv_offset, key_first, time);
    __syncthreads();
    for (int sub = 0; sub < kTileRows; sub += 16) {
      const uint16_t* k_rows = k_tile + sub * kPadded<D>;
      float p[2][4], dp[2][4];  // 16 queries x 16 keys
      zero(p);
      zero(dp);
      multiply_by_rows<D>(p, q_frag, k_rows);
      multiply_by_rows<D>(dp, g_frag, v_tile + sub * kPadded<D>);
      for (int n = 0; n < 2; ++n)
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2;
          const int64_t row = first + g_row + 8 * half,
                        key = key_first + sub + 8 * n + 2 * t + e % 2;
          const bool kept = key <= row && key < time && row < time;
          p[n][e] = kept ? exp2f(p[n][e] * scale_log2 - row_lse[half]) : 0.0f;
          dp[n][e] = p[n][e] * (dp[n][e] - row_delta[half]);  // ds
        }
      uint32_t ds_frag[1][4];
      as_a_fragments(ds_frag, dp);
      multiply_into_rows<D>(dq_acc, ds_frag, k_rows);
    }
  }
  store_rows(dq + tile.head * time * D, dq_acc, first, time, scale, scale);
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

unsigned int flash_grid(int64_t heads, int64_t time) {
  return static_cast<unsigned int>(heads * ((time + kTileRows - 1) / kTileRows));
}

void flash_attention(const float* q, const float* k, const float* v, float* out, float* lse,
                     int64_t batch, int64_t heads, int64_t kv_heads, int64_t time, int64_t head_dim,
                     float scale) {
  if (batch * heads * time == 0) return;
  for_head_dim(head_dim, [&]<int D>() {
    REX_LAUNCH(flash_forward_kernel<D>, flash_grid(batch * heads, time), kFlashThreads, 0, q, k, v,
               out, lse, heads, kv_heads, time, scale);
  });
}

void flash_attention_backward(const float* q, const float* k, const float* v, const float* out,
                              const float* lse, const float* g, float* dq, float* dk, float* dv,
                              int64_t batch, int64_t heads, int64_t kv_heads, int64_t time,
                              int64_t head_dim, float scale) {
  const int64_t rows = batch * heads * time;
  if (rows == 0) return;
  const Scratch delta(static_cast<size_t>(rows) * sizeof(float));
  REX_LAUNCH(flash_delta_kernel, blocks_for(rows * 32), kThreads, 0, g, out, delta.as<float>(),
             rows, head_dim);
  for_head_dim(head_dim, [&]<int D>() {
    REX_LAUNCH(flash_backward_keys_kernel<D>, flash_grid(batch * kv_heads, time), kFlashThreads, 0,
               q, k, v, g, lse, delta.as<float>(), dk, dv, heads, kv_heads, time, scale);
    REX_LAUNCH(flash_backward_queries_kernel<D>, flash_grid(batch * heads, time), kFlashThreads, 0,
               q, k, v, g, lse, delta.as<float>(), dq, heads, kv_heads, time, scale);
  });
}

}  // namespace

void register_flash_attention(rex::detail::CudaBackend& table) {
  table.flash_attention = flash_attention;
  table.flash_attention_backward = flash_attention_backward;
}

}  // namespace rex::cuda::detail
