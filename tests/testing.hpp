// Small helpers shared by the doctest test files, so each file keeps only what is specific to it.
//
// - error_message(f): the what() of the rex::Error that f throws, for checking message contents.
// - check_close(got, want, tol): element by element |got - want| <= tol * (1 + |want|), computed in
//   double; an infinite want must be matched exactly (same sign), a NaN on either side fails, and a
//   failure names the element and both values.
// - random_normal_param / random_uniform_param: random f32 tensors that require a gradient, drawn
//   from a caller-owned Generator so a test fixes its values with one seed.
//
// - raw_bytes / same_bytes: a tensor's element bytes, for bit-exact comparisons (NaN != NaN as
//   floats).
// - random_permutation: a random permutation of 0 .. n - 1 and its inverse, as i32 tensors.
// - TempDir: a fresh folder under the system temp folder, removed with its contents at scope exit.
//
// Gradient checking lives in gradcheck.hpp.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>
#include <rex/rex.hpp>

namespace rex::testing {

// A random permutation of 0 .. n - 1 (a Fisher-Yates shuffle) and its inverse, as i32 tensors.
inline std::pair<Tensor, Tensor> random_permutation(int64_t n, Generator& gen) {
  std::vector<int32_t> order(static_cast<size_t>(n)), inverse(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  for (int64_t i = n - 1; i > 0; --i)
    std::swap(order[static_cast<size_t>(i)],
              order[static_cast<size_t>(gen.below(static_cast<uint64_t>(i + 1)))]);
  for (int64_t i = 0; i < n; ++i)
    inverse[static_cast<size_t>(order[static_cast<size_t>(i)])] = static_cast<int32_t>(i);
  return {from_vector(order), from_vector(inverse)};
}

// The message of the rex::Error that f() throws, or "(no rex::Error thrown)" when it returns.
template <class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const rex::Error& e) {
    return e.what();
  }
  return "(no rex::Error thrown)";
}

// Whether text contains part (error messages, logs).
inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

inline void check_close(const Tensor& got, const std::vector<double>& want, double tol) {
  REQUIRE(got.defined());
  REQUIRE(got.numel() == static_cast<int64_t>(want.size()));
  const float* g = got.data<float>();
  for (int64_t i = 0; i < got.numel(); ++i) {
    const double w = want[static_cast<size_t>(i)];
    if (std::isinf(w)) {
      CHECK_MESSAGE(g[i] == static_cast<float>(w), "element ", i, ": got ", g[i], ", want ", w);
    } else {
      CHECK_MESSAGE(std::abs(g[i] - w) <= tol * (1.0 + std::abs(w)), "element ", i, ": got ", g[i],
                    ", want ", w);
    }
  }
}

inline void check_close(const Tensor& got, const Tensor& want, double tol) {
  REQUIRE(got.defined());
  REQUIRE(want.defined());
  REQUIRE(got.shape() == want.shape());
  const std::vector<float> w = want.to_vector();
  check_close(got, std::vector<double>(w.begin(), w.end()), tol);
}

inline Tensor random_normal_param(const Shape& shape, Generator& gen, float mean = 0.0f,
                                  float stddev = 1.0f) {
  Tensor x = normal(shape, gen, mean, stddev);
  x.requires_grad_();
  return x;
}

inline Tensor random_uniform_param(const Shape& shape, Generator& gen, float low, float high) {
  Tensor x = uniform(shape, gen, low, high);
  x.requires_grad_();
  return x;
}

inline std::string raw_bytes(const Tensor& t) {
  const char* p = t.dtype() == DType::f32 ? reinterpret_cast<const char*>(t.data<float>())
                                          : reinterpret_cast<const char*>(t.data<int32_t>());
  return std::string(p, static_cast<size_t>(t.numel()) * dtype_size(t.dtype()));
}

inline bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && raw_bytes(a) == raw_bytes(b);
}

