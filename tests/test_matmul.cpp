// matmul: 2-d, transposed operands, batched with broadcasting, against a naive triple loop in
// double; gradients by central differences for every flag combination; shape errors.
#include <doctest/doctest.h>

#include "gradcheck.hpp"
#include "testing.hpp"

using rex::Shape;
using rex::Tensor;
using rex::testing::random_normal_param;

namespace {

// Element (i, j) of op(a) for a 2-d tensor stored as given.
double op_at(const Tensor& m, bool transposed, int64_t i, int64_t j) {
  return transposed ? m.at({j, i}) : m.at({i, j});
}

}  // namespace

TEST_CASE("2-d matmul with every transpose combination matches a naive loop") {
  const int64_t m = 5, k = 7, n = 3;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      CAPTURE(ta);
      CAPTURE(tb);
      rex::Generator gen_a(1), gen_b(2);
      Tensor a = random_normal_param(ta ? Shape{k, m} : Shape{m, k}, gen_a);
      Tensor b = random_normal_param(tb ? Shape{n, k} : Shape{k, n}, gen_b);
      Tensor c = rex::matmul(a, b, {.transpose_a = ta, .transpose_b = tb});
      REQUIRE(c.shape() == Shape{m, n});
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double expect = 0;
          for (int64_t p = 0; p < k; ++p) expect += op_at(a, ta, i, p) * op_at(b, tb, p, j);
          CHECK(c.at({i, j}) == doctest::Approx(expect).epsilon(1e-5));
        }
      }
      CHECK_GRADIENTS(
          [=](const auto& x) {
            return rex::matmul(x[0], x[1], {.transpose_a = ta, .transpose_b = tb});
          },
          {a, b});
    }
  }
}

TEST_CASE("batched matmul broadcasts leading axes") {
  struct Case {
    Shape a, b, out;
    bool ta, tb;
  };
  const std::vector<Case> cases = {
      {{2, 3, 4}, {2, 4, 5}, {2, 3, 5}, false, false},          // plain batch
      {{2, 3, 4}, {4, 5}, {2, 3, 5}, false, false},             // weight shared over the batch
      {{3, 4}, {2, 4, 5}, {2, 3, 5}, false, false},             // a shared
      {{2, 1, 3, 4}, {1, 3, 5, 4}, {2, 3, 3, 5}, false, true},  // both broadcast, b transposed
      {{2, 4, 3}, {2, 4, 5}, {2, 3, 5}, true, false},           // a transposed
      {{2, 4, 3}, {5, 4}, {2, 3, 5}, true, true},               // 2-d b with transposed batched a
  };
  for (const Case& c : cases) {
    CAPTURE(c.a.str());
    CAPTURE(c.b.str());
    rex::Generator gen_a(3), gen_b(4);
    Tensor a = random_normal_param(c.a, gen_a), b = random_normal_param(c.b, gen_b);
    const rex::MatmulOptions options{.transpose_a = c.ta, .transpose_b = c.tb};
    Tensor out = rex::matmul(a, b, options);
    REQUIRE(out.shape() == c.out);
    // Naive reference: loop over the broadcast batch, mapping each batch index to a's and b's.
    const int64_t m = c.out[-1 + c.out.rank() - 1], n = c.out[c.out.rank() - 1];
    const int64_t k = c.ta ? c.a[c.a.rank() - 2] : c.a[c.a.rank() - 1];
    const int64_t batch = c.out.numel(0, c.out.rank() - 2);
    const Shape out_batch(std::vector<int64_t>(c.out.begin(), c.out.end() - 2));
    for (int64_t bi = 0; bi < batch; ++bi) {
      int64_t rem = bi, off_a = 0, off_b = 0, stride_a = 1, stride_b = 1;
      for (int64_t axis = out_batch.rank() - 1; axis >= 0; --axis) {
        const int64_t i = rem % out_batch[axis];
        rem /= out_batch[axis];
        const int64_t aa = axis - (out_batch.rank() - (c.a.rank() - 2));
        const int64_t ab = axis - (out_batch.rank() - (c.b.rank() - 2));
        if (aa >= 0) off_a += (c.a[aa] == 1 ? 0 : i) * stride_a, stride_a *= c.a[aa];
        if (ab >= 0) off_b += (c.b[ab] == 1 ? 0 : i) * stride_b, stride_b *= c.b[ab];
      }
      const float* pa = a.data<float>() + off_a * m * k;
      const float* pb = b.data<float>() + off_b * k * n;
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double expect = 0;
          for (int64_t p = 0; p < k; ++p)
            expect += static_cast<double>(c.ta ? pa[p * m + i] : pa[i * k + p]) *
                      (c.tb ? pb[j * k + p] : pb[p * n + j]);
          CHECK(out.data<float>()[(bi * m + i) * n + j] == doctest::Approx(expect).epsilon(1e-5));
        }
      }
    }
    CHECK_GRADIENTS([=](const auto& x) { return rex::matmul(x[0], x[1], options); }, {a, b});
  }
}

TEST_CASE("matmul works on views and on 1-row / 1-column products") {
  rex::Generator gen_base(5);
  Tensor base = random_normal_param({6, 4}, gen_base);
  Tensor rows = rex::slice(base, 0, 2, 5);  // a view into base
  rex::Generator gen_w(6);
  Tensor w = random_normal_param({4, 1}, gen_w);
  Tensor out = rex::matmul(rows, w);
  for (int64_t i = 0; i < 3; ++i) {
    double expect = 0;
    for (int64_t p = 0; p < 4; ++p) expect += base.at({i + 2, p}) * w.at({p, 0});
    CHECK(out.at({i, 0}) == doctest::Approx(expect).epsilon(1e-5));
  }
  CHECK_GRADIENTS([](const auto& x) { return rex::matmul(rex::slice(x[0], 0, 2, 5), x[1]); },
                  {base, w});
}

TEST_CASE("matmul shape errors name the op and both shapes") {
  CHECK_THROWS_WITH_AS(rex::matmul(rex::ones({2, 3}), rex::ones({4, 5})),
                       "matmul: inner extents differ: [2, 3] and [4, 5] give 3 vs 4", rex::Error);
  CHECK_THROWS_WITH_AS(rex::matmul(rex::ones({3}), rex::ones({3, 2})),
                       "matmul: operands need at least 2 axes, got [3] and [3, 2]", rex::Error);
  CHECK_THROWS_WITH_AS(rex::matmul(rex::ones({2, 2, 3}), rex::ones({3, 3, 2})),
                       "matmul: shapes [2] and [3] cannot be broadcast together", rex::Error);
}
