// AdamW with decoupled weight decay, written to reproduce torch.optim.AdamW (PyTorch 1.13, default
// flags: single-tensor path, no amsgrad, no maximize) so that a PyTorch twin can check one step.
//
// The update follows PyTorch's order of operations. Per parameter that has a gradient:
//   step += 1                                  (per-parameter count; no gradient, no advance)
//   p *= 1 - lr * weight_decay                 (only for parameters with decay = true)
//   m = m * beta1 + (1 - beta1) * g            (exp_avg.mul_(beta1).add_(g, alpha=1 - beta1))
//   v = v * beta2 + (1 - beta2) * g * g        (exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2))
//   denom = sqrt(v) / sqrt(1 - beta2^step) + eps
//   p += (-lr / (1 - beta1^step)) * m / denom  (addcdiv_)
// Scalars are Python floats in PyTorch, so they are computed here in double from the options and
// rounded to f32 where they meet a tensor; elementwise work is f32. The decay is its own pass, as
// PyTorch's param.mul_ is, so the decayed value is rounded before the update is added. Whether the
// compiler fuses a multiply and an add into an FMA (PyTorch's vectorised CPU add does) can still
// move the last bit, which is why the twin compares with a tolerance of a few ulps.
//
// The optimiser keeps its parameters in an Arena (rex/optim/arena.hpp): at construction the
// parameters are rebound to views of one values buffer, their gradients to views of one gradient
// buffer, and the moments are views of two more. The update of each element is the same as with
// tensors of their own (the CPU runs the same per-parameter Eigen code over the views, bit for bit;
// on CUDA one launch covers up to 96 parameters, every element in the same order of operations).
// The moments are allocated (as zeros) at construction, so state() is complete for parameters
// that never stepped. state() and load_state() copy values: a checkpoint never aliases the
// optimiser's buffers, which keep changing as it steps.
//
// Global-norm clipping over the arena (clip_grad_norm, then step): on the CPU as
// rex::optim::clip_grad_norm does it (per-parameter sums in parameter order, the gradients scaled
// in place); on CUDA one reduction over the gradient buffer and a one-block kernel leave the norm
// and the clip factor on the device, and step() multiplies each gradient by the factor as it reads
// it: no host wait, the norm comes back only when grad_norm() asks for it.
//
// An expert's gradient from a routing plan that stayed on the device is gated by its count
// (rex::detail::GradGate). On CUDA the step counts live on the device, and a small kernel
// (adamw_prepare) reads the gates there, advances the counts of the real gradients and computes
// each parameter's step size from a table of bias corrections that the host keeps ahead of every
// count (the same doubles as the CPU's): no host wait. On the CPU the gates are settled first.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "rex/autograd/graph.hpp"
#include "rex/backend/cpu/arrays.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/core/factory.hpp"
#include "rex/optim/arena.hpp"

