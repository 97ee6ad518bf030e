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

#include "rex/backend/cpu/eigen.hpp"
#include <algorithm>
#include <cstdint>

#include "rex/core/parallel.hpp"

namespace rex::detail {

using ArrayMap = Eigen::Map<Eigen::ArrayXf>;
using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf>;

// Runs f(first, count) over [0, n) in chunks of kParallelElements, in parallel when there are
// several; the chunking does not depend on the thread count.
template <class F>
void for_each_chunk(int64_t n, F f) {
  for_each_run(n, 1, [&f](int64_t first, int64_t last) { f(first, last - first); });
}

}  // namespace rex::detail
