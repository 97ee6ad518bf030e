// Every op of the engine on CUDA against the same op on the CPU: forward values and the gradient of
// every input, on random inputs, each within a bound derived from how the two may round (below,
// and docs/testing.md, "Tolerances"). Then the pieces of a training step (MoE dispatch, AdamW,
// clipping, a whole TransformerLM step) and the CUDA-specific errors. Without a GPU each case
// prints "SKIPPED:" and CTest reports it as skipped.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <rex/backend/cuda/runtime.hpp>
#include <rex/data/tokenizer.hpp>
#include <rex/nn/transformer.hpp>
#include <rex/optim/clip.hpp>
#include <rex/rex.hpp>
#include <rex/train/checkpoint.hpp>
#include <rex/train/sample.hpp>
#include <rex/train/step.hpp>

#include "cuda_testing.hpp"
#include "meeting_gradients.hpp"
#include "rounding.hpp"
#include "testing.hpp"

using namespace rex;
using rex::testing::error_message;
using rex::testing::gpu_missing;

namespace {

// Built twice: against rex::cuda (test_cuda: a real GPU, or every case skipped) and against the
// CUDA emulation (test_cuda_emulated, CTest "emulated/...", which runs the same kernels on the
// CPU).
const Device kGpu = Device::cuda();

// ---- Bounds ------------------------------------------------------------------------------------
// Both devices evaluate every op with the same formulas (rex/backend/pointwise.hpp; the row sums of
// softmax, log-sum-exp and rms_norm in double on both), so their results differ only where they may
// round differently, and each is within these of the exact result:
//  - an n-term float sum or dot product in any order (Eigen's or cuBLAS's GEMM blocking, a block
//    reduction's tree, a sequential loop) is within gamma_n of exact, relative to the sum of its
//    terms' magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, (3.5));
//  - every other operation is one rounding, relative size u = 2^-24: the two may fuse a
//    multiply and an add into one FMA differently (GCC does on the CPU when the target has FMA,
//    nvcc on a GPU, the emulation never does);
//  - a math-library call is within its documented error, 4 ulp = 8u on either side (kCall:
//    tests/rounding.hpp says whose documentation).
// Errors along a chain compose as (1 + gamma_a)(1 + gamma_b) <= 1 + gamma_(a+b) (Higham,
// Lemma 3.3). rounding_bound(R, F, kappa) is twice (both devices) the bound of one side after R
// roundings (or R terms of sums) and F calls, where the formula amplifies relative errors at most
// kappa times. It is relative to the CPU result for pointwise formulas without cancellation; for
// sums of products it is relative to the magnitudes of the terms (abs_terms); for the composite ops
// (softmax family, attention, the MoE pieces, a model step) it counts the chain of operations
// relative to the result, which for random-sign sums of n terms is the classic bound stated against
// the result: their rounding error has a standard deviation near 0.4 sqrt(n) u of the result
// (independent roundings, Higham and Mary, SIAM J. Sci. Comput. 41 (2019)), so gamma_n = n u stands
// at least 2.5 sqrt(n) standard deviations out, and a chain's errors add in quadrature where the
// bound adds them.
using testing::gamma_n;                           // tests/rounding.hpp
constexpr double kU = testing::kUnitRoundoff;     // float's unit roundoff
constexpr double kCall = testing::kCallRoundoff;  // one math-library call on one side
double rounding_bound(double roundings, double calls = 0, double kappa = 1) {
  return 2 * kappa * (gamma_n(roundings) + calls * kCall);
}

using testing::distance, testing::norm, testing::relative_error;  // tests/rounding.hpp

using testing::abs_of;

// Random values that are multiples of 1/64 in [low, high]: their sums (below 2^18 in size) are
// exact in float in any order, so sums of them can be compared exactly.
Tensor dyadic(const Shape& shape, Generator& gen, float low = -1.0f, float high = 1.0f) {
  Tensor x = uniform(shape, gen, low, high);
  for (int64_t i = 0; i < x.numel(); ++i)
    x.data<float>()[i] = std::round(x.data<float>()[i] * 64.0f) / 64.0f;
  return x;
}

struct Input {
  Tensor value;  // on the CPU
  bool differentiable = true;
};

Input param(const Shape& shape, Generator& gen, float low = -1.0f, float high = 1.0f) {
  return {uniform(shape, gen, low, high), true};
}
Input dyadic_param(const Shape& shape, Generator& gen) { return {dyadic(shape, gen), true}; }
Input constant(const Tensor& value) { return {value, false}; }

using Fn = std::function<Tensor(const std::vector<Tensor>&)>;
// What a bound is relative to: for the inputs and the output gradient, one tensor for the output
// and then one per input (undefined: the CPU result), whose norm the bound multiplies.
using ScaleFn = std::function<std::vector<Tensor>(const std::vector<Input>&, const Tensor& grad)>;

// ||gpu - cpu|| <= rel ||scale||: the CPU result by default; 0 asks for bit-equal results.
struct Bound {
  double rel = 0;
  ScaleFn scale;
  Bound(double r)
      : rel(r) {}  // NOLINT(google-explicit-constructor): a number is relative to the CPU
  Bound(double r, ScaleFn s) : rel(r), scale(std::move(s)) {}
};

// The magnitudes behind an op made of sums and products (add, mul, div, matmul, ...): the op on
// |inputs| and its gradients for |grad| give the sum of |terms| of every element, which the gamma_n
// bounds are relative to. (A subtraction's is not a magnitude; it is only used where its forward
// is one rounding of the same operands on both devices, hence equal.)
ScaleFn abs_terms(Fn fn) {
  return [fn](const std::vector<Input>& inputs, const Tensor& grad) {
    std::vector<Tensor> in;
    for (const Input& i : inputs) {
      Tensor a = i.value.dtype() == DType::f32 ? abs_of(i.value) : i.value.clone();
      if (i.differentiable) a.requires_grad_();
      in.push_back(a);
    }
    const Tensor out = fn(in);
    std::vector<Tensor> scales{abs_of(out.detach())};
    if (grad.defined()) out.backward(abs_of(grad));
    for (const Tensor& a : in) scales.push_back(a.grad().defined() ? abs_of(a.grad()) : Tensor());
    return scales;
  };
}

// Runs fn on CPU copies and on CUDA copies of the inputs, backpropagates the same random output
// gradient through both, and compares the output and every input gradient within `bound`.
void compare_op(const std::string& name, const std::vector<Input>& inputs, const Fn& fn,
                const Bound& bound) {
  CAPTURE(name);
  std::vector<Tensor> cpu, gpu;
  for (const Input& in : inputs) {
    Tensor c = in.value.clone(), g = in.value.copy_to(kGpu);
    if (in.differentiable) c.requires_grad_(), g.requires_grad_();
    cpu.push_back(c), gpu.push_back(g);
  }
  const Tensor out_cpu = fn(cpu), out_gpu = fn(gpu);
  Generator gen(99);
  const Tensor grad =
      out_cpu.requires_grad() ? uniform(out_cpu.shape(), gen, -1.0f, 1.0f) : Tensor();
  const std::vector<Tensor> scales =
      bound.scale ? bound.scale(inputs, grad) : std::vector<Tensor>{};
  const auto within = [&](const Tensor& got, const Tensor& want, size_t k) {
    const bool scaled = k < scales.size() && scales[k].defined();
    const double diff = distance(got, want), limit = bound.rel * norm(scaled ? scales[k] : want);
    CAPTURE(diff);
    CAPTURE(limit);
    CHECK(diff <= limit);
  };
  CHECK(out_gpu.device() == kGpu);
  within(out_gpu, out_cpu, 0);
  if (!out_cpu.requires_grad()) return;
  out_cpu.backward(grad);
  out_gpu.backward(grad.copy_to(kGpu));
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].differentiable) continue;
    CAPTURE(i);
    REQUIRE(cpu[i].grad().defined() == gpu[i].grad().defined());
    if (!cpu[i].grad().defined()) continue;
    CHECK(gpu[i].grad().device() == kGpu);
    within(gpu[i].grad(), cpu[i].grad(), i + 1);
  }
}

// The row-wise ops: cpu/reduce.hpp and reduce.cu run the same formulas with the row sums in
// double (whose order adds nothing at float precision), so each side's chain is short.
// softmax: y = expf(x - m) * float(1 / s), 3 roundings and a call; its backward
// y (g - float(sum g y)) adds 3 roundings and y's own difference (a call).
const double kSoftmaxBound = rounding_bound(6, 2);
// log_softmax: (x - m) - float(log s), 3 roundings and the expf's in s; its backward
// g - expf(y) float(sum g): 3 roundings and a call.
const double kLogSoftmaxBound = rounding_bound(6, 2);
// cross_entropy: the mean over rows of lse - x_t in double, from the expf's of s (a call), rounded
// once; its backward float(g / count) * float(exp(x - lse)), minus the scale at the target: 4
// roundings, and lse's difference through the exp (a call). Random logits keep each row's loss
// O(1), away from the cancellation of a confident prediction (lse near x_t).
const double kCrossEntropyBound = rounding_bound(5, 2);

// rms_norm: y = x * r * w with r = float(1 / sqrt(mean(x^2) + eps)) from a double sum (3
// roundings); dx = r (g w - xhat * float(mean(g w xhat))), xhat = x r (6 roundings), cancels
// (entirely for a row of one element: the exact dx is of the size of eps), so it is bounded
// against its terms' magnitude r (|g w| + |xhat| |mean(g w xhat)|); dw = float(sum over rows of
// g xhat) in double (2 roundings), against sum |g xhat|. The output against itself.
Bound rms_norm_bound(float eps) {
  return Bound(rounding_bound(6), [eps](const std::vector<Input>& in, const Tensor& g) {
    NoGradGuard no_grad;
    const Tensor &x = in[0].value, &w = in[1].value;
    const Tensor r = rsqrt(mean(x * x, -1, true) + eps), xhat = x * r, gw = g * w;
    const Tensor dx = r * (abs_of(gw) + abs_of(xhat) * abs_of(mean(gw * xhat, -1, true)));
    const Tensor dw = sum_to(abs_of(g) * abs_of(xhat), w.shape());
    return std::vector<Tensor>{Tensor(), dx, dw};
  });
}

// causal_attention over group G = Hq / Hkv, T positions, D dims. Forward: a score sums D products
// and is scaled (1), exponentiated against the row max (2 and a call), normalised (2), and an
// output sums T products. Backward: p again (a call), dp sums D products, delta = sum p dp (in
// double: 1), ds = scale p (dp - delta) (3), then dq sums T and dk, dv sum G T products. Chained:
// 2 D + (G + 2) T + 10 terms and 2 calls, against the result (the composite rule above).
double attention_bound(int64_t group, int64_t time, int64_t dim) {
  return rounding_bound(static_cast<double>(2 * dim + (group + 2) * time + 10), 2);
}

using testing::model_chain, testing::ModelChain;  // tests/rounding.hpp

// Checks one AdamW step taken on both devices from the same parameters, state and gradients. Both
// follow PyTorch's order of operations (rex/optim/adamw.hpp) and differ only where one fuses a
// multiply-add that the other rounds twice. Per element, each is within gamma_2 |p| of the exact
// decayed weight; within gamma_11 lr A of the exact step lr m^ / (sqrt(v^) + eps) (11 roundings:
// the scalars, m, v, sqrt, the two bias corrections, eps, the division), where
// A = (beta1 |m_old| + (1 - beta1) |g|) / bc1 / (sqrt(v^) + eps) bounds the magnitude of the terms
// of m^ over the denominator (m_old the first moment before the step, v the second after it); and
// within u |p_new| after the final add. The two within twice that.
void check_adamw_step(const std::string& name, const Tensor& before, const Tensor& cpu_after,
                      const Tensor& gpu_after, const Tensor& grad, const Tensor& m_old,
                      const Tensor& v_new, int64_t step, float lr, const optim::AdamWOptions& o) {
  CAPTURE(name);
  const std::vector<float> p = before.to_vector(), c = cpu_after.to_vector(),
                           g = gpu_after.to_vector(), grads = grad.to_vector(),
                           m = m_old.to_vector(), v = v_new.to_vector();
  const double beta1 = o.beta1, bc1 = 1 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1 - std::pow(static_cast<double>(o.beta2), static_cast<double>(step));
  double worst = 0;  // largest |gpu - cpu| / bound
  for (size_t i = 0; i < p.size(); ++i) {
    const double a = (beta1 * std::fabs(m[i]) + (1 - beta1) * std::fabs(grads[i])) / bc1 /
                     (std::sqrt(v[i] / bc2) + o.eps);
    const double bound =
        2 * (gamma_n(2) * std::fabs(p[i]) + gamma_n(11) * lr * a + kU * std::fabs(c[i]));
    const double diff = std::fabs(static_cast<double>(g[i]) - c[i]);
    worst = std::max(worst, diff > 0 ? diff / bound : 0.0);
  }
  CHECK(worst <= 1.0);
}

