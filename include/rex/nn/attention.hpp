// Causal self-attention with RoPE and grouped-query heads, and its KV cache for decoding.
//
// x [B, T, d] -> q = x Wq^T, k = x Wk^T, v = x Wv^T, read as heads [B, T, H, D] (D = d / H; k
// and v have Hkv heads, each shared by H / Hkv query heads), RoPE on q and k into one tensor
// (rope_qk, one launch), the fused causal attention of rex/ops/attention.hpp in that time-first
// layout (causal_attention_packed), its output read as [B, T, d], output projection Wo. No head is
// moved: every step between the projections is a reshape, where heads first ([B, H, T, D]) would
// take a permute each way for v and the output.
//
// Decoding (inference, one sequence): given a KvCacheLayer, the keys (after RoPE) and values of
// the tokens are kept. An empty cache takes a whole window (the prefill: the computation above,
// keys and values kept); then each call takes one new token at position p = the cached length
// (RoPE at p, as the full pass over the window would rotate it), writes its key and value at p,
// and attends from it to all p + 1 keys, which it may all see: softmax(q K^T / sqrt(D)) V composed
// from matmul and softmax, so it runs on every device. It differs from the full pass only in
// rounding (the order of the sums). step_on_cpu is the same one-token computation on raw host
// buffers, by the CPU kernels those ops call: a decoded token is about 190 small ops, and on the
// CPU their overhead (tensors, shape checks, allocations) costs as much as their arithmetic.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "rex/nn/layers.hpp"
#include "rex/ops/attention.hpp"
#include "rex/ops/rope.hpp"
#include "rex/ops/shape.hpp"
#include "rex/ops/softmax.hpp"

namespace rex::nn {

// The keys (after RoPE) and values one attention layer computed for the tokens decoded so far:
// buffers [1, Hkv, capacity, D] (allocated by the first write) whose first `length` positions
// along axis 2 are filled. A token's key and value are written in place, so a step does not copy
// the keys before it.
struct KvCacheLayer {
  int64_t capacity = 0;  // the positions the buffers hold (the model's context)
  int64_t length = 0;
  Tensor keys, values;

  // Writes k and v [1, Hkv, T, D] at positions length .. length + T - 1.
  void append(const Tensor& k, const Tensor& v) {
    const int64_t time = k.dim(2);
    REX_CHECK(length + time <= capacity, "KvCacheLayer: ", time, " more tokens after ", length,
              " do not fit ", capacity);
    if (!keys.defined()) {
      const Shape shape{1, k.dim(1), capacity, k.dim(3)};
      keys = Tensor::empty(shape, DType::f32, k.device());
      values = Tensor::empty(shape, DType::f32, k.device());
    }
    detail::copy_axis_block(k, time, 0, keys, capacity, length, k.dim(1), time, k.dim(3));
    detail::copy_axis_block(v, time, 0, values, capacity, length, k.dim(1), time, k.dim(3));
    length += time;
  }
};

class CausalSelfAttention : public Module {
 public:
  CausalSelfAttention(int64_t dim, int64_t heads, int64_t kv_heads, float rope_theta,
                      Generator& gen, float init_std, float out_std)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(dim / heads), rope_theta_(rope_theta) {
    q = register_module("q", std::make_shared<Linear>(dim, heads * head_dim_, gen, init_std));
    k = register_module("k", std::make_shared<Linear>(dim, kv_heads * head_dim_, gen, init_std));
    v = register_module("v", std::make_shared<Linear>(dim, kv_heads * head_dim_, gen, init_std));
    o = register_module("o", std::make_shared<Linear>(heads * head_dim_, dim, gen, out_std));
  }

  // x [B, T, d] -> [B, T, d]. With a cache (B = 1): an empty one receives the keys and values of
  // the T tokens; a filled one takes one token (T = 1), which continues the cached ones.
  Tensor forward(const Tensor& x, KvCacheLayer* cache = nullptr) const {
    const int64_t batch = x.dim(0), time = x.dim(1);
    const int64_t past = cache ? cache->length : 0;
    REX_CHECK(
        !cache || (batch == 1 && (past == 0 || time == 1)),
        "CausalSelfAttention: a KV cache takes one sequence, and one token once filled; got x ",
        x.shape(), " after ", past, " cached tokens");
    if (!cache) {  // q and k rotated into one tensor, which attention reads as it is
      const Tensor q_raw = q->forward(x), k_raw = k->forward(x);
      const Tensor qk = rope_qk(q_raw, k_raw, heads_, kv_heads_, rope_theta_);
      const Tensor vh = reshape(v->forward(x), {batch, time, kv_heads_, head_dim_});
      return o->forward(
          reshape(causal_attention_packed(qk, vh, heads_), {batch, time, heads_ * head_dim_}));
    }
    // [B, T, n, D] -> [B, n, T, D], the cache's order (with T = 1 the same order of elements).
    auto heads_first = [&](const Tensor& t, int64_t n) {
      return time == 1 ? reshape(t, {batch, n, 1, head_dim_}) : permute(t, {0, 2, 1, 3});
    };
    const Tensor qh = rope_heads(q->forward(x), heads_, rope_theta_, past);
    const Tensor kh = rope_heads(k->forward(x), kv_heads_, rope_theta_, past);
    const Tensor vh = reshape(v->forward(x), {batch, time, kv_heads_, head_dim_});
    cache->append(heads_first(kh, kv_heads_), heads_first(vh, kv_heads_));
    // After a prefill, the token attends to every cached key and value, its own included.
    const Tensor heads_out = past == 0 ? causal_attention(qh, kh, vh, AttentionLayout::time_first)
                                       : newest_query(qh, slice(cache->keys, 2, 0, past + 1),
                                                      slice(cache->values, 2, 0, past + 1));
    return o->forward(reshape(heads_out, {batch, time, heads_ * head_dim_}));
  }

