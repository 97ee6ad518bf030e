// causal_attention: fused causal scaled-dot-product attention with grouped-query heads, and
// causal_attention_reference, the same function composed from rex ops (for tests and as a spec).
//
// q is [B, Hq, T, D]; k and v are [B, Hkv, T, D] with Hq = G * Hkv: query head h reads kv head h /
// G. Per (b, h), with s = 1/sqrt(D) and the causal mask (query t sees keys 0..t):
//   S = s q k^T,  P = softmax(S) over the unmasked keys of each row (masked entries are exactly 0),
//   O = P v.
// The forward keeps only the row log-sum-exp L (so P = exp(S - L) on the unmasked entries); the
// backward recomputes S from q and k instead of saving the [T, T] P of every head. With dO = g:
//   dP = dO v^T,  dS = P * (dP - rowsum(dP * P)),  dq = s dS k,
//   dk = s dS^T q  and  dv = P^T dO, summed over the G query heads that share the kv head.
// The forward runs its (b, h) loop in parallel; the backward runs (b, kv head) in parallel and the
// group inside, so each iteration writes disjoint parts of dq, dk and dv. With a single head the
// loop stays serial and Eigen's GEMM uses the threads instead.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "rex/backend/cpu/arrays.hpp"
#include "rex/backend/cpu/gemm.hpp"
#include "rex/core/parallel.hpp"
#include "rex/ops/elementwise.hpp"
#include "rex/ops/index.hpp"
#include "rex/ops/matmul.hpp"
#include "rex/ops/softmax.hpp"

namespace rex {
namespace detail {

// Checks q, k, v for (grouped-query) attention and returns the group size G = Hq / Hkv.
inline int64_t check_attention_inputs(std::string_view op, const Tensor& q, const Tensor& k,
                                      const Tensor& v) {
  check_f32(op, q), check_f32(op, k), check_f32(op, v);
  REX_CHECK(q.rank() == 4 && k.rank() == 4 && v.rank() == 4, op,
            ": expected q [B, Hq, T, D] and k, v [B, Hkv, T, D], got q ", q.shape(), ", k ",
            k.shape(), ", v ", v.shape());
  REX_CHECK(k.shape() == v.shape(), op, ": k ", k.shape(), " and v ", v.shape(),
            " must have the same shape");
  REX_CHECK(q.dim(0) == k.dim(0) && q.dim(2) == k.dim(2) && q.dim(3) == k.dim(3), op, ": q ",
            q.shape(), " and k, v ", k.shape(), " differ in batch, time or head size");
  REX_CHECK(k.dim(1) > 0 && q.dim(1) > 0 && q.dim(1) % k.dim(1) == 0, op, ": ", q.dim(1),
            " query heads are not a multiple of ", k.dim(1), " kv heads (q ", q.shape(), ", k ",
            k.shape(), ")");
  return q.dim(1) / k.dim(1);
}

// s[T, T] = scale * q k^T (q and k are [T, D]); entries above the diagonal are left unspecified.
inline void attention_scores(const float* q, const float* k, float* s, int64_t time,
                             int64_t head_dim, float scale) {
  gemm(q, k, s, time, time, head_dim, false, true);
  for (int64_t i = 0; i < time; ++i)
    for (int64_t j = 0; j <= i; ++j) s[i * time + j] *= scale;
}

// causal_attention on CUDA: the fused kernels of rex::cuda, saving the same row log-sum-exp.
inline Tensor cuda_causal_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                    int64_t kv_heads, float scale) {
  const int64_t batch = q.dim(0), heads = q.dim(1), time = q.dim(2), head_dim = q.dim(3);
  Tensor out = Tensor::empty(q.shape(), DType::f32, q.device());
  Tensor lse = Tensor::empty(Shape{batch, heads, time}, DType::f32, q.device());
  cuda_backend().attention(q.device_data<float>(), k.device_data<float>(), v.device_data<float>(),
                           out.device_data<float>(), lse.device_data<float>(), batch, heads,
                           kv_heads, time, head_dim, scale);
  return record(
      out, "causal_attention", {q, k, v},
      [q = q.detach(), k = k.detach(), v = v.detach(), lse, kv_heads, scale](
          const Tensor& g, const std::vector<bool>& needs) {
        GradList grads(3);
        const Tensor* inputs[] = {&q, &k, &v};
        for (size_t i = 0; i < 3; ++i)
          if (needs[i]) grads[i] = Tensor::empty(inputs[i]->shape(), DType::f32, q.device());
        auto ptr = [](Tensor& t) { return t.defined() ? t.device_data<float>() : nullptr; };
        cuda_backend().attention_backward(
            q.device_data<float>(), k.device_data<float>(), v.device_data<float>(),
            lse.device_data<float>(), g.device_data<float>(), ptr(grads[0]), ptr(grads[1]),
            ptr(grads[2]), q.dim(0), q.dim(1), kv_heads, q.dim(2), q.dim(3), scale);
        return grads;
      });
}

}  // namespace detail

