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
// Moment buffers are allocated (as zeros) at construction, so state() is complete for parameters
// that never stepped. state() and load_state() copy values: a checkpoint never aliases the
// optimiser's buffers, which keep changing as it steps.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "rex/autograd/graph.hpp"
#include "rex/backend/cpu/arrays.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/core/factory.hpp"

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
      slots_.push_back({zeros(p.tensor.shape(), p.tensor.device()),
                        zeros(p.tensor.shape(), p.tensor.device()), 0});
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
    const double lr_d = lr, beta1_d = options_.beta1, beta2_d = options_.beta2;
    const float beta1 = options_.beta1, beta2 = options_.beta2, eps = options_.eps;
    const auto one_minus_beta1 = static_cast<float>(1.0 - beta1_d);
    const auto one_minus_beta2 = static_cast<float>(1.0 - beta2_d);
    const auto keep = static_cast<float>(1.0 - lr_d * static_cast<double>(options_.weight_decay));
    // Every tensor of one update must be on the parameter's device. Checked before any update,
    // outside the parallel loop: an exception cannot leave an OpenMP region.
    const auto count = static_cast<int64_t>(params_.size());
    for (int64_t i = 0; i < count; ++i) {
      const Tensor g = params_[i].tensor.grad();
      const Device device = params_[i].tensor.device();
      REX_CHECK(!g.defined() || (g.device() == device && slots_[i].exp_avg.device() == device),
                "AdamW::step: parameter '", params_[i].name, "' is on ", device,
                " but its gradient or optimiser state is not (state on ",
                slots_[i].exp_avg.device(), "); move the model before building the optimiser");
    }
    auto update = [&](int64_t i) {
      const Tensor g = params_[i].tensor.grad();
      Slot& s = slots_[i];
      ++s.step;
      const int64_t n = g.numel();
      const double bias1 = 1.0 - std::pow(beta1_d, static_cast<double>(s.step));
      const double bias2 = 1.0 - std::pow(beta2_d, static_cast<double>(s.step));
      const auto neg_step_size = static_cast<float>(-(lr_d / bias1));
      const auto bias2_sqrt = static_cast<float>(std::sqrt(bias2));
      if (detail::on_cuda(g)) {
        // One fused kernel per parameter, the same operations in the same order.
        const detail::AdamWScalars scalars{params_[i].decay ? keep : 1.0f,
                                           beta1,
                                           one_minus_beta1,
                                           beta2,
                                           one_minus_beta2,
                                           neg_step_size,
                                           bias2_sqrt,
                                           eps};
        detail::cuda_backend().adamw(params_[i].tensor.device_data<float>(), g.device_data<float>(),
                                     s.exp_avg.device_data<float>(),
                                     s.exp_avg_sq.device_data<float>(), n, scalars);
        return;
      }
      // Eigen arrays vectorise the sqrt and the division, which a plain loop cannot be (std::sqrt
      // may set errno); the expressions keep PyTorch's order of operations.
      detail::ArrayMap w(params_[i].tensor.data<float>(), n), m(s.exp_avg.data<float>(), n),
          v(s.exp_avg_sq.data<float>(), n);
      const detail::ConstArrayMap grad(g.data<float>(), n);
      if (params_[i].decay) w *= keep;
      m = m * beta1 + one_minus_beta1 * grad;
      v = v * beta2 + one_minus_beta2 * grad * grad;
      w = w + neg_step_size * m / (v.sqrt() / bias2_sqrt + eps);
    };
    auto has_grad_on = [&](int64_t i, bool cuda) {
      const Tensor g = params_[i].tensor.grad();
      return g.defined() && detail::on_cuda(g) == cuda;
    };
    // CUDA parameters one after another (their kernels share one stream); CPU parameters are
    // independent and updated in parallel, each by one thread.
    for (int64_t i = 0; i < count; ++i)
      if (has_grad_on(i, true)) update(i);
    REX_PARALLEL_FOR(schedule(dynamic))
    for (int64_t i = 0; i < count; ++i)
      if (has_grad_on(i, false)) update(i);
  }

  // Drops every parameter's gradient (the next backward() starts from nothing).
  void zero_grad() {
    for (Parameter& p : params_) p.tensor.zero_grad();
  }

  const std::vector<Parameter>& parameters() const { return params_; }
  const AdamWOptions& options() const { return options_; }

  // "<name>.exp_avg" and "<name>.exp_avg_sq" (f32, the parameter's shape) and "<name>.step" (i32,
  // shape {}) for every parameter; copies.
  std::map<std::string, Tensor> state() const {
    std::map<std::string, Tensor> out;
    for (size_t i = 0; i < params_.size(); ++i) {
      const std::string& name = params_[i].name;
      out[name + ".exp_avg"] = slots_[i].exp_avg.copy_to(Device::cpu());
      out[name + ".exp_avg_sq"] = slots_[i].exp_avg_sq.copy_to(Device::cpu());
      Tensor step = Tensor::empty(Shape{}, DType::i32);
      step.data<int32_t>()[0] = static_cast<int32_t>(slots_[i].step);
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
      return t.copy_to(p.tensor.device());
    };
    std::vector<Slot> loaded;
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
    slots_ = std::move(loaded);
  }

 private:
  struct Slot {
    Tensor exp_avg, exp_avg_sq;
    int64_t step = 0;
  };
  std::vector<Parameter> params_;
  AdamWOptions options_;
  std::vector<Slot> slots_;  // one per parameter, same order
};

}  // namespace rex::optim
