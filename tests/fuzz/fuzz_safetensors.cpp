// libFuzzer target: the safetensors reader (rex/io/safetensors.hpp) on arbitrary bytes. Any input
// must either parse or throw rex::Error; a file that parses must survive a write and re-read with
// the same tensors and metadata (its checksums, if any, included).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include <rex/io/safetensors.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  rex::io::SafetensorsContents contents;
  try {
    contents = rex::io::from_safetensors(bytes, "fuzz input");
  } catch (const rex::Error&) {
    return 0;
  }
  const rex::io::SafetensorsContents again = rex::io::from_safetensors(
      rex::io::to_safetensors(contents.tensors, contents.metadata), "rewritten fuzz input");
  REX_CHECK(again.metadata == contents.metadata && again.tensors.size() == contents.tensors.size(),
            "fuzz_safetensors: a rewritten file reads back differently");
  return 0;
}
