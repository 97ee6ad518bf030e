// What a run writes to disk, and reading it back.
//
// A model folder (what --checkpoint DIR and the PyTorch twin read) holds three files:
//   config.json         the full run configuration (rex/train/config.hpp), vocab_size filled in
//   vocab.json          the byte tokenizer (rex/data/tokenizer.hpp), with data.tokenizer "bytes";
//                       none for a model trained on token shards (data.format llmc or nanogpt)
//   tokenizer.json      instead, a BPE tokenizer (rex/data/bpe.hpp), when data.tokenizer names one:
//                       a copy, so the folder does not depend on the file it came from
//   model.safetensors   every parameter under its module-tree name, f32, plus metadata
//                       {"format": "rex-model", "step": "<completed steps>",
//                        "config": "<config.json's content, compact>"}
//                       load_model_folder refuses a config.json that no longer matches it
//                       (folders written before it was recorded load as they are)
// The training checkpoint is one file, checkpoint.safetensors, so that a single atomic rename makes
// it either wholly the old state or wholly the new one:
//   model.<name>                 every parameter
//   optim.<name>.exp_avg | .exp_avg_sq | .step   AdamW state (rex/optim/adamw.hpp)
//   metadata: format "rex-checkpoint", step (completed steps), config and vocab or tokenizer
//             (JSON text of vocab.json or tokenizer.json; neither for shards without a tokenizer),
//             corpus_bytes and corpus_hash (to warn when a resume reads another corpus)
// Both files carry a CRC-32C of every tensor (rex/io/safetensors.hpp, with_checksums), which the
// reader checks, and a run clears the temporary files of killed writers from its folder
// (io::remove_stale_temp_files) when it starts or resumes and when it writes its model folder.
// One run writes a folder at a time: a RunSaver holds the folder's lock (rex/io/folder_lock.hpp),
// taken before anything in it is written, so a second writer is refused naming the first.
// Nothing else is needed to resume exactly: batches and PSR masks are pure functions of
// (seed, step), so the random state is the seed (in the config) and the step.
// Kept checkpoints: before checkpoint.safetensors is replaced, the one it holds is kept as
// checkpoint-<step>.safetensors (a hard link: nothing is copied), and only the newest
// train.keep_checkpoints - 1 of those stay, so that one bad save never leaves a run without its
// previous state. --resume DIR reads checkpoint.safetensors, the newest (a run that diverged
// writes none, DivergenceGuard in rex/train/step.hpp); when that one is refused, the message lists
// the kept ones, and copying one over checkpoint.safetensors goes back to it.
// load_model rebuilds the model of a model folder, weights included; start_training builds the
// model and optimiser of a new run or of a resumed one.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "rex/data/tokenizer.hpp"
#include "rex/io/files.hpp"
#include "rex/io/folder_lock.hpp"
#include "rex/io/safetensors.hpp"
#include "rex/nn/module.hpp"
#include "rex/nn/transformer.hpp"
#include "rex/optim/adamw.hpp"
#include "rex/train/config.hpp"
#include "rex/train/step.hpp"

namespace rex::detail {

inline nlohmann::json parse_json_file(const std::string& path) {
  return io::parse_json(io::read_file(path, io::kMaxJsonFileBytes), path);
}

inline int64_t parse_step(const io::Metadata& metadata, const std::string& what) {
  auto it = metadata.find("step");
  REX_CHECK(it != metadata.end(), what, ": metadata has no \"step\"");
  const std::string& text = it->second;
  const bool is_count =
      !text.empty() && text.size() <= 18 &&
      std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
  REX_CHECK(is_count, what, ": metadata \"step\" is not a step count: \"", text, "\"");
  return std::stoll(text);
}

// The first key, as "section.key (a's value vs b's)", whose value differs between two configs'
// to_json (which always have the same keys); "" when they are equal.
inline std::string first_config_difference(const nlohmann::json& a, const nlohmann::json& b) {
  for (const auto& [section, keys] : a.items())
    for (const auto& [key, value] : keys.items())
      if (b.at(section).at(key) != value)
        return section + "." + key + " (" + value.dump() + " vs " + b.at(section).at(key).dump() +
               ")";
  return "";
}

inline void check_format(const io::Metadata& metadata, const std::string& want,
                         const std::string& what) {
  auto it = metadata.find("format");
  REX_CHECK(it != metadata.end() && it->second == want, what, ": not a ", want,
            " file (metadata \"format\" is ",
            it == metadata.end() ? std::string("missing") : "\"" + it->second + "\"", ")");
}

}  // namespace rex::detail

