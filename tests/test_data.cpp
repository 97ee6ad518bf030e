// Tests for rex/data/tokenizer.hpp and rex/data/dataset.hpp: the byte tokenizer (vocabulary,
// encode/decode, JSON, non-ASCII bytes, errors), reading text files, the train/validation split,
// the batch sampler (windows checked against the token stream, purity in (seed, index), coverage
// of every start), the unigram entropy against closed forms, and io::parse_json's refusals (each at
// its line, column and key path). Files live in a temp folder.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include <rex/data/dataset.hpp>
#include <rex/data/tokenizer.hpp>
#include <rex/io/files.hpp>
#include <rex/io/json.hpp>

#include "testing.hpp"

using namespace rex;
using rex::data::BatchSampler;
using rex::data::CharTokenizer;
using rex::testing::contains;
using rex::testing::error_message;
namespace fs = std::filesystem;

namespace {

// Row b of an i32 [batch, context] tensor.
std::vector<int32_t> row(const Tensor& t, int64_t b) {
  const int32_t* p = t.data<int32_t>() + b * t.dim(1);
  return std::vector<int32_t>(p, p + t.dim(1));
}

// tokens[start, start + n).
std::vector<int32_t> window(const std::vector<int32_t>& tokens, size_t start, size_t n) {
  return std::vector<int32_t>(tokens.begin() + static_cast<std::ptrdiff_t>(start),
                              tokens.begin() + static_cast<std::ptrdiff_t>(start + n));
}

// 0, 1, ..., n - 1: a stream where a window's first token is its start position.
std::vector<int32_t> positions(int32_t n) {
  std::vector<int32_t> tokens(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) tokens[static_cast<size_t>(i)] = i;
  return tokens;
}

}  // namespace

TEST_CASE("CharTokenizer: the vocabulary of \"hello\" is e, h, l, o") {
  const CharTokenizer tok = CharTokenizer::from_text("hello");
  CHECK(tok.vocab_size() == 4);
  CHECK(tok.vocabulary() == std::vector<uint8_t>{'e', 'h', 'l', 'o'});
  CHECK(tok.encode("hello") == std::vector<int32_t>{1, 0, 2, 2, 3});
  CHECK(tok.encode("") == std::vector<int32_t>{});
  CHECK(tok.decode({3, 2, 0, 1}) == "oleh");
}

TEST_CASE("CharTokenizer: encode/decode round trip on a text file") {
  testing::TempDir dir("data_tokenizer");
  const std::string text =
      "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
      "\tTabs, digits 0123456789 and symbols ~!@#$%^&*()_+{}|:\"<>?\n";
  io::write_file_atomic(dir.file("corpus.txt"), text);
  const std::string read = data::read_text_file(dir.file("corpus.txt"));
  REQUIRE(read == text);
  const CharTokenizer tok = CharTokenizer::from_text(read);
  const std::set<char> distinct(text.begin(), text.end());
  CHECK(tok.vocab_size() == static_cast<int64_t>(distinct.size()));
  const std::vector<int32_t> ids = tok.encode(read);
  REQUIRE(ids.size() == text.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    // The id is the byte's rank among the distinct bytes, counted naively.
    int32_t rank = 0;
    for (char c : distinct) rank += static_cast<uint8_t>(c) < static_cast<uint8_t>(text[i]);
    CHECK(ids[i] == rank);
  }
  CHECK(tok.decode(ids) == text);
}

TEST_CASE("CharTokenizer: bytes that are not ASCII (UTF-8 é = 0xC3 0xA9) round-trip") {
  const std::string text = "caf\xC3\xA9 \xC3\xA9t\xC3\xA9";
  const CharTokenizer tok = CharTokenizer::from_text(text);
  CHECK(tok.vocabulary() == std::vector<uint8_t>{' ', 'a', 'c', 'f', 't', 0xA9, 0xC3});
  CHECK(tok.encode("\xC3\xA9") == std::vector<int32_t>{6, 5});
  CHECK(tok.decode(tok.encode(text)) == text);
  const CharTokenizer back = CharTokenizer::from_json(nlohmann::json::parse(tok.to_json().dump()));
  CHECK(back.vocabulary() == tok.vocabulary());
  CHECK(back.decode(back.encode(text)) == text);
}

