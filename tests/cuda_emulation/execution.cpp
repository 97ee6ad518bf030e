// Kernel execution: a launch's blocks run one after another (x fastest, then y, then z) on the
// calling thread; inside a block, every thread is a fiber (Boost.Context's fcontext, a few
// nanoseconds a switch) on a stack of its own.
//
// Scheduling is cooperative and fixed: the block's fibers start in thread order and each runs
// until it finishes or waits, in __syncthreads or a warp-synchronous intrinsic, then switches
// straight to the next ready fiber (one jump, not two through the scheduler); waiting fibers are
// resumed in the order they were released. The same launch therefore always runs the same way.
//
// __syncthreads: the first thread to arrive fixes the call site; every other thread of the block
// must arrive at that same site. The barrier opens when all have arrived, and the shared-memory
// race checker starts a new interval. A thread that exits while others wait at a barrier, or a
// thread that reaches a barrier that an exited thread skipped, fails the launch: that barrier is
// not reached by every thread, which CUDA leaves undefined (it hangs or corrupts on a GPU).
//
// Warps are 32 consecutive threads (linear index x + y Dx + z Dx Dy). A warp intrinsic is a
// rendezvous of exactly the lanes named in its mask: the calling lane must be in the mask, every
// lane of the mask must exist and not have exited, and lanes whose masks overlap must use the
// same mask and the same intrinsic. When the last lane of the mask arrives, every lane receives
// its value: __shfl_sync reads lane (srcLane mod width) of its width-segment, __shfl_up/down read
// lane -/+ delta and keep their own value past the segment's edge, __shfl_xor reads lane ^ mask;
// reading a lane outside the mask fails the launch (CUDA returns an undefined value). Ballot, any
// and all combine the predicates of the mask's lanes.
//
// The tensor-core instructions (ldmatrix, mma; cuda_runtime.h) are warp collectives too, under the
// full mask and with stricter rules, as their .aligned qualifier demands: all 32 lanes must exist,
// none may have exited, and all must arrive at the same instruction from the same site (a lane
// waiting at another site, or in another operation, fails the launch, naming the instruction).
// Each lane's value is the address of its TensorLane (on its own stack, alive while it waits); the
// last lane to arrive computes every lane's results there (tensor_cores.cpp) and releases them.
//
// A failure (a bad access found by checks.cpp, a barrier or warp misuse, or a deadlock: threads
// waiting that nobody can release) ends the launch at once: the faulting fiber is abandoned, no
// further thread or block runs, and cudaGetLastError reports the failure with the kernel, block
// and thread it happened in.
#include <sys/mman.h>
#include <unistd.h>

#include <boost/context/detail/fcontext.hpp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "emulator.hpp"

namespace cuda_emulation::detail {

Coordinates current{};

namespace {

namespace fctx = boost::context::detail;

constexpr int kMaxBlockThreads = 1024;
constexpr size_t kStackBytes = 64 * 1024;

std::string site_text(const Site& site) {
  const char* file = site.file;
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(site.line);
}

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::shfl:
      return "__shfl_sync";
    case WarpOp::shfl_up:
      return "__shfl_up_sync";
    case WarpOp::shfl_down:
      return "__shfl_down_sync";
    case WarpOp::shfl_xor:
      return "__shfl_xor_sync";
    case WarpOp::ballot:
      return "__ballot_sync";
    case WarpOp::any:
      return "__any_sync";
    case WarpOp::all:
      return "__all_sync";
    case WarpOp::ldmatrix_x1:
      return "ldmatrix.sync.aligned.m8n8.x1.shared.b16";
    case WarpOp::ldmatrix_x2:
      return "ldmatrix.sync.aligned.m8n8.x2.shared.b16";
    case WarpOp::ldmatrix_x4:
      return "ldmatrix.sync.aligned.m8n8.x4.shared.b16";
    case WarpOp::ldmatrix_trans_x1:
      return "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16";
    case WarpOp::ldmatrix_trans_x2:
      return "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16";
    case WarpOp::ldmatrix_trans_x4:
      return "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16";
    case WarpOp::mma_bf16_m16n8k16:
      return "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
    case WarpOp::mma_tf32_m16n8k8:
      return "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32";
  }
  return "a warp intrinsic";
}

