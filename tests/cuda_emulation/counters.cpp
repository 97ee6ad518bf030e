// The counters of include/rex_emulation_counters.h: what the host asks of the device in an interval
// it marks, and, when asked, the memory traffic of every kernel as a GPU's warps would issue it.
//
// Host level (every interval): runtime.cpp, memory.cpp, execution.cpp and cublas.cpp report each
// call that passed its checks. A host wait is a cudaStreamSynchronize or cudaDeviceSynchronize, a
// copy from device to host memory (the host needs the bytes, so it waits for the stream), or a
// copy from host to device memory whose host side is pageable: CUDA stages it through a pinned
// buffer before the call returns. A copy from memory that cudaMallocHost pinned does not count
// (rex stages its uploads through such memory: kernels/memory.cu). A copy followed by a
// synchronize counts twice: both calls
// block the host, though on a GPU the second finds the stream already empty. A cuBLAS call counts
// 2 m n k FLOPs per product of its batch.
//
// Arithmetic (intervals begun with count_kernel_work): the kernel files are compiled with
// arithmetic_pass.cpp, which gives every basic block that does floating-point work a call of
// rex_emulation_count_arithmetic with the block's counts, made while the flag below is set. A call
// from a kernel thread adds them to the running kernel; calls from host code are ignored.
//
// Tensor cores (intervals begun with count_kernel_work): each warp-level mma.sync adds 2 m n k
// FLOPs to the running kernel's bf16 (m16n8k16: 4096) or tf32 (m16n8k8: 2048) tensor FLOPs, counted
// by the warp's last lane to arrive (tensor_cores.cpp); the CUDA-core counts above do not include
// them. An ldmatrix counts as its lanes' 16-byte shared loads (one request; x4 without conflicts
// takes 4 wavefronts, x1 one).
//
// Memory (intervals begun with count_kernel_work): checks.cpp passes every load, store and atomic
// of kernel code here with the instruction that made it (the return address of the instrumentation
// hook). A warp-level request is the accesses of one warp's threads by one instruction, the k-th
// time each thread executes it; they are collected per block and grouped when the block ends.
// - Global requests: the distinct 32-byte sectors the request's bytes fall in (a 32-lane float
//   request touches 4 when coalesced, 32 when each lane is in its own sector), and the bytes the
//   threads asked for. Also each launch's distinct sectors (unique_sectors): a sector many
//   requests of one launch touch counts once there, which the device model takes as what the
//   launch needs from HBM when the L2 holds its data.
// - Shared requests: 32 banks of 4-byte words (bank = word mod 32). Lanes reading the same word
//   share it (broadcast); a request needs as many wavefronts as the most distinct words in any one
//   bank, and its bank conflicts are the wavefronts past the fewest its distinct words need (one
//   per 32): a conflict-free float request takes 1 wavefront, a conflict-free double request 2.
// - Atomics are counted per thread and operation, in global or shared memory.
// Approximations: the k-th execution stands in for the hardware's grouping of active lanes, which
// differs from it when lanes diverge and reconverge (a lane that runs a loop body more often than
// another forms requests with later iterations of its neighbours); 8- and 16-byte shared accesses
// count their words as one request (64 or 128 words: at least 2 or 4 wavefronts), as the hardware's
// half- and quarter-warp phases also give; no L1 is modelled: every request's sectors count
// (as L2 traffic), whether L1 would hold them. Accesses to a thread's own stack and to kernel
// arguments are not counted (they are not device or shared memory here). cuBLAS's own kernels are
// not counted.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "emulator.hpp"

