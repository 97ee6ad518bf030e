// rope: forward against a double-precision loop, the rotation's invariants (pair norms, relative
// positions, the offset), gradients, and error cases.
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "gradcheck.hpp"
#include "rounding.hpp"
#include "testing.hpp"

using rex::Shape;
using rex::Tensor;
using rex::testing::error_message;

namespace {

// y[..., t, i] and y[..., t, i + D/2] for every pair, from the formula, in double.
std::vector<double> naive_rope(const Tensor& x, double theta, int64_t offset) {
  const int64_t time = x.dim(2), dim = x.dim(3), half = dim / 2;
  const float* px = x.data<float>();
  std::vector<double> y(static_cast<size_t>(x.numel()));
  for (int64_t r = 0; r < x.dim(0) * x.dim(1); ++r) {
    for (int64_t t = 0; t < time; ++t) {
      const int64_t base = (r * time + t) * dim;
      for (int64_t i = 0; i < half; ++i) {
        const double angle = static_cast<double>(t + offset) * std::pow(theta, -2.0 * i / dim);
        const double a = px[base + i], b = px[base + i + half];
        y[static_cast<size_t>(base + i)] = a * std::cos(angle) - b * std::sin(angle);
        y[static_cast<size_t>(base + i + half)] = b * std::cos(angle) + a * std::sin(angle);
      }
    }
  }
  return y;
}

// The same vector at every position: x[0, 0, t, :] = row for t < time.
Tensor repeat_over_time(const Tensor& row, int64_t time) {
  const int64_t dim = row.numel();
  Tensor x = Tensor::empty(Shape{1, 1, time, dim});
  for (int64_t t = 0; t < time; ++t)
    for (int64_t i = 0; i < dim; ++i) x.data<float>()[t * dim + i] = row.data<float>()[i];
  return x;
}

double dot_at(const Tensor& a, int64_t t, const Tensor& b, int64_t s) {
  const int64_t dim = a.dim(3);
  double total = 0;
  for (int64_t i = 0; i < dim; ++i)
    total += static_cast<double>(a.data<float>()[t * dim + i]) * b.data<float>()[s * dim + i];
  return total;
}

}  // namespace

TEST_CASE("rope matches the rotate-half formula") {
  rex::Generator gen(7);
  struct Case {
    Shape shape;
    float theta;
    int64_t offset;
  };
  const std::vector<Case> cases = {{Shape{1, 1, 5, 2}, 10000.0f, 0},
                                   {Shape{2, 3, 7, 8}, 10000.0f, 0},
                                   {Shape{2, 2, 4, 16}, 500000.0f, 13},
                                   {Shape{1, 3, 6, 6}, 100.0f, 1000}};
  for (const Case& c : cases) {
    CAPTURE(c.shape);
    const Tensor x = rex::normal(c.shape, gen);
    const Tensor y = rex::rope(x, c.theta, c.offset);
    REQUIRE(y.shape() == c.shape);
    const std::vector<double> want = naive_rope(x, c.theta, c.offset);
    // x_a cos -+ x_b sin with the tables rounded to float: 4 roundings of |x_a| + |x_b|, which
    // is below 10 for these normal samples: within 10 gamma_4 of Approx's 1 + |y|.
    for (int64_t j = 0; j < y.numel(); ++j)
      CHECK(y.data<float>()[j] ==
            doctest::Approx(want[static_cast<size_t>(j)]).epsilon(10 * rex::testing::gamma_n(4)));
  }
}

TEST_CASE("rope leaves position 0 unchanged and turns position p by p radians when D = 2") {
  // D = 2: one pair with inv_freq 1, so position p rotates (a, b) by p radians.
  const Tensor x = rex::from_vector<float>({3.0f, -1.0f, 3.0f, -1.0f}, Shape{1, 1, 2, 2});
  const Tensor y = rex::rope(x);
  CHECK(y.at({0, 0, 0, 0}) == 3.0f);
  CHECK(y.at({0, 0, 0, 1}) == -1.0f);
  // As above (|x_a| + |x_b| = 4), inside Approx's default 100 float epsilons.
  CHECK(y.at({0, 0, 1, 0}) == doctest::Approx(3.0 * std::cos(1.0) + std::sin(1.0)));
  CHECK(y.at({0, 0, 1, 1}) == doctest::Approx(-std::cos(1.0) + 3.0 * std::sin(1.0)));
}

