// Flash attention on bf16 tensor cores (kernels/flash_attention.cu) against attention computed in
// double on the host, on edge shapes: T not a multiple of any tile, T = 1, T past one block's rows
// (300), head dims 32, 64 and 128, kv groups 1, 2 and 4.
//
// The inputs (q, k, v and the output gradient g) are rounded to bf16 on the host first, so the
// kernel's own rounding of them is exact and the reference is the exact attention of the same
// values. What remains is bounded element by element from the data (first order, u_b = 2^-8 the
// relative size of a bf16 rounding, gamma_n Higham's fp32 bound for n-term sums):
// - a probability p_ij = exp(s_ij - m) is within a relative eps_i of exact: its score sums D
//   products in fp32 (gamma_D relative to scale sum_d |q_id k_jd|, whose exponential turns it into
//   a relative error), and the exponent and logarithm calls with their scalings (8 ulp-sized
//   roundings, generously);
// - o = sum_j bf16(p_j) v_j / sum_j p_j: within A (u_b + 2 eps + 2 gamma_T) with A = sum_j w_j
// |v_j|
//   (w the exact softmax weights), and lse within eps + gamma_T + 4u (|lse| + 1);
// - the backward recomputes p from that lse (relative eta = eps + the lse bound), uses
//   delta_i = g_i . o_i with the kernel's o, and rounds p and ds = p (dp - delta) to bf16 before
//   the products with g, q and k; each gradient's bound sums those terms' magnitudes (below).
//
// causal_attention in bf16 (train.matmul_precision, rex/core/precision.hpp) is held to the same
// bounds, through the op and its backward: on CUDA it runs these kernels; on the CPU its products
// round the same operands (q, k, v, P, g, dS) to bf16, and its other errors are a subset of the
// kernels' (P normalised before its rounding instead of after the sum, the sums in double, delta
// summed from p dp instead of g o, which the bound above covers as it covers o's error).
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

#include <rex/backend/cuda/runtime.hpp>
#include <rex/rex.hpp>

#include "cuda_testing.hpp"
#include "rounding.hpp"
#include "testing.hpp"

using namespace rex;
using rex::testing::gpu_missing;

namespace {

constexpr double kBf16 = 0x1p-8;  // unit roundoff of bf16 (8 significant bits, 7 stored)

// x rounded to bf16 (nearest, ties to even), as a float.
float round_bf16(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  return std::bit_cast<float>(rounded);
}

std::vector<float> random_bf16(int64_t n, Generator& gen, float scale) {
  std::vector<float> values = normal(Shape{n}, gen).to_vector();
  for (float& x : values) x = round_bf16(x * scale);
  return values;
}

Tensor on_gpu(const std::vector<float>& values) {
  return from_vector(values, Shape{static_cast<int64_t>(values.size())}).to(Device::cuda());
}

struct Shape4 {
  int64_t batch, heads, kv_heads, time, dim;
};

// Exact attention of one shape in double (the reference), with the bounds above.
struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
  std::vector<double> out_bound, lse_bound, dq_bound, dk_bound, dv_bound;
};

