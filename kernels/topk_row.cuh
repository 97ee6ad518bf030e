// The top-k of one row by one warp, shared by topk_kernel (kernels/index.cu) and the router's
// softmax_topk_kernel (kernels/reduce.cu), so that the two select with the same bits.
//
// For each of the k picks, every lane takes the best of its positions (i = lane, lane + 32, ...)
// that rank after the previous pick, and the warp combines the lane candidates with xor shuffles;
// rex::detail::ranks_before (the CPU's comparator, a total order on (score, position)) makes the
// result independent of the combination tree, and leaves every lane with the same pick. Lane 0
// writes the pick's score and position.
#pragma once

#include "common.cuh"

namespace rex::cuda::detail {

constexpr int kWarp = 32;

// Row r's k best positions and scores into values[r k ...] and indices[r k ...]; every lane of
// the warp calls it (lane = threadIdx.x % 32). Each pick reads the row once (a score per
// position); the previous pick's score and each lane's best so far stay in registers, and the
// shuffles carry a candidate's score with its position.
__device__ inline void topk_row(const float* row, int64_t r, const rex::detail::TopKHidden& hidden,
                                float* values, int32_t* indices, int64_t n, int64_t k, int lane) {
  using rex::detail::ranks_before;
  int64_t previous = -1;
  float previous_score = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    // This lane's best among its positions that rank after the previous pick (-1: none).
    int64_t best = -1;
    float best_score = 0.0f;
    for (int64_t i = lane; i < n; i += kWarp) {
      const float score = hidden.score(row, r, i);
      if (previous >= 0 && !ranks_before(previous_score, previous, score, i)) continue;
      if (best < 0 || ranks_before(score, i, best_score, best)) best = i, best_score = score;
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const int64_t other = __shfl_xor_sync(0xffffffffu, best, offset);
      const float other_score = __shfl_xor_sync(0xffffffffu, best_score, offset);
      if (other >= 0 && (best < 0 || ranks_before(other_score, other, best_score, best)))
        best = other, best_score = other_score;
    }
    if (lane == 0) {
      values[r * k + j] = best_score;
      indices[r * k + j] = static_cast<int32_t>(best);
    }
    previous = best, previous_score = best_score;
  }
}

}  // namespace rex::cuda::detail
