// A device model of the H100 SXM and the H200: turns the emulation's counts
// (rex_emulation_counters.h) into an estimated time on one of them. Every figure it gives is an
// estimate of the device model, never a measurement; docs/cuda.md gives each constant's source.
//
// Assumptions (docs/cuda.md, "Device model"): nothing overlaps (a step's time is the sum of its
// kernels, its cuBLAS calls and its host waits); boost clocks; every kernel fills the device; no
// L1, and an L2 that keeps what one launch touched: a launch reads (or writes) each distinct sector
// from HBM once, if its distinct sectors fit the L2 (otherwise, and where the distinct sectors are
// not known, every sector of every request comes from HBM), while every request's sectors pass
// through the L2. A kernel of rex's costs its launches plus the largest of its HBM time (those
// sectors x 32 bytes), its L2 time (all its requests' sectors x 32 bytes, so uncoalesced requests
// pay for every sector), its shared-memory time (wavefronts, bank-conflict replays included, at one
// wavefront per SM per clock) and its arithmetic time (f32 and f64 FLOPs at the CUDA cores' peaks
// plus special functions at the SFUs' rate) and its tensor time (bf16 tensor FLOPs at the bf16
// peak plus tf32 tensor FLOPs at the tf32 peak). The tensor pipes are assumed to run beside the
// FMA and SFU pipes, so the tensor time is a fourth term of the largest, not added to the
// arithmetic time: optimistic, since the warps that feed the tensor cores also issue the kernel's
// other instructions, and a real kernel rarely reaches the dense peak. A cuBLAS call costs a launch
// plus the larger of its FLOPs at the fp32 or TF32 peak (the bf16 peak for cublasGemmEx's bf16
// shapes) and its operands' bytes (A and B read, C written once) at HBM bandwidth.
#pragma once

#include <algorithm>
#include <string_view>

#include <rex_emulation_counters.h>

