// matmul: 2-d and batched matrix products with NumPy broadcasting of the leading (batch) axes.
//
// a is [..., m, k] and b is [..., k, n]; MatmulOptions{.transpose_a / .transpose_b} reads an
// operand as its transpose without copying it (a stored [..., k, m], b stored [..., n, k]). The
// backward uses the same flags, so no transpose is ever materialised:
//   C = op(A) op(B):  dA = dC op(B)^T  (or op(B) dC^T when A is read transposed)
//                     dB = op(A)^T dC  (or dC^T op(A) when B is read transposed)
// and sum_to folds the gradient of a broadcast operand back to its shape. A batched `a` times a 2-d
// `b` (activations times a weight) is one GEMM over the flattened rows.
#pragma once

#include "rex/backend/cpu/elementwise.hpp"
#include "rex/backend/cpu/gemm.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/ops/broadcast.hpp"
#include "rex/ops/shape.hpp"

namespace rex {
namespace detail {

// The batched product on CUDA: one strided-batched cuBLAS call when every batch of an operand is
// either its own or one shared matrix (the common cases), else one call per batch entry.
inline void cuda_matmul(const Tensor& a, const Tensor& b, Tensor& out, const Shape& batch_a,
                        const Shape& batch_b, const Shape& batch, int64_t m, int64_t n, int64_t k,
                        bool ta, bool tb) {
  const float *pa = a.device_data<float>(), *pb = b.device_data<float>();
  float* pc = out.device_data<float>();
  const int64_t count = batch.numel();
  const bool a_uniform = batch_a.numel() == count || batch_a.numel() == 1;
  const bool b_uniform = batch_b.numel() == count || batch_b.numel() == 1;
  if (a_uniform && b_uniform) {
    cuda_backend().gemm(pa, pb, pc, m, n, k, ta, tb, false, count, batch_a.numel() == 1 ? 0 : m * k,
                        batch_b.numel() == 1 ? 0 : k * n, m * n);
    return;
  }
  for_each_broadcast<2>(batch, {batch_a, batch_b}, [&](int64_t i, const auto& at) {
    cuda_backend().gemm(pa + at[0] * m * k, pb + at[1] * k * n, pc + i * m * n, m, n, k, ta, tb,
                        false, 1, 0, 0, 0);
  });
}

}  // namespace detail

struct MatmulOptions {
  bool transpose_a = false;
  bool transpose_b = false;
};

inline Tensor matmul(const Tensor& a, const Tensor& b, MatmulOptions options = {}) {
  detail::check_f32("matmul", a), detail::check_f32("matmul", b);
  REX_CHECK(a.rank() >= 2 && b.rank() >= 2, "matmul: operands need at least 2 axes, got ",
            a.shape(), " and ", b.shape());
  const bool ta = options.transpose_a, tb = options.transpose_b;
  const int64_t m = a.dim(ta ? -1 : -2), k = a.dim(ta ? -2 : -1);
  const int64_t kb = b.dim(tb ? -1 : -2), n = b.dim(tb ? -2 : -1);
  REX_CHECK(k == kb, "matmul: inner extents differ: ", a.shape(), ta ? " (transposed)" : "",
            " and ", b.shape(), tb ? " (transposed)" : "", " give ", k, " vs ", kb);

  if (b.rank() == 2 && a.rank() > 2 && !ta) {
    std::vector<int64_t> out_dims = a.shape().dims();
    out_dims.back() = n;
    const int64_t rows = a.shape().numel(0, a.rank() - 1);
    return reshape(matmul(reshape(a, {rows, k}), b, options), out_dims);
  }

  const Shape batch_a(std::vector<int64_t>(a.shape().begin(), a.shape().end() - 2));
  const Shape batch_b(std::vector<int64_t>(b.shape().begin(), b.shape().end() - 2));
  const Shape batch = detail::broadcast_shapes(batch_a, batch_b, "matmul");
  std::vector<int64_t> out_dims = batch.dims();
  out_dims.push_back(m);
  out_dims.push_back(n);
  const Device device = detail::common_device("matmul", {a, b});
  Tensor out = Tensor::empty(Shape(out_dims), DType::f32, device);
  if (device.is_cuda()) {
    detail::cuda_matmul(a, b, out, batch_a, batch_b, batch, m, n, k, ta, tb);
  } else {
    const float *pa = a.data<float>(), *pb = b.data<float>();
    float* pc = out.data<float>();
    detail::for_each_broadcast<2>(batch, {batch_a, batch_b}, [&](int64_t i, const auto& at) {
      detail::gemm(pa + at[0] * m * k, pb + at[1] * k * n, pc + i * m * n, m, n, k, ta, tb);
    });
  }

  return detail::record(
      out, "matmul", {a, b},
      [a = a.detach(), b = b.detach(), ta, tb](const Tensor& g, const std::vector<bool>& needs) {
        detail::GradList grads(2);
        if (needs[0]) {
          Tensor ga = ta ? matmul(b, g, {.transpose_a = tb, .transpose_b = true})
                         : matmul(g, b, {.transpose_a = false, .transpose_b = !tb});
          grads[0] = sum_to(ga, a.shape());
        }
        if (needs[1]) {
          Tensor gb = tb ? matmul(g, a, {.transpose_a = true, .transpose_b = ta})
                         : matmul(a, g, {.transpose_a = !ta, .transpose_b = false});
          grads[1] = sum_to(gb, b.shape());
        }
        return grads;
      });
}

}  // namespace rex
