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

// ---- tensor-core instructions (kernels/mma.cuh) ----
// ldmatrix of `matrices` 8x8 matrices, element (i, r, c) = 256 i + 16 r + c + 1: lane l's registers
// at values[matrices l ..].
Outcome ldmatrix_fragments(int matrices, bool transposed);
// D = A B + C (A 16x16, B 16x8, C 16x8 row-major) by mma.sync m16n8k16 bf16, fragments loaded by
// the documented layout from global memory or by ldmatrix from shared memory; one mma per warp,
// block b's warp 0 writes its D to values[128 b ..].
Outcome mma_bf16(const std::vector<float>& a, const std::vector<float>& b,
                 const std::vector<float>& c, bool via_ldmatrix, int blocks, int threads);
// The same with mma.sync m16n8k8 tf32 (A 16x8, B 8x8).
Outcome mma_tf32(const std::vector<float>& a, const std::vector<float>& b,
                 const std::vector<float>& c, int blocks, int threads);
// Per value: bf16 bits (__float2bfloat16_rn), to_tf32 bits, pack_bf16x2(x, -x).
Outcome tensor_conversions(const std::vector<float>& x);

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
Outcome half_warp_mma();        // an mma inside if (lane < 16)
Outcome partial_warp_mma();     // the same kernel with a block of 16 threads
Outcome divergent_mma();        // even and odd lanes call mma from two places
Outcome misaligned_ldmatrix();  // row addresses 2 bytes past 16-byte boundaries
Outcome global_ldmatrix();      // row addresses in global memory

}  // namespace cuda_emulation::self_test