Tensor ids_tensor(const Shape& shape, int32_t upper, Generator& gen) {
  Tensor ids = Tensor::empty(shape, DType::i32);
  for (int64_t i = 0; i < ids.numel(); ++i)
    ids.data<int32_t>()[i] =
        static_cast<int32_t>(gen.uniform() * static_cast<float>(upper)) % upper;
  return ids;
}

}  // namespace

TEST_CASE("cuda ops: tensors move between devices and keep their values") {
  if (gpu_missing()) return;
  Generator gen(1);
  const Tensor x = uniform({3, 5}, gen);
  const Tensor on_gpu = x.to(kGpu);
  CHECK(on_gpu.device() == kGpu);
  CHECK(testing::same_bytes(on_gpu.to(Device::cpu()), x));
  CHECK(on_gpu.at({2, 4}) == x.at({2, 4}));
  Tensor filled = Tensor::empty({7}, DType::i32, kGpu);
  filled.fill_(-3.0f);
  CHECK(filled.to_vector<int32_t>() == std::vector<int32_t>(7, -3));
  CHECK(error_message([&] { (void)on_gpu.data<float>(); }).find("cuda:0 tensor") !=
        std::string::npos);
  // Gradients cross the device boundary.
  Tensor leaf = x.clone();
  leaf.requires_grad_();
  sum(mul(leaf.to(kGpu), 3.0f)).backward();
  CHECK(leaf.grad().device() == Device::cpu());
  testing::check_close(leaf.grad(), full({3, 5}, 3.0f), 0.0);
}

TEST_CASE("cuda ops: the caching allocator stops calling cudaMalloc in steady state") {
  if (gpu_missing()) return;
  const auto& cuda = detail::cuda_backend();
  auto step = [] {
    Tensor a = ones({256, 256}, kGpu), b = ones({256, 256}, kGpu);
    (void)matmul(a, b).to_vector();
  };
  step();
  const int64_t before = cuda.memory_stats().device_mallocs;
  for (int i = 0; i < 5; ++i) step();
  CHECK(cuda.memory_stats().device_mallocs == before);
}

TEST_CASE("cuda ops: elementwise, broadcasting and scalar forms") {
  if (gpu_missing()) return;
  Generator gen(2);
  // sum_of: the same chain of adds on both devices, so the same bits; 40 terms take two launches
  // (kSumTermsPerLaunch = 32), the second starting from the first's sum.
  for (const int count : {2, 40}) {
    std::vector<Input> terms;
    for (int i = 0; i < count; ++i) terms.push_back(param({5, 9}, gen, -8.0f, 8.0f));
    compare_op(
        "sum_of " + std::to_string(count), terms, [](const auto& t) { return sum_of(t); }, 0.0);
    // The partial sum written beside it, in the first launch and in the second.
    for (const size_t prefix : {size_t{2}, size_t{33}}) {
      if (prefix >= static_cast<size_t>(count)) continue;
      compare_op(
          "sum_of_with_prefix " + std::to_string(count) + ", " + std::to_string(prefix), terms,
          [prefix](const auto& t) { return sum_of_with_prefix(t, prefix).prefix; }, 0.0);
    }
  }
  const std::vector<std::pair<std::string, Fn>> binaries = {
      {"add", [](const auto& t) { return add(t[0], t[1]); }},
      {"sub", [](const auto& t) { return sub(t[0], t[1]); }},
      {"mul", [](const auto& t) { return mul(t[0], t[1]); }},
      {"div", [](const auto& t) { return div(t[0], t[1]); }},
  };
  for (const auto& [name, fn] : binaries) {
    // The forward is one rounding of the same operands on both devices. A gradient term takes at
    // most 3 roundings (div's -g a / b^2) and a broadcast input sums up to 15 of them (the scalar
    // form): gamma_(15 + 3) of the terms' magnitudes.
    const Bound bound(rounding_bound(15 + 3), abs_terms(fn));
    compare_op(name + " same shape", {param({4, 6}, gen), param({4, 6}, gen, 0.5f, 2.0f)}, fn,
               bound);
    compare_op(name + " broadcast", {param({2, 1, 6}, gen), param({3, 1}, gen, 0.5f, 2.0f)}, fn,
               bound);
    compare_op(name + " scalar", {param({5, 3}, gen), param({}, gen, 0.5f, 2.0f)}, fn, bound);
  }
  // Inputs in [0.2, 2]. Each bound counts the roundings R and library calls F of the forward and
  // of the backward dx = g * slope (pointwise.hpp), with the formula's own amplification kappa of
  // a relative error where one subtraction can cancel over that range.
  const std::vector<std::tuple<std::string, Fn, Bound>> unaries = {
      {"neg", [](const auto& t) { return neg(t[0]); }, 0.0},  // exact
      // expf; g y
      {"exp", [](const auto& t) { return exp(t[0]); }, rounding_bound(1, 1)},
      // logf; g (1 / x)
      {"log", [](const auto& t) { return log(t[0]); }, rounding_bound(2, 1)},
      // IEEE sqrtf; g (0.5 / y)
      {"sqrt", [](const auto& t) { return sqrt(t[0]); }, rounding_bound(2)},
      // 1 / sqrtf; g (-0.5 y y y)
      {"rsqrt", [](const auto& t) { return rsqrt(t[0]); }, rounding_bound(6)},
      // powf (4 ulp, counted as two calls); g s powf(x, s - 1)
      {"pow", [](const auto& t) { return pow(t[0], 1.7f); }, rounding_bound(3, 2)},
      // tanhf; g (1 - y y): y^2 <= tanh(2)^2 = 0.93 amplifies y's error 2y^2 / (1 - y^2) <= 27
      {"tanh", [](const auto& t) { return tanh(t[0]); }, rounding_bound(3, 1, 27)},
      // 1 / (1 + expf(-x)); g y (1 - y), where y <= sigmoid(2) amplifies y's error y / (1 - y) <= 8
      {"sigmoid", [](const auto& t) { return sigmoid(t[0]); }, rounding_bound(5, 1, 8)},
      // x s with s = sigmoid(x); g s (1 + x (1 - s)): the same 1 - s
      {"silu", [](const auto& t) { return silu(t[0]); }, rounding_bound(8, 1, 8)},
      {"relu", [](const auto& t) { return relu(t[0]); }, 0.0},  // exact
      // 0.5 x (1 + erff(x / sqrt 2)); its slope adds x expf(-x^2 / 2) / sqrt(2 pi): positive terms
      {"gelu", [](const auto& t) { return gelu(t[0]); }, rounding_bound(8, 2)},
      // one rounding forward, at most 3 backward (rdiv's -s / (x x))
      {"add_scalar", [](const auto& t) { return t[0] + 0.5f; }, rounding_bound(3)},
      {"sub_scalar", [](const auto& t) { return t[0] - 0.5f; }, rounding_bound(3)},
      {"rsub_scalar", [](const auto& t) { return 0.5f - t[0]; }, rounding_bound(3)},
      {"mul_scalar", [](const auto& t) { return t[0] * 1.5f; }, rounding_bound(3)},
      {"div_scalar", [](const auto& t) { return t[0] / 1.5f; }, rounding_bound(3)},
      {"rdiv_scalar", [](const auto& t) { return 1.5f / t[0]; }, rounding_bound(3)},
  };
  for (const auto& [name, fn, bound] : unaries)
    compare_op(name, {param({3, 7, 5}, gen, 0.2f, 2.0f)}, fn, bound);
  compare_op(
      "relu around 0", {param({64}, gen)}, [](const auto& t) { return relu(t[0]); }, 0.0);
  // y = silu(a) b, db = g a s, da = g b s (1 + a (1 - s)) with s = sigmoid(a) (expf on the device,
  // Eigen's vectorised exp on the CPU): 8 roundings and 2 calls, and the bracket cancels where
  // a (1 - s) = -1, so the bound is on the terms' magnitudes, which swiglu(|a|, |b|) and its
  // gradients for |g| bound from above up to a factor 1 + |a| <= 4 (a in [-3, 3]).
  const Fn swiglu_fn = [](const auto& t) { return swiglu(t[0], t[1]); };
  compare_op("swiglu", {param({6, 10}, gen, -3.0f, 3.0f), param({6, 10}, gen)}, swiglu_fn,
             Bound(rounding_bound(8, 2, 4), abs_terms(swiglu_fn)));
}

TEST_CASE("cuda ops: reductions, shapes and broadcasting") {
  if (gpu_missing()) return;
  Generator gen(3);
  // Over a middle axis both devices add each output's elements in the same order (cpu::sum_axis,
  // sum_middle_kernel): exact.
  compare_op(
      "sum axis", {param({4, 5, 6}, gen)}, [](const auto& t) { return sum(t[0], 1); }, 0.0);
  // A whole-tensor sum is a sequential loop on the CPU and a block tree on the device, which differ
  // in the last bits (by up to 2 gamma_560 of the sum of |x|); on multiples of 1/64 every partial
  // sum is exact in either order, so the comparison is exact and catches any dropped term.
  compare_op(
      "sum all", {dyadic_param({33, 17}, gen)}, [](const auto& t) { return sum(t[0]); }, 0.0);
  // The exact sum (as above), then the division by n and the gradient g / n: two roundings.
  compare_op(
      "mean keepdim", {dyadic_param({4, 5, 6}, gen)},
      [](const auto& t) { return mean(t[0], -1, true); }, rounding_bound(2));
  compare_op(
      "max axis", {param({4, 5, 6}, gen)}, [](const auto& t) { return max(t[0], 1); }, 0.0);
  compare_op(
      "max all", {param({40}, gen)}, [](const auto& t) { return max(t[0]); }, 0.0);
  compare_op(
      "broadcast_to", {param({3, 1, 4}, gen)},
      [](const auto& t) {
        return broadcast_to(t[0], {2, 3, 5, 4});
      },
      0.0);
  // Both devices add each output's elements in x's row-major order (cpu::sum_to, sum_to_kernel):
  // exact. broadcast_to's gradient above is the same sum.
  compare_op(
      "sum_to", {param({2, 3, 5, 4}, gen)},
      [](const auto& t) {
        return sum_to(t[0], {3, 1, 4});
      },
      0.0);
  compare_op(
      "permute", {param({2, 3, 4, 5}, gen)},
      [](const auto& t) {
        return permute(t[0], {2, 0, 3, 1});
      },
      0.0);
  compare_op(
      "transpose", {param({6, 7}, gen)}, [](const auto& t) { return transpose(t[0], 0, 1); }, 0.0);
  compare_op(
      "slice middle axis", {param({3, 8, 2}, gen)},
      [](const auto& t) { return slice(t[0], 1, 2, 6); }, 0.0);
  compare_op(
      "concat", {param({2, 3, 4}, gen), param({2, 5, 4}, gen)},
      [](const auto& t) {
        return concat({t[0], t[1]}, 1);
      },
      0.0);
  compare_op(
      "stack", {param({3, 4}, gen), param({3, 4}, gen)},
      [](const auto& t) {
        return stack({t[0], t[1]}, 1);
      },
      0.0);
  compare_op(
      "reshape", {param({3, 4}, gen)},
      [](const auto& t) {
        return reshape(t[0] * 2.0f, {2, 6});
      },
      0.0);
}

namespace {

// matmul on both devices: 2-d, transposed, batched, with a shared and a broadcast b, each within
// rounding_bound(factor n) of |A||B|, n the longest sum of the output and the two gradients (a
// broadcast B's gradient also sums over the batch).
void compare_matmuls(Generator& gen, double factor) {
  const auto gemm = [factor](const std::string& name, const std::vector<Input>& inputs,
                             const Fn& fn, int64_t n) {
    compare_op(name, inputs, fn,
               Bound(rounding_bound(factor * static_cast<double>(n)), abs_terms(fn)));
  };
  const Fn plain = [](const auto& t) { return matmul(t[0], t[1]); };
  gemm("2d", {param({7, 9}, gen), param({9, 5}, gen)}, plain, 9);
  gemm(
      "transposes", {param({9, 7}, gen), param({5, 9}, gen)},
      [](const auto& t) {
        return matmul(t[0], t[1], {true, true});
      },
      9);
  gemm("batched", {param({3, 4, 6, 5}, gen), param({3, 4, 5, 2}, gen)}, plain, 6);
  gemm("shared b", {param({3, 6, 5}, gen), param({5, 2}, gen)}, plain, 3 * 6);
  gemm("broadcast batch", {param({2, 3, 4, 5}, gen), param({2, 1, 5, 3}, gen)}, plain, 3 * 4);
}

}  // namespace

TEST_CASE("cuda ops: matmul through cuBLAS, batched and transposed") {
  if (gpu_missing()) return;
  // Eigen's GEMM on the CPU and cuBLAS (or the emulation's double loop) sum each dot product in
  // their own order: within gamma_n of the terms' magnitudes |A||B| each.
  Generator gen(4);
  compare_matmuls(gen, 1);
}

