// Tensor basics: factories, element access, views, printing, the seeded generator, and errors.
#include <doctest/doctest.h>

#include <cmath>
#include <sstream>

#include <rex/rex.hpp>

#include "testing.hpp"

using rex::Shape;
using rex::Tensor;

TEST_CASE("shape: numel, axis normalisation, printing") {
  Shape s{2, 3, 4, 5};
  CHECK(s.rank() == 4);
  CHECK(s.numel() == 120);
  CHECK(s.numel(1, 3) == 12);
  CHECK(s.normalize_axis(-1, "t") == 3);
  CHECK(s.str() == "[2, 3, 4, 5]");
  CHECK(Shape{}.numel() == 1);
  CHECK_THROWS_WITH_AS(s.normalize_axis(4, "myop"),
                       "myop: axis 4 is out of range for shape [2, 3, 4, 5]", rex::Error);
  CHECK_THROWS_AS(Shape({2, -1}), rex::Error);
}

TEST_CASE("factories: zeros, ones, full, arange, from_vector") {
  Tensor z = rex::zeros({2, 3});
  Tensor o = rex::ones({2, 3});
  Tensor f = rex::full({4}, 2.5f);
  for (int64_t i = 0; i < 6; ++i) {
    CHECK(z.data<float>()[i] == 0.0f);
    CHECK(o.data<float>()[i] == 1.0f);
  }
  CHECK(f.at({3}) == 2.5f);
  Tensor a = rex::arange(5);
  CHECK(a.to_vector() == std::vector<float>{0, 1, 2, 3, 4});
  Tensor ai = rex::arange(3, rex::DType::i32);
  CHECK(ai.dtype() == rex::DType::i32);
  CHECK(ai.to_vector<int32_t>() == std::vector<int32_t>{0, 1, 2});
  Tensor v = rex::from_vector<float>({1, 2, 3, 4, 5, 6}, {2, 3});
  CHECK(v.at({1, 0}) == 4.0f);
  CHECK(v.at({0, 2}) == 3.0f);
  CHECK(rex::scalar(7.0f).item() == 7.0f);
  CHECK_THROWS_AS(rex::from_vector<float>({1, 2, 3}, {2, 2}), rex::Error);
  CHECK_THROWS_AS(v.at({2, 0}), rex::Error);
  CHECK_THROWS_AS(v.item(), rex::Error);
  CHECK_THROWS_AS(v.data<int32_t>(), rex::Error);
}

TEST_CASE("tensors of four and more axes index in row-major order") {
  Tensor t = rex::reshape(rex::arange(2 * 3 * 4 * 5 * 2), {2, 3, 4, 5, 2});
  CHECK(t.rank() == 5);
  CHECK(t.at({1, 2, 3, 4, 1}) == static_cast<float>((((1 * 3 + 2) * 4 + 3) * 5 + 4) * 2 + 1));
  CHECK(t.dim(-2) == 5);
}

TEST_CASE("generator: reproducible, uniform and normal moments") {
  rex::Generator g1(42), g2(42), g3(43);
  Tensor a = rex::normal({1000}, g1), b = rex::normal({1000}, g2), c = rex::normal({1000}, g3);
  CHECK(a.to_vector() == b.to_vector());
  CHECK(a.to_vector() != c.to_vector());

  rex::Generator g(7);
  const int64_t n = 200000;
  Tensor u = rex::uniform({n}, g, -1.0f, 3.0f);
  Tensor z = rex::normal({n}, g, 0.5f, 2.0f);
  double su = 0, sz = 0, szz = 0;
  float umin = 10, umax = -10;
  for (int64_t i = 0; i < n; ++i) {
    const double x = u.data<float>()[i], y = z.data<float>()[i];
    su += x, sz += y, szz += y * y;
    umin = std::min(umin, static_cast<float>(x)), umax = std::max(umax, static_cast<float>(x));
  }
  // Sample statistics of n = 200000 draws (a fixed seed, so the same on every machine): the
  // bounds are at least 6 standard errors. Approx allows epsilon (1 + |value|): the uniform mean,
  // 0.02 against 4 / sqrt(12 n) = 2.6e-3; the normal mean, 0.03 against 2 / sqrt(n) = 4.5e-3; the
  // normal standard deviation, 0.03 against 2 / sqrt(2 n) = 3.2e-3.
  CHECK(su / n == doctest::Approx(1.0).epsilon(0.01));
  CHECK(umin >= -1.0f);
  CHECK(umax < 3.0f);
  const double mean = sz / n, var = szz / n - mean * mean;
  CHECK(mean == doctest::Approx(0.5).epsilon(0.02));
  CHECK(std::sqrt(var) == doctest::Approx(2.0).epsilon(0.01));

  // A generator restored from (seed, counter) continues the same stream.
  rex::Generator first(9);
  (void)first.next_u64();
  rex::Generator resumed(first.seed(), first.counter());
  CHECK(first.next_u64() == resumed.next_u64());
  for (int i = 0; i < 1000; ++i) CHECK(first.below(7) < 7);
}

