// Training data for a language model: a text file, its token stream split into training and
// validation parts, and random batches of windows from one part.
//
// BatchSampler::sample(i) is a pure function of (seed, i): batch i is drawn from a generator seeded
// with a hash of both, not from a stateful stream. A run resumed at step i therefore sees exactly
// the batches an uninterrupted run would have seen, with nothing but the step number to save.
// The tokens are a TokenStream (rex/data/token_stream.hpp): the ids of a text, or token shards
// viewed as one concatenated stream. A window may cross from one shard into the next. That keeps
// every token equally likely to be drawn whatever the shard sizes, makes the tail split a plain
// offset, and lets a shard shorter than a window take part; joining two shards is what llm.c's
// shards already do between the documents inside them (separated by an end-of-text token).
// Copies of a sampler share the stream's memory.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "rex/core/error.hpp"
#include "rex/core/random.hpp"
#include "rex/core/shape.hpp"
#include "rex/core/tensor.hpp"
#include "rex/data/token_stream.hpp"
#include "rex/io/files.hpp"

namespace rex::data {

// The whole file; an empty file is an error (there would be nothing to train on).
inline std::string read_text_file(const std::string& path) {
  std::string text = io::read_file(path);
  REX_CHECK(!text.empty(), "read_text_file: ", path, ": file is empty");
  return text;
}

struct TokenSplit {
  std::vector<int32_t> train, validation;
};

// The first floor(size * train_fraction) tokens train, the rest validate; both must be non-empty.
inline TokenSplit split_tokens(const std::vector<int32_t>& tokens, double train_fraction = 0.9) {
  REX_CHECK(train_fraction > 0.0 && train_fraction < 1.0, "split_tokens: train_fraction ",
            train_fraction, " is not in (0, 1)");
  const auto n_train =
      static_cast<size_t>(std::floor(static_cast<double>(tokens.size()) * train_fraction));
  REX_CHECK(n_train > 0 && n_train < tokens.size(), "split_tokens: ", tokens.size(),
            " tokens with train_fraction ", train_fraction, " give ", n_train, " training and ",
            tokens.size() - n_train, " validation tokens; both parts must be non-empty");
  const auto middle = tokens.begin() + static_cast<std::ptrdiff_t>(n_train);
  return {std::vector<int32_t>(tokens.begin(), middle), std::vector<int32_t>(middle, tokens.end())};
}

// inputs and targets are both i32 [batch, context]; targets[b, t] = inputs[b, t + 1] within the
// window, i.e. each row of targets is its row of inputs shifted left by one token.
struct Batch {
  Tensor inputs, targets;

  Batch to(Device device) const { return {inputs.to(device), targets.to(device)}; }

  // Rows [begin, begin + count) of both, on the CPU (a rank's or a micro-batch's share).
  Batch rows(int64_t begin, int64_t count) const {
    REX_CHECK(begin >= 0 && count >= 1 && begin + count <= inputs.dim(0), "Batch::rows: rows [",
              begin, ", ", begin + count, ") of a batch of ", inputs.dim(0));
    const int64_t context = inputs.dim(1);
    auto cut = [&](const Tensor& all) {
      const Tensor host = all.to(Device::cpu());
      Tensor part = Tensor::empty(Shape{count, context}, DType::i32);
      std::copy_n(host.data<int32_t>() + begin * context, count * context, part.data<int32_t>());
      return part;
    };
    return {cut(inputs), cut(targets)};
  }
};

class BatchSampler {
 public:
  BatchSampler(std::vector<int32_t> tokens, int64_t batch, int64_t context, uint64_t seed,
               std::string split_name)
      : BatchSampler(TokenStream(std::move(tokens)), batch, context, seed, std::move(split_name)) {}

  BatchSampler(TokenStream tokens, int64_t batch, int64_t context, uint64_t seed,
               std::string split_name)
      : tokens_(std::move(tokens)), batch_(batch), context_(context), seed_(seed) {
    REX_CHECK(batch >= 1, "BatchSampler: ", split_name, " split: batch ", batch,
              " must be at least 1");
    REX_CHECK(context >= 1, "BatchSampler: ", split_name, " split: context ", context,
              " must be at least 1");
    REX_CHECK(tokens_.size() > static_cast<uint64_t>(context), "BatchSampler: ", split_name,
              " split has ", tokens_.size(),
              " tokens, fewer than context + 1 = ", static_cast<uint64_t>(context) + 1,
              " (one window)");
  }

  // Batch `index`: `batch` windows of context + 1 tokens, their starts uniform over every possible
  // start [0, num_tokens - context - 1], drawn from Generator(mix64(seed ^ mix64(index))).
  Batch sample(uint64_t index) const {
    Generator gen(mix64(seed_ ^ mix64(index)), 0);
    const uint64_t starts = tokens_.size() - static_cast<uint64_t>(context_);
    Batch out{Tensor::empty(Shape{batch_, context_}, DType::i32),
              Tensor::empty(Shape{batch_, context_}, DType::i32)};
    int32_t* inputs = out.inputs.data<int32_t>();
    int32_t* targets = out.targets.data<int32_t>();
    std::vector<int32_t> window(static_cast<size_t>(context_) + 1);
    for (int64_t b = 0; b < batch_; ++b) {
      tokens_.copy(gen.below(starts), window.size(), window.data());
      std::copy_n(window.begin(), context_, inputs + b * context_);
      std::copy_n(window.begin() + 1, context_, targets + b * context_);
    }
    return out;
  }

  int64_t num_tokens() const { return static_cast<int64_t>(tokens_.size()); }

 private:
  TokenStream tokens_;
  int64_t batch_, context_;
  uint64_t seed_;
};

// Entropy in nats of the tokens' frequency distribution, -sum_v p_v log p_v with p_v = count_v / n:
// the cross-entropy of the best model that ignores context, a baseline a trained model should beat.
inline double unigram_entropy(const TokenStream& tokens, int64_t vocab_size) {
  REX_CHECK(vocab_size >= 1, "unigram_entropy: vocab_size ", vocab_size, " must be at least 1");
  REX_CHECK(tokens.size() > 0, "unigram_entropy: no tokens");
  std::vector<int64_t> counts(static_cast<size_t>(vocab_size), 0);
  uint64_t position = 0;
  for (const TokenPiece& piece : tokens.pieces())
    for (uint64_t i = 0; i < piece.count; ++i, ++position) {
      const int64_t id = piece.token(i);
      REX_CHECK(id < vocab_size, "unigram_entropy: token ", id, " at position ", position,
                " is out of range for a vocabulary of ", vocab_size);
      ++counts[static_cast<size_t>(id)];
    }
  const double n = static_cast<double>(tokens.size());
  double entropy = 0.0;
  for (int64_t c : counts) {
    if (c == 0) continue;
    const double p = static_cast<double>(c) / n;
    entropy -= p * std::log(p);
  }
  return entropy;
}

inline double unigram_entropy(const std::vector<int32_t>& tokens, int64_t vocab_size) {
  for (size_t i = 0; i < tokens.size(); ++i)
    REX_CHECK(tokens[i] >= 0, "unigram_entropy: token ", tokens[i], " at position ", i,
              " is out of range for a vocabulary of ", vocab_size);
  return unigram_entropy(TokenStream(tokens), vocab_size);
}

}  // namespace rex::data