namespace rex::train {

inline std::string model_path(const std::string& dir) { return dir + "/model.safetensors"; }
inline std::string checkpoint_path(const std::string& dir) {
  return dir + "/checkpoint.safetensors";
}

inline io::TensorMap parameter_map(const nn::Module& model, const std::string& prefix = "") {
  io::TensorMap out;
  for (const auto& [name, p] : model.named_parameters())
    out[prefix + name] = p.to(Device::cpu()).detach();
  return out;
}

// 64-bit FNV-1a of the corpus bytes: a cheap fingerprint, not a security measure.
inline uint64_t corpus_hash(std::string_view bytes) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : bytes) h = (h ^ c) * 0x100000001B3ull;
  return h;
}

inline void save_config(const std::string& dir, const RunConfig& config) {
  io::write_file_atomic(dir + "/config.json", to_json(config).dump(2) + "\n");
}

inline void save_model_folder(const std::string& dir, const nn::Module& model,
                              const RunConfig& config,
                              const std::optional<data::Tokenizer>& tokenizer, int64_t step) {
  io::remove_stale_temp_files(dir);
  save_config(dir, config);
  // The tokenizer's file; the other one (a replaced run's) goes.
  const bool bpe = tokenizer && tokenizer->bpe(), chars = tokenizer && tokenizer->chars();
  if (!bpe) std::filesystem::remove(dir + "/tokenizer.json");
  if (!chars) std::filesystem::remove(dir + "/vocab.json");
  if (bpe) tokenizer->bpe()->save(dir + "/tokenizer.json");
  if (chars)
    io::write_file_atomic(dir + "/vocab.json", tokenizer->chars()->to_json().dump() + "\n");
  const io::TensorMap parameters = parameter_map(model);
  io::save_safetensors(model_path(dir), parameters,
                       io::with_checksums(parameters, {{"format", "rex-model"},
                                                       {"step", std::to_string(step)},
                                                       {"config", to_json(config).dump()}}));
}

// The tokenizer of a saved run: for data.tokenizer "bytes", none for token shards, else
// read_vocab() (vocab.json's content); else read_bpe() (its tokenizer.json).
template <class ReadVocab, class ReadBpe>
std::optional<data::Tokenizer> saved_tokenizer(const RunConfig& config, ReadVocab read_vocab,
                                               ReadBpe read_bpe) {
  if (config.data.tokenizer != "bytes") return read_bpe();
  if (trains_on_shards(config.data)) return std::nullopt;
  return data::CharTokenizer::from_json(read_vocab());
}

// Whether config.json's model.vocab_size fits `tokenizer`: equal for bytes, at least its size for
// BPE (shards may be made for a padded vocabulary, as llm.c's GPT-2 50304).
inline bool vocab_fits(int64_t vocab_size, const std::optional<data::Tokenizer>& tokenizer) {
  if (!tokenizer) return true;
  return tokenizer->bpe() ? vocab_size >= tokenizer->vocab_size()
                          : vocab_size == tokenizer->vocab_size();
}

struct ModelFolder {
  RunConfig config;
  std::optional<data::Tokenizer> tokenizer;
  io::TensorMap parameters;
  int64_t step = 0;
};

