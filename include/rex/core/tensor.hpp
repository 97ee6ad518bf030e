// Tensor: a shared handle to an N-d array.
//
// Layout is always contiguous row-major: a Tensor is (storage, element offset, shape, dtype). That
// one rule keeps every kernel a flat loop or a plain GEMM. Views exist only where the layout allows
// them without strides: reshape, and slicing a run of the leading axis; transpose and permute copy.
// Copying a Tensor copies the handle, not the values (clone() copies the values).
//
// A tensor lives on the CPU or on the GPU (Device::cuda(), with rex::cuda linked). data<T>() is the
// host pointer and refuses a CUDA tensor; device_data<T>() is the raw pointer on either device, for
// backend code. at(), item(), to_vector() and printing copy a CUDA tensor to the host first, and
// to(device) copies between devices (recorded in the graph, so gradients flow back across).
//
// The autograd fields (requires_grad, grad, the node that produced the tensor) live in a separate
// AutogradMeta that a graph node refers to, so the graph never keeps activation buffers alive
// unless a backward function saved them on purpose. Definitions that need the graph types are in
// rex/autograd/graph.hpp; include rex/rex.hpp to get everything.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <ostream>
#include <vector>

#include "rex/core/dtype.hpp"
#include "rex/core/error.hpp"
#include "rex/core/shape.hpp"
#include "rex/core/storage.hpp"

namespace rex {

class Tensor;

namespace detail {

struct AutogradMeta;

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  int64_t offset = 0;  // in elements
  Shape shape;
  DType dtype = DType::f32;
  std::shared_ptr<AutogradMeta> autograd;  // null for a tensor outside any graph
};

}  // namespace detail

class Tensor {
 public:
  Tensor() = default;  // an undefined tensor (e.g. "no gradient")
  explicit Tensor(std::shared_ptr<detail::TensorImpl> impl) : impl_(std::move(impl)) {}

