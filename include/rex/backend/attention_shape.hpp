// The sizes of a causal attention problem and the layout of its tensors, for the CPU loops
// (rex/backend/cpu/attention.hpp) and the kernels (kernels/attention.cu, flash_attention.cu).
//
// q, out, g and dq hold B x Hq heads of T rows of D floats; k, v, dk and dv hold B x Hkv heads.
// Query head bh = b * Hq + h reads kv head b * Hkv + h / G, G = Hq / Hkv. lse and the backward's
// delta are [B, Hq, T] in either layout. The layouts:
// - heads first, [B, H, T, D]: PyTorch's scaled_dot_product_attention; a head's rows are
// contiguous.
// - time first, [B, T, H, D]: the order of a projection's output [B, T, H D] (and FlashAttention's
//   API), so that a model reads q, k and v and writes the output without permuting them; a head's
//   rows are H D floats apart.
#pragma once

#include <cstdint>

#include "rex/core/host_device.hpp"

namespace rex::detail {

struct AttentionShape {
  int64_t batch = 0, heads = 0, kv_heads = 0, time = 0, head_dim = 0;
  bool time_first = false;

  REX_HOST_DEVICE int64_t group() const { return heads / kv_heads; }
  // The kv head (of B Hkv) that query head bh (of B Hq) reads.
  REX_HOST_DEVICE int64_t kv_head_of(int64_t bh) const {
    return (bh / heads) * kv_heads + (bh % heads) / group();
  }
  // Where head `head` (b * n + h) of a tensor of n heads per batch starts, and the floats from one
  // of its rows to the next.
  REX_HOST_DEVICE int64_t head_start(int64_t head, int64_t n) const {
    return time_first ? ((head / n) * time * n + head % n) * head_dim : head * time * head_dim;
  }
  REX_HOST_DEVICE int64_t row_stride(int64_t n) const {
    return time_first ? n * head_dim : head_dim;
  }
  // The same for q, out, g, dq (query heads) and k, v, dk, dv (kv heads).
  REX_HOST_DEVICE int64_t query_start(int64_t bh) const { return head_start(bh, heads); }
  REX_HOST_DEVICE int64_t kv_start(int64_t bkv) const { return head_start(bkv, kv_heads); }
  REX_HOST_DEVICE int64_t query_stride() const { return row_stride(heads); }
  REX_HOST_DEVICE int64_t kv_stride() const { return row_stride(kv_heads); }
};

}  // namespace rex::detail
