// Model configuration: the transformer, its MoE layers and PSR, as plain structs.
//
// Every field is listed once, in for_each_field, with its JSON section, key and a one-line meaning.
// With the training recipe's table (rex/train/config.hpp, which adds the "train" section) it
// drives JSON reading and writing, `--set section.key=value` overrides, the unknown-key check and
// the generated documentation (docs/formats.md is checked against it), so a new field cannot be
// half-added. validate() rejects impossible combinations with a message naming the keys involved,
// and any value the run could not store or compute with: a string that is not UTF-8 (JSON cannot
// hold it) or a number that is not finite or beyond float range (the model computes in f32).
// The defaults are the shipped tiny R4 + linear PSR model.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>

#include "rex/core/error.hpp"

namespace rex::detail {

// Whether `text` is well-formed UTF-8: no stray continuation bytes, no truncated, overlong or
// surrogate sequences, nothing above U+10FFFF.
inline bool is_valid_utf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto byte = [&](size_t k) { return static_cast<uint8_t>(text[k]); };
    const uint8_t lead = byte(i);
    size_t length = 0;
    uint32_t code = 0, min_code = 0;
    if (lead < 0x80) {
      ++i;
      continue;
    } else if ((lead & 0xE0) == 0xC0) {
      length = 2, code = lead & 0x1Fu, min_code = 0x80;
    } else if ((lead & 0xF0) == 0xE0) {
      length = 3, code = lead & 0x0Fu, min_code = 0x800;
    } else if ((lead & 0xF8) == 0xF0) {
      length = 4, code = lead & 0x07u, min_code = 0x10000;
    } else {
      return false;
    }
    if (text.size() - i < length) return false;
    for (size_t k = 1; k < length; ++k) {
      if ((byte(i + k) & 0xC0) != 0x80) return false;
      code = (code << 6) | (byte(i + k) & 0x3Fu);
    }
    if (code < min_code || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return false;
    i += length;
  }
  return true;
}

// Throws naming `key` (section.key) when a config value cannot be stored or used: a string that
// is not UTF-8, a number that is not finite or does not fit in a float.
template <class T>
void check_storable(const std::string& key, const T& field) {
  if constexpr (std::is_same_v<T, std::string>) {
    REX_CHECK(is_valid_utf8(field), "config: ", key, " is not valid UTF-8 text");
  } else if constexpr (std::is_floating_point_v<T>) {
    REX_CHECK(std::isfinite(field) && std::abs(field) <= std::numeric_limits<float>::max(),
              "config: ", key, " = ", field,
              " is not a finite number within float range (about 3.4e38)");
  }
}

}  // namespace rex::detail