TEST_CASE("cuda ops: matmul in tf32 and bf16 agrees with the CPU's in the same precision") {
  if (gpu_missing()) return;
  // Both devices multiply the same rounded operands exactly and sum in fp32, in their own orders
  // (rex/core/precision.hpp): within gamma_n of |A||B| each, or 2 gamma_n on a GPU whose tensor
  // cores truncate their fp32 sums; rounding_bound(2 n) = 2 gamma_2n covers the 3 gamma_n. (The
  // fp32 product of the same operands differs by about 2^-9 of |A||B| in bf16, 2^-12 in tf32.)
  for (const char* precision : {"tf32", "bf16"}) {
    CAPTURE(precision);
    set_matmul_precision(Device::cpu(), precision);
    set_matmul_precision(kGpu, precision);
    Generator gen(14);
    compare_matmuls(gen, 2);
    set_matmul_precision(Device::cpu(), "fp32");
    set_matmul_precision(kGpu, "fp32");
  }
}

TEST_CASE("cuda ops: softmax, log_softmax, cross_entropy and rms_norm") {
  if (gpu_missing()) return;
  Generator gen(5);
  compare_op(
      "softmax", {param({5, 37}, gen, -4.0f, 4.0f)}, [](const auto& t) { return softmax(t[0]); },
      kSoftmaxBound);
  compare_op(
      "log_softmax", {param({5, 300}, gen, -4.0f, 4.0f)},
      [](const auto& t) { return log_softmax(t[0]); }, kLogSoftmaxBound);
  Tensor targets = ids_tensor({12}, 11, gen);
  targets.data<int32_t>()[3] = -100;  // ignored row
  compare_op(
      "cross_entropy", {param({12, 11}, gen, -5.0f, 5.0f), constant(targets)},
      [](const auto& t) { return cross_entropy(t[0], t[1]); }, kCrossEntropyBound);
  compare_op(
      "rms_norm", {param({6, 48}, gen), param({48}, gen, 0.5f, 1.5f)},
      [](const auto& t) { return rms_norm(t[0], t[1], 1e-5f); }, rms_norm_bound(1e-5f));
}

TEST_CASE("cuda ops: rope and causal attention with grouped-query heads") {
  if (gpu_missing()) return;
  Generator gen(6);
  // Each output is x_a cos -+ x_b sin from the same host-built tables (3 roundings, against
  // |x_a cos| + |x_b sin|); the rotation keeps norms, so over all outputs that is at most sqrt 2
  // times the result's norm.
  compare_op(
      "rope", {param({2, 3, 9, 8}, gen)}, [](const auto& t) { return rope(t[0]); },
      rounding_bound(3, 0, std::sqrt(2.0)));
  compare_op(
      "rope_heads", {param({2, 9, 24}, gen)},
      [](const auto& t) { return rope_heads(t[0], 3, 500.0f, 7); },
      rounding_bound(3, 0, std::sqrt(2.0)));
  // rope_qk: the bits of rope_heads of q and of k side by side, on the device itself.
  testing::check_rope_qk(2, 9, 4, 2, 8, kGpu, gen);
  testing::check_rope_qk(1, 1, 3, 1, 2, kGpu, gen);
  for (const auto& [heads, kv_heads, time, dim] :
       std::vector<std::array<int64_t, 4>>{{4, 2, 13, 8}, {2, 2, 1, 4}, {6, 3, 70, 40}}) {
    compare_op(
        "causal_attention " + std::to_string(heads) + "/" + std::to_string(kv_heads) +
            " T=" + std::to_string(time),
        {param({2, heads, time, dim}, gen), param({2, kv_heads, time, dim}, gen),
         param({2, kv_heads, time, dim}, gen)},
        [](const auto& t) { return causal_attention(t[0], t[1], t[2]); },
        attention_bound(heads / kv_heads, time, dim));
  }
  // And against the composed reference on the GPU itself (the same chain, through matmul,
  // masked_fill and softmax).
  compare_op(
      "attention reference",
      {param({1, 2, 9, 4}, gen), param({1, 1, 9, 4}, gen), param({1, 1, 9, 4}, gen)},
      [](const auto& t) { return causal_attention_reference(t[0], t[1], t[2]); },
      attention_bound(2, 9, 4));
  // Time first, and with q and k packed (as the model calls it): the bits of heads first,
  // gradients included.
  testing::check_time_first_attention({2, 13, 4, 8}, {2, 13, 2, 8}, kGpu, gen);
  testing::check_time_first_attention({1, 1, 2, 4}, {1, 1, 2, 4}, kGpu, gen);
  testing::check_time_first_attention({2, 70, 6, 40}, {2, 70, 3, 40}, kGpu, gen);
}

// A tied embedding (the model's): the head's product gives the weight its gradient first, and the
// embedding's scatter then adds its rows into that gradient in its own launch. The result must be
// the bits of the two gradients made apart and added (the engine's add, before).
TEST_CASE(
    "cuda ops: a tied embedding adds its rows into the weight's gradient inside the scatter") {
  if (gpu_missing()) return;
  Generator gen(17);
  const Tensor weight = normal(Shape{9, 4}, gen), ids = ids_tensor({12}, 9, gen);
  const Tensor g = normal(Shape{12, 9}, gen).to(kGpu);
  const Tensor gpu_ids = ids.to(kGpu);
  // Together: x = embedding(W, ids), logits = x W^T.
  const Tensor w = weight.to(kGpu).requires_grad_();
  matmul(embedding(w, gpu_ids), w, {.transpose_b = true}).backward(g);
  // Apart: the head's gradient with x held fixed, x's gradient scattered, then added.
  const Tensor head_w = weight.to(kGpu).requires_grad_();
  const Tensor x = embedding(weight.to(kGpu), gpu_ids).detach().requires_grad_();
  matmul(x, head_w, {.transpose_b = true}).backward(g);
  const Tensor apart = head_w.grad() + scatter_add_rows(x.grad(), gpu_ids, 9);
  CHECK(testing::raw_bytes(w.grad().to(Device::cpu())) ==
        testing::raw_bytes(apart.to(Device::cpu())));
}

TEST_CASE("cuda ops: gather, scatter, embedding, where, masked_fill and topk") {
  if (gpu_missing()) return;
  Generator gen(7);
  const Tensor index = ids_tensor({20}, 6, gen);
  compare_op(
      "gather_rows", {param({6, 5}, gen), constant(index)},
      [](const auto& t) { return gather_rows(t[0], t[1]); }, 0.0);
  compare_op(
      "scatter_add_rows", {param({20, 5}, gen), constant(index)},
      [](const auto& t) { return scatter_add_rows(t[0], t[1], 6); }, 0.0);
  compare_op(
      "embedding", {param({9, 4}, gen), constant(ids_tensor({3, 5}, 9, gen))},
      [](const auto& t) { return embedding(t[0], t[1]); }, 0.0);
  Tensor condition = uniform({4, 1, 6}, gen);  // never masks a whole row (column 0 stays)
  for (int64_t i = 0; i < condition.numel(); ++i)
    condition.data<float>()[i] = condition.data<float>()[i] > 0.5f && i % 6 != 0 ? 1.0f : 0.0f;
  compare_op(
      "where", {constant(condition), param({3, 6}, gen), param({4, 3, 1}, gen)},
      [](const auto& t) { return where(t[0], t[1], t[2]); }, 0.0);
  Tensor same_shape = uniform({3, 6}, gen);  // cond, a and b all [3, 6]: the contiguous path
  for (int64_t i = 0; i < same_shape.numel(); ++i)
    same_shape.data<float>()[i] = same_shape.data<float>()[i] > 0.5f ? 1.0f : 0.0f;
  compare_op(
      "where, same shapes", {constant(same_shape), param({3, 6}, gen), param({3, 6}, gen)},
      [](const auto& t) { return where(t[0], t[1], t[2]); }, 0.0);
  compare_op(
      "masked_fill -inf then softmax", {param({4, 3, 6}, gen), constant(condition)},
      [](const auto& t) {
        return softmax(masked_fill(t[0], t[1], -std::numeric_limits<float>::infinity()) + 0.0f);
      },
      kSoftmaxBound);
  Tensor ties = uniform({7, 12}, gen);
  ties.data<float>()[3] = ties.data<float>()[5];                         // a tie inside row 0
  ties.data<float>()[12 + 4] = std::numeric_limits<float>::quiet_NaN();  // NaN ranks first
  const TopK cpu = topk(ties, 3), gpu = topk(ties.to(kGpu), 3);
  CHECK(gpu.indices.to_vector<int32_t>() == cpu.indices.to_vector<int32_t>());
  compare_op(
      "topk values", {param({7, 12}, gen)}, [](const auto& t) { return topk(t[0], 4).values; },
      0.0);
  // Masked (PSR's form): a mask per row and one for every row, hidden entries chosen too (k = 9
  // of 12 with fewer kept in some rows), gradients zero there on both devices.
  Tensor row_keep = Tensor::empty(Shape{7, 12});
  for (int64_t i = 0; i < row_keep.numel(); ++i)
    row_keep.data<float>()[i] = gen.below(3) == 0 ? 0.0f : 1.0f;
  const Tensor one_keep = from_vector<float>({1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1});
  for (const Tensor& keep : {row_keep, one_keep}) {
    const TopK masked_cpu = topk(ties, 9, TopKMask{keep, -1.0f}),
               masked_gpu = topk(ties.to(kGpu), 9, TopKMask{keep.to(kGpu), -1.0f});
    CHECK(masked_gpu.indices.to_vector<int32_t>() == masked_cpu.indices.to_vector<int32_t>());
    compare_op(
        "masked topk values", {param({7, 12}, gen), constant(keep)},
        [](const auto& t) {
          return topk(t[0], 9, TopKMask{t[1], -1.0f}).values;
        },
        0.0);
  }
}

TEST_CASE("cuda ops: grouped_swiglu and the MoE layer") {
  if (gpu_missing()) return;
  Generator gen(8);
  // The load-balancing loss sums in the same order on both devices: the same bits, also over a
  // pool wider than the kernel's block (300 experts: two passes of 256).
  for (const int64_t pool : {12, 300}) {
    compare_op(
        "balance_loss",
        {param({37, pool}, gen, 0.0f, 1.0f), constant(uniform({pool}, gen, 0.0f, 1.0f))},
        [](const auto& t) { return balance_loss(t[0], t[1], 0.12f); }, 0.0);
  }
  const std::vector<int64_t> offsets{0, 3, 3, 10, 12};  // expert 1 gets no rows
  std::vector<Input> inputs{param({12, 6}, gen)};
  for (int kind = 0; kind < 3; ++kind)
    for (int e = 0; e < 4; ++e) inputs.push_back(param(kind < 2 ? Shape{5, 6} : Shape{6, 5}, gen));
  compare_op(
      "grouped_swiglu", inputs,
      [&](const auto& t) {
        const std::vector<Tensor> gate(t.begin() + 1, t.begin() + 5),
            up(t.begin() + 5, t.begin() + 9), down(t.begin() + 9, t.begin() + 13);
        return grouped_swiglu(t[0], offsets, gate, up, down);
      },
      // Chained: gate and up sum 6 products, SwiGLU takes 8 roundings and 2 calls, down sums 5;
      // backward: 6 (through down), 8 (SwiGLU), 10 (dx over gate and up) and up to 7 rows per
      // expert for the weights' gradients. 6 + 8 + 5 + 6 + 8 + 10 + 7 = 50 terms, 2 calls.
      rounding_bound(50, 2));
}

// An expert table shared by two layers (two grouped_swiglu calls on the same weights): the call
// that runs backward second adds its weight gradients into the first's inside its products (the
// engine gives it the .grad() they have: Node::adds_to_leaf_grads), where the engine added them
// after. Against the two calls' gradients computed apart and added: the same bits in fp32 and bf16
// (grouped products: each element's sum is finished, then added once); in tf32 the per-expert
// cuBLAS products add with beta = 1, fl(S + C) for the engine's fl(fl(S) + C): within 3u (|S| +
// |result|), as for matmul (S being the product of whichever call ran second). With every expert
// routed rows in both layers, and with expert 1 routed none in the second (then it has one gradient
// only, and the other call's products add only if the experts it makes gradients for all have one).
TEST_CASE("cuda ops: layers sharing an expert table add to its gradients inside the products") {
  if (gpu_missing()) return;
  Generator gen(12);
  const int64_t d = 6, h = 10, rows = 12;
  const std::vector<int64_t> first{0, 3, 5, 10, 12};
  const Tensor xa = uniform({rows, d}, gen), xb = uniform({rows, d}, gen);
  const Tensor ra = uniform({rows, d}, gen), rb = uniform({rows, d}, gen);
  std::vector<Tensor> weights;
  for (int kind = 0; kind < 3; ++kind)
    for (int e = 0; e < 4; ++e)
      weights.push_back(uniform(kind < 2 ? Shape{h, d} : Shape{d, h}, gen));
  auto leaves = [&] {
    std::vector<Tensor> w;
    for (const Tensor& t : weights) w.push_back(t.copy_to(kGpu).requires_grad_());
    return w;
  };
  auto loss = [&](const std::vector<Tensor>& w, const Tensor& x,
                  const std::vector<int64_t>& offsets, const Tensor& r) {
    const std::vector<Tensor> gate(w.begin(), w.begin() + 4), up(w.begin() + 4, w.begin() + 8),
        down(w.begin() + 8, w.end());
    return sum(grouped_swiglu(x.to(kGpu), offsets, gate, up, down) * r.to(kGpu));
  };
  for (const std::vector<int64_t>& second :
       {std::vector<int64_t>{0, 4, 6, 9, 12}, std::vector<int64_t>{0, 4, 4, 9, 12}}) {
    for (const char* precision : {"fp32", "bf16", "tf32"}) {
      CAPTURE(precision);
      CAPTURE(second[2]);
      set_matmul_precision(kGpu, precision);
      const std::vector<Tensor> together = leaves(), a = leaves(), b = leaves();
      (loss(together, xa, first, ra) + loss(together, xb, second, rb)).backward();
      loss(a, xa, first, ra).backward();
      loss(b, xb, second, rb).backward();
      set_matmul_precision(kGpu, "fp32");
      for (size_t i = 0; i < weights.size(); ++i) {
        CAPTURE(i);
        const Tensor got = together[i].grad().to(Device::cpu());
        const Tensor ga = a[i].grad().to(Device::cpu());
        if (!b[i].grad().defined()) {  // expert 1 in the second layer: no rows
          CHECK(testing::same_bytes(got, ga));
          continue;
        }
        const Tensor gb = b[i].grad().to(Device::cpu());
        const Tensor apart = ga + gb;
        if (std::string(precision) != "tf32") {
          CHECK(testing::same_bytes(got, apart));
          continue;
        }
        for (int64_t j = 0; j < got.numel(); ++j) {
          // S is whichever of the two ran second: both are in the sum.
          const float s = std::fabs(ga.data<float>()[j]) + std::fabs(gb.data<float>()[j]) +
                          std::fabs(apart.data<float>()[j]);
          CHECK(std::fabs(got.data<float>()[j] - apart.data<float>()[j]) <= 3 * kU * s);
        }
      }
    }
  }
}

