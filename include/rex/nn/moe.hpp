// ReX-MoE: the expert table shared by a block of r layers, the per-layer router over the whole
// pool, PSR masking, top-k gating, the dropless sorted dispatch, and the auxiliary losses.
//
// Layer l belongs to block b = l / r. The block's ExpertTable holds P = rN SwiGLU experts, stored
// once; layer l "owns" entries [(l mod r) N, (l mod r + 1) N) in the sense that a vanilla model
// would have given it those, but its router W_l [P, d] scores all P of them. For a token h:
//   s = softmax(W_l h)                       router probabilities over the pool
//   s'_i = s_i keep_i  (masked: -1)          PSR: masked experts are out of the race
//   (g, i) = top-k of s'                     gates g_j = s'_{i_j}  (optionally g / sum g)
//   y = sum_j g_j E_{i_j}(h)  + sum over shared experts S(h)
// That is moe.gating = "softmax_topk", the paper's equations. "topk_softmax" (Megatron-LM's
// router's default) takes the top-k of the logits z = W_l h instead (masked: -inf) and gates
// g = softmax(z_{i_1}, ..., z_{i_k}); the balance loss still uses s.
// An expert chosen by several layers of its block is one set of parameter tensors used several
// times in the graph, so its gradient is the sum of every use (leaf gradients accumulate).
//
// Dispatch (dropless, deterministic, no capacity factor): plan_routing counting-sorts the T*k
// (token, slot) pairs by expert (on the tensors' device), the token rows are gathered in that order
// (dispatch_rows), each non-empty expert runs its SwiGLU on its contiguous segment (grouped_swiglu,
// rex/ops/moe.hpp), and each token's k outputs are weighted by its gates and summed (combine_slots,
// which reads them at the slots' sorted positions). Backward is the same graph read backwards: the
// gather's backward sums each token's k rows in sorted order, the combine's gives each sorted row
// its token's gradient times the gate, gate gradients are row dot products, weight gradients X^T dY
// per segment.
//
// Losses over the pool of size P, with f_i the share of the T*k routed slots sent to expert i and
// p_i the mean router probability of expert i over the T tokens (f from the whole step's batch
// when this pass sees part of it: WholeBatchCounts below):
//   load balance  alpha * P * sum_i f_i p_i     (1 * alpha when routing is uniform; balance_loss)
//   z-loss        beta * mean_t (logsumexp_i (W_l h_t)_i)^2
#pragma once

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "rex/nn/config.hpp"
#include "rex/nn/layers.hpp"
#include "rex/nn/psr.hpp"
#include "rex/ops/moe.hpp"
#include "rex/ops/reduce.hpp"
#include "rex/ops/softmax.hpp"
#include "rex/ops/topk.hpp"

namespace rex::nn {

// The P = rN experts of one block, stored once.
class ExpertTable : public Module {
 public:
  ExpertTable(int64_t size, int64_t dim, int64_t hidden, Generator& gen, float init_std,
              float out_std) {
    for (int64_t i = 0; i < size; ++i) {
      experts_.push_back(
          register_module("experts." + std::to_string(i),
                          std::make_shared<SwiGLU>(dim, hidden, gen, init_std, out_std)));
      gate_.push_back(experts_.back()->gate->weight);
      up_.push_back(experts_.back()->up->weight);
      down_.push_back(experts_.back()->down->weight);
    }
  }
  int64_t size() const { return static_cast<int64_t>(experts_.size()); }
  const SwiGLU& expert(int64_t i) const { return *experts_.at(static_cast<size_t>(i)); }
  // The weights of every expert, in table order, for grouped_swiglu.
  const std::vector<Tensor>& gate_weights() const { return gate_; }
  const std::vector<Tensor>& up_weights() const { return up_; }
  const std::vector<Tensor>& down_weights() const { return down_; }

