// cp.async (sm80+): 16-byte global -> shared copies that bypass registers and L1, with zero-fill.
// fa2 loads its whole KV ring with them; fa3 the tiles a TMA box cannot load (paged KV, and the
// ragged tile crossing kv_len).
#pragma once

#include <cstdint>

#include <cute/arch/util.hpp>  // cute::cast_smem_ptr_to_uint

namespace jaxinfer {

// The L2 prefetch hint of a copy: none, or .L2::128B (fetch the copy's whole 128-byte line into L2).
enum class L2Prefetch { kNone, k128B };

// Copies 16 bytes from global `src` to shared-memory address `dst` (cp.async.cg: cached in L2
// only); pred = false reads nothing and writes 16 zero bytes (src must still be a valid address
// for the instruction's operand, e.g. the buffer's start).
template <L2Prefetch kPrefetch = L2Prefetch::kNone>
__device__ __forceinline__ void cp_async_16(const void* src, uint32_t dst, bool pred) {
  if constexpr (kPrefetch == L2Prefetch::k128B) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(pred ? 16 : 0));
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(pred ? 16 : 0));
  }
}
template <L2Prefetch kPrefetch = L2Prefetch::kNone>
__device__ __forceinline__ void cp_async_16(const void* src, void* dst, bool pred) {
  cp_async_16<kPrefetch>(src, cute::cast_smem_ptr_to_uint(dst), pred);
}

// Waits until every cp.async this thread issued has landed.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

}  // namespace jaxinfer
