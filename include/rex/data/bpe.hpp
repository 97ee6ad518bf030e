// BpeTokenizer: byte-level byte-pair encoding, as GPT-2 and the Hugging Face `tokenizers` library
// do it, trained by rex or read from a `tokenizer.json`.
//
// Encoding takes three steps. (1) The text is split into words the way GPT-2's regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// splits it (split_words; written by hand, no regex engine). (2) Every byte of a word starts as its
// own token: ids of the 256 byte tokens. (3) The merges are applied, lowest rank first, leftmost
// first among equal ranks, until no adjacent pair of the word has a merge. Decoding concatenates
// the tokens' bytes, so decode(encode(text)) == text for any bytes, invalid UTF-8 included.
//
// Character classes: ASCII and Latin-1 exactly as Unicode says; above U+00FF a short table
// (unicode_class) stands in for Unicode's categories: its white space is exact, digits of the
// common scripts and superscripts are numbers, combining marks, general punctuation, symbols,
// arrows, CJK punctuation and emoji are "other", and everything else counts as a letter. A byte
// that is not part of valid UTF-8 is an "other" character of its own (the `tokenizers` library
// takes only valid UTF-8).
//
// The file: a Hugging Face tokenizer.json whose model is BPE, whose pre-tokenizer and decoder are
// ByteLevel (with the regex; add_prefix_space honoured), with no normalizer. Token strings use
// GPT-2's byte-to-character map (byte_symbol), so "Ġ" is the space byte. Added tokens (GPT-2's
// <|endoftext|>) are matched in the text before it is split, as the library does. Every refusal
// names the file, the key and what was expected.
//
// Training (train): the corpus's words are counted once; the most frequent adjacent pair (ties:
// the pair of smaller ids) becomes the next token, until the vocabulary has vocab_size tokens or no
// pair occurs. Pair counts are kept incrementally: a merge re-counts only the words that hold the
// pair. Ids 0..255 are the bytes in order, id 256 + k the k-th merge.
#pragma once

#include <array>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "rex/core/error.hpp"
#include "rex/io/files.hpp"
#include "rex/io/json.hpp"

namespace rex::data {

enum class CharClass { letter, number, space, other };

}  // namespace rex::data

namespace rex::detail {

using data::CharClass;

// Unicode White_Space, the `\s` of the regex.
inline bool is_unicode_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// The class of code point `cp` (see the design comment for what is exact and what approximate).
inline CharClass unicode_class(uint32_t cp) {
  if (is_unicode_space(cp)) return CharClass::space;
  auto in = [cp](uint32_t first, uint32_t last) { return cp >= first && cp <= last; };
  if (in('0', '9') || cp == 0xB2 || cp == 0xB3 || cp == 0xB9 || in(0xBC, 0xBE) ||
      in(0x660, 0x669) || in(0x6F0, 0x6F9) || in(0x966, 0x96F) || cp == 0x2070 ||
      in(0x2074, 0x2079) || in(0x2080, 0x2089) || in(0x2150, 0x2189) || in(0x2460, 0x249B) ||
      in(0xFF10, 0xFF19))
    return CharClass::number;
  if (in('A', 'Z') || in('a', 'z') || cp == 0xAA || cp == 0xB5 || cp == 0xBA ||
      (in(0xC0, 0xFF) && cp != 0xD7 && cp != 0xF7))
    return CharClass::letter;
  if (cp < 0x100 || in(0x300, 0x36F) || in(0x2000, 0x2BFF) || in(0x3000, 0x303F) ||
      in(0xD800, 0xF8FF) || in(0xFE00, 0xFE0F) || in(0xFF00, 0xFF0F) || in(0xFF1A, 0xFF20) ||
      in(0xFF3B, 0xFF40) || in(0xFF5B, 0xFF65) || in(0x1F000, 0x1FAFF))
    return CharClass::other;
  return CharClass::letter;
}

// The UTF-8 character at text[i]: its length in bytes and its code point; a byte that does not
// start a valid, shortest-form sequence is one character of length 1 (code point kInvalid).
inline constexpr uint32_t kInvalidCodePoint = 0xFFFFFFFF;
struct Utf8Char {
  size_t length;
  uint32_t code_point;
};
inline Utf8Char utf8_char_at(std::string_view text, size_t i) {
  const auto byte = [&](size_t k) { return static_cast<uint8_t>(text[k]); };
  const uint8_t lead = byte(i);
  if (lead < 0x80) return {1, lead};
  size_t length = 0;
  uint32_t cp = 0, smallest = 0;
  if ((lead & 0xE0) == 0xC0) {
    length = 2, cp = lead & 0x1F, smallest = 0x80;
  } else if ((lead & 0xF0) == 0xE0) {
    length = 3, cp = lead & 0x0F, smallest = 0x800;
  } else if ((lead & 0xF8) == 0xF0) {
    length = 4, cp = lead & 0x07, smallest = 0x10000;
  } else {
    return {1, kInvalidCodePoint};
  }
  if (i + length > text.size()) return {1, kInvalidCodePoint};
  for (size_t k = 1; k < length; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return {1, kInvalidCodePoint};
    cp = (cp << 6) | (byte(i + k) & 0x3F);
  }
  if (cp < smallest || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
    return {1, kInvalidCodePoint};
  return {length, cp};
}

inline CharClass class_at(std::string_view text, size_t i, size_t* length) {
  const Utf8Char c = utf8_char_at(text, i);
  *length = c.length;
  return c.code_point == kInvalidCodePoint ? CharClass::other : unicode_class(c.code_point);
}

inline void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

inline uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

}  // namespace rex::detail

namespace rex::data {

// GPT-2's byte-to-character map: printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
// themselves, the other 68 bytes, in order, for U+0100, U+0101, ...; so the space is "Ġ" (U+0120).
inline uint32_t byte_symbol(uint8_t byte) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      t[b] = printable ? b : next++;
    }
    return t;
  }();
  return table[byte];
}

