// The access checks: every load and store of the emulated kernels, and every atomic, passes through
// check_access while a kernel thread runs.
//
// How the accesses get here: the kernel sources are compiled by clang with AddressSanitizer's
// instrumentation in its out-of-line form (-fsanitize=address with a call threshold of 0, no
// redzones on globals or the stack), but linked without the AddressSanitizer runtime: the
// __asan_load*/__asan_store*/__asan_mem* entry points it calls are defined below.
// -asan-opt-globals=0 and -asan-opt-same-temp=0 keep the accesses that AddressSanitizer would
// prove safe and skip (constant indices into __shared__ arrays, a store to an address the same
// basic block just loaded); -asan-opt-stack=1 skips only provably safe accesses to the thread's own
// stack. So every device and shared memory access of kernel code calls check_access with its
// address and width. Host code in the same files calls
// them too; outside a kernel they return at once.
//
// What is checked:
// - Device memory (memory.cpp's range): the access must lie inside one live allocation; otherwise
//   the launch fails with cudaErrorIllegalAddress, naming the allocation it missed or outlived.
// - Shared memory (the rex_emu_shared section holding every __shared__ variable, and the launch's
//   dynamic shared memory): at the start of each block all of it is filled with 0xFF and marked
//   unwritten, and each 4-byte word remembers, for the current barrier interval (the stretch
//   between two __syncthreads), which thread wrote it, which read it and which used it atomically.
//   A read of a word that no thread of the block has written fails ("read before written"); two
//   threads touching one word in the same interval, at least one writing and not both atomically,
//   fail as a race whatever order the fibers happened to run in. A dynamic shared access past the
//   launch's dynamic size fails like an out-of-bounds device access.
// - Everything else (the thread's stack, kernel arguments, the emulator's own state) is not
//   checked; pointer arguments are checked at launch instead (execution.cpp).
// In an interval that counts memory (counters.cpp), each access then goes to count_access with the
// instruction that made it, the hook's return address.
#include <cstring>
#include <vector>

#include "emulator.hpp"

extern "C" {
// Bounds of the section that __shared__ variables are placed in (weak: absent when no kernel in
// the program declares one).
extern char __start_rex_emu_shared[] __attribute__((weak));
extern char __stop_rex_emu_shared[] __attribute__((weak));
}

