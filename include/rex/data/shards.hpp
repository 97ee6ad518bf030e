// Token shards: files of token ids prepared once (by nanoGPT's or llm.c's scripts) and trained on
// many times, in two formats:
//   nanogpt  train.bin, val.bin: uint16 little-endian ids and nothing else (so an even size)
//   llmc     a header of 256 int32 little-endian: [0] magic 20240520, [1] version (1: uint16 ids,
//            2: uint32 ids), [2] the token count; then exactly that many ids
// A shard is memory-mapped read-only (MappedFile): a data set is bounded by the disk, not by
// memory, and pages are read when a batch touches them. parse_shard checks a file's bytes against
// its format before any id is used, and every refusal names the file, the byte offset and what
// was expected. open_shard gives a checked shard as a TokenPiece of a TokenStream
// (rex/data/token_stream.hpp); list_shard_files expands a file, a folder or a glob into shards.
#pragma once

#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "rex/core/error.hpp"
#include "rex/data/token_stream.hpp"

namespace rex::data {

// A whole file mapped read-only into memory; the mapping lasts as long as the object.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    REX_CHECK(fd >= 0, path, ": cannot open: ", std::strerror(errno));
    struct stat info {};
    if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
      ::close(fd);
      throw Error(path + ": is not a regular file (a token shard must be one)");
    }
    size_ = static_cast<uint64_t>(info.st_size);
    if (size_ > 0) {
      void* mapped = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      const int error = errno;
      ::close(fd);
      REX_CHECK(mapped != MAP_FAILED, path, ": cannot map its ", size_,
                " bytes into memory: ", std::strerror(error));
      data_ = static_cast<const uint8_t*>(mapped);
    } else {
      ::close(fd);
    }
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  }

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

enum class ShardFormat { nanogpt, llmc };

inline constexpr int32_t kLlmcMagic = 20240520;
inline constexpr uint64_t kLlmcHeaderBytes = 256 * 4;

// Where the ids of a checked shard are.
struct ShardLayout {
  uint64_t first_token_offset = 0;  // bytes from the start of the file
  uint64_t token_count = 0;
  int token_width = 2;  // bytes per id
};

// Checks the `size` bytes at `bytes` (the file `path`) as a shard of `format`; throws rex::Error
// naming the file, the byte offset and what was expected. A shard without tokens is refused too.
inline ShardLayout parse_shard(const std::string& path, const uint8_t* bytes, uint64_t size,
                               ShardFormat format) {
  if (format == ShardFormat::nanogpt) {
    REX_CHECK(size > 0, path, ": the nanoGPT .bin file is empty (expected uint16 token ids)");
    REX_CHECK(size % 2 == 0, path,
              ": a nanoGPT .bin file holds uint16 token ids, so its size must ", "be even; it has ",
              size, " bytes, the last id cut short at offset ", size - 1);
    return {0, size / 2, 2};
  }
  REX_CHECK(size >= kLlmcHeaderBytes, path, ": truncated llm.c shard: ", size,
            " bytes, expected a header of ", kLlmcHeaderBytes, " bytes (256 int32) at offset 0");
  auto header = [&](int i) {
    int32_t value;
    std::memcpy(&value, bytes + 4 * i, 4);
    return value;
  };
  REX_CHECK(header(0) == kLlmcMagic, path, ": header[0] at offset 0 is ", header(0),
            ", expected the llm.c magic ", kLlmcMagic, " (not an llm.c token shard)");
  const int32_t version = header(1);
  REX_CHECK(version == 1 || version == 2, path, ": header[1] (version) at offset 4 is ", version,
            ", expected 1 (uint16 tokens) or 2 (uint32 tokens)");
  const int width = version == 1 ? 2 : 4;
  const int32_t count = header(2);
  REX_CHECK(count > 0, path, ": header[2] (token count) at offset 8 is ", count,
            ", expected a positive number of tokens");
  const uint64_t expected = kLlmcHeaderBytes + static_cast<uint64_t>(count) * width;
  REX_CHECK(size == expected, path, ": header[2] at offset 8 says ", count, " tokens of ", width,
            " bytes, so the file should have ", expected, " bytes, but it has ", size,
            size < expected ? " (truncated)" : " (bytes after the last token)");
  return {kLlmcHeaderBytes, static_cast<uint64_t>(count), width};
}

