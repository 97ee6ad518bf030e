// libFuzzer target: the metrics.jsonl reader a resumed run uses (train::MetricsLog with a resume
// step, rex/train/metrics.hpp), which keeps the lines up to the checkpoint's step. The input is
// written as metrics.jsonl to a scratch file (in /dev/shm where there is one, as the reader's own
// atomic rewrite fsyncs), then read as a resume from step 5 would read it.
// Anything may be refused with rex::Error; nothing may crash or throw anything else.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <rex/train/metrics.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path =
      ((std::filesystem::is_directory("/dev/shm") ? std::filesystem::path("/dev/shm")
                                                  : std::filesystem::temp_directory_path()) /
       ("rex_fuzz_metrics_" + std::to_string(::getpid()) + ".jsonl"))
          .string();
  std::FILE* file = std::fopen(path.c_str(), "wb");
  if (file == nullptr) std::abort();
  std::fwrite(data, 1, size, file);
  std::fclose(file);
  try {
    rex::train::MetricsLog log(path, 5);
  } catch (const rex::Error&) {
  }
  std::filesystem::remove(path);
  return 0;
}
