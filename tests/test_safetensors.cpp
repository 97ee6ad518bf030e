// Tests for rex/io/files.hpp and rex/io/safetensors.hpp: bit-exact round trips (NaN payloads,
// +-inf, -0.0, rank 0, zero elements, views), the exact bytes of files written out by hand in both
// directions (so the format is checked independently of our own writer and reader), metadata, every
// corruption the reader must reject, truncation at every length, and atomic file replacement; the
// per-tensor checksums (their own known answers, and flipped bits in rex's model and checkpoint
// files refused naming the tensor), the config recorded in model.safetensors, and the clean-up of
// temporary files left by killed writers.
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <rex/io/files.hpp>
#include <rex/io/safetensors.hpp>
#include <rex/train/checkpoint.hpp>

#include "testing.hpp"

using namespace rex;
using rex::testing::error_message;
namespace fs = std::filesystem;

namespace {

float from_bits(uint32_t bits) { return std::bit_cast<float>(bits); }

// The 8-byte little-endian length prefix, byte by byte (independent of the host's memcpy).
std::string length_prefix(uint64_t n) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xFF));
  return out;
}

// A file with this header text (unpadded) and payload.
std::string file_with(const std::string& header, const std::string& payload) {
  return length_prefix(header.size()) + header + payload;
}

std::string parse_error(const std::string& header, const std::string& payload) {
  return error_message(
      [&] { io::from_safetensors(file_with(header, payload), "bad.safetensors"); });
}

// A reader error for bad.safetensors that names the problem `want`.
void check(const std::string& msg, const std::string& want) {
  CHECK_MESSAGE(msg.find("from_safetensors: bad.safetensors: ") == 0, msg);
  CHECK_MESSAGE(msg.find(want) != std::string::npos, msg, "\n  should contain: ", want);
}

// Tensors covering both dtypes, rank 0, zero elements and special float values.
io::TensorMap sample_tensors() {
  const float inf = std::numeric_limits<float>::infinity();
  io::TensorMap tensors;
  tensors["a.weight"] = from_vector<float>(
      {1.5f, -0.0f, 0.0f, inf, -inf, from_bits(0x7FC00001u), from_bits(0xFFC00000u),
       from_bits(0x00000001u), std::numeric_limits<float>::max(), -3.25f, 1e-30f, 7.0f},
      Shape{2, 3, 2});
  tensors["b.ids"] = from_vector<int32_t>({0, -1, 2147483647, -2147483647 - 1, 42}, Shape{5});
  tensors["c.scalar"] = from_vector<float>({-2.5f}, Shape{});
  tensors["d.empty"] = Tensor::empty(Shape{0, 3});
  tensors["e.empty_ids"] = Tensor::empty(Shape{2, 0, 2}, DType::i32);
  tensors["f.row"] = from_vector<int32_t>({9, 8, 7}, Shape{1, 1, 3});
  return tensors;
}

void check_same(const io::TensorMap& got, const io::TensorMap& want) {
  REQUIRE(got.size() == want.size());
  for (const auto& [name, t] : want) {
    REQUIRE_MESSAGE(got.count(name) == 1, "missing tensor ", name);
    const Tensor& g = got.at(name);
    CHECK_MESSAGE(g.shape() == t.shape(), name);
    CHECK_MESSAGE(g.dtype() == t.dtype(), name);
    CHECK_MESSAGE(testing::raw_bytes(g) == testing::raw_bytes(t), name);
  }
}

}  // namespace

TEST_CASE("safetensors: f32 and i32 tensors of several shapes round-trip bit for bit") {
  const io::TensorMap tensors = sample_tensors();
  const std::string bytes = io::to_safetensors(tensors);
  check_same(io::from_safetensors(bytes, "memory").tensors, tensors);

  // Header length is a multiple of 8 and the file is prefix + header + every element byte.
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i)
    header_length = header_length << 8 | static_cast<uint8_t>(bytes[static_cast<size_t>(i)]);
  CHECK(header_length % 8 == 0);
  CHECK(bytes.size() == 8 + header_length + (12 * 4 + 5 * 4 + 4 + 0 + 0 + 3 * 4));
  CHECK(io::to_safetensors(tensors) == bytes);  // same input, same bytes

  // Through a file on disk.
  testing::TempDir dir("safetensors_roundtrip");
  io::save_safetensors(dir.file("model.safetensors"), tensors);
  check_same(io::load_safetensors(dir.file("model.safetensors")).tensors, tensors);
  CHECK(io::read_file(dir.file("model.safetensors")) == bytes);
}

