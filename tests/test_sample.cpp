// Sampling with a KV cache (rex/train/sample.hpp, TransformerLM::decode) against the full
// recompute per token, on small random models with several layers and grouped-query heads: dense,
// and ReX-MoE with shared experts under an active PSR mask.
//
// - The logits of both paths are compared step by step with a full forward pass over the window
//   the documented rule gives (computed here from the rule): recompute is that pass, byte for byte;
//   the cache is too right after a prefill (the same computation), and after that within the
//   model's rounding bound (tests/rounding.hpp: model_chain, both paths within gamma_N of exact).
// - Greedy text of the two paths is byte-identical, past the context too; each greedy choice is
//   checked to lead by more than the bound allows the cache to move it, so the identity is implied
//   by the bound, not a coincidence of this machine's rounding.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <rex/nn/decode_weights.hpp>
#include <rex/rex.hpp>
#include <rex/train/sample.hpp>

#include "rounding.hpp"
#include "testing.hpp"

using namespace rex;
using rex::testing::error_message;

namespace {

// Four layers, 4 query heads over 2 kv heads, a context of 8; MoE: 3 experts per layer shared by
// blocks of 2 layers (a pool of 6), top 2, one shared expert, PSR widening from step 2 to 6.
nn::ModelConfig small_model(const std::string& ffn) {
  nn::ModelConfig m;
  m.vocab_size = 11, m.d_model = 16, m.n_layers = 4, m.n_heads = 4, m.n_kv_heads = 2;
  m.context = 8, m.ffn = ffn, m.d_ff = 24, m.init_std = 0.3;
  m.moe.experts_per_layer = 3, m.moe.top_k = 2, m.moe.d_expert = 8, m.moe.reuse = 2;
  m.moe.shared_experts = 1;
  m.psr.t_start = 2, m.psr.t_end = 6;
  return m;
}

// Step 4: N_t = 4 of the pool of 6 (rex/nn/psr.hpp), so two experts of each layer are masked.
const nn::RoutingStep kMasked{4, 7};

int32_t arg_max(const Tensor& logits) {
  const std::vector<float> v = logits.to_vector();
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

// The last row of a full forward pass over `window`, on the host.
Tensor full_pass_logits(const nn::TransformerLM& model, const std::vector<int32_t>& window,
                        const nn::RoutingStep& at) {
  NoGradGuard no_grad;
  const auto time = static_cast<int64_t>(window.size());
  const Device device = model.named_parameters().front().second.device();
  const Tensor all = model.forward(from_vector(window, {1, time}).to(device), Tensor(), at)
                         .logits.to(Device::cpu());
  return reshape(slice(all, 0, time - 1, time), {-1});
}

// 40 greedy characters from "hi" by the KV cache and by the recompute path are the same text: 5
// contexts' worth, so the window restarts 9 times.
void check_greedy_texts_agree(const nn::TransformerLM& model) {
  const data::CharTokenizer tok = data::CharTokenizer::from_text("abcdefghijk");
  const std::string with_cache =
      train::generate(model, tok, "hi", 40, 0.0, 1, kMasked, train::Decoding::kv_cache);
  const std::string recomputed =
      train::generate(model, tok, "hi", 40, 0.0, 1, kMasked, train::Decoding::recompute);
  CHECK(with_cache.size() == 40);
  CHECK(with_cache == recomputed);
}

}  // namespace

TEST_CASE("sampling: the KV cache's logits match a full pass over the window, past the context") {
  for (const std::string ffn : {"dense", "moe"}) {
    const nn::ModelConfig m = small_model(ffn);
    const nn::TransformerLM model(m, 3);
    const double bound = 2 * testing::gamma_n(testing::model_chain(m, m.context).logits);
    // A prompt shorter than the context, and one longer (its last 8 tokens are the first window).
    for (const std::vector<int32_t>& prompt :
         {std::vector<int32_t>{1, 4, 1, 5, 9},
          std::vector<int32_t>{2, 7, 1, 8, 2, 8, 1, 8, 2, 8}}) {
      CAPTURE(ffn);
      CAPTURE(prompt.size());
      train::NextTokenLogits cached(model, prompt, kMasked, train::Decoding::kv_cache);
      train::NextTokenLogits recomputed(model, prompt, kMasked, train::Decoding::recompute);
      // The window rule: the last `context` tokens; when longer, the last context / 2 = 4.
      std::vector<int32_t> tokens = prompt;
      int64_t start = std::max<int64_t>(0, static_cast<int64_t>(tokens.size()) - m.context);
      bool prefilled = true;  // the cache has just filled the window from scratch
      for (int step = 0; step < 4 * m.context; ++step) {
        CAPTURE(step);
        const std::vector<int32_t> window(tokens.begin() + start, tokens.end());
        REQUIRE(recomputed.window() == window);
        REQUIRE(cached.window() == window);
        const Tensor full = full_pass_logits(model, window, kMasked);
        CHECK(testing::same_bytes(recomputed.logits(), full));
        if (prefilled) {
          CHECK(testing::same_bytes(cached.logits(), full));
        } else {
          CHECK(testing::relative_error(cached.logits(), full) <= bound);
        }
        REQUIRE(testing::arg_max_holds_within(full, bound));
        const int32_t next = arg_max(full);
        CHECK(arg_max(cached.logits()) == next);
        tokens.push_back(next);
        prefilled = static_cast<int64_t>(tokens.size()) - start > m.context;
        if (prefilled) start = static_cast<int64_t>(tokens.size()) - m.context / 2;
        cached.append(next);
        recomputed.append(next);
      }
    }
  }
}

TEST_CASE("sampling: greedy text with the KV cache is the recompute path's, byte for byte") {
  for (const std::string ffn : {"dense", "moe"}) {
    CAPTURE(ffn);
    const nn::TransformerLM model(small_model(ffn), 5);
    check_greedy_texts_agree(model);
  }
}

TEST_CASE("sampling: bad input to the KV cache is refused with a clear message") {
  const nn::ModelConfig m = small_model("moe");
  const nn::TransformerLM model(m, 3);
  CHECK(error_message([&] {
          train::generate_tokens(model, {}, 4, 0.0, 1, kMasked);
        }).find("the prompt must not be empty") != std::string::npos);
  nn::KvCache cache;
  const Tensor two = from_vector(std::vector<int32_t>{1, 2}, {1, 2});
  model.decode(two, cache, kMasked);
  CHECK(cache.length() == 2);
  // Once filled, the cache takes one token at a time, and never more than the context.
  CHECK(error_message([&] {
          model.decode(two, cache, kMasked);
        }).find("TransformerLM::decode: expected ids [1, T]") == 0);
  const Tensor one = from_vector(std::vector<int32_t>{3}, {1, 1});
  for (int64_t i = 2; i < m.context; ++i) model.decode(one, cache, kMasked);
  CHECK(cache.length() == m.context);
  CHECK(error_message([&] { model.decode(one, cache, kMasked); }).find("after 8 cached tokens") !=
        std::string::npos);
  // A cache belongs to the model that filled it.
  nn::KvCache deep;
  model.decode(two, deep, kMasked);
  nn::ModelConfig shallow = m;
  shallow.n_layers = 2;
  CHECK(error_message([&] {
          nn::TransformerLM(shallow, 3).decode(one, deep, kMasked);
        }).find("the cache holds 4 layers, the model has 2") != std::string::npos);
  nn::KvCache fresh;
  CHECK(error_message([&] {
          model.decode(from_vector(std::vector<int32_t>(9, 1), {1, 9}), fresh, kMasked);
        }).find("1 <= T <= context (8)") != std::string::npos);
  CHECK(error_message([&] {
          model.decode(from_vector(std::vector<int32_t>(4, 1), {2, 2}), fresh, kMasked);
        }).find("got [2, 2]") != std::string::npos);
}

TEST_CASE("decoding in bf16 multiplies by weights rounded once, as detail::gemm does in bf16") {
  // y = round(x) round(W)^T: each product of two 8-bit significands is exact in float, so the
  // only other error is the fp32 sum, within gamma_k sum |x_p w_p| of the exact sum. k = 39 is
  // not a multiple of the 4 rows the kernel takes at a time.
  const int64_t n = 45, k = 39;
  Generator gen(11);
  const Tensor weight = normal(Shape{n, k}, gen), x = normal(Shape{k}, gen);
  std::vector<float> y(n), fp32_y(n), again(n);
  nn::DecodeWeights fp32_weights;
  fp32_weights.times(x.data<float>(), weight, fp32_y.data());
  detail::gemm(x.data<float>(), weight.data<float>(), y.data(), 1, n, k, false, true);
  CHECK(y == fp32_y);  // in fp32, detail::gemm's own call
  {
    const testing::CpuPrecision scope("bf16");
    nn::DecodeWeights weights;
    weights.times(x.data<float>(), weight, y.data());
    weights.times(x.data<float>(), weight, again.data());  // from the copy made by the first call
  }
  CHECK(again == y);
  const double gamma = testing::gamma_n(static_cast<double>(k));
  int differs = 0;
  for (int64_t j = 0; j < n; ++j) {
    double exact = 0, magnitude = 0;
    for (int64_t p = 0; p < k; ++p) {
      const double term = testing::rounded_to_bits(x.data<float>()[p], 8) *
                          testing::rounded_to_bits(weight.at({j, p}), 8);
      exact += term, magnitude += std::fabs(term);
    }
    CHECK(std::fabs(y[j] - exact) <= gamma * magnitude);
    differs += std::fabs(fp32_y[j] - exact) > gamma * magnitude;
  }
  CHECK(differs > n / 2);  // fp32 operands would not pass: the rounding took place
}

TEST_CASE("sampling in bf16: the KV cache's greedy text is the bf16 recompute path's") {
  // In bf16 both paths round every product's operands (rex/core/precision.hpp); the cache reads
  // its bf16 copies of the weights. A prefill is forward's computation, byte for byte; the text
  // is identical, past the context too (unlike fp32, no bound here implies it: a sum order can
  // move an activation across a bf16 rounding boundary, a jump of up to 2^-8 relative).
  for (const std::string ffn : {"dense", "moe"}) {
    CAPTURE(ffn);
    const nn::TransformerLM model(small_model(ffn), 5);
    const std::vector<int32_t> prompt{1, 4, 1, 5, 9};
    train::NextTokenLogits fp32_cache(model, prompt, kMasked, train::Decoding::kv_cache);
    fp32_cache.append(2);
    const testing::CpuPrecision scope("bf16");
    train::NextTokenLogits cached(model, prompt, kMasked, train::Decoding::kv_cache);
    CHECK(testing::same_bytes(cached.logits(), full_pass_logits(model, prompt, kMasked)));
    cached.append(2);
    CHECK_FALSE(testing::same_bytes(cached.logits(), fp32_cache.logits()));
    check_greedy_texts_agree(model);
  }
}
