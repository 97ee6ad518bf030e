// Storage: one owned, 64-byte aligned buffer. Tensors share a Storage through shared_ptr, so a view
// (reshape, slicing the leading axis) is a new Tensor pointing into the same buffer at an offset.
#pragma once

#include <cstdlib>
#include <cstring>
#include <memory>

#include "rex/core/dtype.hpp"
#include "rex/core/error.hpp"

namespace rex::detail {

class Storage {
 public:
  static constexpr size_t kAlignment = 64;

  Storage(size_t bytes, Device device) : bytes_(bytes), device_(device) {
    REX_CHECK(device.is_cpu(), "tensor on ", device,
              ": this build of rex has no CUDA backend (CPU only)");
    size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    data_ = rounded == 0 ? nullptr : std::aligned_alloc(kAlignment, rounded);
    REX_CHECK(rounded == 0 || data_ != nullptr, "out of memory allocating ", bytes, " bytes");
  }
  ~Storage() { std::free(data_); }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_;
};

}  // namespace rex::detail