TEST_CASE("CharTokenizer: JSON form and round trip") {
  const CharTokenizer tok = CharTokenizer::from_text("hello");
  CHECK(tok.to_json().dump() == R"({"type":"char","vocabulary":[101,104,108,111]})");
  const CharTokenizer back =
      CharTokenizer::from_json(nlohmann::json::parse(R"({"vocabulary": [101, 104, 108, 111],
                                                         "type": "char"})"));
  CHECK(back.vocabulary() == tok.vocabulary());
  CHECK(back.encode("hello") == tok.encode("hello"));
}

TEST_CASE("CharTokenizer: errors") {
  const CharTokenizer tok = CharTokenizer::from_text("abc\n");
  std::string msg = error_message([&] { tok.encode("abxc"); });
  CHECK(contains(msg,
                 "CharTokenizer::encode: byte 'x' (0x78) at position 2 is not in the vocabulary"));
  msg = error_message([&] { tok.encode("a\tb"); });
  CHECK(contains(msg, "byte '\\t' (0x09) at position 1"));
  msg = error_message([&] { tok.encode(std::string("ab\x01", 3)); });
  CHECK(contains(msg, "byte 0x01 at position 2"));
  msg = error_message([&] { tok.encode("\xC3"); });
  CHECK(contains(msg, "byte 0xC3 at position 0"));

  msg = error_message([&] { tok.decode({0, 4}); });
  CHECK(contains(
      msg, "CharTokenizer::decode: id 4 at position 1 is out of range for a vocabulary of 4"));
  msg = error_message([&] { tok.decode({-1}); });
  CHECK(contains(msg, "id -1 at position 0 is out of range"));

  msg = error_message([] { CharTokenizer::from_text(""); });
  CHECK(contains(msg, "CharTokenizer::from_text: the text is empty"));
  msg = error_message([] { CharTokenizer(std::vector<uint8_t>{}); });
  CHECK(contains(msg, "CharTokenizer: the vocabulary is empty"));
  msg = error_message([] { CharTokenizer(std::vector<uint8_t>{'a', 'c', 'b'}); });
  CHECK(
      contains(msg, "vocabulary entry 2 ('b' (0x62)) is not above the one before it ('c' (0x63))"));
  msg = error_message([] { CharTokenizer(std::vector<uint8_t>{'a', 'a'}); });
  CHECK(contains(msg, "must be sorted ascending without repeats"));

  auto from_json = [](const char* text) {
    return error_message([&] { CharTokenizer::from_json(nlohmann::json::parse(text)); });
  };
  CHECK(
      contains(from_json("[1]"), "CharTokenizer::from_json: expected an object, got a JSON array"));
  CHECK(contains(from_json(R"({"vocabulary": [1]})"), "no \"type\" key"));
  CHECK(contains(from_json(R"({"type": "bpe", "vocabulary": [1]})"),
                 "type is \"bpe\", not \"char\""));
  CHECK(contains(from_json(R"({"type": 3, "vocabulary": [1]})"), "type is 3, not \"char\""));
  CHECK(contains(from_json(R"({"type": "char"})"), "no \"vocabulary\" key"));
  CHECK(contains(from_json(R"({"type": "char", "vocabulary": "abc"})"),
                 "\"vocabulary\" is a JSON string, not an array"));
  CHECK(contains(from_json(R"({"type": "char", "vocabulary": [1, 256]})"),
                 "vocabulary entry 256 is not a byte value"));
  CHECK(contains(from_json(R"({"type": "char", "vocabulary": [-1]})"),
                 "vocabulary entry -1 is not a byte value"));
  CHECK(contains(from_json(R"({"type": "char", "vocabulary": ["a"]})"),
                 "vocabulary entry \"a\" is not a byte value"));
  CHECK(contains(from_json(R"({"type": "char", "vocabulary": [2, 1]})"),
                 "is not above the one before it"));
  CHECK(contains(from_json(R"({"type": "char", "vocabulary": []})"), "the vocabulary is empty"));
  // JSON built in code may hold strings that are not UTF-8: still a rex::Error, never the JSON
  // library's exception from dumping them into the message.
  CHECK(contains(error_message([] {
                   CharTokenizer::from_json({{"type", "\xC3"}, {"vocabulary", {1}}});
                 }),
                 "type is \"\xEF\xBF\xBD\", not \"char\""));
  CHECK(contains(error_message([] {
                   CharTokenizer::from_json({{"type", "char"}, {"vocabulary", {"\xFF"}}});
                 }),
                 "is not a byte value"));
}

