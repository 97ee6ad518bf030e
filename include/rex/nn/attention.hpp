// Causal self-attention with RoPE and grouped-query heads, and its KV cache for decoding.
//
// x [B, T, d] -> q = x Wq^T, k = x Wk^T, v = x Wv^T, split into heads [B, H, T, D] (D = d / H;
// k and v have Hkv heads, each shared by H / Hkv query heads), RoPE on q and k, the fused causal
// attention of rex/ops/attention.hpp, heads merged back to [B, T, d], output projection Wo.
//
// Decoding (inference, one sequence): given a KvCacheLayer, the keys (after RoPE) and values of
// the tokens are kept. An empty cache takes a whole window (the prefill: the computation above,
// keys and values kept); then each call takes one new token at position p = the cached length
// (RoPE at p, as the full pass over the window would rotate it), appends its key and value, and
// attends from it to all p + 1 keys, which it may all see: softmax(q K^T / sqrt(D)) V composed
// from matmul and softmax, so it runs on every device. It differs from the full pass only in
// rounding (the order of the sums).
#pragma once

#include <cmath>
#include <memory>

#include "rex/nn/layers.hpp"
#include "rex/ops/attention.hpp"
#include "rex/ops/rope.hpp"
#include "rex/ops/shape.hpp"
#include "rex/ops/softmax.hpp"

namespace rex::nn {

// The keys (after RoPE) and values one attention layer computed for the tokens decoded so far,
// each [1, Hkv, L, D]; undefined while empty.
struct KvCacheLayer {
  Tensor keys, values;
  int64_t length() const { return keys.defined() ? keys.dim(2) : 0; }
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
    const int64_t past = cache ? cache->length() : 0;
    REX_CHECK(
        !cache || (batch == 1 && (past == 0 || time == 1)),
        "CausalSelfAttention: a KV cache takes one sequence, and one token once filled; got x ",
        x.shape(), " after ", past, " cached tokens");
    // [B, T, n D] -> [B, n, T, D] (with T = 1 the same order of elements: no copy).
    auto split_heads = [&](const Tensor& t, int64_t n) {
      if (time == 1) return reshape(t, {batch, n, 1, head_dim_});
      return permute(reshape(t, {batch, time, n, head_dim_}), {0, 2, 1, 3});
    };
    const Tensor qh = rope(split_heads(q->forward(x), heads_), rope_theta_, past);
    Tensor kh = rope(split_heads(k->forward(x), kv_heads_), rope_theta_, past);
    Tensor vh = split_heads(v->forward(x), kv_heads_);
    if (past > 0) {
      kh = concat({cache->keys, kh}, 2);
      vh = concat({cache->values, vh}, 2);
    }
    if (cache) cache->keys = kh, cache->values = vh;
    const Tensor heads_out = past == 0 ? causal_attention(qh, kh, vh) : newest_query(qh, kh, vh);
    const Tensor merged = reshape(time == 1 ? heads_out : permute(heads_out, {0, 2, 1, 3}),
                                  {batch, time, heads_ * head_dim_});
    return o->forward(merged);
  }

  std::shared_ptr<Linear> q, k, v, o;

 private:
  // The attention of one query position that sees every key: q [1, H, 1, D] against keys and
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
