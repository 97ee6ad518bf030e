// Tests for softmax, log_softmax and cross_entropy: forward against double-precision loops (large
// logits, -inf entries), gradients by central differences, the fused ops against compositions of
// existing rex ops (values and gradients), and the error messages.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "rounding.hpp"
#include "testing.hpp"

using rex::Shape;
using rex::Tensor;
using rex::testing::check_close;
using rex::testing::error_message;
using rex::testing::random_normal_param;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Against a double loop (cpu/reduce.hpp). softmax: y = expf(x - m) * float(1 / s), s the double
// sum of the same expf's: the exp (a call) and s (at most a call, relative) plus 2 roundings give
// 2 calls + 2 u of y; rounding x - m adds u |x - m| y <= u / e. So within that of 1 + |y|.
// log_softmax: y = (x - m) - float(log s) with |y| = |x - m| + log s: u |x - m|, s's call, u log s
// and u |y|: within a call + 2 u of 1 + |y|.
using rex::testing::gamma_n;
using rex::testing::kCallRoundoff;
const double kSoftmaxTol = gamma_n(2) + 2 * kCallRoundoff;
const double kLogSoftmaxTol = gamma_n(2) + kCallRoundoff;

// Softmax of every row of the last axis, in double with the row maximum subtracted.
std::vector<double> softmax_reference(const Tensor& x, bool log) {
  const int64_t n = x.dim(-1), rows = x.numel() / n;
  const float* px = x.data<float>();
  std::vector<double> out(static_cast<size_t>(x.numel()));
  for (int64_t r = 0; r < rows; ++r) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, static_cast<double>(px[r * n + j]));
    double s = 0;
    for (int64_t j = 0; j < n; ++j) s += std::exp(px[r * n + j] - m);
    for (int64_t j = 0; j < n; ++j) {
      const double shifted = px[r * n + j] - m;
      out[static_cast<size_t>(r * n + j)] = log ? shifted - std::log(s) : std::exp(shifted) / s;
    }
  }
  return out;
}

// Mean over counted rows of -log softmax(logits)[i, t_i], in double.
double cross_entropy_reference(const Tensor& logits, const std::vector<int32_t>& targets,
                               int32_t ignore_index) {
  const std::vector<double> logp = softmax_reference(logits, /*log=*/true);
  const int64_t classes = logits.dim(1);
  double total = 0;
  int count = 0;
  for (size_t i = 0; i < targets.size(); ++i) {
    if (targets[i] == ignore_index) continue;
    total -= logp[i * static_cast<size_t>(classes) + static_cast<size_t>(targets[i])];
    ++count;
  }
  return count ? total / count : 0.0;
}

// log_softmax from composed rex ops: x - max - log(sum(exp(x - max))).
Tensor composed_log_softmax(const Tensor& x) {
  const Tensor shifted = rex::sub(x, rex::max(x, -1, true));
  return rex::sub(shifted, rex::log(rex::sum(rex::exp(shifted), -1, true)));
}

// A constant [rows, classes] tensor with 1 at (i, t_i) on counted rows, 0 elsewhere.
Tensor one_hot(const std::vector<int32_t>& targets, int64_t classes, int32_t ignore_index) {
  Tensor out = rex::zeros(Shape{static_cast<int64_t>(targets.size()), classes});
  for (size_t i = 0; i < targets.size(); ++i)
    if (targets[i] != ignore_index) out.data<float>()[i * classes + targets[i]] = 1.0f;
  return out;
}

// The lower-triangular causal mask of a [t, t] attention: 0 on and below the diagonal, -inf above.
Tensor causal_mask(int64_t t) {
  Tensor mask = rex::zeros(Shape{t, t});
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = i + 1; j < t; ++j) mask.data<float>()[i * t + j] = -kInf;
  return mask;
}

}  // namespace

