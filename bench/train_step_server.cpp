// train_step_server: rex's side of bench/bench_train.py. Builds a model from a config and runs
// training steps on command, so that the Python driver can interleave rex and PyTorch in one run.
//
//   train_step_server --config FILE.json [--set section.key=value ...]
// then reads commands on stdin, one per line, and answers one line each:
//   steps N   -> "ms T"     N training steps (forward, backward, clipping, AdamW), T = wall ms
//   loss      -> "loss L"   the loss of the last step
//   rss       -> "rss KB"   peak resident memory of this process
//   quit
// Batches are drawn from random token ids (the speed does not depend on the text) with a fixed
// seed; the PSR step advances with the steps, as in training.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include <rex/io/config.hpp>
#include <rex/io/files.hpp>
#include <rex/rex.hpp>

namespace {

int run(int argc, char** argv) {
  std::string config_path;
  std::vector<std::string> overrides;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--config") {
      config_path = argv[i + 1];
    } else if (flag == "--set") {
      overrides.push_back(argv[i + 1]);
    } else {
      throw rex::Error("train_step_server: unknown flag " + flag);
    }
  }
  REX_CHECK(!config_path.empty(), "usage: train_step_server --config FILE [--set k=v ...]");
  rex::nn::RunConfig config = rex::io::parse_config(rex::io::read_file(config_path), config_path);
  for (const std::string& o : overrides) rex::io::apply_override(config, o);
  rex::nn::validate(config);
  REX_CHECK(config.model.vocab_size > 0, "train_step_server: set model.vocab_size");
  const rex::nn::TrainConfig& t = config.train;

  rex::nn::TransformerLM model(config.model, t.seed);
  std::vector<rex::optim::Parameter> params;
  for (const auto& [name, p] : model.named_parameters()) params.push_back({name, p, p.rank() >= 2});
  rex::optim::AdamW optimizer(params, {static_cast<float>(t.beta1), static_cast<float>(t.beta2),
                                       static_cast<float>(t.eps),
                                       static_cast<float>(t.weight_decay)});
  rex::Generator gen(t.seed + 1);
  const int64_t batch = t.batch_size, time = config.model.context;
  auto random_ids = [&] {
    std::vector<int32_t> ids(static_cast<size_t>(batch * time));
    for (int32_t& id : ids)
      id = static_cast<int32_t>(gen.below(static_cast<uint64_t>(config.model.vocab_size)));
    return rex::from_vector(ids, {batch, time});
  };
  const rex::Tensor ids = random_ids(), targets = random_ids();

  int64_t step = 0;
  float last_loss = 0;
  std::string command;
  while (std::cin >> command) {
    if (command == "steps") {
      int64_t n = 0;
      std::cin >> n;
      const auto start = std::chrono::steady_clock::now();
      for (int64_t i = 0; i < n; ++i, ++step) {
        const rex::nn::LmOutput out = model.forward(ids, targets, {step, t.seed});
        out.loss.backward();
        rex::optim::clip_grad_norm(params, t.grad_clip);
        optimizer.step(static_cast<float>(t.lr));
        optimizer.zero_grad();
        last_loss = out.loss.item();
      }
      const std::chrono::duration<double, std::milli> ms = std::chrono::steady_clock::now() - start;
      std::printf("ms %.6f\n", ms.count());
    } else if (command == "loss") {
      std::printf("loss %.9g\n", last_loss);
    } else if (command == "rss") {
      rusage usage{};
      getrusage(RUSAGE_SELF, &usage);
      std::printf("rss %ld\n", usage.ru_maxrss);
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
