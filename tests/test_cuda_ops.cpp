// Every op of the engine on CUDA against the same op on the CPU: forward values and the gradient of
// every input, on random inputs, with a norm-wise relative tolerance per op. Then the pieces of a
// training step (MoE dispatch, AdamW, clipping, a whole TransformerLM step) and the CUDA-specific
// errors. Without a GPU each case prints "SKIPPED:" and CTest reports it as skipped.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include <rex/backend/cuda/runtime.hpp>
#include <rex/data/tokenizer.hpp>
#include <rex/nn/transformer.hpp>
#include <rex/optim/clip.hpp>
#include <rex/rex.hpp>
#include <rex/train/checkpoint.hpp>

#include "testing.hpp"

using namespace rex;
using rex::testing::error_message;

namespace {

// Built twice: against rex::cuda (a real GPU, or every case skipped) and against the CUDA
// emulation (test_cuda_ops_emulated, CTest "emulated/...", which runs the same kernels on the
// CPU).
const Device kGpu = Device::cuda();

bool gpu_missing() {
  if (cuda::device_count() > 0) return false;
  std::cout << "SKIPPED: no CUDA device on this machine; this CUDA test did not run on a GPU\n";
  return true;
}

// ||got - want|| / max(||want||, 1e-30), both copied to the host.
double relative_error(const Tensor& got, const Tensor& want) {
  REQUIRE(got.shape() == want.shape());
  const std::vector<float> g = got.to_vector(), w = want.to_vector();
  double diff = 0, norm = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    diff += (static_cast<double>(g[i]) - w[i]) * (static_cast<double>(g[i]) - w[i]);
    norm += static_cast<double>(w[i]) * w[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

struct Input {
  Tensor value;  // on the CPU
  bool differentiable = true;
};

Input param(const Shape& shape, Generator& gen, float low = -1.0f, float high = 1.0f) {
  return {uniform(shape, gen, low, high), true};
}
Input constant(const Tensor& value) { return {value, false}; }

// Runs fn on CPU copies and on CUDA copies of the inputs, backpropagates the same random output
// gradient through both, and compares the output and every input gradient.
void compare_op(const std::string& name, const std::vector<Input>& inputs,
                const std::function<Tensor(const std::vector<Tensor>&)>& fn, double tol) {
  CAPTURE(name);
  std::vector<Tensor> cpu, gpu;
  for (const Input& in : inputs) {
    Tensor c = in.value.clone(), g = in.value.copy_to(kGpu);
    if (in.differentiable) c.requires_grad_(), g.requires_grad_();
    cpu.push_back(c), gpu.push_back(g);
  }
  const Tensor out_cpu = fn(cpu), out_gpu = fn(gpu);
  CHECK(out_gpu.device() == kGpu);
  CHECK(relative_error(out_gpu, out_cpu) <= tol);
  if (!out_cpu.requires_grad()) return;
  Generator gen(99);
  const Tensor grad = uniform(out_cpu.shape(), gen, -1.0f, 1.0f);
  out_cpu.backward(grad);
  out_gpu.backward(grad.copy_to(kGpu));
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].differentiable) continue;
    CAPTURE(i);
    REQUIRE(cpu[i].grad().defined() == gpu[i].grad().defined());
    if (!cpu[i].grad().defined()) continue;
    CHECK(gpu[i].grad().device() == kGpu);
    CHECK(relative_error(gpu[i].grad(), cpu[i].grad()) <= tol);
  }
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
  using Fn = std::function<Tensor(const std::vector<Tensor>&)>;
  const std::vector<std::pair<std::string, Fn>> binaries = {
      {"add", [](const auto& t) { return add(t[0], t[1]); }},
      {"sub", [](const auto& t) { return sub(t[0], t[1]); }},
      {"mul", [](const auto& t) { return mul(t[0], t[1]); }},
      {"div", [](const auto& t) { return div(t[0], t[1]); }},
  };
  for (const auto& [name, fn] : binaries) {
    compare_op(name + " same shape", {param({4, 6}, gen), param({4, 6}, gen, 0.5f, 2.0f)}, fn,
               1e-6);
    compare_op(name + " broadcast", {param({2, 1, 6}, gen), param({3, 1}, gen, 0.5f, 2.0f)}, fn,
               1e-6);
    compare_op(name + " scalar", {param({5, 3}, gen), param({}, gen, 0.5f, 2.0f)}, fn, 1e-6);
  }
  const std::vector<std::pair<std::string, Fn>> unaries = {
      {"neg", [](const auto& t) { return neg(t[0]); }},
      {"exp", [](const auto& t) { return exp(t[0]); }},
      {"log", [](const auto& t) { return log(t[0]); }},
      {"sqrt", [](const auto& t) { return sqrt(t[0]); }},
      {"rsqrt", [](const auto& t) { return rsqrt(t[0]); }},
      {"pow", [](const auto& t) { return pow(t[0], 1.7f); }},
      {"tanh", [](const auto& t) { return tanh(t[0]); }},
      {"sigmoid", [](const auto& t) { return sigmoid(t[0]); }},
      {"silu", [](const auto& t) { return silu(t[0]); }},
      {"relu", [](const auto& t) { return relu(t[0]); }},
      {"gelu", [](const auto& t) { return gelu(t[0]); }},
      {"add_scalar", [](const auto& t) { return t[0] + 0.5f; }},
      {"sub_scalar", [](const auto& t) { return t[0] - 0.5f; }},
      {"rsub_scalar", [](const auto& t) { return 0.5f - t[0]; }},
      {"mul_scalar", [](const auto& t) { return t[0] * 1.5f; }},
      {"div_scalar", [](const auto& t) { return t[0] / 1.5f; }},
      {"rdiv_scalar", [](const auto& t) { return 1.5f / t[0]; }},
  };
  for (const auto& [name, fn] : unaries)
    compare_op(name, {param({3, 7, 5}, gen, 0.2f, 2.0f)}, fn, 1e-6);
  compare_op(
      "relu around 0", {param({64}, gen)}, [](const auto& t) { return relu(t[0]); }, 1e-6);
  compare_op(
      "swiglu", {param({6, 10}, gen, -3.0f, 3.0f), param({6, 10}, gen)},
      [](const auto& t) { return swiglu(t[0], t[1]); }, 1e-6);
}

