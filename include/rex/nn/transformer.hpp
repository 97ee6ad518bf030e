// The decoder-only language model: token embedding, n pre-norm blocks, final RMSNorm, LM head.
//
//   block l:  h = h + Attention(RMSNorm(h));  h = h + FFN_l(RMSNorm(h))
// Each residual add is made by the norm that follows it (add_rms_norm: one kernel on CUDA), so a
// block takes its input with its attention norm already applied and hands on its output with the
// next norm's (the next block's attention norm, or the final norm).
// where FFN_l is a dense SwiGLU (ffn = "dense") or the ReX-MoE layer of rex/nn/moe.hpp, whose
// experts live in expert_tables.{l / r}. The loss is the mean next-token cross-entropy plus, for
// MoE models, the sum over layers of each layer's auxiliary loss.
//
// decode is the same pass for inference with a KV cache (rex/train/sample.hpp): a window is
// prefilled once, then each token runs alone, attending to the keys and values cached for the
// tokens before it (rex/nn/attention.hpp); the FFN or the MoE router sees just that token, under
// the same PSR mask. The prefill runs forward's ops (so its logits are forward's, byte for byte)
// and so does a token on a GPU; on the CPU a token runs step_on_cpu, the same computation on raw
// host buffers by the CPU kernels behind those ops, without their per-op overhead: a token's
// matrix-vector products are then most of its time, bound by reading the weights from memory
// (docs/performance.md, "Sampling with a KV cache").
//
// Parameter names (checkpoints, the PyTorch twin): embed.weight, layers.{l}.attn_norm.weight,
// layers.{l}.attn.{q,k,v,o}.weight, layers.{l}.ffn_norm.weight,
// layers.{l}.ffn.{gate,up,down}.weight (dense) or layers.{l}.moe.router.weight and
// layers.{l}.moe.shared.{j}.{gate,up,down}.weight (MoE),
// expert_tables.{b}.experts.{i}.{gate,up,down}.weight, norm.weight, lm_head.weight (untied only).
#pragma once

#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "rex/nn/attention.hpp"
#include "rex/nn/moe.hpp"

namespace rex::nn {

struct LmOutput {
  Tensor logits;    // [B * T, V]
  Tensor lm_loss;   // mean cross-entropy (undefined without targets)
  Tensor aux_loss;  // sum of the MoE layers' auxiliary losses (undefined for a dense model)
  Tensor loss;      // lm_loss + aux_loss: what training minimises
  // Per MoE layer: routed slots per pool expert (on CUDA read from the device when first asked).
  std::vector<DeviceCounts> expert_counts;
  int64_t candidates = 0;  // PSR N_t at this step (0 for dense)
};

// What one block computed: its output and, for a MoE block, what its router measured.
struct BlockOutput {
  Tensor h;                    // [B, T, d]
  Tensor next_input;           // next_norm(h), the next block's (or the head's) input
  Tensor aux_loss;             // the MoE layer's auxiliary loss (undefined when dense)
  DeviceCounts expert_counts;  // routed slots per pool expert (undefined when dense)
  int64_t candidates = 0;      // PSR N_t at this step (0 when dense)
};

class TransformerBlock : public Module {
 public:
  TransformerBlock(const ModelConfig& c, int64_t layer, std::shared_ptr<ExpertTable> table,
                   Generator& gen, float out_std) {
    const float std = static_cast<float>(c.init_std), eps = static_cast<float>(c.norm_eps);
    attn_norm = register_module("attn_norm", std::make_shared<RMSNorm>(c.d_model, eps));
    attn = register_module("attn", std::make_shared<CausalSelfAttention>(
                                       c.d_model, c.n_heads, c.n_kv_heads,
                                       static_cast<float>(c.rope_theta), gen, std, out_std));
    ffn_norm = register_module("ffn_norm", std::make_shared<RMSNorm>(c.d_model, eps));
    if (table) {
      moe = register_module("moe", std::make_shared<MoeLayer>(c, layer, table, gen, std, out_std));
    } else {
      ffn = register_module("ffn", std::make_shared<SwiGLU>(c.d_model, c.d_ff, gen, std, out_std));
    }
  }

  // h [B, T, d] and attn_input = attn_norm(h) -> the output h [B, T, d] and next_norm(h), with
  // what a MoE layer measured; `cache` as in CausalSelfAttention::forward (decoding measures
  // nothing).
  BlockOutput forward(const Tensor& h, const Tensor& attn_input, const RMSNorm& next_norm,
                      const RoutingStep& at, KvCacheLayer* cache = nullptr) const {
    const int64_t first_position = cache ? cache->length : 0;  // before attention extends it
    const AddRmsNorm x = ffn_norm->forward(h, attn->forward(attn_input, cache));
    BlockOutput out;
    Tensor delta;
    if (!moe) {
      delta = ffn->forward(x.y);
    } else {
      MoeOutput routed = moe->forward(reshape(x.y, {-1, h.dim(2)}), at, /*measure=*/!cache,
                                      /*sequence_length=*/h.dim(1), first_position);
      delta = reshape(routed.y, h.shape().dims());
      out.aux_loss = routed.aux_loss;
      out.expert_counts = std::move(routed.expert_counts);
      out.candidates = routed.candidates;
    }
    AddRmsNorm next = next_norm.forward(x.sum, delta);
    out.h = std::move(next.sum);
    out.next_input = std::move(next.y);
    return out;
  }

