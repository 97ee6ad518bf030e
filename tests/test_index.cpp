// Tests for rex/ops/index.hpp: gather_rows, scatter_add_rows, permute_rows, embedding, where,
// masked_fill.
// Forwards are compared with naive loops written here, gradients with central differences, where
// and masked_fill also with compositions of arithmetic ops (values and gradients).
#include <doctest/doctest.h>

#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "gradcheck.hpp"
#include "rounding.hpp"
#include "testing.hpp"

using namespace rex;
using rex::testing::contains;
using rex::testing::error_message;
using rex::testing::gradcheck;

namespace {

Tensor random_ids(const Shape& shape, int64_t below, Generator& gen) {
  Tensor ids = Tensor::empty(shape, DType::i32);
  for (int64_t i = 0; i < ids.numel(); ++i)
    ids.data<int32_t>()[i] = static_cast<int32_t>(gen.below(static_cast<uint64_t>(below)));
  return ids;
}

// A 0/1 tensor of the given shape and dtype with ones where `pick(flat index)` holds.
template <class Pick>
Tensor mask_of(const Shape& shape, DType dtype, Pick pick) {
  Tensor m = Tensor::empty(shape, dtype);
  for (int64_t i = 0; i < m.numel(); ++i) {
    if (dtype == DType::i32) {
      m.data<int32_t>()[i] = pick(i) ? 1 : 0;
    } else {
      m.data<float>()[i] = pick(i) ? 1.0f : 0.0f;
    }
  }
  return m;
}

// Max |a - b| between two tensors of one shape.
float max_abs_diff(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  float worst = 0;
  for (int64_t i = 0; i < a.numel(); ++i)
    worst = std::max(worst, std::abs(a.data<float>()[i] - b.data<float>()[i]));
  return worst;
}

}  // namespace

TEST_CASE("gather_rows: forward picks rows, repeats included") {
  Generator gen(1);
  const Tensor x = normal({5, 3}, gen);
  const Tensor index = from_vector<int32_t>({4, 0, 4, 2, 2, 2, 1});
  const Tensor y = gather_rows(x, index);
  REQUIRE(y.shape() == Shape{7, 3});
  const std::vector<int32_t> idx = index.to_vector<int32_t>();
  for (int64_t i = 0; i < 7; ++i)
    for (int64_t j = 0; j < 3; ++j) CHECK(y.at({i, j}) == x.at({idx[static_cast<size_t>(i)], j}));

  const Tensor empty = gather_rows(x, Tensor::empty(Shape{0}, DType::i32));
  CHECK(empty.shape() == Shape{0, 3});
}

TEST_CASE("gather_rows: gradient") {
  Generator gen(2);
  for (auto [n, d, m] : std::vector<std::array<int64_t, 3>>{{5, 3, 7}, {4, 6, 2}, {3, 1, 9}}) {
    Tensor x = normal({n, d}, gen).requires_grad_();
    const Tensor index = random_ids({m}, n, gen);
    CHECK_GRADIENTS([&](const std::vector<Tensor>& in) { return gather_rows(in[0], index); }, {x});
  }
  // Closed form: the gradient of sum(gather_rows(x, idx)) counts how often each row is picked.
  Tensor x = normal({4, 2}, gen).requires_grad_();
  sum(gather_rows(x, from_vector<int32_t>({3, 1, 3, 3}))).backward();
  const std::vector<float> expected{0, 0, 1, 1, 0, 0, 3, 3};
  CHECK(x.grad().to_vector() == expected);
}

