// causal_attention: fused causal scaled-dot-product attention with grouped-query heads, and
// causal_attention_reference, the same function composed from rex ops (for tests and as a spec).
//
// q is [B, Hq, T, D]; k and v are [B, Hkv, T, D] with Hq = G * Hkv: query head h reads kv head h /
// G. Or time first (AttentionLayout::time_first): q [B, T, Hq, D], k and v [B, T, Hkv, D] and the
// output [B, T, Hq, D], the order of the projections' outputs, so that a model needs no permute
// around attention; the arithmetic is the same, so are the bits. causal_attention_packed takes q
// and k time first in one tensor (rope_qk's output). Per (b, h), with s = 1/sqrt(D) and
// the causal mask (query t sees keys 0..t):
//   S = s q k^T,  P = softmax(S) over the unmasked keys of each row (masked entries are exactly 0),
//   O = P v.
// The forward keeps only the row log-sum-exp L (so P = exp(S - L) on the unmasked entries); the
// backward recomputes S from q and k instead of saving the [T, T] P of every head. With dO = g:
//   dP = dO v^T,  dS = P * (dP - rowsum(dP * P)),  dq = s dS k,
//   dk = s dS^T q  and  dv = P^T dO, summed over the G query heads that share the kv head.
// The loops (CPU) and kernels (CUDA) are rex/backend/cpu/attention.hpp and kernels/attention.cu;
// in bf16 on CUDA, kernels/flash_attention.cu (attention_is_flash).
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "rex/backend/cpu/attention.hpp"
#include "rex/ops/elementwise.hpp"
#include "rex/ops/index.hpp"
#include "rex/ops/matmul.hpp"
#include "rex/ops/softmax.hpp"

namespace rex {

// Where heads and positions lie in attention's tensors (rex/backend/attention_shape.hpp):
// [B, H, T, D] (heads_first, as PyTorch's scaled_dot_product_attention) or [B, T, H, D]
// (time_first, as a projection's output [B, T, H D] reshaped).
enum class AttentionLayout { heads_first, time_first };

namespace detail {

// Checks q, k, v for (grouped-query) attention in `layout` and returns the problem's shape.
inline AttentionShape check_attention_inputs(std::string_view op, const Tensor& q, const Tensor& k,
                                             const Tensor& v, AttentionLayout layout) {
  check_f32(op, q), check_f32(op, k), check_f32(op, v);
  const bool time_first = layout == AttentionLayout::time_first;
  const char* expected = time_first ? "q [B, T, Hq, D] and k, v [B, T, Hkv, D]"
                                    : "q [B, Hq, T, D] and k, v [B, Hkv, T, D]";
  REX_CHECK(q.rank() == 4 && k.rank() == 4 && v.rank() == 4, op, ": expected ", expected,
            ", got q ", q.shape(), ", k ", k.shape(), ", v ", v.shape());
  REX_CHECK(k.shape() == v.shape(), op, ": k ", k.shape(), " and v ", v.shape(),
            " must have the same shape");
  const int head_axis = time_first ? 2 : 1, time_axis = time_first ? 1 : 2;
  REX_CHECK(q.dim(0) == k.dim(0) && q.dim(time_axis) == k.dim(time_axis) && q.dim(3) == k.dim(3),
            op, ": q ", q.shape(), " and k, v ", k.shape(), " differ in batch, time or head size (",
            expected, ")");
  const int64_t heads = q.dim(head_axis), kv_heads = k.dim(head_axis);
  REX_CHECK(kv_heads > 0 && heads > 0 && heads % kv_heads == 0, op, ": ", heads,
            " query heads are not a multiple of ", kv_heads, " kv heads (q ", q.shape(), ", k ",
            k.shape(), ", ", expected, ")");
  return {q.dim(0), heads, kv_heads, q.dim(time_axis), q.dim(3), time_first};
}

struct AttentionValues {
  Tensor out;  // q's shape
  Tensor lse;  // [B, Hq, T]: the row log-sum-exp, saved for the backward
};

// Whether attention on q's device runs flash attention: on CUDA in bf16 (rex/core/precision.hpp),
// whose products round q, k, v and P (and dO, P and dS in the backward) to bf16 as the CPU's
// attention does in bf16. Otherwise the fp32 kernels (in tf32 on both devices: CUDA's attention
// kernels have no TF32 path, and cpu::attention_gemm keeps the CPU's alike).
inline bool attention_is_flash(const Tensor& q) {
  if (!on_cuda(q) || matmul_precision_slot(true).load() != MatmulPrecision::bf16) return false;
  const int64_t head_dim = q.dim(3);
  REX_CHECK(head_dim == 32 || head_dim == 64 || head_dim == 128,
            "causal_attention: in bf16 on CUDA attention runs flash attention, which takes head ",
            "dims 32, 64 and 128; got q ", q.shape(), " (head dim ", head_dim, ")");
  return true;
}

// out has q's shape, or [B, T, Hq, D] when q and k are packed.
inline AttentionValues attention_values(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const AttentionShape& shape, float scale, bool flash) {
  const Shape out_shape =
      shape.packed_qk ? Shape{shape.batch, shape.time, shape.heads, shape.head_dim} : q.shape();
  AttentionValues out{
      Tensor::empty(out_shape, DType::f32, q.device()),
      Tensor::empty(Shape{shape.batch, shape.heads, shape.time}, DType::f32, q.device())};
  (flash        ? cuda_backend().flash_attention
   : on_cuda(q) ? cuda_backend().attention
                : cpu::attention)(q.device_data<float>(), k.device_data<float>(),
                                  v.device_data<float>(), out.out.device_data<float>(),
                                  out.lse.device_data<float>(), shape, scale);
  return out;
}

// The gradients of q, k and v (each left undefined where `needs` says it is not wanted); `out` is
// the forward's output, which flash attention's backward reads (the fp32 kernels recompute it).
// With q and k packed (q and k the same tensor), dq and dk are one tensor too.
inline GradList attention_grads(const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v,
                                const AttentionValues& values, const AttentionShape& shape,
                                float scale, bool flash, const std::vector<bool>& needs) {
  GradList grads(3);
  const Tensor* inputs[] = {&q, &k, &v};
  // Flash attention writes all three.
  for (size_t i = 0; i < 3; ++i)
    if (needs[i] || flash)
      grads[i] = i == 1 && shape.packed_qk && grads[0].defined()
                     ? grads[0]
                     : Tensor::empty(inputs[i]->shape(), DType::f32, q.device());
  auto pointer = [](const Tensor& t) { return t.defined() ? t.device_data<float>() : nullptr; };
  const float *pq = q.device_data<float>(), *pk = k.device_data<float>(),
              *pv = v.device_data<float>(), *lse = values.lse.device_data<float>();
  if (flash) {
    cuda_backend().flash_attention_backward(pq, pk, pv, values.out.device_data<float>(), lse,
                                            g.device_data<float>(), pointer(grads[0]),
                                            pointer(grads[1]), pointer(grads[2]), shape, scale);
    for (size_t i = 0; i < 3; ++i)
      if (!needs[i]) grads[i] = Tensor();
    return grads;
  }
  (on_cuda(q) ? cuda_backend().attention_backward : cpu::attention_backward)(
      pq, pk, pv, lse, g.device_data<float>(), pointer(grads[0]), pointer(grads[1]),
      pointer(grads[2]), shape, scale);
  return grads;
}

}  // namespace detail

// Causal softmax(q k^T / sqrt(D)) v for q [B, Hq, T, D] and k, v [B, Hkv, T, D], Hq a multiple of
// Hkv; with AttentionLayout::time_first, q [B, T, Hq, D] and k, v [B, T, Hkv, D].
inline Tensor causal_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                               AttentionLayout layout = AttentionLayout::heads_first) {
  const detail::AttentionShape shape =
      detail::check_attention_inputs("causal_attention", q, k, v, layout);
  detail::common_device("causal_attention", {q, k, v});
  const float scale = 1.0f / std::sqrt(static_cast<float>(q.dim(3)));
  const bool flash = detail::attention_is_flash(q);
  detail::AttentionValues values = detail::attention_values(q, k, v, shape, scale, flash);
  Tensor out = values.out;
  // The closure keeps the output (detached: the output's node holds the closure) only for flash
  // attention's backward.
  values.out = flash ? out.detach() : Tensor();
  return detail::record(out, "causal_attention", {q, k, v},
                        [q = q.detach(), k = k.detach(), v = v.detach(), values = std::move(values),
                         shape, scale, flash](const Tensor& g, const std::vector<bool>& needs) {
                          return detail::attention_grads(g, q, k, v, values, shape, scale, flash,
                                                         needs);
                        });
}