bool is_tensor_op(WarpOp op) {
  return static_cast<int>(op) >= static_cast<int>(WarpOp::ldmatrix_x1);
}

std::string mask_text(unsigned int mask) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%08x", mask);
  return text;
}

// Fiber stacks, allocated once, each with a never-mapped guard page below it (a kernel that
// overflows its stack faults instead of corrupting a neighbour's).
class Stacks {
 public:
  Stacks() {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t each = kStackBytes + page_;
    void* region = mmap(nullptr, each * kMaxBlockThreads, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED) {
      std::fprintf(stderr, "rex CUDA emulation: cannot allocate fiber stacks\n");
      std::abort();
    }
    base_ = static_cast<char*>(region);
    for (int i = 0; i < kMaxBlockThreads; ++i) mprotect(base_ + i * each, page_, PROT_NONE);
  }
  // Each top is shifted by a different multiple of 64 bytes: tops a whole number of pages apart
  // would all map to the same cache sets, and a warp intrinsic switches through 32 stacks in a row.
  void* top(int thread) const {
    return base_ + (thread + 1) * (kStackBytes + page_) - static_cast<size_t>(thread) % 64 * 64;
  }

 private:
  char* base_ = nullptr;
  size_t page_ = 4096;
};

enum class Wait : uint8_t { none, barrier, warp, done };

struct Fiber {
  fctx::fcontext_t context = nullptr;
  Wait wait = Wait::none;
  WarpOp op = WarpOp::shfl;  // the warp operation it waits in
  Site site{};               // where it waits
  uint64_t received = 0;     // what a warp collective gave this lane
};

struct Collective {
  WarpOp op;
  unsigned int mask = 0, joined = 0;
  int width = 32;
  Site site;
  uint64_t value[32] = {};
  int operand[32] = {};
};

// A warp's collectives in progress: at most one per lane, so 32 slots (the first `open` used).
struct Warp {
  unsigned int existing = 0, exited = 0;
  int open = 0;
  Collective slots[32];
};

// The fibers ready to run; each thread is in it at most once. Released barrier waiters join at the
// back; the lanes a warp intrinsic releases go to the front, so that a warp keeps running while
// its 32 stacks are still in the cache (running all warps in turn was twice as slow).
class ReadyQueue {
 public:
  void reset(int threads) {
    items_.assign(static_cast<size_t>(threads), 0);
    head_ = count_ = 0;
  }
  bool empty() const { return count_ == 0; }
  void push(int thread) {
    size_t at = head_ + count_++;
    if (at >= items_.size()) at -= items_.size();
    items_[at] = thread;
  }
  void push_front(int thread) {
    head_ = head_ == 0 ? items_.size() - 1 : head_ - 1;
    items_[head_] = thread;
    ++count_;
  }
  int pop() {
    const int thread = items_[head_];
    if (++head_ == items_.size()) head_ = 0;
    --count_;
    return thread;
  }

 private:
  std::vector<int> items_;
  size_t head_ = 0, count_ = 0;
};

// The launch that runs now.
struct Run {
  const char* kernel = nullptr;
  void (*body)(const void*) = nullptr;
  const void* closure = nullptr;
  int threads = 0;
  std::vector<Fiber> fibers;
  std::vector<uint3> coordinates;  // threadIdx of each linear thread index
  std::vector<Warp> warps;
  ReadyQueue ready;
  int running = -1;
  fctx::fcontext_t scheduler = nullptr;
  // the pending __syncthreads of this block
  int barrier_arrived = 0;
  Site barrier_site;
  int exited = 0, first_exited = -1;
  // the failure, if any
  bool failed = false;
  cudaError_t code = cudaSuccess;
  std::string message;
};

Run* running_launch = nullptr;

