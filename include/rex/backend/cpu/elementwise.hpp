// CPU kernels for elementwise work: map (one input), zip (two inputs, broadcast), and the broadcast
// iterator that zip, sum_to, broadcast_to and where share.
//
// Broadcasting follows NumPy: shapes are aligned at their last axis and an extent of 1 (or a
// missing leading axis) stretches. The iterator walks the output in row-major order and keeps, per
// input, the element offset, with stride 0 on stretched axes; the common cases (equal shapes, a
// scalar operand) take flat loops that the compiler vectorises.
#pragma once

#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "rex/core/tensor.hpp"

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

// Calls body(out_index, offsets) for every element of `out` in row-major order, where offsets[k] is
// the element of input k (of shape ins[k], broadcastable to out) that lines up with it.
template <size_t N, class Body>
void for_each_broadcast(const Shape& out, const std::array<Shape, N>& ins, Body&& body) {
  const int64_t rank = out.rank();
  std::array<int64_t, N> offsets{};
  if (rank == 0) {
    body(int64_t{0}, offsets);
    return;
  }
  std::array<std::vector<int64_t>, N> strides;
  for (size_t k = 0; k < N; ++k) strides[k] = broadcast_strides(ins[k], out);
  const int64_t inner = out[rank - 1], total = out.numel();
  std::vector<int64_t> index(static_cast<size_t>(rank), 0);
  for (int64_t o = 0; o < total; o += inner) {
    std::array<int64_t, N> at = offsets;
    for (int64_t j = 0; j < inner; ++j) {
      body(o + j, at);
      for (size_t k = 0; k < N; ++k) at[k] += strides[k][static_cast<size_t>(rank - 1)];
    }
    // Advance the odometer over the outer axes, keeping the offsets in step.
    for (int64_t axis = rank - 2; axis >= 0; --axis) {
      const auto a = static_cast<size_t>(axis);
      if (++index[a] < out[axis]) {
        for (size_t k = 0; k < N; ++k) offsets[k] += strides[k][a];
        break;
      }
      for (size_t k = 0; k < N; ++k) offsets[k] -= strides[k][a] * (out[axis] - 1);
      index[a] = 0;
    }
  }
}

// out[i] = f(x[i]) over an f32 tensor.
template <class F>
Tensor map(const Tensor& x, F&& f) {
  Tensor out = Tensor::empty(x.shape());
  const float* px = x.data<float>();
  float* po = out.data<float>();
  for (int64_t i = 0, n = x.numel(); i < n; ++i) po[i] = f(px[i]);
  return out;
}

// out = f(a, b) elementwise with broadcasting; `op` names the caller in shape errors.
template <class F>
Tensor zip(const Tensor& a, const Tensor& b, std::string_view op, F&& f) {
  const Shape shape = broadcast_shapes(a.shape(), b.shape(), op);
  Tensor out = Tensor::empty(shape);
  const float *pa = a.data<float>(), *pb = b.data<float>();
  float* po = out.data<float>();
  const int64_t n = shape.numel();
  if (a.shape() == b.shape()) {
    for (int64_t i = 0; i < n; ++i) po[i] = f(pa[i], pb[i]);
  } else if (b.numel() == 1 && a.numel() == n) {
    const float vb = pb[0];
    for (int64_t i = 0; i < n; ++i) po[i] = f(pa[i], vb);
  } else if (a.numel() == 1 && b.numel() == n) {
    const float va = pa[0];
    for (int64_t i = 0; i < n; ++i) po[i] = f(va, pb[i]);
  } else {
    for_each_broadcast<2>(shape, {a.shape(), b.shape()},
                          [&](int64_t o, const auto& at) { po[o] = f(pa[at[0]], pb[at[1]]); });
  }
  return out;
}

// out = f(a, b, c) elementwise over three tensors of one shape (used by fused gradient formulas).
template <class F>
Tensor zip3(const Tensor& a, const Tensor& b, const Tensor& c, F&& f) {
  Tensor out = Tensor::empty(a.shape());
  const float *pa = a.data<float>(), *pb = b.data<float>(), *pc = c.data<float>();
  float* po = out.data<float>();
  for (int64_t i = 0, n = a.numel(); i < n; ++i) po[i] = f(pa[i], pb[i], pc[i]);
  return out;
}

// Row-wise kernels over the last axis, for fused ops that normalise rows (softmax and friends):
// out has a's shape and f(a_row, out_row, r) fills row r, or f(a_row, b_row, out_row) when a second
// tensor of the same shape is read alongside (a gradient and a saved output, say).
template <class F>
Tensor map_rows(const Tensor& a, int64_t row_length, F&& f) {
  Tensor out = Tensor::empty(a.shape());
  const float* pa = a.data<float>();
  float* po = out.data<float>();
  for (int64_t r = 0, rows = a.numel() / row_length; r < rows; ++r)
    f(pa + r * row_length, po + r * row_length, r);
  return out;
}

template <class F>
Tensor map_rows(const Tensor& a, const Tensor& b, int64_t row_length, F&& f) {
  Tensor out = Tensor::empty(a.shape());
  const float *pa = a.data<float>(), *pb = b.data<float>();
  float* po = out.data<float>();
  for (int64_t r = 0, rows = a.numel() / row_length; r < rows; ++r) {
    const int64_t at = r * row_length;
    f(pa + at, pb + at, po + at);
  }
  return out;
}

}  // namespace rex::detail
