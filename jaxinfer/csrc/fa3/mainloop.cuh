// fa3 mainloop: the consumer warpgroups (setmaxnreg up), 64 query rows each. S = Q K^T with wgmma
// from 128-byte-swizzled shared memory (SS), online softmax in registers (base 2, scale folded
// into one FFMA, lazy rescaling of O), P converted to 16 bits in registers and O += P V with wgmma
// taking P from registers (RS) and V as an MN-major operand (no transpose), then the slot is
// released. The two consumer warpgroups take turns issuing their GEMMs (ping-pong, paper sec.
// 3.1), and inside a warpgroup the softmax of tile i overlaps P V of tile i - 1 (paper sec. 3.2).
// The pipeline does not drain between work items: the turn that issues an item's last P V also
// issues the next item's first Q K^T, and O is written (fa3/epilogue.cuh) while it runs. Fully
// masked KV tiles are skipped (causal, window); only tiles crossing a mask edge run the mask pass.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../common/math.cuh"
#include "../common/sm90.cuh"
#include "config.cuh"
#include "epilogue.cuh"
#include "pipeline.cuh"
#include "tile_scheduler.cuh"

#include <cutlass/arch/barrier.h>

namespace jaxinfer {
namespace fa3 {

// Ping-pong between the two consumer warpgroups (FA3 paper sec. 3.1): each issues its GEMMs
// only after the other has issued its own, so one warpgroup's softmax runs while the tensor
// cores work for the other. Named barrier 1 + w (w = 0, 1) is "warpgroup w may issue": it
// completes when w syncs and the other warpgroup's 128 threads have arrived. Both warpgroups
// take the same number of turns per work item and pass the turn after each, so the turns
// alternate across items; warpgroup 1 passes once before the first (warpgroup 0 issues first)
// and warpgroup 0 takes one extra turn after the last, which balances both barriers.
#ifndef JAXINFER_FA3_PINGPONG
#define JAXINFER_FA3_PINGPONG 1
#endif
struct PingPong {
  int wg;  // 0 or 1
  __device__ __forceinline__ void wait_turn() const {
    if (JAXINFER_FA3_PINGPONG) asm volatile("bar.sync %0, 256;\n" ::"r"(1 + wg));
  }
  __device__ __forceinline__ void pass_turn() const {
    if (JAXINFER_FA3_PINGPONG) asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - wg));
  }
};

// Tiles [first, second) of an item are plain: every row sees all their keys (below kv_len and the
// first row's diagonal, at or above the last row's window start), so they skip the mask pass; the
// others need the general softmax (soft cap on, or a mask edge crossing the tile).
template <int kBN> __device__ __forceinline__ int2 plain_tiles(const Params& p, const TileWork& w) {
  const int key_hi = p.causal ? min(w.kv_len, w.qpos_min + 1) : w.kv_len;
  const int plain_hi = p.soft_cap_on || key_hi < w.t_first ? 0 : (key_hi - w.t_first) / kBN;
  const int key_lo = p.window_left >= 0 ? w.qpos_max - p.window_left - w.t_first : 0;
  return make_int2(key_lo > 0 ? (key_lo + kBN - 1) / kBN : 0, plain_hi);
}