uint3 coordinates_of(int thread, dim3 block) {
  const auto t = static_cast<unsigned int>(thread);
  return {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
}

std::string coordinates_text(uint3 c) {
  char text[48];
  std::snprintf(text, sizeof text, "(%u,%u,%u)", c.x, c.y, c.z);
  return text;
}

// Every jump between contexts carries where the context it leaves must be saved (a fiber's slot,
// the scheduler's, or null for a fiber that will never run again); whoever it lands in saves it.
void save_left_context(const fctx::transfer_t& arrived) {
  if (arrived.data != nullptr) *static_cast<fctx::fcontext_t*>(arrived.data) = arrived.fctx;
}

// Leaves the running fiber (its context saved at `save`) for the next ready fiber, directly, or
// for the scheduler when none is ready; returns when some context switches back to it.
void switch_away(fctx::fcontext_t* save) {
  Run& run = *running_launch;
  fctx::fcontext_t target = run.scheduler;
  if (!run.ready.empty() && !run.failed) {
    const int next = run.ready.pop();
    run.running = next;
    current.thread_idx = run.coordinates[next];
    target = run.fibers[next].context;
  }
  save_left_context(fctx::jump_fcontext(target, save));
}

void suspend() {
  Run& run = *running_launch;
  switch_away(&run.fibers[run.running].context);
}

[[noreturn]] void abandon() {
  Run& run = *running_launch;
  save_left_context(fctx::jump_fcontext(run.scheduler, nullptr));  // never resumed
  std::abort();
}

void release(int thread) {
  Run& run = *running_launch;
  run.fibers[thread].wait = Wait::none;
  run.ready.push(thread);
}

void thread_exits(int thread) {
  Run& run = *running_launch;
  if (run.barrier_arrived > 0)
    kernel_fault(cudaErrorLaunchFailure, [&] {
      return "thread " + thread_text(thread) + " exited without reaching the __syncthreads at " +
             site_text(run.barrier_site) + " where " + std::to_string(run.barrier_arrived) +
             " threads of its block wait";
    });
  Warp& warp = run.warps[thread / 32];
  const unsigned int bit = 1u << (thread % 32);
  for (int i = 0; i < warp.open; ++i)
    if (const Collective& c = warp.slots[i]; (c.mask & bit) != 0)
      kernel_fault(cudaErrorLaunchFailure, [&] {
        return "lane " + std::to_string(thread % 32) + " exited while lanes " +
               mask_text(c.joined) + " of its warp wait for it in " + op_name(c.op) + " at " +
               site_text(c.site) + " (mask " + mask_text(c.mask) + ")" +
               (is_tensor_op(c.op)
                    ? "; .aligned: all 32 lanes of the warp must execute this same instruction"
                    : "");
      });
  warp.exited |= bit;
  if (run.exited++ == 0) run.first_exited = thread;
  run.fibers[thread].wait = Wait::done;
}

void fiber_main(fctx::transfer_t from) {
  save_left_context(from);
  Run& run = *running_launch;
  run.body(run.closure);
  thread_exits(run.running);
  switch_away(nullptr);  // a finished fiber is never resumed
  std::abort();
}

// From the scheduler: runs ready fibers, which pass control among themselves, until none is ready.
void run_ready_fibers() {
  Run& run = *running_launch;
  if (run.ready.empty()) return;
  const int first = run.ready.pop();
  run.running = first;
  current.thread_idx = run.coordinates[first];
  fast_path.in_kernel = true;
  save_left_context(fctx::jump_fcontext(run.fibers[first].context, &run.scheduler));
  fast_path.in_kernel = false;
}

std::string describe_waiters(const Run& run) {
  std::string text;
  int shown = 0;
  for (int t = 0; t < run.threads && shown < 4; ++t) {
    const Fiber& f = run.fibers[t];
    if (f.wait != Wait::barrier && f.wait != Wait::warp) continue;
    text += (shown++ ? "; " : "") + std::string("thread ") + thread_text(t) + " waits in " +
            (f.wait == Wait::barrier ? "__syncthreads" : op_name(f.op)) + " at " +
            site_text(f.site);
  }
  return text;
}

// Runs one block to the end; false when the launch failed.
bool run_block(Run& run, const Stacks& stacks, size_t dynamic_shared) {
  start_block_shared_memory(dynamic_shared);
  run.barrier_arrived = 0;
  run.exited = 0;
  run.first_exited = -1;
  run.ready.reset(run.threads);
  for (Warp& w : run.warps) {
    w.exited = 0;
    w.open = 0;
  }
  for (int t = 0; t < run.threads; ++t) {
    run.fibers[t] = Fiber{};
    run.fibers[t].context = fctx::make_fcontext(stacks.top(t), kStackBytes, fiber_main);
    run.ready.push(t);
  }
  run_ready_fibers();
  if (fast_path.counting_memory) count_block_end();
  if (run.failed) return false;
  if (run.exited != run.threads) {
    run.failed = true;
    run.code = cudaErrorLaunchFailure;
    run.message = "deadlock: " + describe_waiters(run) + "; nothing can release them, in kernel " +
                  run.kernel + ", block " + coordinates_text(current.block_idx);
    return false;
  }
  return true;
}

cudaError_t check_configuration(const char* kernel, dim3 grid, dim3 block, size_t shared) {
  const cudaDeviceProp& p = device_properties();
  const std::string name = std::string("launch of ") + kernel + ": ";
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    return fail(cudaErrorInvalidConfiguration, name + "a grid or block extent is 0");
  if (threads > static_cast<uint64_t>(p.maxThreadsPerBlock) ||
      block.x > static_cast<unsigned int>(p.maxThreadsDim[0]) ||
      block.y > static_cast<unsigned int>(p.maxThreadsDim[1]) ||
      block.z > static_cast<unsigned int>(p.maxThreadsDim[2]))
    return fail(cudaErrorInvalidConfiguration,
                name + "a block of (" + std::to_string(block.x) + "," + std::to_string(block.y) +
                    "," + std::to_string(block.z) + ") = " + std::to_string(threads) +
                    " threads is more than the device's limit of 1024 threads (1024, 1024, 64)");
  if (grid.x > static_cast<unsigned int>(p.maxGridSize[0]) ||
      grid.y > static_cast<unsigned int>(p.maxGridSize[1]) ||
      grid.z > static_cast<unsigned int>(p.maxGridSize[2]))
    return fail(cudaErrorInvalidConfiguration,
                name + "a grid of (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                    std::to_string(grid.z) + ") blocks is past the limits (2^31-1, 65535, 65535)");
  if (shared > p.sharedMemPerBlock)
    return fail(cudaErrorInvalidValue,
                name + std::to_string(shared) +
                    " bytes of dynamic shared memory is more than the 49152 bytes a block may use "
                    "without cudaFuncSetAttribute");
  return cudaSuccess;
}

std::mutex launch_mutex;  // one launch at a time, whichever host thread issues it

// With REX_CUDA_EMULATION_LAUNCHES=path, the name of each kernel this process launches (template
// arguments dropped) is appended to that file once, for the CTest check that every kernel ran.
void note_launch(const char* kernel) {
  static const char* const path = std::getenv("REX_CUDA_EMULATION_LAUNCHES");
  static std::set<std::string> noted;
  if (path == nullptr) return;
  std::string name(kernel);
  name = name.substr(0, name.find('<'));
  if (!noted.insert(name).second) return;
  if (FILE* f = std::fopen(path, "a")) {
    std::fprintf(f, "%s\n", name.c_str());
    std::fclose(f);
  }
}

}  // namespace

