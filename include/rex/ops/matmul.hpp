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
                        bool ta, bool tb, bool accumulate) {
  const float *pa = a.device_data<float>(), *pb = b.device_data<float>();
  float* pc = out.device_data<float>();
  const int64_t count = batch.numel();
  const bool a_uniform = batch_a.numel() == count || batch_a.numel() == 1;
  const bool b_uniform = batch_b.numel() == count || batch_b.numel() == 1;
  if (a_uniform && b_uniform) {
    cuda_backend().gemm(pa, pb, pc, m, n, k, ta, tb, accumulate, count,
                        batch_a.numel() == 1 ? 0 : m * k, batch_b.numel() == 1 ? 0 : k * n, m * n);
    return;
  }
  for_each_broadcast<2>(batch, {batch_a, batch_b}, [&](int64_t i, const auto& at) {
    cuda_backend().gemm(pa + at[0] * m * k, pb + at[1] * k * n, pc + i * m * n, m, n, k, ta, tb,
                        accumulate, 1, 0, 0, 0);
  });
}

}  // namespace detail

struct MatmulOptions {
  bool transpose_a = false;
  bool transpose_b = false;
};

namespace detail {

// The product as GEMMs: extents, batch axes (their broadcast `batch`, one GEMM each), and the
// output's shape. A batched a times a 2-d b is one GEMM over a's rows (m = all of them, no batch
// axes), its output of a's leading shape; checks the operands.
struct MatmulShape {
  int64_t m = 0, n = 0, k = 0;
  Shape batch_a, batch_b, batch;
  Shape out;
};

inline MatmulShape matmul_shape(const Tensor& a, const Tensor& b, bool ta, bool tb) {
  check_f32("matmul", a), check_f32("matmul", b);
  REX_CHECK(a.rank() >= 2 && b.rank() >= 2, "matmul: operands need at least 2 axes, got ",
            a.shape(), " and ", b.shape());
  MatmulShape s;
  s.m = a.dim(ta ? -1 : -2), s.k = a.dim(ta ? -2 : -1);
  const int64_t kb = b.dim(tb ? -1 : -2);
  s.n = b.dim(tb ? -2 : -1);
  REX_CHECK(s.k == kb, "matmul: inner extents differ: ", a.shape(), ta ? " (transposed)" : "",
            " and ", b.shape(), tb ? " (transposed)" : "", " give ", s.k, " vs ", kb);
  std::vector<int64_t> out_dims(a.shape().begin(), a.shape().end() - 2);
  if (b.rank() == 2 && a.rank() > 2 && !ta) {  // a's rows as one matrix
    s.m = a.shape().numel(0, a.rank() - 1);
    out_dims.push_back(a.dim(-2));
  } else {
    s.batch_a = Shape(out_dims);
    s.batch_b = Shape(std::vector<int64_t>(b.shape().begin(), b.shape().end() - 2));
    s.batch = broadcast_shapes(s.batch_a, s.batch_b, "matmul");
    out_dims = s.batch.dims();
    out_dims.push_back(s.m);
  }
  out_dims.push_back(s.n);
  s.out = Shape(std::move(out_dims));
  return s;
}

// op(a) op(b), of shape s (matmul_shape's), written into out, or added to what out holds when
// `accumulate` (on CUDA the GEMM's beta = 1, which rounds the sum once).
inline void matmul_into(const Tensor& a, const Tensor& b, bool ta, bool tb, const MatmulShape& s,
                        Tensor& out, bool accumulate) {
  const float *pa = a.device_data<float>(), *pb = b.device_data<float>();
  float* pc = out.device_data<float>();
  const int64_t m = s.m, n = s.n, k = s.k;
  if (out.device().is_cuda()) {
    cuda_matmul(a, b, out, s.batch_a, s.batch_b, s.batch, m, n, k, ta, tb, accumulate);
    return;
  }
  for_each_broadcast<2>(s.batch, {s.batch_a, s.batch_b}, [&](int64_t i, const auto& at) {
    gemm(pa + at[0] * m * k, pb + at[1] * k * n, pc + i * m * n, m, n, k, ta, tb, accumulate);
  });
}

// op(a) op(b) as a new tensor.
inline Tensor matmul_values(const Tensor& a, const Tensor& b, bool ta, bool tb) {
  const MatmulShape s = matmul_shape(a, b, ta, tb);
  Tensor out = Tensor::empty(s.out, DType::f32, common_device("matmul", {a, b}));
  matmul_into(a, b, ta, tb, s, out, false);
  return out;
}

}  // namespace detail

// One node whatever the operands' ranks. On CUDA, a's gradient is added to the one waiting for a
// (the input that q, k and v share, say) by the GEMM itself when nothing else holds that one and a
// is not broadcast: beta = 1, one launch fewer.
inline Tensor matmul(const Tensor& a, const Tensor& b, MatmulOptions options = {}) {
  const bool ta = options.transpose_a, tb = options.transpose_b;
  const detail::MatmulShape s = detail::matmul_shape(a, b, ta, tb);
  Tensor out = Tensor::empty(s.out, DType::f32, detail::common_device("matmul", {a, b}));
  detail::matmul_into(a, b, ta, tb, s, out, false);
  const bool flat = s.batch.rank() == 0 && a.rank() > 2;  // a's rows as one matrix
  return detail::record(
      out, "matmul", {a, b},
      [a = a.detach(), b = b.detach(), ta, tb, flat](
          const Tensor& g, const std::vector<bool>& needs, detail::GradList& waiting) {
        detail::GradList grads(2);
        if (needs[0]) {
          // dA = dC op(B)^T, or op(B) dC^T when A is read transposed: of a's shape unless a was
          // broadcast, and then added to the gradient waiting for a by the GEMM if it can be C.
          const Tensor& x = ta ? b : g;
          const Tensor& y = ta ? g : b;
          const bool tx = ta ? tb : false, ty = ta ? true : !tb;
          const detail::MatmulShape shape = detail::matmul_shape(x, y, tx, ty);
          Tensor& into = waiting[0];
          if (detail::on_cuda(g) && into.defined() && into.is_sole_owner() &&
              into.shape() == shape.out) {
            grads[0] = std::move(into);  // taken: the product is added to it
            detail::matmul_into(x, y, tx, ty, shape, grads[0], true);
          } else {
            Tensor ga = Tensor::empty(shape.out, DType::f32, g.device());
            detail::matmul_into(x, y, tx, ty, shape, ga, false);
            grads[0] = sum_to(ga, a.shape());
          }
        }
        if (needs[1]) {
          // With a's rows as one matrix, so are g's: dB sums over all of them in one GEMM.
          auto rows_of = [flat](const Tensor& t) {
            return flat
                       ? detail::make_view(t, 0, Shape{t.shape().numel(0, t.rank() - 1), t.dim(-1)})
                       : t;
          };
          const Tensor a_rows = rows_of(a), g_rows = rows_of(g);
          const Tensor gb = tb ? detail::matmul_values(g_rows, a_rows, true, ta)
                               : detail::matmul_values(a_rows, g_rows, !ta, false);
          grads[1] = sum_to(gb, b.shape());
        }
        return grads;
      });
}

}  // namespace rex
