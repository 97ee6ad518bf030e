// The run configuration: the model (rex/nn/config.hpp) plus the training recipe, and its JSON form.
//
// TrainConfig's fields are listed once, in for_each_field, after the model's (nn::for_each_field):
// that one table drives JSON reading and writing, `--set section.key=value` overrides, the
// unknown-key check and docs/formats.md (checked against it). A config file holds up to four
// sections, each optional, each key optional (missing keys keep their defaults):
//   {"model": {...}, "moe": {...}, "psr": {...}, "train": {...}, "data": {...}}
// Unknown sections or keys and values of the wrong JSON type are errors that name the key: a typo
// must not silently train the default model. The JSON functions know no field by name. Config text,
// and a --set value that starts as JSON does, is parsed strictly (io::parse_json): a key given
// twice, invalid UTF-8 or a number beyond double range is an error naming the file (or --set key),
// line, column and key path; validate() also refuses a model too big to train on this machine
// (rex/train/memory_estimate.hpp).
// A resumed run keeps its saved config except for the keys in kResumableKeys; an evaluation of a
// saved model, except for those in kEvaluationKeys.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "rex/core/error.hpp"
#include "rex/io/files.hpp"
#include "rex/io/json.hpp"
#include "rex/nn/config.hpp"
#include "rex/optim/adamw.hpp"
#include "rex/train/memory_estimate.hpp"

