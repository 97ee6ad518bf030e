// Text generation from a trained model: next-token sampling at a temperature (0 = greedy) and a
// generation loop that continues a prompt one token at a time. The draws come from a Generator
// seeded by the caller, so a sample is reproducible.
//
// The window. Each token is predicted from a window of the tokens before it, at most `context`
// long: first the prompt's last `context` tokens, then one more per generated token; when it would
// grow past `context`, it restarts from its last max(1, context / 2) tokens (positions count from
// the window's first token, as in training). A window that slid by one token per step would give
// every token a full context, but then no cached key or value would stay valid: in a window that
// starts elsewhere, every token's keys and values past the first layer see other tokens.
//
// Two ways to compute the logits over a window, which differ only in rounding:
//   Decoding::kv_cache (the default): a new window is prefilled by one forward pass that keeps
//     every layer's keys and values (TransformerLM::decode; the same computation as recompute);
//     each further token is a forward pass of that token alone, attending to them.
//   Decoding::recompute: a full forward pass over the window for every token (train_tiny_rex
//     --sample-recompute), the reference the cache is tested and timed against.
// Per generated token the cache does about two tokens' work (the token itself, and on average one
// token of the prefill of context/2 tokens that every context/2 tokens need) where recompute does
// a window's: context/2 to context tokens. Greedy output is
// byte-identical whenever each greedy choice leads by more than the rounding difference
// (tests/test_sample.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "rex/core/random.hpp"
#include "rex/data/tokenizer.hpp"
#include "rex/nn/transformer.hpp"

namespace rex::train {

// A token drawn from softmax(logits / temperature) over logits[0 .. vocab), or the arg max when
// temperature is 0.
inline int32_t sample_token(const float* logits, int64_t vocab, double temperature,
                            Generator& gen) {
  if (temperature == 0)
    return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  const float top = *std::max_element(logits, logits + vocab);
  std::vector<double> weight(static_cast<size_t>(vocab));
  double total = 0;
  for (int64_t v = 0; v < vocab; ++v)
    total += weight[v] = std::exp((logits[v] - top) / temperature);
  double u = gen.uniform() * total;
  int32_t next = 0;
  while (next + 1 < vocab && u >= weight[next]) u -= weight[next++];
  return next;
}

enum class Decoding { kv_cache, recompute };

// The logits of the token after a sequence that grows one token at a time, over the window above.
class NextTokenLogits {
 public:
  // `prompt` must not be empty; `at` gives the PSR mask of the MoE layers.
  NextTokenLogits(const nn::TransformerLM& model, std::vector<int32_t> prompt, nn::RoutingStep at,
                  Decoding decoding)
      : model_(model),
        at_(at),
        decoding_(decoding),
        device_(model.named_parameters().front().second.device()),
        tokens_(std::move(prompt)) {
    REX_CHECK(!tokens_.empty(), "NextTokenLogits: the prompt must not be empty");
    start_ = std::max<int64_t>(0, length() - model.config().context);
    compute();
  }

  // [vocab] on the host: the logits of the next token.
  const Tensor& logits() const { return logits_; }
  // The tokens those logits were computed from.
  std::vector<int32_t> window() const { return {tokens_.begin() + start_, tokens_.end()}; }

  // Continues the sequence with `token` and computes the logits after it.
  void append(int32_t token) {
    tokens_.push_back(token);
    const int64_t context = model_.config().context;
    if (length() - start_ > context) {
      start_ = length() - std::max<int64_t>(1, context / 2);
      cache_.clear();
    }
    compute();
  }

 private:
  int64_t length() const { return static_cast<int64_t>(tokens_.size()); }

  void compute() {
    NoGradGuard no_grad;
    const bool prefill = decoding_ == Decoding::recompute || cache_.length() == 0;
    const std::vector<int32_t> fed = prefill ? window() : std::vector<int32_t>{tokens_.back()};
    const Tensor ids = from_vector(fed, {1, static_cast<int64_t>(fed.size())}).to(device_);
    const Tensor all = decoding_ == Decoding::recompute
                           ? model_.forward(ids, Tensor(), at_).logits
                           : model_.decode(ids, cache_, at_);  // [fed, vocab]
    logits_ = reshape(slice(all, 0, all.dim(0) - 1, all.dim(0)), {-1}).to(Device::cpu());
  }

  const nn::TransformerLM& model_;
  nn::RoutingStep at_;
  Decoding decoding_;
  Device device_;
  std::vector<int32_t> tokens_;
  int64_t start_ = 0;  // the window is tokens_[start_ ..]
  nn::KvCache cache_;  // the keys and values of the window's tokens (kv_cache)
  Tensor logits_;
};

// The n tokens that continue `prompt` (which must not be empty), drawn from the first `draw_vocab`
// ids (0: the model's whole vocabulary).
inline std::vector<int32_t> generate_tokens(const nn::TransformerLM& model,
                                            const std::vector<int32_t>& prompt, int64_t n,
                                            double temperature, uint64_t seed,
                                            const nn::RoutingStep& at,
                                            Decoding decoding = Decoding::kv_cache,
                                            int64_t draw_vocab = 0) {
  REX_CHECK(!prompt.empty(), "generate: the prompt must not be empty");
  std::vector<int32_t> produced;
  if (n <= 0) return produced;
  Generator gen(seed);
  NextTokenLogits next(model, prompt, at, decoding);
  const int64_t vocab = draw_vocab > 0 ? draw_vocab : model.config().vocab_size;
  REX_CHECK(vocab <= model.config().vocab_size, "generate: drawing from ", vocab,
            " ids, but the model has a vocabulary of ", model.config().vocab_size);
  for (int64_t i = 0; i < n; ++i) {
    produced.push_back(sample_token(next.logits().data<float>(), vocab, temperature, gen));
    if (i + 1 < n) next.append(produced.back());
  }
  return produced;
}

// The n characters that continue `prompt` (which must not be empty).
inline std::string generate(const nn::TransformerLM& model, const data::Tokenizer& tok,
                            const std::string& prompt, int64_t n, double temperature, uint64_t seed,
                            const nn::RoutingStep& at, Decoding decoding = Decoding::kv_cache) {
  // Only the tokenizer's ids are drawn; the model's vocabulary may be padded beyond them.
  return tok.decode(generate_tokens(model, tok.encode(prompt), n, temperature, seed, at, decoding,
                                    tok.vocab_size()));
}

}  // namespace rex::train
