// The cost report: what a training step of a config would cost on an H100 SXM or an H200,
// estimated by the device model (include/rex_device_model.h) from the emulation's counts.
// Trains --steps steps of the config on the emulated device (a made-up corpus written to WORK_DIR;
// the steps before the last warm the caching allocator), counts the last one with memory, and
// prints per kernel (launches, bytes, sectors per request, bank conflicts, atomics, FLOPs (CUDA
// cores and tensor cores), what bounds it: hbm, smem, alu or tensor, estimated time), per cuBLAS
// shape (calls, FLOPs, estimated time) and per step (host waits, launches, estimated time, model
// FLOPs and MFU). The emulation counts kernels by name, not by rex op, so there is no per-op table.
// Every time and MFU printed is "estimated (device model)". Usage: cost_report WORK_DIR [--config
// FILE] [--set KEY=VALUE]... [--steps N]
//        [--device-model h100|h200]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <rex_device_model.h>
#include <rex_emulation_counters.h>

#include "cost_formulas.hpp"
#include "emulated_training.hpp"

namespace {

namespace model = cuda_emulation::device_model;

struct Options {
  std::string work_dir, config_path;
  std::vector<std::string> overrides;
  int steps = 2;
  const model::Device* device = &model::kH100Sxm;
  bool formulas = false;
};

[[noreturn]] void usage() {
  std::fprintf(stderr,
               "usage: cost_report WORK_DIR [--config FILE] [--set KEY=VALUE]... [--steps N] "
               "[--device-model h100|h200] [--formulas]\n");
  std::exit(2);
}

Options parse_options(int argc, char** argv) {
  if (argc < 2) usage();
  Options options;
  options.work_dir = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--formulas") {
      options.formulas = true;
      continue;
    }
    if (i + 1 >= argc) usage();
    const std::string value = argv[++i];
    if (flag == "--config") {
      options.config_path = value;
    } else if (flag == "--set") {
      options.overrides.push_back(value);
    } else if (flag == "--steps") {
      options.steps = std::atoi(value.c_str());
      if (options.steps < 1) usage();
    } else if (flag == "--device-model") {
      options.device = model::find_device(value);
      if (options.device == nullptr) usage();
    } else {
      usage();
    }
  }
  return options;
}

// FLOPs of one training step, matmuls only (forward + backward = 3 x forward), as
// bench/bench_train.py counts them: attention projections and scores, the router over the pool,
// the top-k and shared experts' SwiGLU (or the dense FFN), and the LM head.
double model_flops(const rex::train::RunConfig& config) {
  const rex::nn::ModelConfig& m = config.model;
  const double d = static_cast<double>(m.d_model),
               tokens_per_sequence = static_cast<double>(m.context);
  const double head = d / static_cast<double>(m.n_heads);
  const double attention = 2 * d * (2 * d + 2 * static_cast<double>(m.n_kv_heads) * head) +
                           2 * 2 * d * (tokens_per_sequence + 1) / 2;
  double ffn = 0;
  if (m.ffn == "dense") {
    ffn = 2 * 3 * d * static_cast<double>(m.d_ff);
  } else {
    const double pool = static_cast<double>(m.moe.reuse * m.moe.experts_per_layer);
    ffn = 2 * d * pool + static_cast<double>(m.moe.top_k + m.moe.shared_experts) * 2 * 3 * d *
                             static_cast<double>(m.moe.d_expert);
  }
  const double per_token = static_cast<double>(m.n_layers) * (attention + ffn) +
                           2 * d * static_cast<double>(m.vocab_size);
  return 3 * per_token * static_cast<double>(config.train.batch_size) * tokens_per_sequence;
}

void print_kernels(const cuda_emulation::Counts& counts, const model::Device& device) {
  std::printf("\nper kernel, most expensive first (times estimated (device model), %s):\n",
              std::string(device.name).c_str());
  std::printf("%-36s %8s %12s %12s %9s %10s %8s %12s %10s %6s %12s\n", "kernel", "launches",
              "bytes asked", "sector bytes", "sect/req", "bank conf", "atomics", "FLOPs", "special",
              "bound", "est. us");
  std::vector<std::pair<double, const std::string*>> by_time;  // most expensive first
  for (const auto& [name, kernel] : counts.kernels)
    by_time.emplace_back(model::estimate_kernel(kernel, device).total_s(), &name);
  std::sort(by_time.begin(), by_time.end(), std::greater<>());
  for (const auto& [estimated_s, name] : by_time) {
    const cuda_emulation::KernelCounts& kernel = counts.kernels.at(*name);
    const model::KernelEstimate estimate = model::estimate_kernel(kernel, device);
    const char* bound = model::bound_of(estimate);
    const uint64_t requests = kernel.global.requests();
    std::printf(
        "%-36s %8llu %12llu %12llu %9.2f %10llu %8llu %12llu %10llu %6s %12.3f\n", name->c_str(),
        static_cast<unsigned long long>(kernel.launches),
        static_cast<unsigned long long>(kernel.global.load_bytes + kernel.global.store_bytes),
        static_cast<unsigned long long>(kernel.global.sectors() * model::kSectorBytes),
        requests ? static_cast<double>(kernel.global.sectors()) / static_cast<double>(requests)
                 : 0.0,
        static_cast<unsigned long long>(kernel.shared.bank_conflicts()),
        static_cast<unsigned long long>(kernel.global_atomics + kernel.shared_atomics),
        static_cast<unsigned long long>(kernel.arithmetic.f32_flops + kernel.arithmetic.f64_flops +
                                        kernel.arithmetic.tensor_bf16_flops +
                                        kernel.arithmetic.tensor_tf32_flops),
        static_cast<unsigned long long>(kernel.arithmetic.special_functions), bound,
        estimated_s * 1e6);
  }
}

