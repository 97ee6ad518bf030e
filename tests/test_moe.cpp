// Tests for rex/nn/moe.hpp and rex/nn/psr.hpp: the MoE layer (sorted dispatch, PSR masking, gates,
// auxiliary losses) against a naive per-token loop written here, gradients by central differences,
// the shared table's gradient as the sum of its layers' contributions, r = 1 against a vanilla MoE,
// edge cases, and the PSR schedule and masks against closed forms.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "rounding.hpp"
#include "testing.hpp"

using namespace rex;
using rex::testing::check_close;
using rex::testing::error_message;

namespace {

nn::ModelConfig small_config(int64_t reuse, int64_t experts, int64_t top_k) {
  nn::ModelConfig c;
  c.d_model = 8;
  c.n_layers = 2 * reuse;
  c.moe.experts_per_layer = experts;
  c.moe.top_k = top_k;
  c.moe.d_expert = 5;
  c.moe.reuse = reuse;
  c.moe.aux_loss_coef = 0.05;
  c.moe.z_loss_coef = 0.01;
  c.psr.schedule = "linear";
  c.psr.t_start = 10;
  c.psr.t_end = 20;
  c.init_std = 0.5;  // large enough that routing is far from uniform
  return c;
}

struct Layers {
  std::shared_ptr<nn::ExpertTable> table;
  std::vector<std::shared_ptr<nn::MoeLayer>> moe;
};

// One block: a table of r*N experts and the r MoE layers that share it.
Layers make_block(const nn::ModelConfig& c, uint64_t seed) {
  Generator gen(seed);
  Layers out;
  out.table = std::make_shared<nn::ExpertTable>(c.moe.reuse * c.moe.experts_per_layer, c.d_model,
                                                c.moe.d_expert, gen, 0.5f, 0.5f);
  for (int64_t l = 0; l < c.moe.reuse; ++l)
    out.moe.push_back(std::make_shared<nn::MoeLayer>(c, l, out.table, gen, 0.5f, 0.5f));
  return out;
}

std::vector<Tensor> all_parameters(const Layers& block) {
  std::vector<Tensor> params;
  for (const auto& [name, p] : block.table->named_parameters()) params.push_back(p);
  for (const auto& layer : block.moe)
    for (const auto& [name, p] : layer->named_parameters()) params.push_back(p);
  return params;
}

struct NaiveOutput {
  Tensor y, aux_loss;
  std::vector<int64_t> counts;
};

// The method written token by token: router probabilities, PSR mask, top-k by repeated argmax, the
// gated sum over the chosen experts, shared experts, and the two auxiliary losses.
NaiveOutput naive_moe(const nn::MoeLayer& layer, const nn::ModelConfig& c, const Tensor& x,
                      const nn::RoutingStep& at, int64_t layer_index) {
  const int64_t tokens = x.dim(0), pool = layer.table().size(), k = c.moe.top_k;
  const int64_t candidates =
      nn::psr_candidates(c.psr, c.moe.experts_per_layer, c.moe.reuse, at.step);
  const std::vector<uint8_t> keep =
      nn::psr_keep_mask(at.seed, at.step, layer_index, pool, candidates);
  NaiveOutput out;
  out.counts.assign(static_cast<size_t>(pool), 0);
  std::vector<Tensor> rows, prob_rows, lse_terms;
  for (int64_t t = 0; t < tokens; ++t) {
    const Tensor h = slice(x, 0, t, t + 1);  // [1, d]
    const Tensor logits = matmul(h, layer.router->weight, {.transpose_b = true});
    const Tensor probs = softmax(logits);
    prob_rows.push_back(probs);
    const bool on_logits = c.moe.gating == "topk_softmax";
    std::vector<float> score(static_cast<size_t>(pool));
    for (int64_t i = 0; i < pool; ++i)
      score[i] = !keep[i] ? -std::numeric_limits<float>::infinity()
                          : (on_logits ? logits.at({0, i}) : probs.at({0, i}));
    std::vector<int64_t> chosen;
    std::vector<uint8_t> taken(static_cast<size_t>(pool), 0);
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t i = 0; i < pool; ++i)
        if (!taken[i] && (best < 0 || score[i] > score[best])) best = i;
      taken[best] = 1;
      chosen.push_back(best);
      ++out.counts[best];
    }
    std::vector<Tensor> gates;
    for (int64_t i : chosen) {
      std::vector<float> onehot(static_cast<size_t>(pool), 0.0f);
      onehot[i] = 1.0f;
      gates.push_back(sum((on_logits ? logits : probs) * from_vector(onehot)));
    }
    if (on_logits) {  // softmax over the k chosen logits, written out: exp(z_j - max) / sum
      Tensor top = gates[0];
      for (const Tensor& g : gates) top = g.item() > top.item() ? g : top;
      top = top.detach();
      Tensor total = zeros({});
      for (Tensor& g : gates) total = total + (g = exp(g - top));
      for (Tensor& g : gates) g = g / total;
    }
    if (c.moe.renormalize) {
      Tensor total = gates[0];
      for (size_t j = 1; j < gates.size(); ++j) total = total + gates[j];
      for (Tensor& g : gates) g = g / total;
    }
    Tensor y = zeros({1, c.d_model});
    for (size_t j = 0; j < chosen.size(); ++j)
      y = y + gates[j] * layer.table().expert(chosen[j]).forward(h);
    for (const auto& s : layer.shared) y = y + s->forward(h);
    rows.push_back(y);
    lse_terms.push_back(log(sum(exp(logits))));
  }
  out.y = concat(rows, 0);
  // Load balance alpha * P * sum_i f_i p_i and z-loss beta * mean(lse^2).
  Tensor mean_probs = mean(concat(prob_rows, 0), 0);
  std::vector<float> share(static_cast<size_t>(pool));
  for (int64_t i = 0; i < pool; ++i) share[i] = static_cast<float>(out.counts[i]) / (tokens * k);
  Tensor lse = stack(lse_terms, 0);
  out.aux_loss =
      sum(from_vector(share) * mean_probs) * static_cast<float>(c.moe.aux_loss_coef * pool) +
      mean(lse * lse) * static_cast<float>(c.moe.z_loss_coef);
  return out;
}

