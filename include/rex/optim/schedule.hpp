// Learning-rate schedule: linear warmup, then cosine decay from max_lr to min_ratio * max_lr.
//
// A plain aggregate evaluated per step (no hidden counter), so a resumed run gets the same rate
// from the step number alone. step is 0-based, the step about to be taken:
//   step < warmup:          max_lr * (step + 1) / warmup  (the first step is not taken at lr 0)
//   warmup <= step < total: min + (max - min) * 0.5 * (1 + cos(pi * progress)),
//                           progress = (step - warmup) / max(1, total - warmup)
//   step >= total:          min = min_ratio * max_lr
// The fields are checked on every call (the struct is built with designated initialisers, so there
// is no constructor to check them once); the arithmetic is in double, rounded to f32 at the end.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "rex/core/error.hpp"

namespace rex::optim {

struct CosineSchedule {
  float max_lr;
  int64_t warmup;
  int64_t total;
  float min_ratio = 0.1f;

  float lr(int64_t step) const {
    REX_CHECK(total >= 1, "CosineSchedule: total ", total, " must be at least 1");
    REX_CHECK(warmup >= 0, "CosineSchedule: warmup ", warmup, " is negative");
    REX_CHECK(warmup <= total, "CosineSchedule: warmup ", warmup, " is past total ", total);
    REX_CHECK(min_ratio >= 0.0f && min_ratio <= 1.0f, "CosineSchedule: min_ratio ", min_ratio,
              " is not in [0, 1]");
    REX_CHECK(max_lr > 0.0f && std::isfinite(max_lr), "CosineSchedule: max_lr ", max_lr,
              " is not a finite positive number");
    REX_CHECK(step >= 0, "CosineSchedule::lr: step ", step, " is negative");
    const double max = max_lr, min = static_cast<double>(min_ratio) * max;
    if (step < warmup) {
      return static_cast<float>(max * static_cast<double>(step + 1) / static_cast<double>(warmup));
    }
    if (step >= total) return static_cast<float>(min);
    const double progress = static_cast<double>(step - warmup) /
                            static_cast<double>(std::max<int64_t>(1, total - warmup));
    return static_cast<float>(min +
                              (max - min) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
  }
};

}  // namespace rex::optim
