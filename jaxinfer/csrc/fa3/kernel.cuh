// FlashAttention-3 forward for ragged queries over ragged or paged (BSR) KV, sm90a only: the
// kernel entry (fa3_forward_kernel, launched by fa3_ffi.cu) and the split of its CTA into roles.
//
// Method: Shah et al., "FlashAttention-3: Fast and Accurate Attention with Asynchrony and
// Low-precision" (arXiv 2407.08608), sec. 3.1: warp specialization. A work item is one (query
// tile of 128 rows, qo head) of one request. The grid is persistent: one CTA per SM runs work
// items, heavy ones first, taken from an atomic counter until none is left (head_dim 256: one
// CTA per item). 3 warpgroups per CTA:
// - warpgroup 0, the producer (setmaxnreg down), loads an item's Q (TMA; two Q buffers at
//   head_dim 64 and 128, so the next item's Q is in place before the consumers start it) and then
//   its K/V tiles of kBN keys into shared-memory rings (kStagesK / kStagesV deep), running ahead
//   into the next item while the consumers finish one. Ragged KV and pages of >= 8 rows: TMA
//   (one warp); other paged KV: cp.async through the page table (128 threads, the gather
//   producer). K and V of a tile have their own mbarriers.
// - warpgroups 1 and 2, the consumers (setmaxnreg up), own 64 query rows each: S = Q K^T, online
//   softmax, O += P V on wgmma, ping-ponging between the two warpgroups and overlapping the
//   softmax of one tile with P V of the previous one; the pipeline does not drain between work
//   items. With two Q buffers, O goes out through the finished item's Q buffer and one TMA store
//   per warpgroup.
//
// The parts, along FlashAttention-3's own seams:
//   fa3/config.cuh          Params, tuning knobs (JAXINFER_FA3_*), tile shapes, smem layouts, MMAs
//   fa3/tile_scheduler.cuh  work items: order, persistent grid, the producer -> consumer hand-off
//   fa3/pipeline.cuh        mbarriers, ring positions, TMA loads and cp.async arrivals
//   fa3/smem_layout.cuh     SharedStorage: where each buffer lives in shared memory
//   fa3/producer.cuh        the producer: K/V tiles by TMA (ragged, pages) or cp.async (small pages)
//   fa3/mainloop.cuh        the consumers: Q K^T, online softmax, P V, the work-item loop
//   fa3/epilogue.cuh        o = O / l and lse, TMA store of O
// and from csrc/common/ (shared with fa2): parameters and work order, SFU math and pack2,
// cp.async, KV addressing, the tail fill.
//
// Semantics follow shared/DESIGN.md sec. 2-3, as csrc/fa2/kernel.cuh: bottom-right causal /
// window masks, soft cap c*tanh(x/c), GQA (qo head h reads kv head h / group_size), lse base 2,
// a row with no visible key gives o = 0 and lse = -inf.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/tail_fill.cuh"
#include "config.cuh"
#include "epilogue.cuh"
#include "mainloop.cuh"
#include "pipeline.cuh"
#include "producer.cuh"
#include "smem_layout.cuh"
#include "tile_scheduler.cuh"

#include <cute/arch/copy_sm90_desc.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

