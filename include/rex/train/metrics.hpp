// metrics.jsonl: one JSON object per line, appended and flushed as training goes, so that a run
// can be followed (and plotted) while it trains. On resume, the lines past the checkpoint's step
// (written after it by the run that stopped) are dropped first, so that a resumed run's log equals
// an uninterrupted one's; a line that is not a record (not a JSON object with a whole-number
// "step") is dropped with a warning. The records and their fields are listed in docs/formats.md.
// MetricsLog also writes routing.json beside the log. Progress measures the tokens/s and ETA of the
// progress lines; model_summary and corpus_summary describe a run in one line each, run_banner in
// three, progress_line a step.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "rex/core/error.hpp"
#include "rex/core/parallel.hpp"
#include "rex/io/files.hpp"
#include "rex/nn/transformer.hpp"
#include "rex/train/config.hpp"
#include "rex/train/corpus.hpp"
#include "rex/train/evaluate.hpp"
#include "rex/train/step.hpp"

namespace rex::detail {

// printf into a std::string.
inline std::string printf_string(const char* format, ...) {
  va_list args, again;
  va_start(args, format);
  va_copy(again, args);
  std::string out(static_cast<size_t>(std::vsnprintf(nullptr, 0, format, args)), '\0');
  std::vsnprintf(out.data(), out.size() + 1, format, again);
  va_end(again);
  va_end(args);
  return out;
}

}  // namespace rex::detail

namespace rex::train {

class MetricsLog {
 public:
  // resume_step: the step of the checkpoint a resumed run starts from; nullopt starts a new log.
  MetricsLog(const std::string& path, std::optional<int64_t> resume_step)
      : routing_path_((std::filesystem::path(path).parent_path() / "routing.json").string()) {
    if (resume_step && std::filesystem::exists(path)) {
      std::ifstream in(path);
      std::string line, kept;
      for (int64_t number = 1; std::getline(in, line); ++number) {
        const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
        if (!j.is_object() || !j.contains("step") || !j["step"].is_number_integer()) {
          std::fprintf(stderr, "warning: %s line %lld is not a metrics record; dropped\n",
                       path.c_str(), static_cast<long long>(number));
        } else if (j["step"].get<int64_t>() <= *resume_step) {
          kept += line + "\n";
        }
      }
      io::write_file_atomic(path, kept);
    }
    file_ = std::fopen(path.c_str(), resume_step ? "a" : "w");
    REX_CHECK(file_ != nullptr, "cannot write ", path);
  }
  ~MetricsLog() { std::fclose(file_); }
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  void write(const nlohmann::json& record) {
    std::fprintf(file_, "%s\n", record.dump().c_str());
    std::fflush(file_);
  }

  // {"kind": "train", ...}: the step just completed (step = completed steps), its learning rate,
  // the throughput since the last record and the seconds since the run (re)started.
  void log_train(int64_t step, const StepResult& r, float lr, double tokens_per_s,
                 double elapsed_s) {
    write({{"kind", "train"},
           {"step", step},
           {"loss", r.loss},
           {"lm_loss", r.lm_loss},
           {"aux_loss", r.aux_loss},
           {"lr", lr},
           {"grad_norm", r.grad_norm},
           {"tokens_per_s", tokens_per_s},
           {"candidates", r.candidates},
           {"elapsed_s", elapsed_s}});
  }

  // {"kind": "eval", ...}: the validation loss after `step` completed steps.
  void log_eval(int64_t step, double val_loss) {
    write({{"kind", "eval"}, {"step", step}, {"val_loss", val_loss}});
  }

  // The eval record and, for a MoE model, the evaluation's routing (routing_json): written to
  // routing.json beside the log, and to the log as {"kind": "routing", "step", "candidates",
  // "layers"}, so that the log holds its history over training.
  void log_evaluation(int64_t step, const Evaluation& eval, const nn::ModelConfig& model,
                      int64_t candidates) {
    log_eval(step, eval.val_loss);
    if (model.ffn != "moe") return;
    const nlohmann::json routing = routing_json(model, eval, step, candidates);
    write({{"kind", "routing"},
           {"step", step},
           {"candidates", candidates},
           {"layers", routing.at("layers")}});
    io::write_file_atomic(routing_path_, routing.dump(1) + "\n");
  }

 private:
  std::string routing_path_;
  std::FILE* file_;
};

// "4m05s" below an hour, "2h07m" from an hour on.
inline std::string format_duration(double seconds) {
  const long s = std::lround(seconds);
  char text[32];
  if (s >= 3600) {
    std::snprintf(text, sizeof text, "%ldh%02ldm", s / 3600, s / 60 % 60);
  } else {
    std::snprintf(text, sizeof text, "%ldm%02lds", s / 60, s % 60);
  }
  return text;
}

// Throughput and time left of a training loop, measured over the steps since the last lap.
class Progress {
 public:
  explicit Progress(int64_t tokens_per_step) : tokens_per_step_(tokens_per_step) {}

