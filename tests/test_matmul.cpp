// matmul: 2-d, transposed operands, batched with broadcasting, against a naive triple loop in
// double; gradients by central differences for every flag combination; shape errors; products
// large enough to be split, against a derived bound and at several thread counts; the tf32 and
// bf16 precisions against products of independently rounded operands.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <utility>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <rex/backend/cuda/runtime.hpp>

#include "gradcheck.hpp"
#include "rounding.hpp"
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

TEST_CASE("large products: a derived bound, tiles equal to the whole product, 1-3 threads") {
  // rex's gemm splits C into a grid of tiles, one per thread, with edges on whole register blocks
  // (rex/backend/cpu/gemm.hpp), so that a tile's elements are computed exactly as in the whole
  // product: every grid must give the same bytes, and so must every thread count. Each element is
  // a sum of k products; in any order, recursive summation with rounded products (or FMAs) stays
  // within gamma_k * sum_p |a_ip b_pj| of the exact value, gamma_k = k u / (1 - k u), u = 2^-24
  // (Higham, Accuracy and Stability of Numerical Algorithms, section 3.1); with accumulation the
  // old c is one more term. The shapes leave remainders on both sides (97 = 6 x 16 + 1 rows,
  // 301 = 6 x 48 + 13 columns), or are the model's (768 tokens, 128 features), or a weight
  // gradient's (a small C, a long k).
  struct Case {
    int64_t m, n, k;
  };
  struct Grid {
    int64_t rows, columns;
  };
  const std::vector<Grid> grids = {{1, 1}, {2, 1}, {3, 1}, {1, 2}, {2, 2}, {5, 3}, {6, 6}};
  for (const Case& c :
       {Case{97, 301, 333}, Case{768, 128, 128}, Case{128, 128, 768}, Case{96, 1000, 64}}) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        for (bool accumulate : {false, true}) {
          CAPTURE(c.m);
          CAPTURE(c.n);
          CAPTURE(c.k);
          CAPTURE(ta);
          CAPTURE(tb);
          CAPTURE(accumulate);
          rex::Generator gen(7);
          Tensor a = random_normal_param(ta ? Shape{c.k, c.m} : Shape{c.m, c.k}, gen);
          Tensor b = random_normal_param(tb ? Shape{c.n, c.k} : Shape{c.k, c.n}, gen);
          Tensor start = random_normal_param({c.m, c.n}, gen);
          const float *pa = a.data<float>(), *pb = b.data<float>();
          // The product on the given grid of tiles, or (null) with rex's own choice.
          auto product = [&](const Grid* grid) {
            Tensor out = start.detach().clone();
            const rex::detail::GemmOperands g{pa, pb, out.data<float>(), c.m, c.n, c.k,
                                              ta, tb, accumulate};
            if (grid) {
              rex::detail::gemm_tiled(g, grid->rows, grid->columns);
            } else {
              rex::detail::gemm(pa, pb, out.data<float>(), c.m, c.n, c.k, ta, tb, accumulate);
            }
            return out;
          };
          const Tensor whole = product(&grids.front());
          const double terms = static_cast<double>(c.k + (accumulate ? 1 : 0));
          const double u = std::ldexp(1.0, -24), gamma = terms * u / (1 - terms * u);
          int64_t outside = 0;
          for (int64_t i = 0; i < c.m; ++i) {
            for (int64_t j = 0; j < c.n; ++j) {
              double exact = accumulate ? start.data<float>()[i * c.n + j] : 0.0;
              double magnitude = std::abs(exact);
              for (int64_t p = 0; p < c.k; ++p) {
                const double term = static_cast<double>(ta ? pa[p * c.m + i] : pa[i * c.k + p]) *
                                    (tb ? pb[j * c.k + p] : pb[p * c.n + j]);
                exact += term;
                magnitude += std::abs(term);
              }
              outside += std::abs(whole.data<float>()[i * c.n + j] - exact) > gamma * magnitude;
            }
          }
          CHECK(outside == 0);
          for (const Grid& grid : grids)
            CHECK_MESSAGE(rex::testing::same_bytes(product(&grid), whole), "a grid of ", grid.rows,
                          " x ", grid.columns, " tiles");
#ifdef _OPENMP
          const int threads = omp_get_max_threads();
          for (int t : {1, 2, 3}) {
            omp_set_num_threads(t);
            CHECK_MESSAGE(rex::testing::same_bytes(product(nullptr), whole), t, " threads");
          }
          omp_set_num_threads(threads);
#endif
        }
      }
    }
  }
}

