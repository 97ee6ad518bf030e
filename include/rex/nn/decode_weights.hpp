// The weight products of a decoded token on the CPU (TransformerLM::decode's one-token step):
// y = x W^T for one row x and a weight W [n, k] in PyTorch's layout.
//
// A decoded token multiplies each weight it uses once, so its step is bound by reading them
// (docs/performance.md, "Sampling with a KV cache"). When the CPU's matmul precision is bf16, each
// weight is therefore rounded once, the first time a token uses it, and kept as bf16 bits: half
// the bytes of every later read. The arithmetic is detail::gemm's in bf16 (both operands rounded
// to nearest even, exact products, fp32 sums) in another order of the sums, as the decode step's
// fp32 products already differ from the full pass's. The copy is kept transposed, [k, n], so the
// product runs along contiguous rows of it (detail::cpu::row_times_bf16). In fp32 and tf32 the
// products are detail::gemm's calls, unchanged.
//
// The copies belong to the KvCache that made them, like its keys and values: a cache serves one
// model whose weights do not change while it is in use.
#pragma once

#include <bit>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "rex/backend/cpu/gemm.hpp"
#include "rex/core/tensor.hpp"

namespace rex::nn {

class DecodeWeights {
 public:
  // y [n] = x [k] weight^T, for weight [n, k] on the CPU.
  void times(const float* x, const Tensor& weight, float* y) {
    const int64_t n = weight.dim(0), k = weight.dim(1);
    const float* w = weight.data<float>();
    if (detail::matmul_precision_slot(false).load(std::memory_order_relaxed) !=
        MatmulPrecision::bf16) {
      detail::gemm(x, w, y, 1, n, k, false, true);
      return;
    }
    std::vector<uint16_t>& rounded = rounded_[w];
    if (rounded.empty()) {
      rounded.resize(static_cast<size_t>(n * k));
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < k; ++c) rounded[c * n + r] = bf16_bits(w[r * k + c]);
    }
    x_rounded_.resize(static_cast<size_t>(k));
    for (int64_t c = 0; c < k; ++c) x_rounded_[c] = detail::round_to_bf16(x[c]);
    detail::cpu::row_times_bf16(x_rounded_.data(), rounded.data(), y, n, k);
  }

 private:
  // x rounded to bf16, whose low 16 bits are then zero: the high 16 are the bf16 value.
  static uint16_t bf16_bits(float x) {
    return static_cast<uint16_t>(std::bit_cast<uint32_t>(detail::round_to_bf16(x)) >> 16);
  }

  // Each weight's bf16 copy [k, n], by the address of its data.
  std::unordered_map<const float*, std::vector<uint16_t>> rounded_;
  std::vector<float> x_rounded_;
};

}  // namespace rex::nn
