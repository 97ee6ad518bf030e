// Rounding-error bounds for the tolerances of the suites (docs/testing.md, "Tolerances").
//
// u = 2^-24 is float's unit roundoff: one correctly rounded operation is within u of exact,
// relative. gamma_n(n) = n u / (1 - n u) is Higham's bound for n of them in a chain, and for a
// float sum or dot product of n terms in any order relative to the sum of the terms' magnitudes
// (N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Lemmas 3.1 and 3.3 and
// (3.5)). Two computations of the same value in different orders are within twice the bound of
// one. One ulp of a float is at most 2u relative.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include <doctest/doctest.h>
#include <rex/rex.hpp>

namespace rex::testing {

inline constexpr double kUnitRoundoff = 0x1p-24;

// One math-library call (expf, logf, powf, tanhf, erff, Eigen's vectorised exp), on the CPU or a
// GPU: 4 ulp = 8 u. CUDA documents expf, tanhf and erff within 2 ulp, logf 1 and powf 4 (CUDA C++
// Programming Guide, "Mathematical Functions"); glibc's are within 2 ulp on x86-64 (glibc manual,
// "Known Maximum Errors in Math Functions").
inline constexpr double kCallRoundoff = 8 * kUnitRoundoff;

constexpr double gamma_n(double n) { return n * kUnitRoundoff / (1 - n * kUnitRoundoff); }

// |t| element by element, on the host (the magnitudes that bounds are relative to).
inline Tensor abs_of(const Tensor& t) {
  Tensor a = t.to(Device::cpu()).clone();
  for (int64_t i = 0; i < a.numel(); ++i) a.data<float>()[i] = std::fabs(a.data<float>()[i]);
  return a;
}

// |got - want| <= tol * magnitude element by element (a NaN fails), naming the first element
// that is not: for values whose terms cancel, where a bound relative to the result cannot hold.
inline void check_within(const Tensor& got, const Tensor& want, const Tensor& magnitude,
                         double tol) {
  REQUIRE(got.shape() == want.shape());
  REQUIRE(magnitude.shape() == want.shape());
  const std::vector<float> g = got.to_vector(), w = want.to_vector(), m = magnitude.to_vector();
  for (size_t i = 0; i < g.size(); ++i) {
    const double diff = std::abs(double{g[i]} - w[i]), limit = tol * m[i];
    if (!(diff <= limit)) {
      CHECK_MESSAGE(diff <= limit, "element ", i, ": got ", g[i], ", want ", w[i], ", bound ",
                    limit);
      return;
    }
  }
}

}  // namespace rex::testing
