// The order in which a data-parallel step adds its parts, fixed so that the sum does not depend on
// how the batch was split (docs/distributed.md, "Exact data parallel").
//
// A step's batch is cut into S shards (ranks x micro-batches); each shard gives a gradient and a
// loss. PairwiseSum adds such a sequence in one fixed tree: shards are pushed in order, and
// whenever the two newest partial sums cover the same number of shards they are added (earlier +
// later), as in a binary counter; total() then adds what is left, newest first. For S = 6 that is
// (s0 + s1 + s2 + s3) + (s4 + s5), each group itself pairwise. When each rank's A micro-batches
// form one partial sum, i.e. A is a power of two, the tree over S = N A shards is the tree over
// the N ranks' partial sums, so N ranks x A micro-batches add exactly as one process with N A
// micro-batches does. Memory: one partial sum per bit of S.
//
// ShardGradients keeps these partial sums for a step's parameter gradients across micro-batches.
// A parameter that no token of a shard reached has no gradient there; adding it to one that does
// adds zeros (x + 0, which turns -0 into +0 exactly as a rank that sends zeros does), and it has
// no gradient only when no shard gave one.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "rex/autograd/graph.hpp"
#include "rex/core/error.hpp"
#include "rex/ops/elementwise.hpp"

namespace rex::dist {

template <class T, class Add>
class PairwiseSum {
 public:
  explicit PairwiseSum(Add add = {}) : add_(std::move(add)) {}

  void push(T value) {
    int64_t shards = 1;
    while (!partial_.empty() && partial_.back().shards == shards) {
      value = add_(std::move(partial_.back().value), std::move(value));
      partial_.pop_back();
      shards *= 2;
    }
    partial_.push_back({shards, std::move(value)});
  }

  // The sum of everything pushed (at least one value); starts afresh.
  T total() {
    REX_CHECK(!partial_.empty(), "PairwiseSum: nothing to add");
    T sum = std::move(partial_.back().value);
    partial_.pop_back();
    for (; !partial_.empty(); partial_.pop_back())
      sum = add_(std::move(partial_.back().value), std::move(sum));
    return sum;
  }

 private:
  struct Partial {
    int64_t shards;
    T value;
  };
  std::vector<Partial> partial_;
  Add add_;
};

// The sum of values (at least one) in PairwiseSum's order.
template <class T, class Add>
T pairwise_sum(std::vector<T> values, Add add) {
  PairwiseSum<T, Add> sum(std::move(add));
  for (T& v : values) sum.push(std::move(v));
  return sum.total();
}

// Gradients of shards, either possibly undefined (no gradient): their sum, as a new tensor.
struct AddGradients {
  Tensor operator()(const Tensor& earlier, const Tensor& later) const {
    NoGradGuard no_grad;
    if (!earlier.defined()) return later.defined() ? add(later, 0.0f) : Tensor();
    return later.defined() ? add(earlier, later) : add(earlier, 0.0f);
  }
};

// The parameters' gradients summed over a step's micro-batches in PairwiseSum's order: after the
// backward pass of each micro-batch but the last, take() moves the gradients into the partial
// sums (each parameter is left without one, so the next backward starts from nothing); after the
// last, fold(p) makes p's gradient the sum over every micro-batch (once; a second call does
// nothing). fold may be called parameter by parameter as each gradient becomes final
// (rex/dist/gradient_sync.hpp); fold_all() then folds the rest.
class ShardGradients {
 public:
  explicit ShardGradients(const std::vector<Tensor>& params) : params_(params) {
    for (size_t i = 0; i < params_.size(); ++i) index_[params_[i].impl().autograd.get()] = i;
    sums_.resize(params_.size());
    folded_.assign(params_.size(), false);
  }

  void take() {
    for (size_t i = 0; i < params_.size(); ++i) {
      // A copy when the gradient lives in an optimiser arena, whose view is zeroed here.
      sums_[i].push(detail::take_leaf_grad(*params_[i].impl().autograd));
    }
  }

  void fold(const Tensor& param) {
    const auto it = index_.find(param.impl().autograd.get());
    REX_CHECK(it != index_.end(), "ShardGradients: not one of the step's parameters");
    fold(it->second);
  }

  // Folds every parameter not folded yet.
  void fold_all() {
    for (size_t i = 0; i < params_.size(); ++i) fold(i);
  }

 private:
  void fold(size_t i) {
    if (folded_[i]) return;
    folded_[i] = true;
    detail::AutogradMeta& meta = *params_[i].impl().autograd;
    sums_[i].push(detail::take_leaf_grad(meta));
    const Tensor total = sums_[i].total();
    if (total.defined()) detail::set_leaf_grad(meta, total);  // into its arena view, if any
  }

  std::vector<Tensor> params_;
  std::unordered_map<const detail::AutogradMeta*, size_t> index_;
  std::vector<PairwiseSum<Tensor, AddGradients>> sums_;
  std::vector<bool> folded_;
};

}  // namespace rex::dist
