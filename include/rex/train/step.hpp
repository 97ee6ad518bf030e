// One training step, the only place its sequence is written: forward at the PSR step, backward,
// global-norm clipping, AdamW, zero_grad. Every program and test that trains calls train_step,
// which reads the step's losses and gradient norm back at once, or queue_step, which leaves them
// on the device for read_steps to read later with other steps' (a training loop reads them on its
// log steps only, so that on CUDA its other steps never wait for the device). One that must see
// the gradients before the update (the PyTorch twin's dump) passes inspect_gradients, which runs
// between backward and clipping.
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
#include <cstring>
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
      nn::ExpertCounts counts;
      nn::add_expert_counts(counts, out);
      nn::add_expert_counts(whole_, out);
      per_micro_.push_back(std::move(counts));
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

// A step whose losses and gradient norm have not come back from the device yet (queue_step);
// read_steps brings any number of them back in one copy.
struct QueuedStep {
  StepResult result;  // all but loss, lm_loss, aux_loss and grad_norm
  // This rank's micro-batches' losses in order, each language-model loss followed by its aux loss
  // when the model has one (f32 scalars on the model's device).
  std::vector<Tensor> losses;
  bool has_aux = false;
  int64_t first_shard = 0, shards = 1;  // this rank's first shard, and all the shards of the batch
  Tensor norm;                          // optim::AdamW::grad_norm_record()
  dist::Communicator* comm = nullptr;   // the ranks that share the batch (null: one process)
  // Each micro-batch's routing counts, per MoE layer, still on the device (empty when the step
  // measured the whole batch's counts itself: result.expert_counts holds them then).
  std::vector<std::vector<DeviceCounts>> routing;
};

}  // namespace rex::train

namespace rex::detail {

// A step up to its update: forward and backward over this rank's micro-batches, the gradient
// sync across the ranks, then clipping; the losses and the norm stay on the device.
inline train::QueuedStep backward_and_clip(
    const nn::TransformerLM& model, optim::AdamW& optimizer, const data::Batch& batch,
    const nn::RoutingStep& at, double grad_clip, const train::BatchSplit& split,
    const std::function<void(const nn::LmOutput&)>& inspect_gradients) {
  const int64_t shards = split.shards();
  const Device device = optimizer.parameters().front().tensor.device();
  dist::Communicator* comm = split.sync ? &split.sync->communicator() : nullptr;
  train::QueuedStep queued;
  train::StepResult& result = queued.result;
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
  std::optional<dist::ShardGradients> earlier;  // this rank's micro-batches before the last
  if (micro.size() > 1) earlier.emplace(optimizer.tensors());
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
    queued.losses.push_back(result.output.lm_loss.detach());
    queued.has_aux = result.output.aux_loss.defined();
    if (queued.has_aux) queued.losses.push_back(result.output.aux_loss.detach());
    if (!routing.whole_batch) queued.routing.push_back(result.output.expert_counts);
  }
  if (split.sync) split.sync->finish();
  if (earlier) earlier->fold_all();  // what the sync did not fold (all of it, on one process)
  if (measured) result.expert_counts = measured->whole();
  if (across) result.expert_counts = across->whole();
  result.candidates = result.output.candidates;
  if (inspect_gradients) inspect_gradients(result.output);
  // Clipping over the optimiser's arena; on CUDA the norm and the factor stay on the device.
  optimizer.clip_grad_norm(grad_clip);
  queued.first_shard = (comm ? comm->rank() : 0) * split.grad_accum;
  queued.shards = shards;
  queued.comm = comm;
  return queued;
}

}  // namespace rex::detail