  // Uninitialised storage; use rex::zeros & co. unless every element is written next.
  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu()) {
    int64_t bytes = 0;
    REX_CHECK(
        !__builtin_mul_overflow(shape.numel(), static_cast<int64_t>(dtype_size(dtype)), &bytes),
        "tensor of shape ", shape, " is too large to allocate");
    auto impl = std::make_shared<detail::TensorImpl>();
    impl->storage = std::make_shared<detail::Storage>(static_cast<size_t>(bytes), device);
    impl->shape = shape;
    impl->dtype = dtype;
    return Tensor(std::move(impl));
  }

  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return checked().shape; }
  int64_t rank() const { return shape().rank(); }
  int64_t dim(int64_t axis) const { return shape()[shape().normalize_axis(axis, "dim")]; }
  int64_t numel() const { return shape().numel(); }
  DType dtype() const { return checked().dtype; }
  Device device() const { return checked().storage->device(); }

  // Host element pointer; T must match the dtype (float for f32, int32_t for i32).
  template <class T>
  T* data() const {
    REX_CHECK(checked().storage->device().is_cpu(), "data<", dtype_name(dtype_of<T>()), ">() on a ",
              device(), " tensor of shape ", shape(),
              ": copy it to the host first with .to(rex::Device::cpu())");
    return device_data<T>();
  }
  // Element pointer on the tensor's own device (a device address for a CUDA tensor).
  template <class T>
  T* device_data() const {
    const auto& impl = checked();
    REX_CHECK(impl.dtype == dtype_of<T>(), "data<", dtype_name(dtype_of<T>()), ">() on a ",
              impl.dtype, " tensor");
    return static_cast<T*>(impl.storage->data()) + impl.offset;
  }
  // The values readable on the host without waiting for the device: data<T>() on the CPU, the
  // storage's host mirror on CUDA (an i32 tensor uploaded from the host), or null.
  template <class T>
  const T* host_values() const {
    const auto& impl = checked();
    REX_CHECK(impl.dtype == dtype_of<T>(), "host_values<", dtype_name(dtype_of<T>()), ">() on a ",
              impl.dtype, " tensor");
    if (impl.storage->device().is_cpu()) return device_data<T>();
    const void* mirror = impl.storage->host_mirror();
    return mirror ? static_cast<const T*>(mirror) + impl.offset : nullptr;
  }
  void* device_bytes() const {
    return static_cast<char*>(checked().storage->data()) +
           checked().offset * static_cast<int64_t>(dtype_size(dtype()));
  }
  int64_t nbytes() const { return numel() * static_cast<int64_t>(dtype_size(dtype())); }

  // Element access for tests and small programs (slow: bounds-checked, converts to float).
  float at(std::initializer_list<int64_t> index) const {
    const Shape& s = shape();
    REX_CHECK(static_cast<int64_t>(index.size()) == s.rank(), "at: ", index.size(),
              " indices for shape ", s);
    int64_t flat = 0, axis = 0;
    for (int64_t i : index) {
      REX_CHECK(i >= 0 && i < s[axis], "at: index ", i, " out of range for axis ", axis, " of ", s);
      flat = flat * s[axis++] + i;
    }
    return flat_value(flat);
  }
  float item() const {
    REX_CHECK(numel() == 1, "item: tensor of shape ", shape(), " has ", numel(),
              " elements, not 1");
    return flat_value(0);
  }
  template <class T = float>
  std::vector<T> to_vector() const {
    if (device().is_cuda()) return copy_to(Device::cpu()).to_vector<T>();
    const T* p = data<T>();
    return std::vector<T>(p, p + numel());
  }

  // Deep copy of the values onto `device`, outside any graph (to() is the recorded form).
  Tensor copy_to(Device target) const {
    Tensor out = empty(shape(), dtype(), target);
    out.copy_(*this);
    return out;
  }
  // Overwrites this tensor's values with src's (same shape and dtype, any devices); not recorded.
  Tensor& copy_(const Tensor& src) {
    REX_CHECK(src.shape() == shape() && src.dtype() == dtype(), "copy_: source ", src.shape(), " (",
              src.dtype(), ") does not match ", shape(), " (", dtype(), ")");
    if (device().is_cpu() && src.device().is_cpu()) {
      std::copy_n(static_cast<const char*>(src.device_bytes()), nbytes(),
                  static_cast<char*>(device_bytes()));
    } else {
      const detail::DeviceCopy kind = src.device().is_cpu() ? detail::DeviceCopy::host_to_device
                                      : device().is_cpu()   ? detail::DeviceCopy::device_to_host
                                                            : detail::DeviceCopy::device_to_device;
      detail::device_memory().copy(device_bytes(), src.device_bytes(),
                                   static_cast<size_t>(nbytes()), kind);
      if (device().is_cuda()) {
        detail::Storage& storage = *checked().storage;
        const bool whole =
            checked().offset == 0 && static_cast<size_t>(nbytes()) == storage.bytes();
        if (kind == detail::DeviceCopy::host_to_device && whole && dtype() == DType::i32)
          storage.set_host_mirror(src.device_bytes());
        else
          storage.drop_host_mirror();
      }
    }
    return *this;
  }
  // Deep copy of the values on the same device, outside any graph.
  Tensor clone() const { return copy_to(device()); }
  // Copy onto `device`, recorded in the graph (the gradient is copied back); the tensor itself
  // when it is already there. Defined in rex/autograd/graph.hpp.
  Tensor to(Device target) const;
  // Moves this tensor's values onto `device` in place: every handle to it sees the new storage.
  // For parameters before training (Module::to); not recorded in the graph.
  Tensor& move_to_(Device target) {
    if (device() == target) return *this;
    Tensor moved = copy_to(target);
    checked().storage = moved.impl_->storage;
    checked().offset = 0;
    return *this;
  }
  // Same values and storage, cut from the graph: gradients do not flow through the result.
  Tensor detach() const {
    auto impl = std::make_shared<detail::TensorImpl>(checked());
    impl->autograd = nullptr;
    return Tensor(std::move(impl));
  }
  // Sets every element; not recorded in the graph (for initialisation and tests). Like any write
  // through data<T>(), it also changes what a pending backward reads if a graph saved this tensor
  // (or a view of its storage): rex does not track in-place writes, so finish backward first.
  Tensor& fill_(float value) {
    const bool integer = dtype() == DType::i32;
    REX_CHECK(!integer ||
                  (value >= -2147483648.0f && value < 2147483648.0f && value == std::trunc(value)),
              "fill_: ", value, " is not an i32 value");
    if (device().is_cuda()) {
      checked().storage->drop_host_mirror();
      const int32_t as_integer = integer ? static_cast<int32_t>(value) : 0;
      uint32_t bits = 0;  // the 32-bit pattern of the value in this dtype
      std::memcpy(&bits, integer ? static_cast<const void*>(&as_integer) : &value, sizeof bits);
      detail::device_memory().fill32(device_bytes(), numel(), bits);
    } else if (integer) {
      std::fill_n(data<int32_t>(), numel(), static_cast<int32_t>(value));
    } else {
      std::fill_n(data<float>(), numel(), value);
    }
    return *this;
  }

  // Autograd (defined in rex/autograd/graph.hpp and rex/autograd/engine.hpp).
  bool requires_grad() const;
  // Marks a leaf as a parameter whose gradient is accumulated by backward().
  Tensor& requires_grad_(bool enabled = true);
  bool is_leaf() const;
  Tensor grad() const;  // undefined until a backward pass reached this leaf
  void zero_grad();     // drops the accumulated gradient
  // Backpropagates from a scalar (gradient 1), or from any tensor given its output gradient.
  // The graph is released afterwards unless retain_graph is true.
  void backward(bool retain_graph = false) const;
  void backward(const Tensor& grad_output, bool retain_graph = false) const;

  detail::TensorImpl& impl() const { return checked(); }
  bool shares_storage_with(const Tensor& other) const {
    return impl_ && other.impl_ && impl_->storage == other.impl_->storage;
  }
  // Whether this handle is the only way to its values: no other handle to it, no view of its
  // storage (so a caller may take the values over instead of copying them).
  bool is_sole_owner() const {
    return impl_ && impl_.use_count() == 1 && impl_->storage.use_count() == 1;
  }

 private:
  detail::TensorImpl& checked() const {
    REX_CHECK(impl_ != nullptr, "use of an undefined tensor");
    return *impl_;
  }
  float flat_value(int64_t i) const {
    static_assert(sizeof(float) == sizeof(int32_t));
    const char* at = static_cast<const char*>(device_bytes()) + i * sizeof(float);
    float f = 0.0f;
    int32_t n = 0;
    void* into = dtype() == DType::i32 ? static_cast<void*>(&n) : static_cast<void*>(&f);
    if (device().is_cuda()) {
      detail::device_memory().copy(into, at, sizeof(float), detail::DeviceCopy::device_to_host);
    } else {
      std::memcpy(into, at, sizeof(float));
    }
    return dtype() == DType::i32 ? static_cast<float>(n) : f;
  }

  std::shared_ptr<detail::TensorImpl> impl_;
};

