// Edge cases across ops: size-0 extents, NaN and infinities, sizes that overflow, gradients that
// alias a leaf's own .grad(), and ops where only some inputs need a gradient (the `needs` paths).
#include <doctest/doctest.h>

#include <cmath>
#include <limits>

#include "gradcheck.hpp"
#include "rounding.hpp"
#include "testing.hpp"

using rex::Shape;
using rex::Tensor;

namespace {

Tensor random_param(const Shape& shape, uint64_t seed) {
  rex::Generator gen(seed);
  return rex::testing::random_uniform_param(shape, gen, 0.5f, 2.0f);
}

Tensor random_constant(const Shape& shape, uint64_t seed) {
  return random_param(shape, seed).detach();
}

}  // namespace

TEST_CASE("size-0 extents flow through forward and backward") {
  Tensor empty = rex::zeros({2, 0}).requires_grad_();
  Tensor full = random_param({2, 3}, 1);
  Tensor cat = rex::concat({empty, full}, 1);
  CHECK(cat.shape() == Shape{2, 3});
  CHECK(cat.to_vector() == full.to_vector());
  rex::sum(cat).backward();
  CHECK(empty.grad().shape() == Shape{2, 0});
  CHECK(full.grad().to_vector() == std::vector<float>(6, 1.0f));

  // A batched product with an empty inner extent is all zeros, with empty gradients.
  Tensor a = rex::zeros({2, 2, 0}).requires_grad_(), b = rex::zeros({0, 3}).requires_grad_();
  Tensor c = rex::matmul(a, b);
  CHECK(c.shape() == Shape{2, 2, 3});
  CHECK(c.to_vector() == std::vector<float>(12, 0.0f));
  rex::sum(c).backward();
  CHECK(a.grad().shape() == Shape{2, 2, 0});
  CHECK(b.grad().shape() == Shape{0, 3});

  CHECK(rex::sum(rex::zeros({0})).item() == 0.0f);
  CHECK(rex::slice(full, 1, 1, 1).shape() == Shape{2, 0});
}

TEST_CASE("max treats NaN as the largest value whatever its position") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(rex::max(rex::from_vector<float>({1.0f, nan})).item()));
  CHECK(std::isnan(rex::max(rex::from_vector<float>({nan, 1.0f})).item()));
  CHECK(rex::max(rex::from_vector<float>({1.0f, 3.0f, 2.0f})).item() == 3.0f);
}

TEST_CASE("softmax rows holding +inf are an error, not NaN") {
  const float inf = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(rex::softmax(rex::from_vector<float>({inf, 1.0f}, {1, 2})),
                       "softmax: row 0 of [1, 2] contains +inf, which has no softmax", rex::Error);
}

TEST_CASE("cross_entropy keeps its gradient accurate for large logits") {
  // Logits near 3e4: the gradient softmax - onehot must still match a double-precision formula.
  const std::vector<double> logits = {30000.0, 30000.5, 29999.0};
  Tensor x = rex::from_vector<float>({30000.0f, 30000.5f, 29999.0f}, {1, 3}).requires_grad_();
  rex::cross_entropy(x, rex::from_vector<int32_t>({0})).backward();
  double total = 0;
  for (double v : logits) total += std::exp(v - 30000.5);
  for (int64_t j = 0; j < 3; ++j) {
    const double expect = std::exp(logits[static_cast<size_t>(j)] - 30000.5) / total - (j == 0);
    // exp(x - lse) with lse from a sum of expf's (2 ulp = 4 u), rounded to float (u), minus the
    // one-hot (u): within 6 u of 1 + |expect| (Approx's scale).
    CHECK(x.grad().at({0, j}) == doctest::Approx(expect).epsilon(rex::testing::gamma_n(6)));
  }
}