namespace rex::nn {

struct MoeConfig {
  int64_t experts_per_layer = 4;  // N: experts each layer owns
  int64_t top_k = 2;              // k: experts each token is sent to
  int64_t d_expert = 256;         // hidden width of one SwiGLU expert
  int64_t reuse = 4;              // r: layers per block sharing one expert table (1 = vanilla MoE)
  int64_t shared_experts = 0;     // always-on experts per layer (DeepSeekMoE style), width d_expert
  bool renormalize = false;       // divide the top-k gates by their sum
  // "softmax_topk": gates are the softmax over the pool of the chosen experts (the paper's
  // equations); "topk_softmax": top-k on the logits, then a softmax over the k (Megatron-LM).
  std::string gating = "softmax_topk";
  double aux_loss_coef = 0.01;  // alpha of the Switch load-balancing loss
  double z_loss_coef = 0.0;     // beta of the router z-loss
};

struct PsrConfig {
  std::string schedule = "linear";  // "none" (all rN candidates), "linear" or "stepwise"
  std::string masks = "random";     // which experts are candidates: "random" or "own_first"
  int64_t t_start = 400;            // t_s: steps up to t_s see N candidates
  int64_t t_end = 2800;             // t_e: steps after t_e see all rN candidates
  std::string mask_scope = "step";  // one mask per "step", "sequence" or "token" (and layer)
  bool tie_block = false;           // the r layers of a block share their masks
};

struct ModelConfig {
  int64_t vocab_size = 0;  // from the tokenizer when 0 (text); token shards need it set
  int64_t d_model = 128;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 2;
  int64_t context = 64;
  std::string ffn = "moe";  // "moe" or "dense"
  int64_t d_ff = 512;       // hidden width of the dense SwiGLU FFN (ffn = "dense")
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  bool tie_embeddings = true;
  double init_std = 0.02;
  MoeConfig moe;
  PsrConfig psr;
};

// Calls f(section, key, field, meaning) for every field of the model configuration (sections
// model, moe and psr), in file order. Model is ModelConfig or const ModelConfig.
template <class Model, class F>
requires std::is_same_v<std::remove_const_t<Model>, ModelConfig>
void for_each_field(Model& m, F&& f) {
  f("model", "vocab_size", m.vocab_size,
    "vocabulary size; 0 = taken from the tokenizer (text; token shards need it set)");
  f("model", "d_model", m.d_model, "width of the residual stream");
  f("model", "n_layers", m.n_layers, "number of transformer blocks");
  f("model", "n_heads", m.n_heads, "query heads per attention layer");
  f("model", "n_kv_heads", m.n_kv_heads,
    "key/value heads (grouped-query attention; divides n_heads)");
  f("model", "context", m.context, "tokens per training sequence (and the sampling window)");
  f("model", "ffn", m.ffn, "\"moe\" (ReX-MoE layers) or \"dense\" (SwiGLU FFN, the baseline)");
  f("model", "d_ff", m.d_ff, "hidden width of the dense FFN (ffn = \"dense\")");
  f("model", "rope_theta", m.rope_theta, "RoPE base frequency");
  f("model", "norm_eps", m.norm_eps, "RMSNorm epsilon");
  f("model", "tie_embeddings", m.tie_embeddings, "LM head reuses the embedding matrix");
  f("model", "init_std", m.init_std,
    "std of the normal init (output projections: / sqrt(2 n_layers))");
  auto& e = m.moe;
  f("moe", "experts_per_layer", e.experts_per_layer, "N: experts owned by each layer");
  f("moe", "top_k", e.top_k, "k: experts per token (at most N)");
  f("moe", "d_expert", e.d_expert, "hidden width of one SwiGLU expert");
  f("moe", "reuse", e.reuse, "r: layers per block sharing an expert table; 1 = vanilla MoE");
  f("moe", "shared_experts", e.shared_experts, "always-active experts per layer (width d_expert)");
  f("moe", "renormalize", e.renormalize, "divide the k gates of a token by their sum");
  f("moe", "gating", e.gating,
    "\"softmax_topk\" (softmax over the pool, then top-k: the paper) or \"topk_softmax\" "
    "(top-k of the logits, then softmax over the k: Megatron-LM)");
  f("moe", "aux_loss_coef", e.aux_loss_coef, "alpha: weight of the load-balancing loss");
  f("moe", "z_loss_coef", e.z_loss_coef, "beta: weight of the router z-loss");
  auto& p = m.psr;
  f("psr", "schedule", p.schedule, "\"none\", \"linear\" or \"stepwise\" candidate schedule");
  f("psr", "t_start", p.t_start, "t_s: last step with N candidates");
  f("psr", "t_end", p.t_end, "t_e: first step with all rN candidates");
  f("psr", "masks", p.masks,
    "\"random\": any N_t of the pool, redrawn every step; \"own_first\": the layer's own N "
    "always, plus N_t - N borrowed ones redrawn every step");
  f("psr", "mask_scope", p.mask_scope,
    "\"step\": one mask per step and layer; \"sequence\": one per step, layer and sequence of "
    "the batch; \"token\": one per step, layer and token");
  f("psr", "tie_block", p.tie_block,
    "true: the r layers of a block share their masks (the block's index replaces the layer's)");
}

// Throws rex::Error naming the first impossible model setting (TransformerLM calls it too).
inline void validate(const ModelConfig& m) {
  const MoeConfig& e = m.moe;
  const PsrConfig& p = m.psr;
  auto positive = [](const char* key, double value) {
    REX_CHECK(value > 0, "config: ", key, " must be positive, got ", value);
  };
  nn::for_each_field(m, [](const char* section, const char* key, const auto& field, const char*) {
    detail::check_storable(std::string(section) + "." + key, field);
  });
  REX_CHECK(m.vocab_size >= 0, "config: model.vocab_size cannot be negative");
  positive("model.d_model", m.d_model);
  positive("model.n_layers", m.n_layers);
  positive("model.n_heads", m.n_heads);
  positive("model.n_kv_heads", m.n_kv_heads);
  positive("model.context", m.context);
  positive("model.norm_eps", m.norm_eps);
  positive("model.rope_theta", m.rope_theta);
  positive("model.init_std", m.init_std);
  REX_CHECK(m.d_model % m.n_heads == 0, "config: model.d_model (", m.d_model,
            ") must be divisible by model.n_heads (", m.n_heads, ")");
  REX_CHECK((m.d_model / m.n_heads) % 2 == 0,
            "config: the head width d_model / n_heads = ", m.d_model / m.n_heads,
            " must be even for RoPE");
  REX_CHECK(m.n_heads % m.n_kv_heads == 0, "config: model.n_heads (", m.n_heads,
            ") must be a multiple of model.n_kv_heads (", m.n_kv_heads, ")");
  REX_CHECK(m.ffn == "moe" || m.ffn == "dense",
            "config: model.ffn must be \"moe\" or \"dense\", got \"", m.ffn, "\"");
  // String keys are checked whatever model.ffn is: a typo is an error even where it has no effect.
  REX_CHECK(p.schedule == "none" || p.schedule == "linear" || p.schedule == "stepwise",
            "config: psr.schedule must be \"none\", \"linear\" or \"stepwise\", got \"", p.schedule,
            "\"");
  REX_CHECK(p.masks == "random" || p.masks == "own_first",
            "config: psr.masks must be \"random\" or \"own_first\", got \"", p.masks, "\"");
  REX_CHECK(p.mask_scope == "step" || p.mask_scope == "sequence" || p.mask_scope == "token",
            "config: psr.mask_scope must be \"step\", \"sequence\" or \"token\", got \"",
            p.mask_scope, "\"");
  REX_CHECK(!(p.tie_block && p.masks == "own_first"),
            "config: psr.tie_block shares one mask among the layers of a block, psr.masks = "
            "\"own_first\" keeps each layer's own experts; the two cannot both hold (set one)");
  if (m.ffn == "dense") {
    positive("model.d_ff", m.d_ff);
  } else {
    positive("moe.experts_per_layer", e.experts_per_layer);
    positive("moe.top_k", e.top_k);
    positive("moe.d_expert", e.d_expert);
    positive("moe.reuse", e.reuse);
    REX_CHECK(e.top_k <= e.experts_per_layer, "config: moe.top_k (", e.top_k,
              ") cannot exceed moe.experts_per_layer (", e.experts_per_layer,
              "): under PSR a layer may see only N candidates");
    REX_CHECK(m.n_layers % e.reuse == 0, "config: moe.reuse (", e.reuse,
              ") must divide model.n_layers (", m.n_layers, ") into whole blocks");
    REX_CHECK(e.shared_experts >= 0, "config: moe.shared_experts cannot be negative");
    REX_CHECK(e.gating == "softmax_topk" || e.gating == "topk_softmax",
              "config: moe.gating must be \"softmax_topk\" or \"topk_softmax\", got \"", e.gating,
              "\"");
    REX_CHECK(!(e.renormalize && e.gating == "topk_softmax"),
              "config: moe.renormalize has nothing to do with moe.gating = \"topk_softmax\" (its "
              "gates already sum to 1); set one of them");
    REX_CHECK(e.aux_loss_coef >= 0 && e.z_loss_coef >= 0,
              "config: moe.aux_loss_coef and moe.z_loss_coef cannot be negative");
    if (p.schedule != "none" && e.reuse > 1) {  // with r = 1 there is nothing to schedule
      REX_CHECK(p.t_start >= 0 && p.t_end > p.t_start,
                "config: PSR needs 0 <= psr.t_start < psr.t_end, got ", p.t_start, " and ",
                p.t_end);
    }
  }
  // Values the model uses as float must stay positive after rounding to float.
  positive("model.norm_eps (as float)", static_cast<float>(m.norm_eps));
}

}  // namespace rex::nn