TEST_CASE("views share storage: reshape and leading-axis slice") {
  Tensor x = rex::reshape(rex::arange(12), {3, 4});
  Tensor flat = rex::reshape(x, {-1});
  CHECK(flat.shares_storage_with(x));
  Tensor rows = rex::slice(x, 0, 1, 3);
  CHECK(rows.shares_storage_with(x));
  CHECK(rows.shape() == Shape{2, 4});
  CHECK(rows.at({0, 0}) == 4.0f);
  x.data<float>()[5] = 100.0f;
  CHECK(rows.at({0, 1}) == 100.0f);  // a view sees writes to its base
  Tensor cols = rex::slice(x, 1, 1, 3);
  CHECK_FALSE(cols.shares_storage_with(x));  // not expressible without strides: a copy
  CHECK(cols.at({2, 1}) == 10.0f);
  Tensor copy = x.clone();
  CHECK_FALSE(copy.shares_storage_with(x));
  CHECK(copy.to_vector() == x.to_vector());
}

TEST_CASE("printing shows shape, dtype and elides long axes") {
  std::ostringstream small, big, idx;
  small << rex::from_vector<float>({1, 2, 3, 4}, {2, 2});
  CHECK(small.str() == "tensor([2, 2], f32) [[1, 2], [3, 4]]");
  big << rex::arange(10);
  CHECK(big.str() == "tensor([10], f32) [0, 1, 2, ..., 7, 8, 9]");
  idx << rex::arange(2, rex::DType::i32);
  CHECK(idx.str() == "tensor([2], i32) [0, 1]");
  std::ostringstream undefined;
  undefined << Tensor();
  CHECK(undefined.str() == "tensor(undefined)");
}

TEST_CASE("a CUDA tensor in a CPU-only build is a clear error, not a crash") {
  // test_tensor does not link rex::cuda.
  const std::string message = rex::testing::error_message(
      [] { (void)Tensor::empty({2}, rex::DType::f32, rex::Device::cuda()); });
  CHECK(message.find("built without rex's CUDA backend: link the rex::cuda CMake target") !=
        std::string::npos);
  CHECK_THROWS_WITH_AS(Tensor().shape(), "use of an undefined tensor", rex::Error);
}

TEST_CASE("allocated_bytes counts live storage and peak_allocated_bytes its maximum") {
  const int64_t before = rex::allocated_bytes();
  rex::reset_peak_allocated_bytes();
  {
    const rex::Tensor a = rex::Tensor::empty({1000});                 // 4000 bytes
    const rex::Tensor b = rex::Tensor::empty({10}, rex::DType::i32);  // 40 bytes
    CHECK(rex::allocated_bytes() == before + 4040);
    const rex::Tensor view = rex::reshape(a, {10, 100});  // shares a's storage: no new bytes
    CHECK(rex::allocated_bytes() == before + 4040);
  }
  CHECK(rex::allocated_bytes() == before);
  CHECK(rex::peak_allocated_bytes() == before + 4040);
}
