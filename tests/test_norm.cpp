// Tests for rms_norm: forward against a double-precision loop, gradients (x and weight) by central
// differences on 1-d, 2-d and 3-d inputs, the fused op against rms_norm_reference (values and
// gradients), and the error messages.
#include <doctest/doctest.h>

#include <cmath>
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

// y = x / sqrt(mean(x^2) + eps) * w over the last axis, in double.
std::vector<double> rms_norm_loop(const Tensor& x, const Tensor& w, double eps) {
  const int64_t d = w.numel(), rows = x.numel() / d;
  const float *px = x.data<float>(), *pw = w.data<float>();
  std::vector<double> out(static_cast<size_t>(x.numel()));
  for (int64_t i = 0; i < rows; ++i) {
    double ms = 0;
    for (int64_t j = 0; j < d; ++j) ms += static_cast<double>(px[i * d + j]) * px[i * d + j];
    const double r = 1.0 / std::sqrt(ms / static_cast<double>(d) + eps);
    for (int64_t j = 0; j < d; ++j) out[static_cast<size_t>(i * d + j)] = px[i * d + j] * r * pw[j];
  }
  return out;
}

}  // namespace

TEST_CASE("rms_norm matches a double-precision loop") {
  rex::Generator gen(1);
  for (const Shape& shape : {Shape{5}, Shape{4, 8}, Shape{2, 3, 6}}) {
    CAPTURE(shape);
    const int64_t d = shape[shape.rank() - 1];
    const Tensor x = rex::normal(shape, gen, 0.0f, 3.0f);
    const Tensor w = rex::normal(Shape{d}, gen, 1.0f, 0.5f);
    for (float eps : {1e-6f, 0.5f}) {
      const Tensor y = rex::rms_norm(x, w, eps);
      CHECK(y.shape() == shape);
      // x * r * w with r rounded to float from a double sum: 3 roundings, gamma_3 of |y|.
      check_close(y, rms_norm_loop(x, w, eps), rex::testing::gamma_n(3));
    }
  }
  // Closed form: a row of equal values c normalises to sign(c) * w (eps = 0).
  const Tensor y = rex::rms_norm(rex::full(Shape{2, 3}, -4.0f),
                                 rex::from_vector<float>({1.0f, 2.0f, 3.0f}), 0.0f);
  check_close(y, {-1, -2, -3, -1, -2, -3}, 0.0);  // exact: r = 1/4 and -4 r w are exact
  // eps dominates an all-zero row: the output is exactly 0, not NaN.
  for (float v : rex::rms_norm(rex::zeros(Shape{1, 4}), rex::ones(Shape{4})).to_vector())
    CHECK(v == 0.0f);
}

TEST_CASE("rms_norm over many rows (rows and weight columns in parallel) matches loops") {
  // 300 rows of 100: above the parallel threshold, with a last column block of 4.
  rex::Generator gen(9);
  const int64_t rows = 300, d = 100;
  Tensor x = random_normal_param({rows, d}, gen), w = random_normal_param({d}, gen);
  const Tensor g = rex::normal({rows, d}, gen);
  const Tensor y = rex::rms_norm(x, w, 1e-5f);
  check_close(y, rms_norm_loop(x, w, 1e-5), rex::testing::gamma_n(3));  // as above
  y.backward(g);
  // dw[j] = sum_r g[r, j] x[r, j] rstd[r], in double.
  const float *px = x.data<float>(), *pg = g.data<float>();
  std::vector<double> dw(static_cast<size_t>(d), 0.0), rstd(static_cast<size_t>(rows));
  std::vector<double> magnitude(static_cast<size_t>(d), 0.0);  // sum_r |g x rstd|
  for (int64_t r = 0; r < rows; ++r) {
    double squares = 0;
    for (int64_t j = 0; j < d; ++j) squares += static_cast<double>(px[r * d + j]) * px[r * d + j];
    rstd[static_cast<size_t>(r)] = 1.0 / std::sqrt(squares / d + 1e-5);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < d; ++j) {
      const double term =
          static_cast<double>(pg[r * d + j]) * px[r * d + j] * rstd[static_cast<size_t>(r)];
      dw[static_cast<size_t>(j)] += term;
      magnitude[static_cast<size_t>(j)] += std::abs(term);
    }
  // Each term rounds rstd and x rstd to float (gamma_2 of the term); the double sum's rounding to
  // float adds u |dw|: within gamma_3 of sum |terms|, which cancel over the 300 rows.
  for (int64_t j = 0; j < d; ++j)
    CHECK(std::abs(w.grad().data<float>()[j] - dw[static_cast<size_t>(j)]) <=
          rex::testing::gamma_n(3) * magnitude[static_cast<size_t>(j)]);
}