  void count_step() { ++steps_; }

  struct Lap {
    double tokens_per_s;
    double eta_s;      // at this lap's speed, for `steps_left` more steps
    double elapsed_s;  // since the Progress was made
  };

  // Ends the current interval (at least one step) and starts the next.
  Lap lap(int64_t steps_left) {
    const auto now = Clock::now();
    const double seconds = std::chrono::duration<double>(now - interval_start_).count();
    const Lap out{static_cast<double>(steps_ * tokens_per_step_) / seconds,
                  seconds / static_cast<double>(steps_) * static_cast<double>(steps_left),
                  std::chrono::duration<double>(now - start_).count()};
    interval_start_ = now;
    steps_ = 0;
    return out;
  }

  double elapsed_s() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

 private:
  using Clock = std::chrono::steady_clock;
  int64_t tokens_per_step_;
  int64_t steps_ = 0;
  Clock::time_point start_ = Clock::now(), interval_start_ = start_;
};

// "step    100/3000 | loss 2.1234 (lm 2.1000, aux 0.0234) | lr 1.00e-03 |  12345 tok/s | N_t 8/16 |
// ETA 4m05s" (N_t, the PSR candidates of the pool, for a MoE model only).
inline std::string progress_line(const nn::ModelConfig& c, int64_t step, int64_t steps,
                                 const StepResult& r, float lr, const Progress::Lap& lap) {
  const std::string n_t =
      c.ffn != "moe"
          ? ""
          : detail::printf_string(" | N_t %lld/%lld", static_cast<long long>(r.candidates),
                                  static_cast<long long>(c.moe.reuse * c.moe.experts_per_layer));
  return detail::printf_string(
      "step %6lld/%lld | loss %.4f (lm %.4f, aux %.4f) | lr %.2e | %6.0f tok/s%s | ETA %s",
      static_cast<long long>(step), static_cast<long long>(steps), r.loss, r.lm_loss, r.aux_loss,
      lr, lap.tokens_per_s, n_t.c_str(), format_duration(lap.eta_s).c_str());
}

// "MoE R4 model, 4 layers, d_model 128, 1.23M parameters" (or "dense model, ...").
inline std::string model_summary(const nn::TransformerLM& model) {
  const nn::ModelConfig& c = model.config();
  const std::string kind = c.ffn == "moe" ? "MoE R" + std::to_string(c.moe.reuse) : "dense";
  return detail::printf_string("%s model, %lld layers, d_model %lld, %.2fM parameters",
                               kind.c_str(), static_cast<long long>(c.n_layers),
                               static_cast<long long>(c.d_model),
                               static_cast<double>(model.parameter_count()) / 1e6);
}

// "corpus PATH: N bytes, vocab V, train A / validation B tokens, unigram entropy H nats", or for
// token shards "data PATH: K llmc shards, largest id X, train A / validation B tokens, ...".
inline std::string corpus_summary(const Corpus& corpus) {
  const int64_t vocab = corpus.largest_token + 1;
  const std::string what = corpus.text ? "vocab " + std::to_string(vocab)
                                       : "largest id " + std::to_string(corpus.largest_token);
  return detail::printf_string(
      "%s %s: %s, %s, train %llu / validation %llu tokens, unigram entropy %.4f nats",
      corpus.text ? "corpus" : "data", corpus.path.c_str(), corpus.description.c_str(),
      what.c_str(), static_cast<unsigned long long>(corpus.train.size()),
      static_cast<unsigned long long>(corpus.validation.size()),
      data::unigram_entropy(corpus.validation, vocab));
}

// A training run's first lines: the model, threads, ranks and micro-batches; the corpus; the step
// it starts at (`resuming` or not), the tokens per step and the folder it writes.
inline std::string run_banner(const nn::TransformerLM& model, const RunConfig& config,
                              const Corpus& corpus, int ranks, int64_t step, bool resuming,
                              const std::string& out) {
  const TrainConfig& t = config.train;
  std::string text = model_summary(model) + ", " + std::to_string(thread_count()) + " threads";
  if (ranks > 1) text += " per rank x " + std::to_string(ranks) + " ranks";
  if (t.grad_accum > 1) text += ", " + std::to_string(t.grad_accum) + " micro-batches per step";
  return text + "\n" + corpus_summary(corpus) + "\n" +
         detail::printf_string("%s step %lld of %lld, %lld tokens per step, writing to %s",
                               resuming ? "resuming at" : "starting at",
                               static_cast<long long>(step), static_cast<long long>(t.steps),
                               static_cast<long long>(t.batch_size * config.model.context),
                               out.c_str());
}

}  // namespace rex::train
