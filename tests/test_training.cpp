// Tests for the model and the training pieces around it: the transformer's parameter names and
// counts (closed forms), its gradients by central differences, config JSON and overrides (errors at
// their line, column and key), checkpoint and model-folder round trips (bit-exact), a short
// fixed-seed training run whose validation loss must fall below the corpus's unigram entropy, and
// the training library's pieces (train_step's gradient hook, the resume and evaluation rules, the
// routing report, sampling, metrics.jsonl, the divergence guard, kept checkpoints, the run folder's
// lock, the corpus and prompt checks), and the refusals of configs that cannot be stored, computed
// with or fitted in memory.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <rex/data/dataset.hpp>
#include <rex/data/tokenizer.hpp>
#include <rex/dist/pairwise_sum.hpp>
#include <rex/optim/schedule.hpp>
#include <rex/train/checkpoint.hpp>
#include <rex/train/config.hpp>
#include <rex/train/corpus.hpp>
#include <rex/train/evaluate.hpp>
#include <rex/train/metrics.hpp>
#include <rex/train/sample.hpp>
#include <rex/train/step.hpp>

#include "gradcheck.hpp"
#include "rounding.hpp"
#include "testing.hpp"

using namespace rex;
using rex::testing::error_message;

namespace {

train::RunConfig tiny_run(const std::string& ffn, int64_t reuse) {
  train::RunConfig c;
  nn::ModelConfig& m = c.model;
  m.vocab_size = 13;
  m.d_model = 16;
  m.n_layers = 4;
  m.n_heads = 4;
  m.n_kv_heads = 2;
  m.context = 12;
  m.ffn = ffn;
  m.d_ff = 24;
  m.moe.experts_per_layer = 3;
  m.moe.top_k = 2;
  m.moe.d_expert = 8;
  m.moe.reuse = reuse;
  m.moe.shared_experts = 1;
  m.moe.z_loss_coef = 1e-3;
  m.psr.t_start = 2;
  m.psr.t_end = 6;
  return c;
}

}  // namespace

TEST_CASE("transformer parameter names mirror the module tree and counts match closed forms") {
  for (const char* ffn : {"dense", "moe"}) {
    for (int64_t reuse : {1, 2, 4}) {
      if (std::string(ffn) == "dense" && reuse > 1) continue;
      CAPTURE(ffn);
      CAPTURE(reuse);
      const train::RunConfig c = tiny_run(ffn, reuse);
      const nn::ModelConfig& m = c.model;
      const nn::TransformerLM model(m, 1);
      std::map<std::string, Shape> shapes;
      for (const auto& [name, p] : model.named_parameters()) shapes[name] = p.shape();
      const int64_t d = m.d_model, kv = m.n_kv_heads * (d / m.n_heads);
      CHECK(shapes.at("embed.weight") == Shape{13, d});
      CHECK(shapes.at("layers.3.attn.k.weight") == Shape{kv, d});
      CHECK(shapes.at("layers.0.attn.o.weight") == Shape{d, d});
      CHECK(shapes.at("layers.2.ffn_norm.weight") == Shape{d});
      CHECK(shapes.count("lm_head.weight") == 0);                // tied
      const int64_t attention = 2 * d * d + 2 * kv * d + 2 * d;  // q, o, k, v, two norms
      int64_t want = 13 * d + d + m.n_layers * attention;
      if (m.ffn == "dense") {
        CHECK(shapes.at("layers.1.ffn.down.weight") == Shape{d, m.d_ff});
        want += m.n_layers * 3 * d * m.d_ff;
      } else {
        const int64_t pool = reuse * 3, expert = 3 * d * m.moe.d_expert;
        CHECK(shapes.at("layers.1.moe.router.weight") == Shape{pool, d});
        CHECK(shapes.at("layers.1.moe.shared.0.up.weight") == Shape{m.moe.d_expert, d});
        CHECK(shapes.at("expert_tables." + std::to_string(4 / reuse - 1) + ".experts." +
                        std::to_string(pool - 1) + ".gate.weight") == Shape{m.moe.d_expert, d});
        CHECK(shapes.count("expert_tables." + std::to_string(4 / reuse) +
                           ".experts.0.gate.weight") == 0);
        // Expert parameters are the same for every r; only the routers grow with r.
        want += 4 * 3 * expert + 4 * pool * d + 4 * expert;
      }
      CHECK(model.parameter_count() == want);
    }
  }
}

TEST_CASE("transformer loss gradients agree with central differences (dense and R2 with PSR)") {
  for (const char* ffn : {"dense", "moe"}) {
    CAPTURE(ffn);
    train::RunConfig c = tiny_run(ffn, 2);
    c.model.d_model = 8;
    c.model.n_heads = 2;
    c.model.n_kv_heads = 1;
    c.model.vocab_size = 7;
    c.model.init_std = 0.3;
    const nn::TransformerLM model(c.model, 2);
    std::map<std::string, Tensor> params;
    for (const auto& [name, p] : model.named_parameters()) params[name] = p;
    std::vector<Tensor> inputs = {params.at("embed.weight"), params.at("layers.1.attn.q.weight"),
                                  params.at("layers.0.attn_norm.weight"), params.at("norm.weight")};
    if (c.model.ffn == "moe") {
      inputs.push_back(params.at("layers.1.moe.router.weight"));
      inputs.push_back(params.at("expert_tables.0.experts.3.down.weight"));
    } else {
      inputs.push_back(params.at("layers.1.ffn.gate.weight"));
    }
    const Tensor ids = from_vector<int32_t>({1, 4, 2, 6, 0, 3, 3, 5, 2, 1}, {2, 5});
    const Tensor targets = from_vector<int32_t>({4, 2, 6, 0, 3, 3, 5, 2, 1, 0}, {2, 5});
    auto f = [&](const std::vector<Tensor>&) {
      return model.forward(ids, targets, {4, 3}).loss;  // step 4: PSR keeps 4 of 6 experts
    };
    // A smaller step so that no routing choice flips between x - h and x + h. The loss is one
    // float value at the end of the whole model's chain (a few hundred roundings): its rounding,
    // typically sqrt(N) u |L| (independent roundings, Higham and Mary 2019), over 2h is about
    // 1e-3, which atol and rtol 2e-2 cover; the worst case gamma_N |L| / h would not be, so this
    // check relies on roundings not conspiring (gradcheck.hpp).
    testing::GradcheckOptions options;
    options.step = 1e-3f;
    options.rtol = 2e-2;
    CHECK_GRADIENTS(f, inputs, options);
  }
}

