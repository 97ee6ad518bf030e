// Sampling with the KV cache against the full recompute per token, interleaved in one run
// (rex/train/sample.hpp): the time to generate N characters (2,000 by default) of the default
// model (the built-in config of train_tiny_rex, the King James Bible's 73-byte vocabulary,
// randomly initialised: the work per token does not depend on the weights), greedily from a
// newline, with the PSR mask after the configured steps. Three contenders, rotated every repeat:
//   kv_cache    the default path;
//   recompute   a full forward pass over the same window per token (--sample-recompute);
//   sliding     the sampler before the cache (a full pass over the last `context` tokens, sliding
//               by one token per step: windows of 64 where the two above average 48), as a peer.
// Prints the median seconds of each, the ratios to kv_cache, and whether kv_cache and recompute
// wrote the same text. A fourth timing bounds what any decoder of fp32 weights could do here:
//   weights     only reading, for each of the N tokens, the weights a decoded token multiplies
//               by (attention, router, the top-k experts, the head), as consecutive slices of a
//               buffer the size of the model's parameters (no arithmetic beyond a sum).
// And the first two again with the CPU's matmul precision at bf16 (train.matmul_precision), where
// the KV cache reads bf16 copies of the weights (rex/nn/decode_weights.hpp):
//   kv_cache_bf16, recompute_bf16   compared with each other (the same arithmetic, so the same
//               text) and with the fp32 recompute path.
// With --model DIR the model is a trained model folder instead (its weights, and the PSR mask of
// the step it was saved at): a trained model's greedy text varies, which
// changes how its tokens route, unlike a random model's. Usage:
//   bench_sample [--chars N] [--repeats R] [--model DIR]   (threads: OMP_NUM_THREADS, default all)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include <Eigen/Core>
#include <rex/backend/cuda/runtime.hpp>
#include <rex/rex.hpp>
#include <rex/train/train.hpp>

#include "timing.hpp"

namespace {

// The greedy continuation of `prompt` by a full pass over its last `context` tokens per token.
std::vector<int32_t> sliding_window_greedy(const rex::nn::TransformerLM& model,
                                           std::vector<int32_t> tokens, int64_t n,
                                           const rex::nn::RoutingStep& at) {
  rex::NoGradGuard no_grad;
  const int64_t context = model.config().context, vocab = model.config().vocab_size;
  const auto prompt_length = static_cast<int64_t>(tokens.size());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(tokens.size()) - context);
    const std::vector<int32_t> window(tokens.begin() + start, tokens.end());
    const auto time = static_cast<int64_t>(window.size());
    const rex::Tensor logits =
        model.forward(rex::from_vector(window, {1, time}), rex::Tensor(), at).logits;
    const float* last = logits.data<float>() + (time - 1) * vocab;
    tokens.push_back(static_cast<int32_t>(std::max_element(last, last + vocab) - last));
  }
  return {tokens.begin() + prompt_length, tokens.end()};
}

// The floats of weights one decoded token reads: every layer's projections and FFN (the router
// and the k chosen experts plus the shared ones, or the dense FFN), and the LM head.
int64_t weights_per_token(const rex::nn::ModelConfig& m) {
  const int64_t d = m.d_model, kv_width = d / m.n_heads * m.n_kv_heads;
  const int64_t attention = 2 * d * d + 2 * kv_width * d;
  const rex::nn::MoeConfig& moe = m.moe;
  const int64_t ffn = m.ffn == "moe" ? moe.reuse * moe.experts_per_layer * d +
                                           (moe.top_k + moe.shared_experts) * 3 * moe.d_expert * d
                                     : 3 * m.d_ff * d;
  return m.n_layers * (attention + ffn) + m.vocab_size * d;
}

