// grouped_swiglu: the experts of a MoE layer applied to their segments of expert-sorted rows, as
// one op (the CPU form of a grouped GEMM).
//
// x [M, d] holds rows sorted by expert; expert e owns rows offsets[e] .. offsets[e + 1] and has
// weights gate_e, up_e [h, d] and down_e [d, h]. For the rows X_e of each segment:
//   G = X_e gate_e^T,  U = X_e up_e^T,  A = silu(G) * U,  Y_e = A down_e^T
// Backward, with s = sigmoid(G) and dY_e = g rows of the segment:
//   d down_e = dY_e^T A,  dA = dY_e down_e
//   dG = dA * U * s (1 + G (1 - s)),  dU = dA * silu(G)
//   d gate_e = dG^T X_e,  d up_e = dU^T X_e,  dX_e = dG gate_e + dU up_e
// G and U are saved (2 M h floats); A is recomputed. Segments run in parallel (each writes its own
// rows of y and dx and its own expert's gradients, so results do not depend on the thread count),
// with Eigen's GEMM single-threaded inside. An empty segment costs nothing, and its expert gets no
// gradient. The composed form — slice, three matmuls, silu, mul, concat — is what
// nn::dispatch_experts's tests check this against, through the naive per-token MoE loop.
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <vector>

#include "rex/backend/cpu/arrays.hpp"
#include "rex/backend/cpu/gemm.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/core/parallel.hpp"
#include "rex/ops/common.hpp"

namespace rex {
namespace detail {

// The graph inputs of grouped_swiglu: x, then gate, up and down of every expert.
inline std::vector<Tensor> grouped_swiglu_inputs(const Tensor& x, const std::vector<Tensor>& gate,
                                                 const std::vector<Tensor>& up,
                                                 const std::vector<Tensor>& down) {
  std::vector<Tensor> inputs{x};
  for (const auto* list : {&gate, &up, &down})
    inputs.insert(inputs.end(), list->begin(), list->end());
  return inputs;
}

// grouped_swiglu on CUDA: per-expert cuBLAS GEMMs on the segments (sizes known on the host from
// offsets) and one fused swiglu kernel over all rows between them. Same formulas as the CPU form.
inline Tensor cuda_grouped_swiglu(const Tensor& x, const std::vector<int64_t>& offsets,
                                  const std::vector<Tensor>& gate, const std::vector<Tensor>& up,
                                  const std::vector<Tensor>& down) {
  const std::vector<Tensor> inputs = grouped_swiglu_inputs(x, gate, up, down);
  for (const Tensor& t : inputs) common_device("grouped_swiglu", {x, t});
  const auto experts = static_cast<int64_t>(gate.size());
  const int64_t rows = x.dim(0), d = x.dim(1), h = gate[0].dim(0);
  const Device device = x.device();
  const CudaBackend& cuda = cuda_backend();
  auto f = [](const Tensor& t) { return t.device_data<float>(); };
  Tensor y = Tensor::empty({rows, d}, DType::f32, device);
  Tensor pre_gate = Tensor::empty({rows, h}, DType::f32, device);
  Tensor pre_up = Tensor::empty({rows, h}, DType::f32, device);
  Tensor act = Tensor::empty({rows, h}, DType::f32, device);
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = offsets[e], m = offsets[e + 1] - first;
    if (m == 0) continue;
    cuda.gemm(f(x) + first * d, f(gate[e]), f(pre_gate) + first * h, m, h, d, false, true, false, 1,
              0, 0, 0);
    cuda.gemm(f(x) + first * d, f(up[e]), f(pre_up) + first * h, m, h, d, false, true, false, 1, 0,
              0, 0);
  }
  cuda.swiglu(f(pre_gate), f(pre_up), f(act), rows * h);
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = offsets[e], m = offsets[e + 1] - first;
    if (m == 0) continue;
    cuda.gemm(f(act) + first * h, f(down[e]), f(y) + first * d, m, d, h, false, true, false, 1, 0,
              0, 0);
  }
  std::vector<Tensor> weights;
  for (size_t i = 1; i < inputs.size(); ++i) weights.push_back(inputs[i].detach());
  return record(y, "grouped_swiglu", inputs,
                [x = x.detach(), offsets, weights = std::move(weights), pre_gate, pre_up, experts,
                 d, h, f](const Tensor& grad, const std::vector<bool>& needs) {
                  const CudaBackend& cuda = cuda_backend();
                  const int64_t rows = x.dim(0);
                  const Device device = x.device();
                  GradList grads(static_cast<size_t>(1 + 3 * experts));
                  Tensor act = Tensor::empty({rows, h}, DType::f32, device);
                  Tensor d_act = Tensor::empty({rows, h}, DType::f32, device);
                  Tensor d_gate_pre = Tensor::empty({rows, h}, DType::f32, device);
                  Tensor d_up_pre = Tensor::empty({rows, h}, DType::f32, device);
                  cuda.swiglu(f(pre_gate), f(pre_up), f(act), rows * h);
                  for (int64_t e = 0; e < experts; ++e) {
                    const int64_t first = offsets[e], m = offsets[e + 1] - first;
                    if (m == 0) continue;
                    const auto down_slot = static_cast<size_t>(1 + 2 * experts + e);
                    if (needs[down_slot]) {
                      grads[down_slot] = Tensor::empty({d, h}, DType::f32, device);
                      cuda.gemm(f(grad) + first * d, f(act) + first * h, f(grads[down_slot]), d, h,
                                m, true, false, false, 1, 0, 0, 0);
                    }
                    cuda.gemm(f(grad) + first * d, f(weights[2 * experts + e]),
                              f(d_act) + first * h, m, h, d, false, false, false, 1, 0, 0, 0);
                  }
                  cuda.swiglu_backward(f(pre_gate), f(pre_up), f(d_act), f(d_gate_pre), f(d_up_pre),
                                       rows * h);
                  Tensor dx = needs[0] ? Tensor::empty(x.shape(), DType::f32, device) : Tensor();
                  for (int64_t e = 0; e < experts; ++e) {
                    const int64_t first = offsets[e], m = offsets[e + 1] - first;
                    if (m == 0) continue;
                    for (int64_t kind = 0; kind < 2; ++kind) {  // gate, then up
                      const auto slot = static_cast<size_t>(1 + kind * experts + e);
                      if (!needs[slot]) continue;
                      grads[slot] = Tensor::empty({h, d}, DType::f32, device);
                      const Tensor& d_pre = kind == 0 ? d_gate_pre : d_up_pre;
                      cuda.gemm(f(d_pre) + first * h, f(x) + first * d, f(grads[slot]), h, d, m,
                                true, false, false, 1, 0, 0, 0);
                    }
                    if (dx.defined()) {
                      float* out = f(dx) + first * d;
                      cuda.gemm(f(d_gate_pre) + first * h, f(weights[e]), out, m, d, h, false,
                                false, false, 1, 0, 0, 0);
                      cuda.gemm(f(d_up_pre) + first * h, f(weights[experts + e]), out, m, d, h,
                                false, false, true, 1, 0, 0, 0);
                    }
                  }
                  grads[0] = dx;
                  return grads;
                });
}

}  // namespace detail

