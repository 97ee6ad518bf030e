// The stream, error reporting, and device memory: a caching allocator, copies (uploads staged
// through pinned memory, so that they do not make the host wait) and fills.
//
// The caching allocator keeps freed blocks in bins by exact (rounded) size and hands them out again
// before asking cudaMalloc, so a training loop whose shapes repeat stops calling cudaMalloc after
// its first step. All work runs on one stream in order, so a block released by one op can be given
// to the next op at once: the stream finishes the old reader before the new writer starts. When
// cudaMalloc runs out of memory, the cache is returned to the driver and the call is retried once.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common.cuh"
#include "rex/backend/cuda/runtime.hpp"

namespace rex::cuda::detail {

cudaStream_t stream() {
  static cudaStream_t created = [] {
    cudaStream_t s = nullptr;
    REX_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return s;
  }();
  return created;
}

void throw_cuda_error(const char* call, cudaError_t status) {
  throw Error(rex::detail::concat("CUDA error in ", call, ": ", cudaGetErrorName(status), " (",
                                  cudaGetErrorString(status), ")"));
}

void throw_cublas_error(const char* call, cublasStatus_t status) {
  throw Error(rex::detail::concat("cuBLAS error in ", call, ": ", cublasGetStatusName(status), " (",
                                  cublasGetStatusString(status), ")"));
}

void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess)
    throw Error(rex::detail::concat("CUDA error launching ", kernel, ": ", cudaGetErrorName(status),
                                    " (", cudaGetErrorString(status), ")"));
}

namespace {

// Sizes are rounded up to 512 bytes (small) or 1 MiB (large) so that nearby sizes share bins.
size_t rounded_size(size_t bytes) {
  const size_t unit = bytes < (size_t{1} << 20) ? 512 : (size_t{1} << 20);
  return bytes == 0 ? unit : (bytes + unit - 1) / unit * unit;
}

class CachingAllocator {
 public:
  void* allocate(size_t bytes) {
    const size_t size = rounded_size(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    auto bin = free_.find(size);
    if (bin != free_.end() && !bin->second.empty()) {
      void* ptr = bin->second.back();
      bin->second.pop_back();
      cached_ -= static_cast<int64_t>(size);
      live_[ptr] = size;
      return ptr;
    }
    void* ptr = nullptr;
    cudaError_t status = cudaMalloc(&ptr, size);
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      release_cache_locked();
      status = cudaMalloc(&ptr, size);
    }
    if (status != cudaSuccess) {
      cudaGetLastError();
      if (status == cudaErrorMemoryAllocation)
        throw Error(rex::detail::concat("CUDA out of memory allocating ", bytes, " bytes (",
                                        reserved_, " bytes already reserved by rex)"));
      throw_cuda_error("cudaMalloc", status);
    }
    ++mallocs_;
    reserved_ += static_cast<int64_t>(size);
    live_[ptr] = size;
    return ptr;
  }

  void release(void* ptr) {
    if (ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(ptr);
    if (it == live_.end()) return;  // not ours (cannot happen through Storage)
    free_[it->second].push_back(ptr);
    cached_ += static_cast<int64_t>(it->second);
    live_.erase(it);
  }

  rex::detail::CudaMemoryStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, reserved_, mallocs_};
  }

  void empty_cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_cache_locked();
  }

 private:
  void release_cache_locked() {
    // Blocks in the cache may still be read by queued work: finish it first.
    cudaStreamSynchronize(stream());
    for (auto& [size, blocks] : free_) {
      for (void* ptr : blocks) {
        cudaFree(ptr);
        reserved_ -= static_cast<int64_t>(size);
      }
    }
    free_.clear();
    cached_ = 0;
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> live_;
  int64_t cached_ = 0, reserved_ = 0, mallocs_ = 0;
};

CachingAllocator& allocator() {
  // Never destroyed: tensors released during static destruction must still find it.
  static auto* instance = new CachingAllocator();
  return *instance;
}