  // forward of one token h [d] (in place) on the host, the next in `cache`; `rope_cos` and
  // `rope_sin` as in CausalSelfAttention::step_on_cpu.
  void step_on_cpu(float* h, KvCacheLayer& cache, const float* rope_cos, const float* rope_sin,
                   const RoutingStep& at, DecodeWeights& weights) const {
    const int64_t d = attn_norm->weight.numel();
    const int64_t position = cache.length;  // before attention extends the cache
    std::vector<float> normed(static_cast<size_t>(d)), delta(static_cast<size_t>(d));
    attn_norm->row_on_cpu(h, normed.data());
    attn->step_on_cpu(normed.data(), delta.data(), cache, rope_cos, rope_sin, weights);
    for (int64_t i = 0; i < d; ++i) h[i] += delta[i];
    ffn_norm->row_on_cpu(h, normed.data());
    if (moe) {
      moe->step_on_cpu(normed.data(), delta.data(), at, position, weights);
    } else {
      swiglu_row_on_cpu(normed.data(), {ffn.get()}, delta.data(), weights);
    }
    for (int64_t i = 0; i < d; ++i) h[i] += delta[i];
  }

  std::shared_ptr<RMSNorm> attn_norm, ffn_norm;
  std::shared_ptr<CausalSelfAttention> attn;
  std::shared_ptr<SwiGLU> ffn;    // dense model
  std::shared_ptr<MoeLayer> moe;  // MoE model
};

// The keys and values every layer of a TransformerLM cached for the tokens decoded so far, and
// in bf16 the weights rounded once for decoding (rex/nn/decode_weights.hpp). clear() empties the
// keys and values (a new window) and keeps the rounded weights: the model is the same.
struct KvCache {
  std::vector<KvCacheLayer> layers;  // one per block (empty before the first token)
  DecodeWeights weights;
  int64_t length() const { return layers.empty() ? 0 : layers.front().length; }
  void clear() { layers.clear(); }
};

class TransformerLM : public Module {
 public:
  // Builds and initialises the model; the seed fixes every weight. An invalid config (see
  // nn::validate) or an unset vocab_size is an error.
  TransformerLM(const ModelConfig& config, uint64_t seed) : config_(config) {
    validate(config);
    REX_CHECK(config.vocab_size > 0, "TransformerLM: vocab_size is not set");
    Generator gen(seed);
    const float std = static_cast<float>(config.init_std);
    const float out_std = std / std::sqrt(2.0f * static_cast<float>(config.n_layers));
    embed = register_module(
        "embed", std::make_shared<Embedding>(config.vocab_size, config.d_model, gen, std));
    const bool is_moe = config.ffn == "moe";
    const int64_t reuse = config.moe.reuse;
    std::vector<std::shared_ptr<ExpertTable>> tables;
    for (int64_t l = 0; l < config.n_layers; ++l) {
      if (is_moe && l % reuse == 0)
        tables.push_back(std::make_shared<ExpertTable>(reuse * config.moe.experts_per_layer,
                                                       config.d_model, config.moe.d_expert, gen,
                                                       std, out_std));
      layers.push_back(
          register_module("layers." + std::to_string(l),
                          std::make_shared<TransformerBlock>(
                              config, l, is_moe ? tables.back() : nullptr, gen, out_std)));
    }
    for (size_t b = 0; b < tables.size(); ++b)
      register_module("expert_tables." + std::to_string(b), tables[b]);
    norm = register_module(
        "norm", std::make_shared<RMSNorm>(config.d_model, static_cast<float>(config.norm_eps)));
    if (!config.tie_embeddings)
      lm_head = register_module(
          "lm_head", std::make_shared<Linear>(config.d_model, config.vocab_size, gen, std));
  }

  // ids [B, T] i32 (T <= context); targets [B, T] i32 or undefined (then no losses).
  LmOutput forward(const Tensor& ids, const Tensor& targets, const RoutingStep& at) const {
    REX_CHECK(ids.rank() == 2 && ids.dim(1) >= 1 && ids.dim(1) <= config_.context,
              "TransformerLM: ids must be [B, T] with 1 <= T <= context (", config_.context,
              "), got ", ids.shape());
    std::vector<Tensor> aux_losses;
    LmOutput out = run(ids, at, nullptr, &aux_losses);
    if (!targets.defined()) {
      if (!aux_losses.empty()) out.aux_loss = sum_of(aux_losses);
      return out;
    }
    REX_CHECK(targets.shape() == ids.shape(), "TransformerLM: targets ", targets.shape(),
              " do not match ids ", ids.shape());
    out.lm_loss = cross_entropy(out.logits, reshape(targets, {-1}));
    if (aux_losses.empty()) {
      out.loss = out.lm_loss;
      return out;
    }
    // aux = the layers' losses added in layer order, and loss = aux + lm (= lm + aux: an add's
    // bits do not depend on its order), both from one pass.
    const size_t layers_with_aux = aux_losses.size();
    aux_losses.push_back(out.lm_loss);
    SumAndPrefix sums = sum_of_with_prefix(aux_losses, layers_with_aux);
    out.aux_loss = std::move(sums.prefix);
    out.loss = std::move(sums.sum);
    return out;
  }

