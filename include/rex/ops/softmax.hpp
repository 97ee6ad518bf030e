// softmax, log_softmax (over the last axis, any rank) and a fused cross_entropy.
//
// Each row of the last axis is shifted by its maximum m before exponentiating, so large logits
// never overflow and -inf entries (a causal mask) give exp(-inf - m) = 0:
//   softmax      y_j = exp(x_j - m) / s,   s = sum_k exp(x_k - m)
//   log_softmax  y_j = x_j - m - log(s)
// A row whose entries are all -inf (s = 0), or that holds a +inf, has no softmax; instead of
// returning NaN, every op here throws rex::Error naming the row. Row sums are accumulated in
// double. Fused backwards, per row:
//   softmax      dx = y * (g - sum(g * y))        (saves y)
//   log_softmax  dx = g - exp(y) * sum(g)         (saves y)
// cross_entropy(logits [N, C], targets i32 [N]) is the mean over the rows whose target is not
// ignore_index of lse_i - logits[i, t_i], with lse_i = m_i + log(s_i) from one pass over each row.
// It saves the logits and lse_i; its backward is g * (exp(logits - lse) - onehot(t)) / count on
// counted rows and 0 on ignored rows. When every row is ignored (or N = 0) the loss is 0 and so is
// the gradient.
//
// On CUDA (rex::cuda kernels, same formulas and double row sums) a row with no softmax cannot throw
// from inside the kernel: it comes out as NaN instead. cross_entropy still checks its targets.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <vector>

#include "rex/backend/cpu/elementwise.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/ops/common.hpp"

namespace rex {
namespace detail {

// The extent of the last axis of x, which softmax-like ops normalise over; `op` names the caller.
inline int64_t softmax_row_length(const Tensor& x, std::string_view op) {
  check_f32(op, x);
  REX_CHECK(x.rank() >= 1, op, ": needs at least one axis, got a 0-d tensor");
  const int64_t n = x.dim(-1);
  REX_CHECK(n > 0, op, ": the last axis of ", x.shape(), " is empty");
  return n;
}

// The maximum of row r (n entries); rejects a row with no entry above -inf.
inline float softmax_row_max(const float* row, int64_t n, std::string_view op, const Shape& shape,
                             int64_t r) {
  float m = row[0];
  for (int64_t j = 1; j < n; ++j)
    if (row[j] > m) m = row[j];
  REX_CHECK(m != -std::numeric_limits<float>::infinity(), op, ": row ", r, " of ", shape,
            " is entirely -inf, which has no softmax");
  REX_CHECK(m != std::numeric_limits<float>::infinity(), op, ": row ", r, " of ", shape,
            " contains +inf, which has no softmax");
  return m;
}

// log(sum_j exp(row_j - m)) in double.
inline double log_sum_exp_shifted(const float* row, int64_t n, float m) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(row[j] - m);
  return std::log(s);
}

// softmax or log_softmax (forward and backward entries given) as one CUDA graph node.
template <class Forward, class Backward>
Tensor cuda_row_op(const Tensor& x, int64_t n, std::string_view op, Forward forward,
                   Backward backward) {
  Tensor y = Tensor::empty(x.shape(), DType::f32, x.device());
  const int64_t rows = x.numel() / n;
  (cuda_backend().*forward)(x.device_data<float>(), y.device_data<float>(), rows, n);
  return record(y, op, {x}, [y = y.detach(), rows, n, backward](const Tensor& g) {
    Tensor dx = Tensor::empty(y.shape(), DType::f32, y.device());
    (cuda_backend().*backward)(g.device_data<float>(), y.device_data<float>(),
                               dx.device_data<float>(), rows, n);
    return GradList{dx};
  });
}

// cross_entropy on CUDA: the loss stays on the device; lse is saved in double, as on the CPU.
inline Tensor cuda_cross_entropy(const Tensor& logits, const Tensor& targets,
                                 int32_t ignore_index) {
  const int64_t rows = logits.dim(0), classes = logits.dim(1);
  const std::shared_ptr<void> lse = cuda_buffer(static_cast<size_t>(rows) * sizeof(double));
  Tensor loss = Tensor::empty(Shape{}, DType::f32, logits.device());
  const int64_t count = cuda_backend().cross_entropy(
      logits.device_data<float>(), targets.device_data<int32_t>(), rows, classes, ignore_index,
      static_cast<double*>(lse.get()), loss.device_data<float>());
  return record(loss, "cross_entropy", {logits},
                [logits = logits.detach(), targets = targets.detach(), lse, count,
                 ignore_index](const Tensor& g) {
                  Tensor gx = Tensor::empty(logits.shape(), DType::f32, logits.device());
                  cuda_backend().cross_entropy_backward(
                      logits.device_data<float>(), targets.device_data<int32_t>(),
                      static_cast<const double*>(lse.get()), g.device_data<float>(),
                      gx.device_data<float>(), logits.dim(0), logits.dim(1), ignore_index, count);
                  return GradList{gx};
                });
}

}  // namespace detail