// SwiGLU inside the grouped products (GroupedRows::swiglu_out and swiglu_backward) against the
// same products stored and then swiglu_kernel and swiglu_backward_kernel: bit for bit, on the
// same device (the kernels run the formulas of backend/pointwise.hpp on the same floats). Segments
// of 0, 1, 63, 130 and 206 rows and h = 80 (partial tiles both ways), in bf16 and in fp32.
TEST_CASE("cuda ops: the grouped products' SwiGLU and its backward give the bits of the kernels") {
  if (gpu_missing()) return;
  for (const bool fp32 : {false, true}) {
    CAPTURE(fp32);
    const std::vector<int64_t> offsets{0, 0, 1, 64, 194, 400};
    const int64_t experts = 5, rows = 400, d = 96, h = 80;
    Generator gen(47);
    const auto f = [](const Tensor& t) { return t.device_data<float>(); };
    const auto& cuda = rex::detail::cuda_backend();
    rex::detail::GroupedSegments segments;
    segments.host_offsets = offsets.data(), segments.experts = experts, segments.rows = rows;
    const Tensor x = uniform({rows, d}, gen, -2, 2).to(kGpu);
    std::vector<Tensor> w[3];  // gate and up [h, d], down [d, h]
    std::vector<const float*> w_ptr[3];
    for (int kind = 0; kind < 3; ++kind)
      for (int64_t e = 0; e < experts; ++e) {
        w[kind].push_back(uniform(kind < 2 ? Shape{h, d} : Shape{d, h}, gen, -0.5, 0.5).to(kGpu));
        w_ptr[kind].push_back(f(w[kind].back()));
      }
    rex::detail::GroupedRows gate_up;
    gate_up.fp32 = fp32, gate_up.pairs = 2, gate_up.n = h, gate_up.k = d;
    gate_up.a[0] = gate_up.a[1] = f(x);
    gate_up.host_w[0] = w_ptr[0].data(), gate_up.host_w[1] = w_ptr[1].data();
    // Unfused: the two products, then swiglu_kernel.
    const Tensor gate = zeros({rows, h}, kGpu), up = zeros({rows, h}, kGpu);
    const Tensor act = zeros({rows, h}, kGpu);
    gate_up.c[0] = f(gate), gate_up.c[1] = f(up);
    cuda.grouped_rows(segments, gate_up);
    cuda.swiglu(f(gate), f(up), f(act), rows * h);
    // Fused.
    const Tensor gate_2 = zeros({rows, h}, kGpu), up_2 = zeros({rows, h}, kGpu);
    const Tensor act_2 = zeros({rows, h}, kGpu);
    gate_up.c[0] = f(gate_2), gate_up.c[1] = f(up_2), gate_up.swiglu_out = f(act_2);
    cuda.grouped_rows(segments, gate_up);
    CHECK(testing::same_bytes(gate_2.to(Device::cpu()), gate.to(Device::cpu())));
    CHECK(testing::same_bytes(up_2.to(Device::cpu()), up.to(Device::cpu())));
    CHECK(testing::same_bytes(act_2.to(Device::cpu()), act.to(Device::cpu())));

    // Back through down: d act = g down_e stored, then swiglu_backward_kernel; or fused.
    const Tensor g = uniform({rows, d}, gen, -1, 1).to(kGpu);
    rex::detail::GroupedRows back;
    back.fp32 = fp32, back.transpose_w = false, back.n = h, back.k = d;
    back.a[0] = f(g), back.host_w[0] = w_ptr[2].data();
    const Tensor d_act = zeros({rows, h}, kGpu);
    const Tensor d_gate = zeros({rows, h}, kGpu), d_up = zeros({rows, h}, kGpu);
    back.c[0] = f(d_act);
    cuda.grouped_rows(segments, back);
    cuda.swiglu_backward(f(gate), f(up), f(d_act), f(d_gate), f(d_up), rows * h);
    const Tensor d_gate_2 = zeros({rows, h}, kGpu), d_up_2 = zeros({rows, h}, kGpu);
    back.c[0] = nullptr;
    back.swiglu_backward = {f(gate), f(up), f(d_gate_2), f(d_up_2)};
    cuda.grouped_rows(segments, back);
    CHECK(testing::same_bytes(d_gate_2.to(Device::cpu()), d_gate.to(Device::cpu())));
    CHECK(testing::same_bytes(d_up_2.to(Device::cpu()), d_up.to(Device::cpu())));
    // The products are not trivial: some activations and gradients are far from zero.
    const auto largest = [](const Tensor& t) {
      const Tensor on_cpu = t.to(Device::cpu());
      float most = 0.0f;
      for (int64_t i = 0; i < on_cpu.numel(); ++i)
        most = std::max(most, std::fabs(on_cpu.data<float>()[i]));
      return most;
    };
    CHECK(largest(act) > 0.5f);
    CHECK(largest(d_gate) > 0.1f);
  }
}

// The grouped expert products (kernels/grouped_gemm.cu, the experts' products when CUDA computes
// in bf16) through the backend table, against sums in double of the operands rounded to bf16
// independently (rounded_to_bits): every product of two bf16 values is exact, so each output is
// within gamma_k of the exact sum of its k terms' magnitudes (fp32 sums in any order), or twice
// that on tensor cores that truncate inside (the 2 gamma_k the matmul case allows). Segments of
// 0, 1, 63, 130 and 206 rows (empty, single, partial and two-tile: tiles are 128 rows), widths
// 80 and 160 (a partial tile, and one full tile and a partial one, as n and as k), both pair
// modes and skipped outputs. The fp32 products of the same operands
// fall outside the bound for most outputs, so the bf16 rounding is what is checked.
// Both forms: bf16 (tensor cores) and fp32 (CUDA cores). Each output must be within the bound of
// its own precision's sum (the operands rounded to bf16 or not), and more than half of them outside
// the other precision's, so that the test sees which arithmetic ran.
TEST_CASE("cuda ops: grouped expert products in bf16 and in fp32 against a naive loop") {
  if (gpu_missing()) return;
  for (const bool fp32 : {false, true}) {
    CAPTURE(fp32);
    const std::vector<int64_t> offsets{0, 0, 1, 64, 194, 400};
    const int64_t experts = 5, rows = 400, d = 160, h = 80;
    Generator gen(31);
    // The operands as the products see them.
    const auto as_used = [fp32](float x) { return fp32 ? x : testing::rounded_to_bits(x, 8); };
    const auto as_other = [fp32](float x) { return fp32 ? testing::rounded_to_bits(x, 8) : x; };
    // Checks got [r, c] against want(i, j) -> {sum, sum of |terms|, the other precision's sum, k};
    // returns how many outputs the other precision's products would have missed the bound by.
    const auto check = [&](const Tensor& got, const auto& want) {
      int other_outside = 0;
      for (int64_t i = 0; i < got.dim(0); ++i)
        for (int64_t j = 0; j < got.dim(1); ++j) {
          const auto [exact, magnitude, other, k] = want(i, j);
          const double bound = 2 * gamma_n(static_cast<double>(k)) * magnitude + 1e-30;
          CAPTURE(i);
          CAPTURE(j);
          REQUIRE(std::fabs(got.at({i, j}) - exact) <= bound);
          other_outside += std::fabs(other - exact) > bound ? 1 : 0;
        }
      return other_outside;
    };
    struct Sum {
      double exact = 0, magnitude = 0, other = 0;
      int64_t k = 0;
    };
    const auto expert_of = [&](int64_t row) {
      int64_t e = 0;
      while (offsets[static_cast<size_t>(e + 1)] <= row) ++e;
      return e;
    };
    const auto f = [](const Tensor& t) { return t.device_data<float>(); };
    const auto& cuda = rex::detail::cuda_backend();
    rex::detail::GroupedSegments segments;  // the offsets uploaded from the host
    segments.host_offsets = offsets.data(), segments.experts = experts, segments.rows = rows;

    // Rows form, two pairs splitting the columns: c_p = x w_p[e]^T (the experts' gate and up).
    const Tensor x = uniform({rows, d}, gen, -1, 1), x_gpu = x.to(kGpu);
    std::vector<Tensor> w[2], w_gpu[2];
    std::vector<const float*> w_ptr[2];
    for (int pair = 0; pair < 2; ++pair)
      for (int64_t e = 0; e < experts; ++e) {
        w[pair].push_back(uniform({h, d}, gen, -1, 1));
        w_gpu[pair].push_back(w[pair].back().to(kGpu));
        w_ptr[pair].push_back(f(w_gpu[pair].back()));
      }
    Tensor c_gpu[2] = {zeros({rows, h}, kGpu), zeros({rows, h}, kGpu)};
    rex::detail::GroupedRows split;
    split.fp32 = fp32, split.pairs = 2, split.n = h, split.k = d;
    split.a[0] = split.a[1] = f(x_gpu);
    split.host_w[0] = w_ptr[0].data(), split.host_w[1] = w_ptr[1].data();
    split.c[0] = f(c_gpu[0]), split.c[1] = f(c_gpu[1]);
    cuda.grouped_rows(segments, split);
    for (int pair = 0; pair < 2; ++pair) {
      CAPTURE(pair);
      const int outside = check(c_gpu[pair].to(Device::cpu()), [&](int64_t r, int64_t j) {
        const Tensor& we = w[pair][static_cast<size_t>(expert_of(r))];
        Sum s{0, 0, 0, d};
        for (int64_t p = 0; p < d; ++p) {
          const double term = static_cast<double>(as_used(x.at({r, p}))) * as_used(we.at({j, p}));
          s.exact += term, s.magnitude += std::fabs(term);
          s.other += static_cast<double>(as_other(x.at({r, p}))) * as_other(we.at({j, p}));
        }
        return s;
      });
      CHECK(outside > rows * h / 2);
    }

    // Rows form, two pairs adding into one output: c = a_0 v_0[e] + a_1 v_1[e], v [k, n] (dx).
    const Tensor a[2] = {uniform({rows, h}, gen, -1, 1), uniform({rows, h}, gen, -1, 1)};
    const Tensor a_gpu[2] = {a[0].to(kGpu), a[1].to(kGpu)};
    rex::detail::GroupedRows summed;
    summed.fp32 = fp32, summed.pairs = 2, summed.sum_pairs = true, summed.transpose_w = false;
    summed.n = d, summed.k = h;
    summed.a[0] = f(a_gpu[0]), summed.a[1] = f(a_gpu[1]);
    summed.host_w[0] = w_ptr[0].data(), summed.host_w[1] = w_ptr[1].data();  // read as [h, d]
    const Tensor dx_gpu = zeros({rows, d}, kGpu);
    summed.c[0] = f(dx_gpu);
    cuda.grouped_rows(segments, summed);
    check(dx_gpu.to(Device::cpu()), [&](int64_t r, int64_t j) {
      Sum s{0, 0, 0, 2 * h};
      for (int pair = 0; pair < 2; ++pair) {
        const Tensor& ve = w[pair][static_cast<size_t>(expert_of(r))];
        for (int64_t p = 0; p < h; ++p) {
          const double term =
              static_cast<double>(as_used(a[pair].at({r, p}))) * as_used(ve.at({p, j}));
          s.exact += term, s.magnitude += std::fabs(term);
          s.other += static_cast<double>(as_other(a[pair].at({r, p}))) * as_other(ve.at({p, j}));
        }
      }
      return s;
    });

    // Weights form, two pairs sharing b: c_p[e] = a_p^T x over the segment's rows; the empty
    // expert 0 and pair 1 of expert 2 get no output, and their buffers stay as they were.
    std::vector<Tensor> grads[2];
    std::vector<float*> grad_ptr[2];
    for (int pair = 0; pair < 2; ++pair)
      for (int64_t e = 0; e < experts; ++e) {
        grads[pair].push_back(full({h, d}, 7.0f, kGpu));
        const bool skipped = e == 0 || (pair == 1 && e == 2);
        grad_ptr[pair].push_back(skipped ? nullptr : f(grads[pair].back()));
      }
    rex::detail::GroupedWeights weights;
    weights.fp32 = fp32, weights.pairs = 2, weights.m = h, weights.n = d;
    weights.a[0] = f(a_gpu[0]), weights.a[1] = f(a_gpu[1]), weights.b = f(x_gpu);
    weights.host_c[0] = grad_ptr[0].data(), weights.host_c[1] = grad_ptr[1].data();
    cuda.grouped_weights(segments, weights);
    for (int pair = 0; pair < 2; ++pair)
      for (int64_t e = 0; e < experts; ++e) {
        CAPTURE(pair);
        CAPTURE(e);
        const Tensor got = grads[pair][static_cast<size_t>(e)].to(Device::cpu());
        if (grad_ptr[pair][static_cast<size_t>(e)] == nullptr) {
          CHECK(relative_error(got, full({h, d}, 7.0f)) == 0);
          continue;
        }
        const int64_t first = offsets[static_cast<size_t>(e)],
                      last = offsets[static_cast<size_t>(e + 1)];
        check(got, [&](int64_t i, int64_t j) {
          Sum s{0, 0, 0, std::max<int64_t>(last - first, 1)};
          for (int64_t r = first; r < last; ++r) {
            const double term =
                static_cast<double>(as_used(a[pair].at({r, i}))) * as_used(x.at({r, j}));
            s.exact += term, s.magnitude += std::fabs(term);
            s.other += static_cast<double>(as_other(a[pair].at({r, i}))) * as_other(x.at({r, j}));
          }
          return s;
        });
      }

    // The offsets in device memory, as a routing plan leaves them: every expert gets an output,
    // the empty expert 0 zeros, the others the same bits as above.
    const std::shared_ptr<void> device_offsets =
        rex::detail::cuda_buffer(offsets.size() * sizeof(int64_t));
    rex::detail::device_memory().copy(device_offsets.get(), offsets.data(),
                                      offsets.size() * sizeof(int64_t),
                                      rex::detail::DeviceCopy::host_to_device);
    rex::detail::GroupedSegments on_device = segments;
    on_device.host_offsets = nullptr;
    on_device.device_offsets = static_cast<const int64_t*>(device_offsets.get());
    std::vector<Tensor> every[2];
    std::vector<float*> every_ptr[2];
    for (int pair = 0; pair < 2; ++pair)
      for (int64_t e = 0; e < experts; ++e) {
        every[pair].push_back(full({h, d}, 7.0f, kGpu));
        every_ptr[pair].push_back(f(every[pair].back()));
      }
    weights.host_c[0] = every_ptr[0].data(), weights.host_c[1] = every_ptr[1].data();
    cuda.grouped_weights(on_device, weights);
    for (int pair = 0; pair < 2; ++pair)
      for (int64_t e = 0; e < experts; ++e) {
        CAPTURE(pair);
        CAPTURE(e);
        const Tensor got = every[pair][static_cast<size_t>(e)].to(Device::cpu());
        if (e == 0) {
          CHECK(relative_error(got, zeros({h, d})) == 0);
        } else if (grad_ptr[pair][static_cast<size_t>(e)] != nullptr) {
          CHECK(got.to_vector<float>() ==
                grads[pair][static_cast<size_t>(e)].to(Device::cpu()).to_vector<float>());
        }
      }
  }
}