Reference reference(const Shape4& s, const std::vector<float>& q, const std::vector<float>& k,
                    const std::vector<float>& v, const std::vector<float>& g) {
  using testing::gamma_n, testing::kUnitRoundoff;
  const int64_t T = s.time, D = s.dim, G = s.heads / s.kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const int64_t rows = s.batch * s.heads * T, kv_rows = s.batch * s.kv_heads * T;
  Reference r;
  r.out.assign(rows * D, 0);
  r.out_bound.assign(rows * D, 0);
  r.lse.assign(rows, 0);
  r.lse_bound.assign(rows, 0);
  r.dq.assign(rows * D, 0);
  r.dq_bound.assign(rows * D, 0);
  r.dk.assign(kv_rows * D, 0);
  r.dk_bound.assign(kv_rows * D, 0);
  r.dv.assign(kv_rows * D, 0);
  r.dv_bound.assign(kv_rows * D, 0);
  const double gamma_d = gamma_n(static_cast<double>(D)), gamma_t = gamma_n(static_cast<double>(T));
  const double gamma_gt = gamma_n(static_cast<double>(G * T));
  std::vector<double> w(T), dp(T), ds(T), ds_error(T), p_error(T);
  for (int64_t bh = 0; bh < s.batch * s.heads; ++bh) {
    const int64_t kvh = (bh / s.heads) * s.kv_heads + (bh % s.heads) / G;
    const float *qh = &q[bh * T * D], *kh = &k[kvh * T * D], *vh = &v[kvh * T * D],
                *gh = &g[bh * T * D];
    for (int64_t i = 0; i < T; ++i) {
      const int64_t row = bh * T + i;
      double max = -INFINITY, magnitude = 0;
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0, abs_dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          dot += static_cast<double>(qh[i * D + d]) * kh[j * D + d];
          abs_dot += std::fabs(static_cast<double>(qh[i * D + d]) * kh[j * D + d]);
        }
        w[j] = dot * scale;
        max = std::max(max, w[j]);
        magnitude = std::max(magnitude, abs_dot * scale);
      }
      double sum = 0;
      for (int64_t j = 0; j <= i; ++j) sum += (w[j] = std::exp(w[j] - max));
      for (int64_t j = 0; j <= i; ++j) w[j] /= sum;
      const double eps = 2 * magnitude * gamma_d + 8 * testing::kCallRoundoff;
      r.lse[row] = max + std::log(sum);
      r.lse_bound[row] = eps + gamma_t + 4 * kUnitRoundoff * (std::fabs(r.lse[row]) + 1);
      double delta = 0, delta_error = 0;
      for (int64_t d = 0; d < D; ++d) {
        double o = 0, a = 0;
        for (int64_t j = 0; j <= i; ++j) {
          o += w[j] * vh[j * D + d];
          a += w[j] * std::fabs(vh[j * D + d]);
        }
        r.out[row * D + d] = o;
        r.out_bound[row * D + d] = a * (kBf16 + 2 * eps + 2 * gamma_t) + kUnitRoundoff * a;
        delta += gh[i * D + d] * o;
        delta_error +=
            std::fabs(gh[i * D + d]) * (r.out_bound[row * D + d] + gamma_d * std::fabs(o));
      }
      const double eta = eps + r.lse_bound[row];
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0, abs_dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          dot += static_cast<double>(gh[i * D + d]) * vh[j * D + d];
          abs_dot += std::fabs(static_cast<double>(gh[i * D + d]) * vh[j * D + d]);
        }
        dp[j] = dot;
        ds[j] = w[j] * (dot - delta);
        // p's error times |dp - delta|, dp's sum, delta's error, and the two roundings of ds
        ds_error[j] = w[j] * (eta * std::fabs(dot - delta) + gamma_d * abs_dot + delta_error +
                              2 * kUnitRoundoff * std::fabs(dot - delta));
        p_error[j] = w[j] * eta;
      }
      for (int64_t j = 0; j <= i; ++j)
        for (int64_t d = 0; d < D; ++d) {
          const double qd = qh[i * D + d], kd = kh[j * D + d], gd = gh[i * D + d];
          const int64_t key = kvh * T + j;
          r.dq[row * D + d] += scale * ds[j] * kd;
          r.dq_bound[row * D + d] +=
              scale * std::fabs(kd) * (ds_error[j] + (kBf16 + gamma_t) * std::fabs(ds[j]));
          r.dk[key * D + d] += scale * ds[j] * qd;
          r.dk_bound[key * D + d] +=
              scale * std::fabs(qd) * (ds_error[j] + (kBf16 + gamma_gt) * std::fabs(ds[j]));
          r.dv[key * D + d] += w[j] * gd;
          r.dv_bound[key * D + d] += std::fabs(gd) * (p_error[j] + (kBf16 + gamma_gt) * w[j]);
        }
    }
  }
  return r;
}

