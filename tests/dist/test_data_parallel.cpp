// Data parallel is exact (docs/distributed.md, "Exact data parallel"). Run under mpirun (CTest runs
// 2 ranks and 4, one OpenMP thread each): every rank trains the model twice from the same init,
// once data parallel (its share of each batch, gradients summed across the ranks) and once alone
// with the whole batch cut into as many micro-batches as the ranks hold in all, and compares the
// two after every step: the same losses, gradient norm and routing, and after 20 steps the same
// bytes in every parameter and optimizer moment. The same with 2 micro-batches per rank. Against
// the unsplit batch, another summation order, only the first step's gradients are compared, with
// a bound derived below. Under one process (no launcher) the data-parallel cases are skipped with
// a message and the one-process cases still run.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <rex/dist/gradient_sync.hpp>
#include <rex/rex.hpp>
#include <rex/train/train.hpp>

#include "../testing.hpp"

namespace {

using namespace rex;
using rex::dist::Communicator;

const std::string kCorpus = std::string(REX_SOURCE_DIR) + "/../shared/data/tinyshakespeare.txt";

// The default ReX R4 + PSR model and recipe, 20 steps (PSR masks 12 of the 16 candidates then).
train::RunConfig tiny_run(const train::Corpus& corpus) {
  train::RunConfig c;
  c.train.steps = 20;
  c.train.warmup = 5;
  train::take_vocab_size(c, corpus);
  return c;
}

const train::Corpus& corpus() {
  static const train::Corpus loaded = train::load_corpus(kCorpus, std::nullopt, 0.9);
  return loaded;
}

// The gradients of the parameters, copied (called through train_step's inspect_gradients).
std::function<void(const nn::LmOutput&)> copy_gradients(const optim::AdamW& optimizer,
                                                        std::vector<Tensor>& into) {
  return [&optimizer, &into](const nn::LmOutput&) {
    into.clear();
    for (const optim::Parameter& p : optimizer.parameters())
      into.push_back(p.tensor.grad().defined() ? p.tensor.grad().clone() : Tensor());
  };
}

// Trains `split` (across the ranks when `across_ranks`, grad_accum micro-batches on each) and the
// one process with `alone_micro` micro-batches side by side from the same init for the config's
// steps; requires the same bytes throughout. `some_expert_starves`: PSR's step-scope masks keep
// some expert from every token of a step (not so with per-token masks).
void check_split_is_exact(const train::RunConfig& config, int64_t grad_accum, bool across_ranks,
                          int64_t alone_micro, bool some_expert_starves = true) {
  const train::TrainConfig& t = config.train;
  const data::BatchSampler batches = train::train_sampler(corpus(), config);
  train::TrainingState alone = train::start_training(config, Device::cpu());
  train::TrainingState split_run = train::start_training(config, Device::cpu());
  std::optional<dist::GradientSync> sync;
  if (across_ranks) sync.emplace(Communicator::world(), split_run.optimizer.tensors(), 1 << 16);
  const train::BatchSplit split{sync ? &*sync : nullptr, grad_accum};
  const optim::CosineSchedule schedule = train::lr_schedule(t);
  for (int64_t step = 0; step < t.steps; ++step) {
    const data::Batch batch = batches.sample(static_cast<uint64_t>(step));
    const nn::RoutingStep at{step, t.seed};
    const float lr = schedule.lr(step);
    const train::StepResult one = train::train_step(*alone.model, alone.optimizer, batch, at, lr,
                                                    t.grad_clip, {nullptr, alone_micro});
    const train::StepResult parts =
        train::train_step(*split_run.model, split_run.optimizer, batch, at, lr, t.grad_clip, split);
    CAPTURE(step);
    REQUIRE(parts.expert_counts == one.expert_counts);
    CHECK(parts.lm_loss == one.lm_loss);
    CHECK(parts.aux_loss == one.aux_loss);
    CHECK(parts.grad_norm == one.grad_norm);
    CHECK(parts.candidates == one.candidates);
  }
  const auto& names = alone.optimizer.parameters();
  const std::vector<Tensor> a = split_run.optimizer.tensors(), b = alone.optimizer.tensors();
  int64_t different = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const bool same = rex::testing::same_bytes(a[i], b[i]);
    different += same ? 0 : 1;
    CHECK_MESSAGE(same, names[i].name, " differs after ", t.steps, " steps");
  }
  const auto split_state = split_run.optimizer.state();
  int64_t fewest = t.steps;
  for (const auto& [name, value] : alone.optimizer.state()) {
    CHECK_MESSAGE(rex::testing::same_bytes(split_state.at(name), value), name);
    if (name.size() > 5 && name.substr(name.size() - 5) == ".step")
      fewest = std::min<int64_t>(fewest, value.data<int32_t>()[0]);
  }
  MESSAGE(Communicator::world().size(), " ranks x ", grad_accum, " vs 1 process x ", alone_micro,
          " micro-batches: ", different, " of ", a.size(), " parameters differ after ", t.steps,
          " steps");
  // Experts that PSR masks get no gradient on any rank and must not step (no decay, no moment
  // update), as in one process: some parameter did go without a gradient.
  if (some_expert_starves) CHECK(fewest < t.steps);
}

