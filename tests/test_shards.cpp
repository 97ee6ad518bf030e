// Tests for token shards (rex/data/shards.hpp, rex/data/token_stream.hpp) and how a run reads them
// (rex/train/corpus.hpp): ids read back from llm.c (uint16 and uint32) and nanoGPT files equal the
// ids written by an independent byte-by-byte writer; a token stream's reads and slices across
// pieces equal the concatenated ids; batches over several shards equal a naive reference that
// draws the same starts from the concatenation, with windows that cross shard boundaries; every
// bad shard is refused naming the file, the offset and what was expected; the validation shards
// a run picks; the vocabulary check; data.format "auto".
#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

#include <rex/data/dataset.hpp>
#include <rex/data/shards.hpp>
#include <rex/io/files.hpp>
#include <rex/train/corpus.hpp>

#include "testing.hpp"

using namespace rex;
using rex::testing::contains;
using rex::testing::error_message;

namespace {

void append_le(std::string& bytes, uint64_t value, int width) {
  for (int i = 0; i < width; ++i) bytes.push_back(static_cast<char>((value >> (8 * i)) & 0xFF));
}

// An llm.c shard: 256 int32 of header (magic, version, count, zeros), then the ids.
std::string llmc_shard(const std::vector<int64_t>& ids, int version, int64_t count = -1,
                       int64_t magic = 20240520) {
  std::string bytes;
  append_le(bytes, static_cast<uint64_t>(magic), 4);
  append_le(bytes, static_cast<uint64_t>(version), 4);
  append_le(bytes, static_cast<uint64_t>(count < 0 ? static_cast<int64_t>(ids.size()) : count), 4);
  bytes.append(253 * 4, '\0');
  for (int64_t id : ids) append_le(bytes, static_cast<uint64_t>(id), version == 1 ? 2 : 4);
  return bytes;
}

// A nanoGPT .bin file: the ids as uint16, nothing else.
std::string nanogpt_file(const std::vector<int64_t>& ids) {
  std::string bytes;
  for (int64_t id : ids) append_le(bytes, static_cast<uint64_t>(id), 2);
  return bytes;
}

std::vector<int64_t> random_ids(Generator& gen, size_t n, uint64_t below) {
  std::vector<int64_t> ids(n);
  for (int64_t& id : ids) id = static_cast<int64_t>(gen.below(below));
  return ids;
}

std::vector<int64_t> read_all(const data::TokenStream& stream) {
  std::vector<int32_t> out(stream.size());
  stream.copy(0, stream.size(), out.data());
  return std::vector<int64_t>(out.begin(), out.end());
}

std::vector<int64_t> concatenation(const std::vector<std::vector<int64_t>>& parts) {
  std::vector<int64_t> all;
  for (const auto& part : parts) all.insert(all.end(), part.begin(), part.end());
  return all;
}

}  // namespace

TEST_CASE("token shards: ids read back equal the ids written (llm.c uint16, uint32; nanoGPT)") {
  testing::TempDir dir("shards_read");
  Generator gen(5);
  const std::vector<int64_t> small = random_ids(gen, 1000, 65536);
  const std::vector<int64_t> large = random_ids(gen, 777, uint64_t{1} << 32);
  io::write_file_atomic(dir.file("v1.bin"), llmc_shard(small, 1));
  io::write_file_atomic(dir.file("v2.bin"), llmc_shard(large, 2));
  io::write_file_atomic(dir.file("train.bin"), nanogpt_file(small));
  struct Case {
    std::string file;
    data::ShardFormat format;
    const std::vector<int64_t>& ids;
    int width;
    uint64_t header;
  };
  for (const Case& c : {Case{"v1.bin", data::ShardFormat::llmc, small, 2, 1024},
                        Case{"v2.bin", data::ShardFormat::llmc, large, 4, 1024},
                        Case{"train.bin", data::ShardFormat::nanogpt, small, 2, 0}}) {
    CAPTURE(c.file);
    CHECK(data::detect_shard_format(dir.file(c.file)) == c.format);
    const data::TokenPiece piece = data::open_shard(dir.file(c.file), c.format);
    CHECK(piece.width == c.width);
    CHECK(piece.file_offset == c.header);
    REQUIRE(piece.count == c.ids.size());
    for (size_t i = 0; i < c.ids.size(); ++i) REQUIRE(piece.token(i) == c.ids[i]);
  }
  // uint32 ids above 2^31 stay ids (int64), so the vocabulary check sees them as they are.
  data::TokenStream stream;
  stream.append(data::open_shard(dir.file("v2.bin"), data::ShardFormat::llmc));
  int64_t largest = 0;
  for (int64_t id : large) largest = std::max(largest, id);
  CHECK(data::scan_tokens(stream).largest == largest);
}

