// The CUDA emulation's own tests: each primitive against a closed form, every limit and check
// against a kernel broken on purpose, whose failure must name the check, the kernel, the block and
// thread, and the address where there is one. Also the runtime and cuBLAS subsets rex calls, the
// counters, each against a kernel or call sequence whose counts are known exactly, and the
// tensor-core instructions (ldmatrix, mma.sync) against the PTX ISA's fragment layouts and a naive
// matmul.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <doctest/doctest.h>
#include <rex_emulation_counters.h>

#include <bit>
#include <cmath>
#include <string>
#include <vector>

#include "self_test_kernels.hpp"

using namespace cuda_emulation::self_test;

namespace {

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// The launch failed with `error`, and the message names `kernel` and each of `parts`.
void check_caught(const Outcome& o, cudaError_t error, const std::string& kernel,
                  const std::vector<std::string>& parts) {
  CAPTURE(o.message);
  CHECK(o.error == error);
  CHECK(contains(o.message, "in kernel " + kernel + ", block ("));
  CHECK(contains(o.message, "thread ("));
  for (const std::string& part : parts) CHECK(contains(o.message, part));
}

// A device copy of `values` (the caller frees it).
template <class T>
T* upload(const std::vector<T>& values) {
  void* device = nullptr;
  REQUIRE(cudaMalloc(&device, values.size() * sizeof(T)) == cudaSuccess);
  REQUIRE(cudaMemcpy(device, values.data(), values.size() * sizeof(T), cudaMemcpyHostToDevice) ==
          cudaSuccess);
  return static_cast<T*>(device);
}

}  // namespace

TEST_CASE("a block reduction over a grid-stride loop sums 0..n-1") {
  for (const auto& [n, blocks, threads] : std::vector<std::tuple<int, int, int>>{
           {0, 1, 32}, {1, 1, 32}, {1000, 3, 128}, {5000, 2, 1024}}) {
    CAPTURE(n);
    const Outcome o = block_sum(n, blocks, threads);
    REQUIRE(o.error == cudaSuccess);
    // Exact: every partial sum of 0..n-1 is an integer below 2^24, so float adds it exactly in
    // any order.
    CHECK(o.values[0] == 0.5 * n * (n - 1));
  }
}

TEST_CASE("warp shuffles: down tree, xor butterfly, up scan, broadcast, 8-lane segments") {
  const int threads = 64;
  const Outcome o = warp_shuffles(threads);
  REQUIRE(o.error == cudaSuccess);
  for (int t = 0; t < threads; ++t) {
    CAPTURE(t);
    const int lane = t % 32, first = t - lane;  // values are t + 1
    const double warp_sum = 32.0 * (first + 1) + 31.0 * 32.0 / 2.0;
    CHECK(o.values[5 * t] == (lane == 0 ? warp_sum : -1.0));
    CHECK(o.values[5 * t + 1] == warp_sum);
    CHECK(o.values[5 * t + 2] == (lane + 1) * (first + 1) + lane * (lane + 1) / 2.0);
    CHECK(o.values[5 * t + 3] == first + 5 + 1);
    CHECK(o.values[5 * t + 4] == (t / 8) * 8 + 3 + 1);
  }
}

TEST_CASE("a shared-memory inclusive scan gives the triangular numbers") {
  for (const int threads : {1, 32, 100, 1024}) {
    CAPTURE(threads);
    const Outcome o = block_inclusive_scan(threads);
    REQUIRE(o.error == cudaSuccess);
    for (int t = 0; t < threads; ++t) CHECK(o.values[t] == (t + 1) * (t + 2) / 2.0);
  }
}

TEST_CASE("atomics on device and shared memory: add, min, max, CAS, a histogram") {
  const int blocks = 3, threads = 100, total = blocks * threads;
  const Outcome o = atomics(blocks, threads);
  REQUIRE(o.error == cudaSuccess);
  CHECK(o.values[0] == total);
  CHECK(o.values[1] == 0);
  CHECK(o.values[2] == total - 1);
  CHECK(o.values[3] == total * (total - 1) / 2.0);
  for (int b = 0; b < 8; ++b) {
    int count = 0;
    for (int i = 0; i < total; ++i) count += i % 8 == b;
    CHECK(o.values[4 + b] == count);
  }
}

TEST_CASE("dynamic shared memory holds a block's row") {
  for (const int n : {1, 96, 300, 12288}) {  // 12288 floats: all 48 KiB
    CAPTURE(n);
    const Outcome o = dynamic_shared_reverse(n);
    REQUIRE(o.error == cudaSuccess);
    for (int i = 0; i < n; ++i) CHECK(o.values[i] == n - 1 - i);
  }
}

TEST_CASE("ballot, any and all over full and sparse masks") {
  const int threads = 64;
  const Outcome o = votes(threads);
  REQUIRE(o.error == cudaSuccess);
  for (int t = 0; t < threads; ++t) {
    CAPTURE(t);
    CHECK(o.values[4 * t] == 0xAAAAAAAAu);
    CHECK(o.values[4 * t + 1] == 1);
    CHECK(o.values[4 * t + 2] == (t < 32 ? 1 : 0));  // lanes 40..63 of warp 1 are not below 40
    CHECK(o.values[4 * t + 3] == (t % 2 == 0 ? 0x5u : 0u));
  }
}

TEST_CASE("caught: a full mask on a partial warp names lanes that do not exist") {
  // 40 threads: warp 1 has lanes 0..7 only.
  check_caught(
      votes(40), cudaErrorLaunchFailure, "votes_kernel",
      {"__ballot_sync", "names lanes 0xffffff00 that this warp does not have", "thread (32,0,0)"});
}

