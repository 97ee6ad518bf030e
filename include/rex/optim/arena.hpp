// Arena: one flat buffer per role of an optimiser's parameters (values, gradients, AdamW's two
// moments), each parameter a range of it, so that clipping and AdamW cover every parameter in a
// fixed, small number of passes (on CUDA: launches) instead of one per tensor, and data-parallel
// buckets can be ranges of the gradient buffer.
//
// Building an arena rebinds each parameter in place: its TensorImpl (which the module's member,
// the named_parameters() registry and every other handle share) is pointed at its range of the
// values buffer, the way Tensor::move_to_ moves it to another device, so the model computes with
// the arena without knowing of it. Build it after the model is on its device (Module::to moves a
// parameter's storage away again; the optimiser then refuses to step, with a message).
//
// Gradients: each parameter's AutogradMeta gets a grad_home, its range of the gradient buffer;
// backward copies a leaf's first gradient into it and adds later ones in place
// (rex/autograd/engine.hpp), so after backward every gradient is a view of the arena. "Has a
// gradient" stays what it was, grad().defined(): a parameter that no gradient reached (an expert
// no token chose) has none, and AdamW skips it (no step count, no decay) as PyTorch does. While a
// parameter has no gradient its home holds zeros, so a pass over the whole gradient buffer (the
// clip's sum of squares) counts it as zero. zero_grad() keeps that in one fill of the buffer.
//
// Ranges start at multiples of 16 floats (64 bytes), the alignment of a tensor's own storage:
// Eigen's vectorised CPU loops round the same over a view as over a tensor of its own (their
// scalar head depends on the alignment), so the CPU arithmetic is bit for bit as before. The
// padding is zero in every buffer and never updated.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "rex/autograd/graph.hpp"
#include "rex/backend/cpu/arrays.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/core/factory.hpp"

namespace rex::optim {

class Arena {
 public:
  static constexpr int64_t kAlignment = 16;  // floats: 64 bytes

  struct Range {
    int64_t begin = 0, end = 0;  // element offsets into each buffer
  };

  Arena() = default;
  // params: f32 leaf tensors, all on one device (checked by the caller, AdamW). Their values are
  // copied in and each is rebound to its view; a gradient one already has is moved into its home.
  explicit Arena(const std::vector<Tensor>& params) {
    int64_t size = 0;
    for (const Tensor& p : params) {
      const int64_t begin = (size + kAlignment - 1) / kAlignment * kAlignment;
      ranges_.push_back({begin, begin + p.numel()});
      size = begin + p.numel();
    }
    size = (size + kAlignment - 1) / kAlignment * kAlignment;
    device_ = params.empty() ? Device::cpu() : params.front().device();
    values_ = zeros({size}, device_);
    grads_ = zeros({size}, device_);
    exp_avg_ = zeros({size}, device_);
    exp_avg_sq_ = zeros({size}, device_);
    for (size_t i = 0; i < params.size(); ++i) {
      Tensor p = params[i];
      view(values_, i, p.shape()).copy_(p);
      detail::TensorImpl& impl = p.impl();
      impl.storage = values_.impl().storage;
      impl.offset = values_.impl().offset + ranges_[i].begin;
      if (!impl.autograd) impl.autograd = std::make_shared<detail::AutogradMeta>();
      detail::AutogradMeta& meta = *impl.autograd;
      meta.grad_home = view(grads_, i, p.shape());
      if (meta.grad.defined() && detail::has_grad_home(meta, meta.grad))
        detail::set_leaf_grad(meta, meta.grad);
    }
  }

  Device device() const { return device_; }
  int64_t size() const { return values_.defined() ? values_.numel() : 0; }  // padding included
  const std::vector<Range>& ranges() const { return ranges_; }
  // The flat buffers, [size()] each.
  const Tensor& values() const { return values_; }
  const Tensor& grads() const { return grads_; }
  const Tensor& exp_avg() const { return exp_avg_; }
  const Tensor& exp_avg_sq() const { return exp_avg_sq_; }

