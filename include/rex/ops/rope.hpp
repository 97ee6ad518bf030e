// rope: rotary position embedding, "rotate half" convention (HF transformers' Llama / GPT-NeoX).
//
// x is [B, H, T, D] with D even; h = D / 2. Element i < h is paired with element i + h (the two
// halves of the head, not adjacent elements). For position p = t + position_offset and i in [0, h):
//   inv_freq_i = theta^(-2i / D)          angle(t, i) = p * inv_freq_i
//   y[..., t, i]     = x[..., t, i] cos(angle) - x[..., t, i + h] sin(angle)
//   y[..., t, i + h] = x[..., t, i + h] cos(angle) + x[..., t, i] sin(angle)
// i.e. y = x * cos + rotate_half(x) * sin with rotate_half(x) = concat(-x[h:], x[:h]) and the [T,
// h] tables repeated over both halves. The tables are computed in double precision (the angle and
// its cos/sin) and rounded to f32, so a twin should build them in float64 and cast cos/sin to
// float32 (HF builds inv_freq and the angles in float32, which drifts by ~1e-7 * position). They
// are built once per (device, T, D, theta, offset) and kept for the process: a training step asks
// for the same few on every layer and step, and on CUDA each build is an upload the host waits for.
//
// Each pair is a 2-d rotation by +angle, so the backward is the rotation of g by -angle:
//   dx[i] = g[i] cos + g[i + h] sin,   dx[i + h] = g[i + h] cos - g[i] sin.
// rope_heads takes a projection's output [B, T, H D] and gives its rotated heads time first,
// [B, T, H, D]: the layout attention reads with AttentionLayout::time_first, so a model moves no
// head anywhere (x's rows in their own order, and the gradient's the same). rope_qk does q and k
// at once into one tensor, [B, T, Hq + Hkv, D], which causal_attention_packed reads.
#pragma once

#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "rex/backend/cpu/index.hpp"
#include "rex/backend/cuda/dispatch.hpp"
#include "rex/ops/common.hpp"

