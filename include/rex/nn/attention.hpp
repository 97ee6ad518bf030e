// Causal self-attention with RoPE and grouped-query heads.
//
// x [B, T, d] -> q = x Wq^T, k = x Wk^T, v = x Wv^T, split into heads [B, H, T, D] (D = d / H;
// k and v have Hkv heads, each shared by H / Hkv query heads), RoPE on q and k, the fused causal
// attention of rex/ops/attention.hpp, heads merged back to [B, T, d], output projection Wo.
#pragma once

#include <memory>

#include "rex/nn/layers.hpp"
#include "rex/ops/attention.hpp"
#include "rex/ops/rope.hpp"

namespace rex::nn {

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

  Tensor forward(const Tensor& x) const {
    const int64_t batch = x.dim(0), time = x.dim(1);
    auto split_heads = [&](const Tensor& t, int64_t n) {
      return permute(reshape(t, {batch, time, n, head_dim_}), {0, 2, 1, 3});
    };
    const Tensor qh = rope(split_heads(q->forward(x), heads_), rope_theta_);
    const Tensor kh = rope(split_heads(k->forward(x), kv_heads_), rope_theta_);
    const Tensor vh = split_heads(v->forward(x), kv_heads_);
    const Tensor merged = reshape(permute(causal_attention(qh, kh, vh), {0, 2, 1, 3}),
                                  {batch, time, heads_ * head_dim_});
    return o->forward(merged);
  }

  std::shared_ptr<Linear> q, k, v, o;

 private:
  int64_t heads_, kv_heads_, head_dim_;
  float rope_theta_;
};

}  // namespace rex::nn
