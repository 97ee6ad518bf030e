// CPU kernels for causal grouped-query attention (the CPU side of kernels/attention.cu), with the
// arguments of their rex/backend/cuda/backend.hpp counterparts; the formulas are in the file-top
// comment of rex/ops/attention.hpp.
//
// Layouts: rex/backend/attention_shape.hpp (heads first, time first, or time first with q and k
// packed; lse is [B, Hq, T]). A head whose rows are not contiguous is copied into a [T, D] buffer,
// and its results out of one, so the arithmetic is the same in every layout. Per head, the scores
// are one Eigen GEMM and the softmax rows go through Eigen's vectorised exp, with the row sums in
// double. The forward runs its (b, h) loop in parallel; the backward runs (b, kv head) in parallel
// and the group inside, so each iteration writes disjoint parts of dq, dk and dv. With a single
// head the loop stays serial and Eigen's GEMM uses the threads instead. The score buffers are Eigen
// arrays, not std::vector (see rex/backend/cpu/arrays.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include "rex/backend/cpu/eigen.hpp"

#include "rex/backend/attention_shape.hpp"
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

// Head `head` of x (whose rows lie as `rows` says) as a contiguous [T, D] matrix: x's own rows
// when they are contiguous (heads first), else a copy of them in `copy`.
inline const float* head_rows(const float* x, AttentionRows rows, int64_t head,
                              const AttentionShape& shape, Eigen::ArrayXf& copy) {
  const float* first = x + shape.start(rows, head);
  if (shape.stride(rows) == shape.head_dim) return first;
  copy.resize(shape.time * shape.head_dim);
  for (int64_t t = 0; t < shape.time; ++t)
    std::copy_n(first + t * shape.stride(rows), shape.head_dim, copy.data() + t * shape.head_dim);
  return copy.data();
}

// Where head `head` of a result x is computed as a contiguous [T, D] matrix (x's rows, or
// `staging` when they are apart), and store_head_rows, which then moves it into x's rows.
inline float* head_result(float* x, AttentionRows rows, int64_t head, const AttentionShape& shape,
                          Eigen::ArrayXf& staging) {
  if (shape.stride(rows) == shape.head_dim) return x + shape.start(rows, head);
  staging.resize(shape.time * shape.head_dim);
  return staging.data();
}
inline void store_head_rows(const Eigen::ArrayXf& staging, float* x, AttentionRows rows,
                            int64_t head, const AttentionShape& shape) {
  if (shape.stride(rows) == shape.head_dim) return;
  float* first = x + shape.start(rows, head);
  for (int64_t t = 0; t < shape.time; ++t)
    std::copy_n(staging.data() + t * shape.head_dim, shape.head_dim,
                first + t * shape.stride(rows));
}

inline void attention(const float* q, const float* k, const float* v, float* out, float* lse,
                      AttentionShape shape, float scale) {
  const int64_t time = shape.time, head_dim = shape.head_dim;
  const int64_t batch_heads = shape.batch * shape.heads;
  REX_PARALLEL_FOR(if (batch_heads > 1))
  for (int64_t bh = 0; bh < batch_heads; ++bh) {
    const int64_t kv = shape.kv_head_of(bh);
    Eigen::ArrayXf p(time * time), q_copy, k_copy, v_copy, out_staging;
    attention_scores(head_rows(q, AttentionRows::q, bh, shape, q_copy),
                     head_rows(k, AttentionRows::k, kv, shape, k_copy), p.data(), time, head_dim,
                     scale);
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
    attention_gemm(p.data(), head_rows(v, AttentionRows::v, kv, shape, v_copy),
                   head_result(out, AttentionRows::out, bh, shape, out_staging), time, head_dim,
                   time, false, false);
    store_head_rows(out_staging, out, AttentionRows::out, bh, shape);
  }
}

// dq, dk, dv may be null. dk and dv sum over the query heads of a group in order.
inline void attention_backward(const float* q, const float* k, const float* v, const float* lse,
                               const float* g, float* dq, float* dk, float* dv,
                               AttentionShape shape, float scale) {
  const int64_t kv_heads = shape.kv_heads, time = shape.time;
  const int64_t head_dim = shape.head_dim, group = shape.group();
  REX_PARALLEL_FOR(if (shape.batch * kv_heads > 1))
  for (int64_t bkv = 0; bkv < shape.batch * kv_heads; ++bkv) {
    Eigen::ArrayXf p(time * time), ds(dq != nullptr || dk != nullptr ? time * time : 0);
    Eigen::ArrayXf k_copy, v_copy, q_copy, g_copy, dq_staging, dk_staging, dv_staging;
    const float* k_h = head_rows(k, AttentionRows::k, bkv, shape, k_copy);
    const float* v_h = head_rows(v, AttentionRows::v, bkv, shape, v_copy);
    float* dk_h =
        dk != nullptr ? head_result(dk, AttentionRows::k, bkv, shape, dk_staging) : nullptr;
    float* dv_h =
        dv != nullptr ? head_result(dv, AttentionRows::v, bkv, shape, dv_staging) : nullptr;
    if (dk_h != nullptr) std::fill(dk_h, dk_h + time * head_dim, 0.0f);
    if (dv_h != nullptr) std::fill(dv_h, dv_h + time * head_dim, 0.0f);
    for (int64_t member = 0; member < group; ++member) {
      const int64_t bh = bkv * group + member;  // = b * Hq + kv head * G + member
      const float* q_h = head_rows(q, AttentionRows::q, bh, shape, q_copy);
      const float* g_h = head_rows(g, AttentionRows::out, bh, shape, g_copy);
      // P from the saved log-sum-exp; zero above the diagonal.
      attention_scores(q_h, k_h, p.data(), time, head_dim, scale);
      for (int64_t i = 0; i < time; ++i) {
        float* row = p.data() + i * time;
        ArrayMap visible(row, i + 1);
        visible = (visible - lse[bh * time + i]).exp();
        std::fill(row + i + 1, row + time, 0.0f);
      }
      if (dv_h != nullptr)
        attention_gemm(p.data(), g_h, dv_h, time, head_dim, time, true, false, true);
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
      if (dq != nullptr) {
        attention_gemm(ds.data(), k_h, head_result(dq, AttentionRows::q, bh, shape, dq_staging),
                       time, head_dim, time, false, false);
        store_head_rows(dq_staging, dq, AttentionRows::q, bh, shape);
      }
      if (dk_h != nullptr)
        attention_gemm(ds.data(), q_h, dk_h, time, head_dim, time, true, false, true);
    }
    if (dk != nullptr) store_head_rows(dk_staging, dk, AttentionRows::k, bkv, shape);
    if (dv != nullptr) store_head_rows(dv_staging, dv, AttentionRows::v, bkv, shape);
  }
}

}  // namespace rex::detail::cpu