namespace cuda_emulation::detail {

FastPath fast_path;

namespace {

constexpr size_t kDynamicSharedBytes = 48 * 1024;
alignas(16) unsigned char dynamic_shared_buffer[kDynamicSharedBytes];

struct WordState {
  uint64_t interval = 0;       // the barrier interval the three threads below belong to
  uint64_t written_block = 0;  // the block that wrote it last (any other: unwritten here)
  int32_t writer = -1, reader = -1, atomic = -1;  // thread index, -1 none, -2 several
};

struct SharedRegion {
  uintptr_t begin = 0, end = 0;  // end: what this block may use
  const char* name = "";
  std::vector<WordState> words;
};

struct SharedMemory {
  SharedRegion statics, dynamic;
  uint64_t block = 0, interval = 0;
};

SharedMemory& shared() {
  static SharedMemory* state = [] {
    auto* s = new SharedMemory();
    s->statics.begin = reinterpret_cast<uintptr_t>(__start_rex_emu_shared);
    s->statics.end = reinterpret_cast<uintptr_t>(__stop_rex_emu_shared);
    s->statics.name = "static __shared__ storage";
    s->statics.words.resize((s->statics.end - s->statics.begin + 3) / 4);
    s->dynamic.begin = reinterpret_cast<uintptr_t>(dynamic_shared_buffer);
    s->dynamic.name = "dynamic shared memory";
    s->dynamic.words.resize(kDynamicSharedBytes / 4);
    fast_path.static_shared_begin = s->statics.begin;
    fast_path.static_shared_end = s->statics.end;
    fast_path.dynamic_shared_begin = s->dynamic.begin;
    fast_path.dynamic_shared_end = s->dynamic.begin + kDynamicSharedBytes;
    return s;
  }();
  return *state;
}

const char* access_name(Access kind) {
  return kind == Access::read ? "read" : kind == Access::write ? "write" : "atomic";
}

std::string other_thread(int32_t thread) {
  return thread == -2 ? "several other threads" : "thread " + thread_text(thread);
}

void check_shared(SharedRegion& region, uintptr_t address, size_t bytes, Access kind) {
  SharedMemory& s = shared();
  const auto describe = [&](const std::string& what) {
    return std::string("shared-memory ") + what + ": " + access_name(kind) + " of " +
           std::to_string(bytes) + " bytes at " + hex(address) + " (offset " +
           std::to_string(address - region.begin) + " of the " + region.name + ")";
  };
  if (address + bytes > region.end)
    kernel_fault(cudaErrorIllegalAddress, [&] {
      return describe("access out of bounds") + ", past the " +
             std::to_string(region.end - region.begin) + " bytes this launch has";
    });
  const int32_t self = current_thread();
  const size_t first = (address - region.begin) / 4,
               last = (address + bytes - 1 - region.begin) / 4;
  for (size_t w = first; w <= last; ++w) {
    WordState& word = region.words[w];
    if (word.interval != s.interval) {
      word.interval = s.interval;
      word.writer = word.reader = word.atomic = -1;
    }
    const auto other = [&](int32_t t) { return t != -1 && t != self; };
    if (kind != Access::write && word.written_block != s.block)
      kernel_fault(cudaErrorLaunchFailure, [&] {
        return describe("read before written") + ": no thread of this block has written it";
      });
    const auto race = [&](const char* earlier, int32_t thread) {
      kernel_fault(cudaErrorLaunchFailure, [&] {
        return describe("race") + ", which " + other_thread(thread) + " " + earlier +
               " since the last __syncthreads";
      });
    };
    if (other(word.writer)) race("wrote", word.writer);
    if (kind != Access::read && other(word.reader)) race("read", word.reader);
    if (kind != Access::atomic && other(word.atomic)) race("updated atomically", word.atomic);
    int32_t& mine = kind == Access::read    ? word.reader
                    : kind == Access::write ? word.writer
                                            : word.atomic;
    mine = other(mine) ? -2 : self;
    if (kind != Access::read) word.written_block = s.block;
  }
}

}  // namespace

void start_block_shared_memory(size_t dynamic_bytes) {
  SharedMemory& s = shared();
  ++s.block;
  ++s.interval;
  std::memset(reinterpret_cast<void*>(s.statics.begin), 0xFF, s.statics.end - s.statics.begin);
  s.dynamic.end = s.dynamic.begin + dynamic_bytes;
  std::memset(dynamic_shared_buffer, 0xFF, dynamic_bytes);
}

void* dynamic_shared_base() { return dynamic_shared_buffer; }

void shared_memory_barrier() { ++shared().interval; }

void check_access(uintptr_t address, size_t bytes, Access kind) {
  const FastPath& f = fast_path;
  if (!f.in_kernel || bytes == 0) return;
  if (address >= f.device_begin && address < f.device_end) {
    if (address >= f.cached_begin && address + bytes <= f.cached_end) return;
    const std::string problem = check_device_range(address, bytes);
    if (!problem.empty())
      kernel_fault(cudaErrorIllegalAddress, [&] {
        return std::string("invalid device ") + access_name(kind) + " of " + std::to_string(bytes) +
               " bytes at " + hex(address) + ": " + problem;
      });
    return;
  }
  if (address >= f.static_shared_begin && address < f.static_shared_end) {
    check_shared(shared().statics, address, bytes, kind);
  } else if (address >= f.dynamic_shared_begin && address < f.dynamic_shared_end) {
    check_shared(shared().dynamic, address, bytes, kind);
  }
}

}  // namespace cuda_emulation::detail

// ---- the instrumentation's entry points --------------------------------------------------------

using cuda_emulation::detail::Access;

namespace {

// The check, then (in an interval that counts memory) the count, with the instruction that made
// the access: the return address of the hook.
inline __attribute__((always_inline)) void checked_access(const void* instruction,
                                                          uintptr_t address, size_t bytes,
                                                          Access kind) {
  using namespace cuda_emulation::detail;
  check_access(address, bytes, kind);
  if (fast_path.counting_memory) count_access(instruction, address, bytes, kind);
}

}  // namespace

#define REX_EMULATION_HERE __builtin_return_address(0)