// The launch shapes' edges: empty extents, single rows and elements, rows longer than the largest
// block (each thread takes several elements), many-chunk column sums, and grids too small for their
// rows (grid-stride loops that wrap: the spilled attention workspace caps the grid at 1024 blocks,
// sum_squares always launches 256 blocks of 256 threads).
TEST_CASE("cuda ops: edge shapes of every launch scheme") {
  if (gpu_missing()) return;
  Generator gen(11);
  const auto empty_rows = [&](const std::string& name, const Shape& shape, auto fn) {
    compare_op(
        name, {param(shape, gen)}, [=](const auto& t) { return fn(t[0]); }, 0.0);
  };
  empty_rows("exp of [0, 5]", {0, 5}, [](const Tensor& x) { return exp(x); });
  empty_rows("sum over an empty axis", {3, 0, 2}, [](const Tensor& x) { return sum(x, 1); });
  empty_rows("softmax of [0, 7]", {0, 7}, [](const Tensor& x) { return softmax(x); });
  empty_rows("permute of [2, 0, 3]", {2, 0, 3}, [](const Tensor& x) {
    return permute(x, {2, 0, 1});
  });
  for (const Shape& shape : std::vector<Shape>{{1, 1}, {3, 5000}, {2, 4097}}) {
    CAPTURE(shape.dims());
    compare_op(
        "softmax", {param(shape, gen, -4.0f, 4.0f)}, [](const auto& t) { return softmax(t[0]); },
        kSoftmaxBound);
    compare_op(
        "log_softmax", {param(shape, gen, -4.0f, 4.0f)},
        [](const auto& t) { return log_softmax(t[0]); }, kLogSoftmaxBound);
    // A block tree against the CPU's loop: exact on multiples of 1/64 ("sum all" above).
    compare_op(
        "sum over the last axis", {dyadic_param(shape, gen)},
        [](const auto& t) { return sum(t[0], 1); }, 0.0);
    compare_op(
        "max over the last axis", {param(shape, gen)}, [](const auto& t) { return max(t[0], 1); },
        0.0);
    compare_op(
        "rms_norm", {param(shape, gen), param({shape[1]}, gen, 0.5f, 1.5f)},
        [](const auto& t) { return rms_norm(t[0], t[1], 1e-5f); }, rms_norm_bound(1e-5f));
    compare_op(
        "cross_entropy",
        {param(shape, gen, -3.0f, 3.0f),
         constant(ids_tensor({shape[0]}, static_cast<int32_t>(shape[1]), gen))},
        [](const auto& t) { return cross_entropy(t[0], t[1]); }, kCrossEntropyBound);
    compare_op(
        "topk", {param(shape, gen)}, [](const auto& t) { return topk(t[0], 1).values; }, 0.0);
  }
  compare_op(  // the CPU's order (as "sum axis"): exact
      "sum over a middle axis with a long inner extent", {param({2, 3, 700}, gen)},
      [](const auto& t) { return sum(t[0], 1); }, 0.0);
  compare_op(
      "max over a middle axis", {param({2, 5, 300}, gen)},
      [](const auto& t) { return max(t[0], 1); }, 0.0);
  compare_op(
      "rms_norm over 300 rows (19 column chunks)",
      {param({300, 8}, gen), param({8}, gen, 0.5f, 1.5f)},
      [](const auto& t) { return rms_norm(t[0], t[1], 1e-5f); }, rms_norm_bound(1e-5f));
  // dw's column tiles are each finished by the last of their chunks' blocks: several of both, and
  // no rows at all (dw then zero).
  compare_op(
      "rms_norm over 40 rows of 700 (3 chunks of 6 column tiles, the last one partial)",
      {param({40, 700}, gen), param({700}, gen, 0.5f, 1.5f)},
      [](const auto& t) { return rms_norm(t[0], t[1], 1e-5f); }, rms_norm_bound(1e-5f));
  compare_op(
      "rms_norm of [0, 6]", {param({0, 6}, gen), param({6}, gen, 0.5f, 1.5f)},
      [](const auto& t) { return rms_norm(t[0], t[1], 1e-5f); }, 0.0);
  compare_op(
      "topk with k = n", {param({3, 40}, gen)}, [](const auto& t) { return topk(t[0], 40).values; },
      0.0);
  compare_op(
      "matmul with an empty inner extent", {param({3, 0}, gen), param({0, 4}, gen)},
      [](const auto& t) { return matmul(t[0], t[1]); }, 0.0);
  // 10240 floats per row do not fit in shared memory: the workspace spills to a global buffer
  // and 1040 query rows (and 1040 key rows) share a grid of 1024 blocks.
  compare_op(
      "causal_attention with a spilled workspace",
      {param({520, 1, 2, 10240}, gen), param({520, 1, 2, 10240}, gen),
       param({520, 1, 2, 10240}, gen)},
      [](const auto& t) { return causal_attention(t[0], t[1], t[2]); },
      attention_bound(1, 2, 10240));
  // NaN ranks first in max (rows and middle axes) and topk, ties go to the lowest position, on
  // rows longer than a block; the gradient goes to the same positions.
  Tensor with_nan = uniform({3, 5000}, gen);
  float* v = with_nan.data<float>();
  v[4321] = std::numeric_limits<float>::quiet_NaN();
  v[5000 + 17] = v[5000 + 4000] = 7.0f;  // a tie for the maximum of row 1
  for (const int64_t axis : {0, 1}) {
    CAPTURE(axis);
    Tensor c = with_nan.clone(), g = with_nan.copy_to(kGpu);
    c.requires_grad_(), g.requires_grad_();
    const Tensor mc = max(c, axis), mg = max(g, axis);
    CHECK(testing::same_bytes(mg.to(Device::cpu()), mc));
    sum(mc * 1.0f).backward();
    sum(mg * 1.0f).backward();
    CHECK(testing::same_bytes(g.grad().to(Device::cpu()), c.grad()));
  }
  const TopK top_cpu = topk(with_nan, 3), top_gpu = topk(with_nan.to(kGpu), 3);
  CHECK(top_gpu.indices.to_vector<int32_t>() == top_cpu.indices.to_vector<int32_t>());
  CHECK(testing::same_bytes(top_gpu.values.to(Device::cpu()), top_cpu.values));
  // Every row ignored: a zero loss and zero gradients, as on the CPU.
  const Tensor ignored = from_vector(std::vector<int32_t>{-100, -100});
  compare_op(
      "cross_entropy with every row ignored", {param({2, 9}, gen), constant(ignored)},
      [](const auto& t) { return cross_entropy(t[0], t[1]); }, 0.0);
  // Gradient clipping over more elements than the 65536 threads of sum_squares' grid.
  Tensor cpu_w = zeros({100003}), gpu_w = zeros({100003}, kGpu);
  for (Tensor* w : {&cpu_w, &gpu_w}) w->requires_grad_();
  const Tensor scale = uniform({100003}, gen);
  sum(cpu_w * scale).backward();
  sum(gpu_w * scale.to(kGpu)).backward();
  const double cpu_norm = optim::clip_grad_norm({{"w", cpu_w, true}}, 0.0);
  const double gpu_norm = optim::clip_grad_norm({{"w", gpu_w, true}}, 0.0);
  // Both sum the squares (exact in double) in double, in their own orders: each within
  // gamma_n of double (n 2^-53 relative, n = 100003) of the exact sum, half that after the sqrt.
  CHECK(std::abs(gpu_norm - cpu_norm) <= 100003 * 0x1p-53 * cpu_norm);
}

namespace {

// One float operation, rounded (a volatile store: the compiler cannot fuse it into an FMA).
float rounded(float x) {
  volatile float r = x;
  return r;
}

}  // namespace