TEST_CASE("config JSON round trip, overrides, and errors naming the key") {
  train::RunConfig c = tiny_run("moe", 2);
  c.train.seed = 12345678901234ull;
  const train::RunConfig back = train::parse_config(train::to_json(c).dump(), "test");
  CHECK(train::to_json(back) == train::to_json(c));
  train::apply_override(c, "moe.top_k=1");
  train::apply_override(c, "psr.schedule=stepwise");
  train::apply_override(c, "train.lr=2.5e-4");
  train::apply_override(c, "model.tie_embeddings=false");
  CHECK(c.model.moe.top_k == 1);
  CHECK(c.model.psr.schedule == "stepwise");
  CHECK(c.train.lr == 2.5e-4);
  CHECK(!c.model.tie_embeddings);
  auto message = [&](const std::string& text) {
    return error_message([&] { train::parse_config(text, "cfg.json"); });
  };
  CHECK(message("{\"model\": {\"d_model\": 2.5}}").find("model.d_model must be an integer") !=
        std::string::npos);
  CHECK(message("{\"moe\": {\"renormalize\": 1}}").find("moe.renormalize must be true or false") !=
        std::string::npos);
  CHECK(message("{\"train\": {\"lr\": \"fast\"}}").find("train.lr must be a number") !=
        std::string::npos);
  CHECK(message("{\"optimizer\": {}}").find("unknown section \"optimizer\"") != std::string::npos);
  CHECK(message("{\"psr\": {\"t_middle\": 3}}").find("unknown key \"psr.t_middle\"") !=
        std::string::npos);
  CHECK(message("[1, 2]").find("top level must be a JSON object") != std::string::npos);
  CHECK(message("{\"model\": ").find("cfg.json:1:11: model: syntax error") == 0);
  CHECK(message("{\"train\": {\"seed\": -1}}").find("train.seed cannot be negative") !=
        std::string::npos);
  train::RunConfig precision;
  train::apply_override(precision, "train.matmul_precision=tf32");
  CHECK(precision.train.matmul_precision == "tf32");
  train::apply_override(precision, "train.matmul_precision=bf16");
  train::validate(precision);
  train::apply_override(precision, "train.matmul_precision=fp16");
  CHECK(error_message([&] {
          train::validate(precision);
        }).find("train.matmul_precision must be \"fp32\", \"tf32\" or \"bf16\", got \"fp16\"") !=
        std::string::npos);
  CHECK(error_message([&] { train::apply_override(c, "top_k=2"); }).find("section.key=value") !=
        std::string::npos);
  // Integers out of their field's range are errors, never wrapped or undefined conversions.
  CHECK(message("{\"train\": {\"steps\": 1e300}}").find("train.steps is out of range") !=
        std::string::npos);
  CHECK(message("{\"train\": {\"steps\": 9223372036854775808}}").find("train.steps is too large") !=
        std::string::npos);
  CHECK(message("{\"train\": {\"seed\": 1e20}}").find("train.seed is out of range") !=
        std::string::npos);
  train::RunConfig big;
  train::apply_override(big, "train.seed=18446744073709551615");
  CHECK(big.train.seed == 18446744073709551615ull);
  // A model built from an impossible config is refused, not crashed.
  nn::ModelConfig broken = tiny_run("moe", 2).model;
  broken.moe.reuse = 0;
  CHECK(error_message([&] {
          nn::TransformerLM model(broken, 1);
        }).find("moe.reuse must be positive") != std::string::npos);
  broken = tiny_run("moe", 2).model;
  broken.n_layers = 3;
  CHECK(error_message([&] {
          nn::TransformerLM model(broken, 1);
        }).find("must divide model.n_layers") != std::string::npos);
}

TEST_CASE("docs/formats.md lists every config key with its default") {
  const std::string doc = io::read_file(std::string(REX_SOURCE_DIR) + "/docs/formats.md");
  train::RunConfig defaults;
  train::for_each_field(
      defaults, [&](const char* section, const char* key, const auto& value, const char*) {
        const std::string row = std::string("| `") + section + "." + key + "` | `" +
                                nlohmann::json(value).dump() + "` |";
        CHECK_MESSAGE(doc.find(row) != std::string::npos, "docs/formats.md lacks the row ", row);
      });
}

TEST_CASE("checkpoint and model folder round trips are bit-exact") {
  const train::RunConfig config = tiny_run("moe", 2);
  const nn::TransformerLM model(config.model, 3);
  optim::AdamW optimizer(optim::decay_matrices(model.named_parameters()));
  const Tensor ids = from_vector<int32_t>({1, 4, 2, 6, 0, 3, 3, 5}, {2, 4});
  for (int64_t step = 0; step < 2; ++step)  // non-trivial moments
    train::train_step(model, optimizer, {ids, ids}, {step, 0}, 1e-2f, /*grad_clip=*/0);
  const data::CharTokenizer tokenizer = data::CharTokenizer::from_text("abcdefghijklm");
  const testing::TempDir temp("training_roundtrip");
  const std::string dir = temp.path.string();
  train::save_checkpoint(dir, model, optimizer, config, tokenizer, 2, {1234, 99});
  train::save_model_folder(dir, model, config, tokenizer, 2);

  const train::Checkpoint loaded = train::load_checkpoint(dir);
  CHECK(loaded.step == 2);
  CHECK(loaded.info.corpus_bytes == 1234);
  CHECK(loaded.info.corpus_hash == 99);
  CHECK(train::to_json(loaded.config) == train::to_json(config));
  CHECK(loaded.tokenizer->chars()->vocabulary() == tokenizer.vocabulary());
  REQUIRE(loaded.model.size() == model.named_parameters().size());
  for (const auto& [name, p] : model.named_parameters())
    CHECK(testing::same_bytes(loaded.model.at(name), p));
  const auto state = optimizer.state();
  REQUIRE(loaded.optimizer.size() == state.size());
  for (const auto& [name, t] : state) CHECK(testing::same_bytes(loaded.optimizer.at(name), t));

  const train::ModelFolder folder = train::load_model_folder(dir);
  CHECK(folder.step == 2);
  CHECK(train::to_json(folder.config) == train::to_json(config));
  nn::TransformerLM other(config.model, 77);  // different init, then the saved weights
  other.load_parameters(folder.parameters, "folder");
  const Tensor want = model.forward(ids, Tensor(), {5, 0}).logits;
  const Tensor got = other.forward(ids, Tensor(), {5, 0}).logits;
  CHECK(testing::same_bytes(got, want));

  // Loading into a model of another shape, or a file of the other kind, fails with a clear message.
  nn::ModelConfig wider = config.model;
  wider.d_model = 32;
  nn::TransformerLM wrong(wider, 1);
  CHECK(error_message([&] {
          wrong.load_parameters(folder.parameters, "folder");
        }).find("parameter embed.weight has shape [13, 16]") != std::string::npos);
  std::filesystem::copy_file(train::model_path(dir), train::checkpoint_path(dir),
                             std::filesystem::copy_options::overwrite_existing);
  CHECK(error_message([&] { train::load_checkpoint(dir); }).find("not a rex-checkpoint file") !=
        std::string::npos);
}

