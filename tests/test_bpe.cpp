// The byte-level BPE tokenizer (rex/data/bpe.hpp): GPT-2's pre-split on examples worked out by hand
// from its regex, training against hand-worked merge sequences and against a naive trainer that
// recounts every pair after every merge, merge priority on hand-made merge lists, decode(encode(x))
// == x on arbitrary bytes, the tokenizer.json round trip and the refusals of malformed files.
// (Agreement with the Hugging Face library itself: tests/test_bpe_hf.sh.)
#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <rex/data/bpe.hpp>
#include <rex/io/files.hpp>

#include "testing.hpp"

using namespace rex;
using data::BpeTokenizer;
using nlohmann::json;
using rex::testing::error_message;

namespace {

std::vector<std::string> words_of(std::string_view text) {
  std::vector<std::string> out;
  data::split_words(text, [&](std::string_view w) { out.emplace_back(w); });
  return out;
}

// A tokenizer.json with all 256 byte tokens (id = byte), then `extra` tokens, and `merges`.
json tokenizer_file(const std::vector<std::string>& extra, const json& merges) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[data::byte_level_string(std::string(1, char(b)))] = b;
  for (size_t i = 0; i < extra.size(); ++i) vocab[extra[i]] = 256 + i;
  const json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}};
  return {{"normalizer", nullptr},
          {"pre_tokenizer", byte_level},
          {"decoder", byte_level},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
}

// The textbook trainer: count every adjacent pair of every word from scratch, merge the most
// frequent (ties: the smaller pair of ids), repeat.
std::vector<std::pair<int32_t, int32_t>> naive_merges(std::string_view text, int64_t vocab_size) {
  std::vector<std::vector<int32_t>> words;
  data::split_words(text, [&](std::string_view w) {
    words.emplace_back();
    for (char c : w) words.back().push_back(static_cast<uint8_t>(c));
  });
  std::vector<std::pair<int32_t, int32_t>> merges;
  for (int32_t next = 256; next < vocab_size; ++next) {
    std::map<std::pair<int32_t, int32_t>, int64_t> count;
    for (const auto& w : words)
      for (size_t k = 0; k + 1 < w.size(); ++k) ++count[{w[k], w[k + 1]}];
    if (count.empty()) break;
    auto best = count.begin();
    for (auto it = count.begin(); it != count.end(); ++it)
      if (it->second > best->second) best = it;  // std::map order: the first is the smallest pair
    merges.push_back(best->first);
    for (auto& w : words) {
      std::vector<int32_t> merged;
      for (size_t k = 0; k < w.size(); ++k) {
        if (k + 1 < w.size() && std::pair(w[k], w[k + 1]) == best->first) {
          merged.push_back(next), ++k;
        } else {
          merged.push_back(w[k]);
        }
      }
      w = merged;
    }
  }
  return merges;
}

// English-like text: seeded random words of common syllables, with punctuation, digits, new lines.
std::string sample_text(size_t bytes, unsigned seed = 3) {
  static const char* kSyllables[] = {"th", "e",  "an", "re", "st", "ing", "o", "ou", "er", "a",
                                     "l",  "ea", "s",  "t",  "nd", "w",   "i", "h",  "ll", "me"};
  static const char* kAfterWord[] = {" ", " ", " ", " ", ", ", ". ", "\n", "'s ", " 42 ", "!\n\n"};
  std::mt19937 rng(seed);
  std::string text;
  while (text.size() < bytes) {
    for (unsigned k = 0, n = 1 + rng() % 4; k < n; ++k) text += kSyllables[rng() % 20];
    text += kAfterWord[rng() % 10];
  }
  return text.substr(0, bytes);
}

}  // namespace