TEST_CASE("threads and blocks in three dimensions get their own coordinates") {
  const Outcome o = coordinates(dim3(3, 2, 2), dim3(4, 3, 2));
  REQUIRE(o.error == cudaSuccess);
  for (size_t i = 0; i < o.values.size(); ++i) CHECK(o.values[i] == static_cast<double>(i));
}

TEST_CASE("grid-stride loops wrap around and visit every element once") {
  for (const auto& [n, blocks, threads] : std::vector<std::tuple<int64_t, int, int>>{
           {0, 1, 32}, {1, 1, 32}, {1000, 2, 64}, {257, 1, 256}}) {
    CAPTURE(n);
    const Outcome o = grid_stride_copy(n, blocks, threads);
    REQUIRE(o.error == cudaSuccess);
    for (int64_t i = 0; i < n; ++i) CHECK(o.values[static_cast<size_t>(i)] == 2 * i + 1);
  }
}

TEST_CASE("caught: a missing __syncthreads races on shared memory") {
  check_caught(missing_syncthreads(64), cudaErrorLaunchFailure, "missing_syncthreads_kernel",
               {"shared-memory race", "static __shared__ storage", "since the last __syncthreads"});
}

TEST_CASE("caught: a read one element past the end of an allocation") {
  const Outcome o = read_past_allocation(100);
  check_caught(o, cudaErrorIllegalAddress, "read_past_kernel",
               {"invalid device read of 4 bytes", "past the end of the 400-byte device allocation",
                "thread (100,0,0)"});
  CHECK(contains(o.message, "an illegal memory access was encountered"));
}

TEST_CASE("caught: a shuffle offset that reads a lane outside the mask") {
  check_caught(wrong_shuffle_offset(), cudaErrorLaunchFailure, "wrong_offset_kernel",
               {"__shfl_down_sync", "mask 0x0000ffff", "reads lane 16, which is not in the mask"});
}

TEST_CASE("caught: two threads write one shared word between barriers") {
  check_caught(shared_write_race(32), cudaErrorLaunchFailure, "write_race_kernel",
               {"shared-memory race: write of 4 bytes", "which thread (0,0,0) wrote"});
}

TEST_CASE("launch limits: 1024 threads run, 1025 are refused as on the device") {
  CHECK(launch_with_threads(1024).error == cudaSuccess);
  const Outcome o = launch_with_threads(1025);
  CHECK(o.error == cudaErrorInvalidConfiguration);
  CHECK(contains(o.message, "launch of empty_kernel"));
  CHECK(contains(o.message, "1025 threads"));
  CHECK(launch_with_grid(dim3(1, 65535, 1)).error == cudaSuccess);
  const Outcome grid = launch_with_grid(dim3(1, 65536, 1));
  CHECK(grid.error == cudaErrorInvalidConfiguration);
  CHECK(contains(grid.message, "a grid of (1,65536,1) blocks is past the limits"));
  CHECK(launch_with_grid(dim3(0, 1, 1)).error == cudaErrorInvalidConfiguration);
  const Outcome shared = too_much_dynamic_shared();
  CHECK(shared.error == cudaErrorInvalidValue);
  CHECK(contains(shared.message, "49156 bytes of dynamic shared memory"));
}

TEST_CASE("caught: a __syncthreads that only half the block reaches") {
  check_caught(divergent_syncthreads(64), cudaErrorLaunchFailure, "divergent_barrier_kernel",
               {"exited without reaching the __syncthreads at self_test_kernels.cu:"});
  check_caught(exit_before_syncthreads(64), cudaErrorLaunchFailure, "early_exit_kernel",
               {"thread (56,0,0) exited without reaching the __syncthreads"});
}

TEST_CASE("caught: shared memory read before any thread wrote it") {
  check_caught(read_uninitialized_shared(), cudaErrorLaunchFailure, "uninitialized_kernel",
               {"shared-memory read before written", "offset", "thread (0,0,0)"});
}

TEST_CASE("caught: freed and host pointers handed to a kernel, and a use after free") {
  const Outcome freed = freed_pointer_argument();
  CHECK(freed.error == cudaErrorInvalidDevicePointer);
  CHECK(contains(freed.message, "launch of read_one_kernel: argument 0"));
  CHECK(contains(freed.message, "use after free"));
  const Outcome host = host_pointer_argument();
  CHECK(host.error == cudaErrorInvalidDevicePointer);
  CHECK(contains(host.message, "is not device memory"));
  check_caught(use_after_free_through_table(), cudaErrorIllegalAddress, "read_through_table_kernel",
               {"use after free", "of the 128-byte device allocation at 0x", "which was freed"});
}

TEST_CASE("caught: warp intrinsics waiting for exited lanes, and a deadlock") {
  check_caught(shuffle_with_exited_lane(), cudaErrorLaunchFailure, "exited_lane_kernel",
               {"exited while lanes"});
  const Outcome o = warp_deadlock();
  CHECK(o.error == cudaErrorLaunchFailure);
  CHECK(contains(o.message, "deadlock"));
  CHECK(contains(o.message, "in kernel deadlock_kernel, block (0,0,0)"));
}

TEST_CASE("a failed launch leaves the device usable") {
  CHECK(read_past_allocation(10).error == cudaErrorIllegalAddress);
  const Outcome o = block_sum(100, 1, 64);
  REQUIRE(o.error == cudaSuccess);
  CHECK(o.values[0] == 4950);
}

