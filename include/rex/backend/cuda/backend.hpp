// The CUDA backend as the header-only ops see it: a table of host functions that rex::cuda (the
// compiled kernels/) fills in. The ops test a tensor's device and call through the table; no CUDA
// header and no CUDA symbol is ever referenced from include/, so the CPU path stays header-only.
// A program built without rex::cuda gets a clear rex::Error from cuda_backend() instead.
//
// Contract of every entry: pointers are device memory unless named host_*; sizes are element
// counts; work is queued on rex's one CUDA stream in call order (so buffers freed to the caching
// allocator can be reused at once); any failing CUDA or cuBLAS call throws rex::Error naming the
// call and CUDA's message. Results are deterministic: no floating-point atomics anywhere.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "rex/backend/attention_shape.hpp"
#include "rex/backend/pointwise.hpp"
#include "rex/backend/psr_mask.hpp"
#include "rex/core/device_memory.hpp"
#include "rex/core/precision.hpp"

namespace rex::detail {

// Up to this many axes in broadcast and permute launches (more is rejected by the op).
inline constexpr int kMaxCudaRank = 8;

// Row-major output extents plus, for up to three inputs, the element stride of each input along
// each output axis (0 where the input is broadcast). Built by cuda_broadcast_index in the ops.
struct CudaBroadcast {
  int32_t rank = 0;
  int64_t dims[kMaxCudaRank] = {};
  int64_t strides[3][kMaxCudaRank] = {};
};

struct CudaMemoryStats {
  int64_t cached_bytes = 0;    // freed blocks kept by the caching allocator for reuse
  int64_t reserved_bytes = 0;  // all bytes obtained from cudaMalloc and not yet returned
  int64_t device_mallocs = 0;  // cudaMalloc calls since start (flat in steady state)
};

// The scalars of one AdamW step that all parameters share.
struct AdamWScalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};

// acc[i] += g[i] for i < n: one of the gradient additions that add_pairs does in one launch.
struct AddPair {
  float* acc;
  const float* g;
  int64_t n;
};

// The most pairs one add_pairs launch takes (they travel as a kernel argument).
inline constexpr int kAddPairsPerLaunch = 96;
// The most terms one sum_of launch adds (the pointers travel as a kernel argument); a longer sum
// goes on from the partial sum in the next launch.
inline constexpr int kSumTermsPerLaunch = 32;

// One parameter's range [begin, end) of an optimiser arena (element offsets), its decay factor
// (keep = 1 for parameters without weight decay) and its index, under which adamw_prepare left
// the step's own scalars (the step size and bias correction follow its own step count).
struct AdamWSegment {
  int64_t begin, end;
  float keep;
  int32_t param;
};

// What adamw_prepare leaves for each parameter it was given; skip != 0 where its gradient was not
// real (nothing is updated, its step count stays).
struct alignas(16) AdamWStepScalars {
  float neg_step_size, bias2_sqrt;
  int32_t skip, unused;
};

// A parameter with a gradient at this step, for adamw_prepare: its index and its gates,
// gate_count pointers from gate_first of the gate table, each at an expert's offsets in a routing
// plan (the gradient is real where any offsets[1] - offsets[0] is not 0; no gates: it is real).
struct alignas(16) AdamWParamGates {
  int32_t param, gate_first, gate_count, unused;
};

// Step s's bias corrections as rex::optim::AdamW computes them on the host: 1 - beta1^s (double)
// and sqrt(1 - beta2^s) (float).
struct alignas(16) AdamWBias {
  double bias1;
  float bias2_sqrt;
};

// The most segments one adamw_segments launch takes (they travel as a kernel argument, under
// CUDA's 4 KiB limit); more segments make more launches.
inline constexpr int kAdamWSegmentsPerLaunch = 96;

// The segments of expert-sorted rows that a grouped product runs over: their offsets
// [experts + 1] in device memory (a routing plan's, which the host never read), or else on the host
// (uploaded with the launch's pointer table, no host wait); rows, the last offset, is known to the
// host either way (T k).
struct GroupedSegments {
  const int64_t* device_offsets = nullptr;
  const int64_t* host_offsets = nullptr;
  int64_t experts = 0, rows = 0;
};