// Gradients of sum(w * y) + aux with respect to every tensor in `params`, as copies.
template <class Forward>
std::vector<Tensor> gradients(const std::vector<Tensor>& params, const Tensor& weights,
                              Forward forward) {
  for (Tensor p : params) p.zero_grad();
  auto [y, aux] = forward();
  (sum(y * weights) + aux).backward();
  std::vector<Tensor> grads;
  for (const Tensor& p : params)
    grads.push_back(p.grad().defined() ? p.grad().clone() : zeros(p.shape()));
  return grads;
}

void check_against_naive(const nn::ModelConfig& c, int64_t step, uint64_t seed) {
  const Layers block = make_block(c, seed);
  Generator gen(seed + 1);
  const int64_t tokens = 9;
  Tensor x = testing::random_normal_param({tokens, c.d_model}, gen);
  const Tensor weights = normal({tokens, c.d_model}, gen);
  std::vector<Tensor> params = all_parameters(block);
  params.push_back(x);
  for (int64_t l = 0; l < c.moe.reuse; ++l) {
    CAPTURE(l);
    const nn::RoutingStep at{step, 77};
    const nn::MoeOutput fast = block.moe[l]->forward(x, at);
    const NaiveOutput slow = naive_moe(*block.moe[l], c, x, at, l);
    // Both paths chain the router (d products), its softmax (a call, P terms, 2), the gates, the
    // expert (d, silu's call and 3, d_expert) and the k + shared terms: about 2 d + d_expert + P
    // + 20 terms and 2 calls each, twice (docs/testing.md, "Tolerances"); the aux losses add a
    // mean over the tokens. The gradients retrace that and sum over the tokens: 2 (values) + 9.
    using testing::gamma_n;
    const double chain = static_cast<double>(2 * c.d_model + c.moe.d_expert +
                                             c.moe.reuse * c.moe.experts_per_layer + 20 + 9);
    const double values = 2 * (gamma_n(chain) + 2 * testing::kCallRoundoff);
    check_close(fast.y, slow.y, values);
    CHECK(fast.expert_counts == slow.counts);
    check_close(fast.aux_loss, slow.aux_loss, values);
    const auto g_fast = gradients(params, weights, [&] {
      auto o = block.moe[l]->forward(x, at);
      return std::pair{o.y, o.aux_loss};
    });
    const auto g_slow = gradients(params, weights, [&] {
      auto o = naive_moe(*block.moe[l], c, x, at, l);
      return std::pair{o.y, o.aux_loss};
    });
    for (size_t i = 0; i < params.size(); ++i) {
      CAPTURE(i);
      check_close(g_fast[i], g_slow[i], 2 * (gamma_n(2 * chain + 9) + 4 * testing::kCallRoundoff));
    }
  }
}

}  // namespace

TEST_CASE("MoE layer output, counts, aux loss and every gradient match a naive per-token loop") {
  SUBCASE("R2 during PSR (4 of 6 candidates), z-loss on") {
    check_against_naive(small_config(2, 3, 2), 15, 1);
  }
  SUBCASE("R4 after PSR, renormalised gates, a shared expert") {
    nn::ModelConfig c = small_config(4, 2, 2);
    c.moe.renormalize = true;
    c.moe.shared_experts = 1;
    check_against_naive(c, 100, 2);
  }
  SUBCASE("R2 before PSR starts (N candidates), top-1") {
    check_against_naive(small_config(2, 3, 1), 0, 3);
  }
  SUBCASE("R2 during PSR, top-k of the logits then softmax (moe.gating = topk_softmax)") {
    nn::ModelConfig c = small_config(2, 3, 2);
    c.moe.gating = "topk_softmax";
    check_against_naive(c, 15, 4);
  }
  SUBCASE("R4 after PSR, topk_softmax, top-3") {
    nn::ModelConfig c = small_config(4, 3, 3);
    c.moe.gating = "topk_softmax";
    check_against_naive(c, 100, 5);
  }
}

TEST_CASE("MoE layer gradients agree with central differences") {
  nn::ModelConfig c = small_config(2, 2, 2);
  c.moe.shared_experts = 1;
  c.d_model = 4;
  c.moe.d_expert = 3;
  const Layers block = make_block(c, 5);
  Generator gen(6);
  std::vector<Tensor> inputs = all_parameters(block);
  inputs.push_back(testing::random_normal_param({5, c.d_model}, gen));
  auto f = [&](const std::vector<Tensor>& in) {
    const nn::MoeOutput o = block.moe[1]->forward(in.back(), {100, 0});
    return o.y + o.aux_loss;
  };
  // A 1e-3 step leaves every top-k choice of these random inputs in place (a flip would make the
  // check fail, not pass). The smaller step raises the rounding part of the central difference
  // (gradcheck.hpp) tenfold: an element reaches at most 5 tokens' 4 outputs and the aux loss,
  // whose rounding (chains of about 20, so typically sqrt(20) u of their terms: independent
  // roundings, Higham and Mary 2019) over 2h stays near 1e-4, inside atol; their worst case,
  // gamma_20 of the terms, would not be, so this check relies on roundings not conspiring.
  testing::GradcheckOptions options;
  options.step = 1e-3f;
  options.rtol = 2e-2;
  CHECK_GRADIENTS(f, inputs, options);
}

