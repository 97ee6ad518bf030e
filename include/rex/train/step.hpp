// One training step, the only place its sequence is written: forward at the PSR step, backward,
// global-norm clipping, AdamW, zero_grad. Every program and test that trains calls train_step;
// one that must see the gradients before the update (the PyTorch twin's dump) passes
// inspect_gradients, which runs between backward and clipping.
//
// The optimiser and the learning-rate schedule of a run come from its TrainConfig: AdamW with
// decay on matrices only (optim::decay_matrices) and a warmup + cosine schedule.
//
// DivergenceGuard is the loss check a run passes before each checkpoint, so that a diverging run
// stops with its last good checkpoint instead of overwriting it (the rule: docs/formats.md,
// train.divergence_factor).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <functional>
#include <numeric>
#include <optional>
#include <string>

#include "rex/data/dataset.hpp"
#include "rex/nn/transformer.hpp"
#include "rex/optim/adamw.hpp"
#include "rex/optim/clip.hpp"
#include "rex/optim/schedule.hpp"
#include "rex/train/config.hpp"

namespace rex::train {

inline optim::AdamW make_optimizer(const nn::Module& model, const TrainConfig& t) {
  return optim::AdamW(optim::decay_matrices(model.named_parameters()), adamw_options(t));
}

inline optim::CosineSchedule lr_schedule(const TrainConfig& t) {
  return {static_cast<float>(t.lr), t.warmup, t.steps, static_cast<float>(t.min_lr_ratio)};
}

struct StepResult {
  nn::LmOutput output;   // the forward pass (losses, PSR candidates, expert counts)
  double lm_loss = 0;    // output.lm_loss on the host (DivergenceGuard reads it every step)
  double grad_norm = 0;  // global gradient norm before clipping
};

// The MoE auxiliary loss of a forward pass (0 for a dense model).
inline double aux_loss(const nn::LmOutput& out) {
  return out.aux_loss.defined() ? out.aux_loss.item() : 0.0;
}

// batch: on the model's device. grad_clip <= 0 measures the norm without clipping.
inline StepResult train_step(
    const nn::TransformerLM& model, optim::AdamW& optimizer, const data::Batch& batch,
    const nn::RoutingStep& at, float lr, double grad_clip,
    const std::function<void(const nn::LmOutput&)>& inspect_gradients = nullptr) {
  StepResult result{model.forward(batch.inputs, batch.targets, at)};
  result.output.loss.backward();
  // Read once backward has been queued: clipping waits for the gradients right after anyway, so
  // on CUDA this costs no wait of its own (reading it later would wait for AdamW too).
  result.lm_loss = result.output.lm_loss.item();
  if (inspect_gradients) inspect_gradients(result.output);
  result.grad_norm = optim::clip_grad_norm(optimizer.parameters(), grad_clip);
  optimizer.step(lr);
  optimizer.zero_grad();
  return result;
}

// The mean language-model loss of the last kWindow steps must be finite and at most
// train.divergence_factor x the lowest such mean of this invocation, which starts at ln(vocab
// size), the loss of a uniform guess (0 turns the limit off; a non-finite mean always fails).
class DivergenceGuard {
 public:
  static constexpr size_t kWindow = 10;

  DivergenceGuard(const TrainConfig& t, int64_t vocab_size)
      : factor_(t.divergence_factor), lr_(t.lr), best_(std::log(static_cast<double>(vocab_size))) {}

  void record(double lm_loss) {
    window_.push_back(lm_loss);
    if (window_.size() > kWindow) window_.pop_front();
    if (window_.size() == kWindow) best_ = std::min(best_, mean());
  }

  // Throws rex::Error naming the step, the loss and the likely cause when the run diverged.
  // last_saved: the step of the newest checkpoint in the run folder, which is kept.
  void check(int64_t step, std::optional<int64_t> last_saved) const {
    const double recent = mean();
    if (window_.empty() || (std::isfinite(recent) && (factor_ <= 0 || recent <= factor_ * best_)))
      return;
    throw Error(detail::concat(
        "training diverged at step ", step, ": the mean loss of the last ", window_.size(),
        " steps is ", recent, "; the limit is train.divergence_factor (", factor_, ") x ", best_,
        ", the lowest ", kWindow, "-step mean of this run (at most ln(vocab size)). The likely ",
        "cause is a learning rate too high (train.lr = ", lr_,
        "): lower train.lr, lengthen train.warmup or keep train.grad_clip on. Step ", step,
        " was not saved; ",
        last_saved ? "the checkpoint of step " + std::to_string(*last_saved) + " is kept"
                   : std::string("no checkpoint had been written yet")));
  }

 private:
  double mean() const {
    return std::accumulate(window_.begin(), window_.end(), 0.0) /
           static_cast<double>(window_.size());
  }
  double factor_, lr_, best_;
  std::deque<double> window_;
};

}  // namespace rex::train