namespace rex::optim {

struct AdamWOptions {
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
};

// tensor: a leaf f32 tensor that requires a gradient; decay = false exempts it from weight decay
// (norm gains, biases).
struct Parameter {
  std::string name;
  Tensor tensor;
  bool decay = true;
};

// One Parameter per (name, tensor) pair, e.g. from nn::Module::named_parameters(), with the
// paper's decay rule: matrices decay, vectors (norm gains, biases) do not.
inline std::vector<Parameter> decay_matrices(
    const std::vector<std::pair<std::string, Tensor>>& named) {
  std::vector<Parameter> params;
  for (const auto& [name, tensor] : named) params.push_back({name, tensor, tensor.rank() >= 2});
  return params;
}

class AdamW {
 public:
  AdamW(std::vector<Parameter> params, AdamWOptions options = {})
      : params_(std::move(params)), options_(options) {
    const AdamWOptions& o = options_;
    REX_CHECK(o.beta1 >= 0.0f && o.beta1 < 1.0f, "AdamW: beta1 ", o.beta1, " is not in [0, 1)");
    REX_CHECK(o.beta2 >= 0.0f && o.beta2 < 1.0f, "AdamW: beta2 ", o.beta2, " is not in [0, 1)");
    REX_CHECK(o.eps >= 0.0f && std::isfinite(o.eps), "AdamW: eps ", o.eps,
              " is not a finite non-negative number");
    REX_CHECK(o.weight_decay >= 0.0f && std::isfinite(o.weight_decay), "AdamW: weight_decay ",
              o.weight_decay, " is not a finite non-negative number");
    std::set<std::string> names;
    for (const Parameter& p : params_) {
      REX_CHECK(!p.name.empty(), "AdamW: a parameter has an empty name");
      REX_CHECK(names.insert(p.name).second, "AdamW: duplicate parameter name '", p.name, "'");
      REX_CHECK(p.tensor.defined(), "AdamW: parameter '", p.name, "' is an undefined tensor");
      REX_CHECK(p.tensor.dtype() == DType::f32, "AdamW: parameter '", p.name, "' is ",
                p.tensor.dtype(), ", not f32");
      REX_CHECK(p.tensor.is_leaf(), "AdamW: parameter '", p.name,
                "' is not a leaf (it was produced by an op); pass the parameter tensor itself");
    }
    std::vector<Tensor> tensors;
    std::map<const detail::TensorImpl*, std::string> seen;  // each tensor gets one range
    for (const Parameter& p : params_) {
      const auto [at, inserted] = seen.emplace(&p.tensor.impl(), p.name);
      REX_CHECK(inserted, "AdamW: parameters '", at->second, "' and '", p.name,
                "' are the same tensor");
      REX_CHECK(p.tensor.device() == params_.front().tensor.device(), "AdamW: parameter '", p.name,
                "' is on ", p.tensor.device(), " but '", params_.front().name, "' is on ",
                params_.front().tensor.device(), "; move the whole model to one device first");
      tensors.push_back(p.tensor);
    }
    arena_ = Arena(tensors);
    for (size_t i = 0; i < params_.size(); ++i) {
      const Shape& shape = params_[i].tensor.shape();
      slots_.push_back(
          {arena_.view(arena_.exp_avg(), i, shape), arena_.view(arena_.exp_avg_sq(), i, shape), 0});
    }
    if (arena_.device().is_cuda()) {  // the step counts and each step's scalars on the device
      device_steps_ = detail::cuda_buffer(params_.size() * sizeof(int32_t));
      detail::device_memory().fill32(device_steps_.get(), static_cast<int64_t>(params_.size()), 0);
      step_scalars_ = detail::cuda_buffer(params_.size() * sizeof(detail::AdamWStepScalars));
    }
  }
  // Copies would share the moment buffers while counting steps apart.
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;
  AdamW(AdamW&&) = default;
  AdamW& operator=(AdamW&&) = default;

