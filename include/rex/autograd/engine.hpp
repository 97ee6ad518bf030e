// The backward pass: reverse topological order over the nodes reachable from the root.
//
// Gradients arriving at the same node from several uses are summed before its backward function
// runs: by the engine, one addition each, or by the backward of the last use, when it takes them
// as `waiting` gradients (rex/autograd/graph.hpp) and adds them in its own kernel. Ops take them
// only where that gives the engine's bits (an addition, rounded as the engine's) or where their
// device has launches to save (CUDA: a product's beta = 1, a kernel's fused add); the CPU's
// compiler may fuse a product and an add into one FMA, so the CPU loops with products leave them
// to the engine. Gradients reaching a leaf are added into leaf.grad(), which therefore accumulates
// across uses and across backward() calls until zero_grad(). Accumulation writes leaf.grad() in
// place, so no other gradient may share its storage: the first one becomes leaf.grad() as it is
// only when nothing else holds or views it (a weight's fresh GEMM output, say), and is copied
// otherwise; the root gradient is always copied. Each node's backward function (and what it saved)
// is dropped as soon as it has run, unless retain_graph is set; running through it again is an
// error.
//
// A caller may ask to hear of each leaf as soon as its gradient is final (LeafReady): after the
// last node in the order that takes the leaf as an input has run (or was skipped, no gradient
// having reached it), nothing can add to that leaf any more. Data-parallel training starts
// reducing a bucket of gradients there while backward goes on with earlier layers.
#pragma once

#include <algorithm>
#include <functional>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "rex/autograd/graph.hpp"
#include "rex/backend/dispatch.hpp"
#include "rex/core/factory.hpp"

namespace rex::detail {

// Returns a + b as a new tensor (neither input may be written: either could be shared).
inline Tensor sum_of_grads(const Tensor& a, const Tensor& b) {
  Tensor out = Tensor::empty(a.shape(), DType::f32, a.device());
  add_into(a, b, out, "backward");
  return out;
}

// The additions of one node's gradients into CUDA leaves that already have one, made together
// once the node's gradients are all in: one add_pairs launch for many (an expert table's 3P
// weight gradients), binary's add for one. A leaf is added to at most once per batch.
class LeafAdds {
 public:
  void add(const Tensor& acc, const Tensor& g) {
    if (!on_cuda(g)) {
      add_into(acc, g, acc, "backward");
      return;
    }
    if (!pending_.insert(acc.device_data<float>()).second) {  // added to already: that one first
      flush();
      pending_.insert(acc.device_data<float>());
    }
    accs_.push_back(acc);
    gs_.push_back(g);
  }
  void flush() {
    if (accs_.size() == 1) {
      add_into(accs_[0], gs_[0], accs_[0], "backward");
    } else if (accs_.size() > 1) {
      std::vector<AddPair> pairs;
      for (size_t i = 0; i < accs_.size(); ++i)
        pairs.push_back(
            {accs_[i].device_data<float>(), gs_[i].device_data<float>(), accs_[i].numel()});
      cuda_backend().add_pairs(pairs.data(), static_cast<int64_t>(pairs.size()));
    }
    accs_.clear(), gs_.clear();  // the gradients may go: their memory is reused in stream order
    pending_.clear();
  }

