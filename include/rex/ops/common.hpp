// Small checks shared by every op: dtype and same-device requirements, with the op's name in the
// error.
#pragma once

#include <string_view>

#include "rex/autograd/graph.hpp"
#include "rex/core/factory.hpp"

namespace rex::detail {

inline void check_defined(std::string_view op, const Tensor& x) {
  REX_CHECK(x.defined(), op, ": input is an undefined tensor");
}

inline void check_f32(std::string_view op, const Tensor& x) {
  check_defined(op, x);
  REX_CHECK(x.dtype() == DType::f32, op, ": expected an f32 tensor, got ", x.dtype(), " of shape ",
            x.shape());
}

inline void check_i32(std::string_view op, const Tensor& x) {
  check_defined(op, x);
  REX_CHECK(x.dtype() == DType::i32, op, ": expected an i32 index tensor, got ", x.dtype(),
            " of shape ", x.shape());
}

}  // namespace rex::detail