 private:
  std::vector<std::shared_ptr<SwiGLU>> experts_;
  std::vector<Tensor> gate_, up_, down_;
};

// When a forward pass sees only part of a step's batch (one rank's share in data-parallel
// training, one micro-batch under gradient accumulation), the load-balancing loss must still use
// the routed shares f of the whole batch: f is a constant of the loss, and with the part's own f
// the gradient would differ from that of one pass over the whole batch. WholeBatchCounts turns
// the part's routed-slot counts of one layer into the whole batch's (rex/train/step.hpp).
class WholeBatchCounts {
 public:
  virtual ~WholeBatchCounts() = default;
  virtual std::vector<int64_t> of_layer(int64_t layer, const std::vector<int64_t>& part) = 0;
};

// Where the PSR mask comes from: the 0-based step and the run's seed; and, when this pass sees
// part of the step's batch, where that part starts (its first sequence's index in the whole batch,
// for per-sequence and per-token masks) and where the whole batch's routing counts come from.
struct RoutingStep {
  int64_t step = 0;
  uint64_t seed = 0;
  WholeBatchCounts* whole_batch = nullptr;  // null: this pass sees the whole batch
  int64_t first_sequence = 0;
};

// The routing plan of one step: the T*k slots (slot s = t k + j is token t's j-th choice)
// counting-sorted by expert (SlotOrder, rex/ops/moe.hpp), so that expert e's slots are the
// contiguous sorted positions [offsets[e], offsets[e + 1]) of counts.offsets(), in token order. On
// CUDA the plan is made and used on the device: the host reads its counts only when asked (a
// training loop on its log steps, for the routing report: train::read_steps).
using RoutingPlan = SlotOrder;

// The plan for indices [T, k] i32 with values in [0, pool), on the indices' device.
inline RoutingPlan plan_routing(const Tensor& indices, int64_t pool) {
  return sort_slots_by_expert(indices, pool);
}

// y [T, d] = sum_j gates[t, j] * table.expert(indices[t, j])(x[t]) by the sorted dispatch.
// x [T, d] f32, indices [T, k] i32 (values in [0, table.size())), gates [T, k] f32.
// If plan is given it receives the routing plan (its counts, the routed shares).
inline Tensor dispatch_experts(const Tensor& x, const Tensor& indices, const Tensor& gates,
                               const ExpertTable& table, RoutingPlan* plan = nullptr) {
  REX_CHECK(x.rank() == 2 && indices.rank() == 2 && gates.shape() == indices.shape() &&
                indices.dim(0) == x.dim(0) && x.dim(0) > 0,
            "dispatch_experts: expected x [T, d] with T > 0, indices and gates [T, k], got x ",
            x.shape(), ", indices ", indices.shape(), ", gates ", gates.shape());
  const RoutingPlan routing = plan_routing(indices, table.size());
  const Tensor y_sorted =
      grouped_swiglu(dispatch_rows(x, routing), routing.counts, table.gate_weights(),
                     table.up_weights(), table.down_weights());
  if (plan) *plan = routing;
  return combine_slots(y_sorted, routing, gates);
}

struct MoeOutput {
  Tensor y;                    // [T, d]
  Tensor aux_loss;             // scalar: load balance + z-loss, coefficients applied
  DeviceCounts expert_counts;  // routed slots per pool expert (on CUDA read when first asked)
  int64_t candidates = 0;      // N_t at this step
};

class MoeLayer : public Module {
 public:
  MoeLayer(const ModelConfig& config, int64_t layer, std::shared_ptr<ExpertTable> table,
           Generator& gen, float init_std, float out_std)
      : config_(config.moe), psr_(config.psr), layer_(layer), table_(std::move(table)) {
    router = register_module(
        "router", std::make_shared<Linear>(config.d_model, table_->size(), gen, init_std));
    for (int64_t i = 0; i < config_.shared_experts; ++i)
      shared.push_back(register_module(
          "shared." + std::to_string(i),
          std::make_shared<SwiGLU>(config.d_model, config_.d_expert, gen, init_std, out_std)));
  }

  // x [T, d] -> y [T, d], the auxiliary loss and the routing counts at this step (without
  // `measure`, as when decoding, only y). x holds whole sequences of sequence_length tokens (0:
  // x is one sequence), the first being sequence at.first_sequence of the step's batch, their
  // positions counted from first_position: the places of per-sequence and per-token PSR masks.
  MoeOutput forward(const Tensor& x, const RoutingStep& at, bool measure = true,
                    int64_t sequence_length = 0, int64_t first_position = 0) const {
    MoeOutput out;
    const Tensor logits = router->forward(x);  // [T, P]
    out.candidates = psr_candidates(psr_, config_.experts_per_layer, config_.reuse, at.step);
    const TokenPlaces places{x.dim(0), sequence_length > 0 ? sequence_length : x.dim(0),
                             at.first_sequence, first_position};
    const Tensor keep =
        psr_keep(psr_, config_, at.seed, at.step, layer_, places, logits.device());  // [P], [T, P]
    Tensor probs, gates;
    TopK top;
    if (config_.gating == "topk_softmax") {  // Megatron-LM: top-k of the logits, softmax over k
      probs = softmax(logits);
      top = topk(logits, config_.top_k, psr_topk_mask(keep, /*on_logits=*/true));
      gates = softmax(top.values);
    } else {  // the paper: softmax over the pool, top-k of the probabilities (one kernel on CUDA)
      SoftmaxTopK routed =
          softmax_topk(logits, config_.top_k, psr_topk_mask(keep, /*on_logits=*/false));
      probs = std::move(routed.probs);
      top = std::move(routed.top);
      gates = top.values;
      if (config_.renormalize) gates = gates / sum(gates, -1, /*keepdim=*/true);
    }

    RoutingPlan plan;
    out.y = dispatch_experts(x, top.indices, gates, *table_, &plan);
    out.expert_counts = plan.counts;
    for (const auto& expert : shared) out.y = out.y + expert->forward(x);
    if (!measure) return out;
    // The balance loss's routed shares: this pass's, made on the device, or the whole batch's.
    out.aux_loss = auxiliary_loss(
        logits, probs,
        at.whole_batch ? routed_shares(at.whole_batch->of_layer(layer_, plan.counts.host()))
                       : plan.routed_shares);
    return out;
  }