// SwiGLU's backward made from a product's tile instead of storing it
// (GroupedRows::swiglu_backward): the product is d act, and gate and up are the forward's
// pre-activations; d_gate and d_up are written as swiglu_backward_kernel writes them.
struct SwigluBackward {
  const float *gate = nullptr, *up = nullptr;
  float *d_gate = nullptr, *d_up = nullptr;
};

// A grouped product over the segments of expert-sorted rows (kernels/grouped_gemm.cu), rows form:
// for each expert e (rows o_e .. o_e+1 of the segment offsets) and each pair p < pairs,
//   c[p][o_e..o_e+1) = a[p][o_e..o_e+1) times w_p[e]^T (transpose_w: w [n, k]) or w_p[e] ([k, n]),
// with a [rows, k] and c [rows, n] row-major; with sum_pairs the pairs add into c[0] instead.
// host_w[p] holds the experts' device pointers, on the host.
struct GroupedRows {
  int pairs = 1;
  bool sum_pairs = false, transpose_w = true;
  bool fp32 = false;  // products in fp32 on CUDA cores (the fp32 setting), not bf16 tensor cores
  int64_t n = 0, k = 0;
  const float* a[2] = {};
  const float* const* host_w[2] = {};
  float* c[2] = {};
  float* swiglu_out = nullptr;     // with 2 pairs: also swiglu_value(c[0], c[1]), [rows, n]
  SwigluBackward swiglu_backward;  // with 1 pair and gate set: c[0] unwritten, see above
};

// Weights form: for each expert e and pair p, c_p[e] [m, n] = a[p]_e^T b_e summed over the
// segment's rows, with a [rows, m] and b [rows, n] row-major; a null c_p[e] is skipped. host_c[p]
// holds the experts' device pointers, on the host. With accumulate, the products are added to the
// c_p[e] (each element once, after its sum: the bits of adding them apart), and an expert whose
// segment is empty leaves its c_p[e] as it is.
struct GroupedWeights {
  int pairs = 1;
  bool fp32 = false;  // as GroupedRows::fp32
  bool accumulate = false;
  int64_t m = 0, n = 0;
  const float* a[2] = {};
  const float* b = nullptr;
  float* const* host_c[2] = {};
};

struct CudaBackend {
  // ---- runtime and memory (kernels/memory.cu; allocate, release, copy and fill are core's
  // device-memory hook, rex/core/device_memory.hpp) ----
  int (*device_count)();
  std::string (*device_description)(int index);  // "NVIDIA H200 (sm_90, 139.8 GiB)"
  // rows blocks of row_bytes, from src every src_pitch bytes to dst every dst_pitch bytes (d2d;
  // any pitch, however large).
  void (*copy_rows)(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                    size_t row_bytes, size_t rows);
  void (*synchronize)();
  CudaMemoryStats (*memory_stats)();
  void (*empty_cache)();  // returns every cached block to the driver

