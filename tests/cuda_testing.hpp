// What the CUDA suites (test_cuda_*.cpp) share: the check that skips a case, saying so, on a
// machine without a GPU (CTest reports it skipped; the emulated build always has its device).
#pragma once

#include <iostream>

#include <rex/backend/cuda/runtime.hpp>

namespace rex::testing {

inline bool gpu_missing() {
  if (cuda::device_count() > 0) return false;
  std::cout << "SKIPPED: no CUDA device on this machine; this CUDA test did not run on a GPU\n";
  return true;
}

}  // namespace rex::testing
