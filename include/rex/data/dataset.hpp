// Training data for a language model: a text file, its token stream split into training and
// validation parts, and random batches of windows from one part.
//
// BatchSampler::sample(i) is a pure function of (seed, i): batch i is drawn from a generator seeded
// with a hash of both, not from a stateful stream. A run resumed at step i therefore sees exactly
// the batches an uninterrupted run would have seen, with nothing but the step number to save.
// The tokens are held through a shared_ptr, so copies of a sampler share one token vector.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "rex/core/error.hpp"
#include "rex/core/random.hpp"
#include "rex/core/shape.hpp"
#include "rex/core/tensor.hpp"
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
      : tokens_(std::make_shared<const std::vector<int32_t>>(std::move(tokens))),
        batch_(batch),
        context_(context),
        seed_(seed) {
    REX_CHECK(batch >= 1, "BatchSampler: ", split_name, " split: batch ", batch,
              " must be at least 1");
    REX_CHECK(context >= 1, "BatchSampler: ", split_name, " split: context ", context,
              " must be at least 1");
    REX_CHECK(tokens_->size() > static_cast<uint64_t>(context), "BatchSampler: ", split_name,
              " split has ", tokens_->size(),
              " tokens, fewer than context + 1 = ", static_cast<uint64_t>(context) + 1,
              " (one window)");
  }

  // Batch `index`: `batch` windows of context + 1 tokens, their starts uniform over every possible
  // start [0, num_tokens - context - 1], drawn from Generator(mix64(seed ^ mix64(index))).
  Batch sample(uint64_t index) const {
    Generator gen(mix64(seed_ ^ mix64(index)), 0);
    const uint64_t starts = tokens_->size() - static_cast<uint64_t>(context_);
    Batch out{Tensor::empty(Shape{batch_, context_}, DType::i32),
              Tensor::empty(Shape{batch_, context_}, DType::i32)};
    int32_t* inputs = out.inputs.data<int32_t>();
    int32_t* targets = out.targets.data<int32_t>();
    for (int64_t b = 0; b < batch_; ++b) {
      const int32_t* window = tokens_->data() + gen.below(starts);
      for (int64_t t = 0; t < context_; ++t) {
        inputs[b * context_ + t] = window[t];
        targets[b * context_ + t] = window[t + 1];
      }
    }
    return out;
  }

  int64_t num_tokens() const { return static_cast<int64_t>(tokens_->size()); }

 private:
  std::shared_ptr<const std::vector<int32_t>> tokens_;
  int64_t batch_, context_;
  uint64_t seed_;
};

// Entropy in nats of the tokens' frequency distribution, -sum_v p_v log p_v with p_v = count_v / n:
// the cross-entropy of the best model that ignores context, a baseline a trained model should beat.
inline double unigram_entropy(const std::vector<int32_t>& tokens, int64_t vocab_size) {
  REX_CHECK(vocab_size >= 1, "unigram_entropy: vocab_size ", vocab_size, " must be at least 1");
  REX_CHECK(!tokens.empty(), "unigram_entropy: no tokens");
  std::vector<int64_t> counts(static_cast<size_t>(vocab_size), 0);
  for (size_t i = 0; i < tokens.size(); ++i) {
    REX_CHECK(tokens[i] >= 0 && tokens[i] < vocab_size, "unigram_entropy: token ", tokens[i],
              " at position ", i, " is out of range for a vocabulary of ", vocab_size);
    ++counts[static_cast<size_t>(tokens[i])];
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

}  // namespace rex::data
