// JSON text in and out, strictly: what every rex file reader parses JSON with.
//
// parse_json refuses what nlohmann's parser refuses (bad syntax, invalid UTF-8, a number beyond
// double range such as 1e999) and a key given twice in one object (the parser would silently keep
// the last one). Every refusal is a rex::Error that says where, as a compiler does:
//   config.json:3:20: train.lr: number overflow parsing '1e999'
// the source, the line and the column (from 1; the column counts characters), the key path of the
// value being read ("train.lr", "arms[2].name"; left out at the top level), then the problem. The
// parser is nlohmann's, driven through its SAX interface: its errors come with their byte offset,
// and the handler builds the value itself, so it knows the key path at every point. The text is
// read through an iterator that records how far the parser has read, which places a repeated key
// (SAX reports keys without a position).
// json_text shows a value in an error message without ever throwing, even when a string in it
// holds bytes that are not UTF-8.
#pragma once

#include <algorithm>
#include <cstddef>
#include <iterator>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "rex/core/error.hpp"

namespace rex::io {

// A JSON value as text for an error message; invalid UTF-8 in a string is shown as U+FFFD instead
// of making dump() throw.
inline std::string json_text(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Where a byte is in a text: line and column from 1, the column counted in UTF-8 characters.
struct TextPosition {
  size_t line = 1;
  size_t column = 1;
};

// The position of byte `offset` of `text` (the end of the text for an offset beyond it).
inline TextPosition text_position(std::string_view text, size_t offset) {
  const std::string_view before = text.substr(0, std::min(offset, text.size()));
  const size_t last_newline = before.rfind('\n');
  const std::string_view line =
      before.substr(last_newline == std::string_view::npos ? 0 : last_newline + 1);
  auto starts_character = [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; };
  return {1 + static_cast<size_t>(std::count(before.begin(), before.end(), '\n')),
          1 + static_cast<size_t>(std::count_if(line.begin(), line.end(), starts_character))};
}

}  // namespace rex::io

namespace rex::detail {

// A forward iterator over text that records in *reached the end of what has been read through
// it: nlohmann's parser reads its input one byte at a time, so *reached is how far it has got.
class TrackedText {
 public:
  using iterator_category = std::forward_iterator_tag;
  using value_type = char;
  using difference_type = std::ptrdiff_t;
  using pointer = const char*;
  using reference = const char&;

  TrackedText() = default;
  TrackedText(const char* at, const char** reached) : at_(at), reached_(reached) {}
  reference operator*() const { return *at_; }
  TrackedText& operator++() {
    *reached_ = ++at_;
    return *this;
  }
  TrackedText operator++(int) {
    TrackedText before = *this;
    ++*this;
    return before;
  }
  bool operator==(const TrackedText& other) const { return at_ == other.at_; }

 private:
  const char* at_ = nullptr;
  const char** reached_ = nullptr;
};

// The offset of the '"' that opens the JSON string whose closing '"' is at `close`: the nearest
// '"' before it that is not escaped (preceded by an even number of backslashes).
inline size_t json_string_start(std::string_view text, size_t close) {
  for (size_t at = close; at-- > 0;) {
    if (text[at] != '"') continue;
    size_t backslashes = 0;
    while (backslashes < at && text[at - 1 - backslashes] == '\\') ++backslashes;
    if (backslashes % 2 == 0) return at;
  }
  return close;
}

// nlohmann's message without its "[json.exception.parse_error.101] " tag and its "parse error at
// line L, column C: " (the position is given once, in the caller's terms).
inline std::string parser_problem(const nlohmann::json::exception& e) {
  std::string_view message = e.what();
  if (const size_t tag_end = message.find("] "); tag_end != std::string_view::npos)
    message.remove_prefix(tag_end + 2);
  if (message.starts_with("parse error"))
    if (const size_t colon = message.find(": "); colon != std::string_view::npos)
      message.remove_prefix(colon + 2);
  return std::string(message);
}

// The SAX handler of parse_json: builds the value as nlohmann::json::parse would, refuses a
// repeated key, and turns every error into a rex::Error naming source:line:column and key path.
class StrictJsonReader {
 public:
  StrictJsonReader(std::string_view text, std::string source)
      : text_(text), source_(std::move(source)), reached_(text.data()) {}