namespace detail {

// A tensor sharing `base`'s storage, starting `offset` elements after base's first element.
inline Tensor make_view(const Tensor& base, int64_t offset, const Shape& shape) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = base.impl().storage;
  impl->offset = base.impl().offset + offset;
  impl->shape = shape;
  impl->dtype = base.dtype();
  return Tensor(std::move(impl));
}

inline void print_values(std::ostream& out, const Tensor& t, int64_t axis, int64_t& flat) {
  constexpr int64_t kEdge = 3;  // elements shown at each end of a long axis
  const int64_t n = t.shape()[axis];
  const int64_t inner = t.shape().numel(axis + 1, t.rank());
  out << "[";
  for (int64_t i = 0; i < n; ++i) {
    if (n > 2 * kEdge && i == kEdge) {
      out << "..., ";
      flat += (n - 2 * kEdge) * inner;
      i = n - kEdge - 1;
      continue;
    }
    if (axis + 1 == t.rank()) {
      out << (t.dtype() == DType::i32 ? static_cast<float>(t.data<int32_t>()[flat])
                                      : t.data<float>()[flat]);
      ++flat;
    } else {
      print_values(out, t, axis + 1, flat);
    }
    if (i + 1 < n) out << ", ";
  }
  out << "]";
}

}  // namespace detail

// Prints shape, dtype and values, eliding the middle of long axes: tensor([2, 3], f32) [[...],
// ...].
inline std::ostream& operator<<(std::ostream& out, const Tensor& t) {
  if (!t.defined()) return out << "tensor(undefined)";
  if (t.device().is_cuda()) {
    out << t.device() << " ";
    return out << t.copy_to(Device::cpu());
  }
  out << "tensor(" << t.shape() << ", " << t.dtype() << ") ";
  if (t.rank() == 0) return out << t.item();
  int64_t flat = 0;
  detail::print_values(out, t, 0, flat);
  return out;
}

}  // namespace rex
