// GradientSync sums the parameters' gradients across the ranks of a data-parallel step, in a few
// buckets, each started as soon as its gradients are final (the way PyTorch DDP and llm.c
// overlap communication with backward).
//
// Buckets: the parameters in reverse order (backward produces the last layers' gradients first),
// cut into runs of about bucket_bytes. A bucket is started when the backward pass has told
// (detail::LeafReady) that every gradient in it is final; buckets start strictly in order, so that
// every rank issues the same collectives in the same order whatever its graph looked like.
// MPI advances a non-blocking collective only inside MPI calls, so each leaf notice also tests the
// buckets in flight. finish() starts what is left, waits, and writes the sums into .grad().
//
// The sum is exact, not merely close: host buckets are gathered (MPI_Iallgather), every rank's
// values on every rank, and each rank adds them itself in rank order in dist::PairwiseSum's tree,
// the order in which one process adds the same shards as micro-batches (MPI_Allreduce promises
// no order). With micro-batches (train.grad_accum), each gradient is first summed over this rank's
// micro-batches (ShardGradients, given to begin()) just before its bucket is packed. CUDA
// gradients go through NCCL's all-reduce, in place, one group per bucket: exact for 2 ranks (a
// sum of two does not depend on its order), in NCCL's order beyond.
//
// Parameters in an optimiser arena (rex/optim/arena.hpp; every rank built the same one): a bucket
// of consecutive parameters is then a range of the arena's gradient buffer, packed with one copy
// and reduced as one array (padding and parameters without a gradient hold zeros there, and
// stay zero), where other buckets go parameter by parameter. The sums are the same per element.
//
// A parameter with no gradient on some rank (an expert no local token was routed to) counts as
// zero there: the sum is then the one-process gradient. Whether it has a gradient at all must be
// the same on every rank, as in one process, because AdamW skips parameters without one (no step
// count, no decay): each bucket carries one flag per parameter (1 where this rank has a
// gradient), and a parameter gets a gradient where any rank had one.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "rex/autograd/engine.hpp"
#include "rex/core/factory.hpp"
#include "rex/dist/communicator.hpp"
#include "rex/dist/pairwise_sum.hpp"
#include "rex/optim/arena.hpp"

namespace rex::dist {

class GradientSync {
 public:
  // params: leaf tensors that require a gradient, on one device.
  GradientSync(Communicator& comm, std::vector<Tensor> params,
               size_t bucket_bytes = size_t{4} << 20)
      : comm_(comm), params_(std::move(params)) {
    REX_CHECK(!params_.empty(), "GradientSync: no parameters");
    size_t bytes = 0;
    for (size_t i = params_.size(); i-- > 0;) {
      const Tensor& p = params_[i];
      REX_CHECK(p.requires_grad() && p.is_leaf(), "GradientSync: parameter ", i,
                " is not a leaf that requires a gradient");
      REX_CHECK(p.device() == params_.front().device(),
                "GradientSync: the parameters are on different devices");
      if (buckets_.empty() || bytes >= bucket_bytes) {
        buckets_.emplace_back();
        bytes = 0;
      }
      Bucket& b = buckets_.back();
      b.params.push_back(i);
      b.offsets.push_back(b.values);
      b.values += static_cast<size_t>(p.numel());
      bytes += static_cast<size_t>(p.numel()) * sizeof(float);
      bucket_of_[p.impl().autograd.get()] = {buckets_.size() - 1, b.params.size() - 1};
    }
    on_cuda_ = params_.front().device().is_cuda();
    for (Bucket& b : buckets_) {
      b.range = arena_range(b);
      if (b.range.defined()) b.values = static_cast<size_t>(b.range.numel());
      b.buffer.resize(on_cuda_ ? b.params.size() : b.values + b.params.size());
      if (!on_cuda_) b.gathered.resize(b.buffer.size() * static_cast<size_t>(comm_.size()));
    }
  }
  GradientSync(const GradientSync&) = delete;
  GradientSync& operator=(const GradientSync&) = delete;

  size_t buckets() const { return buckets_.size(); }
  // Buckets packed and reduced as one range of an optimiser arena's gradient buffer.
  size_t arena_buckets() const {
    return static_cast<size_t>(std::count_if(buckets_.begin(), buckets_.end(),
                                             [](const Bucket& b) { return b.range.defined(); }));
  }
  // Buckets of the last step started while backward was still running (the rest: in finish()).
  size_t started_during_backward() const { return started_early_; }
  // Seconds the last finish() took: the communication backward did not hide.
  double exposed_seconds() const { return exposed_seconds_; }
  // overlap = false starts every bucket in finish(), after backward (to measure what overlap
  // saves).
  void set_overlap(bool overlap) { overlap_ = overlap; }
  Communicator& communicator() const { return comm_; }