TEST_CASE("split_words cuts text as GPT-2's regex does") {
  using V = std::vector<std::string>;
  CHECK(words_of("Hello world") == V{"Hello", " world"});
  CHECK(words_of("it's  fine") == V{"it", "'s", " ", " fine"});  // \s+(?!\S) leaves one space
  CHECK(words_of("a\n\nb") == V{"a", "\n", "\n", "b"});
  CHECK(words_of("x   ") == V{"x", "   "});  // white space at the end stays whole
  CHECK(words_of("42 apples, 3.5kg!!") == V{"42", " apples", ",", " 3", ".", "5", "kg", "!!"});
  CHECK(words_of(" 's") == V{" '", "s"});  // no contraction after a space
  CHECK(words_of("don't they'll we've") == V{"don", "'t", " they", "'ll", " we", "'ve"});
  CHECK(words_of("caf\xC3\xA9 na\xC3\xAFve\xE2\x80\x94ok") ==
        V{"caf\xC3\xA9", " na\xC3\xAFve", "\xE2\x80\x94", "ok"});  // é ï letters, em dash not
  CHECK(words_of("ab\xFF\xFE"
                 "cd") == V{"ab", "\xFF\xFE", "cd"});          // invalid UTF-8: "other"
  CHECK(words_of("\xE3\x80\x80x") == V{"\xE3\x80\x80", "x"});  // U+3000 is white space
  CHECK(words_of("").empty());
}

TEST_CASE("split_words: the pieces of arbitrary bytes concatenate back to them") {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    std::string text(rng() % 64, '\0');
    for (char& c : text) c = static_cast<char>(rng() % 256);
    std::string joined;
    for (const std::string& w : words_of(text)) {
      CHECK(!w.empty());
      joined += w;
    }
    CHECK(joined == text);
  }
}

TEST_CASE("byte_symbol is GPT-2's map: printable bytes themselves, the other 68 from U+0100") {
  CHECK(data::byte_symbol('!') == '!');
  CHECK(data::byte_symbol(0xA1) == 0xA1);
  CHECK(data::byte_symbol(0) == 0x100);
  CHECK(data::byte_symbol(' ') == 0x100 + 32);  // "Ġ": bytes 0..32 are the first 33
  CHECK(data::byte_symbol(0x7F) == 0x100 + 33);
  CHECK(data::byte_symbol(0xA0) == 0x100 + 33 + 33);  // 0x7F..0xA0 are the next 34
  CHECK(data::byte_symbol(0xAD) == 0x100 + 67);       // the soft hyphen is the last
  std::vector<uint32_t> all;
  for (int b = 0; b < 256; ++b) all.push_back(data::byte_symbol(static_cast<uint8_t>(b)));
  std::sort(all.begin(), all.end());
  CHECK(std::adjacent_find(all.begin(), all.end()) == all.end());
  CHECK(data::byte_level_string(" a") ==
        "\xC4\xA0"
        "a");
}

TEST_CASE("training merges the most frequent pair, ties to the smaller ids (worked by hand)") {
  // Words "ab", " ab" x2, " ac". Counts: (a,b) 3, (' ',a) 3, (a,c) 1; the tie goes to (32, 97):
  // 256 = " a". Then (256,b) 2 -> 257 = " ab"; then (a,b) 1 and (256,c) 1 tie: 258 = "ab",
  // 259 = " ac". No pair is left, so the vocabulary stops at 260 of the 300 asked for.
  const BpeTokenizer tok = BpeTokenizer::train("ab ab ab ac", 300);
  using P = std::vector<std::pair<int32_t, int32_t>>;
  CHECK(tok.merges() == P{{' ', 'a'}, {256, 'b'}, {'a', 'b'}, {256, 'c'}});
  CHECK(tok.vocab_size() == 260);
  CHECK(tok.encode("ab ab ab ac") == std::vector<int32_t>{258, 257, 257, 259});
  CHECK(tok.token_bytes(257) == " ab");
  const BpeTokenizer two = BpeTokenizer::train("ab ab ab ac", 258);
  CHECK(two.encode("ab ab ab ac") == std::vector<int32_t>{'a', 'b', 257, 257, 256, 'c'});
}

TEST_CASE("training counts overlapping pairs and merges them left to right") {
  // "aaaa": (a,a) occurs 3 times -> 256 = "aa", the word becomes [256, 256] -> 257 = "aaaa".
  const BpeTokenizer tok = BpeTokenizer::train("aaaa", 1000);
  CHECK(tok.vocab_size() == 258);
  CHECK(tok.encode("aaaa") == std::vector<int32_t>{257});
  CHECK(tok.encode("aaa") == std::vector<int32_t>{256, 'a'});
  CHECK(tok.encode("aaaaa") == std::vector<int32_t>{257, 'a'});
  CHECK(tok.encode("aaaaaaaa") == std::vector<int32_t>{257, 257});
}

