// Host-side helpers the ops use to run on CUDA: the device test, the same-device check, and the
// launch descriptions (broadcast indexing) that the backend table takes. Header-only and free of
// CUDA: everything goes through rex::detail::cuda_backend().
#pragma once

#include <initializer_list>
#include <memory>
#include <string_view>

#include "rex/backend/broadcast.hpp"
#include "rex/backend/cuda/backend.hpp"
#include "rex/core/precision.hpp"
#include "rex/core/tensor.hpp"

namespace rex::detail {

inline bool on_cuda(const Tensor& x) { return x.device().is_cuda(); }

// Every defined tensor in `tensors` must be on the first one's device; returns that device.
inline Device common_device(std::string_view op, std::initializer_list<Tensor> tensors) {
  Device device;
  bool first = true;
  for (const Tensor& t : tensors) {
    if (!t.defined()) continue;
    if (first) {
      device = t.device(), first = false;
      continue;
    }
    REX_CHECK(t.device() == device, op, ": inputs are on different devices (", device, " and ",
              t.device(), "); move them with .to(device) first");
  }
  return device;
}

// Raw device memory owned by whoever holds the pointer (a graph node, say): for values that have
// no tensor dtype, such as cross_entropy's double-precision log-sum-exp.
inline std::shared_ptr<void> cuda_buffer(size_t bytes) {
  return std::shared_ptr<void>(device_memory().allocate(bytes),
                               [](void* ptr) { device_memory().release(ptr); });
}

// The launch description of `out` (row-major) read through inputs of the shapes `ins`, each
// broadcastable to it.
inline CudaBroadcast cuda_broadcast_index(std::string_view op, const Shape& out,
                                          std::initializer_list<Shape> ins) {
  REX_CHECK(out.rank() <= kMaxCudaRank, op, ": shape ", out, " has more than ", kMaxCudaRank,
            " axes, the most the CUDA backend broadcasts over");
  CudaBroadcast index;
  index.rank = static_cast<int32_t>(out.rank());
  for (int64_t i = 0; i < out.rank(); ++i) index.dims[i] = out[i];
  int k = 0;
  for (const Shape& in : ins) {
    const std::vector<int64_t> strides = broadcast_strides(in, out);
    for (int64_t i = 0; i < out.rank(); ++i) index.strides[k][i] = strides[static_cast<size_t>(i)];
    ++k;
  }
  return index;
}

// out = a (op) b for two f32 CUDA tensors broadcast together.
inline Tensor cuda_binary(BinaryOp op, const Tensor& a, const Tensor& b, std::string_view name) {
  const Shape shape = broadcast_shapes(a.shape(), b.shape(), name);
  Tensor out = Tensor::empty(shape, DType::f32, a.device());
  cuda_backend().binary(op, a.device_data<float>(), b.device_data<float>(),
                        out.device_data<float>(),
                        cuda_broadcast_index(name, shape, {a.shape(), b.shape()}));
  return out;
}

// y = f(x) for a pointwise op on a CUDA tensor.
inline Tensor cuda_unary(UnaryOp op, float s, const Tensor& x) {
  Tensor y = Tensor::empty(x.shape(), DType::f32, x.device());
  cuda_backend().unary(op, s, x.device_data<float>(), y.device_data<float>(), x.numel());
  return y;
}

// How the experts' products run on CUDA: grouped products (kernels/grouped_gemm.cu, one launch
// for all the experts of a table) on bf16 tensor cores in bf16 and on CUDA cores in fp32; in tf32
// per-expert cuBLAS GEMMs (cuBLAS's tf32 tensor cores outrun fp32 CUDA cores, and there is no
// tf32 grouped form yet), and also for odd widths d or h (the grouped kernels read rows two floats
// at a time).
enum class ExpertProducts { grouped_bf16, grouped_fp32, per_expert };
inline ExpertProducts expert_products(int64_t d, int64_t h) {
  if (d % 2 != 0 || h % 2 != 0) return ExpertProducts::per_expert;
  switch (matmul_precision_slot(true).load(std::memory_order_relaxed)) {
    case MatmulPrecision::bf16:
      return ExpertProducts::grouped_bf16;
    case MatmulPrecision::fp32:
      return ExpertProducts::grouped_fp32;
    default:
      return ExpertProducts::per_expert;
  }
}

// grouped_swiglu on CUDA, with the arguments of rex::detail::cpu::grouped_swiglu
// (rex/backend/cpu/gemm.hpp) but the segments' offsets on the device or on the host: the experts'
// products around one fused swiglu kernel over all rows. In bf16 and fp32, two grouped products
// (gate and up in one launch, down in another); in tf32 per-expert cuBLAS GEMMs on the segments,
// whose sizes must then be on the host. The grouped gate and up products write the activation too.
inline void cuda_grouped_swiglu(const float* x, const GroupedSegments& segments,
                                const float* const* gate, const float* const* up,
                                const float* const* down, float* y, float* pre_gate, float* pre_up,
                                float* act, int64_t d, int64_t h) {
  const CudaBackend& cuda = cuda_backend();
  const int64_t rows = segments.rows, experts = segments.experts;
  if (const ExpertProducts how = expert_products(d, h); how != ExpertProducts::per_expert) {
    const bool fp32 = how == ExpertProducts::grouped_fp32;
    GroupedRows gate_up;  // pre_gate = x gate_e^T and pre_up = x up_e^T, x read by one launch
    gate_up.fp32 = fp32, gate_up.pairs = 2, gate_up.n = h, gate_up.k = d;
    gate_up.a[0] = gate_up.a[1] = x;
    gate_up.host_w[0] = gate, gate_up.host_w[1] = up;
    gate_up.c[0] = pre_gate, gate_up.c[1] = pre_up, gate_up.swiglu_out = act;
    cuda.grouped_rows(segments, gate_up);
    GroupedRows down_product;  // y = act down_e^T
    down_product.fp32 = fp32, down_product.n = d, down_product.k = h;
    down_product.a[0] = act, down_product.host_w[0] = down, down_product.c[0] = y;
    cuda.grouped_rows(segments, down_product);
    return;
  }
  REX_CHECK(segments.host_offsets != nullptr,
            "cuda_grouped_swiglu: per-expert products need the offsets on the host");
  const int64_t* offsets = segments.host_offsets;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = offsets[e], m = offsets[e + 1] - first;
    if (m == 0) continue;
    cuda.gemm(x + first * d, gate[e], pre_gate + first * h, m, h, d, false, true, false, 1, 0, 0,
              0);
    cuda.gemm(x + first * d, up[e], pre_up + first * h, m, h, d, false, true, false, 1, 0, 0, 0);
  }
  cuda.swiglu(pre_gate, pre_up, act, rows * h);
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = offsets[e], m = offsets[e + 1] - first;
    if (m == 0) continue;
    cuda.gemm(act + first * h, down[e], y + first * d, m, d, h, false, true, false, 1, 0, 0, 0);
  }
}