// The byte-level string of raw bytes (each byte as its byte_symbol, UTF-8 encoded).
inline std::string byte_level_string(std::string_view bytes) {
  std::string out;
  for (char c : bytes) detail::append_utf8(out, byte_symbol(static_cast<uint8_t>(c)));
  return out;
}

// Calls word(piece) for the pieces GPT-2's pre-tokenization regex cuts `text` into, in order; the
// pieces concatenate to `text`.
inline void split_words(std::string_view text, const std::function<void(std::string_view)>& word) {
  using detail::class_at;
  const size_t n = text.size();
  size_t i = 0, length = 0;
  while (i < n) {
    if (text[i] == '\'' && i + 1 < n) {  // 's 't 're 've 'm 'll 'd
      const std::string_view rest = text.substr(i + 1, 2);
      size_t take = 0;
      if (rest[0] == 's' || rest[0] == 't' || rest[0] == 'm' || rest[0] == 'd') take = 2;
      if (rest == "re" || rest == "ve" || rest == "ll") take = 3;
      if (take > 0) {
        word(text.substr(i, take));
        i += take;
        continue;
      }
    }
    // " ?" then a run of letters, of digits or of other characters.
    const size_t run_start = i + (text[i] == ' ' && i + 1 < n ? 1 : 0);
    const CharClass cls = class_at(text, run_start, &length);
    if (cls != CharClass::space) {
      size_t end = run_start + length;
      while (end < n && class_at(text, end, &length) == cls) end += length;
      word(text.substr(i, end - i));
      i = end;
      continue;
    }
    // White space: all of it at the end of the text, else all but its last character when that
    // leaves some (\s+(?!\S)), else the one character (\s+).
    size_t end = i, last = i;
    while (end < n && class_at(text, end, &length) == CharClass::space) last = end, end += length;
    if (end < n && last > i) end = last;
    word(text.substr(i, end - i));
    i = end;
  }
}