TEST_CASE("incremental training makes the merges of a trainer that recounts everything") {
  const std::string text = sample_text(20000);
  const BpeTokenizer tok = BpeTokenizer::train(text, 420);
  CHECK(tok.vocab_size() == 420);
  CHECK(tok.merges() == naive_merges(text, 420));
}

TEST_CASE("encoding applies the lowest-ranked merge first") {
  // Tokens 256 = "ab", 257 = "bc". "abc": with "b c" ranked first, a + bc; with "a b" first, ab +
  // c.
  const BpeTokenizer bc_first =
      BpeTokenizer::from_json(tokenizer_file({"ab", "bc"}, {"b c", "a b"}), "t.json");
  CHECK(bc_first.encode("abc") == std::vector<int32_t>{'a', 257});
  const BpeTokenizer ab_first =
      BpeTokenizer::from_json(tokenizer_file({"ab", "bc"}, {"a b", "b c"}), "t.json");
  CHECK(ab_first.encode("abc") == std::vector<int32_t>{256, 'c'});
  // [left, right] pairs (the library's newer form) mean the same as "left right".
  const BpeTokenizer pairs = BpeTokenizer::from_json(
      tokenizer_file({"ab", "bc"}, json::array({{"b", "c"}, {"a", "b"}})), "t.json");
  CHECK(pairs.encode("abc abc") == bc_first.encode("abc abc"));
  // A merge never crosses words: " abc" is one word, "ab c" two.
  CHECK(ab_first.encode("ab c") == std::vector<int32_t>{256, ' ', 'c'});
}

TEST_CASE("decode(encode(x)) == x for arbitrary bytes, invalid UTF-8 included") {
  const BpeTokenizer tok = BpeTokenizer::train(sample_text(50000), 600);
  std::mt19937 rng(5);
  for (int trial = 0; trial < 300; ++trial) {
    std::string text(rng() % 200, '\0');
    const bool ascii = trial % 2 == 0;  // half of them look like the training text
    for (char& c : text) c = static_cast<char>(ascii ? 32 + rng() % 95 : rng() % 256);
    const std::vector<int32_t> ids = tok.encode(text);
    CHECK(tok.decode(ids) == text);
    CHECK(ids.size() <= text.size());
  }
  CHECK(tok.decode(tok.encode("\xC3\x28\xFF\x80 ok\xF0\x9F\x98")) ==
        "\xC3\x28\xFF\x80 ok\xF0\x9F\x98");
  CHECK(error_message([&] { tok.decode({600}); }).find("out of range") != std::string::npos);
}

TEST_CASE("tokenizer.json round trip: the same vocabulary, merges and ids") {
  const std::string text = sample_text(30000);
  const BpeTokenizer tok = BpeTokenizer::train(text, 500);
  const testing::TempDir dir("bpe_roundtrip");
  tok.save(dir.file("tokenizer.json"));
  const BpeTokenizer back = BpeTokenizer::load(dir.file("tokenizer.json"));
  CHECK(back.vocab_size() == tok.vocab_size());
  CHECK(back.merges() == tok.merges());
  CHECK(back.encode(text) == tok.encode(text));
  const json saved = tok.to_json();
  CHECK(saved["model"]["type"] == "BPE");
  CHECK(saved["pre_tokenizer"]["type"] == "ByteLevel");
  CHECK(saved["model"]["vocab"]["\xC4\xA0"] == ' ');  // "Ġ" is the space byte, id 32
}

TEST_CASE("added tokens are matched before the split, add_prefix_space adds a space per piece") {
  json file = tokenizer_file({"<|end|>"}, json::array());
  file["added_tokens"] = {{{"id", 256}, {"content", "<|end|>"}, {"special", true}}};
  const BpeTokenizer tok = BpeTokenizer::from_json(file, "t.json");
  CHECK(tok.encode("a<|end|>b") == std::vector<int32_t>{'a', 256, 'b'});
  CHECK(tok.decode({'a', 256}) == "a<|end|>");
  file["pre_tokenizer"]["add_prefix_space"] = true;
  const BpeTokenizer prefixed = BpeTokenizer::from_json(file, "t.json");
  CHECK(prefixed.encode("a<|end|>b") == std::vector<int32_t>{' ', 'a', 256, ' ', 'b'});
  CHECK(prefixed.encode(" a") == std::vector<int32_t>{' ', 'a'});
}

