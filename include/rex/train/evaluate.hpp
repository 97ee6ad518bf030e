// Validation loss and the routing report. Evaluation and sampling route with the PSR mask of the
// last step trained (after_steps), so that they see the candidates the model was trained with.
// A validation loss that is not finite is an error, never a number to log or print.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <nlohmann/json.hpp>

#include "rex/data/dataset.hpp"
#include "rex/dist/communicator.hpp"
#include "rex/nn/routing_report.hpp"
#include "rex/nn/transformer.hpp"
#include "rex/train/config.hpp"
#include "rex/train/step.hpp"

namespace rex::train {

inline nn::RoutingStep after_steps(int64_t completed_steps, uint64_t seed) {
  return {std::max<int64_t>(completed_steps - 1, 0), seed};
}

struct Evaluation {
  double val_loss = 0;
  nn::ExpertCounts expert_counts;  // summed over the batches
};

// Mean cross-entropy over validation batches 0 .. batches-1 of `sampler`. With several ranks
// (comm), rank r evaluates the batches i with i mod ranks = r and the sums are reduced, so every
// rank gets the whole evaluation.
inline Evaluation evaluate(const nn::TransformerLM& model, const data::BatchSampler& sampler,
                           int64_t batches, const nn::RoutingStep& at, Device device,
                           dist::Communicator* comm = nullptr) {
  NoGradGuard no_grad;
  Evaluation out;
  const int64_t ranks = comm ? comm->size() : 1, rank = comm ? comm->rank() : 0;
  REX_CHECK(batches >= ranks, "evaluate: ", batches, " validation batches for ", ranks,
            " ranks; train.eval_batches must be at least the number of ranks");
  // Each batch's loss at its place (zeros at the other ranks' places, so that summing over the
  // ranks fills them in exactly), then added in batch order: the same bits at any rank count.
  std::vector<double> losses(static_cast<size_t>(batches));
  for (int64_t i = rank; i < batches; i += ranks) {
    const data::Batch batch = sampler.sample(static_cast<uint64_t>(i)).to(device);
    const nn::LmOutput result = model.forward(batch.inputs, batch.targets, at);
    losses[static_cast<size_t>(i)] = result.lm_loss.item();
    nn::add_expert_counts(out.expert_counts, result);
  }
  if (ranks > 1) {
    comm->all_reduce_sum(losses);
    all_reduce_counts(*comm, out.expert_counts);
  }
  for (const double loss : losses) out.val_loss += loss / static_cast<double>(batches);
  REX_CHECK(std::isfinite(out.val_loss), "evaluation: the validation loss over ", batches,
            " batches is ", out.val_loss,
            " (not finite): the model's weights have diverged (a learning rate too high?)");
  return out;
}

// {"val_loss", "step", "batches", "tokens"}: an evaluation of the model after `step` completed
// steps, over config's train.eval_batches batches (what --eval-only prints).
inline nlohmann::json evaluation_record(const Evaluation& eval, int64_t step,
                                        const RunConfig& config) {
  const TrainConfig& t = config.train;
  return {{"val_loss", eval.val_loss},
          {"step", step},
          {"batches", t.eval_batches},
          {"tokens", t.eval_batches * t.batch_size * config.model.context}};
}

// routing.json (docs/formats.md): nn::routing_report of an evaluation's expert counts.
inline nlohmann::json routing_json(const nn::ModelConfig& c, const Evaluation& eval, int64_t step,
                                   int64_t candidates) {
  const nn::MoeConfig& m = c.moe;
  nlohmann::json layers = nlohmann::json::array();
  for (const nn::LayerRouting& r : nn::routing_report(m, eval.expert_counts))
    layers.push_back({{"layer", r.layer},
                      {"block", r.block},
                      {"own_experts", r.own_experts},
                      {"share", r.share},
                      {"own_share", r.own_share},
                      {"borrowed_share", r.borrowed_share},
                      {"entropy", r.entropy},
                      {"imbalance", r.imbalance},
                      {"top_experts", r.top_experts},
                      {"jaccard", r.jaccard}});
  return {{"step", step},
          {"reuse", m.reuse},
          {"experts_per_layer", m.experts_per_layer},
          {"top_k", m.top_k},
          {"candidates", candidates},
          {"source", "validation batches of the last evaluation"},
          {"layers", layers}};
}

}  // namespace rex::train
