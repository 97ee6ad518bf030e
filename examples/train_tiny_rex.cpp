// train_tiny_rex: train a small ReX-MoE language model on a text file, evaluate it, sample from it.
//
// One program, three modes:
//   train (default)   --data FILE --out DIR [--config FILE.json] [--set section.key=value ...]
//                     [--steps N] [--seed S] [--resume DIR] [--sample N]
//   evaluate          --eval-only --checkpoint DIR --data FILE      (one JSON line on stdout)
//   sample            --sample N --checkpoint DIR [--prompt TEXT] [--temperature T]
// Training prints a progress line every train.log_interval steps and a validation loss every
// train.eval_interval steps, and keeps DIR current: the model folder (config.json, vocab.json,
// model.safetensors), checkpoint.safetensors (everything --resume needs), metrics.jsonl and
// routing.json. Checkpoints are written atomically; Ctrl-C finishes the step, saves and exits.
// File formats and config keys: docs/formats.md. The method: docs/method.md.
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <rex/data/dataset.hpp>
#include <rex/data/tokenizer.hpp>
#include <rex/io/checkpoint.hpp>
#include <rex/io/config.hpp>
#include <rex/optim/clip.hpp>
#include <rex/optim/schedule.hpp>
#include <rex/rex.hpp>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

const char* kUsage = R"(usage:
  train_tiny_rex --data FILE --out DIR [options]          train (or continue with --resume)
  train_tiny_rex --eval-only --checkpoint DIR --data FILE  print {"val_loss": ...} as one JSON line
  train_tiny_rex --sample N --checkpoint DIR               print N generated characters
  (the two --checkpoint modes use the saved run as it is and refuse the training options --config,
  --set, --steps, --seed, --out, --resume, --overwrite and --stop-after)

options:
  --config FILE.json    run configuration (default: the built-in tiny R4 + PSR model; keys in
                        docs/formats.md)
  --set KEY=VALUE       override one config key, e.g. --set moe.reuse=1 (repeatable)
  --data FILE           training text (any file; 90% train / 10% validation by default)
  --out DIR             where the run is written (created if missing)
  --steps N             same as --set train.steps=N
  --seed S              same as --set train.seed=S (init, batches, PSR masks)
  --device cpu|cuda     where to train (default cpu)
  --resume DIR          continue the run saved in DIR (its config; --steps/--set may change only
                        train.steps, train.eval_batches and the log/eval/checkpoint intervals;
                        bit-exact when run with the same OMP_NUM_THREADS)
  --overwrite           allow --out to name a folder that already holds a run
  --stop-after N        save and stop after N steps of this invocation, as Ctrl-C does (for
                        time-boxed sessions; --resume continues exactly)
  --eval-only           evaluate the model in --checkpoint DIR on the validation split of --data
  --checkpoint DIR      a run folder (model.safetensors, config.json, vocab.json)
  --sample N            generate N characters (after training, or from --checkpoint)
  --prompt TEXT         text the sample continues (default: a newline)
  --temperature T       sampling temperature, 0 = greedy (default 0.8)
  --help                this text
)";

struct Options {
  std::string config_path, data_path, out_dir, resume_dir, checkpoint_dir;
  std::string device = "cpu";
  std::string prompt = "\n";
  std::vector<std::string> overrides;
  std::vector<std::string> training_flags;  // given options that only training uses
  bool eval_only = false, overwrite = false;
  int64_t sample = 0;
  int64_t stop_after = -1;  // steps of this invocation before saving and stopping; -1: no limit
  double temperature = 0.8;
};

[[noreturn]] void usage_error(const std::string& message) {
  throw rex::Error(message + "\n(run train_tiny_rex --help for the options)");
}

