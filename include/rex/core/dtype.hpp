// Element types and devices.
//
// float32 carries values and gradients; int32 carries indices (token ids, expert ids, top-k
// positions) and is never differentiable. bf16 and the CUDA device are named here so the Tensor
// type has room for them; the CPU-only build rejects a CUDA request with a clear error instead of
// crashing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <ostream>

namespace rex {

enum class DType { f32, i32 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32:
      return sizeof(float);
    case DType::i32:
      return sizeof(int32_t);
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32:
      return "f32";
    case DType::i32:
      return "i32";
  }
  return "?";
}

inline std::ostream& operator<<(std::ostream& out, DType t) { return out << dtype_name(t); }

// The C++ type stored for each dtype, used by Tensor::data<T>() to check what the caller asks for.
template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::f32;
}
template <>
constexpr DType dtype_of<int32_t>() {
  return DType::i32;
}

enum class DeviceType { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;

  static Device cpu() { return {DeviceType::cpu, 0}; }
  static Device cuda(int index = 0) { return {DeviceType::cuda, index}; }
  bool is_cpu() const { return type == DeviceType::cpu; }
  bool is_cuda() const { return type == DeviceType::cuda; }
  friend bool operator==(const Device&, const Device&) = default;
  friend std::ostream& operator<<(std::ostream& out, const Device& d) {
    return d.is_cpu() ? out << "cpu" : out << "cuda:" << d.index;
  }
};

}  // namespace rex
