// Shape: the extents of a tensor, row-major. A thin wrapper over std::vector<int64_t> that knows
// its element count, normalises negative axes and prints itself as [2, 3, 4].
#pragma once

#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <string>
#include <vector>

#include "rex/core/error.hpp"

namespace rex {

class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims) : dims_(dims) { validate(); }
  explicit Shape(std::vector<int64_t> dims) : dims_(std::move(dims)) { validate(); }

  int64_t rank() const { return static_cast<int64_t>(dims_.size()); }
  int64_t operator[](int64_t axis) const { return dims_[static_cast<size_t>(axis)]; }
  // Sets one extent (re-checked like the constructor's).
  void set(int64_t axis, int64_t extent) {
    dims_[static_cast<size_t>(axis)] = extent;
    validate();
  }
  const std::vector<int64_t>& dims() const { return dims_; }
  auto begin() const { return dims_.begin(); }
  auto end() const { return dims_.end(); }

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : dims_) n *= d;
    return n;
  }

  // Product of the extents in [first, last).
  int64_t numel(int64_t first, int64_t last) const {
    int64_t n = 1;
    for (int64_t a = first; a < last; ++a) n *= dims_[static_cast<size_t>(a)];
    return n;
  }

  // Maps axis in [-rank, rank) to [0, rank); `op` names the caller in the error message.
  int64_t normalize_axis(int64_t axis, const char* op) const {
    REX_CHECK(axis >= -rank() && axis < rank(), op, ": axis ", axis, " is out of range for shape ",
              str());
    return axis < 0 ? axis + rank() : axis;
  }

  std::string str() const {
    std::string s = "[";
    for (size_t i = 0; i < dims_.size(); ++i) s += (i ? ", " : "") + std::to_string(dims_[i]);
    return s + "]";
  }

  friend bool operator==(const Shape& a, const Shape& b) { return a.dims_ == b.dims_; }
  friend std::ostream& operator<<(std::ostream& out, const Shape& s) { return out << s.str(); }

 private:
  // Extents are non-negative and their product fits in int64_t, so numel() never overflows.
  void validate() const {
    int64_t n = 1;
    for (int64_t d : dims_) {
      REX_CHECK(d >= 0, "shape: negative extent in ", str());
      REX_CHECK(!__builtin_mul_overflow(n, d, &n), "shape: ", str(), " has too many elements");
    }
  }
  std::vector<int64_t> dims_;
};

}  // namespace rex
