// CPU GEMM: Eigen's product kernel run directly on rex buffers through Eigen::Map (no copies).
// Transposed operands are expressed as .transpose() on the Map, which Eigen's GEMM reads in place.
// With OpenMP enabled (the rex::rex CMake target does this), Eigen splits large products over
// threads.
//
// grouped_swiglu and its backward are the CPU form of a grouped GEMM (on CUDA, rex/ops/moe.hpp runs
// cuBLAS GEMMs per expert segment around one swiglu kernel): segments run in parallel, each writing
// its own rows of y and dx and its own expert's gradients (so results do not depend on the thread
// count), with Eigen's GEMM single-threaded inside.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>

#include "rex/backend/cpu/arrays.hpp"
#include "rex/backend/pointwise.hpp"
#include "rex/core/parallel.hpp"

namespace rex::detail {

using RowMajorMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// c[m, n] = op(a) * op(b) (+ c when accumulate), where op(a) is [m, k] and a is stored [m, k], or
// [k, m] when transpose_a; likewise b is stored [k, n], or [n, k] when transpose_b.
inline void gemm(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k,
                 bool transpose_a, bool transpose_b, bool accumulate = false) {
  Eigen::Map<const RowMajorMatrix> A(a, transpose_a ? k : m, transpose_a ? m : k);
  Eigen::Map<const RowMajorMatrix> B(b, transpose_b ? n : k, transpose_b ? k : n);
  Eigen::Map<RowMajorMatrix> C(c, m, n);
  // Eigen's kernel only accumulates, so a fresh product starts from zeros, written in parallel.
  if (!accumulate)
    for_each_chunk(m * n,
                   [c](int64_t first, int64_t count) { std::fill_n(c + first, count, 0.0f); });
  if (!transpose_a && !transpose_b) {
    C.noalias() += A * B;
  } else if (!transpose_a) {
    C.noalias() += A * B.transpose();
  } else if (!transpose_b) {
    C.noalias() += A.transpose() * B;
  } else {
    C.noalias() += A.transpose() * B.transpose();
  }
}

namespace cpu {

// The SwiGLU FFN of every expert on its segment of expert-sorted rows: expert e owns rows
// offsets[e] .. offsets[e + 1] of x [rows, d] and has gate[e], up[e] [h, d] and down[e] [d, h].
// Writes y [rows, d] and the pre-activations pre_gate = x gate^T and pre_up = x up^T [rows, h].
inline void grouped_swiglu(const float* x, const int64_t* offsets, int64_t experts,
                           const float* const* gate, const float* const* up,
                           const float* const* down, float* y, float* pre_gate, float* pre_up,
                           int64_t d, int64_t h) {
  REX_PARALLEL_FOR(schedule(dynamic))
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = offsets[e], m = offsets[e + 1] - first;
    if (m == 0) continue;
    float* g = pre_gate + first * h;
    float* u = pre_up + first * h;
    gemm(x + first * d, gate[e], g, m, h, d, false, true);
    gemm(x + first * d, up[e], u, m, h, d, false, true);
    const Eigen::ArrayXf a = swiglu_value(ConstArrayMap(g, m * h), ConstArrayMap(u, m * h));
    gemm(a.data(), down[e], y + first * d, m, d, h, false, true);
  }
}

// The gradients of grouped_swiglu for the output gradient g [rows, d]; dx and every d_gate[e],
// d_up[e], d_down[e] may be null (not needed, or an empty segment). The activation is recomputed
// from the saved pre-activations.
inline void grouped_swiglu_backward(const float* x, const int64_t* offsets, int64_t experts,
                                    const float* const* gate, const float* const* up,
                                    const float* const* down, const float* pre_gate,
                                    const float* pre_up, const float* g, float* dx,
                                    float* const* d_gate, float* const* d_up, float* const* d_down,
                                    int64_t d, int64_t h) {
  REX_PARALLEL_FOR(schedule(dynamic))
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = offsets[e], m = offsets[e + 1] - first;
    if (m == 0) continue;
    const ConstArrayMap gv(pre_gate + first * h, m * h), uv(pre_up + first * h, m * h);
    const Eigen::ArrayXf s = sigmoid_of(gv);
    const float* dy = g + first * d;
    if (d_down[e] != nullptr) {
      const Eigen::ArrayXf a = swiglu_value(gv, uv);
      gemm(dy, a.data(), d_down[e], d, h, m, true, false);
    }
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
