// Training data: a text file, its byte tokenizer and its train/validation split, or token shards
// (rex/data/shards.hpp), with the batch samplers a run draws from. Batches are pure functions of
// (seed, index) (rex/data/dataset.hpp); validation batches use their own stream, so the same
// train.eval_batches batches are evaluated every time. A text corpus is a regular file: at most
// kMaxCorpusBytes, no NUL byte (a device such as /dev/zero, a folder or a binary file is refused
// before anything is read or trained). Token shards are mapped, not read, and have no size limit;
// they carry no tokenizer, so model.vocab_size must be set and cover their largest id.
// data.tokenizer "bytes" tokenizes a text by its bytes (CharTokenizer); a path to a tokenizer.json
// encodes a text with that byte-level BPE tokenizer, and gives token shards a tokenizer to sample
// with (the shards must have been made with it, as examples/prepare_shards makes them).
// data.format "auto" picks the format from --data (resolve_data_format); data.validation or the
// shards' names (nanoGPT's val.bin, llm.c's *_val_*.bin) choose the validation shards, and without
// either the tail of the stream validates, as for text (train.train_fraction).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "rex/data/dataset.hpp"
#include "rex/data/shards.hpp"
#include "rex/data/tokenizer.hpp"
#include "rex/train/checkpoint.hpp"
#include "rex/train/config.hpp"

