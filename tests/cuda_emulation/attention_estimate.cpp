// What causal attention would cost on an H100 SXM or an H200, estimated by the device model
// (include/rex_device_model.h) from the emulation's counts: the fp32 row kernels
// (kernels/attention.cu) and flash attention on bf16 tensor cores (kernels/flash_attention.cu),
// forward and backward, on one shape. Prints per kernel what it asks of the device, what bounds
// it and its estimated time, then each pass's efficiency: the attention's useful FLOPs (4 D per
// unmasked score forward, 2.5 times that backward, as FlashAttention's papers count them) over what
// the bf16 tensor-core peak does in the estimated time, with and without the launches' overhead.
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

// A pass's estimated seconds, and the part of them that its launches add.
struct PassEstimate {
  double total_s = 0, launch_s = 0;
};

// Runs `pass` in a counted interval and prints its kernels.
template <class Pass>
PassEstimate estimate(const char* title, const model::Device& device, Pass&& pass,
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
  return {total, static_cast<double>(counts.launches) * device.launch_s};
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
  // Efficiency with the launches, and without them: at a batch that fills the GPU, the launches'
  // few microseconds are spread over far more work (each head's counts are the same).
  const auto report = [&](const char* pass, double flops, PassEstimate e) {
    const double peak = device.bf16_flops_per_s, kernels_s = e.total_s - e.launch_s;
    std::printf(
        "  %s: %.3g useful FLOPs in %.1f us: %.1f%% of the bf16 tensor-core peak; "
        "%.1f%% without the launches (%.1f us)\n\n",
        pass, flops, e.total_s * 1e6, 100 * flops / (e.total_s * peak),
        100 * flops / (kernels_s * peak), kernels_s * 1e6);
  };

  const rex::detail::AttentionShape shape{o.batch, o.heads, o.kv_heads, T, D};
  if (!o.flash_only) {
    const PassEstimate exact_forward = estimate("row kernels, forward", device, [&] {
      cuda.attention(f(q), f(k), f(v), f(out), f(lse), shape, scale);
    });
    report("row kernels, forward", forward_flops, exact_forward);
    const PassEstimate exact_backward = estimate("row kernels, backward", device, [&] {
      cuda.attention_backward(f(q), f(k), f(v), f(lse), f(g), f(dq), f(dk), f(dv), shape, scale);
    });
    report("row kernels, backward", backward_flops, exact_backward);
  }

  cuda_emulation::Counts forward_counts, backward_counts;
  const PassEstimate flash_forward = estimate(
      "flash attention, forward", device,
      [&] { cuda.flash_attention(f(q), f(k), f(v), f(out), f(lse), shape, scale); },
      &forward_counts);
  report("flash attention, forward", forward_flops, flash_forward);
  const PassEstimate flash_backward = estimate(
      "flash attention, backward", device,
      [&] {
        cuda.flash_attention_backward(f(q), f(k), f(v), f(out), f(lse), f(g), f(dq), f(dk), f(dv),
                                      shape, scale);
      },
      &backward_counts);
  report("flash attention, backward", backward_flops, flash_backward);

  // The tiling's products (kernels/flash_attention.cu): a block of 8 warps owns 16 R rows a warp
  // (R = 2 up to head dim 64, else 1). The forward streams keys in tiles of 32, a warp taking part
  // while the tile's first key is not past its last row (two products of 16 R x 32 x D); the
  // backward streams tiles of 64 in steps of 16 (none past T), the keys kernel computing four
  // products of 16 R x 16 x D unless every query of the step is before the warp's keys, the
  // queries kernel three unless every key is past the warp's rows.
  const int64_t blocks = D <= 64 ? 2 : 1, block_rows = 16 * blocks * 8;
  const double product = 2.0 * 16 * 16 * static_cast<double>(D);  // one 16 x 16 x D product
  double want_forward = 0, want_backward = 0;
  for (int64_t first = 0; first < T; first += block_rows)
    for (int64_t warp = 0; warp < 8; ++warp) {
      const int64_t own = first + 16 * blocks * warp, last = own + 16 * blocks - 1;
      for (int64_t key = 0; key < std::min(first + block_rows, T); key += 32)
        if (key <= last) want_forward += 2 * blocks * 2 * product;
      for (int64_t tile = first; tile < T; tile += 64)  // keys kernel: queries from `first`
        for (int64_t other = tile; other < tile + 64; other += 16)
          if (other + 15 >= own && other < T) want_backward += 4 * blocks * product;
      for (int64_t tile = 0; tile < std::min(first + block_rows, T); tile += 64)  // queries kernel
        for (int64_t other = tile; other < tile + 64; other += 16)
          if (other <= last && other < T) want_backward += 3 * blocks * product;
    }
  want_forward *= static_cast<double>(bh);
  want_backward *= static_cast<double>(bh);
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
