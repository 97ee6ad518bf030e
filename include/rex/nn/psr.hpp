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
// At every step, P - N_t experts of the pool are masked: psr_scores sets their gating scores to -1,
// below every probability, before top-k (in rex/nn/moe.hpp; the chosen gates and the gradients are
// those of zeroing them, since a masked expert is never chosen); with moe.gating = topk_softmax,
// psr_logits sets their logits to -inf instead. Which ones is a pure function of
// (seed, step, layer): a partial Fisher-Yates shuffle driven by a Generator seeded from those three
// values. The same step always masks the same experts, so a resumed run is identical to an
// uninterrupted one. t is the 0-based index of the optimizer step being taken.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "rex/core/factory.hpp"
#include "rex/core/random.hpp"
#include "rex/nn/config.hpp"
#include "rex/ops/elementwise.hpp"
#include "rex/ops/index.hpp"

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

// keep[i] = 1 for the `candidates` experts of the pool that may be chosen at (seed, step, layer),
// 0 for the pool - candidates masked ones, drawn from the experts outside `kept`.
inline std::vector<uint8_t> psr_keep_mask(uint64_t seed, int64_t step, int64_t layer, int64_t pool,
                                          int64_t candidates, AlwaysKept kept = {}) {
  REX_CHECK(candidates >= std::max<int64_t>(kept.count, 1) && candidates <= pool,
            "psr: ", candidates, " candidates out of a pool of ", pool, " with ", kept.count,
            " always kept");
  std::vector<uint8_t> keep(static_cast<size_t>(pool), 1);
  if (candidates == pool) return keep;
  Generator gen(mix64(mix64(seed ^ 0x50535200ull) ^ static_cast<uint64_t>(step)) ^
                mix64(static_cast<uint64_t>(layer)));
  std::vector<int64_t> order;  // the experts that may be masked
  for (int64_t e = 0; e < pool; ++e)
    if (e < kept.first || e >= kept.first + kept.count) order.push_back(e);
  const auto maskable = static_cast<int64_t>(order.size());
  // The first pool - candidates positions of a partial Fisher-Yates shuffle are the masked experts.
  for (int64_t i = 0; i < pool - candidates; ++i) {
    const int64_t j = i + static_cast<int64_t>(gen.below(static_cast<uint64_t>(maskable - i)));
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
    keep[static_cast<size_t>(order[static_cast<size_t>(i)])] = 0;
  }
  return keep;
}

// The router's scores with the PSR mask applied: s' = s keep + (keep - 1), probs [T, P], keep [P]
// from psr_keep_mask. A masked expert scores -1, below every probability, so that even a
// probability that underflowed to 0 never ties with it in top-k.
inline Tensor psr_scores(const Tensor& probs, const std::vector<uint8_t>& keep) {
  REX_CHECK(probs.rank() == 2 && probs.dim(1) == static_cast<int64_t>(keep.size()),
            "psr_scores: probs ", probs.shape(), " do not have one column per expert of a pool of ",
            keep.size());
  const Tensor keep_mask =
      from_vector(std::vector<float>(keep.begin(), keep.end())).to(probs.device());
  return probs * keep_mask + (keep_mask - 1.0f);
}

// The router's logits with the PSR mask applied, for topk_softmax gating: a masked expert's logit
// is -inf, so top-k never picks it (k <= N_t) and the softmax over the chosen k never sees it.
inline Tensor psr_logits(const Tensor& logits, const std::vector<uint8_t>& keep) {
  REX_CHECK(logits.rank() == 2 && logits.dim(1) == static_cast<int64_t>(keep.size()),
            "psr_logits: logits ", logits.shape(),
            " do not have one column per expert of a pool of ", keep.size());
  std::vector<float> masked(keep.size());
  for (size_t i = 0; i < keep.size(); ++i) masked[i] = keep[i] ? 0.0f : 1.0f;
  return masked_fill(logits, from_vector(masked).to(logits.device()),
                     -std::numeric_limits<float>::infinity());
}

}  // namespace rex::nn
