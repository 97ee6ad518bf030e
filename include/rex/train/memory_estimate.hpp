// How much memory training a configuration needs, worked out from the config alone, so that a model
// too big for the machine is refused with the numbers and the keys before anything is allocated
// (rather than allocating for minutes until the machine runs out).
//
// The parameter count is a closed form of the module tree (rex/nn/transformer.hpp): embeddings,
// per block attention (q, k, v, o) and two RMSNorm weights, the dense SwiGLU FFN or the MoE layer
// (router, shared experts, and the layer's share of its block's expert table), the final norm and
// the LM head when untied. Training holds each parameter four times in f32: the weight, its
// gradient and AdamW's two moments. Activations are a rough lower bound: the tensors one step keeps
// for the backward pass (per token and layer the residual stream, the normalised inputs, q, k, v,
// the attention probabilities, the FFN's gate and up outputs of every active expert), plus the
// logits. Counts are doubles so that absurd configs cannot overflow.
#pragma once

#include <cstdint>
#include <string>

#include <unistd.h>

#include "rex/core/error.hpp"
#include "rex/nn/config.hpp"

namespace rex::train {

struct MemoryEstimate {
  double parameters = 0;          // the model's parameter count (exact)
  double parameter_bytes = 0;     // f32 weights; the gradients take as much again
  double optimizer_bytes = 0;     // AdamW's exp_avg and exp_avg_sq
  double activation_bytes = 0;    // rough: what one step keeps for the backward pass
  const char* largest_part = "";  // the parameter group that dominates, with its keys

  double total_bytes() const { return 2 * parameter_bytes + optimizer_bytes + activation_bytes; }
};

// The vocabulary assumed when model.vocab_size is 0 (taken from the data later): the byte-level
// tokenizer's largest possible vocabulary (a BPE tokenizer's size is checked once it is read,
// train::take_vocab_size).
inline constexpr int64_t kLargestByteVocabulary = 256;

inline MemoryEstimate estimate_training_memory(const nn::ModelConfig& m, int64_t batch_size) {
  const double vocab =
      static_cast<double>(m.vocab_size > 0 ? m.vocab_size : kLargestByteVocabulary);
  const double d = static_cast<double>(m.d_model), layers = static_cast<double>(m.n_layers);
  const double head_dim = d / static_cast<double>(m.n_heads);
  const double kv = static_cast<double>(m.n_kv_heads) * head_dim;
  const double embeddings = vocab * d * (m.tie_embeddings ? 1 : 2);
  const double attention = layers * (2 * d * d + 2 * kv * d + 2 * d) + d;  // + the final norm
  double ffn = 0, hidden_per_token = 0;  // FFN parameters; FFN hidden units active per token
  const char* ffn_part = "";
  if (m.ffn == "dense") {
    ffn = layers * 3 * d * static_cast<double>(m.d_ff);
    hidden_per_token = static_cast<double>(m.d_ff);
    ffn_part = "the dense FFNs (model.n_layers x model.d_model x model.d_ff)";
  } else {
    const nn::MoeConfig& e = m.moe;
    const double expert = 3 * d * static_cast<double>(e.d_expert);
    const double pool = static_cast<double>(e.reuse * e.experts_per_layer);
    const double own = static_cast<double>(e.experts_per_layer + e.shared_experts);
    ffn = layers * (own * expert + pool * d);
    hidden_per_token =
        static_cast<double>(e.top_k + e.shared_experts) * static_cast<double>(e.d_expert);
    ffn_part =
        "the experts (model.n_layers x (moe.experts_per_layer + moe.shared_experts) x "
        "model.d_model x moe.d_expert)";
  }
  MemoryEstimate out;
  out.parameters = embeddings + attention + ffn;
  out.parameter_bytes = 4 * out.parameters;
  out.optimizer_bytes = 2 * out.parameter_bytes;
  out.largest_part = ffn >= embeddings && ffn >= attention ? ffn_part
                     : embeddings >= attention ? "the embeddings (model.vocab_size x model.d_model)"
                                               : "attention (model.n_layers x model.d_model^2)";
  const double tokens = static_cast<double>(batch_size) * static_cast<double>(m.context);
  const double per_token_layer =
      6 * d + 2 * kv + 2 * static_cast<double>(m.n_heads) * static_cast<double>(m.context) +
      3 * hidden_per_token;
  out.activation_bytes = 4 * tokens * (layers * per_token_layer + 2 * vocab);
  return out;
}

// This machine's physical memory in bytes (0 when the system does not say).
inline double physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page_size > 0 ? static_cast<double>(pages) * static_cast<double>(page_size)
                                    : 0.0;
}

// Throws rex::Error, with the estimate and the keys that drive it, when training `m` at
// `batch_size` sequences per step needs more than `limit_bytes` (default: the physical memory).
inline void check_fits_in_memory(const nn::ModelConfig& m, int64_t batch_size,
                                 double limit_bytes = physical_memory_bytes()) {
  if (limit_bytes <= 0) return;
  const MemoryEstimate e = estimate_training_memory(m, batch_size);
  if (e.total_bytes() <= limit_bytes) return;
  const double gib = 1024.0 * 1024.0 * 1024.0;
  throw Error(detail::concat(
      "config: training this model needs about ", e.total_bytes() / gib, " GiB, more than the ",
      limit_bytes / gib, " GiB of memory of this machine: ", e.parameters, " parameters (",
      e.parameter_bytes / gib, " GiB of weights, as much for gradients, ", e.optimizer_bytes / gib,
      " GiB of AdamW state), mostly ", e.largest_part, ", and ~", e.activation_bytes / gib,
      " GiB of activations (train.batch_size x model.context tokens); make those keys smaller"));
}

}  // namespace rex::train
