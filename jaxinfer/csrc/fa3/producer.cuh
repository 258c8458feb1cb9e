// fa3 producer (warpgroup 0, setmaxnreg down): an item's K/V tiles of kBN keys into the
// shared-memory rings, K of tile i + 1 before V of tile i, the order the consumers need them in.
// TMA producer (one warp): ragged KV by one TMA load per 64 columns of a tile, paged KV whose
// page_size is a power of 2 of at least JAXINFER_FA3_TMA_MIN_PAGE by one per 64 columns of each
// page of a tile (tensor maps encoded per call by the FFI handler); only the tile crossing kv_len
// is gathered with cp.async and zero-fill. Gather producer (other paged KV): 128 threads gather
// rows with cp.async through the page table (16 bytes per thread and row chunk), published by
// cp.async.mbarrier.arrive (the producer never waits for its copies, only for free slots). The
// item's Q load (q_step, fa3/kernel.cuh) goes out between the K loads.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../common/cp_async.cuh"
#include "../common/kv_addressing.cuh"
#include "config.cuh"
#include "pipeline.cuh"
#include "smem_layout.cuh"
#include "tile_scheduler.cuh"

namespace jaxinfer {
namespace fa3 {

// TMA producer, one warp. A full tile is D / 64 TMA loads (ragged), or D / 64 per page of the tile
// (kPages: kBN / kv_box_rows pages, lane j loading page j), issued without waiting (FA3 paper sec.
// 3.1: the producer costs the consumers almost no issue slots); lane 0 arrives with the tile's
// byte count. A lane reads its page id before waiting for the free slot, so the read's latency
// hides behind that wait (reading the ids a tile earlier, and V reusing K's, measured no faster).
// The tile crossing kv_len goes through cp.async with zero-fill instead:
// the rows past the request (the next request's keys, unused rows of its last page, or padding
// that may hold anything) must not reach P V, where 0 * NaN would poison O. It is one tile per
// work item at most, so its copies are awaited before the (single) arrival. kw / vw: where the
// next K / V tile goes; q_step (the item's Q) runs after the first K load.
template <typename T, int D, bool kPages, class QStep>
__device__ __forceinline__ void producer_tma(const Params& p, const WorkItem& it,
                                             RingPos<Config<T, D>::kStagesK>& kw,
                                             RingPos<Config<T, D>::kStagesV>& vw, QStep&& q_step, T* sK, T* sV,
                                             BarriersOf<T, D> bars) {
  using C = Config<T, D>;
  constexpr int kBN = C::kBN;
  using Bar = cutlass::arch::ClusterBarrier;
  const TileWork& w = it.w;
  const int lane = threadIdx.x % 32;
  const int kv_head = it.head / p.group_size;
  auto load = [&](auto is_v, auto& pos, int i) {
    constexpr bool kV = decltype(is_v)::value;
    const int slot = pos.slot;
    uint64_t* full = kV ? bars.v_full(slot) : bars.k_full(slot);
    const int t0 = w.t_first + i * kBN;
    [[maybe_unused]] int page = 0, in_page = 0;
    if constexpr (kPages) {
      if (lane * p.kv_box_rows < kBN && t0 + kBN <= w.kv_len) {
        const int t = t0 + lane * p.kv_box_rows;
        page = __ldg(p.kv_indices + w.kv_start + page_index<kKvPagedPow2>(p, t));
        in_page = t & (p.page_size - 1);
      }
    }
    // The previous tile of the slot has been read by every consumer warp.
    Bar::wait(kV ? bars.v_empty(slot) : bars.k_empty(slot), pos.phase ^ 1);
    pos.advance();
    if (t0 + kBN <= w.kv_len) {
      if constexpr (kPages) {
        if (lane == 0) cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full, kBN * D * sizeof(T));
        if (lane * p.kv_box_rows < kBN) {
          const int c1 = p.kv_hnd ? in_page : kv_head, c2 = p.kv_hnd ? kv_head : in_page;
          T* dst = (kV ? sV : sK) + slot * kBN * D + lane * p.kv_box_rows * 64;
          CUTE_UNROLL
          for (int c = 0; c < D / 64; ++c)
            tma_load_4d(kV ? p.tma_v : p.tma_k, full, dst + c * kBN * 64, c * 64, c1, c2, page);
        }
      } else {
        if (lane == 0) tma_tile<kBN, D>(kV ? p.tma_v : p.tma_k, full, (kV ? sV : sK) + slot * kBN * D, kv_head,
                                        int(w.kv_start) + t0);
      }
      return;
    }
    const T* src = static_cast<const T*>(kV ? p.v : p.k) + kv_head * p.kv_head_stride;
    for (int idx = lane; idx < kBN * D / 8; idx += 32) {
      const int r = idx / (D / 8), col = idx % (D / 8) * 8;
      const bool ok = t0 + r < w.kv_len;
      T* dst = kV ? smem_at<typename C::LayoutVt>(sV, col, r, slot) : smem_at<typename C::LayoutK>(sK, r, col, slot);
      if constexpr (kPages) {
        cp_async_16(ok ? src + paged_row_offset(p, w.kv_start, t0 + r) + col : src, dst, ok);
      } else {
        cp_async_16(ok ? src + (w.kv_start + t0 + r) * p.kv_tok_stride + col : src, dst, ok);
      }
    }
    cp_async_wait_all();
    __syncwarp();
    if (lane == 0) Bar::arrive(full);
  };
  // K of tile i + 1 goes out before V of tile i, the order the consumers need them in. With one Q
  // buffer, Q waits for the consumers to finish the previous item's Q K^T, so K goes first.
  if constexpr (C::kStagesQ > 1) q_step();
  load(std::false_type{}, kw, 0);
  if constexpr (C::kStagesQ == 1) q_step();
  for (int i = 0; i < w.num_kv_tiles; ++i) {
    if (i + 1 < w.num_kv_tiles) load(std::false_type{}, kw, i + 1);
    load(std::true_type{}, vw, i);
  }
}

// Gather producer (paged KV that TMA does not load): rows of a tile are split over the 128
// threads, kThreadsPerRow threads per row (16 bytes each, coalesced), kRowStep rows apart.
// kRowStep is a multiple of 8, the period of the 128-byte swizzle, so a thread's shared-memory
// addresses in a tile are its first row's address plus multiples of one compile-time stride.
template <int D> struct ProducerMap {
  static constexpr int kThreadsPerRow = D / 8 < 16 ? D / 8 : 16;
  static constexpr int kChunks = D / 8 / kThreadsPerRow;  // 16-byte chunks per thread and row
  static constexpr int kRowStep = 128 / kThreadsPerRow;
  static constexpr int kColStep = 8 * kThreadsPerRow;     // elements between a thread's chunks
  static_assert(kRowStep % 8 == 0, "rows of one thread must share their swizzle phase");
};

template <typename T, int D, class QStep>
__device__ __forceinline__ void producer_gather(const Params& p, const WorkItem& it,
                                                RingPos<Config<T, D>::kStagesK>& kw,
                                                RingPos<Config<T, D>::kStagesV>& vw, int& table_pos, QStep&& q_step,
                                                T* sK, T* sV, int64_t* row_offsets, BarriersOf<T, D> bars) {
  using C = Config<T, D>;
  using M = ProducerMap<D>;
  constexpr int kBN = C::kBN, kRowStep = M::kRowStep, kColStep = M::kColStep;
  static_assert(kBN % kRowStep == 0 && kBN <= 128, "tiles must split evenly over the producer");
  using Bar = cutlass::arch::ClusterBarrier;
  const int ptid = threadIdx.x;
  const int ld_row = ptid / M::kThreadsPerRow;
  const int col0 = (ptid % M::kThreadsPerRow) * 8;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const TileWork& w = it.w;

  // Shared addresses of this thread's chunks in row ld_row of slot 0; other rows and slots are
  // compile-time offsets from them.
  uint32_t k_dst[M::kChunks], v_dst[M::kChunks];
  CUTE_UNROLL
  for (int c = 0; c < M::kChunks; ++c) {
    k_dst[c] = cute::cast_smem_ptr_to_uint(smem_at<typename C::LayoutK>(sK, ld_row, col0 + c * kColStep, 0));
    v_dst[c] = cute::cast_smem_ptr_to_uint(smem_at<typename C::LayoutVt>(sV, col0 + c * kColStep, ld_row, 0));
  }
  constexpr auto kLayoutK = typename C::LayoutK{}.layout_b();
  constexpr auto kLayoutV = typename C::LayoutVt{}.layout_b();
  constexpr uint32_t kKRowBytes = sizeof(T) * (kLayoutK(kRowStep, 0, 0) - kLayoutK(0, 0, 0));
  constexpr uint32_t kVRowBytes = sizeof(T) * (kLayoutV(0, kRowStep, 0) - kLayoutV(0, 0, 0));
  constexpr uint32_t kKSlotBytes = sizeof(T) * kLayoutK(0, 0, 1), kVSlotBytes = sizeof(T) * kLayoutV(0, 0, 1);
  const int64_t kv_col = (it.head / p.group_size) * p.kv_head_stride + col0;

  auto copy_rows = [&](const T* src, const int64_t* offs, const uint32_t (&dst)[M::kChunks], uint32_t slot_base,
                       uint32_t row_bytes) {
    CUTE_UNROLL
    for (int j = 0; j < kBN / kRowStep; ++j) {
      const int64_t off = offs[ld_row + j * kRowStep];
      CUTE_UNROLL
      for (int c = 0; c < M::kChunks; ++c)
        cp_async_16(off >= 0 ? src + off + c * kColStep : src, dst[c] + slot_base + j * row_bytes, off >= 0);
    }
  };
  // Offsets (elements, head 0, column col0 excluded) of a tile's rows, one row per thread, in
  // one of kOffsetTables (3) tables: a row's page lookup happens once per tile, not once per chunk.
  // -1 marks rows past kv_len, which read zeros (P is 0 there, but 0 * NaN garbage would still
  // poison O). Iteration i writes the table of tile i + 1 and reads those of tiles i + 1 (K) and
  // i (V); with one barrier per iteration no thread is more than one iteration ahead, so three
  // tables never collide. table_pos: the table of the item's first tile (the CTA's tiles take
  // the tables in turn, across work items too).
  auto table = [&](int t) { return row_offsets + t * kBN; };
  auto next_table = [](int t) { return t == kOffsetTables - 1 ? 0 : t + 1; };
  auto fill_offsets = [&](int i, int t) {
    if (ptid < kBN) {
      const int key = w.t_first + i * kBN + ptid;
      table(t)[ptid] = key < w.kv_len ? paged_row_offset(p, w.kv_start, key) + kv_col - col0 : -1;
    }
  };
  // K of tile i + 1 goes out before V of tile i (the order the consumers need them in), so a K
  // load never waits behind a V slot, which frees later.
  auto load_k = [&](int t) {
    const int slot = kw.slot;
    // The previous tile of the slot has been read by every consumer warp.
    Bar::wait(bars.k_empty(slot), kw.phase ^ 1);
    kw.advance();
    copy_rows(k + col0, table(t), k_dst, slot * kKSlotBytes, kKRowBytes);
    cp_async_arrive(bars.k_full(slot));
  };
  int t_cur = table_pos;  // the table of tile i
  if constexpr (C::kStagesQ > 1) q_step();  // as in producer_tma
  fill_offsets(0, t_cur);
  asm volatile("bar.sync 3, 128;\n" ::: "memory");
  load_k(t_cur);
  if constexpr (C::kStagesQ == 1) q_step();
  for (int i = 0; i < w.num_kv_tiles; ++i) {
    const int t_next = next_table(t_cur);
    if (i + 1 < w.num_kv_tiles) fill_offsets(i + 1, t_next);
    asm volatile("bar.sync 3, 128;\n" ::: "memory");
    if (i + 1 < w.num_kv_tiles) load_k(t_next);
    const int slot = vw.slot;
    Bar::wait(bars.v_empty(slot), vw.phase ^ 1);
    vw.advance();
    copy_rows(v + col0, table(t_cur), v_dst, slot * kVSlotBytes, kVRowBytes);
    cp_async_arrive(bars.v_full(slot));
    t_cur = t_next;
  }
  table_pos = t_cur;
}

}  // namespace fa3
}  // namespace jaxinfer