int64_t parse_count(const std::string& flag, const std::string& text) {
  size_t used = 0;
  long long value = -1;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
  }
  if (used != text.size() || value < 0)
    usage_error(flag + " expects a whole number, got '" + text + "'");
  return value;
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf("%s", kUsage);
      std::exit(0);
    }
    if (flag == "--eval-only") {
      o.eval_only = true;
      continue;
    }
    static const std::set<std::string> kTrainingFlags = {"--config",    "--set",       "--steps",
                                                         "--seed",      "--out",       "--resume",
                                                         "--overwrite", "--stop-after"};
    if (kTrainingFlags.count(flag)) o.training_flags.push_back(flag);
    if (flag == "--overwrite") {
      o.overwrite = true;
      continue;
    }
    if (i + 1 >= argc) usage_error(flag + " needs a value");
    const std::string value = argv[++i];
    if (flag == "--config") {
      o.config_path = value;
    } else if (flag == "--data") {
      o.data_path = value;
    } else if (flag == "--out") {
      o.out_dir = value;
    } else if (flag == "--steps") {
      o.overrides.push_back("train.steps=" + std::to_string(parse_count(flag, value)));
    } else if (flag == "--seed") {
      o.overrides.push_back("train.seed=" + std::to_string(parse_count(flag, value)));
    } else if (flag == "--set") {
      o.overrides.push_back(value);
    } else if (flag == "--device") {
      o.device = value;
    } else if (flag == "--resume") {
      o.resume_dir = value;
    } else if (flag == "--checkpoint") {
      o.checkpoint_dir = value;
    } else if (flag == "--stop-after") {
      o.stop_after = parse_count(flag, value);
      if (o.stop_after == 0) usage_error("--stop-after expects at least 1 step");
    } else if (flag == "--sample") {
      o.sample = parse_count(flag, value);
    } else if (flag == "--prompt") {
      o.prompt = value;
    } else if (flag == "--temperature") {
      char* end = nullptr;
      o.temperature = std::strtod(value.c_str(), &end);
      if (*end != '\0' || !(o.temperature >= 0)) usage_error("--temperature expects a number >= 0");
    } else {
      usage_error("unknown option " + flag);
    }
  }
  if (o.device != "cpu" && o.device != "cuda") usage_error("--device must be cpu or cuda");
  return o;
}

// The device named by --device; CUDA needs a build linked with rex::cuda and a GPU.
rex::Device chosen_device(const Options& o) {
  if (o.device == "cpu") return rex::Device::cpu();
  int gpus = 0;
  try {
    gpus = rex::detail::cuda_backend().device_count();
  } catch (const rex::Error& e) {
    throw rex::Error(std::string("--device cuda: ") + e.what());
  }
  REX_CHECK(gpus > 0,
            "--device cuda: no CUDA device was found (no GPU or no driver); use --device cpu");
  std::printf("device: cuda:0, %s\n", rex::detail::cuda_backend().device_description(0).c_str());
  return rex::Device::cuda();
}

std::string format_duration(double seconds) {
  const long s = std::lround(seconds);
  char text[32];
  if (s >= 3600) {
    std::snprintf(text, sizeof text, "%ldh%02ldm", s / 3600, s / 60 % 60);
  } else {
    std::snprintf(text, sizeof text, "%ldm%02lds", s / 60, s % 60);
  }
  return text;
}

// The corpus, tokenized and split; samplers draw batches as pure functions of (seed, index).
struct Corpus {
  std::string text;
  rex::data::CharTokenizer tokenizer;
  rex::data::TokenSplit split;
};

Corpus load_corpus(const std::string& path, std::optional<rex::data::CharTokenizer> tokenizer,
                   double train_fraction) {
  if (path.empty()) usage_error("--data FILE is required");
  std::string text = rex::data::read_text_file(path);
  rex::data::CharTokenizer tok =
      tokenizer ? std::move(*tokenizer) : rex::data::CharTokenizer::from_text(text);
  std::vector<int32_t> ids;
  try {
    ids = tok.encode(text);
  } catch (const rex::Error& e) {
    throw rex::Error(path + ": " + e.what() +
                     " (the checkpoint's vocabulary was built from another corpus)");
  }
  rex::data::TokenSplit split = rex::data::split_tokens(ids, train_fraction);
  return Corpus{std::move(text), std::move(tok), std::move(split)};
}

