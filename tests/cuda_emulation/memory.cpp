// Emulated device memory: cudaMalloc/cudaFree, the copies and memsets, and the table that every
// access check consults.
//
// Device allocations live in one private range of address space (reserved once, PROT_NONE), so a
// pointer is device memory exactly when it falls inside that range and a host pointer can never
// be mistaken for one. Each allocation gets its own pages, followed by at least one page that is
// never mapped; its first bytes are 256-byte aligned, as cudaMalloc's are. New memory is filled
// with 0xFF bytes (a NaN in every float) so that a kernel reading what nobody wrote sees garbage
// instead of a lucky zero. Freed allocations are unmapped and their addresses are never handed out
// again, so a late access is always reported as a use after free of that allocation. The table
// keeps every allocation, live or freed, ordered by address, to name the one an access hit or
// missed. Copies run at once (the emulated streams execute in order, synchronously), with their
// kinds checked against where the pointers really live; a copy into host memory, or out of host
// memory that cudaMallocHost did not pin, counts a host wait (counters.cpp).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>

#include "emulator.hpp"

namespace cuda_emulation::detail {
namespace {

constexpr size_t kRangeBytes = size_t{1} << 40;  // address space reserved for the device

struct Allocation {
  size_t bytes;
  bool live;
};

class DeviceMemory {
 public:
  DeviceMemory() {
    void* range =
        mmap(nullptr, kRangeBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (range == MAP_FAILED) {
      std::fprintf(stderr, "rex CUDA emulation: cannot reserve the device address range\n");
      std::abort();
    }
    begin_ = reinterpret_cast<uintptr_t>(range);
    next_ = begin_;
    fast_path.device_begin = begin_;
    fast_path.device_end = begin_ + kRangeBytes;
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    // The emulated device holds at most half of the host's memory at once.
    capacity_ = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * page_ / 2;
  }

  bool contains(uintptr_t address) const {
    return address >= begin_ && address < begin_ + kRangeBytes;
  }

  cudaError_t allocate(void** ptr, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (bytes > capacity_ - live_bytes_)
      return fail(cudaErrorMemoryAllocation,
                  "cudaMalloc of " + std::to_string(bytes) + " bytes: the emulated device holds " +
                      std::to_string(live_bytes_) + " of its " + std::to_string(capacity_) +
                      " bytes (half of the host's memory)");
    const size_t span = round_up(bytes == 0 ? 1 : bytes);
    if (next_ + span + page_ > begin_ + kRangeBytes)
      return fail(cudaErrorMemoryAllocation, "the emulated device address range is used up");
    const uintptr_t base = next_;
    next_ += span + page_;  // the page after each allocation is never mapped
    if (mprotect(reinterpret_cast<void*>(base), span, PROT_READ | PROT_WRITE) != 0)
      return fail(cudaErrorMemoryAllocation, "mprotect failed for the emulated allocation");
    std::memset(reinterpret_cast<void*>(base), 0xFF, bytes);
    table_[base] = {bytes, true};
    live_bytes_ += bytes;
    *ptr = reinterpret_cast<void*>(base);
    return cudaSuccess;
  }

  cudaError_t release(void* ptr) {
    if (ptr == nullptr) return cudaSuccess;
    std::lock_guard<std::mutex> lock(mutex_);
    const auto base = reinterpret_cast<uintptr_t>(ptr);
    const auto it = table_.find(base);
    if (it == table_.end() || !it->second.live)
      return fail(cudaErrorInvalidDevicePointer,
                  "cudaFree(" + hex(base) + "): " +
                      (it == table_.end() ? "not an address that cudaMalloc returned"
                                          : "this allocation was already freed"));
    const size_t span = round_up(it->second.bytes == 0 ? 1 : it->second.bytes);
    madvise(ptr, span, MADV_DONTNEED);
    mprotect(ptr, span, PROT_NONE);
    it->second.live = false;
    live_bytes_ -= it->second.bytes;
    fast_path.cached_begin = fast_path.cached_end = 0;
    return cudaSuccess;
  }

  std::string check(uintptr_t address, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!contains(address)) return "the address " + hex(address) + " is not device memory";
    auto after = table_.upper_bound(address);
    const auto* before = after == table_.begin() ? nullptr : &*std::prev(after);
    if (before != nullptr) {
      const uintptr_t base = before->first;
      const Allocation& a = before->second;
      const uintptr_t end = base + a.bytes;
      if (address + bytes <= end) {
        if (a.live) {
          fast_path.cached_begin = base;
          fast_path.cached_end = end;
          return {};
        }
        return "use after free: " + std::to_string(bytes) + " bytes at offset " +
               std::to_string(address - base) + " of the " + std::to_string(a.bytes) +
               "-byte device allocation at " + hex(base) + ", which was freed";
      }
      const std::string freed = a.live ? "" : " (freed)";
      if (address < end)
        return std::to_string(address + bytes - end) + " bytes past the end of the " +
               std::to_string(a.bytes) + "-byte device allocation at " + hex(base) + freed +
               " (the access starts at offset " + std::to_string(address - base) + ")";
      const bool nearer_next =
          after != table_.end() && after->first - (address + bytes) < address - end;
      if (!nearer_next)
        return std::to_string(address - end) + " bytes past the end of the " +
               std::to_string(a.bytes) + "-byte device allocation at " + hex(base) + freed;
    }
    if (after != table_.end())
      return std::to_string(after->first - address) + " bytes before the start of the " +
             std::to_string(after->second.bytes) + "-byte device allocation at " +
             hex(after->first) + (after->second.live ? "" : " (freed)");
    return "the address " + hex(address) + " is in no device allocation";
  }