TEST_CASE("copies check their kinds against where the pointers live") {
  float* device = nullptr;
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&device), 64) == cudaSuccess);
  std::vector<float> host(16, 2.0f), back(16, 0.0f);
  CHECK(cudaMemcpy(device, host.data(), 64, cudaMemcpyHostToDevice) == cudaSuccess);
  CHECK(cudaMemcpy(back.data(), device, 64, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(back == host);
  CHECK(cudaMemcpy(device, host.data(), 64, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue);
  CHECK(contains(cudaGetErrorString(cudaErrorInvalidValue), "device memory, not host memory"));
  CHECK(cudaMemcpy(device, host.data(), 68, cudaMemcpyHostToDevice) == cudaErrorInvalidValue);
  CHECK(contains(cudaGetErrorString(cudaErrorInvalidValue), "4 bytes past the end"));
  // 2-d: two rows of 8 bytes from a pitch of 16 into a pitch of 8.
  float* packed = nullptr;
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&packed), 16) == cudaSuccess);
  CHECK(cudaMemcpy2D(packed, 8, device, 16, 8, 2, cudaMemcpyDeviceToDevice) == cudaSuccess);
  CHECK(cudaMemcpy2D(packed, 8, device, 16, 12, 2, cudaMemcpyDeviceToDevice) ==
        cudaErrorInvalidPitchValue);
  CHECK(cudaMemcpy2D(packed, 8, device, size_t{1} << 31, 8, 2, cudaMemcpyDeviceToDevice) ==
        cudaErrorInvalidPitchValue);
  CHECK(cudaFree(device) == cudaSuccess);
  CHECK(cudaFree(device) == cudaErrorInvalidDevicePointer);
  CHECK(cudaFree(packed) == cudaSuccess);
  CHECK(cudaGetLastError() == cudaErrorInvalidDevicePointer);
  CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("device memory: out of memory is an error, not a crash") {
  void* huge = nullptr;
  CHECK(cudaMalloc(&huge, size_t{1} << 60) == cudaErrorMemoryAllocation);
  CHECK(huge == nullptr);
  CHECK(contains(cudaGetErrorString(cudaErrorMemoryAllocation), "half of the host's memory"));
  void* fresh = nullptr;
  REQUIRE(cudaMalloc(&fresh, 8) == cudaSuccess);
  unsigned char bytes[8] = {};
  cudaMemcpy(bytes, fresh, 8, cudaMemcpyDeviceToHost);
  CHECK(bytes[0] == 0xFF);  // new memory is poisoned, not zero
  CHECK(cudaFree(fresh) == cudaSuccess);
  CHECK(cudaGetLastError() == cudaErrorMemoryAllocation);
}

TEST_CASE("the device reports an H200's limits") {
  cudaDeviceProp p{};
  REQUIRE(cudaGetDeviceProperties(&p, 0) == cudaSuccess);
  CHECK(contains(p.name, "H200"));
  CHECK(contains(p.name, "emulation"));
  CHECK(p.major == 9);
  CHECK(p.maxThreadsPerBlock == 1024);
  CHECK(p.sharedMemPerBlock == 48 * 1024);
  CHECK(p.maxGridSize[1] == 65535);
  int pitch = 0;
  CHECK(cudaDeviceGetAttribute(&pitch, cudaDevAttrMaxPitch, 0) == cudaSuccess);
  CHECK(pitch == 2147483647);
  CHECK(cudaGetDeviceProperties(&p, 1) == cudaErrorInvalidDevice);
}

TEST_CASE("cuBLAS SGEMM against a naive loop, every transpose, strides, alpha and beta") {
  const int m = 5, n = 4, k = 3, batch = 2;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true}) {
      CAPTURE(ta);
      CAPTURE(tb);
      const int lda = (ta ? k : m) + 1, ldb = (tb ? n : k) + 2, ldc = m + 1;
      const long long sa = lda * (ta ? m : k) + 3, sb = ldb * (tb ? k : n), sc = ldc * n + 1;
      std::vector<float> a(sa * batch), b(sb * batch), c(sc * batch);
      for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>((i * 7) % 11) - 5.0f;
      for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>((i * 5) % 13) - 6.0f;
      for (size_t i = 0; i < c.size(); ++i) c[i] = static_cast<float>(i % 3);
      float *da = upload(a), *db = upload(b), *dc = upload(c);
      cublasHandle_t h = nullptr;
      REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
      const float alpha = 0.5f, beta = 2.0f;
      REQUIRE(cublasSgemmStridedBatched(h, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                        tb ? CUBLAS_OP_T : CUBLAS_OP_N, m, n, k, &alpha, da, lda,
                                        sa, db, ldb, sb, &beta, dc, ldc, sc,
                                        batch) == CUBLAS_STATUS_SUCCESS);
      std::vector<float> got(c.size());
      cudaMemcpy(got.data(), dc, c.size() * 4, cudaMemcpyDeviceToHost);
      for (int p = 0; p < batch; ++p)
        for (int i = 0; i < m; ++i)
          for (int j = 0; j < n; ++j) {
            double s = 0;
            for (int l = 0; l < k; ++l) {
              const double av = ta ? a[p * sa + l + i * lda] : a[p * sa + i + l * lda];
              const double bv = tb ? b[p * sb + j + l * ldb] : b[p * sb + l + j * ldb];
              s += av * bv;
            }
            // Exact: small integers times 0.5 and 2 are represented exactly, in float and in
            // double, whatever the order of the sum.
            CHECK(got[p * sc + i + j * ldc] == alpha * s + beta * c[p * sc + i + j * ldc]);
          }
      // Past the rows of C: untouched.
      CHECK(got[m] == c[m]);
      // beta = 0 never reads C (a NaN there is overwritten).
      const float zero = 0.0f, nan = std::nanf("");
      cudaMemcpy(dc, &nan, 4, cudaMemcpyHostToDevice);
      REQUIRE(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &alpha, da, 1, db, 1, &zero, dc,
                          1) == CUBLAS_STATUS_SUCCESS);
      float one = 0;
      cudaMemcpy(&one, dc, 4, cudaMemcpyDeviceToHost);
      CHECK(one == alpha * a[0] * b[0]);
      CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, da, m - 1, db, k, &zero, dc,
                        m) == CUBLAS_STATUS_INVALID_VALUE);
      CHECK(cublasSgemmStridedBatched(h, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                      tb ? CUBLAS_OP_T : CUBLAS_OP_N, m, n, k, &alpha, da, lda,
                                      sa * 10, db, ldb, sb, &beta, dc, ldc, sc,
                                      batch) == CUBLAS_STATUS_EXECUTION_FAILED);
      CHECK(
          contains(cublasGetStatusString(CUBLAS_STATUS_EXECUTION_FAILED), "operand A of batch 1"));
      cublasDestroy(h);
      cudaFree(da);
      cudaFree(db);
      cudaFree(dc);
    }
}

