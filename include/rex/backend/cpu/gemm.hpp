// CPU GEMM: Eigen's product kernel run directly on rex buffers through Eigen::Map (no copies).
// Transposed operands are expressed as .transpose() on the Map, which Eigen's GEMM reads in place.
//
// Parallelism and determinism: Eigen's own parallel GEMM picks its blocking by the thread count
// and so rounds differently at 1, 2 or 3 threads; rex runs Eigen single-threaded
// (rex/backend/cpu/eigen.hpp) and splits C itself into a grid of tiles, one per thread, computed in
// parallel. Every element of a tile is then computed exactly as in the whole product, bit for bit,
// provided each tile edge falls on a whole number of Eigen's register blocks: Eigen computes the
// row-major C = A B as C^T = B^T A^T, with blocks of 48 (or 24, or 12) rows of C^T, which are
// columns of C, and of 4 or 8 columns of C^T (rows of C). Tile edges therefore fall on multiples of
// kGemmColumnUnit columns and kGemmRowUnit rows, and no tile is thinner than one unit (a tile of
// one row or column would take Eigen's matrix-vector path instead). The k sum is never split, and
// the blocking along k depends on k alone. A test compares tiled products with whole ones byte
// for byte at several grids (tests/test_matmul.cpp), and the training run at 1, 2 and 3 threads
// (tests/check_thread_count.sh).
//
// grouped_swiglu and its backward are the CPU form of a grouped GEMM (on CUDA, rex/ops/moe.hpp runs
// cuBLAS GEMMs per expert segment around one swiglu kernel): segments run in parallel, each writing
// its own rows of y and dx and its own expert's gradients, with each product whole inside.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "rex/backend/cpu/arrays.hpp"
#include "rex/backend/cpu/eigen.hpp"
#include "rex/backend/pointwise.hpp"
#include "rex/core/parallel.hpp"
#include "rex/core/precision.hpp"