 private:
  std::vector<Tensor> accs_, gs_;
  std::unordered_set<const float*> pending_;  // the accumulators in accs_
};

// The gates of a leaf's gradient once a gradient gated by `gate` (or real: null, or no counts) is
// added to it: a gated one leaves the sum gated by its gate too, unless the sum already was real.
inline void gate_after_add(AutogradMeta& leaf, const GradGate* gate) {
  if (gate == nullptr || !gate->counts.defined()) {
    leaf.grad_gates.clear();
  } else if (!leaf.grad_gates.empty()) {
    leaf.grad_gates.push_back(*gate);
  }
}

// acc += g; the first gradient is copied into the leaf's home when it has one (an optimiser
// arena's view), else taken over when nothing else reaches it and copied otherwise, so that a
// leaf's .grad() never aliases another tensor. The addition goes to `adds` when given (it is made
// when adds is flushed).
inline void accumulate_leaf_grad(AutogradMeta& leaf, const Tensor& g,
                                 const GradGate* gate = nullptr, LeafAdds* adds = nullptr) {
  const bool gated = gate != nullptr && gate->counts.defined();
  if (!leaf.grad.defined()) {
    if (has_grad_home(leaf, g)) {
      set_leaf_grad(leaf, g);
    } else {
      leaf.grad = g.is_sole_owner() ? g : g.clone();
    }
    leaf.grad_gates.clear();
    if (gated) leaf.grad_gates.push_back(*gate);
    return;
  }
  if (adds) {
    adds->add(leaf.grad, g);
  } else {
    add_into(leaf.grad, g, leaf.grad, "backward");
  }
  gate_after_add(leaf, gate);
}

// Nodes reachable from `root`, each before every node that produced one of its inputs.
inline std::vector<Node*> topological_order(Node* root) {
  std::vector<Node*> post_order;
  std::unordered_set<Node*> visited{root};
  std::vector<std::pair<Node*, size_t>> stack{{root, 0}};  // (node, next input to visit)
  while (!stack.empty()) {
    auto& [node, next] = stack.back();
    if (next < node->inputs.size()) {
      const auto& input = node->inputs[next++];
      Node* child = input ? input->grad_fn.get() : nullptr;
      if (child && visited.insert(child).second) stack.emplace_back(child, 0);
    } else {
      post_order.push_back(node);
      stack.pop_back();
    }
  }
  std::reverse(post_order.begin(), post_order.end());
  return post_order;
}

// Runs one node's backward on the gradient pending for it (none reached it: nothing to do) and
// passes the results on: to the nodes that produced its inputs, or into the leaves' .grad().
inline void backward_through(Node* node, std::unordered_map<Node*, Tensor>& pending,
                             bool retain_graph) {
  auto it = pending.find(node);
  if (it == pending.end()) return;
  Tensor grad = std::move(it->second);
  pending.erase(it);

  REX_CHECK(node->backward != nullptr, "backward: the graph through '", node->op,
            "' was released by an earlier backward(); pass retain_graph=true to that call to "
            "backpropagate through it twice");
  std::vector<bool> needs(node->inputs.size());
  for (size_t i = 0; i < needs.size(); ++i) needs[i] = node->inputs[i] != nullptr;
  // The gradients already sent to this node's inputs, for a backward that can add them itself
  // (each given once, to the first of the inputs that share it); those it leaves go back. Other
  // backwards get an empty list (no allocation). With adds_to_leaf_grads, the list holds instead
  // the .grad() of each leaf input that has one (once per leaf), which the backward may add into in
  // place.
  GradList waiting;
  if (node->takes_waiting) {
    waiting.resize(node->inputs.size());
    std::unordered_set<const AutogradMeta*> leaves_given;
    for (size_t i = 0; i < waiting.size(); ++i) {
      const AutogradMeta* input = node->inputs[i].get();
      if (input == nullptr) continue;
      if (node->adds_to_leaf_grads) {
        if (!input->grad_fn && input->grad.defined() && leaves_given.insert(input).second)
          waiting[i] = input->grad;
        continue;
      }
      if (!input->grad_fn) continue;
      auto slot = pending.find(input->grad_fn.get());
      if (slot == pending.end()) continue;
      waiting[i] = std::move(slot->second);
      pending.erase(slot);
    }
  }
  GradList grads = node->backward(grad, needs, waiting);
  if (!retain_graph) node->backward = nullptr;
  for (size_t i = 0; i < waiting.size(); ++i)
    if (waiting[i].defined() && node->inputs[i]->grad_fn)
      pending[node->inputs[i]->grad_fn.get()] = std::move(waiting[i]);

  REX_CHECK(grads.size() == node->inputs.size(), "backward of '", node->op, "' returned ",
            grads.size(), " gradients for ", node->inputs.size(), " inputs");
  LeafAdds adds;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!node->inputs[i] || !grads[i].defined()) continue;
    REX_CHECK(grads[i].shape() == node->input_shapes[i], "backward of '", node->op,
              "' returned a gradient of shape ", grads[i].shape(), " for input ", i, " of shape ",
              node->input_shapes[i]);
    AutogradMeta& input = *node->inputs[i];
    if (input.grad_fn) {
      Tensor& slot = pending[input.grad_fn.get()];
      slot = slot.defined() ? sum_of_grads(slot, grads[i]) : grads[i];
    } else {
      const GradGate* gate = node->input_gates.empty() ? nullptr : &node->input_gates[i];
      if (input.grad.defined() &&
          grads[i].device_data<float>() == input.grad.device_data<float>()) {
        gate_after_add(input, gate);  // the backward added into the leaf's .grad() itself
      } else {
        accumulate_leaf_grad(input, grads[i], gate, &adds);
      }
    }
  }
  adds.flush();
}