TEST_CASE("scatter_add_rows: repeated indices accumulate in order") {
  Generator gen(3);
  const int64_t m = 9, d = 4, rows = 6;
  const Tensor src = normal({m, d}, gen);
  const Tensor index = from_vector<int32_t>({5, 0, 5, 5, 2, 0, 5, 3, 0});
  const Tensor out = scatter_add_rows(src, index, rows);
  REQUIRE(out.shape() == Shape{rows, d});
  // Added in float in index order, as scatter_add_rows promises: the same bits.
  std::vector<float> expected(static_cast<size_t>(rows * d), 0.0f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < d; ++j)
      expected[static_cast<size_t>(index.data<int32_t>()[i] * d + j)] += src.at({i, j});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < d; ++j)
      CHECK(out.at({r, j}) == expected[static_cast<size_t>(r * d + j)]);
  // Rows 1 and 4 receive nothing and stay exactly zero.
  for (int64_t j = 0; j < d; ++j) {
    CHECK(out.at({1, j}) == 0.0f);
    CHECK(out.at({4, j}) == 0.0f);
  }
  // Deterministic: a second run gives the same bits.
  CHECK(scatter_add_rows(src, index, rows).to_vector() == out.to_vector());
}

TEST_CASE("scatter_add_rows: gradient") {
  Generator gen(4);
  for (auto [m, d, rows] : std::vector<std::array<int64_t, 3>>{{7, 3, 4}, {2, 5, 6}, {8, 1, 3}}) {
    Tensor src = normal({m, d}, gen).requires_grad_();
    const Tensor index = random_ids({m}, rows, gen);
    CHECK_GRADIENTS(
        [&](const std::vector<Tensor>& in) { return scatter_add_rows(in[0], index, rows); }, {src});
  }
}

TEST_CASE("gather_rows and scatter_add_rows are adjoint: <gather(x), y> = <x, scatter(y)>") {
  Generator gen(5);
  const Tensor x = normal({6, 4}, gen), y = normal({10, 4}, gen);
  const Tensor index = random_ids({10}, 6, gen);
  const Tensor gx = gather_rows(x, index), sy = scatter_add_rows(y, index, 6);
  double lhs = 0, rhs = 0, magnitude = 0;
  for (int64_t i = 0; i < gx.numel(); ++i) {
    lhs += double{gx.data<float>()[i]} * y.data<float>()[i];
    magnitude += std::abs(double{gx.data<float>()[i]} * y.data<float>()[i]);
  }
  for (int64_t i = 0; i < x.numel(); ++i) rhs += double{x.data<float>()[i]} * sy.data<float>()[i];
  // lhs is exact up to double rounding; sy sums at most 10 rows of y in float (gamma_9 of their
  // magnitudes), so rhs is within gamma_9 sum |x y| (plus double rounding, covered by gamma_10).
  CHECK(std::abs(lhs - rhs) <= rex::testing::gamma_n(10) * magnitude);
}

TEST_CASE("embedding: [2, 3] ids give [2, 3, d] rows, gradient scatter-adds") {
  Generator gen(6);
  const int64_t vocab = 5, d = 4;
  Tensor weight = normal({vocab, d}, gen).requires_grad_();
  const Tensor ids = from_vector<int32_t>({1, 4, 1, 0, 3, 1}, Shape{2, 3});
  const Tensor y = embedding(weight, ids);
  REQUIRE(y.shape() == Shape{2, 3, d});
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < 3; ++t)
      for (int64_t j = 0; j < d; ++j)
        CHECK(y.at({b, t, j}) == weight.at({static_cast<int64_t>(ids.at({b, t})), j}));

  sum(y).backward();
  const std::vector<float> counts{1, 3, 0, 1, 1};  // occurrences of each id
  for (int64_t v = 0; v < vocab; ++v)
    for (int64_t j = 0; j < d; ++j)
      CHECK(weight.grad().at({v, j}) == counts[static_cast<size_t>(v)]);

  for (const Shape& shape : {Shape{2, 3}, Shape{7}, Shape{2, 2, 3}}) {
    Tensor w = normal({vocab, d}, gen).requires_grad_();
    const Tensor some_ids = random_ids(shape, vocab, gen);
    CHECK_GRADIENTS([&](const std::vector<Tensor>& in) { return embedding(in[0], some_ids); }, {w});
  }
}

