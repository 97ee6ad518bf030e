// Data parallel equals one process. Run under mpirun -np 2 (CTest does, one OpenMP thread per
// rank): every rank trains the model twice from the same init, once data parallel (its share of
// each batch, gradients summed across the ranks) and once alone on the whole batch, the
// one-process run, and compares the two after every step and at the end. The same with
// train.grad_accum = 2, alone and across the ranks. Under one process (no launcher) the
// data-parallel cases are skipped with a message and the accumulation cases still run.
//
// What "equal" can mean in f32 (docs/distributed.md): the gradients of the first step, from the
// same parameters, must agree within 1e-6 relative per tensor, the routing counts exactly at every
// step. After 20 steps the parameters differ more, because AdamW's first updates are about
// lr g / |g| per element, which turns the rounding of an element whose gradient is near zero into
// a difference of order lr; the one-process run differs from itself in the same way when only its
// thread count changes. So the bound after 20 steps is that control: the split run may be at most
// twice as far from the one-process run as the one-process run on 2 threads is from it on 1.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <omp.h>

#include <rex/dist/gradient_sync.hpp>
#include <rex/rex.hpp>
#include <rex/train/train.hpp>

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

std::vector<Tensor> tensors_of(const optim::AdamW& optimizer) {
  std::vector<Tensor> out;
  for (const optim::Parameter& p : optimizer.parameters()) out.push_back(p.tensor);
  return out;
}

// ||a - b|| / ||b|| per tensor (named); the largest over the list. An undefined tensor (no
// gradient) must be undefined in both.
struct Difference {
  double relative = 0;
  std::string name;
};
Difference largest_difference(const std::vector<Tensor>& a, const std::vector<Tensor>& b,
                              const std::vector<optim::Parameter>& names) {
  Difference worst;
  for (size_t i = 0; i < a.size(); ++i) {
    REQUIRE_MESSAGE(a[i].defined() == b[i].defined(), names[i].name);
    if (!a[i].defined()) continue;
    double diff = 0, norm = 0;
    for (int64_t j = 0; j < a[i].numel(); ++j) {
      const double x = a[i].data<float>()[j], y = b[i].data<float>()[j];
      diff += (x - y) * (x - y);
      norm += y * y;
    }
    const double relative = std::sqrt(diff / std::max(norm, 1e-300));
    if (relative >= worst.relative) worst = {relative, names[i].name};
  }
  return worst;
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

// The one-process run of `config` on `threads` OpenMP threads.
train::TrainingState train_alone(const train::RunConfig& config, int threads) {
  const int before = omp_get_max_threads();
  omp_set_num_threads(threads);
  train::TrainingState run = train::start_training(config, Device::cpu());
  const data::BatchSampler batches = train::train_sampler(corpus(), config);
  const optim::CosineSchedule schedule = train::lr_schedule(config.train);
  for (int64_t step = 0; step < config.train.steps; ++step)
    train::train_step(*run.model, run.optimizer, batches.sample(static_cast<uint64_t>(step)),
                      {step, config.train.seed}, schedule.lr(step), config.train.grad_clip);
  omp_set_num_threads(before);
  return run;
}

// How far the one-process run on 2 threads ends from the same run on 1 (the f32 noise floor).
double thread_count_control(const train::RunConfig& config) {
  static const double control = [&] {
    const train::TrainingState one = train_alone(config, 1), two = train_alone(config, 2);
    const Difference d = largest_difference(tensors_of(two.optimizer), tensors_of(one.optimizer),
                                            one.optimizer.parameters());
    MESSAGE("control: the one-process run on 2 threads vs 1 thread after ", config.train.steps,
            " steps: largest relative parameter difference ", d.relative, " (", d.name, ")");
    return d.relative;
  }();
  return control;
}

// Trains a data-parallel or accumulating run and the one-process run side by side for the
// config's steps: the same gradients at the first step, the same routing and losses at every step,
// and parameters at the end no further apart than the thread-count control.
void check_split_equals_one_process(const train::RunConfig& config, int64_t grad_accum,
                                    bool across_ranks) {
  const train::TrainConfig& t = config.train;
  const data::BatchSampler batches = train::train_sampler(corpus(), config);
  train::TrainingState alone = train::start_training(config, Device::cpu());
  train::TrainingState split_run = train::start_training(config, Device::cpu());
  std::optional<dist::GradientSync> sync;
  if (across_ranks) sync.emplace(Communicator::world(), tensors_of(split_run.optimizer), 1 << 16);
  const train::BatchSplit split{sync ? &*sync : nullptr, grad_accum};
  const optim::CosineSchedule schedule = train::lr_schedule(t);
  for (int64_t step = 0; step < t.steps; ++step) {
    const data::Batch batch = batches.sample(static_cast<uint64_t>(step));
    const nn::RoutingStep at{step, t.seed};
    const float lr = schedule.lr(step);
    std::vector<Tensor> grads_alone, grads_split;
    const train::StepResult one =
        train::train_step(*alone.model, alone.optimizer, batch, at, lr, t.grad_clip, {},
                          copy_gradients(alone.optimizer, grads_alone));
    const train::StepResult parts =
        train::train_step(*split_run.model, split_run.optimizer, batch, at, lr, t.grad_clip, split,
                          copy_gradients(split_run.optimizer, grads_split));
    CAPTURE(step);
    if (step == 0) {  // from the same parameters
      const Difference d =
          largest_difference(grads_split, grads_alone, alone.optimizer.parameters());
      MESSAGE("first step: largest relative gradient difference ", d.relative, " (", d.name, ")");
      CHECK(d.relative <= 1e-6);
    }
    REQUIRE(parts.expert_counts == one.expert_counts);  // the same routing, expert by expert
    CHECK(parts.lm_loss == doctest::Approx(one.lm_loss).epsilon(1e-6));
    CHECK(parts.aux_loss == doctest::Approx(one.aux_loss).epsilon(1e-5));
    CHECK(parts.grad_norm == doctest::Approx(one.grad_norm).epsilon(1e-4));
    CHECK(parts.candidates == one.candidates);
  }
  const Difference worst = largest_difference(
      tensors_of(split_run.optimizer), tensors_of(alone.optimizer), alone.optimizer.parameters());
  MESSAGE("after ", t.steps, " steps: largest relative parameter difference ", worst.relative, " (",
          worst.name, ")");
  CHECK(worst.relative <= std::max(2 * thread_count_control(config), 1e-6));
  // AdamW stepped the same parameters as often: experts that PSR masks get no gradient on any
  // rank and must not step (no decay, no moment update), as in one process.
  int64_t fewest = t.steps;
  const auto state = split_run.optimizer.state();
  for (const auto& [name, value] : alone.optimizer.state()) {
    if (name.size() < 5 || name.substr(name.size() - 5) != ".step") continue;
    fewest = std::min<int64_t>(fewest, value.data<int32_t>()[0]);
    CHECK_MESSAGE(state.at(name).data<int32_t>()[0] == value.data<int32_t>()[0], name);
  }
  CHECK(fewest < t.steps);  // some parameter did go without a gradient
}

bool several_ranks() {
  if (Communicator::world().size() > 1) return true;
  MESSAGE("SKIPPED: one process; run under mpirun -np 2 for the data-parallel cases");
  return false;
}

}  // namespace

