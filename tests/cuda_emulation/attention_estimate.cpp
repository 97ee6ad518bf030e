// What causal attention would cost on an H100 SXM or an H200, estimated by the device model
// (include/rex_device_model.h) from the emulation's counts: the fp32 row kernels
// (kernels/attention.cu) and flash attention on bf16 tensor cores (kernels/flash_attention.cu),
// forward and backward, on one shape. Prints per kernel what it asks of the device, what bounds
// it and its estimated time, then each pass's efficiency: the attention's useful FLOPs (4 D per
// unmasked score forward, 2.5 times that backward, as FlashAttention's papers count them) over what
// the bf16 tensor-core peak does in the estimated time.
//
// It also checks the counts it can predict: the tensor-core FLOPs of the flash kernels follow from
// their tiling (every visited tile's products, masked elements included) and must match exactly;
// it exits non-zero otherwise (CTest runs it on a small shape).
// Usage: attention_estimate [--batch B] [--heads H] [--kv-heads K] [--time T] [--head-dim D]
//                           [--device-model h100|h200] [--flash-only]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <rex_device_model.h>
#include <rex_emulation_counters.h>
#include <rex/rex.hpp>

namespace {

namespace model = cuda_emulation::device_model;

struct Options {
  int64_t batch = 1, heads = 1, kv_heads = 1, time = 2048, head_dim = 128;
  const model::Device* device = &model::kH100Sxm;
  bool flash_only = false;  // the row kernels take minutes to emulate at T = 2048
};

[[noreturn]] void usage() {
  std::fprintf(stderr,
               "usage: attention_estimate [--batch B] [--heads H] [--kv-heads K] [--time T] "
               "[--head-dim D] [--device-model h100|h200] [--flash-only]\n");
  std::exit(2);
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--flash-only") {
      o.flash_only = true;
      continue;
    }
    if (i + 1 >= argc) usage();
    const std::string value = argv[++i];
    if (flag == "--device-model") {
      o.device = model::find_device(value);
      if (o.device == nullptr) usage();
      continue;
    }
    const int64_t number = std::atoll(value.c_str());
    if (number < 1) usage();
    if (flag == "--batch") {
      o.batch = number;
    } else if (flag == "--heads") {
      o.heads = number;
    } else if (flag == "--kv-heads") {
      o.kv_heads = number;
    } else if (flag == "--time") {
      o.time = number;
    } else if (flag == "--head-dim") {
      o.head_dim = number;
    } else {
      usage();
    }
  }
  if (o.heads % o.kv_heads != 0) usage();
  return o;
}

// Prints one kernel's line; returns its estimated seconds.
double print_kernel(const std::string& name, const cuda_emulation::KernelCounts& k,
                    const model::Device& device) {
  const model::KernelEstimate e = model::estimate_kernel(k, device);
  const char* bound = model::bound_of(e);
  std::printf("  %-34s %6llu %9.2f %9.2f %9.1f %9.1f %9.1f %9.1f %9.1f %7s %9.1f\n", name.c_str(),
              static_cast<unsigned long long>(k.launches),
              static_cast<double>(k.global.load_bytes + k.global.store_bytes) / 1e6,
              static_cast<double>(k.global.sectors() * model::kSectorBytes) / 1e6, e.hbm_s * 1e6,
              e.l2_s * 1e6, e.shared_s * 1e6, e.arithmetic_s * 1e6, e.tensor_s * 1e6, bound,
              e.total_s() * 1e6);
  return e.total_s();
}

// Runs `pass` in a counted interval and prints its kernels; returns the estimated seconds.
template <class Pass>
double estimate(const char* title, const model::Device& device, Pass&& pass,
                cuda_emulation::Counts* counts_out = nullptr) {
  cuda_emulation::begin_interval(true);
  pass();
  const cuda_emulation::Counts counts = cuda_emulation::end_interval();
  std::printf("%s (estimated (device model), %s; times in us)\n", title,
              std::string(device.name).c_str());
  std::printf("  %-34s %6s %9s %9s %9s %9s %9s %9s %9s %7s %9s\n", "kernel", "launch", "MB asked",
              "MB sect", "hbm", "l2", "smem", "alu", "tensor", "bound", "total");
  double total = 0;
  for (const auto& [name, kernel] : counts.kernels) total += print_kernel(name, kernel, device);
  total += static_cast<double>(counts.host_waits()) * device.host_wait_s;
  std::printf("  host waits %llu; total %.1f us\n",
              static_cast<unsigned long long>(counts.host_waits()), total * 1e6);
  if (counts_out) *counts_out = counts;
  return total;
}