TEST_CASE("the shared table's gradient is the sum of the gradients from each layer of its block") {
  const nn::ModelConfig c = small_config(2, 3, 2);
  const Layers block = make_block(c, 7);
  Generator gen(8);
  const Tensor x = normal({6, c.d_model}, gen);
  const nn::RoutingStep at{100, 0};
  const nn::NamedTensors table = block.table->named_parameters();
  auto table_grads = [&](bool use0, bool use1) {
    for (auto [name, p] : table) p.zero_grad();
    Tensor loss = scalar(0.0f);
    if (use0) loss = loss + sum(block.moe[0]->forward(x, at).y);
    if (use1) loss = loss + sum(block.moe[1]->forward(x, at).y);
    loss.backward();
    std::vector<std::vector<float>> out;
    for (const auto& [name, p] : table)
      out.push_back(p.grad().defined() ? p.grad().to_vector()
                                       : std::vector<float>(p.numel(), 0.0f));
    return out;
  };
  const auto only0 = table_grads(true, false), only1 = table_grads(false, true);
  const auto both = table_grads(true, true);
  int64_t experts_used_by_both = 0;
  for (size_t i = 0; i < table.size(); ++i) {
    std::vector<double> want(only0[i].size());
    bool used0 = false, used1 = false;
    for (size_t j = 0; j < want.size(); ++j) {
      want[j] = static_cast<double>(only0[i][j]) + only1[i][j];
      used0 |= only0[i][j] != 0, used1 |= only1[i][j] != 0;
    }
    experts_used_by_both += used0 && used1;
    // Each layer's contribution is computed as when alone; autograd adds the two: one rounding.
    check_close(from_vector(both[i]), want, testing::gamma_n(1));
  }
  CHECK(experts_used_by_both > 0);  // the test is about sharing: some expert must serve both layers
}

TEST_CASE("r = 1 is vanilla MoE: each layer routes over its own N experts only") {
  nn::ModelConfig c = small_config(1, 3, 2);
  c.n_layers = 2;
  c.vocab_size = 11;
  c.context = 6;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  const nn::TransformerLM model(c, 3);
  std::map<std::string, Tensor> params;
  for (const auto& [name, p] : model.named_parameters()) params[name] = p;
  CHECK(params.count("expert_tables.1.experts.2.down.weight") == 1);
  CHECK(params.count("expert_tables.1.experts.3.down.weight") == 0);
  CHECK(params.at("layers.1.moe.router.weight").shape() == Shape{3, 8});
  // The PSR schedule is irrelevant for r = 1: every step sees the whole (own) pool.
  for (int64_t step : {0, 15, 100}) CHECK(nn::psr_candidates(c.psr, 3, 1, step) == 3);
  // A vanilla MoE written directly: softmax over the layer's own router, top-k, gated sum of its
  // own experts. Check layer 1 (table 1) on random tokens.
  Generator gen(4);
  const Tensor x = normal({7, c.d_model}, gen);
  const nn::MoeLayer& layer = *model.layers[1]->moe;
  CHECK(&layer.table() != &model.layers[0]->moe->table());
  const Tensor probs =
      softmax(matmul(x, params.at("layers.1.moe.router.weight"), {.transpose_b = true}));
  std::vector<double> want;
  for (int64_t t = 0; t < 7; ++t) {
    std::vector<int64_t> order(3);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return probs.at({t, a}) > probs.at({t, b});
    });
    Tensor y = zeros({1, c.d_model});
    for (int64_t j = 0; j < 2; ++j) {
      const std::string e = "expert_tables.1.experts." + std::to_string(order[j]);
      const Tensor h = slice(x, 0, t, t + 1);
      const Tensor hidden = silu(matmul(h, params.at(e + ".gate.weight"), {.transpose_b = true})) *
                            matmul(h, params.at(e + ".up.weight"), {.transpose_b = true});
      y = y + matmul(hidden, params.at(e + ".down.weight"), {.transpose_b = true}) *
                  probs.at({t, order[j]});
    }
    for (float v : y.to_vector()) want.push_back(v);
  }
  // The fused layer and this composition: the chain of check_against_naive, twice.
  check_close(
      layer.forward(x, {0, 0}).y, want,
      2 * (testing::gamma_n(2 * c.d_model + c.moe.d_expert + 3 + 20) + 2 * testing::kCallRoundoff));
}

TEST_CASE("MoE edge cases: unused experts, every token to one expert, k equal to the pool") {
  SUBCASE("experts no token chose get no gradient and cost nothing") {
    nn::ModelConfig c = small_config(2, 3, 1);
    const Layers block = make_block(c, 9);
    Generator gen(10);
    const Tensor x = normal({2, c.d_model}, gen);  // 2 tokens, top-1: at most 2 of 6 experts used
    for (auto [name, p] : block.table->named_parameters()) p.zero_grad();
    const nn::MoeOutput out = block.moe[0]->forward(x, {100, 0});
    sum(out.y).backward();
    int64_t used = 0;
    for (int64_t e = 0; e < 6; ++e) {
      const Tensor g = block.table->named_parameters()[static_cast<size_t>(3 * e)].second.grad();
      CHECK(g.defined() == (out.expert_counts[e] > 0));
      used += out.expert_counts[e] > 0;
    }
    CHECK(used <= 2);
    const std::vector<int64_t> counts = out.expert_counts.host();
    CHECK(std::accumulate(counts.begin(), counts.end(), int64_t{0}) == 2);
  }
  SUBCASE("all tokens routed to one expert") {
    nn::ModelConfig c = small_config(2, 3, 1);
    const Layers block = make_block(c, 11);
    // Router rows 1..5 zero and row 0 = 50 * ones: expert 0 wins for inputs with a positive sum.
    float* w = block.moe[0]->router->weight.data<float>();
    std::fill_n(w, 6 * c.d_model, 0.0f);
    std::fill_n(w, c.d_model, 50.0f);
    const Tensor x = ones({5, c.d_model});
    const nn::MoeOutput out = block.moe[0]->forward(x, {100, 0});
    CHECK(out.expert_counts[0] == 5);
    // y is expert 0's output scaled by its router probability p0 (about 1).
    const Tensor logits = matmul(x, block.moe[0]->router->weight, {.transpose_b = true});
    const float p0 = softmax(logits).at({0, 0});
    // The same expert and gate, in another grouping: the expert's chain (d, silu, d_expert)
    // and the product, twice.
    check_close(out.y, block.table->expert(0).forward(x) * p0,
                2 * (testing::gamma_n(c.d_model + c.moe.d_expert + 6) + testing::kCallRoundoff));
    // Everything on one expert: f = (1, 0, ...), so the load balance is alpha * P * p0; every
    // token's logsumexp is log(e^400 + 5) = 400 (to float precision), the z-loss beta * 400^2.
    // The coefficients rounded to float, the square, the products and the means over 5 equal
    // tokens: a few roundings of a positive sum (1e-5 is far above gamma_10).
    CHECK(out.aux_loss.item() ==
          doctest::Approx(0.05 * 6 * p0 + 0.01 * 400.0 * 400.0).epsilon(testing::gamma_n(10)));
  }
  SUBCASE("k equal to the whole pool: every expert sees every token") {
    nn::ModelConfig c = small_config(1, 4, 4);
    check_against_naive(c, 0, 12);
    const Layers block = make_block(c, 13);
    Generator gen(14);
    const nn::MoeOutput out = block.moe[0]->forward(normal({3, c.d_model}, gen), {0, 0});
    CHECK(out.expert_counts == std::vector<int64_t>(4, 3));
  }
}

