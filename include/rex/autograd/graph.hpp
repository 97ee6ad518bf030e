// The autograd graph: define-by-run, one node per op output.
//
// An op that has an input requiring a gradient calls detail::record(output, "name", {inputs},
// backward_fn). The node keeps the inputs' AutogradMeta (not their buffers) and a backward function
// that captured exactly what it needs. backward_fn takes the output gradient and returns one
// gradient per input (undefined where the input needs none); it may take a second argument, a
// vector<bool> saying which inputs need a gradient, to skip work, and a third, `waiting`: for each
// input, the gradient its other uses have already sent it (undefined where none has). A backward
// that adds waiting[i] into its gradient for input i in its own kernel takes it (std::move, which
// leaves it undefined) and returns the sum; the engine adds the ones not taken, one launch each,
// so taking one saves a launch where gradients meet (the residual stream, the inputs shared by q,
// k and v, by the router and the dispatch, the router's probabilities). A node marked
// adds_to_leaf_grads finds there instead, for each leaf input that has a .grad() already, that
// .grad() itself: taking it means adding the input's gradient into it in place and returning it
// (an expert table's weights, which the r layers sharing them reach one after another).
//
// Leaves (parameters and inputs marked with requires_grad_) accumulate into their .grad(); interior
// tensors pass gradients on. NoGradGuard turns recording off in a scope (backward runs under it, so
// gradient code builds no graph).
#pragma once

#include <algorithm>
#include <functional>
#include <memory>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "rex/core/device_counts.hpp"
#include "rex/core/tensor.hpp"

namespace rex {
namespace detail {

using GradList = std::vector<Tensor>;

// A gradient whose existence the device decides: it is real only where count `index` of `counts`
// is not zero. A MoE layer whose routing plan stayed on the device gives every expert a gradient
// (zeros for an expert no token chose) gated by its expert's count, so that "an expert no token
// chose has no gradient" (PyTorch's rule, which AdamW relies on) holds without a host wait during
// the step; the leaf's gradient is settled (kept or dropped) when the host first asks for it.
struct GradGate {
  DeviceCounts counts;  // undefined: no gate, the gradient is real
  int64_t index = 0;
};

using BackwardFn =
    std::function<GradList(const Tensor& grad, const std::vector<bool>& needs, GradList& waiting)>;

struct Node {
  std::string_view op;                                // the op's name, for error messages
  std::vector<std::shared_ptr<AutogradMeta>> inputs;  // null where an input needs no gradient
  std::vector<Shape> input_shapes;
  BackwardFn backward;                // null once released
  bool takes_waiting = false;         // whether backward may take its inputs' waiting gradients
  bool adds_to_leaf_grads = false;    // and add into its leaf inputs' .grad() in place
  std::vector<GradGate> input_gates;  // empty, or one per input: the gates of its gradients