TEST_CASE("cuBLAS TF32 mode rounds the inputs to 10 mantissa bits") {
  float *da, *db, *dc;
  cudaMalloc(reinterpret_cast<void**>(&da), 4);
  cudaMalloc(reinterpret_cast<void**>(&db), 4);
  cudaMalloc(reinterpret_cast<void**>(&dc), 4);
  const float a = 1.0f + 0x1.0p-12f, b = 1.0f, alpha = 1.0f, beta = 0.0f;  // a is not a TF32
  cudaMemcpy(da, &a, 4, cudaMemcpyHostToDevice);
  cudaMemcpy(db, &b, 4, cudaMemcpyHostToDevice);
  cublasHandle_t h = nullptr;
  cublasCreate(&h);
  float c = 0;
  for (const bool tf32 : {false, true}) {
    cublasSetMathMode(h, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH);
    REQUIRE(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &alpha, da, 1, db, 1, &beta, dc, 1) ==
            CUBLAS_STATUS_SUCCESS);
    cudaMemcpy(&c, dc, 4, cudaMemcpyDeviceToHost);
    CHECK(c == (tf32 ? 1.0f : a));
  }
  cublasDestroy(h);
  cudaFree(da);
  cudaFree(db);
  cudaFree(dc);
}

TEST_CASE("cuBLAS GemmEx: bf16 A and B, fp32 C, every transpose, against a naive loop") {
  const int m = 5, n = 4, k = 6;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true}) {
      CAPTURE(ta);
      CAPTURE(tb);
      const int lda = (ta ? k : m) + 1, ldb = (tb ? n : k) + 2, ldc = m + 1;
      // small integers (exact in bf16) times 1/4: bf16 bits are a float's top half
      std::vector<uint16_t> a(static_cast<size_t>(lda * (ta ? m : k))),
          b(static_cast<size_t>(ldb * (tb ? k : n)));
      const auto bf16 = [](float x) {
        return static_cast<uint16_t>(std::bit_cast<uint32_t>(x) >> 16);
      };
      const auto value = [](uint16_t h) {
        return static_cast<double>(std::bit_cast<float>(uint32_t{h} << 16));
      };
      for (size_t i = 0; i < a.size(); ++i)
        a[i] = bf16(static_cast<float>((i * 7) % 11) * 0.25f - 1);
      for (size_t i = 0; i < b.size(); ++i) b[i] = bf16(static_cast<float>((i * 5) % 13) - 6.0f);
      std::vector<float> c(static_cast<size_t>(ldc * n));
      for (size_t i = 0; i < c.size(); ++i) c[i] = static_cast<float>(i % 3);
      uint16_t *da = upload(a), *db = upload(b);
      float* dc = upload(c);
      cublasHandle_t h = nullptr;
      REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
      const float alpha = 0.5f, beta = 2.0f;
      const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                              opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
      cuda_emulation::begin_interval();
      REQUIRE(cublasGemmEx(h, opa, opb, m, n, k, &alpha, da, CUDA_R_16BF, lda, db, CUDA_R_16BF, ldb,
                           &beta, dc, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                           CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
      const cuda_emulation::Counts counts = cuda_emulation::end_interval();
      CHECK(counts.cublas_flops == 2.0 * m * n * k);
      REQUIRE(counts.gemms.size() == 1);
      CHECK(counts.gemms.begin()->first.bf16);
      CHECK_FALSE(counts.gemms.begin()->first.tf32);
      std::vector<float> got(c.size());
      cudaMemcpy(got.data(), dc, c.size() * 4, cudaMemcpyDeviceToHost);
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
          double s = 0;
          for (int l = 0; l < k; ++l)
            s += value(ta ? a[static_cast<size_t>(l + i * lda)]
                          : a[static_cast<size_t>(i + l * lda)]) *
                 value(tb ? b[static_cast<size_t>(j + l * ldb)]
                          : b[static_cast<size_t>(l + j * ldb)]);
          // exact: quarters of small integers, in float and double, in any order
          CHECK(got[static_cast<size_t>(i + j * ldc)] ==
                alpha * s + beta * c[static_cast<size_t>(i + j * ldc)]);
        }
      CHECK(got[m] == c[m]);  // past the rows of C: untouched
      CHECK(cublasGemmEx(h, opa, opb, m, n, k, &alpha, da, CUDA_R_16BF, lda, db, CUDA_R_16BF, ldb,
                         &beta, dc, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F_FAST_TF32,
                         CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED);
      CHECK(cublasGemmEx(h, opa, opb, m, n, k, &alpha, da, CUDA_R_16F, lda, db, CUDA_R_16F, ldb,
                         &beta, dc, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED);
      // lda one short of the rows of A as stored
      CHECK(cublasGemmEx(h, opa, opb, m, n, k, &alpha, da, CUDA_R_16BF, lda - 2, db, CUDA_R_16BF,
                         ldb, &beta, dc, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);
      cublasDestroy(h);
      cudaFree(da);
      cudaFree(db);
      cudaFree(dc);
    }
}

// ---- the counters ----

TEST_CASE("counters: nothing is counted outside an interval, and each interval starts at zero") {
  launch_loop(3);
  cuda_emulation::begin_interval();
  const cuda_emulation::Counts empty = cuda_emulation::end_interval();
  CHECK(empty.launches == 0);
  CHECK(empty.host_waits() == 0);
  CHECK(empty.kernels.empty());
  launch_loop(2);
  cuda_emulation::begin_interval();
  launch_loop(5);
  const cuda_emulation::Counts five = cuda_emulation::end_interval();
  CHECK(five.launches == 5);
}

TEST_CASE("counters: a launch loop counts each launch, its blocks and threads, by kernel name") {
  cuda_emulation::begin_interval();
  const Outcome o = launch_loop(17);
  const cuda_emulation::Counts c = cuda_emulation::end_interval();
  REQUIRE(o.error == cudaSuccess);
  CHECK(c.launches == 17);
  REQUIRE(c.kernels.count("empty_kernel") == 1);
  const cuda_emulation::KernelCounts& k = c.kernels.at("empty_kernel");
  CHECK(k.launches == 17);
  CHECK(k.blocks == 17 * 2);
  CHECK(k.threads == 17 * 2 * 64);
  CHECK(c.host_waits() == 0);
}

TEST_CASE("counters: a sync loop and copies count the host waits by cause") {
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  float* device = nullptr;
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&device), 8 * sizeof(float)) == cudaSuccess);
  std::vector<float> host(8, 1.0f), other(8);
  cuda_emulation::begin_interval();
  for (int i = 0; i < 7; ++i) REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
  for (int i = 0; i < 3; ++i) REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  REQUIRE(cudaMemcpy(device, host.data(), 32, cudaMemcpyHostToDevice) == cudaSuccess);
  REQUIRE(cudaMemcpyAsync(device + 4, device, 16, cudaMemcpyDeviceToDevice, stream) == cudaSuccess);
  REQUIRE(cudaMemcpy2D(host.data(), 8, device, 16, 8, 2, cudaMemcpyDeviceToHost) == cudaSuccess);
  REQUIRE(cudaMemcpyAsync(host.data(), device, 32, cudaMemcpyDefault, stream) == cudaSuccess);
  REQUIRE(cudaMemcpy(other.data(), host.data(), 32, cudaMemcpyHostToHost) == cudaSuccess);
  REQUIRE(cudaMemsetAsync(device, 0, 32, stream) == cudaSuccess);
  CHECK(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(0x1)) != cudaSuccess);
  const cuda_emulation::Counts c = cuda_emulation::end_interval();
  cudaGetLastError();
  CHECK(c.stream_synchronizations == 7);  // not the failed one
  CHECK(c.device_synchronizations == 3);
  CHECK(c.device_to_host_copies == 2);
  CHECK(c.pageable_host_to_device_copies == 1);
  CHECK(c.host_waits() == 13);
  CHECK(c.launches == 0);
  cudaFree(device);
  cudaStreamDestroy(stream);
}

