// train_tiny_rex: train a small ReX-MoE language model on text or token shards, evaluate it, sample
// from it (three modes; kUsage below). The work is the training library (rex/train/); this file is
// the command line, the resume policy and the loop (its reports: train::RunReports). A run keeps
// DIR current: the model folder (config.json, its tokenizer, model.safetensors),
// checkpoint.safetensors (what --resume reads; earlier ones are kept as
// checkpoint-<step>.safetensors), metrics.jsonl, routing.json.
// Checkpoints are written atomically after a loss check (a diverging run stops with an error);
// Ctrl-C or SIGTERM finishes the step, saves and exits. One run writes DIR at a time: it holds
// DIR/.lock, and a second is refused naming the first. Formats: docs/formats.md; docs/method.md.
//
// Under mpirun (or srun) it trains data parallel (docs/distributed.md): every rank takes its share
// of each step's batch, gradients are summed across the ranks, and the run is the one-process run
// up to rounding. Rank 0 writes the run folder and prints; the others print only errors.
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <rex/dist/gradient_sync.hpp>
#include <rex/rex.hpp>
#include <rex/train/train.hpp>

namespace {

namespace train = rex::train;
using rex::dist::Communicator;

const char* kUsage = R"(usage:
  train_tiny_rex --data FILE --out DIR [options]          train (or continue with --resume)
  train_tiny_rex --eval-only --checkpoint DIR --data FILE  print {"val_loss": ...} as one JSON line
  train_tiny_rex --sample N --checkpoint DIR               print N generated tokens
  (the two --checkpoint modes use the saved model as it is: they take --data, --device, --prompt,
  --temperature, --sample (after the evaluation line with --eval-only), --sample-recompute and only
  --set train.eval_batches=N and --set train.matmul_precision=P; they refuse the training options
  --config, --steps, --seed, --out, --resume, --overwrite and --stop-after)

options:
  --config FILE.json    run configuration (default: the built-in tiny R4 + PSR model; keys in
                        docs/formats.md)
  --set KEY=VALUE       override one config key, e.g. --set moe.reuse=1 (repeatable)
  --data PATH           training text (<= 1 GiB; 90% train, 10% validation) or token shards
  --out DIR             where the run is written (created if missing); one run at a time: a
                        second one on DIR is refused (lock file DIR/.lock)
  --steps N             same as --set train.steps=N
  --seed S              same as --set train.seed=S (init, batches, PSR masks)
  --device cpu|cuda     where to train (default cpu)
  --resume DIR          continue the run saved in DIR (its config; --steps/--set may change only
                        the keys docs/formats.md marks resumable; bit-exact, at any
                        OMP_NUM_THREADS)
  --overwrite           allow --out to name a folder that already holds a run
  --stop-after N        save and stop after N steps of this invocation, as Ctrl-C does (for
                        time-boxed sessions; --resume continues exactly)
  --eval-only           evaluate the model in --checkpoint DIR on the validation split of --data
  --checkpoint DIR      a run folder (model.safetensors, config.json, vocab/tokenizer.json)
  --sample N            generate N tokens (after training, or from --checkpoint)
  --prompt TEXT         text the sample continues (default: a newline)
  --temperature T       sampling temperature, 0 = greedy (default 0.8)
  --sample-recompute    sample by a full forward pass over the window per character instead of
                        the KV cache (slower; the reference it is tested and timed against)
  --help                this text

data parallel: mpirun -np N train_tiny_rex ... (train.batch_size a multiple of N x train.grad_accum;
  each rank runs OMP_NUM_THREADS threads; docs/distributed.md)
)";

struct Options {
  std::string config_path, data_path, out_dir, resume_dir, checkpoint_dir;
  std::string device = "cpu";
  std::string prompt = "\n";
  std::vector<std::string> overrides;
  std::vector<std::string> training_flags;  // given options that only training uses
  bool eval_only = false, overwrite = false, sample_recompute = false;
  int64_t sample = 0;
  int64_t stop_after = -1;  // steps of this invocation before saving and stopping; -1: no limit
  double temperature = 0.8;
};

long long ll(int64_t v) { return v; }  // for printf's %lld

[[noreturn]] void usage_error(const std::string& message) {
  throw rex::Error(message + "\n(run train_tiny_rex --help for the options)");
}

int64_t parse_count(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || value < 0)
    usage_error(flag + " expects a whole number, got '" + text + "'");
  return value;
}

