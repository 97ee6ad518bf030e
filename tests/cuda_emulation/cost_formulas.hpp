// Cost formulas: the counts (include/rex_emulation_counters.h) of one training step of today's CUDA
// backend, written down from its launch schemes instead of counted, so that a config too large to
// emulate (examples/configs/gpu_realistic.json) can still be priced by the device model. The
// emulation checks them against its counts on small configs (cost_formulas_check.cpp).
//
// Two layers. The kernel formulas give what one launch of a kernel asks of memory and arithmetic,
// from the sizes it is launched with and the way its threads walk them (kernels/*.cu): grid-stride
// loops with one thread per element read and write consecutive floats (a warp request of 32
// floats touches 4 sectors); row kernels give a block to a row and reduce through shared memory;
// the attention kernels give a block to a query (or key) row and walk the keys (or queries) before
// it (after it). The step plan lists the launches, cuBLAS calls and host waits a training step of a
// config makes, op by op, in the order the forward, the backward and the optimiser run them (read
// off the code of nn/, ops/ and optim/, and off a traced step).
//
// What the plan assumes, which the check's configs share: a ReX-MoE model (ffn = moe) without
// shared experts or z-loss, tied embeddings, every expert of every table receiving tokens in every
// layer (so every expert weight has a gradient), PSR past t_e or off (no mask to apply; while
// masks apply, top-k reads the mask, which each MoE layer uploads in the step scope (no wait) or
// makes with one psr_keep_rows_kernel launch in the sequence and token scopes), global-norm
// clipping on and firing, and device arrays aligned to 32 bytes (the caching allocator
// gives 512). Token counts per expert are taken even (tokens x k / pool each), which changes no
// count but the cuBLAS shapes' split. Widths are taken to be multiples of 32 where a formula says
// so.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include <rex_emulation_counters.h>
#include <rex/backend/cuda/backend.hpp>
#include <rex/core/error.hpp>
#include <rex/core/factory.hpp>
#include <rex/core/precision.hpp>
#include <rex/train/config.hpp>

namespace cuda_emulation::cost_formulas {

using i64 = int64_t;

inline uint64_t ceil_div(i64 a, i64 b) { return static_cast<uint64_t>((a + b - 1) / b); }

// ---- what one launch asks, by access pattern ----

// n consecutive elements of `bytes` each, one per thread, 32 threads a request.
inline void load_stream(KernelCounts& k, i64 n, int bytes = 4) {
  k.global.load_requests += ceil_div(n, 32);
  k.global.load_sectors += ceil_div(n * bytes, 32);
  k.global.load_bytes += static_cast<uint64_t>(n * bytes);
}
inline void store_stream(KernelCounts& k, i64 n, int bytes = 4) {
  k.global.store_requests += ceil_div(n, 32);
  k.global.store_sectors += ceil_div(n * bytes, 32);
  k.global.store_bytes += static_cast<uint64_t>(n * bytes);
}
// n threads reading one element, or runs of one element per warp: one sector a request.
inline void load_broadcast(KernelCounts& k, i64 n, int bytes = 4) {
  k.global.load_requests += ceil_div(n, 32);
  k.global.load_sectors += ceil_div(n, 32);
  k.global.load_bytes += static_cast<uint64_t>(n * bytes);
}
// Thread i reads x[i % period] (a row repeated down a column): the distinct sectors of each warp.
inline void load_periodic(KernelCounts& k, i64 n, i64 period) {
  k.global.load_requests += ceil_div(n, 32);
  k.global.load_bytes += static_cast<uint64_t>(n * 4);
  const i64 warps = static_cast<i64>(ceil_div(n, 32));
  const i64 cycle = std::lcm<i64>(period, 32) / 32;  // warps before the pattern repeats
  for (i64 w = 0; w < std::min(cycle, warps); ++w) {
    std::set<i64> sectors;
    for (i64 lane = 0; lane < 32 && w * 32 + lane < n; ++lane)
      sectors.insert((w * 32 + lane) % period * 4 / 32);
    const i64 repeats = (warps - 1 - w) / cycle + 1;  // warps w, w + cycle, ... below `warps`
    k.global.load_sectors += static_cast<uint64_t>(repeats) * sectors.size();
  }
}
// A block's reduction through shared memory (reduce.cu block_reduce): each warp stores its partial,
// then every warp reads all of them, each a broadcast.
inline void block_reduce(KernelCounts& k, i64 blocks, int threads) {
  const uint64_t warps = static_cast<uint64_t>(threads / 32);
  k.shared.store_requests += blocks * warps;
  k.shared.store_wavefronts += blocks * warps;
  k.shared.load_requests += blocks * warps * warps;
  k.shared.load_wavefronts += blocks * warps * warps;
}

// ---- the step plan ----

struct Sizes;  // below

// Adds launches, cuBLAS calls and host waits to a Counts, as the emulation would count them.
class Plan {
 public:
  Counts counts;

  void launch(const std::string& kernel, const KernelCounts& one, uint64_t times = 1) {
    if (times == 0) return;
    KernelCounts& k = counts.kernels[kernel];
    k.launches += times;
    counts.launches += times;
    add(k.global, one.global, times);
    add(k.shared, one.shared, times);
    k.arithmetic.f32_flops += times * one.arithmetic.f32_flops;
    k.arithmetic.f64_flops += times * one.arithmetic.f64_flops;
    k.arithmetic.special_functions += times * one.arithmetic.special_functions;
    k.arithmetic.tensor_bf16_flops += times * one.arithmetic.tensor_bf16_flops;
    k.arithmetic.tensor_tf32_flops += times * one.arithmetic.tensor_tf32_flops;
    k.global_atomics += times * one.global_atomics;
  }
  // `one` more of the work of kernel's launches, which counted their launches already (the
  // second part of a fused kernel).
  void also(const std::string& kernel, const KernelCounts& one, uint64_t times = 1) {
    launch(kernel, one, times);
    counts.kernels[kernel].launches -= times;
    counts.launches -= times;
  }
  // A product of kernels/gemm.cu at `precision`: in bf16, first bf16 copies of both operands.
  void gemm(i64 m, i64 n, i64 k, rex::MatmulPrecision precision, uint64_t calls = 1,
            bool accumulate = false) {
    if (calls == 0) return;
    const bool bf16 = precision == rex::MatmulPrecision::bf16;
    if (bf16) {  // one launch over both operands, each read and written as one stream
      KernelCounts round;
      for (const i64 elements : {m * k, k * n}) {
        load_stream(round, elements);
        store_stream(round, elements, 2);
      }
      launch("round_to_bf16_kernel", round, calls);
    }
    counts.gemms[GemmShape{m, n, k, 1, false, false, precision == rex::MatmulPrecision::tf32, bf16,
                           accumulate}] += calls;
    counts.cublas_calls += calls;
    counts.cublas_flops += 2.0 * static_cast<double>(m) * static_cast<double>(n) *
                           static_cast<double>(k) * static_cast<double>(calls);
  }
  // One launch of a kernel whose grid covers `groups` independent groups that each ask `one`.
  void launch_over_groups(const std::string& kernel, const KernelCounts& one, uint64_t groups) {
    launch(kernel, one, groups);
    counts.kernels[kernel].launches -= groups - 1;
    counts.launches -= groups - 1;
  }
  // A value the host needs: a device-to-host copy, then a stream synchronize.
  void read_back(uint64_t times = 1) {
    counts.device_to_host_copies += times;
    counts.stream_synchronizations += times;
  }

