// Elementwise ops: forward values against std:: math, gradients by central differences,
// broadcasting in every direction, scalar forms, and shape errors.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>

#include "gradcheck.hpp"
#include "rounding.hpp"
#include "testing.hpp"

using rex::Tensor;
using rex::testing::GradcheckOptions;
using rex::testing::random_uniform_param;

namespace {

struct UnaryCase {
  const char* name;
  std::function<Tensor(const Tensor&)> op;
  std::function<double(double)> reference;
  float low, high;  // input range: inside the domain and away from kinks
};

}  // namespace

TEST_CASE("unary math: values match the closed form and gradients match central differences") {
  const std::vector<UnaryCase> cases = {
      {"neg", [](const Tensor& x) { return rex::neg(x); }, [](double v) { return -v; }, -2, 2},
      {"exp", [](const Tensor& x) { return rex::exp(x); }, [](double v) { return std::exp(v); }, -2,
       2},
      {"log", [](const Tensor& x) { return rex::log(x); }, [](double v) { return std::log(v); },
       0.5, 3},
      {"sqrt", [](const Tensor& x) { return rex::sqrt(x); }, [](double v) { return std::sqrt(v); },
       0.5, 3},
      {"rsqrt", [](const Tensor& x) { return rex::rsqrt(x); },
       [](double v) { return 1.0 / std::sqrt(v); }, 0.5, 3},
      {"pow 3", [](const Tensor& x) { return rex::pow(x, 3.0f); },
       [](double v) { return v * v * v; }, -2, 2},
      {"pow -1.5", [](const Tensor& x) { return rex::pow(x, -1.5f); },
       [](double v) { return std::pow(v, -1.5); }, 0.5, 3},
      {"tanh", [](const Tensor& x) { return rex::tanh(x); }, [](double v) { return std::tanh(v); },
       -2, 2},
      {"sigmoid", [](const Tensor& x) { return rex::sigmoid(x); },
       [](double v) { return 1.0 / (1.0 + std::exp(-v)); }, -3, 3},
      {"silu", [](const Tensor& x) { return rex::silu(x); },
       [](double v) { return v / (1.0 + std::exp(-v)); }, -3, 3},
      {"gelu", [](const Tensor& x) { return rex::gelu(x); },
       [](double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }, -3, 3},
      {"relu+", [](const Tensor& x) { return rex::relu(x); },
       [](double v) { return v > 0 ? v : 0.0; }, 0.1, 2},
      {"relu-", [](const Tensor& x) { return rex::relu(x); },
       [](double v) { return v > 0 ? v : 0.0; }, -2, -0.1},
  };
  for (const UnaryCase& c : cases) {
    CAPTURE(c.name);
    for (const rex::Shape& shape : {rex::Shape{7}, rex::Shape{3, 5}, rex::Shape{2, 3, 4}}) {
      rex::Generator gen(11);
      Tensor x = random_uniform_param(shape, gen, c.low, c.high);
      Tensor y = c.op(x);
      REQUIRE(y.shape() == shape);
      // Each formula (pointwise.hpp) takes at most 4 roundings and 2 library calls, relative to
      // its terms' magnitude, which is within 3 (1 + |y|) over these ranges (gelu's 1 + erf
      // cancels towards -3: 0.5 |x| (1 + |erf|) <= 3); Approx scales by 1 + |y|.
      using rex::testing::gamma_n, rex::testing::kCallRoundoff;
      const double tol = 3 * (gamma_n(4) + 2 * kCallRoundoff);
      for (int64_t i = 0; i < x.numel(); ++i)
        CHECK(y.data<float>()[i] == doctest::Approx(c.reference(x.data<float>()[i])).epsilon(tol));
      CHECK_GRADIENTS([&](const auto& in) { return c.op(in[0]); }, {x});
    }
  }
}

TEST_CASE("relu mixes signs: gradient is 1 above zero and 0 below") {
  Tensor x = rex::from_vector<float>({-1.5f, 0.5f, -0.2f, 2.0f});
  x.requires_grad_();
  rex::sum(rex::relu(x)).backward();
  CHECK(x.grad().to_vector() == std::vector<float>{0, 1, 0, 1});
}