TEST_CASE(
    "llmc_shard_bytes writes what the independent writer writes: uint16, uint32 above 65535") {
  const std::vector<int32_t> narrow = {0, 7, 65535, 300};
  CHECK(data::llmc_shard_bytes(narrow.data(), narrow.size()) == llmc_shard({0, 7, 65535, 300}, 1));
  const std::vector<int32_t> wide = {65536, 1, 100000};
  CHECK(data::llmc_shard_bytes(wide.data(), wide.size()) == llmc_shard({65536, 1, 100000}, 2));
  CHECK(contains(error_message([&] { data::llmc_shard_bytes(narrow.data(), 0); }), "0 tokens"));
}

TEST_CASE("TokenStream: copy and slice across pieces equal the concatenated ids") {
  Generator gen(9);
  const std::vector<std::vector<int64_t>> parts = {random_ids(gen, 5, 100), random_ids(gen, 1, 100),
                                                   random_ids(gen, 7, 100),
                                                   random_ids(gen, 3, 100)};
  std::vector<std::string> bytes;  // the pieces' memory, alive for the test
  for (size_t p = 0; p < parts.size(); ++p) bytes.push_back(nanogpt_file(parts[p]));
  data::TokenStream stream;
  for (size_t p = 0; p < parts.size(); ++p)
    stream.append({"piece" + std::to_string(p), reinterpret_cast<const uint8_t*>(bytes[p].data()),
                   parts[p].size(), 2, 0, nullptr});
  const std::vector<int64_t> all = concatenation(parts);
  REQUIRE(stream.size() == all.size());
  for (uint64_t begin = 0; begin <= all.size(); ++begin)
    for (uint64_t end = begin; end <= all.size(); ++end) {
      std::vector<int32_t> got(end - begin);
      stream.copy(begin, end - begin, got.data());
      const std::vector<int64_t> want(all.begin() + static_cast<std::ptrdiff_t>(begin),
                                      all.begin() + static_cast<std::ptrdiff_t>(end));
      REQUIRE(std::vector<int64_t>(got.begin(), got.end()) == want);
      REQUIRE(read_all(stream.slice(begin, end)) == want);
    }
  // Token 9 is the 2nd of the third piece (5 + 1 before it): byte offset 2 * 3 of "piece2".
  CHECK(data::token_location(stream, 9) == "piece2 at byte offset 6");
  CHECK(contains(error_message([&] { stream.copy(10, 7, nullptr); }),
                 "tokens [10, 17) of a stream of 16"));
}

TEST_CASE("BatchSampler over shards: windows equal a naive reference and cross shard boundaries") {
  testing::TempDir dir("shards_sampler");
  Generator gen(21);
  // llm.c shards of both versions in one set; sizes around the window (9 tokens) and below it.
  const std::vector<std::vector<int64_t>> parts = {
      random_ids(gen, 37, 300), random_ids(gen, 4, 300), random_ids(gen, 50, 300),
      random_ids(gen, 23, 300)};
  data::TokenStream stream;
  std::vector<uint64_t> boundaries;  // stream index where each shard after the first begins
  uint64_t size = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    const std::string file = dir.file("shard_" + std::to_string(p) + ".bin");
    io::write_file_atomic(file, llmc_shard(parts[p], p % 2 == 0 ? 1 : 2));
    stream.append(data::open_shard(file, data::ShardFormat::llmc));
    if (p > 0) boundaries.push_back(size);
    size += parts[p].size();
  }
  const std::vector<int64_t> all = concatenation(parts);
  const int64_t batch = 5, context = 8;
  const uint64_t seed = 77;
  const data::BatchSampler sampler(stream, batch, context, seed, "train");
  int crossing = 0;
  for (uint64_t index : {0ull, 1ull, 2ull, 3ull, 99ull, 123456789ull}) {
    const data::Batch b = sampler.sample(index);
    // The reference: the same starts, drawn as dataset.hpp documents, cut from the concatenation.
    Generator draws(mix64(seed ^ mix64(index)), 0);
    for (int64_t r = 0; r < batch; ++r) {
      const uint64_t start = draws.below(all.size() - static_cast<uint64_t>(context));
      for (int64_t t = 0; t < context; ++t) {
        REQUIRE(b.inputs.data<int32_t>()[r * context + t] == all[start + static_cast<uint64_t>(t)]);
        REQUIRE(b.targets.data<int32_t>()[r * context + t] ==
                all[start + static_cast<uint64_t>(t) + 1]);
      }
      for (uint64_t boundary : boundaries)
        crossing += start < boundary && boundary <= start + static_cast<uint64_t>(context);
    }
  }
  CHECK(crossing > 0);  // the draws above do take windows across a shard boundary
}