// causal_attention time first against heads first (permuted in and out) on `device`: the same
// bits in the output and in the gradients of q, k and v. Shapes are time first: q [B, T, Hq, D],
// k and v [B, T, Hkv, D].
inline void check_time_first_attention(const Shape& q_shape, const Shape& kv_shape, Device device,
                                       Generator& gen) {
  const std::vector<Tensor> inputs{normal(q_shape, gen), normal(kv_shape, gen),
                                   normal(kv_shape, gen)};
  const Tensor g = normal(q_shape, gen);
  const int64_t heads = q_shape[2], kv_heads = kv_shape[2];
  const auto heads_first = [](const Tensor& t) { return permute(t, {0, 2, 1, 3}); };
  enum class Form { heads_first, time_first, packed };
  // out, dq, dk, dv as bytes.
  const auto run = [&](Form form) {
    std::vector<Tensor> x;
    for (const Tensor& input : inputs) x.push_back(input.copy_to(device).requires_grad_());
    std::vector<std::string> bytes;
    const auto keep = [&](const Tensor& t) { bytes.push_back(raw_bytes(t.to(Device::cpu()))); };
    if (form == Form::packed) {  // q and k in one leaf, its gradient cut apart afterwards
      const Tensor qk = concat({inputs[0], inputs[1]}, 2).copy_to(device).requires_grad_();
      const Tensor out = causal_attention_packed(qk, x[2], heads);
      out.backward(g.copy_to(device));
      const Tensor dqk = qk.grad().to(Device::cpu());
      keep(out);
      keep(slice(dqk, 2, 0, heads));
      keep(slice(dqk, 2, heads, heads + kv_heads));
      keep(x[2].grad());
      return bytes;
    }
    const Tensor out = form == Form::time_first
                           ? causal_attention(x[0], x[1], x[2], AttentionLayout::time_first)
                           : heads_first(causal_attention(heads_first(x[0]), heads_first(x[1]),
                                                          heads_first(x[2])));
    out.backward(g.copy_to(device));
    keep(out);
    for (const Tensor& leaf : x) keep(leaf.grad());
    return bytes;
  };
  const std::vector<std::string> composed = run(Form::heads_first);
  const std::vector<std::string> time_first = run(Form::time_first), packed = run(Form::packed);
  const char* names[] = {"out", "dq", "dk", "dv"};
  for (size_t i = 0; i < 4; ++i) {
    CAPTURE(names[i]);
    CHECK(time_first[i] == composed[i]);
    CHECK(packed[i] == composed[i]);
  }
}

// rope_qk(q, k) against rope_heads of each, packed by concat, on `device`: the same bits, and so
// are both gradients (from one random gradient of the packed tensor).
inline void check_rope_qk(int64_t batch, int64_t time, int64_t heads, int64_t kv_heads,
                          int64_t head_dim, Device device, Generator& gen) {
  const Tensor q = normal(Shape{batch, time, heads * head_dim}, gen);
  const Tensor k = normal(Shape{batch, time, kv_heads * head_dim}, gen);
  const Tensor g = normal(Shape{batch, time, heads + kv_heads, head_dim}, gen);
  const auto run = [&](bool fused) {
    const Tensor dq = q.copy_to(device).requires_grad_(), dk = k.copy_to(device).requires_grad_();
    const Tensor out =
        fused ? rope_qk(dq, dk, heads, kv_heads, 500.0f, 3)
              : concat({rope_heads(dq, heads, 500.0f, 3), rope_heads(dk, kv_heads, 500.0f, 3)}, 2);
    out.backward(g.copy_to(device));
    return std::vector<std::string>{raw_bytes(out.to(Device::cpu())),
                                    raw_bytes(dq.grad().to(Device::cpu())),
                                    raw_bytes(dk.grad().to(Device::cpu()))};
  };
  const std::vector<std::string> fused = run(true), composed = run(false);
  const char* names[] = {"out", "dq", "dk"};
  for (size_t i = 0; i < 3; ++i) {
    CAPTURE(names[i]);
    CHECK(fused[i] == composed[i]);
  }
}

struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag)
      : path(std::filesystem::temp_directory_path() /
             ("rex_" + tag + "_" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path / name).string(); }
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(path))
      names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
};

}  // namespace rex::testing
