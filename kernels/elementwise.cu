// Elementwise kernels: unary ops and their backward, binary ops and select with broadcasting,
// broadcast_copy, sum_to, the fused swiglu, add_pairs (many gradient additions in one launch) and
// sum_of (a chain of additions in one pass).
//
// Every kernel is a grid-stride loop with one thread per output element (blocks_for(n) blocks of
// kThreads), so consecutive threads touch consecutive elements and reads and writes coalesce.
// Inside the kernel, with_unary_op / with_binary_op turn the op code into a template argument
// once per thread, outside the loop, so each op's loop is compiled on its own with no
// per-element switch (the dispatch runs on the device because with_* is __host__ __device__ and
// would reject a host-side launch in its callback). Broadcast launches first classify each input:
// one that reads the output's elements in order (contiguous, full size) or a single element (all
// strides 0) is read at i * step with step 1 or 0; only when some input is neither does the kernel
// decompose the output index into coordinates (the general strided path). sum_to gives each output
// element one thread that adds its summed inputs in float in the row-major order of x, exactly the
// order of the CPU loop, so results are deterministic (and equal to the CPU's bit for bit).
#include <algorithm>

#include "common.cuh"

namespace rex::cuda::detail {
namespace {

using rex::detail::BinaryOp;
using rex::detail::CudaBroadcast;
using rex::detail::kMaxCudaRank;
using rex::detail::UnaryOp;

int64_t numel_of(const CudaBroadcast& index) {
  int64_t n = 1;
  for (int a = 0; a < index.rank; ++a) n *= index.dims[a];
  return n;
}

// 1 when input k reads the output's elements in order (contiguous and full size), 0 when it is
// one element (every stride 0), -1 when it needs the general strided index.
int flat_step(const CudaBroadcast& index, int k) {
  bool full = true, single = true;
  int64_t expected = 1;
  for (int a = index.rank - 1; a >= 0; --a) {
    if (index.dims[a] == 1) continue;
    const int64_t stride = index.strides[k][a];
    full = full && stride == expected;
    single = single && stride == 0;
    expected *= index.dims[a];
  }
  return full ? 1 : (single ? 0 : -1);
}

// The element offsets of the first N inputs that line up with output element o.
template <int N>
struct Offsets {
  int64_t at[N];
};

template <int N>
__device__ inline Offsets<N> offsets_of(const CudaBroadcast& index, int64_t o) {
  Offsets<N> result{};
  for (int a = index.rank - 1; a >= 0; --a) {
    const int64_t coord = o % index.dims[a];
    o /= index.dims[a];
    for (int k = 0; k < N; ++k) result.at[k] += coord * index.strides[k][a];
  }
  return result;
}

__global__ void unary_kernel(UnaryOp op, float s, const float* x, float* y, int64_t n) {
  rex::detail::with_unary_op(op, [&](auto tag) {
    for (int64_t i = thread_index(); i < n; i += thread_count())
      y[i] = rex::detail::unary_value<tag()>(x[i], s);
  });
}

__global__ void unary_backward_kernel(UnaryOp op, float s, const float* g, const float* saved,
                                      float* dx, int64_t n) {
  rex::detail::with_unary_op(op, [&](auto tag) {
    for (int64_t i = thread_index(); i < n; i += thread_count())
      dx[i] = g[i] * rex::detail::unary_slope<tag()>(saved[i], s);
  });
}

void unary(UnaryOp op, float s, const float* x, float* y, int64_t n) {
  if (n == 0) return;
  REX_LAUNCH(unary_kernel, blocks_for(n), kThreads, 0, op, s, x, y, n);
}

void unary_backward(UnaryOp op, float s, const float* g, const float* saved, float* dx, int64_t n) {
  if (n == 0) return;
  REX_LAUNCH(unary_backward_kernel, blocks_for(n), kThreads, 0, op, s, g, saved, dx, n);
}

// Inputs read at i * step (step 1: in order, step 0: one element).
__global__ void binary_flat_kernel(BinaryOp op, const float* a, int64_t a_step, const float* b,
                                   int64_t b_step, float* out, int64_t n) {
  rex::detail::with_binary_op(op, [&](auto tag) {
    for (int64_t i = thread_index(); i < n; i += thread_count())
      out[i] = rex::detail::binary_value<tag()>(a[i * a_step], b[i * b_step]);
  });
}

__global__ void binary_strided_kernel(BinaryOp op, const float* a, const float* b, float* out,
                                      CudaBroadcast index, int64_t n) {
  rex::detail::with_binary_op(op, [&](auto tag) {
    for (int64_t i = thread_index(); i < n; i += thread_count()) {
      const Offsets<2> at = offsets_of<2>(index, i);
      out[i] = rex::detail::binary_value<tag()>(a[at.at[0]], b[at.at[1]]);
    }
  });
}

void binary(BinaryOp op, const float* a, const float* b, float* out, const CudaBroadcast& index) {
  const int64_t n = numel_of(index);
  if (n == 0) return;
  const int a_step = flat_step(index, 0), b_step = flat_step(index, 1);
  if (a_step >= 0 && b_step >= 0) {
    REX_LAUNCH(binary_flat_kernel, blocks_for(n), kThreads, 0, op, a, a_step, b, b_step, out, n);
  } else {
    REX_LAUNCH(binary_strided_kernel, blocks_for(n), kThreads, 0, op, a, b, out, index, n);
  }
}

struct SumTerms {
  const float* term[rex::detail::kSumTermsPerLaunch];
  int count;
  int prefix_at;  // the term after whose add the sum goes to prefix_out (-1: none)
};

__global__ void sum_of_kernel(SumTerms terms, float* out, int64_t n, float* prefix_out) {
  for (int64_t i = thread_index(); i < n; i += thread_count()) {
    float sum = terms.term[0][i];
    for (int j = 1; j < terms.count; ++j) {
      sum = __fadd_rn(sum, terms.term[j][i]);
      if (j == terms.prefix_at) prefix_out[i] = sum;
    }
    out[i] = sum;
  }
}

// kSumTermsPerLaunch terms a launch; each launch after the first starts from the sum so far (out,
// read and written element by element in place), so the adds stay in order.
void sum_of(const float* const* host_terms, int64_t count, float* out, int64_t n, float* prefix_out,
            int64_t prefix) {
  if (n == 0) return;
  for (int64_t done = 0; done < count;) {
    SumTerms terms{};
    terms.prefix_at = -1;
    if (done > 0) terms.term[terms.count++] = out;
    while (terms.count < rex::detail::kSumTermsPerLaunch && done < count) {
      if (prefix_out && done + 1 == prefix) terms.prefix_at = terms.count;
      terms.term[terms.count++] = host_terms[done++];
    }
    REX_LAUNCH(sum_of_kernel, blocks_for(n), kThreads, 0, terms, out, n, prefix_out);
  }
}

struct AddPairTable {
  rex::detail::AddPair pairs[rex::detail::kAddPairsPerLaunch];
};
static_assert(sizeof(AddPairTable) + 64 <= 4096, "add_pairs_kernel's arguments are too large");

// Pair blockIdx.y of the table, grid-stride over its elements as binary_flat_kernel.
__global__ void add_pairs_kernel(AddPairTable table) {
  const rex::detail::AddPair& pair = table.pairs[blockIdx.y];
  for (int64_t i = thread_index(); i < pair.n; i += thread_count())
    pair.acc[i] = rex::detail::binary_value<BinaryOp::add>(pair.acc[i], pair.g[i]);
}

void add_pairs(const rex::detail::AddPair* host_pairs, int64_t count) {
  for (int64_t done = 0; done < count; done += rex::detail::kAddPairsPerLaunch) {
    const auto pairs = std::min<int64_t>(count - done, rex::detail::kAddPairsPerLaunch);
    AddPairTable table{};
    int64_t longest = 0;
    for (int64_t j = 0; j < pairs; ++j) {
      table.pairs[j] = host_pairs[done + j];
      longest = std::max(longest, table.pairs[j].n);
    }
    if (longest == 0) continue;
    const dim3 grid(blocks_for(longest), static_cast<unsigned int>(pairs));
    REX_LAUNCH(add_pairs_kernel, grid, kThreads, 0, table);
  }
}

template <class Cond>
__global__ void select_flat_kernel(const Cond* cond, int64_t cond_step, const float* a,
                                   int64_t a_step, const float* b, int64_t b_step, float* out,
                                   int64_t n) {
  for (int64_t i = thread_index(); i < n; i += thread_count())
    out[i] = cond[i * cond_step] != Cond{0} ? a[i * a_step] : b[i * b_step];
}

template <class Cond>
__global__ void select_strided_kernel(const Cond* cond, const float* a, const float* b, float* out,
                                      CudaBroadcast index, int64_t n) {
  for (int64_t i = thread_index(); i < n; i += thread_count()) {
    const Offsets<3> at = offsets_of<3>(index, i);
    out[i] = cond[at.at[0]] != Cond{0} ? a[at.at[1]] : b[at.at[2]];
  }
}

template <class Cond>
void launch_select(const Cond* cond, const float* a, const float* b, float* out,
                   const CudaBroadcast& index, int64_t n) {
  const int cond_step = flat_step(index, 0), a_step = flat_step(index, 1),
            b_step = flat_step(index, 2);
  if (cond_step >= 0 && a_step >= 0 && b_step >= 0) {
    REX_LAUNCH(select_flat_kernel<Cond>, blocks_for(n), kThreads, 0, cond, cond_step, a, a_step, b,
               b_step, out, n);
  } else {
    REX_LAUNCH(select_strided_kernel<Cond>, blocks_for(n), kThreads, 0, cond, a, b, out, index, n);
  }
}

void select(const void* cond, bool cond_is_i32, const float* a, const float* b, float* out,
            const CudaBroadcast& index) {
  const int64_t n = numel_of(index);
  if (n == 0) return;
  if (cond_is_i32) {
    launch_select(static_cast<const int32_t*>(cond), a, b, out, index, n);
  } else {
    launch_select(static_cast<const float*>(cond), a, b, out, index, n);
  }
}

__global__ void broadcast_copy_flat_kernel(const float* x, int64_t x_step, float* out, int64_t n) {
  for (int64_t i = thread_index(); i < n; i += thread_count()) out[i] = x[i * x_step];
}

__global__ void broadcast_copy_strided_kernel(const float* x, float* out, CudaBroadcast index,
                                              int64_t n) {
  for (int64_t i = thread_index(); i < n; i += thread_count())
    out[i] = x[offsets_of<1>(index, i).at[0]];
}

void broadcast_copy(const float* x, float* out, const CudaBroadcast& index) {
  const int64_t n = numel_of(index);
  if (n == 0) return;
  const int x_step = flat_step(index, 0);
  if (x_step >= 0) {
    REX_LAUNCH(broadcast_copy_flat_kernel, blocks_for(n), kThreads, 0, x, x_step, out, n);
  } else {
    REX_LAUNCH(broadcast_copy_strided_kernel, blocks_for(n), kThreads, 0, x, out, index, n);
  }
}

// sum_to's axes of x (extent 1 dropped) in x's order: `kept` ones that index the output (out
// coordinate (o / out_stride) % dim) and `summed` ones walked by an odometer; x_stride is the
// row-major stride of x along each.
struct SumToPlan {
  int32_t kept = 0, summed = 0;
  int64_t kept_dim[kMaxCudaRank] = {}, kept_out_stride[kMaxCudaRank] = {},
          kept_x_stride[kMaxCudaRank] = {};
  int64_t summed_dim[kMaxCudaRank] = {}, summed_x_stride[kMaxCudaRank] = {};
  int64_t summed_count = 1;  // elements of x summed into each output element
};

__global__ void sum_to_kernel(const float* x, float* out, int64_t out_numel, SumToPlan plan) {
  for (int64_t o = thread_index(); o < out_numel; o += thread_count()) {
    int64_t at = 0;
    for (int a = 0; a < plan.kept; ++a)
      at += (o / plan.kept_out_stride[a]) % plan.kept_dim[a] * plan.kept_x_stride[a];
    int64_t coord[kMaxCudaRank] = {};
    float total = 0.0f;
    for (int64_t t = 0; t < plan.summed_count; ++t) {
      total += x[at];
      // Advance the odometer over the summed axes, innermost first.
      for (int a = plan.summed - 1; a >= 0; --a) {
        at += plan.summed_x_stride[a];
        if (++coord[a] < plan.summed_dim[a]) break;
        at -= plan.summed_x_stride[a] * plan.summed_dim[a];
        coord[a] = 0;
      }
    }
    out[o] = total;
  }
}

void sum_to(const float* x, float* out, int64_t out_numel, const CudaBroadcast& index) {
  if (out_numel == 0) return;
  SumToPlan plan;
  int64_t x_stride = 1;
  int64_t x_strides[kMaxCudaRank] = {};
  for (int a = index.rank - 1; a >= 0; --a) {
    x_strides[a] = x_stride;
    x_stride *= index.dims[a];
  }
  for (int a = 0; a < index.rank; ++a) {
    if (index.dims[a] == 1) continue;
    if (index.strides[0][a] == 0) {
      plan.summed_dim[plan.summed] = index.dims[a];
      plan.summed_x_stride[plan.summed] = x_strides[a];
      plan.summed_count *= index.dims[a];
      ++plan.summed;
    } else {
      plan.kept_dim[plan.kept] = index.dims[a];
      plan.kept_out_stride[plan.kept] = index.strides[0][a];
      plan.kept_x_stride[plan.kept] = x_strides[a];
      ++plan.kept;
    }
  }
  REX_LAUNCH(sum_to_kernel, blocks_for(out_numel), kThreads, 0, x, out, out_numel, plan);
}

__global__ void swiglu_kernel(const float* a, const float* b, float* y, int64_t n) {
  for (int64_t i = thread_index(); i < n; i += thread_count()) {
    y[i] = rex::detail::swiglu_value(a[i], b[i]);
  }
}

__global__ void swiglu_backward_kernel(const float* a, const float* b, const float* g, float* da,
                                       float* db, int64_t n) {
  for (int64_t i = thread_index(); i < n; i += thread_count()) {
    const float av = a[i], gv = g[i];
    const float s = rex::detail::sigmoid_of(av);
    if (da != nullptr) da[i] = rex::detail::swiglu_grad_a(gv, av, b[i], s);
    if (db != nullptr) db[i] = rex::detail::swiglu_grad_b(gv, av, s);
  }
}

void swiglu(const float* a, const float* b, float* y, int64_t n) {
  if (n == 0) return;
  REX_LAUNCH(swiglu_kernel, blocks_for(n), kThreads, 0, a, b, y, n);
}

void swiglu_backward(const float* a, const float* b, const float* g, float* da, float* db,
                     int64_t n) {
  if (n == 0 || (da == nullptr && db == nullptr)) return;
  REX_LAUNCH(swiglu_backward_kernel, blocks_for(n), kThreads, 0, a, b, g, da, db, n);
}

}  // namespace

void register_elementwise(rex::detail::CudaBackend& table) {
  table.unary = unary;
  table.unary_backward = unary_backward;
  table.binary = binary;
  table.add_pairs = add_pairs;
  table.sum_of = sum_of;
  table.select = select;
  table.broadcast_copy = broadcast_copy;
  table.sum_to = sum_to;
  table.swiglu = swiglu;
  table.swiglu_backward = swiglu_backward;
}

}  // namespace rex::cuda::detail
