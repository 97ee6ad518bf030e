// Tests for rex/optim: AdamW against PyTorch's update rule recomputed in double here (one step in
// closed form, several steps with a naive loop), checkpoint round trips that must continue
// bit-exactly, the cosine schedule against its closed forms, gradient clipping against
// hand-computed norms, and every error case.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <numbers>
#include <string>
#include <vector>

#include <rex/backend/cpu/arrays.hpp>
#include <rex/optim/adamw.hpp>
#include <rex/optim/arena.hpp>
#include <rex/optim/clip.hpp>
#include <rex/optim/schedule.hpp>

#include "rounding.hpp"
#include "testing.hpp"

using namespace rex;
using rex::optim::AdamW;
using rex::optim::AdamWOptions;
using rex::optim::CosineSchedule;
using rex::optim::Parameter;
using rex::testing::check_close;
using rex::testing::error_message;

namespace {

Tensor param(const std::vector<float>& values, const Shape& shape) {
  return from_vector<float>(values, shape).requires_grad_();
}

// Replaces p's gradient by exactly `values` (backward from a leaf copies the given gradient).
void set_grad(Tensor p, const std::vector<float>& values) {
  p.zero_grad();
  p.backward(from_vector<float>(values, p.shape()));
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// torch.optim.AdamW's update for one tensor, in double, written out from the formula. Alongside,
// a running bound on how far rex's float computation can be from it (Higham's running error
// analysis): m takes 4 roundings a step (the two products, the add, 1 - beta1 in float), relative
// to its terms' magnitude m_terms; v 5; the step lr m^ / (sqrt(v^) + eps) carries m's error and
// half v's relative error through the square root plus 7 roundings of its own (the bias
// corrections, sqrt, eps, the division, the scalar); the decay 2 and the final add u |p|.
struct ReferenceAdamW {
  std::vector<double> p, m, v, m_terms, p_err, m_err, v_err;
  int step = 0;

  explicit ReferenceAdamW(const std::vector<float>& initial)
      : p(to_double(initial)),
        m(initial.size(), 0.0),
        v(initial.size(), 0.0),
        m_terms(initial.size(), 0.0),
        p_err(initial.size(), 0.0),
        m_err(initial.size(), 0.0),
        v_err(initial.size(), 0.0) {}

  void update(const std::vector<float>& grad, double lr, const AdamWOptions& o, bool decay) {
    ++step;
    const double b1 = o.beta1, b2 = o.beta2, eps = o.eps;
    const double wd = decay ? static_cast<double>(o.weight_decay) : 0.0;
    for (size_t i = 0; i < p.size(); ++i) {
      using rex::testing::gamma_n;
      const double g = grad[i];
      p_err[i] = p_err[i] * (1.0 - lr * wd) + gamma_n(2) * std::abs(p[i]);
      p[i] *= 1.0 - lr * wd;
      m[i] = b1 * m[i] + (1.0 - b1) * g;
      m_terms[i] = b1 * m_terms[i] + (1.0 - b1) * std::abs(g);
      m_err[i] = b1 * m_err[i] + gamma_n(4) * m_terms[i];
      v[i] = b2 * v[i] + (1.0 - b2) * g * g;
      v_err[i] = b2 * v_err[i] + gamma_n(5) * v[i];
      const double bc1 = 1.0 - std::pow(b1, step), bc2 = 1.0 - std::pow(b2, step);
      const double m_hat = m[i] / bc1, v_hat = v[i] / bc2, denom = std::sqrt(v_hat) + eps;
      const double sqrt_err = v[i] > 0 ? std::sqrt(v_hat) * v_err[i] / (2 * v[i]) : 0.0;
      p[i] -= lr * m_hat / denom;
      p_err[i] += lr * ((m_err[i] + gamma_n(7) * m_terms[i]) / bc1 / denom +
                        std::abs(m_hat) * sqrt_err / (denom * denom)) +
                  rex::testing::kUnitRoundoff * std::abs(p[i]);
    }
  }
};

// |got - want| <= 2 u |want|: relative, since learning rates are small numbers. The schedule
// rounds its double result to float once (u); the tests' min ratio 0.1 differs from 0.1f by
// 1.5e-8 relative (below u).
void check_relative(float got, double want) {
  CHECK_MESSAGE(std::abs(got - want) <= 2 * rex::testing::kUnitRoundoff * std::abs(want), "got ",
                got, ", want ", want);
}

// |got - want| <= bound element by element.
void check_bound(const Tensor& got, const std::vector<double>& want,
                 const std::vector<double>& bound) {
  const std::vector<float> g = got.to_vector();
  REQUIRE(g.size() == want.size());
  for (size_t i = 0; i < g.size(); ++i)
    CHECK_MESSAGE(std::abs(g[i] - want[i]) <= bound[i], "element ", i, ": got ", g[i], ", want ",
                  want[i], ", bound ", bound[i]);
}

}  // namespace

// ---- AdamW
// ---------------------------------------------------------------------------------------

TEST_CASE("AdamW: one step matches the closed form, with and without decay") {
  // After one step m / (1 - beta1) = g and sqrt(v / (1 - beta2)) = |g|, so
  //   p1 = p0 * (1 - lr * wd) - lr * g / (|g| + eps).
  // g = 1e-8 = eps makes the fraction exactly 1/2: it pins eps outside the square root and after
  // the bias correction (sqrt(v + eps) or (sqrt(v) + eps) / sqrt(1 - beta2) give other values).
  const std::vector<float> p0 = {0.5f, -1.0f, 2.0f, 0.25f, -0.75f, 1.5f};
  const std::vector<float> g = {0.3f, -2.0f, 1e-8f, 0.0f, -1e-8f, 5.0f};
  Tensor w = param(p0, {2, 3}), b = param(p0, {2, 3}), frozen = param(p0, {2, 3});
  AdamW opt({{"w", w}, {"b", b, false}, {"frozen", frozen}});
  set_grad(w, g);
  set_grad(b, g);
  const double lr = 0.01, wd = 0.1, eps = static_cast<double>(1e-8f);
  opt.step(static_cast<float>(lr));

  std::vector<double> want_w, want_b, want_m, want_v;
  for (size_t i = 0; i < p0.size(); ++i) {
    const double gi = g[i], fraction = gi / (std::abs(gi) + eps);
    want_w.push_back(p0[i] * (1.0 - lr * wd) - lr * fraction);
    want_b.push_back(p0[i] - lr * fraction);
    want_m.push_back(0.1 * gi);
    want_v.push_back(0.05 * gi * gi);
  }
  // The decay (2 roundings of |p|), the step (11 roundings of lr |g| / (|g| + eps) <= lr) and the
  // final add (u |p1|): within gamma_14 of 1 + |p1|. m and v against 0.1 g and 0.05 g^2: 2 and 3
  // roundings, and 1 - 0.9f, 1 - 0.95f differ from 0.1, 0.05 by 4 u relative.
  using rex::testing::gamma_n;
  check_close(w, want_w, gamma_n(14));
  check_close(b, want_b, gamma_n(14));
  CHECK(frozen.to_vector() == p0);  // no gradient: untouched

  const auto state = opt.state();
  check_close(state.at("w.exp_avg"), want_m, gamma_n(6));
  check_close(state.at("w.exp_avg_sq"), want_v, gamma_n(7));
  CHECK(state.at("w.step").item() == 1.0f);
  CHECK(state.at("b.step").item() == 1.0f);
  CHECK(state.at("frozen.step").item() == 0.0f);  // no gradient: its state does not advance
  CHECK(state.at("frozen.exp_avg").to_vector() == std::vector<float>(6, 0.0f));
}

TEST_CASE("AdamW: three steps match a double-precision reference") {
  const AdamWOptions options{.beta1 = 0.8f, .beta2 = 0.99f, .eps = 1e-6f, .weight_decay = 0.2f};
  const std::vector<float> p0 = {0.5f, -1.0f, 2.0f, 0.25f, -0.75f, 1.5f};
  const std::vector<std::vector<float>> grads = {{0.3f, -2.0f, 0.01f, 0.0f, -0.5f, 5.0f},
                                                 {-0.1f, -1.0f, 0.02f, 3.0f, 0.5f, -4.0f},
                                                 {0.2f, 0.5f, -0.03f, 1e-7f, 0.5f, 1.0f}};
  const std::vector<float> lrs = {0.01f, 0.02f, 0.005f};
  Tensor w = param(p0, {2, 3}), b = param(p0, {2, 3}), late = param(p0, {2, 3});
  AdamW opt({{"w", w}, {"b", b, false}, {"late", late}}, options);
  ReferenceAdamW ref_w(p0), ref_b(p0), ref_late(p0);
  for (size_t t = 0; t < 3; ++t) {
    opt.zero_grad();
    set_grad(w, grads[t]);
    set_grad(b, grads[t]);
    ref_w.update(grads[t], lrs[t], options, true);
    ref_b.update(grads[t], lrs[t], options, false);
    if (t != 1) {  // `late` has no gradient at the second step: it neither decays nor counts it
      set_grad(late, grads[t]);
      ref_late.update(grads[t], lrs[t], options, true);
    }
    opt.step(lrs[t]);
  }
  // Within the references' running error bounds (ReferenceAdamW).
  check_bound(w, ref_w.p, ref_w.p_err);
  check_bound(b, ref_b.p, ref_b.p_err);
  check_bound(late, ref_late.p, ref_late.p_err);
  const auto state = opt.state();
  check_bound(state.at("w.exp_avg"), ref_w.m, ref_w.m_err);
  check_bound(state.at("w.exp_avg_sq"), ref_w.v, ref_w.v_err);
  check_bound(state.at("late.exp_avg"), ref_late.m, ref_late.m_err);
  CHECK(state.at("w.step").item() == 3.0f);
  CHECK(state.at("late.step").item() == 2.0f);
  // The reference really differs between the three, so each comparison above means something.
  CHECK(std::abs(ref_w.p[5] - ref_b.p[5]) > 1e-3);
  CHECK(std::abs(ref_w.p[5] - ref_late.p[5]) > 1e-3);

  opt.zero_grad();
  for (const Parameter& p : opt.parameters()) CHECK_FALSE(p.tensor.grad().defined());
  CHECK(opt.options().beta2 == 0.99f);
}

TEST_CASE("AdamW: state of a fresh optimiser is zeros with step 0") {
  Tensor w = param({1, 2, 3, 4, 5, 6}, {2, 3}), s = param({7}, {1});
  const AdamW opt({{"layer.w", w}, {"s", s, false}});
  const auto state = opt.state();
  std::vector<std::string> names;
  for (const auto& [name, tensor] : state) names.push_back(name);
  CHECK(names == std::vector<std::string>{"layer.w.exp_avg", "layer.w.exp_avg_sq", "layer.w.step",
                                          "s.exp_avg", "s.exp_avg_sq", "s.step"});
  CHECK(state.at("layer.w.exp_avg").shape() == Shape{2, 3});
  CHECK(state.at("layer.w.exp_avg_sq").to_vector() == std::vector<float>(6, 0.0f));
  CHECK(state.at("s.exp_avg").to_vector() == std::vector<float>{0.0f});
  CHECK(state.at("s.step").dtype() == DType::i32);
  CHECK(state.at("s.step").shape() == Shape{});
  CHECK(state.at("s.step").item() == 0.0f);
}

namespace {

// Two parameters whose gradient depends on their current values, so any difference in restored
// state shows in the trajectory: g = p - target + 0.01 * t.
struct Model {
  Tensor w = param({0.5f, -1.0f, 2.0f, 0.25f, -0.75f, 1.5f}, {2, 3});
  Tensor gain = param({1.0f, 0.9f, 1.1f}, {3});
  std::vector<Parameter> parameters() { return {{"w", w}, {"gain", gain, false}}; }