TEST_CASE("cuda ops: reductions, shapes and broadcasting") {
  if (gpu_missing()) return;
  Generator gen(3);
  compare_op(
      "sum axis", {param({4, 5, 6}, gen)}, [](const auto& t) { return sum(t[0], 1); }, 1e-6);
  // 1e-5: the CPU adds these 561 values one after another in float and lands 1.6e-6 (relative)
  // from the exact sum, which the kernel's tree reaches to 1e-7 (found by the emulation).
  compare_op(
      "sum all", {param({33, 17}, gen)}, [](const auto& t) { return sum(t[0]); }, 1e-5);
  compare_op(
      "mean keepdim", {param({4, 5, 6}, gen)}, [](const auto& t) { return mean(t[0], -1, true); },
      1e-6);
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
  compare_op(
      "sum_to", {param({2, 3, 5, 4}, gen)},
      [](const auto& t) {
        return sum_to(t[0], {3, 1, 4});
      },
      1e-6);
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

TEST_CASE("cuda ops: matmul through cuBLAS, batched and transposed") {
  if (gpu_missing()) return;
  Generator gen(4);
  const double tol = 1e-5;
  compare_op(
      "2d", {param({7, 9}, gen), param({9, 5}, gen)},
      [](const auto& t) { return matmul(t[0], t[1]); }, tol);
  compare_op(
      "transposes", {param({9, 7}, gen), param({5, 9}, gen)},
      [](const auto& t) {
        return matmul(t[0], t[1], {true, true});
      },
      tol);
  compare_op(
      "batched", {param({3, 4, 6, 5}, gen), param({3, 4, 5, 2}, gen)},
      [](const auto& t) { return matmul(t[0], t[1]); }, tol);
  compare_op(
      "shared b", {param({3, 6, 5}, gen), param({5, 2}, gen)},
      [](const auto& t) { return matmul(t[0], t[1]); }, tol);
  compare_op(
      "broadcast batch", {param({2, 3, 4, 5}, gen), param({2, 1, 5, 3}, gen)},
      [](const auto& t) {
        return matmul(t[0], t[1], {false, false});
      },
      tol);
}

TEST_CASE("cuda ops: softmax, log_softmax, cross_entropy and rms_norm") {
  if (gpu_missing()) return;
  Generator gen(5);
  compare_op(
      "softmax", {param({5, 37}, gen, -4.0f, 4.0f)}, [](const auto& t) { return softmax(t[0]); },
      1e-6);
  compare_op(
      "log_softmax", {param({5, 300}, gen, -4.0f, 4.0f)},
      [](const auto& t) { return log_softmax(t[0]); }, 1e-6);
  Tensor targets = ids_tensor({12}, 11, gen);
  targets.data<int32_t>()[3] = -100;  // ignored row
  compare_op(
      "cross_entropy", {param({12, 11}, gen, -5.0f, 5.0f), constant(targets)},
      [](const auto& t) { return cross_entropy(t[0], t[1]); }, 1e-6);
  compare_op(
      "rms_norm", {param({6, 48}, gen), param({48}, gen, 0.5f, 1.5f)},
      [](const auto& t) { return rms_norm(t[0], t[1], 1e-5f); }, 1e-5);
}

TEST_CASE("cuda ops: rope and causal attention with grouped-query heads") {
  if (gpu_missing()) return;
  Generator gen(6);
  compare_op(
      "rope", {param({2, 3, 9, 8}, gen)}, [](const auto& t) { return rope(t[0]); }, 1e-6);
  for (const auto& [heads, kv_heads, time, dim] :
       std::vector<std::array<int64_t, 4>>{{4, 2, 13, 8}, {2, 2, 1, 4}, {6, 3, 70, 40}}) {
    compare_op(
        "causal_attention " + std::to_string(heads) + "/" + std::to_string(kv_heads) +
            " T=" + std::to_string(time),
        {param({2, heads, time, dim}, gen), param({2, kv_heads, time, dim}, gen),
         param({2, kv_heads, time, dim}, gen)},
        [](const auto& t) { return causal_attention(t[0], t[1], t[2]); }, 1e-5);
  }
  // And against the composed reference on the GPU itself.
  compare_op(
      "attention reference",
      {param({1, 2, 9, 4}, gen), param({1, 1, 9, 4}, gen), param({1, 1, 9, 4}, gen)},
      [](const auto& t) { return causal_attention_reference(t[0], t[1], t[2]); }, 1e-5);
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
      1e-6);
  Tensor ties = uniform({7, 12}, gen);
  ties.data<float>()[3] = ties.data<float>()[5];                         // a tie inside row 0
  ties.data<float>()[12 + 4] = std::numeric_limits<float>::quiet_NaN();  // NaN ranks first
  const TopK cpu = topk(ties, 3), gpu = topk(ties.to(kGpu), 3);
  CHECK(gpu.indices.to_vector<int32_t>() == cpu.indices.to_vector<int32_t>());
  compare_op(
      "topk values", {param({7, 12}, gen)}, [](const auto& t) { return topk(t[0], 4).values; },
      0.0);
}