namespace cuda_emulation::detail {
namespace {

std::atomic<bool> counting{false};
std::mutex counts_mutex;  // host-level counts may come from several host threads
Counts counts;

struct AccessRecord {
  const void* instruction;
  uintptr_t address;
  uint32_t bytes;
  int32_t thread;
  Access kind;
  bool shared;
};

struct RequestKey {
  const void* instruction;
  uint32_t occurrence;
  int32_t warp;
  Access kind;
  bool operator==(const RequestKey&) const = default;
};

struct RequestKeyHash {
  size_t operator()(const RequestKey& k) const {
    return std::hash<const void*>()(k.instruction) ^
           (size_t{k.occurrence} * 0x9E3779B97F4A7C15ull) ^ (static_cast<size_t>(k.warp) << 40) ^
           static_cast<size_t>(k.kind);
  }
};

struct Request {
  bool shared = false;
  std::vector<uint64_t> units;  // sectors (global) or 4-byte words (shared), with repeats
};

// The block that runs now: its accesses, and the kernel they count for.
std::vector<AccessRecord> block_accesses;
KernelCounts* running_kernel = nullptr;
// The distinct global sectors of the launch that runs now (it ends when the next one starts or the
// interval ends), and its kernel.
std::unordered_set<uint64_t> launch_sectors;
KernelCounts* sectors_kernel = nullptr;

void end_launch_sectors() {
  if (sectors_kernel != nullptr) sectors_kernel->global.unique_sectors += launch_sectors.size();
  launch_sectors.clear();
  sectors_kernel = nullptr;
}

void add_request(MemoryCounts& memory, bool load, Request& request) {
  std::vector<uint64_t>& units = request.units;
  std::sort(units.begin(), units.end());
  units.erase(std::unique(units.begin(), units.end()), units.end());
  (load ? memory.load_requests : memory.store_requests) += 1;
  if (!request.shared) {
    (load ? memory.load_sectors : memory.store_sectors) += units.size();
    return;
  }
  int words_in_bank[32] = {};
  for (const uint64_t word : units) ++words_in_bank[word % 32];
  const auto wavefronts =
      static_cast<uint64_t>(*std::max_element(words_in_bank, words_in_bank + 32));
  const uint64_t fewest = (units.size() + 31) / 32;
  (load ? memory.load_wavefronts : memory.store_wavefronts) += wavefronts;
  (load ? memory.load_bank_conflicts : memory.store_bank_conflicts) += wavefronts - fewest;
}

}  // namespace

void count_launch(const char* kernel, dim3 grid, dim3 block) {
  if (!counting.load(std::memory_order_relaxed)) return;
  const std::lock_guard<std::mutex> lock(counts_mutex);
  ++counts.launches;
  KernelCounts& k = counts.kernels[kernel];
  ++k.launches;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  k.blocks += blocks;
  k.threads += blocks * block.x * block.y * block.z;
  running_kernel = &k;
  end_launch_sectors();
  if (fast_path.counting_memory) sectors_kernel = &k;
}

void count_host_wait(HostWait cause) {
  if (!counting.load(std::memory_order_relaxed)) return;
  const std::lock_guard<std::mutex> lock(counts_mutex);
  switch (cause) {
    case HostWait::stream_synchronize:
      ++counts.stream_synchronizations;
      break;
    case HostWait::device_synchronize:
      ++counts.device_synchronizations;
      break;
    case HostWait::device_to_host_copy:
      ++counts.device_to_host_copies;
      break;
    case HostWait::pageable_host_to_device_copy:
      ++counts.pageable_host_to_device_copies;
      break;
  }
}

void count_gemm(const GemmShape& shape) {
  if (!counting.load(std::memory_order_relaxed)) return;
  const std::lock_guard<std::mutex> lock(counts_mutex);
  ++counts.cublas_calls;
  counts.cublas_flops += 2.0 * static_cast<double>(shape.m) * static_cast<double>(shape.n) *
                         static_cast<double>(shape.k) * static_cast<double>(shape.batch);
  ++counts.gemms[shape];
}

void count_access(const void* instruction, uintptr_t address, size_t bytes, Access kind) {
  const FastPath& f = fast_path;
  if (!f.in_kernel || bytes == 0 || running_kernel == nullptr) return;
  const bool global = address >= f.device_begin && address < f.device_end;
  const bool shared = (address >= f.static_shared_begin && address < f.static_shared_end) ||
                      (address >= f.dynamic_shared_begin && address < f.dynamic_shared_end);
  if (!global && !shared) return;
  if (kind == Access::atomic) {
    ++(shared ? running_kernel->shared_atomics : running_kernel->global_atomics);
    return;
  }
  block_accesses.push_back(
      {instruction, address, static_cast<uint32_t>(bytes), current_thread(), kind, shared});
}

void count_tensor_flops(bool bf16, uint64_t flops) {
  if (!fast_path.counting_memory || !fast_path.in_kernel || running_kernel == nullptr) return;
  (bf16 ? running_kernel->arithmetic.tensor_bf16_flops
        : running_kernel->arithmetic.tensor_tf32_flops) += flops;
}

void count_block_end() {
  if (running_kernel == nullptr || block_accesses.empty()) return;
  std::unordered_map<RequestKey, uint32_t, RequestKeyHash> executions;  // per thread, not warp
  std::unordered_map<RequestKey, Request, RequestKeyHash> requests;
  for (const AccessRecord& a : block_accesses) {
    const uint32_t occurrence = executions[{a.instruction, 0, a.thread, a.kind}]++;
    Request& request = requests[{a.instruction, occurrence, a.thread / 32, a.kind}];
    request.shared = a.shared;
    MemoryCounts& memory = a.shared ? running_kernel->shared : running_kernel->global;
    (a.kind == Access::read ? memory.load_bytes : memory.store_bytes) += a.bytes;
    const unsigned shift = a.shared ? 2 : 5;  // 4-byte words or 32-byte sectors
    for (uint64_t unit = a.address >> shift; unit <= (a.address + a.bytes - 1) >> shift; ++unit) {
      request.units.push_back(unit);
      if (!a.shared) launch_sectors.insert(unit);
    }
  }
  for (auto& [key, request] : requests)
    add_request(request.shared ? running_kernel->shared : running_kernel->global,
                key.kind == Access::read, request);
  block_accesses.clear();
}

}  // namespace cuda_emulation::detail