constexpr uint64_t kValidationSeedSalt = 0x56414C4944415445ull;  // validation batches' own stream

rex::data::BatchSampler validation_sampler(const Corpus& corpus, const rex::nn::RunConfig& c) {
  return rex::data::BatchSampler(corpus.split.validation, c.train.batch_size, c.model.context,
                                 c.train.seed ^ kValidationSeedSalt, "validation");
}

// Evaluation and sampling route with the PSR mask of the last step trained.
rex::nn::RoutingStep after_steps(int64_t completed_steps, uint64_t seed) {
  return {std::max<int64_t>(completed_steps - 1, 0), seed};
}

struct Evaluation {
  double val_loss = 0;
  std::vector<std::vector<int64_t>> expert_counts;  // summed over the batches, per layer
};

// Mean cross-entropy over the same train.eval_batches validation batches every time, with the PSR
// mask of the step the model has reached.
Evaluation evaluate(const rex::nn::TransformerLM& model, const rex::data::BatchSampler& sampler,
                    int64_t batches, const rex::nn::RoutingStep& at, rex::Device device) {
  rex::NoGradGuard no_grad;
  Evaluation out;
  for (int64_t i = 0; i < batches; ++i) {
    const rex::data::Batch batch = sampler.sample(static_cast<uint64_t>(i));
    const rex::nn::LmOutput result =
        model.forward(batch.inputs.to(device), batch.targets.to(device), at);
    out.val_loss += result.lm_loss.item() / static_cast<double>(batches);
    if (out.expert_counts.empty()) out.expert_counts.resize(result.expert_counts.size());
    for (size_t l = 0; l < result.expert_counts.size(); ++l) {
      auto& total = out.expert_counts[l];
      total.resize(result.expert_counts[l].size(), 0);
      for (size_t e = 0; e < total.size(); ++e) total[e] += result.expert_counts[l][e];
    }
  }
  return out;
}

// Per layer, the share of routed slots each expert of its pool received, split into the layer's
// own experts and those borrowed from the other layers of its block.
json routing_report(const rex::nn::ModelConfig& c, const Evaluation& eval, int64_t step,
                    int64_t candidates) {
  const auto& m = c.moe;
  json layers = json::array();
  for (size_t l = 0; l < eval.expert_counts.size(); ++l) {
    const auto& counts = eval.expert_counts[l];
    double total = 0;
    for (int64_t v : counts) total += static_cast<double>(v);
    const int64_t first_own = static_cast<int64_t>(l) % m.reuse * m.experts_per_layer;
    json share = json::array(), own = json::array();
    double own_share = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      const double s = total > 0 ? static_cast<double>(counts[e]) / total : 0.0;
      share.push_back(s);
      const auto index = static_cast<int64_t>(e);
      if (index >= first_own && index < first_own + m.experts_per_layer) own_share += s;
    }
    for (int64_t e = first_own; e < first_own + m.experts_per_layer; ++e) own.push_back(e);
    layers.push_back({{"layer", l},
                      {"block", static_cast<int64_t>(l) / m.reuse},
                      {"own_experts", own},
                      {"share", share},
                      {"own_share", own_share},
                      {"borrowed_share", 1.0 - own_share}});
  }
  return {{"step", step},
          {"reuse", m.reuse},
          {"experts_per_layer", m.experts_per_layer},
          {"top_k", m.top_k},
          {"candidates", candidates},
          {"source", "validation batches of the last evaluation"},
          {"layers", layers}};
}

