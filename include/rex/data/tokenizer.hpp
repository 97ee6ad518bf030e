// CharTokenizer: a byte-level tokenizer whose vocabulary is the distinct bytes of a training text.
//
// Token ids are positions in the sorted vocabulary, so a given text always gets the same ids.
// Bytes, not Unicode code points: any file works, including invalid UTF-8, and a multi-byte
// character is simply several tokens. The JSON form stores the bytes as integers (not as a string)
// so that bytes that are not valid UTF-8 survive a round trip through a JSON file.
//
// Tokenizer: the tokenizer of a run, data.tokenizer says which: a CharTokenizer ("bytes", saved as
// vocab.json) or a byte-level BpeTokenizer (rex/data/bpe.hpp; saved as tokenizer.json).
#pragma once

#include <array>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "rex/core/error.hpp"
#include "rex/data/bpe.hpp"
#include "rex/io/json.hpp"

namespace rex::detail {

// A byte for error messages: 'a' (0x61), '\n' (0x0A), or 0xC3 alone when it is not printable.
inline std::string describe_byte(uint8_t byte) {
  char hex[8];
  std::snprintf(hex, sizeof hex, "0x%02X", static_cast<unsigned>(byte));
  if (byte >= 0x20 && byte < 0x7F) return concat("'", static_cast<char>(byte), "' (", hex, ")");
  if (byte == '\n') return concat("'\\n' (", hex, ")");
  if (byte == '\t') return concat("'\\t' (", hex, ")");
  if (byte == '\r') return concat("'\\r' (", hex, ")");
  return hex;
}

}  // namespace rex::detail

namespace rex::data {

class CharTokenizer {
 public:
  // The vocabulary is the distinct bytes of `text`, sorted ascending.
  static CharTokenizer from_text(std::string_view text) {
    REX_CHECK(!text.empty(),
              "CharTokenizer::from_text: the text is empty, so there is no vocabulary");
    std::array<bool, 256> seen{};
    for (char c : text) seen[static_cast<uint8_t>(c)] = true;
    std::vector<uint8_t> vocabulary;
    for (int byte = 0; byte < 256; ++byte)
      if (seen[static_cast<size_t>(byte)]) vocabulary.push_back(static_cast<uint8_t>(byte));
    return CharTokenizer(std::move(vocabulary));
  }

  // `vocabulary` must be non-empty, strictly ascending (sorted, no byte twice).
  explicit CharTokenizer(std::vector<uint8_t> vocabulary) : vocabulary_(std::move(vocabulary)) {
    REX_CHECK(!vocabulary_.empty(), "CharTokenizer: the vocabulary is empty");
    ids_.fill(-1);
    for (size_t i = 0; i < vocabulary_.size(); ++i) {
      REX_CHECK(i == 0 || vocabulary_[i - 1] < vocabulary_[i], "CharTokenizer: vocabulary entry ",
                i, " (", detail::describe_byte(vocabulary_[i]),
                ") is not above the one before it (", detail::describe_byte(vocabulary_[i - 1]),
                "): the vocabulary must be sorted ascending without repeats");
      ids_[vocabulary_[i]] = static_cast<int32_t>(i);
    }
  }

  int64_t vocab_size() const { return static_cast<int64_t>(vocabulary_.size()); }
  const std::vector<uint8_t>& vocabulary() const { return vocabulary_; }

  std::vector<int32_t> encode(std::string_view text) const {
    std::vector<int32_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) {
      const uint8_t byte = static_cast<uint8_t>(text[i]);
      REX_CHECK(ids_[byte] >= 0, "CharTokenizer::encode: byte ", detail::describe_byte(byte),
                " at position ", i, " is not in the vocabulary (", vocabulary_.size(), " bytes)");
      ids[i] = ids_[byte];
    }
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids) const {
    std::string text(ids.size(), '\0');
    for (size_t i = 0; i < ids.size(); ++i) {
      REX_CHECK(ids[i] >= 0 && ids[i] < vocab_size(), "CharTokenizer::decode: id ", ids[i],
                " at position ", i, " is out of range for a vocabulary of ", vocab_size());
      text[i] = static_cast<char>(vocabulary_[static_cast<size_t>(ids[i])]);
    }
    return text;
  }

  // {"type": "char", "vocabulary": [byte values as integers]}
  nlohmann::json to_json() const {
    return {{"type", "char"}, {"vocabulary", nlohmann::json(vocabulary_)}};
  }

  static CharTokenizer from_json(const nlohmann::json& j) {
    const char* where = "CharTokenizer::from_json";
    REX_CHECK(j.is_object(), where, ": expected an object, got a JSON ", j.type_name());
    REX_CHECK(j.contains("type"), where, ": no \"type\" key");
    REX_CHECK(j.at("type") == "char", where, ": type is ", io::json_text(j.at("type")),
              ", not \"char\"");
    REX_CHECK(j.contains("vocabulary"), where, ": no \"vocabulary\" key");
    const nlohmann::json& list = j.at("vocabulary");
    REX_CHECK(list.is_array(), where, ": \"vocabulary\" is a JSON ", list.type_name(),
              ", not an array");
    std::vector<uint8_t> vocabulary;
    for (const nlohmann::json& byte : list) {
      REX_CHECK(byte.is_number_unsigned() && byte.get<uint64_t>() <= 255, where,
                ": vocabulary entry ", io::json_text(byte),
                " is not a byte value (an integer 0..255)");
      vocabulary.push_back(static_cast<uint8_t>(byte.get<uint64_t>()));
    }
    return CharTokenizer(std::move(vocabulary));
  }

 private:
  std::vector<uint8_t> vocabulary_;
  std::array<int32_t, 256> ids_;  // byte -> id, -1 for a byte outside the vocabulary
};

class Tokenizer {
 public:
  Tokenizer(CharTokenizer chars) : impl_(std::move(chars)) {}
  Tokenizer(BpeTokenizer bpe) : impl_(std::move(bpe)) {}

  // The tokenizer's own type, or nullptr when it is the other one.
  const CharTokenizer* chars() const { return std::get_if<CharTokenizer>(&impl_); }
  const BpeTokenizer* bpe() const { return std::get_if<BpeTokenizer>(&impl_); }

  int64_t vocab_size() const {
    return std::visit([](const auto& t) { return t.vocab_size(); }, impl_);
  }
  std::vector<int32_t> encode(std::string_view text) const {
    return std::visit([&](const auto& t) { return t.encode(text); }, impl_);
  }
  std::string decode(const std::vector<int32_t>& ids) const {
    return std::visit([&](const auto& t) { return t.decode(ids); }, impl_);
  }

 private:
  std::variant<CharTokenizer, BpeTokenizer> impl_;
};

}  // namespace rex::data
