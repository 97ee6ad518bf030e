// Storage: one owned, 64-byte aligned buffer. Tensors share a Storage through shared_ptr, so a view
// (reshape, slicing the leading axis) is a new Tensor pointing into the same buffer at an offset.
//
// Allocation goes to the C library. glibc by default hands blocks of about 128 KiB and more back to
// the kernel on free (and trims freed heap top), so every op output of that size, and Eigen's GEMM
// workspace, page-faults afresh: a 256x256 product spent half its time in ~100 page faults. On
// first use rex therefore raises glibc's mmap and trim thresholds once, process-wide, so freed
// blocks are reused; define REX_KEEP_MALLOC_DEFAULTS before including rex to opt out.
//
// rex::allocated_bytes() and rex::peak_allocated_bytes() count the bytes held by live tensor
// storage (process-wide, host and device together), e.g. to measure the activation memory a
// training step keeps for backward.
//
// CUDA storage comes from rex::cuda's caching allocator through the device-memory hook
// (rex/core/device_memory.hpp); without rex::cuda, asking for it throws a clear rex::Error.
//
// Host mirror: a device storage whose values were uploaded whole from the host keeps a host copy
// of them (Tensor::copy_ sets it, for i32 tensors only: token ids and targets). Ops that need an
// index tensor's values on the host, to check them against a range or to plan a scatter, read
// the mirror instead of waiting for the device. Any other write rex makes to a storage drops it
// (copy_ from the device, fill_); kernels only ever write fresh storages.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>
#if defined(__GLIBC__) && !defined(REX_KEEP_MALLOC_DEFAULTS)
#include <malloc.h>
#endif

#include "rex/core/device_memory.hpp"
#include "rex/core/dtype.hpp"
#include "rex/core/error.hpp"

namespace rex::detail {

struct AllocationCounters {
  std::atomic<int64_t> live{0};
  std::atomic<int64_t> peak{0};
};

inline AllocationCounters& allocation_counters() {
  static AllocationCounters counters;
  return counters;
}

inline void tune_allocator_once() {
#if defined(__GLIBC__) && !defined(REX_KEEP_MALLOC_DEFAULTS)
  static const bool tuned = [] {
    mallopt(M_MMAP_THRESHOLD, 32 << 20);   // blocks under 32 MiB come from the reusable heap
    mallopt(M_TRIM_THRESHOLD, 256 << 20);  // keep up to 256 MiB of freed heap for reuse
    return true;
  }();
  (void)tuned;
#endif
}

class Storage {
 public:
  static constexpr size_t kAlignment = 64;

  Storage(size_t bytes, Device device) : bytes_(bytes), device_(device) {
    if (device.is_cuda()) {
      REX_CHECK(device.index == 0, "tensor on ", device, ": rex uses one GPU, cuda:0");
      data_ = device_memory().allocate(bytes);
    } else {
      tune_allocator_once();
      size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
      data_ = rounded == 0 ? nullptr : std::aligned_alloc(kAlignment, rounded);
      REX_CHECK(rounded == 0 || data_ != nullptr, "out of memory allocating ", bytes, " bytes");
    }
    AllocationCounters& counters = allocation_counters();
    const int64_t live = counters.live += static_cast<int64_t>(bytes);
    int64_t peak = counters.peak.load();
    while (live > peak && !counters.peak.compare_exchange_weak(peak, live)) {
    }
  }
  ~Storage() {
    allocation_counters().live -= static_cast<int64_t>(bytes_);
    if (device_.is_cuda()) {
      device_memory().release(data_);
    } else {
      std::free(data_);
    }
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

  // The values as last uploaded from the host, or null (see the file comment).
  const void* host_mirror() const { return host_mirror_.empty() ? nullptr : host_mirror_.data(); }
  void set_host_mirror(const void* values) {
    const auto* bytes = static_cast<const unsigned char*>(values);
    host_mirror_.assign(bytes, bytes + bytes_);
  }
  void drop_host_mirror() { host_mirror_ = {}; }

 private:
  std::vector<unsigned char> host_mirror_;
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_;
};

}  // namespace rex::detail

namespace rex {

// Bytes held by live tensor storage now, and the most held at once since the last reset.
inline int64_t allocated_bytes() { return detail::allocation_counters().live.load(); }
inline int64_t peak_allocated_bytes() { return detail::allocation_counters().peak.load(); }
inline void reset_peak_allocated_bytes() {
  detail::allocation_counters().peak.store(allocated_bytes());
}

}  // namespace rex