TEST_CASE("a short fixed-seed training run gets below the corpus's unigram entropy") {
  // A corpus with structure beyond letter frequencies: words from a small vocabulary.
  std::string text;
  const char* words[] = {"alpha ", "beta ", "gamma ", "delta ", "epsilon ", "zeta\n"};
  Generator gen(5);
  while (text.size() < 30000) text += words[gen.below(6)];
  const data::CharTokenizer tokenizer = data::CharTokenizer::from_text(text);
  const data::TokenSplit split = data::split_tokens(tokenizer.encode(text));
  train::RunConfig c = tiny_run("moe", 2);
  c.model.vocab_size = tokenizer.vocab_size();
  c.model.d_model = 32;
  c.model.n_layers = 2;
  c.model.context = 24;
  c.model.psr.t_start = 20;
  c.model.psr.t_end = 80;
  const nn::TransformerLM model(c.model, 1);
  optim::AdamW optimizer(optim::decay_matrices(model.named_parameters()));
  const optim::CosineSchedule schedule{1e-2f, 10, 120, 0.1f};
  const data::BatchSampler train_batches(split.train, 8, c.model.context, 1, "train");
  const data::BatchSampler validation(split.validation, 8, c.model.context, 2, "validation");
  auto val_loss = [&](int64_t step) {
    NoGradGuard no_grad;
    double total = 0;
    for (uint64_t i = 0; i < 4; ++i) {
      const data::Batch b = validation.sample(i);
      total += model.forward(b.inputs, b.targets, {step, 1}).lm_loss.item() / 4;
    }
    return total;
  };
  const double entropy = data::unigram_entropy(split.validation, tokenizer.vocab_size());
  const double before = val_loss(0);
  CHECK(before > entropy);  // an untrained model is near log(V), above the unigram entropy
  for (int64_t step = 0; step < 120; ++step) {
    train::train_step(model, optimizer, train_batches.sample(static_cast<uint64_t>(step)),
                      {step, 1}, schedule.lr(step), 1.0);
  }
  const double after = val_loss(119);
  MESSAGE("validation loss ", before, " -> ", after, ", unigram entropy ", entropy);
  CHECK(after < entropy - 0.3);
}

TEST_CASE("train_step shows the gradients before the update and leaves them cleared") {
  const train::RunConfig c = tiny_run("moe", 2);
  const nn::TransformerLM model(c.model, 1);
  optim::AdamW optimizer = train::make_optimizer(model, c.train);
  Generator gen(3);
  std::vector<int32_t> ids(2 * 12);
  for (int32_t& id : ids) id = static_cast<int32_t>(gen.below(13));
  const data::Batch batch{from_vector(ids, {2, 12}), from_vector(ids, {2, 12})};
  const Tensor before = model.named_parameters().front().second.clone();
  int64_t with_gradient = 0;  // experts that PSR masks out at step 0 get none
  const train::StepResult result = train::train_step(
      model, optimizer, batch, {0, 1}, 1e-2f, 0.5, {}, [&](const nn::LmOutput& out) {
        CHECK(out.loss.defined());
        for (const auto& [name, p] : model.named_parameters()) with_gradient += p.grad().defined();
      });
  CHECK(with_gradient > 0);
  CHECK(result.grad_norm > 0);
  CHECK(result.output.candidates == 3);  // PSR at step 0: N of the rN = 6 candidates
  CHECK_FALSE(testing::same_bytes(before, model.named_parameters().front().second));
  for (const auto& [name, p] : model.named_parameters()) CHECK_FALSE(p.grad().defined());
}

// queue_step leaves a step's losses and norm on the device, read_steps reads any number of steps
// at once: the same values and the same training as train_step, with or without micro-batches.
TEST_CASE("queue_step and read_steps train and report exactly as train_step") {
  for (const int64_t grad_accum : {1, 2}) {
    CAPTURE(grad_accum);
    const train::RunConfig c = tiny_run("moe", 2);
    const nn::TransformerLM model_a(c.model, 1), model_b(c.model, 1);
    optim::AdamW adam_a = train::make_optimizer(model_a, c.train);
    optim::AdamW adam_b = train::make_optimizer(model_b, c.train);
    Generator gen(5);
    std::vector<train::StepResult> direct;
    std::vector<train::QueuedStep> queued;
    for (int64_t step = 0; step < 4; ++step) {
      std::vector<int32_t> ids(4 * 12);
      for (int32_t& id : ids) id = static_cast<int32_t>(gen.below(13));
      const data::Batch batch{from_vector(ids, {4, 12}), from_vector(ids, {4, 12})};
      direct.push_back(
          train::train_step(model_a, adam_a, batch, {step, 1}, 1e-2f, 0.5, {nullptr, grad_accum}));
      queued.push_back(
          train::queue_step(model_b, adam_b, batch, {step, 1}, 1e-2f, 0.5, {nullptr, grad_accum}));
    }
    const std::vector<train::StepResult> read = train::read_steps(std::move(queued));
    REQUIRE(read.size() == direct.size());
    for (size_t i = 0; i < read.size(); ++i) {
      CAPTURE(i);
      CHECK(read[i].loss == direct[i].loss);
      CHECK(read[i].lm_loss == direct[i].lm_loss);
      CHECK(read[i].aux_loss == direct[i].aux_loss);
      CHECK(read[i].aux_loss > 0);
      CHECK(read[i].grad_norm == direct[i].grad_norm);
      CHECK(read[i].candidates == direct[i].candidates);
      CHECK(read[i].expert_counts == direct[i].expert_counts);
    }
    const auto a = model_a.named_parameters(), b = model_b.named_parameters();
    for (size_t i = 0; i < a.size(); ++i) CHECK(testing::same_bytes(a[i].second, b[i].second));
  }
}

