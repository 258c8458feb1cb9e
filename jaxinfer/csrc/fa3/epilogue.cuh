// fa3 epilogue: o = O / l and lse of a work item's rows (the attention sink joined when given),
// from the consumers' registers. With two Q buffers, a warpgroup whose 64 rows all belong to the
// request stages O in the finished item's Q buffer and writes it with one TMA store; otherwise
// each thread stores its pairs of columns.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/math.cuh"
#include "config.cuh"
#include "pipeline.cuh"
#include "tile_scheduler.cuh"

#include <cutlass/arch/barrier.h>

namespace jaxinfer {
namespace fa3 {

// TMA store of one box from shared memory to the tensor map's tensor (coordinates: column, head,
// row), in the thread's current bulk group.
__device__ __forceinline__ void tma_store(const CUtensorMap& map, const void* src, int col, int head, int row) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n"
               ::"l"(reinterpret_cast<uint64_t>(&map)), "r"(cute::cast_smem_ptr_to_uint(src)), "r"(col), "r"(head),
               "r"(row)
               : "memory");
}

// The epilogue of one consumer thread. prepare() gathers its operands before the wait for the
// item's last P V, so that their latency (the row-sum shuffles, the item's fields read from the
// hand-off) hides behind it instead of behind the output stores: 1 / l and lse of both rows, and
// where the rows go. l >= 1 for a row with a visible key (its max contributes 2^0 or more), and
// with a sink joined too (common/math.cuh, join_sink: the larger of the row's max and the sink
// contributes 2^0), so the fast reciprocal is exact enough. store() writes them. With attention
// sinks (Params::sinks; a uniform branch, so the code without them stays as it was) prepare()
// leaves each row's sum and max, and store() first joins the item's sink (join()): the lse
// includes it, and a row with no visible key gets o = 0, lse = the sink.
template <typename T, int D> struct Epilogue {
  using C = Config<T, D>;
  float inv_l[2], lse_row[2], sink_log2;
  int rows_valid;
  int64_t tok0;

  __device__ __forceinline__ void prepare(const Params& p, const WorkItem& it, const float (&row_sum)[2],
                                          const float (&row_max)[2]) {
    constexpr float kNegInf = -INFINITY;
    const TileWork& w = it.w;
    float l[2] = {row_sum[0], row_sum[1]};
    CUTE_UNROLL
    for (int m = 1; m <= 2; m *= 2) {
      CUTE_UNROLL
      for (int hr = 0; hr < 2; ++hr) l[hr] += __shfl_xor_sync(0xffffffff, l[hr], m);
    }
    CUTE_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      if (p.sinks != nullptr) {  // the row's sum and max, finished by join() in store()
        inv_l[hr] = l[hr];
        lse_row[hr] = row_max[hr];
      } else {
        inv_l[hr] = l[hr] > 0.f ? __fdividef(1.f, l[hr]) : 0.f;
        lse_row[hr] = l[hr] > 0.f ? row_max[hr] + __log2f(l[hr]) : kNegInf;
      }
    }
    if (p.sinks != nullptr) sink_log2 = it.sink_log2;
    rows_valid = w.rows_valid;
    tok0 = int64_t(w.q_start) + w.qs;
  }

  // The sink joined to the row sums and maxima prepare() left in inv_l and lse_row
  // (common/math.cuh, join_sink), giving 1 / l and lse. Here rather than in prepare(): past the
  // wait for the last P V, P's registers are free, and the consumers keep the registers they had
  // (prepare() runs where they hold O, P and the next item's S; a join there spilled).
  __device__ __forceinline__ void join() {
    constexpr float kNegInf = -INFINITY;
    CUTE_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      float l = inv_l[hr], m = lse_row[hr];
      const float factor = join_sink(l, m, sink_log2);
      inv_l[hr] = l > 0.f ? __fdividef(factor, l) : 0.f;
      lse_row[hr] = l > 0.f ? m + __log2f(l) : kNegInf;
    }
  }

  // o = O / l and lse of the item's rows (O: this thread's wgmma accumulator, ConsumerThread).
  // stage_o: this warpgroup's 64 rows go into the item's Q buffer in the TMA box's layout
  // (64-column blocks of 128-byte swizzled rows; conflict-free, a warp's 8 rows hit 8 different
  // 16-byte chunks), then one thread stores the box and releases the buffer once the store has
  // read it. Only with two Q buffers (the buffer is free once the item's last Q K^T completed)
  // and when all 64 rows are the request's (a box past them would overwrite the next request's
  // rows); else O is stored from registers.
  template <class TensorO>
  __device__ __forceinline__ void store(const Params& p, const TensorO& tOrO, const ConsumerThread& th, T* sQ,
                                        BarriersOf<T, D> bars, int head, int q_buffer, bool stage_o) {
    if (p.sinks != nullptr) join();
    const int ctid = th.ctid, lane = th.lane, wg = th.wg, row0 = th.row0, col0 = th.col0;
    auto o_pair = [&](int hr, int db) {  // O of this thread's columns col0 + 8 db (+1) in row half hr
      return pack2<T>(tOrO(4 * db + 2 * hr) * inv_l[hr], tOrO(4 * db + 2 * hr + 1) * inv_l[hr]);
    };
    if (stage_o) {
      // The 128-byte swizzle puts 16-byte chunk c of row r at chunk c ^ (r % 8) of the row (the
      // buffer is 1 KiB-aligned); this thread's rows share r % 8, so one XOR with a constant per
      // chunk gives every address (smem_at per element kept an address per element live across
      // the loop).
      const uint32_t row_addr = cute::cast_smem_ptr_to_uint(sQ + q_buffer * C::kQElems) + row0 * 128 +
                                int(sizeof(T)) * col0 + (row0 % 8) * 16;
      CUTE_UNROLL
      for (int hr = 0; hr < 2; ++hr) {
        CUTE_UNROLL
        for (int db = 0; db < D / 8; ++db) {
          const uint32_t addr = (row_addr ^ (db % 8) * 16) + hr * 8 * 128 + db / 8 * kBM * 128;
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(o_pair(hr, db)) : "memory");
        }
      }
      cutlass::arch::fence_view_async_shared();  // the generic-proxy writes, before the TMA (async proxy) reads them
      asm volatile("bar.sync %0, 128;\n" ::"r"(4 + wg) : "memory");
      if (ctid % 128 == 0) {
        const T* box = sQ + q_buffer * C::kQElems + wg * 64 * 64;
        CUTE_UNROLL
        for (int c = 0; c < D / 64; ++c) tma_store(p.tma_o, box + c * kBM * 64, c * 64, head, int(tok0) + 64 * wg);
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
        asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
        // The warpgroup's 4 arrivals of the Q-free barrier (one per warp otherwise).
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], 4;\n" ::"r"(
                         cute::cast_smem_ptr_to_uint(bars.q_empty(q_buffer)))
                     : "memory");
      }
    } else {
      T* o = static_cast<T*>(p.o);
      CUTE_UNROLL
      for (int hr = 0; hr < 2; ++hr) {
        const int r = row0 + 8 * hr;
        if (r >= rows_valid) continue;
        T* dst = o + (tok0 + r) * p.q_tok_stride + head * p.q_head_stride + col0;
        CUTE_UNROLL
        for (int db = 0; db < D / 8; ++db) *reinterpret_cast<uint32_t*>(dst + 8 * db) = o_pair(hr, db);
      }
    }
    CUTE_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      const int r = row0 + 8 * hr;
      if (lane % 4 == 0 && r < rows_valid) p.lse[(tok0 + r) * p.num_qo_heads + head] = lse_row[hr];
    }
  }
};

}  // namespace fa3
}  // namespace jaxinfer