TEST_CASE("cuda ops: the arena's clip and AdamW round each element as PyTorch's formula") {
  if (gpu_missing()) return;
  Generator gen(23);
  // 70 parameters (two launches of 64 segments at most), one of them longer than the clip
  // reduction's 65536 threads; some get no gradient in a step, so AdamW must skip them.
  std::vector<Shape> shapes;
  for (int i = 0; i < 69; ++i) shapes.push_back(Shape{1 + (i * 7) % 37});
  shapes.push_back(Shape{100003});
  std::vector<optim::Parameter> params;
  std::vector<Tensor> initial;
  for (size_t i = 0; i < shapes.size(); ++i) {
    initial.push_back(uniform(shapes[i], gen, -1.0f, 1.0f));
    Tensor p = initial.back().to(kGpu);
    p.requires_grad_();
    params.push_back({"p" + std::to_string(i), p, i % 3 != 0});
  }
  const optim::AdamWOptions o{.beta1 = 0.8f, .beta2 = 0.99f, .eps = 1e-6f, .weight_decay = 0.2f};
  optim::AdamW opt(params, o);
  std::vector<std::vector<float>> p_ref, m_ref, v_ref;
  std::vector<int64_t> steps(shapes.size(), 0);
  for (const Tensor& t : initial) {
    p_ref.push_back(t.to_vector());
    m_ref.emplace_back(t.numel(), 0.0f);
    v_ref.emplace_back(t.numel(), 0.0f);
  }
  // Clipping fires, then does not; the third step starts from counts of 1,500 loaded into the
  // optimiser (on CUDA its step counts live on the device, and its table of bias corrections,
  // first 1,024 steps long, grows).
  const std::vector<float> lrs = {0.01f, 0.02f, 0.03f};
  const std::vector<double> max_norms = {0.5, 1e6, 1e6};
  for (size_t t = 0; t < lrs.size(); ++t) {
    CAPTURE(t);
    if (t == 2) {
      auto state = opt.state();
      for (size_t i = 0; i < shapes.size(); ++i) {
        Tensor loaded = Tensor::empty(Shape{}, DType::i32);
        loaded.data<int32_t>()[0] = 1500;
        state[params[i].name + ".step"] = loaded;
        steps[i] = 1500;
      }
      opt.load_state(state);
    }
    opt.zero_grad();
    std::vector<std::vector<float>> grads(shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i) {
      if ((i + t) % 5 == 2) continue;
      grads[i] = uniform(shapes[i], gen, -1.0f, 1.0f).to_vector();
      params[i].tensor.backward(from_vector(grads[i], shapes[i]).to(kGpu));
    }
    opt.clip_grad_norm(max_norms[t]);
    const double norm = opt.grad_norm();  // the device's norm; the factor from it, as there
    double sum_sq = 0.0;                  // the norm, summed on the host in another order
    for (const auto& g : grads)
      for (const float x : g) sum_sq += static_cast<double>(x) * x;
    CHECK(std::abs(norm - std::sqrt(sum_sq)) <= 100003 * 0x1p-53 * norm);
    const double coef = max_norms[t] / (norm + 1e-6);
    const float scale = coef < 1.0 ? static_cast<float>(coef) : 1.0f;
    opt.step(lrs[t]);
    // PyTorch's update, each operation rounded to float (rex/optim/adamw.hpp's order).
    const double lr = lrs[t];
    const auto keep = static_cast<float>(1.0 - lr * static_cast<double>(o.weight_decay));
    const auto b1c = static_cast<float>(1.0 - static_cast<double>(o.beta1));
    const auto b2c = static_cast<float>(1.0 - static_cast<double>(o.beta2));
    for (size_t i = 0; i < shapes.size(); ++i) {
      if (grads[i].empty()) continue;
      const int64_t step = ++steps[i];
      const auto neg_step =
          static_cast<float>(-(lr / (1.0 - std::pow(static_cast<double>(o.beta1), step))));
      const auto b2s =
          static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(o.beta2), step)));
      for (size_t j = 0; j < grads[i].size(); ++j) {
        const float g = rounded(grads[i][j] * scale);
        const float w = params[i].decay ? rounded(p_ref[i][j] * keep) : p_ref[i][j];
        const float m = rounded(rounded(m_ref[i][j] * o.beta1) + rounded(b1c * g));
        const float v = rounded(rounded(v_ref[i][j] * o.beta2) + rounded(rounded(b2c * g) * g));
        const float denom = rounded(rounded(std::sqrt(v) / b2s) + o.eps);
        m_ref[i][j] = m;
        v_ref[i][j] = v;
        p_ref[i][j] = rounded(w + rounded(rounded(neg_step * m) / denom));
      }
    }
    const auto state = opt.state();
    for (size_t i = 0; i < shapes.size(); ++i) {
      CAPTURE(i);
      CHECK(params[i].tensor.to_vector() == p_ref[i]);  // skipped ones: untouched
      CHECK(state.at(params[i].name + ".exp_avg").to_vector() == m_ref[i]);
      CHECK(state.at(params[i].name + ".exp_avg_sq").to_vector() == v_ref[i]);
      CHECK(state.at(params[i].name + ".step").item() == static_cast<float>(steps[i]));
    }
  }
  // The parameters compute with the arena, and their gradients live in it.
  for (const optim::Parameter& p : params)
    CHECK(p.tensor.shares_storage_with(opt.arena().values()));
  sum(params[0].tensor * 2.0f).backward();
  CHECK(params[0].tensor.grad().shares_storage_with(opt.arena().grads()));
}

TEST_CASE("cuda ops: one TransformerLM training step matches the CPU step") {
  if (gpu_missing()) return;
  for (const auto& [ffn, reuse] :
       std::vector<std::pair<std::string, int64_t>>{{"dense", 1}, {"moe", 2}}) {
    CAPTURE(ffn);
    nn::ModelConfig m;
    m.vocab_size = 13, m.d_model = 16, m.n_layers = 2, m.n_heads = 4, m.n_kv_heads = 2;
    m.context = 12, m.ffn = ffn, m.d_ff = 24;
    m.moe.experts_per_layer = 3, m.moe.top_k = 2, m.moe.d_expert = 8, m.moe.reuse = reuse;
    m.moe.shared_experts = 1, m.moe.z_loss_coef = 1e-3;
    m.psr.t_start = 2, m.psr.t_end = 6;
    nn::TransformerLM cpu_model(m, 5), gpu_model(m, 5);
    gpu_model.to(kGpu);
    Generator gen(9);
    const Tensor ids = ids_tensor({3, 12}, 13, gen), targets = ids_tensor({3, 12}, 13, gen);
    const nn::LmOutput cpu_out = cpu_model.forward(ids, targets, {3, 0});
    const nn::LmOutput gpu_out = gpu_model.forward(ids.to(kGpu), targets.to(kGpu), {3, 0});
    const ModelChain chain = model_chain(m, ids.numel());
    CHECK(relative_error(gpu_out.logits, cpu_out.logits) <= 2 * gamma_n(chain.logits));
    CHECK(std::abs(gpu_out.loss.item() - cpu_out.loss.item()) <=
          2 * gamma_n(chain.losses) * std::abs(cpu_out.loss.item()));
    cpu_out.loss.backward();
    gpu_out.loss.backward();
    const auto cpu_params = cpu_model.named_parameters(), gpu_params = gpu_model.named_parameters();
    std::vector<optim::Parameter> cpu_opt, gpu_opt;
    for (size_t i = 0; i < cpu_params.size(); ++i) {
      CAPTURE(cpu_params[i].first);
      CHECK(gpu_params[i].second.device() == kGpu);
      // An expert that no token reached has no gradient, on either device.
      const Tensor cpu_grad = cpu_params[i].second.grad(), gpu_grad = gpu_params[i].second.grad();
      REQUIRE(cpu_grad.defined() == gpu_grad.defined());
      if (cpu_grad.defined()) CHECK(relative_error(gpu_grad, cpu_grad) <= 2 * gamma_n(chain.grads));
      cpu_opt.push_back({cpu_params[i].first, cpu_params[i].second, true});
      gpu_opt.push_back({gpu_params[i].first, gpu_params[i].second, true});
    }
    // | ||a|| - ||b|| | <= ||a - b||: the gradients' bound (both sum the squares in double).
    const double cpu_norm = optim::clip_grad_norm(cpu_opt, 0.5);
    const double gpu_norm = optim::clip_grad_norm(gpu_opt, 0.5);
    CHECK(std::abs(gpu_norm - cpu_norm) <= 2 * gamma_n(chain.grads) * cpu_norm);
    // The optimiser step on its own: from the CPU's clipped gradients on both devices (the
    // gradients differ by rounding, which AdamW's g / (|g| + eps) can turn into a difference of
    // lr where a gradient is zero up to rounding; the PyTorch twin bounds that case).
    std::vector<Tensor> before;
    for (size_t i = 0; i < cpu_params.size(); ++i) {
      before.push_back(cpu_params[i].second.clone());
      if (cpu_params[i].second.grad().defined())
        gpu_params[i].second.grad().copy_(cpu_params[i].second.grad());
    }
    const optim::AdamWOptions options{.weight_decay = 0.1f};
    optim::AdamW cpu_adam(cpu_opt, options), gpu_adam(gpu_opt, options);
    cpu_adam.step(1e-2f);
    gpu_adam.step(1e-2f);
    const auto state = cpu_adam.state();
    for (size_t i = 0; i < cpu_params.size(); ++i) {
      const std::string& name = cpu_params[i].first;
      const Tensor g = cpu_params[i].second.grad();
      if (!g.defined()) {  // no gradient, no step
        CHECK(testing::same_bytes(gpu_params[i].second.to(Device::cpu()), before[i]));
        continue;
      }
      check_adamw_step(name, before[i], cpu_params[i].second, gpu_params[i].second, g,
                       zeros(g.shape()), state.at(name + ".exp_avg_sq"), 1, 1e-2f, options);
    }
    // The optimiser state comes back to the host for checkpoints.
    CHECK(gpu_adam.state().begin()->second.device() == Device::cpu());
  }
}

// On the device, queue_step leaves the losses and the norm there (read_steps reads them later):
// the same values and weights as train_step, and a non-finite norm updates nothing.
TEST_CASE(
    "cuda ops: queued steps train as train_step does, and a non-finite norm updates nothing") {
  if (gpu_missing()) return;
  nn::ModelConfig m;
  m.vocab_size = 13, m.d_model = 16, m.n_layers = 2, m.n_heads = 4, m.n_kv_heads = 2;
  m.context = 12, m.ffn = "moe", m.d_ff = 24;
  m.moe.experts_per_layer = 3, m.moe.top_k = 2, m.moe.d_expert = 8, m.moe.reuse = 2;
  m.psr.t_start = 2, m.psr.t_end = 6;
  const train::TrainConfig t;
  nn::TransformerLM direct_model(m, 5), queued_model(m, 5);
  direct_model.to(kGpu);
  queued_model.to(kGpu);
  optim::AdamW direct_adam = train::make_optimizer(direct_model, t);
  optim::AdamW queued_adam = train::make_optimizer(queued_model, t);
  Generator gen(9);
  std::vector<data::Batch> batches;
  for (int step = 0; step < 3; ++step)
    batches.push_back({ids_tensor({3, 12}, 13, gen), ids_tensor({3, 12}, 13, gen)});
  std::vector<train::StepResult> direct;
  std::vector<train::QueuedStep> queued;
  for (int64_t step = 0; step < 3; ++step) {
    const auto s = static_cast<size_t>(step);
    direct.push_back(
        train::train_step(direct_model, direct_adam, batches[s], {step, 1}, 1e-2f, 0.5));
    queued.push_back(
        train::queue_step(queued_model, queued_adam, batches[s], {step, 1}, 1e-2f, 0.5));
  }
  const std::vector<train::StepResult> read = train::read_steps(std::move(queued));
  for (size_t i = 0; i < read.size(); ++i) {
    CAPTURE(i);
    CHECK(read[i].loss == direct[i].loss);
    CHECK(read[i].aux_loss == direct[i].aux_loss);
    CHECK(read[i].grad_norm == direct[i].grad_norm);
    CHECK(read[i].grad_norm > 0);
  }
  const auto direct_params = direct_model.named_parameters();
  const auto queued_params = queued_model.named_parameters();
  for (size_t i = 0; i < direct_params.size(); ++i)
    CHECK(testing::same_bytes(queued_params[i].second.to(Device::cpu()),
                              direct_params[i].second.to(Device::cpu())));

  // A NaN in the final norm's weight makes the loss and the gradients NaN. The queued
  // step updates no parameter (the NaN one stays NaN) and reads back a NaN norm.
  std::vector<Tensor> before;
  for (const auto& [name, p] : queued_params) before.push_back(p.to(Device::cpu()));
  for (const auto& [name, p] : queued_params)
    if (name == "norm.weight") Tensor(p).fill_(std::nanf(""));
  std::vector<train::QueuedStep> bad;
  bad.push_back(train::queue_step(queued_model, queued_adam, batches[0], {3, 1}, 1e-2f, 0.5));
  const double norm = train::read_steps(std::move(bad)).front().grad_norm;
  CHECK(std::isnan(norm));
  for (size_t i = 0; i < queued_params.size(); ++i) {
    CAPTURE(queued_params[i].first);
    const Tensor now = queued_params[i].second.to(Device::cpu());
    if (queued_params[i].first == "norm.weight") {
      CHECK(std::isnan(now.to_vector()[0]));
    } else {
      CHECK(testing::same_bytes(now, before[i]));
    }
  }
  // train_step reads the norm before the update and names the parameter.
  CHECK(error_message([&] {
          (void)train::train_step(queued_model, queued_adam, batches[1], {4, 1}, 1e-2f, 0.5);
        }).find("gradient norm is nan; first non-finite gradient in parameter") !=
        std::string::npos);
}

