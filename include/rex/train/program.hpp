// What a training program needs around the library's work: the inputs a run starts from, the
// device its command line names, the reports of its loop (RunReports), and a main whose errors end
// every rank of a data-parallel run. Rank 0 speaks for the run: the other ranks' stdout is
// silenced, their errors still show.
#pragma once

#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "rex/backend/cuda/runtime.hpp"
#include "rex/core/error.hpp"
#include "rex/dist/communicator.hpp"
#include "rex/train/checkpoint.hpp"
#include "rex/train/config.hpp"
#include "rex/train/corpus.hpp"
#include "rex/train/evaluate.hpp"
#include "rex/train/metrics.hpp"
#include "rex/train/step.hpp"

namespace rex::train {

// What a training run starts from: the checkpoint it resumes, when resume_dir is given; its
// config, the checkpoint's with the overrides (NotResumable names a key a resumed run must keep)
// or config_path's (the built-in default when empty) with them; the corpus at data_path, read
// with the checkpoint's tokenizer, whose vocabulary size the config takes. A resume that reads
// another corpus than the one it was trained on is warned about.
struct RunInputs {
  std::optional<Checkpoint> saved;
  RunConfig config;
  Corpus corpus;
};

inline RunInputs read_run_inputs(const std::string& resume_dir, const std::string& config_path,
                                 const std::vector<std::string>& overrides,
                                 const std::string& data_path) {
  RunInputs in;
  if (!resume_dir.empty()) in.saved = load_resume_checkpoint(resume_dir);
  in.config = in.saved ? resumed_config(in.saved->config, overrides)
                       : read_run_config(config_path, overrides);
  in.corpus =
      load_training_data(data_path, in.saved ? in.saved->tokenizer : std::nullopt, in.config);
  take_vocab_size(in.config, in.corpus);
  if (in.saved) warn_if_other_corpus(in.corpus, in.saved->info);
  return in;
}

// The device named "cpu" or "cuda" (CUDA device 0). CUDA needs a program linked with rex::cuda
// and a GPU; either missing is an error that says which, naming the option as `--device cuda`.
inline Device device_named(const std::string& name) {
  if (name == "cpu") return Device::cpu();
  REX_CHECK(name == "cuda", "--device must be cpu or cuda, got '", name, "'");
  try {
    REX_CHECK(cuda_device_count() > 0,
              "no CUDA device was found (no GPU or no driver); use --device cpu");
  } catch (const Error& e) {
    throw Error(std::string("--device cuda: ") + e.what());
  }
  return Device::cuda();
}

// The reports of a training loop, made after each step: every train.log_interval steps and at
// the last, a progress line (stdout) and a metrics.jsonl record; every train.eval_interval steps
// and at the last, the validation loss (every rank evaluates its share) with the routing report of
// a MoE model (MetricsLog::log_evaluation); and the divergence guard's window of losses. Rank 0
// keeps the log, in the run folder `out`; resumed_at is the step of the checkpoint a resume starts
// from. The steps come queued (queue_step), their losses and gradient norms still on the device;
// they are read together on log and evaluation steps, before a checkpoint (check_divergence) and at
// least every kMostUnread steps, so that on CUDA the other steps never wait for the device. A
// step whose gradient norm was not finite (its update was skipped) then stops the run, named.
class RunReports {
 public:
  static constexpr size_t kMostUnread = 1000;

  RunReports(const RunConfig& config, const data::BatchSampler& validation, Device device,
             dist::Communicator& world, const std::string& out, std::optional<int64_t> resumed_at)
      : config_(config),
        validation_(validation),
        device_(device),
        world_(world),
        progress_(config.train.batch_size * config.model.context),
        guard_(config.train, config.model.vocab_size) {
    if (world.is_root()) metrics_.emplace(out + "/metrics.jsonl", resumed_at);
  }

