// One training step, the only place its sequence is written: forward at the PSR step, backward,
// global-norm clipping, AdamW, zero_grad. Every program and test that trains calls train_step;
// one that must see the gradients before the update (the PyTorch twin's dump) passes
// inspect_gradients, which runs between backward and clipping.
//
// The step's batch may be split across data-parallel ranks (rex/dist/) and into micro-batches
// (train.grad_accum). The gradients are then those of the whole batch's mean loss, the
// load-balancing loss uses the whole batch's routed shares, and clipping and AdamW see the same
// gradients on every rank. The shards' gradients and losses are added in one fixed order
// (dist::PairwiseSum), so N ranks with A micro-batches each give the bytes of one process with
// N A micro-batches when A is a power of two; against the unsplit batch they differ by rounding
// (the argument and the bound: docs/distributed.md).
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
#include <vector>

#include "rex/data/dataset.hpp"
#include "rex/dist/gradient_sync.hpp"
#include "rex/dist/pairwise_sum.hpp"
#include "rex/nn/routing_report.hpp"
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

// How a step's batch of train.batch_size sequences is split: across the ranks of `sync` (data
// parallel; null: one process), then into grad_accum micro-batches on each rank. Shard
// s = rank * grad_accum + m holds rows [s S, (s + 1) S) with S = batch / (ranks * grad_accum), so
// the sequences trained on do not depend on the split.
struct BatchSplit {
  dist::GradientSync* sync = nullptr;
  int64_t grad_accum = 1;

  int ranks() const { return sync ? sync->communicator().size() : 1; }
  int64_t shards() const { return ranks() * grad_accum; }
};

struct StepResult {
  nn::LmOutput output;  // the forward pass of the last micro-batch on this rank (the whole batch's
                        // when nothing is split), for inspect_gradients
  // Over the whole batch (all ranks, all micro-batches):
  double loss = 0, lm_loss = 0, aux_loss = 0;  // aux_loss: 0 for a dense model
  double grad_norm = 0;                        // global gradient norm before clipping
  nn::ExpertCounts expert_counts;              // per layer: routed slots per pool expert
  int64_t candidates = 0;                      // PSR N_t (0 for a dense model)
};

// The per-layer counts flattened, summed across the ranks, and put back.
inline void all_reduce_counts(dist::Communicator& comm, nn::ExpertCounts& counts) {
  std::vector<int64_t> flat;
  for (const auto& layer : counts) flat.insert(flat.end(), layer.begin(), layer.end());
  comm.all_reduce_sum(flat);
  size_t i = 0;
  for (auto& layer : counts)
    for (int64_t& c : layer) c = flat[i++];
}

}  // namespace rex::train

namespace rex::detail {

// The whole batch's routing counts while one rank sees its share, in one micro-batch: summed
// across the ranks layer by layer as the forward pass reaches each MoE layer.
class CountsAcrossRanks : public nn::WholeBatchCounts {
 public:
  CountsAcrossRanks(dist::Communicator& comm, int64_t layers)
      : comm_(comm), whole_(static_cast<size_t>(layers)) {}
  std::vector<int64_t> of_layer(int64_t layer, const std::vector<int64_t>& part) override {
    std::vector<int64_t>& whole = whole_.at(static_cast<size_t>(layer));
    whole = part;
    comm_.all_reduce_sum(whole);
    return whole;
  }
  const nn::ExpertCounts& whole() const { return whole_; }

 private:
  dist::Communicator& comm_;
  nn::ExpertCounts whole_;
};

// The whole batch's routing counts under gradient accumulation, measured before training on it:
// a forward pass without gradients over every micro-batch (the routing of the training passes
// is then the same, which of_layer checks), summed across the ranks in one call.
class CountsMeasuredFirst : public nn::WholeBatchCounts {
 public:
  // first_sequences[m]: micro-batch m's first sequence in the whole batch.
  CountsMeasuredFirst(const nn::TransformerLM& model, const std::vector<data::Batch>& micro,
                      const std::vector<int64_t>& first_sequences, nn::RoutingStep at,
                      dist::Communicator* comm) {
    NoGradGuard no_grad;
    for (size_t m = 0; m < micro.size(); ++m) {
      at.first_sequence = first_sequences[m];
      const nn::LmOutput out = model.forward(micro[m].inputs, micro[m].targets, at);
      nn::add_expert_counts(whole_, out);
      per_micro_.push_back(out.expert_counts);
    }
    if (comm) train::all_reduce_counts(*comm, whole_);
  }
  void next_micro_batch(size_t m) { micro_ = m; }
  const nn::ExpertCounts& whole() const { return whole_; }

  std::vector<int64_t> of_layer(int64_t layer, const std::vector<int64_t>& part) override {
    const auto l = static_cast<size_t>(layer);
    REX_CHECK(part == per_micro_.at(micro_).at(l), "train_step: layer ", layer,
              " routed micro-batch ", micro_,
              " differently with gradients than without (the counting pass); please report this");
    return whole_.at(l);
  }

 private:
  std::vector<nn::ExpertCounts> per_micro_;
  nn::ExpertCounts whole_;
  size_t micro_ = 0;
};

}  // namespace rex::detail