TEST_CASE("PSR schedule: N_t at t_s, the midpoint and t_e, and stepwise as the paper has it") {
  nn::PsrConfig psr;
  psr.schedule = "linear";
  psr.t_start = 100;
  psr.t_end = 300;
  const int64_t n = 4, r = 4;
  // floor((1 + (r - 1)(t - t_s)/(t_e - t_s)) N), computed here in double.
  auto closed_form = [&](int64_t t) {
    if (t <= psr.t_start) return n;
    if (t > psr.t_end) return r * n;
    return static_cast<int64_t>(
        std::floor((1.0 + (r - 1.0) * (t - psr.t_start) / (psr.t_end - psr.t_start)) * n));
  };
  CHECK(nn::psr_candidates(psr, n, r, 0) == 4);
  CHECK(nn::psr_candidates(psr, n, r, 100) == 4);   // t_s
  CHECK(nn::psr_candidates(psr, n, r, 200) == 10);  // midpoint: floor(2.5 * 4)
  CHECK(nn::psr_candidates(psr, n, r, 300) == 16);  // t_e
  CHECK(nn::psr_candidates(psr, n, r, 301) == 16);
  for (int64_t t = 0; t < 400; ++t) CHECK(nn::psr_candidates(psr, n, r, t) == closed_form(t));
  // Stepwise as the paper's 2.3B run: N = 64, r = 4, t_s = 10k, t_e = 30k gives 128, 192 and 256
  // candidates from steps 10k, 20k and 30k, 64 before.
  psr.schedule = "stepwise";
  psr.t_start = 10000;
  psr.t_end = 30000;
  const std::vector<std::pair<int64_t, int64_t>> paper = {{0, 64},      {9999, 64},   {10000, 128},
                                                          {19999, 128}, {20000, 192}, {29999, 192},
                                                          {30000, 256}, {40000, 256}};
  for (const auto& [t, candidates] : paper) {
    CAPTURE(t);
    CHECK(nn::psr_candidates(psr, 64, 4, t) == candidates);
  }
  // Any r: 2N from t_s, then r - 3 jumps of N evenly spaced, rN from t_e.
  psr.t_start = 100;
  psr.t_end = 300;
  for (const int64_t reuse : {2, 3, 4, 5}) {
    CAPTURE(reuse);
    for (int64_t t = 0; t < 400; ++t) {
      CAPTURE(t);
      int64_t expected = reuse * n;
      if (t < psr.t_start) expected = n;
      if (t >= psr.t_start && t < psr.t_end)
        expected = n * static_cast<int64_t>(2 + std::floor((reuse - 2.0) * (t - psr.t_start) /
                                                           (psr.t_end - psr.t_start)));
      CHECK(nn::psr_candidates(psr, n, reuse, t) == expected);
    }
  }
  CHECK(nn::psr_candidates(psr, n, 5, 100) == 8);   // 2N at t_s
  CHECK(nn::psr_candidates(psr, n, 5, 166) == 8);   // 2 + floor(3 x 66 / 200) = 2
  CHECK(nn::psr_candidates(psr, n, 5, 167) == 12);  // 2 + floor(3 x 67 / 200) = 3
  CHECK(nn::psr_candidates(psr, n, 5, 299) == 16);
  CHECK(nn::psr_candidates(psr, n, 5, 300) == 20);
  psr.schedule = "none";
  CHECK(nn::psr_candidates(psr, n, r, 0) == 16);
}

TEST_CASE(
    "PSR masks: exact count, a pure function of (seed, step, layer), and masked experts never "
    "win") {
  const int64_t pool = 16;
  std::set<std::string> distinct;  // masks as strings of 0/1 bytes
  for (int64_t step = 0; step < 20; ++step) {
    for (int64_t layer = 0; layer < 4; ++layer) {
      for (int64_t cand : {1, 7, 15, 16}) {
        const auto keep = nn::psr_keep_mask(42, step, layer, pool, cand);
        CHECK(std::count(keep.begin(), keep.end(), 1) == cand);
        CHECK(keep == nn::psr_keep_mask(42, step, layer, pool, cand));
        if (cand == 7) distinct.insert(std::string(keep.begin(), keep.end()));
      }
    }
  }
  CHECK(distinct.size() > 70);  // 80 (step, layer) pairs: masks vary with both
  CHECK(nn::psr_keep_mask(42, 3, 1, pool, 7) != nn::psr_keep_mask(43, 3, 1, pool, 7));
  // Every expert is masked about equally often: counts over many steps within 20% of the mean.
  std::vector<int64_t> kept(pool, 0);
  for (int64_t step = 0; step < 4000; ++step) {
    const auto keep = nn::psr_keep_mask(1, step, 0, pool, 8);
    for (int64_t i = 0; i < pool; ++i) kept[i] += keep[i];
  }
  for (int64_t v : kept) CHECK(std::abs(v - 2000) < 400);
  // In the layer, a masked expert is never chosen.
  const nn::ModelConfig c = small_config(4, 2, 2);  // pool 8, PSR from step 10 to 20
  const Layers block = make_block(c, 15);
  Generator gen(16);
  const Tensor x = normal({40, c.d_model}, gen);
  for (int64_t step : {0, 12, 17}) {
    const auto out = block.moe[2]->forward(x, {step, 9});
    const int64_t cand = nn::psr_candidates(c.psr, 2, 4, step);
    CHECK(out.candidates == cand);
    const auto keep = nn::psr_keep_mask(9, step, 2, 8, cand);
    for (int64_t e = 0; e < 8; ++e)
      if (!keep[e]) CHECK(out.expert_counts[e] == 0);
  }
  CHECK(error_message([] {
          nn::psr_keep_mask(1, 0, 0, 4, 5);
        }).find("5 candidates out of a pool of 4") != std::string::npos);
}