  void set_grads(int t) {
    for (Tensor p : {w, gain}) {
      std::vector<float> g = p.to_vector();
      for (float& x : g) x = x - 0.3f + 0.01f * static_cast<float>(t);
      set_grad(p, g);
    }
  }
};

void train(AdamW& opt, Model& model, int first, int last) {
  const CosineSchedule schedule{.max_lr = 0.05f, .warmup = 2, .total = 8};
  for (int t = first; t < last; ++t) {
    model.set_grads(t);
    opt.step(schedule.lr(t));
  }
}

void check_same_state(const AdamW& a, const AdamW& b) {
  const auto sa = a.state(), sb = b.state();
  REQUIRE(sa.size() == sb.size());
  for (const auto& [name, tensor] : sa) {
    INFO(name);
    if (tensor.dtype() == DType::i32) {
      CHECK(tensor.to_vector<int32_t>() == sb.at(name).to_vector<int32_t>());
    } else {
      CHECK(tensor.to_vector() == sb.at(name).to_vector());
    }
  }
}

}  // namespace

TEST_CASE("AdamW: state()/load_state() round trip continues bit-exactly") {
  Model uninterrupted;
  AdamW full(uninterrupted.parameters());
  train(full, uninterrupted, 0, 6);

  Model first_half;
  AdamW before(first_half.parameters());
  train(before, first_half, 0, 3);
  auto saved = before.state();
  const std::vector<float> saved_w = first_half.w.to_vector();
  const std::vector<float> saved_gain = first_half.gain.to_vector();

  // A new process: fresh tensors holding the saved weights, a fresh optimiser, the saved state.
  Model resumed;
  std::copy(saved_w.begin(), saved_w.end(), resumed.w.data<float>());
  std::copy(saved_gain.begin(), saved_gain.end(), resumed.gain.data<float>());
  AdamW after(resumed.parameters());
  after.load_state(saved);
  for (auto& [name, tensor] : saved) tensor.fill_(7.0f);  // load_state copied, did not alias
  train(after, resumed, 3, 6);

  CHECK(resumed.w.to_vector() == uninterrupted.w.to_vector());
  CHECK(resumed.gain.to_vector() == uninterrupted.gain.to_vector());
  check_same_state(after, full);
  // state() copied too: the filled map did not reach the optimiser that produced it.
  train(before, first_half, 3, 6);
  CHECK(first_half.w.to_vector() == uninterrupted.w.to_vector());
  check_same_state(before, full);
  // And the trajectory depends on the state: resuming with fresh moments diverges.
  Model cold;
  std::copy(saved_w.begin(), saved_w.end(), cold.w.data<float>());
  std::copy(saved_gain.begin(), saved_gain.end(), cold.gain.data<float>());
  AdamW cold_opt(cold.parameters());
  train(cold_opt, cold, 3, 6);
  CHECK(cold.w.to_vector() != uninterrupted.w.to_vector());
}

TEST_CASE("AdamW: load_state rejects bad maps and changes nothing") {
  Tensor w = param({1, 2, 3, 4, 5, 6}, {2, 3});
  AdamW opt({{"w", w}});
  set_grad(w, {1, -1, 2, -2, 3, -3});
  opt.step(0.1f);
  const auto good = opt.state();
  auto with = [&](auto edit) {
    auto s = good;
    edit(s);
    return error_message([&] { opt.load_state(s); });
  };

  std::string msg = with([](auto& s) { s.erase("w.exp_avg_sq"); });
  CHECK(msg.find("AdamW::load_state: missing tensor 'w.exp_avg_sq'") != std::string::npos);
  msg = with([](auto& s) { s["w.exp_avg"] = zeros({3, 2}); });
  CHECK(msg.find("tensor 'w.exp_avg' has shape [3, 2], expected [2, 3]") != std::string::npos);
  msg = with([](auto& s) { s["w.step"] = scalar(1.0f); });
  CHECK(msg.find("tensor 'w.step' is f32, expected i32") != std::string::npos);
  msg = with([](auto& s) { s["w.step"] = from_vector<int32_t>({1, 1}); });
  CHECK(msg.find("tensor 'w.step' has shape [2], expected [] or [1]") != std::string::npos);
  msg = with([](auto& s) { s["w.step"] = from_vector<int32_t>({-1}); });
  CHECK(msg.find("tensor 'w.step' holds a negative step -1") != std::string::npos);
  msg = with([](auto& s) { s["w.exp_avg"] = Tensor(); });
  CHECK(msg.find("tensor 'w.exp_avg' is undefined") != std::string::npos);
  msg = with([](auto& s) { s["v.exp_avg"] = zeros({2, 3}); });
  CHECK(msg.find("AdamW::load_state: unknown tensor 'v.exp_avg'") != std::string::npos);

  // Every failed load left the state as it was; a step of shape [1] is accepted.
  const auto after = opt.state();
  CHECK(after.at("w.exp_avg").to_vector() == good.at("w.exp_avg").to_vector());
  CHECK(after.at("w.exp_avg_sq").to_vector() == good.at("w.exp_avg_sq").to_vector());
  CHECK(after.at("w.step").item() == 1.0f);
  auto rank1 = good;
  rank1["w.step"] = from_vector<int32_t>({5});
  opt.load_state(rank1);
  CHECK(opt.state().at("w.step").item() == 5.0f);
}

TEST_CASE("AdamW: constructor and step errors") {
  Tensor w = param({1, 2}, {2});
  std::string msg = error_message([&] { AdamW({{"w", w}, {"w", param({1}, {1})}}); });
  CHECK(msg.find("AdamW: duplicate parameter name 'w'") != std::string::npos);
  msg = error_message([&] { AdamW({{"w", w}, {"u", Tensor()}}); });
  CHECK(msg.find("AdamW: parameter 'u' is an undefined tensor") != std::string::npos);
  msg = error_message([&] { AdamW({{"ids", from_vector<int32_t>({1, 2})}}); });
  CHECK(msg.find("AdamW: parameter 'ids' is i32, not f32") != std::string::npos);
  msg = error_message([&] { AdamW({{"twice", mul(w, 2.0f)}}); });
  CHECK(msg.find("AdamW: parameter 'twice' is not a leaf") != std::string::npos);
  msg = error_message([&] { AdamW({{"w", w}, {"again", w}}); });
  CHECK(msg.find("AdamW: parameters 'w' and 'again' are the same tensor") != std::string::npos);
  msg = error_message([&] { AdamW({{"", w}}); });
  CHECK(msg.find("AdamW: a parameter has an empty name") != std::string::npos);
  msg = error_message([&] { AdamW({{"w", w}}, {.beta1 = 1.0f}); });
  CHECK(msg.find("AdamW: beta1 1 is not in [0, 1)") != std::string::npos);
  msg = error_message([&] { AdamW({{"w", w}}, {.beta2 = -0.5f}); });
  CHECK(msg.find("AdamW: beta2 -0.5 is not in [0, 1)") != std::string::npos);
  msg = error_message([&] { AdamW({{"w", w}}, {.eps = -1.0f}); });
  CHECK(msg.find("AdamW: eps -1 is not a finite non-negative number") != std::string::npos);
  msg = error_message([&] {
    AdamW({{"w", w}}, {.weight_decay = std::numeric_limits<float>::quiet_NaN()});
  });
  CHECK(msg.find("AdamW: weight_decay nan is not a finite") != std::string::npos);

  AdamW opt({{"w", w}});
  msg = error_message([&] { opt.step(-0.1f); });
  CHECK(msg.find("AdamW::step: learning rate -0.1 is not a finite non-negative number") !=
        std::string::npos);
  msg = error_message([&] { opt.step(std::numeric_limits<float>::infinity()); });
  CHECK(msg.find("AdamW::step: learning rate inf") != std::string::npos);
}

// ---- The arena
// ------------------------------------------------------------------------------------

namespace {

// AdamW's CPU update of one tensor exactly as it was written before the arena: the same Eigen
// expressions over tensors of their own (64-byte aligned storage), with the step's scalars from
// the options, for parameters that have a gradient.
struct PerTensorAdamW {
  Tensor p, m, v;
  int64_t step = 0;
  explicit PerTensorAdamW(const Tensor& initial)
      : p(initial.detach().clone()), m(zeros(initial.shape())), v(zeros(initial.shape())) {}
  void update(const Tensor& grad, float lr, const AdamWOptions& o, bool decay) {
    ++step;
    const double lr_d = lr, beta1_d = o.beta1, beta2_d = o.beta2;
    const auto one_minus_beta1 = static_cast<float>(1.0 - beta1_d);
    const auto one_minus_beta2 = static_cast<float>(1.0 - beta2_d);
    const auto keep = static_cast<float>(1.0 - lr_d * static_cast<double>(o.weight_decay));
    const double bias1 = 1.0 - std::pow(beta1_d, static_cast<double>(step));
    const double bias2 = 1.0 - std::pow(beta2_d, static_cast<double>(step));
    const auto neg_step_size = static_cast<float>(-(lr_d / bias1));
    const auto bias2_sqrt = static_cast<float>(std::sqrt(bias2));
    const Tensor g = grad.clone();  // storage of its own, as a gradient had
    const int64_t n = g.numel();
    rex::detail::ArrayMap w(p.data<float>(), n), mm(m.data<float>(), n), vv(v.data<float>(), n);
    const rex::detail::ConstArrayMap gg(g.data<float>(), n);
    if (decay) w *= keep;
    mm = mm * o.beta1 + one_minus_beta1 * gg;
    vv = vv * o.beta2 + one_minus_beta2 * gg * gg;
    w = w + neg_step_size * mm / (vv.sqrt() / bias2_sqrt + o.eps);
  }
};

std::vector<float> random_values(int64_t n, Generator& gen) {
  const Tensor t = uniform({n}, gen, -1.0f, 1.0f);
  return t.to_vector();
}

}  // namespace

TEST_CASE("Arena: parameters and gradients are views of one buffer each, aligned to 64 bytes") {
  Tensor w = param({1, 2, 3, 4, 5, 6}, {2, 3}), b = param({7, 8, 9}, {3}),
         big = param(std::vector<float>(40, 0.5f), {5, 8});
  Tensor held = w;  // another handle, as a module's member is
  AdamW opt({{"w", w}, {"b", b, false}, {"big", big}});
  const optim::Arena& arena = opt.arena();
  CHECK(arena.size() == 16 + 16 + 48);  // each range starts at a multiple of 16 floats
  CHECK(arena.ranges()[0].begin == 0);
  CHECK(arena.ranges()[1].begin == 16);
  CHECK(arena.ranges()[2].begin == 32);
  CHECK(arena.ranges()[2].end == 72);
  for (const Parameter& p : opt.parameters()) {
    CHECK(p.tensor.shares_storage_with(arena.values()));
    CHECK(reinterpret_cast<uintptr_t>(p.tensor.data<float>()) % 64 == 0);
  }
  CHECK(held.shares_storage_with(arena.values()));  // every handle was rebound, not copied
  CHECK(held.to_vector() == std::vector<float>{1, 2, 3, 4, 5, 6});
  CHECK(arena.values().to_vector()[17] == 8.0f);
  held.data<float>()[0] = -1.0f;  // a write through the model's handle is a write to the arena
  CHECK(arena.values().to_vector()[0] == -1.0f);
  CHECK(arena.values().to_vector()[6] == 0.0f);  // padding

  // Backward writes the gradients into the arena; a parameter it does not reach has none.
  sum(mul(w, 2.0f)).backward();
  sum(mul(w, 3.0f)).backward();  // accumulates in place
  CHECK(w.grad().shares_storage_with(arena.grads()));
  CHECK(w.grad().to_vector() == std::vector<float>(6, 5.0f));
  CHECK_FALSE(b.grad().defined());
  CHECK_FALSE(big.grad().defined());
  std::vector<float> grads = arena.grads().to_vector();
  CHECK(std::all_of(grads.begin() + 6, grads.end(), [](float x) { return x == 0.0f; }));
  // zero_grad: every gradient dropped, the buffer zeroed in one fill.
  opt.zero_grad();
  CHECK_FALSE(w.grad().defined());
  grads = arena.grads().to_vector();
  CHECK(std::all_of(grads.begin(), grads.end(), [](float x) { return x == 0.0f; }));
  // Tensor::zero_grad on one parameter zeroes its view too.
  sum(mul(big, 2.0f)).backward();
  big.zero_grad();
  grads = arena.grads().to_vector();
  CHECK(std::all_of(grads.begin(), grads.end(), [](float x) { return x == 0.0f; }));
}

TEST_CASE("Arena: a gradient set before the optimiser is built moves into the arena") {
  Tensor w = param({1, 2}, {2});
  sum(mul(w, 4.0f)).backward();
  AdamW opt({{"w", w}});
  CHECK(w.grad().shares_storage_with(opt.arena().grads()));
  CHECK(w.grad().to_vector() == std::vector<float>{4, 4});
}

TEST_CASE("Arena: AdamW steps are bit-identical to the per-tensor update; skipped ones untouched") {
  Generator gen(3);
  const AdamWOptions options{.beta1 = 0.8f, .beta2 = 0.99f, .eps = 1e-6f, .weight_decay = 0.2f};
  // Sizes with and without padding, one larger than Eigen's packets by an odd amount.
  const std::vector<Shape> shapes = {{2, 3}, {17}, {5, 7}, {64}, {1}};
  std::vector<Tensor> tensors;
  std::vector<Parameter> params;
  std::vector<PerTensorAdamW> refs;
  for (size_t i = 0; i < shapes.size(); ++i) {
    tensors.push_back(param(random_values(shapes[i].numel(), gen), shapes[i]));
    params.push_back({"p" + std::to_string(i), tensors.back(), i % 2 == 0});
    refs.emplace_back(tensors.back());
  }
  AdamW opt(params, options);
  const std::vector<float> lrs = {0.01f, 0.02f, 0.005f, 0.01f};
  for (size_t t = 0; t < lrs.size(); ++t) {
    opt.zero_grad();
    for (size_t i = 0; i < shapes.size(); ++i) {
      if ((i + t) % 3 == 1) continue;  // no gradient this step: skipped (no decay, no count)
      const Tensor g = from_vector(random_values(shapes[i].numel(), gen), shapes[i]);
      set_grad(tensors[i], g.to_vector());
      refs[i].update(g, lrs[t], options, params[i].decay);
    }
    opt.step(lrs[t]);
    for (size_t i = 0; i < shapes.size(); ++i) {
      INFO("parameter ", i, " after step ", t);
      CHECK(testing::same_bytes(tensors[i], refs[i].p));
    }
  }
  const auto state = opt.state();
  for (size_t i = 0; i < shapes.size(); ++i) {
    const std::string name = "p" + std::to_string(i);
    CHECK(testing::same_bytes(state.at(name + ".exp_avg"), refs[i].m));
    CHECK(testing::same_bytes(state.at(name + ".exp_avg_sq"), refs[i].v));
    CHECK(state.at(name + ".step").item() == static_cast<float>(refs[i].step));
  }
  // The padding and the moments of no parameter stayed zero.
  const std::vector<float> m = opt.arena().exp_avg().to_vector();
  CHECK(m[6] == 0.0f);
  CHECK(m[15] == 0.0f);
}

TEST_CASE("Arena: AdamW::clip_grad_norm equals clip_grad_norm's closed form") {
  Tensor a = param({0}, {1}), none = param({9}, {1}),
         w = param(std::vector<float>(6, 0.0f), {2, 3});
  AdamW opt({{"a", a}, {"none", none}, {"w", w}});
  set_grad(a, {3});
  set_grad(w, {1, -2, 2, 0, 0, 0});  // 9 + 1 + 4 + 4 = 18
  opt.clip_grad_norm(0.0);           // measures only
  CHECK(opt.grad_norm() == std::sqrt(18.0));
  CHECK(a.grad().item() == 3.0f);
  opt.clip_grad_norm(1.0);
  CHECK(opt.grad_norm() == std::sqrt(18.0));  // the norm before clipping
  const auto scale = static_cast<float>(1.0 / (std::sqrt(18.0) + 1e-6));
  CHECK(a.grad().item() == 3.0f * scale);  // the scale rounded to float, times the gradient
  CHECK(w.grad().to_vector() ==
        std::vector<float>{1 * scale, -2 * scale, 2 * scale, 0.0f, 0.0f, 0.0f});
  CHECK_FALSE(none.grad().defined());

  // The same gradients through the free function give the same bits.
  Tensor a2 = param({0}, {1}), none2 = param({9}, {1}),
         w2 = param(std::vector<float>(6, 0.0f), {2, 3});
  set_grad(a2, {3});
  set_grad(w2, {1, -2, 2, 0, 0, 0});
  CHECK(optim::clip_grad_norm({{"a", a2}, {"none", none2}, {"w", w2}}, 1.0) == std::sqrt(18.0));
  CHECK(testing::same_bytes(a2.grad(), a.grad()));
  CHECK(testing::same_bytes(w2.grad(), w.grad()));

  set_grad(w, {1, 2, std::numeric_limits<float>::infinity(), 0, 0, 0});
  const std::string msg = error_message([&] { opt.clip_grad_norm(1.0); });
  CHECK(
      msg.find("clip_grad_norm: gradient norm is inf; first non-finite gradient in parameter w") !=
      std::string::npos);
}

TEST_CASE("Arena: a parameter rebound after the optimiser was built is refused") {
  Tensor w = param({1, 2}, {2});
  AdamW opt({{"w", w}});
  set_grad(w, {1, 1});
  opt.step(0.1f);
  const AdamW other({{"w", w}});  // rebinds w to its own arena
  CHECK(error_message([&] {
          opt.step(0.1f);
        }).find("move the model before building the optimiser") != std::string::npos);
}

// ---- CosineSchedule
// ------------------------------------------------------------------------------

TEST_CASE("CosineSchedule: warmup, cosine and floor against closed forms") {
  const CosineSchedule s{.max_lr = 1e-3f, .warmup = 10, .total = 110, .min_ratio = 0.1f};
  const double max = 1e-3f, min = 0.1 * max;
  check_relative(s.lr(0), max / 10);          // (0 + 1) / warmup
  check_relative(s.lr(4), max * 5 / 10);      // (4 + 1) / warmup
  check_relative(s.lr(9), max);               // warmup - 1: the end of the ramp
  check_relative(s.lr(10), max);              // warmup: cosine at progress 0
  check_relative(s.lr(60), (min + max) / 2);  // progress 1/2: cos(pi / 2) = 0
  // progress 99/100: 0.5 * (1 + cos(0.99 pi)) = cos^2(0.495 pi) = sin^2(0.005 pi)
  check_relative(s.lr(109), min + (max - min) * std::pow(std::sin(0.005 * std::numbers::pi), 2));
  check_relative(s.lr(110), min);  // total
  check_relative(s.lr(5000), min);
  for (int64_t step = 10; step < 110; ++step) CHECK(s.lr(step + 1) < s.lr(step));

  // No warmup: the first step is at max_lr. Warmup == total: the ramp goes straight to the floor.
  const CosineSchedule no_warmup{.max_lr = 2.0f, .warmup = 0, .total = 4, .min_ratio = 0.0f};
  check_relative(no_warmup.lr(0), 2.0);
  check_relative(no_warmup.lr(1), 2.0 * 0.5 * (1 + std::cos(std::numbers::pi / 4)));
  CHECK(no_warmup.lr(4) == 0.0f);
  const CosineSchedule all_warmup{.max_lr = 1.0f, .warmup = 4, .total = 4, .min_ratio = 0.5f};
  check_relative(all_warmup.lr(3), 1.0);
  check_relative(all_warmup.lr(4), 0.5);
}

TEST_CASE("CosineSchedule: errors") {
  auto lr_error = [](CosineSchedule s, int64_t step = 0) {
    return error_message([&] { s.lr(step); });
  };
  CHECK(lr_error({.max_lr = 1.0f, .warmup = 0, .total = 0})
            .find("CosineSchedule: total 0 must be at least 1") != std::string::npos);
  CHECK(lr_error({.max_lr = 1.0f, .warmup = -1, .total = 5})
            .find("CosineSchedule: warmup -1 is negative") != std::string::npos);
  CHECK(lr_error({.max_lr = 1.0f, .warmup = 6, .total = 5})
            .find("CosineSchedule: warmup 6 is past total 5") != std::string::npos);
  CHECK(lr_error({.max_lr = 1.0f, .warmup = 1, .total = 5, .min_ratio = 1.5f})
            .find("CosineSchedule: min_ratio 1.5 is not in [0, 1]") != std::string::npos);
  CHECK(lr_error({.max_lr = 1.0f, .warmup = 1, .total = 5, .min_ratio = -0.1f})
            .find("min_ratio -0.1 is not in [0, 1]") != std::string::npos);
  CHECK(lr_error({.max_lr = 0.0f, .warmup = 1, .total = 5})
            .find("CosineSchedule: max_lr 0 is not a finite positive number") != std::string::npos);
  CHECK(lr_error({.max_lr = 1.0f, .warmup = 1, .total = 5}, -3)
            .find("CosineSchedule::lr: step -3 is negative") != std::string::npos);
}

// ---- clip_grad_norm
// ------------------------------------------------------------------------------

TEST_CASE("clip_grad_norm: global norm, scaling above max_norm, untouched below") {
  Tensor a = param({0}, {1}), b = param({0}, {1}), none = param({9}, {1});
  const std::vector<Parameter> params = {{"a", a}, {"none", none}, {"b", b}};
  set_grad(a, {3});
  set_grad(b, {-4});

  // 9 + 16 in double and its square root are exact.
  CHECK(optim::clip_grad_norm(params, 0.0) == 5.0);  // measure only
  CHECK(optim::clip_grad_norm(params, 10.0) == 5.0);
  CHECK(a.grad().item() == 3.0f);  // below max_norm: untouched, bit for bit
  CHECK(b.grad().item() == -4.0f);

  CHECK(optim::clip_grad_norm(params, 1.0) == 5.0);  // returns the norm before
  const double scale = 1.0 / (5.0 + 1e-6);
  // The scale rounded to float, times the gradient: 2 roundings.
  check_close(a.grad(), {3.0 * scale}, rex::testing::gamma_n(2));
  check_close(b.grad(), {-4.0 * scale}, rex::testing::gamma_n(2));
  CHECK_FALSE(none.grad().defined());  // skipped, not created
  CHECK(none.item() == 9.0f);
  // 5 / (5 + 1e-6) = 1 - 2e-7, and the clipped gradients' 2 roundings.
  CHECK(optim::clip_grad_norm(params, 0.0) ==
        doctest::Approx(1.0).epsilon(2e-7 + rex::testing::gamma_n(2)));

  // A 2x3 gradient: 1 + 4 + 4 + 16 + 4 + 0 = 29. Values whose squares overflow f32 are summed in
  // double: 3e20 and 4e20 give 5e20.
  Tensor w = param(std::vector<float>(6, 0.0f), {2, 3});
  set_grad(w, {1, -2, 2, 4, 2, 0});
  CHECK(optim::clip_grad_norm({{"w", w}}, 0.0) == std::sqrt(29.0));  // exact squares and sum
  set_grad(a, {3e20f});
  set_grad(b, {4e20f});
  // 3e20f and 4e20f are within u of 3e20 and 4e20; the double sum adds nothing at that size.
  CHECK(optim::clip_grad_norm(params, 0.0) ==
        doctest::Approx(5e20).epsilon(rex::testing::kUnitRoundoff));
  CHECK(optim::clip_grad_norm({}, 1.0) == 0.0);
}

TEST_CASE("clip_grad_norm: a non-finite gradient names the first parameter holding one") {
  Tensor a = param({0, 0}, {2}), b = param({0, 0}, {2}), c = param({0}, {1});
  const std::vector<Parameter> params = {{"a", a}, {"b", b}, {"c", c}};
  set_grad(a, {1, 2});
  set_grad(b, {3, std::numeric_limits<float>::quiet_NaN()});
  set_grad(c, {std::numeric_limits<float>::infinity()});
  std::string msg = error_message([&] { optim::clip_grad_norm(params, 1.0); });
  CHECK(
      msg.find("clip_grad_norm: gradient norm is nan; first non-finite gradient in parameter b") !=
      std::string::npos);
  set_grad(b, {3, 4});
  msg = error_message([&] { optim::clip_grad_norm(params, 1.0); });
  CHECK(
      msg.find("clip_grad_norm: gradient norm is inf; first non-finite gradient in parameter c") !=
      std::string::npos);
}
