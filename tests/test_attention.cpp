// causal_attention: forward against a double-precision loop, causality, the fused op against the
// composed reference (values and the gradients of q, k, v) for multi-head and grouped-query shapes,
// T = 1, central-difference gradients, and error cases.
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include <rex/backend/cuda/runtime.hpp>

#include "gradcheck.hpp"
#include "rounding.hpp"
#include "testing.hpp"

using rex::Shape;
using rex::Tensor;
using rex::testing::check_close;
using rex::testing::error_message;
using rex::testing::gamma_n;

namespace {

struct Dims {
  int64_t batch, heads, kv_heads, time, dim;
};

struct Inputs {
  Tensor q, k, v;
};

Inputs random_inputs(const Dims& d, rex::Generator& gen) {
  return {rex::normal(Shape{d.batch, d.heads, d.time, d.dim}, gen),
          rex::normal(Shape{d.batch, d.kv_heads, d.time, d.dim}, gen),
          rex::normal(Shape{d.batch, d.kv_heads, d.time, d.dim}, gen)};
}

// softmax_{s <= t}(q_t . k_s / sqrt(D)) v_s per (b, h), with h reading kv head h / (Hq / Hkv).
std::vector<double> naive_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  const int64_t batch = q.dim(0), heads = q.dim(1), kv_heads = k.dim(1);
  const int64_t time = q.dim(2), dim = q.dim(3), group = heads / kv_heads;
  const float *pq = q.data<float>(), *pk = k.data<float>(), *pv = v.data<float>();
  std::vector<double> out(static_cast<size_t>(q.numel()));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = pq + (b * heads + h) * time * dim;
      const float* kh = pk + (b * kv_heads + h / group) * time * dim;
      const float* vh = pv + (b * kv_heads + h / group) * time * dim;
      double* oh = out.data() + (b * heads + h) * time * dim;
      for (int64_t t = 0; t < time; ++t) {
        std::vector<double> w(static_cast<size_t>(t + 1));
        double peak = -1e300, total = 0;
        for (int64_t s = 0; s <= t; ++s) {
          double score = 0;
          for (int64_t i = 0; i < dim; ++i)
            score += static_cast<double>(qh[t * dim + i]) * kh[s * dim + i];
          w[static_cast<size_t>(s)] = score / std::sqrt(static_cast<double>(dim));
          peak = std::max(peak, w[static_cast<size_t>(s)]);
        }
        for (double& x : w) {
          x = std::exp(x - peak);
          total += x;
        }
        for (int64_t i = 0; i < dim; ++i) {
          double acc = 0;
          for (int64_t s = 0; s <= t; ++s) acc += w[static_cast<size_t>(s)] * vh[s * dim + i];
          oh[t * dim + i] = acc / total;
        }
      }
    }
  }
  return out;
}

const std::vector<Dims> kShapes = {
    {1, 1, 1, 5, 4},  // one head
    {2, 3, 3, 7, 8},  // multi-head
    {2, 4, 2, 6, 4},  // grouped-query, G = 2
    {1, 6, 2, 5, 3},  // grouped-query, G = 3, odd head size
    {2, 3, 1, 9, 5},  // multi-query
};

}  // namespace

TEST_CASE("causal_attention matches a naive double-precision loop") {
  rex::Generator gen(21);
  for (const Dims& d : kShapes) {
    CAPTURE(d.heads);
    CAPTURE(d.kv_heads);
    const Inputs in = random_inputs(d, gen);
    const Tensor out = rex::causal_attention(in.q, in.k, in.v);
    REQUIRE(out.shape() == in.q.shape());
    const std::vector<double> want = naive_attention(in.q, in.k, in.v);
    // A score sums D products and is scaled, exponentiated (2 ulp) against the row max and
    // normalised, and an output sums T products: a chain of D + T + 12 (docs/testing.md,
    // "Tolerances"), with Approx's absolute floor of 1.
    const double tol = gamma_n(static_cast<double>(d.dim + d.time + 12));
    for (int64_t j = 0; j < out.numel(); ++j) {
      CHECK(out.data<float>()[j] ==
            doctest::Approx(want[static_cast<size_t>(j)]).epsilon(tol).scale(1.0));
    }
  }
}

TEST_CASE("causal_attention: later keys and values do not change earlier outputs") {
  rex::Generator gen(4);
  const Dims d{2, 4, 2, 8, 4};
  Inputs in = random_inputs(d, gen);
  const Tensor before = rex::causal_attention(in.q, in.k, in.v);
  // Overwrite keys and values at positions 5.. with large values.
  for (Tensor* t : {&in.k, &in.v}) {
    for (int64_t r = 0; r < d.batch * d.kv_heads; ++r)
      for (int64_t s = 5; s < d.time; ++s)
        for (int64_t i = 0; i < d.dim; ++i) t->data<float>()[(r * d.time + s) * d.dim + i] = 50.0f;
  }
  const Tensor after = rex::causal_attention(in.q, in.k, in.v);
  for (int64_t r = 0; r < d.batch * d.heads; ++r) {
    for (int64_t t = 0; t < d.time; ++t) {
      for (int64_t i = 0; i < d.dim; ++i) {
        const int64_t j = (r * d.time + t) * d.dim + i;
        if (t < 5) {
          CHECK(after.data<float>()[j] == before.data<float>()[j]);
        } else {
          CHECK(after.data<float>()[j] != before.data<float>()[j]);
        }
      }
    }
  }
}

