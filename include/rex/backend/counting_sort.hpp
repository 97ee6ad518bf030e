// The one counting sort on the host: positions 0 .. n - 1 grouped by an i32 key in [0, buckets).
//
// Used by the MoE routing plan (rex/nn/moe.hpp plan_routing: slots by expert) and by the CUDA
// scatter_add_rows (kernels/index.cu: source rows by output row). One pass counts the keys, a
// prefix sum turns the counts into offsets, a second pass drops each position at its bucket's
// cursor. The sort is stable: within a bucket the positions increase, which both users rely on for
// determinism (the dispatch's segments keep token order; scatter_add_rows sums each row's sources
// in order).
#pragma once

#include <cstdint>
#include <vector>

namespace rex::detail {

struct BucketOrder {
  std::vector<int64_t> offsets;  // [buckets + 1]: bucket b is order[offsets[b] .. offsets[b + 1])
  std::vector<int64_t> order;    // [n]: the positions, bucket by bucket, increasing within each
};

// Sorts positions 0 .. n - 1 by keys[i]; a key outside [0, buckets) calls bad_key(key, position),
// which must throw (each caller reports the problem in its own op's words).
template <class BadKey>
BucketOrder counting_sort(const int32_t* keys, int64_t n, int64_t buckets, BadKey&& bad_key) {
  BucketOrder out;
  out.offsets.assign(static_cast<size_t>(buckets) + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t key = keys[i];
    if (key < 0 || key >= buckets) bad_key(key, i);
    ++out.offsets[static_cast<size_t>(key) + 1];
  }
  for (size_t b = 0; b < static_cast<size_t>(buckets); ++b) out.offsets[b + 1] += out.offsets[b];
  std::vector<int64_t> cursor(out.offsets.begin(), out.offsets.end() - 1);
  out.order.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    out.order[static_cast<size_t>(cursor[static_cast<size_t>(keys[i])]++)] = i;
  return out;
}

}  // namespace rex::detail