  // forward of one token x [d] at position p = cache.length on the host, into out [d]: the
  // cache's buffers and every weight on the CPU; `rope_cos` and `rope_sin` [D / 2] are the RoPE
  // table at p (detail::rope_table); the weight products by `weights`.
  void step_on_cpu(const float* x, float* out, KvCacheLayer& cache, const float* rope_cos,
                   const float* rope_sin, DecodeWeights& weights) const {
    const int64_t dim = heads_ * head_dim_, kv_dim = kv_heads_ * head_dim_;
    const int64_t p = cache.length, capacity = cache.capacity, seen = p + 1;
    const int64_t group = heads_ / kv_heads_;
    REX_CHECK(p < capacity, "CausalSelfAttention: the cache is full (", capacity, " tokens)");
    // q and k side by side, H + Hkv rows of D, so that one call rotates both.
    std::vector<float> scratch(static_cast<size_t>(2 * (dim + kv_dim) + kv_dim + group * seen));
    float *qk_raw = scratch.data(), *qk = qk_raw + dim + kv_dim, *v_new = qk + dim + kv_dim;
    float* scores = v_new + kv_dim;  // [G, seen] per kv head
    weights.times(x, q->weight, qk_raw);
    weights.times(x, k->weight, qk_raw + dim);
    weights.times(x, v->weight, v_new);
    detail::cpu::rope(qk_raw, nullptr, rope_cos, rope_sin, qk, nullptr,
                      detail::RopeRows{1, heads_ + kv_heads_, 1}, head_dim_, 1.0f);
    // Head h's key and value go to position p of head h's [capacity, D] block.
    float* keys = cache.keys.data<float>();
    float* values = cache.values.data<float>();
    for (int64_t h = 0; h < kv_heads_; ++h) {
      const int64_t at = (h * capacity + p) * head_dim_;
      std::copy_n(qk + dim + h * head_dim_, head_dim_, keys + at);
      std::copy_n(v_new + h * head_dim_, head_dim_, values + at);
    }
    ++cache.length;
    // newest_query per kv head: query rows [G, D] against its keys and values [seen, D].
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
    std::vector<float> merged(static_cast<size_t>(dim));
    for (int64_t h = 0; h < kv_heads_; ++h) {
      const float* head_keys = keys + h * capacity * head_dim_;
      const float* head_values = values + h * capacity * head_dim_;
      const int64_t row = h * group * head_dim_;
      detail::gemm(qk + row, head_keys, scores, group, seen, head_dim_, false, true);
      for (int64_t i = 0; i < group * seen; ++i) scores[i] *= scale;
      detail::cpu::softmax(scores, scores, group, seen, Shape{group, seen});
      detail::gemm(scores, head_values, merged.data() + row, group, head_dim_, seen, false, false);
    }
    weights.times(merged.data(), o->weight, out);
  }

  std::shared_ptr<Linear> q, k, v, o;

 private:
  // The attention of one query position that sees every key: q [1, 1, H, D] against keys and
  // values [1, Hkv, L, D] -> [1, H, 1, D]. Query head h = kv head * G + member, so q read as
  // [1, Hkv, G, D] lines each group up with its kv head.
  Tensor newest_query(const Tensor& qh, const Tensor& keys, const Tensor& values) const {
    const int64_t group = heads_ / kv_heads_;
    const Tensor grouped = reshape(qh, {1, kv_heads_, group, head_dim_});
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
    const Tensor p = softmax(matmul(grouped, keys, {.transpose_b = true}) * scale);  // [1,Hkv,G,L]
    return reshape(matmul(p, values), {1, heads_, 1, head_dim_});
  }

  int64_t heads_, kv_heads_, head_dim_;
  float rope_theta_;
};

}  // namespace rex::nn