TEST_CASE(
    "PSR own_first masks keep the layer's own experts and draw the rest from the borrowed ones") {
  nn::MoeConfig moe;
  moe.experts_per_layer = 4;
  moe.reuse = 4;  // pool 16; layer l owns [4 (l % 4), 4 (l % 4) + 4)
  nn::PsrConfig psr;
  CHECK(nn::psr_always_kept(psr, moe, 1).count == 0);  // the default, "random": nothing kept
  psr.masks = "own_first";
  std::vector<int64_t> borrowed_kept(16, 0);
  for (int64_t step = 0; step < 2000; ++step) {
    for (int64_t layer = 0; layer < 8; ++layer) {
      const nn::AlwaysKept own = nn::psr_always_kept(psr, moe, layer);
      CHECK(own.first == layer % 4 * 4);
      CHECK(own.count == 4);
      for (int64_t cand : {4, 9, 16}) {
        const auto keep = nn::psr_keep_mask(5, step, layer, 16, cand, own);
        CHECK(std::count(keep.begin(), keep.end(), 1) == cand);
        for (int64_t e = own.first; e < own.first + 4; ++e) CHECK(keep[e] == 1);
        if (cand == 9 && layer == 1)
          for (int64_t e = 0; e < 16; ++e) borrowed_kept[e] += keep[e];
      }
    }
  }
  // Layer 1 keeps its own 4 always and 5 of the 12 borrowed ones, each about 5/12 of the time.
  for (int64_t e = 0; e < 16; ++e) {
    if (e >= 4 && e < 8) {
      CHECK(borrowed_kept[e] == 2000);
    } else {
      CHECK(std::abs(static_cast<double>(borrowed_kept[e]) - 2000.0 * 5 / 12) < 100);
    }
  }
  // With nothing kept, the mask is the random one, bit for bit.
  CHECK(nn::psr_keep_mask(42, 3, 1, 16, 7, {}) == nn::psr_keep_mask(42, 3, 1, 16, 7));
  CHECK(error_message([] {
          nn::psr_keep_mask(1, 0, 0, 16, 3, {0, 4});
        }).find("3 candidates out of a pool of 16 with 4 always kept") != std::string::npos);
  // In a layer while N_t = N, own_first routes only to the layer's own experts.
  nn::ModelConfig c = small_config(4, 2, 2);  // pool 8, PSR from step 10 to 20
  c.psr.masks = "own_first";
  const Layers block = make_block(c, 15);
  Generator gen(16);
  const Tensor x = normal({40, c.d_model}, gen);
  for (int64_t layer = 0; layer < 4; ++layer) {
    const auto out = block.moe[static_cast<size_t>(layer)]->forward(x, {3, 9});
    CHECK(out.candidates == 2);
    for (int64_t e = 0; e < 8; ++e)
      if (e / 2 != layer) CHECK(out.expert_counts[e] == 0);
  }
}

// The mask of a Generator seeded with `seed`: the first `masked` picks of a partial Fisher-Yates
// shuffle of the experts outside [kept_first, kept_first + kept_count), written here from the
// method's description (rex/nn/psr.hpp) as the reference for psr_keep_mask and psr_keep.
std::vector<float> reference_mask(uint64_t seed, int64_t pool, int64_t masked,
                                  int64_t kept_first = 0, int64_t kept_count = 0) {
  std::vector<int64_t> maskable;
  for (int64_t e = 0; e < pool; ++e)
    if (e < kept_first || e >= kept_first + kept_count) maskable.push_back(e);
  std::vector<float> keep(static_cast<size_t>(pool), 1.0f);
  Generator gen(seed);
  for (int64_t i = 0; i < masked; ++i) {
    const auto j = i + static_cast<int64_t>(gen.below(maskable.size() - i));
    std::swap(maskable[i], maskable[j]);
    keep[maskable[i]] = 0.0f;
  }
  return keep;
}

// The seeds of the three scopes, as rex/backend/psr_mask.hpp specifies them.
uint64_t step_seed(uint64_t seed, int64_t step, int64_t layer) {
  return mix64(mix64(seed ^ 0x50535200ull) ^ static_cast<uint64_t>(step)) ^
         mix64(static_cast<uint64_t>(layer));
}
uint64_t sequence_seed(uint64_t seed, int64_t step, int64_t layer, int64_t sequence) {
  return mix64(mix64(step_seed(seed, step, layer)) ^ static_cast<uint64_t>(sequence));
}
uint64_t token_seed(uint64_t seed, int64_t step, int64_t layer, int64_t sequence,
                    int64_t position) {
  return mix64(mix64(sequence_seed(seed, step, layer, sequence)) ^ static_cast<uint64_t>(position));
}

std::vector<float> row_of(const Tensor& keep, int64_t row) {
  return slice(keep, 0, row, row + 1).to_vector<float>();
}

TEST_CASE("PSR step masks are the reference partial Fisher-Yates of the (seed, step, layer) hash") {
  for (int64_t layer = 0; layer < 3; ++layer) {
    for (int64_t step = 0; step < 30; ++step) {
      for (int64_t cand : {1, 5, 11}) {
        const auto keep = nn::psr_keep_mask(77, step, layer, 12, cand);
        CHECK(std::vector<float>(keep.begin(), keep.end()) ==
              reference_mask(step_seed(77, step, layer), 12, 12 - cand));
        const auto own = nn::psr_keep_mask(77, step, layer, 12, cand + 1, {4, 1});
        CHECK(std::vector<float>(own.begin(), own.end()) ==
              reference_mask(step_seed(77, step, layer), 12, 12 - cand - 1, 4, 1));
      }
    }
  }
}