// The first step's gradients split as `split` says, against the unsplit batch. Both are the
// gradients of the same mean loss from the same parameters and tokens, computed in other orders:
// each weight gradient is a sum over the batch's n tokens (n k routed slots for an expert), which
// the split run adds shard by shard. Two orders of summing n terms of one sign differ by at most
// 2 gamma_n times their sum, gamma_n = n u / (1 - n u), u = 2^-24 (Higham, section 4.2), and the
// forward passes round alike row by row. The bound per tensor, relative in L2, is 2 gamma_n with
// n = the tokens of the batch times top_k: it holds where the terms do not cancel, and the
// gradients here are within it by far (the message prints the largest).
void check_first_step_gradients(const train::RunConfig& config, int64_t grad_accum,
                                bool across_ranks) {
  const data::BatchSampler batches = train::train_sampler(corpus(), config);
  train::TrainingState alone = train::start_training(config, Device::cpu());
  train::TrainingState split_run = train::start_training(config, Device::cpu());
  std::optional<dist::GradientSync> sync;
  if (across_ranks) sync.emplace(Communicator::world(), split_run.optimizer.tensors());
  const train::BatchSplit split{sync ? &*sync : nullptr, grad_accum};
  std::vector<Tensor> whole, parts;
  const data::Batch batch = batches.sample(0);
  const nn::RoutingStep at{0, config.train.seed};
  const train::StepResult one = train::train_step(*alone.model, alone.optimizer, batch, at, 1e-3f,
                                                  1.0, {}, copy_gradients(alone.optimizer, whole));
  const train::StepResult two =
      train::train_step(*split_run.model, split_run.optimizer, batch, at, 1e-3f, 1.0, split,
                        copy_gradients(split_run.optimizer, parts));
  REQUIRE(two.expert_counts == one.expert_counts);
  const double n = static_cast<double>(batch.inputs.numel() * config.model.moe.top_k);
  const double u = std::ldexp(1.0, -24), bound = 2 * n * u / (1 - n * u);
  double worst = 0;
  std::string worst_name;
  for (size_t i = 0; i < whole.size(); ++i) {
    const std::string& name = alone.optimizer.parameters()[i].name;
    REQUIRE_MESSAGE(whole[i].defined() == parts[i].defined(), name);
    if (!whole[i].defined()) continue;
    double diff = 0, norm = 0;
    for (int64_t j = 0; j < whole[i].numel(); ++j) {
      const double x = parts[i].data<float>()[j], y = whole[i].data<float>()[j];
      diff += (x - y) * (x - y);
      norm += y * y;
    }
    const double relative = std::sqrt(diff / std::max(norm, 1e-300));
    CHECK_MESSAGE(relative <= bound, name, ": ", relative);
    if (relative >= worst) worst = relative, worst_name = name;
  }
  MESSAGE("first step, ", split.ranks(), " ranks x ", grad_accum,
          " micro-batches against the unsplit batch: largest relative gradient difference ", worst,
          " (", worst_name, "); the bound 2 gamma_n = ", bound);
}

bool several_ranks() {
  if (Communicator::world().size() > 1) return true;
  MESSAGE("SKIPPED: one process; run under mpirun -np 2 for the data-parallel cases");
  return false;
}

}  // namespace