std::string thread_text(int thread) {
  return coordinates_text(coordinates_of(thread, current.block_dim));
}

int current_thread() { return running_launch ? running_launch->running : -1; }

std::string where() {
  if (running_launch == nullptr) return "outside any kernel";
  const Run& run = *running_launch;
  return std::string("in kernel ") + run.kernel + ", block " + coordinates_text(current.block_idx) +
         ", thread " + thread_text(run.running);
}

void kernel_fault_message(cudaError_t code, std::string&& message) {
  Run& run = *running_launch;
  run.failed = true;
  run.code = code;
  run.message = std::move(message);
  run.message += " ";
  run.message += where();
  abandon();
}

void* dynamic_shared_memory() { return dynamic_shared_base(); }

void syncthreads(Site site) {
  Run& run = *running_launch;
  const int thread = run.running;
  if (run.exited > 0)
    kernel_fault(cudaErrorLaunchFailure, [&] {
      return "__syncthreads at " + site_text(site) + " is not reached by every thread: thread " +
             thread_text(run.first_exited) + " of this block has already exited";
    });
  if (run.barrier_arrived == 0) {
    run.barrier_site = site;
  } else if (!same_site(site, run.barrier_site)) {
    kernel_fault(cudaErrorLaunchFailure, [&] {
      return "threads meet different __syncthreads: this thread at " + site_text(site) + ", " +
             std::to_string(run.barrier_arrived) + " others at " + site_text(run.barrier_site);
    });
  }
  if (++run.barrier_arrived == run.threads) {
    run.barrier_arrived = 0;
    shared_memory_barrier();
    for (int t = 0; t < run.threads; ++t)
      if (run.fibers[t].wait == Wait::barrier) release(t);
    return;
  }
  run.fibers[thread].wait = Wait::barrier;
  run.fibers[thread].site = site;
  suspend();
}

