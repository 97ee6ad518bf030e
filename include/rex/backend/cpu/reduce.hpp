// CPU kernels for the reductions and the row-wise fused ops (the CPU side of kernels/reduce.cu):
// sum_axis, max_axis, softmax, log_softmax, cross_entropy and rms_norm, each with its backward,
// and the MoE router's load-balancing loss (whose kernels are in kernels/routing.cu).
// Every entry takes the arguments of its rex/backend/cuda/backend.hpp counterpart (host pointers
// here); the formulas are in the file-top comments of rex/ops/reduce.hpp, softmax.hpp and norm.hpp.
//
// Row sums (softmax, log-sum-exp, rms_norm's squares and dot products, rms_norm's dw) are
// accumulated in double, one row after the other. Where the kernels write NaN for a row that has no
// softmax (all -inf, or a +inf), these throw rex::Error naming the row; `shape` is the input's
// shape, for that message.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <vector>

#include "rex/backend/pointwise.hpp"
#include "rex/core/error.hpp"
#include "rex/core/parallel.hpp"
#include "rex/core/shape.hpp"

namespace rex::detail::cpu {

// x viewed as [outer, n, inner] summed over n into out [outer, inner] (which must start zeroed).
inline void sum_axis(const float* x, float* out, int64_t outer, int64_t n, int64_t inner) {
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < inner; ++i) out[o * inner + i] += x[(o * n + j) * inner + i];
}

// The load-balancing loss of the MoE router (rex/backend/cuda/backend.hpp's balance_loss):
// loss[0] = scale * sum_e shares[e] * (sum_t probs[t, e]) / tokens, every sum in order from 0,
// the division a product by 1 / tokens; the products go through memory before they are added, so
// no compiler fuses them into FMAs.
inline void balance_loss(const float* probs, const float* shares, float* loss, int64_t tokens,
                         int64_t pool, float scale) {
  const float inv_tokens = 1.0f / static_cast<float>(tokens);
  std::vector<float> term(static_cast<size_t>(pool), 0.0f);  // column sums, then the terms
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t e = 0; e < pool; ++e) term[static_cast<size_t>(e)] += probs[t * pool + e];
  for (int64_t e = 0; e < pool; ++e)
    term[static_cast<size_t>(e)] = shares[e] * (term[static_cast<size_t>(e)] * inv_tokens);
  float total = 0.0f;
  for (int64_t e = 0; e < pool; ++e) total += term[static_cast<size_t>(e)];
  loss[0] = total * scale;
}

// d_probs [tokens, pool] = ((g[0] * scale) * shares[e]) * (1 / tokens).
inline void balance_loss_backward(const float* g, const float* shares, float* d_probs,
                                  int64_t tokens, int64_t pool, float scale) {
  const float inv_tokens = 1.0f / static_cast<float>(tokens), g_scaled = g[0] * scale;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t e = 0; e < pool; ++e) d_probs[t * pool + e] = g_scaled * shares[e] * inv_tokens;
}

// argmax holds the position along n of each maximum (ranks_before: NaN first, then the first).
inline void max_axis(const float* x, float* out, int32_t* argmax, int64_t outer, int64_t n,
                     int64_t inner) {
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t i = 0; i < inner; ++i) {
      const float* column = x + o * n * inner + i;
      int64_t best = 0;
      for (int64_t j = 1; j < n; ++j)
        if (ranks_before(column[j * inner], j, column[best * inner], best)) best = j;
      out[o * inner + i] = column[best * inner];
      argmax[o * inner + i] = static_cast<int32_t>(best);
    }
  }
}

// gx [outer, n, inner] = 0 except gx[o, argmax[o, i], i] = g[o, i].
inline void max_axis_backward(const float* g, const int32_t* argmax, float* gx, int64_t outer,
                              int64_t n, int64_t inner) {
  std::fill(gx, gx + outer * n * inner, 0.0f);
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < inner; ++i)
      gx[(o * n + argmax[o * inner + i]) * inner + i] += g[o * inner + i];
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

inline void softmax(const float* x, float* y, int64_t rows, int64_t n, const Shape& shape) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * n;
    float* out = y + r * n;
    const float m = softmax_row_max(row, n, "softmax", shape, r);
    double s = 0;
    for (int64_t j = 0; j < n; ++j) {
      out[j] = std::exp(row[j] - m);
      s += out[j];
    }
    const auto inv = static_cast<float>(1.0 / s);
    for (int64_t j = 0; j < n; ++j) out[j] *= inv;
  }
}

inline void softmax_backward(const float* g, const float* y, float* dx, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *grow = g + r * n, *yrow = y + r * n;
    double dot = 0;
    for (int64_t j = 0; j < n; ++j) dot += static_cast<double>(grow[j]) * yrow[j];
    const auto d = static_cast<float>(dot);
    for (int64_t j = 0; j < n; ++j) dx[r * n + j] = yrow[j] * (grow[j] - d);
  }
}

inline void log_softmax(const float* x, float* y, int64_t rows, int64_t n, const Shape& shape) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * n;
    const float m = softmax_row_max(row, n, "log_softmax", shape, r);
    const auto log_s = static_cast<float>(log_sum_exp_shifted(row, n, m));
    for (int64_t j = 0; j < n; ++j) y[r * n + j] = (row[j] - m) - log_s;
  }
}

