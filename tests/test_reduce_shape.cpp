// Reductions (sum, mean, max) and shape ops (reshape, permute, transpose, slice, concat, stack):
// values against naive loops, gradients by central differences, errors.
#include <doctest/doctest.h>

#include "gradcheck.hpp"
#include "rounding.hpp"
#include "testing.hpp"

using rex::Shape;
using rex::Tensor;
using rex::testing::random_normal_param;

TEST_CASE("sum and mean over each axis, with and without keepdim") {
  rex::Generator gen(1);
  Tensor x = random_normal_param({2, 3, 4}, gen);
  for (int64_t axis = -3; axis < 3; ++axis) {
    for (bool keepdim : {false, true}) {
      CAPTURE(axis);
      CAPTURE(keepdim);
      Tensor s = rex::sum(x, axis, keepdim), m = rex::mean(x, axis, keepdim);
      const int64_t a = axis < 0 ? axis + 3 : axis;
      CHECK(s.rank() == (keepdim ? 3 : 2));
      CHECK(s.numel() == 24 / x.dim(a));
      // Naive: for every element of x, add it into its reduced slot.
      std::vector<double> expect(static_cast<size_t>(s.numel()), 0.0);
      std::vector<double> magnitude(expect.size(), 0.0);  // sum of |x| per slot
      for (int64_t i = 0; i < 2; ++i)
        for (int64_t j = 0; j < 3; ++j)
          for (int64_t k = 0; k < 4; ++k) {
            int64_t idx[3] = {i, j, k};
            idx[a] = 0;
            const int64_t slot = (idx[0] * (a == 1 ? 1 : 3) + idx[1]) * (a == 2 ? 1 : 4) + idx[2];
            expect[static_cast<size_t>(slot)] += x.at({i, j, k});
            magnitude[static_cast<size_t>(slot)] += std::abs(x.at({i, j, k}));
          }
      // A float sum of n terms in any order: within gamma_(n-1) of the sum of |terms|; the mean
      // divides (one more rounding).
      const auto n = static_cast<double>(x.dim(a));
      for (int64_t r = 0; r < s.numel(); ++r) {
        const auto i = static_cast<size_t>(r);
        CHECK(std::abs(s.data<float>()[r] - expect[i]) <= rex::testing::gamma_n(n) * magnitude[i]);
        CHECK(std::abs(m.data<float>()[r] - expect[i] / n) <=
              rex::testing::gamma_n(n + 1) * magnitude[i] / n);
      }
      CHECK_GRADIENTS([=](const auto& in) { return rex::sum(in[0], axis, keepdim); }, {x});
      CHECK_GRADIENTS([=](const auto& in) { return rex::mean(in[0], axis, keepdim); }, {x});
    }
  }
  double total = 0, magnitude = 0;
  for (float v : x.to_vector()) total += v, magnitude += std::abs(v);
  CHECK(rex::sum(x).rank() == 0);
  // As above, 24 terms.
  CHECK(std::abs(rex::sum(x).item() - total) <= rex::testing::gamma_n(24) * magnitude);
  CHECK(std::abs(rex::mean(x).item() - total / 24) <= rex::testing::gamma_n(25) * magnitude / 24);
  CHECK_GRADIENTS([](const auto& in) { return rex::sum(in[0]); }, {x});
  CHECK_GRADIENTS([](const auto& in) { return rex::mean(in[0]); }, {x});
}

TEST_CASE("max over an axis routes the gradient to the maximum; ties to the first") {
  rex::Generator gen(2);
  Tensor x = random_normal_param({3, 5}, gen);  // continuous random values: no ties
  Tensor m = rex::max(x, 1);
  for (int64_t i = 0; i < 3; ++i) {
    float best = x.at({i, 0});
    for (int64_t j = 1; j < 5; ++j) best = std::max(best, x.at({i, j}));
    CHECK(m.at({i}) == best);
  }
  CHECK(rex::max(x, 0, true).shape() == Shape{1, 5});
  CHECK_GRADIENTS([](const auto& in) { return rex::max(in[0], 1); }, {x});
  CHECK_GRADIENTS([](const auto& in) { return rex::max(in[0], 0, true); }, {x});
  CHECK_GRADIENTS([](const auto& in) { return rex::max(in[0]); }, {x});

  Tensor tie = rex::from_vector<float>({1, 3, 3, 2}, {1, 4});
  tie.requires_grad_();
  rex::sum(rex::max(tie, 1)).backward();
  CHECK(tie.grad().to_vector() == std::vector<float>{0, 1, 0, 0});
}

TEST_CASE("reshape infers -1, is a view, and reshapes the gradient back") {
  rex::Generator gen(3);
  Tensor x = random_normal_param({2, 6}, gen);
  Tensor r = rex::reshape(x, {3, -1, 2});
  CHECK(r.shape() == Shape{3, 2, 2});
  CHECK(r.at({2, 1, 1}) == x.at({1, 5}));
  CHECK_GRADIENTS([](const auto& in) { return rex::reshape(in[0], {4, 3}) * 2.0f; }, {x});
  CHECK_THROWS_WITH_AS(rex::reshape(x, {5, 2}),
                       "reshape: cannot reshape [2, 6] (12 elements) into [5, 2] (10 elements)",
                       rex::Error);
  CHECK_THROWS_AS(rex::reshape(x, {-1, -1}), rex::Error);
  CHECK_THROWS_AS(rex::reshape(x, {5, -1}), rex::Error);
}