TEST_CASE("PSR sequence and token masks: N_t per row, pure functions of their place in the batch") {
  nn::MoeConfig moe;
  moe.experts_per_layer = 8;
  moe.reuse = 4;  // pool 32
  nn::PsrConfig psr;
  psr.t_start = 10, psr.t_end = 20;
  const int64_t pool = 32, sequences = 4, length = 6, rows = sequences * length;
  const nn::TokenPlaces whole{rows, length};
  for (const int64_t step : {3, 15}) {
    const int64_t cand = nn::psr_candidates(psr, 8, 4, step);  // 8, then 8 + 24 * 5 / 10 = 20
    CHECK(cand == (step == 3 ? 8 : 20));
    for (const std::string scope : {"sequence", "token"}) {
      CAPTURE(scope);
      CAPTURE(step);
      psr.mask_scope = scope;
      const int64_t layer = 5;
      const Tensor keep = nn::psr_keep(psr, moe, 11, step, layer, whole, Device::cpu());
      REQUIRE(keep.shape() == Shape{rows, pool});
      CHECK(testing::same_bytes(keep, nn::psr_keep(psr, moe, 11, step, layer, whole,
                                                   Device::cpu())));  // pure
      std::set<std::vector<float>> distinct;
      for (int64_t r = 0; r < rows; ++r) {
        const std::vector<float> row = row_of(keep, r);
        CHECK(std::count(row.begin(), row.end(), 1.0f) == cand);  // exactly N_t kept
        CHECK(std::count(row.begin(), row.end(), 0.0f) == pool - cand);
        const int64_t sequence = r / length, position = r % length;
        const uint64_t seed = scope == "token" ? token_seed(11, step, layer, sequence, position)
                                               : sequence_seed(11, step, layer, sequence);
        CHECK(row == reference_mask(seed, pool, pool - cand));
        distinct.insert(row);
      }
      // A different place, a different mask: C(32, 8) > 1e7 masks for at most 24 places, so a
      // repeat would have probability below 276 / 1e7.
      CHECK(distinct.size() == static_cast<size_t>(scope == "token" ? rows : sequences));
      // A batch split 2 + 2 draws the masks of the unsplit one.
      for (int64_t first : {0, 2}) {
        const Tensor part =
            nn::psr_keep(psr, moe, 11, step, layer, {2 * length, length, first, 0}, Device::cpu());
        CHECK(testing::same_bytes(part, slice(keep, 0, first * length, (first + 2) * length)));
      }
      // A token decoded after 3 cached ones is position 3 of its sequence.
      const Tensor decoded = nn::psr_keep(psr, moe, 11, step, layer, {1, 1, 0, 3}, Device::cpu());
      CHECK(decoded.to_vector<float>() == row_of(keep, 3));
    }
  }
  // own_first: the layer's own experts in every row, N_t - N borrowed ones drawn per row.
  psr.masks = "own_first";
  psr.mask_scope = "token";
  const Tensor keep = nn::psr_keep(psr, moe, 11, 15, 6, whole, Device::cpu());  // owns [16, 24)
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<float> row = row_of(keep, r);
    CHECK(std::count(row.begin(), row.end(), 1.0f) == 20);
    CHECK(row == reference_mask(token_seed(11, 15, 6, r / length, r % length), pool, 12, 16, 8));
  }
  // After t_e nothing is masked in any scope.
  CHECK(!nn::psr_keep(psr, moe, 11, 20, 6, whole, Device::cpu()).defined());
}

TEST_CASE("PSR tie_block: the layers of a block share their masks in every scope") {
  nn::MoeConfig moe;
  moe.experts_per_layer = 8;
  moe.reuse = 4;
  nn::PsrConfig psr;
  psr.t_start = 10, psr.t_end = 20;
  psr.tie_block = true;
  const nn::TokenPlaces places{12, 4};
  for (const std::string scope : {"step", "sequence", "token"}) {
    CAPTURE(scope);
    psr.mask_scope = scope;
    std::vector<Tensor> layers;
    for (int64_t layer = 0; layer < 8; ++layer)
      layers.push_back(nn::psr_keep(psr, moe, 3, 12, layer, places, Device::cpu()));
    for (int64_t layer = 0; layer < 8; ++layer) {
      // Layer l draws block l / 4's masks: those of an untied layer l / 4.
      nn::PsrConfig untied = psr;
      untied.tie_block = false;
      CHECK(testing::same_bytes(
          layers[layer], nn::psr_keep(untied, moe, 3, 12, layer / 4, places, Device::cpu())));
      CHECK(testing::same_bytes(layers[layer], layers[layer / 4 * 4]));
    }
    CHECK(layers[0].to_vector<float>() != layers[4].to_vector<float>());
  }
}

TEST_CASE("PSR per-token masks in the layer: a token never routes to an expert masked for it") {
  nn::ModelConfig c = small_config(4, 2, 2);  // pool 8, PSR from step 10 to 20
  Generator gen(21);
  const Tensor x = normal({30, c.d_model}, gen);
  for (const std::string scope : {"sequence", "token"}) {
    for (const std::string gating : {"softmax_topk", "topk_softmax"}) {
      CAPTURE(scope);
      CAPTURE(gating);
      c.psr.mask_scope = scope;
      c.moe.gating = gating;
      const Layers block = make_block(c, 15);
      const int64_t step = 14, cand = nn::psr_candidates(c.psr, 2, 4, step);  // 2 + 6 * 4 / 10
      const nn::RoutingStep at{step, 9, nullptr, 1};
      const auto out = block.moe[1]->forward(x, at, true, 10);  // 3 sequences of 10, from the 2nd
      const Tensor keep = nn::psr_keep(c.psr, c.moe, 9, step, 1, {30, 10, 1, 0}, Device::cpu());
      // Each token's two choices are its two best kept experts: routing on scores where the
      // masked ones are -inf.
      const Tensor logits = block.moe[1]->router->forward(x);
      const Tensor scores = gating == "topk_softmax" ? logits : softmax(logits);
      std::vector<int64_t> counts(8, 0);
      for (int64_t t = 0; t < 30; ++t) {
        const std::vector<float> row = row_of(keep, t), score = row_of(scores, t);
        CHECK(std::count(row.begin(), row.end(), 1.0f) == cand);
        std::vector<int64_t> order;
        for (int64_t e = 0; e < 8; ++e)
          if (row[e] == 1.0f) order.push_back(e);
        std::stable_sort(order.begin(), order.end(),
                         [&](int64_t a, int64_t b) { return score[a] > score[b]; });
        ++counts[order[0]];
        ++counts[order[1]];
      }
      CHECK(out.expert_counts == counts);
    }
  }
}