TEST_CASE("safetensors: a view writes its own elements, not its storage's") {
  const Tensor base = arange(12);
  const Tensor rows = slice(reshape(base, {4, 3}), 0, 1, 3);  // elements 3..8, a view at offset 3
  REQUIRE(rows.shares_storage_with(base));
  const io::TensorMap loaded = io::from_safetensors(io::to_safetensors({{"x", rows}}), "m").tensors;
  CHECK(loaded.at("x").shape() == Shape{2, 3});
  CHECK(loaded.at("x").to_vector() == std::vector<float>{3, 4, 5, 6, 7, 8});
}

TEST_CASE("safetensors: the writer produces exactly the bytes of the format") {
  // Keys sorted (std::map order) at every level, no spaces, padded with spaces to 136 = 8 * 17,
  // tensors in name order: a = 1.5f (0x3FC00000), b = {1, -2}.
  const std::string header =
      R"({"__metadata__":{"k":"v"},"a":{"data_offsets":[0,4],"dtype":"F32","shape":[]},)"
      R"("b":{"data_offsets":[4,12],"dtype":"I32","shape":[2]}})"
      "    ";
  REQUIRE(header.size() == 136);
  const std::string want = std::string("\x88\0\0\0\0\0\0\0", 8) + header +
                           std::string(
                               "\x00\x00\xC0\x3F"
                               "\x01\x00\x00\x00"
                               "\xFE\xFF\xFF\xFF",
                               12);
  const io::TensorMap tensors{{"b", from_vector<int32_t>({1, -2})},
                              {"a", from_vector<float>({1.5f}, Shape{})}};
  CHECK(io::to_safetensors(tensors, {{"k", "v"}}) == want);
}

TEST_CASE("safetensors: a file written by hand parses to the expected tensors") {
  // Another writer's choices: spaces in the JSON, keys in any order, the buffer not in name order
  // (ids first), metadata last. 164 header bytes + 4 spaces of padding = 168 = 0xA8.
  const std::string header =
      R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [12, 28]}, )"
      R"("ids": {"shape": [3], "data_offsets": [0, 12], "dtype": "I32"}, )"
      R"("__metadata__": {"format": "pt"}})"
      "    ";
  REQUIRE(header.size() == 168);
  const std::string payload(
      "\x07\x00\x00\x00"   // ids: 7
      "\xFF\xFF\xFF\xFF"   //      -1
      "\x00\x01\x00\x00"   //      256
      "\x00\x00\x80\x3F"   // w: 1.0f   = 0x3F800000
      "\x00\x00\x00\x40"   //    2.0f   = 0x40000000
      "\x00\x00\x00\xBF"   //    -0.5f  = 0xBF000000
      "\x00\x00\x80\x3E",  //    0.25f  = 0x3E800000
      28);
  const std::string bytes = std::string("\xA8\0\0\0\0\0\0\0", 8) + header + payload;
  const io::SafetensorsContents contents = io::from_safetensors(bytes, "hand.safetensors");
  REQUIRE(contents.tensors.size() == 2);
  const Tensor& w = contents.tensors.at("w");
  const Tensor& ids = contents.tensors.at("ids");
  CHECK(w.dtype() == DType::f32);
  CHECK(w.shape() == Shape{2, 2});
  CHECK(w.to_vector() == std::vector<float>{1.0f, 2.0f, -0.5f, 0.25f});
  CHECK(ids.dtype() == DType::i32);
  CHECK(ids.shape() == Shape{3});
  CHECK(ids.to_vector<int32_t>() == std::vector<int32_t>{7, -1, 256});
  CHECK(contents.metadata == io::Metadata{{"format", "pt"}});
}