TEST_CASE("a resumed run may change only the resumable keys") {
  const train::RunConfig saved = tiny_run("moe", 2);
  const train::RunConfig longer =
      train::resumed_config(saved, {"train.steps=9000", "train.eval_interval=7"});
  CHECK(longer.train.steps == 9000);
  CHECK(longer.train.eval_interval == 7);
  CHECK(error_message([&] {
          train::resumed_config(saved, {"model.d_model=64"});
        }).find("--resume: model.d_model cannot change in a resumed run") != std::string::npos);
  CHECK(error_message([&] {
          train::resumed_config(saved, {"train.lr=1"});
        }).find("train.lr cannot change") != std::string::npos);
}

TEST_CASE("an evaluation of a saved model may change only the evaluation keys") {
  const train::RunConfig saved = tiny_run("moe", 2);
  train::RunConfig more =
      train::evaluation_config(saved, {"train.eval_batches=40", "train.matmul_precision=tf32"});
  CHECK(more.train.eval_batches == 40);
  CHECK(more.train.matmul_precision == "tf32");
  more.train.eval_batches = saved.train.eval_batches;  // nothing else changed
  more.train.matmul_precision = saved.train.matmul_precision;
  CHECK(train::to_json(more) == train::to_json(saved));
  // A key set to its saved value changes nothing and is accepted, as on --resume.
  CHECK(train::evaluation_config(saved, {"model.d_model=" + std::to_string(saved.model.d_model)})
            .model.d_model == saved.model.d_model);
  CHECK(error_message([&] { train::evaluation_config(saved, {"model.d_model=64"}); }) ==
        "--set model.d_model would change the saved model; only train.eval_batches and "
        "train.matmul_precision may be set");
  CHECK(error_message([&] { train::evaluation_config(saved, {"train.seed=7"}); }) ==
        "--set train.seed would change the saved run; only train.eval_batches and "
        "train.matmul_precision may be set");
  // Resumable is not enough: train.steps has no meaning for an evaluation.
  CHECK(error_message([&] {
          train::evaluation_config(saved, {"train.eval_batches=2", "train.steps=9000"});
        }).find("--set train.steps would change the saved run") == 0);
  CHECK(error_message([&] { train::evaluation_config(saved, {"train.eval_batches=0"}); }) ==
        "config: train.eval_batches must be positive, got 0");
}

// Per-sequence and per-token masks are drawn at the sequence's place in the whole batch, so
// micro-batches route as the unsplit batch: the same routed slots per expert (a mask drawn from a
// micro-batch's own numbering would route differently almost everywhere). Forward values differ
// between a split and the unsplit batch at most by rounding, which moves a top-k choice only at a
// near tie: none among these 48 tokens (the counts would differ).
TEST_CASE("per-sequence and per-token PSR masks: micro-batches route as the unsplit batch") {
  for (const std::string scope : {"sequence", "token"}) {
    for (const bool tie_block : {false, true}) {
      CAPTURE(scope);
      CAPTURE(tie_block);
      train::RunConfig c = tiny_run("moe", 2);
      c.model.psr.mask_scope = scope;
      c.model.psr.tie_block = tie_block;
      Generator gen(5);
      std::vector<int32_t> ids(4 * 12), targets(ids.size());
      for (int32_t& id : ids) id = static_cast<int32_t>(gen.below(13));
      for (int32_t& id : targets) id = static_cast<int32_t>(gen.below(13));
      const data::Batch batch{from_vector(ids, {4, 12}), from_vector(targets, {4, 12})};
      std::vector<nn::ExpertCounts> counts;
      for (const int64_t grad_accum : {1, 2, 4}) {
        const nn::TransformerLM model(c.model, 1);
        optim::AdamW optimizer = train::make_optimizer(model, c.train);
        const train::StepResult result =
            train::train_step(model, optimizer, batch, {4, 1}, 1e-2f, 0.5, {nullptr, grad_accum});
        CHECK(result.candidates == 4);  // 3 + floor(3 (4 - 2) / 4) of the 6, ramp from 2 to 6
        counts.push_back(result.expert_counts);
      }
      CHECK(counts[1] == counts[0]);
      CHECK(counts[2] == counts[0]);
    }
  }
}

// A token decoded after a KV cache's n tokens is position n of its text: it draws the mask of that
// position, as in a forward pass over the whole text. Each row of the two agrees within the
// model's rounding bound (2 gamma_N, tests/rounding.hpp); a token routed by another position's
// mask would differ by a whole expert's output.
TEST_CASE("per-token PSR masks when decoding: a cached token keeps its position in the text") {
  train::RunConfig c = tiny_run("moe", 2);
  c.model.psr.mask_scope = "token";
  const nn::TransformerLM model(c.model, 2);
  const std::vector<int32_t> ids{3, 1, 4, 1, 5, 9, 2, 6};
  const nn::RoutingStep at{4, 1};  // N_t = 4 of the pool of 6
  NoGradGuard no_grad;
  const Tensor full = model.forward(from_vector(ids, {1, 8}), Tensor(), at).logits;
  nn::KvCache cache;
  std::vector<Tensor> rows{model.decode(
      from_vector(std::vector<int32_t>(ids.begin(), ids.begin() + 3), {1, 3}), cache, at)};
  for (size_t i = 3; i < ids.size(); ++i)
    rows.push_back(model.decode(from_vector(std::vector<int32_t>{ids[i]}, {1, 1}), cache, at));
  const double bound = 2 * testing::gamma_n(testing::model_chain(c.model, 8).logits);
  CHECK(testing::relative_error(concat(rows, 0), full) <= bound);
}

