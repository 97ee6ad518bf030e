// The small layers of the transformer: Linear, Embedding, RMSNorm and the SwiGLU feed-forward net
// (the dense FFN, and the shape of every expert).
//
// Weights follow PyTorch's layout so that checkpoints map one to one onto the PyTorch twin:
// Linear.weight is [out, in] and y = x W^T (matmul with transpose_b, no copy). There are no biases
// (as in the paper's LLaMA-style models). Initialisation draws from a caller-owned Generator in
// construction order, so a seed fixes every weight.
#pragma once

#include <algorithm>
#include <memory>
#include <vector>

#include "rex/core/factory.hpp"
#include "rex/nn/decode_weights.hpp"
#include "rex/nn/module.hpp"
#include "rex/ops/elementwise.hpp"
#include "rex/ops/index.hpp"
#include "rex/ops/matmul.hpp"
#include "rex/ops/moe.hpp"
#include "rex/ops/norm.hpp"

namespace rex::nn {

inline Tensor linear(const Tensor& x, const Tensor& weight) {
  return matmul(x, weight, {.transpose_b = true});
}

class Linear : public Module {
 public:
  Linear(int64_t in, int64_t out, Generator& gen, float init_std) {
    weight = register_parameter("weight", normal({out, in}, gen, 0.0f, init_std));
  }
  Tensor forward(const Tensor& x) const { return linear(x, weight); }

  Tensor weight;  // [out, in]
};

class Embedding : public Module {
 public:
  Embedding(int64_t vocab, int64_t dim, Generator& gen, float init_std) {
    weight = register_parameter("weight", normal({vocab, dim}, gen, 0.0f, init_std));
  }
  Tensor forward(const Tensor& ids) const { return embedding(weight, ids); }

  Tensor weight;  // [vocab, dim]
};

class RMSNorm : public Module {
 public:
  RMSNorm(int64_t dim, float eps) : eps_(eps) {
    weight = register_parameter("weight", ones({dim}));
  }
  Tensor forward(const Tensor& x) const { return rms_norm(x, weight, eps_); }
  // The norm of a + b, and the sum: a residual add and the norm after it (one kernel on CUDA).
  AddRmsNorm forward(const Tensor& a, const Tensor& b) const {
    return add_rms_norm(a, b, weight, eps_);
  }
  // forward of one row x [dim] into y [dim] on the host (decoding's step on the CPU).
  void row_on_cpu(const float* x, float* y) const {
    float rstd = 0;
    detail::cpu::rms_norm(x, weight.data<float>(), y, &rstd, 1, weight.numel(), eps_);
  }

  Tensor weight;  // [dim]

 private:
  float eps_;
};

// SwiGLU(x) = down(silu(gate(x)) * up(x)), hidden width `hidden` (the middle is the fused swiglu
// op). `out_std` initialises the output projection (smaller in deep residual stacks).
class SwiGLU : public Module {
 public:
  SwiGLU(int64_t dim, int64_t hidden, Generator& gen, float init_std, float out_std) {
    gate = register_module("gate", std::make_shared<Linear>(dim, hidden, gen, init_std));
    up = register_module("up", std::make_shared<Linear>(dim, hidden, gen, init_std));
    down = register_module("down", std::make_shared<Linear>(hidden, dim, gen, out_std));
  }
  Tensor forward(const Tensor& x) const {
    return down->forward(swiglu(gate->forward(x), up->forward(x)));
  }

  std::shared_ptr<Linear> gate, up, down;
};

// SwiGLU::forward of one row x [d] through each of `ffns` (all of one hidden width) into ys [n, d]
// on the host, its products by `weights` (decoding's step on the CPU): in fp32 the calls and the
// activation that forward's grouped_swiglu kernel runs for one row, bit for bit.
inline void swiglu_row_on_cpu(const float* x, const std::vector<const SwiGLU*>& ffns, float* ys,
                              DecodeWeights& weights) {
  const int64_t hidden = ffns.front()->gate->weight.dim(0), d = ffns.front()->gate->weight.dim(1);
  std::vector<float> pre_gate(static_cast<size_t>(hidden)), pre_up(static_cast<size_t>(hidden));
  for (size_t i = 0; i < ffns.size(); ++i) {
    weights.times(x, ffns[i]->gate->weight, pre_gate.data());
    weights.times(x, ffns[i]->up->weight, pre_up.data());
    const Eigen::ArrayXf a = detail::swiglu_value(detail::ConstArrayMap(pre_gate.data(), hidden),
                                                  detail::ConstArrayMap(pre_up.data(), hidden));
    weights.times(a.data(), ffns[i]->down->weight, ys + static_cast<int64_t>(i) * d);
  }
}

}  // namespace rex::nn