TEST_CASE("safetensors: metadata round-trips") {
  const io::Metadata metadata{
      {"format", "pt"}, {"step", "1200"}, {"note", "h\xC3\xA9llo \"quoted\"\n"}, {"", "empty key"}};
  const io::SafetensorsContents back =
      io::from_safetensors(io::to_safetensors({{"x", from_vector<float>({1, 2})}}, metadata), "m");
  CHECK(back.metadata == metadata);
  CHECK(back.tensors.at("x").to_vector() == std::vector<float>{1, 2});

  // Metadata alone, and no metadata at all (no "__metadata__" key is written then).
  const io::SafetensorsContents only = io::from_safetensors(io::to_safetensors({}, metadata), "m");
  CHECK(only.metadata == metadata);
  CHECK(only.tensors.empty());
  const std::string plain = io::to_safetensors({{"x", from_vector<float>({1})}});
  CHECK(plain.find("__metadata__") == std::string::npos);
  CHECK(io::from_safetensors(plain, "m").metadata.empty());
}

TEST_CASE("safetensors: the reader rejects every kind of corruption, naming the problem") {
  const std::string eight(8, '\0');  // two f32 values' worth of payload
  const std::string f32x2 = R"("dtype":"F32","shape":[2])";

  // Framing.
  check(error_message([] { io::from_safetensors("abc", "bad.safetensors"); }),
        "file is 3 bytes, shorter than the 8-byte header length");
  check(error_message([] { io::from_safetensors(length_prefix(1000) + "{}", "bad.safetensors"); }),
        "header length 1000 is past the end of the file (10 bytes)");
  check(error_message(
            [] { io::from_safetensors(length_prefix(UINT64_MAX) + "{}", "bad.safetensors"); }),
        "header length 18446744073709551615 is past the end of the file");

  // The header itself.
  check(parse_error(R"({"a": )", ""), "header is not valid JSON");
  check(parse_error("", ""), "header is not valid JSON");
  check(parse_error("[1, 2]", ""), "header is a JSON array, not an object");
  check(parse_error(R"({"a": 3})", ""), "tensor 'a': header entry is a JSON number, not an object");
  check(parse_error(R"({"a":{"data_offsets":[0,4],"dtype":"F32","shape":[1]},)"
                    R"("a":{"data_offsets":[4,8],"dtype":"F32","shape":[1]}})",
                    eight),
        "header names 'a' twice");

  // Missing fields and wrong JSON types.
  check(parse_error(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", eight),
        "tensor 'a': header entry has no \"dtype\"");
  check(parse_error(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", eight),
        "tensor 'a': header entry has no \"shape\"");
  check(parse_error(R"({"a":{"dtype":"F32","shape":[2]}})", eight),
        "tensor 'a': header entry has no \"data_offsets\"");
  check(parse_error(R"({"a":{"dtype":5,"shape":[2],"data_offsets":[0,8]}})", eight),
        "\"dtype\" is a JSON number, not a string");
  check(parse_error(R"({"a":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", eight),
        "\"shape\" is a JSON string, not an array");
  check(parse_error(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", eight),
        "shape [2.0] holds a non-integer");
  check(parse_error(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0]}})", eight),
        "data_offsets [0] is not two non-negative integers");
  check(parse_error(R"({"a":{)" + f32x2 + R"(,"data_offsets":[-8,0]}})", eight),
        "data_offsets [-8,0] is not two non-negative integers");
  check(parse_error(R"({"a":{)" + f32x2 + R"(,"data_offsets":"0,8"}})", eight),
        "is not two non-negative integers");

  // Values.
  check(parse_error(R"({"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}})", eight),
        "tensor 'a': dtype BF16 is not supported (rex reads F32 and I32)");
  check(parse_error(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight),
        "shape [-2] has a negative dimension");
  check(parse_error(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],)"
                    R"("data_offsets":[0,8]}})",
                    eight),
        "is too large for rex");
  check(parse_error(R"({"a":{"dtype":"F32","shape":[18446744073709551615],)"
                    R"("data_offsets":[0,8]}})",
                    eight),
        "has a dimension too large for rex");
  check(parse_error(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,4]}})", eight),
        "dtype F32 and shape [2] need 8 bytes but data_offsets [0,4] span 4");
  check(parse_error(R"({"a":{)" + f32x2 + R"(,"data_offsets":[8,0]}})", eight),
        "data_offsets [8,0] end before they begin");
  check(parse_error(R"({"a":{)" + f32x2 + R"(,"data_offsets":[8,16]}})", eight),
        "data_offsets [8,16] are past the end of the buffer (8 bytes after the header)");

  // Layout: the tensors must tile the buffer exactly.
  const std::string twelve(12, '\0');
  check(parse_error(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},)" + R"("b":{)" + f32x2 +
                        R"(,"data_offsets":[4,12]}})",
                    twelve),
        "tensors 'a' (bytes [0, 8)) and 'b' (bytes [4, 12)) overlap");
  check(parse_error(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},)"
                    R"("b":{"dtype":"I32","shape":[1],"data_offsets":[8,12]}})",
                    twelve),
        "bytes [4, 8) before tensor 'b' belong to no tensor");
  check(parse_error(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[4,8]}})", eight),
        "bytes [0, 4) before tensor 'a' belong to no tensor");
  check(parse_error(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})", eight),
        "4 bytes after the last tensor belong to no tensor");
  check(parse_error("{}", "xy"), "2 bytes after the last tensor belong to no tensor");

  // Metadata.
  check(parse_error(R"({"__metadata__":{"k":1}})", ""),
        "__metadata__ value of 'k' is a JSON number, not a string");
  check(parse_error(R"({"__metadata__":["k"]})", ""),
        "__metadata__ is a JSON array, not an object");

  // Valid edge cases: an empty header object, and a lone 0-element tensor at offset 0.
  CHECK(io::from_safetensors(file_with("{}", ""), "ok").tensors.empty());
  const io::TensorMap zero =
      io::from_safetensors(
          file_with(R"({"z":{"dtype":"F32","shape":[3,0],"data_offsets":[0,0]}})", ""), "ok")
          .tensors;
  CHECK(zero.at("z").shape() == Shape{3, 0});
}