  // Call before the backward pass whose gradients complete the step; `local` holds this rank's
  // earlier micro-batches (null: there are none).
  void begin(ShardGradients* local = nullptr) {
    local_ = local;
    for (Bucket& b : buckets_) {
      b.ready = 0;
      b.is_ready.assign(b.params.size(), false);
    }
    next_to_start_ = 0;
    started_early_ = 0;
  }

  // The hook for that backward pass (detail::run_backward's on_leaf_ready).
  detail::LeafReady hook() {
    return [this](detail::AutogradMeta& leaf) { leaf_ready(leaf); };
  }

  // Starts the buckets not yet started, waits for all and writes the sums into the gradients.
  void finish() {
    const auto began = std::chrono::steady_clock::now();
    while (next_to_start_ < buckets_.size()) start(buckets_[next_to_start_++]);
    for (Bucket& b : buckets_) {
      b.request.wait();
      unpack(b);
    }
    exposed_seconds_ =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
  }

 private:
  struct Bucket {
    std::vector<size_t> params;   // indices into params_, in bucket order
    std::vector<size_t> offsets;  // each parameter's first value in the buffer (host path)
    // The bucket's span of an optimiser arena's gradient buffer when its parameters are
    // consecutive there (then `values` is its length), undefined otherwise.
    Tensor range;
    size_t values = 0;  // gradient elements in the bucket
    // Host: the values, then one has-gradient flag per parameter; gathered: every rank's buffer,
    // in rank order. CUDA: the flags only, summed.
    std::vector<float> buffer, gathered;
    std::vector<bool> is_ready;
    size_t ready = 0;
    Request request;
  };

  void leaf_ready(detail::AutogradMeta& leaf) {
    const auto it = bucket_of_.find(&leaf);
    if (it == bucket_of_.end() || !overlap_) return;  // not one of ours, or wait for finish()
    Bucket& b = buckets_[it->second.first];
    if (!b.is_ready[it->second.second]) {
      b.is_ready[it->second.second] = true;
      ++b.ready;
    }
    while (next_to_start_ < buckets_.size() &&
           buckets_[next_to_start_].ready == buckets_[next_to_start_].params.size()) {
      start(buckets_[next_to_start_++]);
      ++started_early_;
    }
    for (size_t i = 0; i < next_to_start_; ++i) buckets_[i].request.test();  // progress
  }

  // The arena range of a bucket whose parameters all have gradient homes in one buffer, one
  // after the other with only the arena's alignment padding between them; undefined otherwise.
  Tensor arena_range(const Bucket& b) const {
    std::vector<std::pair<int64_t, size_t>> homes;  // (offset, index into params_)
    for (const size_t i : b.params) {
      const detail::AutogradMeta* meta = params_[i].impl().autograd.get();
      if (!meta || !detail::has_grad_home(*meta, params_[i]) ||
          meta->grad_home.impl().storage !=
              params_[b.params.front()].impl().autograd->grad_home.impl().storage)
        return Tensor();
      homes.emplace_back(meta->grad_home.impl().offset, i);
    }
    std::sort(homes.begin(), homes.end());
    constexpr int64_t kAlign = optim::Arena::kAlignment;
    for (size_t k = 1; k < homes.size(); ++k) {
      const int64_t end = homes[k - 1].first + params_[homes[k - 1].second].numel();
      if (homes[k].first != (end + kAlign - 1) / kAlign * kAlign) return Tensor();
    }
    const int64_t last_end = homes.back().first + params_[homes.back().second].numel();
    const Tensor& first = params_[homes.front().second].impl().autograd->grad_home;
    return detail::make_view(first, 0, Shape{last_end - homes.front().first});
  }