inline Tensor softmax(const Tensor& x) {
  const int64_t n = detail::softmax_row_length(x, "softmax");
  if (detail::on_cuda(x))
    return detail::cuda_row_op(x, n, "softmax", &detail::CudaBackend::softmax,
                               &detail::CudaBackend::softmax_backward);
  Tensor y = detail::map_rows(x, n, [&](const float* row, float* out, int64_t r) {
    const float m = detail::softmax_row_max(row, n, "softmax", x.shape(), r);
    double s = 0;
    for (int64_t j = 0; j < n; ++j) {
      out[j] = std::exp(row[j] - m);
      s += out[j];
    }
    const auto inv = static_cast<float>(1.0 / s);
    for (int64_t j = 0; j < n; ++j) out[j] *= inv;
  });
  return detail::record(y, "softmax", {x}, [y = y.detach(), n](const Tensor& g) {
    return detail::GradList{
        detail::map_rows(g, y, n, [n](const float* grow, const float* yrow, float* gx) {
          double dot = 0;
          for (int64_t j = 0; j < n; ++j) dot += static_cast<double>(grow[j]) * yrow[j];
          const auto d = static_cast<float>(dot);
          for (int64_t j = 0; j < n; ++j) gx[j] = yrow[j] * (grow[j] - d);
        })};
  });
}

inline Tensor log_softmax(const Tensor& x) {
  const int64_t n = detail::softmax_row_length(x, "log_softmax");
  if (detail::on_cuda(x))
    return detail::cuda_row_op(x, n, "log_softmax", &detail::CudaBackend::log_softmax,
                               &detail::CudaBackend::log_softmax_backward);
  Tensor y = detail::map_rows(x, n, [&](const float* row, float* out, int64_t r) {
    const float m = detail::softmax_row_max(row, n, "log_softmax", x.shape(), r);
    const auto log_s = static_cast<float>(detail::log_sum_exp_shifted(row, n, m));
    for (int64_t j = 0; j < n; ++j) out[j] = (row[j] - m) - log_s;
  });
  return detail::record(y, "log_softmax", {x}, [y = y.detach(), n](const Tensor& g) {
    return detail::GradList{
        detail::map_rows(g, y, n, [n](const float* grow, const float* yrow, float* gx) {
          double total = 0;
          for (int64_t j = 0; j < n; ++j) total += grow[j];
          const auto t = static_cast<float>(total);
          for (int64_t j = 0; j < n; ++j) gx[j] = grow[j] - std::exp(yrow[j]) * t;
        })};
  });
}

// Mean negative log-likelihood of the targets under softmax(logits); a 0-d tensor.
inline Tensor cross_entropy(const Tensor& logits, const Tensor& targets,
                            int32_t ignore_index = -100) {
  detail::check_f32("cross_entropy", logits), detail::check_i32("cross_entropy", targets);
  REX_CHECK(logits.rank() == 2 && targets.rank() == 1 && targets.dim(0) == logits.dim(0),
            "cross_entropy: logits ", logits.shape(), " and targets ", targets.shape(),
            " do not match; expected logits [N, C] and targets [N]");
  const int64_t rows = logits.dim(0), classes = logits.dim(1);
  if (detail::common_device("cross_entropy", {logits, targets}).is_cuda())
    return detail::cuda_cross_entropy(logits, targets, ignore_index);
  const float* px = logits.data<float>();
  const int32_t* pt = targets.data<int32_t>();
  // Log-sum-exp of each counted row, kept in double: the backward's exp(x - lse) would otherwise
  // lose digits when the logits are large.
  std::vector<double> lse(static_cast<size_t>(rows), 0.0);
  double total = 0;
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t t = pt[r];
    if (t == ignore_index) continue;
    REX_CHECK(t >= 0 && t < classes, "cross_entropy: target ", t, " at row ", r,
              " is out of range [0, ", classes, ") for logits ", logits.shape(),
              " (ignore_index is ", ignore_index, ")");
    const float* row = px + r * classes;
    const float m = detail::softmax_row_max(row, classes, "cross_entropy", logits.shape(), r);
    const double row_lse = m + detail::log_sum_exp_shifted(row, classes, m);
    lse[static_cast<size_t>(r)] = row_lse;
    total += row_lse - row[t];
    ++count;
  }
  Tensor loss = scalar(count > 0 ? static_cast<float>(total / static_cast<double>(count)) : 0.0f);
  return detail::record(loss, "cross_entropy", {logits},
                        [logits = logits.detach(), targets = targets.detach(), lse = std::move(lse),
                         count, ignore_index](const Tensor& g) {
                          const int64_t rows = logits.dim(0), classes = logits.dim(1);
                          Tensor gx = zeros(logits.shape());
                          if (count == 0) return detail::GradList{gx};
                          const float scale = g.data<float>()[0] / static_cast<float>(count);
                          const float* px = logits.data<float>();
                          const int32_t* pt = targets.data<int32_t>();
                          float* pgx = gx.data<float>();
                          for (int64_t r = 0; r < rows; ++r) {
                            if (pt[r] == ignore_index) continue;
                            const double row_lse = lse[static_cast<size_t>(r)];
                            for (int64_t j = 0; j < classes; ++j)
                              pgx[r * classes + j] =
                                  scale *
                                  static_cast<float>(std::exp(px[r * classes + j] - row_lse));
                            pgx[r * classes + pt[r]] -= scale;
                          }
                          return detail::GradList{gx};
                        });
}

}  // namespace rex
