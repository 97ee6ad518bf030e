// libFuzzer target: the run configuration reader (rex/train/config.hpp). The input's first line is
// config.json text (parse_config), every further line one --set override (apply_override), and the
// result is validated, as train_tiny_rex does. Anything may be refused with rex::Error; nothing may
// crash or throw anything else. An accepted config must read back from its own JSON unchanged.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <rex/train/config.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const size_t first_end = std::min(text.find('\n'), text.size());
  rex::train::RunConfig config;
  try {
    config = rex::train::parse_config(std::string(text.substr(0, first_end)), "fuzz config");
    for (size_t begin = first_end + 1; begin < text.size();) {
      const size_t end = std::min(text.find('\n', begin), text.size());
      rex::train::apply_override(config, std::string(text.substr(begin, end - begin)));
      begin = end + 1;
    }
    rex::train::validate(config);
  } catch (const rex::Error&) {
    return 0;
  }
  const nlohmann::json saved = rex::train::to_json(config);
  REX_CHECK(rex::train::to_json(rex::train::parse_config(saved.dump(), "saved")) == saved,
            "fuzz_config: an accepted config does not read back from its own JSON");
  return 0;
}