  // Inference with a KV cache, without autograd: the logits [T, V] of ids [1, T] i32, which
  // continue the tokens in `cache` and join them. An empty cache takes 1 <= T <= context tokens
  // (the prefill: the same computation as forward), a filled one a single token, while the cache
  // holds fewer than context.
  Tensor decode(const Tensor& ids, KvCache& cache, const RoutingStep& at) const {
    const int64_t cached = cache.length();
    const bool fits = ids.rank() == 2 && ids.dim(0) == 1 &&
                      (cached == 0 ? ids.dim(1) >= 1 && ids.dim(1) <= config_.context
                                   : ids.dim(1) == 1 && cached < config_.context);
    REX_CHECK(fits, "TransformerLM::decode: expected ids [1, T] with 1 <= T <= context (",
              config_.context, ") into an empty cache, or [1, 1] into one holding fewer than ",
              "context tokens; got ", ids.shape(), " after ", cached, " cached tokens");
    REX_CHECK(cached == 0 || cache.layers.size() == layers.size(),
              "TransformerLM::decode: the cache ", "holds ", cache.layers.size(),
              " layers, the model has ", layers.size());
    NoGradGuard no_grad;
    if (cached == 0) {
      KvCacheLayer empty;
      empty.capacity = config_.context;
      cache.layers.assign(layers.size(), empty);
    }
    if (cached > 0 && embed->weight.device().is_cpu()) return step_on_cpu(ids, cache, at);
    return run(ids, at, &cache, nullptr).logits;
  }

  const ModelConfig& config() const { return config_; }

  std::shared_ptr<Embedding> embed;
  std::vector<std::shared_ptr<TransformerBlock>> layers;
  std::shared_ptr<RMSNorm> norm;
  std::shared_ptr<Linear> lm_head;  // null when tied to embed

 private:
  // The logits [B T, V] and what the MoE layers measured, their auxiliary losses in layer order
  // into aux_losses (when given; no other losses); `cache` as in decode.
  LmOutput run(const Tensor& ids, const RoutingStep& at, KvCache* cache,
               std::vector<Tensor>* aux_losses) const {
    LmOutput out;
    Tensor h = embed->forward(ids);
    Tensor normed = (layers.empty() ? *norm : *layers.front()->attn_norm).forward(h);
    for (size_t l = 0; l < layers.size(); ++l) {
      const RMSNorm& next_norm = l + 1 < layers.size() ? *layers[l + 1]->attn_norm : *norm;
      BlockOutput block =
          layers[l]->forward(h, normed, next_norm, at, cache ? &cache->layers[l] : nullptr);
      h = std::move(block.h);
      normed = std::move(block.next_input);
      if (!block.aux_loss.defined()) continue;  // a dense or decoding block measures nothing
      if (aux_losses) aux_losses->push_back(std::move(block.aux_loss));
      out.expert_counts.push_back(std::move(block.expert_counts));
      out.candidates = block.candidates;  // the same N_t in every layer
    }
    out.logits =
        linear(reshape(normed, {-1, config_.d_model}), lm_head ? lm_head->weight : embed->weight);
    return out;
  }

  // decode of one token on the host: the logits [1, V] by the layers' step_on_cpu, the same
  // computation as run's ops one token at a time, without their per-op overhead.
  Tensor step_on_cpu(const Tensor& ids, KvCache& cache, const RoutingStep& at) const {
    const int64_t d = config_.d_model, vocab = config_.vocab_size;
    const int32_t id = ids.to(Device::cpu()).data<int32_t>()[0];
    REX_CHECK(id >= 0 && id < vocab, "TransformerLM::decode: token id ", id,
              " is outside the vocabulary of ", vocab);
    const float* row = embed->weight.data<float>() + int64_t{id} * d;
    std::vector<float> h(row, row + d), normed(static_cast<size_t>(d));
    const detail::RopeTable rope_at = detail::rope_table(
        1, d / config_.n_heads, static_cast<float>(config_.rope_theta), cache.length());
    for (size_t l = 0; l < layers.size(); ++l)
      layers[l]->step_on_cpu(h.data(), cache.layers[l], rope_at.cos.data<float>(),
                             rope_at.sin.data<float>(), at, cache.weights);
    norm->row_on_cpu(h.data(), normed.data());
    Tensor logits = Tensor::empty({1, vocab});
    cache.weights.times(normed.data(), lm_head ? lm_head->weight : embed->weight,
                        logits.data<float>());
    return logits;
  }

  ModelConfig config_;
};

}  // namespace rex::nn