namespace jaxinfer {
namespace fa3 {

// One CTA: the producer warpgroup and the two consumer warpgroups (persistent: until no work item
// is left, fa3/tile_scheduler.cuh). Across items the producer runs ahead: K of the next item's
// first tile, then its Q once the consumers released Q (after their last Q K^T), load while the
// consumers finish the last P V and write O.
template <typename T, int D, int kKv>
__global__ void __launch_bounds__(kThreads, 1) fa3_forward_kernel(const __grid_constant__ Params p) {
  using C = Config<T, D>;
  constexpr bool kGather = kKv == kKvGather;
  using Bar = cutlass::arch::ClusterBarrier;
  extern __shared__ unsigned char smem_raw[];
  SharedStorage<T, D>& smem = smem_storage<T, D>(smem_raw);
  T* sQ = smem.q;
  T* sK = smem.k;
  T* sV = smem.v;
  const BarriersOf<T, D> bars{smem.barriers};
  int64_t* row_offsets = smem.row_offsets;
  using HandoffT = Handoff<C::kStagesQ>;
  HandoffT* handoff = &smem.handoff.item;
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(&p.tma_q);
    if constexpr (C::kStagesQ > 1) cute::prefetch_tma_descriptor(&p.tma_o);
    if constexpr (!kGather) {
      cute::prefetch_tma_descriptor(&p.tma_k);
      cute::prefetch_tma_descriptor(&p.tma_v);
    }
    bars.init(kGather ? 128 : 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<Shape<D>::kProducerRegs[kGather]>();
    if (!kGather && threadIdx.x >= 32) return;  // TMA: one producer warp
    const int tiles = planned_tiles(p);
    int item = first_work_item(), table_pos = 0;
    RingPos<C::kStagesK> kw;
    RingPos<C::kStagesV> vw;
    for (int j = 0;; ++j) {
      const WorkItem it = work_item<C::kBN>(p, item, tiles);
      int next = 0;
      if (threadIdx.x == 0) {
        handoff->item[j % HandoffT::kSlots] = it;
        if (Shape<D>::kPersistent && it.head >= 0) next = claim_next_work_item(p);
      }
      // Q of the item into buffer j % kStagesQ, once the consumers released that buffer's
      // previous Q (item j - kStagesQ); its barrier also publishes the item's hand-off slot.
      auto q_step = [&] {
        if (threadIdx.x != 0) return;
        const int b = j % C::kStagesQ;
        if (j >= C::kStagesQ) Bar::wait(bars.q_empty(b), (j / C::kStagesQ - 1) & 1);
        if (it.head >= 0 && it.w.num_kv_tiles > 0) {
          tma_tile<kBM, D>(p.tma_q, bars.q(b), sQ + b * C::kQElems, it.head, it.w.q_start + it.w.qs);
        } else {
          Bar::arrive(bars.q(b));
        }
      };
      if (it.head < 0 || it.w.num_kv_tiles == 0) {
        q_step();
      } else if constexpr (kGather) {
        producer_gather<T, D>(p, it, kw, vw, table_pos, q_step, sK, sV, row_offsets, bars);
      } else {
        producer_tma<T, D, kKv == kKvTmaPages>(p, it, kw, vw, q_step, sK, sV, bars);
      }
      if (it.head < 0 || !Shape<D>::kPersistent) break;
      if constexpr (kGather) {
        if (threadIdx.x == 0) handoff->next[j & 1] = next;
        asm volatile("bar.sync 3, 128;\n" ::: "memory");
        item = handoff->next[j & 1];
      } else {
        item = __shfl_sync(0xffffffff, next, 0);
      }
    }
    // Keep the thread alive until its copies landed (a CTA must not exit with copies in flight).
    if constexpr (kGather) cp_async_wait_all();
  } else {
    cutlass::arch::warpgroup_reg_alloc<Shape<D>::kConsumerRegs[kGather]>();
    const PingPong sched{int(threadIdx.x - 128) / 128};
    if (sched.wg == 1) sched.pass_turn();  // warpgroup 0 issues first
    consumers<T, D, kGather>(p, handoff, sched, sQ, sK, sV, bars);
    if (sched.wg == 0) sched.wait_turn();  // matches warpgroup 1's pass after its last turn
    // The last TMA stores of O are complete before the CTA exits (their threads waited only for
    // the reads of shared memory).
    if (C::kStagesQ > 1 && threadIdx.x % 128 == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }
}

// Rows [qo_indptr[num_batch], num_rows) belong to no request: o = 0, lse = -inf (fill_tail).
template <typename T>
__global__ void fill_tail_kernel(T* o, float* lse, const int32_t* qo_indptr, int num_batch, int64_t num_rows,
                                 int64_t row_elems, int num_qo_heads) {
  fill_tail(o, lse, qo_indptr, num_batch, num_rows, row_elems, num_qo_heads);
}

}  // namespace fa3
}  // namespace jaxinfer