TEST_CASE("rms_norm gradient") {
  rex::Generator gen(2);
  for (const Shape& shape : {Shape{7}, Shape{3, 5}, Shape{2, 3, 4}, Shape{4, 1, 6}}) {
    CAPTURE(shape);
    const int64_t d = shape[shape.rank() - 1];
    CHECK_GRADIENTS([](const std::vector<Tensor>& in) { return rex::rms_norm(in[0], in[1]); },
                    {random_normal_param(shape, gen), random_normal_param(Shape{d}, gen, 1.0f)});
    CHECK_GRADIENTS([](const std::vector<Tensor>& in) { return rex::rms_norm(in[0], in[1], 0.3f); },
                    {random_normal_param(shape, gen), random_normal_param(Shape{d}, gen, 1.0f)});
  }
  // Only one input requiring a gradient takes the skip paths of the backward.
  const Tensor fixed_w = rex::normal(Shape{5}, gen, 1.0f, 0.5f);
  const Tensor fixed_x = rex::normal(Shape{3, 5}, gen);
  CHECK_GRADIENTS([&](const std::vector<Tensor>& in) { return rex::rms_norm(in[0], fixed_w); },
                  {random_normal_param(Shape{3, 5}, gen)});
  CHECK_GRADIENTS([&](const std::vector<Tensor>& in) { return rex::rms_norm(fixed_x, in[0]); },
                  {random_normal_param(Shape{5}, gen, 1.0f)});
}

TEST_CASE("rms_norm_reference gradient") {
  rex::Generator gen(3);
  CHECK_GRADIENTS(
      [](const std::vector<Tensor>& in) { return rex::rms_norm_reference(in[0], in[1]); },
      {random_normal_param(Shape{2, 3, 4}, gen), random_normal_param(Shape{4}, gen, 1.0f)});
}

TEST_CASE("rms_norm matches rms_norm_reference (values and gradients of x and weight)") {
  rex::Generator gen(4);
  for (const Shape& shape : {Shape{6, 16}, Shape{2, 5, 12}, Shape{3, 2, 2, 7}}) {
    CAPTURE(shape);
    const int64_t d = shape[shape.rank() - 1];
    Tensor x = random_normal_param(shape, gen);
    Tensor w = random_normal_param(Shape{d}, gen, 1.0f);
    const Tensor g = rex::normal(shape, gen);

    const Tensor ref = rex::rms_norm_reference(x, w, 1e-5f);
    ref.backward(g);
    const Tensor ref_gx = x.grad(), ref_gw = w.grad();
    x.zero_grad(), w.zero_grad();

    const Tensor fused = rex::rms_norm(x, w, 1e-5f);
    fused.backward(g);
    // The reference's mean of d squares, + eps, rsqrt and two products against the fused op's 3
    // roundings: gamma_(d + 9) of |y|.
    check_close(fused, ref, rex::testing::gamma_n(static_cast<double>(d + 9)));
    // The gradients against the magnitudes of their terms (r = rstd, xhat = x r, both in double):
    // dx = r (g w - xhat mean(g w xhat)) cancels, so against r (|g w| + |xhat| mean|g w xhat|),
    // the reference's chain being d terms (the sum through the mean) and about 16 roundings;
    // dw = sum over the rows of g xhat, against sum |g xhat|, rows terms and 4 roundings.
    const int64_t rows = x.numel() / d;
    const float *px = x.data<float>(), *pw = w.data<float>(), *pg = g.data<float>();
    std::vector<double> dx_terms(static_cast<size_t>(x.numel())), dw_terms(static_cast<size_t>(d));
    for (int64_t r = 0; r < rows; ++r) {
      double squares = 0, dot = 0;
      for (int64_t j = 0; j < d; ++j) squares += static_cast<double>(px[r * d + j]) * px[r * d + j];
      const double rstd = 1.0 / std::sqrt(squares / d + 1e-5);
      for (int64_t j = 0; j < d; ++j)
        dot += std::abs(double{pg[r * d + j]} * pw[j] * px[r * d + j]);
      for (int64_t j = 0; j < d; ++j) {
        const double xhat = std::abs(double{px[r * d + j]} * rstd);
        dx_terms[static_cast<size_t>(r * d + j)] =
            rstd * (std::abs(double{pg[r * d + j]} * pw[j]) + xhat * dot * rstd / d);
        dw_terms[static_cast<size_t>(j)] += std::abs(double{pg[r * d + j]}) * xhat;
      }
    }
    for (int64_t i = 0; i < x.numel(); ++i)
      CHECK(std::abs(double{x.grad().data<float>()[i]} - ref_gx.data<float>()[i]) <=
            rex::testing::gamma_n(static_cast<double>(d + 16)) * dx_terms[static_cast<size_t>(i)]);
    for (int64_t j = 0; j < d; ++j)
      CHECK(std::abs(double{w.grad().data<float>()[j]} - ref_gw.data<float>()[j]) <=
            rex::testing::gamma_n(static_cast<double>(rows + 4)) *
                dw_terms[static_cast<size_t>(j)]);
  }
}