TEST_CASE("the routing report splits each layer's routed slots into own and borrowed experts") {
  nn::MoeConfig m;
  m.experts_per_layer = 2;
  m.reuse = 2;
  // Layer 0 owns pool experts 0, 1; layer 1 owns 2, 3 (one block of two layers).
  const nn::ExpertCounts counts = {{3, 1, 0, 4}, {0, 0, 0, 0}};
  const std::vector<nn::LayerRouting> report = nn::routing_report(m, counts);
  REQUIRE(report.size() == 2);
  CHECK(report[0].own_experts == std::vector<int64_t>{0, 1});
  CHECK(report[0].share == std::vector<double>{0.375, 0.125, 0.0, 0.5});
  CHECK(report[0].own_share == 0.5);
  CHECK(report[0].borrowed_share == 0.5);
  CHECK(report[1].block == 0);
  CHECK(report[1].own_experts == std::vector<int64_t>{2, 3});
  CHECK(report[1].own_share == 0.0);  // nothing routed: every share is 0
  // Spread: entropy -sum s ln s, imbalance P max s, top-N experts (N = 2), overlap in the block.
  // Double arithmetic on exact shares: a few double roundings, far inside Approx's default.
  CHECK(report[0].entropy == doctest::Approx(-(0.375 * std::log(0.375) + 0.125 * std::log(0.125) +
                                               0.5 * std::log(0.5))));
  CHECK(report[0].imbalance == doctest::Approx(4 * 0.5));
  CHECK(report[0].top_experts == std::vector<int64_t>{0, 3});
  CHECK(report[1].entropy == 0.0);
  CHECK(report[1].top_experts == std::vector<int64_t>{0, 1});       // all tied at 0: lowest indices
  CHECK(report[0].jaccard == std::vector<double>{1.0, 1.0 / 3.0});  // {0,3} vs {0,1}: 1 of 3
  CHECK(report[1].jaccard == std::vector<double>{1.0 / 3.0, 1.0});
}

TEST_CASE("the routing report's overlap is per block: layers of other blocks are not compared") {
  nn::MoeConfig m;
  m.experts_per_layer = 1;
  m.reuse = 1;  // vanilla: every layer its own block
  const std::vector<nn::LayerRouting> report = nn::routing_report(m, {{5}, {2}});
  REQUIRE(report.size() == 2);
  CHECK(report[0].jaccard == std::vector<double>{1.0});
  CHECK(report[1].block == 1);
  CHECK(report[0].imbalance == 1.0);
  CHECK(report[0].entropy == 0.0);
}

TEST_CASE("sampling: temperature 0 is the arg max, and a seeded draw repeats") {
  const std::vector<float> logits = {0.5f, 3.0f, -1.0f, 2.5f};
  Generator gen(1);
  CHECK(train::sample_token(logits.data(), 4, 0.0, gen) == 1);
  std::vector<int32_t> first, second;
  Generator a(7), b(7);
  for (int i = 0; i < 50; ++i) {
    first.push_back(train::sample_token(logits.data(), 4, 1.0, a));
    second.push_back(train::sample_token(logits.data(), 4, 1.0, b));
  }
  CHECK(first == second);
  CHECK(std::count(first.begin(), first.end(), 2) < 5);  // p = 0.02 at temperature 1
}

TEST_CASE("metrics.jsonl drops the lines past the checkpoint when a run resumes") {
  const testing::TempDir dir("metrics");
  const std::string path = (dir.path / "metrics.jsonl").string();
  {
    train::MetricsLog log(path, std::nullopt);
    for (int64_t step = 1; step <= 5; ++step) log.log_eval(step, 1.0);
  }
  {
    train::MetricsLog log(path, 3);
    log.log_eval(4, 2.0);
  }
  CHECK(io::read_file(path) ==
        "{\"kind\":\"eval\",\"step\":1,\"val_loss\":1.0}\n"
        "{\"kind\":\"eval\",\"step\":2,\"val_loss\":1.0}\n"
        "{\"kind\":\"eval\",\"step\":3,\"val_loss\":1.0}\n"
        "{\"kind\":\"eval\",\"step\":4,\"val_loss\":2.0}\n");
}

TEST_CASE(
    "config refusals: text that is not UTF-8, repeated keys, numbers beyond double range, "
    "each at its line, column and key") {
  auto message = [&](const std::string& text) {
    return error_message([&] { train::parse_config(text, "cfg.json"); });
  };
  CHECK(message("{\"psr\": {\"schedule\": \"lin\xE9"
                "ar\"}}")
            .find("cfg.json:1:27: psr.schedule: syntax error while parsing value - invalid "
                  "string: ill-formed UTF-8 byte") == 0);
  CHECK(message("{\"model\": {\"init_std\": 1e999}}") ==
        "cfg.json:1:24: model.init_std: number overflow parsing '1e999'");
  CHECK(message("{\"moe\": {\"top_k\": 1, \"top_k\": 2}}") ==
        "cfg.json:1:22: moe.top_k: key appears twice in one object");
  CHECK(message("{\"moe\": {},\n \"moe\": {}}") ==
        "cfg.json:2:2: moe: key appears twice in one object");
  // The same key in two sections is no repeat.
  CHECK(train::parse_config("{\"model\": {\"d_model\": 64}, \"train\": {\"seed\": 64}}", "ok.json")
            .model.d_model == 64);
  // A --set value that starts as JSON does is parsed as strictly, its errors naming the key and
  // the column in the value; any other value is a plain string.
  train::RunConfig c;
  auto set_message = [&](const std::string& assignment) {
    return error_message([&] { train::apply_override(c, assignment); });
  };
  CHECK(set_message("train.lr=1e999") == "--set train.lr:1:1: number overflow parsing '1e999'");
  CHECK(set_message("train.lr=3e-3,") ==
        "--set train.lr:1:5: syntax error while parsing value - unexpected ','; expected end of "
        "input");
  CHECK(set_message("model.ffn=\"dense").find("--set model.ffn:1:7: syntax error") == 0);
  CHECK(set_message("train.lr=fast") ==
        "config: train.lr must be a number, got \"fast\"");  // a plain string
  train::apply_override(c, "train.lr= 2e-3 ");
  train::apply_override(c, "psr.schedule=\"stepwise\"");
  train::apply_override(c, "train.matmul_precision=tf32");
  CHECK(c.train.lr == 2e-3);
  CHECK(c.model.psr.schedule == "stepwise");
  CHECK(c.train.matmul_precision == "tf32");
  CHECK(error_message([&] {
          train::apply_override(c, "psr.schedule=linear\xFF");
        }).find("--set psr.schedule: the value is not valid UTF-8") != std::string::npos);
  CHECK(error_message([&] {
          train::apply_override(c, "psr.sch\xC3=linear");
        }).find("--set: the key is not valid UTF-8") != std::string::npos);
  // JSON built in code may hold any bytes: they are refused, and shown without dump() throwing.
  nlohmann::json patch;
  patch["psr"]["schedule"] = std::string("\xC3");
  CHECK(error_message([&] {
          train::apply_json(c, patch);
        }).find("psr.schedule is not valid UTF-8 text") != std::string::npos);
  patch = nlohmann::json::object();
  patch["model"]["d_model"] = std::string("\xC3");
  CHECK(error_message([&] {
          train::apply_json(c, patch);
        }).find("model.d_model must be an integer, got \"\xEF\xBF\xBD\"") != std::string::npos);
}

