// train_step_server: rex's side of bench/bench_train.py. Builds a model from a config and runs
// training steps on command, so that the Python driver can interleave rex and PyTorch in one run.
//
//   train_step_server --config FILE.json [--set section.key=value ...] [--device cpu|cuda]
//                     [--tf32 0|1]
// then reads commands on stdin, one per line, and answers one line each:
//   steps N   -> "ms T"     N training steps (forward, backward, clipping, AdamW), T = wall ms
//   loss      -> "loss L"   the loss of the last step
//   rss       -> "rss KIB"  peak resident memory of this process
//   memory    -> "memory A P"  bytes of tensors a forward pass keeps alive for backward (A), and
//                the peak bytes of live tensors during one whole training step (P)
//   config    -> the run configuration with every default filled in, as one JSON line
//   gemm N    -> "gemm G"   rex's best GFLOP/s of 5 N x N x N products (the machine's GEMM peak)
//   save DIR  -> "saved"    writes DIR/model.safetensors (the parameters now) and
//                DIR/batch.safetensors (ids, targets I32 [B, T]): a peer loads them, takes one step
//                and compares its loss with rex's "loss" after "steps 1"
//   quit
// Batches are drawn from random token ids (the speed does not depend on the text) with a fixed
// seed; the PSR step advances with the steps, as in training.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <rex/backend/cuda/runtime.hpp>
#include <rex/rex.hpp>
#include <rex/train/checkpoint.hpp>
#include <rex/train/config.hpp>
#include <rex/train/program.hpp>
#include <rex/train/step.hpp>

namespace {

// VmHWM of /proc/self/status: the peak resident memory of this program. (getrusage's ru_maxrss
// would also count the parent's peak at fork time, since Linux keeps it across exec.)
int64_t peak_rss_kib() {
  std::ifstream status("/proc/self/status");
  std::string key;
  while (status >> key) {
    if (key == "VmHWM:") {
      int64_t kib = 0;
      status >> kib;
      return kib;
    }
  }
  return -1;
}

int run(int argc, char** argv) {
  std::string config_path, device_name = "cpu";
  bool tf32 = false;
  std::vector<std::string> overrides;
  REX_CHECK(argc % 2 == 1, "train_step_server: every flag needs a value");
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--config") {
      config_path = argv[i + 1];
    } else if (flag == "--set") {
      overrides.push_back(argv[i + 1]);
    } else if (flag == "--device") {
      device_name = argv[i + 1];
    } else if (flag == "--tf32") {
      tf32 = std::string(argv[i + 1]) == "1";
    } else {
      throw rex::Error("train_step_server: unknown flag " + flag);
    }
  }
  REX_CHECK(!config_path.empty(), "usage: train_step_server --config FILE [--set k=v ...]");
  const rex::train::RunConfig config = rex::train::read_run_config(config_path, overrides);
  REX_CHECK(config.model.vocab_size > 0, "train_step_server: set model.vocab_size");
  const rex::train::TrainConfig& t = config.train;

  const rex::Device device = rex::train::device_named(device_name);
  rex::set_matmul_precision(device, tf32 ? "tf32" : "fp32");
  // Work on the GPU is asynchronous: timings wait for it to finish.
  auto finish = [&] { rex::synchronize(device); };
  rex::nn::TransformerLM model(config.model, t.seed);
  model.to(device);
  rex::optim::AdamW optimizer = rex::train::make_optimizer(model, t);
  rex::Generator gen(t.seed + 1);
  const int64_t batch = t.batch_size, time = config.model.context;
  auto random_ids = [&] {
    std::vector<int32_t> ids(static_cast<size_t>(batch * time));
    for (int32_t& id : ids)
      id = static_cast<int32_t>(gen.below(static_cast<uint64_t>(config.model.vocab_size)));
    return rex::from_vector(ids, {batch, time}).to(device);
  };
  const rex::data::Batch sequences{random_ids(), random_ids()};

  const float lr = static_cast<float>(t.lr);
  int64_t step = 0;
  float last_loss = 0;
  std::string command;
  while (std::cin >> command) {
    if (command == "steps") {
      int64_t n = 0;
      REX_CHECK(std::cin >> n && n >= 0, "train_step_server: steps expects a count");
      const auto start = std::chrono::steady_clock::now();
      // As a training loop steps (queue_step): on CUDA the losses are read once, after the steps.
      std::vector<rex::train::QueuedStep> queued;
      for (int64_t i = 0; i < n; ++i, ++step)
        queued.push_back(
            rex::train::queue_step(model, optimizer, sequences, {step, t.seed}, lr, t.grad_clip));
      if (n > 0)
        last_loss = static_cast<float>(rex::train::read_steps(std::move(queued)).back().loss);
      finish();
      const std::chrono::duration<double, std::milli> ms = std::chrono::steady_clock::now() - start;
      std::printf("ms %.6f\n", ms.count());
    } else if (command == "loss") {
      std::printf("loss %.9g\n", last_loss);
    } else if (command == "rss") {
      std::printf("rss %lld\n", static_cast<long long>(peak_rss_kib()));
    } else if (command == "memory") {
      // kept: a forward pass whose graph is then dropped; peak: a whole training step after it.
      const int64_t base = rex::allocated_bytes();
      rex::reset_peak_allocated_bytes();
      int64_t kept = 0;
      {
        const rex::nn::LmOutput out =
            model.forward(sequences.inputs, sequences.targets, {step, t.seed});
        kept = rex::allocated_bytes() - base;
      }
      rex::train::train_step(model, optimizer, sequences, {step, t.seed}, lr, t.grad_clip);
      ++step;
      std::printf("memory %lld %lld\n", static_cast<long long>(kept),
                  static_cast<long long>(rex::peak_allocated_bytes() - base));
    } else if (command == "config") {
      std::printf("%s\n", rex::train::to_json(config).dump().c_str());
    } else if (command == "gemm") {
      int64_t n = 0;
      REX_CHECK(std::cin >> n && n > 0, "train_step_server: gemm expects a size");
      const rex::Tensor a = rex::normal({n, n}, gen).to(device);
      const rex::Tensor b = rex::normal({n, n}, gen).to(device);
      double best = 1e300;
      for (int repeat = 0; repeat < 6; ++repeat) {
        finish();
        const auto start = std::chrono::steady_clock::now();
        const rex::Tensor c = rex::matmul(a, b);
        finish();
        const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
        if (repeat > 0) best = std::min(best, seconds.count());
      }
      std::printf("gemm %.3f\n", 2.0 * static_cast<double>(n * n * n) / best / 1e9);
    } else if (command == "save") {
      std::string dir;
      REX_CHECK(std::cin >> dir, "train_step_server: save expects a folder");
      rex::io::save_safetensors(rex::train::model_path(dir), rex::train::parameter_map(model));
      rex::io::save_safetensors(dir + "/batch.safetensors",
                                {{"ids", sequences.inputs.to(rex::Device::cpu())},
                                 {"targets", sequences.targets.to(rex::Device::cpu())}});
      std::printf("saved\n");
    } else if (command == "quit") {
      return 0;
    } else {
      throw rex::Error("train_step_server: unknown command " + command);
    }
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_step_server: error: %s\n", e.what());
    return 1;
  }
}