TEST_CASE("binary ops: values and gradients with equal shapes") {
  rex::Generator gen_a(1), gen_b(2);
  Tensor a = random_uniform_param({3, 4}, gen_a, -2.0f, 2.0f);
  Tensor b = random_uniform_param({3, 4}, gen_b, 0.5f, 2.0f);
  const float* pa = a.data<float>();
  const float* pb = b.data<float>();
  Tensor s = a + b, d = a - b, m = a * b, q = a / b;
  for (int64_t i = 0; i < 12; ++i) {
    CHECK(s.data<float>()[i] == pa[i] + pb[i]);
    CHECK(d.data<float>()[i] == pa[i] - pb[i]);
    CHECK(m.data<float>()[i] == pa[i] * pb[i]);
    CHECK(q.data<float>()[i] == pa[i] / pb[i]);
  }
  CHECK_GRADIENTS([](const auto& x) { return x[0] + x[1]; }, {a, b});
  CHECK_GRADIENTS([](const auto& x) { return x[0] - x[1]; }, {a, b});
  CHECK_GRADIENTS([](const auto& x) { return x[0] * x[1]; }, {a, b});
  CHECK_GRADIENTS([](const auto& x) { return x[0] / x[1]; }, {a, b});
}

TEST_CASE("binary ops broadcast both ways and reduce gradients back with sum_to") {
  struct Pair {
    rex::Shape a, b, out;
  };
  const std::vector<Pair> pairs = {
      {{4, 3}, {3}, {4, 3}},                    // row vector
      {{4, 1}, {1, 3}, {4, 3}},                 // outer product shape
      {{2, 1, 3}, {4, 1}, {2, 4, 3}},           // missing leading axis on b
      {{5}, {2, 3, 5}, {2, 3, 5}},              // a stretched over two leading axes
      {{}, {2, 3}, {2, 3}},                     // 0-d scalar tensor
      {{2, 3, 1, 2}, {3, 4, 1}, {2, 3, 4, 2}},  // 4-d
  };
  for (const Pair& p : pairs) {
    CAPTURE(p.a.str());
    CAPTURE(p.b.str());
    rex::Generator gen_a(3), gen_b(4);
    Tensor a = random_uniform_param(p.a, gen_a, -2.0f, 2.0f);
    Tensor b = random_uniform_param(p.b, gen_b, 0.5f, 2.0f);
    Tensor m = a * b;
    REQUIRE(m.shape() == p.out);
    // Naive check of one broadcast product: element by element through at().
    std::vector<int64_t> idx(static_cast<size_t>(p.out.rank()), 0);
    for (int64_t flat = 0; flat < p.out.numel(); ++flat) {
      int64_t rem = flat, ia = 0, ib = 0, stride_a = 1, stride_b = 1;
      for (int64_t axis = p.out.rank() - 1; axis >= 0; --axis) {
        const int64_t i = rem % p.out[axis];
        rem /= p.out[axis];
        const int64_t aa = axis - (p.out.rank() - p.a.rank()),
                      ab = axis - (p.out.rank() - p.b.rank());
        if (aa >= 0) ia += (p.a[aa] == 1 ? 0 : i) * stride_a, stride_a *= p.a[aa];
        if (ab >= 0) ib += (p.b[ab] == 1 ? 0 : i) * stride_b, stride_b *= p.b[ab];
      }
      CHECK(m.data<float>()[flat] == a.data<float>()[ia] * b.data<float>()[ib]);
    }
    CHECK_GRADIENTS([](const auto& x) { return x[0] + x[1]; }, {a, b});
    CHECK_GRADIENTS([](const auto& x) { return x[0] - x[1]; }, {a, b});
    CHECK_GRADIENTS([](const auto& x) { return x[0] * x[1]; }, {a, b});
    CHECK_GRADIENTS([](const auto& x) { return x[0] / x[1]; }, {a, b});
  }
}