TEST_CASE("causal_attention fused matches the composed reference: values and gradients") {
  rex::Generator gen(33);
  std::vector<Dims> shapes = kShapes;
  shapes.push_back({1, 2, 2, 33, 16});  // a longer sequence
  for (const Dims& d : shapes) {
    CAPTURE(d.heads);
    CAPTURE(d.kv_heads);
    CAPTURE(d.time);
    const Inputs in = random_inputs(d, gen);
    const Tensor weights = rex::normal(in.q.shape(), gen);
    std::vector<Tensor> grads[2];
    Tensor outs[2];
    for (int variant = 0; variant < 2; ++variant) {
      Tensor q = in.q.clone(), k = in.k.clone(), v = in.v.clone();
      q.requires_grad_(), k.requires_grad_(), v.requires_grad_();
      outs[variant] =
          variant == 0 ? rex::causal_attention(q, k, v) : rex::causal_attention_reference(q, k, v);
      rex::sum(outs[variant] * weights).backward();
      grads[variant] = {q.grad(), k.grad(), v.grad()};
    }
    // Both sides' chains (above; the backward adds D products for dp, the delta row sum, ds, and
    // T or G T products for dq, dk, dv: 2 D + (G + 2) T + 12), twice.
    const int64_t group = d.heads / d.kv_heads;
    check_close(outs[0], outs[1], 2 * gamma_n(static_cast<double>(d.dim + d.time + 12)));
    for (size_t i = 0; i < 3; ++i) {
      CAPTURE(i);
      check_close(grads[0][i], grads[1][i],
                  2 * gamma_n(static_cast<double>(2 * d.dim + (group + 2) * d.time + 12)));
    }
  }
}

TEST_CASE("causal_attention gives the reference gradients when only some inputs need one") {
  rex::Generator gen(8);
  const Inputs in = random_inputs({2, 4, 2, 6, 4}, gen);
  const Tensor weights = rex::normal(in.q.shape(), gen);
  for (int which = 0; which < 3; ++which) {
    CAPTURE(which);
    Tensor got, want;
    for (int variant = 0; variant < 2; ++variant) {
      std::vector<Tensor> qkv = {in.q.clone(), in.k.clone(), in.v.clone()};
      qkv[static_cast<size_t>(which)].requires_grad_();
      const Tensor out = variant == 0 ? rex::causal_attention(qkv[0], qkv[1], qkv[2])
                                      : rex::causal_attention_reference(qkv[0], qkv[1], qkv[2]);
      rex::sum(out * weights).backward();
      (variant == 0 ? got : want) = qkv[static_cast<size_t>(which)].grad();
    }
    check_close(got, want, 2 * gamma_n(2 * 4 + (2 + 2) * 6 + 12));  // as above, D 4, T 6, G 2
  }
}

TEST_CASE("causal_attention with T = 1 returns v and passes the whole gradient to v") {
  rex::Generator gen(2);
  const Dims d{2, 6, 3, 1, 4};
  Inputs in = random_inputs(d, gen);
  in.q.requires_grad_(), in.k.requires_grad_(), in.v.requires_grad_();
  const Tensor out = rex::causal_attention(in.q, in.k, in.v);
  const Tensor g = rex::normal(out.shape(), gen);
  out.backward(g);
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t h = 0; h < d.heads; ++h) {
      for (int64_t i = 0; i < d.dim; ++i) {
        CHECK(out.at({b, h, 0, i}) == in.v.at({b, h / 2, 0, i}));  // exact: p = exp(0) / 1 = 1
        CHECK(in.q.grad().at({b, h, 0, i}) == 0.0f);
      }
    }
    for (int64_t kv = 0; kv < d.kv_heads; ++kv) {
      for (int64_t i = 0; i < d.dim; ++i) {
        CHECK(in.k.grad().at({b, kv, 0, i}) == 0.0f);
        const float summed = g.at({b, 2 * kv, 0, i}) + g.at({b, 2 * kv + 1, 0, i});
        CHECK(in.v.grad().at({b, kv, 0, i}) == summed);  // exact: 1 * g summed in head order
      }
    }
  }
}

TEST_CASE("causal_attention gradient") {
  rex::Generator gen(17);
  const std::vector<Dims> shapes = {
      {1, 1, 1, 3, 2}, {2, 2, 2, 4, 3}, {1, 4, 2, 5, 3}, {2, 3, 1, 3, 2}};
  for (const Dims& d : shapes) {
    CAPTURE(d.heads);
    CAPTURE(d.kv_heads);
    Inputs in = random_inputs(d, gen);
    in.q.requires_grad_(), in.k.requires_grad_(), in.v.requires_grad_();
    CHECK_GRADIENTS(
        [](const std::vector<Tensor>& x) { return rex::causal_attention(x[0], x[1], x[2]); },
        {in.q, in.k, in.v});
  }
}