TEST_CASE("parse_shard: bad shards are refused naming the file, the offset and what was expected") {
  const std::vector<int64_t> ids = {1, 2, 3, 4};
  auto refusal = [](const std::string& bytes, data::ShardFormat format) {
    return error_message([&] {
      data::parse_shard("s.bin", reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(),
                        format);
    });
  };
  const auto llmc = data::ShardFormat::llmc, nanogpt = data::ShardFormat::nanogpt;
  std::string msg = refusal(llmc_shard(ids, 1, -1, 1234), llmc);
  CHECK_MESSAGE(contains(msg,
                         "s.bin: header[0] at offset 0 is 1234, expected the llm.c magic "
                         "20240520"),
                msg);
  msg = refusal(llmc_shard(ids, 3), llmc);
  CHECK_MESSAGE(contains(msg,
                         "s.bin: header[1] (version) at offset 4 is 3, expected 1 (uint16 "
                         "tokens) or 2 (uint32 tokens)"),
                msg);
  msg = refusal(llmc_shard(ids, 1, 5), llmc);  // one token more than the file holds
  CHECK_MESSAGE(contains(msg,
                         "s.bin: header[2] at offset 8 says 5 tokens of 2 bytes, so the file "
                         "should have 1034 bytes, but it has 1032 (truncated)"),
                msg);
  msg = refusal(llmc_shard(ids, 2, 3), llmc);
  CHECK_MESSAGE(contains(msg,
                         "should have 1036 bytes, but it has 1040 (bytes after the last "
                         "token)"),
                msg);
  msg = refusal(llmc_shard(ids, 1, 0), llmc);
  CHECK_MESSAGE(contains(msg,
                         "s.bin: header[2] (token count) at offset 8 is 0, expected a "
                         "positive number"),
                msg);
  msg = refusal(llmc_shard(ids, 1, 0x80000000), llmc);  // a negative int32
  CHECK_MESSAGE(contains(msg, "at offset 8 is -2147483648"), msg);
  msg = refusal(llmc_shard(ids, 1).substr(0, 100), llmc);
  CHECK_MESSAGE(contains(msg,
                         "s.bin: truncated llm.c shard: 100 bytes, expected a header of 1024 "
                         "bytes"),
                msg);
  msg = refusal(nanogpt_file(ids) + "x", nanogpt);
  CHECK_MESSAGE(contains(msg,
                         "s.bin: a nanoGPT .bin file holds uint16 token ids, so its size "
                         "must be even; it has 9 bytes, the last id cut short at offset 8"),
                msg);
  msg = refusal("", nanogpt);
  CHECK_MESSAGE(contains(msg, "s.bin: the nanoGPT .bin file is empty"), msg);
}