  // ---- elementwise (kernels/elementwise.cu); the math is rex/backend/pointwise.hpp ----
  void (*unary)(UnaryOp op, float s, const float* x, float* y, int64_t n);
  // dx = g * unary_slope(op, saved, s), saved being x or y as unary_saves(op) says.
  void (*unary_backward)(UnaryOp op, float s, const float* g, const float* saved, float* dx,
                         int64_t n);
  void (*binary)(BinaryOp op, const float* a, const float* b, float* out,
                 const CudaBroadcast& index);  // strides[0] for a, [1] for b
  // For each of `count` pairs (distinct acc arrays, contiguous), acc += g elementwise: the backward
  // pass's additions of one node's gradients into their leaves, kAddPairsPerLaunch to a launch
  // (the same sums, bit for bit, as binary's add of each pair).
  void (*add_pairs)(const AddPair* host_pairs, int64_t count);
  // out = ((terms[0] + terms[1]) + terms[2]) + ... over n elements, for `count` >= 1 arrays whose
  // device pointers host_terms holds: binary's adds chained left to right (their bits), in one
  // launch per kSumTermsPerLaunch terms. With prefix_out, the chain's sum of the first `prefix`
  // terms (2 <= prefix < count) is written there too.
  void (*sum_of)(const float* const* host_terms, int64_t count, float* out, int64_t n,
                 float* prefix_out, int64_t prefix);
  // out = cond != 0 ? a : b; cond is f32 or i32 (cond_is_i32); strides[0..2] for cond, a, b.
  void (*select)(const void* cond, bool cond_is_i32, const float* a, const float* b, float* out,
                 const CudaBroadcast& index);
  // out[o] = x[at(o)] with index.dims the output extents and strides[0] those of x.
  void (*broadcast_copy)(const float* x, float* out, const CudaBroadcast& index);
  // out (out_numel elements) = sum of x over the broadcast axes: index.dims are x's extents and
  // strides[0] the strides of out along them (0 on summed axes). Summation order is fixed.
  void (*sum_to)(const float* x, float* out, int64_t out_numel, const CudaBroadcast& index);
  void (*swiglu)(const float* a, const float* b, float* y, int64_t n);
  // da, db may be null (not needed); formulas as rex::swiglu.
  void (*swiglu_backward)(const float* a, const float* b, const float* g, float* da, float* db,
                          int64_t n);

  // ---- reductions and row-wise fused ops (kernels/reduce.cu) ----
  // x viewed as [outer, n, inner] reduced over n -> [outer, inner].
  void (*sum_axis)(const float* x, float* out, int64_t outer, int64_t n, int64_t inner);
  // argmax holds the position along n (first maximum; NaN wins, as on the CPU).
  void (*max_axis)(const float* x, float* out, int32_t* argmax, int64_t outer, int64_t n,
                   int64_t inner);
  // gx [outer, n, inner] = 0 except gx[o, argmax[o, i], i] = g[o, i].
  void (*max_axis_backward)(const float* g, const int32_t* argmax, float* gx, int64_t outer,
                            int64_t n, int64_t inner);
  void (*softmax)(const float* x, float* y, int64_t rows, int64_t n);
  // y = softmax(x) per row and its top-k (values and indices, as topk's of y under `hidden`): the
  // bits of softmax then topk, in one launch.
  void (*softmax_topk)(const float* x, TopKHidden hidden, float* y, float* values, int32_t* indices,
                       int64_t rows, int64_t n, int64_t k);
  void (*softmax_backward)(const float* g, const float* y, float* dx, int64_t rows, int64_t n);
  void (*log_softmax)(const float* x, float* y, int64_t rows, int64_t n);
  void (*log_softmax_backward)(const float* g, const float* y, float* dx, int64_t rows, int64_t n);
  // Mean NLL over the rows whose target is not ignore_index, written to *loss (device scalar);
  // lse[r] receives each counted row's log-sum-exp, in double as on the CPU (the backward's
  // exp(x - lse) would lose digits for large logits otherwise). Returns the number of counted
  // rows. known_count >= 0: the host has checked the targets and counted known_count rows, so
  // nothing is read back; -1: the kernels check the targets and count the rows, and the host
  // reads both back (a wait) and throws rex::Error naming a row whose target is out of range.
  int64_t (*cross_entropy)(const float* logits, const int32_t* targets, int64_t rows,
                           int64_t classes, int32_t ignore_index, double* lse, float* loss,
                           int64_t known_count);
  // gx = g / count * (softmax(logits) - onehot(target)) on counted rows, 0 on ignored rows; g is a
  // device scalar.
  void (*cross_entropy_backward)(const float* logits, const int32_t* targets, const double* lse,
                                 const float* g, float* gx, int64_t rows, int64_t classes,
                                 int32_t ignore_index, int64_t count);
  // y = x * rstd * w per row of n, rstd[r] = 1 / sqrt(mean(x_r^2) + eps) (saved for backward).
  void (*rms_norm)(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t n,
                   float eps);
  // sum = a + b and rms_norm's y and rstd of it, in one pass: the bits of the two.
  void (*add_rms_norm)(const float* a, const float* b, const float* w, float* sum, float* y,
                       float* rstd, int64_t rows, int64_t n, float eps);
  // dx and dw may be null; dx_plus, when not null, is added to dx (a gradient waiting for x,
  // rounded as a separate addition would). dw sums over rows in row order.
  void (*rms_norm_backward)(const float* g, const float* x, const float* w, const float* rstd,
                            const float* dx_plus, float* dx, float* dw, int64_t rows, int64_t n);