TEST_CASE("where: a [T, T] condition broadcast over [B, H, T, T]") {
  Generator gen(7);
  const int64_t B = 2, H = 3, T = 4;
  for (DType dtype : {DType::i32, DType::f32}) {
    // Causal pattern: keep (1) where key <= query.
    const Tensor cond = mask_of({T, T}, dtype, [&](int64_t i) { return i % T <= i / T; });
    const Tensor a = normal({B, H, T, T}, gen), b = normal({B, 1, T, T}, gen);
    const Tensor y = where(cond, a, b);
    REQUIRE(y.shape() == Shape{B, H, T, T});
    for (int64_t bi = 0; bi < B; ++bi)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t q = 0; q < T; ++q)
          for (int64_t k = 0; k < T; ++k)
            CHECK(y.at({bi, h, q, k}) == (k <= q ? a.at({bi, h, q, k}) : b.at({bi, 0, q, k})));
  }
  // Condition values other than 0/1 count as true; a scalar b broadcasts.
  const Tensor cond = from_vector<float>({-2.5f, 0.0f, 7.0f}), a = from_vector<float>({1, 2, 3});
  CHECK(where(cond, a, scalar(-1.0f)).to_vector() == std::vector<float>{1, -1, 3});
}

TEST_CASE("where: gradients to a and b over several broadcasts") {
  Generator gen(8);
  struct Case {
    Shape cond, a, b;
  };
  for (const Case& c : {Case{{4, 4}, {2, 3, 4, 4}, {2, 1, 4, 4}}, Case{{3, 1}, {1, 5}, {3, 5}},
                        Case{{2, 3, 4}, {4}, {}}, Case{{5}, {2, 5}, {2, 1}}}) {
    const Tensor cond = mask_of(c.cond, DType::i32, [&](int64_t) { return gen.below(2) == 1; });
    Tensor a = normal(c.a, gen).requires_grad_(), b = normal(c.b, gen).requires_grad_();
    CHECK_GRADIENTS([&](const std::vector<Tensor>& in) { return where(cond, in[0], in[1]); },
                    {a, b});
  }
}

TEST_CASE("where: matches cond * a + (1 - cond) * b in values and gradients") {
  Generator gen(9);
  const Tensor cond = mask_of({3, 1, 5}, DType::f32, [](int64_t i) { return i % 3 != 1; });
  const Tensor a0 = normal({4, 5}, gen), b0 = normal({3, 4, 1}, gen);
  Tensor a1 = a0.clone().requires_grad_(), b1 = b0.clone().requires_grad_();
  Tensor a2 = a0.clone().requires_grad_(), b2 = b0.clone().requires_grad_();
  const Tensor w = normal({3, 4, 5}, gen);
  const Tensor fused = where(cond, a1, b1);
  const Tensor composed = add(mul(cond, a2), mul(sub(1.0f, cond), b2));
  CHECK(max_abs_diff(fused, composed) == 0.0f);
  sum(mul(fused, w)).backward();
  sum(mul(composed, w)).backward();
  // Both select each w or 0 (cond * w is exact) and sum the broadcast copies in the same order.
  CHECK(max_abs_diff(a1.grad(), a2.grad()) == 0.0f);
  CHECK(max_abs_diff(b1.grad(), b2.grad()) == 0.0f);
}

TEST_CASE("masked_fill: -inf then exp gives exactly 0") {
  Generator gen(10);
  const int64_t B = 2, H = 2, T = 5;
  const Tensor scores = normal({B, H, T, T}, gen);
  const Tensor future = mask_of({T, T}, DType::i32, [&](int64_t i) { return i % T > i / T; });
  const Tensor filled = masked_fill(scores, future, -std::numeric_limits<float>::infinity());
  REQUIRE(filled.shape() == scores.shape());
  const Tensor e = exp(filled);
  for (int64_t bi = 0; bi < B; ++bi)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t q = 0; q < T; ++q)
        for (int64_t k = 0; k < T; ++k) {
          if (k > q) {
            CHECK(std::isinf(filled.at({bi, h, q, k})));
            CHECK(e.at({bi, h, q, k}) == 0.0f);
          } else {
            CHECK(filled.at({bi, h, q, k}) == scores.at({bi, h, q, k}));
          }
        }
}