namespace rex {
namespace detail {

struct RopeTable {
  Tensor cos;  // [T, D/2]
  Tensor sin;  // [T, D/2]
};

inline RopeTable rope_table(int64_t time, int64_t head_dim, float theta, int64_t position_offset) {
  const int64_t half = head_dim / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    inv_freq[static_cast<size_t>(i)] = std::pow(
        static_cast<double>(theta), -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
  }
  RopeTable table{Tensor::empty(Shape{time, half}), Tensor::empty(Shape{time, half})};
  float* pc = table.cos.data<float>();
  float* ps = table.sin.data<float>();
  for (int64_t t = 0; t < time; ++t) {
    const double position = static_cast<double>(t + position_offset);
    for (int64_t i = 0; i < half; ++i) {
      const double angle = position * inv_freq[static_cast<size_t>(i)];
      pc[t * half + i] = static_cast<float>(std::cos(angle));
      ps[t * half + i] = static_cast<float>(std::sin(angle));
    }
  }
  return table;
}

// The tables for (time, head_dim, theta, position_offset) on `device`, from the process's cache.
// The cache is never destroyed (its CUDA tensors must not outlive the CUDA backend at exit) and is
// emptied when it reaches kMaxCachedRopeTables (decoding asks for one table per position).
inline constexpr size_t kMaxCachedRopeTables = 4096;
inline RopeTable cached_rope_table(int64_t time, int64_t head_dim, float theta,
                                   int64_t position_offset, Device device) {
  using Key = std::tuple<int, int, int64_t, int64_t, float, int64_t>;
  static auto* const tables = new std::map<Key, RopeTable>;
  static auto* const mutex = new std::mutex;
  const Key key{
      static_cast<int>(device.type), device.index, time, head_dim, theta, position_offset};
  const std::lock_guard<std::mutex> lock(*mutex);
  if (const auto found = tables->find(key); found != tables->end()) return found->second;
  if (tables->size() >= kMaxCachedRopeTables) tables->clear();
  RopeTable table = rope_table(time, head_dim, theta, position_offset);
  table.cos = table.cos.to(device), table.sin = table.sin.to(device);
  return tables->emplace(key, table).first->second;
}

// Rotates every (i, i + D/2) pair of x's rows by +angle (direction 1) or -angle (direction -1),
// into `out_shape` (x's elements in x's order), each row at the position `rows` gives it. The table
// must be on x's device.
inline Tensor rope_rotate(const Tensor& x, const RopeTable& table, RopeRows rows,
                          const Shape& out_shape, float direction) {
  Tensor out = Tensor::empty(out_shape, DType::f32, x.device());
  (on_cuda(x) ? cuda_backend().rope : cpu::rope)(
      x.device_data<float>(), nullptr, table.cos.device_data<float>(),
      table.sin.device_data<float>(), out.device_data<float>(), nullptr, rows, table.cos.dim(1) * 2,
      direction);
  return out;
}

}  // namespace detail

// Rotary position embedding of x [B, H, T, D] (D even) for positions position_offset .. + T - 1.
inline Tensor rope(const Tensor& x, float theta = 10000.0f, int64_t position_offset = 0) {
  detail::check_f32("rope", x);
  REX_CHECK(x.rank() == 4, "rope: expected x of shape [B, H, T, D], got ", x.shape());
  REX_CHECK(x.dim(3) % 2 == 0, "rope: the head size D must be even, got x ", x.shape());
  REX_CHECK(theta > 0.0f, "rope: theta must be positive, got ", theta);
  const detail::RopeTable table =
      detail::cached_rope_table(x.dim(2), x.dim(3), theta, position_offset, x.device());
  const detail::RopeRows rows{x.dim(0), x.dim(1), x.dim(2)};
  return detail::record(
      detail::rope_rotate(x, table, rows, x.shape(), 1.0f), "rope", {x},
      [table, rows, shape = x.shape()](const Tensor& g) {
        return detail::GradList{detail::rope_rotate(g, table, rows, shape, -1.0f)};
      });
}

// A projection's output x [B, T, H D] split into H heads and rotated, time first: [B, T, H, D], the
// value of permute(rope(permute(reshape(x, {B, T, H, D}), {0, 2, 1, 3}), theta, position_offset),
// {0, 2, 1, 3}) in one kernel (and one for the gradient), where the composition takes three.
inline Tensor rope_heads(const Tensor& x, int64_t heads, float theta = 10000.0f,
                         int64_t position_offset = 0) {
  detail::check_f32("rope_heads", x);
  REX_CHECK(x.rank() == 3 && heads > 0 && x.dim(2) % (2 * heads) == 0, "rope_heads: expected x ",
            "[B, T, H D] with an even head size D for H = ", heads, " heads, got x ", x.shape());
  REX_CHECK(theta > 0.0f, "rope_heads: theta must be positive, got ", theta);
  const int64_t batch = x.dim(0), time = x.dim(1), head_dim = x.dim(2) / heads;
  const detail::RopeTable table =
      detail::cached_rope_table(time, head_dim, theta, position_offset, x.device());
  const detail::RopeRows rows{batch, heads, time, /*time_first=*/true};
  return detail::record(
      detail::rope_rotate(x, table, rows, Shape{batch, time, heads, head_dim}, 1.0f), "rope_heads",
      {x}, [table, rows, shape = x.shape()](const Tensor& g) {
        return detail::GradList{detail::rope_rotate(g, table, rows, shape, -1.0f)};
      });
}

// q [B, T, Hq D] and k [B, T, Hkv D] (the projections' outputs) rotated and packed time first
// into one tensor [B, T, Hq + Hkv, D], each position's query heads then its key heads: the values
// of rope_heads(q, Hq) and rope_heads(k, Hkv) side by side, in one kernel (and one for both
// gradients) where the two take two each. causal_attention_packed reads it as it is.
inline Tensor rope_qk(const Tensor& q, const Tensor& k, int64_t heads, int64_t kv_heads,
                      float theta = 10000.0f, int64_t position_offset = 0) {
  detail::check_f32("rope_qk", q), detail::check_f32("rope_qk", k);
  detail::common_device("rope_qk", {q, k});
  REX_CHECK(
      q.rank() == 3 && k.rank() == 3 && heads > 0 && kv_heads > 0 && q.dim(2) % (2 * heads) == 0 &&
          q.dim(0) == k.dim(0) && q.dim(1) == k.dim(1) && k.dim(2) == q.dim(2) / heads * kv_heads,
      "rope_qk: expected q [B, T, Hq D] and k [B, T, Hkv D] with one even head size D for Hq = ",
      heads, " and Hkv = ", kv_heads, " heads, got q ", q.shape(), " and k ", k.shape());
  REX_CHECK(theta > 0.0f, "rope_qk: theta must be positive, got ", theta);
  const int64_t batch = q.dim(0), time = q.dim(1), head_dim = q.dim(2) / heads;
  const detail::RopeTable table =
      detail::cached_rope_table(time, head_dim, theta, position_offset, q.device());
  const detail::RopeRows rows{batch, heads, time, /*time_first=*/true, kv_heads};
  Tensor packed =
      Tensor::empty(Shape{batch, time, heads + kv_heads, head_dim}, DType::f32, q.device());
  const auto rope = detail::on_cuda(q) ? detail::cuda_backend().rope : detail::cpu::rope;
  const float *cos = table.cos.device_data<float>(), *sin = table.sin.device_data<float>();
  rope(q.device_data<float>(), k.device_data<float>(), cos, sin, packed.device_data<float>(),
       nullptr, rows, head_dim, 1.0f);
  return detail::record(
      packed, "rope_qk", {q, k},
      [table, rows, rope, head_dim, q_shape = q.shape(), k_shape = k.shape()](const Tensor& g) {
        Tensor dq = Tensor::empty(q_shape, DType::f32, g.device());
        Tensor dk = Tensor::empty(k_shape, DType::f32, g.device());
        rope(g.device_data<float>(), nullptr, table.cos.device_data<float>(),
             table.sin.device_data<float>(), dq.device_data<float>(), dk.device_data<float>(), rows,
             head_dim, -1.0f);
        return detail::GradList{dq, dk};
      });
}

}  // namespace rex