void* allocate(size_t bytes) { return allocator().allocate(bytes); }
void release(void* ptr) { allocator().release(ptr); }
rex::detail::CudaMemoryStats memory_stats() { return allocator().stats(); }
void empty_cache() { allocator().empty_cache(); }

// Uploads that do not make the host wait. A copy from pageable host memory to the device blocks
// the host (CUDA stages it through a pinned buffer of its own before the call returns), so rex
// stages its uploads itself: the bytes go into a pinned block, the block's copy is queued, and an
// event recorded after the copy says when the block may be reused. Blocks whose event has
// completed are reused, by size bin as the device allocator's are. While more than kMaxInFlight
// bytes wait on their events, an upload first synchronizes the stream (one host wait, after which
// every block is free). Uploads over kMaxStaged bytes (loading a model) take the plain copy.
class UploadStaging {
 public:
  static constexpr size_t kMaxStaged = size_t{16} << 20, kMaxInFlight = size_t{64} << 20;

  void upload(void* dst, const void* src, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    reclaim();
    const size_t size = rounded_size(bytes);
    if (in_flight_ + size > kMaxInFlight) {
      REX_CUDA(cudaStreamSynchronize(stream()));
      reclaim();
    }
    Block block = take(size);
    std::memcpy(block.host, src, bytes);
    REX_CUDA(cudaMemcpyAsync(dst, block.host, bytes, cudaMemcpyHostToDevice, stream()));
    REX_CUDA(cudaEventRecord(block.copied, stream()));
    pending_.push_back(block);
    in_flight_ += size;
  }

 private:
  struct Block {
    void* host;
    size_t size;
    cudaEvent_t copied;  // recorded after the copy that reads the block
  };

  // Frees the blocks whose copies have finished, oldest first (one stream: they finish in order).
  void reclaim() {
    while (!pending_.empty()) {
      const cudaError_t status = cudaEventQuery(pending_.front().copied);
      if (status == cudaErrorNotReady) {
        cudaGetLastError();  // not an error: clear it, so that no later check reports it
        return;
      }
      if (status != cudaSuccess) throw_cuda_error("cudaEventQuery", status);
      free_[pending_.front().size].push_back(pending_.front());
      in_flight_ -= pending_.front().size;
      pending_.pop_front();
    }
  }

  Block take(size_t size) {
    std::vector<Block>& bin = free_[size];
    if (!bin.empty()) {
      const Block block = bin.back();
      bin.pop_back();
      return block;
    }
    Block block{nullptr, size, nullptr};
    REX_CUDA(cudaMallocHost(&block.host, size));
    REX_CUDA(cudaEventCreateWithFlags(&block.copied, cudaEventDisableTiming));
    return block;
  }

  std::mutex mutex_;
  std::deque<Block> pending_;
  std::map<size_t, std::vector<Block>> free_;
  size_t in_flight_ = 0;  // bytes of the pending blocks
};

UploadStaging& upload_staging() {
  static auto* instance = new UploadStaging();  // never destroyed, as the allocator
  return *instance;
}

void copy(void* dst, const void* src, size_t bytes, rex::detail::DeviceCopy kind) {
  if (bytes == 0) return;
  using rex::detail::DeviceCopy;
  if (kind == DeviceCopy::host_to_device && bytes <= UploadStaging::kMaxStaged)
    return upload_staging().upload(dst, src, bytes);
  const cudaMemcpyKind direction = kind == DeviceCopy::host_to_device   ? cudaMemcpyHostToDevice
                                   : kind == DeviceCopy::device_to_host ? cudaMemcpyDeviceToHost
                                                                        : cudaMemcpyDeviceToDevice;
  REX_CUDA(cudaMemcpyAsync(dst, src, bytes, direction, stream()));
  // Host memory is pageable and may be freed by the caller right after: wait for the copy.
  if (kind != DeviceCopy::device_to_device) REX_CUDA(cudaStreamSynchronize(stream()));
}