void check(const std::string& what, const Tensor& got, const std::vector<double>& want,
           const std::vector<double>& bound) {
  CAPTURE(what);
  const std::vector<float> values = got.to_vector();
  REQUIRE(values.size() == want.size());
  double worst = 0;
  size_t worst_at = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    const double ratio = std::fabs(values[i] - want[i]) / (bound[i] + 1e-30);
    if (!(ratio <= worst)) worst_at = i;  // also catches NaN
    if (!(ratio <= worst)) worst = std::isnan(values[i]) ? INFINITY : ratio;
  }
  CAPTURE(worst_at);
  CAPTURE(values[worst_at]);
  CAPTURE(want[worst_at]);
  CAPTURE(bound[worst_at]);
  CHECK(worst <= 1.0);
}

// Random bf16 inputs of a shape (q and g have n elements, k and v kv) and their reference.
struct Case {
  int64_t n, kv;
  std::vector<float> q, k, v, g;
  Reference want;
};

Case make_case(const Shape4& s, uint64_t seed) {
  CAPTURE(s.batch);
  CAPTURE(s.heads);
  CAPTURE(s.kv_heads);
  CAPTURE(s.time);
  CAPTURE(s.dim);
  Generator gen(seed);
  Case c;
  c.n = s.batch * s.heads * s.time * s.dim, c.kv = s.batch * s.kv_heads * s.time * s.dim;
  c.q = random_bf16(c.n, gen, 1.0f), c.k = random_bf16(c.kv, gen, 1.0f);
  c.v = random_bf16(c.kv, gen, 1.0f), c.g = random_bf16(c.n, gen, 1.0f);
  c.want = reference(s, c.q, c.k, c.v, c.g);
  return c;
}

void check_shape(const Shape4& s, uint64_t seed) {
  const Case c = make_case(s, seed);
  const int64_t n = c.n, kv = c.kv;
  const std::vector<float>&q = c.q, &k = c.k, &v = c.v, &g = c.g;
  const Reference& want = c.want;

  const Tensor tq = on_gpu(q), tk = on_gpu(k), tv = on_gpu(v), tg = on_gpu(g);
  const Tensor out = Tensor::empty(Shape{n}, DType::f32, Device::cuda());
  const Tensor lse = Tensor::empty(Shape{s.batch * s.heads * s.time}, DType::f32, Device::cuda());
  const Tensor dq = Tensor::empty(Shape{n}, DType::f32, Device::cuda());
  const Tensor dk = Tensor::empty(Shape{kv}, DType::f32, Device::cuda());
  const Tensor dv = Tensor::empty(Shape{kv}, DType::f32, Device::cuda());
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.dim));
  const auto& cuda = rex::detail::cuda_backend();
  const rex::detail::AttentionShape shape{s.batch, s.heads, s.kv_heads, s.time, s.dim};
  cuda.flash_attention(tq.device_data<float>(), tk.device_data<float>(), tv.device_data<float>(),
                       out.device_data<float>(), lse.device_data<float>(), shape, scale);
  cuda.flash_attention_backward(
      tq.device_data<float>(), tk.device_data<float>(), tv.device_data<float>(),
      out.device_data<float>(), lse.device_data<float>(), tg.device_data<float>(),
      dq.device_data<float>(), dk.device_data<float>(), dv.device_data<float>(), shape, scale);
  check("out", out, want.out, want.out_bound);
  check("lse", lse, want.lse, want.lse_bound);
  check("dq", dq, want.dq, want.dq_bound);
  check("dk", dk, want.dk, want.dk_bound);
  check("dv", dv, want.dv, want.dv_bound);
}