class BpeTokenizer {
 public:
  // Trains on `text`: 256 byte tokens, then merges until `vocab_size` tokens or no pair is left.
  static BpeTokenizer train(std::string_view text, int64_t vocab_size) {
    REX_CHECK(vocab_size >= 256 && vocab_size <= (int64_t{1} << 31) - 1,
              "BPE training: the vocabulary size must be at least 256 (one token per byte), got ",
              vocab_size);
    BpeTokenizer tok;
    for (int b = 0; b < 256; ++b) tok.token_bytes_.push_back(std::string(1, static_cast<char>(b)));
    std::unordered_map<std::string_view, int64_t> counts;
    split_words(text, [&](std::string_view w) { ++counts[w]; });
    std::vector<std::vector<int32_t>> words;
    std::vector<int64_t> word_count;
    for (const auto& [w, c] : counts) {
      words.emplace_back(w.begin(), w.end());
      for (int32_t& id : words.back()) id = static_cast<uint8_t>(id);
      word_count.push_back(c);
    }
    std::unordered_map<uint64_t, int64_t> pair_count;
    std::unordered_map<uint64_t, std::vector<size_t>> words_with;
    auto count_pairs = [&](size_t w, int64_t sign) {
      const std::vector<int32_t>& s = words[w];
      for (size_t k = 0; k + 1 < s.size(); ++k) {
        const uint64_t key = detail::pair_key(s[k], s[k + 1]);
        pair_count[key] += sign * word_count[w];
        if (sign > 0) words_with[key].push_back(w);
      }
    };
    for (size_t w = 0; w < words.size(); ++w) count_pairs(w, +1);
    // Most frequent first, then the smaller key; stale entries are skipped when popped.
    using Entry = std::pair<int64_t, uint64_t>;
    auto after = [](const Entry& a, const Entry& b) {
      return a.first != b.first ? a.first < b.first : a.second > b.second;
    };
    std::priority_queue<Entry, std::vector<Entry>, decltype(after)> queue(after);
    for (const auto& [key, c] : pair_count) queue.push({c, key});
    while (static_cast<int64_t>(tok.token_bytes_.size()) < vocab_size && !queue.empty()) {
      const auto [c, key] = queue.top();
      queue.pop();
      const int64_t now = pair_count[key];
      if (now != c) {
        if (now > 0 && now < c) queue.push({now, key});
        continue;
      }
      const auto left = static_cast<int32_t>(key >> 32), right = static_cast<int32_t>(key);
      const auto merged = static_cast<int32_t>(tok.token_bytes_.size());
      tok.token_bytes_.push_back(tok.token_bytes_[left] + tok.token_bytes_[right]);
      tok.add_merge(left, right, merged);
      std::vector<size_t> affected;
      affected.swap(words_with[key]);
      std::vector<uint64_t> touched;
      for (size_t w : affected) {
        if (!merge_pair(words[w], left, right, merged)) continue;  // listed twice, or stale
        // The word before the merge had the pair; re-count it: subtract the old pairs, add the new.
        std::vector<int32_t> merged_word = words[w];
        words[w] = unmerge(merged_word, merged, left, right);
        count_pairs(w, -1);
        words[w] = std::move(merged_word);
        count_pairs(w, +1);
        for (size_t k = 0; k + 1 < words[w].size(); ++k)
          touched.push_back(detail::pair_key(words[w][k], words[w][k + 1]));
      }
      for (uint64_t t : touched)
        if (pair_count[t] > 0) queue.push({pair_count[t], t});
    }
    tok.finish();
    return tok;
  }

  // Reads a tokenizer.json (see the design comment); `file` names it in refusals.
  static BpeTokenizer from_json(const nlohmann::json& j, const std::string& file);

  static BpeTokenizer load(const std::string& path) {
    return from_json(io::parse_json(io::read_file(path, io::kMaxJsonFileBytes), path), path);
  }

