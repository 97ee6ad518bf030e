// Progressive Scaling Routing (PSR): how many experts of its pool a layer may choose from at step
// t, which ones, and how the others are kept out of its top-k.
//
// A ReX layer's router scores a pool of P = rN experts (its block's table). PSR starts training
// with N candidates and widens to all rN:
//   linear:    N_t = N                                         t <= t_s
//              N_t = floor((1 + (r - 1)(t - t_s)/(t_e - t_s)) N)   t_s < t <= t_e
//              N_t = rN                                        t > t_e
//   stepwise:  N_t = N                                         t < t_s
//              N_t = 2N + floor((r - 2)(t - t_s)/(t_e - t_s)) N  t_s <= t < t_e
//              N_t = rN                                        t >= t_e
//              as the paper's 2.3B run has it (N = 64, r = 4: 128, 192 and 256 candidates from
//              steps 10k, 20k and 30k): 2N from t_s, a jump of N at r - 3 evenly spaced steps
//              between, rN from t_e (r = 2: one jump, to 2N at t_s). It leads the linear ramp
//              after each jump and trails it before the next;
//   none:      N_t = rN (plain ReX; also what r = 1 always gives).
// psr.masks chooses which N_t: "random" (the method as specified: any N_t of the pool, redrawn at
// every step) or "own_first" (a diagnostic variant: the layer's own N experts always, plus
// N_t - N of the borrowed ones, redrawn at every step).
// Integer arithmetic keeps the floor exact: floor((1 + a) N) = N + floor(a N).
//
// At every step, P - N_t experts of the pool are masked: top-k ranks their gating scores as -1,
// below every probability (in rex/nn/moe.hpp, through psr_topk_mask; the chosen gates and the
// gradients are those of zeroing them, since a masked expert is never chosen); with moe.gating =
// topk_softmax, it ranks their logits as -inf instead. psr.mask_scope says how many masks a step
// draws:
//   step:      one per layer, shared by every token of the step's batch (keep [P]);
//   sequence:  one per layer and sequence of the batch (keep [T, P], equal rows within a sequence);
//   token:     one per layer and token (keep [T, P]).
// With psr.tie_block the r layers of a block share their masks (the block's index replaces the
// layer's in the hash). Which experts a mask hides is a pure function of (seed, step, layer[,
// sequence[, position]]): a partial Fisher-Yates shuffle driven by a Generator seeded by hashing
// those values (rex/backend/psr_mask.hpp, where the CUDA kernel that makes the per-row masks on
// the device runs the same code). `sequence` is the sequence's index in the step's whole batch,
// not in a rank's or micro-batch's share, and `position` the token's in its sequence, so a split
// batch draws the masks of the unsplit one and a resumed run is identical to an uninterrupted
// one. t is the 0-based index of the optimizer step being taken.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "rex/backend/cuda/dispatch.hpp"
#include "rex/backend/psr_mask.hpp"
#include "rex/core/factory.hpp"
#include "rex/nn/config.hpp"
#include "rex/ops/elementwise.hpp"
#include "rex/ops/index.hpp"
#include "rex/ops/topk.hpp"

