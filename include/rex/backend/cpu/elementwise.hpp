// CPU kernels for elementwise work (the CPU side of kernels/elementwise.cu): map (one input), zip
// (two inputs, broadcast), the broadcast iterator that zip, sum_to, broadcast_to and where share,
// and the entries cpu::add, sum_of, broadcast_copy, sum_to, select, swiglu and swiglu_backward,
// which take the arguments of their rex/backend/cuda/backend.hpp counterparts (shapes in place of
// the CUDA launch description).
//
// Broadcasting follows NumPy (rex/backend/broadcast.hpp). The iterator walks the output in
// row-major order and keeps, per input, the element offset, with stride 0 on stretched axes; the
// common cases (equal shapes, a scalar operand) take flat loops that the compiler vectorises, run
// in parallel over fixed chunks (rex/backend/cpu/arrays.hpp) when the tensor is large.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "rex/backend/broadcast.hpp"
#include "rex/backend/cpu/arrays.hpp"
#include "rex/backend/pointwise.hpp"
#include "rex/core/tensor.hpp"

namespace rex::detail {

// The length of a row of `out` for for_each_broadcast_rows: its last extent (a 0-d tensor is one
// row of one element).
inline int64_t broadcast_row_length(const Shape& out) {
  return out.rank() == 0 ? 1 : out[out.rank() - 1];
}

// Calls body(out_index, offsets) for every element of rows [first_row, last_row) of `out` (runs
// along its last axis) in row-major order, where offsets[k] is the element of input k (of shape
// ins[k], broadcastable to out) that lines up with it.
template <size_t N, class Body>
void for_each_broadcast_rows(const Shape& out, const std::array<Shape, N>& ins, int64_t first_row,
                             int64_t last_row, Body& body) {
  const int64_t rank = out.rank(), inner = broadcast_row_length(out);
  std::array<std::vector<int64_t>, N> strides;
  std::array<int64_t, N> along_row{};  // each input's step along the last axis
  for (size_t k = 0; k < N; ++k) {
    strides[k] = broadcast_strides(ins[k], out);
    if (rank > 0) along_row[k] = strides[k][static_cast<size_t>(rank - 1)];
  }
  // The odometer over the outer axes, started at first_row.
  std::vector<int64_t> index(static_cast<size_t>(rank), 0);
  std::array<int64_t, N> offsets{};
  for (int64_t axis = rank - 2, rest = first_row; axis >= 0; --axis) {
    const auto a = static_cast<size_t>(axis);
    index[a] = rest % out[axis];
    rest /= out[axis];
    for (size_t k = 0; k < N; ++k) offsets[k] += index[a] * strides[k][a];
  }
  for (int64_t row = first_row; row < last_row; ++row) {
    std::array<int64_t, N> at = offsets;
    for (int64_t j = 0; j < inner; ++j) {
      body(row * inner + j, at);
      for (size_t k = 0; k < N; ++k) at[k] += along_row[k];
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

// Every element of `out` in row-major order, on one thread (for bodies that accumulate).
template <size_t N, class Body>
void for_each_broadcast(const Shape& out, const std::array<Shape, N>& ins, Body&& body) {
  const int64_t inner = broadcast_row_length(out);
  for_each_broadcast_rows(out, ins, 0, inner == 0 ? 0 : out.numel() / inner, body);
}

// The same with runs of rows in parallel, for bodies that write only the element out_index (so
// that the result does not depend on the thread count).
template <size_t N, class Body>
void for_each_broadcast_parallel(const Shape& out, const std::array<Shape, N>& ins, Body&& body) {
  const int64_t inner = broadcast_row_length(out);
  for_each_run(inner == 0 ? 0 : out.numel() / inner, inner, [&](int64_t first, int64_t last) {
    for_each_broadcast_rows(out, ins, first, last, body);
  });
}

// out[i] = f(x[i]) over an f32 tensor, in parallel chunks (for_each_chunk: elementwise, so the
// result does not depend on the thread count).
template <class F>
Tensor map(const Tensor& x, F&& f) {
  Tensor out = Tensor::empty(x.shape());
  const float* px = x.data<float>();
  float* po = out.data<float>();
  for_each_chunk(x.numel(), [&](int64_t first, int64_t count) {
    for (int64_t i = first; i < first + count; ++i) po[i] = f(px[i]);
  });
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
    for_each_chunk(n, [&](int64_t first, int64_t count) {
      for (int64_t i = first; i < first + count; ++i) po[i] = f(pa[i], pb[i]);
    });
  } else if (b.numel() == 1 && a.numel() == n) {
    const float vb = pb[0];
    for_each_chunk(n, [&](int64_t first, int64_t count) {
      for (int64_t i = first; i < first + count; ++i) po[i] = f(pa[i], vb);
    });
  } else if (a.numel() == 1 && b.numel() == n) {
    const float va = pa[0];
    for_each_chunk(n, [&](int64_t first, int64_t count) {
      for (int64_t i = first; i < first + count; ++i) po[i] = f(va, pb[i]);
    });
  } else {
    for_each_broadcast_parallel<2>(shape, {a.shape(), b.shape()}, [&](int64_t o, const auto& at) {
      po[o] = f(pa[at[0]], pb[at[1]]);
    });
  }
  return out;
}

namespace cpu {

// out = a + b over n elements, in parallel chunks; out may be a (in-place accumulation).
inline void add(const float* a, const float* b, float* out, int64_t n) {
  for_each_chunk(n, [&](int64_t first, int64_t count) {
    for (int64_t i = first; i < first + count; ++i) out[i] = a[i] + b[i];
  });
}

// out = ((terms[0] + terms[1]) + terms[2]) + ... over n elements (count >= 1 arrays): the sums of
// add chained left to right, in one pass.
inline void sum_of(const float* const* terms, int64_t count, float* out, int64_t n,
                   float* prefix_out, int64_t prefix) {
  for_each_chunk(n, [&](int64_t first, int64_t length) {
    for (int64_t i = first; i < first + length; ++i) {
      float sum = terms[0][i];
      for (int64_t j = 1; j < count; ++j) {
        sum += terms[j][i];
        if (prefix_out && j + 1 == prefix) prefix_out[i] = sum;
      }
      out[i] = sum;
    }
  });
}

// out [out_shape] = x [x_shape] stretched by broadcasting.
inline void broadcast_copy(const float* x, float* out, const Shape& out_shape,
                           const Shape& x_shape) {
  for_each_broadcast_parallel<1>(out_shape, {x_shape},
                                 [&](int64_t o, const auto& at) { out[o] = x[at[0]]; });
}

// out [out_shape] (which must start zeroed) += x [x_shape] summed over the broadcast axes. Each
// output adds its own elements of x in x's row-major order (the order of a serial walk, and of the
// CUDA kernel's one thread per output), so the outputs are summed in parallel runs.
inline void sum_to(const float* x, float* out, const Shape& x_shape, const Shape& out_shape) {
  // x's axes as (extent, stride), innermost first, split into the kept ones (out's axes) and the
  // summed ones; neighbours of one kind merge (x is contiguous), and extents of 1 drop out.
  struct Axis {
    int64_t extent, stride;
  };
  std::vector<Axis> kept, summed;
  const int64_t rank = x_shape.rank(), lead = rank - out_shape.rank();
  bool inner_was_summed = false;
  for (int64_t axis = rank - 1, stride = 1; axis >= 0; stride *= x_shape[axis], --axis) {
    if (x_shape[axis] == 1) continue;
    const bool is_summed = axis < lead || out_shape[axis - lead] == 1;
    std::vector<Axis>& kind = is_summed ? summed : kept;
    if (!kind.empty() && inner_was_summed == is_summed) {
      kind.back().extent *= x_shape[axis];
    } else {
      kind.push_back({x_shape[axis], stride});
    }
    inner_was_summed = is_summed;
  }
  if (summed.empty()) summed.push_back({1, 0});
  const int64_t outputs = out_shape.numel();
  if (outputs == 0) return;
  const int64_t per_output = x_shape.numel() / outputs;
  for_each_run(outputs, per_output, [&](int64_t first, int64_t last) {
    std::vector<int64_t> index(summed.size());
    for (int64_t o = first; o < last; ++o) {
      int64_t base = 0;  // x's first element of output o
      for (int64_t rest = o, a = 0; a < static_cast<int64_t>(kept.size()); ++a) {
        base += rest % kept[a].extent * kept[a].stride;
        rest /= kept[a].extent;
      }
      std::fill(index.begin(), index.end(), 0);
      float total = out[o];
      for (int64_t done = 0, offset = 0; done < per_output; done += summed[0].extent) {
        for (int64_t j = 0; j < summed[0].extent; ++j)
          total += x[base + offset + j * summed[0].stride];
        // Advance the odometer over the outer summed axes.
        for (size_t a = 1; a < summed.size(); ++a) {
          offset += summed[a].stride;
          if (++index[a] < summed[a].extent) break;
          offset -= summed[a].stride * summed[a].extent;
          index[a] = 0;
        }
      }
      out[o] = total;
    }
  });
}

// out = cond != 0 ? a : b, broadcast to out_shape; cond is f32 or i32 (cond_is_i32), and ins holds
// the shapes of cond, a and b.
inline void select(const void* cond, bool cond_is_i32, const float* a, const float* b, float* out,
                   const Shape& out_shape, const std::array<Shape, 3>& ins) {
  const auto* cond_i32 = static_cast<const int32_t*>(cond);
  const auto* cond_f32 = static_cast<const float*>(cond);
  for_each_broadcast_parallel<3>(out_shape, ins, [&](int64_t o, const auto& at) {
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