void print_gemms(const cuda_emulation::Counts& counts, const model::Device& device) {
  std::printf("\nper cuBLAS shape (times estimated (device model), %s):\n",
              std::string(device.name).c_str());
  std::printf("%8s %8s %8s %6s %3s %3s %5s %3s %8s %14s %12s\n", "m", "n", "k", "batch", "tA", "tB",
              "math", "C+=", "calls", "FLOPs", "est. us");
  for (const auto& [shape, calls] : counts.gemms) {
    const model::GemmEstimate estimate = model::estimate_gemm(shape, calls, device);
    std::printf("%8lld %8lld %8lld %6lld %3d %3d %5s %3d %8llu %14.6g %12.3f\n",
                static_cast<long long>(shape.m), static_cast<long long>(shape.n),
                static_cast<long long>(shape.k), static_cast<long long>(shape.batch),
                shape.transpose_a, shape.transpose_b,
                shape.bf16   ? "bf16"
                : shape.tf32 ? "tf32"
                             : "fp32",
                shape.accumulate, static_cast<unsigned long long>(calls), estimate.flops,
                estimate.total_s() * 1e6);
  }
}

void print_step(const cuda_emulation::Counts& counts, const model::Device& device, double flops) {
  const model::StepEstimate estimate = model::estimate_step(counts, device);
  std::printf("\nper step:\n");
  std::printf("launches %llu\n", static_cast<unsigned long long>(counts.launches));
  std::printf(
      "host waits %llu (stream syncs %llu, device syncs %llu, device-to-host copies %llu, "
      "host-to-device copies %llu)\n",
      static_cast<unsigned long long>(counts.host_waits()),
      static_cast<unsigned long long>(counts.stream_synchronizations),
      static_cast<unsigned long long>(counts.device_synchronizations),
      static_cast<unsigned long long>(counts.device_to_host_copies),
      static_cast<unsigned long long>(counts.pageable_host_to_device_copies));
  std::printf("cuBLAS calls %llu, cuBLAS FLOPs %.6g\n",
              static_cast<unsigned long long>(counts.cublas_calls), counts.cublas_flops);
  std::printf(
      "estimated (device model) step time us %.3f = kernels %.3f + cuBLAS %.3f + host "
      "waits %.3f (no overlap)\n",
      estimate.total_s() * 1e6, estimate.kernels_s * 1e6, estimate.gemms_s * 1e6,
      estimate.host_waits_s * 1e6);
  std::printf("model FLOPs %.6g\n", flops);
  std::printf(
      "estimated (device model) MFU %.4f%% of the bf16 tensor-core peak, %.4f%% of the "
      "fp32 CUDA-core peak\n",
      100 * model::model_flops_utilisation(flops, estimate.total_s(), device.bf16_flops_per_s),
      100 * model::model_flops_utilisation(flops, estimate.total_s(), device.fp32_flops_per_s));
}

}  // namespace

int main(int argc, char** argv) try {
  const Options options = parse_options(argc, argv);
  // Emulated runs must fit this machine; the formulas price any config (the report compares its
  // memory with the device's).
  rex::train::RunConfig config =
      rex::train::read_run_config(options.config_path, options.overrides,
                                  options.formulas ? 0.0 : rex::train::physical_memory_bytes());
  cuda_emulation::Counts counts;
  std::string source;
  if (options.formulas) {
    if (config.model.vocab_size == 0)  // the emulated runs' vocabulary, so the two compare
      rex::train::take_vocab_size(
          config, cuda_emulation::made_up_corpus(options.work_dir, config.train.train_fraction));
    counts = cuda_emulation::cost_formulas::training_step(config);
    source = "one step from the cost formulas (not emulated)";
  } else {
    cuda_emulation::EmulatedRun run(config, options.work_dir);
    config = run.config();
    for (int step = 0; step < options.steps; ++step) {
      const bool counted = step == options.steps - 1;
      if (counted) cuda_emulation::begin_interval(true);
      run.step(step);
      if (counted) counts = cuda_emulation::end_interval();
    }
    source = "step " + std::to_string(options.steps) + " of " + std::to_string(options.steps) +
             " counted (emulated)";
  }
  std::printf("cost report: %s, batch %lld, context %lld, vocabulary %lld, %s, device model %s\n",
              options.config_path.empty() ? "built-in config" : options.config_path.c_str(),
              static_cast<long long>(config.train.batch_size),
              static_cast<long long>(config.model.context),
              static_cast<long long>(config.model.vocab_size), source.c_str(),
              std::string(options.device->name).c_str());
  print_kernels(counts, *options.device);
  print_gemms(counts, *options.device);
  print_step(counts, *options.device, model_flops(config));
  const double needed =
      rex::train::estimate_training_memory(config.model, config.train.batch_size).total_bytes();
  std::printf("training memory (rex's estimate) %.1f GiB, %s the %s's %.0f GB\n",
              needed / (1024.0 * 1024 * 1024),
              needed <= options.device->memory_bytes ? "within" : "MORE THAN",
              std::string(options.device->name).c_str(), options.device->memory_bytes / 1e9);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "cost_report: %s\n", e.what());
  return 1;
}