// causal_attention's values and gradients (the backward of sum(out * g)) on `device` in bf16.
void check_op_in_bf16(const Shape4& s, uint64_t seed, Device device) {
  CAPTURE(device.is_cuda());
  const Case c = make_case(s, seed);
  const int64_t n = c.n, kv = c.kv;
  const std::vector<float>&q = c.q, &k = c.k, &v = c.v, &g = c.g;
  const Reference& want = c.want;
  const Shape query_shape{s.batch, s.heads, s.time, s.dim};
  const Shape kv_shape{s.batch, s.kv_heads, s.time, s.dim};
  Tensor tq = from_vector(q, query_shape).to(device), tk = from_vector(k, kv_shape).to(device),
         tv = from_vector(v, kv_shape).to(device);
  tq.requires_grad_(), tk.requires_grad_(), tv.requires_grad_();
  set_matmul_precision(device, "bf16");
  Tensor out;
  try {
    out = causal_attention(tq, tk, tv);
    rex::sum(out * from_vector(g, query_shape).to(device)).backward();
  } catch (...) {
    set_matmul_precision(device, "fp32");
    throw;
  }
  set_matmul_precision(device, "fp32");
  check("out", reshape(out, {n}), want.out, want.out_bound);
  check("dq", reshape(tq.grad(), {n}), want.dq, want.dq_bound);
  check("dk", reshape(tk.grad(), {kv}), want.dk, want.dk_bound);
  check("dv", reshape(tv.grad(), {kv}), want.dv, want.dv_bound);
}

}  // namespace

TEST_CASE("causal_attention in bf16, on the CPU and on CUDA, within flash attention's bounds") {
  // The CPU side runs on any machine; the CUDA side where there is a device.
  const bool gpu = cuda::device_count() > 0;
  uint64_t seed = 100;
  for (const int64_t dim : {32, 64})
    for (const int64_t time : {1, 17, 65}) {
      const Shape4 shape{2, 4, 2, time, dim};
      check_op_in_bf16(shape, seed, Device::cpu());
      if (gpu) check_op_in_bf16(shape, seed, Device::cuda());
      ++seed;
    }
  if (!gpu) return;
  // A head dim flash attention does not take is refused in bf16 on CUDA, with the reason.
  const Tensor x = ones(Shape{1, 1, 3, 48}, Device::cuda());
  set_matmul_precision(Device::cuda(), "bf16");
  CHECK_THROWS_WITH(causal_attention(x, x, x), doctest::Contains("head dims 32, 64 and 128"));
  set_matmul_precision(Device::cuda(), "fp32");
}

TEST_CASE("flash attention: forward and backward on edge shapes, against exact attention") {
  if (gpu_missing()) return;
  uint64_t seed = 1;
  for (const int64_t dim : {32, 64, 128})
    for (const int64_t time : {1, 17, 64, 65, 130, 300})
      check_shape({2, 4, dim == 64 ? 1 : (dim == 32 ? 2 : 4), time, dim}, seed++);
}

TEST_CASE(
    "flash attention time first or packed gives the bits of heads first, gradients included") {
  if (gpu_missing()) return;
  Generator gen(31);
  set_matmul_precision(Device::cuda(), "bf16");
  try {
    testing::check_time_first_attention({2, 65, 4, 32}, {2, 65, 2, 32}, Device::cuda(), gen);
    testing::check_time_first_attention({1, 130, 2, 64}, {1, 130, 1, 64}, Device::cuda(), gen);
    testing::check_time_first_attention({1, 17, 4, 128}, {1, 17, 1, 128}, Device::cuda(), gen);
  } catch (...) {
    set_matmul_precision(Device::cuda(), "fp32");
    throw;
  }
  set_matmul_precision(Device::cuda(), "fp32");
}

TEST_CASE("flash attention: a wrong head dim is refused") {
  if (gpu_missing()) return;
  const Tensor x = zeros(Shape{1 * 1 * 3 * 48}, Device::cuda());
  const Tensor lse = zeros(Shape{3}, Device::cuda());
  CHECK_THROWS_WITH(rex::detail::cuda_backend().flash_attention(
                        x.device_data<float>(), x.device_data<float>(), x.device_data<float>(),
                        x.device_data<float>(), lse.device_data<float>(),
                        rex::detail::AttentionShape{1, 1, 1, 3, 48}, 1.0f),
                    doctest::Contains("head dims 32, 64 and 128, got 48"));
}