inline Tensor grouped_swiglu(const Tensor& x, const std::vector<int64_t>& offsets,
                             const std::vector<Tensor>& gate, const std::vector<Tensor>& up,
                             const std::vector<Tensor>& down) {
  detail::check_f32("grouped_swiglu", x);
  REX_CHECK(x.rank() == 2, "grouped_swiglu: x must be [M, d], got ", x.shape());
  const auto experts = static_cast<int64_t>(gate.size());
  REX_CHECK(experts > 0 && static_cast<int64_t>(up.size()) == experts &&
                static_cast<int64_t>(down.size()) == experts &&
                static_cast<int64_t>(offsets.size()) == experts + 1,
            "grouped_swiglu: need one gate, up and down weight per expert and experts + 1 offsets");
  REX_CHECK(offsets.front() == 0 && offsets.back() == x.dim(0),
            "grouped_swiglu: offsets must run "
            "from 0 to the ",
            x.dim(0), " rows of x");
  const int64_t rows = x.dim(0), d = x.dim(1), h = gate[0].dim(0);
  for (int64_t e = 0; e < experts; ++e) {
    REX_CHECK(offsets[e] <= offsets[e + 1], "grouped_swiglu: offsets decrease at expert ", e);
    detail::check_f32("grouped_swiglu", gate[e]), detail::check_f32("grouped_swiglu", up[e]);
    detail::check_f32("grouped_swiglu", down[e]);
    REX_CHECK(gate[e].shape() == Shape({h, d}) && up[e].shape() == Shape({h, d}) &&
                  down[e].shape() == Shape({d, h}),
              "grouped_swiglu: expert ", e, " has gate ", gate[e].shape(), ", up ", up[e].shape(),
              ", down ", down[e].shape(), "; expected [", h, ", ", d, "], [", h, ", ", d, "], [", d,
              ", ", h, "]");
  }

  if (detail::on_cuda(x)) return detail::cuda_grouped_swiglu(x, offsets, gate, up, down);
  Tensor y = Tensor::empty({rows, d}), pre_gate = Tensor::empty({rows, h}),
         pre_up = Tensor::empty({rows, h});
  const float* px = x.data<float>();
  REX_PARALLEL_FOR(schedule(dynamic))
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = offsets[e], m = offsets[e + 1] - first;
    if (m == 0) continue;
    float* g = pre_gate.data<float>() + first * h;
    float* u = pre_up.data<float>() + first * h;
    detail::gemm(px + first * d, gate[e].data<float>(), g, m, h, d, false, true);
    detail::gemm(px + first * d, up[e].data<float>(), u, m, h, d, false, true);
    const detail::ConstArrayMap gv(g, m * h), uv(u, m * h);
    const Eigen::ArrayXf a = gv / (1.0f + (-gv).exp()) * uv;
    detail::gemm(a.data(), down[e].data<float>(), y.data<float>() + first * d, m, d, h, false,
                 true);
  }

  // Inputs: x, then gate, up and down of every expert; the backward keeps detached weights.
  const std::vector<Tensor> inputs = detail::grouped_swiglu_inputs(x, gate, up, down);
  std::vector<Tensor> weights;
  for (size_t i = 1; i < inputs.size(); ++i) weights.push_back(inputs[i].detach());
  return detail::record(
      y, "grouped_swiglu", inputs,
      [x = x.detach(), offsets, weights = std::move(weights), pre_gate, pre_up, experts, d, h](
          const Tensor& grad, const std::vector<bool>& needs) {
        detail::GradList grads(static_cast<size_t>(1 + 3 * experts));
        Tensor dx = needs[0] ? Tensor::empty(x.shape()) : Tensor();
        for (int64_t e = 0; e < experts; ++e) {
          if (offsets[e + 1] == offsets[e]) continue;
          for (int64_t kind = 0; kind < 3; ++kind) {
            const auto slot = static_cast<size_t>(1 + kind * experts + e);
            if (needs[slot]) grads[slot] = Tensor::empty(weights[slot - 1].shape());
          }
        }
        const float *px = x.data<float>(), *pg = grad.data<float>();
        REX_PARALLEL_FOR(schedule(dynamic))
        for (int64_t e = 0; e < experts; ++e) {
          const int64_t first = offsets[e], m = offsets[e + 1] - first;
          if (m == 0) continue;
          const Tensor &w_gate = weights[e], &w_up = weights[experts + e],
                       &w_down = weights[2 * experts + e];
          const detail::ConstArrayMap gv(pre_gate.data<float>() + first * h, m * h),
              uv(pre_up.data<float>() + first * h, m * h);
          const Eigen::ArrayXf s = 1.0f / (1.0f + (-gv).exp());
          const Eigen::ArrayXf silu_g = gv * s;
          const float* dy = pg + first * d;
          Tensor& d_down = grads[static_cast<size_t>(1 + 2 * experts + e)];
          if (d_down.defined()) {
            const Eigen::ArrayXf a = silu_g * uv;
            detail::gemm(dy, a.data(), d_down.data<float>(), d, h, m, true, false);
          }
          Eigen::ArrayXf da(m * h);
          detail::gemm(dy, w_down.data<float>(), da.data(), m, h, d, false, false);
          const Eigen::ArrayXf d_pre_gate = da * uv * s * (1.0f + gv * (1.0f - s));
          const Eigen::ArrayXf d_pre_up = da * silu_g;
          Tensor& d_gate = grads[static_cast<size_t>(1 + e)];
          Tensor& d_up = grads[static_cast<size_t>(1 + experts + e)];
          if (d_gate.defined())
            detail::gemm(d_pre_gate.data(), px + first * d, d_gate.data<float>(), h, d, m, true,
                         false);
          if (d_up.defined())
            detail::gemm(d_pre_up.data(), px + first * d, d_up.data<float>(), h, d, m, true, false);
          if (dx.defined()) {
            float* out = dx.data<float>() + first * d;
            detail::gemm(d_pre_gate.data(), w_gate.data<float>(), out, m, d, h, false, false);
            detail::gemm(d_pre_up.data(), w_up.data<float>(), out, m, d, h, false, false, true);
          }
        }
        grads[0] = dx;
        return grads;
      });
}

}  // namespace rex
