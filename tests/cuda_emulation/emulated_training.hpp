// What training_step_budgets and cost_report share: a run of a config on the emulated CUDA device,
// trained on a made-up corpus written into the work folder (the counts do not depend on the text),
// stepped one training step at a time, as the training program steps it (queue_step: the step's
// losses and gradient norm stay on the device).
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>

#include <rex/backend/cuda/runtime.hpp>
#include <rex/rex.hpp>
#include <rex/train/train.hpp>

namespace cuda_emulation {

// A corpus of 3000 made-up lines, written to work_dir (created if missing).
inline rex::train::Corpus made_up_corpus(const std::string& work_dir, double train_fraction) {
  std::filesystem::create_directories(work_dir);
  const std::string path = work_dir + "/emulated_training_corpus.txt";
  {
    std::ofstream out(path);
    REX_CHECK(out, "cannot write the made-up corpus ", path);
    for (int i = 1; i <= 3000; ++i)
      out << "And it came to pass, in the " << i
          << "th year, that the king said unto his servants: go forth.\n";
  }
  return rex::train::load_corpus(path, std::nullopt, train_fraction);
}

class EmulatedRun {
 public:
  EmulatedRun(rex::train::RunConfig config, const std::string& work_dir)
      : corpus_(made_up_corpus(work_dir, config.train.train_fraction)),
        config_(with_vocab_size(std::move(config), corpus_)),
        batches_(rex::train::train_sampler(corpus_, config_)),
        run_(start(config_)),
        schedule_(rex::train::lr_schedule(config_.train)) {}

  const rex::train::RunConfig& config() const { return config_; }

  rex::train::QueuedStep step(int64_t step) {
    return rex::train::queue_step(
        *run_.model, run_.optimizer, batches_.sample(static_cast<uint64_t>(step)),
        {step, config_.train.seed}, schedule_.lr(step), config_.train.grad_clip);
  }

 private:
  static rex::train::RunConfig with_vocab_size(rex::train::RunConfig config,
                                               const rex::train::Corpus& corpus) {
    rex::train::take_vocab_size(config, corpus);
    return config;
  }
  static rex::train::TrainingState start(const rex::train::RunConfig& config) {
    const rex::Device device = rex::Device::cuda();
    rex::set_matmul_precision(device, config.train.matmul_precision);
    return rex::train::start_training(config, device);
  }

  rex::train::Corpus corpus_;
  rex::train::RunConfig config_;
  rex::data::BatchSampler batches_;
  rex::train::TrainingState run_;
  rex::optim::CosineSchedule schedule_;
};

}  // namespace cuda_emulation