namespace cuda_emulation::device_model {

struct Device {
  std::string_view name;
  double hbm_bytes_per_s;          // peak HBM bandwidth
  double l2_bytes_per_s;           // L2 bandwidth, all SMs together
  double l2_bytes;                 // L2 capacity
  double memory_bytes;             // HBM capacity
  double fp32_flops_per_s;         // CUDA cores, FMA counted as 2
  double fp64_flops_per_s;         // CUDA cores, FMA counted as 2
  double special_functions_per_s;  // SFUs: exp2, log2, sin, cos, reciprocal (square root)
  double tf32_flops_per_s;         // tensor cores, dense
  double bf16_flops_per_s;         // tensor cores, dense
  double shared_wavefronts_per_s;  // one 32-bank pass per SM per clock: SMs x boost clock
  double launch_s;                 // device time a launch adds, typical
  double host_wait_s;              // a host wait's round trip, typical
};

inline constexpr int kSectorBytes = 32;
inline constexpr int kHopperSms = 132;  // H100 SXM and H200 alike
inline constexpr double kHopperBoostHz = 1.98e9;
inline constexpr double kHopperSfuPerSmPerClock = 16;  // CUDA C++ Programming Guide, cc 9.0
// Measured on an H100 PCIe (114 SMs) by Chips and Cheese ("Nvidia's H100: Funny L2, and Tons of
// Bandwidth", 2023): about 5.5 TB/s; taken as is for the SXM's 132 SMs (an underestimate).
inline constexpr double kHopperL2BytesPerS = 5.5e12;
inline constexpr double kTypicalLaunchS = 3e-6;    // docs/cuda.md: NVIDIA's CUDA Graphs post
inline constexpr double kTypicalHostWaitS = 6e-6;  // docs/cuda.md: the same post

inline constexpr Device kH100Sxm{
    .name = "H100 SXM",
    .hbm_bytes_per_s = 3.35e12,
    .l2_bytes_per_s = kHopperL2BytesPerS,
    .l2_bytes = 50e6,
    .memory_bytes = 80e9,
    .fp32_flops_per_s = 66.9e12,
    .fp64_flops_per_s = 33.5e12,
    .special_functions_per_s = kHopperSms * kHopperSfuPerSmPerClock * kHopperBoostHz,
    .tf32_flops_per_s = 494.7e12,
    .bf16_flops_per_s = 989.4e12,
    .shared_wavefronts_per_s = kHopperSms * kHopperBoostHz,
    .launch_s = kTypicalLaunchS,
    .host_wait_s = kTypicalHostWaitS};
// The H200 is the same GH100 chip with HBM3e: only the memory differs.
inline constexpr Device kH200 = [] {
  Device device = kH100Sxm;
  device.name = "H200";
  device.hbm_bytes_per_s = 4.8e12;
  device.memory_bytes = 141e9;
  return device;
}();

// "h100" or "h200"; nullptr for any other name.
inline const Device* find_device(std::string_view name) {
  if (name == "h100") return &kH100Sxm;
  if (name == "h200") return &kH200;
  return nullptr;
}

struct KernelEstimate {
  double launch_s = 0, hbm_s = 0, l2_s = 0, shared_s = 0, arithmetic_s = 0, tensor_s = 0;
  double total_s() const {
    return launch_s + std::max({hbm_s, l2_s, shared_s, arithmetic_s, tensor_s});
  }
};

// What bounds a kernel's estimate: "hbm", "l2", "smem", "alu" or "tensor" (its largest term).
inline const char* bound_of(const KernelEstimate& e) {
  const double largest = std::max({e.hbm_s, e.l2_s, e.shared_s, e.arithmetic_s, e.tensor_s});
  return largest == e.tensor_s       ? "tensor"
         : largest == e.arithmetic_s ? "alu"
         : largest == e.shared_s     ? "smem"
         : largest == e.l2_s         ? "l2"
                                     : "hbm";
}

// The estimate of one kernel's counts (all its launches in an interval counted with memory).
inline KernelEstimate estimate_kernel(const KernelCounts& kernel, const Device& device) {
  KernelEstimate estimate;
  estimate.launch_s = static_cast<double>(kernel.launches) * device.launch_s;
  const auto sectors = static_cast<double>(kernel.global.sectors()),
             unique = static_cast<double>(kernel.global.unique_sectors);
  const double launches = std::max(1.0, static_cast<double>(kernel.launches));
  const bool l2_keeps = unique > 0 && unique * kSectorBytes / launches <= device.l2_bytes;
  estimate.hbm_s = (l2_keeps ? unique : sectors) * kSectorBytes / device.hbm_bytes_per_s;
  estimate.l2_s = sectors * kSectorBytes / device.l2_bytes_per_s;
  estimate.shared_s =
      static_cast<double>(kernel.shared.wavefronts()) / device.shared_wavefronts_per_s;
  const ArithmeticCounts& a = kernel.arithmetic;
  estimate.arithmetic_s = static_cast<double>(a.f32_flops) / device.fp32_flops_per_s +
                          static_cast<double>(a.f64_flops) / device.fp64_flops_per_s +
                          static_cast<double>(a.special_functions) / device.special_functions_per_s;
  estimate.tensor_s = static_cast<double>(a.tensor_bf16_flops) / device.bf16_flops_per_s +
                      static_cast<double>(a.tensor_tf32_flops) / device.tf32_flops_per_s;
  return estimate;
}

struct GemmEstimate {
  double flops = 0, bytes = 0;
  double launch_s = 0, compute_s = 0, hbm_s = 0;
  double total_s() const { return launch_s + std::max(compute_s, hbm_s); }
};

// The estimate of `calls` cuBLAS calls of one shape (2 m n k FLOPs per product; fp32 operands, or
// bf16 A and B with an fp32 C for cublasGemmEx's bf16 shapes, at the bf16 tensor-core peak; C
// read as well as written when the call accumulates).
inline GemmEstimate estimate_gemm(const GemmShape& shape, uint64_t calls, const Device& device) {
  const double products = static_cast<double>(calls) * static_cast<double>(shape.batch);
  const double m = static_cast<double>(shape.m), n = static_cast<double>(shape.n),
               k = static_cast<double>(shape.k);
  GemmEstimate estimate;
  estimate.flops = products * 2 * m * n * k;
  const double ab_bytes = shape.bf16 ? 2 : sizeof(float);
  const double c_passes = shape.accumulate ? 2 : 1;
  estimate.bytes = products * (ab_bytes * (m * k + k * n) + c_passes * sizeof(float) * m * n);
  estimate.launch_s = static_cast<double>(calls) * device.launch_s;
  estimate.compute_s = estimate.flops / (shape.bf16   ? device.bf16_flops_per_s
                                         : shape.tf32 ? device.tf32_flops_per_s
                                                      : device.fp32_flops_per_s);
  estimate.hbm_s = estimate.bytes / device.hbm_bytes_per_s;
  return estimate;
}

struct StepEstimate {
  double kernels_s = 0, gemms_s = 0, host_waits_s = 0;
  double total_s() const { return kernels_s + gemms_s + host_waits_s; }
};

// The estimate of an interval's counts: its parts added, nothing overlapping.
inline StepEstimate estimate_step(const Counts& counts, const Device& device) {
  StepEstimate estimate;
  for (const auto& [name, kernel] : counts.kernels)
    estimate.kernels_s += estimate_kernel(kernel, device).total_s();
  for (const auto& [shape, calls] : counts.gemms)
    estimate.gemms_s += estimate_gemm(shape, calls, device).total_s();
  estimate.host_waits_s = static_cast<double>(counts.host_waits()) * device.host_wait_s;
  return estimate;
}

// Model-FLOPs utilisation: the model's FLOPs over what `peak_flops_per_s` does in `step_s`.
inline double model_flops_utilisation(double model_flops, double step_s, double peak_flops_per_s) {
  return model_flops / (step_s * peak_flops_per_s);
}

}  // namespace cuda_emulation::device_model