 private:
  size_t round_up(size_t bytes) const { return (bytes + page_ - 1) / page_ * page_; }

  std::mutex mutex_;
  uintptr_t begin_ = 0, next_ = 0;
  size_t page_ = 4096, capacity_ = 0, live_bytes_ = 0;
  std::map<uintptr_t, Allocation> table_;
};

DeviceMemory& memory() {
  static auto* instance = new DeviceMemory();  // never destroyed: frees may come at exit
  return *instance;
}

bool is_device(const void* ptr) { return memory().contains(reinterpret_cast<uintptr_t>(ptr)); }

const char* kind_name(cudaMemcpyKind kind) {
  switch (kind) {
    case cudaMemcpyHostToHost:
      return "cudaMemcpyHostToHost";
    case cudaMemcpyHostToDevice:
      return "cudaMemcpyHostToDevice";
    case cudaMemcpyDeviceToHost:
      return "cudaMemcpyDeviceToHost";
    case cudaMemcpyDeviceToDevice:
      return "cudaMemcpyDeviceToDevice";
    case cudaMemcpyDefault:
      return "cudaMemcpyDefault";
  }
  return "an unknown cudaMemcpyKind";
}

// Checks one side of a copy: `span` bytes from `ptr`, which `kind` says is device memory or not.
cudaError_t check_side(const char* call, const char* side, const void* ptr, size_t span,
                       bool device, cudaMemcpyKind kind) {
  if (ptr == nullptr)
    return fail(cudaErrorInvalidValue, std::string(call) + ": the " + side + " pointer is null");
  if (is_device(ptr) != device)
    return fail(cudaErrorInvalidValue,
                std::string(call) + " with " + kind_name(kind) + ": the " + side + " pointer " +
                    hex(reinterpret_cast<uintptr_t>(ptr)) + " is " +
                    (device ? "host memory, not device memory" : "device memory, not host memory"));
  if (device) {
    const std::string problem = memory().check(reinterpret_cast<uintptr_t>(ptr), span);
    if (!problem.empty())
      return fail(cudaErrorInvalidValue, std::string(call) + ": the " + side + " range of " +
                                             std::to_string(span) +
                                             " bytes is outside device memory: " + problem);
  }
  return cudaSuccess;
}

// Checks a copy whose sides span dst_span and src_span bytes, by kind.
cudaError_t check_copy(const char* call, void* dst, size_t dst_span, const void* src,
                       size_t src_span, cudaMemcpyKind kind) {
  bool dst_device = false, src_device = false;
  switch (kind) {
    case cudaMemcpyHostToHost:
      break;
    case cudaMemcpyHostToDevice:
      dst_device = true;
      break;
    case cudaMemcpyDeviceToHost:
      src_device = true;
      break;
    case cudaMemcpyDeviceToDevice:
      dst_device = src_device = true;
      break;
    case cudaMemcpyDefault:  // unified addressing: wherever the pointers are
      dst_device = is_device(dst);
      src_device = is_device(src);
      break;
    default:
      return fail(cudaErrorInvalidMemcpyDirection, std::string(call) + ": " +
                                                       std::to_string(static_cast<int>(kind)) +
                                                       " is not a cudaMemcpyKind");
  }
  if (const cudaError_t e = check_side(call, "destination", dst, dst_span, dst_device, kind))
    return e;
  return check_side(call, "source", src, src_span, src_device, kind);
}

// Host allocations of cudaMallocHost, by address: their sizes.
struct PinnedMemory {
  std::mutex mutex;
  std::map<uintptr_t, size_t> blocks;