TEST_CASE("config validation rejects impossible MoE settings with a message naming the keys") {
  auto message = [](auto edit) {
    nn::ModelConfig c;
    edit(c);
    return error_message([&] { nn::validate(c); });
  };
  CHECK(message([](nn::ModelConfig&) {}) == "(no rex::Error thrown)");
  CHECK(message([](nn::ModelConfig& c) {
          c.moe.top_k = 5;
        }).find("moe.top_k (5) cannot exceed moe.experts_per_layer (4)") != std::string::npos);
  CHECK(message([](nn::ModelConfig& c) {
          c.moe.reuse = 3;
        }).find("moe.reuse (3) must divide model.n_layers (4)") != std::string::npos);
  CHECK(message([](nn::ModelConfig& c) {
          c.moe.experts_per_layer = 0;
        }).find("moe.experts_per_layer must be positive") != std::string::npos);
  CHECK(message([](nn::ModelConfig& c) {
          c.n_kv_heads = 3;
        }).find("multiple of model.n_kv_heads") != std::string::npos);
  CHECK(message([](nn::ModelConfig& c) { c.psr.t_end = 10; }).find("psr.t_start < psr.t_end") !=
        std::string::npos);
  CHECK(message([](nn::ModelConfig& c) { c.ffn = "sparse"; }).find("model.ffn must be") !=
        std::string::npos);
  CHECK(message([](nn::ModelConfig& c) {
          c.psr.schedule = "cubic";
        }).find("psr.schedule must be") != std::string::npos);
  CHECK(message([](nn::ModelConfig& c) {
          c.psr.masks = "own";
        }).find("psr.masks must be \"random\" or \"own_first\", got \"own\"") != std::string::npos);
  CHECK(message([](nn::ModelConfig& c) {
          c.psr.mask_scope = "batch";
        }).find("psr.mask_scope must be \"step\", \"sequence\" or \"token\", got \"batch\"") !=
        std::string::npos);
  CHECK(message([](nn::ModelConfig& c) {
          c.psr.tie_block = true;
          c.psr.masks = "own_first";
        }).find("psr.tie_block shares one mask") != std::string::npos);
}

TEST_CASE("grouped_swiglu matches per-expert composed SwiGLUs and central differences") {
  Generator gen(21);
  const int64_t d = 6, h = 5;
  const std::vector<int64_t> offsets = {0, 3, 3, 7, 8};  // expert 1 gets no rows
  std::vector<Tensor> gate, up, down, all;
  for (int e = 0; e < 4; ++e) {
    gate.push_back(testing::random_normal_param({h, d}, gen, 0.0f, 0.5f));
    up.push_back(testing::random_normal_param({h, d}, gen, 0.0f, 0.5f));
    down.push_back(testing::random_normal_param({d, h}, gen, 0.0f, 0.5f));
  }
  Tensor x = testing::random_normal_param({8, d}, gen);
  const Tensor weights = normal({8, d}, gen);
  all = {x};
  for (const auto* list : {&gate, &up, &down}) all.insert(all.end(), list->begin(), list->end());
  auto grads_of = [&](const Tensor& y) {
    for (Tensor t : all) t.zero_grad();
    sum(y * weights).backward();
    std::vector<Tensor> out;
    for (const Tensor& t : all) out.push_back(t.grad().defined() ? t.grad().clone() : Tensor());
    return out;
  };
  const Tensor fused = grouped_swiglu(x, offsets, gate, up, down);
  const auto fused_grads = grads_of(fused);
  std::vector<Tensor> parts;
  for (int e = 0; e < 4; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    const Tensor rows = slice(x, 0, offsets[e], offsets[e + 1]);
    const Tensor hidden = silu(matmul(rows, gate[e], {.transpose_b = true})) *
                          matmul(rows, up[e], {.transpose_b = true});
    parts.push_back(matmul(hidden, down[e], {.transpose_b = true}));
  }
  const Tensor composed = concat(parts, 0);
  const auto composed_grads = grads_of(composed);
  // The composed matmuls and silu against the fused kernel: d products, silu (a call, 3), the
  // product and d_expert products, twice; the gradients retrace it and sum over up to 8 rows.
  const double chain = static_cast<double>(2 * d + 8 + 20);
  check_close(fused, composed, 2 * (testing::gamma_n(chain) + testing::kCallRoundoff));
  for (size_t i = 0; i < all.size(); ++i) {
    CAPTURE(i);
    REQUIRE(fused_grads[i].defined() == composed_grads[i].defined());
    if (fused_grads[i].defined())
      check_close(fused_grads[i], composed_grads[i],
                  2 * (testing::gamma_n(2 * chain + 8) + 2 * testing::kCallRoundoff));
  }
  CHECK(!fused_grads[2].defined());  // gate of the expert without rows
  CHECK_GRADIENTS(
      [&](const std::vector<Tensor>&) { return grouped_swiglu(x, offsets, gate, up, down); }, all);
  CHECK(error_message([&] {
          grouped_swiglu(x, {0, 3, 8}, gate, up, down);
        }).find("experts + 1 offsets") != std::string::npos);
  CHECK(error_message([&] {
          grouped_swiglu(x, {0, 3, 2, 7, 8}, gate, up, down);
        }).find("offsets decrease at expert 1") != std::string::npos);
}