Options parse_args(int argc, char** argv) {
  Options o;
  static const std::set<std::string> kTrainingFlags = {
      "--config", "--steps", "--seed", "--out", "--resume", "--overwrite", "--stop-after"};
  const std::map<std::string, std::string*> text_flags = {
      {"--config", &o.config_path}, {"--data", &o.data_path},
      {"--out", &o.out_dir},        {"--device", &o.device},
      {"--resume", &o.resume_dir},  {"--checkpoint", &o.checkpoint_dir},
      {"--prompt", &o.prompt}};
  const std::map<std::string, bool*> switches = {{"--eval-only", &o.eval_only},
                                                 {"--overwrite", &o.overwrite},
                                                 {"--sample-recompute", &o.sample_recompute}};
  const std::map<std::string, int64_t*> counts = {{"--sample", &o.sample},
                                                  {"--stop-after", &o.stop_after}};
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf("%s", kUsage);
      std::exit(0);
    }
    if (kTrainingFlags.count(flag)) o.training_flags.push_back(flag);
    if (switches.count(flag)) {
      *switches.at(flag) = true;
      continue;
    }
    if (i + 1 >= argc) usage_error(flag + " needs a value");
    const std::string value = argv[++i];
    if (text_flags.count(flag)) {
      *text_flags.at(flag) = value;
    } else if (counts.count(flag)) {
      *counts.at(flag) = parse_count(flag, value);
    } else if (flag == "--steps" || flag == "--seed") {  // train.steps=N, train.seed=S
      o.overrides.push_back("train." + flag.substr(2) + "=" +
                            std::to_string(parse_count(flag, value)));
    } else if (flag == "--set") {
      o.overrides.push_back(value);
    } else if (flag == "--temperature") {
      char* end = nullptr;
      o.temperature = std::strtod(value.c_str(), &end);
      if (*end != '\0' || !(o.temperature >= 0)) usage_error("--temperature expects a number >= 0");
    } else {
      usage_error("unknown option " + flag);
    }
  }
  if (o.stop_after == 0) usage_error("--stop-after expects at least 1 step");
  if (o.device != "cpu" && o.device != "cuda") usage_error("--device must be cpu or cuda");
  return o;
}

// The device named by --device; CUDA needs a build linked with rex::cuda and a GPU.
rex::Device chosen_device(const Options& o) {
  const rex::Device device = train::device_named(o.device);
  if (device.is_cuda()) std::printf("device: cuda:0, %s\n", rex::cuda_device_description().c_str());
  return device;
}

const std::string& required(const std::string& value, const std::string& option) {
  if (value.empty()) usage_error(option + " is required");
  return value;
}

// --prompt and the --sample N tokens that continue it, generated with the PSR mask of `steps`.
std::string sample_text(const rex::nn::TransformerLM& model, const rex::data::Tokenizer& tok,
                        const Options& o, uint64_t seed, int64_t steps) {
  train::check_prompt(tok, o.prompt);
  return o.prompt + train::generate(model, tok, o.prompt, o.sample, o.temperature, seed,
                                    train::after_steps(steps, seed),
                                    o.sample_recompute ? train::Decoding::recompute
                                                       : train::Decoding::kv_cache);
}

