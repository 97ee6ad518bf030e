// prepare_shards: text in, llm.c token shards out (nanoGPT's prepare.py convention, llm.c's
// format), with the byte-level BPE tokenizer that made them: trained here on the text
// (--vocab-size) or given (--tokenizer). The last --val-fraction of the tokens is the validation
// shard NAME_val_000000.bin, the rest NAME_train_000001.bin, ... of --shard-tokens tokens each;
// train_tiny_rex --data DIR --set data.tokenizer=DIR/tokenizer.json trains on them and can sample.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <rex/data/bpe.hpp>
#include <rex/data/shards.hpp>
#include <rex/io/files.hpp>
#include <rex/train/corpus.hpp>

namespace {

const char* kUsage = R"(usage:
  prepare_shards --input TEXT --out DIR (--vocab-size N | --tokenizer FILE) [options]

Tokenizes TEXT with a byte-level BPE tokenizer and writes llm.c shards (256 int32 header, uint16
ids, or uint32 above 65535 tokens) and the tokenizer to DIR:
  DIR/tokenizer.json          the tokenizer (Hugging Face format)
  DIR/NAME_val_000000.bin     the last --val-fraction of the tokens
  DIR/NAME_train_000001.bin   the rest, --shard-tokens per shard

options:
  --input TEXT          the text (a file of at most 1 GiB)
  --out DIR             where the shards go (created if missing)
  --vocab-size N        train a tokenizer of N tokens (at least 256) on TEXT
  --tokenizer FILE      use this byte-level BPE tokenizer.json instead (e.g. GPT-2's)
  --shard-tokens N      tokens per training shard (default 100000000, as llm.c)
  --val-fraction F      share of the tokens, at the end, that validates (default 0.1)
  --name NAME           shard file prefix (default "data")
  --help                this text
)";

[[noreturn]] void usage_error(const std::string& message) {
  throw rex::Error(message + "\n(run prepare_shards --help for the options)");
}

int64_t parse_count(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || value <= 0)
    usage_error(flag + " expects a positive whole number, got '" + text + "'");
  return value;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int run(int argc, char** argv) {
  std::map<std::string, std::string> flags = {
      {"--shard-tokens", "100000000"}, {"--val-fraction", "0.1"}, {"--name", "data"}};
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf("%s", kUsage);
      return 0;
    }
    static const char* kKnown[] = {"--input",     "--out",          "--vocab-size",
                                   "--tokenizer", "--shard-tokens", "--val-fraction",
                                   "--name"};
    if (std::find(std::begin(kKnown), std::end(kKnown), flag) == std::end(kKnown))
      usage_error("unknown option " + flag);
    if (i + 1 >= argc) usage_error(flag + " needs a value");
    flags[flag] = argv[++i];
  }
  if (!flags.count("--input") || !flags.count("--out"))
    usage_error("--input and --out are required");
  if (flags.count("--vocab-size") == flags.count("--tokenizer"))
    usage_error("give exactly one of --vocab-size N (train a tokenizer) and --tokenizer FILE");
  const int64_t shard_tokens = parse_count("--shard-tokens", flags["--shard-tokens"]);
  char* end = nullptr;
  const double val_fraction = std::strtod(flags["--val-fraction"].c_str(), &end);
  if (*end != '\0' || !(val_fraction > 0 && val_fraction < 1))
    usage_error("--val-fraction expects a number between 0 and 1, got '" + flags["--val-fraction"] +
                "'");

  const std::string text = rex::train::read_corpus_text(flags["--input"]);
  const auto start = std::chrono::steady_clock::now();
  const rex::data::BpeTokenizer tokenizer =
      flags.count("--tokenizer") ? rex::data::BpeTokenizer::load(flags["--tokenizer"])
                                 : rex::data::BpeTokenizer::train(
                                       text, parse_count("--vocab-size", flags["--vocab-size"]));
  if (!flags.count("--tokenizer"))
    std::printf("trained a tokenizer of %lld tokens in %.2f s\n",
                static_cast<long long>(tokenizer.vocab_size()), seconds_since(start));
  const auto encode_start = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tokenizer.encode(text);
  std::printf("%zu bytes -> %zu tokens in %.2f s\n", text.size(), ids.size(),
              seconds_since(encode_start));
  const auto n_val =
      static_cast<uint64_t>(std::ceil(static_cast<double>(ids.size()) * val_fraction));
  REX_CHECK(n_val > 0 && n_val < ids.size(), flags["--input"], ": ", ids.size(),
            " tokens with --val-fraction ", val_fraction, " give ", ids.size() - n_val,
            " training and ", n_val, " validation tokens; both must be non-empty");

  const std::string out = flags["--out"], name = flags["--name"];
  std::filesystem::create_directories(out);
  tokenizer.save(out + "/tokenizer.json");
  auto write_shard = [&](const std::string& kind, int index, uint64_t first, uint64_t count) {
    char suffix[32];
    std::snprintf(suffix, sizeof suffix, "_%s_%06d.bin", kind.c_str(), index);
    const std::string path = out + "/" + name + suffix;
    rex::io::write_file_atomic(path, rex::data::llmc_shard_bytes(ids.data() + first, count));
    std::printf("%s: %llu tokens\n", path.c_str(), static_cast<unsigned long long>(count));
  };
  const uint64_t n_train = ids.size() - n_val;
  write_shard("val", 0, n_train, n_val);
  int index = 1;
  for (uint64_t first = 0; first < n_train; first += static_cast<uint64_t>(shard_tokens))
    write_shard("train", index++, first,
                std::min<uint64_t>(static_cast<uint64_t>(shard_tokens), n_train - first));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "prepare_shards: error: %s\n", e.what());
    return 1;
  }
}
