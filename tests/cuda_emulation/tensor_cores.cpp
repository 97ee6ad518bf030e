// The tensor-core instructions of the emulation: ldmatrix (m8n8, x1/x2/x4, plain and .trans, b16)
// and mma.sync (m16n8k16 bf16 and m16n8k8 tf32, f32 accumulators), as the PTX ISA defines them.
//
// A kernel reaches them through kernels/mma.cuh, which calls the inline functions of
// include/cuda_runtime.h: there each lane makes its own part (ldmatrix: the alignment and
// shared-memory checks below, then its 16-byte row read in the kernel's instrumented code, so that
// checks.cpp and the counters see it as that lane's shared load), then joins a full-warp collective
// (execution.cpp), whose last lane calls tensor_core_results with every lane's operands.
//
// ldmatrix: matrix i is the 8 rows supplied by lanes 8i..8i+7 (row r by lane 8i+r), each 8
// 16-bit elements, the lower address in the lower bits. Lane l receives in register i the elements
// (row l/4, columns 2(l%4) and 2(l%4)+1) of matrix i, or with .trans (rows 2(l%4) and 2(l%4)+1,
// column l/4); the first in bits 0-15.
//
// mma: the last lane rebuilds A, B and C from every lane's fragments (g = lane/4, t = lane%4):
//   m16n8k16 bf16: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
//                  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g] (lower k in bits 0-15)
//   m16n8k8 tf32:  a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4];
//                  b0 = B[t][g], b1 = B[t+4][g]
//   both:          c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
// A tf32 operand is the top 19 bits of its register (sign, 8 exponent and 10 mantissa bits); the
// low 13 are ignored, as the hardware ignores them (kernels round with cvt.rna.tf32.f32 first:
// to_tf32 in mma.cuh). D = A B + C is computed with exact products (a bf16 or tf32 product fits a
// double), summed in double in k order with C last, and rounded once to float.
//
// Rounding differs from the hardware's: a tensor core aligns the k products and C to the largest
// exponent, truncates the aligned terms to a fixed width (not IEEE round-to-nearest) and normalises
// once or a few times. Both results are within a few units of the last fp32 place of the largest
// term; a test of a kernel that uses mma therefore compares with a tolerance of about
// (k + 2) x 2^-23 x (sum over k of |a b| + |c|) per element of each mma, not with equality. With
// small-integer operands (exact in bf16 and tf32, and sums below 2^24) both give the exact result.
//
// Each mma counts 2 m n k FLOPs (4096 bf16, 2048 tf32) for the running kernel in an interval that
// counts kernel work (counters.cpp).
#include <cstring>

#include "emulator.hpp"

namespace cuda_emulation::detail {
namespace {

const char* ldmatrix_name(int matrices, bool transposed) {
  if (transposed)
    return matrices == 1   ? "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16"
           : matrices == 2 ? "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16"
                           : "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16";
  return matrices == 1   ? "ldmatrix.sync.aligned.m8n8.x1.shared.b16"
         : matrices == 2 ? "ldmatrix.sync.aligned.m8n8.x2.shared.b16"
                         : "ldmatrix.sync.aligned.m8n8.x4.shared.b16";
}

std::string site_text(const Site& site) {
  const char* slash = std::strrchr(site.file, '/');
  return std::string(slash ? slash + 1 : site.file) + ":" + std::to_string(site.line);
}

// Element (r, c) of an ldmatrix matrix whose rows lanes[8 i ..] supplied.
uint32_t matrix_element(TensorLane* const (&lanes)[32], int matrix, int r, int c) {
  const uint32_t word = lanes[8 * matrix + r]->row[c / 2];
  return c % 2 == 0 ? word & 0xFFFFu : word >> 16;
}

float bf16_value(uint32_t bits16) { return std::bit_cast<float>(bits16 << 16); }
float tf32_value(uint32_t bits) { return std::bit_cast<float>(bits & 0xFFFFE000u); }

template <int K>
void multiply(TensorLane* const (&lanes)[32], bool bf16) {
  double a[16][K], b[K][8];
  float c[16][8];
  for (int l = 0; l < 32; ++l) {
    const TensorLane& x = *lanes[l];
    const int g = l / 4, t = l % 4;
    if (bf16) {
      for (int h = 0; h < 2; ++h) {
        const int shift = 16 * h;
        a[g][2 * t + h] = bf16_value(x.a[0] >> shift & 0xFFFFu);
        a[g + 8][2 * t + h] = bf16_value(x.a[1] >> shift & 0xFFFFu);
        a[g][2 * t + 8 + h] = bf16_value(x.a[2] >> shift & 0xFFFFu);
        a[g + 8][2 * t + 8 + h] = bf16_value(x.a[3] >> shift & 0xFFFFu);
        b[2 * t + h][g] = bf16_value(x.b[0] >> shift & 0xFFFFu);
        b[2 * t + 8 + h][g] = bf16_value(x.b[1] >> shift & 0xFFFFu);
      }
    } else {
      a[g][t] = tf32_value(x.a[0]);
      a[g + 8][t] = tf32_value(x.a[1]);
      a[g][t + 4] = tf32_value(x.a[2]);
      a[g + 8][t + 4] = tf32_value(x.a[3]);
      b[t][g] = tf32_value(x.b[0]);
      b[t + 4][g] = tf32_value(x.b[1]);
    }
    for (int h = 0; h < 2; ++h) {
      c[g][2 * t + h] = x.acc[h];
      c[g + 8][2 * t + h] = x.acc[2 + h];
    }
  }
  float d[16][8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double sum = 0;
      for (int k = 0; k < K; ++k) sum += a[i][k] * b[k][j];
      d[i][j] = static_cast<float>(sum + static_cast<double>(c[i][j]));
    }
  for (int l = 0; l < 32; ++l) {
    TensorLane& x = *lanes[l];
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h) {
      x.acc[h] = d[g][2 * t + h];
      x.acc[2 + h] = d[g + 8][2 * t + h];
    }
  }
}

}  // namespace