TEST_CASE("io::parse_json: every refusal names the source, line, column and key path") {
  auto message = [](const std::string& text) {
    return error_message([&] { rex::io::parse_json(text, "run/config.json"); });
  };
  // A number beyond double range: the column of its first digit, the key that holds it.
  CHECK(message(R"({"train": {"lr": 1e999}})") ==
        "run/config.json:1:18: train.lr: number overflow parsing '1e999'");
  CHECK(message("{\n  \"train\": {\n    \"lr\": 1e999\n  }\n}") ==
        "run/config.json:3:11: train.lr: number overflow parsing '1e999'");
  CHECK(message("[1, [2, 3], {\"k\": [4, -1e999]}]") ==
        "run/config.json:1:23: [2].k[1]: number overflow parsing '-1e999'");
  // A syntax error on line 3: the character the parser stopped at, inside "train".
  CHECK(message("{\n  \"model\": {\"d_model\": 32},\n  \"train\": {\"lr\": 1e-3,}\n}") ==
        "run/config.json:3:24: train: syntax error while parsing object key - unexpected '}'; "
        "expected string literal");
  CHECK(message("{\"type\": ") ==
        "run/config.json:1:10: type: syntax error while parsing value - unexpected end of input; "
        "expected '[', '{', or a literal");
  CHECK(message("") ==
        "run/config.json:1:1: syntax error while parsing value - unexpected end of "
        "input; expected '[', '{', or a literal");
  // A key given twice in one object: the second one, by its opening quote, at any depth.
  CHECK(message("{\"model\": {\n  \"d_model\": 32,\n  \"d_model\": 64}}") ==
        "run/config.json:3:3: model.d_model: key appears twice in one object");
  CHECK(message(R"({"type": "char", "type": "char"})") ==
        "run/config.json:1:18: type: key appears twice in one object");
  CHECK(message(R"({"a": {"b": 1, "c": {"d": 2, "d": 3}}})") ==
        "run/config.json:1:30: a.c.d: key appears twice in one object");
  CHECK(message(R"([{"k": 1}, {"k": 1, "k": 2}])") ==
        "run/config.json:1:21: [1].k: key appears twice in one object");
  CHECK(message(R"({"a\"b": 1, "a\"b": 2})") ==
        "run/config.json:1:13: a\"b: key appears twice in one object");
  // Text that is not UTF-8: the byte where it stops being UTF-8 (0xE9 starts a 3-byte character;
  // 'a' cannot continue it), on line 2.
  CHECK(message("{\"name\": \"x\",\n \"psr\": {\"schedule\": \"lin\xE9"
                "ar\"}}") ==
        "run/config.json:2:27: psr.schedule: syntax error while parsing value - invalid string: "
        "ill-formed UTF-8 byte; last read: '\"lin\xE9"
        "a'");
  // Columns count characters: "é" is two bytes, one column.
  CHECK(message("{\"\xC3\xA9\": 1e999}") ==
        "run/config.json:1:7: \xC3\xA9: number overflow parsing '1e999'");
  // Equal keys in different objects are fine, and the value is what nlohmann's parse gives.
  const std::string ok =
      R"({"a": {"k": 1}, "b": {"k": 2}, "k": [{"k": 3}, {"k": 4}, []], "n": null, "t": true,
          "u": 18446744073709551615, "i": -3, "f": 2.5, "s": "\u00e9\n"})";
  CHECK(rex::io::parse_json(ok, "ok") == nlohmann::json::parse(ok));
  CHECK(rex::io::parse_json("7", "ok") == 7);
}

TEST_CASE("io::text_position: line and column from 1, the column in UTF-8 characters") {
  const std::string text = "ab\n\xC3\xA9x\n";
  auto at = [&](size_t offset) {
    const io::TextPosition p = io::text_position(text, offset);
    return std::to_string(p.line) + ":" + std::to_string(p.column);
  };
  CHECK(at(0) == "1:1");
  CHECK(at(2) == "1:3");  // the newline ends line 1
  CHECK(at(3) == "2:1");
  CHECK(at(5) == "2:2");  // after the two bytes of "é"
  CHECK(at(7) == "3:1");  // the end of the text
  CHECK(at(100) == "3:1");
}

