// Tensor-core instructions for rex's kernels: ldmatrix and mma.sync as inline PTX under nvcc, and
// the CUDA emulation's versions (tests/cuda_emulation/tensor_cores.cpp) in the emulated build,
// which checks their use and computes the same results. Included by kernel files after common.cuh.
//
// Fragment layouts (PTX ISA, "Warp-level matrix load instruction: ldmatrix" and "Matrix fragments
// for mma.m16n8k16 / mma.m16n8k8"). Lane l of the warp; g = l / 4 (groupID), t = l % 4
// (threadID_in_group). A 32-bit register holding two 16-bit elements holds the first (lower column,
// or lower k) in bits 0-15.
//
// ldmatrix.sync.aligned.m8n8.x{N}.shared.b16, N = 1, 2, 4: N 8x8 matrices of 16-bit elements, each
// row 16 contiguous bytes, 16-byte aligned, in shared memory. Lane 8 i + r supplies the address of
// row r of matrix i; the addresses of lanes >= 8 N are ignored.
//   plain:  lane l receives in out[i] the elements (row g, columns 2t, 2t+1) of matrix i
//   .trans: lane l receives in out[i] the elements (rows 2t, 2t+1, column g) of matrix i (rows and
//           columns as stored): the fragment of the transposed matrix
//
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, D = A B + C, A 16x16, B 16x8, C and D 16x8:
//   a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]    a[2] = A[g][2t+8..2t+9]
//   a[3] = A[g+8][2t+8..2t+9]
//   b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..2t+9][g]
//   acc[0..1] = C[g][2t..2t+1]    acc[2..3] = C[g+8][2t..2t+1]   (D replaces C in place)
// So an ldmatrix.x4 of A's four 8x8 quadrants (matrices: rows 0-7/cols 0-7, rows 8-15/cols 0-7,
// rows 0-7/cols 8-15, rows 8-15/cols 8-15) gives a[0..3]; an ldmatrix.x2.trans of B stored k-major
// (B[k][n] rows of 8 n) gives b[0..1], and an ldmatrix.x2 of B stored n-major (B^T rows) too.
//
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, A 16x8, B 8x8, one tf32 per register:
//   a[0] = A[g][t]   a[1] = A[g+8][t]   a[2] = A[g][t+4]   a[3] = A[g+8][t+4]
//   b[0] = B[t][g]   b[1] = B[t+4][g]
//   acc as above.
// A tf32 register is an fp32 bit pattern of which the tensor core uses the sign, the exponent and
// the top 10 mantissa bits; to_tf32 (cvt.rna.tf32.f32) rounds a float to that, ties away from zero.
//
// Every instruction is .aligned: all 32 lanes of the warp must execute it together, at the same
// place, with the warp converged (never inside a branch some lanes skip). The emulation fails the
// launch otherwise, and on an ldmatrix row address that is misaligned or not in shared memory.
// The emulated mma sums in double and rounds once; real tensor cores round differently inside
// (tensor_cores.cpp gives the bound), so tests of kernels that use mma compare with a tolerance.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace rex::cuda::detail {

#if defined(__CUDACC__)

template <int N>
__device__ inline void load_matrices(uint32_t (&out)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const auto address = static_cast<unsigned int>(__cvta_generic_to_shared(row));
  if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(out[0])
                 : "r"(address)
                 : "memory");
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(out[0]), "=r"(out[1])
                 : "r"(address)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(out[0]), "=r"(out[1]), "=r"(out[2]), "=r"(out[3])
                 : "r"(address)
                 : "memory");
  }
}

template <int N>
__device__ inline void load_matrices_transposed(uint32_t (&out)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const auto address = static_cast<unsigned int>(__cvta_generic_to_shared(row));
  if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(out[0])
                 : "r"(address)
                 : "memory");
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(out[0]), "=r"(out[1])
                 : "r"(address)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(out[0]), "=r"(out[1]), "=r"(out[2]), "=r"(out[3])
                 : "r"(address)
                 : "memory");
  }
}

__device__ inline void mma_bf16_16x8x16(float (&acc)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ inline void mma_tf32_16x8x8(float (&acc)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ inline uint32_t pack_bf16x2(float low, float high) {
  uint32_t packed;
  // cvt.rn.bf16x2.f32 d, a, b puts a in the upper half and b in the lower.
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(packed) : "f"(high), "f"(low));
  return packed;
}

__device__ inline uint32_t to_tf32(float x) {
  uint32_t rounded;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(rounded) : "f"(x));
  return rounded;
}

#else  // the CUDA emulation: the same functions, plus the caller's position for its messages

template <int N>
__device__ inline void load_matrices(uint32_t (&out)[N], const void* row,
                                     const char* file = __builtin_FILE(),
                                     unsigned int line = __builtin_LINE()) {
  ::cuda_emulation::detail::ldmatrix<N>(out, row, false, {file, line});
}

template <int N>
__device__ inline void load_matrices_transposed(uint32_t (&out)[N], const void* row,
                                                const char* file = __builtin_FILE(),
                                                unsigned int line = __builtin_LINE()) {
  ::cuda_emulation::detail::ldmatrix<N>(out, row, true, {file, line});
}

__device__ inline void mma_bf16_16x8x16(float (&acc)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[2], const char* file = __builtin_FILE(),
                                        unsigned int line = __builtin_LINE()) {
  ::cuda_emulation::detail::mma(::cuda_emulation::detail::WarpOp::mma_bf16_m16n8k16, acc, a, b,
                                {file, line});
}

__device__ inline void mma_tf32_16x8x8(float (&acc)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2], const char* file = __builtin_FILE(),
                                       unsigned int line = __builtin_LINE()) {
  ::cuda_emulation::detail::mma(::cuda_emulation::detail::WarpOp::mma_tf32_m16n8k8, acc, a, b,
                                {file, line});
}

__device__ inline uint32_t pack_bf16x2(float low, float high) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(low))) |
         static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(high))) << 16;
}

// cvt.rna.tf32.f32: round to 10 mantissa bits, to nearest, ties away from zero (add half of the
// 13 dropped bits' place to the magnitude, then drop them); a NaN stays a NaN; the result's low 13
// bits are zero.
__device__ inline uint32_t to_tf32(float x) {
  const uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0)
    return (bits | 0x00400000u) & 0xFFFFE000u;
  return (bits + 0x1000u) & 0xFFFFE000u;
}

#endif

}  // namespace rex::cuda::detail
