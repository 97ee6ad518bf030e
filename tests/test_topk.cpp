// Tests for rex/ops/topk.hpp: values and indices against a naive stable sort written here (ties
// included), the scatter gradient by central differences and in closed form, and the error cases.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "testing.hpp"

using namespace rex;
using rex::testing::error_message;

namespace {

// Rows whose last-axis entries are a shuffled ladder 0, 0.1, 0.2, ... plus a common offset per row:
// every pair differs by >= 0.1, far more than the gradcheck step, so the ranking never flips.
Tensor distinct_rows(const Shape& shape, Generator& gen) {
  Tensor x = Tensor::empty(shape);
  const int64_t n = shape[shape.rank() - 1];
  float* p = x.data<float>();
  for (int64_t r = 0; r < x.numel() / n; ++r) {
    std::vector<int64_t> perm(static_cast<size_t>(n));
    std::iota(perm.begin(), perm.end(), int64_t{0});
    for (int64_t i = n - 1; i > 0; --i)
      std::swap(perm[static_cast<size_t>(i)],
                perm[static_cast<size_t>(gen.below(static_cast<uint64_t>(i + 1)))]);
    const float offset = gen.normal();
    for (int64_t i = 0; i < n; ++i)
      p[r * n + i] = offset + 0.1f * static_cast<float>(perm[static_cast<size_t>(i)]);
  }
  return x;
}

// Checks topk(x, k) row by row against std::stable_sort of the positions by descending value.
void check_against_naive(const Tensor& x, int64_t k) {
  const TopK result = topk(x, k);
  Shape expected_shape = x.shape();
  expected_shape.set(x.rank() - 1, k);
  REQUIRE(result.values.shape() == expected_shape);
  REQUIRE(result.indices.shape() == expected_shape);
  REQUIRE(result.indices.dtype() == DType::i32);
  const int64_t n = x.dim(-1);
  const float* px = x.data<float>();
  for (int64_t r = 0; r < x.numel() / n; ++r) {
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t i, int64_t j) { return px[r * n + i] > px[r * n + j]; });
    for (int64_t j = 0; j < k; ++j) {
      const int64_t want = order[static_cast<size_t>(j)];
      CHECK(result.indices.data<int32_t>()[r * k + j] == want);
      CHECK(result.values.data<float>()[r * k + j] == px[r * n + want]);
    }
  }
}

}  // namespace

TEST_CASE("topk: values and indices match a naive sort") {
  Generator gen(1);
  check_against_naive(normal({3, 7}, gen), 1);
  check_against_naive(normal({3, 7}, gen), 3);
  check_against_naive(normal({3, 7}, gen), 7);
  check_against_naive(normal({2, 3, 5}, gen), 2);
  check_against_naive(normal({9}, gen), 4);
  check_against_naive(normal({64, 16}, gen), 2);
}

TEST_CASE("topk: ties go to the lower index first") {
  const Tensor x =
      from_vector<float>({1, 3, 3, 2, 3, /**/ 5, 5, 5, 5, 5, /**/ 0, -1, 0, -1, 0}, Shape{3, 5});
  const TopK result = topk(x, 4);
  CHECK(result.indices.to_vector<int32_t>() ==
        std::vector<int32_t>{1, 2, 4, 3, /**/ 0, 1, 2, 3, /**/ 0, 2, 4, 1});
  CHECK(result.values.to_vector() == std::vector<float>{3, 3, 3, 2, 5, 5, 5, 5, 0, 0, 0, -1});

  // Random rows drawn from a handful of values: many ties, checked against the stable sort.
  Generator gen(2);
  Tensor few = Tensor::empty(Shape{20, 8});
  for (int64_t i = 0; i < few.numel(); ++i) few.data<float>()[i] = static_cast<float>(gen.below(3));
  for (int64_t k : {1, 3, 8}) check_against_naive(few, k);
}

TEST_CASE("topk: NaN ranks above every number") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const TopK result = topk(from_vector<float>({1, nan, 4, nan, 2}), 3);
  CHECK(result.indices.to_vector<int32_t>() == std::vector<int32_t>{1, 3, 2});
  CHECK(std::isnan(result.values.at({0})));
  CHECK(std::isnan(result.values.at({1})));
  CHECK(result.values.at({2}) == 4.0f);
}

TEST_CASE("topk: gradient of the values") {
  Generator gen(3);
  struct Case {
    Shape shape;
    int64_t k;
  };
  for (const Case& c : {Case{{4, 6}, 2}, Case{{2, 3, 5}, 3}, Case{{7}, 7}, Case{{3, 4}, 1}}) {
    Tensor x = distinct_rows(c.shape, gen).requires_grad_();
    const int64_t k = c.k;
    CHECK_GRADIENTS([k](const std::vector<Tensor>& in) { return topk(in[0], k).values; }, {x});
  }
  // Closed form: g lands at the chosen positions, zeros elsewhere.
  Tensor x = from_vector<float>({0.5f, 2.0f, -1.0f, 3.0f, /**/ 4.0f, 0.0f, 1.0f, 2.0f}, Shape{2, 4})
                 .requires_grad_();
  topk(x, 2).values.backward(from_vector<float>({10, 20, 30, 40}, Shape{2, 2}));
  CHECK(x.grad().to_vector() == std::vector<float>{0, 20, 0, 10, 30, 0, 0, 40});
  CHECK_FALSE(topk(x, 2).indices.requires_grad());
}