  void start(Bucket& b) {
    const size_t n = b.params.size();
    float* flags = b.buffer.data() + (on_cuda_ ? 0 : b.values);
    for (size_t j = 0; j < n; ++j) {
      if (local_) local_->fold(params_[b.params[j]]);
      detail::AutogradMeta& meta = *params_[b.params[j]].impl().autograd;
      detail::settle_grads({&meta});  // whether a gated gradient is real (rex/autograd/graph.hpp)
      if (b.range.defined() && meta.grad.defined() && !detail::grad_is_home(meta))
        detail::set_leaf_grad(meta, meta.grad);  // into the arena range packed below
      const Tensor g = meta.grad;
      flags[j] = g.defined() ? 1.0f : 0.0f;
      if (on_cuda_ || b.range.defined()) continue;
      float* out = b.buffer.data() + b.offsets[j];
      const size_t count = static_cast<size_t>(params_[b.params[j]].numel());
      if (g.defined())
        std::memcpy(out, g.data<float>(), count * sizeof(float));
      else
        std::fill(out, out + count, 0.0f);
    }
    if (!on_cuda_) {
      if (b.range.defined())
        std::memcpy(b.buffer.data(), b.range.data<float>(), b.values * sizeof(float));
      b.request = comm_.start_all_gather(b.buffer.data(), b.buffer.size(), b.gathered.data());
      return;
    }
    b.request = comm_.start_all_reduce_sum(flags, n);
    b.request.wait();         // the flags decide which gradients exist before NCCL reduces them
    if (b.range.defined()) {  // one array; where no rank has a gradient, zeros stay zeros
      comm_.all_reduce_sum_device(b.range.device_data<float>(), b.values);
      for (size_t j = 0; j < n; ++j) {
        detail::AutogradMeta& meta = *params_[b.params[j]].impl().autograd;
        if (flags[j] != 0.0f) meta.grad = meta.grad_home;
      }
      return;
    }
    comm_.group([&] {
      for (size_t j = 0; j < n; ++j) {
        if (flags[j] == 0.0f) continue;  // no rank has this gradient
        detail::AutogradMeta& meta = *params_[b.params[j]].impl().autograd;
        const Tensor& p = params_[b.params[j]];
        if (!meta.grad.defined())  // an arena's view holds zeros while it has no gradient
          meta.grad =
              detail::has_grad_home(meta, p) ? meta.grad_home : zeros(p.shape(), p.device());
        comm_.all_reduce_sum_device(meta.grad.device_data<float>(),
                                    static_cast<size_t>(meta.grad.numel()));
      }
    });
  }

  // Adds the ranks' values of each parameter in rank order, in PairwiseSum's tree, into rank 0's
  // slice of `gathered`, and writes the sum into its gradient.
  void unpack(Bucket& b) {
    if (on_cuda_) return;  // reduced in place
    const size_t stride = b.buffer.size();
    if (b.range.defined()) {  // the range in one sum, then the flags
      const size_t count = b.values;
      auto add_into_earlier = [count](float* earlier, float* later) {
        for (size_t i = 0; i < count; ++i) earlier[i] += later[i];
        return earlier;
      };
      PairwiseSum<float*, decltype(add_into_earlier)> sum(add_into_earlier);
      for (size_t r = 0; r < static_cast<size_t>(comm_.size()); ++r)
        sum.push(b.gathered.data() + r * stride);
      std::memcpy(b.range.data<float>(), sum.total(), count * sizeof(float));
      for (size_t j = 0; j < b.params.size(); ++j) {
        bool any = false;
        for (size_t r = 0; r < static_cast<size_t>(comm_.size()); ++r)
          any = any || b.gathered[r * stride + b.values + j] != 0.0f;
        detail::AutogradMeta& meta = *params_[b.params[j]].impl().autograd;
        if (any) meta.grad = meta.grad_home;  // which now holds the sum
      }
      return;
    }
    for (size_t j = 0; j < b.params.size(); ++j) {
      bool any = false;
      for (size_t r = 0; r < static_cast<size_t>(comm_.size()); ++r)
        any = any || b.gathered[r * stride + b.values + j] != 0.0f;
      if (!any) continue;  // no rank has this gradient: none here either
      const Tensor& p = params_[b.params[j]];
      const auto count = static_cast<size_t>(p.numel());
      auto add_into_earlier = [count](float* earlier, float* later) {
        for (size_t i = 0; i < count; ++i) earlier[i] += later[i];
        return earlier;
      };
      PairwiseSum<float*, decltype(add_into_earlier)> sum(add_into_earlier);
      for (size_t r = 0; r < static_cast<size_t>(comm_.size()); ++r)
        sum.push(b.gathered.data() + r * stride + b.offsets[j]);
      const float* total = sum.total();
      detail::AutogradMeta& meta = *p.impl().autograd;
      if (!meta.grad.defined())
        meta.grad =
            detail::has_grad_home(meta, p) ? meta.grad_home : Tensor::empty(p.shape(), DType::f32);
      std::memcpy(meta.grad.data<float>(), total, count * sizeof(float));
    }
  }

  Communicator& comm_;
  std::vector<Tensor> params_;
  std::vector<Bucket> buckets_;
  std::unordered_map<detail::AutogradMeta*, std::pair<size_t, size_t>> bucket_of_;
  ShardGradients* local_ = nullptr;
  size_t next_to_start_ = 0, started_early_ = 0;
  double exposed_seconds_ = 0;
  bool on_cuda_ = false, overlap_ = true;
};

}  // namespace rex::dist
