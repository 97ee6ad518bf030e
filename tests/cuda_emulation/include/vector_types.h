// rex's CUDA emulation: the vector types kernels/*.cu use (float2, float4, uint2) with CUDA's sizes
// and alignments, their make_* functions, and __align__ (CUDA's host_defines.h spelling of an
// alignment). Under clang they are vector types with .x .y .z .w, so that a float4 is loaded and
// stored as one 16-byte access, as a GPU does (a struct of four floats would be moved as two
// 8-byte halves, and the counters would see two requests); other compilers get plain structs.
#pragma once

#define __align__(n) __attribute__((aligned(n)))

#if defined(__clang__)
typedef float float2 __attribute__((ext_vector_type(2)));
typedef float float4 __attribute__((ext_vector_type(4)));
typedef unsigned int uint2 __attribute__((ext_vector_type(2)));
#else
struct __align__(8) float2 {
  float x, y;
};
struct __align__(16) float4 {
  float x, y, z, w;
};
struct __align__(8) uint2 {
  unsigned int x, y;
};
#endif

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
