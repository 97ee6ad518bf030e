// The emulated cuBLAS GEMM: cublasSgemm, cublasSgemmStridedBatched, cublasGemmEx and
// cublasGemmStridedBatchedEx (bf16 A and B, fp32 C, CUBLAS_COMPUTE_32F; or fp32 throughout) on the
// emulated device.
//
// Column-major, as cuBLAS: op(A) is m x k, op(B) is k x n, C is m x n with leading dimension ldc.
// The arguments are validated in cuBLAS's order (a null handle, then negative sizes, then leading
// dimensions too small for their matrices, then a negative batch count), and every operand's
// extent in every batch must lie in live device memory. The product is the reference one: each
// element of op(A) op(B) is summed over k in double, in increasing k, then C = alpha * sum +
// beta * C in double, rounded once to float; with beta == 0 C is only written (it may hold NaN),
// as cuBLAS promises. In the TF32 math mode both inputs are first rounded to TF32 (8 exponent
// bits, 10 mantissa bits, to nearest even), which is what the tensor cores read. cublasGemmEx's
// bf16 inputs are widened exactly (a bf16 is the top half of a float) and go through the same loop;
// a GPU's bf16 GEMM sums on tensor cores, which round differently (tensor_cores.cpp), so tests of
// its callers compare with a tolerance.
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "emulator.hpp"
#include "include/cublas_v2.h"

struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasMath_t mode = CUBLAS_DEFAULT_MATH;
};

namespace cuda_emulation::detail {
namespace {

std::mutex& status_mutex() {
  static std::mutex m;
  return m;
}
std::string& execution_failure_text() {
  static std::string text = "the GPU program failed to execute";
  return text;
}

cublasStatus_t execution_failed(const std::string& why) {
  const std::lock_guard<std::mutex> lock(status_mutex());
  execution_failure_text() = "the GPU program failed to execute [rex CUDA emulation: " + why + "]";
  return CUBLAS_STATUS_EXECUTION_FAILED;
}

float to_tf32(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t bits = 0;
  std::memcpy(&bits, &x, 4);
  const uint32_t dropped = bits & 0x1FFFu, kept = bits & ~0x1FFFu;
  const uint32_t half = 0x1000u, lowest_kept = (bits >> 13) & 1u;
  bits = kept + ((dropped > half || (dropped == half && lowest_kept)) ? 0x2000u : 0u);
  std::memcpy(&x, &bits, 4);
  return x;
}

// The elements of an operand with `rows` x `cols` stored column-major at leading dimension ld,
// for `batch` matrices `stride` apart, must all be device memory.
template <class T>
std::string check_operand(const char* name, const T* p, int64_t rows, int64_t cols, int64_t ld,
                          int64_t stride, int64_t batch) {
  if (rows == 0 || cols == 0) return {};
  const int64_t span = (cols - 1) * ld + rows;
  for (int64_t b = 0; b < batch; ++b) {
    const auto address = reinterpret_cast<uintptr_t>(p + b * stride);
    const std::string problem = check_device_range(address, static_cast<size_t>(span) * sizeof(T));
    if (!problem.empty())
      return std::string("operand ") + name + " of batch " + std::to_string(b) + ": " + problem;
  }
  return {};
}

// A bf16 element (the top 16 bits of a float).
struct Bf16 {
  uint16_t bits;
};

double element(float x, bool tf32) { return static_cast<double>(tf32 ? to_tf32(x) : x); }
double element(Bf16 x, bool) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f = 0;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The validated GEMM of every entry point, on A and B of element type T (float or Bf16) and a
// float C; `call` names the entry point in failure messages.
template <class T>
cublasStatus_t gemm(const char* call, cublasHandle_t handle, cublasOperation_t transa,
                    cublasOperation_t transb, int m, int n, int k, const float* alpha, const T* A,
                    int lda, long long int strideA, const T* B, int ldb, long long int strideB,
                    const float* beta, float* C, int ldc, long long int strideC, int batchCount) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  const auto valid_op = [](cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T; };
  if (!valid_op(transa) || !valid_op(transb) || m < 0 || n < 0 || k < 0 || batchCount < 0 ||
      alpha == nullptr || beta == nullptr)
    return CUBLAS_STATUS_INVALID_VALUE;
  const bool ta = transa == CUBLAS_OP_T, tb = transb == CUBLAS_OP_T;
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k;  // A as stored
  const int64_t b_rows = tb ? n : k, b_cols = tb ? k : n;
  if (lda < std::max<int64_t>(1, a_rows) || ldb < std::max<int64_t>(1, b_rows) ||
      ldc < std::max(1, m))
    return CUBLAS_STATUS_INVALID_VALUE;
  constexpr bool bf16 = std::is_same_v<T, Bf16>;
  const bool tf32 = !bf16 && (handle->mode & ~CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION) ==
                                 CUBLAS_TF32_TENSOR_OP_MATH;
  const double a_scale = *alpha, b_scale = *beta;
  count_gemm({m, n, k, batchCount, ta, tb, tf32, bf16, b_scale != 0.0});
  if (m == 0 || n == 0 || batchCount == 0) return CUBLAS_STATUS_SUCCESS;
  const bool reads_ab = k > 0 && a_scale != 0.0;
  std::string problem = check_operand("C", C, m, n, ldc, strideC, batchCount);
  if (problem.empty() && reads_ab)
    problem = check_operand("A", A, a_rows, a_cols, lda, strideA, batchCount);
  if (problem.empty() && reads_ab)
    problem = check_operand("B", B, b_rows, b_cols, ldb, strideB, batchCount);
  if (!problem.empty()) return execution_failed(std::string(call) + ": " + problem);