  nlohmann::json parse() {
    const char* begin = text_.data();
    nlohmann::json::sax_parse(TrackedText(begin, &reached_),
                              TrackedText(begin + text_.size(), &reached_), this);
    return std::move(result_);
  }

  bool null() { return add(nullptr); }
  bool boolean(bool value) { return add(value); }
  bool number_integer(nlohmann::json::number_integer_t value) { return add(value); }
  bool number_unsigned(nlohmann::json::number_unsigned_t value) { return add(value); }
  bool number_float(nlohmann::json::number_float_t value, const std::string&) { return add(value); }
  bool string(std::string& value) { return add(std::move(value)); }
  bool binary(nlohmann::json::binary_t& value) {  // never in JSON text; here for the interface
    return add(nlohmann::json::binary(std::move(value)));
  }
  bool start_object(size_t) { return open(nlohmann::json::object()); }
  bool start_array(size_t) { return open(nlohmann::json::array()); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }

  bool key(std::string& name) {
    Open& object = open_.back();
    object.key = name;
    if (!object.keys.insert(name).second) {
      // The parser has just read the key's closing quote.
      const size_t close_quote = static_cast<size_t>(reached_ - text_.data()) - 1;
      refuse(json_string_start(text_, close_quote), "key appears twice in one object");
    }
    return true;
  }

  bool parse_error(size_t position, const std::string& token, const nlohmann::json::exception& e) {
    // `position` counts the bytes read, the offending one last; a number beyond double range is
    // reported once all of it is read, so the error points at its first digit.
    constexpr int kNumberOverflow = 406;
    refuse(e.id == kNumberOverflow ? position - token.size() : position - 1, parser_problem(e));
  }

 private:
  struct Open {
    nlohmann::json* value;
    std::set<std::string> keys;      // an object's keys so far
    std::optional<std::string> key;  // the member being read, until its value is complete
  };

  // Places a new value in the innermost open container (or as the result) and returns it.
  nlohmann::json& place(nlohmann::json value) {
    if (open_.empty()) return result_ = std::move(value);
    nlohmann::json& container = *open_.back().value;
    if (container.is_array()) {
      container.push_back(std::move(value));
      return container.back();
    }
    return container[*open_.back().key] = std::move(value);
  }
  // The innermost open object's member is complete.
  void end_member() {
    if (!open_.empty()) open_.back().key.reset();
  }
  bool add(nlohmann::json value) {
    place(std::move(value));
    end_member();
    return true;
  }
  bool open(nlohmann::json empty) {
    open_.push_back({&place(std::move(empty)), {}, {}});
    return true;
  }
  bool close() {
    open_.pop_back();
    end_member();
    return true;
  }

  // "train.lr", "arms[2].name": the path of the value being read. An array's element being read
  // is its last one while it is open (a container) and the one after it otherwise.
  std::string path() const {
    std::string out;
    for (size_t i = 0; i < open_.size(); ++i) {
      const Open& o = open_[i];
      if (o.value->is_array()) {
        const bool element_open = i + 1 < open_.size();
        out += concat("[", o.value->size() - (element_open ? 1 : 0), "]");
      } else if (o.key) {
        out += concat(out.empty() ? "" : ".", *o.key);
      }
    }
    return out;
  }

  [[noreturn]] void refuse(size_t offset, const std::string& problem) const {
    const io::TextPosition at = io::text_position(text_, offset);
    const std::string where = path();
    throw Error(concat(source_, ":", at.line, ":", at.column, ": ", where,
                       where.empty() ? "" : ": ", problem));
  }

  std::string_view text_;
  std::string source_;
  const char* reached_;  // the end of what the parser has read
  nlohmann::json result_;
  std::vector<Open> open_;  // the containers being read, innermost last
};

}  // namespace rex::detail

namespace rex::io {

// Parses JSON text strictly; `source` (a path) starts every error, followed by the line, column
// and key path of the problem (the top of this file).
inline nlohmann::json parse_json(std::string_view text, const std::string& source) {
  return detail::StrictJsonReader(text, source).parse();
}

}  // namespace rex::io