// Per-sequence and per-token PSR masks are made on the device by a kernel that runs the CPU's code
// (rex/backend/psr_mask.hpp): the same bytes, so the two devices route every token alike.
TEST_CASE("cuda ops: per-sequence and per-token PSR masks are made on the device, as on the CPU") {
  if (gpu_missing()) return;
  nn::MoeConfig moe;
  moe.experts_per_layer = 6, moe.reuse = 4;  // pool 24
  nn::PsrConfig psr;
  psr.t_start = 2, psr.t_end = 12;
  for (const std::string scope : {"sequence", "token"}) {
    for (const std::string variant : {"random", "own_first", "tie_block"}) {
      CAPTURE(scope);
      CAPTURE(variant);
      psr.mask_scope = scope;
      psr.masks = variant == "own_first" ? "own_first" : "random";
      psr.tie_block = variant == "tie_block";
      // 300 rows: more than one block of threads.
      const nn::TokenPlaces places{300, 20, 7, 0};
      for (const int64_t step : {1, 6}) {
        const Tensor cpu = nn::psr_keep(psr, moe, 4, step, 5, places, Device::cpu());
        const Tensor gpu = nn::psr_keep(psr, moe, 4, step, 5, places, kGpu);
        CHECK(gpu.device() == kGpu);
        CHECK(testing::same_bytes(gpu.to(Device::cpu()), cpu));
      }
    }
  }
  // Whole models on both devices at a step with masks: the same routing, logits within bounds.
  for (const std::string scope : {"sequence", "token"}) {
    CAPTURE(scope);
    nn::ModelConfig m;
    m.vocab_size = 13, m.d_model = 16, m.n_layers = 2, m.n_heads = 4, m.n_kv_heads = 2;
    m.context = 12, m.moe.experts_per_layer = 3, m.moe.top_k = 2, m.moe.d_expert = 8;
    m.moe.reuse = 2, m.psr.t_start = 2, m.psr.t_end = 6, m.psr.mask_scope = scope;
    m.psr.tie_block = scope == "token";
    nn::TransformerLM cpu_model(m, 5), gpu_model(m, 5);
    gpu_model.to(kGpu);
    Generator gen(9);
    const Tensor ids = ids_tensor({3, 12}, 13, gen), targets = ids_tensor({3, 12}, 13, gen);
    const nn::LmOutput cpu_out = cpu_model.forward(ids, targets, {3, 0});
    const nn::LmOutput gpu_out = gpu_model.forward(ids.to(kGpu), targets.to(kGpu), {3, 0});
    CHECK(gpu_out.expert_counts == cpu_out.expert_counts);
    CHECK(relative_error(gpu_out.logits, cpu_out.logits) <=
          2 * gamma_n(model_chain(m, ids.numel()).logits));
  }
}

// Decoding with a KV cache on the GPU (rex/train/sample.hpp) against the recompute path on the CPU,
// step by step: the same windows, logits within the model's bound (each side within gamma_N of
// exact), and so the same greedy choices wherever the choice leads by more than the bound
// (checked); then whole greedy texts, past the context: GPU cache, GPU recompute and CPU all agree.
TEST_CASE("cuda ops: sampling with a KV cache matches the recompute path and the CPU") {
  if (gpu_missing()) return;
  for (const std::string ffn : {"dense", "moe"}) {
    CAPTURE(ffn);
    nn::ModelConfig m;
    m.vocab_size = 11, m.d_model = 16, m.n_layers = 4, m.n_heads = 4, m.n_kv_heads = 2;
    m.context = 8, m.ffn = ffn, m.d_ff = 24, m.init_std = 0.3;
    m.moe.experts_per_layer = 3, m.moe.top_k = 2, m.moe.d_expert = 8, m.moe.reuse = 2;
    m.moe.shared_experts = 1, m.psr.t_start = 2, m.psr.t_end = 6;
    const nn::RoutingStep at{4, 7};  // N_t = 4 of a pool of 6: the PSR mask is active
    nn::TransformerLM cpu_model(m, 3), gpu_model(m, 3);
    gpu_model.to(kGpu);
    const double bound = 2 * gamma_n(model_chain(m, m.context).logits);
    const std::vector<int32_t> prompt{1, 4, 1, 5, 9};
    train::NextTokenLogits gpu(gpu_model, prompt, at, train::Decoding::kv_cache);
    train::NextTokenLogits cpu(cpu_model, prompt, at, train::Decoding::recompute);
    auto arg_max = [](const Tensor& logits) {
      const std::vector<float> v = logits.to_vector();
      return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
    };
    for (int step = 0; step < 3 * m.context; ++step) {
      CAPTURE(step);
      REQUIRE(gpu.window() == cpu.window());
      CHECK(relative_error(gpu.logits(), cpu.logits()) <= bound);
      REQUIRE(testing::arg_max_holds_within(cpu.logits(), bound));
      const int32_t next = arg_max(cpu.logits());
      CHECK(arg_max(gpu.logits()) == next);
      gpu.append(next);
      cpu.append(next);
    }
    const auto text = [&](const nn::TransformerLM& model, train::Decoding decoding) {
      return train::generate_tokens(model, prompt, 20, 0.0, 1, at, decoding);
    };
    const std::vector<int32_t> gpu_cached = text(gpu_model, train::Decoding::kv_cache);
    CHECK(gpu_cached == text(gpu_model, train::Decoding::recompute));
    CHECK(gpu_cached == text(cpu_model, train::Decoding::recompute));
  }
}

TEST_CASE("cuda ops: a checkpoint written by a CUDA run resumes on the CPU, and back") {
  if (gpu_missing()) return;
  train::RunConfig config;
  config.model.vocab_size = 11, config.model.d_model = 16, config.model.n_layers = 2;
  config.model.n_heads = 2, config.model.n_kv_heads = 1, config.model.context = 8;
  config.model.moe.experts_per_layer = 2, config.model.moe.d_expert = 8;
  config.model.moe.reuse = 2;
  const data::CharTokenizer tokenizer = data::CharTokenizer::from_text("abcdefghijk");
  Generator gen(10);
  const Tensor ids = ids_tensor({2, 8}, 11, gen), targets = ids_tensor({2, 8}, 11, gen);
  const testing::TempDir dir("cuda_checkpoint");
  // One step on the GPU, saved.
  nn::TransformerLM gpu_model(config.model, 3);
  gpu_model.to(kGpu);
  optim::AdamW gpu_adam(optim::decay_matrices(gpu_model.named_parameters()));
  gpu_model.forward(ids.to(kGpu), targets.to(kGpu), {0, 1}).loss.backward();
  gpu_adam.step(1e-2f);
  train::save_checkpoint(dir.path.string(), gpu_model, gpu_adam, config, tokenizer, 1, {});
  // Loaded on the CPU: the same parameters, and the same next step as the GPU takes.
  const train::Checkpoint saved = train::load_checkpoint(dir.path.string());
  nn::TransformerLM cpu_model(config.model, 99);
  cpu_model.load_parameters(saved.model, "checkpoint");
  optim::AdamW cpu_adam(optim::decay_matrices(cpu_model.named_parameters()));
  cpu_adam.load_state(saved.optimizer);
  const auto cpu_params = cpu_model.named_parameters(), gpu_params = gpu_model.named_parameters();
  for (size_t i = 0; i < cpu_params.size(); ++i)
    CHECK(testing::same_bytes(gpu_params[i].second.to(Device::cpu()), cpu_params[i].second));
  gpu_adam.zero_grad();
  gpu_model.forward(ids.to(kGpu), targets.to(kGpu), {1, 1}).loss.backward();
  cpu_model.forward(ids, targets, {1, 1}).loss.backward();
  // The same gradients (within the model's bound), then the same step from the loaded state: given
  // the CPU's gradients on both devices, as in the training step case above.
  const ModelChain chain = model_chain(config.model, ids.numel());
  std::vector<Tensor> before;
  for (size_t i = 0; i < cpu_params.size(); ++i) {
    CAPTURE(cpu_params[i].first);
    before.push_back(cpu_params[i].second.clone());
    const Tensor cpu_grad = cpu_params[i].second.grad(), gpu_grad = gpu_params[i].second.grad();
    REQUIRE(cpu_grad.defined() == gpu_grad.defined());
    if (!cpu_grad.defined()) continue;
    CHECK(relative_error(gpu_grad, cpu_grad) <= 2 * gamma_n(chain.grads));
    Tensor(gpu_grad).copy_(cpu_grad);  // the handle shares the gradient's storage
  }
  gpu_adam.step(1e-2f);
  cpu_adam.step(1e-2f);
  const auto state = cpu_adam.state();
  for (size_t i = 0; i < cpu_params.size(); ++i) {
    const std::string& name = cpu_params[i].first;
    const Tensor g = cpu_params[i].second.grad();
    if (!g.defined()) {
      CHECK(testing::same_bytes(gpu_params[i].second.to(Device::cpu()), before[i]));
      continue;
    }
    check_adamw_step(name, before[i], cpu_params[i].second, gpu_params[i].second, g,
                     saved.optimizer.at(name + ".exp_avg"), state.at(name + ".exp_avg_sq"),
                     state.at(name + ".step").data<int32_t>()[0], 1e-2f, optim::AdamWOptions{});
  }
  // And the CPU checkpoint loads into a model on the GPU.
  train::save_checkpoint(dir.path.string(), cpu_model, cpu_adam, config, tokenizer, 2, {});
  nn::TransformerLM back(config.model, 5);
  back.load_parameters(train::load_checkpoint(dir.path.string()).model, "checkpoint");
  back.to(kGpu);
  const auto back_params = back.named_parameters();
  for (size_t i = 0; i < cpu_params.size(); ++i)
    CHECK(testing::same_bytes(back_params[i].second.to(Device::cpu()), cpu_params[i].second));
}

TEST_CASE("cuda ops: an i32 tensor uploaded whole keeps its values on the host, until rewritten") {
  if (gpu_missing()) return;
  const std::vector<int32_t> values{5, -2, 9, 4, 0, 3};
  Tensor ids = from_vector(values).to(kGpu);
  const int32_t* mirror = ids.host_values<int32_t>();
  REQUIRE(mirror != nullptr);
  CHECK(std::vector<int32_t>(mirror, mirror + 6) == values);
  // A view reads its part of the mirror; the device holds the same values.
  const Tensor tail = slice(ids, 0, 2, 6);
  REQUIRE(tail.host_values<int32_t>() != nullptr);
  CHECK(std::vector<int32_t>(tail.host_values<int32_t>(), tail.host_values<int32_t>() + 4) ==
        tail.to_vector<int32_t>());
  // f32 uploads, partial uploads, device-to-device copies and fills keep no mirror.
  CHECK(from_vector(std::vector<float>{1, 2}).to(kGpu).host_values<float>() == nullptr);
  Tensor part = slice(ids, 0, 0, 3);
  part.copy_(from_vector(std::vector<int32_t>{1, 1, 1}));
  CHECK(ids.host_values<int32_t>() == nullptr);
  CHECK(ids.to_vector<int32_t>() == std::vector<int32_t>{1, 1, 1, 4, 0, 3});
  ids.copy_(from_vector(values));
  REQUIRE(ids.host_values<int32_t>() != nullptr);
  ids.fill_(2.0f);
  CHECK(ids.host_values<int32_t>() == nullptr);
  ids.copy_(from_vector(values));
  ids.copy_(from_vector(values).to(kGpu).copy_to(kGpu));
  CHECK(ids.host_values<int32_t>() == nullptr);
}

TEST_CASE("cuda ops: errors name the problem") {
  if (gpu_missing()) return;
  const Tensor x = ones({4, 3}, kGpu);
  const std::string mixed = error_message([&] { (void)add(x, ones({4, 3})); });
  CHECK(mixed.find("different devices") != std::string::npos);
  // Bad indices uploaded from the host are caught there (their host mirror); indices made on the
  // device (here a device-to-device copy, which has no mirror) by the kernels' flags, read back.
  const Tensor uploaded = from_vector(std::vector<int32_t>{0, 7, 1}).to(kGpu);
  const Tensor made_on_device = uploaded.copy_to(kGpu);
  REQUIRE(uploaded.host_values<int32_t>() != nullptr);
  REQUIRE(made_on_device.host_values<int32_t>() == nullptr);
  for (const Tensor& bad : {uploaded, made_on_device}) {
    CAPTURE(bad.host_values<int32_t>() != nullptr);
    CHECK(error_message([&] { (void)gather_rows(x, bad); }).find("index value 7 at position 1") !=
          std::string::npos);
    CHECK(error_message([&] { (void)embedding(x, bad); }).find("embedding: index value 7") !=
          std::string::npos);
    CHECK(error_message([&] {
            (void)scatter_add_rows(ones({3, 3}, kGpu), bad, 4);
          }).find("index value 7") != std::string::npos);
    CHECK(error_message([&] {
            (void)cross_entropy(ones({3, 3}, kGpu), bad);
          }).find("target 7 at row 1") != std::string::npos);
  }
  {  // an optimiser built before the model moved keeps its state behind
    Tensor w = ones({2, 2});
    w.requires_grad_();
    optim::AdamW early({{"w", w, true}});
    w.move_to_(kGpu);
    sum(w * 2.0f).backward();
    CHECK(error_message([&] {
            early.step(0.1f);
          }).find("move the model before building the optimiser") != std::string::npos);
  }
  // The stream is still usable after a reported error.
  CHECK(sum(x).item() == 12.0f);
}