int train_run(const Options& o) {
  if (o.out_dir.empty() && o.resume_dir.empty()) usage_error("--out DIR is required");
  const std::string out = o.out_dir.empty() ? o.resume_dir : o.out_dir;
  const bool resume_in_place = !o.resume_dir.empty() && out == o.resume_dir;
  // Rank 0 writes the run folder and holds its lock until the end, so that a second writer is
  // refused. A run resumed in place takes it before it reads the checkpoint, which no other run may
  // then replace; any other run once its inputs are checked, so that bad input makes no folder.
  Communicator& world = Communicator::world();
  std::optional<rex::io::RunFolderLock> lock;
  if (world.is_root() && resume_in_place) lock.emplace(out);
  if (!o.resume_dir.empty() && !o.config_path.empty())
    usage_error("--config cannot be combined with --resume: the run's config is in its checkpoint");
  train::RunInputs inputs;  // configuration, corpus and (when resuming) the saved state
  try {
    inputs = train::read_run_inputs(o.resume_dir, o.config_path, o.overrides,
                                    required(o.data_path, "--data FILE"));
  } catch (const train::NotResumable& e) {
    usage_error(e.what());
  }
  const auto& [saved, config, corpus] = inputs;
  if (o.sample > 0) train::check_sampling(corpus.tokenizer, config, o.prompt);
  const train::TrainConfig& t = config.train;
  train::check_ranks_agree(world, config, corpus.fingerprint, saved ? saved->step : 0);
  const rex::data::BatchSampler train_batches = train::train_sampler(corpus, config);
  const rex::data::BatchSampler val_batches = train::validation_sampler(corpus, config);
  std::optional<train::RunSaver> saver;
  if (world.is_root())
    saver = train::prepare_run_folder(
        lock ? std::move(*lock) : train::lock_run_folder(out), config, t.keep_checkpoints,
        resume_in_place ? std::optional(saved->step) : std::nullopt, o.overwrite);

  const rex::Device device = chosen_device(o);
  rex::set_matmul_precision(device, t.matmul_precision);
  train::TrainingState run = train::start_training(config, device, saved ? &*saved : nullptr);
  train::start_from_rank0(world, run);
  int64_t& step = run.step;  // completed optimizer steps
  const rex::optim::CosineSchedule schedule = train::lr_schedule(t);
  std::optional<rex::dist::GradientSync> sync;
  if (world.size() > 1) sync.emplace(world, run.optimizer.tensors());
  const train::BatchSplit split{sync ? &*sync : nullptr, t.grad_accum};

  std::printf(
      "rex train_tiny_rex: %s\n",
      train::run_banner(*run.model, config, corpus, world.size(), step, saved.has_value(), out)
          .c_str());
  std::fflush(stdout);
  train::catch_interrupts();
  const int64_t first_step = step;
  train::RunReports reports(config, val_batches, device, world, out,
                            saved ? std::optional(step) : std::nullopt);
  while (step < t.steps) {
    const float lr = schedule.lr(step);
    train::QueuedStep queued = train::queue_step(*run.model, run.optimizer,
                                                 train_batches.sample(static_cast<uint64_t>(step)),
                                                 {step, t.seed}, lr, t.grad_clip, split);
    ++step;
    reports.after_step(*run.model, step, std::move(queued), lr);
    const bool last = step == t.steps;
    // Every rank stops at the same step: a signal may reach the ranks at different times.
    const bool interrupted = world.any(train::interrupted());
    const bool stop =
        interrupted || (!last && o.stop_after >= 0 && step - first_step >= o.stop_after);
    if (step % t.checkpoint_interval == 0 || last || stop) {
      reports.check_divergence(step, saver ? saver->newest() : std::nullopt);
      if (saver)
        saver->save(*run.model, run.optimizer, config, corpus.tokenizer, step, corpus.fingerprint);
    }
    if (stop) {
      std::printf("%s: checkpoint saved at step %lld; continue with --resume %s\n",
                  interrupted ? "interrupted" : "stopped", ll(step), out.c_str());
      return interrupted ? train::interrupted_exit_status() : 0;
    }
  }
  if (saved && saved->step >= t.steps)
    std::printf("the run in %s already has %lld of %lld steps; nothing to train\n",
                o.resume_dir.c_str(), ll(saved->step), ll(t.steps));
  std::printf("done: %lld steps in %s; model, checkpoint, metrics.jsonl%s in %s\n", ll(step),
              train::format_duration(reports.elapsed_s()).c_str(),
              config.model.ffn == "moe" ? ", routing.json" : "", out.c_str());
  if (o.sample > 0 && world.is_root())
    std::printf("--- sample (%lld tokens, temperature %.2f) ---\n%s\n", ll(o.sample), o.temperature,
                sample_text(*run.model, *corpus.tokenizer, o, t.seed, step).c_str());
  return 0;
}

// --eval-only and --sample with --checkpoint: the model in --checkpoint, used as it was saved;
// --set may change only what is evaluated (train::kEvaluationKeys). With both, the evaluation line
// comes first, then the sample.
int checkpoint_mode(const Options& o) {
  const std::string mode = o.eval_only ? "--eval-only" : "--sample with --checkpoint";
  if (!o.training_flags.empty())
    usage_error(mode + " uses the run in --checkpoint as it was saved; " +
                o.training_flags.front() + " applies only to training");
  if (!o.eval_only && o.sample == 0) usage_error("--checkpoint needs --eval-only or --sample N");
  const rex::Device device = chosen_device(o);
  const train::LoadedModel loaded =
      train::load_model(required(o.checkpoint_dir, "--checkpoint DIR"), device);
  train::RunConfig c;
  try {
    c = train::evaluation_config(loaded.folder.config, o.overrides);
  } catch (const train::NotAnEvaluationKey& e) {
    usage_error(mode + ": " + e.what());
  }
  rex::set_matmul_precision(device, c.train.matmul_precision);
  if (o.sample > 0) train::check_sampling(loaded.folder.tokenizer, c, o.prompt);  // first
  if (o.eval_only) {
    const train::Corpus corpus =
        train::load_training_data(required(o.data_path, "--data FILE"), loaded.folder.tokenizer, c);
    train::take_vocab_size(c, corpus);
    const train::Evaluation eval = train::evaluate(
        *loaded.model, train::validation_sampler(corpus, c), c.train.eval_batches,
        train::after_steps(loaded.folder.step, c.train.seed), device, &Communicator::world());
    std::printf("%s\n", train::evaluation_record(eval, loaded.folder.step, c).dump().c_str());
  }
  if (o.sample > 0)
    std::printf("%s\n", sample_text(*loaded.model, *loaded.folder.tokenizer, o, c.train.seed,
                                    loaded.folder.step)
                            .c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return train::run_on_every_rank("train_tiny_rex", [&] {
    const Options o = parse_args(argc, argv);
    return o.eval_only || !o.checkpoint_dir.empty() ? checkpoint_mode(o) : train_run(o);
  });
}
