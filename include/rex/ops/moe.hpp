// grouped_swiglu: the experts of a MoE layer applied to their segments of expert-sorted rows, as
// one op (the CPU form of a grouped GEMM).
//
// x [M, d] holds rows sorted by expert; expert e owns rows offsets[e] .. offsets[e + 1] and has
// weights gate_e, up_e [h, d] and down_e [d, h]. For the rows X_e of each segment:
//   G = X_e gate_e^T,  U = X_e up_e^T,  A = silu(G) * U,  Y_e = A down_e^T
// Backward, with s = sigmoid(G) and dY_e = g rows of the segment:
//   d down_e = dY_e^T A,  dA = dY_e down_e
//   dG = dA * U * s (1 + G (1 - s)),  dU = dA * silu(G)
//   d gate_e = dG^T X_e,  d up_e = dU^T X_e,  dX_e = dG gate_e + dU up_e
// (the SwiGLU formulas are rex/backend/pointwise.hpp's swiglu_value, swiglu_grad_a, swiglu_grad_b).
// G, U and A are saved (3 M h floats, as PyTorch keeps them too): the backward needs A for d down
// and G, U for SwiGLU's gradients, and recomputing A would cost a pass over [M, h] (on CUDA a
// launch) to save M h floats. The CPU runs the segments in parallel
// (rex/backend/cpu/gemm.hpp); CUDA runs grouped products (or per-expert cuBLAS GEMMs in tf32)
// around one swiglu kernel over all rows (rex/backend/cuda/dispatch.hpp). The offsets are a
// DeviceCounts: on the host, or a routing plan's on the device, which the grouped products read
// there. An empty segment costs nothing, and its expert gets no gradient: with the offsets on the
// host it gets none at all; with them only on the device every expert gets one (zeros where its
// segment is empty) gated by its count (rex::detail::GradGate), which the host settles when it
// first asks. The composed form — slice, three matmuls, silu, mul, concat — is what
// nn::dispatch_experts's tests check this against, through the naive per-token MoE loop.
//
// Also here, the routing plan's device work: sort_slots_by_expert (the stable counting sort of the
// T k slots by expert: on the host for CPU tensors, by kernels for CUDA ones, which send nothing to
// the host) and the two row moves of the dispatch, which trust their indices (rex built them):
// dispatch_rows gathers each slot's token row into expert order, and its backward sums each
// token's k rows in increasing sorted position (the order a scatter-add would use, so the bits are
// the same, without the host); combine_slots brings the experts' rows back to their tokens, gated.
// And the router's load-balancing loss as one op (balance_loss).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "rex/backend/counting_sort.hpp"
#include "rex/backend/cpu/gemm.hpp"
#include "rex/backend/cpu/index.hpp"
#include "rex/backend/cpu/reduce.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/core/device_counts.hpp"
#include "rex/ops/common.hpp"