TEST_CASE("N ranks equal 1 process with N micro-batches, byte for byte (R4 + PSR, 20 steps)") {
  if (!several_ranks()) return;
  const int64_t ranks = Communicator::world().size();
  check_split_is_exact(tiny_run(corpus()), 1, true, ranks);
}

TEST_CASE("N ranks x 2 micro-batches equal 1 process with 2N micro-batches, byte for byte") {
  if (!several_ranks()) return;
  const int64_t ranks = Communicator::world().size();
  train::RunConfig config = tiny_run(corpus());
  config.train.batch_size = 4 * ranks;  // 2 sequences per micro-batch
  check_split_is_exact(config, 2, true, 2 * ranks);
}

// Per-sequence and per-token masks are drawn at the sequence's index in the whole batch, so the
// ranks' and micro-batches' shares draw the masks of the unsplit batch.
TEST_CASE(
    "with per-token and per-sequence PSR masks, N ranks x 2 micro-batches equal 1 process, "
    "byte for byte") {
  if (!several_ranks()) return;
  const int64_t ranks = Communicator::world().size();
  for (const std::string scope : {"sequence", "token"}) {
    CAPTURE(scope);
    train::RunConfig config = tiny_run(corpus());
    config.train.steps = 3;
    config.train.warmup = 1;
    config.train.batch_size = 4 * ranks;  // 2 sequences per micro-batch
    config.model.psr.mask_scope = scope;
    config.model.psr.tie_block = scope == "token";
    check_split_is_exact(config, 2, true, 2 * ranks, /*some_expert_starves=*/false);
  }
}

TEST_CASE("the first step's gradients, split or not, within the derived bound") {
  const train::RunConfig config = tiny_run(corpus());
  check_first_step_gradients(config, 2, false);
  if (!several_ranks()) return;
  check_first_step_gradients(config, 1, true);
  check_first_step_gradients(config, 2, true);
}

TEST_CASE("GradientSync: a gradient present on one rank only is summed there and kept everywhere") {
  if (!several_ranks()) return;
  Communicator& world = Communicator::world();
  Tensor seen = zeros({3}), unseen = zeros({2}), everywhere = zeros({2});
  for (Tensor* p : {&seen, &unseen, &everywhere}) p->requires_grad_();
  dist::GradientSync sync(world, {seen, unseen, everywhere}, /*bucket_bytes=*/8);
  CHECK(sync.buckets() == 3);
  CHECK(sync.arena_buckets() == 0);  // no optimiser arena: parameter by parameter
  // Rank 0 alone uses `seen`; every rank uses `everywhere`; no rank uses `unseen`.
  const float r = static_cast<float>(world.rank());
  Tensor loss = sum(everywhere * (r + 1.0f));
  if (world.rank() == 0) loss = loss + sum(seen * 2.0f);
  sync.begin();
  rex::detail::run_backward(loss, ones({}), false, sync.hook());
  sync.finish();
  REQUIRE(seen.grad().defined());
  for (int64_t i = 0; i < 3; ++i) CHECK(seen.grad().data<float>()[i] == 2.0f);
  CHECK_FALSE(unseen.grad().defined());
  float expected = 0;  // sum over ranks of (rank + 1)
  for (int k = 0; k < world.size(); ++k) expected += static_cast<float>(k + 1);
  for (int64_t i = 0; i < 2; ++i) CHECK(everywhere.grad().data<float>()[i] == expected);
}