TEST_CASE(
    "a tokenizer.json that is not byte-level BPE or is malformed is refused, naming the key") {
  auto refusal = [](const json& file) {
    return error_message([&] { BpeTokenizer::from_json(file, "bad.json"); });
  };
  const json good = tokenizer_file({"ab"}, {"a b"});
  CHECK_NOTHROW(BpeTokenizer::from_json(good, "bad.json"));
  json no_type = good;  // GPT-2's file names no model type: the library infers BPE from the keys
  no_type["model"].erase("type");
  CHECK(BpeTokenizer::from_json(no_type, "gpt2.json").encode("ab") == std::vector<int32_t>{256});
  auto with = [&](const std::string& pointer, const json& value) {
    json j = good;
    j[json::json_pointer(pointer)] = value;
    return j;
  };
  auto contains = [](const std::string& message, const std::string& part) {
    CHECK_MESSAGE(message.find(part) != std::string::npos, message);
  };
  std::string m = refusal(with("/model/type", "WordPiece"));
  contains(m, "bad.json: key \"model.type\": expected \"BPE\", got \"WordPiece\"");
  m = refusal(with("/pre_tokenizer", {{"type", "Metaspace"}}));
  contains(m, "key \"pre_tokenizer\": expected an object of \"type\": \"ByteLevel\"");
  m = refusal(with("/model/merges/0", "a c"));  // "ac" is not a token
  contains(m, "key \"model.merges[0]\": expected tokens of model.vocab, but \"ac\" is not one");
  m = refusal(with("/model/merges/0", "a"));
  contains(m, "key \"model.merges[0]\": expected two tokens separated by one space, got \"a\"");
  m = refusal(with("/model/merges/0", "a b c"));
  contains(m, "expected two tokens separated by one space");
  m = refusal(with("/model/merges/0", json::array({"a", "b", "c"})));
  contains(m, "key \"model.merges[0]\": expected \"left right\" or [\"left\", \"right\"]");
  m = refusal(with("/model/vocab/ab", 7));     // the id of the byte 7
  contains(m, "expected an id of its own (");  // whichever of the two comes second
  contains(m, " has id 7 too), got 7");
  m = refusal(with("/model/vocab/ab", 9999));
  contains(m, "expected an id below the vocabulary's size 257");
  json no_vocab = good;
  no_vocab["model"].erase("vocab");
  contains(refusal(no_vocab),
           "key \"model.vocab\": expected an object of token -> id, but it is missing");
  json no_model = good;
  no_model.erase("model");
  contains(refusal(no_model), "key \"model\": expected an object, but it is missing");
  json missing_byte = good;
  missing_byte["model"]["vocab"].erase("A");
  missing_byte["model"]["vocab"]["\xE2\x80\x94"] = 'A';  // a character outside the byte map
  contains(refusal(missing_byte), "expected a token of byte-level symbols");
  m = refusal(with("/normalizer", {{"type", "NFC"}}));
  contains(m, "key \"normalizer\": expected null");
  m = refusal(with("/model/merges/1", "a b"));
  contains(m, "key \"model.merges[1]\": expected each pair merged once");
  json missing_byte_token = good;
  missing_byte_token["model"]["vocab"].erase("A");
  missing_byte_token["model"]["vocab"]["aa"] = 'A';
  contains(refusal(missing_byte_token),
           "key \"model.vocab\": expected a token for each of the 256 bytes; byte 65 (A) has none");
  contains(refusal(json::array()), "bad.json: expected an object, got []");
  const std::string long_array = refusal(json::array({std::string(1000, 'x')}));
  CHECK(long_array.size() < 400);  // the value is cut, not dumped whole
  contains(long_array, "xxx... (rex reads byte-level BPE tokenizers)");
}
