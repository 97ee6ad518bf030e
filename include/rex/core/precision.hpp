// The precision of matrix products: fp32 (the default), tf32 or bf16, one setting per device kind
// (rex::set_matmul_precision in rex/backend/cuda/runtime.hpp; train.matmul_precision).
//
// In tf32 and bf16 each matrix product rounds both of its operands, to nearest even, to 10 or 7
// stored mantissa bits, and sums the exact products in fp32: a bf16 or tf32 product has at most
// 22 significant bits and fits a float, so the only roundings are the operands' and the fp32 sum's.
// That is what tensor cores compute, and the CPU computes it the same way (rounded copies of the
// operands, then its fp32 GEMM), so a CPU run and a CUDA run still differ only in the order of the
// fp32 sums. Every product rounds: the layers' (activations and weights), the router's, the LM
// head's, the experts' and, in bf16 only, attention's (q k^T and P v, and in the backward dO v^T,
// P^T dO, dS k, dS^T q: CUDA's fp32 attention kernels have no TF32 path). Everything else stays
// fp32: softmax, RMSNorm, the losses, the gradients and the optimizer state. The backward of a
// product is two products of the same precision, the output gradient rounded like any operand; the
// gradient reaching a weight is fp32, as in PyTorch's autocast (the rounding passes the gradient
// through unchanged).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>

#include "rex/core/error.hpp"

namespace rex {

enum class MatmulPrecision : int { fp32, tf32, bf16 };

inline MatmulPrecision parse_matmul_precision(const std::string& name) {
  if (name == "fp32") return MatmulPrecision::fp32;
  if (name == "tf32") return MatmulPrecision::tf32;
  REX_CHECK(name == "bf16", "matmul precision must be \"fp32\", \"tf32\" or \"bf16\", got \"", name,
            "\"");
  return MatmulPrecision::bf16;
}

namespace detail {

// x rounded to nearest even at `dropped_bits` below its 23 stored mantissa bits: adding half a
// unit less one, plus the kept part's lowest bit, carries exactly when rounding goes up (an
// infinity stays one; past the largest rounded number the carry reaches the exponent and gives an
// infinity, as the hardware conversion does). A NaN stays a NaN, quiet, with its sign (its bits
// plus the carry could become an infinity). Branch-free, so loops over arrays vectorise.
inline float round_mantissa(float x, int dropped_bits) {
  uint32_t bits = 0;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t unit = uint32_t{1} << dropped_bits, lowest_kept = (bits >> dropped_bits) & 1u;
  const uint32_t rounded = (bits + (unit / 2 - 1) + lowest_kept) & ~(unit - 1);
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t out = nan ? ((bits | 0x00400000u) & ~(unit - 1)) : rounded;
  std::memcpy(&x, &out, sizeof out);
  return x;
}

inline float round_to_bf16(float x) { return round_mantissa(x, 16); }
inline float round_to_tf32(float x) { return round_mantissa(x, 13); }

// The setting of each device kind: [0] the CPU, [1] CUDA.
inline std::atomic<MatmulPrecision>& matmul_precision_slot(bool cuda) {
  static std::atomic<MatmulPrecision> slots[2] = {MatmulPrecision::fp32, MatmulPrecision::fp32};
  return slots[cuda ? 1 : 0];
}

}  // namespace detail
}  // namespace rex
