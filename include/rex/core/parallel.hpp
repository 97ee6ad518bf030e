// REX_PARALLEL_FOR(clauses): `#pragma omp parallel for clauses` when compiled with OpenMP, nothing
// otherwise, so that a build without -fopenmp is serial and stays free of unknown-pragma warnings.
// Only loops whose iterations write disjoint memory use it (results never depend on thread count).
// for_each_run splits a loop over items (rows, output elements) into fixed runs for it.
#pragma once

#include <algorithm>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

#define REX_PRAGMA_TEXT(text) _Pragma(#text)
#ifdef _OPENMP
#define REX_PARALLEL_FOR(clauses) REX_PRAGMA_TEXT(omp parallel for clauses)
#else
#define REX_PARALLEL_FOR(clauses)
#endif

namespace rex::detail {

// Loops over fewer elements than this stay serial: a parallel region costs microseconds.
inline constexpr int64_t kParallelElements = 16384;

// Runs f(first, last) over [0, items) in runs of whole items, about kParallelElements elements each
// (an item being item_size elements), in parallel when there are several. The runs depend only on
// the sizes, never on the thread count. f never sees an empty range.
template <class F>
void for_each_run(int64_t items, int64_t item_size, F f) {
  if (items <= 0) return;
  const int64_t per_run = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(item_size, 1));
  const int64_t runs = (items + per_run - 1) / per_run;
  if (runs <= 1) {  // no parallel region at all: even an inactive one costs a call into OpenMP
    f(int64_t{0}, items);
    return;
  }
  REX_PARALLEL_FOR()
  for (int64_t run = 0; run < runs; ++run) f(run * per_run, std::min(items, (run + 1) * per_run));
}

}  // namespace rex::detail

namespace rex {

// The threads rex's parallel loops use (OMP_NUM_THREADS; 1 in a build without OpenMP). Results do
// not depend on it (docs/architecture.md, "Determinism").
inline int thread_count() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace rex
