// CPU kernels for top-k selection, the MoE combine, axis permutation and the rotary position
// embedding (the CPU side of those entries of kernels/index.cu and kernels/routing.cu), with the
// arguments of their rex/backend/cuda/backend.hpp counterparts. The formulas are in the file-top
// comments of rex/ops/topk.hpp, shape.hpp and rope.hpp. (gather_rows and scatter_add_rows keep
// their loops in rex/ops/index.hpp for now.)
//
// topk ranks each row with std::partial_sort over an index array under ranks_before (NaN first,
// then larger values, ties to the lower position), a strict weak ordering.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <vector>

#include "rex/backend/pointwise.hpp"
#include "rex/core/parallel.hpp"

namespace rex::detail::cpu {

// Per row of n: the k best scores (x where `hidden` hides nothing) in rank order and their
// positions.
inline void topk(const float* x, TopKHidden hidden, float* values, int32_t* indices, int64_t rows,
                 int64_t n, int64_t k) {
  std::vector<int32_t> order(static_cast<size_t>(n));
  std::vector<float> scores(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < n; ++i) scores[static_cast<size_t>(i)] = hidden.score(x + r * n, r, i);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t i, int32_t j) {
      return ranks_before(scores[static_cast<size_t>(i)], i, scores[static_cast<size_t>(j)], j);
    });
    for (int64_t j = 0; j < k; ++j) {
      indices[r * k + j] = order[static_cast<size_t>(j)];
      values[r * k + j] = scores[static_cast<size_t>(order[static_cast<size_t>(j)])];
    }
  }
}

// gx [rows, n] = 0 except gx[r, indices[r, j]] = g[r, j] where `hidden` does not hide it, then
// added to `plus` when that is not null (the engine's addition: an addition alone, no product).
inline void topk_backward(const float* g, const int32_t* indices, TopKHidden hidden,
                          const float* plus, float* gx, int64_t rows, int64_t n, int64_t k) {
  std::fill(gx, gx + rows * n, 0.0f);
  for (int64_t e = 0; e < rows * k; ++e) {
    const int64_t r = e / k;
    if (!hidden.hides(r, indices[e])) gx[r * n + indices[e]] = g[e];
  }
  if (plus)
    for (int64_t e = 0; e < rows * n; ++e) gx[e] = plus[e] + gx[e];
}

// The combine of the experts' rows (rex/backend/cuda/backend.hpp's combine_slots): y [tokens, d],
// row t = sum over j of y_sorted[positions[t k + j]] * gates[t k + j], from 0 in j order. The
// products go through memory before they are added, so that no compiler fuses them into FMAs: the
// bits are the kernel's (which rounds each operation) and those of the composed ops it replaces.
inline void combine_slots(const float* y_sorted, const int32_t* positions, const float* gates,
                          float* y, int64_t tokens, int64_t k, int64_t d) {
  for_each_run(tokens, d * k, [&](int64_t first, int64_t last) {
    std::vector<float> product(static_cast<size_t>(d));
    for (int64_t t = first; t < last; ++t) {
      float* row = y + t * d;
      std::fill_n(row, d, 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const float* from = y_sorted + static_cast<int64_t>(positions[t * k + j]) * d;
        const float gate = gates[t * k + j];
        for (int64_t c = 0; c < d; ++c) product[static_cast<size_t>(c)] = from[c] * gate;
        for (int64_t c = 0; c < d; ++c) row[c] += product[static_cast<size_t>(c)];
      }
    }
  });
}

// Its backward: d_y_sorted row positions[s] = g[t] * gates[s] for each slot s of token t = s / k;
// d_gates[s] = the sum over c of g[t, c] * y_sorted[positions[s], c] in the order of the kernel's
// warp: sum l
// (of 32) adds the products at columns l, l + 32, ... from 0, then the sums meet in a butterfly,
// each becoming itself plus the one 16, 8, 4, 2, then 1 away (the products through memory, as
// above).
inline void combine_slots_backward(const float* g, const float* y_sorted, const int32_t* positions,
                                   const float* gates, float* d_y_sorted, float* d_gates,
                                   int64_t tokens, int64_t k, int64_t d) {
  for_each_run(tokens * k, 2 * d, [&](int64_t first, int64_t last) {
    std::vector<float> product(static_cast<size_t>(d));
    for (int64_t s = first; s < last; ++s) {
      const float* g_row = g + s / k * d;
      const float gate = gates[s];
      const int64_t p = positions[s];
      for (int64_t c = 0; c < d; ++c) d_y_sorted[p * d + c] = g_row[c] * gate;
      const float* y_row = y_sorted + p * d;
      for (int64_t c = 0; c < d; ++c) product[static_cast<size_t>(c)] = g_row[c] * y_row[c];
      std::array<float, 32> lanes{}, next{};
      for (int64_t c = 0; c < d; ++c)
        lanes[static_cast<size_t>(c % 32)] += product[static_cast<size_t>(c)];
      for (size_t offset = 16; offset > 0; offset /= 2) {
        for (size_t lane = 0; lane < 32; ++lane) next[lane] = lanes[lane] + lanes[lane ^ offset];
        lanes = next;
      }
      d_gates[s] = lanes[0];
    }
  });
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

// The rows.count() rows of x rotated by `direction` (+1, or -1 for the backward) through the [time,
// head_dim / 2] cos and sin tables, at the positions `rows` gives (RopeRows); element i pairs with
// i + head_dim / 2. With rows.second_heads, x_second (or y_second) set means x (or y) is the two
// tensors apart (the CUDA table's rope).
inline void rope(const float* x, const float* x_second, const float* cos_table,
                 const float* sin_table, float* y, float* y_second, RopeRows rows, int64_t head_dim,
                 float direction) {
  const int64_t half = head_dim / 2;
  REX_PARALLEL_FOR()
  for (int64_t r = 0; r < rows.count(); ++r) {
    const int64_t t = rows.position(r), apart = rows.apart_row(r) * head_dim;
    const bool second = rows.in_second(r);
    const float* in = x_second ? (second ? x_second : x) + apart : x + r * head_dim;
    float* o = y_second ? (second ? y_second : y) + apart : y + r * head_dim;
    const float* c = cos_table + t * half;
    const float* s = sin_table + t * half;
    for (int64_t i = 0; i < half; ++i) {
      const float a = in[i], b = in[i + half], sn = direction * s[i];
      o[i] = a * c[i] - b * sn;
      o[i + half] = b * c[i] + a * sn;
    }
  }
}

}  // namespace rex::detail::cpu