  // The Hugging Face tokenizer.json of this tokenizer.
  nlohmann::json to_json() const {
    using nlohmann::json;
    const json byte_level = {{"type", "ByteLevel"},
                             {"add_prefix_space", add_prefix_space_},
                             {"trim_offsets", true},
                             {"use_regex", true}};
    json vocab = json::object(), merges = json::array(), added = json::array();
    for (size_t id = 0; id < token_bytes_.size(); ++id) vocab[token_string(id)] = id;
    // "left right", as GPT-2 and every version of the library write them; [left, right] pairs
    // when a token (an added one) holds a space.
    bool spaced = false;
    for (const auto& [left, right] : merges_)
      spaced = spaced || token_string(left).find(' ') != std::string::npos ||
               token_string(right).find(' ') != std::string::npos;
    for (const auto& [left, right] : merges_) {
      if (spaced)
        merges.push_back(json::array({token_string(left), token_string(right)}));
      else
        merges.push_back(token_string(left) + " " + token_string(right));
    }
    for (const AddedToken& a : added_tokens_)
      added.push_back({{"id", a.id},
                       {"content", a.content},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false},
                       {"special", true}});
    return {{"version", "1.0"},
            {"truncation", nullptr},
            {"padding", nullptr},
            {"added_tokens", added},
            {"normalizer", nullptr},
            {"pre_tokenizer", byte_level},
            {"post_processor", nullptr},
            {"decoder", byte_level},
            {"model",
             {{"type", "BPE"},
              {"dropout", nullptr},
              {"unk_token", nullptr},
              {"continuing_subword_prefix", nullptr},
              {"end_of_word_suffix", nullptr},
              {"fuse_unk", false},
              {"byte_fallback", false},
              {"ignore_merges", ignore_merges_},
              {"vocab", vocab},
              {"merges", merges}}}};
  }

  void save(const std::string& path) const {
    io::write_file_atomic(path, to_json().dump(1) + "\n");
  }

  int64_t vocab_size() const { return static_cast<int64_t>(token_bytes_.size()); }
  bool add_prefix_space() const { return add_prefix_space_; }
  const std::string& token_bytes(int32_t id) const { return token_bytes_.at(id); }
  const std::vector<std::pair<int32_t, int32_t>>& merges() const { return merges_; }

  std::vector<int32_t> encode(std::string_view text) const {
    std::vector<int32_t> ids;
    std::unordered_map<std::string, std::vector<int32_t>> cache;  // word -> ids
    auto encode_piece = [&](std::string_view piece) {
      std::string prefixed;
      if (add_prefix_space_ && !piece.empty() && piece[0] != ' ') {
        prefixed = " " + std::string(piece);  // as the library does, before each piece
        piece = prefixed;
      }
      split_words(piece, [&](std::string_view w) {
        if (cache.size() > (size_t{1} << 20)) cache.clear();  // bound the memory of a huge text
        auto [it, inserted] = cache.try_emplace(std::string(w));
        if (inserted) it->second = encode_word(w);
        ids.insert(ids.end(), it->second.begin(), it->second.end());
      });
    };
    // Added tokens first (the earliest, then the longest), then the words between them; next[a]:
    // where added token a occurs next (npos: no more), found again only once passed.
    std::vector<size_t> next;
    for (const AddedToken& a : added_tokens_) next.push_back(text.find(a.content));
    size_t start = 0;
    while (start < text.size()) {
      size_t at = std::string_view::npos, found = 0;
      for (size_t a = 0; a < added_tokens_.size(); ++a) {
        if (next[a] != std::string_view::npos && next[a] < start)
          next[a] = text.find(added_tokens_[a].content, start);
        if (next[a] < at || (next[a] == at && at != std::string_view::npos &&
                             added_tokens_[a].content.size() > added_tokens_[found].content.size()))
          at = next[a], found = a;
      }
      encode_piece(text.substr(start, at == std::string_view::npos ? at : at - start));
      if (at == std::string_view::npos) break;
      ids.push_back(added_tokens_[found].id);
      start = at + added_tokens_[found].content.size();
    }
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids) const {
    std::string text;
    for (size_t i = 0; i < ids.size(); ++i) {
      REX_CHECK(ids[i] >= 0 && ids[i] < vocab_size(), "BpeTokenizer::decode: id ", ids[i],
                " at position ", i, " is out of range for a vocabulary of ", vocab_size());
      text += token_bytes_[static_cast<size_t>(ids[i])];
    }
    return text;
  }

 private:
  BpeTokenizer() = default;

  // Replaces every non-overlapping (left, right), left to right, by `merged`; whether any was.
  static bool merge_pair(std::vector<int32_t>& s, int32_t left, int32_t right, int32_t merged) {
    size_t out = 0;
    bool any = false;
    for (size_t k = 0; k < s.size(); ++k) {
      if (k + 1 < s.size() && s[k] == left && s[k + 1] == right) {
        s[out++] = merged, ++k, any = true;
      } else {
        s[out++] = s[k];
      }
    }
    s.resize(out);
    return any;
  }

  // The word before merge_pair: every `merged` back to (left, right) (`merged` is the newest id,
  // so any occurrence of it came from this merge).
  static std::vector<int32_t> unmerge(const std::vector<int32_t>& s, int32_t merged, int32_t left,
                                      int32_t right) {
    std::vector<int32_t> out;
    for (int32_t id : s) {
      if (id == merged) {
        out.push_back(left), out.push_back(right);
      } else {
        out.push_back(id);
      }
    }
    return out;
  }

  void add_merge(int32_t left, int32_t right, int32_t merged) {
    merge_of_.emplace(detail::pair_key(left, right),
                      Merge{static_cast<int32_t>(merges_.size()), merged});
    merges_.emplace_back(left, right);
  }

  // Byte ids and the byte-level strings, from token_bytes_ (which holds all 256 single bytes).
  void finish() {
    byte_id_.fill(-1);
    for (size_t id = 0; id < token_bytes_.size(); ++id)
      if (token_bytes_[id].size() == 1 && !is_added(static_cast<int32_t>(id)))
        byte_id_[static_cast<uint8_t>(token_bytes_[id][0])] = static_cast<int32_t>(id);
  }

  bool is_added(int32_t id) const {
    for (const AddedToken& a : added_tokens_)
      if (a.id == id) return true;
    return false;
  }

  std::string token_string(size_t id) const {
    for (const AddedToken& a : added_tokens_)
      if (a.id == static_cast<int32_t>(id)) return a.content;
    return byte_level_string(token_bytes_[id]);
  }

  // The ids of one word: its bytes, then the merges, lowest rank first, leftmost first.
  std::vector<int32_t> encode_word(std::string_view word) const {
    if (ignore_merges_) {
      auto whole = id_of_bytes_.find(std::string(word));
      if (whole != id_of_bytes_.end()) return {whole->second};
    }
    std::vector<int32_t> s(word.size());
    for (size_t k = 0; k < word.size(); ++k) s[k] = byte_id_[static_cast<uint8_t>(word[k])];
    while (s.size() > 1) {
      int32_t best_rank = -1, left = 0, right = 0, merged = 0;
      for (size_t k = 0; k + 1 < s.size(); ++k) {
        auto it = merge_of_.find(detail::pair_key(s[k], s[k + 1]));
        if (it != merge_of_.end() && (best_rank < 0 || it->second.rank < best_rank))
          best_rank = it->second.rank, left = s[k], right = s[k + 1], merged = it->second.merged;
      }
      if (best_rank < 0) break;
      merge_pair(s, left, right, merged);
    }
    return s;
  }

  struct Merge {
    int32_t rank, merged;
  };
  struct AddedToken {  // a token matched in the text as it is, before the split
    std::string content;
    int32_t id;
  };
  std::vector<std::string> token_bytes_;  // id -> the bytes it stands for
  std::vector<std::pair<int32_t, int32_t>> merges_;
  std::unordered_map<uint64_t, Merge> merge_of_;
  std::array<int32_t, 256> byte_id_{};
  std::unordered_map<std::string, int32_t> id_of_bytes_;  // filled only with ignore_merges_
  std::vector<AddedToken> added_tokens_;
  bool add_prefix_space_ = false, ignore_merges_ = false;
};

