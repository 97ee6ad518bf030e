// The MoE routing plan on the device, the dispatch gather's backward, the gated combine of the
// experts' rows and the router's load-balancing loss.
//
// - route: the T k slots (slot s = t k + j, token t's j-th choice) sorted by expert, stably (in
//   slot order within an expert), exactly as the host's counting sort
//   (rex/backend/counting_sort.hpp) orders them, so both backends agree on the plan bit for bit.
//   Two kernels of one block per expert: route_count_kernel counts the expert's slots (integer
//   sums: exact in any order) and writes its share of them (count / slots in f32, the balance
//   loss's f); route_scatter_kernel writes the segment offsets and walks the slots in order, 256 at
//   a time, giving each of its slots the position offset + (its rank among the expert's slots so
//   far) with a block-wide prefix count (warp ballots, then the warps' totals in shared memory).
//   The offset is the sum of the counts of the experts before. Nothing comes to the host: the
//   grouped products read the offsets on the device, and the host reads them only when it asks
//   (rex::DeviceCounts). The indices are rex's own (top-k of the router), so there is no
//   per-index check.
// - gather_sum_rows: dx[t] = the sum of g over the sorted positions of token t's k slots, added in
//   increasing position, from 0: the order in which scatter_add_rows (and the CPU) add them, so the
//   result is bit-identical to theirs, with no host work and no atomics. One thread per element of
//   dx; a token's positions are read by a warp at once and sorted in registers (k <= 32).
// - combine_slots: the experts' rows back to their tokens, gated and summed over the k slots in
//   slot order, one thread per output element (what a permutation back to slot order, a product
//   with the gates and a sum over k did in three launches);
//   products and sums with _rn intrinsics, so no FMA is contracted and the bits are the CPU's. Its
//   backward is one launch: a thread per element of d_y_sorted (g times the slot's gate) and a
//   warp per slot for its gate's gradient, a dot product whose order (32 strided sums, then a
//   butterfly) the CPU's loop follows.
// - balance_loss: one block; each thread sums an expert's column of the probabilities in token
//   order and multiplies (by 1 / tokens, then by the expert's share), and thread 0 adds the
//   products in expert order: the CPU's order, bit for bit. Its backward is a thread per
//   probability. Five launches each way fewer than the mean, product, sum and scalings it fuses.
#include "common.cuh"