TEST_CASE("2 ranks at the global batch equal 1 process (default R4 + PSR, 20 steps)") {
  if (!several_ranks()) return;
  check_split_equals_one_process(tiny_run(corpus()), 1, true);
}

TEST_CASE("grad_accum = 2 on one process equals 1 process") {
  check_split_equals_one_process(tiny_run(corpus()), 2, false);
}

TEST_CASE("2 ranks x grad_accum = 2 equal 1 process") {
  if (!several_ranks()) return;
  check_split_equals_one_process(tiny_run(corpus()), 2, true);
}

TEST_CASE("GradientSync: a gradient present on one rank only is summed there and kept everywhere") {
  if (!several_ranks()) return;
  Communicator& world = Communicator::world();
  Tensor seen = zeros({3}), unseen = zeros({2}), everywhere = zeros({2});
  for (Tensor* p : {&seen, &unseen, &everywhere}) p->requires_grad_();
  dist::GradientSync sync(world, {seen, unseen, everywhere}, /*bucket_bytes=*/8);
  CHECK(sync.buckets() == 3);
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
  dist::GradientSync sync(Communicator::world(), tensors_of(run.optimizer), 1 << 16);
  const train::BatchSplit split{&sync, 1};
  train::train_step(*run.model, run.optimizer, train::train_sampler(corpus(), config).sample(0),
                    {0, config.train.seed}, 1e-3f, 1.0, split);
  MESSAGE(sync.started_during_backward(), " of ", sync.buckets(),
          " buckets started before backward ended");
  CHECK(sync.buckets() > 4);
  CHECK(sync.started_during_backward() >= sync.buckets() / 2);
}
