// Unit cases for the bugs the fuzz targets (tests/fuzz/fuzz_*.cpp) found, one each, so that they
// stay fixed without a fuzzer: the input that broke the reader, now refused or handled cleanly.
#include <doctest/doctest.h>

#include <string>

#include <rex/io/files.hpp>
#include <rex/train/checkpoint.hpp>
#include <rex/train/config.hpp>
#include <rex/train/metrics.hpp>

#include "testing.hpp"

using namespace rex;
using rex::testing::error_message;

TEST_CASE("fuzz finding: a --set value that is not UTF-8 is a clear error, not a JSON exception") {
  // fuzz_config: the value became a JSON string, and dumping it into the "must be an integer"
  // message threw nlohmann's type_error instead of a rex::Error.
  train::RunConfig config;
  const std::string msg =
      error_message([&] { train::apply_override(config, "model.d_model=\xB2steps"); });
  CHECK(msg == "--set model.d_model: the value is not valid UTF-8 text");
  CHECK(error_message([&] { train::apply_override(config, "train.seed=\xC3"); }).find("UTF-8") !=
        std::string::npos);
  train::apply_override(config, "model.d_model=32");  // ordinary values are unaffected
  CHECK(config.model.d_model == 32);
}

TEST_CASE("fuzz finding: metrics.jsonl lines that are not records are dropped on resume") {
  // fuzz_metrics: a line holding JSON other than an object ([1], 7, "x") or a "step" that is not
  // an integer made the resume throw nlohmann's type_error. An object without a "step" is not a
  // record either: every record rex writes has one.
  testing::TempDir dir("metrics_not_records");
  const std::string path = dir.file("metrics.jsonl");
  io::write_file_atomic(
      path,
      "{\"kind\":\"train\",\"step\":2}\n[1]\n7\n\"x\"\n{\"step\":\"3\"}\n"
      "{\"step\":1.5}\nnot json\n{\"kind\":\"note\"}\n{\"kind\":\"eval\",\"step\":9}\n");
  { train::MetricsLog log(path, 5); }
  CHECK(io::read_file(path) == "{\"kind\":\"train\",\"step\":2}\n");
}

TEST_CASE("fuzz finding: a number too large for a double is invalid JSON, not an exception") {
  // fuzz_config: the parser reports such a number as out_of_range, which parse_config did not
  // catch (it caught parse errors only); load_model_folder's vocab.json reader had the same gap.
  CHECK(error_message([] { train::parse_config("222E2222", "huge.json"); }) ==
        "huge.json:1:1: number overflow parsing '222E2222'");
  testing::TempDir dir("huge_number");
  io::write_file_atomic(dir.file("vocab.json"), "{\"vocabulary\": [1e999]}");
  CHECK(error_message([&] { detail::parse_json_file(dir.file("vocab.json")); }) ==
        dir.file("vocab.json") + ":1:17: vocabulary[0]: number overflow parsing '1e999'");
}