// Read and called by the code arithmetic_pass.cpp inserts into the kernel files.
extern "C" {
unsigned char rex_emulation_counting_arithmetic = 0;

void rex_emulation_count_arithmetic(uint64_t f32_flops, uint64_t f64_flops,
                                    uint64_t special_functions) {
  using namespace cuda_emulation::detail;
  if (!fast_path.in_kernel || running_kernel == nullptr) return;
  cuda_emulation::ArithmeticCounts& a = running_kernel->arithmetic;
  a.f32_flops += f32_flops;
  a.f64_flops += f64_flops;
  a.special_functions += special_functions;
}
}

namespace cuda_emulation {

void begin_interval(bool count_kernel_work) {
  const std::lock_guard<std::mutex> lock(detail::counts_mutex);
  detail::counts = Counts{};
  detail::running_kernel = nullptr;
  detail::launch_sectors.clear();
  detail::sectors_kernel = nullptr;
  detail::fast_path.counting_memory = count_kernel_work;
  rex_emulation_counting_arithmetic = count_kernel_work ? 1 : 0;
  detail::counting.store(true);
}

Counts end_interval() {
  const std::lock_guard<std::mutex> lock(detail::counts_mutex);
  detail::counting.store(false);
  detail::end_launch_sectors();
  detail::fast_path.counting_memory = false;
  rex_emulation_counting_arithmetic = 0;
  detail::running_kernel = nullptr;
  return std::move(detail::counts);
}

std::string describe(const Counts& c, bool by_kernel) {
  std::string text;
  char line[512];
  const auto ull = [](uint64_t v) { return static_cast<unsigned long long>(v); };
  std::snprintf(line, sizeof line,
                "%llu launches, %llu host waits (%llu stream synchronizations, %llu device "
                "synchronizations, %llu device-to-host copies, %llu pageable host-to-device "
                "copies), %llu cuBLAS calls (%.6g FLOPs)\n",
                ull(c.launches), ull(c.host_waits()), ull(c.stream_synchronizations),
                ull(c.device_synchronizations), ull(c.device_to_host_copies),
                ull(c.pageable_host_to_device_copies), ull(c.cublas_calls), c.cublas_flops);
  text += line;
  if (!by_kernel) return text;
  for (const auto& [name, k] : c.kernels) {
    std::snprintf(
        line, sizeof line,
        "  %-48s %6llu launches %9llu blocks | global %llu requests, %llu sectors, "
        "%llu bytes | shared %llu requests, %llu wavefronts, %llu bank conflicts | atomics %llu "
        "global, %llu shared | FLOPs %llu f32, %llu f64, %llu special, tensor %llu bf16, %llu "
        "tf32\n",
        name.c_str(), ull(k.launches), ull(k.blocks), ull(k.global.requests()),
        ull(k.global.sectors()), ull(k.global.load_bytes + k.global.store_bytes),
        ull(k.shared.requests()), ull(k.shared.wavefronts()), ull(k.shared.bank_conflicts()),
        ull(k.global_atomics), ull(k.shared_atomics), ull(k.arithmetic.f32_flops),
        ull(k.arithmetic.f64_flops), ull(k.arithmetic.special_functions),
        ull(k.arithmetic.tensor_bf16_flops), ull(k.arithmetic.tensor_tf32_flops));
    text += line;
  }
  for (const auto& [shape, calls] : c.gemms) {
    std::snprintf(
        line, sizeof line, "  gemm %s%s m %lld n %lld k %lld batch %lld%s: %llu calls\n",
        shape.bf16   ? "bf16 "
        : shape.tf32 ? "tf32 "
                     : "fp32 ",
        shape.transpose_a ? (shape.transpose_b ? "TT" : "TN") : (shape.transpose_b ? "NT" : "NN"),
        static_cast<long long>(shape.m), static_cast<long long>(shape.n),
        static_cast<long long>(shape.k), static_cast<long long>(shape.batch),
        shape.accumulate ? " (C += )" : "", ull(calls));
    text += line;
  }
  return text;
}

}  // namespace cuda_emulation
