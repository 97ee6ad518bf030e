// Vectorised elementwise kernels through Eigen arrays mapped over rex buffers (no copies).
//
// ArrayMap / ConstArrayMap view n floats as an Eigen array, so that expressions such as
// a / (1 + (-a).exp()) * b compile to SIMD code (vectorised exp, sqrt and division, which plain
// loops do not get: std::exp is scalar, and std::sqrt may set errno). for_each_chunk splits a long
// range into fixed chunks run in parallel.
//
// Determinism: Eigen computes the elements before the first aligned address with scalar code, and
// its scalar and vectorised exp can differ in the last bit. Every mapped buffer is therefore tensor
// storage (64-byte aligned, fixed offsets) or an Eigen array, whose alignment is the same in every
// run, never a std::vector, whose address would make a resumed run drift from an uninterrupted one.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>

#include "rex/core/parallel.hpp"

namespace rex::detail {

using ArrayMap = Eigen::Map<Eigen::ArrayXf>;
using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf>;

// Runs f(first, count) over [0, n) in chunks of a fixed size, in parallel when there are several;
// the chunking does not depend on the thread count.
template <class F>
void for_each_chunk(int64_t n, F f) {
  constexpr int64_t kChunk = kParallelElements;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  REX_PARALLEL_FOR(if (chunks > 1))
  for (int64_t c = 0; c < chunks; ++c) f(c * kChunk, std::min(kChunk, n - c * kChunk));
}

}  // namespace rex::detail