  // One update of every parameter that has a gradient, in place (through data<float>()).
  void step(float lr) {
    REX_CHECK(lr >= 0.0f && std::isfinite(lr), "AdamW::step: learning rate ", lr,
              " is not a finite non-negative number");
    NoGradGuard no_grad;
    const double lr_d = lr;
    const float beta1 = options_.beta1, beta2 = options_.beta2, eps = options_.eps;
    const auto one_minus_beta1 = static_cast<float>(1.0 - static_cast<double>(beta1));
    const auto one_minus_beta2 = static_cast<float>(1.0 - static_cast<double>(beta2));
    const auto keep = static_cast<float>(1.0 - lr_d * static_cast<double>(options_.weight_decay));
    // Every parameter must still compute with the arena, and every gradient be on its device.
    // Checked before any update, outside the parallel loop: an exception cannot leave an OpenMP
    // region. (The gradients are not settled here: on CUDA, AdamW decides on the device.)
    const auto count = static_cast<int64_t>(params_.size());
    for (int64_t i = 0; i < count; ++i) {
      const Tensor g = unsettled_grad(i);
      const Device device = params_[i].tensor.device();
      REX_CHECK(arena_.holds(static_cast<size_t>(i), params_[i].tensor) &&
                    (!g.defined() || g.device() == device),
                "AdamW::step: parameter '", params_[i].name, "' is on ", device,
                " but its optimiser state is not where the optimiser put it (state on ",
                arena_.device(), "); move the model before building the optimiser");
    }
    arena_.adopt_grads(tensors());
    const float* scale = clip_pending_ ? clip_factor() : nullptr;
    clip_pending_ = false;
    if (arena_.device().is_cuda()) {
      step_on_device(lr_d, keep, {beta1, one_minus_beta1, beta2, one_minus_beta2, eps}, scale);
      return;
    }
    // On the CPU every gradient's presence is known (a gated one, from a node of the caller's,
    // is settled first), and the parameters are independent: updated in parallel, each by one
    // thread.
    std::vector<detail::AutogradMeta*> leaves;
    for (const Parameter& p : params_) leaves.push_back(p.tensor.impl().autograd.get());
    detail::settle_grads(leaves);
    REX_PARALLEL_FOR(schedule(dynamic))
    for (int64_t i = 0; i < count; ++i) {
      const Tensor g = params_[i].tensor.grad();
      if (!g.defined()) continue;
      Slot& s = slots_[i];
      const detail::AdamWBias b = bias(++s.step);
      const auto neg_step_size = static_cast<float>(-(lr_d / b.bias1));
      const int64_t n = g.numel();
      // Eigen arrays vectorise the sqrt and the division, which a plain loop cannot be (std::sqrt
      // may set errno); the expressions keep PyTorch's order of operations.
      detail::ArrayMap w(params_[i].tensor.data<float>(), n), m(s.exp_avg.data<float>(), n),
          v(s.exp_avg_sq.data<float>(), n);
      const detail::ConstArrayMap grad(g.data<float>(), n);
      if (params_[i].decay) w *= keep;
      m = m * beta1 + one_minus_beta1 * grad;
      v = v * beta2 + one_minus_beta2 * grad * grad;
      w = w + neg_step_size * m / (v.sqrt() / b.bias2_sqrt + eps);
    }
  }

  // Global-norm clipping with torch.nn.utils.clip_grad_norm_'s rule (factor
  // min(1, max_norm / (norm + 1e-6)); max_norm <= 0 only measures), for the next step(). On the
  // CPU the norm is summed per parameter in parameter order and the gradients scaled in place, as
  // rex::optim::clip_grad_norm does, and a non-finite norm throws here. On CUDA the sum of squares
  // of the whole gradient buffer (zeros where a parameter has no gradient) and the factor are
  // computed on the device, which step() reads there; the gradients stay unscaled and nothing
  // comes back to the host until grad_norm() (which throws on a non-finite norm). A step() after
  // a non-finite norm on CUDA updates nothing (the factor is then NaN, which the kernel reads as
  // "skip"), so that a caller that reads the norm later (train::queue_step) never applies it.
  void clip_grad_norm(double max_norm) {
    NoGradGuard no_grad;
    arena_.adopt_grads(tensors());
    if (arena_.device().is_cuda()) {
      // A fresh buffer each call: grad_norm_record() hands out the last one.
      clip_ =
          Tensor::empty({4}, DType::f32, arena_.device());  // the norm (a double), then the factor
      detail::cuda_backend().clip_factor(arena_.grads().device_data<float>(), arena_.size(),
                                         max_norm, static_cast<double*>(clip_.device_bytes()),
                                         clip_factor());
      clip_pending_ = true;
      norm_known_ = false;
      return;
    }
    std::vector<Tensor> grads;
    for (const Parameter& p : params_) grads.push_back(p.tensor.grad());
    const std::vector<double> sums = detail::sums_of_squares(grads);
    double sum_sq = 0.0;
    for (const double s : sums) sum_sq += s;
    norm_ = std::sqrt(sum_sq);
    norm_known_ = true;
    if (!std::isfinite(norm_)) throw detail::non_finite_norm(norm_, sums, names());
    const double coef = max_norm / (norm_ + 1e-6);
    if (max_norm > 0.0 && coef < 1.0) {
      const auto scale = static_cast<float>(coef);
      const auto count = static_cast<int64_t>(grads.size());
      REX_PARALLEL_FOR(schedule(dynamic))
      for (int64_t i = 0; i < count; ++i)
        if (grads[i].defined()) detail::ArrayMap(grads[i].data<float>(), grads[i].numel()) *= scale;
    }
  }

