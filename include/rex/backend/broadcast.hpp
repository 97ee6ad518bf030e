// NumPy broadcasting of shapes, shared by the CPU loops and the CUDA launch descriptions: shapes
// are aligned at their last axis and an extent of 1 (or a missing leading axis) stretches.
// Device-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "rex/core/error.hpp"
#include "rex/core/shape.hpp"

namespace rex::detail {

// The NumPy broadcast of two shapes; `op` names the caller in the error.
inline Shape broadcast_shapes(const Shape& a, const Shape& b, std::string_view op) {
  const int64_t rank = std::max(a.rank(), b.rank());
  std::vector<int64_t> dims(static_cast<size_t>(rank));
  for (int64_t i = 0; i < rank; ++i) {
    const int64_t da = i < rank - a.rank() ? 1 : a[i - (rank - a.rank())];
    const int64_t db = i < rank - b.rank() ? 1 : b[i - (rank - b.rank())];
    REX_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", a, " and ", b,
              " cannot be broadcast together");
    dims[static_cast<size_t>(i)] = da == 1 ? db : da;
  }
  return Shape(std::move(dims));
}

// Row-major element strides of `in` seen through the rank of `out`, 0 on stretched axes.
inline std::vector<int64_t> broadcast_strides(const Shape& in, const Shape& out) {
  const int64_t lead = out.rank() - in.rank();
  std::vector<int64_t> strides(static_cast<size_t>(out.rank()), 0);
  int64_t stride = 1;
  for (int64_t i = in.rank() - 1; i >= 0; --i) {
    if (in[i] != 1) strides[static_cast<size_t>(i + lead)] = stride;
    stride *= in[i];
  }
  return strides;
}

}  // namespace rex::detail
