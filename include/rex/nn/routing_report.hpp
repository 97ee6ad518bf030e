// Where the routed tokens went, in the method's terms: per layer, the share of routed slots each
// expert of its pool received, split into the layer's own experts and those borrowed from the other
// layers of its block (docs/method.md); how spread the routing is (entropy, load imbalance); and
// how much the layers of one block pick the same experts (the Jaccard index of their top-N
// experts, N = experts_per_layer, the number a vanilla layer would own). The counts are
// nn::LmOutput::expert_counts, summed over forward passes with add_expert_counts.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <numeric>
#include <vector>

#include "rex/nn/config.hpp"
#include "rex/nn/transformer.hpp"

namespace rex::nn {

// Per layer: routed slots per pool expert.
using ExpertCounts = std::vector<std::vector<int64_t>>;

// total += one forward pass's expert counts, per layer (total may start empty). On CUDA every
// layer's counts come from the device in one copy (one host wait), unless already read.
inline void add_expert_counts(ExpertCounts& total, const std::vector<DeviceCounts>& layers) {
  std::vector<const DeviceCounts*> unread;
  for (const DeviceCounts& counts : layers) unread.push_back(&counts);
  read_counts(unread);
  if (total.empty()) total.resize(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    auto& layer = total[l];
    layer.resize(static_cast<size_t>(layers[l].size()), 0);
    for (size_t e = 0; e < layer.size(); ++e) layer[e] += layers[l][e];
  }
}
inline void add_expert_counts(ExpertCounts& total, const LmOutput& out) {
  add_expert_counts(total, out.expert_counts);
}

struct LayerRouting {
  int64_t layer = 0;
  int64_t block = 0;                 // layer / reuse: the layers sharing one expert table
  std::vector<int64_t> own_experts;  // pool indices of the experts this layer owns
  std::vector<double> share;         // per pool expert: its share of the layer's routed slots
  double own_share = 0;              // sum of share over own_experts
  double borrowed_share = 0;         // 1 - own_share
  double entropy = 0;                // -sum share log share (nats; ln P when every expert is equal)
  double imbalance = 0;              // max share / mean share over the pool (1 when balanced)
  std::vector<int64_t> top_experts;  // the N experts with the largest share (ties: lower index)
  std::vector<double> jaccard;  // per layer of the block, in order: |top ∩ top'| / |top ∪ top'|
};

// |a ∩ b| / |a ∪ b| of two index sets (1 for two empty sets).
inline double jaccard_index(std::vector<int64_t> a, std::vector<int64_t> b) {
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  std::vector<int64_t> both, either;
  std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
  std::set_union(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(either));
  return either.empty() ? 1.0
                        : static_cast<double>(both.size()) / static_cast<double>(either.size());
}

inline std::vector<LayerRouting> routing_report(const MoeConfig& m, const ExpertCounts& counts) {
  std::vector<LayerRouting> layers;
  for (size_t l = 0; l < counts.size(); ++l) {
    double total = 0;
    for (int64_t v : counts[l]) total += static_cast<double>(v);
    const auto layer = static_cast<int64_t>(l);
    const int64_t first_own = layer % m.reuse * m.experts_per_layer;
    LayerRouting r;
    r.layer = layer;
    r.block = layer / m.reuse;
    for (size_t e = 0; e < counts[l].size(); ++e) {
      const double s = total > 0 ? static_cast<double>(counts[l][e]) / total : 0.0;
      r.share.push_back(s);
      const auto index = static_cast<int64_t>(e);
      if (index >= first_own && index < first_own + m.experts_per_layer) r.own_share += s;
    }
    for (int64_t e = first_own; e < first_own + m.experts_per_layer; ++e)
      r.own_experts.push_back(e);
    r.borrowed_share = 1.0 - r.own_share;
    double largest = 0;
    for (double sh : r.share) {
      if (sh > 0) r.entropy -= sh * std::log(sh);
      largest = std::max(largest, sh);
    }
    r.imbalance = largest * static_cast<double>(r.share.size());
    std::vector<int64_t> order(r.share.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return r.share[a] > r.share[b]; });
    const auto top = std::min<size_t>(order.size(), static_cast<size_t>(m.experts_per_layer));
    r.top_experts.assign(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(top));
    std::sort(r.top_experts.begin(), r.top_experts.end());
    layers.push_back(std::move(r));
  }
  for (LayerRouting& r : layers)
    for (const LayerRouting& other : layers)
      if (other.block == r.block)
        r.jaccard.push_back(jaccard_index(r.top_experts, other.top_experts));
  return layers;
}

}  // namespace rex::nn