namespace rex::detail {

using RowMajorMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using StridedMatrix = Eigen::Map<const RowMajorMatrix, 0, Eigen::OuterStride<>>;
using MutableStridedMatrix = Eigen::Map<RowMajorMatrix, 0, Eigen::OuterStride<>>;

inline constexpr int64_t kGemmRowUnit = 16, kGemmColumnUnit = 48;
// A product is split only into tiles of at least this many multiply-adds: each tile repacks the
// operand it shares with the tiles beside it, and a parallel region costs microseconds.
inline constexpr int64_t kGemmTileWork = int64_t{1} << 18;

// c = op(a) * op(b) (+ c when accumulate), where op(a) is [m, k] and a is stored [m, k], or [k, m]
// when transpose_a; likewise b is stored [k, n], or [n, k] when transpose_b.
struct GemmOperands {
  const float *a, *b;
  float* c;
  int64_t m, n, k;
  bool transpose_a, transpose_b, accumulate;
};

// Rows [r0, r1) and columns [c0, c1) of the product.
inline void gemm_tile(const GemmOperands& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  using Stride = Eigen::OuterStride<>;
  const int64_t rows = r1 - r0, cols = c1 - c0;
  // op(a)[r0:r1, :]: rows of a [m, k], or columns of a [k, m]; likewise op(b)[:, c0:c1].
  const StridedMatrix A = g.transpose_a ? StridedMatrix(g.a + r0, g.k, rows, Stride(g.m))
                                        : StridedMatrix(g.a + r0 * g.k, rows, g.k, Stride(g.k));
  const StridedMatrix B = g.transpose_b ? StridedMatrix(g.b + c0 * g.k, cols, g.k, Stride(g.k))
                                        : StridedMatrix(g.b + c0, g.k, cols, Stride(g.n));
  MutableStridedMatrix C(g.c + r0 * g.n + c0, rows, cols, Stride(g.n));
  if (!g.accumulate) C.setZero();  // Eigen's kernel only accumulates
  if (!g.transpose_a && !g.transpose_b) {
    C.noalias() += A * B;
  } else if (!g.transpose_a) {
    C.noalias() += A * B.transpose();
  } else if (!g.transpose_b) {
    C.noalias() += A.transpose() * B;
  } else {
    C.noalias() += A.transpose() * B.transpose();
  }
}

// The product as a grid of row_tiles x column_tiles tiles (at most one per unit of each side; a
// side of fewer than two units stays whole), computed in parallel.
inline void gemm_tiled(const GemmOperands& g, int64_t row_tiles, int64_t column_tiles) {
  const int64_t row_units = g.m / kGemmRowUnit, column_units = g.n / kGemmColumnUnit;
  row_tiles = row_units < 2 ? 1 : std::clamp<int64_t>(row_tiles, 1, row_units);
  column_tiles = column_units < 2 ? 1 : std::clamp<int64_t>(column_tiles, 1, column_units);
  // Edge i of a side split into `tiles`: i/tiles of its units; the last tile takes the rest.
  auto edge = [](int64_t i, int64_t tiles, int64_t units, int64_t unit, int64_t extent) {
    return i == tiles ? extent : i * units / tiles * unit;
  };
  const int64_t tiles = row_tiles * column_tiles;
  auto run = [&](int64_t t) {
    const int64_t r = t / column_tiles, c = t % column_tiles;
    gemm_tile(g, edge(r, row_tiles, row_units, kGemmRowUnit, g.m),
              edge(r + 1, row_tiles, row_units, kGemmRowUnit, g.m),
              edge(c, column_tiles, column_units, kGemmColumnUnit, g.n),
              edge(c + 1, column_tiles, column_units, kGemmColumnUnit, g.n));
  };
  if (tiles == 1) {  // no parallel region: even an inactive one costs a call into OpenMP
    run(0);
    return;
  }
  REX_PARALLEL_FOR(schedule(dynamic))
  for (int64_t t = 0; t < tiles; ++t) run(t);
}

// The `count` values at x rounded to `precision` (rex/core/precision.hpp), into `out`: a buffer of
// the calling thread's, grown as needed and reused from product to product (an Eigen array, whose
// alignment is the same in every run; see rex/backend/cpu/arrays.hpp).
inline const float* rounded_operand(const float* x, int64_t count, MatmulPrecision precision,
                                    Eigen::ArrayXf& out) {
  if (out.size() < count) out.resize(count);
  const int dropped_bits = precision == MatmulPrecision::bf16 ? 16 : 13;
  for (int64_t i = 0; i < count; ++i) out[i] = round_mantissa(x[i], dropped_bits);
  return out.data();
}

// c = op(a) op(b) (+ c) in fp32, a holding m k floats and b k n.
inline void gemm_fp32(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k,
                      bool transpose_a, bool transpose_b, bool accumulate) {
  const GemmOperands g{a, b, c, m, n, k, transpose_a, transpose_b, accumulate};
  int64_t threads = 1;
#ifdef _OPENMP
  // Inside a parallel region (a loop over experts or heads) each product runs whole.
  if (!omp_in_parallel())
    threads = std::min<int64_t>(omp_get_max_threads(), m * n * k / kGemmTileWork);
#endif
  // The longer side first (each tile repacks the operand it shares, the smaller one); the other
  // side too when the longer has too few units for every thread.
  const bool rows_first = m >= n;
  const int64_t first_units = rows_first ? m / kGemmRowUnit : n / kGemmColumnUnit;
  const int64_t first = std::clamp<int64_t>(threads, 1, std::max<int64_t>(first_units, 1));
  const int64_t second = (threads + first - 1) / first;
  gemm_tiled(g, rows_first ? first : second, rows_first ? second : first);
}

// The product at the CPU's matmul precision: in tf32 or bf16 it reads rounded copies of a and b.
inline void gemm(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k,
                 bool transpose_a, bool transpose_b, bool accumulate = false) {
  if (m == 0 || n == 0) return;
  const MatmulPrecision precision = matmul_precision_slot(false).load(std::memory_order_relaxed);
  if (precision == MatmulPrecision::fp32 || k == 0)
    return gemm_fp32(a, b, c, m, n, k, transpose_a, transpose_b, accumulate);
  // Per thread: products run inside parallel loops (over experts, over heads), never nested.
  thread_local Eigen::ArrayXf a_rounded, b_rounded;
  gemm_fp32(rounded_operand(a, m * k, precision, a_rounded),
            rounded_operand(b, k * n, precision, b_rounded), c, m, n, k, transpose_a, transpose_b,
            accumulate);
}

namespace cpu {

// y [n] = x [k] W^T for a weight W [n, k] held transposed as bf16 bits, w_bf16 [k, n] (decoding's
// copy, rex/nn/decode_weights.hpp), and x already rounded to bf16: detail::gemm's bf16 arithmetic
// for one row. Each product of two bf16 values is exact in float, so fused or not it rounds only
// in the sum, and every y[j] sums in the order of k: the same bits at any vector width. Four rows
// of the weight per pass over y (the same order of the sums) keep y's loads and stores from
// outnumbering the weight's.
inline void row_times_bf16(const float* x, const uint16_t* w_bf16, float* y, int64_t n, int64_t k) {
  const auto widen = [](uint16_t bits) { return std::bit_cast<float>(uint32_t{bits} << 16); };
  std::fill_n(y, n, 0.0f);
  for (int64_t i = 0; i < k; i += 4) {
    const uint16_t* w = w_bf16 + i * n;
    if (k - i < 4) {  // the last rows, one at a time
      for (int64_t r = 0; r < k - i; ++r)
        for (int64_t j = 0; j < n; ++j) y[j] += x[i + r] * widen(w[r * n + j]);
      break;
    }
    const float x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
    for (int64_t j = 0; j < n; ++j) {
      float sum = y[j];
      sum += x0 * widen(w[j]);
      sum += x1 * widen(w[n + j]);
      sum += x2 * widen(w[2 * n + j]);
      sum += x3 * widen(w[3 * n + j]);
      y[j] = sum;
    }
  }
}

// The SwiGLU FFN of every expert on its segment of expert-sorted rows: expert e owns rows
// offsets[e] .. offsets[e + 1] of x [rows, d] and has gate[e], up[e] [h, d] and down[e] [d, h].
// Writes y [rows, d] and the pre-activations pre_gate = x gate^T and pre_up = x up^T [rows, h].
inline void grouped_swiglu(const float* x, const int64_t* offsets, int64_t experts,
                           const float* const* gate, const float* const* up,
                           const float* const* down, float* y, float* pre_gate, float* pre_up,
                           float* act, int64_t d, int64_t h) {
  REX_PARALLEL_FOR(schedule(dynamic))
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = offsets[e], m = offsets[e + 1] - first;
    if (m == 0) continue;
    float* g = pre_gate + first * h;
    float* u = pre_up + first * h;
    gemm(x + first * d, gate[e], g, m, h, d, false, true);
    gemm(x + first * d, up[e], u, m, h, d, false, true);
    // Made in an aligned array, then kept: Eigen peels an unaligned destination's first elements
    // into scalar code, whose exp differs from the vectorised one in the last bit.
    const Eigen::ArrayXf a = swiglu_value(ConstArrayMap(g, m * h), ConstArrayMap(u, m * h));
    std::copy_n(a.data(), m * h, act + first * h);
    gemm(a.data(), down[e], y + first * d, m, d, h, false, true);
  }
}

// The gradients of grouped_swiglu for the output gradient g [rows, d]; dx and every d_gate[e],
// d_up[e], d_down[e] may be null (not needed, or an empty segment). pre_gate, pre_up and act are
// the forward's.
inline void grouped_swiglu_backward(const float* x, const int64_t* offsets, int64_t experts,
                                    const float* const* gate, const float* const* up,
                                    const float* const* down, const float* pre_gate,
                                    const float* pre_up, const float* act, const float* g,
                                    float* dx, float* const* d_gate, float* const* d_up,
                                    float* const* d_down, int64_t d, int64_t h) {
  REX_PARALLEL_FOR(schedule(dynamic))
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = offsets[e], m = offsets[e + 1] - first;
    if (m == 0) continue;
    const ConstArrayMap gv(pre_gate + first * h, m * h), uv(pre_up + first * h, m * h);
    const Eigen::ArrayXf s = sigmoid_of(gv);
    const float* dy = g + first * d;
    if (d_down[e] != nullptr) gemm(dy, act + first * h, d_down[e], d, h, m, true, false);
    Eigen::ArrayXf da(m * h);
    gemm(dy, down[e], da.data(), m, h, d, false, false);
    const Eigen::ArrayXf d_pre_gate = swiglu_grad_a(da, gv, uv, s);
    const Eigen::ArrayXf d_pre_up = swiglu_grad_b(da, gv, s);
    if (d_gate[e] != nullptr)
      gemm(d_pre_gate.data(), x + first * d, d_gate[e], h, d, m, true, false);
    if (d_up[e] != nullptr) gemm(d_pre_up.data(), x + first * d, d_up[e], h, d, m, true, false);
    if (dx != nullptr) {
      float* out = dx + first * d;
      gemm(d_pre_gate.data(), gate[e], out, m, d, h, false, false);
      gemm(d_pre_up.data(), up[e], out, m, d, h, false, false, true);
    }
  }
}

}  // namespace cpu
}  // namespace rex::detail
