// Grouped expert products: every expert of a MoE table multiplied with its segment of the
// expert-sorted rows in one launch, the segments read from device memory. They replace the
// per-expert cuBLAS calls of grouped_swiglu when products run in bf16 (on tensor cores) or fp32
// (on CUDA cores: the *_fp32_kernel forms); tf32 keeps cuBLAS's tensor cores.
//
// Two forms (the arguments: GroupedRows and GroupedWeights in rex/backend/cuda/backend.hpp):
// - rows: for each expert e, rows [o_e, o_e+1) of c = those rows of a times w[e] (or w[e]^T). A
//   block takes a 128-row tile of one segment and 128 columns; the tiles of all segments are
//   numbered in order, and the block's first warp finds its segment from the offsets. The grid
//   covers ceil(rows / 128) + experts tiles, at least every segment's; the blocks past the last
//   tile return. Two pairs of operands either split the columns (gate and up: x read by one
//   launch, each half of the grid writing its own output) or add into one output (dx =
//   dg gate + du up: the k loop runs over both pairs). With swiglu_out, a block makes both pairs'
//   products of its tile, one after the other, and writes their SwiGLU too (the activation
//   without a pass of its own). With swiglu_backward, the tile of d act is not stored: SwiGLU's
//   backward is made from it (d gate and d up, from the forward's gate and up).
// - weights: for each expert e, c[e] = a_e^T b_e over the segment's rows: a block per 128 x 128
//   tile of c[e], its k loop over the segment's rows. Two pairs share b (d gate = dg^T x and
//   d up = du^T x). A null c[e] (an expert without a gradient) is skipped; an expert whose
//   segment is empty gets zeros (when the host never read the offsets, it gives every expert an
//   output, and the gradient's gate says whether it is real: rex/autograd/graph.hpp). With
//   accumulate, the tile is added to c[e] (an expert table's gradient, which the layers sharing
//   the table add to in turn), and an empty segment's blocks return at once.
// Every operand is an fp32 matrix in memory, converted to bf16 (round to nearest even) on its way
// into shared memory in bf16, kept as it is in fp32; tiles are stored with k contiguous (rows
// padded by 8 bf16 or 4 floats, so that the 8 rows an ldmatrix or a float4 request reads fall in
// distinct banks). Loads are coalesced along whichever of the tile's axes is contiguous in memory:
// pairs of k (a float2) when k is, pairs of rows two k apart otherwise. A block of 8 warps
// computes a 128 x 128 tile, a warp 32 x 64 of it: with mma.m16n8k16 (kernels/mma.cuh) in bf16,
// and in fp32 with fused multiply-adds into the same accumulator layout (a lane's 4 rows and 16
// columns, read as float4 along k); every output element sums its k in a fixed order
// (deterministic, no atomics). Out-of-range rows, columns and k are zeros in shared memory and
// are never stored. Each k tile of 32 moves 32 KB of fp32 operands for 1 MFLOP (32 FLOPs a
// byte): tiles of 128 where 64 would halve that; operands kept in bf16 would double it.

#include <initializer_list>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "mma.cuh"