TEST_CASE("masked_fill: gradient zeroes the masked positions") {
  Generator gen(11);
  struct Case {
    Shape x, mask;
  };
  for (const Case& c : {Case{{2, 3, 4, 4}, {4, 4}}, Case{{3, 5}, {3, 1}}, Case{{6}, {6}}}) {
    const Tensor mask = mask_of(c.mask, DType::f32, [&](int64_t) { return gen.below(3) == 0; });
    Tensor x = normal(c.x, gen).requires_grad_();
    CHECK_GRADIENTS([&](const std::vector<Tensor>& in) { return masked_fill(in[0], mask, 2.5f); },
                    {x});
  }
  // Closed form, and against the composition x * (1 - m) + v * m.
  const Tensor mask = from_vector<int32_t>({0, 1, 0, 1, 1, 0}, Shape{2, 3});
  const Tensor mask_f = from_vector<float>({0, 1, 0, 1, 1, 0}, Shape{2, 3});
  const Tensor x0 = normal({2, 3}, gen);
  Tensor x1 = x0.clone().requires_grad_(), x2 = x0.clone().requires_grad_();
  const Tensor fused = masked_fill(x1, mask, -3.0f);
  const Tensor composed = add(mul(x2, sub(1.0f, mask_f)), mul(mask_f, -3.0f));
  CHECK(max_abs_diff(fused, composed) == 0.0f);
  sum(fused).backward();
  sum(composed).backward();
  CHECK(x1.grad().to_vector() == std::vector<float>{1, 0, 1, 0, 0, 1});
  CHECK(max_abs_diff(x1.grad(), x2.grad()) == 0.0f);
}

TEST_CASE("index ops: errors name the op and the offending values") {
  Generator gen(12);
  const Tensor x = normal({4, 3}, gen);
  std::string msg;

  msg = error_message([&] { gather_rows(x, from_vector<int32_t>({0, 4})); });
  CHECK(contains(msg, "gather_rows"));
  CHECK(contains(msg, "4"));
  msg = error_message([&] { gather_rows(x, from_vector<int32_t>({-1})); });
  CHECK(contains(msg, "gather_rows"));
  CHECK(contains(msg, "-1"));
  CHECK_THROWS_AS(gather_rows(x, from_vector<float>({0, 1})), rex::Error);
  CHECK(contains(error_message([&] { gather_rows(x, from_vector<float>({0, 1})); }), "i32"));
  CHECK(contains(error_message([&] {
                   gather_rows(normal({2, 3, 4}, gen), arange(2, DType::i32));
                 }),
                 "gather_rows"));
  CHECK_THROWS_AS(gather_rows(x, from_vector<int32_t>({0, 1}, Shape{1, 2})), rex::Error);

  msg = error_message([&] { scatter_add_rows(x, from_vector<int32_t>({0, 1, 2, 7}), 5); });
  CHECK(contains(msg, "scatter_add_rows"));
  CHECK(contains(msg, "7"));
  CHECK(contains(error_message([&] { scatter_add_rows(x, arange(3, DType::i32), 5); }),
                 "scatter_add_rows"));
  CHECK_THROWS_AS(scatter_add_rows(x, arange(4, DType::i32), -1), rex::Error);

  msg = error_message([&] { embedding(x, from_vector<int32_t>({1, 9}, Shape{1, 2})); });
  CHECK(contains(msg, "embedding"));
  CHECK(contains(msg, "9"));
  CHECK(contains(error_message([&] { embedding(x, from_vector<float>({1})); }), "embedding"));

  msg = error_message([&] { where(ones({3, 4}), ones({2, 4}), ones({4})); });
  CHECK(contains(msg, "where"));
  CHECK(contains(msg, "[3, 4]"));
  CHECK(contains(error_message([&] { where(ones({4}), arange(4, DType::i32), ones({4})); }),
                 "where"));

  msg = error_message([&] { masked_fill(ones({2, 3}), ones({4, 3}), 0.0f); });
  CHECK(contains(msg, "masked_fill"));
  // A mask that would enlarge x is refused: the output keeps x's shape.
  msg = error_message([&] { masked_fill(ones({3}), ones({2, 3}), 0.0f); });
  CHECK(contains(msg, "masked_fill"));
  CHECK(contains(msg, "[2, 3]"));
}

