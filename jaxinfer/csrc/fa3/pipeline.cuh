// fa3 pipeline: the mbarriers between the producer and the consumers, the ring positions both
// walk, and the asynchronous copies that complete on those barriers (TMA loads, cp.async
// arrivals).
#pragma once

#include <cuda.h>

#include <cstdint>

#include "config.cuh"

#include <cutlass/arch/barrier.h>

namespace jaxinfer {
namespace fa3 {

// The CTA's mbarriers: per Q buffer, Q loaded (one arrival, with the TMA byte count when the item
// has KV tiles) and Q free (8 arrivals: one per consumer warp after its last Q K^T, or, where a
// warpgroup stages O in the buffer, 4 from the thread whose TMA store has read it); per ring slot, K loaded /
// V loaded (gather producer: 128 arrivals, one per thread, when its copies land; TMA producer: one
// arrival, with the TMA byte count or after the edge tile's copies landed) and K free / V free
// (one arrival per consumer warp). K and V have their own barriers so that K of a slot is
// refilled as soon as Q K^T has read it, while V of the slot is still waiting for P V.
template <int kSQ, int kSK, int kSV> struct Barriers {
  static constexpr int kCount = 2 * (kSQ + kSK + kSV);
  uint64_t* base;
  __device__ __forceinline__ uint64_t* q(int s) const { return base + s; }
  __device__ __forceinline__ uint64_t* q_empty(int s) const { return base + kSQ + s; }
  __device__ __forceinline__ uint64_t* k_full(int s) const { return base + 2 * kSQ + s; }
  __device__ __forceinline__ uint64_t* v_full(int s) const { return base + 2 * kSQ + kSK + s; }
  __device__ __forceinline__ uint64_t* k_empty(int s) const { return base + 2 * kSQ + kSK + kSV + s; }
  __device__ __forceinline__ uint64_t* v_empty(int s) const { return base + 2 * kSQ + 2 * kSK + kSV + s; }
  __device__ __forceinline__ void init(int full_count) const {
    for (int s = 0; s < kSQ; ++s) {
      cutlass::arch::ClusterBarrier::init(q(s), 1);
      cutlass::arch::ClusterBarrier::init(q_empty(s), 8);
    }
    for (int s = 0; s < kSK; ++s) cutlass::arch::ClusterBarrier::init(k_full(s), full_count);
    for (int s = 0; s < kSV; ++s) cutlass::arch::ClusterBarrier::init(v_full(s), full_count);
    for (int s = 0; s < kSK; ++s) cutlass::arch::ClusterBarrier::init(k_empty(s), 8);
    for (int s = 0; s < kSV; ++s) cutlass::arch::ClusterBarrier::init(v_empty(s), 8);
  }
};
template <typename T, int D>
using BarriersOf = Barriers<Config<T, D>::kStagesQ, Config<T, D>::kStagesK, Config<T, D>::kStagesV>;

// A position in a ring of kStages slots: the slot, and the parity of the phase its barriers
// complete for the tile there (it flips each time the position wraps). The producer and the
// consumers walk the same sequence of KV tiles, over all the work items of the CTA. The producer
// waits for a free slot on parity phase ^ 1: on a fresh barrier that names the phase before the
// first, which counts as complete, so the first pass over the ring does not wait.
template <int kStages> struct RingPos {
  int slot = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++slot == kStages) {
      slot = 0;
      phase ^= 1;
    }
  }
};

// One arrival on the mbarrier once every cp.async this thread issued so far has landed; the thread
// does not wait (the barrier's count includes this arrival: .noinc). The producer neither waits
// for its copies nor fences them before arriving (that stalls it behind every copy: much slower);
// the consumers fence after the barrier instead.
__device__ __forceinline__ void cp_async_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(cute::cast_smem_ptr_to_uint(bar))
               : "memory");
}

// TMA load of one box of a tensor map (coordinates: column, head, row) into shared memory; the
// box's bytes complete on the mbarrier's transaction count when they land.
__device__ __forceinline__ void tma_load(const CUtensorMap& map, uint64_t* bar, const void* dst, int col, int head,
                                         int row) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
      ::"r"(cute::cast_smem_ptr_to_uint(dst)), "l"(reinterpret_cast<uint64_t>(&map)), "r"(col), "r"(head), "r"(row),
      "r"(cute::cast_smem_ptr_to_uint(bar))
      : "memory");
}

// TMA load of one box of a 4-d tensor map (coordinates: column, then the map's two middle
// dimensions, page), as tma_load.
__device__ __forceinline__ void tma_load_4d(const CUtensorMap& map, uint64_t* bar, const void* dst, int col, int c1,
                                            int c2, int page) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(cute::cast_smem_ptr_to_uint(dst)),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(col), "r"(c1), "r"(c2), "r"(page), "r"(cute::cast_smem_ptr_to_uint(bar))
      : "memory");
}

// Rows [row, row + kRows) x D of one head into a tile of the layouts of Config (D / 64 boxes, each
// a contiguous block of kRows x 128 bytes); one thread arrives for all of it with the byte count.
template <int kRows, int D, typename T>
__device__ __forceinline__ void tma_tile(const CUtensorMap& map, uint64_t* bar, T* dst, int head, int row) {
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bar, kRows * D * sizeof(T));
  CUTE_UNROLL
  for (int c = 0; c < D / 64; ++c) tma_load(map, bar, dst + c * kRows * 64, c * 64, head, row);
}

}  // namespace fa3
}  // namespace jaxinfer