namespace rex::cuda::detail {
namespace {

using rex::detail::GroupedRows;
using rex::detail::GroupedSegments;
using rex::detail::GroupedWeights;
using rex::detail::SwigluBackward;

constexpr int kTile = 128;  // rows and columns of a block's output tile
constexpr int kDepth = 32;  // k of a tile held in shared memory

// The products' arithmetic: bf16 on tensor cores, or fp32 on CUDA cores.
enum class Math { bf16, fp32 };
template <Math M>
using Element = std::conditional_t<M == Math::bf16, uint16_t, float>;  // of a shared tile
template <Math M>
constexpr int kPadded = kDepth + (M == Math::bf16 ? 8 : 4);  // a tile's row stride
constexpr int kGroupedThreads = 256;  // 8 warps, each 32 rows x 64 columns of the tile
constexpr int kMaxExperts = 16384;    // the weights form launches experts x pairs blocks along z

// rows x kDepth of an fp32 matrix into a shared tile [kTile][kPadded] (k contiguous), with
// element (r, kk) at src[r * ld + kk] (k_contiguous) or src[kk * ld + r]; zeros where r >= rows
// or kk >= depth (rows, depth >= 1). Every lane loads every time, from an index clamped into the
// valid range, so that the lanes of a warp issue the same loads (the counts the cost formulas
// write down do not depend on which lanes are in range).
template <Math M, bool KContiguous>
__device__ __forceinline__ void load_tile(Element<M>* tile, const float* src, int64_t ld, int rows,
                                          int depth) {
  for (int i = threadIdx.x; i < kTile * kDepth / 2; i += kGroupedThreads) {
    int r, kk;
    if constexpr (KContiguous) {
      r = i / (kDepth / 2), kk = 2 * (i % (kDepth / 2));
    } else {
      r = i % kTile, kk = 2 * (i / kTile);
    }
    const int rc = r < rows ? r : rows - 1;
    float2 x;
    if constexpr (KContiguous) {  // depth is even here (k is)
      x = *reinterpret_cast<const float2*>(src + rc * ld + (kk < depth ? kk : depth - 2));
      if (kk >= depth) x = make_float2(0.0f, 0.0f);
    } else {
      x.x = src[(kk < depth ? kk : depth - 1) * ld + rc];
      x.y = src[(kk + 1 < depth ? kk + 1 : depth - 1) * ld + rc];
      if (kk >= depth) x.x = 0.0f;
      if (kk + 1 >= depth) x.y = 0.0f;
    }
    if (r >= rows) x = make_float2(0.0f, 0.0f);
    if constexpr (M == Math::bf16) {
      *reinterpret_cast<uint32_t*>(tile + r * kPadded<M> + kk) = pack_bf16x2(x.x, x.y);
    } else {
      *reinterpret_cast<float2*>(tile + r * kPadded<M> + kk) = x;
    }
  }
}

// acc (a warp's 32 x 64: 2 row blocks of 16 x 8 column blocks of 8) += the warp's rows of the a
// tile times its columns of the b tile (both [kTile][kPadded], k contiguous), over kDepth.
__device__ __forceinline__ void multiply_tiles(float (&acc)[2][8][4], const uint16_t* a,
                                               const uint16_t* b) {
  constexpr int kStride = kPadded<Math::bf16>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row0 = 32 * (warp / 2), col0 = 64 * (warp % 2);
  for (int s = 0; s < kDepth / 16; ++s) {
    uint32_t fa[2][4];
    for (int i = 0; i < 2; ++i)  // matrices: rows 0-7 / 8-15 of k 0-7, then of k 8-15
      load_matrices<4>(fa[i], a + (row0 + 16 * i + lane % 16) * kStride + 16 * s + (lane / 16) * 8);
    for (int j = 0; j < 8; j += 2) {
      // matrices: (columns 8j.., k 16s..), (8j.., 16s+8..), (8j+8.., 16s..), (8j+8.., 16s+8..)
      const int matrix = lane / 8;
      uint32_t fb[4];
      load_matrices<4>(fb, b + (col0 + 8 * j + (matrix / 2) * 8 + lane % 8) * kStride + 16 * s +
                               (matrix % 2) * 8);
      const uint32_t first[2] = {fb[0], fb[1]}, second[2] = {fb[2], fb[3]};
      for (int i = 0; i < 2; ++i) {
        mma_bf16_16x8x16(acc[i][j], fa[i], first);
        mma_bf16_16x8x16(acc[i][j + 1], fa[i], second);
      }
    }
  }
}

// The same on CUDA cores in fp32, into the same accumulator layout: lane (g, t) holds rows
// row0 + 16i + g (+ 8) and columns col0 + 8j + 2t (+ 1). Per 4 k, its 4 rows and 16 columns are
// read as float4 along k (a request reads 8 distinct rows or 4 distinct columns, 36 words apart:
// one wavefront), then one fused multiply-add per output and k, k in increasing order.
__device__ __forceinline__ void multiply_tiles(float (&acc)[2][8][4], const float* a,
                                               const float* b) {
  constexpr int kStride = kPadded<Math::fp32>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int row0 = 32 * (warp / 2), col0 = 64 * (warp % 2);
  for (int k4 = 0; k4 < kDepth; k4 += 4) {
    float4 rows[2][2], cols[8][2];
    for (int i = 0; i < 2; ++i)
      for (int half = 0; half < 2; ++half)
        rows[i][half] =
            *reinterpret_cast<const float4*>(a + (row0 + 16 * i + g + 8 * half) * kStride + k4);
    for (int j = 0; j < 8; ++j)
      for (int c = 0; c < 2; ++c)
        cols[j][c] =
            *reinterpret_cast<const float4*>(b + (col0 + 8 * j + 2 * t + c) * kStride + k4);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 8; ++j)
        for (int e = 0; e < 4; ++e) {
          const float4 x = rows[i][e / 2], y = cols[j][e % 2];
          float sum = acc[i][j][e];
          sum = fmaf(x.x, y.x, sum);
          sum = fmaf(x.y, y.y, sum);
          sum = fmaf(x.z, y.z, sum);
          sum = fmaf(x.w, y.w, sum);
          acc[i][j][e] = sum;
        }
  }
}

// Calls at(row, col, pair of acc) for each pair of the warp's accumulators in range (rows < rows,
// columns < cols; acc's layout: lane (g, t) holds rows 16i + g (+ 8) and columns 8j + 2t (+ 1) of
// the warp's 32 x 64), in a fixed order; pair is acc[i][j][2 half .. 2 half + 1].
template <class At>
__device__ __forceinline__ void for_each_pair(int rows, int cols, At at) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 2; ++i)
    for (int half = 0; half < 2; ++half) {
      const int row = 32 * (warp / 2) + 16 * i + g + 8 * half;
      if (row >= rows) continue;
      for (int j = 0; j < 8; ++j) {
        const int col = 64 * (warp % 2) + 8 * j + 2 * t;
        if (col < cols) at(row, col, i, j, 2 * half);
      }
    }
}

