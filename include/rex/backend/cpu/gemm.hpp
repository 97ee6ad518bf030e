// CPU GEMM: Eigen's product kernel run directly on rex buffers through Eigen::Map (no copies).
// Transposed operands are expressed as .transpose() on the Map, which Eigen's GEMM reads in place.
// With OpenMP enabled (the rex::rex CMake target does this), Eigen splits large products over
// threads.
#pragma once

#include <Eigen/Core>
#include <cstdint>

namespace rex::detail {

using RowMajorMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// c[m, n] = op(a) * op(b) (+ c when accumulate), where op(a) is [m, k] and a is stored [m, k], or
// [k, m] when transpose_a; likewise b is stored [k, n], or [n, k] when transpose_b.
inline void gemm(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k,
                 bool transpose_a, bool transpose_b, bool accumulate = false) {
  Eigen::Map<const RowMajorMatrix> A(a, transpose_a ? k : m, transpose_a ? m : k);
  Eigen::Map<const RowMajorMatrix> B(b, transpose_b ? n : k, transpose_b ? k : n);
  Eigen::Map<RowMajorMatrix> C(c, m, n);
  if (!accumulate) C.setZero();
  if (!transpose_a && !transpose_b) {
    C.noalias() += A * B;
  } else if (!transpose_a) {
    C.noalias() += A * B.transpose();
  } else if (!transpose_b) {
    C.noalias() += A.transpose() * B;
  } else {
    C.noalias() += A.transpose() * B.transpose();
  }
}

}  // namespace rex::detail