namespace rex::train {

// One optimizer step on `batch` (the whole batch of the step, anywhere; each rank passes the same
// one) split as `split` says: each shard's loss is backpropagated with gradient 1 / shards (exact
// for a power of two), the gradients are summed across the ranks, so every rank holds the
// gradient of the whole batch's mean loss; then clipping on its global norm and AdamW, the same
// on every rank. The load-balancing loss uses the whole batch's routed shares (WholeBatchCounts).
// grad_clip <= 0 measures the norm without clipping.
inline StepResult train_step(
    const nn::TransformerLM& model, optim::AdamW& optimizer, const data::Batch& batch,
    const nn::RoutingStep& at, float lr, double grad_clip, const BatchSplit& split = {},
    const std::function<void(const nn::LmOutput&)>& inspect_gradients = nullptr) {
  const int64_t shards = split.shards();
  const Device device = optimizer.parameters().front().tensor.device();
  dist::Communicator* comm = split.sync ? &split.sync->communicator() : nullptr;
  StepResult result;
  std::vector<data::Batch> micro;        // this rank's micro-batches, on the model's device
  std::vector<int64_t> first_sequences;  // each one's first sequence in the whole batch
  if (shards == 1) {
    micro.push_back(batch.to(device));
    first_sequences.push_back(0);
  } else {
    const int64_t rows = batch.inputs.dim(0);
    REX_CHECK(rows % shards == 0, "train_step: a batch of ", rows,
              " sequences cannot be split into ", split.ranks(), " ranks x ", split.grad_accum,
              " micro-batches (train.batch_size must be a multiple of ranks x train.grad_accum)");
    const int64_t rank = comm ? comm->rank() : 0, size = rows / shards;
    for (int64_t m = 0; m < split.grad_accum; ++m) {
      first_sequences.push_back((rank * split.grad_accum + m) * size);
      micro.push_back(batch.rows(first_sequences.back(), size).to(device));
    }
  }
  const bool is_moe = model.config().ffn == "moe";
  const bool share_counts = is_moe && shards > 1 && model.config().moe.aux_loss_coef > 0;
  std::optional<rex::detail::CountsMeasuredFirst> measured;
  std::optional<rex::detail::CountsAcrossRanks> across;
  nn::RoutingStep routing = at;
  if (share_counts && split.grad_accum > 1) {
    measured.emplace(model, micro, first_sequences, at, comm);
    routing.whole_batch = &*measured;
  } else if (share_counts) {
    across.emplace(*comm, model.config().n_layers);
    routing.whole_batch = &*across;
  }
  // Each shard's losses at its place in the whole batch (zeros elsewhere, so that summing over the
  // ranks only fills in the others' places, exactly), then added in PairwiseSum's order.
  const int64_t first_shard = (comm ? comm->rank() : 0) * split.grad_accum;
  std::vector<double> shard_lm(static_cast<size_t>(shards)), shard_aux(shard_lm.size());
  std::optional<dist::ShardGradients> earlier;  // this rank's micro-batches before the last
  if (micro.size() > 1) earlier.emplace(optimizer.tensors());
  // Each micro-batch's losses, as device scalars, read back together in one copy after the loop:
  // micro-batch m's language-model loss at lm_at[m], its aux loss at aux_at[m] (-1: none).
  std::vector<Tensor> losses;
  std::vector<int64_t> lm_at(micro.size()), aux_at(micro.size(), -1);
  for (size_t m = 0; m < micro.size(); ++m) {
    if (measured) measured->next_micro_batch(m);
    routing.first_sequence = first_sequences[m];
    result.output = model.forward(micro[m].inputs, micro[m].targets, routing);
    const bool last = m + 1 == micro.size();
    if (last && split.sync) split.sync->begin(earlier ? &*earlier : nullptr);
    const Tensor seed = full(result.output.loss.shape(), 1.0f / static_cast<float>(shards),
                             result.output.loss.device());
    rex::detail::run_backward(result.output.loss, seed, /*retain_graph=*/false,
                              last && split.sync ? split.sync->hook() : nullptr);
    if (!last) earlier->take();
    lm_at[m] = static_cast<int64_t>(losses.size());
    losses.push_back(reshape(result.output.lm_loss.detach(), {1}));
    if (result.output.aux_loss.defined()) {
      aux_at[m] = static_cast<int64_t>(losses.size());
      losses.push_back(reshape(result.output.aux_loss.detach(), {1}));
    }
    if (!routing.whole_batch) nn::add_expert_counts(result.expert_counts, result.output);
  }
  // Read once every backward has been queued: clipping waits for the gradients right after
  // anyway, so on CUDA this one copy costs no wait of its own (reading later would wait for AdamW
  // too). The total loss is their sum, which saves another read.
  const std::vector<float> loss_values = concat(losses, 0).to_vector();
  for (size_t m = 0; m < micro.size(); ++m) {
    const auto shard = static_cast<size_t>(first_shard) + m;
    shard_lm[shard] = loss_values[static_cast<size_t>(lm_at[m])];
    shard_aux[shard] = aux_at[m] >= 0 ? loss_values[static_cast<size_t>(aux_at[m])] : 0.0;
  }
  if (split.sync) split.sync->finish();
  if (earlier) earlier->fold_all();  // what the sync did not fold (all of it, on one process)
  if (measured) result.expert_counts = measured->whole();
  if (across) result.expert_counts = across->whole();
  if (comm) {
    comm->all_reduce_sum(shard_lm);
    comm->all_reduce_sum(shard_aux);
    if (!routing.whole_batch) all_reduce_counts(*comm, result.expert_counts);
  }
  result.lm_loss = dist::pairwise_sum(shard_lm, std::plus<>()) / static_cast<double>(shards);
  result.aux_loss = dist::pairwise_sum(shard_aux, std::plus<>()) / static_cast<double>(shards);
  result.loss = result.lm_loss + result.aux_loss;
  result.candidates = result.output.candidates;
  if (inspect_gradients) inspect_gradients(result.output);
  // Clipping over the optimiser's arena; on CUDA the factor stays on the device for AdamW, and
  // the norm is read for the result (and its non-finite check) before the update is queued.
  optimizer.clip_grad_norm(grad_clip);
  result.grad_norm = optimizer.grad_norm();
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