  // op(A) row by row ([m][k]) and op(B) row by row ([k][n]) in double, so that the inner loop
  // runs over contiguous columns j of one output row and every sum still goes in increasing k.
  std::vector<double> a_rows_major(static_cast<size_t>(m) * k),
      b_rows_major(static_cast<size_t>(k) * n);
  std::vector<double> sums(static_cast<size_t>(n));
  for (int64_t batch = 0; batch < batchCount; ++batch) {
    const T* a = A + batch * strideA;
    const T* b = B + batch * strideB;
    float* c = C + batch * strideC;
    if (reads_ab) {
      for (int64_t i = 0; i < m; ++i)
        for (int64_t l = 0; l < k; ++l)
          a_rows_major[i * k + l] = element(ta ? a[l + i * lda] : a[i + l * lda], tf32);
      for (int64_t l = 0; l < k; ++l)
        for (int64_t j = 0; j < n; ++j)
          b_rows_major[l * n + j] = element(tb ? b[j + l * ldb] : b[l + j * ldb], tf32);
    }
    for (int64_t i = 0; i < m; ++i) {
      std::fill(sums.begin(), sums.end(), 0.0);
      if (reads_ab) {
        for (int64_t l = 0; l < k; ++l) {
          const double ail = a_rows_major[i * k + l];
          const double* brow = &b_rows_major[l * n];
          for (int64_t j = 0; j < n; ++j) sums[j] += ail * brow[j];
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        float& out = c[i + j * ldc];
        const double value = a_scale * sums[j] + (b_scale != 0.0 ? b_scale * out : 0.0);
        out = static_cast<float>(value);
      }
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace
}  // namespace cuda_emulation::detail

using namespace cuda_emulation::detail;

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = new cublasContext();
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (check_stream("cublasSetStream", stream) != cudaSuccess) return CUBLAS_STATUS_INVALID_VALUE;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  const int base = mode & ~CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
  if (base != CUBLAS_DEFAULT_MATH && base != CUBLAS_TENSOR_OP_MATH &&
      base != CUBLAS_PEDANTIC_MATH && base != CUBLAS_TF32_TENSOR_OP_MATH)
    return CUBLAS_STATUS_INVALID_VALUE;
  handle->mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = handle->mode;
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    default:
      return "CUBLAS_STATUS_UNKNOWN";  // the emulation returns only the five above
  }
}

const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "the library was not initialized";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_EXECUTION_FAILED: {
      const std::lock_guard<std::mutex> lock(status_mutex());
      return execution_failure_text().c_str();
    }
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "the functionality requested is not supported";
    default:
      return "an internal operation failed";
  }
}

cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t transa,
                           cublasOperation_t transb, int m, int n, int k, const float* alpha,
                           const float* A, int lda, const float* B, int ldb, const float* beta,
                           float* C, int ldc) {
  return cublasSgemmStridedBatched(handle, transa, transb, m, n, k, alpha, A, lda, 0, B, ldb, 0,
                                   beta, C, ldc, 0, 1);
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa,
                                         cublasOperation_t transb, int m, int n, int k,
                                         const float* alpha, const float* A, int lda,
                                         long long int strideA, const float* B, int ldb,
                                         long long int strideB, const float* beta, float* C,
                                         int ldc, long long int strideC, int batchCount) {
  return gemm("cublasSgemmStridedBatched", handle, transa, transb, m, n, k, alpha, A, lda, strideA,
              B, ldb, strideB, beta, C, ldc, strideC, batchCount);
}

namespace {

// The typed GEMM of cublasGemmEx and cublasGemmStridedBatchedEx.
cublasStatus_t typed_gemm(const char* call, cublasHandle_t handle, cublasOperation_t transa,
                          cublasOperation_t transb, int m, int n, int k, const void* alpha,
                          const void* A, cudaDataType_t Atype, int lda, long long int strideA,
                          const void* B, cudaDataType_t Btype, int ldb, long long int strideB,
                          const void* beta, void* C, cudaDataType_t Ctype, int ldc,
                          long long int strideC, int batchCount, cublasComputeType_t computeType) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (computeType != CUBLAS_COMPUTE_32F || Ctype != CUDA_R_32F || Atype != Btype ||
      (Atype != CUDA_R_16BF && Atype != CUDA_R_32F))
    return CUBLAS_STATUS_NOT_SUPPORTED;
  const auto* a_scale = static_cast<const float*>(alpha);
  const auto* b_scale = static_cast<const float*>(beta);
  auto* c = static_cast<float*>(C);
  if (Atype == CUDA_R_32F)
    return gemm(call, handle, transa, transb, m, n, k, a_scale, static_cast<const float*>(A), lda,
                strideA, static_cast<const float*>(B), ldb, strideB, b_scale, c, ldc, strideC,
                batchCount);
  return gemm(call, handle, transa, transb, m, n, k, a_scale, static_cast<const Bf16*>(A), lda,
              strideA, static_cast<const Bf16*>(B), ldb, strideB, b_scale, c, ldc, strideC,
              batchCount);
}

}  // namespace

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType_t Atype, int lda, const void* B,
                            cudaDataType_t Btype, int ldb, const void* beta, void* C,
                            cudaDataType_t Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t) {
  return typed_gemm("cublasGemmEx", handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B,
                    Btype, ldb, 0, beta, C, Ctype, ldc, 0, 1, computeType);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa,
                                          cublasOperation_t transb, int m, int n, int k,
                                          const void* alpha, const void* A, cudaDataType_t Atype,
                                          int lda, long long int strideA, const void* B,
                                          cudaDataType_t Btype, int ldb, long long int strideB,
                                          const void* beta, void* C, cudaDataType_t Ctype, int ldc,
                                          long long int strideC, int batchCount,
                                          cublasComputeType_t computeType, cublasGemmAlgo_t) {
  return typed_gemm("cublasGemmStridedBatchedEx", handle, transa, transb, m, n, k, alpha, A, Atype,
                    lda, strideA, B, Btype, ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount,
                    computeType);
}
