// The gradient checker must be able to fail: a deliberately wrong backward, and a NaN gradient,
// are both reported, with the offending element named.
#include <doctest/doctest.h>

#include <cmath>

#include "gradcheck.hpp"

namespace {

// y = x^2 whose backward returns `factor` * x instead of 2x.
rex::Tensor square_with_backward_factor(const rex::Tensor& x, float factor) {
  rex::Tensor y = rex::detail::map(x, [](float v) { return v * v; });
  return rex::detail::record(y, "square", {x}, [x = x.detach(), factor](const rex::Tensor& g) {
    return rex::detail::GradList{g * x * factor};
  });
}

}  // namespace

TEST_CASE("gradcheck accepts a correct backward and rejects wrong or NaN gradients") {
  rex::Generator gen(5);
  rex::Tensor x = rex::uniform({3, 4}, gen, 0.5f, 2.0f).requires_grad_();
  auto run = [&](float factor) {
    return rex::testing::gradcheck(
        [factor](const auto& in) { return square_with_backward_factor(in[0], factor); }, {x});
  };
  CHECK(run(2.0f).ok);
  const auto wrong = run(2.1f);
  CHECK_FALSE(wrong.ok);
  CHECK(wrong.report.find("input 0 (shape [3, 4]) element") != std::string::npos);
  CHECK_FALSE(run(NAN).ok);
}
