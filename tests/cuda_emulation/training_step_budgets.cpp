// Budgets of a training step on the emulated device: the default model (the built-in config, batch
// 1 as in check_train_emulated.sh: a step of the default batch of 12 takes about 27 s emulated, and
// gave the same launches, waits and cuBLAS calls when measured)
// trains 3 steps on a made-up corpus, each step counted as an interval of the emulation's counters
// (include/rex_emulation_counters.h). The first step is not held to a budget (it warms the caching
// allocator); steps 2 and 3 may launch at most as many kernels, make at most as many cuBLAS calls
// and make the host wait at most as often as when the budgets were set (exact counts: the same
// corpus, seed and routing give the same calls every run; the experts a step's routing reaches
// change the count, hence a budget per step). The figures of every step are printed. Lower a
// budget when a change removes launches, calls or waits; never raise one without saying why in
// the commit.
// Usage: training_step_budgets WORK_DIR [--kernels] (--kernels: also count every kernel's memory
// accesses, and print each step's table by kernel and GEMM shape)
#include <cstdio>
#include <string>

#include <rex_emulation_counters.h>

#include "emulated_training.hpp"

namespace {

// Steps 2 and 3 route their tokens differently, so each has its own budget. (Since the optimiser
// arena, whose 4 launches do not depend on how many parameters have a gradient, step 3 launches
// more than step 2: the 6 more launches of its forward and backward were hidden before by the 24
// fewer of the per-parameter optimiser, 60 parameters with a gradient against 66.)
struct Budget {
  uint64_t launches, host_waits, cublas_calls;
};
// Since uploads are staged through pinned memory (kernels/memory.cu), 23 fewer waits: 12 pageable
// uploads and the 11 stream synchronizations after them; since cross_entropy reads its bad-target
// flag and its count in one copy, 2 fewer. Since token ids and targets uploaded from the host keep
// a host copy there (their checks, the count of targets and the embedding's scatter plan need no
// read-back) and a step's losses and gradient norm stay on the device until a log step reads
// them (queue_step), 10 fewer, and one launch less (the ids' check kernel): 8 waits left, the
// expert counts of the 4 MoE layers. Since the experts' products in fp32 are grouped products
// (kernels/grouped_gemm.cu, 6 launches a MoE layer for all its experts), 24 launches more and 144
// cuBLAS calls fewer (9 per expert that got rows, each at least one kernel on a GPU): the kernel
// budget rose with them, and cuBLAS calls have a budget of their own. Since the routing plan stays
// on the device (its counts read once a step, for all 4 layers, in one copy: 2 waits, the copy
// and its synchronisation) and every expert of a table gets a gated gradient whose additions
// into the table's go in one add_pairs launch, 6 waits and 9 (step 2) or 15 (step 3) launches
// fewer; both steps now launch the same kernels, whatever experts their tokens reach. Since AdamW
// keeps its step counts on the device and decides there which gated gradients are real (one
// adamw_prepare launch more), and queue_step leaves the counts for read_steps: no wait at all.
// Since sums on CUDA write every output into an empty tensor (the CPU's loop adds into zeros), 20
// fills fewer. Since the MoE layer's PSR mask is applied by top-k itself, its gated combine and
// its balance loss are one kernel each way, and q and k are split into heads by their RoPE kernel,
// 92 fewer (23 a layer). Since the last use of a gradient that meets another adds the waiting one
// in its own kernel (the engine's `waiting` gradients), 24 fewer; since each residual add is made
// by the norm after it (add_rms_norm), 8 more; since the router's softmax and top-k are one kernel
// (softmax_topk), 4 more. Since rms_norm's backward makes dx and dw's partials in one launch, 9
// fewer; since the grouped gate and up products write SwiGLU's activation and the product back
// through down makes SwiGLU's backward, 8 more. Since attention reads q, k and v and writes its
// output time first (no permute around it), 16 fewer; since the grouped products keep SwiGLU's
// activation for the backward instead of recomputing it, 4 more; since the grouped weight products
// add into the expert table's gradients that the later layers made (no add_pairs), 3 more; since
// one sum_of adds the MoE layers' auxiliary losses, 2 more.
constexpr Budget kBudgets[] = {{116, 0, 63}, {116, 0, 63}};
constexpr int kSteps = 3;

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 2) {
    std::fprintf(stderr, "usage: training_step_budgets WORK_DIR [--kernels]\n");
    return 2;
  }
  const bool show_kernels = argc > 2 && std::string(argv[2]) == "--kernels";
  cuda_emulation::EmulatedRun run(rex::train::read_run_config("", {"train.batch_size=1"}), argv[1]);

  int failures = 0;
  for (int step = 0; step < kSteps; ++step) {
    cuda_emulation::begin_interval(show_kernels);
    run.step(step);
    const cuda_emulation::Counts counts = cuda_emulation::end_interval();
    std::printf("step %d: %s", step + 1, cuda_emulation::describe(counts, show_kernels).c_str());
    if (step == 0) continue;
    const Budget& budget = kBudgets[step - 1];
    if (counts.launches > budget.launches) {
      std::printf("FAIL: step %d launches %llu kernels, more than its budget of %llu\n", step + 1,
                  static_cast<unsigned long long>(counts.launches),
                  static_cast<unsigned long long>(budget.launches));
      ++failures;
    }
    if (counts.cublas_calls > budget.cublas_calls) {
      std::printf("FAIL: step %d makes %llu cuBLAS calls, more than its budget of %llu\n", step + 1,
                  static_cast<unsigned long long>(counts.cublas_calls),
                  static_cast<unsigned long long>(budget.cublas_calls));
      ++failures;
    }
    if (counts.host_waits() > budget.host_waits) {
      std::printf("FAIL: step %d makes the host wait %llu times, more than its budget of %llu\n",
                  step + 1, static_cast<unsigned long long>(counts.host_waits()),
                  static_cast<unsigned long long>(budget.host_waits));
      ++failures;
    }
  }
  return failures == 0 ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "training_step_budgets: %s\n", e.what());
  return 1;
}
