// A training corpus: a text file, its byte tokenizer and its train/validation split, with the batch
// samplers a run draws from. Batches are pure functions of (seed, index) (rex/data/dataset.hpp);
// validation batches use their own stream, so the same train.eval_batches batches are evaluated
// every time. A corpus is a regular file of text: at most kMaxCorpusBytes, no NUL byte (a device
// such as /dev/zero, a folder or a binary file is refused before anything is read or trained).
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "rex/data/dataset.hpp"
#include "rex/data/tokenizer.hpp"
#include "rex/train/checkpoint.hpp"
#include "rex/train/config.hpp"

namespace rex::train {

struct Corpus {
  std::string path;
  std::string text;
  data::CharTokenizer tokenizer;
  data::TokenSplit split;
};

inline constexpr uintmax_t kMaxCorpusBytes = uintmax_t{1} << 30;  // 1 GiB

// The text of the corpus file `path`, refused when it is not what a corpus can be.
inline std::string read_corpus_text(const std::string& path) {
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  if (std::filesystem::exists(status)) {  // a missing file is named by read_text_file
    REX_CHECK(std::filesystem::is_regular_file(status), "corpus ", path,
              " is not a regular file (a folder, device or pipe cannot be a corpus)");
    const uintmax_t bytes = std::filesystem::file_size(path);
    REX_CHECK(bytes <= kMaxCorpusBytes, "corpus ", path, " has ", bytes,
              " bytes, more than the limit of ", kMaxCorpusBytes, " (1 GiB)");
  }
  std::string text = data::read_text_file(path);
  const size_t nul = text.find('\0');
  REX_CHECK(nul == std::string::npos, "corpus ", path, " holds a NUL byte at offset ", nul,
            ": it is a binary file, not training text");
  return text;
}

// A prompt to sample from: not empty, and every byte of it in the model's vocabulary.
inline void check_prompt(const data::CharTokenizer& tokenizer, const std::string& prompt) {
  REX_CHECK(!prompt.empty(), "--prompt must not be empty");
  try {
    tokenizer.encode(prompt);
  } catch (const Error& e) {
    throw Error(std::string("--prompt: ") + e.what() +
                " (the vocabulary holds only the bytes of the training corpus)");
  }
}

// Reads `path` and tokenizes it with `tokenizer` (a saved run's) or, without one, with a tokenizer
// built from the text; the leading train_fraction of the tokens is the training part.
inline Corpus load_corpus(const std::string& path, std::optional<data::CharTokenizer> tokenizer,
                          double train_fraction) {
  std::string text = read_corpus_text(path);
  data::CharTokenizer tok =
      tokenizer ? std::move(*tokenizer) : data::CharTokenizer::from_text(text);
  std::vector<int32_t> ids;
  try {
    ids = tok.encode(text);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what() +
                " (the checkpoint's vocabulary was built from another corpus)");
  }
  data::TokenSplit split = data::split_tokens(ids, train_fraction);
  return Corpus{path, std::move(text), std::move(tok), std::move(split)};
}

// Sets model.vocab_size from the corpus's tokenizer; a config that names another size is an error.
inline void take_vocab_size(RunConfig& config, const Corpus& corpus) {
  const int64_t vocab = corpus.tokenizer.vocab_size();
  REX_CHECK(config.model.vocab_size == 0 || config.model.vocab_size == vocab,
            "config: model.vocab_size is ", config.model.vocab_size, " but ", corpus.path, " has ",
            vocab, " distinct bytes; leave it at 0 to take it from the data");
  config.model.vocab_size = vocab;
}

// The corpus fingerprint a checkpoint keeps, to warn when a resume reads another corpus.
inline CheckpointInfo corpus_info(const Corpus& corpus) {
  return {corpus.text.size(), corpus_hash(corpus.text)};
}

// Warns (stderr) when a resumed run reads a corpus other than the one its checkpoint was trained
// on.
inline void warn_if_other_corpus(const Corpus& corpus, const CheckpointInfo& trained_on) {
  if (corpus_info(corpus) != trained_on)
    std::fprintf(stderr, "warning: %s differs from the corpus this run was trained on\n",
                 corpus.path.c_str());
}

inline data::BatchSampler train_sampler(const Corpus& corpus, const RunConfig& c) {
  return data::BatchSampler(corpus.split.train, c.train.batch_size, c.model.context, c.train.seed,
                            "train");
}

inline constexpr uint64_t kValidationSeedSalt = 0x56414C4944415445ull;

inline data::BatchSampler validation_sampler(const Corpus& corpus, const RunConfig& c) {
  return data::BatchSampler(corpus.split.validation, c.train.batch_size, c.model.context,
                            c.train.seed ^ kValidationSeedSalt, "validation");
}

}  // namespace rex::train
