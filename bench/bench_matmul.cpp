// rex::matmul against raw Eigen GEMM on the same buffers, interleaved in one run.
//
// For each shape (m, k, n): rex::matmul(a, b) (which allocates its output and splits the product
// into one tile per thread) and Eigen's C.noalias() = A * B written into a preallocated buffer, on
// one thread (rex builds Eigen without its OpenMP GEMM, rex/backend/cpu/eigen.hpp), alternated
// every repeat; prints the median GFLOP/s of each (2mnk flops per product) and the ratio
// rex / Eigen. The two products must agree to the bit (rex's tiles compute as the whole). Usage:
//   bench_matmul [--repeats N]        (threads: OMP_NUM_THREADS, default all cores)
#include <Eigen/Core>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include <rex/rex.hpp>

#include "timing.hpp"

namespace {
// rex's tensors are row-major, Eigen's default is column-major.
using RowMajorMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
}  // namespace

int main(int argc, char** argv) {
  int repeats = 0;  // 0: chosen per size so each contender runs about 0.3 s
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) {
      repeats = std::atoi(argv[++i]);
    } else {
      std::printf("usage: bench_matmul [--repeats N]\n");
      return std::strcmp(argv[i], "--help") == 0 ? 0 : 2;
    }
  }
  struct Case {
    const char* label;
    int64_t m, k, n;
  };
  const Case cases[] = {
      {"square", 64, 64, 64},    {"square", 128, 128, 128},    {"square", 256, 256, 256},
      {"square", 512, 512, 512}, {"square", 1024, 1024, 1024}, {"attn-proj", 768, 128, 512},
      {"ffn-up", 768, 128, 384}, {"ffn-down", 768, 384, 128},  {"lm-head", 768, 128, 1024},
      {"tall", 1024, 256, 256},
  };
  std::printf("threads: %d (rex::thread_count)\n", rex::thread_count());
  std::printf("%-10s %5s %5s %5s  %12s %12s %7s\n", "shape", "m", "k", "n", "rex GFLOP/s",
              "Eigen GFLOP/s", "ratio");
  rex::Generator gen(1);
  for (const Case& c : cases) {
    const rex::Tensor a = rex::normal({c.m, c.k}, gen), b = rex::normal({c.k, c.n}, gen);
    rex::Tensor eigen_out = rex::zeros({c.m, c.n});
    Eigen::Map<const RowMajorMatrix> A(a.data<float>(), c.m, c.k);
    Eigen::Map<const RowMajorMatrix> B(b.data<float>(), c.k, c.n);
    Eigen::Map<RowMajorMatrix> C(eigen_out.data<float>(), c.m, c.n);
    const double flops = 2.0 * static_cast<double>(c.m * c.k * c.n);
    const int n = repeats > 0 ? repeats : std::max(15, static_cast<int>(0.3 * 20e9 / flops));
    auto [t_rex, t_eigen] = rex::bench::interleaved_medians([&] { rex::matmul(a, b); },
                                                            [&] { C.noalias() = A * B; }, 3, n);
    // Both contenders run the same Eigen kernel, so their products must agree to the bit; if not,
    // the timing would compare different work.
    const rex::Tensor check = rex::matmul(a, b);
    if (std::memcmp(check.data<float>(), eigen_out.data<float>(),
                    sizeof(float) * static_cast<size_t>(c.m * c.n)) != 0) {
      std::fprintf(stderr, "bench_matmul: rex and Eigen products differ for %s\n", c.label);
      return 1;
    }
    std::printf("%-10s %5lld %5lld %5lld  %12.1f %12.1f %7.3f\n", c.label,
                static_cast<long long>(c.m), static_cast<long long>(c.k),
                static_cast<long long>(c.n), flops / t_rex * 1e-9, flops / t_eigen * 1e-9,
                t_eigen / t_rex);
  }
  return 0;
}