TEST_CASE("cuda ops: permute_rows, and the MoE dispatch that permutes back with it") {
  if (gpu_missing()) return;
  Generator gen(17);
  const int64_t n = 23;
  const auto [order, inverse] = testing::random_permutation(n, gen);
  compare_op(
      "permute_rows", {param({n, 7}, gen), constant(order), constant(inverse)},
      [](const auto& t) { return permute_rows(t[0], t[1], t[2]); }, 0.0);

  // The routing plan: sorted on the device for CUDA indices, on the host for CPU ones; the same
  // plan either way, also over several of the device sort's 256-slot chunks (and an expert that
  // gets nothing). The dispatch's row moves then agree exactly, gradients included (the gather's
  // backward sums each token's rows in the same order on both).
  {
    const int64_t many_tokens = 300, many_k = 3, many_pool = 7;
    const Tensor many = ids_tensor({many_tokens, many_k}, many_pool - 1, gen);
    const nn::RoutingPlan cpu_plan = nn::plan_routing(many, many_pool);
    const nn::RoutingPlan gpu_plan = nn::plan_routing(many.to(kGpu), many_pool);
    CHECK(gpu_plan.counts.offsets() == cpu_plan.counts.offsets());
    CHECK(gpu_plan.counts.back() == 0);
    CHECK(gpu_plan.sorted_slots.to(Device::cpu()).to_vector<int32_t>() ==
          cpu_plan.sorted_slots.to_vector<int32_t>());
    CHECK(gpu_plan.slot_positions.to(Device::cpu()).to_vector<int32_t>() ==
          cpu_plan.slot_positions.to_vector<int32_t>());
    // combine_slots rounds each product and adds them in one order on both devices (the CPU's
    // products go through memory, so no FMA is fused there either): the same bits.
    compare_op(
        "dispatch_rows and combine_slots",
        {param({many_tokens, 33}, gen), constant(many), param({many_tokens, many_k}, gen)},
        [&](const auto& t) {
          const nn::RoutingPlan plan = nn::plan_routing(t[1], many_pool);
          return combine_slots(dispatch_rows(t[0], plan) * 2.0f, plan, t[2]);
        },
        0.0);
  }

  // The small plan of the dispatch below.
  const int64_t tokens = 9, k = 2, pool = 5, d = 6;
  const Tensor indices = ids_tensor({tokens, k}, pool - 1, gen);  // expert 4 gets nothing
  const nn::RoutingPlan on_cpu = nn::plan_routing(indices, pool);
  const nn::RoutingPlan on_gpu = nn::plan_routing(indices.to(kGpu), pool);
  CHECK(on_gpu.counts.offsets() == on_cpu.counts.offsets());
  CHECK(on_gpu.counts == on_cpu.counts);
  for (const auto& [gpu_side, cpu_side] : {std::pair{on_gpu.sorted_slots, on_cpu.sorted_slots},
                                           std::pair{on_gpu.slot_positions, on_cpu.slot_positions},
                                           std::pair{on_gpu.sorted_tokens, on_cpu.sorted_tokens}}) {
    CHECK(gpu_side.device() == kGpu);
    CHECK(gpu_side.to(Device::cpu()).to_vector<int32_t>() == cpu_side.to_vector<int32_t>());
  }
  Generator table_gen(18), same_gen(18);
  nn::ExpertTable cpu_table(pool, d, 4, table_gen, 0.5f, 0.5f);
  nn::ExpertTable gpu_table(pool, d, 4, same_gen, 0.5f, 0.5f);
  gpu_table.to(kGpu);
  compare_op(
      "dispatch_experts",
      {param({tokens, d}, gen), constant(indices), param({tokens, k}, gen, 0.0f, 1.0f)},
      [&](const auto& t) {
        return nn::dispatch_experts(t[0], t[1], t[2],
                                    t[0].device() == kGpu ? gpu_table : cpu_table);
      },
      // Chained: each expert sums 6 then 4 products around SwiGLU (8 roundings, 2 calls), the gate
      // weighs it (1) and the k = 2 slots add up (2); backward retraces that and the weights'
      // gradients sum over up to 9 x 2 routed slots. 6 + 8 + 4 + 1 + 2, twice, + 18 = 60 terms.
      rounding_bound(60, 2));
}

// softmax_topk's kernel runs softmax_kernel's row and topk_kernel's selection of it (rows of 16,
// one warp, and of 300, a block of 128 whose first warp selects), with and without PSR's mask.
TEST_CASE("cuda ops: softmax_topk gives the bits of softmax then topk, gradients included") {
  if (gpu_missing()) return;
  Generator gen(34);
  for (const int64_t n : {16, 300}) {
    for (const bool masked : {false, true}) {
      CAPTURE(n);
      CAPTURE(masked);
      Tensor logits = uniform({5, n}, gen, -2.0f, 2.0f).to(kGpu);
      logits.requires_grad_();
      Tensor keep = uniform({n}, gen, 0.0f, 1.0f);
      for (int64_t i = 0; i < n; ++i) keep.data<float>()[i] = keep.data<float>()[i] < 0.3f ? 0 : 1;
      const TopKMask mask = masked ? TopKMask{keep.to(kGpu), -1.0f} : TopKMask{};
      const Tensor gp = uniform({5, n}, gen, -1.0f, 1.0f).to(kGpu);
      const Tensor gv = uniform({5, 3}, gen, -1.0f, 1.0f).to(kGpu);
      auto results = [&](const Tensor& probs, const TopK& top) {
        logits.zero_grad();
        (rex::sum(probs * gp) + rex::sum(top.values * gv)).backward();
        std::vector<std::vector<float>> out;
        for (const Tensor& t : {probs, top.values, logits.grad()})
          out.push_back(t.to(Device::cpu()).to_vector());
        const std::vector<int32_t> indices = top.indices.to(Device::cpu()).to_vector<int32_t>();
        out.emplace_back(indices.begin(), indices.end());
        return out;
      };
      const SoftmaxTopK fused = softmax_topk(logits, 3, mask);
      CHECK(fused.probs.device() == kGpu);
      const auto got = results(fused.probs, fused.top);
      const Tensor probs = softmax(logits);
      CHECK(got == results(probs, topk(probs, 3, mask)));
    }
  }
}

// add_rms_norm's kernel adds, writes the sum and sums its squares in the order of the add and
// rms_norm kernels it replaces (rows of 300: several elements a thread), and records their nodes.
TEST_CASE("cuda ops: add_rms_norm gives the bits of add then rms_norm, gradients included") {
  if (gpu_missing()) return;
  Generator gen(33);
  for (const int64_t n : {7, 300}) {
    CAPTURE(n);
    Tensor a = uniform({4, n}, gen, -1.0f, 1.0f).to(kGpu);
    Tensor b = uniform({4, n}, gen, -1.0f, 1.0f).to(kGpu);
    Tensor w = uniform({n}, gen, 0.5f, 1.5f).to(kGpu);
    a.requires_grad_(), b.requires_grad_(), w.requires_grad_();
    const Tensor gy = uniform({4, n}, gen, -1.0f, 1.0f).to(kGpu);
    const Tensor gs = uniform({4, n}, gen, -1.0f, 1.0f).to(kGpu);
    auto results = [&](const Tensor& sum, const Tensor& y) {
      a.zero_grad(), b.zero_grad(), w.zero_grad();
      (rex::sum(y * gy) + rex::sum(sum * gs)).backward();
      std::vector<std::vector<float>> out;
      for (const Tensor& t : {sum, y, a.grad(), b.grad(), w.grad()})
        out.push_back(t.to(Device::cpu()).to_vector());
      return out;
    };
    const AddRmsNorm fused = add_rms_norm(a, b, w);
    CHECK(fused.y.device() == kGpu);
    const auto got = results(fused.sum, fused.y);
    const Tensor sum = a + b;
    CHECK(got == results(sum, rms_norm(sum, w)));
  }
}

// On CUDA each of these ops adds the gradient waiting for its input in its own kernel, saving the
// engine's launch (rex/autograd/engine.hpp). Top-k, the dispatch and rms_norm round that addition
// as the engine's (__fadd_rn after the value): the bits of the two gradients computed apart and
// added. matmul adds it as its GEMM's C (beta = 1), which rounds the product and the sum once: for
// the exact product S (summed in double, whose error is far below float's) and the waiting C, the
// engine's fl(fl(S) + C) and the GEMM's fl(S + C) are each within u of S + C after a first step
// of at most u |S| for the engine, so they differ by at most u |S| + 2u |S + C| (1 + u), under
// 3u (|S| + |result|) per element, S being the product's gradient alone (use_alone).
TEST_CASE("cuda ops: a gradient that meets another is added by the last use's kernel") {
  if (gpu_missing()) return;
  Generator gen(32);
  const Tensor indices = ids_tensor({5, 2}, 2, gen).to(kGpu);
  const nn::RoutingPlan plan = nn::plan_routing(indices, 3);
  const Tensor norm_weight = uniform({6}, gen, 0.5f, 1.5f).to(kGpu);
  const Tensor weight = uniform({6, 4}, gen, -1.0f, 1.0f).to(kGpu);
  const std::vector<std::pair<const char*, std::function<Tensor(const Tensor&)>>> exact = {
      {"topk", [](const Tensor& x) { return topk(x, 2).values; }},
      {"dispatch_rows", [&](const Tensor& x) { return dispatch_rows(x, plan); }},
      {"rms_norm", [&](const Tensor& x) { return rms_norm(x, norm_weight); }},
  };
  for (const auto& [name, use] : exact) {
    CAPTURE(name);
    const testing::MeetingGradients g =
        testing::meeting_gradients(uniform({5, 6}, gen, -1.0f, 1.0f).to(kGpu), use, gen);
    CHECK(g.together.device() == kGpu);
    CHECK(g.together.to(Device::cpu()).to_vector() == g.apart.to(Device::cpu()).to_vector());
  }
  for (const Shape& shape : {Shape{5, 6}, Shape{2, 3, 6}}) {  // 2-d, and rows flattened
    CAPTURE(shape);
    const testing::MeetingGradients g = testing::meeting_gradients(
        uniform(shape, gen, -1.0f, 1.0f).to(kGpu),
        [&](const Tensor& x) { return matmul(x, weight); }, gen);
    const std::vector<float> together = g.together.to(Device::cpu()).to_vector();
    const std::vector<float> apart = g.apart.to(Device::cpu()).to_vector();
    const std::vector<float> product = g.use_alone.to(Device::cpu()).to_vector();
    for (size_t i = 0; i < together.size(); ++i) {
      CAPTURE(i);
      CHECK(std::fabs(together[i] - apart[i]) <=
            3 * kU * (std::fabs(product[i]) + std::fabs(apart[i])));
    }
  }
}

// With the routing plan on the device, every expert of a table gets a gradient gated by its count
// (rex::detail::GradGate), which nothing reads during backward or AdamW's step (its kernels read
// the counts): an expert no token chose (in either of two layers sharing the table) has no
// gradient, keeps its weights and its step count, as on the CPU and in PyTorch.
TEST_CASE("cuda ops: an expert no token chose gets no gradient and no AdamW step, as on the CPU") {
  if (gpu_missing()) return;
  const int64_t tokens = 6, k = 2, pool = 4, d = 8;
  // Experts 0, 1 and 2 are chosen, expert 3 never.
  const std::vector<int32_t> chosen = {0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2, 0};
  std::map<std::string, Tensor> state[2];
  for (const Device device : {Device::cpu(), kGpu}) {
    CAPTURE(device);
    Generator gen(41);
    nn::ExpertTable table(pool, d, 4, gen, 0.5f, 0.5f);
    table.to(device);
    const nn::SwiGLU& unused = table.expert(3);
    const std::vector<float> unused_before =
        unused.down->weight.to(Device::cpu()).to_vector<float>();
    optim::AdamW adam(optim::decay_matrices(table.named_parameters()));
    const Tensor x = uniform({tokens, d}, gen, -1, 1).to(device);
    const Tensor indices = from_vector(chosen, Shape{tokens, k}).to(device);
    const Tensor gates = uniform({tokens, k}, gen, 0.1f, 1.0f).to(device);
    const Tensor y = nn::dispatch_experts(x, indices, gates, table);
    sum(nn::dispatch_experts(y, indices, gates, table)).backward();  // a second layer
    const auto& meta = *unused.gate->weight.impl().autograd;
    if (device.is_cuda()) {  // not yet settled: a zero gradient, gated by both layers' counts
      CHECK(meta.grad_gates.size() == 2);
      CHECK(meta.grad.to(Device::cpu()).to_vector<float>() == std::vector<float>(4 * d, 0.0f));
    }
    adam.step(0.1f);  // on CUDA, decided on the device: the gates are still unread
    CHECK(meta.grad_gates.size() == (device.is_cuda() ? 2 : 0));
    CHECK(!unused.gate->weight.grad().defined());  // read now
    CHECK(meta.grad_gates.empty());
    CHECK(table.expert(0).gate->weight.grad().defined());
    // No step, so no decay either: the same bits.
    CHECK(unused.down->weight.to(Device::cpu()).to_vector<float>() == unused_before);
    state[device.is_cuda() ? 1 : 0] = adam.state();
  }
  for (const auto& [name, tensor] : state[0]) {
    if (name.find(".step") == std::string::npos) continue;
    CAPTURE(name);
    CHECK(state[1].at(name).to_vector<int32_t>() == tensor.to_vector<int32_t>());
    const bool used = name.rfind("experts.3.", 0) != 0;
    CHECK(tensor.to_vector<int32_t>() == std::vector<int32_t>{used ? 1 : 0});
  }
}