// Causal softmax(q k^T / sqrt(D)) v for q [B, Hq, T, D] and k, v [B, Hkv, T, D], Hq a multiple of
// Hkv.
inline Tensor causal_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  const int64_t group = detail::check_attention_inputs("causal_attention", q, k, v);
  const int64_t batch = q.dim(0), heads = q.dim(1), kv_heads = k.dim(1);
  const int64_t time = q.dim(2), head_dim = q.dim(3), block = time * head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));

  if (detail::common_device("causal_attention", {q, k, v}).is_cuda())
    return detail::cuda_causal_attention(q, k, v, kv_heads, scale);
  Tensor out = Tensor::empty(q.shape());
  Tensor lse = Tensor::empty(Shape{batch, heads, time});
  const float *pq = q.data<float>(), *pk = k.data<float>(), *pv = v.data<float>();
  float *po = out.data<float>(), *pl = lse.data<float>();
  REX_PARALLEL_FOR(if (batch * heads > 1))
  for (int64_t bh = 0; bh < batch * heads; ++bh) {
    const int64_t kv = (bh / heads) * kv_heads + (bh % heads) / group;
    Eigen::ArrayXf p(time * time);  // not std::vector: see backend/cpu/arrays.hpp
    detail::attention_scores(pq + bh * block, pk + kv * block, p.data(), time, head_dim, scale);
    for (int64_t i = 0; i < time; ++i) {
      float* row = p.data() + i * time;
      detail::ArrayMap visible(row, i + 1);  // the keys query i may see (Eigen: vectorised exp)
      const float peak = visible.maxCoeff();
      visible = (visible - peak).exp();
      const double total = visible.cast<double>().sum();
      visible *= static_cast<float>(1.0 / total);
      std::fill(row + i + 1, row + time, 0.0f);
      pl[bh * time + i] = peak + static_cast<float>(std::log(total));
    }
    detail::gemm(p.data(), pv + kv * block, po + bh * block, time, head_dim, time, false, false);
  }

  return detail::record(
      out, "causal_attention", {q, k, v},
      [q = q.detach(), k = k.detach(), v = v.detach(), lse, group, scale](
          const Tensor& g, const std::vector<bool>& needs) {
        const int64_t batch = q.dim(0), kv_heads = k.dim(1);
        const int64_t time = q.dim(2), head_dim = q.dim(3), block = time * head_dim;
        Tensor dq = needs[0] ? Tensor::empty(q.shape()) : Tensor();
        Tensor dk = needs[1] ? zeros(k.shape()) : Tensor();
        Tensor dv = needs[2] ? zeros(v.shape()) : Tensor();
        const float *pq = q.data<float>(), *pk = k.data<float>(), *pv = v.data<float>();
        const float *pl = lse.data<float>(), *pg = g.data<float>();
        float* pdq = needs[0] ? dq.data<float>() : nullptr;
        float* pdk = needs[1] ? dk.data<float>() : nullptr;
        float* pdv = needs[2] ? dv.data<float>() : nullptr;
        REX_PARALLEL_FOR(if (batch * kv_heads > 1))
        for (int64_t bkv = 0; bkv < batch * kv_heads; ++bkv) {
          Eigen::ArrayXf p(time * time), ds(needs[0] || needs[1] ? time * time : 0);
          const float *k_h = pk + bkv * block, *v_h = pv + bkv * block;
          for (int64_t member = 0; member < group; ++member) {
            const int64_t bh = bkv * group + member;  // = b * Hq + kv head * G + member
            const float *q_h = pq + bh * block, *g_h = pg + bh * block;
            // P from the saved log-sum-exp; zero above the diagonal.
            detail::attention_scores(q_h, k_h, p.data(), time, head_dim, scale);
            for (int64_t i = 0; i < time; ++i) {
              float* row = p.data() + i * time;
              detail::ArrayMap visible(row, i + 1);
              visible = (visible - pl[bh * time + i]).exp();
              std::fill(row + i + 1, row + time, 0.0f);
            }
            if (needs[2])
              detail::gemm(p.data(), g_h, pdv + bkv * block, time, head_dim, time, true, false,
                           true);
            if (!needs[0] && !needs[1]) continue;
            // dS (already times the scale s) = s P * (dP - rowsum(dP * P)), with dP = dO v^T.
            detail::gemm(g_h, v_h, ds.data(), time, time, head_dim, false, true);
            for (int64_t i = 0; i < time; ++i) {
              const detail::ArrayMap prow(p.data() + i * time, i + 1);
              detail::ArrayMap drow(ds.data() + i * time, i + 1);
              const auto centre =
                  static_cast<float>((drow.cast<double>() * prow.cast<double>()).sum());
              drow = scale * prow * (drow - centre);
              std::fill(ds.data() + i * time + i + 1, ds.data() + (i + 1) * time, 0.0f);
            }
            if (needs[0])
              detail::gemm(ds.data(), k_h, pdq + bh * block, time, head_dim, time, false, false);
            if (needs[1])
              detail::gemm(ds.data(), q_h, pdk + bkv * block, time, head_dim, time, true, false,
                           true);
          }
        }
        return detail::GradList{dq, dk, dv};
      });
}