namespace rex::train {

struct Corpus {
  std::string path;                          // what --data named
  bool text = false;                         // a text file, not token shards
  std::optional<data::Tokenizer> tokenizer;  // none for shards without data.tokenizer
  data::TokenStream train, validation;
  CheckpointInfo fingerprint;  // kept in checkpoints, to warn when a resume reads other data
  std::string description;     // "N bytes" or "K llmc shards"
  int64_t largest_token = -1;
  std::string largest_token_at;  // "FILE at byte offset N" (token shards)
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
inline void check_prompt(const data::Tokenizer& tokenizer, const std::string& prompt) {
  REX_CHECK(!prompt.empty(), "--prompt must not be empty");
  try {
    tokenizer.encode(prompt);
  } catch (const Error& e) {
    throw Error(std::string("--prompt: ") + e.what() +
                " (the vocabulary holds only the bytes of the training corpus)");
  }
}

// --sample's checks, made before any work: a tokenizer to decode with (a model trained on token
// shards without data.tokenizer has none) and a prompt it can encode.
inline void check_sampling(const std::optional<data::Tokenizer>& tokenizer, const RunConfig& config,
                           const std::string& prompt) {
  REX_CHECK(tokenizer.has_value(),
            "--sample: the model was trained on token shards (data.format \"", config.data.format,
            "\") and has no tokenizer to turn its token ids into text, so it cannot sample (name ",
            "the tokenizer.json the shards were made with in data.tokenizer when training)");
  check_prompt(*tokenizer, prompt);
}

// Reads the text file `path` and tokenizes it with `tokenizer` (a saved run's, or data.tokenizer's)
// or, without one, with a CharTokenizer built from the text; the leading train_fraction of the
// tokens is the training part.
inline Corpus load_corpus(const std::string& path, std::optional<data::Tokenizer> tokenizer,
                          double train_fraction) {
  const std::string text = read_corpus_text(path);
  data::Tokenizer tok = tokenizer ? std::move(*tokenizer) : data::CharTokenizer::from_text(text);
  std::vector<int32_t> ids;
  try {
    ids = tok.encode(text);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what() +
                " (the checkpoint's vocabulary was built from another corpus)");
  }
  data::TokenSplit split = data::split_tokens(ids, train_fraction);
  Corpus corpus;
  corpus.path = path;
  corpus.text = true;
  corpus.largest_token = tok.vocab_size() - 1;
  corpus.tokenizer = std::move(tok);
  corpus.train = data::TokenStream(std::move(split.train));
  corpus.validation = data::TokenStream(std::move(split.validation));
  corpus.fingerprint = {text.size(), corpus_hash(text)};
  corpus.description = std::to_string(text.size()) + " bytes";
  return corpus;
}

// The format data.format = `format` means for --data `path`: itself, unless "auto": token shards
// for a folder or a glob (llmc when the first shard starts with the llm.c magic, else nanogpt),
// llmc for a file that starts with the magic, nanogpt for another *.bin file, text otherwise.
inline std::string resolve_data_format(const std::string& format, const std::string& path) {
  if (format != "auto") return format;
  namespace fs = std::filesystem;
  std::error_code error;
  const bool is_file = fs::is_regular_file(path, error);
  if (!is_file && !fs::is_directory(path, error) && !(data::is_glob(path) && !fs::exists(path)))
    return "text";  // missing, or a device: the text reader names the problem
  const std::string first = data::list_shard_files(path).front();
  if (data::detect_shard_format(first) == data::ShardFormat::llmc) return "llmc";
  return is_file && fs::path(path).extension() != ".bin" ? "text" : "nanogpt";
}

// The mapped, checked shards of `files`, as one stream.
inline data::TokenStream open_shards(const std::vector<std::string>& files,
                                     data::ShardFormat format) {
  data::TokenStream stream;
  for (const std::string& file : files) stream.append(data::open_shard(file, format));
  return stream;
}

// Token shards of `format` at `path` (a file, folder or glob); validation from data.validation,
// else from the validation-named shards, else the tail (1 - train_fraction) of the stream.
inline Corpus load_shards(const std::string& path, const std::string& format,
                          const DataConfig& data_config, double train_fraction) {
  const data::ShardFormat shard_format =
      format == "llmc" ? data::ShardFormat::llmc : data::ShardFormat::nanogpt;
  std::vector<std::string> train_files, validation_files;
  const std::vector<std::string> files = data::list_shard_files(path);
  if (!data_config.validation.empty()) {
    validation_files = data::list_shard_files(data_config.validation);
    auto is_validation = [&](const std::string& file) {
      for (const std::string& v : validation_files)
        if (std::filesystem::equivalent(file, v)) return true;
      return false;
    };
    for (const std::string& file : files)
      if (!is_validation(file)) train_files.push_back(file);
    REX_CHECK(!train_files.empty(), "--data ", path,
              ": every shard is a validation shard (data.validation = ", data_config.validation,
              "); no shard is left to train on");
  } else {
    for (const std::string& file : files)
      (data::is_validation_shard_name(file) ? validation_files : train_files).push_back(file);
    if (train_files.empty() || validation_files.empty()) {
      train_files = files;
      validation_files.clear();
    }
  }
  Corpus corpus;
  corpus.path = path;
  corpus.train = open_shards(train_files, shard_format);
  data::TokenStream all = corpus.train;
  if (validation_files.empty()) {
    const uint64_t total = corpus.train.size();
    const auto n_train =
        static_cast<uint64_t>(std::floor(static_cast<double>(total) * train_fraction));
    REX_CHECK(n_train > 0 && n_train < total, "--data ", path, ": ", total,
              " tokens with train.train_fraction ", train_fraction, " give ", n_train,
              " training and ", total - n_train,
              " validation tokens; both parts must be non-empty");
    corpus.validation = corpus.train.slice(n_train, total);
    corpus.train = corpus.train.slice(0, n_train);
  } else {
    corpus.validation = open_shards(validation_files, shard_format);
    for (const data::TokenPiece& piece : corpus.validation.pieces()) all.append(piece);
  }
  const data::TokenScan scan = data::scan_tokens(all);
  uint64_t bytes = 0;
  for (const data::TokenPiece& piece : all.pieces())
    bytes += piece.count * static_cast<uint64_t>(piece.width);
  corpus.fingerprint = {bytes, scan.hash};
  const size_t shards = train_files.size() + validation_files.size();
  corpus.description = std::to_string(shards) + " " + format + " shard" + (shards > 1 ? "s" : "");
  corpus.largest_token = scan.largest;
  corpus.largest_token_at = data::token_location(all, scan.position);
  return corpus;
}

// The tokenizer data.tokenizer names: none for "bytes" (the text's own CharTokenizer is built when
// the text is read), else the BPE tokenizer.json at that path.
inline std::optional<data::Tokenizer> configured_tokenizer(const DataConfig& data) {
  if (data.tokenizer == "bytes") return std::nullopt;
  try {
    return data::BpeTokenizer::load(data.tokenizer);
  } catch (const Error& e) {
    throw Error(std::string("config: data.tokenizer: ") + e.what());
  }
}

// The training data --data names, read as config.data.format says (which is set to the resolved
// format, as model.vocab_size is to the data's); `tokenizer`: a saved run's, else data.tokenizer's.
inline Corpus load_training_data(const std::string& path, std::optional<data::Tokenizer> tokenizer,
                                 RunConfig& config) {
  if (!tokenizer) tokenizer = configured_tokenizer(config.data);
  config.data.format = resolve_data_format(config.data.format, path);
  if (config.data.format == "text") {
    REX_CHECK(config.data.validation.empty(), "config: data.validation names validation shards, ",
              "but --data ", path, " is text (a text corpus validates on its tail)");
    return load_corpus(path, std::move(tokenizer), config.train.train_fraction);
  }
  Corpus corpus = load_shards(path, config.data.format, config.data, config.train.train_fraction);
  corpus.tokenizer = std::move(tokenizer);
  return corpus;
}

// Sets model.vocab_size, when 0, from the tokenizer; checks that it covers the tokenizer (exactly,
// for a text's bytes) and, for token shards, their largest id.
inline void take_vocab_size(RunConfig& config, const Corpus& corpus) {
  const int64_t vocab = config.model.vocab_size;
  if (corpus.tokenizer && corpus.tokenizer->bpe()) {
    const int64_t tokens = corpus.tokenizer->vocab_size();
    REX_CHECK(vocab == 0 || vocab >= tokens, "config: model.vocab_size is ", vocab, " but ",
              config.data.tokenizer, " has ", tokens,
              " tokens; expected at least that many (or 0 to take it from the tokenizer)");
    if (vocab == 0) {
      config.model.vocab_size = tokens;
      validate(config);  // the memory estimate assumed 256 tokens (kLargestByteVocabulary)
    }
    if (!corpus.text) {
      REX_CHECK(corpus.largest_token < config.model.vocab_size, corpus.largest_token_at,
                ": token id ", corpus.largest_token, " is not below model.vocab_size ",
                config.model.vocab_size,
                " (expected every id of the data to be in the model's vocabulary)");
    }
    return;
  }
  if (!corpus.tokenizer) {
    REX_CHECK(vocab > 0, "config: model.vocab_size must be set for token shards (", corpus.path,
              " has no tokenizer to take it from); the largest token id is ", corpus.largest_token,
              " (", corpus.largest_token_at, "), so it must be at least ",
              corpus.largest_token + 1);
    REX_CHECK(corpus.largest_token < vocab, corpus.largest_token_at, ": token id ",
              corpus.largest_token, " is not below model.vocab_size ", vocab,
              " (expected every id of the data to be in the model's vocabulary)");
    return;
  }
  REX_CHECK(vocab == 0 || vocab == corpus.tokenizer->vocab_size(), "config: model.vocab_size is ",
            vocab, " but ", corpus.path, " has ", corpus.tokenizer->vocab_size(),
            " distinct bytes; leave it at 0 to take it from the data");
  config.model.vocab_size = corpus.tokenizer->vocab_size();
}

// The corpus fingerprint a checkpoint keeps, to warn when a resume reads another corpus.
inline CheckpointInfo corpus_info(const Corpus& corpus) { return corpus.fingerprint; }

// Warns (stderr) when a resumed run reads a corpus other than the one its checkpoint was trained
// on.
inline void warn_if_other_corpus(const Corpus& corpus, const CheckpointInfo& trained_on) {
  if (corpus_info(corpus) != trained_on)
    std::fprintf(stderr, "warning: %s differs from the corpus this run was trained on\n",
                 corpus.path.c_str());
}

inline data::BatchSampler train_sampler(const Corpus& corpus, const RunConfig& c) {
  return data::BatchSampler(corpus.train, c.train.batch_size, c.model.context, c.train.seed,
                            "train");
}

inline constexpr uint64_t kValidationSeedSalt = 0x56414C4944415445ull;

inline data::BatchSampler validation_sampler(const Corpus& corpus, const RunConfig& c) {
  return data::BatchSampler(corpus.validation, c.train.batch_size, c.model.context,
                            c.train.seed ^ kValidationSeedSalt, "validation");
}

}  // namespace rex::train
