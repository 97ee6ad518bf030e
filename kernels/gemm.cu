// GEMM through cuBLAS: row-major, optionally transposed and accumulating, strided-batched products
// with the semantics of rex::detail::gemm.
//
// cuBLAS is column-major. A row-major [r, c] buffer read column-major is its transpose [c, r], so
// the row-major product C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T:
// B is passed first, A second, and each keeps its own transpose flag. One cuBLAS handle is created
// on first use and bound to rex's stream; a mutex serialises its use (it also carries the math
// mode). TF32 is a math mode of the handle: CUBLAS_TF32_TENSOR_OP_MATH when enabled, the default
// (full fp32) otherwise. cuBLAS GEMMs are deterministic on one stream (no atomics mode is set).
// With k == 0 the product is empty: C is zero-filled unless accumulating, without calling cuBLAS.
#include <atomic>
#include <climits>
#include <mutex>

#include "common.cuh"

namespace rex::cuda::detail {
namespace {

std::atomic<bool> tf32_enabled{false};

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

void set_tf32(bool enabled) { tf32_enabled = enabled; }

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
  Cublas& blas = cublas();
  const std::lock_guard<std::mutex> lock(blas.mutex);
  REX_CUBLAS(cublasSetMathMode(blas.handle,
                               tf32_enabled ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  REX_CUBLAS(cublasSgemmStridedBatched(blas.handle, transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                       transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, cols_b, rows_a,
                                       inner, &alpha, b, ld_b, stride_b, a, ld_a, stride_a, &beta,
                                       c, cols_b, stride_c, count));
}

}  // namespace

void register_gemm(rex::detail::CudaBackend& table) {
  table.gemm = gemm;
  table.set_tf32 = set_tf32;
}

}  // namespace rex::cuda::detail