  // The norm the last clip_grad_norm measured, as a record that later calls do not overwrite: a
  // tensor on the parameters' device whose bytes 0-7 hold it as a double. On CUDA it is still on
  // the device (nothing is read; a non-finite norm is found when the record is read).
  Tensor grad_norm_record() const {
    REX_CHECK(clip_.defined() || norm_known_,
              "AdamW::grad_norm_record: clip_grad_norm was not called");
    if (arena_.device().is_cuda()) return clip_;
    Tensor record = Tensor::empty({2});
    std::memcpy(record.data<float>(), &norm_, sizeof norm_);
    return record;
  }

  // The norm the last clip_grad_norm measured, before clipping (on CUDA one read from the device,
  // the first time it is asked). Throws, naming the first parameter whose gradient holds a NaN or
  // an infinity, when it is not finite.
  double grad_norm() {
    if (!norm_known_) {
      REX_CHECK(clip_.defined(), "AdamW::grad_norm: clip_grad_norm was not called");
      double norm = 0.0;
      detail::device_memory().copy(&norm, clip_.device_bytes(), sizeof norm,
                                   detail::DeviceCopy::device_to_host);
      accept_grad_norm(norm);
    }
    return norm_;
  }

  // For a caller that read grad_norm_record() itself (with other values, in one copy): takes
  // `norm` as the last clip's, and throws as grad_norm() does when it is not finite.
  void accept_grad_norm(double norm) {
    norm_ = norm;
    norm_known_ = true;
    if (!std::isfinite(norm_)) {
      std::vector<Tensor> grads;
      for (const Parameter& p : params_) grads.push_back(p.tensor.grad());
      throw detail::non_finite_norm(norm_, detail::sums_of_squares(grads), names());
    }
  }

  // Drops every parameter's gradient (the next backward() starts from nothing): one fill of the
  // arena's gradient buffer.
  void zero_grad() { arena_.zero_grad(tensors()); }

  const std::vector<Parameter>& parameters() const { return params_; }
  // The parameters' tensors, in order (handles to the arena's views).
  std::vector<Tensor> tensors() const {
    std::vector<Tensor> out;
    for (const Parameter& p : params_) out.push_back(p.tensor);
    return out;
  }
  const Arena& arena() const { return arena_; }
  const AdamWOptions& options() const { return options_; }

  // "<name>.exp_avg" and "<name>.exp_avg_sq" (f32, the parameter's shape) and "<name>.step" (i32,
  // shape {}) for every parameter; copies.
  std::map<std::string, Tensor> state() const {
    std::map<std::string, Tensor> out;
    const std::vector<int32_t> steps = step_counts();
    for (size_t i = 0; i < params_.size(); ++i) {
      const std::string& name = params_[i].name;
      out[name + ".exp_avg"] = slots_[i].exp_avg.copy_to(Device::cpu());
      out[name + ".exp_avg_sq"] = slots_[i].exp_avg_sq.copy_to(Device::cpu());
      Tensor step = Tensor::empty(Shape{}, DType::i32);
      step.data<int32_t>()[0] = steps[i];
      out[name + ".step"] = step;
    }
    return out;
  }