TEST_CASE("read_text_file: empty and missing files are errors naming the path") {
  testing::TempDir dir("data_files");
  io::write_file_atomic(dir.file("empty.txt"), "");
  std::string msg = error_message([&] { data::read_text_file(dir.file("empty.txt")); });
  CHECK(msg == "read_text_file: " + dir.file("empty.txt") + ": file is empty");
  msg = error_message([&] { data::read_text_file(dir.file("missing.txt")); });
  CHECK(msg == "read_file: " + dir.file("missing.txt") + ": file does not exist");
}

TEST_CASE("split_tokens: the first floor(n * fraction) tokens train, the rest validate") {
  const data::TokenSplit split = data::split_tokens(positions(100));
  CHECK(split.train == positions(90));
  CHECK(split.validation == window(positions(100), 90, 10));
  const data::TokenSplit half = data::split_tokens(positions(11), 0.5);  // floor(5.5) = 5
  CHECK(half.train == positions(5));
  CHECK(half.validation == window(positions(11), 5, 6));
  const data::TokenSplit two = data::split_tokens(positions(2), 0.99);  // floor(1.98) = 1
  CHECK(two.train == std::vector<int32_t>{0});
  CHECK(two.validation == std::vector<int32_t>{1});

  for (double bad : {0.0, 1.0, -0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    const std::string msg = error_message([&] { data::split_tokens(positions(100), bad); });
    CHECK_MESSAGE(contains(msg, "split_tokens: train_fraction "), msg);
    CHECK_MESSAGE(contains(msg, " is not in (0, 1)"), msg);
  }
  std::string msg = error_message([] { data::split_tokens(positions(5), 0.1); });
  CHECK(contains(msg,
                 "split_tokens: 5 tokens with train_fraction 0.1 give 0 training and 5 "
                 "validation tokens; both parts must be non-empty"));
  msg = error_message([] { data::split_tokens({}, 0.9); });
  CHECK(contains(msg, "0 tokens with train_fraction 0.9 give 0 training and 0 validation"));
}

TEST_CASE("BatchSampler: rows are windows of the stream, targets shifted by one") {
  // A stream over 5 symbols: windows are not identifiable from their first token, so each row is
  // matched against every start by brute force.
  Generator gen(11);
  std::vector<int32_t> tokens(300);
  for (int32_t& t : tokens) t = static_cast<int32_t>(gen.below(5));
  const int64_t batch = 6, context = 9;
  const BatchSampler sampler(tokens, batch, context, 7, "train");
  CHECK(sampler.num_tokens() == 300);
  for (uint64_t index : {0ull, 1ull, 12345ull}) {
    const data::Batch b = sampler.sample(index);
    REQUIRE(b.inputs.shape() == Shape{batch, context});
    REQUIRE(b.targets.shape() == Shape{batch, context});
    REQUIRE(b.inputs.dtype() == DType::i32);
    REQUIRE(b.targets.dtype() == DType::i32);
    for (int64_t r = 0; r < batch; ++r) {
      const std::vector<int32_t> in = row(b.inputs, r), out = row(b.targets, r);
      for (int64_t t = 0; t + 1 < context; ++t)
        CHECK(out[static_cast<size_t>(t)] == in[static_cast<size_t>(t + 1)]);
      bool found = false;
      for (size_t s = 0; s + context + 1 <= tokens.size() && !found; ++s)
        found = window(tokens, s, context) == in && window(tokens, s + 1, context) == out;
      CHECK_MESSAGE(found, "index ", index, " row ", r, " is not a window of the stream");
    }
  }
}

TEST_CASE("BatchSampler: a batch is a pure function of (seed, index)") {
  const std::vector<int32_t> tokens = positions(100000);
  const BatchSampler a(tokens, 4, 16, 42, "train");
  const BatchSampler b(tokens, 4, 16, 42, "train");
  const BatchSampler other_seed(tokens, 4, 16, 43, "train");
  // Out of order and repeated: the same index gives the same batch, whatever came before.
  const std::vector<int32_t> first = a.sample(5).inputs.to_vector<int32_t>();
  a.sample(6);
  CHECK(a.sample(5).inputs.to_vector<int32_t>() == first);
  CHECK(b.sample(5).inputs.to_vector<int32_t>() == first);
  CHECK(b.sample(5).targets.to_vector<int32_t>() == a.sample(5).targets.to_vector<int32_t>());
  CHECK(a.sample(6).inputs.to_vector<int32_t>() != first);
  CHECK(other_seed.sample(5).inputs.to_vector<int32_t>() != first);

  // The documented draw: row r starts at draw r of Generator(mix64(seed ^ mix64(index)), 0),
  // uniform below the number of starts (100000 - 16).
  Generator gen(mix64(42 ^ mix64(5)), 0);
  for (int64_t r = 0; r < 4; ++r)
    CHECK(first[static_cast<size_t>(r * 16)] == static_cast<int32_t>(gen.below(100000 - 16)));
}

TEST_CASE("BatchSampler: window starts cover [0, size - context - 1] evenly") {
  // 20 tokens, context 4: the 16 starts 0..15. With positions as tokens, a row's first input is its
  // start. 16000 draws give each start 1000 expected hits (standard deviation about 31).
  const BatchSampler sampler(positions(20), 8, 4, 3, "train");
  std::vector<int64_t> hits(16, 0);
  for (uint64_t index = 0; index < 2000; ++index) {
    const std::vector<int32_t> inputs = sampler.sample(index).inputs.to_vector<int32_t>();
    for (int64_t r = 0; r < 8; ++r) {
      const int32_t start = inputs[static_cast<size_t>(r * 4)];
      REQUIRE(start >= 0);
      REQUIRE(start <= 15);
      ++hits[static_cast<size_t>(start)];
    }
  }
  CHECK(hits.front() > 0);  // the minimum start 0 occurs
  CHECK(hits.back() > 0);   // the maximum start 20 - 4 - 1 = 15 occurs
  for (int64_t h : hits) CHECK((h > 850 && h < 1150));

  // A stream of exactly context + 1 tokens has one window.
  const data::Batch only = BatchSampler(positions(5), 3, 4, 1, "tiny").sample(9);
  CHECK(only.inputs.to_vector<int32_t>() ==
        std::vector<int32_t>{0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3});
  CHECK(only.targets.to_vector<int32_t>() ==
        std::vector<int32_t>{1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4});
}

TEST_CASE("BatchSampler: errors name the split and the counts") {
  std::string msg = error_message([] { BatchSampler(positions(8), 2, 8, 0, "validation"); });
  CHECK(msg ==
        "BatchSampler: validation split has 8 tokens, fewer than context + 1 = 9 (one window)");
  msg = error_message([] { BatchSampler(positions(8), 0, 4, 0, "train"); });
  CHECK(msg == "BatchSampler: train split: batch 0 must be at least 1");
  msg = error_message([] { BatchSampler(positions(8), 2, 0, 0, "train"); });
  CHECK(msg == "BatchSampler: train split: context 0 must be at least 1");
  msg = error_message([] { BatchSampler(std::vector<int32_t>{}, 1, 1, 0, "train"); });
  CHECK(contains(msg, "train split has 0 tokens, fewer than context + 1 = 2"));
}

TEST_CASE("unigram_entropy: closed forms") {
  std::vector<int32_t> uniform;
  for (int i = 0; i < 25; ++i)
    for (int32_t v : {0, 1, 2, 3}) uniform.push_back(v);
  // In double: exact counts, a handful of roundings of 2^-53 each; 1e-12 is far above them and far
  // below any wrong formula.
  CHECK(data::unigram_entropy(uniform, 4) == doctest::Approx(std::log(4.0)).epsilon(1e-12));
  // Unused vocabulary entries contribute nothing.
  CHECK(data::unigram_entropy(uniform, 10) == doctest::Approx(std::log(4.0)).epsilon(1e-12));
  CHECK(data::unigram_entropy({2, 2, 2, 2, 2}, 3) == 0.0);
  // p = 1/2, 1/4, 1/4: -(1/2 log 1/2 + 2 * 1/4 log 1/4) = 1.5 log 2.
  CHECK(data::unigram_entropy({0, 0, 1, 2}, 3) ==
        doctest::Approx(1.5 * std::log(2.0)).epsilon(1e-12));

  std::string msg = error_message([] { data::unigram_entropy({0, 3}, 3); });
  CHECK(msg == "unigram_entropy: token 3 at position 1 is out of range for a vocabulary of 3");
  msg = error_message([] { data::unigram_entropy({-1}, 3); });
  CHECK(contains(msg, "token -1 at position 0 is out of range"));
  msg = error_message([] { data::unigram_entropy(std::vector<int32_t>{}, 3); });
  CHECK(msg == "unigram_entropy: no tokens");
  msg = error_message([] { data::unigram_entropy({0}, 0); });
  CHECK(msg == "unigram_entropy: vocab_size 0 must be at least 1");
}
