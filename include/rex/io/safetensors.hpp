// Reading and writing the safetensors format (the Hugging Face checkpoint format).
//
// Layout: an 8-byte little-endian u64 N, then N bytes of JSON header
//   {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"key": "value", ...}}            (metadata optional, string values only)
// padded with spaces to a multiple of 8, then the byte buffer; offsets count from the buffer start.
//
// rex reads and writes F32 and I32 only, the two dtypes its tensors have. The writer lays tensors
// out in name order (std::map order, which is also the JSON header's key order), so the same
// tensors and metadata always give the same bytes. The reader trusts nothing in the file: every
// field's JSON type, every size and every offset is checked, and the tensors must tile the buffer
// exactly (no overlap, no gap, nothing left over), as the format requires; any violation is a
// rex::Error naming the function, the file and the problem, never a crash or an out-of-bounds read.
// As the format requires, the header is at most 100 MB and starts with '{' (no leading whitespace).
// Files are read whole into memory (checkpoints here are small), so there is no mmap path.
//
// Checksums: with_checksums adds to the metadata, for every tensor, the key "rex.crc32c.<name>"
// with the CRC-32C of the tensor's bytes as 8 lowercase hex digits; rex's model and checkpoint
// files carry them. The reader checks every such key it finds, and a file with any of them must
// have one for each tensor, so a flipped bit is refused naming the tensor it hit. Files without
// them (from other writers) load unchecked. CRC-32C (Castagnoli) is written here, not taken from a
// library: it catches every burst of up to 32 flipped bits and misses other damage with odds of
// 2^-32, which is what a storage check needs (it is no defence against deliberate tampering), and
// it keeps the library free of a further dependency. The slicing-by-8 loop below runs at about 2
// GB/s, so checking a 300 MB checkpoint adds a fraction of a second to a load that reads it from
// disk anyway.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "rex/core/dtype.hpp"
#include "rex/core/error.hpp"
#include "rex/core/shape.hpp"
#include "rex/core/tensor.hpp"
#include "rex/io/files.hpp"

static_assert(std::endian::native == std::endian::little,
              "rex's safetensors reader and writer copy tensor bytes as they are, which is only "
              "correct on a little-endian host");

namespace rex::io {

using TensorMap = std::map<std::string, Tensor>;  // name -> CPU contiguous tensor (f32 or i32)
using Metadata = std::map<std::string, std::string>;

struct SafetensorsContents {
  TensorMap tensors;
  Metadata metadata;
};

}  // namespace rex::io

namespace rex::detail {

// crc32c_tables[k][b]: the CRC-32C (reflected polynomial 0x82F63B78) of byte b followed by k zero
// bytes, so that eight bytes are folded in per step.
inline constexpr auto crc32c_tables = [] {
  std::array<std::array<uint32_t, 256>, 8> t{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t c = b;
    for (int i = 0; i < 8; ++i) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    t[0][b] = c;
  }
  for (size_t k = 1; k < 8; ++k)
    for (uint32_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFF];
  return t;
}();

inline uint32_t crc32c(std::string_view bytes) {
  const auto& t = crc32c_tables;
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t n = bytes.size();
  uint32_t crc = 0xFFFFFFFFu;
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t word = 0;
    std::memcpy(&word, p, 8);  // little-endian (asserted above)
    word ^= crc;
    crc = t[7][word & 0xFF] ^ t[6][(word >> 8) & 0xFF] ^ t[5][(word >> 16) & 0xFF] ^
          t[4][(word >> 24) & 0xFF] ^ t[3][(word >> 32) & 0xFF] ^ t[2][(word >> 40) & 0xFF] ^
          t[1][(word >> 48) & 0xFF] ^ t[0][word >> 56];
  }
  for (; n > 0; ++p, --n) crc = (crc >> 8) ^ t[0][(crc ^ *p) & 0xFF];
  return crc ^ 0xFFFFFFFFu;
}

inline std::string crc32c_hex(std::string_view bytes) {
  char text[9];
  std::snprintf(text, sizeof text, "%08x", crc32c(bytes));
  return text;
}

inline constexpr std::string_view kChecksumKeyPrefix = "rex.crc32c.";

// The format caps the JSON header at 100 MB, so a corrupt length cannot make a reader allocate.
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

