// The top-k of one row by one warp, shared by topk_kernel (kernels/index.cu) and the router's
// softmax_topk_kernel (kernels/reduce.cu), so that the two select with the same bits.
//
// For each of the k picks, every lane takes the best of its positions (i = lane, lane + 32, ...)
// that rank after the previous pick, and the warp combines the lane candidates with xor shuffles;
// rex::detail::ranks_before (the CPU's comparator, a total order on (score, position)) makes the
// result independent of the combination tree. Lane 0 writes the pick's score and position.
#pragma once

#include "common.cuh"

namespace rex::cuda::detail {

constexpr int kWarp = 32;

// True when position i of row r ranks before position j (on the scores `hidden` leaves).
__device__ inline bool row_ranks_before(const float* row, int64_t r,
                                        const rex::detail::TopKHidden& hidden, int64_t i,
                                        int64_t j) {
  return rex::detail::ranks_before(hidden.score(row, r, i), i, hidden.score(row, r, j), j);
}

// Row r's k best positions and scores into values[r k ...] and indices[r k ...]; every lane of
// the warp calls it (lane = threadIdx.x % 32).
__device__ inline void topk_row(const float* row, int64_t r, const rex::detail::TopKHidden& hidden,
                                float* values, int32_t* indices, int64_t n, int64_t k, int lane) {
  int64_t previous = -1;
  for (int64_t j = 0; j < k; ++j) {
    // This lane's best among its positions that rank after the previous pick (-1: none).
    int64_t best = -1;
    for (int64_t i = lane; i < n; i += kWarp) {
      if (previous >= 0 && !row_ranks_before(row, r, hidden, previous, i)) continue;
      if (best < 0 || row_ranks_before(row, r, hidden, i, best)) best = i;
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const int64_t other = __shfl_xor_sync(0xffffffffu, best, offset);
      if (other >= 0 && (best < 0 || row_ranks_before(row, r, hidden, other, best))) best = other;
    }
    if (lane == 0) {
      values[r * k + j] = hidden.score(row, r, best);
      indices[r * k + j] = static_cast<int32_t>(best);
    }
    previous = best;
  }
}

}  // namespace rex::cuda::detail