  // ---- indexing, routing and layout (kernels/index.cu) ----
  // out[i] = x[index[i]] rows of d; an index outside [0, num_rows) throws rex::Error naming `op`
  // (gather_rows or embedding).
  void (*gather_rows)(const float* x, const int32_t* index, float* out, int64_t m, int64_t d,
                      int64_t num_rows, const char* op);
  // gather_rows for indices that are trusted: rex built them itself (the MoE routing plan), or the
  // host checked their values (Tensor::host_values). No check, no read-back.
  void (*gather_rows_unchecked)(const float* x, const int32_t* index, float* out, int64_t m,
                                int64_t d);
  // out [num_rows, d] = 0, then out[index[i]] += src[i] for i in increasing order (exactly the
  // CPU's order, so results are bit-identical run to run); bad indices throw. The order is planned
  // on the host, from host_index (the same values, already on the host) when it is not null, else
  // from index read back (a wait). With plus (which may be out), out = plus + those sums.
  void (*scatter_add_rows)(const float* src, const int32_t* index, const int32_t* host_index,
                           const float* plus, float* out, int64_t m, int64_t d, int64_t num_rows);
  // ---- the MoE routing plan (kernels/routing.cu) ----
  // The `slots` entries of indices (slot s is token s / k's choice s % k, an expert in [0, pool))
  // stably sorted by expert, as the host's counting sort: sorted_slots[p] is the slot at sorted
  // position p, slot_positions its inverse, sorted_tokens[p] = sorted_slots[p] / k; offsets
  // [pool + 1] (int64) the experts' segments of the sorted positions, shares [pool] each expert's
  // count / slots in f32. All on the device, no host wait.
  void (*route)(const int32_t* indices, int64_t slots, int64_t k, int64_t pool,
                int32_t* sorted_slots, int32_t* slot_positions, int32_t* sorted_tokens,
                int64_t* offsets, float* shares);
  // dx [tokens, d]: row t is the sum of g's rows at token t's k positions (positions [tokens, k]),
  // added in increasing position from 0 (scatter_add_rows' order), then added to `plus` [tokens,
  // d] when that is not null (a gradient waiting for x); k <= 32.
  void (*gather_sum_rows)(const float* g, const int32_t* positions, const float* plus, float* dx,
                          int64_t tokens, int64_t k, int64_t d);
  // The experts' rows back to their tokens, gated: y [tokens, d], row t = sum over j of
  // y_sorted[positions[t k + j]] * gates[t k + j], each product rounded, added in j order from 0.
  void (*combine_slots)(const float* y_sorted, const int32_t* positions, const float* gates,
                        float* y, int64_t tokens, int64_t k, int64_t d);
  // Its backward for g [tokens, d]: d_y_sorted [tokens k, d], row positions[s] = g[t] * gates[s]
  // for each slot s of token t = s / k; d_gates [tokens k], d_gates[s] = the sum over c of
  // g[t, c] * y_sorted[positions[s], c], in cpu::combine_slots_backward's order (a warp's).
  void (*combine_slots_backward)(const float* g, const float* y_sorted, const int32_t* positions,
                                 const float* gates, float* d_y_sorted, float* d_gates,
                                 int64_t tokens, int64_t k, int64_t d);
  // The load-balancing loss: loss[0] = scale * the sum over e (in order, from 0) of shares[e] *
  // (the sum over t of probs[t, e], in order from 0, times 1 / tokens), each product rounded.
  void (*balance_loss)(const float* probs, const float* shares, float* loss, int64_t tokens,
                       int64_t pool, float scale);
  // Its gradient for the loss's g[0]: d_probs[t, e] = ((g[0] * scale) * shares[e]) / tokens (the
  // last a product by 1 / tokens).
  void (*balance_loss_backward)(const float* g, const float* shares, float* d_probs, int64_t tokens,
                                int64_t pool, float scale);
  // Per row of n: the k largest scores (x, or `hidden` where it hides the entry) descending, ties
  // to the lower position, NaN first.
  void (*topk)(const float* x, TopKHidden hidden, float* values, int32_t* indices, int64_t rows,
               int64_t n, int64_t k);
  // gx [rows, n] = 0 except gx[r, indices[r, j]] = g[r, j] where `hidden` does not hide it, then
  // added to `plus` [rows, n] when that is not null (a gradient waiting for x).
  void (*topk_backward)(const float* g, const int32_t* indices, TopKHidden hidden,
                        const float* plus, float* gx, int64_t rows, int64_t n, int64_t k);
  // keep [rows.rows, rows.pool]: row r is PSR's mask of row r (detail::psr_mask_row with
  // detail::psr_row_seed), bit-identical to the CPU's.
  void (*psr_keep_rows)(const PsrMaskRows& rows, float* keep);
  // out = x with axes permuted (32-bit elements of either dtype): out axis i is x axis perm[i].
  void (*permute)(const void* x, void* out, int32_t rank, const int64_t* host_dims,
                  const int64_t* host_perm);
  // RoPE, "rotate half" as rex/ops/rope.hpp: element i pairs with i + head_dim/2 (NOT 2i, 2i+1);
  // x and y hold rows.count() rows of head_dim in the orders `rows` gives, cos and sin are [time,
  // head_dim / 2]; y = rotation by `direction` (+1 forward, -1 for the backward), exactly
  // rope_rotate's formula. With rows.second_heads, x_second (or y_second) set says that x (or y)
  // is the two tensors apart: x the first's rows, x_second the second's; the other is packed.
  void (*rope)(const float* x, const float* x_second, const float* cos, const float* sin, float* y,
               float* y_second, RopeRows rows, int64_t head_dim, float direction);