// The same function composed from rex ops: matmul's batch broadcasting shares each kv head over its
// group ([B, Hkv, G, T, D] against [B, Hkv, 1, T, D]), and the mask is a masked_fill with
// -infinity.
inline Tensor causal_attention_reference(const Tensor& q, const Tensor& k, const Tensor& v) {
  const int64_t group = detail::check_attention_inputs("causal_attention_reference", q, k, v);
  const int64_t batch = q.dim(0), kv_heads = k.dim(1), time = q.dim(2), head_dim = q.dim(3);
  Tensor future = zeros(Shape{time, time});
  for (int64_t i = 0; i < time; ++i)
    for (int64_t j = i + 1; j < time; ++j) future.data<float>()[i * time + j] = 1.0f;
  future = future.to(q.device());
  const Tensor q5 = reshape(q, {batch, kv_heads, group, time, head_dim});
  const Tensor k5 = reshape(k, {batch, kv_heads, 1, time, head_dim});
  const Tensor v5 = reshape(v, {batch, kv_heads, 1, time, head_dim});
  const Tensor scores =
      matmul(q5, k5, {.transpose_b = true}) * (1.0f / std::sqrt(static_cast<float>(head_dim)));
  const Tensor p = softmax(masked_fill(scores, future, -std::numeric_limits<float>::infinity()));
  return reshape(matmul(p, v5), q.shape().dims());
}

}  // namespace rex