  // Copies a state() map back in. Every tensor is checked before anything is written, so a bad map
  // leaves the optimiser as it was. ".step" may have shape {} or {1}.
  void load_state(const std::map<std::string, Tensor>& state) {
    std::set<std::string> expected;
    const auto find = [&](const std::string& name, DType dtype) -> const Tensor& {
      expected.insert(name);
      const auto it = state.find(name);
      REX_CHECK(it != state.end(), "AdamW::load_state: missing tensor '", name, "'");
      REX_CHECK(it->second.defined(), "AdamW::load_state: tensor '", name, "' is undefined");
      REX_CHECK(it->second.dtype() == dtype, "AdamW::load_state: tensor '", name, "' is ",
                it->second.dtype(), ", expected ", dtype);
      return it->second;
    };
    const auto moment = [&](const Parameter& p, const char* suffix) {
      const std::string name = p.name + suffix;
      const Tensor& t = find(name, DType::f32);
      REX_CHECK(t.shape() == p.tensor.shape(), "AdamW::load_state: tensor '", name, "' has shape ",
                t.shape(), ", expected ", p.tensor.shape());
      return t;
    };
    std::vector<Slot> loaded;  // the checked source tensors, copied in once all passed
    for (const Parameter& p : params_) {
      Slot slot{moment(p, ".exp_avg"), moment(p, ".exp_avg_sq"), 0};
      const std::string name = p.name + ".step";
      const Tensor& step = find(name, DType::i32);
      REX_CHECK(step.shape() == Shape{} || step.shape() == Shape{1}, "AdamW::load_state: tensor '",
                name, "' has shape ", step.shape(), ", expected [] or [1]");
      slot.step = static_cast<int32_t>(step.copy_to(Device::cpu()).data<int32_t>()[0]);
      REX_CHECK(slot.step >= 0, "AdamW::load_state: tensor '", name, "' holds a negative step ",
                slot.step);
      loaded.push_back(std::move(slot));
    }
    for (const auto& [name, tensor] : state) {
      REX_CHECK(expected.count(name), "AdamW::load_state: unknown tensor '", name,
                "' (no parameter of this optimiser has that state)");
    }
    std::vector<int32_t> steps;
    for (size_t i = 0; i < slots_.size(); ++i) {  // into the arena's views, across devices
      slots_[i].exp_avg.copy_(loaded[i].exp_avg);
      slots_[i].exp_avg_sq.copy_(loaded[i].exp_avg_sq);
      slots_[i].step = loaded[i].step;
      steps.push_back(static_cast<int32_t>(loaded[i].step));
      max_step_ = std::max(max_step_, loaded[i].step);
    }
    if (device_steps_)
      detail::device_memory().copy(device_steps_.get(), steps.data(),
                                   steps.size() * sizeof(int32_t),
                                   detail::DeviceCopy::host_to_device);
  }

 private:
  struct Slot {
    Tensor exp_avg, exp_avg_sq;
    int64_t step = 0;
  };
  // Every parameter's step count (on CUDA one read from the device).
  std::vector<int32_t> step_counts() const {
    std::vector<int32_t> out(slots_.size());
    if (device_steps_) {
      detail::device_memory().copy(out.data(), device_steps_.get(), out.size() * sizeof(int32_t),
                                   detail::DeviceCopy::device_to_host);
    } else {
      for (size_t i = 0; i < slots_.size(); ++i) out[i] = static_cast<int32_t>(slots_[i].step);
    }
    return out;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const Parameter& p : params_) out.push_back(p.name);
    return out;
  }
  // CUDA: the clip's norm (a double, bytes 0-7) and factor (a float, bytes 8-11) on the device.
  float* clip_factor() const { return clip_.device_data<float>() + 2; }

  // Parameter i's gradient as backward left it (gated ones not settled: that would read the
  // device).
  Tensor unsettled_grad(int64_t i) const {
    const detail::AutogradMeta* meta = params_[static_cast<size_t>(i)].tensor.impl().autograd.get();
    return meta ? meta->grad : Tensor();
  }

  // Step s's bias corrections, in double as PyTorch's Python floats (the CPU's and the device's
  // table's).
  detail::AdamWBias bias(int64_t s) const {
    const double beta1 = options_.beta1, beta2 = options_.beta2;
    const double bias2 = 1.0 - std::pow(beta2, static_cast<double>(s));
    return {1.0 - std::pow(beta1, static_cast<double>(s)), static_cast<float>(std::sqrt(bias2))};
  }