// The warp's part of a tile written to c (row-major, ld columns) from (row0, col0) of the tile,
// skipping rows >= rows and columns >= cols.
__device__ __forceinline__ void store_tile(float* c, int64_t ld, const float (&acc)[2][8][4],
                                           int rows, int cols) {
  for_each_pair(rows, cols, [&](int row, int col, int i, int j, int e) {
    *reinterpret_cast<float2*>(c + row * ld + col) = make_float2(acc[i][j][e], acc[i][j][e + 1]);
  });
}

// store_tile's elements added to c's instead.
__device__ __forceinline__ void add_tile(float* c, int64_t ld, const float (&acc)[2][8][4],
                                         int rows, int cols) {
  for_each_pair(rows, cols, [&](int row, int col, int i, int j, int e) {
    float2* at = reinterpret_cast<float2*>(c + row * ld + col);
    const float2 before = *at;
    *at = make_float2(__fadd_rn(before.x, acc[i][j][e]), __fadd_rn(before.y, acc[i][j][e + 1]));
  });
}

// The segment of the expert-sorted rows that a rows-form block takes: tile `index` of all the
// segments' tiles in order (expert -1: past the last tile).
struct RowTile {
  int64_t expert, first;
  int rows;
};

// Warp 0 finds it: 32 experts at a time, each lane one expert's tiles, an inclusive scan over the
// lanes, and the lane whose tiles hold `index` (at most one, over all the chunks) writes it.
__device__ __forceinline__ void find_row_tile(RowTile& tile, const int64_t* offsets,
                                              int64_t experts, int64_t index) {
  const unsigned int lane = threadIdx.x % 32;
  int64_t before = 0, expert = -1, first = 0;  // tiles of the chunks before; the lane's find
  int rows = 0;
  for (int64_t base = 0; base < experts; base += 32) {
    const int64_t e = base + lane;
    int64_t begin = 0, count = 0, tiles = 0;
    if (e < experts) {
      begin = offsets[e];
      count = offsets[e + 1] - begin;
      tiles = (count + kTile - 1) / kTile;
    }
    int64_t inclusive = tiles;
    for (int step = 1; step < 32; step *= 2) {
      const int64_t below = __shfl_up_sync(0xffffffffu, inclusive, step);
      if (lane >= static_cast<unsigned int>(step)) inclusive += below;
    }
    const int64_t start = before + inclusive - tiles;
    if (index >= start && index < start + tiles) {
      expert = e;
      first = begin + (index - start) * kTile;
      rows = static_cast<int>(
          count - (index - start) * kTile < kTile ? count - (index - start) * kTile : kTile);
    }
    before += __shfl_sync(0xffffffffu, inclusive, 31);
  }
  const unsigned int found = __ballot_sync(0xffffffffu, expert >= 0);
  if (found == 0 ? lane == 0
                 : lane == static_cast<unsigned int>(__ffs(static_cast<int>(found)) - 1))
    tile = {expert, first, rows};
}