// The backward of cuda_grouped_swiglu, with the arguments of cpu::grouped_swiglu_backward; with
// accumulate, the weight gradients are added to d_gate, d_up and d_down's (an expert whose segment
// is empty leaves its own as they are).
inline void cuda_grouped_swiglu_backward(const float* x, const GroupedSegments& segments,
                                         const float* const* gate, const float* const* up,
                                         const float* const* down, const float* pre_gate,
                                         const float* pre_up, const float* act, const float* g,
                                         float* dx, float* const* d_gate, float* const* d_up,
                                         float* const* d_down, bool accumulate, int64_t d,
                                         int64_t h) {
  const CudaBackend& cuda = cuda_backend();
  const int64_t rows = segments.rows, experts = segments.experts;
  const size_t bytes = static_cast<size_t>(rows * h) * sizeof(float);
  const std::shared_ptr<void> buffers[] = {cuda_buffer(bytes), cuda_buffer(bytes)};
  auto* d_pre_gate = static_cast<float*>(buffers[0].get());
  auto* d_pre_up = static_cast<float*>(buffers[1].get());
  if (const ExpertProducts how = expert_products(d, h); how != ExpertProducts::per_expert) {
    const bool fp32 = how == ExpertProducts::grouped_fp32;
    GroupedWeights down_grad;  // d down_e = g_e^T act_e
    down_grad.fp32 = fp32, down_grad.accumulate = accumulate, down_grad.m = d, down_grad.n = h;
    down_grad.a[0] = g, down_grad.b = act, down_grad.host_c[0] = d_down;
    cuda.grouped_weights(segments, down_grad);
    GroupedRows back_through_down;  // d_act = g down_e, then SwiGLU's backward from it
    back_through_down.fp32 = fp32, back_through_down.transpose_w = false;
    back_through_down.n = h, back_through_down.k = d;
    back_through_down.a[0] = g, back_through_down.host_w[0] = down;
    back_through_down.swiglu_backward = {pre_gate, pre_up, d_pre_gate, d_pre_up};
    cuda.grouped_rows(segments, back_through_down);
    GroupedWeights gate_up_grads;  // d gate_e = dG_e^T x_e and d up_e = dU_e^T x_e
    gate_up_grads.fp32 = fp32, gate_up_grads.accumulate = accumulate, gate_up_grads.pairs = 2;
    gate_up_grads.m = h, gate_up_grads.n = d;
    gate_up_grads.a[0] = d_pre_gate, gate_up_grads.a[1] = d_pre_up, gate_up_grads.b = x;
    gate_up_grads.host_c[0] = d_gate, gate_up_grads.host_c[1] = d_up;
    cuda.grouped_weights(segments, gate_up_grads);
    if (dx != nullptr) {
      GroupedRows back_to_x;  // dx = dG gate_e + dU up_e
      back_to_x.fp32 = fp32, back_to_x.pairs = 2, back_to_x.sum_pairs = true;
      back_to_x.transpose_w = false;
      back_to_x.n = d, back_to_x.k = h;
      back_to_x.a[0] = d_pre_gate, back_to_x.a[1] = d_pre_up;
      back_to_x.host_w[0] = gate, back_to_x.host_w[1] = up, back_to_x.c[0] = dx;
      cuda.grouped_rows(segments, back_to_x);
    }
    return;
  }
  REX_CHECK(segments.host_offsets != nullptr,
            "cuda_grouped_swiglu_backward: per-expert products need the offsets on the host");
  const int64_t* offsets = segments.host_offsets;
  const std::shared_ptr<void> d_act_buffer = cuda_buffer(bytes);
  auto* d_act = static_cast<float*>(d_act_buffer.get());
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = offsets[e], m = offsets[e + 1] - first;
    if (m == 0) continue;
    if (d_down[e] != nullptr)
      cuda.gemm(g + first * d, act + first * h, d_down[e], d, h, m, true, false, accumulate, 1, 0,
                0, 0);
    cuda.gemm(g + first * d, down[e], d_act + first * h, m, h, d, false, false, false, 1, 0, 0, 0);
  }
  cuda.swiglu_backward(pre_gate, pre_up, d_act, d_pre_gate, d_pre_up, rows * h);
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = offsets[e], m = offsets[e + 1] - first;
    if (m == 0) continue;
    if (d_gate[e] != nullptr)
      cuda.gemm(d_pre_gate + first * h, x + first * d, d_gate[e], h, d, m, true, false, accumulate,
                1, 0, 0, 0);
    if (d_up[e] != nullptr)
      cuda.gemm(d_pre_up + first * h, x + first * d, d_up[e], h, d, m, true, false, accumulate, 1,
                0, 0, 0);
    if (dx != nullptr) {
      float* out = dx + first * d;
      cuda.gemm(d_pre_gate + first * h, gate[e], out, m, d, h, false, false, false, 1, 0, 0, 0);
      cuda.gemm(d_pre_up + first * h, up[e], out, m, d, h, false, false, true, 1, 0, 0, 0);
    }
  }
}

}  // namespace rex::detail