inline const char* safetensors_dtype_name(DType t) { return t == DType::f32 ? "F32" : "I32"; }

// The first byte of a tensor's elements, whichever its dtype.
inline char* tensor_bytes(const Tensor& t) {
  return t.dtype() == DType::f32 ? reinterpret_cast<char*>(t.data<float>())
                                 : reinterpret_cast<char*>(t.data<int32_t>());
}

// The file's bytes; `where` ("save_safetensors: <path>") starts every error message.
inline std::string encode_safetensors(const io::TensorMap& tensors, const io::Metadata& metadata,
                                      const std::string& where) {
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    REX_CHECK(name != "__metadata__", where,
              ": \"__metadata__\" is reserved for the metadata and cannot name a tensor");
    REX_CHECK(t.defined(), where, ": tensor '", name, "' is undefined");
    REX_CHECK(t.device().is_cpu(), where, ": tensor '", name, "' is on ", t.device(),
              "; copy it to the CPU first");
    const uint64_t size = static_cast<uint64_t>(t.numel()) * dtype_size(t.dtype());
    header[name] = {{"dtype", safetensors_dtype_name(t.dtype())},
                    {"shape", t.shape().dims()},
                    {"data_offsets", nlohmann::json::array({offset, offset + size})}};
    offset += size;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    throw Error(
        concat(where, ": a tensor name or metadata string is not valid UTF-8 (", e.what(), ")"));
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t header_length = text.size();
  std::string out(sizeof header_length, '\0');
  std::memcpy(out.data(), &header_length, sizeof header_length);
  out.reserve(out.size() + text.size() + offset);
  out += text;
  for (const auto& [name, t] : tensors) {
    const size_t size = static_cast<size_t>(t.numel()) * dtype_size(t.dtype());
    if (size > 0) out.append(tensor_bytes(t), size);
  }
  return out;
}

// One header entry, checked against the buffer but not yet copied.
struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin, end;
};

// Parses and checks one header entry; `where` names the function and file, `buffer_size` is the
// number of bytes after the header.
inline SafetensorsEntry parse_safetensors_entry(const std::string& name, const nlohmann::json& info,
                                                uint64_t buffer_size, const std::string& where) {
  const std::string tensor = concat(where, ": tensor '", name, "'");
  REX_CHECK(info.is_object(), tensor, ": header entry is a JSON ", info.type_name(),
            ", not an object");
  for (const char* key : {"dtype", "shape", "data_offsets"})
    REX_CHECK(info.contains(key), tensor, ": header entry has no \"", key, "\"");
  SafetensorsEntry entry{name, DType::f32, Shape{}, 0, 0};

  const nlohmann::json& dtype = info.at("dtype");
  REX_CHECK(dtype.is_string(), tensor, ": \"dtype\" is a JSON ", dtype.type_name(),
            ", not a string");
  const std::string dtype_text = dtype.get<std::string>();
  REX_CHECK(dtype_text == "F32" || dtype_text == "I32", tensor, ": dtype ", dtype_text,
            " is not supported (rex reads F32 and I32)");
  entry.dtype = dtype_text == "F32" ? DType::f32 : DType::i32;

  const nlohmann::json& shape = info.at("shape");
  REX_CHECK(shape.is_array(), tensor, ": \"shape\" is a JSON ", shape.type_name(),
            ", not an array");
  std::vector<int64_t> dims;
  int64_t bytes = static_cast<int64_t>(dtype_size(entry.dtype));
  for (const nlohmann::json& d : shape) {
    REX_CHECK(d.is_number_integer(), tensor, ": shape ", shape.dump(), " holds a non-integer");
    REX_CHECK(!d.is_number_unsigned() || d.get<uint64_t>() <= INT64_MAX, tensor, ": shape ",
              shape.dump(), " has a dimension too large for rex");
    const int64_t extent = d.get<int64_t>();
    REX_CHECK(extent >= 0, tensor, ": shape ", shape.dump(), " has a negative dimension");
    REX_CHECK(!__builtin_mul_overflow(bytes, extent, &bytes), tensor, ": shape ", shape.dump(),
              " is too large for rex");
    dims.push_back(extent);
  }
  entry.shape = Shape(std::move(dims));

  const nlohmann::json& offsets = info.at("data_offsets");
  REX_CHECK(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
                offsets[1].is_number_unsigned(),
            tensor, ": data_offsets ", offsets.dump(), " is not two non-negative integers");
  entry.begin = offsets[0].get<uint64_t>();
  entry.end = offsets[1].get<uint64_t>();
  REX_CHECK(entry.begin <= entry.end, tensor, ": data_offsets ", offsets.dump(),
            " end before they begin");
  REX_CHECK(entry.end - entry.begin == static_cast<uint64_t>(bytes), tensor, ": dtype ", dtype_text,
            " and shape ", entry.shape, " need ", bytes, " bytes but data_offsets ", offsets.dump(),
            " span ", entry.end - entry.begin);
  REX_CHECK(entry.end <= buffer_size, tensor, ": data_offsets ", offsets.dump(),
            " are past the end of the buffer (", buffer_size, " bytes after the header)");
  return entry;
}

