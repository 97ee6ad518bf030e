// topk: the k largest entries along the last axis, with their positions (the MoE router's
// selection).
//
// Each row is ranked by detail::ranks_before (rex/backend/pointwise.hpp): values descending, equal
// values by the lower position first, NaN above every number (as in PyTorch; it also keeps the
// comparison a strict weak ordering). values is a gather, so its backward scatters g back into
// zeros:
//   dx[r, indices[r, j]] = g[r, j], 0 at the positions not chosen.
// indices are i32 and carry no gradient.
#pragma once

#include <cstdint>

#include "rex/backend/cpu/index.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/ops/common.hpp"

namespace rex {

struct TopK {
  Tensor values;   // f32, x.shape with the last extent k, each row descending
  Tensor indices;  // i32, same shape: positions in x's last axis
};

namespace detail {

// The k best entries of every row of n on x's device (values and their positions); topk_grad is
// the backward, g scattered into zeros of x's shape.
inline TopK topk_values(const Tensor& x, int64_t k) {
  const int64_t n = x.dim(-1), rows = x.numel() / n;
  Shape out_shape = x.shape();
  out_shape.set(x.rank() - 1, k);
  TopK out{Tensor::empty(out_shape, DType::f32, x.device()),
           Tensor::empty(out_shape, DType::i32, x.device())};
  const float* px = x.device_data<float>();
  float* pv = out.values.device_data<float>();
  int32_t* pi = out.indices.device_data<int32_t>();
  (on_cuda(x) ? cuda_backend().topk : cpu::topk)(px, pv, pi, rows, n, k);
  return out;
}

inline Tensor topk_grad(const Tensor& g, const Tensor& indices, const Shape& in_shape) {
  const int64_t n = in_shape[in_shape.rank() - 1], k = g.dim(-1), rows = g.numel() / k;
  Tensor gx = Tensor::empty(in_shape, DType::f32, g.device());
  const float* pg = g.device_data<float>();
  const int32_t* pi = indices.device_data<int32_t>();
  float* pgx = gx.device_data<float>();
  (on_cuda(g) ? cuda_backend().topk_backward : cpu::topk_backward)(pg, pi, pgx, rows, n, k);
  return gx;
}

}  // namespace detail

inline TopK topk(const Tensor& x, int64_t k) {
  detail::check_f32("topk", x);
  REX_CHECK(x.rank() >= 1, "topk: x must have at least one axis, got shape ", x.shape());
  const int64_t n = x.dim(-1);
  REX_CHECK(k >= 1 && k <= n, "topk: k = ", k, " is out of range [1, ", n, "] for shape ",
            x.shape());
  TopK out = detail::topk_values(x, k);
  out.values =
      detail::record(out.values, "topk", {x},
                     [in_shape = x.shape(), indices = out.indices.detach()](const Tensor& g) {
                       return detail::GradList{detail::topk_grad(g, indices, in_shape)};
                     });
  return out;
}

}  // namespace rex