  // ---- attention (kernels/attention.cu) ----
  // Causal softmax(q k^T * scale) v with grouped-query heads, in either layout of `shape`
  // (rex/backend/attention_shape.hpp); lse [B, Hq, T] is saved.
  void (*attention)(const float* q, const float* k, const float* v, float* out, float* lse,
                    AttentionShape shape, float scale);
  // dq, dk, dv may be null. dk and dv sum over the query heads of a group in a fixed order.
  void (*attention_backward)(const float* q, const float* k, const float* v, const float* lse,
                             const float* g, float* dq, float* dk, float* dv, AttentionShape shape,
                             float scale);

  // ---- flash attention on bf16 tensor cores (kernels/flash_attention.cu) ----
  // attention's function and layouts, tiled so the scores never reach memory: q, k, v (and p)
  // enter the products rounded to bf16, which accumulate in fp32; softmax statistics and outputs
  // are fp32. head_dim 32, 64 or 128 (anything else throws).
  void (*flash_attention)(const float* q, const float* k, const float* v, float* out, float* lse,
                          AttentionShape shape, float scale);
  // out and lse are the forward's; g, p and ds enter the products rounded to bf16. dq, dk and dv
  // are all written (none may be null); dk and dv sum the group's query heads in a fixed order.
  void (*flash_attention_backward)(const float* q, const float* k, const float* v, const float* out,
                                   const float* lse, const float* g, float* dq, float* dk,
                                   float* dv, AttentionShape shape, float scale);

