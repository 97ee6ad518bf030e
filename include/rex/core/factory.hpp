// Tensor factories: zeros, ones, full, arange, from_vector, and random tensors from an explicit
// Generator (no hidden global seed).
#pragma once

#include <algorithm>
#include <vector>

#include "rex/core/random.hpp"
#include "rex/core/tensor.hpp"

namespace rex {

inline Tensor full(const Shape& shape, float value, Device device = Device::cpu()) {
  return Tensor::empty(shape, DType::f32, device).fill_(value);
}
inline Tensor zeros(const Shape& shape, Device device = Device::cpu()) {
  return full(shape, 0.0f, device);
}
inline Tensor ones(const Shape& shape, Device device = Device::cpu()) {
  return full(shape, 1.0f, device);
}
inline Tensor scalar(float value, Device device = Device::cpu()) {
  return full(Shape{}, value, device);
}

// [0, 1, ..., n-1] as f32 (the default) or i32.
inline Tensor arange(int64_t n, DType dtype = DType::f32) {
  REX_CHECK(n >= 0, "arange: negative length ", n);
  Tensor out = Tensor::empty(Shape{n}, dtype);
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == DType::i32) {
      out.data<int32_t>()[i] = static_cast<int32_t>(i);
    } else {
      out.data<float>()[i] = static_cast<float>(i);
    }
  }
  return out;
}

// Copies `values` into a new tensor of the given shape (a 1-d tensor when no shape is given).
template <class T>
Tensor from_vector(const std::vector<T>& values, const Shape& shape) {
  REX_CHECK(static_cast<int64_t>(values.size()) == shape.numel(), "from_vector: ", values.size(),
            " values do not fill shape ", shape);
  Tensor out = Tensor::empty(shape, dtype_of<T>());
  std::copy(values.begin(), values.end(), out.data<T>());
  return out;
}
template <class T>
Tensor from_vector(const std::vector<T>& values) {
  return from_vector(values, Shape{static_cast<int64_t>(values.size())});
}

inline Tensor normal(const Shape& shape, Generator& gen, float mean = 0.0f, float stddev = 1.0f) {
  Tensor out = Tensor::empty(shape);
  float* p = out.data<float>();
  for (int64_t i = 0; i < out.numel(); ++i) p[i] = mean + stddev * gen.normal();
  return out;
}

inline Tensor uniform(const Shape& shape, Generator& gen, float low = 0.0f, float high = 1.0f) {
  REX_CHECK(low <= high, "uniform: low ", low, " is above high ", high);
  Tensor out = Tensor::empty(shape);
  float* p = out.data<float>();
  for (int64_t i = 0; i < out.numel(); ++i) p[i] = low + (high - low) * gen.uniform();
  return out;
}

}  // namespace rex