TEST_CASE("config refusals: every string key and every float-valued number, whatever model.ffn") {
  auto refusal = [](auto&& change) {
    train::RunConfig c = tiny_run("dense", 1);
    change(c);
    return error_message([&] { train::validate(c); });
  };
  // psr and moe keys have no effect on a dense model, but a bad value is still a mistake.
  CHECK(refusal([](train::RunConfig& c) {
          c.model.psr.schedule = "cosine";
        }).find("psr.schedule must be \"none\", \"linear\" or \"stepwise\"") != std::string::npos);
  CHECK(refusal([](train::RunConfig& c) {
          c.model.psr.schedule = "\xFF";
        }).find("psr.schedule is not valid UTF-8 text") != std::string::npos);
  CHECK(refusal([](train::RunConfig& c) {
          c.model.ffn = "dense\xC3";
        }).find("model.ffn is not valid UTF-8 text") != std::string::npos);
  CHECK(refusal([](train::RunConfig& c) {
          c.train.matmul_precision = "\xE2\x82";
        }).find("train.matmul_precision is not valid UTF-8 text") != std::string::npos);
  CHECK(refusal([](train::RunConfig& c) {
          c.model.init_std = 1e300;
        }).find("model.init_std = 1e+300 is not a finite number within float range") !=
        std::string::npos);
  CHECK(refusal([](train::RunConfig& c) {
          c.model.rope_theta = 1e300;
        }).find("model.rope_theta = 1e+300") != std::string::npos);
  CHECK(refusal([](train::RunConfig& c) {
          c.model.moe.aux_loss_coef = 1e300;
        }).find("moe.aux_loss_coef = 1e+300") != std::string::npos);
  CHECK(refusal([](train::RunConfig& c) {
          c.train.lr = std::numeric_limits<double>::infinity();
        }).find("train.lr = inf") != std::string::npos);
  CHECK(refusal([](train::RunConfig& c) {
          c.train.grad_clip = std::nan("");
        }).find("train.grad_clip = nan") != std::string::npos);
  CHECK(refusal([](train::RunConfig&) {}) == "(no rex::Error thrown)");
  // After validation the config always dumps (it did not: a bad string crashed the first
  // checkpoint).
  CHECK(train::to_json(tiny_run("moe", 2)).dump().size() > 0);
}

TEST_CASE("is_valid_utf8: well-formed sequences only") {
  using rex::detail::is_valid_utf8;
  CHECK(is_valid_utf8(""));
  CHECK(is_valid_utf8("plain ASCII\n"));
  CHECK(is_valid_utf8("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80"));  // é, €, an emoji
  CHECK(!is_valid_utf8("\xC3"));                                      // truncated
  CHECK(!is_valid_utf8("\xA9"));                                      // stray continuation byte
  CHECK(!is_valid_utf8("\xC0\xAF"));                                  // overlong '/'
  CHECK(!is_valid_utf8("\xED\xA0\x80"));                              // a UTF-16 surrogate
  CHECK(!is_valid_utf8("\xF4\x90\x80\x80"));                          // above U+10FFFF
  CHECK(!is_valid_utf8("\xFF"));
  CHECK(!is_valid_utf8("\xE2\x28\xA1"));  // bad continuation
}

TEST_CASE("memory estimate: the exact parameter count, and an oversize model refused with keys") {
  for (const char* ffn : {"dense", "moe"}) {
    for (int64_t reuse : {1, 2, 4}) {
      for (bool tied : {true, false}) {
        if (std::string(ffn) == "dense" && reuse > 1) continue;
        CAPTURE(ffn);
        CAPTURE(reuse);
        CAPTURE(tied);
        train::RunConfig c = tiny_run(ffn, reuse);
        c.model.tie_embeddings = tied;
        const train::MemoryEstimate e = train::estimate_training_memory(c.model, 4);
        CHECK(e.parameters == static_cast<double>(nn::TransformerLM(c.model, 1).parameter_count()));
        CHECK(e.parameter_bytes == 4 * e.parameters);
        CHECK(e.optimizer_bytes == 2 * e.parameter_bytes);
        CHECK(e.activation_bytes > 0);
        CHECK(e.total_bytes() > 4 * e.parameter_bytes);
      }
    }
  }
  // The closed form of tiny_run("moe", 2) (d = 16, 4 layers, kv width 8, N = 3, r = 2, one shared
  // expert of width 8, vocabulary 13, tied): embeddings, attention + norms, experts, routers.
  const double d = 16, kv = 8, expert = 3 * d * 8;
  const double want =
      13 * d + d + 4 * (2 * d * d + 2 * kv * d + 2 * d) + 4 * (3 + 1) * expert + 4 * (2 * 3) * d;
  CHECK(train::estimate_training_memory(tiny_run("moe", 2).model, 1).parameters == want);
  // A vocabulary from the data (0) is counted as the largest byte vocabulary.
  train::RunConfig from_data = tiny_run("dense", 1);
  from_data.model.vocab_size = 0;
  CHECK(train::estimate_training_memory(from_data.model, 1).parameters ==
        train::estimate_training_memory(tiny_run("dense", 1).model, 1).parameters + (256 - 13) * d);

  train::RunConfig huge;
  huge.model.moe.experts_per_layer = 1000000;
  const std::string message = error_message([&] { train::validate(huge); });
  CHECK(message.find("GiB of memory of this machine") != std::string::npos);
  CHECK(message.find("mostly the experts (model.n_layers x (moe.experts_per_layer") !=
        std::string::npos);
  CHECK(message.find("train.batch_size x model.context") != std::string::npos);
  // A limit below the default model's needs refuses it too; the machine's memory does not.
  const train::RunConfig defaults;
  CHECK(error_message([&] {
          train::check_fits_in_memory(defaults.model, defaults.train.batch_size, 1e6);
        }).find("more than the ") != std::string::npos);
  train::check_fits_in_memory(defaults.model, defaults.train.batch_size);
  CHECK(train::physical_memory_bytes() > 0);
}