TEST_CASE("permute_rows: forward moves every row, the same bits as the scatter-add it replaces") {
  Generator gen(31);
  const int64_t n = 9, d = 4;
  Tensor x = normal({n, d}, gen);
  x.data<float>()[5] = -0.0f;  // a signed zero
  x.data<float>()[6] = std::numeric_limits<float>::infinity();
  const auto [order, inverse] = testing::random_permutation(n, gen);
  const Tensor y = permute_rows(x, order, inverse);
  REQUIRE(y.shape() == Shape{n, d});
  const int32_t* po = order.data<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j)
      CHECK(std::bit_cast<uint32_t>(y.at({i, j})) == std::bit_cast<uint32_t>(x.at({po[i], j})));
  // y[i] = x[order[i]] is the scatter-add of x to rows inverse: each row receives one source, added
  // to 0. The bits agree except that 0 + -0 = +0, so the one -0 of x comes back as +0 there.
  const Tensor scattered = scatter_add_rows(x, inverse, n);
  for (int64_t e = 0; e < n * d; ++e) {
    const float a = y.data<float>()[e], b = scattered.data<float>()[e];
    CAPTURE(e);
    if (a == 0.0f && std::signbit(a)) {
      CHECK(std::bit_cast<uint32_t>(b) == std::bit_cast<uint32_t>(0.0f));
    } else {
      CHECK(std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b));
    }
  }
}

TEST_CASE("permute_rows: gradient") {
  Generator gen(32);
  for (auto [n, d] : std::vector<std::array<int64_t, 2>>{{6, 3}, {1, 4}, {7, 1}}) {
    Tensor x = normal({n, d}, gen).requires_grad_();
    const auto [order, inverse] = testing::random_permutation(n, gen);
    CHECK_GRADIENTS(
        [&](const std::vector<Tensor>& in) { return permute_rows(in[0], order, inverse); }, {x});
  }
  // The backward is the inverse permutation: permuting g back gives dx exactly.
  Tensor x = normal({5, 2}, gen).requires_grad_();
  const auto [order, inverse] = testing::random_permutation(5, gen);
  const Tensor g = normal({5, 2}, gen);
  permute_rows(x, order, inverse).backward(g);
  CHECK(x.grad().to_vector() == gather_rows(g, inverse).to_vector());
}

TEST_CASE("permute_rows: bad orders are refused with the op's name") {
  const Tensor x = ones({3, 2});
  const Tensor order = from_vector<int32_t>({2, 0, 1}), inverse = from_vector<int32_t>({1, 2, 0});
  CHECK(permute_rows(x, order, inverse).shape() == Shape{3, 2});
  std::string msg = error_message([&] { permute_rows(x, order, order); });
  CHECK(contains(msg, "permute_rows"));
  CHECK(contains(msg, "not the inverse"));
  msg = error_message([&] { permute_rows(x, from_vector<int32_t>({0, 3, 1}), inverse); });
  CHECK(contains(msg, "permute_rows"));
  CHECK(contains(msg, "3"));
  msg = error_message([&] { permute_rows(x, arange(2, DType::i32), arange(2, DType::i32)); });
  CHECK(contains(msg, "permute_rows"));
  CHECK(contains(msg, "one entry per row"));
  CHECK(contains(error_message([&] { permute_rows(ones({3}), order, inverse); }), "permute_rows"));
  CHECK(contains(error_message([&] {
                   permute_rows(x, from_vector<float>({0, 1, 2}), inverse);
                 }),
                 "i32"));
}