inline void log_softmax_backward(const float* g, const float* y, float* dx, int64_t rows,
                                 int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *grow = g + r * n, *yrow = y + r * n;
    double total = 0;
    for (int64_t j = 0; j < n; ++j) total += grow[j];
    const auto t = static_cast<float>(total);
    for (int64_t j = 0; j < n; ++j) dx[r * n + j] = grow[j] - std::exp(yrow[j]) * t;
  }
}

// The number of rows whose target is not ignore_index; a target out of [0, classes) throws. (The
// CUDA op calls it too when the targets' values are on the host.)
inline int64_t counted_targets(const int32_t* targets, int64_t rows, int64_t classes,
                               int32_t ignore_index) {
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t t = targets[r];
    if (t == ignore_index) continue;
    REX_CHECK(t >= 0 && t < classes, "cross_entropy: target ", t, " at row ", r,
              " is out of range [0, ", classes, ") for logits ", Shape{rows, classes},
              " (ignore_index is ", ignore_index, ")");
    ++count;
  }
  return count;
}

// Writes the mean NLL over the counted rows to *loss and each counted row's log-sum-exp to lse (0
// on ignored rows); returns the number of counted rows. A target out of [0, classes) throws.
inline int64_t cross_entropy(const float* logits, const int32_t* targets, int64_t rows,
                             int64_t classes, int32_t ignore_index, double* lse, float* loss) {
  const Shape shape{rows, classes};
  const int64_t count = counted_targets(targets, rows, classes, ignore_index);
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    lse[r] = 0.0;
    const int32_t t = targets[r];
    if (t == ignore_index) continue;
    const float* row = logits + r * classes;
    const float m = softmax_row_max(row, classes, "cross_entropy", shape, r);
    const double row_lse = m + log_sum_exp_shifted(row, classes, m);
    lse[r] = row_lse;
    total += row_lse - row[t];
  }
  *loss = count > 0 ? static_cast<float>(total / static_cast<double>(count)) : 0.0f;
  return count;
}

// gx = g / count * (exp(logits - lse) - onehot(target)) on counted rows, 0 elsewhere; g is a
// scalar.
inline void cross_entropy_backward(const float* logits, const int32_t* targets, const double* lse,
                                   const float* g, float* gx, int64_t rows, int64_t classes,
                                   int32_t ignore_index, int64_t count) {
  std::fill(gx, gx + rows * classes, 0.0f);
  if (count == 0) return;
  const float scale = g[0] / static_cast<float>(count);
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) continue;
    const double row_lse = lse[r];
    for (int64_t j = 0; j < classes; ++j)
      gx[r * classes + j] = scale * static_cast<float>(std::exp(logits[r * classes + j] - row_lse));
    gx[r * classes + targets[r]] -= scale;
  }
}

// y = x * rstd * w per row of n, rstd[r] = 1 / sqrt(mean(x_r^2) + eps); rows in parallel.
inline void rms_norm(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t n,
                     float eps) {
  for_each_run(rows, n, [=](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const float* row = x + i * n;
      double squares = 0;
      for (int64_t j = 0; j < n; ++j) squares += static_cast<double>(row[j]) * row[j];
      const auto ri = static_cast<float>(1.0 / std::sqrt(squares / static_cast<double>(n) + eps));
      rstd[i] = ri;
      for (int64_t j = 0; j < n; ++j) y[i * n + j] = row[j] * ri * w[j];
    }
  });
}

// dx and dw may be null. dx is computed rows in parallel; dw sums over rows in row order, in
// double, with blocks of columns in parallel (so neither depends on the thread count).
inline void rms_norm_backward(const float* g, const float* x, const float* w, const float* rstd,
                              float* dx, float* dw, int64_t rows, int64_t n) {
  if (dx != nullptr) {
    for_each_run(rows, n, [=](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        const float ri = rstd[i];
        const float* row = x + i * n;
        const float* grow = g + i * n;
        double dot = 0;  // sum of gw * xhat over the row
        for (int64_t j = 0; j < n; ++j) dot += static_cast<double>(grow[j]) * w[j] * (row[j] * ri);
        const auto mean_dot = static_cast<float>(dot / static_cast<double>(n));
        float* dxrow = dx + i * n;
        for (int64_t j = 0; j < n; ++j) dxrow[j] = ri * (grow[j] * w[j] - row[j] * ri * mean_dot);
      }
    });
  }
  if (dw == nullptr) return;
  constexpr int64_t kColumns = 16;  // one cache line of each row per block
  for_each_run((n + kColumns - 1) / kColumns, rows * kColumns, [=](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t column = b * kColumns, count = std::min(kColumns, n - column);
      double sums[kColumns] = {};
      for (int64_t i = 0; i < rows; ++i) {
        const float ri = rstd[i];
        const float *row = x + i * n + column, *grow = g + i * n + column;
        for (int64_t j = 0; j < count; ++j) sums[j] += static_cast<double>(grow[j]) * (row[j] * ri);
      }
      for (int64_t j = 0; j < count; ++j) dw[column + j] = static_cast<float>(sums[j]);
    }
  });
}

}  // namespace rex::detail::cpu