TEST_CASE("counters: a copy from pinned host memory costs no host wait; events complete at once") {
  float* device = nullptr;
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&device), 8 * sizeof(float)) == cudaSuccess);
  float* staged = nullptr;
  REQUIRE(cudaMallocHost(reinterpret_cast<void**>(&staged), 8 * sizeof(float)) == cudaSuccess);
  std::vector<float> pageable(9, 1.0f);
  cudaEvent_t event = nullptr;
  REQUIRE(cudaEventCreateWithFlags(&event, cudaEventDisableTiming) == cudaSuccess);
  cuda_emulation::begin_interval();
  REQUIRE(cudaMemcpyAsync(device, staged, 32, cudaMemcpyHostToDevice) == cudaSuccess);
  REQUIRE(cudaMemcpyAsync(device, staged + 1, 28, cudaMemcpyHostToDevice) == cudaSuccess);
  REQUIRE(cudaMemcpyAsync(device, staged + 1, 32, cudaMemcpyHostToDevice) ==
          cudaSuccess);  // past it
  REQUIRE(cudaMemcpyAsync(device, pageable.data(), 32, cudaMemcpyHostToDevice) == cudaSuccess);
  REQUIRE(cudaEventRecord(event) == cudaSuccess);
  CHECK(cudaEventQuery(event) == cudaSuccess);
  const cuda_emulation::Counts c = cuda_emulation::end_interval();
  CHECK(c.pageable_host_to_device_copies == 2);
  CHECK(c.host_waits() == 2);
  // Handles and pointers that are not what the calls expect are refused.
  CHECK(cudaEventQuery(reinterpret_cast<cudaEvent_t>(0x1)) == cudaErrorInvalidResourceHandle);
  CHECK(cudaEventCreateWithFlags(&event, 0x40) == cudaErrorInvalidValue);
  CHECK(cudaFreeHost(pageable.data()) == cudaErrorInvalidValue);
  cudaGetLastError();
  CHECK(cudaEventDestroy(event) == cudaSuccess);
  CHECK(cudaEventRecord(event) == cudaErrorInvalidResourceHandle);
  CHECK(cudaFreeHost(staged) == cudaSuccess);
  cudaGetLastError();
  cudaFree(device);
}