namespace rex::train {

struct TrainConfig {
  int64_t steps = 3500;
  int64_t batch_size = 12;
  int64_t grad_accum = 1;
  double lr = 3e-3;
  double min_lr_ratio = 0.1;
  int64_t warmup = 100;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;
  uint64_t seed = 1;
  double train_fraction = 0.9;
  int64_t log_interval = 25;
  int64_t eval_interval = 500;
  int64_t eval_batches = 16;
  int64_t checkpoint_interval = 500;
  int64_t keep_checkpoints = 2;
  double divergence_factor = 3.0;
  std::string matmul_precision = "fp32";
};

// What --data holds and where validation comes from (rex/train/corpus.hpp reads it).
struct DataConfig {
  std::string format = "auto";
  std::string validation;
  std::string tokenizer = "bytes";
};

inline const std::set<std::string> kDataFormats = {"auto", "text", "llmc", "nanogpt"};

// Whether a run's (resolved) data are token shards, which come without a tokenizer unless
// data.tokenizer names one.
inline bool trains_on_shards(const DataConfig& data) {
  return data.format == "llmc" || data.format == "nanogpt";
}

struct RunConfig {
  nn::ModelConfig model;
  TrainConfig train;
  DataConfig data;
};

// Calls f(section, key, field, meaning) for every field of the run configuration, in file order.
// Run is RunConfig or const RunConfig.
template <class Run, class F>
requires std::is_same_v<std::remove_const_t<Run>, RunConfig>
void for_each_field(Run& c, F&& f) {
  nn::for_each_field(c.model, f);
  auto& t = c.train;
  f("train", "steps", t.steps, "optimizer steps in the whole run");
  f("train", "batch_size", t.batch_size, "sequences per step");
  f("train", "grad_accum", t.grad_accum,
    "micro-batches each rank splits its share of a step into (same result, less memory)");
  f("train", "lr", t.lr, "peak learning rate");
  f("train", "min_lr_ratio", t.min_lr_ratio, "cosine decay ends at lr * min_lr_ratio");
  f("train", "warmup", t.warmup, "linear warmup steps");
  f("train", "weight_decay", t.weight_decay, "AdamW decoupled decay (matrices only)");
  f("train", "beta1", t.beta1, "AdamW beta1");
  f("train", "beta2", t.beta2, "AdamW beta2");
  f("train", "eps", t.eps, "AdamW epsilon");
  f("train", "grad_clip", t.grad_clip, "clip the global gradient norm to this (0 = off)");
  f("train", "seed", t.seed, "seed of the init, the batches and the PSR masks");
  f("train", "train_fraction", t.train_fraction, "leading share of the corpus used for training");
  f("train", "log_interval", t.log_interval, "steps between progress lines");
  f("train", "eval_interval", t.eval_interval, "steps between validation evaluations");
  f("train", "eval_batches", t.eval_batches, "validation batches per evaluation");
  f("train", "checkpoint_interval", t.checkpoint_interval, "steps between checkpoints");
  f("train", "keep_checkpoints", t.keep_checkpoints,
    "checkpoints kept: the newest and the keep_checkpoints - 1 before it");
  f("train", "divergence_factor", t.divergence_factor,
    "stop when the recent loss exceeds this x the run's best (0 = no limit; see below)");
  f("train", "matmul_precision", t.matmul_precision,
    "\"fp32\", \"tf32\" or \"bf16\": the matrix products' operands rounded to TF32 or bf16, "
    "sums in fp32, on either device (docs/formats.md)");
  f("data", "format", c.data.format,
    "what --data holds: \"text\", \"llmc\" or \"nanogpt\" token shards, or \"auto\" (see below)");
  f("data", "validation", c.data.validation,
    "validation shards (a file, folder or glob); \"\" = see below");
  f("data", "tokenizer", c.data.tokenizer,
    "\"bytes\" (a token per byte of a text) or the path of a byte-level BPE tokenizer.json");
}

// Throws rex::Error naming the first impossible setting of the model or the training recipe,
// including a model too big for `memory_limit_bytes` (0: not checked; default: this machine's).
inline void validate(const RunConfig& c, double memory_limit_bytes = physical_memory_bytes()) {
  nn::validate(c.model);
  const TrainConfig& t = c.train;
  auto check_train_field = [](const char* section, const char* key, const auto& field,
                              const char*) {
    if (std::string_view(section) != "model" && std::string_view(section) != "moe" &&
        std::string_view(section) != "psr")  // nn::validate checked the model's
      detail::check_storable(std::string(section) + "." + key, field);
  };
  train::for_each_field(c, check_train_field);
  auto positive = [](const char* key, double value) {
    REX_CHECK(value > 0, "config: ", key, " must be positive, got ", value);
  };
  positive("train.steps", t.steps);
  positive("train.batch_size", t.batch_size);
  positive("train.grad_accum", t.grad_accum);
  REX_CHECK(t.batch_size % t.grad_accum == 0, "config: train.batch_size (", t.batch_size,
            ") must be a multiple of train.grad_accum (", t.grad_accum, ")");
  positive("train.lr", t.lr);
  REX_CHECK(t.min_lr_ratio >= 0 && t.min_lr_ratio <= 1,
            "config: train.min_lr_ratio must be in [0, 1]");
  REX_CHECK(t.warmup >= 0 && t.warmup <= t.steps,
            "config: train.warmup must be in [0, train.steps]");
  REX_CHECK(t.weight_decay >= 0, "config: train.weight_decay cannot be negative");
  REX_CHECK(t.beta1 >= 0 && t.beta1 < 1 && t.beta2 >= 0 && t.beta2 < 1,
            "config: train.beta1 and train.beta2 must be in [0, 1)");
  positive("train.eps", t.eps);
  positive("train.eps (as float)", static_cast<float>(t.eps));
  REX_CHECK(t.grad_clip >= 0, "config: train.grad_clip cannot be negative (0 turns clipping off)");
  REX_CHECK(t.train_fraction > 0 && t.train_fraction < 1,
            "config: train.train_fraction must be in (0, 1)");
  positive("train.log_interval", t.log_interval);
  positive("train.eval_interval", t.eval_interval);
  positive("train.eval_batches", t.eval_batches);
  positive("train.checkpoint_interval", t.checkpoint_interval);
  positive("train.keep_checkpoints", t.keep_checkpoints);
  REX_CHECK(t.divergence_factor == 0 || t.divergence_factor > 1,
            "config: train.divergence_factor must be 0 (no limit) or above 1, got ",
            t.divergence_factor);
  REX_CHECK(
      t.matmul_precision == "fp32" || t.matmul_precision == "tf32" || t.matmul_precision == "bf16",
      "config: train.matmul_precision must be \"fp32\", \"tf32\" or \"bf16\", got \"",
      t.matmul_precision, "\"");
  REX_CHECK(kDataFormats.count(c.data.format), "config: data.format must be \"auto\", \"text\", ",
            "\"llmc\" or \"nanogpt\", got \"", c.data.format, "\"");
  REX_CHECK(c.data.validation.empty() || c.data.format != "text",
            "config: data.validation names validation shards, but data.format is \"text\" (a text ",
            "corpus validates on its tail, train.train_fraction)");
  REX_CHECK(!c.data.tokenizer.empty(), "config: data.tokenizer must be \"bytes\" or the path of ",
            "a tokenizer.json, got \"\"");
  // One micro-batch's activations.
  check_fits_in_memory(c.model, t.batch_size / t.grad_accum, memory_limit_bytes);
}

// The AdamW hyperparameters of the recipe.
inline optim::AdamWOptions adamw_options(const TrainConfig& t) {
  return {static_cast<float>(t.beta1), static_cast<float>(t.beta2), static_cast<float>(t.eps),
          static_cast<float>(t.weight_decay)};
}

}  // namespace rex::train