// Told of every leaf reached by a backward pass once its gradient is final, in the order they
// become final (a leaf that no gradient reached is told too: its .grad() is then as before).
using LeafReady = std::function<void(AutogradMeta& leaf)>;

// For each position of `order`, the leaves whose last use is the node at that position.
inline std::vector<std::vector<AutogradMeta*>> leaves_final_after(const std::vector<Node*>& order) {
  std::unordered_map<AutogradMeta*, size_t> last_use;
  for (size_t p = 0; p < order.size(); ++p)
    for (const auto& input : order[p]->inputs)
      if (input && !input->grad_fn) last_use[input.get()] = p;
  std::vector<std::vector<AutogradMeta*>> final_after(order.size());
  for (size_t p = 0; p < order.size(); ++p)  // in the node's input order, each leaf once
    for (const auto& input : order[p]->inputs)
      if (input && !input->grad_fn && last_use.at(input.get()) == p) {
        last_use[input.get()] = order.size();  // told once
        final_after[p].push_back(input.get());
      }
  return final_after;
}

inline void run_backward(const Tensor& root, const Tensor& root_grad, bool retain_graph,
                         const LeafReady& on_leaf_ready = nullptr) {
  REX_CHECK(root.requires_grad(),
            "backward: this tensor does not require a gradient (no input of its graph was marked "
            "with requires_grad_, or it was computed under NoGradGuard)");
  REX_CHECK(root_grad.defined() && root_grad.shape() == root.shape(),
            "backward: gradient of shape ",
            root_grad.defined() ? root_grad.shape().str() : "undefined", " for a tensor of shape ",
            root.shape());
  REX_CHECK(root_grad.dtype() == DType::f32, "backward: the gradient must be f32");
  NoGradGuard no_grad;
  AutogradMeta& root_meta = *root.impl().autograd;
  // The root gradient is copied: a caller may pass a leaf's own .grad(), which accumulation writes
  // in place while gradients derived from it are still pending.
  Tensor first_grad = root_grad.clone();
  if (!root_meta.grad_fn) {
    accumulate_leaf_grad(root_meta, first_grad);
    if (on_leaf_ready) on_leaf_ready(root_meta);
    return;
  }

  std::unordered_map<Node*, Tensor> pending{{root_meta.grad_fn.get(), std::move(first_grad)}};
  const std::vector<Node*> order = topological_order(root_meta.grad_fn.get());
  const auto final_after =
      on_leaf_ready ? leaves_final_after(order) : std::vector<std::vector<AutogradMeta*>>{};
  for (size_t position = 0; position < order.size(); ++position) {
    backward_through(order[position], pending, retain_graph);
    if (on_leaf_ready)
      for (AutogradMeta* leaf : final_after[position]) on_leaf_ready(*leaf);
  }
}

}  // namespace rex::detail

namespace rex {

inline void Tensor::backward(bool retain_graph) const {
  REX_CHECK(numel() == 1, "backward: called without a gradient on a tensor of shape ", shape(),
            "; pass the output gradient, or reduce to a scalar first");
  detail::run_backward(*this, ones(shape(), device()), retain_graph);
}

inline void Tensor::backward(const Tensor& grad_output, bool retain_graph) const {
  detail::run_backward(*this, grad_output, retain_graph);
}

}  // namespace rex