inline BpeTokenizer BpeTokenizer::from_json(const nlohmann::json& j, const std::string& file) {
  using nlohmann::json;
  // A value as the message shows it: its JSON text, cut after about 200 bytes (a whole vocabulary
  // is no help), at a character boundary.
  auto shown = [](const json& value) {
    std::string text = io::json_text(value);
    if (text.size() <= 200) return text;
    size_t cut = 200;
    while (cut > 0 && (static_cast<uint8_t>(text[cut]) & 0xC0) == 0x80) --cut;
    return text.substr(0, cut) + "...";
  };
  auto refuse = [&](const std::string& key, const std::string& expected, const json* got) {
    throw Error(file + (key.empty() ? std::string() : ": key \"" + key + "\"") + ": expected " +
                expected + (got ? ", got " + shown(*got) : std::string(", but it is missing")) +
                " (rex reads byte-level BPE tokenizers)");
  };
  auto member = [&](const json& parent, const std::string& parent_key,
                    const char* name) -> const json* {
    if (!parent.is_object()) refuse(parent_key, "an object", &parent);
    auto it = parent.find(name);
    return it == parent.end() ? nullptr : &*it;
  };
  auto require = [&](const json& parent, const std::string& parent_key, const char* name,
                     const char* expected) -> const json& {
    const json* found = member(parent, parent_key, name);
    if (!found) refuse(parent_key.empty() ? name : parent_key + "." + name, expected, nullptr);
    return *found;
  };
  // An optional key that must be null (or absent), or one of `allowed` values.
  auto null_or = [&](const json& parent, const std::string& parent_key, const char* name,
                     const std::vector<json>& allowed, const char* expected) {
    const json* found = member(parent, parent_key, name);
    if (!found || found->is_null()) return;
    for (const json& a : allowed)
      if (*found == a) return;
    refuse(parent_key.empty() ? name : parent_key + "." + name, expected, found);
  };
  auto byte_level_part = [&](const char* name, bool optional) -> const json* {
    const json* part = member(j, "", name);
    if (optional && (!part || part->is_null())) return nullptr;
    if (!part || !part->is_object() || !part->contains("type") || part->at("type") != "ByteLevel")
      refuse(name, "an object of \"type\": \"ByteLevel\"", part);
    return part;
  };

  auto is_id = [](const json& id) {
    return id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() <= INT32_MAX;
  };

  BpeTokenizer tok;
  null_or(j, "", "normalizer", {}, "null (rex applies no normalizer)");
  const json& pre = *byte_level_part("pre_tokenizer", false);
  const json& prefix = require(pre, "pre_tokenizer", "add_prefix_space", "true or false");
  if (!prefix.is_boolean()) refuse("pre_tokenizer.add_prefix_space", "true or false", &prefix);
  tok.add_prefix_space_ = prefix.get<bool>();
  null_or(pre, "pre_tokenizer", "use_regex", {true}, "true (the GPT-2 split; rex has no other)");
  byte_level_part("decoder", false);
  byte_level_part("post_processor", true);
  const json& model = require(j, "", "model", "an object");
  // Without "type" the library infers the model from its keys (GPT-2's file has none).
  if (const json* type = member(model, "model", "type"); type && *type != "BPE")
    refuse("model.type", "\"BPE\"", type);
  null_or(model, "model", "dropout", {}, "null (rex has no BPE dropout)");
  null_or(model, "model", "unk_token", {}, "null (a byte-level vocabulary needs none)");
  null_or(model, "model", "continuing_subword_prefix", {""}, "null or \"\"");
  null_or(model, "model", "end_of_word_suffix", {""}, "null or \"\"");
  null_or(model, "model", "byte_fallback", {false}, "false");
  if (const json* ignore = member(model, "model", "ignore_merges"); ignore && !ignore->is_null()) {
    if (!ignore->is_boolean()) refuse("model.ignore_merges", "true or false", ignore);
    tok.ignore_merges_ = ignore->get<bool>();
  }

  if (const json* added = member(j, "", "added_tokens"); added && !added->is_null()) {
    if (!added->is_array()) refuse("added_tokens", "an array", added);
    for (size_t i = 0; i < added->size(); ++i) {
      const std::string key = "added_tokens[" + std::to_string(i) + "]";
      const json& a = added->at(i);
      const json& id = require(a, key, "id", "a token id");
      const json& content = require(a, key, "content", "a non-empty string");
      if (!is_id(id)) refuse(key + ".id", "a token id (a whole number)", &id);
      if (!content.is_string() || content.get<std::string>().empty())
        refuse(key + ".content", "a non-empty string", &content);
      for (const char* flag : {"single_word", "lstrip", "rstrip"})
        null_or(a, key, flag, {false}, "false (rex matches added tokens exactly)");
      tok.added_tokens_.push_back({content.get<std::string>(), id.get<int32_t>()});
    }
  }

  // The vocabulary: token string -> id, the ids exactly 0 .. size - 1.
  const json& vocab = require(model, "model", "vocab", "an object of token -> id");
  if (!vocab.is_object() || vocab.empty())
    refuse("model.vocab", "a non-empty object of token -> id", &vocab);
  std::vector<std::string> strings(vocab.size());
  std::vector<bool> has_id(vocab.size(), false);
  std::unordered_map<std::string, int32_t> id_of;
  std::array<uint32_t, 324> byte_of_symbol{};
  byte_of_symbol.fill(256);
  for (int b = 0; b < 256; ++b) byte_of_symbol[byte_symbol(static_cast<uint8_t>(b))] = b;
  tok.token_bytes_.resize(vocab.size());
  for (const auto& [token, id_json] : vocab.items()) {
    const std::string key = "model.vocab[" + io::json_text(json(token)) + "]";
    if (!is_id(id_json) || id_json.get<uint64_t>() >= vocab.size())
      refuse(key, "an id below the vocabulary's size " + std::to_string(vocab.size()), &id_json);
    const auto id = static_cast<size_t>(id_json.get<uint64_t>());
    if (has_id[id])
      refuse(key,
             "an id of its own (" + io::json_text(json(strings[id])) + " has id " +
                 std::to_string(id) + " too)",
             &id_json);
    has_id[id] = true;
    strings[id] = token;
    id_of[token] = static_cast<int32_t>(id);
    if (tok.is_added(static_cast<int32_t>(id))) {
      tok.token_bytes_[id] = token;
      continue;
    }
    for (size_t k = 0; k < token.size();) {
      const detail::Utf8Char c = detail::utf8_char_at(token, k);
      if (c.code_point >= byte_of_symbol.size() || byte_of_symbol[c.code_point] == 256)
        refuse(key, "a token of byte-level symbols (GPT-2's byte-to-character map)", &id_json);
      tok.token_bytes_[id] += static_cast<char>(byte_of_symbol[c.code_point]);
      k += c.length;
    }
  }
  for (const AddedToken& a : tok.added_tokens_) {
    auto it = id_of.find(a.content);
    if (it == id_of.end() || it->second != a.id)
      refuse("added_tokens",
             "each added token in model.vocab under its id (" + io::json_text(json(a.content)) +
                 " with id " + std::to_string(a.id) + ")",
             nullptr);
  }
  tok.finish();
  for (int b = 0; b < 256; ++b)
    if (tok.byte_id_[b] < 0)
      refuse("model.vocab",
             "a token for each of the 256 bytes; byte " + std::to_string(b) + " (" +
                 byte_level_string(std::string(1, static_cast<char>(b))) + ") has none",
             nullptr);

  // The merges: "left right" strings or [left, right] pairs, each part and their join a token.
  const json& merges = require(model, "model", "merges", "an array of merges");
  if (!merges.is_array()) refuse("model.merges", "an array of merges", &merges);
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string key = "model.merges[" + std::to_string(i) + "]";
    const json& m = merges[i];
    std::string parts[2];
    if (m.is_string()) {
      const std::string text = m.get<std::string>();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
        refuse(key, "two tokens separated by one space", &m);
      parts[0] = text.substr(0, space), parts[1] = text.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      parts[0] = m[0].get<std::string>(), parts[1] = m[1].get<std::string>();
    } else {
      refuse(key, "\"left right\" or [\"left\", \"right\"]", &m);
    }
    int32_t ids[3];
    const std::string joined = parts[0] + parts[1];
    for (int p = 0; p < 3; ++p) {
      const std::string& part = p < 2 ? parts[p] : joined;
      auto it = id_of.find(part);
      if (it == id_of.end())
        refuse(key, "tokens of model.vocab, but " + io::json_text(json(part)) + " is not one", &m);
      ids[p] = it->second;
    }
    if (tok.merge_of_.count(detail::pair_key(ids[0], ids[1])))
      refuse(key, "each pair merged once, but this pair is merged earlier too", &m);
    tok.add_merge(ids[0], ids[1], ids[2]);
  }
  if (tok.ignore_merges_)
    for (size_t id = 0; id < tok.token_bytes_.size(); ++id)
      if (!tok.is_added(static_cast<int32_t>(id)))
        tok.id_of_bytes_.emplace(tok.token_bytes_[id], static_cast<int32_t>(id));
  return tok;
}

}  // namespace rex::data