namespace rex::cuda::detail {
namespace {

constexpr int kMaxTopK = 32;

__global__ void route_count_kernel(const int32_t* indices, int64_t slots, int64_t* counts,
                                   float* shares) {
  __shared__ int64_t warp_total[kThreads / 32];
  const int32_t expert = static_cast<int32_t>(blockIdx.x);
  int64_t mine = 0;
  for (int64_t s = threadIdx.x; s < slots; s += blockDim.x) mine += indices[s] == expert ? 1 : 0;
  for (int offset = 16; offset > 0; offset /= 2)
    mine += __shfl_down_sync(0xffffffffu, mine, offset);
  if (threadIdx.x % 32 == 0) warp_total[threadIdx.x / 32] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (unsigned int w = 0; w < blockDim.x / 32; ++w) total += warp_total[w];
    counts[expert] = total;
    shares[expert] = slots > 0 ? static_cast<float>(total) / static_cast<float>(slots) : 0.0f;
  }
}

// Block e also writes offsets[e + 1] (block 0 offsets[0] too): the start of the next expert.
__global__ void route_scatter_kernel(const int32_t* indices, int64_t slots, int64_t k,
                                     const int64_t* counts, int64_t* offsets, int32_t* sorted_slots,
                                     int32_t* slot_positions, int32_t* sorted_tokens) {
  __shared__ int64_t start;  // the next free position of this expert
  __shared__ int32_t warp_count[kThreads / 32];
  const int32_t expert = static_cast<int32_t>(blockIdx.x);
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  if (threadIdx.x == 0) {
    int64_t offset = 0;
    for (int32_t e = 0; e < expert; ++e) offset += counts[e];
    start = offset;
    if (expert == 0) offsets[0] = 0;
    offsets[expert + 1] = offset + counts[expert];
  }
  for (int64_t first = 0; first < slots; first += blockDim.x) {
    const int64_t s = first + threadIdx.x;
    const bool mine = s < slots && indices[s] == expert;
    const unsigned int ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();  // start and the warps' counts are published
    int64_t position = start, chunk = 0;
    for (unsigned int w = 0; w < blockDim.x / 32; ++w) {
      const int64_t count = warp_count[w];
      if (w < static_cast<unsigned int>(warp)) position += count;
      chunk += count;
    }
    position += __popc(ballot & ((1u << lane) - 1u));
    if (mine) {
      sorted_slots[position] = static_cast<int32_t>(s);
      slot_positions[s] = static_cast<int32_t>(position);
      sorted_tokens[position] = static_cast<int32_t>(s / k);
    }
    __syncthreads();  // every thread has read start and the counts
    if (threadIdx.x == 0) start += chunk;
  }
}

void route(const int32_t* indices, int64_t slots, int64_t k, int64_t pool, int32_t* sorted_slots,
           int32_t* slot_positions, int32_t* sorted_tokens, int64_t* offsets, float* shares) {
  if (pool == 0) return;
  const Scratch counts(static_cast<size_t>(pool) * sizeof(int64_t));
  const auto blocks = static_cast<unsigned int>(pool);
  REX_LAUNCH(route_count_kernel, blocks, kThreads, 0, indices, slots, counts.as<int64_t>(), shares);
  REX_LAUNCH(route_scatter_kernel, blocks, kThreads, 0, indices, slots, k, counts.as<int64_t>(),
             offsets, sorted_slots, slot_positions, sorted_tokens);
}

__global__ void gather_sum_rows_kernel(const float* g, const int32_t* positions, const float* plus,
                                       float* dx, int64_t tokens, int64_t k, int64_t d) {
  const int64_t total = tokens * d;
  for (int64_t e = thread_index(); e < total; e += thread_count()) {
    const int64_t t = e / d, column = e - t * d;
    int32_t sorted[kMaxTopK];
    for (int64_t j = 0; j < k; ++j) {  // insertion sort of the token's k positions
      const int32_t p = positions[t * k + j];
      int64_t at = j;
      for (; at > 0 && sorted[at - 1] > p; --at) sorted[at] = sorted[at - 1];
      sorted[at] = p;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += g[static_cast<int64_t>(sorted[j]) * d + column];
    dx[e] = plus ? __fadd_rn(plus[e], sum) : sum;
  }
}

void gather_sum_rows(const float* g, const int32_t* positions, const float* plus, float* dx,
                     int64_t tokens, int64_t k, int64_t d) {
  REX_CHECK(k >= 1 && k <= kMaxTopK, "gather_sum_rows: k = ", k, " is outside [1, ", kMaxTopK,
            "] (the CUDA backend routes each token to at most ", kMaxTopK, " experts)");
  if (tokens == 0 || d == 0) return;
  REX_LAUNCH(gather_sum_rows_kernel, blocks_for(tokens * d), kThreads, 0, g, positions, plus, dx,
             tokens, k, d);
}

__global__ void combine_slots_kernel(const float* y_sorted, const int32_t* positions,
                                     const float* gates, float* y, int64_t tokens, int64_t k,
                                     int64_t d) {
  const int64_t total = tokens * d;
  for (int64_t e = thread_index(); e < total; e += thread_count()) {
    const int64_t t = e / d, column = e - t * d;
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      const float value = y_sorted[static_cast<int64_t>(positions[t * k + j]) * d + column];
      sum = __fadd_rn(sum, __fmul_rn(value, gates[t * k + j]));
    }
    y[e] = sum;
  }
}

void combine_slots(const float* y_sorted, const int32_t* positions, const float* gates, float* y,
                   int64_t tokens, int64_t k, int64_t d) {
  if (tokens == 0 || d == 0) return;
  REX_LAUNCH(combine_slots_kernel, blocks_for(tokens * d), kThreads, 0, y_sorted, positions, gates,
             y, tokens, k, d);
}

// A warp per slot s: lane l reads g's row at columns l, l + 32, ... in order from 0, writes them
// times the gate to d_y_sorted's row positions[s] and sums their products with y_sorted's row;
// the 32 sums meet in a butterfly (offsets 16, 8, 4, 2, 1), the order of
// cpu::combine_slots_backward. g's row is read once for both.
__global__ void combine_slots_backward_kernel(const float* g, const float* y_sorted,
                                              const int32_t* positions, const float* gates,
                                              float* d_y_sorted, float* d_gates, int64_t tokens,
                                              int64_t k, int64_t d) {
  const int64_t slots = tokens * k;
  for (int64_t e = thread_index(); e < slots * 32; e += thread_count()) {
    const int64_t s = e / 32, lane = e % 32;
    const float* g_row = g + s / k * d;
    const int64_t at = static_cast<int64_t>(positions[s]) * d;
    const float gate = gates[s];
    float dot = 0.0f;
    for (int64_t c = lane; c < d; c += 32) {
      const float value = g_row[c];
      d_y_sorted[at + c] = __fmul_rn(value, gate);
      dot = __fadd_rn(dot, __fmul_rn(value, y_sorted[at + c]));
    }
    for (int offset = 16; offset > 0; offset /= 2)
      dot = __fadd_rn(dot, __shfl_xor_sync(0xffffffffu, dot, offset));
    if (lane == 0) d_gates[s] = dot;
  }
}

void combine_slots_backward(const float* g, const float* y_sorted, const int32_t* positions,
                            const float* gates, float* d_y_sorted, float* d_gates, int64_t tokens,
                            int64_t k, int64_t d) {
  if (tokens == 0) return;
  REX_LAUNCH(combine_slots_backward_kernel, blocks_for(tokens * k * 32), kThreads, 0, g, y_sorted,
             positions, gates, d_y_sorted, d_gates, tokens, k, d);
}

// One block: its threads take 256 experts at a time, each summing its column in token order and
// leaving its product in shared memory, which thread 0 then adds in expert order.
__global__ void balance_loss_kernel(const float* probs, const float* shares, float* loss,
                                    int64_t tokens, int64_t pool, float scale) {
  __shared__ float product[kThreads];
  const float inv_tokens = 1.0f / static_cast<float>(tokens);
  float total = 0.0f;  // thread 0's
  for (int64_t first = 0; first < pool; first += blockDim.x) {
    const int64_t e = first + threadIdx.x;
    if (e < pool) {
      float column = 0.0f;
      for (int64_t t = 0; t < tokens; ++t) column = __fadd_rn(column, probs[t * pool + e]);
      product[threadIdx.x] = __fmul_rn(shares[e], __fmul_rn(column, inv_tokens));
    }
    __syncthreads();
    if (threadIdx.x == 0)
      for (int64_t i = 0; i < blockDim.x && first + i < pool; ++i)
        total = __fadd_rn(total, product[i]);
    __syncthreads();
  }
  if (threadIdx.x == 0) loss[0] = __fmul_rn(total, scale);
}

void balance_loss(const float* probs, const float* shares, float* loss, int64_t tokens,
                  int64_t pool, float scale) {
  REX_LAUNCH(balance_loss_kernel, 1, kThreads, 0, probs, shares, loss, tokens, pool, scale);
}

__global__ void balance_loss_backward_kernel(const float* g, const float* shares, float* d_probs,
                                             int64_t tokens, int64_t pool, float scale) {
  const float inv_tokens = 1.0f / static_cast<float>(tokens);
  for (int64_t e = thread_index(); e < tokens * pool; e += thread_count())
    d_probs[e] = __fmul_rn(__fmul_rn(__fmul_rn(g[0], scale), shares[e % pool]), inv_tokens);
}

void balance_loss_backward(const float* g, const float* shares, float* d_probs, int64_t tokens,
                           int64_t pool, float scale) {
  if (tokens == 0 || pool == 0) return;
  REX_LAUNCH(balance_loss_backward_kernel, blocks_for(tokens * pool), kThreads, 0, g, shares,
             d_probs, tokens, pool, scale);
}

}  // namespace

void register_routing(rex::detail::CudaBackend& table) {
  table.route = route;
  table.gather_sum_rows = gather_sum_rows;
  table.combine_slots = combine_slots;
  table.combine_slots_backward = combine_slots_backward;
  table.balance_loss = balance_loss;
  table.balance_loss_backward = balance_loss_backward;
}

}  // namespace rex::cuda::detail
