// libFuzzer target: a tokenizer.json, read as data.tokenizer reads it (io::parse_json, then
// data::BpeTokenizer::from_json). Anything may be refused with rex::Error; an accepted tokenizer
// must encode a fixed text and the input itself to ids that decode back to the bytes (unless it
// adds a prefix space), and its own tokenizer.json must read back to a tokenizer that encodes them
// to the same ids.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <rex/data/bpe.hpp>
#include <rex/io/json.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string file(reinterpret_cast<const char*>(data), size);
  std::optional<rex::data::BpeTokenizer> tok;
  try {
    tok.emplace(rex::data::BpeTokenizer::from_json(rex::io::parse_json(file, "tokenizer.json"),
                                                   "tokenizer.json"));
  } catch (const rex::Error&) {
    return 0;
  }
  const rex::data::BpeTokenizer again =
      rex::data::BpeTokenizer::from_json(tok->to_json(), "to_json()");
  for (const std::string& text :
       {std::string("Hello, world! It's 42\n\n  ok \xC3\xA9\xFF"), file}) {
    const std::vector<int32_t> ids = tok->encode(text);
    for (int32_t id : ids)
      REX_CHECK(id >= 0 && id < tok->vocab_size(), "fuzz_tokenizer: id ", id, " out of range");
    REX_CHECK(tok->add_prefix_space() || tok->decode(ids) == text,
              "fuzz_tokenizer: decode(encode(text)) is not the text");
    REX_CHECK(again.encode(text) == ids,
              "fuzz_tokenizer: the tokenizer read back from to_json() encodes differently");
  }
  return 0;
}
