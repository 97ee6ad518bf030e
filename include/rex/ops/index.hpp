// Indexing ops: row gather/scatter (the MoE dispatch and combine), embedding lookup, where,
// masked_fill.
//
// gather_rows and scatter_add_rows are adjoint linear maps, so each one's backward is the other:
//   y = gather_rows(x, idx):           y[i] = x[idx[i]]          dx = scatter_add_rows(g, idx, N)
//   y = scatter_add_rows(s, idx, N):   y[r] = sum_{idx[i]=r} s[i]  ds = gather_rows(g, idx)
// scatter_add_rows adds in index order on one thread, so repeated indices give bit-identical sums
// on every run. embedding is gather_rows on the flattened ids, so its backward scatter-adds as
// well. where(c, a, b) picks a where c is nonzero and b elsewhere: da = sum_to(g * c), db =
// sum_to(g * !c). masked_fill(x, m, v) is where(m, v, x) with the output kept at x's shape: dx = g
// * !m.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <vector>

#include "rex/ops/broadcast.hpp"
#include "rex/ops/shape.hpp"

namespace rex {
namespace detail {

// Checks that `index` is a 1-d i32 tensor whose values all lie in [0, num_rows), on the host when
// its values are there (a CPU tensor, or a CUDA one uploaded from the host: Tensor::host_values),
// and says whether it did. Otherwise (a CUDA tensor made on the device) the kernel checks the
// values itself, reads its flag back and throws the same message.
inline bool check_row_indices(std::string_view op, const Tensor& index, int64_t num_rows) {
  check_i32(op, index);
  REX_CHECK(index.rank() == 1, op, ": index must be 1-d, got shape ", index.shape());
  const int32_t* pi = index.host_values<int32_t>();
  if (!pi) return false;
  for (int64_t i = 0, n = index.numel(); i < n; ++i) {
    REX_CHECK(pi[i] >= 0 && pi[i] < num_rows, op, ": index value ", pi[i], " at position ", i,
              " is out of range [0, ", num_rows, ")");
  }
  return true;
}

// out = condition != 0 ? a : b broadcast to `shape`, on the inputs' device (condition f32 or i32).
inline Tensor select_values(const Tensor& condition, const Tensor& a, const Tensor& b,
                            const Shape& shape) {
  Tensor out = Tensor::empty(shape, DType::f32, a.device());
  const bool cond_i32 = condition.dtype() == DType::i32;
  const void* pc = condition.device_bytes();
  const float *pa = a.device_data<float>(), *pb = b.device_data<float>();
  float* po = out.device_data<float>();
  if (on_cuda(a)) {
    cuda_backend().select(
        pc, cond_i32, pa, pb, po,
        cuda_broadcast_index("where", shape, {condition.shape(), a.shape(), b.shape()}));
  } else {
    cpu::select(pc, cond_i32, pa, pb, po, shape, {condition.shape(), a.shape(), b.shape()});
  }
  return out;
}

// The two row kernels. gather_rows_values checks its indices on CUDA unless `checked` says that
// check_row_indices already did (`op` names the public op in the kernel's index error);
// scatter_add_rows_values trusts them: each backward reuses indices its forward checked.
inline Tensor gather_rows_values(const Tensor& x, const Tensor& index, bool checked,
                                 std::string_view op = "gather_rows") {
  const int64_t m = index.numel(), d = x.dim(1);
  if (common_device(op, {x, index}).is_cuda()) {
    Tensor out = Tensor::empty(Shape{m, d}, DType::f32, x.device());
    if (checked) {
      cuda_backend().gather_rows_unchecked(x.device_data<float>(), index.device_data<int32_t>(),
                                           out.device_data<float>(), m, d);
    } else {
      cuda_backend().gather_rows(x.device_data<float>(), index.device_data<int32_t>(),
                                 out.device_data<float>(), m, d, x.dim(0), op.data());
    }
    return out;
  }
  Tensor out = Tensor::empty(Shape{m, d});
  const float* px = x.data<float>();
  const int32_t* pi = index.data<int32_t>();
  float* po = out.data<float>();
  for (int64_t i = 0; i < m; ++i) std::copy_n(px + pi[i] * d, d, po + i * d);
  return out;
}

// On CUDA, with `into` ([num_rows, d] on the device) the sums are added into it in place, each
// row's sum then into's row: into + the result, as the engine would add them, in one launch.
inline Tensor scatter_add_rows_values(const Tensor& src, const Tensor& index, int64_t num_rows,
                                      Tensor into = Tensor()) {
  const int64_t m = src.dim(0), d = src.dim(1);
  if (common_device("scatter_add_rows", {src, index}).is_cuda()) {
    Tensor out =
        into.defined() ? into : Tensor::empty(Shape{num_rows, d}, DType::f32, src.device());
    cuda_backend().scatter_add_rows(src.device_data<float>(), index.device_data<int32_t>(),
                                    index.host_values<int32_t>(),
                                    into.defined() ? into.device_data<float>() : nullptr,
                                    out.device_data<float>(), m, d, num_rows);
    return out;
  }
  Tensor out = zeros(Shape{num_rows, d});
  const float* ps = src.data<float>();
  const int32_t* pi = index.data<int32_t>();
  float* po = out.data<float>();
  for (int64_t i = 0; i < m; ++i) {
    float* row = po + pi[i] * d;
    const float* from = ps + i * d;
    for (int64_t j = 0; j < d; ++j) row[j] += from[j];
  }
  return out;
}

// gather_rows with its checks reported under the name `op` (gather_rows itself, or embedding).
// When x is a leaf that has a gradient already (a tied embedding's, from the head), the backward
// adds into it on CUDA (adds_to_leaf_grads): the scatter's launch, without the engine's add.
inline Tensor gather_rows_as(std::string_view op, const Tensor& x, const Tensor& index) {
  check_f32(op, x);
  REX_CHECK(x.rank() == 2, op, ": rows are taken from a 2-d [N, d] tensor, got shape ", x.shape());
  const int64_t num_rows = x.dim(0);
  const bool checked = check_row_indices(op, index, num_rows);
  Tensor rows = record(gather_rows_values(x, index, checked, op), "gather_rows", {x},
                       [index = index.detach(), num_rows](const Tensor& g, const std::vector<bool>&,
                                                          GradList& waiting) {
                         Tensor into = on_cuda(g) ? std::move(waiting[0]) : Tensor();
                         return GradList{scatter_add_rows_values(g, index, num_rows, into)};
                       });
  if (rows.impl().autograd) rows.impl().autograd->grad_fn->adds_to_leaf_grads = true;
  return rows;
}

}  // namespace detail

// Rows of x [N, d] picked by index [M] (values in [0, N), repeats allowed) -> [M, d].
inline Tensor gather_rows(const Tensor& x, const Tensor& index) {
  return detail::gather_rows_as("gather_rows", x, index);
}

// out [num_rows, d] = zeros, then out[index[i]] += src[i] for i = 0, 1, ... in order.
inline Tensor scatter_add_rows(const Tensor& src, const Tensor& index, int64_t num_rows) {
  detail::check_f32("scatter_add_rows", src);
  REX_CHECK(src.rank() == 2, "scatter_add_rows: src must be 2-d [M, d], got shape ", src.shape());
  REX_CHECK(num_rows >= 0, "scatter_add_rows: negative num_rows ", num_rows);
  detail::check_row_indices("scatter_add_rows", index, num_rows);
  REX_CHECK(index.numel() == src.dim(0), "scatter_add_rows: index ", index.shape(),
            " does not have one entry per row of src ", src.shape());
  return detail::record(detail::scatter_add_rows_values(src, index, num_rows), "scatter_add_rows",
                        {src}, [index = index.detach()](const Tensor& g) {
                          return detail::GradList{detail::gather_rows_values(g, index, true)};
                        });
}

// Rows of x [N, d] reordered by a permutation: y[i] = x[order[i]], where inverse is order's
// inverse (inverse[order[i]] = i), both [N] i32. A permutation's adjoint is its inverse, so the
// backward is the same row gather by the other index (dx[j] = g[inverse[j]]): unlike gather_rows,
// whose backward must scatter-add, no step of it adds. (The ranges are checked on both devices, on
// CUDA by the kernel; that the two are inverses only for CPU indices.)
inline Tensor permute_rows(const Tensor& x, const Tensor& order, const Tensor& inverse) {
  detail::check_f32("permute_rows", x);
  REX_CHECK(x.rank() == 2, "permute_rows: rows are taken from a 2-d [N, d] tensor, got shape ",
            x.shape());
  const int64_t num_rows = x.dim(0);
  const bool order_checked = detail::check_row_indices("permute_rows", order, num_rows);
  const bool inverse_checked = detail::check_row_indices("permute_rows", inverse, num_rows);
  REX_CHECK(order.numel() == num_rows && inverse.numel() == num_rows, "permute_rows: order ",
            order.shape(), " and inverse ", inverse.shape(),
            " must both have one entry per row of ", x.shape());
  if (!detail::on_cuda(order) && !detail::on_cuda(inverse)) {
    const int32_t *po = order.data<int32_t>(), *pi = inverse.data<int32_t>();
    for (int64_t i = 0; i < num_rows; ++i)
      REX_CHECK(pi[po[i]] == i, "permute_rows: inverse[order[", i, "]] = ", pi[po[i]], ", not ", i,
                ": inverse is not the inverse of order");
  }
  return detail::record(detail::gather_rows_values(x, order, order_checked, "permute_rows"),
                        "permute_rows", {x},
                        [inverse = inverse.detach(), inverse_checked](const Tensor& g) {
                          return detail::GradList{detail::gather_rows_values(
                              g, inverse, inverse_checked, "permute_rows")};
                        });
}

// Rows of weight [V, d] looked up by ids (i32, any shape) -> ids.shape + [d].
inline Tensor embedding(const Tensor& weight, const Tensor& ids) {
  detail::check_i32("embedding", ids);
  std::vector<int64_t> dims = ids.shape().dims();
  const Tensor rows = detail::gather_rows_as("embedding", weight, reshape(ids, {-1}));
  dims.push_back(rows.dim(1));
  return reshape(rows, std::move(dims));
}

// a where condition is nonzero, b elsewhere; condition (f32 or i32), a and b broadcast together.
inline Tensor where(const Tensor& condition, const Tensor& a, const Tensor& b) {
  detail::check_defined("where", condition);
  detail::check_f32("where", a), detail::check_f32("where", b);
  const Shape shape = detail::broadcast_shapes(
      detail::broadcast_shapes(condition.shape(), a.shape(), "where"), b.shape(), "where");
  detail::common_device("where", {condition, a, b});
  return detail::record(
      detail::select_values(condition, a, b, shape), "where", {a, b},
      [condition = condition.detach(), sa = a.shape(), sb = b.shape()](
          const Tensor& g, const std::vector<bool>& needs) {
        // g routed by the condition: g for the selected operand, zeros for the other.
        const Tensor zero = zeros(Shape{}, g.device());
        detail::GradList grads(2);
        if (needs[0]) grads[0] = sum_to(detail::select_values(condition, g, zero, g.shape()), sa);
        if (needs[1]) grads[1] = sum_to(detail::select_values(condition, zero, g, g.shape()), sb);
        return grads;
      });
}

// x with `value` (which may be +-inf) wherever mask (f32 or i32, broadcastable to x) is nonzero.
inline Tensor masked_fill(const Tensor& x, const Tensor& mask, float value) {
  detail::check_f32("masked_fill", x);
  detail::check_defined("masked_fill", mask);
  REX_CHECK(detail::broadcast_shapes(mask.shape(), x.shape(), "masked_fill") == x.shape(),
            "masked_fill: mask ", mask.shape(), " cannot be broadcast to x ", x.shape());
  return where(mask, scalar(value, x.device()), x);
}

}  // namespace rex