void check_ldmatrix_row(const void* row, int matrices, bool transposed, Site site) {
  const auto address = reinterpret_cast<uintptr_t>(row);
  const FastPath& f = fast_path;
  const int lane = current_thread() % 32;
  const auto describe = [&](const std::string& what) {
    return std::string(ldmatrix_name(matrices, transposed)) + " at " + site_text(site) +
           ": the row address " + hex(address) + " of lane " + std::to_string(lane) + " " + what;
  };
  if (address % 16 != 0)
    kernel_fault(cudaErrorMisalignedAddress,
                 [&] { return describe("is not 16-byte aligned (each row is 16 aligned bytes)"); });
  const bool shared = (address >= f.static_shared_begin && address < f.static_shared_end) ||
                      (address >= f.dynamic_shared_begin && address < f.dynamic_shared_end);
  if (!shared)
    kernel_fault(cudaErrorIllegalAddress, [&] {
      const bool device = address >= f.device_begin && address < f.device_end;
      return describe(std::string("is not in shared memory (ldmatrix reads __shared__ or dynamic "
                                  "shared memory only") +
                      (device ? "; it is a global-memory address)" : ")"));
    });
}

void tensor_core_results(WarpOp op, TensorLane* const (&lanes)[32]) {
  int matrices = 0;
  bool transposed = false;
  switch (op) {
    case WarpOp::ldmatrix_x1:
    case WarpOp::ldmatrix_x2:
    case WarpOp::ldmatrix_x4:
      matrices = op == WarpOp::ldmatrix_x1 ? 1 : op == WarpOp::ldmatrix_x2 ? 2 : 4;
      break;
    case WarpOp::ldmatrix_trans_x1:
    case WarpOp::ldmatrix_trans_x2:
    case WarpOp::ldmatrix_trans_x4:
      matrices = op == WarpOp::ldmatrix_trans_x1 ? 1 : op == WarpOp::ldmatrix_trans_x2 ? 2 : 4;
      transposed = true;
      break;
    case WarpOp::mma_bf16_m16n8k16:
      multiply<16>(lanes, true);
      count_tensor_flops(true, 2 * 16 * 8 * 16);
      return;
    case WarpOp::mma_tf32_m16n8k8:
      multiply<8>(lanes, false);
      count_tensor_flops(false, 2 * 16 * 8 * 8);
      return;
    default:
      return;
  }
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < matrices; ++i) {
      const int r = l / 4, c = 2 * (l % 4);
      lanes[l]->out[i] =
          transposed ? matrix_element(lanes, i, c, r) | matrix_element(lanes, i, c + 1, r) << 16
                     : matrix_element(lanes, i, r, c) | matrix_element(lanes, i, r, c + 1) << 16;
    }
}

}  // namespace cuda_emulation::detail
