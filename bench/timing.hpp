// Timing helpers for the benchmarks: a monotonic clock, medians, and an interleaved A/B runner that
// alternates the two contenders every repeat so that both see the same machine noise.
#pragma once

#include <algorithm>
#include <chrono>
#include <utility>
#include <vector>

namespace rex::bench {

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// Runs a() and b() `warmup` times each, then `repeats` times interleaved, swapping which goes first
// on every other repeat; returns the median seconds of each.
template <class A, class B>
std::pair<double, double> interleaved_medians(A&& a, B&& b, int warmup, int repeats) {
  for (int i = 0; i < warmup; ++i) a(), b();
  auto timed = [](auto& f) {
    const double start = now_seconds();
    f();
    return now_seconds() - start;
  };
  std::vector<double> ta, tb;
  for (int i = 0; i < repeats; ++i) {
    if (i % 2 == 0) {
      ta.push_back(timed(a));
      tb.push_back(timed(b));
    } else {
      tb.push_back(timed(b));
      ta.push_back(timed(a));
    }
  }
  return {median(ta), median(tb)};
}

}  // namespace rex::bench
