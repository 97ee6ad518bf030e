// train_rex_minimal: the smallest complete ReX-MoE training program, written to be copied and
// changed. One straight sequence: config, corpus, model, AdamW, the training loop, one evaluation,
// one sample. Everything it calls is the training library (rex/train/); train_tiny_rex is the full
// program (checkpoints, resume, CUDA, metrics files).
//
//   train_rex_minimal TEXT_FILE [section.key=value ...]     e.g. train.steps=300 moe.reuse=2
//
// The keys are those of docs/formats.md; the defaults are the tiny R4 + PSR model, on the CPU.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <rex/rex.hpp>
#include <rex/train/train.hpp>

namespace train = rex::train;

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: train_rex_minimal TEXT_FILE [section.key=value ...]\n");
    return 2;
  }
  try {
    // The run configuration: the defaults with the command line's overrides.
    train::RunConfig config = train::read_run_config("", {argv + 2, argv + argc});
    const train::TrainConfig& t = config.train;

    // The corpus: bytes as tokens, the leading train_fraction for training.
    const train::Corpus corpus = train::load_corpus(argv[1], std::nullopt, t.train_fraction);
    train::take_vocab_size(config, corpus);
    std::printf("%s\n", train::corpus_summary(corpus).c_str());
    const rex::data::BatchSampler train_batches = train::train_sampler(corpus, config);
    const rex::data::BatchSampler val_batches = train::validation_sampler(corpus, config);

    // The model and its optimiser: AdamW, decay on matrices, warmup + cosine learning rate.
    const rex::nn::TransformerLM model(config.model, t.seed);
    rex::optim::AdamW optimizer = train::make_optimizer(model, t);
    const rex::optim::CosineSchedule schedule = train::lr_schedule(t);
    std::printf("%s\n", train::model_summary(model).c_str());

    // Before training, the loss is about ln(vocab): every byte equally likely.
    const rex::Device cpu = rex::Device::cpu();
    const double initial =
        train::evaluate(model, val_batches, t.eval_batches, train::after_steps(0, t.seed), cpu)
            .val_loss;
    std::printf("step 0: val_loss %.4f (ln(vocab) = %.4f)\n", initial,
                std::log(static_cast<double>(config.model.vocab_size)));

    // The training loop. Batch `step` and the PSR mask of `step` are pure functions of the seed.
    for (int64_t step = 0; step < t.steps; ++step) {
      const float lr = schedule.lr(step);
      const train::StepResult result =
          train::train_step(model, optimizer, train_batches.sample(static_cast<uint64_t>(step)),
                            {step, t.seed}, lr, t.grad_clip);
      if ((step + 1) % t.log_interval == 0 || step + 1 == t.steps)
        std::printf("step %lld: loss %.4f (aux %.4f), lr %.2e, grad norm %.3f, N_t %lld\n",
                    static_cast<long long>(step + 1), result.loss, result.aux_loss, lr,
                    result.grad_norm, static_cast<long long>(result.candidates));
    }

    // One evaluation on the validation split, with the PSR mask of the last step trained.
    const train::Evaluation eval = train::evaluate(model, val_batches, t.eval_batches,
                                                   train::after_steps(t.steps, t.seed), cpu);
    std::printf("step %lld: val_loss %.4f\n", static_cast<long long>(t.steps), eval.val_loss);

    // One sample: 200 characters continuing a newline.
    const std::string sample = train::generate(model, *corpus.tokenizer, "\n", 200, 0.8, t.seed,
                                               train::after_steps(t.steps, t.seed));
    std::printf("--- sample ---\n%s\n", sample.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_rex_minimal: error: %s\n", e.what());
    return 1;
  }
}