namespace rex::train {

// The values of queued steps, read back in one copy (and, with several ranks, summed across them
// in one call per kind of loss: every rank reads the same steps together). Each step's losses are
// its shards' losses added in PairwiseSum's order and divided by the shards, as train_step gives.
inline std::vector<StepResult> read_steps(std::vector<QueuedStep> steps) {
  if (steps.empty()) return {};
  NoGradGuard no_grad;
  // Every step's floats, on the device: its norm's 8 bytes, then its losses.
  int64_t total = 0;
  for (const QueuedStep& q : steps) total += 2 + static_cast<int64_t>(q.losses.size());
  Tensor all = Tensor::empty({total}, DType::f32, steps.front().norm.device());
  int64_t at = 0;
  for (const QueuedStep& q : steps) {
    slice(all, 0, at, at + 2).copy_(slice(reshape(q.norm, {-1}), 0, 0, 2));
    at += 2;
    for (const Tensor& loss : q.losses) {
      slice(all, 0, at, at + 1).copy_(reshape(loss, {1}));
      ++at;
    }
  }
  const std::vector<float> values = all.to_vector();
  // The steps' routing counts, all in one more copy (none when every step measured its own).
  std::vector<const DeviceCounts*> counts;
  for (const QueuedStep& q : steps)
    for (const std::vector<DeviceCounts>& micro : q.routing)
      for (const DeviceCounts& layer : micro) counts.push_back(&layer);
  read_counts(counts);
  // Each step's shard losses at their places in the whole batch (zeros elsewhere, so that summing
  // over the ranks only fills in the others' places, exactly).
  std::vector<double> shard_lm, shard_aux;
  at = 0;
  std::vector<StepResult> out;
  for (QueuedStep& q : steps) {
    StepResult& r = out.emplace_back(std::move(q.result));
    for (const std::vector<DeviceCounts>& micro : q.routing)
      nn::add_expert_counts(r.expert_counts, micro);
    if (q.comm && !q.routing.empty()) all_reduce_counts(*q.comm, r.expert_counts);
    std::memcpy(&r.grad_norm, values.data() + at, sizeof r.grad_norm);
    at += 2;
    const size_t first = shard_lm.size() + static_cast<size_t>(q.first_shard);
    shard_lm.resize(shard_lm.size() + static_cast<size_t>(q.shards), 0.0);
    shard_aux.resize(shard_lm.size(), 0.0);
    const size_t stride = q.has_aux ? 2 : 1;
    for (size_t m = 0; m < q.losses.size() / stride; ++m) {
      shard_lm[first + m] = values[static_cast<size_t>(at) + stride * m];
      if (q.has_aux) shard_aux[first + m] = values[static_cast<size_t>(at) + stride * m + 1];
    }
    at += static_cast<int64_t>(q.losses.size());
  }
  if (dist::Communicator* comm = steps.front().comm) {
    comm->all_reduce_sum(shard_lm);
    comm->all_reduce_sum(shard_aux);
  }
  size_t begin = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const auto shards = static_cast<size_t>(steps[i].shards);
    const auto sum = [&](const std::vector<double>& v) {
      return dist::pairwise_sum(
                 std::vector<double>(v.begin() + static_cast<std::ptrdiff_t>(begin),
                                     v.begin() + static_cast<std::ptrdiff_t>(begin + shards)),
                 std::plus<>()) /
             static_cast<double>(shards);
    };
    out[i].lm_loss = sum(shard_lm);
    out[i].aux_loss = sum(shard_aux);
    out[i].loss = out[i].lm_loss + out[i].aux_loss;
    begin += shards;
  }
  return out;
}

// One optimizer step on `batch` (the whole batch of the step, anywhere; each rank passes the same
// one) split as `split` says: each shard's loss is backpropagated with gradient 1 / shards (exact
// for a power of two), the gradients are summed across the ranks, so every rank holds the
// gradient of the whole batch's mean loss; then clipping on its global norm and AdamW, the same
// on every rank. The load-balancing loss uses the whole batch's routed shares (WholeBatchCounts).
// grad_clip <= 0 measures the norm without clipping. The losses and the norm are read back before
// the update (a non-finite norm throws there, naming the first parameter whose gradient is not
// finite, and nothing is updated); queue_step leaves them on the device instead.
inline StepResult train_step(
    const nn::TransformerLM& model, optim::AdamW& optimizer, const data::Batch& batch,
    const nn::RoutingStep& at, float lr, double grad_clip, const BatchSplit& split = {},
    const std::function<void(const nn::LmOutput&)>& inspect_gradients = nullptr) {
  QueuedStep queued =
      detail::backward_and_clip(model, optimizer, batch, at, grad_clip, split, inspect_gradients);
  queued.norm = optimizer.grad_norm_record();
  nn::LmOutput output = queued.result.output;
  std::vector<QueuedStep> one;
  one.push_back(std::move(queued));
  // The losses and the norm in one copy; a non-finite norm throws before the update.
  StepResult result = std::move(read_steps(std::move(one)).front());
  optimizer.accept_grad_norm(result.grad_norm);
  result.output = std::move(output);
  optimizer.step(lr);
  optimizer.zero_grad();
  return result;
}

// train_step that makes the host wait for nothing on CUDA: the step's losses and gradient norm
// stay on the device until read_steps reads them (with later steps', in one copy). A non-finite
// norm makes the update skip on the device (AdamW::clip_grad_norm), and read_steps' caller finds
// it (train::RunReports throws, naming the step). The result does not keep the forward pass.
inline QueuedStep queue_step(const nn::TransformerLM& model, optim::AdamW& optimizer,
                             const data::Batch& batch, const nn::RoutingStep& at, float lr,
                             double grad_clip, const BatchSplit& split = {}) {
  QueuedStep queued =
      detail::backward_and_clip(model, optimizer, batch, at, grad_clip, split, nullptr);
  queued.result.output = {};
  queued.norm = optimizer.grad_norm_record();
  optimizer.step(lr);
  optimizer.zero_grad();
  return queued;
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