TEST_CASE("safetensors: a file cut short at any length is rejected, never read past its end") {
  const std::string bytes = io::to_safetensors(sample_tensors(), {{"k", "v"}});
  size_t header_end = 8;
  for (int i = 7; i >= 0; --i)
    header_end += static_cast<size_t>(static_cast<uint8_t>(bytes[static_cast<size_t>(i)]))
                  << (8 * i);
  auto cut = [&](size_t n) {
    return error_message([&] { io::from_safetensors(bytes.substr(0, n), "cut.safetensors"); });
  };
  // Representative lengths and the reason each gives.
  CHECK(cut(0).find("file is 0 bytes, shorter than the 8-byte header length") != std::string::npos);
  CHECK(cut(7).find("file is 7 bytes") != std::string::npos);
  CHECK(cut(8).find("is past the end of the file (8 bytes)") != std::string::npos);
  CHECK(cut(header_end - 1).find("is past the end of the file") != std::string::npos);
  CHECK(cut(header_end).find("are past the end of the buffer (0 bytes after the header)") !=
        std::string::npos);
  CHECK(cut(bytes.size() - 1).find("are past the end of the buffer") != std::string::npos);
  // Every length from 0 to size - 1 throws a rex::Error naming the source.
  for (size_t n = 0; n < bytes.size(); ++n) {
    const std::string msg = cut(n);
    CHECK_MESSAGE(msg.find("from_safetensors: cut.safetensors: ") == 0, "length ", n, ": ", msg);
  }
  CHECK(io::from_safetensors(bytes, "whole").tensors.size() == sample_tensors().size());
}

