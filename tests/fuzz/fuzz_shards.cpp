// libFuzzer target: a token shard, checked as open_shard checks a mapped file (data::parse_shard)
// and then read as training reads it (a TokenPiece in a TokenStream). The first input byte picks
// the format (odd: llmc, even: nanogpt); the rest is the file. Anything may be refused with
// rex::Error; an accepted shard must account for every byte of the file, and every id read through
// the stream (whole, and in two slices) must equal the id at its offset in the file.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include <rex/data/shards.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto format = data[0] % 2 ? rex::data::ShardFormat::llmc : rex::data::ShardFormat::nanogpt;
  const uint8_t* file = data + 1;
  const uint64_t file_size = size - 1;
  rex::data::ShardLayout layout;
  try {
    layout = rex::data::parse_shard("shard.bin", file, file_size, format);
  } catch (const rex::Error&) {
    return 0;
  }
  const uint64_t width = static_cast<uint64_t>(layout.token_width);
  REX_CHECK(
      layout.token_count > 0 && layout.first_token_offset + layout.token_count * width == file_size,
      "fuzz_shards: an accepted shard does not account for every byte of the file");
  rex::data::TokenStream stream;
  stream.append({"shard.bin", file + layout.first_token_offset, layout.token_count,
                 layout.token_width, layout.first_token_offset, nullptr});
  std::vector<int32_t> ids(layout.token_count);
  stream.copy(0, ids.size(), ids.data());
  const uint64_t half = ids.size() / 2;
  std::vector<int32_t> halves(ids.size());
  stream.slice(0, half).copy(0, half, halves.data());
  stream.slice(half, ids.size()).copy(0, ids.size() - half, halves.data() + half);
  for (uint64_t i = 0; i < ids.size(); ++i) {
    uint32_t id = 0;  // little-endian, as the formats say
    for (uint64_t b = 0; b < width; ++b)
      id |= static_cast<uint32_t>(file[layout.first_token_offset + i * width + b]) << (8 * b);
    REX_CHECK(static_cast<uint32_t>(ids[i]) == id && halves[i] == ids[i], "fuzz_shards: id ", i,
              " reads back as ", ids[i], " / ", halves[i], ", the file holds ", id);
  }
  const rex::data::TokenScan scan = rex::data::scan_tokens(stream);
  REX_CHECK(scan.largest >= 0 && rex::data::token_location(stream, scan.position).size() > 0,
            "fuzz_shards: the largest id has no location");
  return 0;
}
