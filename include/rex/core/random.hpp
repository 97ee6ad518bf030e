// Generator: an explicit, seeded source of random numbers.
//
// Counter-based: the n-th draw is splitmix64(seed, n), so a generator is fully described by (seed,
// counter), can be saved and restored exactly, and gives the same numbers on every platform (no
// std::*_distribution, whose output is implementation-defined). Normal samples use Box-Muller.
// mix64 and the integer draws (generator_draw, draw_below) also run in CUDA kernels, which
// reproduce host draws bit for bit (the PSR masks, rex/backend/psr_mask.hpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

#include "rex/core/error.hpp"
#include "rex/core/host_device.hpp"

namespace rex {

// One round of the splitmix64 finaliser: a bijective mix of 64 bits. Also the hash behind every
// "pure function of (seed, ...)" in rex, such as the PSR masks.
REX_HOST_DEVICE inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The draw number `counter` of the generator seeded with `seed`.
REX_HOST_DEVICE inline uint64_t generator_draw(uint64_t seed, uint64_t counter) {
  return mix64(mix64(seed) ^ counter);
}

// Uniform integer in [0, n) (n > 0) from the draws at counter, counter + 1, ... of the generator
// seeded with `seed`, by rejection so that every value is equally likely; counter moves past the
// draws used.
REX_HOST_DEVICE inline uint64_t draw_below(uint64_t seed, uint64_t& counter, uint64_t n) {
  const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t x = generator_draw(seed, counter++);
  while (x >= limit) x = generator_draw(seed, counter++);
  return x % n;
}

class Generator {
 public:
  explicit Generator(uint64_t seed = 0, uint64_t counter = 0) : seed_(seed), counter_(counter) {}

  uint64_t seed() const { return seed_; }
  uint64_t counter() const { return counter_; }

  uint64_t next_u64() { return generator_draw(seed_, counter_++); }

  // Uniform in [0, 1) with 24 random bits, exactly representable as float.
  float uniform() { return static_cast<float>(next_u64() >> 40) * 0x1p-24f; }

  // Uniform integer in [0, n) (n > 0), by rejection so that every value is equally likely.
  uint64_t below(uint64_t n) {
    REX_CHECK(n > 0, "Generator::below: n must be positive");
    return draw_below(seed_, counter_, n);
  }

  // Standard normal sample.
  float normal() {
    // u1 in (0, 1] keeps the logarithm finite.
    const double u1 = (static_cast<double>(next_u64() >> 11) + 1.0) * 0x1p-53;
    const double u2 = static_cast<double>(next_u64() >> 11) * 0x1p-53;
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) *
                              std::cos(2.0 * std::numbers::pi * u2));
  }

 private:
  uint64_t seed_;
  uint64_t counter_;
};

}  // namespace rex