namespace rex::nn {

// N_t for a pool of r * N experts at step t.
inline int64_t psr_candidates(const PsrConfig& psr, int64_t experts_per_layer, int64_t reuse,
                              int64_t step) {
  const int64_t n = experts_per_layer, pool = reuse * experts_per_layer;
  if (psr.schedule == "none" || reuse == 1) return pool;
  const int64_t done = step - psr.t_start, span = psr.t_end - psr.t_start;
  if (psr.schedule == "stepwise") {
    if (step < psr.t_start) return n;
    if (step >= psr.t_end) return pool;
    return (2 + (reuse - 2) * done / span) * n;  // 2N + floor((r - 2)(t - t_s) / (t_e - t_s)) N
  }
  REX_CHECK(psr.schedule == "linear", "psr: unknown schedule \"", psr.schedule, "\"");
  if (step > psr.t_end) return pool;
  if (step <= psr.t_start) return n;
  return n + (reuse - 1) * n * done / span;  // N + floor((r - 1) N (t - t_s) / (t_e - t_s))
}

// Experts PSR never masks in a layer: pool indices [first, first + count). With psr.masks =
// "own_first" they are the layer's own N experts (so that while N_t = N the layer routes exactly as
// a vanilla one); with "random", none.
struct AlwaysKept {
  int64_t first = 0, count = 0;
};

inline AlwaysKept psr_always_kept(const PsrConfig& psr, const MoeConfig& moe, int64_t layer) {
  if (psr.masks != "own_first") return {};
  return {layer % moe.reuse * moe.experts_per_layer, moe.experts_per_layer};
}

// The layer index a layer's masks are drawn for: its own, or its block's under psr.tie_block.
inline int64_t psr_mask_layer(const PsrConfig& psr, const MoeConfig& moe, int64_t layer) {
  return psr.tie_block ? layer / moe.reuse : layer;
}

// keep[i] = 1 for the `candidates` experts of the pool that may be chosen at (seed, step, layer)
// in the step scope, 0 for the pool - candidates masked ones, drawn from the experts outside
// `kept`. `layer` is the mask's layer index (psr_mask_layer).
inline std::vector<uint8_t> psr_keep_mask(uint64_t seed, int64_t step, int64_t layer, int64_t pool,
                                          int64_t candidates, AlwaysKept kept = {}) {
  REX_CHECK(candidates >= std::max<int64_t>(kept.count, 1) && candidates <= pool,
            "psr: ", candidates, " candidates out of a pool of ", pool, " with ", kept.count,
            " always kept");
  detail::PsrMaskRows mask;
  mask.step_seed = detail::psr_step_seed(seed, step, layer);
  mask.rows = 1;
  mask.pool = pool;
  mask.masked = pool - candidates;
  mask.kept_first = kept.first;
  mask.kept_count = kept.count;
  std::vector<uint8_t> keep(static_cast<size_t>(pool));
  std::vector<int32_t> order(static_cast<size_t>(pool));
  detail::psr_mask_row(mask, mask.step_seed, order.data(), keep.data());
  return keep;
}

// Where a forward pass's T tokens sit in the step's batch: whole sequences of sequence_length
// tokens, the first being sequence first_sequence of the whole batch, their positions counted
// from first_position (a decode step continues its cache).
struct TokenPlaces {
  int64_t rows = 0, sequence_length = 0, first_sequence = 0, first_position = 0;
};

// The keep mask of layer `layer` (its own index) at step `step` for the tokens at `places`, on
// `device`: f32 [P] in the step scope (as psr_keep_mask), f32 [T, P] in the sequence and token
// scopes (row t the mask of token t), made on the device there. Undefined when nothing is masked.
inline Tensor psr_keep(const PsrConfig& psr, const MoeConfig& moe, uint64_t seed, int64_t step,
                       int64_t layer, const TokenPlaces& places, Device device) {
  const int64_t pool = moe.reuse * moe.experts_per_layer;
  const int64_t candidates = psr_candidates(psr, moe.experts_per_layer, moe.reuse, step);
  if (candidates == pool) return {};
  const int64_t mask_layer = psr_mask_layer(psr, moe, layer);
  const AlwaysKept kept = psr_always_kept(psr, moe, layer);
  if (psr.mask_scope == "step") {
    const std::vector<uint8_t> keep = psr_keep_mask(seed, step, mask_layer, pool, candidates, kept);
    return from_vector(std::vector<float>(keep.begin(), keep.end())).to(device);
  }
  REX_CHECK(psr.mask_scope == "sequence" || psr.mask_scope == "token", "psr: unknown mask_scope \"",
            psr.mask_scope, "\"");
  REX_CHECK(places.rows > 0 && places.sequence_length > 0 &&
                places.rows % places.sequence_length == 0 && places.first_sequence >= 0 &&
                places.first_position >= 0,
            "psr: ", places.rows, " tokens are not whole sequences of ", places.sequence_length);
  REX_CHECK(candidates >= std::max<int64_t>(kept.count, 1), "psr: ", candidates,
            " candidates out of a pool of ", pool, " with ", kept.count, " always kept");
  detail::PsrMaskRows mask;
  mask.step_seed = detail::psr_step_seed(seed, step, mask_layer);
  mask.scope = psr.mask_scope == "token" ? detail::PsrScope::token : detail::PsrScope::sequence;
  mask.rows = places.rows;
  mask.pool = pool;
  mask.masked = pool - candidates;
  mask.kept_first = kept.first;
  mask.kept_count = kept.count;
  mask.sequence_length = places.sequence_length;
  mask.first_sequence = places.first_sequence;
  mask.first_position = places.first_position;
  Tensor keep = Tensor::empty({mask.rows, pool}, DType::f32, device);
  if (device.is_cuda()) {
    detail::cuda_backend().psr_keep_rows(mask, keep.device_data<float>());
    return keep;
  }
  float* rows = keep.data<float>();
  std::vector<int32_t> order(static_cast<size_t>(pool));
  for (int64_t r = 0; r < mask.rows; ++r) {
    const bool repeats = mask.scope == detail::PsrScope::sequence && r % mask.sequence_length != 0;
    if (repeats) {  // a sequence's rows share its mask
      std::copy(rows + (r - 1) * pool, rows + r * pool, rows + r * pool);
    } else {
      detail::psr_mask_row(mask, detail::psr_row_seed(mask, r), order.data(), rows + r * pool);
    }
  }
  return keep;
}

// The PSR mask as top-k takes it, keep [P] or [T, P] from psr_keep (undefined: nothing masked).
// Ranking the probabilities (`on_logits` false), a masked expert scores -1, below every
// probability, so that even a probability that underflowed to 0 never ties with it; ranking the
// logits (topk_softmax gating), it scores -inf, so that the softmax over the chosen k would never
// see it. Top-k never picks one (k <= N_t), and gives it no gradient.
inline TopKMask psr_topk_mask(const Tensor& keep, bool on_logits) {
  return {keep, on_logits ? -std::numeric_limits<float>::infinity() : -1.0f};
}

}  // namespace rex::nn