inline ModelFolder load_model_folder(const std::string& dir) {
  REX_CHECK(std::filesystem::is_directory(dir), "checkpoint folder ", dir, " does not exist");
  ModelFolder out{parse_config(io::read_file(dir + "/config.json", io::kMaxJsonFileBytes),
                               dir + "/config.json"),
                  std::nullopt,
                  {},
                  0};
  out.tokenizer = saved_tokenizer(
      out.config, [&] { return detail::parse_json_file(dir + "/vocab.json"); },
      [&] { return data::BpeTokenizer::load(dir + "/tokenizer.json"); });
  io::SafetensorsContents contents = io::load_safetensors(model_path(dir));
  detail::check_format(contents.metadata, "rex-model", model_path(dir));
  out.step = detail::parse_step(contents.metadata, model_path(dir));
  if (auto recorded = contents.metadata.find("config"); recorded != contents.metadata.end()) {
    const std::string difference = detail::first_config_difference(
        to_json(out.config),
        to_json(parse_config(recorded->second, model_path(dir) + " (metadata \"config\")")));
    REX_CHECK(difference.empty(), dir,
              ": config.json does not match the config recorded in model.safetensors (first "
              "difference: ",
              difference, "): config.json was edited after the model was saved");
  }
  out.parameters = std::move(contents.tensors);
  REX_CHECK(vocab_fits(out.config.model.vocab_size, out.tokenizer), dir,
            ": config.json says vocab_size ", out.config.model.vocab_size, " but ",
            out.tokenizer && out.tokenizer->bpe() ? "tokenizer.json" : "vocab.json", " has ",
            out.tokenizer ? out.tokenizer->vocab_size() : 0, " tokens");
  return out;
}

struct CheckpointInfo {
  uint64_t corpus_bytes = 0;
  uint64_t corpus_hash = 0;
  friend bool operator==(const CheckpointInfo&, const CheckpointInfo&) = default;
};

inline void save_checkpoint(const std::string& dir, const nn::Module& model,
                            const optim::AdamW& optimizer, const RunConfig& config,
                            const std::optional<data::Tokenizer>& tokenizer, int64_t step,
                            const CheckpointInfo& info) {
  io::TensorMap tensors = parameter_map(model, "model.");
  for (const auto& [name, t] : optimizer.state()) tensors["optim." + name] = t;
  std::map<std::string, std::string> metadata = {
      {"format", "rex-checkpoint"},
      {"step", std::to_string(step)},
      {"config", to_json(config).dump()},
      {"corpus_bytes", std::to_string(info.corpus_bytes)},
      {"corpus_hash", std::to_string(info.corpus_hash)}};
  if (tokenizer && tokenizer->bpe())
    metadata["tokenizer"] = tokenizer->bpe()->to_json().dump();
  else if (tokenizer)
    metadata["vocab"] = tokenizer->chars()->to_json().dump();
  io::save_safetensors(checkpoint_path(dir), tensors, io::with_checksums(tensors, metadata));
}

// The checkpoint and the model folder of a run at `step`: everything --resume and --checkpoint
// read. The checkpoint comes first, so that a write that fails (a full disk) leaves the folder as
// it was, and a folder is never ahead of its checkpoint.
inline void save_run(const std::string& dir, const nn::Module& model, const optim::AdamW& optimizer,
                     const RunConfig& config, const std::optional<data::Tokenizer>& tokenizer,
                     int64_t step, const CheckpointInfo& info) {
  save_checkpoint(dir, model, optimizer, config, tokenizer, step, info);
  save_model_folder(dir, model, config, tokenizer, step);
}

inline std::string kept_checkpoint_path(const std::string& dir, int64_t step) {
  return dir + "/checkpoint-" + std::to_string(step) + ".safetensors";
}