// Continues `prompt` by n characters, one full forward pass per character over the last
// `context` tokens (no KV cache: the model is small and sampling is short).
std::string generate(const rex::nn::TransformerLM& model, const rex::data::CharTokenizer& tok,
                     const std::string& prompt, int64_t n, double temperature, uint64_t seed,
                     const rex::nn::RoutingStep& at) {
  if (prompt.empty()) usage_error("--prompt must not be empty");
  rex::NoGradGuard no_grad;
  rex::Generator gen(seed);
  std::vector<int32_t> ids = tok.encode(prompt);
  const int64_t context = model.config().context, vocab = tok.vocab_size();
  std::vector<int32_t> produced;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(ids.size()) - context);
    std::vector<int32_t> window(ids.begin() + start, ids.end());
    const int64_t time = static_cast<int64_t>(window.size());
    const rex::Device device = model.named_parameters().front().second.device();
    const rex::Tensor logits =
        model.forward(rex::from_vector(window, {1, time}).to(device), rex::Tensor(), at)
            .logits.to(rex::Device::cpu());
    const float* row = logits.data<float>() + (time - 1) * vocab;
    int32_t next = 0;
    if (temperature == 0) {
      next = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
    } else {
      const float top = *std::max_element(row, row + vocab);
      std::vector<double> weight(static_cast<size_t>(vocab));
      double total = 0;
      for (int64_t v = 0; v < vocab; ++v)
        total += weight[v] = std::exp((row[v] - top) / temperature);
      double u = gen.uniform() * total;
      while (next + 1 < vocab && u >= weight[next]) u -= weight[next++];
    }
    ids.push_back(next);
    produced.push_back(next);
  }
  return tok.decode(produced);
}

// metrics.jsonl: one JSON object per line, appended and flushed as training goes. On resume, the
// lines past the checkpoint's step (written after it by the run that stopped) are dropped first.
class MetricsLog {
 public:
  MetricsLog(const std::string& path, std::optional<int64_t> resume_step) {
    if (resume_step && std::filesystem::exists(path)) {
      std::ifstream in(path);
      std::string line, kept;
      while (std::getline(in, line)) {
        const json j = json::parse(line, nullptr, false);
        if (!j.is_discarded() && j.value("step", int64_t{0}) <= *resume_step) kept += line + "\n";
      }
      rex::io::write_file_atomic(path, kept);
    }
    file_ = std::fopen(path.c_str(), resume_step ? "a" : "w");
    REX_CHECK(file_ != nullptr, "cannot write ", path);
  }
  ~MetricsLog() { std::fclose(file_); }
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  void write(const json& record) {
    std::fprintf(file_, "%s\n", record.dump().c_str());
    std::fflush(file_);
  }

 private:
  std::FILE* file_;
};

std::atomic<bool> g_stop_requested{false};

extern "C" void on_interrupt(int) {
  g_stop_requested = true;
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C ends the program at once
}

// The keys a resumed run may change; everything else must match the checkpoint.
const std::set<std::string> kResumableKeys = {
    "train.steps",        "train.log_interval",        "train.eval_interval",
    "train.eval_batches", "train.checkpoint_interval", "train.matmul_precision"};

rex::nn::RunConfig resumed_config(const rex::nn::RunConfig& saved, const Options& o) {
  if (!o.config_path.empty())
    usage_error("--config cannot be combined with --resume: the run's config is in its checkpoint");
  rex::nn::RunConfig config = saved;
  for (const std::string& assignment : o.overrides) rex::io::apply_override(config, assignment);
  const json before = rex::io::to_json(saved), after = rex::io::to_json(config);
  for (const auto& [section, keys] : after.items())
    for (const auto& [key, value] : keys.items())
      if (value != before[section][key] && !kResumableKeys.count(section + "." + key))
        usage_error("--resume: " + section + "." + key +
                    " cannot change in a resumed run (only train.steps, train.eval_batches, "
                    "train.matmul_precision and the intervals can)");
  return config;
}