uint64_t warp_collective(WarpOp op, unsigned int mask, uint64_t value, int operand, int width,
                         Site site) {
  Run& run = *running_launch;
  const int thread = run.running, lane = thread % 32;
  Warp& warp = run.warps[thread / 32];
  const unsigned int bit = 1u << lane;
  const bool tensor = is_tensor_op(op);
  const auto misuse = [&](const std::string& what) {
    kernel_fault(cudaErrorLaunchFailure, [&] {
      if (tensor)
        return std::string(op_name(op)) + " at " + site_text(site) + ": " + what +
               " (.aligned: all 32 lanes of the warp must execute this same instruction)";
      return std::string(op_name(op)) + " at " + site_text(site) + " with mask " + mask_text(mask) +
             ": " + what;
    });
  };
  if ((mask & bit) == 0) misuse("the calling lane " + std::to_string(lane) + " is not in the mask");
  if ((mask & ~warp.existing) != 0)
    misuse("the mask names lanes " + mask_text(mask & ~warp.existing) +
           " that this warp does not have (the block has " + std::to_string(run.threads) +
           " threads)");
  if ((mask & warp.exited) != 0)
    misuse("the mask names lanes " + mask_text(mask & warp.exited) + " that have already exited");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    misuse("width " + std::to_string(width) + " is not a power of two from 1 to 32");

  Collective* joining = nullptr;
  for (int i = 0; i < warp.open; ++i) {
    Collective& c = warp.slots[i];
    if ((c.mask & mask) == 0) continue;
    if (c.mask != mask)
      misuse("lanes " + mask_text(c.joined) + " wait at " + site_text(c.site) +
             " with the overlapping mask " + mask_text(c.mask));
    if (c.op != op || c.width != width)
      misuse("lanes " + mask_text(c.joined) + " of the same mask wait in " + op_name(c.op) +
             " (width " + std::to_string(c.width) + ") at " + site_text(c.site));
    if (tensor && !same_site(c.site, site))
      misuse("lanes " + mask_text(c.joined) + " wait in it at another site, " + site_text(c.site));
    joining = &c;
  }
  if (joining == nullptr) {
    joining = &warp.slots[warp.open++];
    joining->op = op;
    joining->mask = mask;
    joining->joined = 0;
    joining->width = width;
    joining->site = site;
  }
  joining->joined |= bit;
  joining->value[lane] = value;
  joining->operand[lane] = operand;
  if (joining->joined != mask) {
    Fiber& self = run.fibers[thread];
    self.wait = Wait::warp;
    self.op = op;
    self.site = site;
    suspend();
    return self.received;
  }

  // The last lane of the mask: deliver every lane's value, then free the slot (the last open
  // one moves into it).
  const Collective& c = *joining;
  const int base_thread = thread - lane;
  if (tensor) {
    TensorLane* lanes[32];
    for (int l = 0; l < 32; ++l) lanes[l] = reinterpret_cast<TensorLane*>(c.value[l]);
    tensor_core_results(op, lanes);
    for (int l = 31; l >= 0; --l) {
      if (l == lane) continue;
      run.fibers[base_thread + l].received = 0;
      run.fibers[base_thread + l].wait = Wait::none;
      run.ready.push_front(base_thread + l);
    }
    *joining = warp.slots[--warp.open];
    return 0;
  }
  uint64_t votes = 0;
  for (int l = 0; l < 32; ++l)
    if ((c.mask >> l & 1u) != 0 && c.value[l] != 0) votes |= 1ull << l;
  uint64_t mine = 0;
  for (int l = 0; l < 32; ++l) {
    if ((c.mask >> l & 1u) == 0) continue;
    const int segment = l & ~(c.width - 1), in_segment = l & (c.width - 1);
    int source = l;
    switch (c.op) {
      case WarpOp::shfl:
        source = segment + (c.operand[l] & (c.width - 1));
        break;
      case WarpOp::shfl_up:
        if (in_segment >= c.operand[l]) source = l - c.operand[l];
        break;
      case WarpOp::shfl_down:
        if (in_segment + c.operand[l] < c.width) source = l + c.operand[l];
        break;
      case WarpOp::shfl_xor:
        if (((l ^ c.operand[l]) & ~(c.width - 1)) == segment) source = l ^ c.operand[l];
        break;
      default:
        break;
    }
    uint64_t result = 0;
    if (c.op == WarpOp::ballot) {
      result = votes;
    } else if (c.op == WarpOp::any) {
      result = votes != 0;
    } else if (c.op == WarpOp::all) {
      result = votes == c.mask;
    } else {
      if ((c.mask >> source & 1u) == 0)
        misuse("lane " + std::to_string(l) + " reads lane " + std::to_string(source) +
               ", which is not in the mask (its value would be undefined)");
      result = c.value[source];
    }
    if (l == lane) {
      mine = result;
    } else {
      run.fibers[base_thread + l].received = result;
      run.fibers[base_thread + l].wait = Wait::none;
    }
  }
  for (int l = 31; l >= 0; --l)  // to the front of the queue, in lane order
    if ((c.mask >> l & 1u) != 0 && l != lane) run.ready.push_front(base_thread + l);
  *joining = warp.slots[--warp.open];
  return mine;
}