extern "C" {

#define REX_EMULATION_ACCESS(size)                                    \
  void __asan_load##size(uintptr_t address) {                         \
    checked_access(REX_EMULATION_HERE, address, size, Access::read);  \
  }                                                                   \
  void __asan_store##size(uintptr_t address) {                        \
    checked_access(REX_EMULATION_HERE, address, size, Access::write); \
  }
REX_EMULATION_ACCESS(1)
REX_EMULATION_ACCESS(2)
REX_EMULATION_ACCESS(4)
REX_EMULATION_ACCESS(8)
REX_EMULATION_ACCESS(16)
#undef REX_EMULATION_ACCESS

void __asan_loadN(uintptr_t address, size_t size) {
  checked_access(REX_EMULATION_HERE, address, size, Access::read);
}
void __asan_storeN(uintptr_t address, size_t size) {
  checked_access(REX_EMULATION_HERE, address, size, Access::write);
}

void* __asan_memcpy(void* dst, const void* src, size_t size) {
  checked_access(REX_EMULATION_HERE, reinterpret_cast<uintptr_t>(src), size, Access::read);
  checked_access(REX_EMULATION_HERE, reinterpret_cast<uintptr_t>(dst), size, Access::write);
  return std::memcpy(dst, src, size);
}
void* __asan_memmove(void* dst, const void* src, size_t size) {
  checked_access(REX_EMULATION_HERE, reinterpret_cast<uintptr_t>(src), size, Access::read);
  checked_access(REX_EMULATION_HERE, reinterpret_cast<uintptr_t>(dst), size, Access::write);
  return std::memmove(dst, src, size);
}
void* __asan_memset(void* dst, int value, size_t size) {
  checked_access(REX_EMULATION_HERE, reinterpret_cast<uintptr_t>(dst), size, Access::write);
  return std::memset(dst, value, size);
}

// The instrumented objects' module constructor calls these; there is no runtime to start.
void __asan_init() {}
void __asan_version_mismatch_check_v8() {}
void __asan_handle_no_return() {}

}  // extern "C"

// ---- atomics: one check, then the update (fibers never interleave inside it) -------------------

namespace {

template <class T, class Update>
T atomic_update(T* address, Update update) {
  checked_access(nullptr, reinterpret_cast<uintptr_t>(address), sizeof(T), Access::atomic);
  const T old = *address;
  *address = update(old);
  return old;
}

template <class T>
T wrapping_add(T a, T b) {
  using U = std::make_unsigned_t<T>;
  return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
}

}  // namespace

int atomicAdd(int* a, int v) {
  return atomic_update(a, [&](int o) { return wrapping_add(o, v); });
}
unsigned int atomicAdd(unsigned int* a, unsigned int v) {
  return atomic_update(a, [&](unsigned int o) { return o + v; });
}
unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return atomic_update(a, [&](unsigned long long o) { return o + v; });
}
float atomicAdd(float* a, float v) {
  return atomic_update(a, [&](float o) { return o + v; });
}
double atomicAdd(double* a, double v) {
  return atomic_update(a, [&](double o) { return o + v; });
}

#define REX_EMULATION_MIN_MAX(T)                                 \
  T atomicMin(T* a, T v) {                                       \
    return atomic_update(a, [&](T o) { return v < o ? v : o; }); \
  }                                                              \
  T atomicMax(T* a, T v) {                                       \
    return atomic_update(a, [&](T o) { return o < v ? v : o; }); \
  }
REX_EMULATION_MIN_MAX(int)
REX_EMULATION_MIN_MAX(unsigned int)
REX_EMULATION_MIN_MAX(long long)
REX_EMULATION_MIN_MAX(unsigned long long)
#undef REX_EMULATION_MIN_MAX

#define REX_EMULATION_EXCH_CAS(T)                                       \
  T atomicExch(T* a, T v) {                                             \
    return atomic_update(a, [&](T) { return v; });                      \
  }                                                                     \
  T atomicCAS(T* a, T compare, T v) {                                   \
    return atomic_update(a, [&](T o) { return o == compare ? v : o; }); \
  }
REX_EMULATION_EXCH_CAS(int)
REX_EMULATION_EXCH_CAS(unsigned int)
REX_EMULATION_EXCH_CAS(unsigned long long)
#undef REX_EMULATION_EXCH_CAS

float atomicExch(float* a, float v) {
  return atomic_update(a, [&](float) { return v; });
}