int train(const Options& o) {
  if (o.out_dir.empty() && o.resume_dir.empty()) usage_error("--out DIR is required");
  const std::string out = o.out_dir.empty() ? o.resume_dir : o.out_dir;

  // Configuration, corpus and (when resuming) the saved state.
  std::optional<rex::io::Checkpoint> saved;
  rex::nn::RunConfig config;
  if (!o.resume_dir.empty()) {
    saved = rex::io::load_checkpoint(o.resume_dir);
    config = resumed_config(saved->config, o);
  } else {
    if (!o.config_path.empty())
      config = rex::io::parse_config(rex::io::read_file(o.config_path), o.config_path);
    for (const std::string& assignment : o.overrides) rex::io::apply_override(config, assignment);
  }
  rex::nn::validate(config);
  Corpus corpus = load_corpus(o.data_path, saved ? std::optional(saved->tokenizer) : std::nullopt,
                              config.train.train_fraction);
  REX_CHECK(
      config.model.vocab_size == 0 || config.model.vocab_size == corpus.tokenizer.vocab_size(),
      "config: model.vocab_size is ", config.model.vocab_size, " but ", o.data_path, " has ",
      corpus.tokenizer.vocab_size(), " distinct bytes; leave it at 0 to take it from the data");
  config.model.vocab_size = corpus.tokenizer.vocab_size();
  const rex::io::CheckpointInfo corpus_info{corpus.text.size(), rex::io::corpus_hash(corpus.text)};
  if (saved && (saved->info.corpus_bytes != corpus_info.corpus_bytes ||
                saved->info.corpus_hash != corpus_info.corpus_hash))
    std::fprintf(stderr, "warning: %s differs from the corpus this run was trained on\n",
                 o.data_path.c_str());
  const rex::nn::TrainConfig& t = config.train;
  const rex::data::BatchSampler train_batches(corpus.split.train, t.batch_size,
                                              config.model.context, t.seed, "train");
  const rex::data::BatchSampler val_batches = validation_sampler(corpus, config);

  std::filesystem::create_directories(out);
  const bool continuing_in_place = saved && out == o.resume_dir;
  if (!continuing_in_place && !o.overwrite &&
      std::filesystem::exists(rex::io::checkpoint_path(out)))
    usage_error(out + " already holds a run: continue it with --resume " + out +
                ", or pass --overwrite to start again");

  // The model is built (and resumed) on the host, then moved; the optimiser's moments are created
  // on the parameters' device. Checkpoints are host tensors either way, so they move freely
  // between CPU and CUDA runs.
  const rex::Device device = chosen_device(o);
  if (device.is_cuda()) rex::detail::cuda_backend().set_tf32(t.matmul_precision == "tf32");
  rex::nn::TransformerLM model(config.model, t.seed);
  if (saved) model.load_parameters(saved->model, rex::io::checkpoint_path(o.resume_dir));
  model.to(device);
  rex::optim::AdamW optimizer(rex::optim::decay_matrices(model.named_parameters()),
                              rex::optim::adamw_options(t));
  int64_t step = 0;  // completed optimizer steps
  if (saved) {
    optimizer.load_state(saved->optimizer);
    step = saved->step;
  }
  const rex::optim::CosineSchedule schedule{static_cast<float>(t.lr), t.warmup, t.steps,
                                            static_cast<float>(t.min_lr_ratio)};
  MetricsLog metrics(out + "/metrics.jsonl", saved ? std::optional<int64_t>(step) : std::nullopt);

  const int64_t tokens_per_step = t.batch_size * config.model.context;
  const bool is_moe = config.model.ffn == "moe";
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  std::printf(
      "rex train_tiny_rex: %s model, %lld layers, d_model %lld, %.2fM parameters, %d threads\n",
      is_moe ? ("MoE R" + std::to_string(config.model.moe.reuse)).c_str() : "dense",
      static_cast<long long>(config.model.n_layers), static_cast<long long>(config.model.d_model),
      static_cast<double>(model.parameter_count()) / 1e6, threads);
  std::printf(
      "corpus %s: %zu bytes, vocab %lld, train %zu / validation %zu tokens, unigram "
      "entropy %.4f nats\n",
      o.data_path.c_str(), corpus.text.size(), static_cast<long long>(config.model.vocab_size),
      corpus.split.train.size(), corpus.split.validation.size(),
      rex::data::unigram_entropy(corpus.split.validation, config.model.vocab_size));
  std::printf("%s step %lld of %lld, %lld tokens per step, writing to %s\n",
              saved ? "resuming at" : "starting at", static_cast<long long>(step),
              static_cast<long long>(t.steps), static_cast<long long>(tokens_per_step),
              out.c_str());
  std::fflush(stdout);

  auto save_all = [&] {
    rex::io::save_model_folder(out, model, config, corpus.tokenizer, step);
    rex::io::save_checkpoint(out, model, optimizer, config, corpus.tokenizer, step, corpus_info);
  };
  auto run_eval = [&](int64_t candidates) {
    const Evaluation eval =
        evaluate(model, val_batches, t.eval_batches, after_steps(step, t.seed), device);
    metrics.write({{"kind", "eval"}, {"step", step}, {"val_loss", eval.val_loss}});
    std::printf("eval  step %6lld | val_loss %.4f\n", static_cast<long long>(step), eval.val_loss);
    if (is_moe)
      rex::io::write_file_atomic(
          out + "/routing.json",
          routing_report(config.model, eval, step, candidates).dump(1) + "\n");
  };

  std::signal(SIGINT, on_interrupt);
  const int64_t first_step = step;
  const auto run_start = Clock::now();
  auto interval_start = run_start;
  int64_t interval_steps = 0;
  while (step < t.steps) {
    const float lr = schedule.lr(step);
    const rex::nn::RoutingStep at{step, t.seed};
    const rex::data::Batch batch = train_batches.sample(static_cast<uint64_t>(step));
    const rex::nn::LmOutput result =
        model.forward(batch.inputs.to(device), batch.targets.to(device), at);
    result.loss.backward();
    const double grad_norm = rex::optim::clip_grad_norm(optimizer.parameters(), t.grad_clip);
    optimizer.step(lr);
    optimizer.zero_grad();
    ++step;
    ++interval_steps;

    const bool last = step == t.steps;
    if (step % t.log_interval == 0 || last) {
      const double seconds = std::chrono::duration<double>(Clock::now() - interval_start).count();
      const double tokens_per_s = static_cast<double>(interval_steps * tokens_per_step) / seconds;
      const double eta =
          seconds / static_cast<double>(interval_steps) * static_cast<double>(t.steps - step);
      const double aux = result.aux_loss.defined() ? result.aux_loss.item() : 0.0;
      const double elapsed = std::chrono::duration<double>(Clock::now() - run_start).count();
      metrics.write({{"kind", "train"},
                     {"step", step},
                     {"loss", result.loss.item()},
                     {"lm_loss", result.lm_loss.item()},
                     {"aux_loss", aux},
                     {"lr", lr},
                     {"grad_norm", grad_norm},
                     {"tokens_per_s", tokens_per_s},
                     {"candidates", result.candidates},
                     {"elapsed_s", elapsed}});
      std::printf("step %6lld/%lld | loss %.4f (lm %.4f, aux %.4f) | lr %.2e | %6.0f tok/s",
                  static_cast<long long>(step), static_cast<long long>(t.steps), result.loss.item(),
                  result.lm_loss.item(), aux, lr, tokens_per_s);
      if (is_moe)
        std::printf(
            " | N_t %lld/%lld", static_cast<long long>(result.candidates),
            static_cast<long long>(config.model.moe.reuse * config.model.moe.experts_per_layer));
      std::printf(" | ETA %s\n", format_duration(eta).c_str());
      std::fflush(stdout);
      interval_start = Clock::now();
      interval_steps = 0;
    }
    if (step % t.eval_interval == 0 || last) run_eval(result.candidates);
    const bool stop =
        g_stop_requested || (!last && o.stop_after >= 0 && step - first_step >= o.stop_after);
    if (step % t.checkpoint_interval == 0 || last || stop) save_all();
    if (stop) {
      std::printf("%s: checkpoint saved at step %lld; continue with --resume %s\n",
                  g_stop_requested ? "interrupted" : "stopped", static_cast<long long>(step),
                  out.c_str());
      return g_stop_requested ? 130 : 0;
    }
  }
  if (saved && saved->step >= t.steps) {
    std::printf("the run in %s already has %lld of %lld steps; nothing to train\n",
                o.resume_dir.c_str(), static_cast<long long>(saved->step),
                static_cast<long long>(t.steps));
  }
  const double total = std::chrono::duration<double>(Clock::now() - run_start).count();
  std::printf("done: %lld steps in %s; model, checkpoint, metrics.jsonl%s in %s\n",
              static_cast<long long>(step), format_duration(total).c_str(),
              is_moe ? ", routing.json" : "", out.c_str());
  if (o.sample > 0) {
    std::printf("--- sample (%lld characters, temperature %.2f) ---\n%s%s\n",
                static_cast<long long>(o.sample), o.temperature, o.prompt.c_str(),
                generate(model, corpus.tokenizer, o.prompt, o.sample, o.temperature, t.seed,
                         after_steps(step, t.seed))
                    .c_str());
  }
  return 0;
}