TEST_CASE("softmax and log_softmax match a double-precision loop; rows sum to one") {
  rex::Generator gen(1);
  for (const Shape& shape : {Shape{7}, Shape{4, 9}, Shape{2, 3, 5}, Shape{3, 1}}) {
    CAPTURE(shape);
    const Tensor x = rex::normal(shape, gen, 0.0f, 3.0f);
    const Tensor y = rex::softmax(x);
    CHECK(y.shape() == shape);
    check_close(y, softmax_reference(x, false), kSoftmaxTol);
    check_close(rex::log_softmax(x), softmax_reference(x, true), kLogSoftmaxTol);
    const int64_t n = shape[shape.rank() - 1];
    for (int64_t r = 0; r < x.numel() / n; ++r) {
      double s = 0;
      for (int64_t j = 0; j < n; ++j) s += y.data<float>()[r * n + j];
      // The sum of the y's errors: kSoftmaxTol of 1 plus n u / e; Approx scales by 1 + 1.
      CHECK(s == doctest::Approx(1.0).epsilon(kSoftmaxTol));
    }
  }
}

TEST_CASE("softmax and log_softmax are stable for large logits") {
  const Tensor x = rex::from_vector<float>(
      {1000, 999, 998, -1000, -1001, -1002, 1000, 0, -1000, 1000, 1000, 1000}, Shape{4, 3});
  const Tensor y = rex::softmax(x);
  const Tensor logy = rex::log_softmax(x);
  check_close(y, softmax_reference(x, false), kSoftmaxTol);
  check_close(logy, softmax_reference(x, true), kLogSoftmaxTol);
  // Closed forms (Approx's default, 100 float epsilons, is above the bounds above): a shift by 1000
  // changes nothing; e^-1000 underflows to exactly 0 in float.
  const double z = 1.0 + std::exp(-1.0) + std::exp(-2.0);
  CHECK(y.at({0, 0}) == doctest::Approx(1.0 / z));
  CHECK(y.at({1, 2}) == doctest::Approx(std::exp(-2.0) / z));
  CHECK(y.at({2, 0}) == 1.0f);
  CHECK(y.at({2, 1}) == 0.0f);
  CHECK(y.at({3, 1}) == doctest::Approx(1.0 / 3.0));
  CHECK(logy.at({2, 2}) == -2000.0f);  // exact: -1000 - 1000 - log(1) in float
  CHECK(logy.at({3, 0}) == doctest::Approx(-std::log(3.0)));
  for (float v : y.to_vector()) CHECK(std::isfinite(v));
  for (float v : logy.to_vector()) CHECK(std::isfinite(v));
}

TEST_CASE("softmax and log_softmax handle -inf entries (causal mask)") {
  rex::Generator gen(2);
  const int64_t t = 5;
  const Tensor x = rex::add(rex::normal(Shape{2, t, t}, gen, 0.0f, 2.0f), causal_mask(t));
  const Tensor y = rex::softmax(x);
  const Tensor logy = rex::log_softmax(x);
  check_close(y, softmax_reference(x, false), kSoftmaxTol);
  check_close(logy, softmax_reference(x, true), kLogSoftmaxTol);
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t i = 0; i < t; ++i) {
      double s = 0;
      for (int64_t j = 0; j < t; ++j) {
        s += y.at({b, i, j});
        if (j > i) {
          CHECK(y.at({b, i, j}) == 0.0f);
          CHECK(logy.at({b, i, j}) == -kInf);
        }
      }
      CHECK(s == doctest::Approx(1.0).epsilon(kSoftmaxTol));  // as above
    }
  }
  // The first row of a causal mask has one entry left: probability exactly 1.
  CHECK(y.at({0, 0, 0}) == 1.0f);
  CHECK(logy.at({1, 0, 0}) == 0.0f);
}

TEST_CASE("softmax gradient") {
  rex::Generator gen(3);
  for (const Shape& shape : {Shape{5}, Shape{3, 7}, Shape{2, 3, 4}}) {
    CAPTURE(shape);
    CHECK_GRADIENTS([](const std::vector<Tensor>& in) { return rex::softmax(in[0]); },
                    {random_normal_param(shape, gen, 0.0f, 2.0f)});
  }
  // Through a causal mask: masked entries get gradient 0, the others the usual one.
  const Tensor mask = causal_mask(4);
  CHECK_GRADIENTS(
      [&](const std::vector<Tensor>& in) { return rex::softmax(rex::add(in[0], mask)); },
      {random_normal_param(Shape{3, 4, 4}, gen)});
}