  // Whether [ptr, ptr + bytes) lies inside one pinned block.
  bool holds(const void* ptr, size_t bytes) {
    const auto address = reinterpret_cast<uintptr_t>(ptr);
    std::lock_guard<std::mutex> lock(mutex);
    auto after = blocks.upper_bound(address);
    if (after == blocks.begin()) return false;
    const auto& [start, size] = *std::prev(after);
    return address + bytes <= start + size;
  }
};

PinnedMemory& pinned() {
  static auto* instance = new PinnedMemory();  // never destroyed, as device memory
  return *instance;
}

// Counts the host wait a checked copy costs: any copy into host memory, and a copy of src_span
// bytes into device memory from host memory that cudaMallocHost did not pin (pageable).
void count_copy_wait(void* dst, const void* src, size_t src_span) {
  const bool dst_device = is_device(dst), src_device = is_device(src);
  if (src_device && !dst_device) count_host_wait(HostWait::device_to_host_copy);
  if (!src_device && dst_device && !pinned().holds(src, src_span))
    count_host_wait(HostWait::pageable_host_to_device_copy);
}

cudaError_t check_memset(const char* call, void* ptr, size_t bytes) {
  if (bytes == 0) return cudaSuccess;
  if (!is_device(ptr))
    return fail(
        cudaErrorInvalidValue,
        std::string(call) + ": " + hex(reinterpret_cast<uintptr_t>(ptr)) + " is not device memory");
  const std::string problem = memory().check(reinterpret_cast<uintptr_t>(ptr), bytes);
  if (!problem.empty())
    return fail(cudaErrorInvalidValue, std::string(call) + " of " + std::to_string(bytes) +
                                           " bytes outside device memory: " + problem);
  return cudaSuccess;
}

}  // namespace

std::string check_device_range(uintptr_t address, size_t bytes) {
  return memory().check(address, bytes);
}

std::string hex(uintptr_t value) {
  char text[24];
  std::snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(value));
  return text;
}

}  // namespace cuda_emulation::detail

using namespace cuda_emulation::detail;

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  if (ptr == nullptr) return fail(cudaErrorInvalidValue, "cudaMalloc: the result pointer is null");
  return memory().allocate(ptr, bytes);
}

cudaError_t cudaFree(void* ptr) { return memory().release(ptr); }

cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
  if (ptr == nullptr)
    return fail(cudaErrorInvalidValue, "cudaMallocHost: the result pointer is null");
  *ptr = std::aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
  if (*ptr == nullptr) return fail(cudaErrorMemoryAllocation, "cudaMallocHost: out of memory");
  PinnedMemory& p = pinned();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.blocks[reinterpret_cast<uintptr_t>(*ptr)] = bytes;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* ptr) {
  PinnedMemory& p = pinned();
  std::lock_guard<std::mutex> lock(p.mutex);
  if (p.blocks.erase(reinterpret_cast<uintptr_t>(ptr)) == 0)
    return fail(cudaErrorInvalidValue, "cudaFreeHost: " + hex(reinterpret_cast<uintptr_t>(ptr)) +
                                           " was not allocated by cudaMallocHost");
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  if (const cudaError_t e = check_stream("cudaMemcpyAsync", stream)) return e;
  if (bytes == 0) return cudaSuccess;
  if (const cudaError_t e = check_copy("cudaMemcpyAsync", dst, bytes, src, bytes, kind)) return e;
  count_copy_wait(dst, src, bytes);
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpy2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                         size_t width, size_t height, cudaMemcpyKind kind) {
  return cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, kind, nullptr);
}

cudaError_t cudaMemcpy2DAsync(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                              size_t width, size_t height, cudaMemcpyKind kind,
                              cudaStream_t stream) {
  if (const cudaError_t e = check_stream("cudaMemcpy2DAsync", stream)) return e;
  const size_t max_pitch = device_properties().memPitch;
  if (width > dst_pitch || width > src_pitch)
    return fail(cudaErrorInvalidPitchValue, "cudaMemcpy2DAsync: width " + std::to_string(width) +
                                                " is more than a pitch (dst " +
                                                std::to_string(dst_pitch) + ", src " +
                                                std::to_string(src_pitch) + ")");
  if (dst_pitch > max_pitch || src_pitch > max_pitch)
    return fail(cudaErrorInvalidPitchValue,
                "cudaMemcpy2DAsync: pitch " + std::to_string(std::max(dst_pitch, src_pitch)) +
                    " is more than the device's maximum pitch " + std::to_string(max_pitch));
  if (width == 0 || height == 0) return cudaSuccess;
  const size_t dst_span = (height - 1) * dst_pitch + width;
  const size_t src_span = (height - 1) * src_pitch + width;
  if (const cudaError_t e = check_copy("cudaMemcpy2DAsync", dst, dst_span, src, src_span, kind))
    return e;
  count_copy_wait(dst, src, src_span);
  for (size_t r = 0; r < height; ++r)
    std::memmove(static_cast<char*>(dst) + r * dst_pitch,
                 static_cast<const char*>(src) + r * src_pitch, width);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  return cudaMemsetAsync(ptr, value, bytes, nullptr);
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  if (const cudaError_t e = check_stream("cudaMemsetAsync", stream)) return e;
  if (const cudaError_t e = check_memset("cudaMemsetAsync", ptr, bytes)) return e;
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
