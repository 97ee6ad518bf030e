// CPU kernels for top-k selection, axis permutation and the rotary position embedding (the CPU side
// of those entries of kernels/index.cu), with the arguments of their rex/backend/cuda/backend.hpp
// counterparts. The formulas are in the file-top comments of rex/ops/topk.hpp, shape.hpp and
// rope.hpp. (gather_rows and scatter_add_rows keep their loops in rex/ops/index.hpp for now.)
//
// topk ranks each row with std::partial_sort over an index array under ranks_before (NaN first,
// then larger values, ties to the lower position), a strict weak ordering.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "rex/backend/pointwise.hpp"
#include "rex/core/parallel.hpp"

namespace rex::detail::cpu {

// Per row of n: the k best values in rank order and their positions.
inline void topk(const float* x, float* values, int32_t* indices, int64_t rows, int64_t n,
                 int64_t k) {
  std::vector<int32_t> order(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * n;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [row](int32_t i, int32_t j) { return ranks_before(row[i], i, row[j], j); });
    for (int64_t j = 0; j < k; ++j) {
      indices[r * k + j] = order[static_cast<size_t>(j)];
      values[r * k + j] = row[order[static_cast<size_t>(j)]];
    }
  }
}

// gx [rows, n] = 0 except gx[r, indices[r, j]] = g[r, j].
inline void topk_backward(const float* g, const int32_t* indices, float* gx, int64_t rows,
                          int64_t n, int64_t k) {
  std::fill(gx, gx + rows * n, 0.0f);
  for (int64_t e = 0; e < rows * k; ++e) gx[(e / k) * n + indices[e]] = g[e];
}

// out = x with its axes permuted: out axis i is x axis perm[i], x having extents dims[0 .. rank).
// When the last axis stays last (splitting or merging attention heads), its rows are contiguous in
// both tensors: whole rows are copied and only the outer axes walked.
inline void permute(const float* x, float* out, int64_t rank, const int64_t* dims,
                    const int64_t* perm) {
  std::vector<int64_t> out_dims(static_cast<size_t>(rank)), in_strides(static_cast<size_t>(rank));
  int64_t total = 1;
  for (int64_t i = 0; i < rank; ++i) {
    const auto a = static_cast<size_t>(i);
    out_dims[a] = dims[perm[i]];
    total *= out_dims[a];
    // in_strides[i]: the step in x when output axis i advances by one.
    in_strides[a] = 1;
    for (int64_t j = perm[i] + 1; j < rank; ++j) in_strides[a] *= dims[j];
  }
  const bool keeps_rows = rank > 1 && in_strides[static_cast<size_t>(rank - 1)] == 1;
  const int64_t block = keeps_rows ? out_dims.back() : 1;
  const int64_t walked = keeps_rows ? rank - 1 : rank;
  // Runs of output blocks in parallel, each starting its odometer at its first block.
  for_each_run(block == 0 ? 0 : total / block, block, [&](int64_t first, int64_t last) {
    std::vector<int64_t> index(static_cast<size_t>(rank), 0);
    int64_t offset = 0;
    for (int64_t axis = walked - 1, rest = first; axis >= 0; --axis) {
      const auto a = static_cast<size_t>(axis);
      index[a] = rest % out_dims[a];
      rest /= out_dims[a];
      offset += index[a] * in_strides[a];
    }
    for (int64_t o = first; o < last; ++o) {
      std::copy_n(x + offset, block, out + o * block);
      for (int64_t axis = walked - 1; axis >= 0; --axis) {
        const auto a = static_cast<size_t>(axis);
        offset += in_strides[a];
        if (++index[a] < out_dims[a]) break;
        offset -= in_strides[a] * out_dims[a];
        index[a] = 0;
      }
    }
  });
}

// x [outer, time, head_dim] rotated by `direction` (+1, or -1 for the backward) through the [time,
// head_dim / 2] cos and sin tables; element i pairs with i + head_dim / 2.
inline void rope(const float* x, const float* cos_table, const float* sin_table, float* y,
                 int64_t outer, int64_t time, int64_t head_dim, float direction) {
  const int64_t half = head_dim / 2;
  REX_PARALLEL_FOR()
  for (int64_t r = 0; r < outer; ++r) {
    for (int64_t t = 0; t < time; ++t) {
      const float* in = x + (r * time + t) * head_dim;
      float* o = y + (r * time + t) * head_dim;
      const float* c = cos_table + t * half;
      const float* s = sin_table + t * half;
      for (int64_t i = 0; i < half; ++i) {
        const float a = in[i], b = in[i + half], sn = direction * s[i];
        o[i] = a * c[i] - b * sn;
        o[i + half] = b * c[i] + a * sn;
      }
    }
  }
}

}  // namespace rex::detail::cpu
