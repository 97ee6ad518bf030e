// GEMM through cuBLAS: row-major, optionally transposed and accumulating, strided-batched products
// with the semantics of rex::detail::gemm.
//
// cuBLAS is column-major. A row-major [r, c] buffer read column-major is its transpose [c, r], so
// the row-major product C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T:
// B is passed first, A second, and each keeps its own transpose flag. One cuBLAS handle is created
// on first use and bound to rex's stream; a mutex serialises its use (it also carries the math
// mode). The precision (rex/core/precision.hpp): in tf32 the handle's math mode is
// CUBLAS_TF32_TENSOR_OP_MATH (cuBLAS rounds the inputs); in bf16 one kernel writes bf16 copies of
// a and b (rounded to nearest even, as the CPU rounds them) and cublasGemmStridedBatchedEx
// multiplies them on the tensor cores with an fp32 C and fp32 sums. cuBLAS GEMMs are deterministic
// on one stream (no atomics mode is set). With k == 0 the product is empty: C is zero-filled unless
// accumulating, without calling cuBLAS.
#include <atomic>
#include <climits>
#include <mutex>

#include <cuda_bf16.h>

#include "common.cuh"

namespace rex::cuda::detail {
namespace {

std::atomic<MatmulPrecision> precision{MatmulPrecision::fp32};

struct Cublas {
  std::mutex mutex;
  cublasHandle_t handle = nullptr;
};

// Never destroyed: a static destructor could run after the CUDA runtime has shut down.
Cublas& cublas() {
  static Cublas* instance = [] {
    auto* created = new Cublas();
    REX_CUBLAS(cublasCreate(&created->handle));
    REX_CUBLAS(cublasSetStream(created->handle, stream()));
    return created;
  }();
  return *instance;
}

void set_matmul_precision(MatmulPrecision chosen) { precision = chosen; }

// a16 = a and b16 = b rounded to bf16 (na and nb elements): both operands of a product in one
// launch, a thread per element of the two in turn.
__global__ void round_to_bf16_kernel(const float* a, __nv_bfloat16* a16, int64_t na, const float* b,
                                     __nv_bfloat16* b16, int64_t nb) {
  for (int64_t i = thread_index(); i < na + nb; i += thread_count()) {
    if (i < na) {
      a16[i] = __float2bfloat16_rn(a[i]);
    } else {
      b16[i - na] = __float2bfloat16_rn(b[i - na]);
    }
  }
}

// The elements `batch` matrices of `size` floats, `stride` apart, span from the first.
int64_t span_of(int64_t size, int64_t batch, int64_t stride) {
  return stride == 0 ? size : (batch - 1) * stride + size;
}

// bf16 copies of a product's operands (na and nb floats), each in its own scratch buffer (so each
// starts aligned, as cuBLAS's tensor-core paths want).
class Bf16Operands {
 public:
  Bf16Operands(const float* a, int64_t na, const float* b, int64_t nb)
      : a_(static_cast<size_t>(na) * sizeof(__nv_bfloat16)),
        b_(static_cast<size_t>(nb) * sizeof(__nv_bfloat16)) {
    REX_LAUNCH(round_to_bf16_kernel, blocks_for(na + nb), kThreads, 0, a, this->a(), na, b,
               this->b(), nb);
  }
  __nv_bfloat16* a() const { return a_.as<__nv_bfloat16>(); }
  __nv_bfloat16* b() const { return b_.as<__nv_bfloat16>(); }

 private:
  Scratch a_, b_;
};

int checked_int(const char* what, int64_t value) {
  REX_CHECK(value >= 0 && value <= INT_MAX, "gemm: ", what, " = ", value,
            " does not fit cuBLAS's 32-bit sizes");
  return static_cast<int>(value);
}

void gemm(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k,
          bool transpose_a, bool transpose_b, bool accumulate, int64_t batch, int64_t stride_a,
          int64_t stride_b, int64_t stride_c) {
  if (m == 0 || n == 0 || batch == 0) return;
  if (k == 0) {
    if (accumulate) return;
    const size_t width = static_cast<size_t>(m * n) * sizeof(float);
    for (int64_t i = 0; i < batch; ++i)  // an empty product: rare, so one memset per matrix
      REX_CUDA(cudaMemsetAsync(c + i * stride_c, 0, width, stream()));
    return;
  }
  const int rows_a = checked_int("m", m), cols_b = checked_int("n", n);
  const int inner = checked_int("k", k), count = checked_int("batch", batch);
  // Leading dimensions of the row-major buffers: their row lengths.
  const int ld_a = transpose_a ? rows_a : inner;
  const int ld_b = transpose_b ? inner : cols_b;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const MatmulPrecision chosen = precision;
  const cublasOperation_t op_a = transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  Cublas& blas = cublas();
  if (chosen == MatmulPrecision::bf16) {
    const Bf16Operands bf16(a, span_of(m * k, batch, stride_a), b, span_of(k * n, batch, stride_b));
    const std::lock_guard<std::mutex> lock(blas.mutex);
    REX_CUBLAS(cublasSetMathMode(blas.handle, CUBLAS_DEFAULT_MATH));
    REX_CUBLAS(cublasGemmStridedBatchedEx(
        blas.handle, op_b, op_a, cols_b, rows_a, inner, &alpha, bf16.b(), CUDA_R_16BF, ld_b,
        stride_b, bf16.a(), CUDA_R_16BF, ld_a, stride_a, &beta, c, CUDA_R_32F, cols_b, stride_c,
        count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return;
  }
  const std::lock_guard<std::mutex> lock(blas.mutex);
  REX_CUBLAS(cublasSetMathMode(blas.handle, chosen == MatmulPrecision::tf32
                                                ? CUBLAS_TF32_TENSOR_OP_MATH
                                                : CUBLAS_DEFAULT_MATH));
  REX_CUBLAS(cublasSgemmStridedBatched(blas.handle, op_b, op_a, cols_b, rows_a, inner, &alpha, b,
                                       ld_b, stride_b, a, ld_a, stride_a, &beta, c, cols_b,
                                       stride_c, count));
}

}  // namespace

void register_gemm(rex::detail::CudaBackend& table) {
  table.gemm = gemm;
  table.set_matmul_precision = set_matmul_precision;
}

}  // namespace rex::cuda::detail
