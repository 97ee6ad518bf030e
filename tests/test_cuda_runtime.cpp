// rex::cuda device discovery: links against the compiled kernels library and reports the GPU, or
// says plainly that none is present.
#include <doctest/doctest.h>

#include <iostream>

#include <rex/backend/cuda/runtime.hpp>
#include <rex/rex.hpp>

TEST_CASE("cuda runtime: device discovery") {
  const int count = rex::cuda::device_count();
  CHECK(count >= 0);
  if (count == 0) {
    std::cout << "SKIPPED: no CUDA device on this machine; CUDA tests did not run on a GPU\n";
    CHECK_THROWS_AS(rex::cuda::device_description(0), rex::Error);
    return;
  }
  const std::string description = rex::cuda::device_description(0);
  std::cout << "CUDA device 0: " << description << "\n";
  CHECK(description.find("sm_") != std::string::npos);
}