// Reads `per_token` floats for each of `tokens` tokens from consecutive slices of `weights`
// (wrapping around); returns their sum, so that the reads are not optimised away.
double read_weights(const std::vector<float>& weights, int64_t per_token, int64_t tokens) {
  const auto size = static_cast<int64_t>(weights.size());
  double total = 0;
  int64_t at = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t left = per_token; left > 0;) {
      const int64_t run = std::min(left, size - at);
      total += Eigen::Map<const Eigen::ArrayXf>(weights.data() + at, run).sum();
      left -= run, at = (at + run) % size;
    }
  }
  return total;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t chars = 2000;
  int repeats = 3;
  const char* model_dir = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--chars") == 0 && i + 1 < argc) {
      chars = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) {
      repeats = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
      model_dir = argv[++i];
    } else {
      std::printf("usage: bench_sample [--chars N] [--repeats R] [--model DIR]\n");
      return std::strcmp(argv[i], "--help") == 0 ? 0 : 2;
    }
  }
  rex::train::RunConfig config;
  config.model.vocab_size = 73;
  std::unique_ptr<rex::nn::TransformerLM> owned;
  rex::nn::RoutingStep at = rex::train::after_steps(config.train.steps, config.train.seed);
  if (model_dir != nullptr) {
    rex::train::LoadedModel loaded = rex::train::load_model(model_dir, rex::Device::cpu());
    config = loaded.folder.config;
    at = rex::train::after_steps(loaded.folder.step, config.train.seed);
    owned = std::move(loaded.model);
  } else {
    owned = std::make_unique<rex::nn::TransformerLM>(config.model, config.train.seed);
  }
  const rex::nn::TransformerLM& model = *owned;
  const std::vector<int32_t> newline{0};
  std::vector<int32_t> cached, recomputed;
  const int64_t per_token = weights_per_token(model.config());
  const std::vector<float> weights(static_cast<size_t>(model.parameter_count()), 1.0f);
  std::vector<int32_t> cached_bf16, recomputed_bf16;
  double checksum = 0;
  // f() with the CPU's products in bf16.
  const auto in_bf16 = [](const std::function<void()>& f) {
    rex::set_matmul_precision(rex::Device::cpu(), "bf16");
    f();
    rex::set_matmul_precision(rex::Device::cpu(), "fp32");
  };
  const std::function<void()> contenders[] = {
      [&] {
        cached = rex::train::generate_tokens(model, newline, chars, 0.0, 1, at,
                                             rex::train::Decoding::kv_cache);
      },
      [&] {
        recomputed = rex::train::generate_tokens(model, newline, chars, 0.0, 1, at,
                                                 rex::train::Decoding::recompute);
      },
      [&] { sliding_window_greedy(model, newline, chars, at); },
      [&] { checksum += read_weights(weights, per_token, chars); },
      [&] {
        in_bf16([&] {
          cached_bf16 = rex::train::generate_tokens(model, newline, chars, 0.0, 1, at,
                                                    rex::train::Decoding::kv_cache);
        });
      },
      [&] {
        in_bf16([&] {
          recomputed_bf16 = rex::train::generate_tokens(model, newline, chars, 0.0, 1, at,
                                                        rex::train::Decoding::recompute);
        });
      }};
  constexpr int kContenders = 6;
  std::vector<double> seconds[kContenders];
  for (int r = 0; r < repeats; ++r) {
    for (int i = 0; i < kContenders; ++i) {  // repeat r starts with contender r mod 6
      const int c = (r + i) % kContenders;
      const double start = rex::bench::now_seconds();
      contenders[c]();
      seconds[c].push_back(rex::bench::now_seconds() - start);
    }
  }
  const double kv = rex::bench::median(seconds[0]), recompute = rex::bench::median(seconds[1]),
               sliding = rex::bench::median(seconds[2]);
  std::printf(
      "%lld characters, context %lld, median of %d: KV cache %.3f s, recompute %.3f s "
      "(%.1fx the KV cache), sliding window %.3f s (%.1fx); KV cache and recompute texts "
      "%s\n",
      static_cast<long long>(chars), static_cast<long long>(config.model.context), repeats, kv,
      recompute, recompute / kv, sliding, sliding / kv,
      cached == recomputed ? "identical" : "DIFFER");
  const double read = rex::bench::median(seconds[3]);
  std::printf(
      "a decoded token reads %.2f MB of weights (the model has %.2f MB); reading them for %lld "
      "tokens takes %.3f s (%.1f GB/s): the KV cache runs at %.0f%% of that bound, and no fp32 "
      "decoder could be more than %.1fx faster than recompute here (checksum %.0f)\n",
      4e-6 * static_cast<double>(per_token), 4e-6 * static_cast<double>(weights.size()),
      static_cast<long long>(chars), read,
      4e-9 * static_cast<double>(per_token) * static_cast<double>(chars) / read, 100 * read / kv,
      recompute / read, checksum);
  const double kv_bf16 = rex::bench::median(seconds[4]),
               recompute_bf16 = rex::bench::median(seconds[5]);
  const auto same_prefix = static_cast<long long>(
      std::mismatch(cached_bf16.begin(), cached_bf16.end(), cached.begin()).first -
      cached_bf16.begin());
  std::printf(
      "bf16: KV cache %.3f s, recompute %.3f s (%.1fx the KV cache); the fp32 recompute is %.1fx "
      "the bf16 KV cache; KV cache and recompute texts %s; the bf16 text follows the fp32 text "
      "for %lld characters\n",
      kv_bf16, recompute_bf16, recompute_bf16 / kv_bf16, recompute / kv_bf16,
      cached_bf16 == recomputed_bf16 ? "identical" : "DIFFER", same_prefix);
  return cached == recomputed && cached_bf16 == recomputed_bf16 ? 0 : 1;
}