TEST_CASE("rope preserves the norm of every (i, i + D/2) pair") {
  rex::Generator gen(11);
  const Tensor x = rex::normal(Shape{2, 3, 9, 10}, gen);
  const Tensor y = rex::rope(x, 10000.0f, 5);
  const int64_t half = 5;
  for (int64_t row = 0; row < x.numel() / 10; ++row) {
    for (int64_t i = 0; i < half; ++i) {
      const float* px = x.data<float>() + row * 10;
      const float* py = y.data<float>() + row * 10;
      const double before = std::hypot(px[i], px[i + half]);
      const double after = std::hypot(py[i], py[i + half]);
      // Each of the pair within 4 u of |x_a| + |x_b| <= sqrt 2 |pair|: 6 u, below 1e-5.
      CHECK(after == doctest::Approx(before).epsilon(6 * rex::testing::kUnitRoundoff));
    }
  }
}

TEST_CASE("rope dot products depend only on the relative position, and offset shifts positions") {
  rex::Generator gen(3);
  const int64_t time = 12, dim = 8;
  const Tensor q = rex::rope(repeat_over_time(rex::normal(Shape{dim}, gen), time));
  const Tensor k = rex::rope(repeat_over_time(rex::normal(Shape{dim}, gen), time));
  for (int64_t t = 0; t < time; ++t) {
    for (int64_t s = 0; s < time; ++s) {
      // Shift both positions down to the smaller of them being 0.
      const int64_t m = std::min(t, s);
      // Each rotated element within 4 u of |x_a| + |x_b|, then a double dot of 8: the
      // difference of two such dots is within 2 * 4 u * 2 |q| |k| (about 100 u for these
      // normal vectors, |q| |k| < 8), inside 1e-4 of 1 + |dot|.
      CHECK(dot_at(q, t, k, s) == doctest::Approx(dot_at(q, t - m, k, s - m)).epsilon(1e-4));
    }
  }
  // Position offset o at step t is position t + o.
  const Tensor x = rex::normal(Shape{2, 2, 20, dim}, gen);
  const Tensor late = rex::rope(rex::slice(x, 2, 4, 20), 10000.0f, 4);
  const Tensor full = rex::slice(rex::rope(x), 2, 4, 20);
  for (int64_t j = 0; j < late.numel(); ++j)
    // The same angles (position t + offset in double), so the same bits.
    CHECK(late.data<float>()[j] == full.data<float>()[j]);
}

TEST_CASE("rope gradient") {
  rex::Generator gen(5);
  for (const Shape& shape : {Shape{1, 1, 3, 2}, Shape{2, 3, 4, 6}, Shape{1, 2, 5, 8}}) {
    CAPTURE(shape);
    Tensor x = rex::normal(shape, gen);
    x.requires_grad_();
    CHECK_GRADIENTS([](const std::vector<Tensor>& in) { return rex::rope(in[0]); }, {x});
    CHECK_GRADIENTS([](const std::vector<Tensor>& in) { return rex::rope(in[0], 50.0f, 17); }, {x});
  }
}

TEST_CASE("rope backward is the inverse rotation: rope then its gradient map is the identity") {
  rex::Generator gen(9);
  Tensor x = rex::normal(Shape{2, 2, 6, 4}, gen);
  x.requires_grad_();
  const Tensor g = rex::normal(x.shape(), gen);
  rex::rope(x, 10000.0f, 3).backward(rex::rope(g, 10000.0f, 3));
  for (int64_t j = 0; j < g.numel(); ++j)
    // Two rotations: within 2 (4 u)(|g_a| + |g_b|) <= 8 u * 10 for these normal samples.
    CHECK(x.grad().data<float>()[j] ==
          doctest::Approx(g.data<float>()[j]).epsilon(80 * rex::testing::kUnitRoundoff));
}