TEST_CASE("list_shard_files: a file, a folder's *.bin files sorted, a glob; nothing is an error") {
  testing::TempDir dir("shards_list");
  for (const char* name : {"b_000002.bin", "a_000001.bin", "notes.txt", "c_000003.bin"})
    io::write_file_atomic(dir.file(name), nanogpt_file({1, 2}));
  CHECK(data::list_shard_files(dir.file("b_000002.bin")) ==
        std::vector<std::string>{dir.file("b_000002.bin")});
  std::vector<std::string> files = data::list_shard_files(dir.file("."));
  REQUIRE(files.size() == 3);
  for (size_t i = 0; i < 3; ++i)
    CHECK(std::filesystem::path(files[i]).filename() ==
          std::vector<std::string>{"a_000001.bin", "b_000002.bin", "c_000003.bin"}[i]);
  CHECK(data::list_shard_files(dir.file("[bc]_*.bin")) ==
        std::vector<std::string>{dir.file("b_000002.bin"), dir.file("c_000003.bin")});
  std::filesystem::create_directory(dir.file("empty"));
  CHECK(error_message([&] { data::list_shard_files(dir.file("empty")); }) ==
        dir.file("empty") + ": the folder holds no token shards (expected *.bin files)");
  CHECK(error_message([&] { data::list_shard_files(dir.file("z*.bin")); }) ==
        dir.file("z*.bin") + ": the glob matches no file (expected token shards)");
  CHECK(error_message([&] { data::list_shard_files(dir.file("gone.bin")); }) ==
        dir.file("gone.bin") + ": does not exist");
}

TEST_CASE("load_shards: validation from val.bin, *_val_* shards, data.validation or the tail") {
  testing::TempDir dir("shards_validation");
  Generator gen(3);
  const std::vector<int64_t> train = random_ids(gen, 300, 1000), val = random_ids(gen, 70, 1000);
  const std::vector<int64_t> more = random_ids(gen, 90, 1000);
  std::filesystem::create_directories(dir.file("nanogpt"));
  std::filesystem::create_directories(dir.file("llmc"));
  io::write_file_atomic(dir.file("nanogpt/train.bin"), nanogpt_file(train));
  io::write_file_atomic(dir.file("nanogpt/val.bin"), nanogpt_file(val));
  io::write_file_atomic(dir.file("llmc/data_train_000001.bin"), llmc_shard(train, 1));
  io::write_file_atomic(dir.file("llmc/data_train_000002.bin"), llmc_shard(more, 2));
  io::write_file_atomic(dir.file("llmc/data_val_000000.bin"), llmc_shard(val, 1));
  train::DataConfig config;

  // nanoGPT's folder: train.bin trains, val.bin validates.
  train::Corpus corpus = train::load_shards(dir.file("nanogpt"), "nanogpt", config, 0.9);
  CHECK(read_all(corpus.train) == train);
  CHECK(read_all(corpus.validation) == val);
  CHECK(corpus.description == "2 nanogpt shards");
  // llm.c's folder: the *_val_* shard validates, the others train in name order.
  corpus = train::load_shards(dir.file("llmc"), "llmc", config, 0.9);
  CHECK(read_all(corpus.train) == concatenation({train, more}));
  CHECK(read_all(corpus.validation) == val);
  // data.validation names the validation shard; it is not trained on even inside --data.
  config.validation = dir.file("llmc/data_train_000002.bin");
  corpus = train::load_shards(dir.file("llmc/*_train_*.bin"), "llmc", config, 0.9);
  CHECK(read_all(corpus.train) == train);
  CHECK(read_all(corpus.validation) == more);
  config.validation = dir.file("llmc/*.bin");
  CHECK(contains(error_message([&] { train::load_shards(dir.file("llmc"), "llmc", config, 0.9); }),
                 "every shard is a validation shard"));
  // Neither: the leading floor(n * train_fraction) tokens of the stream train, the rest validate.
  config.validation.clear();
  corpus = train::load_shards(dir.file("llmc/*_train_*.bin"), "llmc", config, 0.75);
  const std::vector<int64_t> both = concatenation({train, more});
  const size_t n_train = static_cast<size_t>(std::floor(both.size() * 0.75));
  CHECK(read_all(corpus.train) == std::vector<int64_t>(both.begin(), both.begin() + n_train));
  CHECK(read_all(corpus.validation) == std::vector<int64_t>(both.begin() + n_train, both.end()));
  // The fingerprint covers the ids: another set of shards gets another one.
  const train::Corpus other = train::load_shards(dir.file("nanogpt"), "nanogpt", config, 0.9);
  CHECK(other.fingerprint != corpus.fingerprint);
}

