// Module: the base of every layer, holding named parameters and named child modules.
//
// Names mirror the module tree: a parameter "weight" of the child "router" of the child "moe" of
// "layers.3" is "layers.3.moe.router.weight", the name used in checkpoints and by the PyTorch twin.
// A module may also *use* a module it does not own (a MoE layer uses its block's expert table);
// only the owner registers it, so every parameter has exactly one name and one optimizer state.
//
// Parameters are Tensor handles: the module's member and the registry share one buffer, and
// load_parameters copies values into that buffer, so handles held elsewhere stay valid.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "rex/autograd/graph.hpp"
#include "rex/core/error.hpp"

namespace rex::nn {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class Module {
 public:
  virtual ~Module() = default;
  Module() = default;
  Module(const Module&) = delete;  // parameters are shared handles: a copy would alias them
  Module& operator=(const Module&) = delete;

  // Every parameter of this module and its children, depth first in registration order.
  NamedTensors named_parameters() const {
    NamedTensors out;
    collect("", out);
    return out;
  }

  int64_t parameter_count() const {
    int64_t total = 0;
    for (const auto& [name, p] : named_parameters()) total += p.numel();
    return total;
  }

  // Copies values into the parameters by name. Every parameter must be present with its shape;
  // a name that matches no parameter is an error too (a checkpoint of another model).
  void load_parameters(const std::map<std::string, Tensor>& values, const std::string& what) {
    const NamedTensors params = named_parameters();
    for (const auto& [name, p] : params) {
      auto it = values.find(name);
      REX_CHECK(it != values.end(), what, ": parameter ", name, " is missing");
      const Tensor& v = it->second;
      REX_CHECK(v.dtype() == DType::f32 && v.shape() == p.shape(), what, ": parameter ", name,
                " has shape ", v.shape(), " (", v.dtype(), "), the model expects ", p.shape(),
                " (f32)");
    }
    REX_CHECK(values.size() == params.size(), what, ": holds ", values.size(),
              " tensors but the model has ", params.size(), " parameters (",
              first_unknown(values, params), " is not one of them)");
    for (const auto& [name, p] : params) {
      Tensor target = p;
      target.copy_(values.at(name));
    }
  }

  // Moves every parameter (and any gradient) onto `device` in place: the handles the model and
  // the optimiser hold all see the new storage. Build the optimiser after moving the model.
  void to(Device device) {
    for (auto& [name, p] : named_parameters()) {
      Tensor handle = p;
      handle.move_to_(device);
      const Tensor grad = handle.grad();
      if (grad.defined()) {
        Tensor moved_grad = grad;
        moved_grad.move_to_(device);
      }
    }
  }

 protected:
  // Registers a parameter (marked requires_grad) and returns it.
  Tensor register_parameter(const std::string& name, Tensor value) {
    value.requires_grad_();
    parameters_.emplace_back(name, value);
    return value;
  }

  template <class M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    children_.emplace_back(name, module);
    return module;
  }

 private:
  void collect(const std::string& prefix, NamedTensors& out) const {
    for (const auto& [name, p] : parameters_) out.emplace_back(prefix + name, p);
    for (const auto& [name, child] : children_) child->collect(prefix + name + ".", out);
  }

  static std::string first_unknown(const std::map<std::string, Tensor>& values,
                                   const NamedTensors& params) {
    std::map<std::string, bool> known;
    for (const auto& [name, p] : params) known[name] = true;
    for (const auto& [name, v] : values)
      if (!known.count(name)) return name;
    return "?";
  }

  NamedTensors parameters_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
};

}  // namespace rex::nn