namespace rex::detail {

// Assigns a JSON value to a config field of type T, or throws naming `key`.
template <class T>
void read_field(const nlohmann::json& j, const std::string& key, T& field) {
  if constexpr (std::is_same_v<T, bool>) {
    REX_CHECK(j.is_boolean(), "config: ", key, " must be true or false, got ", io::json_text(j));
    field = j.get<bool>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    REX_CHECK(j.is_string(), "config: ", key, " must be a string, got ", io::json_text(j));
    check_storable(key, j.get<std::string>());
    field = j.get<std::string>();
  } else if constexpr (std::is_integral_v<T>) {
    // 2.0 is accepted as 2; 2.5 is not; values outside T's range are errors, not wrapped.
    using Limits = std::numeric_limits<T>;
    REX_CHECK(j.is_number() && std::floor(j.get<double>()) == j.get<double>(), "config: ", key,
              " must be an integer, got ", io::json_text(j));
    REX_CHECK(Limits::is_signed || j.get<double>() >= 0, "config: ", key,
              " cannot be negative, got ", io::json_text(j));
    if (j.is_number_unsigned()) {
      REX_CHECK(j.get<uint64_t>() <= static_cast<uint64_t>(Limits::max()), "config: ", key,
                " is too large, got ", io::json_text(j));
      field = static_cast<T>(j.get<uint64_t>());
    } else if (j.is_number_integer()) {
      field = static_cast<T>(j.get<int64_t>());
    } else {
      const double v = j.get<double>(), bound = std::ldexp(1.0, Limits::digits);  // 2^63 or 2^64
      REX_CHECK(v < bound && v >= (Limits::is_signed ? -bound : 0.0), "config: ", key,
                " is out of range, got ", io::json_text(j));
      field = static_cast<T>(v);
    }
  } else {
    REX_CHECK(j.is_number(), "config: ", key, " must be a number, got ", io::json_text(j));
    field = j.get<T>();
  }
}

// Whether a --set value is meant as JSON: it starts as a JSON number, string, array or object does
// (-, a digit, ", [ or {), or it is true, false or null. Any other text is a plain string.
inline bool reads_as_json(std::string_view value) {
  constexpr std::string_view kSpace = " \t\n\r";
  const size_t begin = value.find_first_not_of(kSpace);
  if (begin == std::string_view::npos) return false;
  const std::string_view word = value.substr(begin, value.find_last_not_of(kSpace) + 1 - begin);
  return std::string_view("-0123456789\"[{").find(word.front()) != std::string_view::npos ||
         word == "true" || word == "false" || word == "null";
}

}  // namespace rex::detail