void launch(const char* kernel, dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t stream,
            void (*body)(const void*), const void* closure, const PointerArgument* pointers,
            int pointer_count) {
  if (check_stream(kernel, stream) != cudaSuccess) return;
  if (check_configuration(kernel, grid, block, dynamic_shared) != cudaSuccess) return;
  for (int i = 0; i < pointer_count; ++i) {
    const auto address = reinterpret_cast<uintptr_t>(pointers[i].value);
    if (address == 0) continue;
    // An empty range: a pointer may point at the end of its allocation.
    const std::string problem = check_device_range(address, 0);
    if (!problem.empty()) {
      fail(cudaErrorInvalidDevicePointer,
           std::string("launch of ") + kernel + ": argument " +
               std::to_string(pointers[i].position) + " (" + hex(address) +
               ") is not a pointer into live device memory: " + problem);
      return;
    }
  }

  static const Stacks stacks;
  const std::lock_guard<std::mutex> lock(launch_mutex);
  note_launch(kernel);
  count_launch(kernel, grid, block);
  Run run;
  run.kernel = kernel;
  run.body = body;
  run.closure = closure;
  run.threads = static_cast<int>(block.x * block.y * block.z);
  run.fibers.resize(static_cast<size_t>(run.threads));
  for (int t = 0; t < run.threads; ++t) run.coordinates.push_back(coordinates_of(t, block));
  run.warps.resize(static_cast<size_t>((run.threads + 31) / 32));
  for (int w = 0; w < static_cast<int>(run.warps.size()); ++w) {
    const int lanes = std::min(32, run.threads - 32 * w);
    run.warps[w].existing = lanes == 32 ? ~0u : (1u << lanes) - 1;
  }
  Run* const outer = running_launch;
  const Coordinates saved = current;
  running_launch = &run;
  current.block_dim = block;
  current.grid_dim = grid;
  for (unsigned int z = 0; z < grid.z && !run.failed; ++z)
    for (unsigned int y = 0; y < grid.y && !run.failed; ++y)
      for (unsigned int x = 0; x < grid.x && !run.failed; ++x) {
        current.block_idx = {x, y, z};
        if (!run_block(run, stacks, dynamic_shared)) break;
      }
  running_launch = outer;
  current = saved;
  if (run.failed) fail(run.code, run.message);
}

}  // namespace cuda_emulation::detail
