// Register-level math both kernels' softmax and output conversion use: SFU approximations, the
// quad reductions of a row held by 4 threads, and the packing of two floats into 16-bit pairs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include <cutlass/numeric_types.h>

namespace jaxinfer {

// tanh on the SFU (the soft cap c * tanh(x / c)).
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 2^x on the SFU; -inf gives 0 (flush-to-zero is harmless: probabilities below 2^-126 vanish).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Max / sum over the 4 threads of a quad (lanes 4g .. 4g + 3), which hold one row of an mma.sync
// or wgmma accumulator between them; every thread of the quad gets the result.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
  return x;
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  x += __shfl_xor_sync(0xffffffff, x, 2);
  return x;
}

// Whether a 16-bit element type is bfloat16 (CUDA's __nv_bfloat16, or CUTLASS's wrapper, which
// fa3 computes in) or float16 (__half, cutlass::half_t).
template <typename T>
constexpr bool kIsBf16 = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, cutlass::bfloat16_t>;
template <typename T> constexpr bool kIsF16 = std::is_same_v<T, __half> || std::is_same_v<T, cutlass::half_t>;

// Two floats rounded to T and packed into one 32-bit register (a first, in the low half): the
// A-operand fragment of P, and the pairs of adjacent columns of O that one thread stores.
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b) {
  static_assert(kIsBf16<T> || kIsF16<T>, "pack2 takes bfloat16 or float16");
  if constexpr (kIsBf16<T>) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

}  // namespace jaxinfer
