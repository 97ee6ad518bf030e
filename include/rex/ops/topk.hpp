// topk: the k largest entries along the last axis, with their positions (the MoE router's
// selection).
//
// Each row is ranked by detail::ranks_before (rex/backend/pointwise.hpp): values descending, equal
// values by the lower position first, NaN above every number (as in PyTorch; it also keeps the
// comparison a strict weak ordering). values is a gather, so its backward scatters g back into
// zeros:
//   dx[r, indices[r, j]] = g[r, j], 0 at the positions not chosen,
// added to the gradient waiting for x, if any, in the same pass (rex/autograd/graph.hpp).
// indices are i32 and carry no gradient. With a TopKMask, the hidden entries rank as its `hidden`
// value and take no gradient (PSR's mask over the candidate experts).
#pragma once

#include <cstdint>
#include <limits>

#include "rex/backend/cpu/index.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/ops/common.hpp"
#include "rex/ops/softmax.hpp"

namespace rex {

struct TopK {
  Tensor values;   // f32, x.shape with the last extent k, each row descending
  Tensor indices;  // i32, same shape: positions in x's last axis
};

// The entries a top-k may not choose (PSR's mask of the router's scores): where keep (f32, x's
// shape, or x's last extent alone for one mask of every row) is 0, the entry ranks as `hidden`
// whatever x holds there, is returned as `hidden` if chosen, and takes no gradient. The same as a
// top-k of where(keep, x, hidden), in one kernel and without the masked copy.
struct TopKMask {
  Tensor keep;  // undefined: nothing hidden
  float hidden = -std::numeric_limits<float>::infinity();
};

namespace detail {

// `mask` on raw memory, for rows of n.
inline TopKHidden topk_hidden(const TopKMask& mask, int64_t n) {
  if (!mask.keep.defined()) return {};
  return {mask.keep.device_data<float>(), mask.keep.rank() == 1 ? 0 : n, mask.hidden};
}

// The k best entries of every row of n on x's device (values and their positions); topk_grad is
// the backward, g scattered into zeros of x's shape and added to `plus` when that is defined (a
// gradient waiting for x).
inline TopK topk_values(const Tensor& x, const TopKMask& mask, int64_t k) {
  const int64_t n = x.dim(-1), rows = x.numel() / n;
  Shape out_shape = x.shape();
  out_shape.set(x.rank() - 1, k);
  TopK out{Tensor::empty(out_shape, DType::f32, x.device()),
           Tensor::empty(out_shape, DType::i32, x.device())};
  const float* px = x.device_data<float>();
  float* pv = out.values.device_data<float>();
  int32_t* pi = out.indices.device_data<int32_t>();
  (on_cuda(x) ? cuda_backend().topk : cpu::topk)(px, topk_hidden(mask, n), pv, pi, rows, n, k);
  return out;
}

inline Tensor topk_grad(const Tensor& g, const Tensor& indices, const TopKMask& mask,
                        const Shape& in_shape, const Tensor& plus) {
  const int64_t n = in_shape[in_shape.rank() - 1], k = g.dim(-1), rows = g.numel() / k;
  Tensor gx = Tensor::empty(in_shape, DType::f32, g.device());
  const float* pg = g.device_data<float>();
  const int32_t* pi = indices.device_data<int32_t>();
  float* pgx = gx.device_data<float>();
  const float* pplus = plus.defined() ? plus.device_data<float>() : nullptr;
  (on_cuda(g) ? cuda_backend().topk_backward : cpu::topk_backward)(pg, pi, topk_hidden(mask, n),
                                                                   pplus, pgx, rows, n, k);
  return gx;
}

}  // namespace detail

namespace detail {

// Checks topk's arguments; returns n, the row length.
inline int64_t check_topk_args(std::string_view op, const Tensor& x, int64_t k,
                               const TopKMask& mask) {
  check_f32(op, x);
  REX_CHECK(x.rank() >= 1, op, ": x must have at least one axis, got shape ", x.shape());
  const int64_t n = x.dim(-1);
  REX_CHECK(k >= 1 && k <= n, op, ": k = ", k, " is out of range [1, ", n, "] for shape ",
            x.shape());
  if (mask.keep.defined()) {
    check_f32(op, mask.keep);
    REX_CHECK(mask.keep.shape() == x.shape() || (mask.keep.rank() == 1 && mask.keep.dim(0) == n),
              op, ": the mask's keep ", mask.keep.shape(), " is neither x's shape ", x.shape(),
              " nor [", n, "]");
    common_device(op, {x, mask.keep});
  }
  return n;
}

// out.values as topk(x, k, mask)'s, recorded with its backward.
inline TopK record_topk(TopK out, const Tensor& x, const TopKMask& mask) {
  out.values =
      record(out.values, "topk", {x},
             [in_shape = x.shape(), indices = out.indices.detach(),
              mask = TopKMask{mask.keep.defined() ? mask.keep.detach() : Tensor(), mask.hidden}](
                 const Tensor& g, const std::vector<bool>&, GradList& waiting) {
               const Tensor plus = std::move(waiting[0]);  // taken: added here
               return GradList{topk_grad(g, indices, mask, in_shape, plus)};
             });
  return out;
}

}  // namespace detail

inline TopK topk(const Tensor& x, int64_t k, const TopKMask& mask = {}) {
  detail::check_topk_args("topk", x, k, mask);
  return detail::record_topk(detail::topk_values(x, mask, k), x, mask);
}

struct SoftmaxTopK {
  Tensor probs;  // softmax(logits)
  TopK top;      // topk(probs, k, mask)
};

// The router's softmax and the top-k of its probabilities: on CUDA one kernel for the two, with
// their bits (the CPU runs the two); the graph is theirs (a "softmax" node, then a "topk" node of
// the probabilities), and so is the backward.
inline SoftmaxTopK softmax_topk(const Tensor& logits, int64_t k, const TopKMask& mask = {}) {
  const int64_t n = detail::softmax_row_length(logits, "softmax_topk");
  detail::check_topk_args("softmax_topk", logits, k, mask);
  if (!detail::on_cuda(logits)) {
    Tensor probs = softmax(logits);
    return {probs, topk(probs, k, mask)};
  }
  Shape out_shape = logits.shape();
  out_shape.set(logits.rank() - 1, k);
  Tensor probs = Tensor::empty(logits.shape(), DType::f32, logits.device());
  TopK top{Tensor::empty(out_shape, DType::f32, logits.device()),
           Tensor::empty(out_shape, DType::i32, logits.device())};
  detail::cuda_backend().softmax_topk(logits.device_data<float>(), detail::topk_hidden(mask, n),
                                      probs.device_data<float>(), top.values.device_data<float>(),
                                      top.indices.device_data<int32_t>(), logits.numel() / n, n, k);
  probs = detail::record_softmax(probs, logits, n);
  return {probs, detail::record_topk(std::move(top), probs, mask)};
}

}  // namespace rex