TEST_CASE("safetensors: load and save name the file in their errors; the writer checks names") {
  testing::TempDir dir("safetensors_errors");
  const std::string path = dir.file("corrupt.safetensors");
  io::write_file_atomic(path, file_with("[]", ""));
  std::string msg = error_message([&] { io::load_safetensors(path); });
  CHECK(msg.find("load_safetensors: " + path + ": header is a JSON array") == 0);

  msg = error_message([&] { io::load_safetensors(dir.file("missing.safetensors")); });
  CHECK(msg.find("read_file: " + dir.file("missing.safetensors") + ": file does not exist") == 0);

  msg = error_message([&] { io::save_safetensors(path, {{"x", Tensor()}}); });
  CHECK(msg.find("save_safetensors: " + path + ": tensor 'x' is undefined") == 0);
  msg = error_message([] { io::to_safetensors({{"__metadata__", scalar(1.0f)}}); });
  CHECK(msg.find("to_safetensors: \"__metadata__\" is reserved") == 0);
  msg = error_message([] { io::to_safetensors({{"bad\xFF", scalar(1.0f)}}); });
  CHECK(msg.find("to_safetensors: a tensor name or metadata string is not valid UTF-8") == 0);
  msg = error_message([] { io::to_safetensors({}, {{"k", "\xC3"}}); });
  CHECK(msg.find("not valid UTF-8") != std::string::npos);
}

TEST_CASE("write_file_atomic: replaces the file whole and leaves no temporary file") {
  testing::TempDir dir("atomic");
  const std::string path = dir.file("state.bin");
  io::write_file_atomic(path, "a first, longer version of the file");
  CHECK(io::read_file(path) == "a first, longer version of the file");
  const std::string binary("second\0\xFF", 8);
  io::write_file_atomic(path, binary);
  CHECK(io::read_file(path) == binary);  // shorter: nothing of the old contents remains
  CHECK(dir.listing() == std::vector<std::string>{"state.bin"});
  io::write_file_atomic(path, "");
  CHECK(io::read_file(path).empty());
  CHECK(dir.listing() == std::vector<std::string>{"state.bin"});
}

TEST_CASE("write_file_atomic and read_file: errors name the path and the reason") {
  testing::TempDir dir("atomic_errors");
  const std::string in_missing = dir.file("no_such_folder/state.bin");
  std::string msg = error_message([&] { io::write_file_atomic(in_missing, "x"); });
  CHECK(msg.find("write_file_atomic: " + in_missing + ": cannot create ") == 0);
  CHECK(msg.find("folder " + dir.file("no_such_folder") + " does not exist") != std::string::npos);

  // The target is a folder: the temporary file is written, the rename fails, and the temporary
  // file is removed again.
  fs::create_directory(dir.path / "a_folder");
  msg = error_message([&] { io::write_file_atomic(dir.file("a_folder"), "x"); });
  CHECK(msg.find("write_file_atomic: " + dir.file("a_folder") + ": cannot rename") == 0);
  CHECK(dir.listing() == std::vector<std::string>{"a_folder"});

  msg = error_message([&] { io::read_file(dir.file("absent.txt")); });
  CHECK(msg == "read_file: " + dir.file("absent.txt") + ": file does not exist");
  msg = error_message([&] { io::read_file(dir.file("a_folder")); });
  CHECK(msg == "read_file: " + dir.file("a_folder") + ": is a directory, not a file");
}

