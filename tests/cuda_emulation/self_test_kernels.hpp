// Host entry points of the emulation's self-test kernels (self_test_kernels.cu). Each runs one
// kernel on the emulated device and returns what the launch reported plus the values it wrote.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace cuda_emulation::self_test {

struct Outcome {
  cudaError_t error = cudaSuccess;
  std::string message;  // cudaGetErrorString(error)
  std::vector<double> values;
};

// ---- primitives, checked against closed forms by the test ----
Outcome block_sum(int n, int blocks, int threads);             // sum of 0..n-1, per launch
Outcome warp_shuffles(int threads);                            // per thread: 5 values, see the .cu
Outcome block_inclusive_scan(int threads);                     // prefix sums of 1..threads
Outcome atomics(int blocks, int threads);                      // counters, min, max, CAS, histogram
Outcome dynamic_shared_reverse(int n);                         // the reversed 0..n-1
Outcome votes(int threads);                                    // ballot, any, all per warp
Outcome coordinates(dim3 grid, dim3 block);                    // each thread's linear global index
Outcome grid_stride_copy(int64_t n, int blocks, int threads);  // out[i] = 2 i + 1, every i once

// ---- kernels counted exactly by the counters' test ----
Outcome strided_copy(int threads, int stride);  // out[i] = in[i * stride] = i * stride, one block
Outcome shared_transpose(bool padded);          // the transposed 0..1023 (32 x 32, 1 block)
Outcome shared_doubles(int threads);            // the reversed 0..threads-1 (at most 64)
Outcome counted_atomics(int blocks, int threads);     // every thread adds 1 in shared and global
Outcome counted_arithmetic(int blocks, int threads);  // see the .cu: FLOPs that vary by thread
Outcome launch_loop(int launches);                    // `launches` launches of an empty kernel

// ---- broken kernels the emulation must catch ----
Outcome missing_syncthreads(int threads);
Outcome read_past_allocation(int n);
Outcome wrong_shuffle_offset();
Outcome shared_write_race(int threads);
Outcome launch_with_threads(int threads);
Outcome launch_with_grid(dim3 grid);
Outcome divergent_syncthreads(int threads);
Outcome exit_before_syncthreads(int threads);
Outcome read_uninitialized_shared();
Outcome freed_pointer_argument();
Outcome host_pointer_argument();
Outcome use_after_free_through_table();
Outcome shuffle_with_exited_lane();
Outcome too_much_dynamic_shared();
Outcome warp_deadlock();

}  // namespace cuda_emulation::self_test