TEST_CASE("counters: cuBLAS calls by shape and math mode, 2 m n k FLOPs per product") {
  float *a = nullptr, *b = nullptr, *out = nullptr;
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&a), 4 * 6 * 3 * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&b), 6 * 5 * 3 * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&out), 4 * 5 * 3 * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMemset(a, 0, 4 * 6 * 3 * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMemset(b, 0, 6 * 5 * 3 * sizeof(float)) == cudaSuccess);
  cublasHandle_t h = nullptr;
  REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
  const float one = 1.0f, zero = 0.0f;
  cuda_emulation::begin_interval();
  for (int i = 0; i < 2; ++i)  // C (4 x 5) = A (4 x 6) B (6 x 5)
    REQUIRE(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 5, 6, &one, a, 4, b, 6, &zero, out, 4) ==
            CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasSetMathMode(h, CUBLAS_TF32_TENSOR_OP_MATH) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasSgemmStridedBatched(h, CUBLAS_OP_T, CUBLAS_OP_N, 4, 5, 6, &one, a, 6, 24, b, 6, 30,
                                    &zero, out, 4, 20, 3) == CUBLAS_STATUS_SUCCESS);
  CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, -1, 5, 6, &one, a, 4, b, 6, &zero, out, 4) ==
        CUBLAS_STATUS_INVALID_VALUE);
  const cuda_emulation::Counts c = cuda_emulation::end_interval();
  CHECK(c.cublas_calls == 3);
  CHECK(c.cublas_flops == 2.0 * 4 * 5 * 6 * (2 + 3));
  REQUIRE(c.gemms.size() == 2);
  CHECK(c.gemms.at({4, 5, 6, 1, false, false, false}) == 2);
  CHECK(c.gemms.at({4, 5, 6, 3, true, false, true}) == 1);
  cublasDestroy(h);
  cudaFree(a);
  cudaFree(b);
  cudaFree(out);
}

TEST_CASE(
    "counters: a coalesced float copy touches 4 sectors per warp request, stride 32 touches 32") {
  const int threads = 256, warps = threads / 32;
  for (const int stride : {1, 32}) {
    CAPTURE(stride);
    cuda_emulation::begin_interval(true);
    const Outcome o = strided_copy(threads, stride);
    const cuda_emulation::Counts c = cuda_emulation::end_interval();
    REQUIRE(o.error == cudaSuccess);
    for (int i = 0; i < threads; ++i) CHECK(o.values[i] == static_cast<double>(i) * stride);
    const cuda_emulation::MemoryCounts& global = c.kernels.at("strided_copy_kernel").global;
    CHECK(global.load_requests == warps);
    CHECK(global.load_sectors == warps * (stride == 1 ? 4 : 32));
    CHECK(global.load_bytes == threads * 4);
    CHECK(global.store_requests == warps);
    CHECK(global.store_sectors == warps * 4);
    CHECK(global.store_bytes == threads * 4);
    CHECK(c.kernels.at("strided_copy_kernel").shared.requests() == 0);
  }
}

TEST_CASE("counters: a shared-memory transpose pays 32-way bank conflicts, none with padding") {
  for (const bool padded : {false, true}) {
    CAPTURE(padded);
    cuda_emulation::begin_interval(true);
    const Outcome o = shared_transpose(padded);
    const cuda_emulation::Counts c = cuda_emulation::end_interval();
    REQUIRE(o.error == cudaSuccess);
    for (int i = 0; i < 32; ++i)
      for (int j = 0; j < 32; ++j) CHECK(o.values[i * 32 + j] == j * 32 + i);
    const auto& k =
        c.kernels.at(padded ? "shared_transpose_kernel<33>" : "shared_transpose_kernel<32>");
    CHECK(k.shared.store_requests == 32);  // warp y writes row y: 32 banks, one word each
    CHECK(k.shared.store_wavefronts == 32);
    CHECK(k.shared.load_requests == 32);  // warp y reads column y: one bank (or 32 with padding)
    CHECK(k.shared.load_wavefronts == (padded ? 32 : 32 * 32));
    CHECK(k.shared.bank_conflicts() == (padded ? 0 : 32 * 31));
    CHECK(k.global.requests() == 64);
    CHECK(k.global.sectors() == 64 * 4);
  }
}

TEST_CASE("counters: doubles in shared memory take 2 wavefronts a warp, without bank conflicts") {
  cuda_emulation::begin_interval(true);
  const Outcome o = shared_doubles(64);
  const cuda_emulation::Counts c = cuda_emulation::end_interval();
  REQUIRE(o.error == cudaSuccess);
  for (int i = 0; i < 64; ++i) CHECK(o.values[i] == 63 - i);
  const cuda_emulation::MemoryCounts& shared = c.kernels.at("shared_doubles_kernel").shared;
  CHECK(shared.store_requests == 2);
  CHECK(shared.store_wavefronts == 4);
  CHECK(shared.load_requests == 2);
  CHECK(shared.load_wavefronts == 4);
  CHECK(shared.bank_conflicts() == 0);
}

TEST_CASE("counters: atomics count once per thread, in shared and in global memory") {
  cuda_emulation::begin_interval(true);
  const Outcome o = counted_atomics(3, 96);
  const cuda_emulation::Counts c = cuda_emulation::end_interval();
  REQUIRE(o.error == cudaSuccess);
  CHECK(o.values[0] == 3 * 96);
  const cuda_emulation::KernelCounts& k = c.kernels.at("counted_atomics_kernel");
  CHECK(k.global_atomics == 3 * 96);
  CHECK(k.shared_atomics == 3 * 96);
  CHECK(k.shared.store_requests == 3);  // thread 0 of each block clears the block counter
  CHECK(k.shared.load_requests == 0);
}