TEST_CASE(
    "the divergence guard: non-finite or far above the run's best stops, a normal run never") {
  train::TrainConfig t;  // divergence_factor 3
  const double ln_vocab = std::log(65.0);
  train::DivergenceGuard normal(t, 65);
  for (int step = 1; step <= 200; ++step) {  // a falling loss with noise, starting at ln(vocab)
    normal.record(ln_vocab * std::exp(-step / 60.0) + 1.2 + 0.3 * std::sin(step));
    CHECK_NOTHROW(normal.check(step, std::nullopt));
  }
  // The limit starts at 3 x ln(vocab): a loss of 3.5 x ln(vocab) at once stops the run.
  train::DivergenceGuard at_once(t, 65);
  at_once.record(3.5 * ln_vocab);
  const std::string message = error_message([&] { at_once.check(1, 0); });
  CHECK(message.find("training diverged at step 1") != std::string::npos);
  CHECK(message.find("learning rate too high (train.lr = 0.003)") != std::string::npos);
  CHECK(message.find("the checkpoint of step 0 is kept") != std::string::npos);
  // After the loss has fallen to 1, a 10-step mean above 3 stops it; a non-finite loss always does.
  train::DivergenceGuard fallen(t, 65);
  for (int i = 0; i < 10; ++i) fallen.record(1.0);
  for (int i = 0; i < 10; ++i) fallen.record(3.2);
  CHECK(error_message([&] { fallen.check(20, 10); }).find("the limit is train.divergence_factor") !=
        std::string::npos);
  train::DivergenceGuard not_finite(t, 65);
  not_finite.record(std::nan(""));
  CHECK(error_message([&] {
          not_finite.check(1, std::nullopt);
        }).find("no checkpoint had been written yet") != std::string::npos);
  t.divergence_factor = 0;  // no limit, but still no NaN
  train::DivergenceGuard unlimited(t, 65);
  unlimited.record(1e30);
  CHECK_NOTHROW(unlimited.check(1, std::nullopt));
  unlimited.record(std::numeric_limits<double>::infinity());
  CHECK_THROWS(unlimited.check(2, std::nullopt));
}

TEST_CASE("a run folder keeps the last train.keep_checkpoints checkpoints, newest in place") {
  const train::RunConfig config = tiny_run("dense", 1);
  const nn::TransformerLM model(config.model, 3);
  const optim::AdamW optimizer(optim::decay_matrices(model.named_parameters()));
  const data::CharTokenizer tokenizer = data::CharTokenizer::from_text("abcdefghijklm");
  const testing::TempDir temp("kept_checkpoints");
  const std::string dir = temp.path.string();
  auto kept_steps = [&] {
    std::vector<int64_t> steps;
    for (const auto& [step, path] : train::kept_checkpoints(dir)) steps.push_back(step);
    return steps;
  };
  {
    train::RunSaver saver =
        train::prepare_run_folder(train::lock_run_folder(dir), config, 3, std::nullopt, false);
    for (int64_t step : {10, 20, 30, 40}) saver.save(model, optimizer, config, tokenizer, step, {});
    CHECK(saver.newest() == 40);
  }
  CHECK(train::load_checkpoint(dir).step == 40);
  CHECK(kept_steps() == std::vector<int64_t>{20, 30});
  CHECK(error_message([&] {
          train::prepare_run_folder(train::lock_run_folder(dir), config, 3, std::nullopt, false);
        }).find("already holds a run") != std::string::npos);
  // Resuming from step 40 and saving 50 keeps 40; a new run (--overwrite) drops the old run's.
  train::prepare_run_folder(train::lock_run_folder(dir), config, 3, 40, false)
      .save(model, optimizer, config, tokenizer, 50, {});
  CHECK(kept_steps() == std::vector<int64_t>{30, 40});
  train::prepare_run_folder(train::lock_run_folder(dir), config, 3, std::nullopt, true)
      .save(model, optimizer, config, tokenizer, 5, {});
  CHECK(kept_steps().empty());
  // A refused newest checkpoint names the kept ones to go back to.
  train::prepare_run_folder(train::lock_run_folder(dir), config, 2, 5, false)
      .save(model, optimizer, config, tokenizer, 6, {});
  io::write_file_atomic(train::checkpoint_path(dir), "torn");
  const std::string message = error_message([&] { train::load_resume_checkpoint(dir); });
  CHECK(message.find("checkpoint-5.safetensors (step 5)") != std::string::npos);
}

TEST_CASE("a run resumed in place with a longer schedule keeps a model folder that loads") {
  train::RunConfig config = tiny_run("dense", 1);
  const nn::TransformerLM model(config.model, 3);
  const optim::AdamW optimizer(optim::decay_matrices(model.named_parameters()));
  const data::CharTokenizer tokenizer = data::CharTokenizer::from_text("abcdefghijklm");
  const testing::TempDir temp("resume_in_place");
  const std::string dir = temp.path.string();
  train::prepare_run_folder(train::lock_run_folder(dir), config, 2, std::nullopt, false)
      .save(model, optimizer, config, tokenizer, 4, {});
  // --resume DIR --steps 9, stopped (killed) before its next save: config.json must still be the
  // one model.safetensors records, or the folder would be refused as edited.
  config.train.steps = 9;
  train::prepare_run_folder(train::lock_run_folder(dir), config, 2, 4, false);
  CHECK(train::load_model_folder(dir).config.train.steps == tiny_run("dense", 1).train.steps);
}

