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
// from inside the kernel: it comes out as NaN instead. cross_entropy still checks its targets: on
// the host when they were uploaded from there, else in the kernel, whose flag is read back.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

#include "rex/backend/cpu/reduce.hpp"
#include "rex/backend/dispatch.hpp"
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

// softmax (log = false) or log_softmax over rows of n, on x's device: the CUDA table entry or the
// CPU loop of the same name. softmax_rows_grad is its backward from g and the saved y.
inline Tensor softmax_rows(const Tensor& x, int64_t n, bool log) {
  Tensor y = Tensor::empty(x.shape(), DType::f32, x.device());
  const int64_t rows = x.numel() / n;
  const float* px = x.device_data<float>();
  float* py = y.device_data<float>();
  if (on_cuda(x)) {
    (log ? cuda_backend().log_softmax : cuda_backend().softmax)(px, py, rows, n);
  } else {
    (log ? cpu::log_softmax : cpu::softmax)(px, py, rows, n, x.shape());
  }
  return y;
}

inline Tensor softmax_rows_grad(const Tensor& g, const Tensor& y, int64_t n, bool log) {
  Tensor dx = Tensor::empty(y.shape(), DType::f32, y.device());
  const int64_t rows = y.numel() / n;
  const float *pg = g.device_data<float>(), *py = y.device_data<float>();
  float* pdx = dx.device_data<float>();
  if (on_cuda(y)) {
    (log ? cuda_backend().log_softmax_backward : cuda_backend().softmax_backward)(pg, py, pdx, rows,
                                                                                  n);
  } else {
    (log ? cpu::log_softmax_backward : cpu::softmax_backward)(pg, py, pdx, rows, n);
  }
  return dx;
}

// The loss [] and the log-sum-exp of each counted row (double, in a raw buffer on the logits'
// device: there is no f64 tensor), with the number of counted rows.
struct CrossEntropyValues {
  Tensor loss;
  std::shared_ptr<void> lse;
  int64_t count = 0;
};

inline CrossEntropyValues cross_entropy_values(const Tensor& logits, const Tensor& targets,
                                               int32_t ignore_index) {
  const int64_t rows = logits.dim(0), classes = logits.dim(1);
  CrossEntropyValues out{
      Tensor::empty(Shape{}, DType::f32, logits.device()),
      device_buffer(logits.device(), static_cast<size_t>(rows) * sizeof(double))};
  const float* px = logits.device_data<float>();
  const int32_t* pt = targets.device_data<int32_t>();
  auto* lse = static_cast<double*>(out.lse.get());
  float* loss = out.loss.device_data<float>();
  if (on_cuda(logits)) {
    // Targets uploaded from the host are checked and counted there: nothing is read back.
    const int32_t* known = targets.host_values<int32_t>();
    const int64_t known_count =
        known ? cpu::counted_targets(known, rows, classes, ignore_index) : -1;
    out.count =
        cuda_backend().cross_entropy(px, pt, rows, classes, ignore_index, lse, loss, known_count);
  } else {
    out.count = cpu::cross_entropy(px, pt, rows, classes, ignore_index, lse, loss);
  }
  return out;
}

// y, softmax(x) over rows of n, recorded with its backward.
inline Tensor record_softmax(const Tensor& y, const Tensor& x, int64_t n) {
  return record(y, "softmax", {x}, [y = y.detach(), n](const Tensor& g) {
    return GradList{softmax_rows_grad(g, y, n, /*log=*/false)};
  });
}

}  // namespace detail

inline Tensor softmax(const Tensor& x) {
  const int64_t n = detail::softmax_row_length(x, "softmax");
  return detail::record_softmax(detail::softmax_rows(x, n, /*log=*/false), x, n);
}

inline Tensor log_softmax(const Tensor& x) {
  const int64_t n = detail::softmax_row_length(x, "log_softmax");
  Tensor y = detail::softmax_rows(x, n, /*log=*/true);
  return detail::record(y, "log_softmax", {x}, [y = y.detach(), n](const Tensor& g) {
    return detail::GradList{detail::softmax_rows_grad(g, y, n, /*log=*/true)};
  });
}

// Mean negative log-likelihood of the targets under softmax(logits); a 0-d tensor.
inline Tensor cross_entropy(const Tensor& logits, const Tensor& targets,
                            int32_t ignore_index = -100) {
  detail::check_f32("cross_entropy", logits), detail::check_i32("cross_entropy", targets);
  REX_CHECK(logits.rank() == 2 && targets.rank() == 1 && targets.dim(0) == logits.dim(0),
            "cross_entropy: logits ", logits.shape(), " and targets ", targets.shape(),
            " do not match; expected logits [N, C] and targets [N]");
  detail::common_device("cross_entropy", {logits, targets});
  detail::CrossEntropyValues values = detail::cross_entropy_values(logits, targets, ignore_index);
  return detail::record(values.loss, "cross_entropy", {logits},
                        [logits = logits.detach(), targets = targets.detach(), lse = values.lse,
                         count = values.count, ignore_index](const Tensor& g) {
                          Tensor gx = Tensor::empty(logits.shape(), DType::f32, logits.device());
                          const float *px = logits.device_data<float>(),
                                      *pg = g.device_data<float>();
                          const int32_t* pt = targets.device_data<int32_t>();
                          const auto* plse = static_cast<const double*>(lse.get());
                          float* pgx = gx.device_data<float>();
                          const int64_t rows = logits.dim(0), classes = logits.dim(1);
                          (detail::on_cuda(logits) ? detail::cuda_backend().cross_entropy_backward
                                                   : detail::cpu::cross_entropy_backward)(
                              px, pt, plse, pg, pgx, rows, classes, ignore_index, count);
                          return detail::GradList{gx};
                        });
}

}  // namespace rex