inline io::Metadata parse_safetensors_metadata(const nlohmann::json& info,
                                               const std::string& where) {
  REX_CHECK(info.is_object(), where, ": __metadata__ is a JSON ", info.type_name(),
            ", not an object");
  io::Metadata metadata;
  for (const auto& [key, value] : info.items()) {
    REX_CHECK(value.is_string(), where, ": __metadata__ value of '", key, "' is a JSON ",
              value.type_name(), ", not a string");
    metadata[key] = value.get<std::string>();
  }
  return metadata;
}

// Checks every "rex.crc32c.<name>" metadata key against the bytes of tensor <name>; once one is
// present, every tensor must have one.
inline void check_safetensors_checksums(const io::Metadata& metadata,
                                        const std::vector<SafetensorsEntry>& entries,
                                        std::string_view buffer, const std::string& where) {
  std::map<std::string_view, const SafetensorsEntry*> by_name;
  for (const SafetensorsEntry& e : entries) by_name[e.name] = &e;
  size_t checked = 0;
  for (const auto& [key, recorded] : metadata) {
    if (key.rfind(kChecksumKeyPrefix, 0) != 0) continue;
    const std::string name = key.substr(kChecksumKeyPrefix.size());
    auto it = by_name.find(name);
    REX_CHECK(it != by_name.end(), where, ": metadata \"", key, "\" is the checksum of tensor '",
              name, "', which the file does not hold");
    const SafetensorsEntry& e = *it->second;
    const std::string computed = crc32c_hex(buffer.substr(e.begin, e.end - e.begin));
    REX_CHECK(recorded == computed, where, ": tensor '", name,
              "': its data do not match the checksum recorded in the file (crc32c ", recorded,
              " recorded, ", computed, " computed): the file is corrupt");
    ++checked;
  }
  if (checked == 0) return;
  for (const SafetensorsEntry& e : entries)
    REX_CHECK(metadata.count(std::string(kChecksumKeyPrefix) + e.name) == 1, where, ": tensor '",
              e.name, "' has no checksum (metadata \"", kChecksumKeyPrefix, e.name,
              "\") although the file's other tensors have one");
}