  // ---- GEMM through cuBLAS (kernels/gemm.cu) ----
  // Row-major c[m, n] (+)= op(a) op(b) like rex::detail::gemm, for `batch` products whose operands
  // start every stride_* elements (a stride of 0 repeats one operand).
  void (*gemm)(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k,
               bool transpose_a, bool transpose_b, bool accumulate, int64_t batch, int64_t stride_a,
               int64_t stride_b, int64_t stride_c);
  // The precision of gemm's products (rex/core/precision.hpp): fp32 (the default), tf32 (cuBLAS's
  // TF32 tensor-op math mode) or bf16 (a and b converted to bf16, cublasGemmStridedBatchedEx with
  // fp32 C and fp32 compute).
  void (*set_matmul_precision)(MatmulPrecision precision);

  // ---- grouped expert products on bf16 tensor cores (kernels/grouped_gemm.cu) ----
  // GroupedRows and GroupedWeights above, over the segments (GroupedSegments); one launch each.
  // Operands enter rounded to bf16 (as gemm's in bf16), sums in fp32; n, k and m even; at most
  // 16,384 experts.
  void (*grouped_rows)(const GroupedSegments& segments, const GroupedRows& product);
  void (*grouped_weights)(const GroupedSegments& segments, const GroupedWeights& product);

  // ---- optimiser (kernels/optim.cu) ----
  // The per-parameter part of an AdamW step, on the device: for each of the `count` parameters
  // at host_params, whether its gradient is real (its gates, host_gates), its step count in
  // steps [parameters] advanced where it is, and its step_scalars[param]: step size
  // -(lr / bias1) rounded to float and bias2_sqrt from bias [steps + 1] (rex::optim::AdamW keeps
  // the table ahead of every count), or skip. One launch; the tables are uploaded, no host wait.
  void (*adamw_prepare)(const AdamWParamGates* host_params, int64_t count,
                        const int64_t* const* host_gates, int64_t gates, int32_t* steps,
                        const AdamWBias* bias, double lr, AdamWStepScalars* step_scalars);
  // One AdamW step over the `count` segments at host_segments (in increasing order, not
  // overlapping) of four arena buffers, in rex::optim::AdamW::step's (PyTorch's) order of
  // operations, per element of a segment whose step_scalars[param] does not skip:
  // g = grad * scale; p *= keep; m = m b1 + (1 - b1) g; v = v b2 + (1 - b2) g g;
  // p += neg_step * m / (sqrt(v) / b2s + eps)
  // where scale is *grad_scale (a device float: the clip factor) or 1 when grad_scale is null; a
  // NaN *grad_scale (a non-finite norm) skips the whole update. Elements outside every segment
  // are not touched. One launch per kAdamWSegmentsPerLaunch segments; no host wait.
  void (*adamw_segments)(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                         const AdamWSegment* host_segments, int64_t count,
                         const AdamWScalars& scalars, const AdamWStepScalars* step_scalars,
                         const float* grad_scale);
  // The global-norm clip of n gradient values, on the device: the sum of their squares in double
  // with a fixed reduction tree (deterministic), *norm = its square root and
  // *factor = min(1, max_norm / (norm + 1e-6)) rounded to float (1 when max_norm <= 0; NaN when
  // the norm is not finite, which adamw_segments reads as "update nothing"). Two launches, no host
  // wait: norm and factor stay on the device.
  void (*clip_factor)(const float* grad, int64_t n, double max_norm, double* norm, float* factor);
  // host_sums[i] = the sum of squares of the host_sizes[i] floats at host_arrays[i] (device
  // pointers, in a host array), in double with a fixed reduction tree (deterministic), for `count`
  // arrays; all come to the host in one copy, after one synchronisation.
  void (*sum_squares)(const float* const* host_arrays, const int64_t* host_sizes, int64_t count,
                      double* host_sums);
};

}  // namespace rex::detail

#if defined(REX_WITH_CUDA)
namespace rex::cuda {
// Defined in kernels/backend.cu: the table of the compiled kernels.
const rex::detail::CudaBackend& backend();
}  // namespace rex::cuda
#endif

namespace rex::detail {

// The CUDA backend, or a rex::Error saying that this program was built without it.
inline const CudaBackend& cuda_backend() {
#if defined(REX_WITH_CUDA)
  return rex::cuda::backend();
#else
  throw_built_without_cuda();
#endif
}

}  // namespace rex::detail
