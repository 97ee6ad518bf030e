// rex's CUDA emulation: the part of CUDA's <cuda_bf16.h> that kernels use, with the same semantics.
// Test infrastructure, on the include path only of the emulated build.
//
// __nv_bfloat16 is 16 bits: sign, 8 exponent bits, 7 mantissa bits (the top half of a float).
// Conversions from float round to nearest, ties to even (__float2bfloat16 and the _rn forms alike,
// as in CUDA); a NaN stays a NaN (quiet, its sign kept); overflow gives infinity. Conversions to
// float are exact. As in CUDA's header, __nv_bfloat16 converts implicitly from and to float.
#pragma once

#include <bit>
#include <cstdint>

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  inline __nv_bfloat16(float value);
  inline operator float() const;
};

struct __nv_bfloat162 {
  __nv_bfloat16 x, y;  // x is the low half of the 32 bits
};

namespace cuda_emulation::detail {

inline unsigned short float_to_bf16_bits(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0)
    return static_cast<unsigned short>(bits >> 16 | 0x0040u);  // NaN: quiet, sign kept
  const uint32_t rounded = bits + 0x7FFFu + (bits >> 16 & 1u);
  return static_cast<unsigned short>(rounded >> 16);
}

}  // namespace cuda_emulation::detail

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
  __nv_bfloat16 h;
  h.__x = bits;
  return h;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  return __ushort_as_bfloat16(::cuda_emulation::detail::float_to_bf16_bits(value));
}
inline __nv_bfloat16 __float2bfloat16(float value) { return __float2bfloat16_rn(value); }
inline float __bfloat162float(__nv_bfloat16 h) {
  return std::bit_cast<float>(static_cast<uint32_t>(h.__x) << 16);
}
inline __nv_bfloat162 __floats2bfloat162_rn(float low, float high) {
  return {__float2bfloat16_rn(low), __float2bfloat16_rn(high)};
}
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 low, __nv_bfloat16 high) {
  return {low, high};
}
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }

inline __nv_bfloat16::__nv_bfloat16(float value)
    : __x(::cuda_emulation::detail::float_to_bf16_bits(value)) {}
inline __nv_bfloat16::operator float() const { return __bfloat162float(*this); }