namespace rex {
namespace detail {

// The graph inputs of grouped_swiglu: x, then gate, up and down of every expert.
inline std::vector<Tensor> grouped_swiglu_inputs(const Tensor& x, const std::vector<Tensor>& gate,
                                                 const std::vector<Tensor>& up,
                                                 const std::vector<Tensor>& down) {
  std::vector<Tensor> inputs{x};
  for (const auto* list : {&gate, &up, &down})
    inputs.insert(inputs.end(), list->begin(), list->end());
  return inputs;
}

// The forward's output y [M, d] and the pre-activations G and U [M, h] that the backward reads.
struct GroupedSwigluValues {
  Tensor y, pre_gate, pre_up, act;
};

// Every expert's weights of one kind (gate, up or down) as device pointers, for the entries.
inline std::vector<const float*> expert_pointers(const std::vector<Tensor>& weights) {
  std::vector<const float*> pointers;
  for (const Tensor& w : weights) pointers.push_back(w.device_data<float>());
  return pointers;
}

// The segments as the CUDA backend takes them: the offsets on the device where the host has not
// read them (and the products are grouped), else on the host.
inline GroupedSegments cuda_segments(const DeviceCounts& offsets, int64_t rows, int64_t d,
                                     int64_t h) {
  GroupedSegments segments;
  segments.experts = offsets.size(), segments.rows = rows;
  if (offsets.only_on_device() && expert_products(d, h) != ExpertProducts::per_expert) {
    segments.device_offsets = offsets.device_offsets();
  } else {
    segments.host_offsets = offsets.offsets().data();
  }
  return segments;
}

inline GroupedSwigluValues grouped_swiglu_values(const Tensor& x, const DeviceCounts& offsets,
                                                 const std::vector<Tensor>& gate,
                                                 const std::vector<Tensor>& up,
                                                 const std::vector<Tensor>& down) {
  const int64_t rows = x.dim(0), d = x.dim(1), h = gate[0].dim(0);
  const auto experts = static_cast<int64_t>(gate.size());
  const Device device = x.device();
  GroupedSwigluValues out{
      Tensor::empty({rows, d}, DType::f32, device), Tensor::empty({rows, h}, DType::f32, device),
      Tensor::empty({rows, h}, DType::f32, device), Tensor::empty({rows, h}, DType::f32, device)};
  const std::vector<const float*> g = expert_pointers(gate), u = expert_pointers(up),
                                  w = expert_pointers(down);
  if (on_cuda(x)) {
    cuda_grouped_swiglu(x.device_data<float>(), cuda_segments(offsets, rows, d, h), g.data(),
                        u.data(), w.data(), out.y.device_data<float>(),
                        out.pre_gate.device_data<float>(), out.pre_up.device_data<float>(),
                        out.act.device_data<float>(), d, h);
  } else {
    cpu::grouped_swiglu(x.data<float>(), offsets.offsets().data(), experts, g.data(), u.data(),
                        w.data(), out.y.data<float>(), out.pre_gate.data<float>(),
                        out.pre_up.data<float>(), out.act.data<float>(), d, h);
  }
  return out;
}

// The gradients of the node's inputs (x, then gate, up and down of every expert: slot
// 1 + kind * experts + e). `weights` are those 3P inputs. With the offsets on the host an expert
// with no rows gets no gradient; with them only on the device every wanted one is computed (zeros
// for an empty segment), and the node's gates decide which are real. `waiting` holds the weights'
// .grad() where they have one (the node adds to leaf gradients, rex/autograd/graph.hpp): on CUDA,
// when every weight gradient made here has one (the layers of a table after the first to run
// backward), the products add into them in place, where the engine would add new ones after.
inline GradList grouped_swiglu_grads(const Tensor& g, const Tensor& x, const DeviceCounts& offsets,
                                     const std::vector<Tensor>& weights,
                                     const GroupedSwigluValues& saved,
                                     const std::vector<bool>& needs, GradList& waiting) {
  const Tensor &pre_gate = saved.pre_gate, &pre_up = saved.pre_up, &act = saved.act;
  const auto experts = static_cast<int64_t>(weights.size() / 3);
  const int64_t rows = x.dim(0), d = x.dim(1), h = pre_gate.dim(1);
  const GroupedSegments segments =
      on_cuda(x) ? cuda_segments(offsets, rows, d, h) : GroupedSegments{};
  const bool host_offsets = segments.device_offsets == nullptr;
  GradList grads(static_cast<size_t>(1 + 3 * experts));
  if (needs[0]) grads[0] = Tensor::empty(x.shape(), DType::f32, x.device());
  auto made = [&](size_t slot) {  // whether this weight's gradient is computed
    const auto e = static_cast<size_t>(static_cast<int64_t>(slot - 1) % experts);
    return needs[slot] && (!host_offsets || offsets[e] > 0);
  };
  bool accumulate = on_cuda(x);
  for (size_t slot = 1; slot < grads.size(); ++slot)
    if (made(slot) && !waiting[slot].defined()) accumulate = false;
  // Per kind, every expert's weights and gradient (null where not wanted) as device pointers.
  std::vector<const float*> w[3];
  std::vector<float*> dw[3];
  for (int64_t kind = 0; kind < 3; ++kind) {
    for (int64_t e = 0; e < experts; ++e) {
      const auto slot = static_cast<size_t>(1 + kind * experts + e);
      w[kind].push_back(weights[slot - 1].device_data<float>());
      if (made(slot))
        grads[slot] = accumulate ? std::move(waiting[slot])  // taken: added to in place
                                 : Tensor::empty(weights[slot - 1].shape(), DType::f32, x.device());
      dw[kind].push_back(grads[slot].defined() ? grads[slot].device_data<float>() : nullptr);
    }
  }
  float* dx = needs[0] ? grads[0].device_data<float>() : nullptr;
  if (on_cuda(x)) {
    cuda_grouped_swiglu_backward(
        x.device_data<float>(), segments, w[0].data(), w[1].data(), w[2].data(),
        pre_gate.device_data<float>(), pre_up.device_data<float>(), act.device_data<float>(),
        g.device_data<float>(), dx, dw[0].data(), dw[1].data(), dw[2].data(), accumulate, d, h);
  } else {
    cpu::grouped_swiglu_backward(x.data<float>(), offsets.offsets().data(), experts, w[0].data(),
                                 w[1].data(), w[2].data(), pre_gate.data<float>(),
                                 pre_up.data<float>(), act.data<float>(), g.data<float>(), dx,
                                 dw[0].data(), dw[1].data(), dw[2].data(), d, h);
  }
  return grads;
}

// The rows of x at `index` (m rows of d), trusting the indices.
inline Tensor gather_rows_trusted(const Tensor& x, const Tensor& index) {
  const int64_t m = index.numel(), d = x.dim(1);
  Tensor out = Tensor::empty(Shape{m, d}, DType::f32, x.device());
  if (on_cuda(x)) {
    cuda_backend().gather_rows_unchecked(x.device_data<float>(), index.device_data<int32_t>(),
                                         out.device_data<float>(), m, d);
    return out;
  }
  const float* px = x.data<float>();
  const int32_t* pi = index.data<int32_t>();
  float* po = out.data<float>();
  for (int64_t i = 0; i < m; ++i) std::copy_n(px + pi[i] * d, d, po + i * d);
  return out;
}

// dx [tokens, d]: row t sums g's rows at token t's k sorted positions, in increasing position,
// and is then added to `plus` when that is defined (a gradient waiting for x).
inline Tensor gather_sum_rows(const Tensor& g, const Tensor& slot_positions, int64_t tokens,
                              int64_t k, const Tensor& plus) {
  const int64_t d = g.dim(1);
  Tensor dx = Tensor::empty(Shape{tokens, d}, DType::f32, g.device());
  const float* pplus = plus.defined() ? plus.device_data<float>() : nullptr;
  if (on_cuda(g)) {
    cuda_backend().gather_sum_rows(g.device_data<float>(), slot_positions.device_data<int32_t>(),
                                   pplus, dx.device_data<float>(), tokens, k, d);
    return dx;
  }
  const float* pg = g.data<float>();
  const int32_t* positions = slot_positions.data<int32_t>();
  float* px = dx.data<float>();
  std::vector<int32_t> sorted(static_cast<size_t>(k));
  for (int64_t t = 0; t < tokens; ++t) {
    std::copy_n(positions + t * k, k, sorted.begin());
    std::sort(sorted.begin(), sorted.end());
    float* row = px + t * d;
    std::fill_n(row, d, 0.0f);
    for (const int32_t p : sorted)
      for (int64_t c = 0; c < d; ++c) row[c] += pg[p * d + c];
    if (pplus)
      for (int64_t c = 0; c < d; ++c) row[c] = pplus[t * d + c] + row[c];
  }
  return dx;
}

}  // namespace detail

namespace detail {
// An expert's share of the routed slots, count / slots in f32 (the balance loss's f), as
// kernels/routing.cu computes it.
inline float routed_share(int64_t count, int64_t slots) {
  return slots > 0 ? static_cast<float>(count) / static_cast<float>(slots) : 0.0f;
}
}  // namespace detail

// The T k slots of indices [T, k] (values in [0, pool)) stably sorted by expert.
struct SlotOrder {
  DeviceCounts counts;    // [pool]: slots routed to each expert, as the experts' segment offsets
                          // (on CUDA on the device, read by the host only when asked)
  Tensor routed_shares;   // [pool] f32: each expert's count / (T k), the balance loss's f
  Tensor sorted_slots;    // [T k] i32: the slot at each sorted position
  Tensor slot_positions;  // [T k] i32: each slot's sorted position (the inverse)
  Tensor sorted_tokens;   // [T k] i32: the token of each sorted position
};

// On CUDA the indices are checked only where the host has them (an uploaded tensor): indices made
// on the device are rex's own top-k, trusted as the kernels' other inputs are.
inline SlotOrder sort_slots_by_expert(const Tensor& indices, int64_t pool) {
  detail::check_i32("sort_slots_by_expert", indices);
  REX_CHECK(indices.rank() == 2, "sort_slots_by_expert: expected indices [T, k], got ",
            indices.shape());
  REX_CHECK(pool > 0, "sort_slots_by_expert: the table has no experts");
  const int64_t k = indices.dim(1), slots = indices.numel();
  const auto bad_index = [pool](int32_t e, int64_t s) {
    throw Error(detail::concat("sort_slots_by_expert: expert index ", e, " at slot ", s,
                               " is outside the table of ", pool));
  };
  SlotOrder out;
  for (Tensor* t : {&out.sorted_slots, &out.slot_positions, &out.sorted_tokens})
    *t = Tensor::empty({slots}, DType::i32, indices.device());
  out.routed_shares = Tensor::empty({pool}, DType::f32, indices.device());
  if (detail::on_cuda(indices)) {
    if (const int32_t* host = indices.host_values<int32_t>())
      for (int64_t s = 0; s < slots; ++s)
        if (host[s] < 0 || host[s] >= pool) bad_index(host[s], s);
    std::shared_ptr<void> offsets =
        detail::cuda_buffer(static_cast<size_t>(pool + 1) * sizeof(int64_t));
    detail::cuda_backend().route(
        indices.device_data<int32_t>(), slots, k, pool, out.sorted_slots.device_data<int32_t>(),
        out.slot_positions.device_data<int32_t>(), out.sorted_tokens.device_data<int32_t>(),
        static_cast<int64_t*>(offsets.get()), out.routed_shares.device_data<float>());
    out.counts = DeviceCounts::on_device(std::move(offsets), pool);
    return out;
  }
  const detail::BucketOrder by_expert =
      detail::counting_sort(indices.data<int32_t>(), slots, pool, bad_index);
  out.counts = DeviceCounts::on_host(by_expert.offsets);
  float* shares = out.routed_shares.data<float>();
  for (int64_t e = 0; e < pool; ++e)
    shares[e] = detail::routed_share(out.counts[static_cast<size_t>(e)], slots);
  int32_t* slot_at = out.sorted_slots.data<int32_t>();
  int32_t* position_of = out.slot_positions.data<int32_t>();
  int32_t* token_at = out.sorted_tokens.data<int32_t>();
  for (int64_t p = 0; p < slots; ++p) {
    const int64_t s = by_expert.order[static_cast<size_t>(p)];
    slot_at[p] = static_cast<int32_t>(s);
    position_of[s] = static_cast<int32_t>(p);
    token_at[p] = static_cast<int32_t>(s / k);
  }
  return out;
}

// x [T, d] -> [T k, d]: the token row of every slot, in expert order (sorted_tokens).
inline Tensor dispatch_rows(const Tensor& x, const SlotOrder& order) {
  detail::check_f32("dispatch_rows", x);
  const int64_t tokens = x.dim(0), k = order.sorted_tokens.numel() / std::max<int64_t>(tokens, 1);
  REX_CHECK(x.rank() == 2 && tokens * k == order.sorted_tokens.numel(), "dispatch_rows: x ",
            x.shape(), " does not have the plan's tokens");
  return detail::record(
      detail::gather_rows_trusted(x, order.sorted_tokens), "dispatch_rows", {x},
      [positions = order.slot_positions, tokens, k](const Tensor& g, const std::vector<bool>&,
                                                    detail::GradList& waiting) {
        const Tensor plus = std::move(waiting[0]);  // taken: added here
        return detail::GradList{detail::gather_sum_rows(g, positions, tokens, k, plus)};
      });
}

// y [T, d] = the sum over each token's k slots of its expert's row times the slot's gate:
//   y[t] = sum_j gates[t, j] y_sorted[slot_positions[t k + j]],
// the experts' rows (in expert order) back to their tokens, gated: one kernel (and one for the
// backward) for what unsort, multiply and a sum over k would do in three (and five). Each product
// is rounded and the k products are added in j order from 0, as that sum would add them.
// Backward, for g [T, d]:
//   d y_sorted[slot_positions[s]] = g[t] gates[s] (t = s / k),
//   d gates[s] = sum_c g[t, c] y_sorted[slot_positions[s], c], added in the order of a warp of 32
//   lanes (cpu::combine_slots_backward), on either device.
inline Tensor combine_slots(const Tensor& y_sorted, const SlotOrder& order, const Tensor& gates) {
  detail::check_f32("combine_slots", y_sorted), detail::check_f32("combine_slots", gates);
  const int64_t slots = order.slot_positions.numel();
  REX_CHECK(y_sorted.rank() == 2 && y_sorted.dim(0) == slots && gates.rank() == 2 &&
                gates.numel() == slots,
            "combine_slots: rows ", y_sorted.shape(), " and gates ", gates.shape(),
            " do not match the plan's ", slots, " slots");
  detail::common_device("combine_slots", {y_sorted, gates, order.slot_positions});
  const int64_t tokens = gates.dim(0), k = gates.dim(1), d = y_sorted.dim(1);
  Tensor y = Tensor::empty(Shape{tokens, d}, DType::f32, y_sorted.device());
  (detail::on_cuda(y) ? detail::cuda_backend().combine_slots : detail::cpu::combine_slots)(
      y_sorted.device_data<float>(), order.slot_positions.device_data<int32_t>(),
      gates.device_data<float>(), y.device_data<float>(), tokens, k, d);
  return detail::record(
      y, "combine_slots", {y_sorted, gates},
      [y_sorted = y_sorted.detach(), gates = gates.detach(), positions = order.slot_positions,
       tokens, k, d](const Tensor& g) {
        detail::GradList grads{Tensor::empty(y_sorted.shape(), DType::f32, g.device()),
                               Tensor::empty(gates.shape(), DType::f32, g.device())};
        (detail::on_cuda(g) ? detail::cuda_backend().combine_slots_backward
                            : detail::cpu::combine_slots_backward)(
            g.device_data<float>(), y_sorted.device_data<float>(), positions.device_data<int32_t>(),
            gates.device_data<float>(), grads[0].device_data<float>(),
            grads[1].device_data<float>(), tokens, k, d);
        return grads;
      });
}

// The router's load-balancing loss, scale * sum_e shares[e] * mean_t probs[t, e], for probs
// [T, P] and shares [P] (f, a constant of the loss: no gradient), as one kernel each way: the same
// roundings as sum(shares * mean(probs, 0)) * scale on the CPU, whose sums run in order. Backward:
//   d probs[t, e] = ((g scale) shares[e]) (1 / T).
inline Tensor balance_loss(const Tensor& probs, const Tensor& shares, float scale) {
  detail::check_f32("balance_loss", probs), detail::check_f32("balance_loss", shares);
  REX_CHECK(probs.rank() == 2 && probs.dim(0) > 0 && shares.shape() == Shape{probs.dim(1)},
            "balance_loss: expected probs [T, P] with T > 0 and shares [P], got probs ",
            probs.shape(), " and shares ", shares.shape());
  detail::common_device("balance_loss", {probs, shares});
  const int64_t tokens = probs.dim(0), pool = probs.dim(1);
  Tensor loss = Tensor::empty(Shape{}, DType::f32, probs.device());
  (detail::on_cuda(probs) ? detail::cuda_backend().balance_loss : detail::cpu::balance_loss)(
      probs.device_data<float>(), shares.device_data<float>(), loss.device_data<float>(), tokens,
      pool, scale);
  return detail::record(
      loss, "balance_loss", {probs},
      [shares = shares.detach(), tokens, pool, scale](const Tensor& g) {
        Tensor d_probs = Tensor::empty(Shape{tokens, pool}, DType::f32, g.device());
        (detail::on_cuda(g) ? detail::cuda_backend().balance_loss_backward
                            : detail::cpu::balance_loss_backward)(
            g.device_data<float>(), shares.device_data<float>(), d_probs.device_data<float>(),
            tokens, pool, scale);
        return detail::GradList{d_probs};
      });
}

// offsets: the segments [experts + 1], on the host or (a routing plan's counts) on x's device.
inline Tensor grouped_swiglu(const Tensor& x, const DeviceCounts& offsets,
                             const std::vector<Tensor>& gate, const std::vector<Tensor>& up,
                             const std::vector<Tensor>& down) {
  detail::check_f32("grouped_swiglu", x);
  REX_CHECK(x.rank() == 2, "grouped_swiglu: x must be [M, d], got ", x.shape());
  const auto experts = static_cast<int64_t>(gate.size());
  REX_CHECK(experts > 0 && static_cast<int64_t>(up.size()) == experts &&
                static_cast<int64_t>(down.size()) == experts && offsets.size() == experts,
            "grouped_swiglu: need one gate, up and down weight per expert and experts + 1 offsets");
  if (offsets.known()) {  // the host has them: check them (a plan made on the device is rex's)
    const std::vector<int64_t>& o = offsets.offsets();
    REX_CHECK(o.front() == 0 && o.back() == x.dim(0),
              "grouped_swiglu: offsets must run from 0 to the ", x.dim(0), " rows of x");
    for (int64_t e = 0; e < experts; ++e)
      REX_CHECK(o[e] <= o[e + 1], "grouped_swiglu: offsets decrease at expert ", e);
  }
  const int64_t d = x.dim(1), h = gate[0].dim(0);
  for (int64_t e = 0; e < experts; ++e) {
    detail::check_f32("grouped_swiglu", gate[e]), detail::check_f32("grouped_swiglu", up[e]);
    detail::check_f32("grouped_swiglu", down[e]);
    REX_CHECK(gate[e].shape() == Shape({h, d}) && up[e].shape() == Shape({h, d}) &&
                  down[e].shape() == Shape({d, h}),
              "grouped_swiglu: expert ", e, " has gate ", gate[e].shape(), ", up ", up[e].shape(),
              ", down ", down[e].shape(), "; expected [", h, ", ", d, "], [", h, ", ", d, "], [", d,
              ", ", h, "]");
  }
  // Inputs: x, then gate, up and down of every expert; the backward keeps detached weights.
  const std::vector<Tensor> inputs = detail::grouped_swiglu_inputs(x, gate, up, down);
  for (const Tensor& t : inputs) detail::common_device("grouped_swiglu", {x, t});
  detail::GroupedSwigluValues values = detail::grouped_swiglu_values(x, offsets, gate, up, down);
  std::vector<Tensor> weights;  // what the backward reads: none without a graph (decoding)
  if (grad_enabled())
    for (size_t i = 1; i < inputs.size(); ++i) weights.push_back(inputs[i].detach());
  Tensor y = detail::record(
      values.y, "grouped_swiglu", inputs,
      [x = x.detach(), offsets, weights = std::move(weights),
       saved = detail::GroupedSwigluValues{Tensor(), values.pre_gate, values.pre_up, values.act}](
          const Tensor& g, const std::vector<bool>& needs, detail::GradList& waiting) {
        return detail::grouped_swiglu_grads(g, x, offsets, weights, saved, needs, waiting);
      });
  // The layers sharing an expert table add to its weights' gradients in turn: the products add
  // into the gradients already there (grouped_swiglu_grads).
  if (y.impl().autograd) y.impl().autograd->grad_fn->adds_to_leaf_grads = true;
  // Offsets the host has not read: each expert's gradients are real only if its count is not 0.
  if (offsets.only_on_device() && y.impl().autograd) {
    std::vector<detail::GradGate>& gates = y.impl().autograd->grad_fn->input_gates;
    gates.resize(inputs.size());
    for (int64_t kind = 0; kind < 3; ++kind)
      for (int64_t e = 0; e < experts; ++e)
        gates[static_cast<size_t>(1 + kind * experts + e)] = {offsets, e};
  }
  return y;
}

// The same with the offsets given on the host.
inline Tensor grouped_swiglu(const Tensor& x, const std::vector<int64_t>& offsets,
                             const std::vector<Tensor>& gate, const std::vector<Tensor>& up,
                             const std::vector<Tensor>& down) {
  REX_CHECK(!offsets.empty(), "grouped_swiglu: need experts + 1 offsets, got none");
  return grouped_swiglu(x, DeviceCounts::on_host(offsets), gate, up, down);
}

}  // namespace rex