  // forward of one token x [d] into y [d] on the host, for TransformerLM::decode's step on the
  // CPU: the same routing (PSR mask, gating) and experts, by the CPU kernels forward's ops call
  // and, for the weight products, `weights`.
  void step_on_cpu(const float* x, float* y, const RoutingStep& at, int64_t position,
                   DecodeWeights& weights) const {
    const int64_t pool = table_->size(), k = config_.top_k, d = router->weight.dim(1);
    // The mask forward would give this token: its place is `position` in a sequence of the cache.
    const Tensor keep = psr_keep(psr_, config_, at.seed, at.step, layer_,
                                 TokenPlaces{1, 1, at.first_sequence, position}, Device::cpu());
    std::vector<float> logits(static_cast<size_t>(pool)), scores(static_cast<size_t>(pool));
    weights.times(x, router->weight, logits.data());
    // What top-k ranks: the logits or the probabilities, under forward's mask.
    const bool topk_softmax = config_.gating == "topk_softmax";
    if (topk_softmax) {
      scores = logits;
    } else {
      detail::cpu::softmax(logits.data(), scores.data(), 1, pool, Shape{1, pool});
    }
    std::vector<float> gates(static_cast<size_t>(k));
    std::vector<int32_t> chosen(static_cast<size_t>(k));
    detail::cpu::topk(scores.data(), detail::topk_hidden(psr_topk_mask(keep, topk_softmax), pool),
                      gates.data(), chosen.data(), 1, pool, k);
    if (topk_softmax) {
      detail::cpu::softmax(gates.data(), gates.data(), 1, k, Shape{1, k});
    } else if (config_.renormalize) {
      float total = 0;
      for (float g : gates) total += g;
      for (float& g : gates) g /= total;
    }
    // The chosen experts, then the shared ones: y = sum_j g_j E_j(x) + sum_s S_s(x), in that order.
    std::vector<const SwiGLU*> ffns;
    for (int32_t e : chosen) ffns.push_back(&table_->expert(e));
    for (const auto& expert : shared) ffns.push_back(expert.get());
    std::vector<float> ys(ffns.size() * static_cast<size_t>(d));
    swiglu_row_on_cpu(x, ffns, ys.data(), weights);
    std::fill_n(y, d, 0.0f);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = 0; i < d; ++i) y[i] += ys[j * d + i] * gates[j];
    for (size_t s = static_cast<size_t>(k); s < ffns.size(); ++s)
      for (int64_t i = 0; i < d; ++i) y[i] += ys[s * d + i];
  }

  const ExpertTable& table() const { return *table_; }

  std::shared_ptr<Linear> router;  // weight [P, d]
  std::vector<std::shared_ptr<SwiGLU>> shared;

 private:
  // Each expert's share of the routed slots, count / (T k), as the routing plan computes them.
  static Tensor routed_shares(const std::vector<int64_t>& counts) {
    int64_t slots = 0;
    for (int64_t c : counts) slots += c;
    std::vector<float> share(counts.size());
    for (size_t e = 0; e < counts.size(); ++e) share[e] = detail::routed_share(counts[e], slots);
    return from_vector(share);
  }

  // shares: the routed share of each expert in the whole batch (f, [P]).
  Tensor auxiliary_loss(const Tensor& logits, const Tensor& probs, const Tensor& shares) const {
    const int64_t pool = table_->size();
    Tensor loss =
        balance_loss(probs, shares.to(probs.device()),
                     static_cast<float>(config_.aux_loss_coef * static_cast<double>(pool)));
    if (config_.z_loss_coef > 0) {
      const Tensor row_max = max(logits, -1, /*keepdim=*/true).detach();
      const Tensor lse = row_max + log(sum(exp(logits - row_max), -1, /*keepdim=*/true));
      loss = loss + mean(lse * lse) * static_cast<float>(config_.z_loss_coef);
    }
    return loss;
  }

  MoeConfig config_;
  PsrConfig psr_;
  int64_t layer_;
  std::shared_ptr<ExpertTable> table_;
};

}  // namespace rex::nn
