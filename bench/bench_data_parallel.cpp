// Data-parallel step time (bench/data_parallel.py drives it): the default tiny ReX R4 + PSR model
// trained for --warmup then --steps steps on --data. Alone, it times the one-process step. Under
// mpirun it times the data-parallel step with the bucket reductions overlapped with backward and
// without (alternating blocks of --block steps), the communication each leaves exposed (the time
// GradientSync::finish waits), and one blocking all-reduce of all the gradients (what a step would
// pay with no overlap at all). Rank 0 prints one JSON line per mode.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <rex/dist/gradient_sync.hpp>
#include <rex/rex.hpp>
#include <rex/train/train.hpp>

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string data;
    int64_t steps = 30, warmup = 5, block = 5;
    for (int i = 1; i + 1 < argc; i += 2) {
      const std::string flag = argv[i], value = argv[i + 1];
      if (flag == "--data")
        data = value;
      else if (flag == "--steps")
        steps = std::stoll(value);
      else if (flag == "--warmup")
        warmup = std::stoll(value);
      else if (flag == "--block")
        block = std::stoll(value);
      else
        throw rex::Error("unknown option " + flag);
    }
    REX_CHECK(!data.empty(), "usage: bench_data_parallel --data FILE [--steps N] [--warmup N]");
    rex::dist::Communicator& world = rex::dist::Communicator::world();
    const rex::train::Corpus corpus = rex::train::load_corpus(data, std::nullopt, 0.9);
    rex::train::RunConfig config;
    rex::train::take_vocab_size(config, corpus);
    const rex::train::TrainConfig& t = config.train;
    rex::train::TrainingState run = rex::train::start_training(config, rex::Device::cpu());
    const rex::data::BatchSampler batches = rex::train::train_sampler(corpus, config);
    const std::vector<rex::Tensor> params = run.optimizer.tensors();
    int64_t values = 0;
    for (const rex::Tensor& p : params) values += p.numel();
    std::optional<rex::dist::GradientSync> sync;
    if (world.size() > 1) sync.emplace(world, params);
    const rex::train::BatchSplit split{sync ? &*sync : nullptr, 1};

    struct Mode {
      std::vector<double> step_s, exposed_s;
    } on, off;
    const int64_t total = warmup + (sync ? 2 : 1) * steps;  // overlap on and off under mpirun
    for (int64_t step = 0; step < total; ++step) {
      const bool timed = step >= warmup;
      const bool overlap = !sync || ((step - warmup) / block) % 2 == 0;
      if (sync) sync->set_overlap(overlap);
      const auto began = Clock::now();
      rex::train::train_step(*run.model, run.optimizer, batches.sample(static_cast<uint64_t>(step)),
                             {step, t.seed}, 1e-3f, t.grad_clip, split);
      if (!timed) continue;
      Mode& m = overlap ? on : off;
      m.step_s.push_back(seconds_since(began));
      m.exposed_s.push_back(sync ? sync->exposed_seconds() : 0.0);
    }
    // One blocking all-reduce of every gradient (plus the flags), as a step without buckets pays.
    std::vector<double> reduce_s;
    std::vector<float> flat(static_cast<size_t>(values + static_cast<int64_t>(params.size())),
                            1.0f);
    for (int i = 0; i < 20 && world.size() > 1; ++i) {
      const auto began = Clock::now();
      world.start_all_reduce_sum(flat.data(), flat.size()).wait();
      reduce_s.push_back(seconds_since(began));
    }
    const double tokens = static_cast<double>(t.batch_size * config.model.context);
    const int threads = rex::thread_count();
    auto report = [&](const char* overlap, const Mode& m) {
      if (!world.is_root()) return;
      std::printf(
          "{\"ranks\": %d, \"threads_per_rank\": %d, \"overlap\": %s, \"steps\": %zu, "
          "\"median_step_ms\": %.3f, \"tokens_per_s\": %.1f, \"median_exposed_comm_ms\": %.3f, "
          "\"gradient_bytes\": %lld, \"buckets\": %zu, \"blocking_allreduce_ms\": %.3f}\n",
          world.size(), threads, overlap, m.step_s.size(), 1e3 * median(m.step_s),
          tokens / median(m.step_s), 1e3 * median(m.exposed_s),
          static_cast<long long>(4 * flat.size()), sync ? sync->buckets() : size_t{0},
          1e3 * median(reduce_s));
    };
    if (sync) {
      report("true", on);
      report("false", off);
    } else {
      report("null", on);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_data_parallel: error: %s\n", e.what());
    rex::dist::Communicator::world().fail(1);
  }
}