// acc += `rows` rows from `first` of operand's a times columns [col0, + cols) of the operand's w
// of `expert`, k in tiles of kDepth through the block's shared tiles. (The tile's fields come as
// values: a RowTile in memory would be copied whole, padding included, from shared memory.)
template <Math M>
__device__ __forceinline__ void accumulate_rows(float (&acc)[2][8][4], Element<M>* a_tile,
                                                Element<M>* b_tile, const GroupedRows& p,
                                                const float* const* weights, int64_t experts,
                                                int64_t expert, int64_t first, int rows,
                                                int operand, int64_t col0, int cols) {
  const float* a = p.a[operand] + first * p.k;
  const float* w = weights[operand * experts + expert];
  for (int64_t k0 = 0; k0 < p.k; k0 += kDepth) {
    const int depth = static_cast<int>(p.k - k0 < kDepth ? p.k - k0 : kDepth);
    load_tile<M, true>(a_tile, a + k0, p.k, rows, depth);
    if (p.transpose_w) {  // w [n, k]: row n of w is column n of the product
      load_tile<M, true>(b_tile, w + col0 * p.k + k0, p.k, cols, depth);
    } else {  // w [k, n]
      load_tile<M, false>(b_tile, w + k0 * p.n + col0, p.n, cols, depth);
    }
    __syncthreads();
    multiply_tiles(acc, a_tile, b_tile);
    __syncthreads();
  }
}

// The warp's part of swiglu(gate, up) (pointwise.hpp's swiglu_value, as swiglu_kernel) written
// as store_tile writes a tile, computed for the elements in range only.
__device__ __forceinline__ void store_swiglu_tile(float* y, int64_t ld,
                                                  const float (&gate)[2][8][4],
                                                  const float (&up)[2][8][4], int rows, int cols) {
  for_each_pair(rows, cols, [&](int row, int col, int i, int j, int e) {
    *reinterpret_cast<float2*>(y + row * ld + col) =
        make_float2(rex::detail::swiglu_value(gate[i][j][e], up[i][j][e]),
                    rex::detail::swiglu_value(gate[i][j][e + 1], up[i][j][e + 1]));
  });
}

// The warp's part of SwiGLU's backward from d act (the tile's product): gate and up read, d_gate
// and d_up written, where store_tile would write the tile, as swiglu_backward_kernel computes them.
__device__ __forceinline__ void store_swiglu_backward_tile(const SwigluBackward& s, int64_t at,
                                                           int64_t ld,
                                                           const float (&d_act)[2][8][4], int rows,
                                                           int cols) {
  for_each_pair(rows, cols, [&](int row, int col, int i, int j, int e) {
    const int64_t where = at + row * ld + col;
    const float2 a = *reinterpret_cast<const float2*>(s.gate + where);
    const float2 b = *reinterpret_cast<const float2*>(s.up + where);
    const float g0 = d_act[i][j][e], g1 = d_act[i][j][e + 1];
    const float s0 = rex::detail::sigmoid_of(a.x), s1 = rex::detail::sigmoid_of(a.y);
    *reinterpret_cast<float2*>(s.d_gate + where) = make_float2(
        rex::detail::swiglu_grad_a(g0, a.x, b.x, s0), rex::detail::swiglu_grad_a(g1, a.y, b.y, s1));
    *reinterpret_cast<float2*>(s.d_up + where) = make_float2(
        rex::detail::swiglu_grad_b(g0, a.x, s0), rex::detail::swiglu_grad_b(g1, a.y, s1));
  });
}