// The bytes of an llm.c shard holding ids[0 .. count): version 1 (uint16 ids) when every id is
// below 65536, else version 2 (uint32), little-endian as parse_shard reads them.
inline std::string llmc_shard_bytes(const int32_t* ids, uint64_t count) {
  REX_CHECK(count > 0 && count <= INT32_MAX, "llmc_shard_bytes: ", count,
            " tokens; an llm.c shard holds 1 to 2^31 - 1");
  const bool wide = std::any_of(ids, ids + count, [](int32_t id) { return id > 65535; });
  const int width = wide ? 4 : 2;
  std::string bytes(kLlmcHeaderBytes + count * width, '\0');
  auto put = [&](uint64_t offset, uint32_t value, int size) {
    for (int b = 0; b < size; ++b) bytes[offset + b] = static_cast<char>((value >> (8 * b)) & 0xFF);
  };
  put(0, kLlmcMagic, 4);
  put(4, wide ? 2 : 1, 4);
  put(8, static_cast<uint32_t>(count), 4);
  for (uint64_t i = 0; i < count; ++i)
    put(kLlmcHeaderBytes + i * width, static_cast<uint32_t>(ids[i]), width);
  return bytes;
}

// The format of the shard `path`: llmc when it starts with the llm.c magic, nanogpt otherwise.
inline ShardFormat detect_shard_format(const std::string& path) {
  const MappedFile file(path);
  int32_t magic = 0;
  if (file.size() >= 4) std::memcpy(&magic, file.data(), 4);
  return magic == kLlmcMagic ? ShardFormat::llmc : ShardFormat::nanogpt;
}

// The checked shard `path`, mapped, as a piece of a token stream.
inline TokenPiece open_shard(const std::string& path, ShardFormat format) {
  auto file = std::make_shared<const MappedFile>(path);
  const ShardLayout layout = parse_shard(path, file->data(), file->size(), format);
  return {path,
          file->data() + layout.first_token_offset,
          layout.token_count,
          layout.token_width,
          layout.first_token_offset,
          file};
}

inline bool is_glob(const std::string& spec) {
  return spec.find_first_of("*?[") != std::string::npos;
}

// The shard files `spec` names, each checked to exist: the file itself; the *.bin files of a
// folder, sorted by name; or the files a glob (* ? [...]) matches, sorted. Nothing found is an
// error naming `spec`.
inline std::vector<std::string> list_shard_files(const std::string& spec) {
  namespace fs = std::filesystem;
  std::error_code error;
  std::vector<std::string> files;
  if (fs::is_directory(spec, error)) {
    for (const fs::directory_entry& entry : fs::directory_iterator(spec, error))
      if (entry.path().extension() == ".bin") files.push_back(entry.path().string());
    REX_CHECK(!files.empty(), spec, ": the folder holds no token shards (expected *.bin files)");
  } else if (fs::exists(spec, error) || !is_glob(spec)) {
    REX_CHECK(fs::exists(spec, error), spec, ": does not exist");
    files.push_back(spec);
  } else {
    glob_t matches{};
    const int status = ::glob(spec.c_str(), 0, nullptr, &matches);
    for (size_t i = 0; status == 0 && i < matches.gl_pathc; ++i)
      files.push_back(matches.gl_pathv[i]);
    ::globfree(&matches);
    REX_CHECK(!files.empty(), spec, ": the glob matches no file (expected token shards)");
  }
  std::sort(files.begin(), files.end());
  return files;
}

// Whether a shard's file name marks it as validation data: nanoGPT's val.bin, llm.c's *_val_*.bin.
inline bool is_validation_shard_name(const std::string& path) {
  const std::string name = std::filesystem::path(path).filename().string();
  return name == "val.bin" || name.find("_val_") != std::string::npos;
}

// The largest id of a stream and where it is, with a fingerprint of every id (64-bit FNV-1a over
// the ids: cheap, not a security measure), from one pass over the stream.
struct TokenScan {
  int64_t largest = -1;
  uint64_t position = 0;  // stream index of the first occurrence of `largest`
  uint64_t hash = 0xCBF29CE484222325ull;
};

inline TokenScan scan_tokens(const TokenStream& stream) {
  TokenScan scan;
  uint64_t index = 0;
  for (const TokenPiece& piece : stream.pieces())
    for (uint64_t i = 0; i < piece.count; ++i, ++index) {
      const int64_t id = piece.token(i);
      scan.hash = (scan.hash ^ static_cast<uint64_t>(id)) * 0x100000001B3ull;
      if (id > scan.largest) {
        scan.largest = id;
        scan.position = index;
      }
    }
  return scan;
}

// "FILE at byte offset N": where token `index` of `stream` is stored.
inline std::string token_location(const TokenStream& stream, uint64_t index) {
  for (const TokenPiece& piece : stream.pieces()) {
    if (index < piece.count)
      return detail::concat(piece.source, " at byte offset ",
                            piece.file_offset + index * static_cast<uint64_t>(piece.width));
    index -= piece.count;
  }
  throw Error(
      detail::concat("token_location: index beyond a stream of ", stream.size(), " tokens"));
}

}  // namespace rex::data