TEST_CASE("log_softmax gradient") {
  rex::Generator gen(4);
  for (const Shape& shape : {Shape{6}, Shape{4, 5}, Shape{2, 2, 3}}) {
    CAPTURE(shape);
    CHECK_GRADIENTS([](const std::vector<Tensor>& in) { return rex::log_softmax(in[0]); },
                    {random_normal_param(shape, gen, 0.0f, 2.0f)});
  }
}

TEST_CASE("log_softmax gradient through -inf entries matches the closed form") {
  // dx = g - softmax(x) * sum(g); with g = 0 on masked entries the masked dx is exactly 0.
  rex::Generator gen(5);
  const int64_t t = 4;
  Tensor x = random_normal_param(Shape{t, t}, gen);
  const Tensor masked = rex::add(x, causal_mask(t));
  Tensor g = rex::normal(Shape{t, t}, gen);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = i + 1; j < t; ++j) g.data<float>()[i * t + j] = 0.0f;
  rex::log_softmax(masked).backward(g);
  const std::vector<double> p = softmax_reference(masked, false);
  std::vector<float> want(static_cast<size_t>(t * t)), terms(want.size());
  for (int64_t i = 0; i < t; ++i) {
    double total = 0;
    for (int64_t j = 0; j < t; ++j) total += g.at({i, j});
    for (int64_t j = 0; j < t; ++j) {
      const auto k = static_cast<size_t>(i * t + j);
      want[k] = static_cast<float>(g.at({i, j}) - p[k] * total);
      terms[k] = static_cast<float>(std::abs(g.at({i, j})) + p[k] * std::abs(total));
    }
  }
  // dx = g - expf(y) float(sum g) cancels: against |g| + p |sum g|. exp(y) carries y's error
  // (kLogSoftmaxTol of 1 + |y|, and p (1 + |log p|) <= 1.4), plus its own call and 3 roundings,
  // plus the float rounding of want (u).
  rex::testing::check_within(x.grad(), rex::from_vector(want, {t, t}),
                             rex::from_vector(terms, {t, t}),
                             1.4 * kLogSoftmaxTol + kCallRoundoff + gamma_n(4));
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = i + 1; j < t; ++j) CHECK(x.grad().at({i, j}) == 0.0f);
}

TEST_CASE("softmax and log_softmax match composed rex ops (values and gradients)") {
  using Op = Tensor (*)(const Tensor&);
  const Op composed_softmax = [](const Tensor& x) { return rex::exp(composed_log_softmax(x)); };
  const std::pair<Op, Op> pairs[] = {{rex::log_softmax, composed_log_softmax},
                                     {rex::softmax, composed_softmax}};
  rex::Generator gen(6);
  for (const Shape& shape : {Shape{3, 8}, Shape{2, 4, 5}}) {
    CAPTURE(shape);
    Tensor x = random_normal_param(shape, gen, 0.0f, 2.0f);
    const Tensor g = rex::normal(shape, gen);
    for (const auto& [fused_op, composed_op] : pairs) {
      x.zero_grad();
      const Tensor composed = composed_op(x);
      composed.backward(g);
      const Tensor composed_grad = x.grad();
      x.zero_grad();
      const Tensor fused = fused_op(x);
      fused.backward(g);
      // The composed log_softmax adds a float sum of n exps (gamma_n) and a log (a call) to the
      // fused chain; softmax exponentiates it (p (1 + |log p|) <= 1.4, and a call); plus the
      // fused op's own error.
      const double n = static_cast<double>(shape[shape.rank() - 1]);
      const double values =
          1.4 * (kLogSoftmaxTol + gamma_n(n + 2) + kCallRoundoff) + kCallRoundoff + kSoftmaxTol;
      check_close(fused, composed, values);
      // The gradients (log_softmax: g - p sum g; softmax: p (g - sum g p)) cancel: against
      // |g| + p sum |g|, which bounds the terms of both, each side's chain the values' and n more
      // terms and 4 roundings.
      const Tensor p = rex::softmax(x);
      const Tensor terms =
          rex::testing::abs_of(g) + p * rex::sum(rex::testing::abs_of(g), -1, true);
      rex::testing::check_within(x.grad(), composed_grad, terms, 2 * (values + gamma_n(n + 4)));
    }
  }
}