// causal_attention with q and k packed in one tensor, time first: qk [B, T, Hq + Hkv, D] (each
// position's Hq query heads, then its Hkv key heads: rope_qk's output) and v [B, T, Hkv, D]; the
// output is [B, T, Hq, D] and the gradient of qk is packed alike. The same arithmetic as
// causal_attention on q and k apart, so the same bits, without a kernel to make them apart.
inline Tensor causal_attention_packed(const Tensor& qk, const Tensor& v, int64_t heads) {
  detail::check_f32("causal_attention_packed", qk), detail::check_f32("causal_attention_packed", v);
  detail::common_device("causal_attention_packed", {qk, v});
  REX_CHECK(
      qk.rank() == 4 && v.rank() == 4 && heads > 0 && v.dim(2) > 0 && heads % v.dim(2) == 0 &&
          qk.dim(2) == heads + v.dim(2) && qk.dim(0) == v.dim(0) && qk.dim(1) == v.dim(1) &&
          qk.dim(3) == v.dim(3),
      "causal_attention_packed: expected qk [B, T, Hq + Hkv, D] and v [B, T, Hkv, D] with Hq = ",
      heads, " a multiple of Hkv, got qk ", qk.shape(), " and v ", v.shape());
  const detail::AttentionShape shape{
      qk.dim(0), heads, v.dim(2), qk.dim(1), qk.dim(3), /*time_first=*/true, /*packed_qk=*/true};
  const float scale = 1.0f / std::sqrt(static_cast<float>(qk.dim(3)));
  const bool flash = detail::attention_is_flash(qk);
  detail::AttentionValues values = detail::attention_values(qk, qk, v, shape, scale, flash);
  Tensor out = values.out;
  values.out = flash ? out.detach() : Tensor();
  return detail::record(out, "causal_attention_packed", {qk, v},
                        [qk = qk.detach(), v = v.detach(), values = std::move(values), shape, scale,
                         flash](const Tensor& g, const std::vector<bool>& needs) {
                          detail::GradList grads =
                              detail::attention_grads(g, qk, qk, v, values, shape, scale, flash,
                                                      {needs[0], needs[0], needs[1]});
                          return detail::GradList{grads[0], grads[2]};
                        });
}

// The same function composed from rex ops: matmul's batch broadcasting shares each kv head over its
// group ([B, Hkv, G, T, D] against [B, Hkv, 1, T, D]), and the mask is a masked_fill with
// -infinity.
inline Tensor causal_attention_reference(const Tensor& q, const Tensor& k, const Tensor& v) {
  const int64_t group = detail::check_attention_inputs("causal_attention_reference", q, k, v,
                                                       AttentionLayout::heads_first)
                            .group();
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