TEST_CASE("scalar forms") {
  rex::Generator gen(5);
  Tensor x = random_uniform_param({2, 3}, gen, 0.5f, 2.0f);
  const float* px = x.data<float>();
  Tensor r1 = x + 2.0f, r2 = 2.0f - x, r3 = 3.0f * x, r4 = x / 4.0f, r5 = 2.0f / x, r6 = x - 1.0f;
  for (int64_t i = 0; i < 6; ++i) {
    CHECK(r1.data<float>()[i] == px[i] + 2.0f);
    CHECK(r2.data<float>()[i] == 2.0f - px[i]);
    CHECK(r3.data<float>()[i] == 3.0f * px[i]);
    CHECK(r4.data<float>()[i] == px[i] / 4.0f);
    CHECK(r5.data<float>()[i] == 2.0f / px[i]);
    CHECK(r6.data<float>()[i] == px[i] - 1.0f);
  }
  CHECK_GRADIENTS([](const auto& in) { return in[0] + 2.0f; }, {x});
  CHECK_GRADIENTS([](const auto& in) { return 2.0f - in[0]; }, {x});
  CHECK_GRADIENTS([](const auto& in) { return in[0] * 3.0f; }, {x});
  CHECK_GRADIENTS([](const auto& in) { return in[0] / 4.0f; }, {x});
  CHECK_GRADIENTS([](const auto& in) { return 2.0f / in[0]; }, {x});
  CHECK_GRADIENTS([](const auto& in) { return -in[0]; }, {x});
}

TEST_CASE("broadcast_to and sum_to are each other's gradient") {
  rex::Generator gen_x(6);
  Tensor x = random_uniform_param({3, 1}, gen_x, -2.0f, 2.0f);
  Tensor b = rex::broadcast_to(x, {2, 3, 4});
  CHECK(b.shape() == rex::Shape{2, 3, 4});
  CHECK(b.at({1, 2, 3}) == x.at({2, 0}));
  CHECK_GRADIENTS([](const auto& in) { return rex::broadcast_to(in[0], {2, 3, 4}); }, {x});
  rex::Generator gen_big(7);
  Tensor big = random_uniform_param({2, 3, 4}, gen_big, -2.0f, 2.0f);
  Tensor s = rex::sum_to(big, {3, 1});
  double expect = 0, magnitude = 0;
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t k = 0; k < 4; ++k)
      expect += big.at({i, 1, k}), magnitude += std::abs(big.at({i, 1, k}));
  // A float sum of 8 terms: within gamma_7 of the sum of |terms|.
  CHECK(std::abs(s.at({1, 0}) - expect) <= rex::testing::gamma_n(7) * magnitude);
  CHECK_GRADIENTS([](const auto& in) { return rex::sum_to(in[0], {3, 1}); }, {big});
  CHECK_THROWS_AS(rex::broadcast_to(x, {2, 4}), rex::Error);
  CHECK_THROWS_AS(rex::sum_to(big, {5}), rex::Error);
}