TEST_CASE("take_vocab_size: token shards need model.vocab_size above their largest id") {
  testing::TempDir dir("shards_vocab");
  std::vector<int64_t> ids(500);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i % 50);
  ids[321] = 4000;  // the largest id, 321 tokens after the header
  io::write_file_atomic(dir.file("a.bin"), llmc_shard({1, 2, 3}, 1));
  io::write_file_atomic(dir.file("b.bin"), llmc_shard(ids, 2));
  train::RunConfig config;
  const train::Corpus corpus = train::load_shards(dir.path.string(), "llmc", config.data, 0.9);
  const std::string where = dir.file("b.bin") + " at byte offset " + std::to_string(1024 + 321 * 4);
  std::string msg = error_message([&] { train::take_vocab_size(config, corpus); });
  CHECK_MESSAGE(contains(msg, "model.vocab_size must be set for token shards"), msg);
  CHECK_MESSAGE(contains(msg, "the largest token id is 4000 (" + where +
                                  "), so it must be at "
                                  "least 4001"),
                msg);
  config.model.vocab_size = 4000;
  msg = error_message([&] { train::take_vocab_size(config, corpus); });
  CHECK_MESSAGE(msg == where +
                           ": token id 4000 is not below model.vocab_size 4000 (expected every "
                           "id of the data to be in the model's vocabulary)",
                msg);
  config.model.vocab_size = 4001;
  train::take_vocab_size(config, corpus);
  CHECK(config.model.vocab_size == 4001);
}

TEST_CASE("take_vocab_size with a BPE tokenizer: 0 takes its size, more is allowed, less refused") {
  train::Corpus corpus;
  corpus.text = true;
  corpus.tokenizer = data::BpeTokenizer::train("ab ab ab ac", 300);  // 256 bytes + 4 merges
  train::RunConfig config;
  config.data.tokenizer = "tok.json";
  train::take_vocab_size(config, corpus);
  CHECK(config.model.vocab_size == 260);
  config.model.vocab_size = 320;  // padded, as llm.c pads GPT-2's
  train::take_vocab_size(config, corpus);
  CHECK(config.model.vocab_size == 320);
  config.model.vocab_size = 200;
  CHECK(contains(error_message([&] { train::take_vocab_size(config, corpus); }),
                 "config: model.vocab_size is 200 but tok.json has 260 tokens; expected at least"));
  corpus.text = false;  // token shards made with the tokenizer: their ids must fit too
  corpus.largest_token = 330;
  corpus.largest_token_at = "s.bin at byte offset 1030";
  config.model.vocab_size = 320;
  CHECK(contains(error_message([&] { train::take_vocab_size(config, corpus); }),
                 "s.bin at byte offset 1030: token id 330 is not below model.vocab_size 320"));
}

TEST_CASE("resolve_data_format: auto reads a folder, a glob, the llm.c magic and *.bin as shards") {
  testing::TempDir dir("shards_format");
  io::write_file_atomic(dir.file("text.txt"), "some text\n");
  io::write_file_atomic(dir.file("raw.bin"), nanogpt_file({1, 2}));
  io::write_file_atomic(dir.file("shard.dat"), llmc_shard({1, 2}, 1));
  std::filesystem::create_directories(dir.file("llmc"));
  io::write_file_atomic(dir.file("llmc/x_000000.bin"), llmc_shard({1, 2}, 2));
  CHECK(train::resolve_data_format("auto", dir.file("text.txt")) == "text");
  CHECK(train::resolve_data_format("auto", dir.file("missing.txt")) == "text");
  CHECK(train::resolve_data_format("auto", dir.file("raw.bin")) == "nanogpt");
  CHECK(train::resolve_data_format("auto", dir.file("shard.dat")) == "llmc");
  CHECK(train::resolve_data_format("auto", dir.file("llmc")) == "llmc");
  CHECK(train::resolve_data_format("auto", dir.file("llmc/*.bin")) == "llmc");
  CHECK(train::resolve_data_format("auto", dir.file("r*.bin")) == "nanogpt");
  CHECK(train::resolve_data_format("nanogpt", dir.file("shard.dat")) == "nanogpt");
}
