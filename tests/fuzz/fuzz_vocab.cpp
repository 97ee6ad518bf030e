// libFuzzer target: vocab.json, read as load_model_folder reads it (JSON text, then
// data::CharTokenizer::from_json). Anything may be refused with rex::Error; an accepted vocabulary
// must encode and decode its own symbols and read back from its own JSON.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include <rex/data/tokenizer.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, false);
  if (j.is_discarded()) return 0;
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