  // After step `step` (completed steps), queued with learning rate lr.
  void after_step(const nn::TransformerLM& model, int64_t step, QueuedStep queued, float lr) {
    const TrainConfig& t = config_.train;
    progress_.count_step();
    unread_.push_back(std::move(queued));
    const bool last = step == t.steps;
    const bool log = step % t.log_interval == 0 || last;
    const bool eval = step % t.eval_interval == 0 || last;
    if (log || eval || unread_.size() >= kMostUnread) read(step);
    if (log) {
      const Progress::Lap lap = progress_.lap(t.steps - step);
      if (metrics_) metrics_->log_train(step, newest_, lr, lap.tokens_per_s, lap.elapsed_s);
      std::printf("%s\n", progress_line(config_.model, step, t.steps, newest_, lr, lap).c_str());
      std::fflush(stdout);
    }
    if (eval) {
      const Evaluation evaluation =
          evaluate(model, validation_, t.eval_batches, after_steps(step, t.seed), device_, &world_);
      std::printf("eval  step %6lld | val_loss %.4f\n", static_cast<long long>(step),
                  evaluation.val_loss);
      std::fflush(stdout);
      if (metrics_) metrics_->log_evaluation(step, evaluation, config_.model, newest_.candidates);
    }
  }

  // Before a save at step `step`: reads the steps not read yet, then throws when the run diverged
  // (DivergenceGuard::check).
  void check_divergence(int64_t step, std::optional<int64_t> last_saved) {
    read(step);
    guard_.check(step, last_saved);
  }

  double elapsed_s() const { return progress_.elapsed_s(); }

 private:
  // Reads the queued steps, the last of which is step `step`: their losses go to the guard, and
  // the first whose gradient norm is not finite stops the run.
  void read(int64_t step) {
    if (unread_.empty()) return;
    const int64_t first = step - static_cast<int64_t>(unread_.size()) + 1;
    std::vector<StepResult> results = read_steps(std::move(unread_));
    unread_.clear();
    for (size_t i = 0; i < results.size(); ++i) {
      const double norm = results[i].grad_norm;
      if (!std::isfinite(norm))
        throw Error(detail::concat(
            "step ", first + static_cast<int64_t>(i), ": the gradient norm is ",
            std::isnan(norm) ? "nan" : "inf",
            ", so that step updated nothing; training stopped at ", "step ", step,
            ", where the norms were read back (on CUDA they are read on log steps). ",
            "The newest checkpoint is kept. A learning rate too high (train.lr = ",
            config_.train.lr, ") is the usual cause"));
      guard_.record(results[i].lm_loss);
    }
    newest_ = std::move(results.back());
  }

  const RunConfig& config_;
  const data::BatchSampler& validation_;
  Device device_;
  dist::Communicator& world_;
  std::optional<MetricsLog> metrics_;
  Progress progress_;
  DivergenceGuard guard_;
  std::vector<QueuedStep> unread_;  // queued steps not read yet, in order
  StepResult newest_;               // the last step read
};

// Runs `body` as the program's main on this rank and returns the exit status. An error that every
// rank raised together (dist::CollectiveError) is printed once, by rank 0, and the program returns
// 1; an error of this rank alone is printed with the rank's name and ends every rank, so that none
// is left waiting in a collective. An error starting MPI is printed and returns 1.
inline int run_on_every_rank(const char* program, const std::function<int()>& body) {
  try {
    dist::Communicator& world = dist::Communicator::world();
    if (!world.is_root() && !std::freopen("/dev/null", "w", stdout))
      throw Error("cannot silence stdout on rank " + std::to_string(world.rank()));
    try {
      return body();
    } catch (const dist::CollectiveError& e) {
      std::fflush(stdout);
      if (world.is_root()) std::fprintf(stderr, "%s: error: %s\n", program, e.what());
      return 1;
    } catch (const std::exception& e) {
      std::fflush(stdout);
      std::fprintf(stderr, "%s: error%s: %s\n", program, world.where().c_str(), e.what());
      world.fail(1);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return 1;
  }
}

}  // namespace rex::train
