// The cost formulas (cost_formulas.hpp) against the emulation's counts of the same training step:
// for each config given, trains 2 steps on the emulated device, counts the second with its kernel
// work, and compares it with the formulas kernel by kernel. A kernel's launches must agree
// exactly; its global sectors, shared wavefronts and arithmetic (FLOPs and special functions,
// checked where they could bound it: at least a fifth of its memory time) within 5%, except
// route_scatter_kernel's sectors, within 25%: its stores depend on how the routing spreads the
// slots, which its formula takes to be uniform. The step's
// launches, host waits, cuBLAS calls and FLOPs must agree exactly, except the FLOPs and the
// per-shape split, which depend on how the routing spreads the tokens (the sum does not).
// Usage: cost_formulas_check WORK_DIR [--set KEY=VALUE ...] [-- next config's --set ...]
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <rex_device_model.h>
#include <rex_emulation_counters.h>

#include "cost_formulas.hpp"
#include "emulated_training.hpp"

namespace {

namespace model = cuda_emulation::device_model;
using cuda_emulation::KernelCounts;

bool within(double counted, double formula, double tolerance) {
  if (counted == formula) return true;
  return std::abs(counted - formula) <= tolerance * std::max(std::abs(counted), 1.0);
}

// Prints the kernel's row and returns the number of quantities outside their tolerance.
int compare_kernel(const std::string& name, const KernelCounts& counted,
                   const KernelCounts& formula) {
  // priced as the formulas price a kernel: without distinct sectors, every sector at HBM
  KernelCounts as_formulas = counted;
  as_formulas.global.unique_sectors = 0;
  const model::KernelEstimate e = model::estimate_kernel(as_formulas, model::kH100Sxm);
  const double memory_s = std::max(e.hbm_s, e.shared_s);
  const bool arithmetic_matters = e.arithmetic_s >= 0.2 * memory_s;
  const bool shared_matters = e.shared_s >= 0.2 * e.hbm_s;
  int failures = 0;
  std::string problems;
  auto check = [&](const char* what, double a, double b, bool required) {
    if (required && !within(a, b, 0.05)) {
      ++failures;
      problems += std::string(" ") + what;
    }
  };
  const double flops =
      static_cast<double>(counted.arithmetic.f32_flops + counted.arithmetic.f64_flops);
  const double formula_flops =
      static_cast<double>(formula.arithmetic.f32_flops + formula.arithmetic.f64_flops);
  check("launches", counted.launches, formula.launches, true);
  const double sector_tolerance = name == "route_scatter_kernel" ? 0.25 : 0.05;
  if (!within(counted.global.sectors(), formula.global.sectors(), sector_tolerance)) {
    ++failures;
    problems += " sectors";
  }
  check("wavefronts", counted.shared.wavefronts(), formula.shared.wavefronts(), shared_matters);
  check("FLOPs", flops, formula_flops, arithmetic_matters);
  check("special", counted.arithmetic.special_functions, formula.arithmetic.special_functions,
        arithmetic_matters);
  std::printf("%-34s %6llu %6llu | %10llu %10llu | %9llu %9llu | %11.4g %11.4g | %9llu %9llu %s\n",
              name.c_str(), static_cast<unsigned long long>(counted.launches),
              static_cast<unsigned long long>(formula.launches),
              static_cast<unsigned long long>(counted.global.sectors()),
              static_cast<unsigned long long>(formula.global.sectors()),
              static_cast<unsigned long long>(counted.shared.wavefronts()),
              static_cast<unsigned long long>(formula.shared.wavefronts()), flops, formula_flops,
              static_cast<unsigned long long>(counted.arithmetic.special_functions),
              static_cast<unsigned long long>(formula.arithmetic.special_functions),
              failures ? ("FAIL:" + problems).c_str() : "ok");
  return failures;
}

int check_config(const std::string& work_dir, const std::vector<std::string>& overrides) {
  cuda_emulation::EmulatedRun run(rex::train::read_run_config("", overrides), work_dir);
  cuda_emulation::Counts counted;
  rex::train::StepResult second;
  for (int step = 0; step < 2; ++step) {
    if (step == 1) cuda_emulation::begin_interval(true);
    rex::train::QueuedStep queued = run.step(step);
    if (step == 1) {
      counted = cuda_emulation::end_interval();
      std::vector<rex::train::QueuedStep> read;
      read.push_back(std::move(queued));
      second = std::move(rex::train::read_steps(std::move(read)).front());
    }
  }
  // The formulas take the step's routing: the grouped products' tiles follow it.
  const cuda_emulation::Counts formula =
      cuda_emulation::cost_formulas::training_step(run.config(), second.expert_counts);
  std::printf("\nconfig:");
  for (const std::string& o : overrides) std::printf(" %s", o.c_str());
  std::printf("\n%-34s %13s | %21s | %19s | %23s | %19s\n", "kernel (counted, formula)", "launches",
              "global sectors", "shared wavefronts", "FLOPs", "special functions");
  int failures = 0;
  for (const auto& [name, kernel] : counted.kernels) {
    const auto it = formula.kernels.find(name);
    failures +=
        compare_kernel(name, kernel, it == formula.kernels.end() ? KernelCounts{} : it->second);
  }
  for (const auto& [name, kernel] : formula.kernels)
    if (!counted.kernels.count(name)) failures += compare_kernel(name, KernelCounts{}, kernel);
  auto total = [&](const char* what, double a, double b, double tolerance) {
    const bool ok = within(a, b, tolerance);
    std::printf("%-34s %14.6g %14.6g %s\n", what, a, b, ok ? "ok" : "FAIL");
    failures += ok ? 0 : 1;
  };
  total("launches", counted.launches, formula.launches, 0);
  total("host waits", counted.host_waits(), formula.host_waits(), 0);
  total("cuBLAS calls", counted.cublas_calls, formula.cublas_calls, 0);
  total("cuBLAS FLOPs", counted.cublas_flops, formula.cublas_flops, 0);
  if (counted.cublas_calls < formula.cublas_calls)
    std::printf(
        "(fewer cuBLAS calls than the formulas: the routing left some expert without "
        "tokens in some layer, which the formulas assume never happens; give the config "
        "more tokens per expert)\n");
  return failures;
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 2) {
    std::fprintf(stderr, "usage: cost_formulas_check WORK_DIR [--set KEY=VALUE ...] [-- ...]\n");
    return 2;
  }
  std::vector<std::vector<std::string>> configs(1);
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--") {
      configs.emplace_back();
    } else if (a == "--set" && i + 1 < argc) {
      configs.back().push_back(argv[++i]);
    } else {
      std::fprintf(stderr, "cost_formulas_check: unexpected argument %s\n", a.c_str());
      return 2;
    }
  }
  int failures = 0;
  for (size_t c = 0; c < configs.size(); ++c)
    failures += check_config(std::string(argv[1]) + "/config" + std::to_string(c), configs[c]);
  std::printf(failures ? "\n%d disagreements\n" : "\nthe formulas agree\n", failures);
  return failures ? 1 : 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "cost_formulas_check: %s\n", e.what());
  return 1;
}
