// CPU kernels for causal grouped-query attention (the CPU side of kernels/attention.cu), with the
// arguments of their rex/backend/cuda/backend.hpp counterparts; the formulas are in the file-top
// comment of rex/ops/attention.hpp.
//
// Layouts: q, out, g, dq are [B, Hq, T, D]; k, v, dk, dv are [B, Hkv, T, D]; lse is [B, Hq, T]. Per
// head, the scores are one Eigen GEMM and the softmax rows go through Eigen's vectorised exp, with
// the row sums in double. The forward runs its (b, h) loop in parallel; the backward runs (b, kv
// head) in parallel and the group inside, so each iteration writes disjoint parts of dq, dk and dv.
// With a single head the loop stays serial and Eigen's GEMM uses the threads instead. The score
// buffers are Eigen arrays, not std::vector (see rex/backend/cpu/arrays.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include "rex/backend/cpu/eigen.hpp"

#include "rex/backend/cpu/arrays.hpp"
#include "rex/backend/cpu/gemm.hpp"
#include "rex/core/parallel.hpp"

namespace rex::detail::cpu {

// attention's products: in bf16 rounded as gemm rounds them (the operands flash attention rounds on
// CUDA), in fp32 otherwise, tf32 included (CUDA's attention kernels have no TF32 path).
inline void attention_gemm(const float* a, const float* b, float* c, int64_t m, int64_t n,
                           int64_t k, bool transpose_a, bool transpose_b, bool accumulate = false) {
  if (matmul_precision_slot(false).load(std::memory_order_relaxed) == MatmulPrecision::bf16)
    return gemm(a, b, c, m, n, k, transpose_a, transpose_b, accumulate);
  if (m > 0 && n > 0) gemm_fp32(a, b, c, m, n, k, transpose_a, transpose_b, accumulate);
}

// s[T, T] = scale * q k^T (q and k are [T, D]); entries above the diagonal are left unspecified.
inline void attention_scores(const float* q, const float* k, float* s, int64_t time,
                             int64_t head_dim, float scale) {
  attention_gemm(q, k, s, time, time, head_dim, false, true);
  for (int64_t i = 0; i < time; ++i)
    for (int64_t j = 0; j <= i; ++j) s[i * time + j] *= scale;
}

inline void attention(const float* q, const float* k, const float* v, float* out, float* lse,
                      int64_t batch, int64_t heads, int64_t kv_heads, int64_t time,
                      int64_t head_dim, float scale) {
  const int64_t group = heads / kv_heads, block = time * head_dim;
  REX_PARALLEL_FOR(if (batch * heads > 1))
  for (int64_t bh = 0; bh < batch * heads; ++bh) {
    const int64_t kv = (bh / heads) * kv_heads + (bh % heads) / group;
    Eigen::ArrayXf p(time * time);
    attention_scores(q + bh * block, k + kv * block, p.data(), time, head_dim, scale);
    for (int64_t i = 0; i < time; ++i) {
      float* row = p.data() + i * time;
      ArrayMap visible(row, i + 1);  // the keys query i may see
      const float peak = visible.maxCoeff();
      visible = (visible - peak).exp();
      const double total = visible.cast<double>().sum();
      visible *= static_cast<float>(1.0 / total);
      std::fill(row + i + 1, row + time, 0.0f);
      lse[bh * time + i] = peak + static_cast<float>(std::log(total));
    }
    attention_gemm(p.data(), v + kv * block, out + bh * block, time, head_dim, time, false, false);
  }
}

// dq, dk, dv may be null. dk and dv sum over the query heads of a group in order.
inline void attention_backward(const float* q, const float* k, const float* v, const float* lse,
                               const float* g, float* dq, float* dk, float* dv, int64_t batch,
                               int64_t heads, int64_t kv_heads, int64_t time, int64_t head_dim,
                               float scale) {
  const int64_t group = heads / kv_heads, block = time * head_dim;
  if (dk != nullptr) std::fill(dk, dk + batch * kv_heads * block, 0.0f);
  if (dv != nullptr) std::fill(dv, dv + batch * kv_heads * block, 0.0f);
  REX_PARALLEL_FOR(if (batch * kv_heads > 1))
  for (int64_t bkv = 0; bkv < batch * kv_heads; ++bkv) {
    Eigen::ArrayXf p(time * time), ds(dq != nullptr || dk != nullptr ? time * time : 0);
    const float *k_h = k + bkv * block, *v_h = v + bkv * block;
    for (int64_t member = 0; member < group; ++member) {
      const int64_t bh = bkv * group + member;  // = b * Hq + kv head * G + member
      const float *q_h = q + bh * block, *g_h = g + bh * block;
      // P from the saved log-sum-exp; zero above the diagonal.
      attention_scores(q_h, k_h, p.data(), time, head_dim, scale);
      for (int64_t i = 0; i < time; ++i) {
        float* row = p.data() + i * time;
        ArrayMap visible(row, i + 1);
        visible = (visible - lse[bh * time + i]).exp();
        std::fill(row + i + 1, row + time, 0.0f);
      }
      if (dv != nullptr)
        attention_gemm(p.data(), g_h, dv + bkv * block, time, head_dim, time, true, false, true);
      if (dq == nullptr && dk == nullptr) continue;
      // dS (already times the scale s) = s P * (dP - rowsum(dP * P)), with dP = dO v^T.
      attention_gemm(g_h, v_h, ds.data(), time, time, head_dim, false, true);
      for (int64_t i = 0; i < time; ++i) {
        const ArrayMap prow(p.data() + i * time, i + 1);
        ArrayMap drow(ds.data() + i * time, i + 1);
        const auto centre = static_cast<float>((drow.cast<double>() * prow.cast<double>()).sum());
        drow = scale * prow * (drow - centre);
        std::fill(ds.data() + i * time + i + 1, ds.data() + (i + 1) * time, 0.0f);
      }
      if (dq != nullptr)
        attention_gemm(ds.data(), k_h, dq + bh * block, time, head_dim, time, false, false);
      if (dk != nullptr)
        attention_gemm(ds.data(), q_h, dk + bkv * block, time, head_dim, time, true, false, true);
    }
  }
}

}  // namespace rex::detail::cpu