TEST_CASE("a run folder has one writer: a second lock is refused naming the holder") {
  const train::RunConfig config = tiny_run("dense", 1);
  const testing::TempDir temp("run_folder_lock");
  const std::string dir = temp.file("run"), lock_file = dir + "/.lock";
  const std::string holder = std::to_string(::getpid()) + " " + rex::detail::host_name();
  {
    const train::RunSaver saver =
        train::prepare_run_folder(train::lock_run_folder(dir), config, 2, std::nullopt, false);
    CHECK(io::read_file(lock_file) == holder + "\n");
    const std::string config_json = io::read_file(dir + "/config.json");
    // flock locks an open file, so a second lock in this process is refused like another one's.
    CHECK(error_message([&] { train::lock_run_folder(dir); }) ==
          "run folder " + dir + " is in use by PID " + std::to_string(::getpid()) + " on host " +
              rex::detail::host_name() + " (lock file " + lock_file +
              "); wait for it to finish or stop it");
    CHECK(io::read_file(lock_file) == holder + "\n");
    CHECK(io::read_file(dir + "/config.json") == config_json);
  }
  CHECK_NOTHROW(train::lock_run_folder(dir));  // released with the RunSaver that held it
  // A holder that has not written its line yet is "another process".
  CHECK(rex::detail::describe_lock_holder("") == "another process");
  CHECK(rex::detail::describe_lock_holder("77 node-3\n") == "PID 77 on host node-3");
  CHECK(error_message([&] {
          io::RunFolderLock missing(temp.file("missing"));
        }).find("folder " + temp.file("missing") + " does not exist") != std::string::npos);
}

TEST_CASE("a corpus must be a regular text file, and a prompt must be in its vocabulary") {
  const testing::TempDir dir("corpus_checks");
  const std::string binary = (dir.path / "binary.bin").string();
  io::write_file_atomic(binary, std::string("ab\0cd", 5));
  CHECK(error_message([&] { train::read_corpus_text(binary); }).find("NUL byte at offset 2") !=
        std::string::npos);
  CHECK(error_message([&] {
          train::read_corpus_text(dir.path.string());
        }).find("is not a regular file") != std::string::npos);
  CHECK(error_message([&] {
          train::read_corpus_text("/dev/zero");
        }).find("is not a regular file") != std::string::npos);
  const data::CharTokenizer tokenizer = data::CharTokenizer::from_text("abc");
  CHECK_NOTHROW(train::check_prompt(tokenizer, "cab"));
  CHECK(error_message([&] { train::check_prompt(tokenizer, "abz"); }).find("--prompt") !=
        std::string::npos);
  CHECK(error_message([&] { train::check_prompt(tokenizer, ""); }).find("must not be empty") !=
        std::string::npos);
}

TEST_CASE("a validation loss that is not finite is an error, not a number") {
  const train::RunConfig config = tiny_run("dense", 1);
  const nn::TransformerLM model(config.model, 3);
  const data::BatchSampler sampler({1, 4, 2, 6, 0, 3, 3, 5, 7, 8, 9, 10, 11, 12, 1, 2, 3, 4}, 2, 4,
                                   1, "validation");
  CHECK(std::isfinite(
      train::evaluate(model, sampler, 2, train::after_steps(1, 1), Device::cpu()).val_loss));
  Tensor weight = model.named_parameters().front().second;
  weight.data<float>()[0] = std::nanf("");
  CHECK(error_message([&] {
          train::evaluate(model, sampler, 2, train::after_steps(1, 1), Device::cpu());
        }).find("the validation loss over 2 batches is nan") != std::string::npos);
}

TEST_CASE("PairwiseSum adds in its fixed tree; ShardGradients sums micro-batches in that tree") {
  // The tree of rex/dist/pairwise_sum.hpp for 1 to 7 values, written out; the values make every
  // other order give another double (1 + 1e16 rounds to 1e16).
  const std::vector<double> v = {1, 1e16, -1e16, 1, 3, -1e16, 7};
  const double a = v[0], b = v[1], c = v[2], d = v[3], e = v[4], f = v[5], g = v[6];
  const std::vector<double> expected = {a,
                                        a + b,
                                        (a + b) + c,
                                        (a + b) + (c + d),
                                        ((a + b) + (c + d)) + e,
                                        ((a + b) + (c + d)) + (e + f),
                                        ((a + b) + (c + d)) + ((e + f) + g)};
  for (size_t n = 1; n <= v.size(); ++n) {
    CAPTURE(n);
    const std::vector<double> first(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(n));
    CHECK(dist::pairwise_sum(first, std::plus<>()) == expected[n - 1]);
  }
  CHECK((a + b) + (c + d) != ((a + b) + c) + d);  // the left fold would give 1, the tree 0

  // Four micro-batches: p's gradient is 1, 1e8, -1e8, 1 in turn, which the tree adds to 0 in f32
  // (the left fold: 1); q gets -0 from the third alone, and a shard without it adds zeros, so +0;
  // r gets no gradient anywhere and keeps none.
  Tensor p = zeros({2}), q = zeros({2}), r = zeros({2});
  for (Tensor* t : {&p, &q, &r}) t->requires_grad_();
  dist::ShardGradients shards({p, q, r});
  const std::vector<float> scale = {1.0f, 1e8f, -1e8f, 1.0f};
  for (size_t m = 0; m < scale.size(); ++m) {
    Tensor loss = sum(p * scale[m]);
    if (m == 2) loss = loss + sum(q * -0.0f);
    loss.backward();
    if (m + 1 < scale.size()) shards.take();
  }
  shards.fold_all();
  REQUIRE(p.grad().defined());
  CHECK(p.grad().to_vector<float>() == std::vector<float>{0.0f, 0.0f});
  REQUIRE(q.grad().defined());
  for (const float x : q.grad().to_vector<float>()) CHECK_FALSE(std::signbit(x));
  CHECK_FALSE(r.grad().defined());
  shards.fold_all();  // a second fold changes nothing
  CHECK(p.grad().to_vector<float>() == std::vector<float>{0.0f, 0.0f});
}