TEST_CASE("safetensors: malformed files of the format's reference cases are refused") {
  const std::string f32x2 = R"("dtype":"F32","shape":[2])";
  const std::string eight(8, '\0');

  // The header may not exceed 100 MB, even when the file is that long.
  const std::string huge = length_prefix(100'000'008) + std::string(100'000'008, ' ');
  check(error_message([&] { io::from_safetensors(huge, "bad.safetensors"); }),
        "header length 100000008 is over the format's limit of 100000000 bytes");
  // The header starts with '{': leading whitespace of any kind is refused; trailing padding is not.
  for (const char* space : {" ", "\t", "\n", "\r"})
    check(parse_error(std::string(space) + "{}     ", ""), "header starts with whitespace");
  CHECK(io::from_safetensors(file_with("{}      ", ""), "ok").tensors.empty());
  // Offsets: two tensors on the same bytes, one inside another, and a tensor past the buffer.
  check(parse_error(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},"b":{)" + f32x2 +
                        R"(,"data_offsets":[0,8]}})",
                    eight),
        "overlap");
  check(parse_error(R"({"a":{"dtype":"I32","shape":[3],"data_offsets":[0,12]},)"
                    R"("b":{"dtype":"I32","shape":[1],"data_offsets":[4,8]}})",
                    std::string(12, '\0')),
        "overlap");
  check(parse_error(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},"b":{)" + f32x2 +
                        R"(,"data_offsets":[8,16]}})",
                    eight),
        "are past the end of the buffer");
  // dtype and shape disagree with the offsets: too few and too many bytes, rank 0, i32.
  check(parse_error(R"({"a":{"dtype":"I32","shape":[3],"data_offsets":[0,8]}})", eight),
        "dtype I32 and shape [3] need 12 bytes but data_offsets [0,8] span 8");
  check(parse_error(R"({"a":{"dtype":"F32","shape":[],"data_offsets":[0,8]}})", eight),
        "dtype F32 and shape [] need 4 bytes but data_offsets [0,8] span 8");
  check(parse_error(R"({"a":{"dtype":"F32","shape":[1,1],"data_offsets":[0,8]}})", eight),
        "need 4 bytes");
  // Not JSON: invalid UTF-8, a trailing comma, a NUL byte, trailing garbage after the object.
  check(parse_error("{\"\xFF\":1}", ""), "header is not valid JSON");
  check(parse_error(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},})", eight),
        "header is not valid JSON");
  check(parse_error(std::string("{}\0 junk", 8), ""), "header holds a NUL byte at offset 2");
  check(parse_error("{}x", ""), "header is not valid JSON");
  // A header length that ends inside the header's JSON.
  check(error_message(
            [&] { io::from_safetensors(length_prefix(3) + R"({"a":1})", "bad.safetensors"); }),
        "header is not valid JSON");
}

namespace {

// Bit-at-a-time CRC-32C, the definition the table-driven one must agree with.
uint32_t crc32c_by_bits(const std::string& bytes) {
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char c : bytes) {
    crc ^= c;
    for (int i = 0; i < 8; ++i) crc = crc & 1 ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
  }
  return ~crc;
}

// Flips ten bits spread over bytes [begin, end) of the file at `path`.
void flip_ten_bits(const std::string& path, uint64_t begin, uint64_t end) {
  std::string bytes = io::read_file(path);
  REQUIRE(end > begin);
  for (uint64_t i = 0; i < 10; ++i)
    bytes[begin + i * (end - begin) / 10] ^= static_cast<char>(1 << (i % 8));
  io::write_file_atomic(path, bytes);
}

// Where tensor `name`'s bytes lie in the file at `path`, from the file's own header.
std::pair<uint64_t, uint64_t> tensor_span(const std::string& path, const std::string& name) {
  const std::string bytes = io::read_file(path);
  uint64_t header_length = 0;
  std::memcpy(&header_length, bytes.data(), 8);
  const nlohmann::json header = nlohmann::json::parse(bytes.substr(8, header_length));
  const nlohmann::json& offsets = header.at(name).at("data_offsets");
  return {8 + header_length + offsets[0].get<uint64_t>(),
          8 + header_length + offsets[1].get<uint64_t>()};
}

train::RunConfig tiny_config() {
  train::RunConfig c;
  c.model.vocab_size = 13;
  c.model.d_model = 16;
  c.model.n_layers = 2;
  c.model.n_heads = 2;
  c.model.n_kv_heads = 1;
  c.model.context = 8;
  c.model.ffn = "dense";
  c.model.d_ff = 24;
  return c;
}

}  // namespace