TEST_CASE("cross_entropy matches a double-precision loop") {
  rex::Generator gen(7);
  const Tensor logits = rex::normal(Shape{6, 5}, gen, 0.0f, 3.0f);
  const std::vector<int32_t> targets{0, 4, 2, -100, 3, 1};
  const Tensor loss = rex::cross_entropy(logits, rex::from_vector(targets));
  CHECK(loss.rank() == 0);
  // The mean of lse - x_t in double, lse from a sum of expf's (a call), rounded once: within a
  // call + u of 1 + |loss|, well inside Approx's default 100 float epsilons (here and below).
  CHECK(loss.item() == doctest::Approx(cross_entropy_reference(logits, targets, -100)));

  // A custom ignore_index, which may also be a valid class.
  const std::vector<int32_t> with_class_ignored{0, 4, 2, 2, 3, 1};
  CHECK(rex::cross_entropy(logits, rex::from_vector(with_class_ignored), 2).item() ==
        doctest::Approx(cross_entropy_reference(logits, with_class_ignored, 2)));

  // Large logits stay finite; a -inf logit elsewhere in the row is fine.
  const Tensor big = rex::from_vector<float>({1000, 0, -kInf, -1000, 999, 998}, Shape{2, 3});
  const std::vector<int32_t> big_targets{0, 2};
  const Tensor big_loss = rex::cross_entropy(big, rex::from_vector(big_targets));
  // Row 0 [1000, 0, -inf], target 0: log(1 + e^-1000) = 0 in double. Row 1 [-1000, 999, 998],
  // target 2: lse - 998 = 1 + log(e^-1999 + 1 + e^-1).
  const double row1 = 1.0 + std::log(1.0 + std::exp(-1.0));
  CHECK(big_loss.item() == doctest::Approx((0.0 + row1) / 2.0));
}

TEST_CASE("cross_entropy gradient") {
  rex::Generator gen(8);
  for (const auto& targets : {std::vector<int32_t>{1, 0, 3, 2, 4, 0, 2},
                              std::vector<int32_t>{1, -100, 3, -100, 4, 0, -100}}) {
    const Tensor t = rex::from_vector(targets);
    CHECK_GRADIENTS([&](const std::vector<Tensor>& in) { return rex::cross_entropy(in[0], t); },
                    {random_normal_param(Shape{7, 5}, gen, 0.0f, 2.0f)});
  }
  const Tensor one = rex::from_vector<int32_t>({2});
  CHECK_GRADIENTS([&](const std::vector<Tensor>& in) { return rex::cross_entropy(in[0], one); },
                  {random_normal_param(Shape{1, 3}, gen)});
}

TEST_CASE("cross_entropy matches composed rex ops (values and gradients)") {
  rex::Generator gen(9);
  for (const auto& targets :
       {std::vector<int32_t>{3, 0, 1, 2}, std::vector<int32_t>{3, -100, 1, -100}}) {
    const int64_t classes = 6;
    Tensor logits = random_normal_param(Shape{4, classes}, gen, 0.0f, 2.0f);
    const Tensor onehot = one_hot(targets, classes, -100);
    const float count = rex::sum(onehot).item();
    const Tensor composed =
        rex::div(rex::neg(rex::sum(rex::mul(composed_log_softmax(logits), onehot))), count);
    composed.backward(rex::scalar(0.7f));
    const Tensor composed_grad = logits.grad();
    logits.zero_grad();
    const Tensor fused = rex::cross_entropy(logits, rex::from_vector(targets));
    fused.backward(rex::scalar(0.7f));
    // The composed loss is minus the mean of log_softmax entries y_t <= 0, each within
    // kLogSoftmaxTol + gamma_8 + a call of 1 + |y_t|, summed over 4 rows and divided (6 more
    // roundings): within about 2e-6 of 1 + loss, below the 1e-5 used. Its gradient,
    // 0.7 / count (onehot - p), is below 1 in size and within the same chain.
    CHECK(fused.item() == doctest::Approx(composed.item()).epsilon(1e-5));
    check_close(logits.grad(), composed_grad, 1e-5);
    // Ignored rows get exactly zero gradient.
    for (size_t i = 0; i < targets.size(); ++i)
      if (targets[i] == -100)
        for (int64_t j = 0; j < classes; ++j)
          CHECK(logits.grad().at({static_cast<int64_t>(i), j}) == 0.0f);
  }
}

