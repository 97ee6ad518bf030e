// dump_rex: one training step of a rex model, written out for the PyTorch twin (twin.py) to redo.
//
//   dump_rex --config FILE.json [--set section.key=value ...] --step T --out DIR [--steps S]
//
// Builds the model from the config (model.vocab_size must be set) with train.seed, draws a batch
// of train.batch_size x model.context token ids from the seed, and runs one step at PSR step T:
// forward, backward, global-norm clipping at train.grad_clip, one AdamW step at train.lr (decay on
// matrices only). DIR receives
//   config.json, vocab.json, model.safetensors   the model before the step (the usual model folder)
//   inputs.safetensors    ids, targets (I32 [B, T]); psr_keep.{l} for each MoE layer: I32 [P]
//                         (psr.mask_scope = step, or nothing masked) or I32 [B*T, P] (row b T + t
//                         the mask of token t of sequence b: sequence and token scopes);
//                         metadata: step
//   expected.safetensors  logits [B*T, V], loss, lm_loss, aux_loss (scalars; aux 0 for dense),
//                         grad.<param> (before clipping), after.<param> (after the AdamW step);
//                         metadata: grad_norm
//   trajectory.json       with --steps S > 1: S steps on the same batch (PSR steps T .. T + S - 1,
//                         train.matmul_precision applied), {"losses": [the S steps' losses],
//                         "loss_after": the batch's loss after them}, for a many-step comparison
//                         (tests/reference/check_bf16_twin.sh)
#include <cstdio>
#include <string>
#include <vector>

#include <rex/backend/cuda/runtime.hpp>
#include <rex/data/tokenizer.hpp>
#include <rex/rex.hpp>
#include <rex/train/checkpoint.hpp>
#include <rex/train/config.hpp>
#include <rex/train/step.hpp>

