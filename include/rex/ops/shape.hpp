// Shape ops: reshape, permute/transpose, slice, concat, stack.
//
// reshape is always a view (storage is contiguous). slice is a view when the sliced axis is
// preceded only by extents of 1 (e.g. slicing the leading axis), otherwise a copy. permute copies
// into the new row-major order. Gradients: reshape back, inverse permutation, slice <-> zero-padded
// embedding, concat <-> slices; stack is reshape + concat and needs no backward of its own.
#pragma once

#include <cstring>
#include <numeric>
#include <vector>

#include "rex/backend/cpu/index.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/ops/common.hpp"

namespace rex {
namespace detail {

// Copies the [outer, length, inner] block of src (whose axis has `src_extent` elements, starting at
// `src_start`) into dst (axis extent `dst_extent`, starting at `dst_start`). Works for any dtype.
inline void copy_axis_block(const Tensor& src, int64_t src_extent, int64_t src_start, Tensor& dst,
                            int64_t dst_extent, int64_t dst_start, int64_t outer, int64_t length,
                            int64_t inner) {
  const size_t elem = dtype_size(src.dtype());
  const char* ps = static_cast<const char*>(src.device_bytes());
  char* pd = static_cast<char*>(dst.device_bytes());
  const size_t run = static_cast<size_t>(length * inner) * elem;
  if (run == 0 || outer == 0) return;  // empty buffers may be null
  if (on_cuda(dst)) {
    cuda_backend().copy_rows(pd + static_cast<size_t>(dst_start * inner) * elem,
                             static_cast<size_t>(dst_extent * inner) * elem,
                             ps + static_cast<size_t>(src_start * inner) * elem,
                             static_cast<size_t>(src_extent * inner) * elem, run,
                             static_cast<size_t>(outer));
    return;
  }
  for (int64_t o = 0; o < outer; ++o) {
    std::memcpy(pd + static_cast<size_t>((o * dst_extent + dst_start) * inner) * elem,
                ps + static_cast<size_t>((o * src_extent + src_start) * inner) * elem, run);
  }
}

}  // namespace detail

// Same elements in a new shape; one extent may be -1 (inferred). Always a view.
inline Tensor reshape(const Tensor& x, std::vector<int64_t> dims) {
  detail::check_defined("reshape", x);
  int64_t known = 1, infer = -1;
  for (size_t i = 0; i < dims.size(); ++i) {
    if (dims[i] == -1) {
      REX_CHECK(infer < 0, "reshape: more than one -1 in the target shape of ", x.shape());
      infer = static_cast<int64_t>(i);
    } else {
      REX_CHECK(dims[i] >= 0, "reshape: negative extent ", dims[i]);
      known *= dims[i];
    }
  }
  if (infer >= 0) {
    REX_CHECK(known > 0 && x.numel() % known == 0, "reshape: cannot infer -1 reshaping ", x.shape(),
              " (", x.numel(), " elements)");
    dims[static_cast<size_t>(infer)] = x.numel() / known;
  }
  Shape shape(std::move(dims));
  REX_CHECK(shape.numel() == x.numel(), "reshape: cannot reshape ", x.shape(), " (", x.numel(),
            " elements) into ", shape, " (", shape.numel(), " elements)");
  return detail::record(detail::make_view(x, 0, shape), "reshape", {x},
                        [in_shape = x.shape()](const Tensor& g) {
                          return detail::GradList{reshape(g, in_shape.dims())};
                        });
}

// Reorders the axes: output axis i is input axis perm[i]. Copies.
inline Tensor permute(const Tensor& x, const std::vector<int64_t>& perm) {
  detail::check_f32("permute", x);
  const int64_t rank = x.rank();
  REX_CHECK(static_cast<int64_t>(perm.size()) == rank, "permute: ", perm.size(),
            " axes given for shape ", x.shape());
  std::vector<int64_t> axes(perm.size()), out_dims(perm.size()), inverse(perm.size(), -1);
  for (int64_t i = 0; i < rank; ++i) {
    const int64_t p = x.shape().normalize_axis(perm[static_cast<size_t>(i)], "permute");
    REX_CHECK(inverse[static_cast<size_t>(p)] < 0, "permute: axis ", p, " appears twice");
    inverse[static_cast<size_t>(p)] = i;
    axes[static_cast<size_t>(i)] = p;
    out_dims[static_cast<size_t>(i)] = x.shape()[p];
  }
  Tensor out = Tensor::empty(Shape(out_dims), DType::f32, x.device());
  if (detail::on_cuda(x)) {
    REX_CHECK(rank <= detail::kMaxCudaRank, "permute: shape ", x.shape(), " has more than ",
              detail::kMaxCudaRank, " axes, the most the CUDA backend permutes");
    if (out.numel() > 0)
      detail::cuda_backend().permute(x.device_bytes(), out.device_bytes(),
                                     static_cast<int32_t>(rank), x.shape().dims().data(),
                                     axes.data());
  } else {
    detail::cpu::permute(x.data<float>(), out.data<float>(), rank, x.shape().dims().data(),
                         axes.data());
  }
  return detail::record(out, "permute", {x}, [inverse](const Tensor& g) {
    return detail::GradList{permute(g, inverse)};
  });
}

// Swaps two axes (a copy; matmul takes transposed operands without one, see MatmulOptions).
inline Tensor transpose(const Tensor& x, int64_t axis0, int64_t axis1) {
  detail::check_defined("transpose", x);
  std::vector<int64_t> perm(static_cast<size_t>(x.rank()));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  std::swap(perm[static_cast<size_t>(x.shape().normalize_axis(axis0, "transpose"))],
            perm[static_cast<size_t>(x.shape().normalize_axis(axis1, "transpose"))]);
  return permute(x, perm);
}

namespace detail {

// The gradient of a slice: g placed at [start, start + len) of `axis` in zeros of `in_shape`.
inline Tensor unslice(const Tensor& g, const Shape& in_shape, int64_t axis, int64_t start) {
  Tensor out = zeros(in_shape, g.device());
  copy_axis_block(g, g.shape()[axis], 0, out, in_shape[axis], start, in_shape.numel(0, axis),
                  g.shape()[axis], in_shape.numel(axis + 1, in_shape.rank()));
  return out;
}

}  // namespace detail

// Elements [start, end) along `axis`. A view when every axis before `axis` has extent 1.
inline Tensor slice(const Tensor& x, int64_t axis, int64_t start, int64_t end) {
  detail::check_defined("slice", x);
  axis = x.shape().normalize_axis(axis, "slice");
  const int64_t extent = x.shape()[axis];
  REX_CHECK(0 <= start && start <= end && end <= extent, "slice: range [", start, ", ", end,
            ") is not within axis ", axis, " of shape ", x.shape());
  Shape out_shape = x.shape();
  out_shape.set(axis, end - start);
  const int64_t outer = x.shape().numel(0, axis), inner = x.shape().numel(axis + 1, x.rank());
  Tensor out;
  if (outer == 1) {
    out = detail::make_view(x, start * inner, out_shape);
  } else {
    out = Tensor::empty(out_shape, x.dtype(), x.device());
    detail::copy_axis_block(x, extent, start, out, end - start, 0, outer, end - start, inner);
  }
  return detail::record(out, "slice", {x}, [in_shape = x.shape(), axis, start](const Tensor& g) {
    return detail::GradList{detail::unslice(g, in_shape, axis, start)};
  });
}

// Joins tensors along `axis`; all other extents must agree.
inline Tensor concat(const std::vector<Tensor>& xs, int64_t axis) {
  REX_CHECK(!xs.empty(), "concat: no tensors given");
  for (const Tensor& x : xs) detail::check_defined("concat", x);
  const Shape& first = xs[0].shape();
  axis = first.normalize_axis(axis, "concat");
  int64_t total = 0;
  for (const Tensor& x : xs) {
    bool compatible = x.rank() == first.rank() && x.dtype() == xs[0].dtype();
    for (int64_t a = 0; compatible && a < first.rank(); ++a)
      compatible = a == axis || x.shape()[a] == first[a];
    REX_CHECK(compatible, "concat: shape ", x.shape(), " (", x.dtype(), ") does not match ", first,
              " (", xs[0].dtype(), ") outside axis ", axis);
    total += x.shape()[axis];
  }
  Shape out_shape = first;
  out_shape.set(axis, total);
  Device device = xs[0].device();
  for (const Tensor& x : xs) device = detail::common_device("concat", {xs[0], x});
  Tensor out = Tensor::empty(out_shape, xs[0].dtype(), device);
  const int64_t outer = first.numel(0, axis), inner = first.numel(axis + 1, first.rank());
  std::vector<int64_t> starts, sizes;
  int64_t start = 0;
  for (const Tensor& x : xs) {
    detail::copy_axis_block(x, x.shape()[axis], 0, out, out_shape[axis], start, outer,
                            x.shape()[axis], inner);
    starts.push_back(start);
    sizes.push_back(x.shape()[axis]);
    start += x.shape()[axis];
  }
  return detail::record(out, "concat", xs,
                        [starts, sizes, axis](const Tensor& g, const std::vector<bool>& needs) {
                          detail::GradList grads(starts.size());
                          for (size_t i = 0; i < starts.size(); ++i)
                            if (needs[i])
                              grads[i] = slice(g, axis, starts[i], starts[i] + sizes[i]);
                          return grads;
                        });
}

// Joins tensors of one shape along a new axis inserted at `axis`.
inline Tensor stack(const std::vector<Tensor>& xs, int64_t axis) {
  REX_CHECK(!xs.empty(), "stack: no tensors given");
  detail::check_defined("stack", xs[0]);
  const Shape& first = xs[0].shape();
  REX_CHECK(axis >= -(first.rank() + 1) && axis <= first.rank(), "stack: axis ", axis,
            " is out of range for tensors of shape ", first);
  if (axis < 0) axis += first.rank() + 1;
  std::vector<Tensor> expanded;
  for (const Tensor& x : xs) {
    detail::check_defined("stack", x);
    REX_CHECK(x.shape() == first, "stack: shape ", x.shape(), " differs from ", first);
    std::vector<int64_t> dims = first.dims();
    dims.insert(dims.begin() + axis, 1);
    expanded.push_back(reshape(x, dims));
  }
  return concat(expanded, axis);
}

}  // namespace rex
