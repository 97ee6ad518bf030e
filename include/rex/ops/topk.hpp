// topk: the k largest entries along the last axis, with their positions (the MoE router's
// selection).
//
// Each row is ranked with std::partial_sort over an index array: values descending, equal values by
// the lower position first, NaN above every number (as in PyTorch; it also keeps the comparison a
// strict weak ordering). values is a gather, so its backward scatters g back into zeros:
//   dx[r, indices[r, j]] = g[r, j], 0 at the positions not chosen.
// indices are i32 and carry no gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "rex/backend/cuda/dispatch.hpp"
#include "rex/ops/common.hpp"

namespace rex {

struct TopK {
  Tensor values;   // f32, x.shape with the last extent k, each row descending
  Tensor indices;  // i32, same shape: positions in x's last axis
};

namespace detail {

inline TopK cuda_topk(const Tensor& x, int64_t k, int64_t rows, int64_t n, const Shape& out_shape) {
  Tensor values = Tensor::empty(out_shape, DType::f32, x.device());
  Tensor indices = Tensor::empty(out_shape, DType::i32, x.device());
  cuda_backend().topk(x.device_data<float>(), values.device_data<float>(),
                      indices.device_data<int32_t>(), rows, n, k);
  values =
      record(values, "topk", {x},
             [in_shape = x.shape(), indices = indices.detach(), rows, n, k](const Tensor& g) {
               Tensor gx = Tensor::empty(in_shape, DType::f32, g.device());
               cuda_backend().topk_backward(g.device_data<float>(), indices.device_data<int32_t>(),
                                            gx.device_data<float>(), rows, n, k);
               return GradList{gx};
             });
  return TopK{values, indices};
}

}  // namespace detail

inline TopK topk(const Tensor& x, int64_t k) {
  detail::check_f32("topk", x);
  REX_CHECK(x.rank() >= 1, "topk: x must have at least one axis, got shape ", x.shape());
  const int64_t n = x.dim(-1);
  REX_CHECK(k >= 1 && k <= n, "topk: k = ", k, " is out of range [1, ", n, "] for shape ",
            x.shape());
  const int64_t rows = x.numel() / n;
  Shape out_shape = x.shape();
  out_shape.set(x.rank() - 1, k);
  if (detail::on_cuda(x)) return detail::cuda_topk(x, k, rows, n, out_shape);
  Tensor values = Tensor::empty(out_shape);
  Tensor indices = Tensor::empty(out_shape, DType::i32);
  const float* px = x.data<float>();
  float* pv = values.data<float>();
  int32_t* pi = indices.data<int32_t>();
  std::vector<int32_t> order(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = px + r * n;
    auto ranks_before = [row](int32_t i, int32_t j) {
      const float a = row[i], b = row[j];
      if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && (!std::isnan(b) || i < j);
      return a > b || (a == b && i < j);
    };
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), ranks_before);
    for (int64_t j = 0; j < k; ++j) {
      pi[r * k + j] = order[static_cast<size_t>(j)];
      pv[r * k + j] = row[order[static_cast<size_t>(j)]];
    }
  }
  values = detail::record(values, "topk", {x},
                          [in_shape = x.shape(), indices = indices.detach()](const Tensor& g) {
                            const int64_t width = in_shape[in_shape.rank() - 1];
                            const int64_t kk = g.dim(-1);
                            Tensor gx = zeros(in_shape);
                            const float* pg = g.data<float>();
                            const int32_t* pidx = indices.data<int32_t>();
                            float* pgx = gx.data<float>();
                            for (int64_t e = 0, total = g.numel(); e < total; ++e)
                              pgx[(e / kk) * width + pidx[e]] = pg[e];
                            return detail::GradList{gx};
                          });
  return TopK{values, indices};
}

}  // namespace rex