// A model folder, rebuilt: the model with the saved weights.
struct LoadedModel {
  rex::io::ModelFolder folder;
  std::unique_ptr<rex::nn::TransformerLM> model;
};

LoadedModel load_model(const std::string& dir, rex::Device device) {
  if (dir.empty()) usage_error("--checkpoint DIR is required");
  LoadedModel out{rex::io::load_model_folder(dir), nullptr};
  rex::nn::validate(out.folder.config);
  out.model = std::make_unique<rex::nn::TransformerLM>(out.folder.config.model, 0);
  out.model->load_parameters(out.folder.parameters, rex::io::model_path(dir));
  out.model->to(device);
  return out;
}

int eval_only(const Options& o) {
  const rex::Device device = chosen_device(o);
  LoadedModel loaded = load_model(o.checkpoint_dir, device);
  const rex::nn::RunConfig& config = loaded.folder.config;
  const Corpus corpus =
      load_corpus(o.data_path, loaded.folder.tokenizer, config.train.train_fraction);
  const Evaluation eval =
      evaluate(*loaded.model, validation_sampler(corpus, config), config.train.eval_batches,
               after_steps(loaded.folder.step, config.train.seed), device);
  std::printf(
      "%s\n",
      json({{"val_loss", eval.val_loss},
            {"step", loaded.folder.step},
            {"batches", config.train.eval_batches},
            {"tokens", config.train.eval_batches * config.train.batch_size * config.model.context}})
          .dump()
          .c_str());
  return 0;
}

int sample_only(const Options& o) {
  LoadedModel loaded = load_model(o.checkpoint_dir, chosen_device(o));
  const rex::nn::RunConfig& config = loaded.folder.config;
  std::printf("%s%s\n", o.prompt.c_str(),
              generate(*loaded.model, loaded.folder.tokenizer, o.prompt, o.sample, o.temperature,
                       config.train.seed, after_steps(loaded.folder.step, config.train.seed))
                  .c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse_args(argc, argv);
    if (o.eval_only || !o.checkpoint_dir.empty()) {
      // The checkpoint modes use the run as it was saved: training options would be ignored.
      const std::string mode = o.eval_only ? "--eval-only" : "--sample with --checkpoint";
      if (!o.training_flags.empty())
        usage_error(mode + " uses the run in --checkpoint as it was saved; " +
                    o.training_flags.front() + " applies only to training");
      if (o.eval_only) return eval_only(o);
      if (o.sample == 0) usage_error("--checkpoint needs --eval-only or --sample N");
      return sample_only(o);
    }
    return train(o);
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "train_tiny_rex: error: %s\n", e.what());
    return 1;
  }
}