  // The CUDA step: which gradients are real, the step counts and the step scalars on the device
  // (adamw_prepare: a gated gradient's counts are read there, not by the host), then one
  // adamw_segments launch per 96 parameters.
  void step_on_device(double lr, float keep, const detail::AdamWScalars& shared,
                      const float* scale) {
    // The table of bias corrections covers every step count this step can reach.
    if (bias_size_ <= max_step_ + 1) {
      bias_size_ = std::max<int64_t>({1024, 2 * bias_size_, max_step_ + 2});
      std::vector<detail::AdamWBias> table(static_cast<size_t>(bias_size_));
      for (int64_t s = 0; s < bias_size_; ++s) table[static_cast<size_t>(s)] = bias(s);
      bias_table_ = detail::cuda_buffer(table.size() * sizeof(detail::AdamWBias));
      detail::device_memory().copy(bias_table_.get(), table.data(),
                                   table.size() * sizeof(detail::AdamWBias),
                                   detail::DeviceCopy::host_to_device);
    }
    std::vector<detail::AdamWParamGates> with_grad;
    std::vector<const int64_t*> gates;
    std::vector<detail::AdamWSegment> segments;
    for (size_t i = 0; i < params_.size(); ++i) {
      const detail::AutogradMeta* meta = params_[i].tensor.impl().autograd.get();
      if (!meta || !meta->grad.defined()) continue;
      detail::AdamWParamGates p{static_cast<int32_t>(i), static_cast<int32_t>(gates.size()), 0, 0};
      bool real = meta->grad_gates.empty();
      for (const detail::GradGate& gate : meta->grad_gates) {
        if (gate.counts.known()) {  // read already: decided here
          real = real || gate.counts[static_cast<size_t>(gate.index)] != 0;
        } else {
          gates.push_back(gate.counts.device_offsets() + gate.index);
          ++p.gate_count;
        }
      }
      if (real) {
        gates.resize(static_cast<size_t>(p.gate_first));
        p.gate_count = 0;
      } else if (p.gate_count == 0) {
        continue;  // every gate was read, and none lets the gradient through
      }
      with_grad.push_back(p);
      const Arena::Range& r = arena_.ranges()[i];
      segments.push_back({r.begin, r.end, params_[i].decay ? keep : 1.0f, p.param});
    }
    const detail::CudaBackend& cuda = detail::cuda_backend();
    auto* step_scalars = static_cast<detail::AdamWStepScalars*>(step_scalars_.get());
    cuda.adamw_prepare(with_grad.data(), static_cast<int64_t>(with_grad.size()), gates.data(),
                       static_cast<int64_t>(gates.size()),
                       static_cast<int32_t*>(device_steps_.get()),
                       static_cast<const detail::AdamWBias*>(bias_table_.get()), lr, step_scalars);
    cuda.adamw_segments(arena_.values().device_data<float>(), arena_.grads().device_data<float>(),
                        arena_.exp_avg().device_data<float>(),
                        arena_.exp_avg_sq().device_data<float>(), segments.data(),
                        static_cast<int64_t>(segments.size()), shared, step_scalars, scale);
    if (!with_grad.empty()) ++max_step_;
  }

  std::vector<Parameter> params_;
  AdamWOptions options_;
  Arena arena_;
  std::vector<Slot> slots_;  // one per parameter, same order; the moments are arena views
  Tensor clip_;
  double norm_ = 0.0;
  bool norm_known_ = false, clip_pending_ = false;
  // CUDA: the parameters' step counts (i32, Slot::step is the CPU's), the scalars adamw_prepare
  // leaves, the table of bias corrections by step (bias_size_ entries) and a bound on every
  // step count.
  std::shared_ptr<void> device_steps_, step_scalars_, bias_table_;
  int64_t bias_size_ = 0, max_step_ = 0;
};

}  // namespace rex::optim