// The kept checkpoints in `dir`, step -> path, oldest first.
inline std::map<int64_t, std::string> kept_checkpoints(const std::string& dir) {
  std::map<int64_t, std::string> out;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    const std::string name = entry.path().filename().string();
    const std::string prefix = "checkpoint-", suffix = ".safetensors";
    if (name.size() <= prefix.size() + suffix.size() || name.rfind(prefix, 0) != 0 ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    const std::string digits =
        name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
    if (digits.size() <= 18 &&
        std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
      out[std::stoll(digits)] = entry.path().string();
  }
  return out;
}

// Writes the run folder of one training invocation, whose lock it holds: save_run plus the kept
// checkpoints.
class RunSaver {
 public:
  // resumed_step: the step of the folder's checkpoint.safetensors when this invocation continues
  // it; nullopt for a new run (the kept checkpoints of an earlier run in the folder are removed at
  // its first save). Kept checkpoints past resumed_step belong to a history the resume abandoned
  // and go too.
  RunSaver(io::RunFolderLock lock, int64_t keep, std::optional<int64_t> resumed_step)
      : lock_(std::move(lock)), dir_(lock_.folder()), keep_(keep), newest_(resumed_step) {}

  void save(const nn::Module& model, const optim::AdamW& optimizer, const RunConfig& config,
            const std::optional<data::Tokenizer>& tokenizer, int64_t step,
            const CheckpointInfo& info) {
    const int64_t abandoned_after = newest_.value_or(-1);
    for (const auto& [kept_step, path] : kept_checkpoints(dir_))
      if (kept_step > abandoned_after) std::filesystem::remove(path);
    if (newest_ && keep_ > 1 && *newest_ != step) keep_newest(*newest_);
    save_run(dir_, model, optimizer, config, tokenizer, step, info);
    newest_ = step;
    std::map<int64_t, std::string> kept = kept_checkpoints(dir_);
    while (static_cast<int64_t>(kept.size()) > keep_ - 1) {
      std::filesystem::remove(kept.begin()->second);
      kept.erase(kept.begin());
    }
  }

  // The step of checkpoint.safetensors, when this invocation wrote it or resumed from it.
  std::optional<int64_t> newest() const { return newest_; }

 private:
  // Keeps checkpoint.safetensors (at `step`) under its kept name.
  void keep_newest(int64_t step) const {
    const std::string from = checkpoint_path(dir_), to = kept_checkpoint_path(dir_, step);
    std::error_code error;
    std::filesystem::remove(to);
    std::filesystem::create_hard_link(from, to, error);
    if (error) std::filesystem::copy_file(from, to);
  }

  io::RunFolderLock lock_;
  std::string dir_;
  int64_t keep_;
  std::optional<int64_t> newest_;
};

// Creates the run folder `out` if it is missing and locks it for this process (io::RunFolderLock):
// a second writer is refused, naming this one.
inline io::RunFolderLock lock_run_folder(const std::string& out) {
  std::filesystem::create_directories(out);
  return io::RunFolderLock(out);
}

// Prepares the locked run folder (lock_run_folder): removes the temporary files of dead writers,
// refuses a folder that holds another run unless `overwrite`, and writes a new run's config.json
// before the first step, so a config that cannot be saved fails at once. resumed_step: the step of
// the checkpoint resumed from the folder itself.
inline RunSaver prepare_run_folder(io::RunFolderLock lock, const RunConfig& config, int64_t keep,
                                   std::optional<int64_t> resumed_step, bool overwrite) {
  const std::string out = lock.folder();
  io::remove_stale_temp_files(out);  // left by writers that were killed mid-write
  REX_CHECK(resumed_step || overwrite || !std::filesystem::exists(checkpoint_path(out)), out,
            " already holds a run: continue it with --resume ", out,
            ", or pass --overwrite to start again");
  // A run resumed in place keeps the config.json that matches its model.safetensors until its
  // next save.
  if (!resumed_step) save_config(out, config);
  return RunSaver(std::move(lock), keep, resumed_step);
}

struct Checkpoint {
  RunConfig config;
  std::optional<data::Tokenizer> tokenizer;
  io::TensorMap model;      // parameter name -> value
  io::TensorMap optimizer;  // AdamW state names -> value
  int64_t step = 0;
  CheckpointInfo info;
  std::string path;  // the file it was read from (for messages)
};

inline Checkpoint load_checkpoint(const std::string& dir) {
  const std::string path = checkpoint_path(dir);
  io::SafetensorsContents contents = io::load_safetensors(path);
  detail::check_format(contents.metadata, "rex-checkpoint", path);
  auto field = [&](const char* key) -> const std::string& {
    auto it = contents.metadata.find(key);
    REX_CHECK(it != contents.metadata.end(), path, ": metadata has no \"", key, "\"");
    return it->second;
  };
  Checkpoint out{parse_config(field("config"), path + " (metadata \"config\")"),
                 std::nullopt,
                 {},
                 {},
                 detail::parse_step(contents.metadata, path),
                 {},
                 path};
  out.tokenizer = saved_tokenizer(
      out.config, [&] { return io::parse_json(field("vocab"), path + " (metadata \"vocab\")"); },
      [&] {
        const std::string where = path + " (metadata \"tokenizer\")";
        return data::BpeTokenizer::from_json(io::parse_json(field("tokenizer"), where), where);
      });
  try {
    out.info.corpus_bytes = std::stoull(field("corpus_bytes"));
    out.info.corpus_hash = std::stoull(field("corpus_hash"));
  } catch (const std::logic_error&) {
    throw Error(path + ": metadata corpus_bytes / corpus_hash are not numbers");
  }
  for (auto& [name, t] : contents.tensors) {
    if (name.rfind("model.", 0) == 0) {
      out.model[name.substr(6)] = t;
    } else if (name.rfind("optim.", 0) == 0) {
      out.optimizer[name.substr(6)] = t;
    } else {
      throw Error(path + ": unexpected tensor \"" + name + "\" (expected model.* and optim.*)");
    }
  }
  return out;
}

// The checkpoint a run folder resumes from: checkpoint.safetensors, the newest. A refused one
// names the kept earlier checkpoints to go back to.
inline Checkpoint load_resume_checkpoint(const std::string& dir) {
  try {
    return load_checkpoint(dir);
  } catch (const Error& e) {
    std::string kept;
    for (const auto& [step, path] : kept_checkpoints(dir))
      kept = path + " (step " + std::to_string(step) + ")" + (kept.empty() ? "" : ", ") + kept;
    if (kept.empty()) throw;
    throw Error(std::string(e.what()) + "\nearlier checkpoints are kept: " + kept +
                "; to go back to one, copy it over " + checkpoint_path(dir));
  }
}

// A model folder, rebuilt: the model with the saved weights, on `device`.
struct LoadedModel {
  ModelFolder folder;
  std::unique_ptr<nn::TransformerLM> model;
};

inline LoadedModel load_model(const std::string& dir, Device device) {
  LoadedModel out{load_model_folder(dir), nullptr};
  validate(out.folder.config);
  out.model = std::make_unique<nn::TransformerLM>(out.folder.config.model, 0);
  out.model->load_parameters(out.folder.parameters, model_path(dir));
  out.model->to(device);
  return out;
}

// What a training loop updates: the model and its optimiser after `step` completed steps.
struct TrainingState {
  std::unique_ptr<nn::TransformerLM> model;
  optim::AdamW optimizer;
  int64_t step = 0;
};

// A new run (the model initialised from train.seed) or, given `resume`, the run saved in it. The
// model is built (and resumed) on the host, then moved to `device`; the optimiser's moments are
// created on the parameters' device. Checkpoints are host tensors either way, so they move freely
// between CPU and CUDA runs.
inline TrainingState start_training(const RunConfig& config, Device device,
                                    const Checkpoint* resume = nullptr) {
  auto model = std::make_unique<nn::TransformerLM>(config.model, config.train.seed);
  if (resume) model->load_parameters(resume->model, resume->path);
  model->to(device);
  optim::AdamW optimizer = make_optimizer(*model, config.train);
  TrainingState state{std::move(model), std::move(optimizer), 0};
  if (resume) {
    state.optimizer.load_state(resume->optimizer);
    state.step = resume->step;
  }
  return state;
}

}  // namespace rex::train