  // Parameter i's range of `buffer` (one of the four above) as a tensor of `shape`.
  Tensor view(const Tensor& buffer, size_t i, const Shape& shape) const {
    return detail::make_view(buffer, ranges_.at(i).begin, shape);
  }

  // Whether `param` (parameter i) still computes with this arena: not moved or rebound since.
  bool holds(size_t i, const Tensor& param) const {
    const detail::TensorImpl& impl = param.impl();
    return impl.storage == values_.impl().storage &&
           impl.offset == values_.impl().offset + ranges_.at(i).begin;
  }

  // A gradient that code outside backward set as a tensor of its own (data-parallel sums) is
  // copied into its home, so that the passes over the gradient buffer see it.
  void adopt_grads(const std::vector<Tensor>& params) const {
    for (const Tensor& p : params) {
      detail::AutogradMeta* meta = p.impl().autograd.get();
      if (meta && meta->grad.defined() && !detail::grad_is_home(*meta) &&
          detail::has_grad_home(*meta, meta->grad))
        detail::set_leaf_grad(*meta, meta->grad);
    }
  }

  // Every parameter left without a gradient, and the gradient buffer zeroed in one fill.
  void zero_grad(const std::vector<Tensor>& params) const {
    if (grads_.defined()) Tensor(grads_).fill_(0.0f);
    for (const Tensor& p : params)
      if (p.impl().autograd) {
        p.impl().autograd->grad = Tensor();
        p.impl().autograd->grad_gates.clear();
      }
  }

 private:
  Device device_ = Device::cpu();
  std::vector<Range> ranges_;
  Tensor values_, grads_, exp_avg_, exp_avg_sq_;
};

}  // namespace rex::optim

namespace rex::detail {

// Each tensor's sum of squares in double (0 for an undefined one): CPU tensors in parallel with
// Eigen's fixed reduction tree, CUDA tensors by rex::cuda's fixed-grid reduction, all read back
// in one copy. The same sums on every run and at any thread count.
inline std::vector<double> sums_of_squares(const std::vector<Tensor>& grads) {
  const auto count = static_cast<int64_t>(grads.size());
  std::vector<double> own(grads.size(), 0.0);
  REX_PARALLEL_FOR(schedule(dynamic))
  for (int64_t i = 0; i < count; ++i) {
    const Tensor& g = grads[i];
    if (!g.defined() || on_cuda(g)) continue;  // CUDA: summed below, on the device
    own[i] = ConstArrayMap(g.data<float>(), g.numel()).cast<double>().square().sum();
  }
  std::vector<const float*> cuda_arrays;
  std::vector<int64_t> cuda_sizes, cuda_positions;
  for (int64_t i = 0; i < count; ++i) {
    const Tensor& g = grads[i];
    if (!g.defined() || !on_cuda(g)) continue;
    cuda_arrays.push_back(g.device_data<float>());
    cuda_sizes.push_back(g.numel());
    cuda_positions.push_back(i);
  }
  if (!cuda_arrays.empty()) {
    std::vector<double> cuda_sums(cuda_arrays.size());
    cuda_backend().sum_squares(cuda_arrays.data(), cuda_sizes.data(),
                               static_cast<int64_t>(cuda_arrays.size()), cuda_sums.data());
    for (size_t j = 0; j < cuda_sums.size(); ++j) own[cuda_positions[j]] = cuda_sums[j];
  }
  return own;
}

// The error of a non-finite gradient norm, naming the first of `names` whose sum is not finite.
inline Error non_finite_norm(double norm, const std::vector<double>& sums,
                             const std::vector<std::string>& names) {
  std::string first = "?";
  for (size_t i = 0; i < sums.size(); ++i)
    if (!std::isfinite(sums[i])) {
      first = names.at(i);
      break;
    }
  return Error(concat("clip_grad_norm: gradient norm is ", std::isnan(norm) ? "nan" : "inf",
                      "; first non-finite gradient in parameter ", first));
}

}  // namespace rex::detail