using rex::testing::CpuPrecision, rex::testing::rounded_to_bits;

TEST_CASE("bf16 and tf32 rounding: ties to even, infinities, NaN and overflow") {
  using rex::detail::round_to_bf16, rex::detail::round_to_tf32;
  CHECK(round_to_bf16(1.0f + 0x1p-8f) == 1.0f);                       // a tie, 1 is even
  CHECK(round_to_bf16(1.0f + 0x1p-7f + 0x1p-8f) == 1.0f + 0x1p-6f);   // a tie, odd rounds up
  CHECK(round_to_bf16(1.0f + 0x1p-8f + 0x1p-20f) == 1.0f + 0x1p-7f);  // above the tie
  CHECK(round_to_tf32(1.0f + 0x1p-11f) == 1.0f);
  CHECK(round_to_tf32(1.0f + 0x1p-11f + 0x1p-20f) == 1.0f + 0x1p-10f);
  CHECK(round_to_bf16(-3.0f) == -3.0f);
  CHECK(std::signbit(round_to_bf16(-0.0f)));
  CHECK(round_to_bf16(INFINITY) == INFINITY);
  CHECK(round_to_bf16(-INFINITY) == -INFINITY);
  CHECK(std::isnan(round_to_bf16(NAN)));
  CHECK(std::isinf(round_to_bf16(std::numeric_limits<float>::max())));  // past bf16's largest
  CHECK(round_to_bf16(0x1.fep127f) == 0x1.fep127f);                     // bf16's largest
  // Subnormals round at the same bit positions.
  CHECK(round_to_bf16(0x1p-130f + 0x1p-149f) == 0x1p-130f);
  CHECK(round_to_bf16(0x1p-140f) == 0.0f);  // below bf16's smallest subnormal, 2^-133
}

TEST_CASE(
    "matmul in tf32 and bf16 multiplies rounded operands and sums in fp32, forward and back") {
  // c = round(a) round(b): each product of two 8- or 11-bit significands is exact in float, so
  // the only other error is the fp32 sum, within gamma_k sum |a_p b_p| of the exact sum.
  const int64_t m = 19, k = 37, n = 23;
  for (const auto& [name, bits] : {std::pair{"bf16", 8}, std::pair{"tf32", 11}}) {
    for (bool ta : {false, true}) {
      CAPTURE(name);
      CAPTURE(ta);
      rex::Generator gen(7);
      const Tensor a = rex::normal(ta ? Shape{k, m} : Shape{m, k}, gen);
      const Tensor b = rex::normal(Shape{n, k}, gen);
      const Tensor g = rex::normal(Shape{m, n}, gen);
      Tensor a_param = a.clone(), b_param = b.clone();
      a_param.requires_grad_(), b_param.requires_grad_();
      Tensor c, fp32_c = rex::matmul(a, b, {.transpose_a = ta, .transpose_b = true});
      {
        const CpuPrecision scope(name);
        c = rex::matmul(a_param, b_param, {.transpose_a = ta, .transpose_b = true});
        rex::sum(c * g).backward();
      }
      const double gamma = rex::testing::gamma_n(static_cast<double>(k));
      const double gamma_n = rex::testing::gamma_n(static_cast<double>(n));
      int differs = 0;
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double exact = 0, magnitude = 0;
          for (int64_t p = 0; p < k; ++p) {
            const double term = rounded_to_bits(static_cast<float>(op_at(a, ta, i, p)), bits) *
                                rounded_to_bits(b.at({j, p}), bits);
            exact += term, magnitude += std::fabs(term);
          }
          CHECK(std::fabs(c.at({i, j}) - exact) <= gamma * magnitude);
          differs += std::fabs(fp32_c.at({i, j}) - exact) > gamma * magnitude;
        }
        // dA = round(g) round(b) (B read transposed): row i of op(a)'s gradient.
        for (int64_t p = 0; p < k; ++p) {
          double exact = 0, magnitude = 0;
          for (int64_t j = 0; j < n; ++j) {
            const double term =
                rounded_to_bits(g.at({i, j}), bits) * rounded_to_bits(b.at({j, p}), bits);
            exact += term, magnitude += std::fabs(term);
          }
          const float got = ta ? a_param.grad().at({p, i}) : a_param.grad().at({i, p});
          CHECK(std::fabs(got - exact) <= gamma_n * magnitude);
        }
      }
      // The fp32 product of the same operands is outside that bound almost everywhere: the
      // setting changed the arithmetic.
      CHECK(differs > m * n / 2);
    }
  }
}
