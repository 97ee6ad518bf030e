// CPU kernels for elementwise work (the CPU side of kernels/elementwise.cu): map (one input), zip
// (two inputs, broadcast), the broadcast iterator that zip, sum_to, broadcast_to and where share,
// and the entries cpu::add, broadcast_copy, sum_to, select, swiglu and swiglu_backward, which take
// the arguments of their rex/backend/cuda/backend.hpp counterparts (shapes in place of the CUDA
// launch description).
//
// Broadcasting follows NumPy (rex/backend/broadcast.hpp). The iterator walks the output in
// row-major order and keeps, per input, the element offset, with stride 0 on stretched axes; the
// common cases (equal shapes, a scalar operand) take flat loops that the compiler vectorises.
#pragma once

#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "rex/backend/broadcast.hpp"
#include "rex/backend/cpu/arrays.hpp"
#include "rex/backend/pointwise.hpp"
#include "rex/core/tensor.hpp"

namespace rex::detail {

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

namespace cpu {

// out = a + b over n elements; out may be a (in-place accumulation).
inline void add(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// out [out_shape] = x [x_shape] stretched by broadcasting.
inline void broadcast_copy(const float* x, float* out, const Shape& out_shape,
                           const Shape& x_shape) {
  for_each_broadcast<1>(out_shape, {x_shape},
                        [&](int64_t o, const auto& at) { out[o] = x[at[0]]; });
}

// out [out_shape] (which must start zeroed) += x [x_shape] summed over the broadcast axes, in the
// row-major order of x.
inline void sum_to(const float* x, float* out, const Shape& x_shape, const Shape& out_shape) {
  for_each_broadcast<1>(x_shape, {out_shape},
                        [&](int64_t i, const auto& at) { out[at[0]] += x[i]; });
}

// out = cond != 0 ? a : b, broadcast to out_shape; cond is f32 or i32 (cond_is_i32), and ins holds
// the shapes of cond, a and b.
inline void select(const void* cond, bool cond_is_i32, const float* a, const float* b, float* out,
                   const Shape& out_shape, const std::array<Shape, 3>& ins) {
  const auto* cond_i32 = static_cast<const int32_t*>(cond);
  const auto* cond_f32 = static_cast<const float*>(cond);
  for_each_broadcast<3>(out_shape, ins, [&](int64_t o, const auto& at) {
    const bool truth = cond_is_i32 ? cond_i32[at[0]] != 0 : cond_f32[at[0]] != 0.0f;
    out[o] = truth ? a[at[1]] : b[at[2]];
  });
}

// y = swiglu(a, b) in fixed chunks through Eigen's vectorised exp.
inline void swiglu(const float* a, const float* b, float* y, int64_t n) {
  for_each_chunk(n, [&](int64_t first, int64_t count) {
    const ConstArrayMap av(a + first, count), bv(b + first, count);
    ArrayMap(y + first, count) = swiglu_value(av, bv);
  });
}

// da and db may be null (not needed); the sigmoid is recomputed from a.
inline void swiglu_backward(const float* a, const float* b, const float* g, float* da, float* db,
                            int64_t n) {
  for_each_chunk(n, [&](int64_t first, int64_t count) {
    const ConstArrayMap av(a + first, count), bv(b + first, count), gv(g + first, count);
    const Eigen::ArrayXf s = sigmoid_of(av);
    if (da != nullptr) ArrayMap(da + first, count) = swiglu_grad_a(gv, av, bv, s);
    if (db != nullptr) ArrayMap(db + first, count) = swiglu_grad_b(gv, av, s);
  });
}

}  // namespace cpu
}  // namespace rex::detail