TEST_CASE("crc32c: known answers and agreement with the bitwise definition at every alignment") {
  CHECK(detail::crc32c("") == 0u);
  CHECK(detail::crc32c("123456789") == 0xE3069283u);  // the standard check value of CRC-32C
  CHECK(detail::crc32c(std::string(32, '\0')) == 0x8A9136AAu);
  CHECK(detail::crc32c_hex("123456789") == "e3069283");
  std::string bytes;
  for (int i = 0; i < 100; ++i) bytes.push_back(static_cast<char>(i * 37 + 11));
  for (size_t start = 0; start < 8; ++start)
    for (size_t n = 0; start + n <= bytes.size(); n += 7)
      CHECK(detail::crc32c(std::string_view(bytes).substr(start, n)) ==
            crc32c_by_bits(bytes.substr(start, n)));
}

TEST_CASE("safetensors: checksums are written per tensor, checked, and optional") {
  const io::TensorMap tensors = sample_tensors();
  const io::Metadata metadata = io::with_checksums(tensors, {{"k", "v"}});
  CHECK(metadata.size() == 1 + tensors.size());
  CHECK(metadata.at("rex.crc32c.c.scalar") ==
        detail::crc32c_hex(std::string_view(
            reinterpret_cast<const char*>(tensors.at("c.scalar").data<float>()), 4)));
  CHECK(metadata.at("rex.crc32c.d.empty") == "00000000");
  const std::string bytes = io::to_safetensors(tensors, metadata);
  const io::SafetensorsContents back = io::from_safetensors(bytes, "sum.safetensors");
  check_same(back.tensors, tensors);
  CHECK(back.metadata == metadata);

  // A flipped bit in the last byte of the buffer (f.row, the last tensor in name order).
  std::string damaged = bytes;
  damaged.back() ^= 0x10;
  std::string msg = error_message([&] { io::from_safetensors(damaged, "sum.safetensors"); });
  CHECK(msg.find("from_safetensors: sum.safetensors: tensor 'f.row': its data do not match the "
                 "checksum recorded in the file (crc32c ") == 0);
  CHECK(msg.find("the file is corrupt") != std::string::npos);

  // Without checksums the same damage loads (other writers' files are not checked).
  std::string unchecked = io::to_safetensors(tensors, {{"k", "v"}});
  unchecked.back() ^= 0x10;
  CHECK(io::from_safetensors(unchecked, "plain").tensors.size() == tensors.size());

  // A checksum for a tensor the file lacks, and a tensor without one among checksummed ones.
  io::Metadata extra = metadata;
  extra["rex.crc32c.ghost"] = "00000000";
  msg = error_message([&] { io::from_safetensors(io::to_safetensors(tensors, extra), "x"); });
  CHECK(msg.find("metadata \"rex.crc32c.ghost\" is the checksum of tensor 'ghost', which the "
                 "file does not hold") != std::string::npos);
  io::Metadata partial = metadata;
  partial.erase("rex.crc32c.b.ids");
  msg = error_message([&] { io::from_safetensors(io::to_safetensors(tensors, partial), "x"); });
  CHECK(msg.find("tensor 'b.ids' has no checksum") != std::string::npos);
}

TEST_CASE("model and checkpoint files: ten flipped bits are refused naming the file and tensor") {
  const train::RunConfig config = tiny_config();
  const nn::TransformerLM model(config.model, 3);
  const optim::AdamW optimizer(optim::decay_matrices(model.named_parameters()));
  const data::CharTokenizer tokenizer = data::CharTokenizer::from_text("abcdefghijklm");
  const testing::TempDir temp("checksummed_run");
  const std::string dir = temp.path.string();
  train::save_model_folder(dir, model, config, tokenizer, 4);
  train::save_checkpoint(dir, model, optimizer, config, tokenizer, 4, {});
  const std::string name = "layers.1.attn.q.weight";
  REQUIRE(train::parameter_map(model).count(name) == 1);

  const auto [model_begin, model_end] = tensor_span(train::model_path(dir), name);
  flip_ten_bits(train::model_path(dir), model_begin, model_end);
  std::string msg = error_message([&] { train::load_model_folder(dir); });
  CHECK(msg.find("load_safetensors: " + train::model_path(dir) + ": tensor '" + name +
                 "': its data do not match the checksum") == 0);

  const auto [begin, end] = tensor_span(train::checkpoint_path(dir), "model." + name);
  flip_ten_bits(train::checkpoint_path(dir), begin, end);
  msg = error_message([&] { train::load_checkpoint(dir); });
  CHECK(msg.find("load_safetensors: " + train::checkpoint_path(dir) + ": tensor 'model." + name +
                 "': its data do not match the checksum") == 0);
}

