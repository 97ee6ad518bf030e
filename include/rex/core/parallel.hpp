// REX_PARALLEL_FOR(clauses): `#pragma omp parallel for clauses` when compiled with OpenMP, nothing
// otherwise, so that a build without -fopenmp is serial and stays free of unknown-pragma warnings.
// Only loops whose iterations write disjoint memory use it (results never depend on thread count).
#pragma once

#include <cstdint>

#define REX_PRAGMA_TEXT(text) _Pragma(#text)
#ifdef _OPENMP
#define REX_PARALLEL_FOR(clauses) REX_PRAGMA_TEXT(omp parallel for clauses)
#else
#define REX_PARALLEL_FOR(clauses)
#endif

namespace rex::detail {

// Loops over fewer elements than this stay serial: a parallel region costs microseconds.
inline constexpr int64_t kParallelElements = 16384;

}  // namespace rex::detail
