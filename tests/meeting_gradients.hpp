// Gradients that meet (rex/autograd/graph.hpp, `waiting`): x = reshape(p) is used twice,
//   loss = sum(use(x) * w_use) + sum(x * w_other).
// The engine visits the root's inputs in order and runs the nodes in the reverse of that visit's
// post-order, so the second term's backward runs first: when use's backward runs, x's other
// gradient is waiting, and use may add it in its own kernel. meeting_gradients returns p's
// gradient from that backward (`together`), and p's gradients from the two terms backpropagated
// apart, added by rex::add (`apart`): the engine's own addition. Where use takes the waiting
// gradient with an addition rounded as the engine's, the two have the same bits.
#pragma once

#include <functional>

#include <rex/rex.hpp>

namespace rex::testing {

struct MeetingGradients {
  Tensor together, apart, use_alone;  // use_alone: p's gradient through use only
};

inline MeetingGradients meeting_gradients(const Tensor& p_value,
                                          const std::function<Tensor(const Tensor&)>& use,
                                          Generator& gen) {
  const Device device = p_value.device();
  Tensor p = p_value.clone();
  p.requires_grad_();
  const Tensor w_other = uniform(p.shape(), gen, -1.0f, 1.0f).to(device);
  Tensor w_use;
  auto use_term = [&](const Tensor& x) {
    const Tensor y = use(x);
    if (!w_use.defined()) w_use = uniform(y.shape(), gen, -1.0f, 1.0f).to(device);
    return sum(y * w_use);
  };
  auto other_term = [&](const Tensor& x) { return sum(x * w_other); };
  auto x_of = [&] { return reshape(p, p.shape().dims()); };

  MeetingGradients out;
  {
    const Tensor x = x_of();
    (use_term(x) + other_term(x)).backward();
    out.together = p.grad().clone();
    p.zero_grad();
  }
  use_term(x_of()).backward();
  out.use_alone = p.grad().clone();
  p.zero_grad();
  other_term(x_of()).backward();
  NoGradGuard no_grad;
  out.apart = add(p.grad(), out.use_alone);
  return out;
}

}  // namespace rex::testing
