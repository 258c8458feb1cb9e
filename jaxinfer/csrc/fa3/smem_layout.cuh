// fa3 shared memory: one typed layout for the CTA's dynamic shared memory, the tiles and the
// producer/consumer state, so that no byte offset is computed by hand.
#pragma once

#include <cstddef>
#include <cstdint>

#include "config.cuh"
#include "pipeline.cuh"
#include "tile_scheduler.cuh"

namespace jaxinfer {
namespace fa3 {

// Alignment of the tiles: the 128-byte swizzle repeats every 8 rows of 128 bytes, and the GMMA
// layouts and smem_at assume each tile starts on that period.
constexpr int kSmemAlign = 1024;

// Row-offset tables of the gather producer (producer_gather: at most three tiles' tables in use).
constexpr int kOffsetTables = 3;

// The CTA's dynamic shared memory, in this order: the tiles (Q buffers, K ring, V ring; 1 KiB
// aligned, the layouts of Config), the mbarriers, the gather producer's row-offset tables (int64
// per KV row of a tile), the work hand-off.
template <typename T, int D> struct SharedStorage {
  using C = Config<T, D>;
  using HandoffT = Handoff<C::kStagesQ>;
  // The hand-off's room: 64 bytes per item slot and 16 for the next-item broadcast (more than
  // sizeof(HandoffT), which the union below guarantees in any case).
  static constexpr int kHandoffBytes = 64 * HandoffT::kSlots + 16;

  alignas(kSmemAlign) T q[C::kStagesQ * C::kQElems];  // Q buffer b at q + b * kQElems (LayoutQ, stage b)
  alignas(kSmemAlign) T k[C::kKElems];                // the K ring (LayoutK)
  alignas(kSmemAlign) T v[C::kVElems];                // the V ring (LayoutVt)
  uint64_t barriers[BarriersOf<T, D>::kCount];       // Barriers
  int64_t row_offsets[kOffsetTables * C::kBN];       // table t at row_offsets + t * kBN
  union {
    HandoffT item;
    unsigned char bytes[kHandoffBytes];
  } handoff;
};

// Bytes of dynamic shared memory a CTA asks for: the storage up to the end of its last member
// (sizeof would round it up to kSmemAlign), plus kSmemAlign of slack to align its start (the
// dynamic base is only guaranteed 16-byte alignment; smem_storage).
template <typename T, int D> constexpr int smem_bytes() {
  using S = SharedStorage<T, D>;
  constexpr int bytes = kSmemAlign + int(offsetof(S, handoff) + sizeof(S::handoff));
  static_assert(bytes <= 227 * 1024, "shared memory exceeds the sm_90 limit");
  return bytes;
}

// The CTA's SharedStorage in its dynamic shared memory `raw`.
template <typename T, int D> __device__ __forceinline__ SharedStorage<T, D>& smem_storage(unsigned char* raw) {
  return *reinterpret_cast<SharedStorage<T, D>*>((reinterpret_cast<uintptr_t>(raw) + (kSmemAlign - 1)) &
                                                 ~uintptr_t(kSmemAlign - 1));
}

}  // namespace fa3
}  // namespace jaxinfer