template <Math M>
__device__ __forceinline__ void grouped_rows_body(const int64_t* offsets, int64_t experts,
                                                  const GroupedRows& p,
                                                  const float* const* weights) {
  __shared__ __align__(16) Element<M> a_tile[kTile * kPadded<M>];
  __shared__ __align__(16) Element<M> b_tile[kTile * kPadded<M>];
  __shared__ RowTile tile;
  if (threadIdx.x < 32) find_row_tile(tile, offsets, experts, blockIdx.x);
  __syncthreads();
  const RowTile mine = tile;  // in registers: shared memory would be reread after each barrier
  if (mine.expert < 0) return;
  const int64_t column_tiles = (p.n + kTile - 1) / kTile;
  const bool one_output = p.sum_pairs || p.swiglu_out != nullptr;
  const int pair = one_output ? 0 : static_cast<int>(blockIdx.y / column_tiles);
  const int64_t col0 = (blockIdx.y % column_tiles) * kTile;
  const int cols = static_cast<int>(p.n - col0 < kTile ? p.n - col0 : kTile);
  const int64_t at = mine.first * p.n + col0;
  float acc[2][8][4] = {};
  const int last_operand = p.sum_pairs ? p.pairs - 1 : pair;
  for (int operand = pair; operand <= last_operand; ++operand)
    accumulate_rows<M>(acc, a_tile, b_tile, p, weights, experts, mine.expert, mine.first, mine.rows,
                       operand, col0, cols);
  if (p.swiglu_backward.gate != nullptr) {
    store_swiglu_backward_tile(p.swiglu_backward, at, p.n, acc, mine.rows, cols);
    return;
  }
  store_tile(p.c[pair] + at, p.n, acc, mine.rows, cols);
  if (p.swiglu_out == nullptr) return;
  float up[2][8][4] = {};  // the second pair's product of the same tile, then the activation
  accumulate_rows<M>(up, a_tile, b_tile, p, weights, experts, mine.expert, mine.first, mine.rows, 1,
                     col0, cols);
  store_tile(p.c[1] + at, p.n, up, mine.rows, cols);
  store_swiglu_tile(p.swiglu_out + at, p.n, acc, up, mine.rows, cols);
}

__global__ void grouped_rows_kernel(const int64_t* offsets, int64_t experts, GroupedRows p,
                                    const float* const* weights) {
  grouped_rows_body<Math::bf16>(offsets, experts, p, weights);
}

__global__ void grouped_rows_fp32_kernel(const int64_t* offsets, int64_t experts, GroupedRows p,
                                         const float* const* weights) {
  grouped_rows_body<Math::fp32>(offsets, experts, p, weights);
}

template <Math M>
__device__ __forceinline__ void grouped_weights_body(const int64_t* offsets, int64_t experts,
                                                     const GroupedWeights& p,
                                                     float* const* outputs) {
  __shared__ __align__(16) Element<M> a_tile[kTile * kPadded<M>];
  __shared__ __align__(16) Element<M> b_tile[kTile * kPadded<M>];
  const int64_t expert = blockIdx.z % experts, pair = blockIdx.z / experts;
  float* c = outputs[pair * experts + expert];
  if (c == nullptr) return;
  const int64_t first = offsets[expert], rows = offsets[expert + 1] - first;
  if (rows == 0 && p.accumulate) return;
  const int64_t row0 = blockIdx.x * static_cast<int64_t>(kTile);
  const int64_t col0 = blockIdx.y * static_cast<int64_t>(kTile);
  const int tile_rows = static_cast<int>(p.m - row0 < kTile ? p.m - row0 : kTile);
  const int cols = static_cast<int>(p.n - col0 < kTile ? p.n - col0 : kTile);
  const float* a = p.a[pair] + first * p.m + row0;
  const float* b = p.b + first * p.n + col0;
  float acc[2][8][4] = {};
  for (int64_t k0 = 0; k0 < rows; k0 += kDepth) {  // k: the segment's rows
    const int depth = static_cast<int>(rows - k0 < kDepth ? rows - k0 : kDepth);
    load_tile<M, false>(a_tile, a + k0 * p.m, p.m, tile_rows, depth);
    load_tile<M, false>(b_tile, b + k0 * p.n, p.n, cols, depth);
    __syncthreads();
    multiply_tiles(acc, a_tile, b_tile);
    __syncthreads();
  }
  (p.accumulate ? add_tile : store_tile)(c + row0 * p.n + col0, p.n, acc, tile_rows, cols);
}

__global__ void grouped_weights_kernel(const int64_t* offsets, int64_t experts, GroupedWeights p,
                                       float* const* outputs) {
  grouped_weights_body<Math::bf16>(offsets, experts, p, outputs);
}

__global__ void grouped_weights_fp32_kernel(const int64_t* offsets, int64_t experts,
                                            GroupedWeights p, float* const* outputs) {
  grouped_weights_body<Math::fp32>(offsets, experts, p, outputs);
}

