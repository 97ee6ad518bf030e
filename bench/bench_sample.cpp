// Sampling with the KV cache against the full recompute per token, interleaved in one run
// (rex/train/sample.hpp): the time to generate N characters (2,000 by default) of the default
// model (the built-in config of train_tiny_rex, the King James Bible's 73-byte vocabulary,
// randomly initialised: the work per token does not depend on the weights), greedily from a
// newline, with the PSR mask after the configured steps. Prints the median seconds of each path,
// the ratio, and whether the two texts are identical. Usage:
//   bench_sample [--chars N] [--repeats R]     (threads: OMP_NUM_THREADS, default all cores)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <rex/rex.hpp>
#include <rex/train/train.hpp>

#include "timing.hpp"

int main(int argc, char** argv) {
  int64_t chars = 2000;
  int repeats = 3;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--chars") == 0 && i + 1 < argc) {
      chars = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) {
      repeats = std::atoi(argv[++i]);
    } else {
      std::printf("usage: bench_sample [--chars N] [--repeats R]\n");
      return std::strcmp(argv[i], "--help") == 0 ? 0 : 2;
    }
  }
  rex::train::RunConfig config;
  config.model.vocab_size = 73;
  const rex::nn::TransformerLM model(config.model, config.train.seed);
  const rex::nn::RoutingStep at = rex::train::after_steps(config.train.steps, config.train.seed);
  std::vector<int32_t> cached, recomputed;
  auto generate = [&](rex::train::Decoding decoding, std::vector<int32_t>& out) {
    return [&, decoding] {
      out = rex::train::generate_tokens(model, {0}, chars, 0.0, config.train.seed, at, decoding);
    };
  };
  const auto [kv_seconds, recompute_seconds] =
      rex::bench::interleaved_medians(generate(rex::train::Decoding::kv_cache, cached),
                                      generate(rex::train::Decoding::recompute, recomputed),
                                      /*warmup=*/0, repeats);
  std::printf(
      "%lld characters, context %lld, median of %d: KV cache %.3f s, recompute %.3f s, "
      "recompute / KV cache %.1fx; greedy texts %s\n",
      static_cast<long long>(chars), static_cast<long long>(config.model.context), repeats,
      kv_seconds, recompute_seconds, recompute_seconds / kv_seconds,
      cached == recomputed ? "identical" : "DIFFER");
  return cached == recomputed ? 0 : 1;
}