TEST_CASE("large tensors, split into parallel runs, match one-thread loops bit for bit") {
  // Above rex's parallel threshold (16384 elements), every elementwise kernel splits its output
  // into runs; each run starts its broadcast odometer mid-tensor. Reference: plain loops here.
  const int64_t n0 = 70, n1 = 3, n2 = 129;  // 27090 elements; 129 puts runs off row boundaries
  rex::Generator gen(11);
  const Tensor a = rex::normal({n0, n1, n2}, gen), b = rex::normal({n0, 1, n2}, gen);
  const Tensor c = rex::normal({n1, 1}, gen);
  const float *pa = a.data<float>(), *pb = b.data<float>(), *pc = c.data<float>();
  auto at = [&](int64_t i, int64_t j, int64_t k) { return (i * n1 + j) * n2 + k; };

  const Tensor product = a * b, scaled = rex::exp(a), sum = a + a, shifted = a - c;
  const Tensor stretched = rex::broadcast_to(b, {n0, n1, n2});
  std::vector<int32_t> positive(static_cast<size_t>(a.numel()));
  for (size_t i = 0; i < positive.size(); ++i) positive[i] = pa[i] > 0.0f ? 1 : 0;
  const Tensor picked = rex::where(rex::from_vector(positive, {n0, n1, n2}), a, b);
  for (int64_t i = 0; i < n0; ++i)
    for (int64_t j = 0; j < n1; ++j)
      for (int64_t k = 0; k < n2; ++k) {
        const int64_t o = at(i, j, k), ob = i * n2 + k;
        REQUIRE(product.data<float>()[o] == pa[o] * pb[ob]);
        REQUIRE(scaled.data<float>()[o] == expf(pa[o]));
        REQUIRE(sum.data<float>()[o] == pa[o] + pa[o]);
        REQUIRE(shifted.data<float>()[o] == pa[o] - pc[j]);
        REQUIRE(stretched.data<float>()[o] == pb[ob]);
        REQUIRE(picked.data<float>()[o] == (pa[o] > 0.0f ? pa[o] : pb[ob]));
      }

  // sum_to, outputs summed in parallel: each output adds its elements in x's row-major order, as
  // float, whichever axes are summed (trailing, leading, the middle one, the outer two).
  auto check_sum_to = [&](const rex::Shape& shape, auto output_of) {
    CAPTURE(shape);
    const Tensor got = rex::sum_to(a, shape);
    std::vector<float> want(static_cast<size_t>(shape.numel()), 0.0f);
    for (int64_t i = 0; i < n0; ++i)
      for (int64_t j = 0; j < n1; ++j)
        for (int64_t k = 0; k < n2; ++k)
          want[static_cast<size_t>(output_of(i, j, k))] += pa[at(i, j, k)];
    for (size_t o = 0; o < want.size(); ++o) REQUIRE(got.data<float>()[o] == want[o]);
  };
  check_sum_to({n0, n1, 1}, [&](int64_t i, int64_t j, int64_t) { return i * n1 + j; });
  check_sum_to({n2}, [&](int64_t, int64_t, int64_t k) { return k; });
  check_sum_to({n0, 1, n2}, [&](int64_t i, int64_t, int64_t k) { return i * n2 + k; });
  check_sum_to({n1, 1}, [&](int64_t, int64_t j, int64_t) { return j; });
}

TEST_CASE("zero extents: broadcasts, permute and sum_to give empty or zero results") {
  // Runs split an empty range into nothing: no kernel may walk (or divide by) a zero extent.
  const Tensor empty = rex::zeros({0, 3}), row = rex::ones({1, 3});
  CHECK((empty * row).shape() == rex::Shape{0, 3});
  CHECK(rex::broadcast_to(row, {2, 0, 3}).numel() == 0);
  CHECK(rex::permute(empty, {1, 0}).shape() == rex::Shape{3, 0});
  CHECK(rex::permute(rex::zeros({2, 0, 4}), {1, 0, 2}).shape() == rex::Shape{0, 2, 4});
  // A sum over an empty axis is 0.
  CHECK(rex::sum_to(empty, {1, 3}).to_vector() == std::vector<float>{0.0f, 0.0f, 0.0f});
  CHECK(rex::sum_to(rex::zeros({2, 0, 3}), {1, 0, 3}).numel() == 0);
}

TEST_CASE("mismatched shapes name the op and both shapes") {
  Tensor a = rex::ones({2, 3}), b = rex::ones({4, 3});
  CHECK_THROWS_WITH_AS(a + b, "add: shapes [2, 3] and [4, 3] cannot be broadcast together",
                       rex::Error);
  CHECK_THROWS_WITH_AS(a * b, "mul: shapes [2, 3] and [4, 3] cannot be broadcast together",
                       rex::Error);
  CHECK_THROWS_WITH_AS(rex::exp(rex::arange(3, rex::DType::i32)),
                       "exp: expected an f32 tensor, got i32 of shape [3]", rex::Error);
}