TEST_CASE("rope rejects bad inputs") {
  const Tensor x3 = rex::zeros(Shape{2, 3, 4});
  CHECK_THROWS_AS(rex::rope(x3), rex::Error);
  CHECK(error_message([&] { rex::rope(x3); }).find("rope") == 0);
  CHECK(error_message([&] { rex::rope(x3); }).find("[2, 3, 4]") != std::string::npos);
  const Tensor odd = rex::zeros(Shape{1, 2, 3, 5});
  CHECK_THROWS_AS(rex::rope(odd), rex::Error);
  CHECK(error_message([&] { rex::rope(odd); }).find("even") != std::string::npos);
  CHECK_THROWS_AS(rex::rope(rex::zeros(Shape{1, 1, 2, 4}), 0.0f), rex::Error);
  CHECK_THROWS_AS(rex::rope(rex::zeros(Shape{1, 1, 2, 4}), -1.0f), rex::Error);
  CHECK_THROWS_AS(rex::rope(Tensor::empty(Shape{1, 1, 2, 4}, rex::DType::i32)), rex::Error);
}

TEST_CASE("rope_heads: the bits of rope over the permuted heads, time first, gradient included") {
  rex::Generator gen(11);
  for (const auto& [shape, heads] : std::vector<std::pair<Shape, int64_t>>{
           {Shape{2, 7, 24}, 3}, {Shape{1, 1, 8}, 2}, {Shape{3, 5, 16}, 1}}) {
    CAPTURE(shape);
    const int64_t batch = shape[0], time = shape[1], head_dim = shape[2] / heads;
    Tensor x = rex::normal(shape, gen).requires_grad_();
    const Tensor g = rex::normal(Shape{batch, time, heads, head_dim}, gen);
    const Tensor fused = rex::rope_heads(x, heads, 500.0f, 4);
    fused.backward(g);
    const std::string fused_grad = rex::testing::raw_bytes(x.grad());
    x.zero_grad();
    const Tensor composed = rex::permute(
        rex::rope(rex::permute(rex::reshape(x, {batch, time, heads, head_dim}), {0, 2, 1, 3}),
                  500.0f, 4),
        {0, 2, 1, 3});
    composed.backward(g);
    CHECK(fused.shape() == composed.shape());
    CHECK(rex::testing::raw_bytes(fused) == rex::testing::raw_bytes(composed));
    CHECK(fused_grad == rex::testing::raw_bytes(x.grad()));
  }
  Tensor x = rex::normal(Shape{2, 3, 8}, gen).requires_grad_();
  CHECK_GRADIENTS([](const std::vector<Tensor>& in) { return rex::rope_heads(in[0], 2, 50.0f, 3); },
                  {x});
  CHECK(error_message([] {
          rex::rope_heads(rex::zeros(Shape{1, 2, 9}), 3);
        }).find("rope_heads: expected x [B, T, H D] with an even head size") == 0);
}

TEST_CASE("rope_qk: the bits of rope_heads of q and of k side by side, gradients included") {
  rex::Generator gen(12);
  rex::testing::check_rope_qk(2, 7, 4, 2, 6, rex::Device::cpu(), gen);
  rex::testing::check_rope_qk(1, 1, 1, 1, 2, rex::Device::cpu(), gen);
  rex::testing::check_rope_qk(3, 20, 3, 3, 16, rex::Device::cpu(), gen);
  const Tensor q = rex::normal(Shape{2, 3, 8}, gen).requires_grad_();
  const Tensor k = rex::normal(Shape{2, 3, 4}, gen).requires_grad_();
  CHECK_GRADIENTS(
      [](const std::vector<Tensor>& in) { return rex::rope_qk(in[0], in[1], 2, 1, 50.0f, 3); },
      {q, k});
  CHECK(error_message([] {
          rex::rope_qk(rex::zeros(Shape{1, 2, 8}), rex::zeros(Shape{1, 2, 6}), 2, 1);
        }).find("rope_qk: expected q [B, T, Hq D] and k [B, T, Hkv D] with one even head size") ==
        0);
}
