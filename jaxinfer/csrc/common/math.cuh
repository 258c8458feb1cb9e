// Register-level math both kernels' softmax and output conversion use: SFU approximations, the
// quad reductions of a row held by 4 threads, and the packing of two floats into 16-bit pairs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
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

// Joins an attention sink to a finished row (the kernels' form of jaxinfer.variants.apply_sink):
// the row's running max `m` and sum `l` (O and l share m; base-2 logit units) and the sink
// `sink_log2` = sink * log2(e), one more term of the denominator without a value. On return
// m = max(m, sink_log2) and l = l 2^(m_old - m) + 2^(sink_log2 - m); the result is 2^(m_old - m),
// the factor O takes besides 1 / l, so o = O 2^(m_old - m) / l and lse = m + log2(l) as before.
// A row with no visible key (l = 0, its m stale or -inf) gets factor 0, l = 1 and m = sink_log2.
// A sink of -inf (or any far below m, e.g. -1e30) leaves m and l bit-for-bit as they were and
// returns exactly 1 (ex2 gives 0 and 1 exactly), so the row equals the no-sink result; with
// both -inf, l stays 0 (the no-key row of no sink).
__device__ __forceinline__ float join_sink(float& l, float& m, float sink_log2) {
  const float m_row = l > 0.f ? m : -INFINITY;
  const float m_new = fmaxf(m_row, sink_log2);
  const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // 2^(-inf - 0) = 0, where -inf - -inf is NaN
  const float factor = exp2_approx(m_row - m_ref);
  l = fmaf(l, factor, exp2_approx(sink_log2 - m_ref));
  m = m_ref;
  return factor;
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