namespace {

int run(int argc, char** argv) {
  std::string config_path, out;
  std::vector<std::string> overrides;
  int64_t step = 0, steps = 1;
  REX_CHECK(argc % 2 == 1, "dump_rex: every flag needs a value");
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--config") {
      config_path = value;
    } else if (flag == "--set") {
      overrides.push_back(value);
    } else if (flag == "--step") {
      size_t used = 0;
      step = std::stoll(value, &used);
      REX_CHECK(used == value.size() && step >= 0, "dump_rex: --step expects a step number");
    } else if (flag == "--steps") {
      size_t used = 0;
      steps = std::stoll(value, &used);
      REX_CHECK(used == value.size() && steps >= 1, "dump_rex: --steps expects a count >= 1");
    } else if (flag == "--out") {
      out = value;
    } else {
      throw rex::Error("dump_rex: unknown flag " + flag);
    }
  }
  REX_CHECK(!config_path.empty() && !out.empty(),
            "usage: dump_rex --config FILE --out DIR [--step T] [--set k=v ...]");
  const rex::train::RunConfig config = rex::train::read_run_config(config_path, overrides);
  const rex::nn::ModelConfig& m = config.model;
  REX_CHECK(m.vocab_size > 0 && m.vocab_size <= 256, "dump_rex: set model.vocab_size (1..256)");
  const uint64_t seed = config.train.seed;
  rex::set_matmul_precision(rex::Device::cpu(), config.train.matmul_precision);

  const rex::nn::TransformerLM model(m, seed);
  std::vector<uint8_t> symbols(static_cast<size_t>(m.vocab_size));
  for (size_t i = 0; i < symbols.size(); ++i) symbols[i] = static_cast<uint8_t>(i);
  rex::train::save_model_folder(out, model, config, rex::data::CharTokenizer(symbols), 0);

  rex::Generator gen(seed + 1);
  const int64_t batch = config.train.batch_size, time = m.context;
  std::vector<int32_t> ids(static_cast<size_t>(batch * time)), targets(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    ids[i] = static_cast<int32_t>(gen.below(static_cast<uint64_t>(m.vocab_size)));
    targets[i] = static_cast<int32_t>(gen.below(static_cast<uint64_t>(m.vocab_size)));
  }
  rex::io::TensorMap inputs{{"ids", rex::from_vector(ids, {batch, time})},
                            {"targets", rex::from_vector(targets, {batch, time})}};
  if (m.ffn == "moe") {
    const int64_t pool = m.moe.reuse * m.moe.experts_per_layer;
    for (int64_t l = 0; l < m.n_layers; ++l) {
      // The masks the step's forward pass draws (the whole batch is one pass here).
      const rex::Tensor keep =
          rex::nn::psr_keep(m.psr, m.moe, seed, step, l, {batch * time, time}, rex::Device::cpu());
      const std::vector<float> values =
          keep.defined() ? keep.to_vector<float>() : std::vector<float>(pool, 1.0f);
      inputs["psr_keep." + std::to_string(l)] =
          rex::from_vector(std::vector<int32_t>(values.begin(), values.end()),
                           keep.defined() ? keep.shape() : rex::Shape{pool});
    }
  }
  rex::io::save_safetensors(out + "/inputs.safetensors", inputs, {{"step", std::to_string(step)}});

  // One training step; its forward pass and gradients (before clipping) are recorded on the way.
  const rex::train::TrainConfig& t = config.train;
  rex::optim::AdamW optimizer = rex::train::make_optimizer(model, t);
  rex::io::TensorMap expected;
  const rex::data::Batch tokens{inputs.at("ids"), inputs.at("targets")};
  const rex::train::StepResult result = rex::train::train_step(
      model, optimizer, tokens, {step, seed}, static_cast<float>(t.lr), t.grad_clip, {},
      [&](const rex::nn::LmOutput& forward) {
        expected = {
            {"logits", forward.logits},
            {"loss", forward.loss},
            {"lm_loss", forward.lm_loss},
            {"aux_loss", forward.aux_loss.defined() ? forward.aux_loss : rex::scalar(0.0f)}};
        for (const auto& [name, p] : model.named_parameters())
          expected["grad." + name] = p.grad().defined() ? p.grad().clone() : rex::zeros(p.shape());
      });
  for (const auto& [name, p] : model.named_parameters()) expected["after." + name] = p.detach();
  const double norm = result.grad_norm;
  char norm_text[64];
  std::snprintf(norm_text, sizeof norm_text, "%.17g", norm);
  rex::io::save_safetensors(out + "/expected.safetensors", expected, {{"grad_norm", norm_text}});
  std::printf("dump_rex: %s at step %lld -> %s (loss %.6f)\n", config_path.c_str(),
              static_cast<long long>(step), out.c_str(), result.output.loss.item());
  if (steps == 1) return 0;
  auto text = [](double value) {
    char buffer[32];
    std::snprintf(buffer, sizeof buffer, "%.9g", value);
    return std::string(buffer);
  };
  std::string losses = text(result.loss);
  for (int64_t i = 1; i < steps; ++i) {
    const rex::train::StepResult more = rex::train::train_step(
        model, optimizer, tokens, {step + i, seed}, static_cast<float>(t.lr), t.grad_clip);
    losses += ", " + text(more.loss);
  }
  const rex::NoGradGuard no_grad;
  const double after =
      model.forward(tokens.inputs, tokens.targets, {step + steps, seed}).loss.item();
  FILE* file = std::fopen((out + "/trajectory.json").c_str(), "w");
  REX_CHECK(file != nullptr, "dump_rex: cannot write ", out, "/trajectory.json");
  std::fprintf(file, "{\"losses\": [%s], \"loss_after\": %.9g}\n", losses.c_str(), after);
  std::fclose(file);
  std::printf("dump_rex: %lld steps, loss after them %.6f\n", static_cast<long long>(steps), after);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dump_rex: error: %s\n", e.what());
    return 1;
  }
}