 private:
  static void add(MemoryCounts& to, const MemoryCounts& one, uint64_t times) {
    to.load_requests += times * one.load_requests;
    to.store_requests += times * one.store_requests;
    to.load_sectors += times * one.load_sectors;
    to.store_sectors += times * one.store_sectors;
    to.load_bytes += times * one.load_bytes;
    to.store_bytes += times * one.store_bytes;
    to.load_wavefronts += times * one.load_wavefronts;
    to.store_wavefronts += times * one.store_wavefronts;
    to.load_bank_conflicts += times * one.load_bank_conflicts;
    to.store_bank_conflicts += times * one.store_bank_conflicts;
  }
};

// reduce.cu's threads for a row of n.
inline int row_threads(i64 n) {
  if (n <= 64) return 32;
  if (n <= 256) return 64;
  if (n <= 1024) return 128;
  if (n <= 4096) return 256;
  return 512;
}

// ---- kernel formulas: one launch each ----

// unary_kernel, fill32_kernel and the flat copies: n elements in (0 or 1 streams), n out.
inline KernelCounts elementwise(i64 n, int streams_in, int scalars_in) {
  KernelCounts k;
  for (int s = 0; s < streams_in; ++s) load_stream(k, n);
  for (int s = 0; s < scalars_in; ++s) load_broadcast(k, n);
  store_stream(k, n);
  return k;
}

// binary_strided_kernel for x [rows, cols] op y [rows, 1] (y broadcast along the row) when
// periodic is false, or x [rows, cols] op y [cols] (y repeated down the rows) when it is true.
inline KernelCounts binary_strided(i64 rows, i64 cols, bool periodic) {
  KernelCounts k;
  load_stream(k, rows * cols);
  if (periodic) {
    load_periodic(k, rows * cols, cols);
  } else {
    load_broadcast(k, rows * cols);
  }
  store_stream(k, rows * cols);
  return k;
}

// The sectors of one pass over rows [rows, n] of floats, 32 consecutive elements of a row a
// request: exact, rows that do not start on a sector included.
inline uint64_t row_pass_sectors(i64 rows, i64 n) {
  if (n % 8 == 0) return static_cast<uint64_t>(rows) * ceil_div(n * 4, 32);
  uint64_t sectors = 0;
  for (i64 r = 0; r < rows; ++r)
    for (i64 first = 0; first < n; first += 32) {
      const i64 begin = (r * n + first) * 4, end = (r * n + std::min(first + 32, n)) * 4 - 1;
      sectors += static_cast<uint64_t>(end / 32 - begin / 32 + 1);
    }
  return sectors;
}

// A block per row, the row read in `load_passes` passes and written in `store_passes`, with
// `reductions` block reductions.
inline KernelCounts row_kernel(i64 rows, i64 n, int load_passes, int store_passes, int reductions) {
  KernelCounts k;
  const uint64_t requests = static_cast<uint64_t>(rows) * ceil_div(n, 32),
                 sectors = row_pass_sectors(rows, n);
  k.global.load_requests += load_passes * requests;
  k.global.load_sectors += load_passes * sectors;
  k.global.load_bytes += static_cast<uint64_t>(load_passes * rows * n * 4);
  k.global.store_requests += store_passes * requests;
  k.global.store_sectors += store_passes * sectors;
  k.global.store_bytes += static_cast<uint64_t>(store_passes * rows * n * 4);
  for (int r = 0; r < reductions; ++r) block_reduce(k, rows, row_threads(n));
  return k;
}

// `count` single values a row (a thread's own, or one every warp of the row's block reads).
inline void load_per_row(KernelCounts& k, i64 rows, i64 count, int bytes = 4) {
  k.global.load_requests += static_cast<uint64_t>(rows * count);
  k.global.load_sectors += static_cast<uint64_t>(rows * count);
  k.global.load_bytes += static_cast<uint64_t>(rows * count * bytes);
}
inline void store_per_row(KernelCounts& k, i64 rows, i64 count, int bytes = 4) {
  k.global.store_requests += static_cast<uint64_t>(rows * count);
  k.global.store_sectors += static_cast<uint64_t>(rows * count);
  k.global.store_bytes += static_cast<uint64_t>(rows * count * bytes);
}

// `arrivals` calls of last_to_finish (common.cuh) by blocks of `threads`, `finishes` of them last:
// thread 0's ticket (an atomic) and its flag in shared memory, which every warp reads; the counter
// put back to zero by each finishing block.
inline void last_to_finish(KernelCounts& k, i64 arrivals, int threads, i64 finishes) {
  k.global_atomics += static_cast<uint64_t>(arrivals);
  k.shared.store_requests += static_cast<uint64_t>(arrivals);
  k.shared.store_wavefronts += static_cast<uint64_t>(arrivals);
  k.shared.load_requests += static_cast<uint64_t>(arrivals * threads / 32);
  k.shared.load_wavefronts += static_cast<uint64_t>(arrivals * threads / 32);
  store_per_row(k, finishes, 1);
}

// gather_rows_kernel: out [m, d] = x [index[i], :]; index read once per warp of a row.
inline KernelCounts gather_rows(i64 m, i64 d) {
  KernelCounts k;
  load_stream(k, m * d);     // x rows, 32 consecutive columns a request
  load_broadcast(k, m * d);  // index[i], one sector a request
  store_stream(k, m * d);
  return k;
}

// rope_kernel over batch x heads x time rows of half pairs, heads first or time first: x's two
// halves read and y's written by rows (each row's half a whole number of sectors: half a multiple
// of 8), the cos and sin tables at each row's position. A warp spans 32 / half rows when half < 32;
// in time-first order neighbouring rows share a position, and so the table's sectors (counted warp
// by warp).
inline KernelCounts rope(i64 batch, i64 heads, i64 time, i64 half, bool time_first) {
  KernelCounts k;
  const i64 rows = batch * heads * time;
  for (int s = 0; s < 2; ++s) load_stream(k, rows * half);
  for (int s = 0; s < 2; ++s) store_stream(k, rows * half);
  uint64_t table_sectors = ceil_div(rows * half * 4, 32);
  if (half % 32 != 0) {
    table_sectors = 0;
    for (i64 first = 0; first < rows * half; first += 32) {
      std::set<i64> sectors;
      for (i64 e = first; e < std::min(first + 32, rows * half); ++e) {
        const i64 row = e / half, t = time_first ? row / heads % time : row % time;
        sectors.insert((t * half + e % half) * 4 / 32);
      }
      table_sectors += sectors.size();
    }
  }
  for (int s = 0; s < 2; ++s) {
    k.global.load_requests += ceil_div(rows * half, 32);
    k.global.load_sectors += table_sectors;
    k.global.load_bytes += static_cast<uint64_t>(rows * half * 4);
  }
  return k;
}

// scatter_add_rows_kernel: out [rows, d] sums m source rows of d (d <= 256 threads a block: a
// multiple of 32 here), with the CSR offsets (2 per row) and order (1 per source) in int64.
// With `plus`, each output element first reads plus's (the gradient it is added into).
inline KernelCounts scatter_add_rows(i64 rows, i64 m, i64 d, bool plus = false) {
  KernelCounts k;
  const i64 warps_per_row = static_cast<i64>(ceil_div(std::min<i64>(d, 256), 32));
  const i64 column_passes = static_cast<i64>(ceil_div(d, 256));
  // Per (row, column pass), each warp loads begin and end (broadcast), then per source its order
  // entry (broadcast) and 32 consecutive floats of the source row.
  k.global.load_requests += static_cast<uint64_t>(rows * column_passes * warps_per_row * 2 +
                                                  m * column_passes * warps_per_row * 2);
  k.global.load_sectors += static_cast<uint64_t>(rows * column_passes * warps_per_row * 2 +
                                                 m * column_passes * warps_per_row * 5);
  k.global.load_bytes +=
      static_cast<uint64_t>(rows * column_passes * warps_per_row * 32 * 16 + m * d * 4 +
                            m * column_passes * warps_per_row * 32 * 8);
  if (plus) load_stream(k, rows * d);
  store_stream(k, rows * d);
  return k;
}

// topk_kernel: a warp per row of n, k picks. Each pick scans the row once (lane l at l, l + 32,
// ...: a request per 32 positions), the scores of the previous pick and of each lane's best kept
// in registers and carried by the shuffles; lane 0 writes the pick's value and index. Rows are
// taken to start on a sector (4n bytes a multiple of 32, or n <= 32 and the row in its
// ceil(4n / 32) sectors); a hiding mask's reads are not counted (the steps modelled hide nothing).
inline KernelCounts topk(i64 rows, i64 n, i64 top) {
  KernelCounts k;
  const i64 chunks = static_cast<i64>(ceil_div(n, 32));
  i64 sectors = 0;
  for (i64 c = 0; c < chunks; ++c)
    sectors += static_cast<i64>(ceil_div(std::min<i64>(32, n - 32 * c) * 4, 32));
  k.global.load_requests += static_cast<uint64_t>(rows * top * chunks);
  k.global.load_sectors += static_cast<uint64_t>(rows * top * sectors);
  k.global.load_bytes += static_cast<uint64_t>(rows * top * n * 4);
  store_per_row(k, rows, 2 * top);
  return k;
}

// topk_backward_kernel: gx [rows, n], each element scanning its row's k indices and reading g
// where one matches (each lane at most once, so one request a warp that holds a pick). A warp
// spans 32 / n rows when n < 32, whose k indices (and gradients) fill ceil(4k / n) sectors; when
// n >= 32, one row, one sector, and it holds a pick unless all k miss its 32 columns
// (probability C(n - 32, k) / C(n, k)). With `plus`, each element also reads the waiting gradient.
inline KernelCounts topk_backward(i64 rows, i64 n, i64 top, bool plus) {
  KernelCounts k;
  const uint64_t warps = ceil_div(rows * n, 32);
  const uint64_t sectors = n >= 32 ? 1 : ceil_div(4 * top, n);
  double holds = 1;
  if (n > 32) {
    double miss = 1;
    for (i64 j = 0; j < top; ++j)
      miss *= static_cast<double>(n - 32 - j) / static_cast<double>(n - j);
    holds = 1 - std::max(miss, 0.0);
  }
  const auto holding = static_cast<uint64_t>(std::llround(holds * static_cast<double>(warps)));
  k.global.load_requests += static_cast<uint64_t>(top) * warps + holding;
  k.global.load_sectors += (static_cast<uint64_t>(top) * warps + holding) * sectors;
  k.global.load_bytes += static_cast<uint64_t>(rows * n * top * 4 + rows * top * 4);
  if (plus) load_stream(k, rows * n);
  store_stream(k, rows * n);
  return k;
}

// route_count_kernel: a block per expert reads every slot's expert (int32) once, its warps' counts
// meet in shared memory, thread 0 writes the count (int64) and the share (f32).
inline KernelCounts route_count(i64 slots, i64 pool) {
  KernelCounts k;
  for (i64 e = 0; e < pool; ++e) load_stream(k, slots);
  // Lane 0 of each of the 8 warps stores its count, thread 0 reads the 8.
  k.shared.store_requests += static_cast<uint64_t>(pool) * 8;
  k.shared.store_wavefronts += static_cast<uint64_t>(pool) * 8;
  k.shared.load_requests += static_cast<uint64_t>(pool) * 8;
  k.shared.load_wavefronts += static_cast<uint64_t>(pool) * 8;
  store_per_row(k, pool, 1, 8);
  store_per_row(k, pool, 1, 4);
  return k;
}

// route_scatter_kernel: a block per expert sums the counts before it (thread 0), then walks the
// slots 256 at a time: every slot's expert read, warp counts through shared memory, and for each
// warp holding some of the expert's m slots, three stores: the m sorted positions (contiguous),
// the m slots' positions (where the slots are), the m tokens. Which warps hold how many depends on
// the routing; this takes it uniform (each slot's expert equally likely), so the stores are an
// expectation.
inline KernelCounts route_scatter(i64 slots, i64 pool) {
  KernelCounts k;
  for (i64 e = 0; e < pool; ++e) load_stream(k, slots);
  load_per_row(k, pool * (pool - 1) / 2 + pool, 1, 8);  // the counts up to each expert's
  store_per_row(k, pool + 1, 1, 8);                     // the offsets
  // Shared, per block: the start position (written once, then read by every warp and updated by
  // thread 0 per chunk); per chunk the warps' counts, written by lane 0 and read by every warp.
  const uint64_t chunks = ceil_div(slots, 256);
  const uint64_t stores = pool * (1 + chunks * (8 + 1)), loads = pool * chunks * (8 + 8 * 8 + 1);
  k.shared.store_requests += stores;
  k.shared.store_wavefronts += stores;
  k.shared.load_requests += loads;
  k.shared.load_wavefronts += loads;
  const double q = 1.0 / static_cast<double>(pool);
  double requests = 0, sectors = 0;
  for (i64 first = 0; first < slots; first += 32) {  // the warps, each of its active lanes
    const auto lanes = static_cast<double>(std::min<i64>(32, slots - first));
    const double holds = 1 - std::pow(1 - q, lanes);
    requests += 3 * holds;
    sectors += 2 * (holds + (lanes * q - holds) / 8);  // sorted slots and tokens
    sectors += std::ceil(lanes / 8) * (1 - std::pow(1 - q, std::min(8.0, lanes)));  // positions
  }
  k.global.store_requests +=
      static_cast<uint64_t>(std::llround(requests * static_cast<double>(pool)));
  k.global.store_sectors +=
      static_cast<uint64_t>(std::llround(sectors * static_cast<double>(pool)));
  k.global.store_bytes += static_cast<uint64_t>(slots * 12);
  return k;
}

// gather_sum_rows_kernel: dx [tokens, d], each element reading its token's k positions (the same
// for a warp) and the k rows' elements at them; with `plus`, the waiting gradient's too.
inline KernelCounts gather_sum_rows(i64 tokens, i64 top, i64 d, bool plus) {
  KernelCounts k;
  for (i64 j = 0; j < top; ++j) {
    load_broadcast(k, tokens * d);
    load_stream(k, tokens * d);
  }
  if (plus) load_stream(k, tokens * d);
  store_stream(k, tokens * d);
  return k;
}

// combine_slots_kernel: y [tokens, d], each element reading, for each of its token's k slots, the
// slot's position and gate (the same for a warp: d a multiple of 32) and the expert row's element;
// a product and a sum per slot.
inline KernelCounts combine_slots(i64 tokens, i64 top, i64 d) {
  KernelCounts k;
  for (i64 j = 0; j < top; ++j) {
    load_broadcast(k, tokens * d);  // the position
    load_broadcast(k, tokens * d);  // the gate
    load_stream(k, tokens * d);     // the expert row's element
  }
  store_stream(k, tokens * d);
  k.arithmetic.f32_flops = static_cast<uint64_t>(2 * top * tokens * d);
  return k;
}

// combine_slots_backward_kernel: a warp per slot (d a multiple of 32): its position and gate (one
// value each), its token's row of g and the expert's row (d / 32 requests each, 4 sectors a
// request), the row of d_y_sorted written, lane 0's store of the gate's gradient.
inline KernelCounts combine_slots_backward(i64 tokens, i64 top, i64 d) {
  KernelCounts k;
  const i64 slots = tokens * top;
  load_broadcast(k, slots * 32);  // positions[s]
  load_broadcast(k, slots * 32);  // gates[s]
  store_stream(k, slots * d);     // d_y_sorted
  k.global.load_requests += static_cast<uint64_t>(2 * slots * d / 32);
  k.global.load_sectors += static_cast<uint64_t>(2 * slots * d / 8);
  k.global.load_bytes += static_cast<uint64_t>(2 * slots * d * 4);
  store_per_row(k, slots, 1);  // d_gates
  // A product per element of d_y_sorted; per gate, a product and a sum per column and the
  // butterfly's five sums on every lane.
  k.arithmetic.f32_flops = static_cast<uint64_t>(3 * slots * d + slots * 5 * 32);
  return k;
}

// balance_loss_kernel: one block of 256; each thread sums its expert's column over the tokens
// (a warp reads 32 consecutive entries of a row a step), multiplies twice and stores its product
// in shared memory, which thread 0 reads back one at a time; the shares read once; one store.
inline KernelCounts balance_loss(i64 tokens, i64 pool) {
  KernelCounts k;
  k.global.load_requests += static_cast<uint64_t>(tokens) * ceil_div(pool, 32);
  k.global.load_sectors += row_pass_sectors(tokens, pool);
  k.global.load_bytes += static_cast<uint64_t>(tokens * pool * 4);
  load_stream(k, pool);
  k.shared.store_requests += ceil_div(pool, 32);
  k.shared.store_wavefronts += ceil_div(pool, 32);
  k.shared.load_requests += static_cast<uint64_t>(pool);
  k.shared.load_wavefronts += static_cast<uint64_t>(pool);
  store_per_row(k, 1, 1);
  k.arithmetic.f32_flops = static_cast<uint64_t>(tokens * pool + 3 * pool + 1);
  return k;
}

// balance_loss_backward_kernel: a thread per probability, reading g (one value) and its expert's
// share (a row of shares repeated down the tokens); three products.
inline KernelCounts balance_loss_backward(i64 tokens, i64 pool) {
  KernelCounts k;
  load_broadcast(k, tokens * pool);
  load_periodic(k, tokens * pool, pool);
  store_stream(k, tokens * pool);
  k.arithmetic.f32_flops = static_cast<uint64_t>(3 * tokens * pool);
  return k;
}

// The number of (query, key) pairs causal attention visits: B H T (T + 1) / 2.
inline i64 causal_pairs(i64 batch_heads, i64 time) { return batch_heads * time * (time + 1) / 2; }

// warp_dot over hd: ceil(hd / 32) requests of 32 consecutive floats; its arithmetic, counted per
// lane: a multiply and an add per element, five shuffle-reduction adds on every lane.
inline uint64_t dot_flops(i64 hd) { return static_cast<uint64_t>(2 * hd + 5 * 32); }

// Over the B H rows of a head, sum over i of ceil((i + 1) / 32): the 32-wide passes of a block's
// threads over a row's i + 1 scores.
inline uint64_t score_passes(i64 batch_heads, i64 time) {
  uint64_t passes = 0;
  for (i64 i = 0; i < time; ++i) passes += ceil_div(i + 1, 32);
  return passes * static_cast<uint64_t>(batch_heads);
}
// block_sum in double over the 4 warps of an attention block, per row: five shuffle adds and
// three partial adds on each of 128 threads.
inline constexpr uint64_t kBlockSumFlops = 128 * (5 + 3);

// attention_forward_kernel: a block of 128 per query row (rows = B H T); for each key j <= i a warp
// dots q with k_j, then the row's softmax in shared memory, then threads over hd sum p_j v_j.
inline KernelCounts attention_forward(i64 batch_heads, i64 time, i64 hd) {
  KernelCounts k;
  const i64 rows = batch_heads * time, pairs = causal_pairs(batch_heads, time);
  const uint64_t chunks = ceil_div(hd, 32);
  load_stream(k, rows * hd);                     // q rows
  k.global.load_requests += 2 * pairs * chunks;  // k_j and v_j rows
  k.global.load_sectors += 2 * pairs * ceil_div(hd * 4, 32);
  k.global.load_bytes += static_cast<uint64_t>(2 * pairs * hd * 4);
  store_stream(k, rows * hd);                              // out
  k.global.store_requests += static_cast<uint64_t>(rows);  // lse, one float a row
  k.global.store_sectors += static_cast<uint64_t>(rows);
  k.global.store_bytes += static_cast<uint64_t>(rows * 4);
  // Shared, per row: the q row stored and read per key chunk; p_j stored by lane 0, then read and
  // written in two 32-wide passes (exp, normalise), then read by every hd warp; the max and sum
  // partials (4 stores, 16 broadcast loads each). One wavefront a request throughout.
  const uint64_t passes = score_passes(batch_heads, time);
  const uint64_t stores = rows * chunks + pairs + 2 * passes + 8 * rows;
  const uint64_t loads = 2 * pairs * chunks + 2 * passes + 32 * rows;
  k.shared.store_requests += stores;
  k.shared.store_wavefronts += stores;
  k.shared.load_requests += loads;
  k.shared.load_wavefronts += loads;
  // Per pair: the dot, its scale on 32 lanes, exp's subtraction, the normalising product and
  // p_j v_j's multiply-add over hd; exp once, the sum of exps in double. Per row: block_sum, and
  // the log of the sum.
  k.arithmetic.f32_flops += static_cast<uint64_t>(pairs) * (dot_flops(hd) + 32 + 2 + 2 * hd);
  k.arithmetic.f64_flops += static_cast<uint64_t>(pairs) + rows * kBlockSumFlops;
  k.arithmetic.special_functions += static_cast<uint64_t>(pairs + rows);
  return k;
}

// attention_backward_query_kernel: per query row, for each key j <= i, q.k_j and g.v_j, then
// dq = sum_j ds_j k_j over hd.
inline KernelCounts attention_backward_query(i64 batch_heads, i64 time, i64 hd) {
  KernelCounts k;
  const i64 rows = batch_heads * time, pairs = causal_pairs(batch_heads, time);
  const uint64_t chunks = ceil_div(hd, 32);
  load_stream(k, 2 * rows * hd);                 // q and g rows
  k.global.load_requests += 3 * pairs * chunks;  // k_j, v_j for the dots, k_j for dq
  k.global.load_sectors += 3 * pairs * ceil_div(hd * 4, 32);
  k.global.load_bytes += static_cast<uint64_t>(3 * pairs * hd * 4);
  store_stream(k, rows * hd);                              // dq
  k.global.store_requests += static_cast<uint64_t>(rows);  // delta
  k.global.store_sectors += static_cast<uint64_t>(rows);
  k.global.store_bytes += static_cast<uint64_t>(rows * 4);
  // Shared, per row: q and g rows stored; p_j and dp_j stored by lane 0; the delta pass (p, dp
  // read), the ds pass (p, dp read, dp written); dp read by every hd warp; q and g read per key
  // chunk; the sum partials.
  const uint64_t passes = score_passes(batch_heads, time);
  const uint64_t stores = 2 * rows * chunks + 2 * pairs + passes + 4 * rows;
  const uint64_t loads = 3 * pairs * chunks + 4 * passes + 16 * rows;
  k.shared.store_requests += stores;
  k.shared.store_wavefronts += stores;
  k.shared.load_requests += loads;
  k.shared.load_wavefronts += loads;
  k.arithmetic.f32_flops += static_cast<uint64_t>(pairs) * (2 * dot_flops(hd) + 2 + 3 + 2 * hd);
  k.arithmetic.f64_flops += 2 * static_cast<uint64_t>(pairs) + rows * kBlockSumFlops;
  k.arithmetic.special_functions += static_cast<uint64_t>(pairs);
  return k;
}

// attention_backward_key_kernel: per key row of a kv head and each query head of its group, for
// each query i >= j, q_i.k and g_i.v, then dv = sum_i p_i g_i and dk = sum_i ds_i q_i over hd.
inline KernelCounts attention_backward_key(i64 batch_heads, i64 kv_rows, i64 time, i64 hd) {
  KernelCounts k;
  const i64 pairs = causal_pairs(batch_heads, time);
  const uint64_t chunks = ceil_div(hd, 32);
  load_stream(k, 2 * kv_rows * hd);  // k and v rows
  k.global.load_requests += 4 * pairs * chunks + 2 * static_cast<uint64_t>(pairs);
  k.global.load_sectors += 4 * pairs * ceil_div(hd * 4, 32) + 2 * static_cast<uint64_t>(pairs);
  k.global.load_bytes += static_cast<uint64_t>(4 * pairs * hd * 4 + 2 * pairs * 4);
  const i64 group_rows = batch_heads * time;  // dk and dv written once per group member
  store_stream(k, 2 * group_rows * hd);
  load_stream(k, 2 * (group_rows - kv_rows) * hd);  // and read back after the first member
  // Shared: k and v rows stored; per pair p_i and ds_i stored by lane 0, the rows read per chunk
  // by the dots, p_i and ds_i read by every hd warp.
  k.shared.load_requests += 4 * pairs * chunks;
  k.shared.load_wavefronts += 4 * pairs * chunks;
  k.shared.store_requests += 2 * static_cast<uint64_t>(pairs) + 2 * kv_rows * chunks;
  k.shared.store_wavefronts += 2 * static_cast<uint64_t>(pairs) + 2 * kv_rows * chunks;
  // Per pair: two dots, p and ds, dv and dk's multiply-adds; dk and dv added to after the first
  // member of the group.
  k.arithmetic.f32_flops += static_cast<uint64_t>(pairs) * (2 * dot_flops(hd) + 2 + 3 + 4 * hd) +
                            static_cast<uint64_t>(2 * (group_rows - kv_rows) * hd);
  k.arithmetic.special_functions += static_cast<uint64_t>(pairs);
  return k;
}

// adamw_segments_kernel over a span of n arena elements (every element in a segment): param,
// grad, both moments read; param and both moments written; the clip factor read once by each of
// its threads.
inline KernelCounts adamw_segments(i64 n) {
  KernelCounts k;
  for (int s = 0; s < 4; ++s) load_stream(k, n);
  for (int s = 0; s < 3; ++s) store_stream(k, n);
  const i64 blocks = std::min<i64>((n + 255) / 256, i64{65535} * 32);
  load_broadcast(k, blocks * 256);
  for (int field = 0; field < 3; ++field) load_broadcast(k, n);  // the element's step scalars
  return k;
}

// adamw_prepare_kernel: a warp per parameter with a gradient, whose lane 0 alone reads the fields
// of its entry (the first gate's index only when it has gates: the compiler loads it in the
// loop), each gate's pointer and the two offsets it points at, its step count (and
// writes it) and the two bias corrections of its step, and writes three fields of its scalars:
// every access its own request and sector. `gates`: each parameter's number of gates.
inline KernelCounts adamw_prepare(const std::vector<i64>& gates) {
  KernelCounts k;
  for (const i64 g : gates) {
    load_per_row(k, 1, (g > 0 ? 3 : 2) + 1);  // the entry, the step count
    load_per_row(k, 1, 3 * g + 1, 8);         // the gates, bias1
    load_per_row(k, 1, 1);                    // bias2_sqrt
    store_per_row(k, 1, 1 + 3);
  }
  return k;
}

// optim.cu's block_tree_sum in each of `blocks` blocks of 256: the 256 doubles stored, then 8
// halvings, `width` threads loading two and storing one (a double a lane: 2 words).
inline void block_tree_sum(KernelCounts& k, uint64_t blocks) {
  k.shared.store_requests += blocks * 8;
  k.shared.store_wavefronts += blocks * 16;
  for (int width = 128; width > 0; width /= 2) {
    const uint64_t warps = ceil_div(width, 32);
    const uint64_t wavefronts = ceil_div(2 * std::min(width, 32), 32);
    k.shared.load_requests += blocks * warps * 2;
    k.shared.load_wavefronts += blocks * warps * 2 * wavefronts;
    k.shared.store_requests += blocks * warps;
    k.shared.store_wavefronts += blocks * warps * wavefronts;
  }
}
// clip_factor_kernel (256 blocks of 256 over n, a tree in shared doubles): each block's partial,
// then the last block's sum of the 256 partials with the same tree, the norm (a double) and the
// factor stored.
inline KernelCounts clip_factor(i64 n) {
  KernelCounts k;
  load_stream(k, n);
  block_tree_sum(k, 256);
  store_per_row(k, 256, 1, 8);  // each block's partial
  last_to_finish(k, 256, 256, 1);
  load_stream(k, 256, 8);
  block_tree_sum(k, 1);
  store_per_row(k, 1, 1, 8);
  store_per_row(k, 1, 1, 4);
  return k;
}

// ---- flash attention (bf16), counted ----

// The kernels of flash attention (kernels/flash_attention.cu) forward and backward for `groups`
// (batch, kv head) groups of `group_heads` query heads each, at T tokens and head width hd. Their
// tiling has no formula here: the emulation runs one group (zeros in, which change no count) and
// its counts are taken `groups` times, one launch each, as every block of a launch owns a tile of
// one group and the groups ask the same. (attention_estimate checks the tensor FLOPs against the
// tiling.) Called outside a counted interval.
struct FlashCounts {
  std::map<std::string, KernelCounts> forward, backward;
};
inline FlashCounts flash_attention_counts(i64 group_heads, i64 T, i64 hd) {
  using rex::Shape, rex::Tensor;
  const rex::Device gpu = rex::Device::cuda();
  const Tensor q = rex::zeros(Shape{group_heads * T * hd}, gpu),
               kv = rex::zeros(Shape{T * hd}, gpu);
  const Tensor out = rex::zeros(Shape{group_heads * T * hd}, gpu),
               lse = rex::zeros(Shape{group_heads * T}, gpu),
               dq = rex::zeros(Shape{group_heads * T * hd}, gpu),
               dk = rex::zeros(Shape{T * hd}, gpu), dv = rex::zeros(Shape{T * hd}, gpu);
  const auto f = [](const Tensor& t) { return t.device_data<float>(); };
  const auto& cuda = rex::detail::cuda_backend();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  FlashCounts counts;
  begin_interval(true);
  const rex::detail::AttentionShape shape{1, group_heads, 1, T, hd};
  cuda.flash_attention(f(q), f(kv), f(kv), f(out), f(lse), shape, scale);
  counts.forward = end_interval().kernels;
  begin_interval(true);
  cuda.flash_attention_backward(f(q), f(kv), f(kv), f(out), f(lse), f(q), f(dq), f(dk), f(dv),
                                shape, scale);
  counts.backward = end_interval().kernels;
  return counts;
}

// ---- grouped expert products (kernels/grouped_gemm.cu) ----
// Blocks of 8 warps, 128 x 128 output tiles, k in tiles of 32. Row starts are taken to fall on a
// sector (widths multiples of 8 floats), and every lane of a tile load loads (clamped into range).

// load_tile<true>: 64 requests, each 2 rows of 2 floats a lane (distinct rows: 1 where the second
// is past `rows`, or both are, clamped onto row rows - 1), then 64 stores of bf16 pairs (fp32:
// float2s, rows 36 words apart) with two rows' words meeting in every bank they use: 2 wavefronts
// each, in either form.
inline void grouped_tile_k_contiguous(KernelCounts& k, i64 rows, i64 depth) {
  for (i64 q = 0; q < 64; ++q) {
    k.global.load_requests += 1;
    k.global.load_sectors +=
        static_cast<uint64_t>(2 * q + 1 < rows ? 2 : 1) * ceil_div(depth * 4, 32);
    k.global.load_bytes += 32 * 8;
  }
  k.shared.store_requests += 64;
  k.shared.store_wavefronts += 128;
}

// load_tile<false>: for each of 16 pairs of k, four warps of 32 consecutive rows (columns of the
// product), each two float loads (k and k + 1) of the in-range rows (lanes past `rows` reread
// rows - 1), then a store of 32 bf16 pairs 20 words apart (fp32: float2s 36 words apart): 4 in a
// bank, 4 wavefronts, in either form.
inline void grouped_tile_strided(KernelCounts& k, i64 rows) {
  for (i64 w = 0; w < 64; ++w) {
    const i64 first = 32 * (w % 4), distinct = first < rows ? std::min<i64>(32, rows - first) : 1;
    k.global.load_requests += 2;
    k.global.load_sectors += 2 * ceil_div(distinct * 4, 32);
    k.global.load_bytes += 2 * 32 * 4;
  }
  k.shared.store_requests += 64;
  k.shared.store_wavefronts += 256;
}

// One k tile's products. bf16: per warp, 2 k steps of 2 A and 4 B ldmatrix.x4 (conflict-free: 4
// wavefronts) and 16 mma.m16n8k16. fp32: per warp, 8 steps of 4 k, each 4 float4 requests of 8
// distinct rows and 16 of 4 distinct columns (conflict-free: 1 wavefront each), and per lane 64 x 4
// fused multiply-adds.
inline void grouped_tile_products(KernelCounts& k, bool fp32) {
  if (fp32) {
    k.shared.load_requests += 8 * 8 * 20;
    k.shared.load_wavefronts += 8 * 8 * 20;
    k.arithmetic.f32_flops += 256 * 64 * 32 * 2;
    return;
  }
  k.shared.load_requests += 8 * 12;
  k.shared.load_wavefronts += 8 * 12 * 4;
  k.arithmetic.tensor_bf16_flops += 8 * 32 * 4096;
}

// store_tile: per warp, for each of its 4 row groups of 8 and 8 column groups of 8, a request of
// the rows in range (a sector each: 4 lanes x 2 floats), if the columns are; `stores` tiles written
// and `loads` read in that pattern (SwiGLU's backward made from the tile).
inline void grouped_tile_store(KernelCounts& k, i64 rows, i64 cols, int stores = 1, int loads = 0) {
  for (i64 w = 0; w < 8; ++w)
    for (i64 group = 0; group < 4; ++group) {
      const i64 in_range = std::clamp<i64>(rows - (32 * (w / 2) + 8 * group), 0, 8);
      for (i64 j = 0; j < 8 && in_range > 0; ++j) {
        if (64 * (w % 2) + 8 * j >= cols) continue;
        k.global.store_requests += static_cast<uint64_t>(stores);
        k.global.store_sectors += static_cast<uint64_t>(stores * in_range);
        k.global.store_bytes += static_cast<uint64_t>(stores * in_range * 32);
        k.global.load_requests += static_cast<uint64_t>(loads);
        k.global.load_sectors += static_cast<uint64_t>(loads * in_range);
        k.global.load_bytes += static_cast<uint64_t>(loads * in_range * 32);
      }
    }
}

// grouped_rows_kernel, one launch: segments of `segment_rows` rows, n columns, depth k;
// `operands` (a, w) pairs summed over k (2 with sum_pairs), `outputs` splitting the columns (2 for
// gate and up); w [n, k] (transpose_w) or [k, n]. Every block's first warp finds its tile: per 32
// experts, both offsets of each (a sector per 4 lanes; the second 8 bytes on), and the finder
// lane's 3 stores of the tile; every warp reads the tile's 3 fields, in the blocks past the last
// tile too. With swiglu, a block makes both outputs of its tile and stores their SwiGLU as well.
inline KernelCounts grouped_rows(const std::vector<i64>& segment_rows, i64 n, i64 k, int operands,
                                 int outputs, bool transpose_w, bool fp32, bool swiglu = false,
                                 bool swiglu_backward = false) {
  KernelCounts one;
  const auto experts = static_cast<i64>(segment_rows.size());
  const int outputs_per_block = swiglu ? outputs : 1;
  const i64 column_tiles = static_cast<i64>(ceil_div(n, 128)) * (outputs / outputs_per_block);
  i64 total = 0;
  KernelCounts find;
  for (i64 base = 0; base < experts; base += 32) {
    const i64 lanes = std::min<i64>(32, experts - base);
    find.global.load_requests += 2;
    find.global.load_sectors +=
        ceil_div(8 * lanes, 32) + static_cast<uint64_t>((8 * lanes + 7) / 32 + 1);
    find.global.load_bytes += static_cast<uint64_t>(16 * lanes);
  }
  for (const i64 rows : segment_rows) total += rows;
  const i64 blocks = static_cast<i64>(ceil_div(total, 128)) + experts;
  for (i64 c = 0; c < column_tiles; ++c) {
    const i64 cols = std::min<i64>(128, n - 128 * (c % static_cast<i64>(ceil_div(n, 128))));
    for (const i64 rows : segment_rows)
      for (i64 first = 0; first < rows; first += 128) {
        const i64 tile_rows = std::min<i64>(128, rows - first);
        for (int output = 0; output < outputs_per_block; ++output) {
          for (int operand = 0; operand < operands; ++operand) {
            load_broadcast(one, 8 * 32, 8);  // the expert's weight pointer
            for (i64 k0 = 0; k0 < k; k0 += 32) {
              const i64 depth = std::min<i64>(32, k - k0);
              grouped_tile_k_contiguous(one, tile_rows, depth);
              if (transpose_w) {
                grouped_tile_k_contiguous(one, cols, depth);
              } else {
                grouped_tile_strided(one, cols);
              }
              grouped_tile_products(one, fp32);
            }
          }
          if (swiglu_backward) {  // gate and up read, d gate and d up written where the tile was
            grouped_tile_store(one, tile_rows, cols, 2, 2);
            one.arithmetic.f32_flops += static_cast<uint64_t>(10 * tile_rows * cols);
            one.arithmetic.special_functions += static_cast<uint64_t>(tile_rows * cols);
          } else {
            grouped_tile_store(one, tile_rows, cols);
          }
        }
        if (swiglu) {  // the activation: swiglu_kernel's arithmetic, a tile's stores
          grouped_tile_store(one, tile_rows, cols);
          one.arithmetic.f32_flops += static_cast<uint64_t>(3 * tile_rows * cols);
          one.arithmetic.special_functions += static_cast<uint64_t>(tile_rows * cols);
        }
      }
  }
  const auto every_block = static_cast<uint64_t>(blocks * column_tiles);
  one.global.load_requests += every_block * find.global.load_requests;
  one.global.load_sectors += every_block * find.global.load_sectors;
  one.global.load_bytes += every_block * find.global.load_bytes;
  one.shared.store_requests += every_block * 3, one.shared.store_wavefronts += every_block * 3;
  one.shared.load_requests += every_block * 8 * 3,
      one.shared.load_wavefronts += every_block * 8 * 3;
  return one;
}

// grouped_weights_kernel, one launch: c_p[e] [m, n] = a_p^T b over each segment's rows, `pairs`
// outputs. With the offsets read by the host (`host_rule`), an expert without rows has no output
// (its blocks read the null pointer and return); with them on the device only, every expert has
// one, zeros for an empty segment. Every warp reads its output pointer and, where there is one,
// both offsets of its expert. With accumulate, each tile is read, added to (an f32 add an element)
// and written, and an empty segment's blocks stop after the offsets.
inline KernelCounts grouped_weights(const std::vector<i64>& segment_rows, i64 m, i64 n, int pairs,
                                    bool fp32, bool host_rule, bool accumulate = false) {
  KernelCounts one;
  const i64 tiles = static_cast<i64>(ceil_div(m, 128) * ceil_div(n, 128));
  for (int pair = 0; pair < pairs; ++pair)
    for (const i64 rows : segment_rows)
      for (i64 t = 0; t < tiles; ++t) {
        load_broadcast(one, 8 * 32, 8);  // the output pointer
        if (rows == 0 && host_rule) continue;
        load_broadcast(one, 2 * 8 * 32, 8);  // the offsets
        if (rows == 0 && accumulate) continue;
        const i64 tile_rows =
            std::min<i64>(128, m - 128 * (t / static_cast<i64>(ceil_div(n, 128))));
        const i64 cols = std::min<i64>(128, n - 128 * (t % static_cast<i64>(ceil_div(n, 128))));
        for (i64 k0 = 0; k0 < rows; k0 += 32) {
          grouped_tile_strided(one, tile_rows);
          grouped_tile_strided(one, cols);
          grouped_tile_products(one, fp32);
        }
        grouped_tile_store(one, tile_rows, cols, 1, accumulate ? 1 : 0);
        if (accumulate) one.arithmetic.f32_flops += static_cast<uint64_t>(tile_rows * cols);
      }
  return one;
}

// ---- the step ----

// The counts of one training step of `config` (see the assumptions at the top), as the emulation
// would give them for the interval of one train_step call. `routing` gives, per layer, the slots
// routed to each expert of its table (what nn::LmOutput::expert_counts holds), which the grouped
// products' tiles depend on; empty, each expert gets an even share.
inline Counts training_step(const rex::train::RunConfig& config,
                            const std::vector<std::vector<i64>>& routing = {}) {
  const rex::nn::ModelConfig& m = config.model;
  const rex::nn::MoeConfig& moe = m.moe;
  REX_CHECK(m.ffn == "moe" && moe.shared_experts == 0 && moe.z_loss_coef == 0 && !moe.renormalize &&
                m.tie_embeddings && config.train.grad_clip > 0 && config.train.grad_accum == 1,
            "cost formulas: only MoE configs without shared experts, z-loss or renormalised "
            "gates, with tied embeddings, clipping and no gradient accumulation are modelled");
  REX_CHECK(m.vocab_size > 0, "cost formulas: model.vocab_size must be set");
  const i64 B = config.train.batch_size, T = m.context, D = m.d_model, H = m.n_heads,
            G = m.n_kv_heads, hd = D / H, V = m.vocab_size, L = m.n_layers;
  const i64 M = B * T, P = moe.reuse * moe.experts_per_layer, K = moe.top_k, F = moe.d_expert;
  const i64 tables = (L + moe.reuse - 1) / moe.reuse;
  REX_CHECK(hd % 32 == 0 && D % 32 == 0 && F % 32 == 0,
            "cost formulas: the head width, d_model and d_expert must be multiples of 32");
  const rex::MatmulPrecision precision = rex::parse_matmul_precision(config.train.matmul_precision);
  // In bf16, attention runs on flash_attention.cu's kernels and the experts on grouped products.
  const bool flash = precision == rex::MatmulPrecision::bf16;
  // The experts' products: grouped in bf16 (tensor cores) and fp32 (CUDA cores), per expert in
  // tf32.
  const bool fp32 = precision == rex::MatmulPrecision::fp32, grouped = flash || fp32;
  const char* grouped_rows_name = fp32 ? "grouped_rows_fp32_kernel" : "grouped_rows_kernel";
  const char* grouped_weights_name =
      fp32 ? "grouped_weights_fp32_kernel" : "grouped_weights_kernel";
  const FlashCounts flash_counts = flash ? flash_attention_counts(H / G, T, hd) : FlashCounts{};
  const i64 routed = M * K;  // rows through the experts
  Plan plan;
  auto linear = [&](i64 rows, i64 in, i64 out) { plan.gemm(rows, out, in, precision); };
  // dX accumulates (beta = 1) into the gradient waiting for X when another use sent one first.
  auto linear_backward = [&](i64 rows, i64 in, i64 out, bool accumulate_dx = false) {
    plan.gemm(in, out, rows, precision);                    // dW
    plan.gemm(rows, in, out, precision, 1, accumulate_dx);  // dX
  };
  // Every expert gets r = routed / P rows (the shapes only; their sum is exact): a product of
  // [m, k] and [k, n] per expert, `products` times, m, n or k being r.
  const i64 r = routed / P;
  auto per_expert = [&](i64 m, i64 n, i64 k, int products, bool accumulate = false) {
    plan.gemm(m, n, k, precision, static_cast<uint64_t>(P * products), accumulate);
  };
  // In bf16 the experts' products are grouped (kernels/grouped_gemm.cu), one launch each.
  auto segments = [&](i64 layer) {
    if (!routing.empty()) return routing.at(static_cast<size_t>(layer));
    return std::vector<i64>(static_cast<size_t>(P), r);
  };
  // Whether every expert that `layer` routes rows to (with the offsets on the host: the per-expert
  // products) had a gradient already, from a layer of its table that ran backward before it; with
  // the offsets on the device every expert of those layers made one.
  auto adds_into_table = [&](i64 layer) {
    if (grouped) return true;
    const i64 last = std::min(L - 1, (layer / moe.reuse + 1) * moe.reuse - 1);
    for (i64 e = 0; e < P; ++e) {
      if (segments(layer)[static_cast<size_t>(e)] == 0) continue;
      bool had = false;
      for (i64 later = layer + 1; later <= last; ++later)
        had = had || segments(later)[static_cast<size_t>(e)] > 0;
      if (!had) return false;
    }
    return true;
  };
  auto add = [&](i64 n) { plan.launch("binary_flat_kernel", elementwise(n, 2, 0)); };
  // (The token ids came from the host, which checked them there: no check kernel, no read-back.)
  auto gather = [&](i64 rows, i64 d) { plan.launch("gather_rows_kernel", gather_rows(rows, d)); };
  auto rms_norm = [&](i64 rows) {
    KernelCounts k = row_kernel(rows, D, 3, 1, 1);           // x twice, w once; y written
    k.global.store_requests += static_cast<uint64_t>(rows);  // rstd
    k.global.store_sectors += static_cast<uint64_t>(rows);
    k.global.store_bytes += static_cast<uint64_t>(rows * 4);
    plan.launch("rms_norm_kernel", k);
  };
  // A residual add and the norm after it: a and b read, the sum written and read again with w.
  auto add_rms_norm = [&](i64 rows) {
    KernelCounts k = row_kernel(rows, D, 4, 2, 1);
    store_per_row(k, rows, 1);  // rstd
    plan.launch("add_rms_norm_kernel", k);
  };
  // One launch for dx, dw's chunk partials, and their sum by the last block of each tile of
  // columns. With `plus`, dx is added to the gradient waiting for x (read once).
  auto rms_norm_backward = [&](i64 rows, bool plus) {
    KernelCounts dx = row_kernel(rows, D, plus ? 7 : 6, 1, 1);  // g, w, x twice each
    // rstd[r], read by every thread of the row's block: a request and a sector a warp.
    load_per_row(dx, rows, row_threads(D) / 32, 4 * 32);
    plan.launch("rms_norm_backward_kernel", dx);
    const i64 rows_per_chunk = std::max<i64>(16, (rows * D + (1 << 18) - 1) / (1 << 18));
    const i64 chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    const i64 tiles = (D + row_threads(D) - 1) / row_threads(D);
    KernelCounts dw;  // per chunk and column, the chunk's rows of g and x, rstd broadcast
    load_stream(dw, 2 * rows * D);
    load_broadcast(dw, rows * D);
    store_stream(dw, chunks * D, 8);
    last_to_finish(dw, chunks * tiles, row_threads(D), tiles);
    load_stream(dw, chunks * D, 8);  // the finishing blocks' sums
    store_stream(dw, D);
    plan.also("rms_norm_backward_kernel", dw);
  };
  // RoPE of the projections' heads, time first (forward), or of their gradients.
  auto rope = [&](i64 heads) {
    plan.launch("rope_kernel", cost_formulas::rope(B, heads, T, hd / 2, true));
  };

  // Forward. The batch's tokens and targets go up (uploads are staged through pinned memory and
  // make the host wait for nothing: kernels/memory.cu); the embedding rows are gathered.
  gather(M, D);
  // Each residual add is made with the norm after it (add_rms_norm); the embedding's norm alone.
  rms_norm(M);
  for (i64 layer = 0; layer < L; ++layer) {
    // Attention: q, k, v projections, RoPE on q and k into one tensor (rope_qk; its tables cached
    // on the device), the kernel on the heads time first (no permute; q and k packed), the output
    // projection, the residual and the MoE's norm.
    linear(M, D, D);
    linear(M, D, G * hd);
    rope(H + G);
    linear(M, D, G * hd);
    if (flash) {
      for (const auto& [kernel, one] : flash_counts.forward)
        plan.launch_over_groups(kernel, one, static_cast<uint64_t>(B * G));
    } else {
      plan.launch("attention_forward_kernel", attention_forward(B * H, T, hd));
    }
    linear(M, D, D);
    add_rms_norm(M);
    // MoE: the router and its softmax, top-k, the routing plan on the device (nothing read
    // back), the gather into expert order, the experts, the gated combine back to the tokens.
    linear(M, D, P);
    KernelCounts softmax = row_kernel(M, P, 3, 1, 2);
    // Per element: exp twice (sum, output), the sum's subtraction and double add, the output's
    // subtraction and product; per row, the double reduction's shuffle adds.
    softmax.arithmetic.special_functions = static_cast<uint64_t>(2 * M * P);
    softmax.arithmetic.f32_flops = static_cast<uint64_t>(3 * M * P);
    softmax.arithmetic.f64_flops = static_cast<uint64_t>(M * (P + 5 * row_threads(P)));
    // The softmax and its top-k, one kernel: softmax_kernel's work, then topk_kernel's.
    plan.launch("softmax_topk_kernel", softmax);
    plan.also("softmax_topk_kernel", topk(M, P, K));
    plan.launch("route_count_kernel", route_count(routed, P));
    plan.launch("route_scatter_kernel", route_scatter(routed, P));
    if (!grouped) plan.read_back();  // per-expert GEMMs need the counts on the host
    plan.launch("gather_rows_kernel", gather_rows(routed, D));  // into expert order
    if (grouped) {
      plan.launch(grouped_rows_name, grouped_rows(segments(layer), F, D, 1, 2, true, fp32, true));
      plan.launch(grouped_rows_name, grouped_rows(segments(layer), D, F, 1, 1, true, fp32));
    } else {
      per_expert(r, F, D, 2);  // gate and up
      plan.launch("swiglu_kernel", elementwise(routed * F, 2, 0));
      per_expert(r, D, F, 1);  // down
    }
    plan.launch("combine_slots_kernel", combine_slots(M, K, D));  // back to the tokens, gated
    // The balance loss (with the routing plan's shares), one kernel. The residual, with the next
    // norm (the last layer's: the head's).
    plan.launch("balance_loss_kernel", balance_loss(M, P));
    add_rms_norm(M);
  }
  // The head: logits, cross-entropy (its bad-target flag and count read back), the total loss;
  // the train step reads both losses back in one copy.
  linear(M, D, V);
  KernelCounts rows_kernel = row_kernel(M, V, 2, 0, 2);  // max, then sum of exps
  load_per_row(rows_kernel, M, row_threads(V) / 32);     // the target, by every warp
  load_per_row(rows_kernel, M, 1);                       // the target's logit
  store_per_row(rows_kernel, M, 2, 8);                   // lse and the row's loss
  rows_kernel.arithmetic.special_functions = static_cast<uint64_t>(M * (V + 1));
  // Then its last block over the rows' losses (double) and targets.
  last_to_finish(rows_kernel, M, row_threads(V), 1);
  load_stream(rows_kernel, M, 8);
  load_stream(rows_kernel, M);
  block_reduce(rows_kernel, 1, row_threads(V));
  block_reduce(rows_kernel, 1, row_threads(V));
  store_per_row(rows_kernel, 1, 1, 4);  // the loss
  store_per_row(rows_kernel, 1, 1, 8);  // the count
  plan.launch("cross_entropy_kernel", rows_kernel);
  // (the targets came from the host, which checked and counted them: nothing is read back)
  // The layers' balance losses and the language-model loss added in one pass (sum_of_with_prefix:
  // the balance losses' sum written on the way), kSumTermsPerLaunch terms a launch, each launch
  // after the first starting from the sum so far; the partial sum's store in the launch that
  // passes it.
  for (i64 done = 0; done < L + 1;) {
    const i64 terms = std::min<i64>(rex::detail::kSumTermsPerLaunch - (done > 0), L + 1 - done);
    KernelCounts sum = elementwise(1, static_cast<int>(terms + (done > 0)), 0);
    if (L > 1 && done < L && L <= done + terms) store_per_row(sum, 1, 1);
    plan.launch("sum_of_kernel", sum);
    done += terms;
  }

  // Backward. The loss's gradient, then each layer's balance loss back to its probabilities.
  plan.launch("fill32_kernel", elementwise(1, 0, 0));
  for (i64 layer = 0; layer < L; ++layer) {
    plan.launch("balance_loss_backward_kernel", balance_loss_backward(M, P));
  }
  KernelCounts ce_backward = row_kernel(M, V, 1, 1, 0);
  load_per_row(ce_backward, M, 3 * (row_threads(V) / 32));  // target, g and lse by every warp
  ce_backward.arithmetic.special_functions = static_cast<uint64_t>(M * V);
  plan.launch("cross_entropy_backward_kernel", ce_backward);
  linear_backward(M, D, V);
  rms_norm_backward(M, false);
  // Where gradients meet, the last use's kernel adds the waiting one (rex/autograd/engine.hpp): the
  // probabilities' (top-k after the balance loss), the MoE input's (the dispatch after the
  // router), the residual stream's (each norm after its residual add), the attention input's (k's
  // and q's products after v's, beta = 1).
  for (i64 layer = L - 1; layer >= 0; --layer) {
    // The gated combine (the experts' rows and the gates), top-k and softmax back to the router.
    plan.launch("combine_slots_backward_kernel", combine_slots_backward(M, K, D));
    plan.launch("topk_backward_kernel", topk_backward(M, P, K, true));
    plan.launch("softmax_backward_kernel", row_kernel(M, P, 4, 1, 1));
    linear_backward(M, D, P);
    // The experts back (the forward's activation kept): the down, SwiGLU's (grouped: inside the
    // product back through down) and the gate and up products' backward. From the second layer of
    // a table on, each expert's three weight gradients are added to the table's: by the products
    // themselves when every expert they make one for has one already (grouped_swiglu_grads), else
    // by add_pairs launches.
    const bool first_of_table = layer % moe.reuse == moe.reuse - 1 || layer == L - 1;
    const bool accumulate = !first_of_table && adds_into_table(layer);
    if (grouped) {
      plan.launch(grouped_weights_name,
                  grouped_weights(segments(layer), D, F, 1, fp32, false, accumulate));
      plan.launch(grouped_rows_name,
                  grouped_rows(segments(layer), F, D, 1, 1, false, fp32, false, true));
      plan.launch(grouped_weights_name,
                  grouped_weights(segments(layer), F, D, 2, fp32, false, accumulate));
      plan.launch(grouped_rows_name, grouped_rows(segments(layer), D, F, 2, 1, false, fp32));
    } else {
      per_expert(r, F, D, 1);                                        // down: dx = dy W
      per_expert(D, F, r, 1, accumulate);                            // down: dW = dy^T a
      KernelCounts swiglu_backward = elementwise(routed * F, 3, 0);  // a, b, g in; da out
      store_stream(swiglu_backward, routed * F);                     // and db
      plan.launch("swiglu_backward_kernel", swiglu_backward);
      per_expert(r, D, F, 2);              // gate and up: dx = dg Wg + du Wu
      per_expert(F, D, r, 2, accumulate);  // gate and up: dW = dg^T x, du^T x
    }
    if (!first_of_table && !accumulate) {  // in add_pairs launches
      const i64 pairs = 3 * P, per_launch = rex::detail::kAddPairsPerLaunch;
      for (i64 done = 0; done < pairs; done += per_launch)
        plan.launch("add_pairs_kernel",
                    elementwise(F * D * std::min(per_launch, pairs - done), 2, 0));
    }
    // The gather into expert order, back: each token's k rows summed in sorted order.
    plan.launch("gather_sum_rows_kernel", gather_sum_rows(M, K, D, true));
    rms_norm_backward(M, true);
    // Attention back.
    linear_backward(M, D, D);
    if (flash) {
      for (const auto& [kernel, one] : flash_counts.backward)
        plan.launch_over_groups(kernel, one, static_cast<uint64_t>(B * G));
    } else {
      plan.launch("attention_backward_query_kernel", attention_backward_query(B * H, T, hd));
      plan.launch("attention_backward_key_kernel", attention_backward_key(B * H, B * G * T, T, hd));
    }
    linear_backward(M, D, G * hd);  // dv
    rope(H + G);                    // dq and dk, rotated back and apart
    linear_backward(M, D, G * hd, true);
    linear_backward(M, D, D, true);
    rms_norm_backward(M, true);
  }
  // The embedding's rows back (a scatter-add planned on the host from the token ids' host copy,
  // its plan uploaded), added by the same launch into the tied head's gradient. The step's losses
  // stay on the device.
  plan.launch("scatter_add_rows_kernel", scatter_add_rows(V, M, D, true));

  // The optimiser over its arena (every parameter has a gradient here, and every size is a
  // multiple of 16 floats, so the arena has no padding): the sum of squares of the whole gradient
  // buffer and the clip factor on the device, where the norm stays (queue_step); AdamW, one
  // adamw_prepare launch (which experts' gated gradients are real, the step counts) and a launch
  // per kAdamWSegmentsPerLaunch parameters, each over its parameters' span; zero_grad's fill of
  // the gradient buffer. Nothing is read back: the routing counts wait for read_steps.
  std::vector<i64> parameters = {V * D, D};  // embedding (tied head), final norm
  for (i64 layer = 0; layer < L; ++layer)
    for (const i64 n : {D, D * D, G * hd * D, G * hd * D, D * D, D, P * D}) parameters.push_back(n);
  std::vector<i64> gates(parameters.size(), 0);  // an expert's: a gate per layer of its table
  for (i64 table = 0; table < tables; ++table)
    for (i64 e = 0; e < P * 3; ++e) {
      parameters.push_back(F * D);
      gates.push_back(grouped ? std::min(moe.reuse, L - table * moe.reuse) : 0);
    }
  const i64 arena = std::accumulate(parameters.begin(), parameters.end(), i64{0});
  plan.launch("clip_factor_kernel", clip_factor(arena));
  plan.launch("adamw_prepare_kernel", adamw_prepare(gates));
  const auto per_launch = static_cast<size_t>(rex::detail::kAdamWSegmentsPerLaunch);
  for (size_t first = 0; first < parameters.size(); first += per_launch) {
    const size_t last = std::min(parameters.size(), first + per_launch);
    plan.launch("adamw_segments_kernel",
                adamw_segments(std::accumulate(
                    parameters.begin() + static_cast<std::ptrdiff_t>(first),
                    parameters.begin() + static_cast<std::ptrdiff_t>(last), i64{0})));
  }
  plan.launch("fill32_kernel", elementwise(arena, 0, 0));
  return plan.counts;
}

}  // namespace cuda_emulation::cost_formulas