TEST_CASE("swiglu matches silu(a) * b in values and gradients, and central differences") {
  using namespace rex;
  using rex::testing::check_close;
  Generator gen(31);
  // 40000 elements: more than one parallel chunk, with a ragged last chunk.
  for (const Shape& shape : {Shape{3, 5}, Shape{200, 200}}) {
    CAPTURE(shape);
    Tensor a = testing::random_normal_param(shape, gen, 0.0f, 3.0f);
    Tensor b = testing::random_normal_param(shape, gen);
    const Tensor weights = normal(shape, gen);
    const Tensor fused = swiglu(a, b);
    sum(fused * weights).backward();
    const Tensor da = a.grad().clone(), db = b.grad().clone();
    a.zero_grad(), b.zero_grad();
    const Tensor composed = silu(a) * b;
    sum(composed * weights).backward();
    // Each side: a / (1 + exp(-a)) * b and g a s take 3 or 4 roundings and one exp (Eigen's
    // vectorised one in the fused op, expf in silu), with no cancellation: twice gamma_4 + a call.
    const double tol = 2 * (testing::gamma_n(4) + testing::kCallRoundoff);
    check_close(fused, composed, tol);
    check_close(db, b.grad(), tol);
    // da = g b s (1 + a (1 - s)) cancels where a (1 - s) = -1, and 1 - s amplifies s's error by
    // up to |a| relative to the bracket: against the terms' magnitude |g b| s (1 + |a| (1 - s)),
    // 8 roundings and 2 calls a side, times 1 + |a|.
    const float *pa = a.data<float>(), *pb = b.data<float>(), *pw = weights.data<float>();
    for (int64_t i = 0; i < a.numel(); ++i) {
      const double s = 1.0 / (1.0 + std::exp(-double{pa[i]}));
      const double terms = std::abs(double{pw[i]} * pb[i]) * s * (1 + std::abs(pa[i]) * (1 - s));
      CHECK(std::abs(double{da.data<float>()[i]} - a.grad().data<float>()[i]) <=
            2 * (testing::gamma_n(8) + 2 * testing::kCallRoundoff) * (1 + std::abs(pa[i])) * terms);
    }
  }
  Tensor a = testing::random_normal_param({4, 3}, gen, 0.0f, 2.0f);
  Tensor b = testing::random_normal_param({4, 3}, gen);
  CHECK_GRADIENTS([](const std::vector<Tensor>& in) { return swiglu(in[0], in[1]); }, {a, b});
  // Saturated gates: large |a| gives exact zeros and the identity, not NaN.
  const Tensor edge =
      swiglu(from_vector<float>({-200.0f, 200.0f}), from_vector<float>({2.0f, 3.0f}));
  CHECK(edge.at({0}) == 0.0f);
  CHECK(edge.at({1}) == 600.0f);
  CHECK(testing::error_message([] {
          swiglu(zeros({2}), zeros({3}));
        }).find("swiglu: a [2] and b [3] must have the same shape") != std::string::npos);
}

TEST_CASE(
    "the SwiGLU formulas give the same values on floats (the kernels) and Eigen arrays (the "
    "CPU)") {
  Eigen::ArrayXf a(5), b(5), g(5);
  a << -3.0f, -0.5f, 0.0f, 0.75f, 4.0f;
  b << 1.5f, -2.0f, 0.25f, 3.0f, -1.0f;
  g << 0.5f, 1.0f, -2.0f, 0.125f, 1.0f;
  const Eigen::ArrayXf y = rex::detail::swiglu_value(a, b);
  const Eigen::ArrayXf s = rex::detail::sigmoid_of(a);
  const Eigen::ArrayXf da = rex::detail::swiglu_grad_a(g, a, b, s);
  const Eigen::ArrayXf db = rex::detail::swiglu_grad_b(g, a, s);
  // Arrays use Eigen's vectorised exp, floats expf: each side within gamma_R plus a call (4 ulp)
  // of exact, R <= 3 roundings for y, s and db, no cancellation; da's 1 - s amplifies s's error
  // by a s / (1 + a (1 - s)) <= 4 at a = 4 (5 calls' worth), with 8 roundings.
  using rex::testing::gamma_n, rex::testing::kCallRoundoff;
  const double one_side = gamma_n(3) + kCallRoundoff, one_side_da = gamma_n(8) + 5 * kCallRoundoff;
  for (int i = 0; i < 5; ++i) {
    const float si = rex::detail::sigmoid_of(a[i]);
    CHECK(y[i] == doctest::Approx(rex::detail::swiglu_value(a[i], b[i])).epsilon(2 * one_side));
    CHECK(s[i] == doctest::Approx(si).epsilon(2 * one_side));
    CHECK(
        da[i] ==
        doctest::Approx(rex::detail::swiglu_grad_a(g[i], a[i], b[i], si)).epsilon(2 * one_side_da));
    CHECK(db[i] ==
          doctest::Approx(rex::detail::swiglu_grad_b(g[i], a[i], si)).epsilon(2 * one_side));
    // And against the closed form: silu(a) b, its derivative in a times b, and silu(a).
    const double ad = a[i], sd = 1.0 / (1.0 + std::exp(-ad));
    CHECK(y[i] == doctest::Approx(ad * sd * b[i]).epsilon(one_side));
    CHECK(da[i] ==
          doctest::Approx(g[i] * b[i] * sd * (1.0 + ad * (1.0 - sd))).epsilon(one_side_da));
    CHECK(db[i] == doctest::Approx(g[i] * ad * sd).epsilon(one_side));
  }
}