uint64_t tensor_flops(const cuda_emulation::Counts& counts, const std::string& prefix) {
  uint64_t flops = 0;
  for (const auto& [name, kernel] : counts.kernels)
    if (name.rfind(prefix, 0) == 0) flops += kernel.arithmetic.tensor_bf16_flops;
  return flops;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace rex;
  const Options o = parse_options(argc, argv);
  const model::Device& device = *o.device;
  const int64_t T = o.time, D = o.head_dim, bh = o.batch * o.heads, bkv = o.batch * o.kv_heads;
  std::printf("causal attention: batch %lld, %lld query heads, %lld kv heads, T %lld, D %lld\n\n",
              static_cast<long long>(o.batch), static_cast<long long>(o.heads),
              static_cast<long long>(o.kv_heads), static_cast<long long>(T),
              static_cast<long long>(D));
  Generator gen(7);
  const Device gpu = Device::cuda();
  const Tensor q = normal(Shape{bh * T * D}, gen).to(gpu),
               k = normal(Shape{bkv * T * D}, gen).to(gpu),
               v = normal(Shape{bkv * T * D}, gen).to(gpu),
               g = normal(Shape{bh * T * D}, gen).to(gpu);
  const Tensor out = Tensor::empty(Shape{bh * T * D}, DType::f32, gpu),
               lse = Tensor::empty(Shape{bh * T}, DType::f32, gpu),
               dq = Tensor::empty(Shape{bh * T * D}, DType::f32, gpu),
               dk = Tensor::empty(Shape{bkv * T * D}, DType::f32, gpu),
               dv = Tensor::empty(Shape{bkv * T * D}, DType::f32, gpu);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const auto& cuda = rex::detail::cuda_backend();
  const auto f = [](const Tensor& t) { return t.device_data<float>(); };

  // Useful FLOPs: 2 products of 2 D FLOPs per unmasked score forward, 5 backward.
  const double scores =
      static_cast<double>(bh) * static_cast<double>(T) * static_cast<double>(T + 1) / 2;
  const double forward_flops = 4 * static_cast<double>(D) * scores,
               backward_flops = 2.5 * forward_flops;
  const auto report = [&](const char* pass, double flops, double seconds) {
    std::printf("  %s: %.3g useful FLOPs in %.1f us: %.1f%% of the bf16 tensor-core peak\n\n", pass,
                flops, seconds * 1e6, 100 * flops / (seconds * device.bf16_flops_per_s));
  };

  if (!o.flash_only) {
    const double exact_forward = estimate("row kernels, forward", device, [&] {
      cuda.attention(f(q), f(k), f(v), f(out), f(lse), o.batch, o.heads, o.kv_heads, T, D, scale);
    });
    report("row kernels, forward", forward_flops, exact_forward);
    const double exact_backward = estimate("row kernels, backward", device, [&] {
      cuda.attention_backward(f(q), f(k), f(v), f(lse), f(g), f(dq), f(dk), f(dv), o.batch, o.heads,
                              o.kv_heads, T, D, scale);
    });
    report("row kernels, backward", backward_flops, exact_backward);
  }

  cuda_emulation::Counts forward_counts, backward_counts;
  const double flash_forward = estimate(
      "flash attention, forward", device,
      [&] {
        cuda.flash_attention(f(q), f(k), f(v), f(out), f(lse), o.batch, o.heads, o.kv_heads, T, D,
                             scale);
      },
      &forward_counts);
  report("flash attention, forward", forward_flops, flash_forward);
  const double flash_backward = estimate(
      "flash attention, backward", device,
      [&] {
        cuda.flash_attention_backward(f(q), f(k), f(v), f(out), f(lse), f(g), f(dq), f(dk), f(dv),
                                      o.batch, o.heads, o.kv_heads, T, D, scale);
      },
      &backward_counts);
  report("flash attention, backward", backward_flops, flash_backward);

  // The tiling's products: a 64 x 64 tile pair (query tile i, key tile j <= i) costs the forward
  // two products of 2 x 64 x 64 x D FLOPs, the backward four (keys kernel) plus three (queries).
  const int64_t tiles = (T + 63) / 64;
  const double pairs = static_cast<double>(bh) * static_cast<double>(tiles * (tiles + 1) / 2);
  const double product = 2.0 * 64 * 64 * static_cast<double>(D);
  const double want_forward = 2 * product * pairs, want_backward = 7 * product * pairs;
  const double got_forward = static_cast<double>(tensor_flops(forward_counts, "flash_forward")),
               got_backward = static_cast<double>(tensor_flops(backward_counts, "flash_backward"));
  std::printf(
      "tensor-core FLOPs by the tiling: forward %.6g (counted %.6g), backward %.6g "
      "(counted %.6g)\n",
      want_forward, got_forward, want_backward, got_backward);
  if (got_forward != want_forward || got_backward != want_backward) {
    std::printf("FAIL: the counted tensor-core FLOPs differ from the tiling's\n");
    return 1;
  }
  return 0;
}