TEST_CASE("model folder: a config.json that no longer matches model.safetensors is refused") {
  const train::RunConfig config = tiny_config();
  const nn::TransformerLM model(config.model, 3);
  const data::CharTokenizer tokenizer = data::CharTokenizer::from_text("abcdefghijklm");
  const testing::TempDir temp("recorded_config");
  const std::string dir = temp.path.string();
  train::save_model_folder(dir, model, config, tokenizer, 4);
  CHECK(train::load_model_folder(dir).step == 4);

  train::RunConfig edited = config;
  edited.model.psr.t_end = 123;
  io::write_file_atomic(dir + "/config.json", train::to_json(edited).dump(2));
  const std::string msg = error_message([&] { train::load_model_folder(dir); });
  CHECK(msg.find(dir + ": config.json does not match the config recorded in model.safetensors "
                       "(first difference: psr.t_end (123 vs ") == 0);

  // A folder written before the config was recorded (and without checksums) still loads.
  const io::TensorMap parameters = train::parameter_map(model);
  io::save_safetensors(train::model_path(dir), parameters,
                       {{"format", "rex-model"}, {"step", "4"}});
  CHECK(train::to_json(train::load_model_folder(dir).config) == train::to_json(edited));
}

TEST_CASE("remove_stale_temp_files: removes a dead writer's temporary file, never a live one's") {
  testing::TempDir dir("stale_temp");
  // pid_max is at most 2^22 = 4194304 on Linux, so no process has pid 99999999.
  const std::string dead = dir.file("checkpoint.safetensors.tmp.99999999");
  const std::string mine = dir.file("vocab.json.tmp." + std::to_string(::getpid()));
  const std::string parent = dir.file("config.json.tmp." + std::to_string(::getppid()));
  const std::string not_temp = dir.file("notes.tmp.draft");
  for (const std::string& path : {dead, mine, parent, not_temp}) io::write_file_atomic(path, "x");
  io::write_file_atomic(dir.file("model.safetensors"), "kept");

  CHECK(io::remove_stale_temp_files(dir.path.string()) == std::vector<std::string>{dead});
  CHECK(dir.listing() == std::vector<std::string>{fs::path(parent).filename().string(),
                                                  "model.safetensors", "notes.tmp.draft",
                                                  fs::path(mine).filename().string()});
  CHECK(io::remove_stale_temp_files(dir.file("no_such_folder")).empty());

  // A run clears its folder when it writes its model folder (and when it resumes).
  io::write_file_atomic(dead, "left by a killed run");
  const train::RunConfig config = tiny_config();
  const nn::TransformerLM model(config.model, 3);
  train::save_model_folder(dir.path.string(), model, config,
                           data::CharTokenizer::from_text("abcdefghijklm"), 1);
  CHECK(!fs::exists(dead));
}

// That write_file_atomic's fsync of the folder makes the rename durable cannot be observed
// without pulling the power; what can be is that the call works and fails clearly.
TEST_CASE("fsync_folder: a folder it cannot open is a clear error") {
  testing::TempDir dir("fsync_folder");
  io::fsync_folder(dir.path.string());
  const std::string missing = dir.file("absent");
  CHECK(error_message([&] { io::fsync_folder(missing); }) ==
        "fsync_folder: " + missing + ": No such file or directory");
}