// The largest pitch cudaMemcpy2DAsync accepts on this device (about 2 GiB on current GPUs).
size_t max_pitch() {
  static const size_t pitch = [] {
    int device = 0, value = 0;
    REX_CUDA(cudaGetDevice(&device));
    REX_CUDA(cudaDeviceGetAttribute(&value, cudaDevAttrMaxPitch, device));
    return static_cast<size_t>(value);
  }();
  return pitch;
}

void copy_rows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
               size_t rows) {
  if (row_bytes == 0 || rows == 0) return;
  if (rows == 1) {
    REX_CUDA(cudaMemcpyAsync(dst, src, row_bytes, cudaMemcpyDeviceToDevice, stream()));
  } else if (dst_pitch <= max_pitch() && src_pitch <= max_pitch()) {
    REX_CUDA(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, rows,
                               cudaMemcpyDeviceToDevice, stream()));
  } else {  // pitches past the 2-d copy's limit: one copy per row
    for (size_t r = 0; r < rows; ++r)
      REX_CUDA(cudaMemcpyAsync(static_cast<char*>(dst) + r * dst_pitch,
                               static_cast<const char*>(src) + r * src_pitch, row_bytes,
                               cudaMemcpyDeviceToDevice, stream()));
  }
}

__global__ void fill32_kernel(uint32_t* out, int64_t n, uint32_t bits) {
  for (int64_t i = thread_index(); i < n; i += thread_count()) out[i] = bits;
}

void fill32(void* out, int64_t n, uint32_t bits) {
  if (n == 0) return;
  REX_LAUNCH(fill32_kernel, blocks_for(n), kThreads, 0, static_cast<uint32_t*>(out), n, bits);
}

void synchronize() { REX_CUDA(cudaStreamSynchronize(stream())); }

}  // namespace

void upload(void* dst, const void* src, size_t bytes) {
  copy(dst, src, bytes, rex::detail::DeviceCopy::host_to_device);
}

Scratch::Scratch(size_t bytes) : ptr_(allocate(bytes)) {}
Scratch::~Scratch() { release(ptr_); }

unsigned int* completion_counters(int64_t n) {
  // Grown by a new buffer (never freed: launches still queued may use the old one).
  static std::mutex mutex;
  static unsigned int* counters = nullptr;
  static int64_t capacity = 0;
  const std::lock_guard<std::mutex> lock(mutex);
  if (n > capacity) {
    capacity = std::max<int64_t>(n, 4096);
    counters = static_cast<unsigned int*>(allocate(static_cast<size_t>(capacity) * 4));
    REX_CUDA(cudaMemsetAsync(counters, 0, static_cast<size_t>(capacity) * 4, stream()));
  }
  return counters;
}

ErrorFlag::ErrorFlag() : flag_(sizeof(unsigned long long)) {
  REX_CUDA(cudaMemsetAsync(flag_.as<void>(), 0xFF, sizeof(unsigned long long), stream()));
}

int64_t ErrorFlag::read() const {
  unsigned long long value = 0;
  copy(&value, flag_.as<void>(), sizeof value, rex::detail::DeviceCopy::device_to_host);
  return value == ~0ull ? -1 : static_cast<int64_t>(value);
}

void register_memory(rex::detail::CudaBackend& table) {
  table.device_count = rex::cuda::device_count;
  table.device_description = rex::cuda::device_description;
  table.copy_rows = copy_rows;
  table.synchronize = synchronize;
  table.memory_stats = memory_stats;
  table.empty_cache = empty_cache;
}

}  // namespace rex::cuda::detail

namespace rex::cuda {

const rex::detail::DeviceMemory& device_memory() {
  static const rex::detail::DeviceMemory table{detail::allocate, detail::release, detail::copy,
                                               detail::fill32};
  return table;
}

}  // namespace rex::cuda