namespace rex::train {

// Applies the keys present in `j` on top of `config`.
inline void apply_json(RunConfig& config, const nlohmann::json& j) {
  REX_CHECK(j.is_object(), "config: the top level must be a JSON object, got ", j.type_name());
  std::set<std::string> known_sections, seen;
  train::for_each_field(
      config, [&](const char* section, const char* key, auto& field, const char*) {
        known_sections.insert(section);
        if (!j.contains(section)) return;
        const nlohmann::json& part = j.at(section);
        REX_CHECK(part.is_object(), "config: section \"", section, "\" must be an object, got ",
                  part.type_name());
        if (!part.contains(key)) return;
        seen.insert(std::string(section) + "." + key);
        rex::detail::read_field(part.at(key), std::string(section) + "." + key, field);
      });
  for (const auto& [section, part] : j.items()) {
    REX_CHECK(known_sections.count(section), "config: unknown section \"", section,
              "\" (known: model, moe, psr, train, data)");
    for (const auto& item : part.items()) {
      const std::string name = section + "." + item.key();
      REX_CHECK(seen.count(name), "config: unknown key \"", name,
                "\" (docs/formats.md lists every key)");
    }
  }
}

inline nlohmann::json to_json(const RunConfig& config) {
  nlohmann::json j = nlohmann::json::object();
  train::for_each_field(config, [&](const char* section, const char* key, const auto& field,
                                    const char*) { j[section][key] = field; });
  return j;
}

inline RunConfig config_from_json(const nlohmann::json& j) {
  RunConfig config;
  apply_json(config, j);
  return config;
}

// Parses JSON text; `what` names the source (a path) in errors.
inline RunConfig parse_config(const std::string& text, const std::string& what) {
  const nlohmann::json j = io::parse_json(text, what);
  try {
    return config_from_json(j);
  } catch (const Error& e) {
    throw Error(std::string(e.what()) + " (in " + what + ")");
  }
}

// Applies one `section.key=value` override. A value that starts as JSON does
// (detail::reads_as_json: numbers, true/false, quoted strings, arrays, objects) is parsed strictly
// as JSON, its errors naming "--set section.key" and the column; any other value is a plain string,
// so both `psr.schedule=stepwise` and `train.lr=1e-3` work.
inline void apply_override(RunConfig& config, const std::string& assignment) {
  const size_t eq = assignment.find('=');
  const size_t dot = assignment.find('.');
  REX_CHECK(eq != std::string::npos && dot != std::string::npos && dot < eq,
            "--set expects section.key=value (e.g. moe.top_k=2), got \"", assignment, "\"");
  const std::string section = assignment.substr(0, dot);
  const std::string key = assignment.substr(dot + 1, eq - dot - 1);
  const std::string text = assignment.substr(eq + 1);
  REX_CHECK(detail::is_valid_utf8(assignment.substr(0, eq)), "--set: the key is not valid UTF-8");
  REX_CHECK(detail::is_valid_utf8(text), "--set ", section, ".", key,
            ": the value is not valid UTF-8 text");
  const nlohmann::json value = detail::reads_as_json(text)
                                   ? io::parse_json(text, "--set " + section + "." + key)
                                   : nlohmann::json(text);
  nlohmann::json patch;
  patch[section][key] = value;
  apply_json(config, patch);
}

// The config of a new run: the defaults, then the file at `path` (none if empty), then the
// `overrides` (section.key=value), validated (the memory against `memory_limit_bytes`, as
// validate()).
inline RunConfig read_run_config(const std::string& path, const std::vector<std::string>& overrides,
                                 double memory_limit_bytes = physical_memory_bytes()) {
  RunConfig config;
  if (!path.empty()) config = parse_config(io::read_file(path, io::kMaxJsonFileBytes), path);
  for (const std::string& assignment : overrides) apply_override(config, assignment);
  validate(config, memory_limit_bytes);
  return config;
}

// The keys a resumed run may change; everything else must match the checkpoint.
inline const std::set<std::string> kResumableKeys = {"train.steps",
                                                     "train.grad_accum",
                                                     "train.log_interval",
                                                     "train.eval_interval",
                                                     "train.eval_batches",
                                                     "train.checkpoint_interval",
                                                     "train.matmul_precision",
                                                     "train.keep_checkpoints",
                                                     "train.divergence_factor"};

// The first key, as "section.key", whose value differs between `before` and `after` and that is
// not in `changeable`; "" when there is none.
inline std::string first_change_outside(const RunConfig& before, const RunConfig& after,
                                        const std::set<std::string>& changeable) {
  const nlohmann::json old_values = to_json(before), new_values = to_json(after);
  for (const auto& [section, keys] : new_values.items())
    for (const auto& [key, value] : keys.items())
      if (value != old_values.at(section).at(key) && !changeable.count(section + "." + key))
        return section + "." + key;
  return "";
}

// What resumed_config throws when an override changes any other key.
struct NotResumable : Error {
  using Error::Error;
};

// The saved config with `overrides` (section.key=value) applied, validated; NotResumable names the
// first changed key that a resumed run must keep.
inline RunConfig resumed_config(const RunConfig& saved, const std::vector<std::string>& overrides) {
  RunConfig config = saved;
  for (const std::string& assignment : overrides) apply_override(config, assignment);
  if (const std::string key = first_change_outside(saved, config, kResumableKeys); !key.empty())
    throw NotResumable("--resume: " + key +
                       " cannot change in a resumed run (only train.steps, train.grad_accum, "
                       "train.eval_batches, train.matmul_precision, train.keep_checkpoints, "
                       "train.divergence_factor and the intervals can)");
  validate(config);
  return config;
}

// The keys that a saved model's evaluation or sampling (train_tiny_rex --eval-only or --sample
// with --checkpoint) may change: how many validation batches are evaluated, and the GEMM precision
// they are computed with. Every other key would change the model, or what it was trained and is
// validated on (train.seed also fixes the PSR masks and the validation batches, train.batch_size
// the batches, train.train_fraction the validation text), or has no effect outside training.
inline const std::set<std::string> kEvaluationKeys = {"train.eval_batches",
                                                      "train.matmul_precision"};

// What evaluation_config throws when an override changes any other key.
struct NotAnEvaluationKey : Error {
  using Error::Error;
};

// The saved config with `overrides` applied, validated; NotAnEvaluationKey names the first changed
// key outside kEvaluationKeys.
inline RunConfig evaluation_config(const RunConfig& saved,
                                   const std::vector<std::string>& overrides) {
  RunConfig config = saved;
  for (const std::string& assignment : overrides) apply_override(config, assignment);
  if (const std::string key = first_change_outside(saved, config, kEvaluationKeys); !key.empty())
    throw NotAnEvaluationKey("--set " + key + " would change the saved " +
                             (key.starts_with("train.") ? "run" : "model") +
                             "; only train.eval_batches and train.matmul_precision may be set");
  validate(config);
  return config;
}

}  // namespace rex::train