TEST_CASE("plan_routing: slots counting-sorted by expert, their inverse, segments and tokens") {
  const int64_t pool = 5, k = 2;
  // 4 tokens, top-2; expert 4 gets nothing, expert 2 three slots.
  const std::vector<int32_t> expert_of_slot = {2, 0, 0, 3, 2, 1, 3, 2};
  const nn::RoutingPlan plan = nn::plan_routing(from_vector(expert_of_slot, Shape{4, k}), pool);
  // Written out: for each expert in turn, its slots in increasing order.
  std::vector<int32_t> sorted_slots, sorted_tokens;
  std::vector<int64_t> offsets = {0}, counts;
  for (int32_t e = 0; e < pool; ++e) {
    for (int32_t s = 0; s < 8; ++s)
      if (expert_of_slot[static_cast<size_t>(s)] == e) sorted_slots.push_back(s);
    counts.push_back(static_cast<int64_t>(sorted_slots.size()) - offsets.back());
    offsets.push_back(static_cast<int64_t>(sorted_slots.size()));
  }
  for (int32_t s : sorted_slots) sorted_tokens.push_back(s / static_cast<int32_t>(k));
  CHECK(plan.counts.offsets() == offsets);
  CHECK(plan.counts == counts);
  CHECK(plan.counts == std::vector<int64_t>{2, 1, 3, 2, 0});
  CHECK(plan.sorted_slots.to_vector<int32_t>() == sorted_slots);
  CHECK(plan.sorted_tokens.to_vector<int32_t>() == sorted_tokens);
  const std::vector<int32_t> positions = plan.slot_positions.to_vector<int32_t>();
  for (size_t p = 0; p < sorted_slots.size(); ++p)
    CHECK(positions[static_cast<size_t>(sorted_slots[p])] == static_cast<int32_t>(p));
  const std::string msg = error_message([] {
    nn::plan_routing(from_vector<int32_t>({0, 5}, Shape{1, 2}), 5);
  });
  CHECK(msg.find("sort_slots_by_expert: expert index 5 at slot 1 is outside the table of 5") !=
        std::string::npos);
}

// The gates' gradients are dot products over d that combine_slots adds in a warp's order, the
// composition in column order: they differ by rounding only, each side within gamma_d of the sum
// of its terms' magnitudes. Everything else keeps its bits.
TEST_CASE("dispatch_experts: permuting back gives the bits of the scatter-add it replaced") {
  const nn::ModelConfig c = small_config(2, 3, 2);
  const Layers block = make_block(c, 41);
  Generator gen(42);
  const int64_t tokens = 7, k = 2, pool = block.table->size();
  const Tensor x = testing::random_normal_param({tokens, c.d_model}, gen);
  const Tensor gates = testing::random_uniform_param({tokens, k}, gen, 0.0f, 1.0f);
  Tensor indices = Tensor::empty({tokens, k}, DType::i32);
  for (int64_t s = 0; s < tokens * k; ++s)  // experts 0 .. 4: expert 5 gets nothing
    indices.data<int32_t>()[s] = static_cast<int32_t>(gen.below(static_cast<uint64_t>(pool - 1)));
  const Tensor weights = normal({tokens, c.d_model}, gen);
  std::vector<Tensor> params = {x, gates};
  for (const auto& [name, p] : block.table->named_parameters()) params.push_back(p);
  // The output and every gradient, as bytes.
  auto bits = [&](const Tensor& y) {
    for (Tensor p : params) p.zero_grad();
    sum(y * weights).backward();
    std::vector<std::string> out = {testing::raw_bytes(y)};
    for (const Tensor& p : params)
      out.push_back(p.grad().defined() ? testing::raw_bytes(p.grad()) : std::string());
    return out;
  };
  auto gates_grad = [&] { return gates.grad().clone(); };
  const auto now = bits(nn::dispatch_experts(x, indices, gates, *block.table));
  const Tensor now_gates = gates_grad();
  const nn::RoutingPlan plan = nn::plan_routing(indices, pool);
  const Tensor y_sorted =
      grouped_swiglu(gather_rows(x, plan.sorted_tokens), plan.counts, block.table->gate_weights(),
                     block.table->up_weights(), block.table->down_weights());
  const Tensor scattered = scatter_add_rows(y_sorted, plan.sorted_slots, tokens * k);
  auto before =
      bits(sum(reshape(scattered, {tokens, k, c.d_model}) * reshape(gates, {tokens, k, 1}), 1));
  const Tensor before_gates = gates_grad();
  before[2] = now[2];  // the gates' gradient, compared below
  CHECK(now == before);
  CHECK(now.back().empty());  // expert 5's down weight: no token, no gradient
  const int64_t d = c.d_model;
  for (int64_t s = 0; s < tokens * k; ++s) {
    double magnitude = 0;  // sum over c of |g[t, c] y_slot[s, c]|, g = weights
    for (int64_t col = 0; col < d; ++col)
      magnitude += std::abs(static_cast<double>(weights.data<float>()[s / k * d + col]) *
                            scattered.data<float>()[s * d + col]);
    CHECK(
        std::abs(static_cast<double>(now_gates.data<float>()[s]) - before_gates.data<float>()[s]) <=
        2 * rex::testing::gamma_n(static_cast<double>(d)) * magnitude);
  }
}

TEST_CASE("balance_loss: the bits of sum(shares * mean(probs, 0)) * scale, gradient included") {
  Generator gen(43);
  for (const auto& [tokens, pool] : std::vector<std::pair<int64_t, int64_t>>{{7, 5}, {300, 16}}) {
    CAPTURE(tokens);
    const Tensor shares = uniform({pool}, gen, 0.0f, 0.5f);
    const float scale = 0.01f * static_cast<float>(pool);
    Tensor probs = softmax(normal({tokens, pool}, gen)).detach().requires_grad_();
    const Tensor weight = scalar(1.7f);
    const Tensor fused = balance_loss(probs, shares, scale);
    (fused * weight).backward();
    const std::string fused_grad = testing::raw_bytes(probs.grad());
    probs.zero_grad();
    const Tensor composed = sum(shares * mean(probs, 0)) * scale;
    (composed * weight).backward();
    CHECK(testing::raw_bytes(fused) == testing::raw_bytes(composed));
    CHECK(fused_grad == testing::raw_bytes(probs.grad()));
  }
  CHECK(error_message([] {
          balance_loss(zeros({3, 4}), zeros({5}), 1.0f);
        }).find("balance_loss: expected probs [T, P]") != std::string::npos);
}