TEST_CASE("rms_norm rejects bad inputs with messages naming the op") {
  const Tensor x = rex::zeros(Shape{2, 3});
  CHECK_THROWS_AS(rex::rms_norm(x, rex::ones(Shape{4})), rex::Error);
  CHECK(error_message([&] {
          rex::rms_norm(x, rex::ones(Shape{4}));
        }).find("rms_norm: x [2, 3] and weight [4]") != std::string::npos);
  CHECK(error_message([&] {
          rex::rms_norm(x, rex::ones(Shape{1, 3}));
        }).find("rms_norm: x [2, 3] and weight [1, 3]") != std::string::npos);
  CHECK(error_message([&] {
          rex::rms_norm(rex::scalar(1.0f), rex::ones(Shape{1}));
        }).find("rms_norm: x [] and weight [1]") != std::string::npos);
  CHECK(error_message([&] {
          rex::rms_norm(rex::arange(3, rex::DType::i32), rex::ones(Shape{3}));
        }).find("rms_norm: expected an f32") != std::string::npos);
  CHECK(error_message([&] {
          rex::rms_norm(rex::zeros(Shape{2, 0}), rex::ones(Shape{0}));
        }).find("rms_norm: the last axis of x [2, 0] is empty") != std::string::npos);
  CHECK(error_message([&] {
          rex::rms_norm(x, rex::ones(Shape{3}), -1.0f);
        }).find("rms_norm: eps") != std::string::npos);
  CHECK(error_message([&] {
          rex::rms_norm_reference(x, rex::ones(Shape{2}));
        }).find("rms_norm_reference: x [2, 3] and weight [2]") != std::string::npos);
}

TEST_CASE("add_rms_norm is add then rms_norm, values and gradients, and names bad inputs") {
  rex::Generator gen(41);
  Tensor a = random_normal_param(Shape{3, 5}, gen), b = random_normal_param(Shape{3, 5}, gen);
  Tensor w = random_normal_param(Shape{5}, gen);
  const Tensor gy = random_normal_param(Shape{3, 5}, gen).detach();
  const Tensor gs = random_normal_param(Shape{3, 5}, gen).detach();
  auto gradients = [&](const Tensor& sum, const Tensor& y) {
    a.zero_grad(), b.zero_grad(), w.zero_grad();
    (rex::sum(y * gy) + rex::sum(sum * gs)).backward();
    return std::vector<std::vector<float>>{sum.to_vector(), y.to_vector(), a.grad().to_vector(),
                                           b.grad().to_vector(), w.grad().to_vector()};
  };
  const rex::AddRmsNorm fused = rex::add_rms_norm(a, b, w);
  const auto got = gradients(fused.sum, fused.y);
  const Tensor sum = a + b;
  CHECK(got == gradients(sum, rex::rms_norm(sum, w)));

  CHECK(error_message([&] {
          rex::add_rms_norm(a, rex::zeros(Shape{3, 4}), w);
        }).find("add_rms_norm: a [3, 5] and b [3, 4] differ") != std::string::npos);
  CHECK(error_message([&] {
          rex::add_rms_norm(a, b, rex::ones(Shape{4}));
        }).find("add_rms_norm: x [3, 5] and weight [4]") != std::string::npos);
}