TEST_CASE("topk with a mask: the top-k of where(keep, x, hidden), no gradient at hidden entries") {
  Generator gen(5);
  const Tensor x = normal({6, 9}, gen);
  Tensor row_keep = Tensor::empty(Shape{6, 9});  // a mask per row, every row keeping at least 3
  for (int64_t i = 0; i < row_keep.numel(); ++i)
    row_keep.data<float>()[i] = (i % 9) < 3 || gen.below(2) == 0 ? 1.0f : 0.0f;
  const Tensor one_keep = from_vector<float>({1, 0, 1, 1, 0, 0, 1, 0, 1});  // one for every row
  for (const Tensor& keep : {row_keep, one_keep}) {
    for (float hidden : {-1.0f, -std::numeric_limits<float>::infinity()}) {
      CAPTURE(keep.shape());
      CAPTURE(hidden);
      // The composed form, with keep broadcast to x's shape by where.
      const Tensor masked = where(keep, x, scalar(hidden));
      const TopK want = topk(masked, 3), got = topk(x, 3, TopKMask{keep, hidden});
      CHECK(got.indices.to_vector<int32_t>() == want.indices.to_vector<int32_t>());
      CHECK(got.values.to_vector() == want.values.to_vector());
    }
  }
  // k beyond the kept entries: the hidden ones follow, ranked as `hidden` by position, and take
  // no gradient (their score does not depend on x).
  Tensor xs = from_vector<float>({0.5f, 2.0f, -1.0f, 3.0f}).requires_grad_();
  const TopK all = topk(xs, 4, TopKMask{from_vector<float>({0, 1, 1, 0}), -5.0f});
  CHECK(all.indices.to_vector<int32_t>() == std::vector<int32_t>{1, 2, 0, 3});
  CHECK(all.values.to_vector() == std::vector<float>{2.0f, -1.0f, -5.0f, -5.0f});
  all.values.backward(from_vector<float>({10, 20, 30, 40}));
  CHECK(xs.grad().to_vector() == std::vector<float>{0, 10, 20, 0});
  // Central differences through a masked top-k.
  Tensor y = distinct_rows(Shape{4, 7}, gen).requires_grad_();
  const Tensor keep = from_vector<float>({1, 1, 0, 1, 0, 1, 1});
  CHECK_GRADIENTS(
      [&](const std::vector<Tensor>& in) {
        return topk(in[0], 3, TopKMask{keep, -1.0f}).values;
      },
      {y});
  CHECK(error_message([&] {
          topk(x, 2, TopKMask{ones({6, 8}), -1.0f});
        }).find("mask") != std::string::npos);
}

TEST_CASE("topk: errors name the op") {
  Generator gen(4);
  const Tensor x = normal({2, 5}, gen);
  std::string msg = error_message([&] { topk(x, 6); });
  CHECK(msg.find("topk") != std::string::npos);
  CHECK(msg.find("6") != std::string::npos);
  CHECK(msg.find("[2, 5]") != std::string::npos);
  CHECK_THROWS_AS(topk(x, 0), rex::Error);
  CHECK_THROWS_AS(topk(x, -1), rex::Error);
  CHECK(error_message([&] { topk(arange(4, DType::i32), 1); }).find("topk") != std::string::npos);
  CHECK(error_message([&] { topk(scalar(1.0f), 1); }).find("topk") != std::string::npos);
  CHECK(error_message([&] { topk(zeros({3, 0}), 1); }).find("topk") != std::string::npos);
}

TEST_CASE(
    "ranks_before, the ranking topk and max share: NaN first, then larger, ties to the lower "
    "position") {
  using rex::detail::ranks_before;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(ranks_before(2.0f, 5, 1.0f, 0));
  CHECK_FALSE(ranks_before(1.0f, 0, 2.0f, 5));
  CHECK(ranks_before(1.0f, 0, 1.0f, 1));
  CHECK_FALSE(ranks_before(1.0f, 1, 1.0f, 0));
  CHECK(ranks_before(nan, 7, std::numeric_limits<float>::infinity(), 0));
  CHECK_FALSE(ranks_before(std::numeric_limits<float>::infinity(), 0, nan, 7));
  CHECK(ranks_before(nan, 2, nan, 3));
  CHECK_FALSE(ranks_before(nan, 3, nan, 2));
  CHECK_FALSE(ranks_before(1.0f, 4, 1.0f, 4));  // strict: never before itself
}

TEST_CASE("softmax_topk is softmax then topk, values and gradients, and names bad inputs") {
  rex::Generator gen(35);
  Tensor logits = rex::uniform({4, 6}, gen, -2.0f, 2.0f);
  logits.requires_grad_();
  const Tensor gp = rex::uniform({4, 6}, gen, -1.0f, 1.0f);
  const Tensor gv = rex::uniform({4, 2}, gen, -1.0f, 1.0f);
  auto results = [&](const Tensor& probs, const rex::TopK& top) {
    logits.zero_grad();
    (rex::sum(probs * gp) + rex::sum(top.values * gv)).backward();
    return std::vector<std::vector<float>>{probs.to_vector(), top.values.to_vector(),
                                           logits.grad().to_vector()};
  };
  const rex::SoftmaxTopK fused = rex::softmax_topk(logits, 2);
  const auto got = results(fused.probs, fused.top);
  const Tensor probs = rex::softmax(logits);
  const rex::TopK top = rex::topk(probs, 2);
  CHECK(got == results(probs, top));
  CHECK(fused.top.indices.to_vector<int32_t>() == top.indices.to_vector<int32_t>());
  CHECK(error_message([&] {
          rex::softmax_topk(logits, 7);
        }).find("softmax_topk: k = 7 is out of range [1, 6]") != std::string::npos);
}
