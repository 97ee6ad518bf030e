// The device model (include/rex_device_model.h) against estimates worked out by hand from its
// constants: a memory-bound kernel, a shared-memory-bound one, an arithmetic-bound one, a
// tensor-core-bound one, compute-bound and memory-bound GEMMs, and a step that adds them with its
// host waits.
#include <doctest/doctest.h>
#include <rex_device_model.h>

using namespace cuda_emulation;
using namespace cuda_emulation::device_model;

namespace {

KernelCounts kernel_of_1000_sectors() {
  KernelCounts kernel;
  kernel.launches = 2;
  kernel.global.load_sectors = 600;
  kernel.global.store_sectors = 400;
  return kernel;
}

GemmShape square_gemm(int64_t size, bool tf32) {
  return {.m = size, .n = size, .k = size, .batch = 1, .tf32 = tf32};
}

}  // namespace

TEST_CASE("a kernel of N sectors costs its launches plus N x 32 bytes at HBM bandwidth") {
  // 2 x 3 us + 32000 B / 3.35e12 B/s on the H100 SXM; / 4.8e12 B/s on the H200
  CHECK(estimate_kernel(kernel_of_1000_sectors(), kH100Sxm).total_s() ==
        doctest::Approx(6.00955223880597e-06).epsilon(1e-12));
  CHECK(estimate_kernel(kernel_of_1000_sectors(), kH200).total_s() ==
        doctest::Approx(6.006666666666667e-06).epsilon(1e-12));
}

TEST_CASE("a kernel with more shared wavefronts than HBM time costs its wavefronts") {
  KernelCounts kernel;
  kernel.launches = 1;
  kernel.global.load_sectors = 10;
  kernel.shared.load_wavefronts = 200000;  // bank-conflict replays are wavefronts too
  kernel.shared.store_wavefronts = 61360;
  kernel.shared.load_bank_conflicts = 100000;
  // 261360 wavefronts / (132 SMs x 1.98e9 per s) = 1 us, above 320 B / 3.35e12 B/s
  const KernelEstimate estimate = estimate_kernel(kernel, kH100Sxm);
  CHECK(estimate.shared_s == doctest::Approx(1e-6).epsilon(1e-12));
  CHECK(estimate.total_s() == doctest::Approx(4e-6).epsilon(1e-12));
}

TEST_CASE("a kernel whose arithmetic outlasts its memory costs its FLOPs and special functions") {
  KernelCounts kernel;
  kernel.launches = 1;
  kernel.global.load_sectors = 1000;
  kernel.arithmetic.f32_flops = 66'900'000;         // 1 us at 66.9e12 FLOP/s
  kernel.arithmetic.f64_flops = 33'500'000;         // 1 us at 33.5e12
  kernel.arithmetic.special_functions = 4'181'760;  // 1 us at 132 SMs x 16 x 1.98e9 per s
  const KernelEstimate estimate = estimate_kernel(kernel, kH100Sxm);
  CHECK(estimate.arithmetic_s == doctest::Approx(3e-6).epsilon(1e-12));
  CHECK(estimate.total_s() == doctest::Approx(6e-6).epsilon(1e-12));  // + one 3 us launch
}

TEST_CASE("a kernel of mma.sync instructions costs its tensor FLOPs at the bf16 and tf32 peaks") {
  KernelCounts kernel;
  kernel.launches = 1;
  kernel.global.load_sectors = 100000;                  // 3.2 MB / 3.35e12 B/s = 0.955 us
  kernel.shared.load_wavefronts = 130680;               // 0.5 us at 132 x 1.98e9 per s
  kernel.arithmetic.f32_flops = 33'450'000;             // 0.5 us at 66.9e12
  kernel.arithmetic.tensor_bf16_flops = 1'978'800'000;  // 2 us at 989.4e12
  kernel.arithmetic.tensor_tf32_flops = 494'700'000;    // 1 us at 494.7e12
  const KernelEstimate estimate = estimate_kernel(kernel, kH100Sxm);
  CHECK(estimate.tensor_s == doctest::Approx(3e-6).epsilon(1e-12));
  CHECK(estimate.arithmetic_s == doctest::Approx(0.5e-6).epsilon(1e-12));  // beside, not added
  CHECK(estimate.total_s() == doctest::Approx(6e-6).epsilon(1e-12));       // + one 3 us launch
}

