// The backend table that the header-only ops call through (rex/backend/cuda/backend.hpp): each
// kernels/*.cu file registers its own entries once.
#include "common.cuh"

namespace rex::cuda {

const rex::detail::CudaBackend& backend() {
  static const rex::detail::CudaBackend table = [] {
    rex::detail::CudaBackend t{};
    detail::register_memory(t);
    detail::register_elementwise(t);
    detail::register_reduce(t);
    detail::register_index(t);
    detail::register_routing(t);
    detail::register_attention(t);
    detail::register_flash_attention(t);
    detail::register_gemm(t);
    detail::register_grouped_gemm(t);
    detail::register_optim(t);
    return t;
  }();
  return table;
}

}  // namespace rex::cuda
