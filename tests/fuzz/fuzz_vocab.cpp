// libFuzzer target: vocab.json, read as load_model_folder reads it (io::parse_json, then
// data::CharTokenizer::from_json). Anything may be refused with rex::Error; text that parse_json
// accepts must give the value nlohmann's own parser gives, and an accepted vocabulary must encode
// and decode its own symbols and read back from its own JSON.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include <rex/data/tokenizer.hpp>
#include <rex/io/json.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  nlohmann::json j;
  try {
    j = rex::io::parse_json(text, "vocab.json");
  } catch (const rex::Error&) {
    return 0;
  }
  REX_CHECK(j == nlohmann::json::parse(text),
            "fuzz_vocab: parse_json and nlohmann::json::parse read the same text differently");
  std::optional<rex::data::CharTokenizer> tokenizer;
  try {
    tokenizer = rex::data::CharTokenizer::from_json(j);
  } catch (const rex::Error&) {
    return 0;
  }
  const std::string symbols(tokenizer->vocabulary().begin(), tokenizer->vocabulary().end());
  REX_CHECK(tokenizer->decode(tokenizer->encode(symbols)) == symbols,
            "fuzz_vocab: the vocabulary does not round-trip its own symbols");
  REX_CHECK(rex::data::CharTokenizer::from_json(tokenizer->to_json()).vocabulary() ==
                tokenizer->vocabulary(),
            "fuzz_vocab: the vocabulary does not read back from its own JSON");
  return 0;
}
