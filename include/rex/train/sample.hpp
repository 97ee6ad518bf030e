// Text generation from a trained model: next-token sampling at a temperature (0 = greedy) and a
// generation loop that continues a prompt one character at a time. Each character is one full
// forward pass over the last `context` tokens (no KV cache: the models are small and samples are
// short). The draws come from a Generator seeded by the caller, so a sample is reproducible.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
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

// The n characters that continue `prompt` (which must not be empty).
inline std::string generate(const nn::TransformerLM& model, const data::Tokenizer& tok,
                            const std::string& prompt, int64_t n, double temperature, uint64_t seed,
                            const nn::RoutingStep& at) {
  REX_CHECK(!prompt.empty(), "generate: the prompt must not be empty");
  NoGradGuard no_grad;
  Generator gen(seed);
  std::vector<int32_t> ids = tok.encode(prompt);
  // Only the tokenizer's ids are drawn; the model's vocabulary may be padded beyond them.
  const int64_t context = model.config().context, vocab = tok.vocab_size();
  const int64_t stride = model.config().vocab_size;
  const Device device = model.named_parameters().front().second.device();
  std::vector<int32_t> produced;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(ids.size()) - context);
    std::vector<int32_t> window(ids.begin() + start, ids.end());
    const int64_t time = static_cast<int64_t>(window.size());
    const Tensor logits = model.forward(from_vector(window, {1, time}).to(device), Tensor(), at)
                              .logits.to(Device::cpu());
    const int32_t next =
        sample_token(logits.data<float>() + (time - 1) * stride, vocab, temperature, gen);
    ids.push_back(next);
    produced.push_back(next);
  }
  return tok.decode(produced);
}

}  // namespace rex::train