// For each of `pairs` pairs the experts' pointers, uploaded (no host wait), after the offsets when
// they are on the host; offsets() points at the device's offsets, or at the uploaded ones. Checks
// what both forms require: 1 or 2 pairs, 1 to kMaxExperts experts, one kind of offsets, and even
// widths (rows are read two floats at a time).
class SegmentTable {
 public:
  template <class T>
  SegmentTable(const GroupedSegments& segments, int pairs, T* const* const (&host_pointers)[2],
               std::initializer_list<int64_t> widths)
      : buffer_(static_cast<size_t>(uploaded_offsets(segments) + pairs * segments.experts) * 8),
        pointers_at_(uploaded_offsets(segments)),
        offsets_(segments.device_offsets) {
    const int64_t experts = segments.experts;
    REX_CHECK(pairs == 1 || pairs == 2, "grouped products: 1 or 2 pairs, got ", pairs);
    REX_CHECK(experts >= 1 && experts <= kMaxExperts, "grouped products: ", experts,
              " experts; 1 to ", kMaxExperts, " are supported");
    REX_CHECK((segments.device_offsets == nullptr) != (segments.host_offsets == nullptr),
              "grouped products: the offsets must be on the device or on the host");
    for (const int64_t width : widths)
      REX_CHECK(width % 2 == 0, "grouped products: width ", width,
                " must be even (rows are read two floats at a time)");
    std::vector<int64_t> staged;
    if (segments.host_offsets != nullptr)
      staged.assign(segments.host_offsets, segments.host_offsets + experts + 1);
    for (int pair = 0; pair < pairs; ++pair)
      for (int64_t e = 0; e < experts; ++e)
        staged.push_back(reinterpret_cast<int64_t>(host_pointers[pair][e]));
    upload(buffer_.as<void>(), staged.data(), staged.size() * 8);
    if (offsets_ == nullptr) offsets_ = buffer_.as<int64_t>();
  }
  const int64_t* offsets() const { return offsets_; }
  template <class T>
  T* const* pointers() const {
    return reinterpret_cast<T* const*>(buffer_.as<int64_t>() + pointers_at_);
  }

 private:
  static int64_t uploaded_offsets(const GroupedSegments& segments) {
    return segments.host_offsets != nullptr ? segments.experts + 1 : 0;
  }
  Scratch buffer_;
  int64_t pointers_at_;
  const int64_t* offsets_;
};

void grouped_rows(const GroupedSegments& segments, const GroupedRows& p) {
  if (segments.rows == 0 || p.n == 0) return;
  const SegmentTable table(segments, p.pairs, p.host_w, {p.n, p.k});
  const int64_t column_tiles = (p.n + kTile - 1) / kTile;
  REX_CHECK(p.swiglu_out == nullptr || (p.pairs == 2 && !p.sum_pairs),
            "grouped products: swiglu_out needs two pairs of separate outputs");
  REX_CHECK(p.swiglu_backward.gate == nullptr || p.pairs == 1,
            "grouped products: swiglu_backward needs one pair");
  const bool one_output = p.sum_pairs || p.swiglu_out != nullptr;
  const dim3 grid(static_cast<unsigned int>((segments.rows + kTile - 1) / kTile + segments.experts),
                  static_cast<unsigned int>(column_tiles * (one_output ? 1 : p.pairs)));
  if (p.fp32) {
    REX_LAUNCH(grouped_rows_fp32_kernel, grid, kGroupedThreads, 0, table.offsets(),
               segments.experts, p, table.pointers<const float>());
  } else {
    REX_LAUNCH(grouped_rows_kernel, grid, kGroupedThreads, 0, table.offsets(), segments.experts, p,
               table.pointers<const float>());
  }
}

void grouped_weights(const GroupedSegments& segments, const GroupedWeights& p) {
  const SegmentTable table(segments, p.pairs, p.host_c, {p.m, p.n});
  const dim3 grid(static_cast<unsigned int>((p.m + kTile - 1) / kTile),
                  static_cast<unsigned int>((p.n + kTile - 1) / kTile),
                  static_cast<unsigned int>(segments.experts * p.pairs));
  if (p.fp32) {
    REX_LAUNCH(grouped_weights_fp32_kernel, grid, kGroupedThreads, 0, table.offsets(),
               segments.experts, p, table.pointers<float>());
  } else {
    REX_LAUNCH(grouped_weights_kernel, grid, kGroupedThreads, 0, table.offsets(), segments.experts,
               p, table.pointers<float>());
  }
}

}  // namespace

void register_grouped_gemm(rex::detail::CudaBackend& table) {
  table.grouped_rows = grouped_rows;
  table.grouped_weights = grouped_weights;
}

}  // namespace rex::cuda::detail