TEST_CASE("backward given the leaf's own .grad() as output gradient adds it correctly") {
  Tensor x = rex::from_vector<float>({1.0f, 2.0f}).requires_grad_();
  rex::sum(x).backward();  // x.grad = [1, 1]
  Tensor y = rex::add(x, x);
  y.backward(x.grad());  // adds 2 * [1, 1]
  CHECK(x.grad().to_vector() == std::vector<float>{3.0f, 3.0f});
}

TEST_CASE("sizes that overflow int64 are a clear error") {
  CHECK_THROWS_WITH_AS(Shape({int64_t{1} << 32, int64_t{1} << 32}),
                       "shape: [4294967296, 4294967296] has too many elements", rex::Error);
  CHECK_THROWS_WITH_AS(Tensor::empty(Shape{int64_t{1} << 62}),
                       "tensor of shape [4611686018427387904] is too large to allocate",
                       rex::Error);
  rex::Generator gen(1);
  CHECK_THROWS_AS(gen.below(0), rex::Error);
  Tensor pair = rex::zeros({2});
  CHECK_THROWS_AS(rex::arange(2, rex::DType::i32).fill_(NAN), rex::Error);
  CHECK_THROWS_WITH_AS(rex::mean(pair, 5), "mean: axis 5 is out of range for shape [2]",
                       rex::Error);
}

TEST_CASE("ops give correct gradients when only one input needs one") {
  // Each case checks the gradient of the parameter while the other operand is a constant, which
  // takes the backward paths that skip the constant's gradient.
  const Tensor a = random_param({3, 4}, 2), b = random_param({4}, 3);
  const Tensor ca = random_constant({3, 4}, 4), cb = random_constant({4}, 5);
  CHECK_GRADIENTS([&](const auto& x) { return x[0] - cb; }, {a});
  CHECK_GRADIENTS([&](const auto& x) { return ca - x[0]; }, {b});
  CHECK_GRADIENTS([&](const auto& x) { return x[0] / cb; }, {a});
  CHECK_GRADIENTS([&](const auto& x) { return ca / x[0]; }, {b});
  CHECK_GRADIENTS([&](const auto& x) { return x[0] * cb; }, {a});

  const Tensor m = random_param({4, 5}, 6), cm = random_constant({3, 4}, 7);
  CHECK_GRADIENTS([&](const auto& x) { return rex::matmul(cm, x[0]); }, {m});
  CHECK_GRADIENTS([&](const auto& x) { return rex::matmul(x[0], m.detach()); }, {a});
  CHECK_GRADIENTS([&](const auto& x) { return rex::matmul(x[0], cm, {.transpose_b = true}); },
                  {random_param({2, 4}, 8)});

  const Tensor cond = rex::from_vector<float>({1, 0, 0, 1}, {4});
  CHECK_GRADIENTS([&](const auto& x) { return rex::where(cond, x[0], ca); }, {b});
  CHECK_GRADIENTS([&](const auto& x) { return rex::where(cond, ca, x[0]); }, {b});
  CHECK_GRADIENTS(
      [&](const auto& x) {
        return rex::concat({ca, x[0]}, 0);
      },
      {random_param({2, 4}, 9)});
}

TEST_CASE("backward given a leaf's .grad() stays correct while that gradient fans out") {
  // out = 2x + 3w (operands in both orders, so either branch may run first); the output gradient R
  // is x's own .grad(). x's in-place accumulation must not change the R that w's branch reads.
  for (bool x_first : {true, false}) {
    CAPTURE(x_first);
    Tensor x = rex::from_vector<float>({1.0f, 2.0f}).requires_grad_();
    Tensor w = rex::from_vector<float>({5.0f, 7.0f}).requires_grad_();
    rex::sum(x).backward();  // x.grad = R = [1, 1]
    Tensor out = x_first ? rex::add(x * 2.0f, w * 3.0f) : rex::add(w * 3.0f, x * 2.0f);
    out.backward(x.grad());
    CHECK(x.grad().to_vector() == std::vector<float>{3.0f, 3.0f});
    CHECK(w.grad().to_vector() == std::vector<float>{3.0f, 3.0f});
  }
}
