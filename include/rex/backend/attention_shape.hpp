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
// - time first with q and k packed in one tensor, [B, T, Hq + Hkv, D]: each position's Hq query
//   heads, then its Hkv key heads (rope_qk's output, which rotates both in one launch); dq and dk
//   are packed alike. v, dv, out and g are time first as above.
// Each role has a start and a stride: AttentionRows names them.
#pragma once

#include <cstdint>

#include "rex/core/host_device.hpp"

namespace rex::detail {

// The tensors attention reads and writes, by layout: q and dq, k and dk, v and dv, out and g.
enum class AttentionRows { q, k, v, out };

struct AttentionShape {
  int64_t batch = 0, heads = 0, kv_heads = 0, time = 0, head_dim = 0;
  bool time_first = false;
  bool packed_qk = false;  // time first, q and k in one tensor (above)

  REX_HOST_DEVICE int64_t group() const { return heads / kv_heads; }
  // The kv head (of B Hkv) that query head bh (of B Hq) reads.
  REX_HOST_DEVICE int64_t kv_head_of(int64_t bh) const {
    return (bh / heads) * kv_heads + (bh % heads) / group();
  }
  // The heads a batch of `rows`' tensor holds (at each position, time first).
  REX_HOST_DEVICE int64_t heads_in(AttentionRows rows) const {
    if (packed_qk && (rows == AttentionRows::q || rows == AttentionRows::k))
      return heads + kv_heads;
    return rows == AttentionRows::q || rows == AttentionRows::out ? heads : kv_heads;
  }
  // Where head `head` of `rows` starts (b * Hq + h for q and out, b * Hkv + h for k and v), and
  // the floats from one of its rows to the next.
  REX_HOST_DEVICE int64_t start(AttentionRows rows, int64_t head) const {
    const bool query = rows == AttentionRows::q || rows == AttentionRows::out;
    const int64_t n = query ? heads : kv_heads, per_batch = heads_in(rows);
    const int64_t b = head / n;
    const int64_t h = head % n + (packed_qk && rows == AttentionRows::k ? heads : 0);
    return time_first ? (b * time * per_batch + h) * head_dim
                      : (b * per_batch + h) * time * head_dim;
  }
  REX_HOST_DEVICE int64_t stride(AttentionRows rows) const {
    return time_first ? heads_in(rows) * head_dim : head_dim;
  }
};

}  // namespace rex::detail
