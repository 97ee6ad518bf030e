// One training step, the only place its sequence is written: forward at the PSR step, backward,
// global-norm clipping, AdamW, zero_grad. Every program and test that trains calls train_step;
// one that must see the gradients before the update (the PyTorch twin's dump) passes
// inspect_gradients, which runs between backward and clipping.
//
// The optimiser and the learning-rate schedule of a run come from its TrainConfig: AdamW with
// decay on matrices only (optim::decay_matrices) and a warmup + cosine schedule.
#pragma once

#include <functional>

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
  StepResult result{model.forward(batch.inputs, batch.targets, at), 0};
  result.output.loss.backward();
  if (inspect_gradients) inspect_gradients(result.output);
  result.grad_norm = optim::clip_grad_norm(optimizer.parameters(), grad_clip);
  optimizer.step(lr);
  optimizer.zero_grad();
  return result;
}

}  // namespace rex::train