TEST_CASE("permute and transpose move elements and invert in the backward") {
  rex::Generator gen(4);
  Tensor x = random_normal_param({2, 3, 4}, gen);
  Tensor p = rex::permute(x, {2, 0, 1});
  REQUIRE(p.shape() == Shape{4, 2, 3});
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t j = 0; j < 3; ++j)
      for (int64_t k = 0; k < 4; ++k) CHECK(p.at({k, i, j}) == x.at({i, j, k}));
  Tensor t = rex::transpose(x, 0, -1);
  REQUIRE(t.shape() == Shape{4, 3, 2});
  CHECK(t.at({3, 1, 0}) == x.at({0, 1, 3}));
  CHECK_GRADIENTS([](const auto& in) { return rex::permute(in[0], {2, 0, 1}); }, {x});
  CHECK_GRADIENTS([](const auto& in) { return rex::transpose(in[0], 1, 2); }, {x});
  CHECK_THROWS_AS(rex::permute(x, {0, 0, 1}), rex::Error);
  CHECK_THROWS_AS(rex::permute(x, {0, 1}), rex::Error);
}

TEST_CASE("a large permute, copied in parallel runs, moves every element") {
  // [B, T, H, D] to [B, H, T, D] (splitting attention heads) and a full reversal, both above the
  // parallel threshold, against an index loop.
  rex::Generator gen(5);
  const int64_t b = 3, t = 70, h = 4, d = 33;
  const Tensor x = rex::normal({b, t, h, d}, gen);
  const Tensor heads = rex::permute(x, {0, 2, 1, 3}), reversed = rex::permute(x, {3, 2, 1, 0});
  const float* px = x.data<float>();
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < t; ++j)
      for (int64_t k = 0; k < h; ++k)
        for (int64_t l = 0; l < d; ++l) {
          const float v = px[((i * t + j) * h + k) * d + l];
          REQUIRE(heads.data<float>()[((i * h + k) * t + j) * d + l] == v);
          REQUIRE(reversed.data<float>()[((l * h + k) * t + j) * b + i] == v);
        }
}

TEST_CASE("slice along any axis; gradient lands in the sliced window") {
  rex::Generator gen(5);
  Tensor x = random_normal_param({3, 4, 5}, gen);
  for (int64_t axis = 0; axis < 3; ++axis) {
    CAPTURE(axis);
    Tensor s = rex::slice(x, axis, 1, 3);
    CHECK(s.dim(axis) == 2);
    CHECK(s.at({1, 1, 1}) == x.at({axis == 0 ? 2 : 1, axis == 1 ? 2 : 1, axis == 2 ? 2 : 1}));
    CHECK_GRADIENTS([=](const auto& in) { return rex::slice(in[0], axis, 1, 3); }, {x});
  }
  CHECK_THROWS_WITH_AS(rex::slice(x, 1, 2, 5),
                       "slice: range [2, 5) is not within axis 1 of shape [3, 4, 5]", rex::Error);
}

TEST_CASE("concat and stack along several axes") {
  rex::Generator gen_a(6), gen_b(7), gen_c(8);
  Tensor a = random_normal_param({2, 3}, gen_a), b = random_normal_param({2, 1}, gen_b),
         c = random_normal_param({2, 2}, gen_c);
  Tensor cat = rex::concat({a, b, c}, 1);
  REQUIRE(cat.shape() == Shape{2, 6});
  for (int64_t i = 0; i < 2; ++i) {
    CHECK(cat.at({i, 0}) == a.at({i, 0}));
    CHECK(cat.at({i, 3}) == b.at({i, 0}));
    CHECK(cat.at({i, 5}) == c.at({i, 1}));
  }
  CHECK_GRADIENTS([](const auto& in) { return rex::concat({in[0], in[1], in[2]}, -1); }, {a, b, c});
  rex::Generator gen_d(9);
  Tensor d = random_normal_param({1, 3}, gen_d);
  CHECK_GRADIENTS([](const auto& in) { return rex::concat({in[0], in[1]}, 0); }, {a, d});

  rex::Generator gen_e(10);
  Tensor e = random_normal_param({2, 3}, gen_e);
  for (int64_t axis : {0, 1, 2, -1}) {
    CAPTURE(axis);
    Tensor s = rex::stack({a, e}, axis);
    const int64_t at = axis < 0 ? 2 : axis;
    CHECK(s.dim(at) == 2);
    CHECK(rex::reshape(rex::slice(s, at, 0, 1), {2, 3}).to_vector() == a.to_vector());
    CHECK(rex::reshape(rex::slice(s, at, 1, 2), {2, 3}).to_vector() == e.to_vector());
    CHECK_GRADIENTS([=](const auto& in) { return rex::stack({in[0], in[1]}, axis); }, {a, e});
  }
  CHECK_THROWS_WITH_AS(rex::concat({a, d}, 1),
                       "concat: shape [1, 3] (f32) does not match [2, 3] (f32) outside axis 1",
                       rex::Error);
  CHECK_THROWS_AS(rex::stack({a, b}, 0), rex::Error);
  CHECK_THROWS_AS(rex::concat({}, 0), rex::Error);
}