TEST_CASE("cross_entropy with every row ignored is 0 with a zero gradient") {
  rex::Generator gen(10);
  Tensor logits = random_normal_param(Shape{3, 4}, gen);
  const Tensor loss = rex::cross_entropy(logits, rex::from_vector<int32_t>({-1, -1, -1}), -1);
  CHECK(loss.item() == 0.0f);
  loss.backward();
  REQUIRE(logits.grad().defined());
  for (float v : logits.grad().to_vector()) CHECK(v == 0.0f);
}

TEST_CASE("softmax ops reject bad inputs with messages naming the op") {
  const Tensor x = rex::zeros(Shape{4, 5});
  const Tensor targets = rex::from_vector<int32_t>({0, 1, 2, 3});

  CHECK_THROWS_AS(rex::cross_entropy(x, rex::zeros(Shape{4})), rex::Error);
  const std::string dtype = error_message([&] { rex::cross_entropy(x, rex::zeros(Shape{4})); });
  CHECK(dtype.find("cross_entropy") != std::string::npos);
  CHECK(dtype.find("i32") != std::string::npos);

  CHECK_THROWS_AS(rex::cross_entropy(x, rex::from_vector<int32_t>({0, 1, 5, 3})), rex::Error);
  const std::string range = error_message([&] {
    rex::cross_entropy(x, rex::from_vector<int32_t>({0, 1, 5, 3}));
  });
  CHECK(range.find("cross_entropy") != std::string::npos);
  CHECK(range.find("target 5 at row 2") != std::string::npos);
  const std::string negative = error_message([&] {
    rex::cross_entropy(x, rex::from_vector<int32_t>({0, 1, 2, -3}));
  });
  CHECK(negative.find("target -3 at row 3") != std::string::npos);

  CHECK_THROWS_AS(rex::cross_entropy(x, rex::from_vector<int32_t>({0, 1, 2})), rex::Error);
  const std::string rows = error_message([&] {
    rex::cross_entropy(x, rex::from_vector<int32_t>({0, 1, 2}));
  });
  CHECK(rows.find("cross_entropy: logits [4, 5] and targets [3]") != std::string::npos);
  const std::string rank = error_message([&] {
    rex::cross_entropy(rex::zeros(Shape{2, 2, 5}), targets);
  });
  CHECK(rank.find("cross_entropy: logits [2, 2, 5]") != std::string::npos);
  CHECK(error_message([&] { rex::cross_entropy(targets, targets); }).find("cross_entropy") !=
        std::string::npos);

  // A fully masked row has no softmax: an error naming the op and the row.
  Tensor masked = rex::zeros(Shape{3, 4});
  for (int64_t j = 0; j < 4; ++j) masked.data<float>()[4 + j] = -kInf;
  CHECK_THROWS_AS(rex::softmax(masked), rex::Error);
  CHECK(error_message([&] {
          rex::softmax(masked);
        }).find("softmax: row 1 of [3, 4] is entirely -inf") != std::string::npos);
  CHECK(error_message([&] { rex::log_softmax(masked); }).find("log_softmax: row 1") !=
        std::string::npos);
  CHECK(error_message([&] {
          rex::cross_entropy(masked, rex::from_vector<int32_t>({0, 1, 2}));
        }).find("cross_entropy: row 1") != std::string::npos);
  // ... unless that row is ignored.
  CHECK(std::isfinite(rex::cross_entropy(masked, rex::from_vector<int32_t>({0, -100, 2})).item()));

  CHECK(error_message([&] { rex::softmax(targets); }).find("softmax: expected an f32") !=
        std::string::npos);
  CHECK(error_message([&] { rex::softmax(rex::scalar(1.0f)); }).find("softmax") !=
        std::string::npos);
  CHECK(error_message([&] {
          rex::log_softmax(rex::zeros(Shape{3, 0}));
        }).find("log_softmax") != std::string::npos);
}
