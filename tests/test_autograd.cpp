// Autodiff semantics: accumulation, shared subexpressions, no-grad, detach, released graphs,
// parameters vs constants, explicit output gradients.
#include <doctest/doctest.h>

#include <rex/nn/moe.hpp>
#include <rex/rex.hpp>

#include "meeting_gradients.hpp"

using rex::Tensor;

namespace {
Tensor param(std::vector<float> values) {
  Tensor t = rex::from_vector<float>(values);
  t.requires_grad_();
  return t;
}
}  // namespace

TEST_CASE("a shared subexpression sums the gradients of every use") {
  Tensor x = param({2.0f, -3.0f});
  Tensor y = x * x;                       // dy/dx = 2x
  Tensor z = rex::sum(y + x * 3.0f + y);  // dz/dx = 4x + 3
  z.backward();
  // Small integers: every step is exact in float, so the comparison is too.
  CHECK(x.grad().at({0}) == 11.0f);
  CHECK(x.grad().at({1}) == -9.0f);
}

TEST_CASE("gradients accumulate across backward calls until zero_grad") {
  Tensor x = param({1.0f, 2.0f});
  for (int i = 0; i < 3; ++i) rex::sum(x * 2.0f).backward();
  CHECK(x.grad().to_vector() == std::vector<float>{6.0f, 6.0f});
  x.zero_grad();
  CHECK_FALSE(x.grad().defined());
  rex::sum(x * x).backward();
  CHECK(x.grad().to_vector() == std::vector<float>{2.0f, 4.0f});
}

TEST_CASE("a leaf's gradient never aliases another tensor") {
  Tensor a = param({1.0f}), b = param({2.0f});
  rex::sum(a + b).backward();  // add's backward hands the same gradient to both inputs
  CHECK_FALSE(a.grad().shares_storage_with(b.grad()));
  a.grad().fill_(5.0f);
  CHECK(b.grad().item() == 1.0f);
}

TEST_CASE("constants get no gradient; parameters do") {
  Tensor w = param({0.5f, 1.5f});
  Tensor c = rex::from_vector<float>({3.0f, 4.0f});
  Tensor loss = rex::sum(w * c);
  CHECK(loss.requires_grad());
  CHECK_FALSE(loss.is_leaf());
  CHECK_FALSE(c.requires_grad());
  loss.backward();
  CHECK(w.grad().to_vector() == std::vector<float>{3.0f, 4.0f});
  CHECK_FALSE(c.grad().defined());
  CHECK_THROWS_AS(rex::sum(c * c).backward(), rex::Error);
}

TEST_CASE("no-grad scope records nothing and restores the mode") {
  Tensor w = param({1.0f});
  {
    rex::NoGradGuard guard;
    CHECK_FALSE(rex::grad_enabled());
    Tensor y = w * 2.0f;
    CHECK_FALSE(y.requires_grad());
    CHECK_THROWS_AS(y.backward(), rex::Error);
  }
  CHECK(rex::grad_enabled());
  CHECK((w * 2.0f).requires_grad());
}

TEST_CASE("detach cuts the graph but shares the values") {
  Tensor x = param({3.0f});
  Tensor y = x * x;
  Tensor d = y.detach();
  CHECK(d.shares_storage_with(y));
  CHECK_FALSE(d.requires_grad());
  rex::sum(d * x).backward();                            // d is a constant 9: d(9x)/dx = 9
  CHECK(x.grad().item() == 9.0f);                        // exact: small integers
  CHECK_THROWS_AS(y.requires_grad_(false), rex::Error);  // not a leaf
}

TEST_CASE("backward through a released graph is a clear error; retain_graph allows twice") {
  Tensor x = param({2.0f});
  Tensor y = rex::sum(rex::exp(x));
  y.backward();
  CHECK_THROWS_WITH_AS(y.backward(), doctest::Contains("released by an earlier backward()"),
                       rex::Error);

  Tensor x2 = param({2.0f});
  Tensor y2 = rex::sum(x2 * x2);
  y2.backward(/*retain_graph=*/true);
  y2.backward();
  CHECK(x2.grad().item() == 8.0f);  // exact: small integers
}

TEST_CASE("backward with an explicit output gradient; shape is checked") {
  Tensor x = param({1.0f, 2.0f, 3.0f});
  Tensor y = x * x;
  y.backward(rex::from_vector<float>({1.0f, 0.0f, -1.0f}));
  CHECK(x.grad().to_vector() == std::vector<float>{2.0f, 0.0f, -6.0f});
  Tensor y2 = x * x;
  CHECK_THROWS_WITH_AS(y2.backward(rex::ones({2})), doctest::Contains("gradient of shape [2]"),
                       rex::Error);
  CHECK_THROWS_WITH_AS((x * x).backward(), doctest::Contains("reduce to a scalar"), rex::Error);
}

TEST_CASE("a leaf's own backward accumulates into it") {
  Tensor x = param({1.0f, 2.0f});
  x.backward(rex::from_vector<float>({3.0f, 4.0f}));
  CHECK(x.grad().to_vector() == std::vector<float>{3.0f, 4.0f});
}

TEST_CASE("a deep chain backpropagates without recursion limits") {
  Tensor x = param({1.0f});
  Tensor y = x;
  for (int i = 0; i < 20000; ++i) y = y * 1.0f;
  y.backward(rex::ones({1}));
  CHECK(x.grad().item() == 1.0f);
}

TEST_CASE("index tensors cannot require gradients") {
  Tensor ids = rex::arange(3, rex::DType::i32);
  CHECK_THROWS_AS(ids.requires_grad_(), rex::Error);
}

// Where two gradients meet, the second use's backward may add the waiting one in its own kernel
// (top-k and the dispatch do, on either device: an addition alone); the CPU's rms_norm and matmul,
// whose loops have products a compiler may fuse with that addition, leave it to the engine. Either
// way p's gradient has the bits of the two gradients computed apart and added.
TEST_CASE(
    "a gradient that meets another is added with the engine's bits, by the op or the engine") {
  rex::Generator gen(31);
  const Tensor indices = rex::from_vector<int32_t>({0, 2, 1, 2, 2, 0, 1, 1, 0, 2}, {5, 2});
  const rex::nn::RoutingPlan plan = rex::nn::plan_routing(indices, 3);
  const Tensor norm_weight = rex::uniform({6}, gen, 0.5f, 1.5f);
  const Tensor weight = rex::uniform({6, 4}, gen, -1.0f, 1.0f);
  const std::vector<std::pair<const char*, std::function<Tensor(const Tensor&)>>> uses = {
      {"topk", [](const Tensor& x) { return rex::topk(x, 2).values; }},
      {"dispatch_rows", [&](const Tensor& x) { return rex::dispatch_rows(x, plan); }},
      {"rms_norm", [&](const Tensor& x) { return rex::rms_norm(x, norm_weight); }},
      {"matmul", [&](const Tensor& x) { return rex::matmul(x, weight); }},
  };
  for (const auto& [name, use] : uses) {
    CAPTURE(name);
    const rex::testing::MeetingGradients g =
        rex::testing::meeting_gradients(rex::uniform({5, 6}, gen, -1.0f, 1.0f), use, gen);
    CHECK(g.together.to_vector() == g.apart.to_vector());
  }
}