TEST_CASE("a large GEMM is compute-bound at the fp32 or the TF32 peak") {
  // 2 x 4096^3 = 137438953472 FLOPs: / 66.9e12 in fp32, / 494.7e12 in TF32, plus one launch
  const GemmEstimate fp32 = estimate_gemm(square_gemm(4096, false), 1, kH100Sxm);
  CHECK(fp32.flops == 137438953472.0);
  CHECK(fp32.bytes == 201326592.0);  // 3 matrices of 4096^2 floats
  CHECK(fp32.total_s() == doctest::Approx(0.002057393923348281).epsilon(1e-12));
  CHECK(estimate_gemm(square_gemm(4096, true), 1, kH100Sxm).total_s() ==
        doctest::Approx(0.00028082282893066506).epsilon(1e-12));
}

TEST_CASE("a bf16 GemmEx shape is priced at the bf16 peak, with 2-byte A and B") {
  GemmShape shape = square_gemm(4096, false);
  shape.bf16 = true;
  const GemmEstimate estimate = estimate_gemm(shape, 1, kH100Sxm);
  CHECK(estimate.bytes == 134217728.0);  // 2 x 4096^2 x 2 bytes + 4096^2 x 4 bytes
  // 137438953472 FLOPs / 989.4e12 FLOP/s + 3 us
  CHECK(estimate.total_s() == doctest::Approx(0.00014191141446533251).epsilon(1e-12));
}

TEST_CASE("a matrix-vector GEMM is bound by its operands' bytes") {
  const GemmShape shape{.m = 1024, .n = 1, .k = 1024, .batch = 1};
  const GemmEstimate estimate = estimate_gemm(shape, 1, kH100Sxm);
  CHECK(estimate.compute_s == doctest::Approx(3.134756352765321e-08).epsilon(1e-12));
  // 4 x (1024^2 + 1024 + 1024) bytes / 3.35e12 B/s + 3 us
  CHECK(estimate.total_s() == doctest::Approx(4.254476417910448e-06).epsilon(1e-12));
}

TEST_CASE("a step adds its kernels, its cuBLAS calls and its host waits") {
  Counts counts;
  counts.kernels["memory_bound_kernel"] = kernel_of_1000_sectors();
  counts.gemms[square_gemm(4096, false)] = 2;
  counts.stream_synchronizations = 3;
  counts.device_to_host_copies = 2;
  const StepEstimate estimate = estimate_step(counts, kH100Sxm);
  CHECK(estimate.host_waits_s == doctest::Approx(30e-6).epsilon(1e-12));  // 5 x 6 us
  // 6.0096 us + (2 x 3 us + 2 x 2.0544 ms) + 30 us
  CHECK(estimate.total_s() == doctest::Approx(0.004150797398935368).epsilon(1e-12));
  // 1e15 model FLOPs in 1 s against the bf16 peak of 989.4e12
  CHECK(model_flops_utilisation(1e15, 1.0, kH100Sxm.bf16_flops_per_s) ==
        doctest::Approx(1.0107135637760258).epsilon(1e-12));
}

TEST_CASE("the device model knows h100 and h200 only") {
  CHECK(find_device("h100") == &kH100Sxm);
  CHECK(find_device("h200") == &kH200);
  CHECK(find_device("a100") == nullptr);
  CHECK(kH200.hbm_bytes_per_s > kH100Sxm.hbm_bytes_per_s);
}