TEST_CASE("cuda ops: grouped_swiglu and the MoE layer") {
  if (gpu_missing()) return;
  Generator gen(8);
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
      1e-5);
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
        1e-6);
    compare_op(
        "log_softmax", {param(shape, gen, -4.0f, 4.0f)},
        [](const auto& t) { return log_softmax(t[0]); }, 1e-6);
    compare_op(
        "sum over the last axis", {param(shape, gen)}, [](const auto& t) { return sum(t[0], 1); },
        1e-5);
    compare_op(
        "max over the last axis", {param(shape, gen)}, [](const auto& t) { return max(t[0], 1); },
        0.0);
    compare_op(
        "rms_norm", {param(shape, gen), param({shape[1]}, gen, 0.5f, 1.5f)},
        [](const auto& t) { return rms_norm(t[0], t[1], 1e-5f); }, 1e-5);
    compare_op(
        "cross_entropy",
        {param(shape, gen, -3.0f, 3.0f),
         constant(ids_tensor({shape[0]}, static_cast<int32_t>(shape[1]), gen))},
        [](const auto& t) { return cross_entropy(t[0], t[1]); }, 1e-6);
    compare_op(
        "topk", {param(shape, gen)}, [](const auto& t) { return topk(t[0], 1).values; }, 0.0);
  }
  compare_op(
      "sum over a middle axis with a long inner extent", {param({2, 3, 700}, gen)},
      [](const auto& t) { return sum(t[0], 1); }, 1e-6);
  compare_op(
      "max over a middle axis", {param({2, 5, 300}, gen)},
      [](const auto& t) { return max(t[0], 1); }, 0.0);
  compare_op(
      "rms_norm over 300 rows (19 column chunks)",
      {param({300, 8}, gen), param({8}, gen, 0.5f, 1.5f)},
      [](const auto& t) { return rms_norm(t[0], t[1], 1e-5f); }, 1e-5);
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
      [](const auto& t) { return causal_attention(t[0], t[1], t[2]); }, 1e-5);
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
  CHECK(gpu_norm == doctest::Approx(cpu_norm).epsilon(1e-12));
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
    CHECK(relative_error(gpu_out.logits, cpu_out.logits) <= 1e-5);
    CHECK(std::abs(gpu_out.loss.item() - cpu_out.loss.item()) <= 1e-5 * cpu_out.loss.item());
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
      if (cpu_grad.defined()) CHECK(relative_error(gpu_grad, cpu_grad) <= 1e-4);
      cpu_opt.push_back({cpu_params[i].first, cpu_params[i].second, true});
      gpu_opt.push_back({gpu_params[i].first, gpu_params[i].second, true});
    }
    const double cpu_norm = optim::clip_grad_norm(cpu_opt, 0.5);
    const double gpu_norm = optim::clip_grad_norm(gpu_opt, 0.5);
    CHECK(std::abs(gpu_norm - cpu_norm) <= 1e-5 * cpu_norm);
    optim::AdamW cpu_adam(cpu_opt, {.weight_decay = 0.1f}),
        gpu_adam(gpu_opt, {.weight_decay = 0.1f});
    cpu_adam.step(1e-2f);
    gpu_adam.step(1e-2f);
    for (size_t i = 0; i < cpu_params.size(); ++i) {
      CAPTURE(cpu_params[i].first);
      CHECK(relative_error(gpu_params[i].second, cpu_params[i].second) <= 1e-5);
    }
    // The optimiser state comes back to the host for checkpoints.
    CHECK(gpu_adam.state().begin()->second.device() == Device::cpu());
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
  gpu_adam.step(1e-2f);
  cpu_model.forward(ids, targets, {1, 1}).loss.backward();
  cpu_adam.step(1e-2f);
  for (size_t i = 0; i < cpu_params.size(); ++i) {
    CAPTURE(cpu_params[i].first);
    CHECK(relative_error(gpu_params[i].second, cpu_params[i].second) <= 1e-5);
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

TEST_CASE("cuda ops: errors name the problem") {
  if (gpu_missing()) return;
  const Tensor x = ones({4, 3}, kGpu);
  const std::string mixed = error_message([&] { (void)add(x, ones({4, 3})); });
  CHECK(mixed.find("different devices") != std::string::npos);
  Tensor bad = from_vector(std::vector<int32_t>{0, 7, 1}).to(kGpu);
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

  // The plan is built on the host either way; on CUDA its orderings come back to the device.
  const int64_t tokens = 9, k = 2, pool = 5, d = 6;
  const Tensor indices = ids_tensor({tokens, k}, pool - 1, gen);  // expert 4 gets nothing
  const nn::RoutingPlan on_cpu = nn::plan_routing(indices, pool);
  const nn::RoutingPlan on_gpu = nn::plan_routing(indices.to(kGpu), pool);
  CHECK(on_gpu.offsets == on_cpu.offsets);
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
      1e-5);
}