// The consumer warpgroups: the CTA's work items in hand-off order, as one software pipeline
// across items. Item j's Q is in buffer j % kStagesQ (the consumers wait for its Q barrier, which
// also publishes the item's hand-off slot) and is released on that buffer's Q-free barrier after
// the item's last Q K^T, or after the TMA store of O staged there. kr / vr walk the K / V rings in
// the producer's order.
//
// Item boundary (persistent grids): the turn that issues an item's last P V also issues the next
// item's first Q K^T (its Q and first K tile are in place by then: two Q buffers, and the producer
// runs ahead), and the epilogue runs while that Q K^T does. Otherwise the tensor cores wait at
// every item for the epilogue and then for the first tile's softmax (it matters on batches of
// short requests, with many items per CTA).
template <typename T, int D, bool kGather>
__device__ __forceinline__ void consumers(const Params& p, const Handoff<Config<T, D>::kStagesQ>* handoff,
                                          const PingPong& sched, T* sQ, T* sK, T* sV, BarriersOf<T, D> bars) {
  using namespace cute;
  using C = Config<T, D>;
  using HandoffT = Handoff<C::kStagesQ>;
  using Bar = cutlass::arch::ClusterBarrier;
  constexpr int kBN = C::kBN;
  constexpr float kNegInf = -INFINITY;
  const ConsumerThread th(threadIdx.x - 128);  // 0..255; the rows and columns it holds
  const int ctid = th.ctid, lane = th.lane, wg = th.wg, row0 = th.row0, col0 = th.col0;

  typename C::MmaQK mma_qk;
  typename C::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(ctid);
  auto thr_pv = mma_pv.get_thread_slice(ctid);
  Tensor tSrQ = thr_qk.partition_fragment_A(make_tensor(make_smem_ptr(sQ), typename C::LayoutQ{}));
  Tensor tSrK = thr_qk.partition_fragment_B(make_tensor(make_smem_ptr(sK), typename C::LayoutK{}));
  Tensor tOrV = thr_pv.partition_fragment_B(make_tensor(make_smem_ptr(sV), typename C::LayoutVt{}));
  // Accumulator register i of S (and of O, with D for kBN) holds column col0 + (i & 1) + 8 * (i / 4)
  // of row row0 + 8 * ((i / 2) & 1) (ConsumerThread).
  Tensor tSrS = partition_fragment_C(mma_qk, make_shape(Int<kBM>{}, Int<kBN>{}));
  Tensor tOrO = partition_fragment_C(mma_pv, make_shape(Int<kBM>{}, Int<D>{}));
  static_assert(size(tSrS) == kBN / 2 && size(tOrO) == D / 2, "unexpected accumulator shape");
  Tensor rP = make_tensor<T>(tSrS.layout());
  Tensor tOrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
  float row_max[2], row_sum[2], rescale[2];
  bool rescale_pending = false;
  bool pv_first = true;  // the next P V is its item's first: it overwrites O instead of adding to it
  int pv_slot = 0;       // V slot of the last P V issued
  RingPos<C::kStagesK> kr;
  RingPos<C::kStagesV> vr;

  // This warp is done reading a slot's K or V, or Q; the producer waits for all 8 consumer warps.
  auto release = [&](uint64_t* bar) {
    __syncwarp();
    if (lane == 0) Bar::arrive(bar);
  };
  // cp.async writes shared memory through the generic proxy, wgmma reads it through the
  // async proxy: the proxy fence after the barrier orders the two. A tile loaded by TMA (async
  // proxy too) needs none, and the fence is a MEMBAR per wait.
  auto wait_loaded = [&](uint64_t* bar, uint32_t phase, bool copied) {
    Bar::wait(bar, phase);
    if (copied) cutlass::arch::fence_view_async_shared();
  };
  // Whether tile i of item w came through cp.async: all tiles of the gather producer, else the
  // tile crossing kv_len, only ever an item's last (producer_tma).
  auto copied = [&](const TileWork& w, int i) { return kGather || w.t_first + (i + 1) * kBN > w.kv_len; };
  // Online softmax of tile i of item w (base 2) on S in registers, leaving P there; sets the factor
  // O must be multiplied by in `rescale`, and returns whether any row of this warp has one (else O
  // is left alone). Without soft cap the max is taken on raw q.k (sm_scale > 0 keeps the order)
  // and scaling folds into one FFMA per element.
  // Lazy rescaling, as fa2: a row's running max moves only when the tile's max exceeds it by
  // more than kRescaleThreshold (log2 units); otherwise the stale max stays, p <= 2^threshold,
  // and o = O / l and lse stay exact because O and l share the max. Past the first tiles O is
  // almost never rescaled. The decision is selects and a vote, no branch: ptxas hoists a wgmma
  // wait above any branch between the GEMM issue and the wait, which would serialize P V with
  // the softmax.
  constexpr float kRescaleThreshold = 8.f;
  auto softmax = [&](auto general, const TileWork& w, int i) -> bool {
    constexpr bool kGeneral = decltype(general)::value;
    const int t0 = w.t_first + i * kBN;
    float scale = p.logit_scale;
    if constexpr (kGeneral) {
      if (p.soft_cap_on) {
        scale = 1.f;
        CUTE_UNROLL
        for (int e = 0; e < size(tSrS); ++e) tSrS(e) = tanh_approx(tSrS(e) * p.logit_scale) * p.cap_log2;
      }
      // Key j = t0 + col0 + c of row r is visible iff lo[r] <= c < hi[r]: the bounds per row,
      // then two compares per element (c is a compile-time offset).
      int lo[2], hi[2];
      CUTE_UNROLL
      for (int hr = 0; hr < 2; ++hr) {
        const int qpos = w.qs + row0 + 8 * hr + w.delta;
        hi[hr] = (p.causal ? min(w.kv_len, qpos + 1) : w.kv_len) - (t0 + col0);
        lo[hr] = p.window_left >= 0 ? qpos - p.window_left - (t0 + col0) : INT_MIN;
      }
      CUTE_UNROLL
      for (int e = 0; e < size(tSrS); ++e) {
        const int c = (e & 1) + 8 * (e / 4), hr = (e / 2) & 1;
        tSrS(e) = c < hi[hr] && c >= lo[hr] ? tSrS(e) : kNegInf;
      }
    }
    bool grow_any = false;
    CUTE_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      // 4 partial maxima / sums: shorter dependency chains than one running value. Each starts
      // from its first term, not from -inf / 0 (which ptxas cannot fold away).
      float mx4[4];
      CUTE_UNROLL
      for (int nb = 0; nb < kBN / 8; ++nb) {
        const float pair = fmaxf(tSrS(4 * nb + 2 * hr), tSrS(4 * nb + 2 * hr + 1));
        mx4[nb % 4] = nb < 4 ? pair : fmaxf(mx4[nb % 4], pair);
      }
      const float mx = quad_max(fmaxf(fmaxf(mx4[0], mx4[1]), fmaxf(mx4[2], mx4[3])));
      const float m_tile = mx * scale;
      const bool grow = m_tile > row_max[hr] + kRescaleThreshold;  // -inf + 8 = -inf: a first visible tile grows
      const float m_new = grow ? m_tile : row_max[hr];
      // A row with nothing visible yet keeps max -inf; subtract 0 instead so 2^x gives 0, not NaN.
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      rescale[hr] = grow ? exp2_approx(row_max[hr] - m_use) : 1.f;
      row_max[hr] = m_new;
      grow_any |= grow;
      float sum4[4];
      CUTE_UNROLL
      for (int nb = 0; nb < kBN / 8; ++nb) {
        CUTE_UNROLL
        for (int e = 0; e < 2; ++e) {
          float& x = tSrS(4 * nb + 2 * hr + e);
          x = exp2_approx(fmaf(x, scale, -m_use));
          sum4[nb % 4] = nb < 4 && e == 0 ? x : sum4[nb % 4] + x;
        }
      }
      row_sum[hr] = row_sum[hr] * rescale[hr] + ((sum4[0] + sum4[1]) + (sum4[2] + sum4[3]));
    }
    return __any_sync(0xffffffff, grow_any);
  };
  auto convert_and_rescale = [&]() {
    uint32_t* rp = reinterpret_cast<uint32_t*>(rP.data());
    CUTE_UNROLL
    for (int e = 0; e < size(tSrS) / 2; ++e) rp[e] = pack2<T>(tSrS(2 * e), tSrS(2 * e + 1));
    if (rescale_pending) {
      CUTE_UNROLL
      for (int e = 0; e < size(tOrO); ++e) tOrO(e) *= rescale[(e / 2) & 1];
    }
  };

  // Software pipeline (FA3 paper sec. 3.2). Iteration i: once it is this warpgroup's turn, issue
  // S_i = Q K_i^T and O += P_{i-1} V_{i-1} and pass the turn; run the softmax of S_i while P V
  // runs. Where P is converted to 16 bits and O rescaled (Shape::kLateConvert):
  // - late (FA3's order): after the softmax, once P V is complete, outside the turn (it covers
  //   the GEMM issue only).
  // - early: at the start of the next turn, before the GEMM issue.
  // Late is the faster at head_dim 64 and 128, early at 256.
  constexpr bool kLate = Shape<D>::kLateConvert;
  auto issue_qk = [&](int q_buffer) {  // S = Q K^T of the tile at kr
    wgmma_gemm(mma_qk, tSrQ(_, _, _, q_buffer), tSrK(_, _, _, kr.slot), tSrS, true);
  };
  auto issue_pv = [&]() {  // O += P V of the tile at vr (O = P V for the item's first)
    warpgroup_fence_operand(rP);
    wgmma_gemm(mma_pv, tOrP, tOrV(_, _, _, vr.slot), tOrO, pv_first);
    pv_first = false;
    pv_slot = vr.slot;
    vr.advance();
  };
  // The last P V issued is complete (kInFlight later groups may still run); its V slot is free.
  auto finish_pv = [&](auto in_flight, bool issued) {
    warpgroup_wait<decltype(in_flight)::value>();
    warpgroup_fence_operand(tOrO);
    warpgroup_fence_operand(rP);
    if (issued) release(bars.v_empty(pv_slot));
  };
  // The Q K^T of the tile at kr is complete: its K slot is free.
  auto finish_qk = [&]() {
    warpgroup_fence_operand(tSrS);
    release(bars.k_empty(kr.slot));
    kr.advance();
  };
  // Early order, inside the turn: wait for the P V issued one turn ago (if any) first.
  auto before_issue = [&](bool pv_issued) {
    if constexpr (!kLate) {
      finish_pv(Int<0>{}, pv_issued);
      convert_and_rescale();
    }
  };
  // Tile 0 of item w, once its Q K^T completed: fresh row statistics; the item's first P V
  // overwrites O, so O is not rescaled.
  auto first_tile = [&](const TileWork& w, int2 plain) {
    finish_qk();
    CUTE_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      row_max[hr] = kNegInf;
      row_sum[hr] = 0.f;
    }
    if (0 < plain.x || 0 >= plain.y) softmax(std::true_type{}, w, 0);
    else softmax(std::false_type{}, w, 0);
    rescale_pending = false;
    pv_first = true;
    if constexpr (kLate) convert_and_rescale();
  };
  auto iteration = [&](auto general, const TileWork& w, int i, int q_buffer) {
    // A plain tile ends at or below kv_len; V is of tile i - 1, not an item's last.
    wait_loaded(bars.k_full(kr.slot), kr.phase, decltype(general)::value ? copied(w, i) : kGather);
    wait_loaded(bars.v_full(vr.slot), vr.phase, kGather);
    sched.wait_turn();
    before_issue(i >= 2);
    issue_qk(q_buffer);
    issue_pv();
    sched.pass_turn();
    warpgroup_wait<1>();
    finish_qk();
    rescale_pending = softmax(general, w, i);
    if constexpr (kLate) {
      warpgroup_fence_operand(tSrS);
      finish_pv(Int<0>{}, true);
      convert_and_rescale();
    }
  };

  // o = O / l and lse, with its operands gathered before the wait for the last P V (fa3/epilogue.cuh).
  Epilogue<T, D> epi;

  bool started = false;  // the item's first Q K^T and softmax ran at the end of the previous item
  for (int j = 0;; ++j) {
    const int qb = j % C::kStagesQ;
    Bar::wait(bars.q(qb), (j / C::kStagesQ) & 1);
    // The item is read from shared memory where it is used, not held in registers.
    const WorkItem& it = handoff->item[j % HandoffT::kSlots];
    if (it.head < 0) break;
    const TileWork& w = it.w;
    const int n = w.num_kv_tiles;
    if (n == 0) {  // no visible key: o = 0, lse = -inf
      release(bars.q_empty(qb));  // Q is not even loaded
      clear(tOrO);
      row_sum[0] = row_sum[1] = 0.f;
      epi.prepare(p, it, row_sum, row_max);
      epi.store(p, tOrO, th, sQ, bars, it.head, qb, false);
      if constexpr (!Shape<D>::kPersistent) break;
      continue;
    }
    const bool stage_o = C::kStagesQ > 1 && w.rows_valid >= 64 * (wg + 1);
    const int2 plain = plain_tiles<kBN>(p, w);
    if (!started) {
      wait_loaded(bars.k_full(kr.slot), kr.phase, copied(w, 0));
      sched.wait_turn();
      issue_qk(qb);
      sched.pass_turn();
      warpgroup_wait<0>();
      first_tile(w, plain);
    }
    // The plain tiles are contiguous: one loop over them, with no general-or-plain branch per
    // tile (a branch per tile costs the consumers issue slots).
    for (int i = 1; i < n;) {
      if (i < plain.x || i >= plain.y) {
        iteration(std::true_type{}, w, i++, qb);
      } else {
        const int end = min(plain.y, n);
        do iteration(std::false_type{}, w, i, qb); while (++i < end);
      }
    }
    if (!stage_o) release(bars.q_empty(qb));  // the last Q K^T has completed
    // The next item starts in this turn if it has KV tiles (persistent grids: the producer
    // publishes every CTA's items, the last one with head < 0).
    const WorkItem* next = nullptr;
    const int next_qb = (j + 1) % C::kStagesQ;
    if constexpr (Shape<D>::kPersistent) {
      Bar::wait(bars.q(next_qb), ((j + 1) / C::kStagesQ) & 1);
      next = &handoff->item[(j + 1) % HandoffT::kSlots];
      if (next->head < 0 || next->w.num_kv_tiles == 0) next = nullptr;
    }
    wait_loaded(bars.v_full(vr.slot), vr.phase, copied(w, n - 1));
    if (next) wait_loaded(bars.k_full(kr.slot), kr.phase, copied(next->w, 0));
    sched.wait_turn();
    before_issue(n >= 2);
    issue_pv();
    // Issued even when no next item starts (its result is dropped): a wgmma issued on a branch
    // and awaited past the epilogue's branches made ptxas serialize every wgmma of the kernel.
    if constexpr (Shape<D>::kPersistent) issue_qk(next_qb);
    sched.pass_turn();
    epi.prepare(p, it, row_sum, row_max);
    finish_pv(Int<Shape<D>::kPersistent ? 1 : 0>{}, true);
    epi.store(p, tOrO, th, sQ, bars, it.head, qb, stage_o);
    started = next != nullptr;
    if constexpr (Shape<D>::kPersistent) warpgroup_wait<0>();
    if (next) first_tile(next->w, plain_tiles<kBN>(p, next->w));
    if constexpr (!Shape<D>::kPersistent) break;
  }
}

}  // namespace fa3
}  // namespace jaxinfer
