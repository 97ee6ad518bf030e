// TokenStream: a run of token ids made of pieces (the ids of a text corpus held in memory, or the
// tokens of memory-mapped shard files, rex/data/shards.hpp), viewed as one concatenated stream.
//
// A piece is `count` ids of 2 or 4 bytes each, little-endian (the host's order, asserted below),
// kept alive by a shared owner, so copies and slices of a stream share the memory they read.
// `copy` reads any range, across piece boundaries; `slice` cuts a stream without copying tokens.
// Each piece knows its source (a file) and the byte offset of its first token in it, so a bad
// token can be reported by file and offset.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "rex/core/error.hpp"

namespace rex::data {

static_assert(std::endian::native == std::endian::little,
              "token shards hold little-endian ids; reading them in place needs a little-endian "
              "host");

struct TokenPiece {
  std::string source;                 // the file the tokens are in (or "text" for a text corpus)
  const uint8_t* bytes = nullptr;     // the first token
  uint64_t count = 0;                 // tokens
  int width = 4;                      // bytes per token: 2 (uint16) or 4 (uint32 or int32 >= 0)
  uint64_t file_offset = 0;           // byte offset of the first token in `source`
  std::shared_ptr<const void> owner;  // keeps `bytes` alive

  int64_t token(uint64_t i) const {
    if (width == 2) {
      uint16_t id;
      std::memcpy(&id, bytes + i * 2, 2);
      return id;
    }
    uint32_t id;
    std::memcpy(&id, bytes + i * 4, 4);
    return id;
  }
};

class TokenStream {
 public:
  TokenStream() = default;

  // The ids of a text corpus (all >= 0), held by the stream.
  explicit TokenStream(std::vector<int32_t> tokens) {
    auto owned = std::make_shared<const std::vector<int32_t>>(std::move(tokens));
    if (owned->empty()) return;
    append({"text", reinterpret_cast<const uint8_t*>(owned->data()), owned->size(), 4, 0, owned});
  }

  void append(TokenPiece piece) {
    REX_CHECK(piece.width == 2 || piece.width == 4, "TokenStream: ", piece.source, ": tokens of ",
              piece.width, " bytes (expected 2 or 4)");
    if (piece.count == 0) return;
    starts_.push_back(size_);
    size_ += piece.count;
    pieces_.push_back(std::move(piece));
  }

  uint64_t size() const { return size_; }
  const std::vector<TokenPiece>& pieces() const { return pieces_; }

  // Tokens [begin, begin + count) into `out`, across piece boundaries.
  void copy(uint64_t begin, uint64_t count, int32_t* out) const {
    REX_CHECK(begin <= size_ && count <= size_ - begin, "TokenStream::copy: tokens [", begin, ", ",
              begin + count, ") of a stream of ", size_);
    for (size_t p = count ? piece_of(begin) : 0; count > 0; ++p) {
      const uint64_t first = begin - starts_[p];
      const uint64_t n = std::min(count, pieces_[p].count - first);
      for (uint64_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(pieces_[p].token(first + i));
      out += n;
      begin += n;
      count -= n;
    }
  }

  // Tokens [begin, end) as a stream of their own, sharing this one's memory.
  TokenStream slice(uint64_t begin, uint64_t end) const {
    REX_CHECK(begin <= end && end <= size_, "TokenStream::slice: [", begin, ", ", end,
              ") of a stream of ", size_);
    TokenStream out;
    for (size_t p = 0; p < pieces_.size(); ++p) {
      const uint64_t from = std::max(begin, starts_[p]);
      const uint64_t to = std::min(end, starts_[p] + pieces_[p].count);
      if (from >= to) continue;
      TokenPiece part = pieces_[p];
      const uint64_t skip = from - starts_[p];
      part.bytes += skip * static_cast<uint64_t>(part.width);
      part.file_offset += skip * static_cast<uint64_t>(part.width);
      part.count = to - from;
      out.append(std::move(part));
    }
    return out;
  }

 private:
  // The piece holding token i (i < size()).
  size_t piece_of(uint64_t i) const {
    return static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), i) -
                               starts_.begin()) -
           1;
  }

  std::vector<TokenPiece> pieces_;
  std::vector<uint64_t> starts_;  // stream index of each piece's first token
  uint64_t size_ = 0;
};

}  // namespace rex::data