  ~Node();
};

struct AutogradMeta {
  bool requires_grad = false;
  std::shared_ptr<Node> grad_fn;  // null for leaves
  Tensor grad;                    // accumulated gradient (leaves only)
  // Where a leaf's gradient lives when it has one: a view of an optimiser arena's gradient buffer
  // (rex/optim/arena.hpp), or undefined (each first gradient is then a tensor of its own). While
  // the leaf has no gradient, its home holds zeros; when it has one, grad is the home itself.
  Tensor grad_home;
  // Gates of a gradient that may not be real (rex::detail::GradGate): it is real where any gate
  // says so; empty when it is real. Until settled, the gradient holds zeros where it is not.
  std::vector<GradGate> grad_gates;
};

// Whether the leaf's first gradient goes into its home: one set on the same device.
inline bool has_grad_home(const AutogradMeta& leaf, const Tensor& like) {
  return leaf.grad_home.defined() && leaf.grad_home.device() == like.device() &&
         leaf.grad_home.shape() == like.shape();
}

// Whether the leaf's current gradient is its home.
inline bool grad_is_home(const AutogradMeta& leaf) {
  return leaf.grad.defined() && leaf.grad_home.defined() &&
         leaf.grad.impl().storage == leaf.grad_home.impl().storage &&
         leaf.grad.impl().offset == leaf.grad_home.impl().offset;
}

// Makes `value` the leaf's gradient: copied into its home when it has one (value stays the
// caller's), taken as it is otherwise.
inline void set_leaf_grad(AutogradMeta& leaf, const Tensor& value) {
  if (has_grad_home(leaf, value)) {
    const bool is_home = value.impl().storage == leaf.grad_home.impl().storage &&
                         value.impl().offset == leaf.grad_home.impl().offset;
    if (!is_home) Tensor(leaf.grad_home).copy_(value);
    leaf.grad = leaf.grad_home;
    return;
  }
  leaf.grad = value;
}

// Drops the leaf's gradient; a home is zeroed, so that it holds zeros again.
inline void drop_leaf_grad(AutogradMeta& leaf) {
  if (grad_is_home(leaf)) Tensor(leaf.grad_home).fill_(0.0f);
  leaf.grad = Tensor();
  leaf.grad_gates.clear();
}

// Decides whether the gated gradients of `leaves` are real, reading all their gates' counts from
// the device in one copy: a gradient no gate lets through is dropped (it holds zeros, so a home
// needs no fill).
inline void settle_grads(const std::vector<AutogradMeta*>& leaves) {
  std::vector<const DeviceCounts*> counts;
  for (const AutogradMeta* leaf : leaves)
    if (leaf)
      for (const GradGate& gate : leaf->grad_gates) counts.push_back(&gate.counts);
  if (counts.empty()) return;
  read_counts(counts);
  for (AutogradMeta* leaf : leaves) {
    if (!leaf || leaf->grad_gates.empty()) continue;
    bool real = false;
    for (const GradGate& gate : leaf->grad_gates)
      real = real || gate.counts[static_cast<size_t>(gate.index)] != 0;
    if (!real) leaf->grad = Tensor();
    leaf->grad_gates.clear();
  }
}

// The leaf's gradient as a tensor of the caller's (a copy when it lives in a home, which is
// zeroed), and the leaf left without one.
inline Tensor take_leaf_grad(AutogradMeta& leaf) {
  settle_grads({&leaf});
  Tensor g = grad_is_home(leaf) ? leaf.grad.clone() : leaf.grad;
  drop_leaf_grad(leaf);
  return g;
}

// Frees the chain of producer nodes iteratively: a graph thousands of nodes deep would otherwise
// recurse once per node while destroying itself and overflow the stack.
inline Node::~Node() {
  thread_local std::vector<std::shared_ptr<AutogradMeta>>* queue = nullptr;
  if (queue) {
    for (auto& input : inputs) queue->push_back(std::move(input));
    return;
  }
  std::vector<std::shared_ptr<AutogradMeta>> own = std::move(inputs);
  queue = &own;
  while (!own.empty()) {
    std::shared_ptr<AutogradMeta> last = std::move(own.back());
    own.pop_back();
    last.reset();  // may destroy a producer node, whose inputs join the queue
  }
  queue = nullptr;
}

inline bool& grad_mode_flag() {
  thread_local bool enabled = true;
  return enabled;
}

}  // namespace detail

inline bool grad_enabled() { return detail::grad_mode_flag(); }

// While alive, ops record no graph (for evaluation, optimiser updates, gradient code).
class NoGradGuard {
 public:
  NoGradGuard() : previous_(detail::grad_mode_flag()) { detail::grad_mode_flag() = false; }
  ~NoGradGuard() { detail::grad_mode_flag() = previous_; }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};

inline bool Tensor::requires_grad() const {
  return impl().autograd != nullptr && impl().autograd->requires_grad;
}

inline bool Tensor::is_leaf() const {
  return impl().autograd == nullptr || impl().autograd->grad_fn == nullptr;
}

inline Tensor& Tensor::requires_grad_(bool enabled) {
  REX_CHECK(is_leaf(), "requires_grad_: only leaf tensors can be marked (this one was produced by ",
            impl().autograd->grad_fn->op, "); use detach() first");
  REX_CHECK(!enabled || dtype() == DType::f32, "requires_grad_: ", dtype(),
            " tensors are not differentiable");
  if (!impl().autograd) impl().autograd = std::make_shared<detail::AutogradMeta>();
  impl().autograd->requires_grad = enabled;
  return *this;
}

inline Tensor Tensor::grad() const {
  if (!impl().autograd) return Tensor();
  detail::settle_grads({impl().autograd.get()});
  return impl().autograd->grad;
}

inline void Tensor::zero_grad() {
  if (impl().autograd) detail::drop_leaf_grad(*impl().autograd);
}

namespace detail {

// Attaches a node to `output` if grad mode is on and some input requires a gradient; returns
// output.
template <class Fn>
Tensor record(Tensor output, std::string_view op, const std::vector<Tensor>& inputs,
              Fn&& backward_fn) {
  auto needs_grad = [](const Tensor& in) { return in.defined() && in.requires_grad(); };
  if (!grad_enabled() || std::none_of(inputs.begin(), inputs.end(), needs_grad)) return output;
  auto node = std::make_shared<Node>();
  for (const Tensor& in : inputs) {
    node->inputs.push_back(needs_grad(in) ? in.impl().autograd : nullptr);
    node->input_shapes.push_back(in.defined() ? in.shape() : Shape{});
  }
  REX_CHECK(output.impl().autograd == nullptr, op,
            ": internal error, the output already has a node");
  node->op = op;
  if constexpr (std::is_invocable_v<Fn, const Tensor&, const std::vector<bool>&, GradList&>) {
    node->backward = std::forward<Fn>(backward_fn);
    node->takes_waiting = true;
  } else if constexpr (std::is_invocable_v<Fn, const Tensor&, const std::vector<bool>&>) {
    node->backward = [fn = std::forward<Fn>(backward_fn)](const Tensor& grad,
                                                          const std::vector<bool>& needs,
                                                          GradList&) { return fn(grad, needs); };
  } else {
    node->backward = [fn = std::forward<Fn>(backward_fn)](const Tensor& grad,
                                                          const std::vector<bool>&,
                                                          GradList&) { return fn(grad); };
  }
  auto meta = std::make_shared<AutogradMeta>();
  meta->requires_grad = true;
  meta->grad_fn = std::move(node);
  output.impl().autograd = std::move(meta);
  return output;
}

}  // namespace detail

inline Tensor Tensor::to(Device target) const {
  if (device() == target) return *this;
  return detail::record(copy_to(target), "to", {*this}, [from = device()](const Tensor& g) {
    return detail::GradList{g.copy_to(from)};
  });
}

}  // namespace rex