// The prefix is the chain's partial sum: the bits of sum_of over the first terms; its gradient goes
// to those terms only, the sum's to all of them.
TEST_CASE("sum_of_with_prefix gives sum_of of the first terms beside the sum, gradients included") {
  rex::Generator gen(42);
  for (const auto& [count, prefix] : std::vector<std::pair<size_t, size_t>>{
           {5, 3}, {5, 1}, {5, 5}, {2, 1}, {40, 33}, {40, 32}, {40, 2}}) {
    CAPTURE(count);
    CAPTURE(prefix);
    std::vector<Tensor> terms;
    for (size_t i = 0; i < count; ++i) {
      const float magnitude = std::ldexp(1.0f, static_cast<int>(i % 24));
      terms.push_back((rex::normal(rex::Shape{4, 3}, gen) * magnitude).detach().requires_grad_());
    }
    const rex::SumAndPrefix sums = rex::sum_of_with_prefix(terms, prefix);
    CHECK(rex::testing::same_bytes(sums.sum, rex::sum_of(terms)));
    const std::vector<Tensor> first(terms.begin(), terms.begin() + static_cast<long>(prefix));
    CHECK(rex::testing::same_bytes(sums.prefix, rex::sum_of(first)));
    const Tensor g = rex::normal(rex::Shape{4, 3}, gen);
    sums.prefix.backward(g);
    for (size_t i = 0; i < count; ++i) {
      CAPTURE(i);
      if (i < prefix) {
        CHECK(rex::testing::same_bytes(terms[i].grad(), g));
      } else {
        CHECK_FALSE(terms[i].grad().defined());
      }
    }
  }
}

TEST_CASE("sum_of is the adds chained left to right, bit for bit, and passes g to every term") {
  rex::Generator gen(41);
  for (const int count : {1, 2, 5, 40}) {
    CAPTURE(count);
    std::vector<Tensor> terms, leaves;
    for (int i = 0; i < count; ++i) {
      // Magnitudes apart by 2^i, so that a different order of the adds rounds differently.
      terms.push_back(rex::normal(rex::Shape{3, 7}, gen) * std::ldexp(1.0f, i % 24));
      leaves.push_back(terms.back().detach().requires_grad_());
    }
    Tensor chained = terms[0];
    for (int i = 1; i < count; ++i) chained = chained + terms[static_cast<size_t>(i)];
    const Tensor sum = rex::sum_of(leaves);
    CHECK(rex::testing::same_bytes(sum, chained));
    const Tensor g = rex::normal(rex::Shape{3, 7}, gen);
    sum.backward(g);
    for (const Tensor& leaf : leaves) CHECK(rex::testing::same_bytes(leaf.grad(), g));
  }
  CHECK(rex::testing::error_message([] { rex::sum_of({}); }).find("sum_of: no terms") == 0);
  CHECK(rex::testing::error_message([] {
          rex::sum_of_with_prefix({rex::zeros(rex::Shape{2})}, 2);
        }).find("sum_of: a prefix of 2 of 1 terms") == 0);
  CHECK(rex::testing::error_message([] {
          rex::sum_of({rex::zeros(rex::Shape{2}), rex::zeros(rex::Shape{3})});
        }).find("sum_of: the terms' shapes differ: [2] and [3]") == 0);
}