TEST_CASE("counters: arithmetic counts each thread's FLOPs by kind, an FMA as 2") {
  const int blocks = 2, threads = 96;
  cuda_emulation::begin_interval(true);
  const Outcome o = counted_arithmetic(blocks, threads);
  const cuda_emulation::Counts c = cuda_emulation::end_interval();
  REQUIRE(o.error == cudaSuccess);
  uint64_t f32_flops = 0;
  for (int i = 0; i < blocks * threads; ++i) {
    double acc = i;
    for (int k = 0; k < i % 5; ++k) acc = acc * 2 + 1;
    CHECK(o.values[static_cast<size_t>(i)] == acc * 0.5 + 0.25 + 1 + i / 2.0);
    f32_flops += 2 * (i % 5) + 2 + 3;
  }
  const cuda_emulation::ArithmeticCounts& a = c.kernels.at("counted_arithmetic_kernel").arithmetic;
  CHECK(a.f32_flops == f32_flops);
  CHECK(a.f64_flops == blocks * threads);
  CHECK(a.special_functions == blocks * threads);
}

TEST_CASE("counters: without count_kernel_work an interval counts launches but no work") {
  cuda_emulation::begin_interval();
  strided_copy(64, 1);
  counted_arithmetic(1, 32);
  const cuda_emulation::Counts c = cuda_emulation::end_interval();
  CHECK(c.kernels.at("strided_copy_kernel").launches == 1);
  CHECK(c.kernels.at("strided_copy_kernel").global.requests() == 0);
  CHECK(c.kernels.at("counted_arithmetic_kernel").arithmetic.f32_flops == 0);
}

// ---- tensor-core instructions (kernels/mma.cuh) ----

namespace {

// Element (i, r, c) of the matrices ldmatrix_fragments loads.
uint32_t ldmatrix_element(int i, int r, int c) { return 256 * i + 16 * r + c + 1; }

// Small integers, exact in bf16 and tf32, whose products' sums are exact in float.
std::vector<float> small_integers(int rows, int columns, int p, int q, int modulus) {
  std::vector<float> m(static_cast<size_t>(rows * columns));
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < columns; ++j)
      m[static_cast<size_t>(i * columns + j)] =
          static_cast<float>((p * i + q * j + 1) % modulus - modulus / 2);
  return m;
}

// A (m x k) B (k x n) + C (m x n), row-major, naive.
std::vector<double> naive_matmul(const std::vector<float>& a, const std::vector<float>& b,
                                 const std::vector<float>& c, int m, int n, int k) {
  std::vector<double> d(static_cast<size_t>(m * n));
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double sum = c[static_cast<size_t>(i * n + j)];
      for (int p = 0; p < k; ++p)
        sum += static_cast<double>(a[static_cast<size_t>(i * k + p)]) *
               b[static_cast<size_t>(p * n + j)];
      d[static_cast<size_t>(i * n + j)] = sum;
    }
  return d;
}

}  // namespace

TEST_CASE("ldmatrix x1, x2, x4, plain and .trans, give each lane the PTX fragment") {
  for (const int matrices : {1, 2, 4})
    for (const bool transposed : {false, true}) {
      CAPTURE(matrices);
      CAPTURE(transposed);
      const Outcome o = ldmatrix_fragments(matrices, transposed);
      REQUIRE(o.error == cudaSuccess);
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < matrices; ++i) {
          CAPTURE(lane);
          CAPTURE(i);
          // plain: (row l/4, columns 2(l%4) and 2(l%4)+1); .trans: (rows 2(l%4), 2(l%4)+1, column
          // l/4); the first in bits 0-15
          const int row = lane / 4, column = 2 * (lane % 4);
          const uint32_t expected =
              transposed
                  ? ldmatrix_element(i, column, row) | ldmatrix_element(i, column + 1, row) << 16
                  : ldmatrix_element(i, row, column) | ldmatrix_element(i, row, column + 1) << 16;
          CHECK(o.values[static_cast<size_t>(matrices * lane + i)] == expected);
        }
    }
}

TEST_CASE("mma.sync m16n8k16 bf16 computes A B + C from the documented fragments") {
  const std::vector<float> a = small_integers(16, 16, 3, 5, 7), b = small_integers(16, 8, 2, 3, 5),
                           c = small_integers(16, 8, 1, 4, 9);
  const std::vector<double> d = naive_matmul(a, b, c, 16, 8, 16);
  for (const bool via_ldmatrix : {false, true}) {
    CAPTURE(via_ldmatrix);
    const Outcome o = mma_bf16(a, b, c, via_ldmatrix, 2, 64);
    CAPTURE(o.message);
    REQUIRE(o.error == cudaSuccess);
    for (int block = 0; block < 2; ++block)
      for (int e = 0; e < 128; ++e) {
        CAPTURE(e);
        CHECK(o.values[static_cast<size_t>(128 * block + e)] == d[static_cast<size_t>(e)]);
      }
  }
}

TEST_CASE("mma.sync m16n8k8 tf32 computes A B + C and ignores the low 13 bits of its operands") {
  const std::vector<float> a = small_integers(16, 8, 3, 5, 11), b = small_integers(8, 8, 2, 3, 7),
                           c = small_integers(16, 8, 1, 4, 9);
  const std::vector<double> d = naive_matmul(a, b, c, 16, 8, 8);
  const Outcome o = mma_tf32(a, b, c, 1, 32);
  REQUIRE(o.error == cudaSuccess);
  for (int e = 0; e < 128; ++e) {
    CAPTURE(e);
    CHECK(o.values[static_cast<size_t>(e)] == d[static_cast<size_t>(e)]);
  }
}

