// The PSR masks row by row, written once for both backends (the CPU loop below and the CUDA kernel
// psr_keep_rows_kernel in kernels/index.cu run the same code, so their masks are bit-identical).
//
// A mask keeps `pool - masked` experts of a pool and masks `masked` of them, never one of the
// `kept_count` experts from `kept_first` (psr.masks = own_first): the first `masked` positions of
// a partial Fisher-Yates shuffle of the maskable experts, driven by a Generator seeded with the
// row's seed (rex/nn/psr.hpp says what the experts and the scopes mean). The row's seed is a hash
// of the mask's place:
//   step scope:      step_seed = mix64(mix64(seed ^ "PSR") ^ step) ^ mix64(layer)
//   sequence scope:  mix64(mix64(step_seed) ^ sequence)
//   token scope:     mix64(mix64(sequence seed) ^ position)
// with `sequence` the sequence's index in the step's whole batch and `position` the token's in
// its sequence, so that every mask is a pure function of its place, whatever the split of the
// batch. `layer` is the layer's index, or its block's under psr.tie_block.
#pragma once

#include <cstdint>

#include "rex/core/host_device.hpp"
#include "rex/core/random.hpp"

namespace rex::detail {

enum class PsrScope : int32_t { step, sequence, token };

// The masks of `rows` consecutive tokens: whole sequences of sequence_length tokens, the first
// being sequence first_sequence of the step's batch, their positions counted from first_position.
struct PsrMaskRows {
  uint64_t step_seed = 0;  // psr_step_seed
  PsrScope scope = PsrScope::step;
  int64_t rows = 0, pool = 0, masked = 0;
  int64_t kept_first = 0, kept_count = 0;  // experts never masked
  int64_t sequence_length = 1, first_sequence = 0, first_position = 0;
};

REX_HOST_DEVICE inline uint64_t psr_step_seed(uint64_t seed, int64_t step, int64_t layer) {
  return mix64(mix64(seed ^ 0x50535200ull) ^ static_cast<uint64_t>(step)) ^
         mix64(static_cast<uint64_t>(layer));
}

// The seed of row `row`'s mask.
REX_HOST_DEVICE inline uint64_t psr_row_seed(const PsrMaskRows& m, int64_t row) {
  if (m.scope == PsrScope::step) return m.step_seed;
  const int64_t sequence = m.first_sequence + row / m.sequence_length;
  const uint64_t sequence_seed = mix64(mix64(m.step_seed) ^ static_cast<uint64_t>(sequence));
  if (m.scope == PsrScope::sequence) return sequence_seed;
  const int64_t position = m.first_position + row % m.sequence_length;
  return mix64(mix64(sequence_seed) ^ static_cast<uint64_t>(position));
}

// keep[0, pool) = 1 for the kept experts, 0 for the masked ones, of the mask seeded with
// row_seed; order is scratch for pool - kept_count expert indices.
template <class T>
REX_HOST_DEVICE inline void psr_mask_row(const PsrMaskRows& m, uint64_t row_seed, int32_t* order,
                                         T* keep) {
  int64_t maskable = 0;
  for (int64_t e = 0; e < m.pool; ++e) {
    keep[e] = T(1);
    if (e < m.kept_first || e >= m.kept_first + m.kept_count)
      order[maskable++] = static_cast<int32_t>(e);
  }
  uint64_t counter = 0;
  for (int64_t i = 0; i < m.masked; ++i) {
    const int64_t j = i + static_cast<int64_t>(
                              draw_below(row_seed, counter, static_cast<uint64_t>(maskable - i)));
    const int32_t chosen = order[j];
    order[j] = order[i];
    order[i] = chosen;
    keep[chosen] = T(0);
  }
}

}  // namespace rex::detail