TEST_CASE("GradientSync over an optimiser arena: one range a bucket, the same sums and flags") {
  if (!several_ranks()) return;
  Communicator& world = Communicator::world();
  for (const size_t bucket_bytes : {size_t{8}, size_t{1} << 20}) {
    CAPTURE(bucket_bytes);
    Tensor seen = zeros({3}), unseen = zeros({2}), everywhere = zeros({2});
    for (Tensor* p : {&seen, &unseen, &everywhere}) p->requires_grad_();
    optim::AdamW opt({{"seen", seen}, {"unseen", unseen}, {"everywhere", everywhere}});
    dist::GradientSync sync(world, {seen, unseen, everywhere}, bucket_bytes);
    CHECK(sync.arena_buckets() == sync.buckets());
    const float r = static_cast<float>(world.rank());
    Tensor loss = sum(everywhere * (r + 1.0f));
    if (world.rank() == 0) loss = loss + sum(seen * 2.0f);
    sync.begin();
    rex::detail::run_backward(loss, ones({}), false, sync.hook());
    sync.finish();
    REQUIRE(seen.grad().defined());
    CHECK(seen.grad().shares_storage_with(opt.arena().grads()));
    CHECK(seen.grad().to_vector() == std::vector<float>(3, 2.0f));
    CHECK_FALSE(unseen.grad().defined());
    float expected = 0;
    for (int k = 0; k < world.size(); ++k) expected += static_cast<float>(k + 1);
    CHECK(everywhere.grad().to_vector() == std::vector<float>(2, expected));
    // Padding and the gradient no rank has are still zeros.
    const std::vector<float> buffer = opt.arena().grads().to_vector();
    for (const int64_t i : {3, 15, 16, 17, 34}) CHECK(buffer[static_cast<size_t>(i)] == 0.0f);
  }
}

TEST_CASE("tensor collectives: sum, mean, broadcast; every rank starts from rank 0's state") {
  if (!several_ranks()) return;
  Communicator& world = Communicator::world();
  const float r = static_cast<float>(world.rank()), n = static_cast<float>(world.size());
  Tensor sum_t = full({3}, r + 1.0f), mean_t = full({3}, r + 1.0f), bcast = full({2}, r + 5.0f);
  Tensor counts = from_vector<int32_t>({world.rank(), 1});
  world.all_reduce(sum_t);
  world.all_reduce(mean_t, Communicator::Reduce::mean);
  world.broadcast(bcast);
  world.all_reduce(counts);
  const float total = n * (n + 1) / 2;  // 1 + 2 + ... + n
  for (int64_t i = 0; i < 3; ++i) CHECK(sum_t.data<float>()[i] == total);
  for (int64_t i = 0; i < 3; ++i) CHECK(mean_t.data<float>()[i] == doctest::Approx(total / n));
  for (int64_t i = 0; i < 2; ++i) CHECK(bcast.data<float>()[i] == 5.0f);
  CHECK(counts.data<int32_t>()[1] == world.size());

  // Rank 1's copy of the model and optimizer differs (a stale checkpoint): start_from_rank0 fixes
  // it, and the two agree bit for bit.
  const train::RunConfig config = tiny_run(corpus());
  train::TrainingState run = train::start_training(config, Device::cpu());
  if (world.rank() == 1) {
    run.optimizer.parameters().front().tensor.data<float>()[0] += 1.0f;
    auto state = run.optimizer.state();
    state.begin()->second.data<float>()[0] = 7.0f;
    run.optimizer.load_state(state);
  }
  train::start_from_rank0(world, run);
  const auto state = run.optimizer.state();
  for (const optim::Parameter& p : run.optimizer.parameters()) {
    std::vector<float> mine = p.tensor.to_vector<float>(), root = mine;
    Tensor shared = from_vector<float>(root);
    world.broadcast(shared);
    CHECK_MESSAGE(shared.to_vector<float>() == mine, p.name);
  }
  Tensor first_moment = state.begin()->second.clone();
  world.broadcast(first_moment);
  CHECK(first_moment.to_vector<float>() == state.begin()->second.to_vector<float>());
}

TEST_CASE("GradientSync starts buckets during backward, as their gradients become final") {
  if (!several_ranks()) return;
  const train::RunConfig config = tiny_run(corpus());
  train::TrainingState run = train::start_training(config, Device::cpu());
  dist::GradientSync sync(Communicator::world(), run.optimizer.tensors(), 1 << 16);
  const train::BatchSplit split{&sync, 1};
  train::train_step(*run.model, run.optimizer, train::train_sampler(corpus(), config).sample(0),
                    {0, config.train.seed}, 1e-3f, 1.0, split);
  MESSAGE(sync.started_during_backward(), " of ", sync.buckets(),
          " buckets started before backward ended");
  CHECK(sync.buckets() > 4);
  CHECK(sync.started_during_backward() >= sync.buckets() / 2);
  CHECK(sync.arena_buckets() == sync.buckets());  // each a range of the optimiser's arena
}