TEST_CASE("causal_attention rejects bad shapes and names the op") {
  const Tensor q = rex::zeros(Shape{2, 4, 5, 8});
  const Tensor kv = rex::zeros(Shape{2, 2, 5, 8});
  struct Bad {
    Tensor q, k, v;
    std::string fragment;
  };
  const std::vector<Bad> bad = {
      {rex::zeros(Shape{2, 3, 5, 8}), kv, kv, "not a multiple"},
      {q, rex::zeros(Shape{2, 2, 6, 8}), rex::zeros(Shape{2, 2, 6, 8}), "batch, time or head"},
      {q, rex::zeros(Shape{2, 2, 5, 4}), rex::zeros(Shape{2, 2, 5, 4}), "batch, time or head"},
      {q, rex::zeros(Shape{1, 2, 5, 8}), rex::zeros(Shape{1, 2, 5, 8}), "batch, time or head"},
      {q, kv, rex::zeros(Shape{2, 2, 5, 7}), "same shape"},
      {rex::zeros(Shape{4, 5, 8}), kv, kv, "[4, 5, 8]"},
      {q, rex::zeros(Shape{2, 2, 5, 8, 1}), kv, "[B, Hq, T, D]"},
      {Tensor::empty(q.shape(), rex::DType::i32), kv, kv, "f32"},
  };
  for (const Bad& b : bad) {
    CAPTURE(b.fragment);
    CHECK_THROWS_AS(rex::causal_attention(b.q, b.k, b.v), rex::Error);
    const std::string fused = error_message([&] { rex::causal_attention(b.q, b.k, b.v); });
    CHECK(fused.find("causal_attention: ") == 0);
    CHECK(fused.find(b.fragment) != std::string::npos);
    const std::string reference =
        error_message([&] { rex::causal_attention_reference(b.q, b.k, b.v); });
    CHECK(reference.find("causal_attention_reference: ") == 0);
  }
}

TEST_CASE("causal_attention follows the matmul precision in bf16 only, as on CUDA") {
  // In tf32 attention's products stay fp32 (CUDA's attention kernels have no TF32 path): the same
  // bits as fp32. In bf16 they round (flash attention's operands), so the output changes.
  rex::Generator gen(3);
  const Tensor q = rex::normal(Shape{1, 4, 9, 16}, gen), k = rex::normal(Shape{1, 2, 9, 16}, gen),
               v = rex::normal(Shape{1, 2, 9, 16}, gen);
  const std::vector<float> fp32 = rex::causal_attention(q, k, v).to_vector();
  std::vector<float> in[2];
  const char* precisions[] = {"tf32", "bf16"};
  for (int i = 0; i < 2; ++i) {
    rex::set_matmul_precision(rex::Device::cpu(), precisions[i]);
    in[i] = rex::causal_attention(q, k, v).to_vector();
    rex::set_matmul_precision(rex::Device::cpu(), "fp32");
  }
  CHECK(in[0] == fp32);
  CHECK(in[1] != fp32);
}

TEST_CASE("causal_attention time first or packed: the bits of heads first, with gradients") {
  // The CPU copies a time-first (or packed) head into a [T, D] buffer, so the arithmetic is the
  // same; in bf16 too (attention_gemm rounds the same operands).
  rex::Generator gen(21);
  for (const char* precision : {"fp32", "bf16"}) {
    CAPTURE(precision);
    rex::set_matmul_precision(rex::Device::cpu(), precision);
    rex::testing::check_time_first_attention(Shape{2, 13, 4, 8}, Shape{2, 13, 2, 8},
                                             rex::Device::cpu(), gen);
    rex::testing::check_time_first_attention(Shape{1, 1, 2, 5}, Shape{1, 1, 2, 5},
                                             rex::Device::cpu(), gen);
    rex::testing::check_time_first_attention(Shape{2, 40, 6, 12}, Shape{2, 40, 2, 12},
                                             rex::Device::cpu(), gen);
    rex::set_matmul_precision(rex::Device::cpu(), "fp32");
  }
  const Tensor q = rex::zeros(Shape{2, 5, 4, 8}), kv = rex::zeros(Shape{2, 5, 3, 8});
  CHECK(error_message([&] {
          rex::causal_attention(q, kv, kv, rex::AttentionLayout::time_first);
        }).find("q [B, T, Hq, D] and k, v [B, T, Hkv, D]") != std::string::npos);
  const Tensor late = rex::zeros(Shape{2, 6, 2, 8});
  CHECK(error_message([&] {
          rex::causal_attention(q, late, late, rex::AttentionLayout::time_first);
        }).find("differ in batch, time or head size") != std::string::npos);
}