// Parses and checks a whole file; `where` ("load_safetensors: <path>") starts every error.
inline io::SafetensorsContents decode_safetensors(std::string_view bytes,
                                                  const std::string& where) {
  uint64_t header_length = 0;
  REX_CHECK(bytes.size() >= sizeof header_length, where, ": file is ", bytes.size(),
            " bytes, shorter than the 8-byte header length a safetensors file starts with");
  std::memcpy(&header_length, bytes.data(), sizeof header_length);
  REX_CHECK(header_length <= bytes.size() - sizeof header_length, where, ": header length ",
            header_length, " is past the end of the file (", bytes.size(), " bytes)");
  REX_CHECK(header_length <= kMaxHeaderBytes, where, ": header length ", header_length,
            " is over the format's limit of ", kMaxHeaderBytes, " bytes");
  const std::string_view text = bytes.substr(sizeof header_length, header_length);
  REX_CHECK(text.empty() || std::string_view(" \t\n\r").find(text[0]) == std::string_view::npos,
            where, ": header starts with whitespace (the format wants '{' as its first byte)");
  // nlohmann::json stops at a NUL byte as at the end of the text, which would let bytes after it
  // pass unread.
  REX_CHECK(text.find('\0') == std::string_view::npos, where,
            ": header holds a NUL byte at offset ", text.find('\0'), " (JSON text cannot)");
  const std::string_view buffer = bytes.substr(sizeof header_length + header_length);

  // The parser keeps the last of two equal keys; catching repeated tensor names here reports them
  // as such instead of as a mysterious gap in the buffer.
  std::set<std::string> names;
  auto reject_duplicates = [&](int depth, nlohmann::json::parse_event_t event,
                               nlohmann::json& parsed) {
    if (depth == 1 && event == nlohmann::json::parse_event_t::key)
      REX_CHECK(names.insert(parsed.get<std::string>()).second, where, ": header names '",
                parsed.get<std::string>(), "' twice");
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text.begin(), text.end(), reject_duplicates);
  } catch (const nlohmann::json::exception& e) {
    throw Error(concat(where, ": header is not valid JSON (", e.what(), ")"));
  }
  REX_CHECK(header.is_object(), where, ": header is a JSON ", header.type_name(),
            ", not an object");

  io::SafetensorsContents contents;
  std::vector<SafetensorsEntry> entries;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") {
      contents.metadata = parse_safetensors_metadata(info, where);
    } else {
      entries.push_back(parse_safetensors_entry(name, info, buffer.size(), where));
    }
  }

  // The tensors must tile the buffer: sorted by position, each starts where the previous ended.
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t position = 0;
  const SafetensorsEntry* previous = nullptr;
  for (const SafetensorsEntry& e : entries) {
    REX_CHECK(e.begin >= position, where, ": tensors '", previous->name, "' (bytes [",
              previous->begin, ", ", previous->end, ")) and '", e.name, "' (bytes [", e.begin, ", ",
              e.end, ")) overlap");
    REX_CHECK(e.begin == position, where, ": bytes [", position, ", ", e.begin, ") before tensor '",
              e.name, "' belong to no tensor (the format requires a tightly packed buffer)");
    position = e.end;
    previous = &e;
  }
  REX_CHECK(position == buffer.size(), where, ": ", buffer.size() - position,
            " bytes after the last tensor belong to no tensor (the format requires a tightly "
            "packed buffer)");

  check_safetensors_checksums(contents.metadata, entries, buffer, where);
  for (const SafetensorsEntry& e : entries) {
    Tensor t = Tensor::empty(e.shape, e.dtype);
    if (e.end > e.begin) std::memcpy(tensor_bytes(t), buffer.data() + e.begin, e.end - e.begin);
    contents.tensors.emplace(e.name, std::move(t));
  }
  return contents;
}

}  // namespace rex::detail

namespace rex::io {

// The bytes of a safetensors file holding `tensors` (in name order) and `metadata`.
inline std::string to_safetensors(const TensorMap& tensors, const Metadata& metadata = {}) {
  return detail::encode_safetensors(tensors, metadata, "to_safetensors");
}

// `metadata` plus the checksum of every tensor's data ("rex.crc32c.<name>", see the top of the
// file), which the reader then checks.
inline Metadata with_checksums(const TensorMap& tensors, Metadata metadata) {
  for (const auto& [name, t] : tensors) {
    REX_CHECK(t.defined() && t.device().is_cpu(), "with_checksums: tensor '", name,
              "' must be a defined CPU tensor");
    const size_t size = static_cast<size_t>(t.numel()) * dtype_size(t.dtype());
    metadata[std::string(detail::kChecksumKeyPrefix) + name] =
        detail::crc32c_hex(std::string_view(size > 0 ? detail::tensor_bytes(t) : "", size));
  }
  return metadata;
}

// Writes the file atomically (see write_file_atomic).
inline void save_safetensors(const std::string& path, const TensorMap& tensors,
                             const Metadata& metadata = {}) {
  write_file_atomic(path,
                    detail::encode_safetensors(tensors, metadata, "save_safetensors: " + path));
}

// Parses a whole file held in memory; `what` names its source (the path) in error messages.
inline SafetensorsContents from_safetensors(std::string_view bytes, const std::string& what) {
  return detail::decode_safetensors(bytes, "from_safetensors: " + what);
}

inline SafetensorsContents load_safetensors(const std::string& path) {
  const std::string bytes = read_file(path);
  return detail::decode_safetensors(bytes, "load_safetensors: " + path);
}

}  // namespace rex::io