TEST_CASE("bf16 and tf32 conversions round as CUDA's: to nearest even, and ties away (cvt.rna)") {
  // 1 + 2^-8 is a bf16 tie (rounds to even: 1), 1 + 3 x 2^-8 a tie that rounds up to 1 + 2^-6;
  // 1 + 2^-11 is a tf32 tie (away from zero: 1 + 2^-10), -(1 + 2^-11) too (to -(1 + 2^-10))
  const std::vector<float> x = {
      1.0f, 1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-11f, -1.0f - 0x1p-11f, 3.4e38f,
      NAN,  -0.0f};
  const Outcome o = tensor_conversions(x);
  REQUIRE(o.error == cudaSuccess);
  const auto bits = [](float f) { return static_cast<double>(std::bit_cast<uint32_t>(f)); };
  const auto value = [&](size_t i, int which) {
    return o.values[3 * i + static_cast<size_t>(which)];
  };
  CHECK(value(0, 0) == 0x3F80);
  CHECK(value(1, 0) == 0x3F80);
  CHECK(value(2, 0) == 0x3F82);
  CHECK(value(5, 0) == 0x7F80);  // past bf16's largest finite value after rounding: infinity
  CHECK((static_cast<uint32_t>(value(6, 0)) & 0x7F80u) == 0x7F80u);  // a NaN stays a NaN
  CHECK((static_cast<uint32_t>(value(6, 0)) & 0x007Fu) != 0);
  CHECK(value(7, 0) == 0x8000);
  CHECK(value(0, 1) == bits(1.0f));
  CHECK(value(3, 1) == bits(1.0f + 0x1p-10f));
  CHECK(value(4, 1) == bits(-1.0f - 0x1p-10f));
  CHECK(value(2, 2) == 0xBF82u * 65536.0 + 0x3F82u);  // pack_bf16x2(x, -x): x in bits 0-15
}

TEST_CASE(
    "counters: an mma counts 2 m n k tensor FLOPs; a conflict-free ldmatrix.x4 4 wavefronts") {
  const std::vector<float> a = small_integers(16, 16, 3, 5, 7), b = small_integers(16, 8, 2, 3, 5),
                           c = small_integers(16, 8, 1, 4, 9);
  cuda_emulation::begin_interval(true);
  REQUIRE(mma_bf16(a, b, c, false, 3, 64).error == cudaSuccess);  // 3 blocks of 2 warps
  REQUIRE(
      mma_tf32(small_integers(16, 8, 3, 5, 11), small_integers(8, 8, 2, 3, 7), c, 2, 96).error ==
      cudaSuccess);  // 2 blocks of 3 warps
  REQUIRE(ldmatrix_fragments(4, false).error == cudaSuccess);
  REQUIRE(ldmatrix_fragments(1, true).error == cudaSuccess);
  const cuda_emulation::Counts counts = cuda_emulation::end_interval();
  const cuda_emulation::ArithmeticCounts& bf16 =
      counts.kernels.at("mma_bf16_kernel<false>").arithmetic;
  CHECK(bf16.tensor_bf16_flops == 3 * 2 * 4096);  // 2 x 16 x 8 x 16 per warp-level mma
  CHECK(bf16.tensor_tf32_flops == 0);
  const cuda_emulation::ArithmeticCounts& tf32 = counts.kernels.at("mma_tf32_kernel").arithmetic;
  CHECK(tf32.tensor_tf32_flops == 2 * 3 * 2048);  // 2 x 16 x 8 x 8
  CHECK(tf32.tensor_bf16_flops == 0);
  // 32 lanes x 16 contiguous bytes: 128 words, 4 in each bank, one request
  const cuda_emulation::MemoryCounts& x4 = counts.kernels.at("(ldmatrix_kernel<4, false>)").shared;
  CHECK(x4.load_requests == 1);
  CHECK(x4.load_wavefronts == 4);
  CHECK(x4.load_bank_conflicts == 0);
  CHECK(x4.load_bytes == 32 * 16);
  const cuda_emulation::MemoryCounts& x1 = counts.kernels.at("(ldmatrix_kernel<1, true>)").shared;
  CHECK(x1.load_requests == 1);  // 8 lanes x 16 bytes: one per bank
  CHECK(x1.load_wavefronts == 1);
  CHECK(x1.load_bytes == 8 * 16);
  CHECK(cuda_emulation::describe(counts).find("tensor 24576 bf16") != std::string::npos);
}

TEST_CASE("caught: an mma that half a warp reaches, one in a warp of 16 lanes, one at two sites") {
  check_caught(half_warp_mma(), cudaErrorLaunchFailure, "half_warp_mma_kernel",
               {"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "lane 16 exited while",
                "self_test_kernels.cu:", ".aligned: all 32 lanes"});
  check_caught(partial_warp_mma(), cudaErrorLaunchFailure, "half_warp_mma_kernel",
               {"mma.sync.aligned.m16n8k16", "0xffff0000 that this warp does not have",
                ".aligned: all 32 lanes"});
  check_caught(divergent_mma(), cudaErrorLaunchFailure, "divergent_mma_kernel",
               {"mma.sync.aligned.m16n8k16", "lanes 0x00000001 wait in it at another site",
                ".aligned: all 32 lanes"});
}

TEST_CASE("caught: ldmatrix from a misaligned row address, and from global memory") {
  check_caught(misaligned_ldmatrix(), cudaErrorMisalignedAddress, "misaligned_ldmatrix_kernel",
               {"ldmatrix.sync.aligned.m8n8.x4.shared.b16", "of lane ", "not 16-byte aligned"});
  check_caught(global_ldmatrix(), cudaErrorIllegalAddress, "global_ldmatrix_kernel",
               {"ldmatrix.sync.aligned.m8n8.x1.shared.b16", "not in shared memory",
                "a global-memory address"});
}
