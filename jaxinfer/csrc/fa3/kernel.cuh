// FlashAttention-3 forward for ragged queries over ragged or paged (BSR) KV, sm90a only.
//
// Method: Shah et al., "FlashAttention-3: Fast and Accurate Attention with Asynchrony and
// Low-precision" (arXiv 2407.08608), sec. 3.1: warp specialization. A work item is one (query
// tile of 128 rows, qo head) of one request. The grid is persistent: one CTA per SM runs work
// items, heavy ones first, taken from an atomic counter until none is left (head_dim 256: one
// CTA per item). 3 warpgroups per CTA:
// - warpgroup 0, the producer (setmaxnreg down), loads an item's Q (TMA; two Q buffers at
//   head_dim 64 and 128, so the next item's Q is in place before the consumers start it) and then
//   its K/V tiles of kBN keys into shared-memory rings (kStagesK / kStagesV deep), running ahead
//   into the next item while the consumers finish one. Ragged KV: one warp issues a TMA
//   load per 64 columns of a tile (tensor maps encoded per call by the FFI handler); only the
//   tile crossing kv_len is gathered with cp.async and zero-fill. Paged KV (any page_size and
//   layout): 128 threads gather rows with cp.async through the page table (16 bytes per thread
//   and row chunk), published by cp.async.mbarrier.arrive (the producer never waits for its
//   copies, only for free slots). K and V of a tile have their own mbarriers.
// - warpgroups 1 and 2, the consumers (setmaxnreg up), own 64 query rows each: S = Q K^T with
//   wgmma from 128-byte-swizzled shared memory (SS), online softmax in registers (base 2, scale
//   folded into one FFMA, lazy rescaling of O), P converted to 16 bits in registers and O += P V
//   with wgmma taking P from registers (RS) and V as an MN-major operand (no transpose), then
//   they release the slot. The two consumer warpgroups take turns issuing their GEMMs
//   (ping-pong, paper sec. 3.1), and inside a warpgroup the softmax of tile i overlaps P V of
//   tile i - 1 (paper sec. 3.2). The pipeline does not drain between work items: the turn that
//   issues an item's last P V also issues the next item's first Q K^T, and O is written while
//   it runs. With two Q buffers, O goes out through the finished item's Q buffer and one TMA
//   store per warpgroup.
// Fully masked KV tiles are skipped (causal, window); only tiles crossing a mask edge run the
// mask pass.
//
// Measured on an H100 (benchmarks/RESULTS.md, seventh session, runs 33-34), where the kernel
// runs at the card's 700 W power cap: prefill_causal 543-579 TFLOP/s in jaxinfer-bench (median
// 560; 1.02-1.06x cuDNN in the same runs), 565-579 in benchmarks/ffi_gpu.py; there non-causal
// 632 (0.96x cuDNN), head_dim 64 383, head_dim 256 663, paged KV (cp.async producer) 364-378.
//
// Semantics follow shared/DESIGN.md sec. 2-3, as csrc/fa2_kernel.cuh: bottom-right causal /
// window masks, soft cap c*tanh(x/c), GQA (qo head h reads kv head h / group_size), lse base 2,
// a row with no visible key gives o = 0 and lse = -inf.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ffi_params.cuh"

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

namespace jaxinfer {
namespace fa3 {

namespace GMMA = cute::SM90::GMMA;

// Everything the kernel reads (ffi_params.cuh), and the tensor maps (TMA descriptors, encoded on
// the host per call) of q [nnz_q, Hq, D], for ragged KV of k and v [nnz_kv, Hkv, D], and with two
// Q buffers of o [nnz_q, Hq, D] (written in boxes of 64 rows, one per consumer warpgroup), as 3-d
// tensors (D, heads, rows) in boxes of 64 columns (128 bytes, the swizzle width) x 1 head x a
// tile of rows, 128-byte swizzled.
struct Params : ForwardParams {
  CUtensorMap tma_q, tma_k, tma_v, tma_o;
  int num_tiles;       // entries of tile_batch / tile_qstart, the planned tiles first, then padding
  int* work_counter;   // work items handed out past the grid's first ones; zero at launch
};

// Keys per KV tile and depths of the K and V rings per head_dim (overridable with -D for tuning
// runs). V gets the deeper ring where it fits: a V slot is freed one iteration later than a K slot (after
// P V, not Q K^T). Shared memory: the Q buffers of 128 x D plus the K and V tiles of kBN x D,
// 16-bit: D=64 144 KiB, D=128 192 KiB, D=256 192 KiB (of 227). kBN=128 at D=256 would not fit
// two stages; at D=128 a third V stage does not fit beside two Q buffers (it measured within
// noise with one Q buffer: H100 run 21).
#ifndef JAXINFER_FA3_BN_D64
#define JAXINFER_FA3_BN_D64 128
#endif
#ifndef JAXINFER_FA3_KSTAGES_D64
#define JAXINFER_FA3_KSTAGES_D64 3
#endif
#ifndef JAXINFER_FA3_VSTAGES_D64
#define JAXINFER_FA3_VSTAGES_D64 4
#endif
#ifndef JAXINFER_FA3_BN_D128
#define JAXINFER_FA3_BN_D128 128
#endif
#ifndef JAXINFER_FA3_KSTAGES_D128
#define JAXINFER_FA3_KSTAGES_D128 2
#endif
#ifndef JAXINFER_FA3_VSTAGES_D128
#define JAXINFER_FA3_VSTAGES_D128 2
#endif
#ifndef JAXINFER_FA3_BN_D256
#define JAXINFER_FA3_BN_D256 64
#endif
#ifndef JAXINFER_FA3_KSTAGES_D256
#define JAXINFER_FA3_KSTAGES_D256 2
#endif
#ifndef JAXINFER_FA3_VSTAGES_D256
#define JAXINFER_FA3_VSTAGES_D256 2
#endif
// Q buffers: with 2, the producer loads the Q of the next work item while the consumers still run
// the current one, so an item never starts by waiting for its Q (ncu, H100 run 21: 1.4 % of the
// consumers' samples waited for it), and the consumers stage O in the finished item's buffer for
// a TMA store; with 1, the next Q loads after the current item's last Q K^T and O is stored from
// registers. Persistent grids only (one item per CTA needs one).
#ifndef JAXINFER_FA3_QSTAGES_D64
#define JAXINFER_FA3_QSTAGES_D64 2
#endif
#ifndef JAXINFER_FA3_QSTAGES_D128
#define JAXINFER_FA3_QSTAGES_D128 2
#endif
#ifndef JAXINFER_FA3_QSTAGES_D256
#define JAXINFER_FA3_QSTAGES_D256 1
#endif
// Whether the grid is persistent (one CTA per SM running work items until none is left) or one
// CTA per work item. D=256's consumers spill in the work-item loop (ptxas -v), so they run one
// item per CTA.
#ifndef JAXINFER_FA3_PERSISTENT_D64
#define JAXINFER_FA3_PERSISTENT_D64 1
#endif
#ifndef JAXINFER_FA3_PERSISTENT_D128
#define JAXINFER_FA3_PERSISTENT_D128 1
#endif
#ifndef JAXINFER_FA3_PERSISTENT_D256
#define JAXINFER_FA3_PERSISTENT_D256 0
#endif
// Registers per thread of the producer and the consumers after setmaxnreg (ptxas allocates each
// role's code within its count), multiples of 8. setmaxnreg moves registers within the CTA's
// launch allocation, 168 per thread (__launch_bounds__(384, 1)), so 128 * producer + 256 *
// consumer <= 384 * 168; above it setmaxnreg.inc waits forever (the hang of H100 run 15). Ragged
// KV, then paged KV (whose producer is 128 threads). D=64 and paged D=128: the fewest producer
// registers with no spill in either role (ptxas -v). Ragged D=128: 232 consumer registers, with
// which ptxas waits for P V after the first row's max instead of before it (with 224 it reuses
// P's registers for the max); the producer warp spills 12 bytes, stored and loaded once per work
// item. H100 run 33, interleaved: prefill_causal 570-579 TFLOP/s against 539-564 (ffi_gpu.py);
// paged KV measured 1-2 % slower with it, so it keeps 56/224. D=256: the split that spills least
// (8 to 12 bytes).
#ifndef JAXINFER_FA3_PRODUCER_REGS_D64
#define JAXINFER_FA3_PRODUCER_REGS_D64 56
#endif
#ifndef JAXINFER_FA3_CONSUMER_REGS_D64
#define JAXINFER_FA3_CONSUMER_REGS_D64 224
#endif
#ifndef JAXINFER_FA3_PRODUCER_REGS_D128
#define JAXINFER_FA3_PRODUCER_REGS_D128 40
#endif
#ifndef JAXINFER_FA3_CONSUMER_REGS_D128
#define JAXINFER_FA3_CONSUMER_REGS_D128 232
#endif
#ifndef JAXINFER_FA3_PRODUCER_REGS_D256
#define JAXINFER_FA3_PRODUCER_REGS_D256 24
#endif
#ifndef JAXINFER_FA3_CONSUMER_REGS_D256
#define JAXINFER_FA3_CONSUMER_REGS_D256 240
#endif
#ifndef JAXINFER_FA3_PAGED_PRODUCER_REGS_D64
#define JAXINFER_FA3_PAGED_PRODUCER_REGS_D64 56
#endif
#ifndef JAXINFER_FA3_PAGED_CONSUMER_REGS_D64
#define JAXINFER_FA3_PAGED_CONSUMER_REGS_D64 224
#endif
#ifndef JAXINFER_FA3_PAGED_PRODUCER_REGS_D128
#define JAXINFER_FA3_PAGED_PRODUCER_REGS_D128 56
#endif
#ifndef JAXINFER_FA3_PAGED_CONSUMER_REGS_D128
#define JAXINFER_FA3_PAGED_CONSUMER_REGS_D128 224
#endif
#ifndef JAXINFER_FA3_PAGED_PRODUCER_REGS_D256
#define JAXINFER_FA3_PAGED_PRODUCER_REGS_D256 24
#endif
#ifndef JAXINFER_FA3_PAGED_CONSUMER_REGS_D256
#define JAXINFER_FA3_PAGED_CONSUMER_REGS_D256 240
#endif

constexpr int kThreads = 384;
constexpr int kLaunchRegs = 168;  // 65536 / kThreads, rounded down to a multiple of 8
template <int D> struct Shape;
#define JAXINFER_FA3_SHAPE(D)                                                                      \
  template <> struct Shape<D> {                                                                   \
    static constexpr int kBN = JAXINFER_FA3_BN_D##D, kStagesQ = JAXINFER_FA3_QSTAGES_D##D,         \
                         kStagesK = JAXINFER_FA3_KSTAGES_D##D, kStagesV = JAXINFER_FA3_VSTAGES_D##D;   \
    /* [paged]: ragged KV, paged KV */                                                           \
    static constexpr int kProducerRegs[2] = {JAXINFER_FA3_PRODUCER_REGS_D##D,                      \
                                             JAXINFER_FA3_PAGED_PRODUCER_REGS_D##D},               \
                         kConsumerRegs[2] = {JAXINFER_FA3_CONSUMER_REGS_D##D,                      \
                                             JAXINFER_FA3_PAGED_CONSUMER_REGS_D##D};               \
    static constexpr bool kPersistent = JAXINFER_FA3_PERSISTENT_D##D;                              \
    static constexpr bool kLateConvert = D != 256; /* see the software pipeline in consumer() */   \
    static_assert(128 * kProducerRegs[0] + 256 * kConsumerRegs[0] <= kThreads * kLaunchRegs &&    \
                      128 * kProducerRegs[1] + 256 * kConsumerRegs[1] <= kThreads * kLaunchRegs,    \
                  "setmaxnreg would ask for more registers than the CTA holds");                   \
    static_assert(kStagesQ == 1 || (kStagesQ == 2 && kPersistent), "1 Q buffer, or 2 when persistent"); \
  };
JAXINFER_FA3_SHAPE(64)
JAXINFER_FA3_SHAPE(128)
JAXINFER_FA3_SHAPE(256)
#undef JAXINFER_FA3_SHAPE

constexpr int kBM = 128;  // query rows per CTA: 2 consumer warpgroups x 64

// Shared-memory layouts and tensor-core ops of one (dtype, head_dim). Q and K are K-major
// (head_dim contiguous) with the 128-byte swizzle; V is stored as loaded (key rows, head_dim
// contiguous), which is the MN-major B operand of O += P V for 16-bit types.
template <typename T, int D> struct Config {
  static constexpr int kBN = Shape<D>::kBN, kStagesQ = Shape<D>::kStagesQ, kStagesK = Shape<D>::kStagesK,
                       kStagesV = Shape<D>::kStagesV;
  using LayoutQ = decltype(cute::tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                               cute::Shape<cute::Int<kBM>, cute::Int<D>, cute::Int<kStagesQ>>{}));
  using LayoutK = decltype(cute::tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                               cute::Shape<cute::Int<kBN>, cute::Int<D>, cute::Int<kStagesK>>{}));
  // Keys before head_dim blocks: each 64-column block of a V tile is kBN rows of 128 bytes, the
  // box a TMA load writes (the same bytes as K's layout, read as the transposed operand).
  using LayoutVt = decltype(cute::tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{},
                                                cute::Shape<cute::Int<D>, cute::Int<kBN>, cute::Int<kStagesV>>{},
                                                cute::Step<cute::_2, cute::_1, cute::_3>{}));
  using MmaQK = decltype(cute::make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, cute::Shape<cute::_64, cute::Int<kBN>, cute::Int<D>>>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using MmaPV = decltype(cute::make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, cute::Shape<cute::_64, cute::Int<D>, cute::Int<kBN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  static constexpr int kQElems = kBM * D, kKElems = kBN * D * kStagesK, kVElems = kBN * D * kStagesV;
  static constexpr int kNumBarriers = 2 * (kStagesQ + kStagesK + kStagesV);  // Barriers<...>::kCount
  static constexpr int kOffsetTables = 3;   // the paged producer's row-offset tables
  static constexpr int kHandoffBytes = 64 * (kStagesQ + 2) + 16;  // sizeof(Handoff), checked in the kernel
  // Tiles (1 KiB-aligned for the 128-byte swizzle: 1 KiB of slack, the dynamic base is only
  // guaranteed 16-byte alignment), then the mbarriers, then the row-offset tables (int64 per
  // KV row), then the work hand-off.
  static constexpr int kSmemBytes = 1024 + 2 * (kQElems * kStagesQ + kKElems + kVElems) + 8 * kNumBarriers +
                                    8 * kOffsetTables * kBN + kHandoffBytes;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the sm_90 limit");
};

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<cutlass::bfloat16_t>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<cutlass::half_t>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 2^x on the SFU; -inf gives 0.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 16-byte global -> shared copy; pred = false writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(const void* src, void* dst, bool pred) {
  const uint32_t d = cute::cast_smem_ptr_to_uint(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(pred ? 16 : 0));
}

// One arrival on the mbarrier once every cp.async this thread issued so far has landed; the thread
// does not wait (the barrier's count includes this arrival: .noinc). Waiting for the copies and
// fencing them in the producer before arriving measured 300.6 against 365.6 TFLOP/s causal on the
// H100 (benchmarks/NOTES-ffi.md); the consumers fence after the barrier instead.
__device__ __forceinline__ void cp_async_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(cute::cast_smem_ptr_to_uint(bar))
               : "memory");
}

// Address of element `coords` of a tile laid out by a GMMA smem layout (Swizzle o Layout). CuTe
// applies the swizzle to the byte address, not to the element index; tiles start 1 KiB-aligned,
// so applying it to the byte offset from the tile base is the same.
template <class Layout, typename T, class... Cs>
__device__ __forceinline__ T* smem_at(T* base, Cs... coords) {
  const int byte = int(Layout{}.layout_b()(coords...)) * int(sizeof(T));
  return reinterpret_cast<T*>(reinterpret_cast<char*>(base) + Layout{}.layout_a()(byte));
}

// Offset (elements) of token t of a request's paged KV, head 0 (the page id is looked up per key).
__device__ __forceinline__ int64_t paged_row_offset(const Params& p, int64_t kv_start, int t) {
  const int slot_idx = p.page_shift >= 0 ? t >> p.page_shift : t / p.page_size;
  const int in_page = t - slot_idx * p.page_size;
  const int page = __ldg(p.kv_indices + kv_start + slot_idx);
  return int64_t(page) * p.kv_page_stride + int64_t(in_page) * p.kv_tok_stride;
}

// The accumulator of a 64xN wgmma, ((2, 2, N/8), M, N'), regrouped as the A operand of the next
// wgmma, ((2, 2, 2), M, (N/16, N')): the register order of both is (column pair, row + 8,
// column + 8) per k16 slice, so P needs no shuffle between the two GEMMs.
template <class L> __device__ __forceinline__ auto acc_to_a_layout(L acc) {
  using X = cute::Underscore;
  auto l = cute::logical_divide(cute::get<0>(acc), cute::Shape<X, X, cute::_2>{});
  return cute::make_layout(cute::make_layout(cute::get<0>(l), cute::get<1>(l), cute::get<2, 0>(l)), cute::get<1>(acc),
                           cute::make_layout(cute::get<2, 1>(l), cute::get<2>(acc)));
}

// One warpgroup GEMM over all k slices of a, c = a b when `zero`, else c += a b (the wgmma's
// scale-d predicate); returns after the issue.
template <class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_gemm(Mma& mma, TA const& a, TB const& b, TC& c, bool zero) {
  cute::warpgroup_fence_operand(c);
  cute::warpgroup_arrive();
  mma.accumulate_ = zero ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < cute::size<2>(a); ++k) {
    cute::gemm(mma, a(cute::_, cute::_, k), b(cute::_, cute::_, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  cute::warpgroup_commit_batch();
  cute::warpgroup_fence_operand(c);
}

// What the two roles agree on: the request's geometry and the KV tile range of a work item.
struct TileWork {
  int q_start, qo_len, kv_len, qs, rows_valid, delta, qpos_min, qpos_max, t_first, num_kv_tiles;
  int64_t kv_start;
};

template <int kBN> __device__ __forceinline__ TileWork tile_work(const Params& p, int batch, int tile) {
  TileWork w;
  w.q_start = p.qo_indptr[batch];
  w.qo_len = p.qo_indptr[batch + 1] - w.q_start;
  w.kv_len = p.kv_lens[batch];
  w.kv_start = p.kv_indptr[batch];
  w.qs = p.tile_qstart[tile];
  w.rows_valid = min(kBM, w.qo_len - w.qs);
  w.delta = w.kv_len - w.qo_len;  // q_pos = row + delta
  w.qpos_min = w.qs + w.delta;
  w.qpos_max = w.qs + w.rows_valid - 1 + w.delta;
  int n_hi = w.kv_len;
  if (p.causal) n_hi = min(n_hi, w.qpos_max + 1);
  const int n_lo = p.window_left >= 0 ? max(0, w.qpos_min - p.window_left) : 0;
  w.t_first = (n_lo / kBN) * kBN;
  w.num_kv_tiles = n_hi > w.t_first ? (n_hi - w.t_first + kBN - 1) / kBN : 0;
  return w;
}

// One work item, a (query tile, qo head), as the producer hands it to the consumers; head < 0:
// no work is left.
struct WorkItem {
  TileWork w;
  int head;
};

// The hand-off in shared memory: item j in slot j % kSlots, written by the producer as soon as it
// has it and published by the Q barrier of item j; the consumers read it there while they run
// the item. With kStagesQ Q buffers the producer writes item j only after the consumers released
// Q of item j - 1 - kStagesQ, so after all of them finished item j - 2 - kStagesQ, the slot's
// previous user (kSlots = kStagesQ + 2). And the paged producer's broadcast of its next item
// index, by item parity (its threads are at most one item apart).
template <int kStagesQ> struct Handoff {
  static constexpr int kSlots = kStagesQ + 2;
  WorkItem item[kSlots];
  int next[2];
};

// Planned tiles: tile_batch holds them first, then the padding (-1) of a fixed plan capacity.
__device__ __forceinline__ int planned_tiles(const Params& p) {
  int lo = 0, hi = p.num_tiles;
  if (hi == 0 || p.tile_batch[hi - 1] >= 0) return hi;
  while (lo < hi) {  // first padding tile
    const int mid = (lo + hi) / 2;
    if (p.tile_batch[mid] < 0) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Heads per group of the work order (work_tile_head).
#ifndef JAXINFER_FA3_HEAD_GROUP
#define JAXINFER_FA3_HEAD_GROUP 1
#endif

// Item `item` of the first `tiles` tiles x all qo heads; head = -1 past the last. A padding tile
// among them (not the planner's order, but allowed) is an item with no rows and no KV tiles.
template <int kBN> __device__ __forceinline__ WorkItem work_item(const Params& p, int item, int tiles) {
  WorkItem it{};
  it.head = -1;
  if (item < tiles * p.num_qo_heads) {
    int tile;
    work_tile_head(item, tiles, p.num_qo_heads, JAXINFER_FA3_HEAD_GROUP, tile, it.head);
    const int batch = p.tile_batch[tile];
    if (batch >= 0) it.w = tile_work<kBN>(p, batch, tile);
  }
  return it;
}

// The CTA's mbarriers: per Q buffer, Q loaded (one arrival, with the TMA byte count when the item
// has KV tiles) and Q free (8 arrivals: one per consumer warp after its last Q K^T, or, where a
// warpgroup stages O in the buffer, 4 from the thread whose TMA store has read it); per ring slot, K loaded /
// V loaded (paged: 128 producer arrivals, one per thread, when its copies land; ragged: one
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

// TMA store of one box from shared memory to the tensor map's tensor (coordinates: column, head,
// row), in the thread's current bulk group.
__device__ __forceinline__ void tma_store(const CUtensorMap& map, const void* src, int col, int head, int row) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n"
               ::"l"(reinterpret_cast<uint64_t>(&map)), "r"(cute::cast_smem_ptr_to_uint(src)), "r"(col), "r"(head),
               "r"(row)
               : "memory");
}

// Rows [row, row + kRows) x D of one head into a tile of the layouts above (D / 64 boxes, each a
// contiguous block of kRows x 128 bytes); one thread arrives for all of it with the byte count.
template <int kRows, int D, typename T>
__device__ __forceinline__ void tma_tile(const CUtensorMap& map, uint64_t* bar, T* dst, int head, int row) {
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bar, kRows * D * sizeof(T));
  CUTE_UNROLL
  for (int c = 0; c < D / 64; ++c) tma_load(map, bar, dst + c * kRows * 64, c * 64, head, row);
}

// Ragged KV producer, one warp. A full tile is D / 64 TMA loads issued by lane 0 (FA3 paper sec.
// 3.1: the producer costs the consumers almost no issue slots). The tile crossing kv_len goes
// through cp.async with zero-fill instead: the rows past the request (the next request's keys, or
// padding that may hold anything) must not reach P V, where 0 * NaN would poison O. It is one tile
// per work item at most, so its copies are awaited before the (single) arrival. kw / vw: where
// the next K / V tile goes; q_step (the item's Q) runs after the first K load.
template <typename T, int D, class QStep>
__device__ __forceinline__ void producer_ragged(const Params& p, const WorkItem& it,
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
    // The previous tile of the slot has been read by every consumer warp.
    Bar::wait(kV ? bars.v_empty(slot) : bars.k_empty(slot), pos.phase ^ 1);
    pos.advance();
    const int t0 = w.t_first + i * kBN;
    if (t0 + kBN <= w.kv_len) {
      if (lane == 0) tma_tile<kBN, D>(kV ? p.tma_v : p.tma_k, full, (kV ? sV : sK) + slot * kBN * D, kv_head,
                                      int(w.kv_start) + t0);
      return;
    }
    const T* src = static_cast<const T*>(kV ? p.v : p.k) + kv_head * p.kv_head_stride;
    for (int idx = lane; idx < kBN * D / 8; idx += 32) {
      const int r = idx / (D / 8), col = idx % (D / 8) * 8;
      const bool ok = t0 + r < w.kv_len;
      T* dst = kV ? smem_at<typename C::LayoutVt>(sV, col, r, slot) : smem_at<typename C::LayoutK>(sK, r, col, slot);
      cp_async_16(ok ? src + (w.kv_start + t0 + r) * p.kv_tok_stride + col : src, dst, ok);
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
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

// Paged KV producer: rows of a tile are split over the 128 threads, kThreadsPerRow threads per row (16
// bytes each, coalesced), kRowStep rows apart. kRowStep is a multiple of 8, the period of the
// 128-byte swizzle, so a thread's shared-memory addresses in a tile are its first row's address
// plus multiples of one compile-time stride.
template <int D> struct ProducerMap {
  static constexpr int kThreadsPerRow = D / 8 < 16 ? D / 8 : 16;
  static constexpr int kChunks = D / 8 / kThreadsPerRow;  // 16-byte chunks per thread and row
  static constexpr int kRowStep = 128 / kThreadsPerRow;
  static constexpr int kColStep = 8 * kThreadsPerRow;     // elements between a thread's chunks
  static_assert(kRowStep % 8 == 0, "rows of one thread must share their swizzle phase");
};

template <typename T, int D, class QStep>
__device__ __forceinline__ void producer_paged(const Params& p, const WorkItem& it,
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
      for (int c = 0; c < M::kChunks; ++c) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst[c] + slot_base + j * row_bytes),
                     "l"(off >= 0 ? src + off + c * kColStep : src), "r"(off >= 0 ? 16 : 0));
      }
    }
  };
  // Offsets (elements, head 0, column col0 excluded) of a tile's rows, one row per thread, in
  // one of three tables: a row's page lookup happens once per tile, not once per chunk. -1
  // marks rows past kv_len, which read zeros (P is 0 there, but 0 * NaN garbage would still
  // poison O). Iteration i writes the table of tile i + 1 and reads those of tiles i + 1 (K) and
  // i (V); with one barrier per iteration no thread is more than one iteration ahead, so three
  // tables never collide. table_pos: the table of the item's first tile (the CTA's tiles take
  // the tables in turn, across work items too).
  auto table = [&](int t) { return row_offsets + t * kBN; };
  auto next_table = [](int t) { return t == C::kOffsetTables - 1 ? 0 : t + 1; };
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
  if constexpr (C::kStagesQ > 1) q_step();  // as in producer_ragged
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
struct Scheduler {
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
// runs ahead), and the epilogue runs while that Q K^T does. Without it the tensor cores waited at
// every item for the epilogue and then for the first tile's softmax (H100 run 21, ncu: per-item
// work took about 11 % of the consumers' samples). H100, interleaved against the previous kernel
// (runs 28-30): +2 % on batches of short requests (64 x 512 and 16 x 1024 causal, paged 64 x 512;
// 8 of 9 pairs faster), no measurable change on prefill_causal (4 x 4096).
template <typename T, int D, bool kPaged>
__device__ __forceinline__ void consumers(const Params& p, const Handoff<Config<T, D>::kStagesQ>* handoff,
                                          const Scheduler& sched, T* sQ, T* sK, T* sV, BarriersOf<T, D> bars) {
  using namespace cute;
  using C = Config<T, D>;
  using HandoffT = Handoff<C::kStagesQ>;
  using Bar = cutlass::arch::ClusterBarrier;
  constexpr int kBN = C::kBN;
  constexpr float kNegInf = -INFINITY;
  const int ctid = threadIdx.x - 128;  // 0..255; warpgroup 0 owns rows 0-63, warpgroup 1 rows 64-127
  const int lane = ctid % 32;
  const int wg = ctid / 128;
  const int row0 = (ctid / 32) * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
  const int col0 = 2 * (lane % 4);               // its columns: col0, col0 + 1 of every 8

  typename C::MmaQK mma_qk;
  typename C::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(ctid);
  auto thr_pv = mma_pv.get_thread_slice(ctid);
  Tensor tSrQ = thr_qk.partition_fragment_A(make_tensor(make_smem_ptr(sQ), typename C::LayoutQ{}));
  Tensor tSrK = thr_qk.partition_fragment_B(make_tensor(make_smem_ptr(sK), typename C::LayoutK{}));
  Tensor tOrV = thr_pv.partition_fragment_B(make_tensor(make_smem_ptr(sV), typename C::LayoutVt{}));
  // Accumulator register i of S (and of O, with D for kBN) holds column col0 + (i & 1) + 8 * (i / 4)
  // of row row0 + 8 * ((i / 2) & 1): the value order of the wgmma 64xN accumulator.
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
  // Whether tile i of item w came through cp.async: paged KV, or (ragged) the tile crossing
  // kv_len, only ever an item's last (producer_ragged).
  auto copied = [&](const TileWork& w, int i) { return kPaged || w.t_first + (i + 1) * kBN > w.kv_len; };
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
      // from its first term, not from -inf / 0 (which ptxas cannot fold: 16 instructions a tile).
      float mx4[4];
      CUTE_UNROLL
      for (int nb = 0; nb < kBN / 8; ++nb) {
        const float pair = fmaxf(tSrS(4 * nb + 2 * hr), tSrS(4 * nb + 2 * hr + 1));
        mx4[nb % 4] = nb < 4 ? pair : fmaxf(mx4[nb % 4], pair);
      }
      float mx = fmaxf(fmaxf(mx4[0], mx4[1]), fmaxf(mx4[2], mx4[3]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
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
  // H100, interleaved in one run (runs 18a, 19): late is faster at head_dim 64 (358-361 TFLOP/s
  // against 323-325) and 128 (causal 537-555 against 509-546), early at 256 (602-635 against
  // 576-607).
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
    wait_loaded(bars.k_full(kr.slot), kr.phase, decltype(general)::value ? copied(w, i) : kPaged);
    wait_loaded(bars.v_full(vr.slot), vr.phase, kPaged);
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

  // The epilogue's operands, gathered before the wait for the last P V so that their latency
  // hides behind it (H100 run 21, ncu: the row-sum shuffles, and the item's fields read behind the
  // output stores, took about 5 % of the consumers' samples when done after it): 1 / l and lse of
  // both rows, and where the rows go. l >= 1 for a row with a visible key (its max contributes
  // 2^0 or more), so the fast reciprocal is exact enough.
  float inv_l[2], lse_row[2];
  int rows_valid;
  int64_t tok0;
  auto prepare_epilogue = [&](const TileWork& w) {
    float l[2] = {row_sum[0], row_sum[1]};
    CUTE_UNROLL
    for (int m = 1; m <= 2; m *= 2) {
      CUTE_UNROLL
      for (int hr = 0; hr < 2; ++hr) l[hr] += __shfl_xor_sync(0xffffffff, l[hr], m);
    }
    CUTE_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      inv_l[hr] = l[hr] > 0.f ? __fdividef(1.f, l[hr]) : 0.f;
      lse_row[hr] = l[hr] > 0.f ? row_max[hr] + __log2f(l[hr]) : kNegInf;
    }
    rows_valid = w.rows_valid;
    tok0 = int64_t(w.q_start) + w.qs;
  };
  // o = O / l and lse of the item's rows. stage_o: this warpgroup's 64 rows go into the item's Q
  // buffer in the TMA box's layout (64-column blocks of 128-byte swizzled rows; conflict-free, a
  // warp's 8 rows hit 8 different 16-byte chunks), then one thread stores the box and releases the
  // buffer once the store has read it. Only with two Q buffers (the buffer is free once the item's
  // last Q K^T completed) and when all 64 rows are the request's (a box past them would overwrite
  // the next request's rows); else O is stored from registers.
  auto epilogue = [&](int head, int q_buffer, bool stage_o) {
    auto o_pair = [&](int hr, int db) {  // O of this thread's columns col0 + 8 db (+1) in row half hr
      return pack2<T>(tOrO(4 * db + 2 * hr) * inv_l[hr], tOrO(4 * db + 2 * hr + 1) * inv_l[hr]);
    };
    if (stage_o) {
      // The 128-byte swizzle puts 16-byte chunk c of row r at chunk c ^ (r % 8) of the row (the
      // buffer is 1 KiB-aligned); this thread's rows share r % 8, so one XOR with a constant per
      // chunk gives every address (smem_at per element kept 32 addresses live across the loop).
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
  };

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
      prepare_epilogue(w);
      epilogue(it.head, qb, false);
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
    // tile (that branch took about 3 % of the consumers' samples, ncu, run 21).
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
    prepare_epilogue(w);
    finish_pv(Int<Shape<D>::kPersistent ? 1 : 0>{}, true);
    epilogue(it.head, qb, stage_o);
    started = next != nullptr;
    if constexpr (Shape<D>::kPersistent) warpgroup_wait<0>();
    if (next) first_tile(next->w, plain_tiles<kBN>(p, next->w));
    if constexpr (!Shape<D>::kPersistent) break;
  }
}

// Persistent: the grid has at most one CTA per SM, and each CTA runs work items until none is
// left (FA3 paper sec. 3.1; its causal scheduler also hands tiles out dynamically). The first item
// of CTA c is item c, each later one comes from an atomic counter, in the order of
// work_tile_head; the producer fetches the next index at the start of an item, so the atomic's
// latency hides behind the item's loads. Across items the producer runs ahead: K of the next
// item's first tile, then its Q once the consumers released Q (after their last Q K^T), load
// while the consumers finish the last P V and write O.
template <typename T, int D, bool kPaged>
__global__ void __launch_bounds__(kThreads, 1) fa3_forward_kernel(const __grid_constant__ Params p) {
  using C = Config<T, D>;
  using Bar = cutlass::arch::ClusterBarrier;
  extern __shared__ unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* sK = sQ + C::kQElems * C::kStagesQ;
  T* sV = sK + C::kKElems;
  const BarriersOf<T, D> bars{reinterpret_cast<uint64_t*>(sV + C::kVElems)};
  int64_t* row_offsets = reinterpret_cast<int64_t*>(bars.base + C::kNumBarriers);
  using HandoffT = Handoff<C::kStagesQ>;
  HandoffT* handoff = reinterpret_cast<HandoffT*>(row_offsets + C::kOffsetTables * C::kBN);
  static_assert(sizeof(HandoffT) <= C::kHandoffBytes, "Handoff outgrew its shared-memory slot");
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(&p.tma_q);
    if constexpr (C::kStagesQ > 1) cute::prefetch_tma_descriptor(&p.tma_o);
    if constexpr (!kPaged) {
      cute::prefetch_tma_descriptor(&p.tma_k);
      cute::prefetch_tma_descriptor(&p.tma_v);
    }
    bars.init(kPaged ? 128 : 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<Shape<D>::kProducerRegs[kPaged]>();
    if (!kPaged && threadIdx.x >= 32) return;  // ragged KV: one producer warp
    const int tiles = planned_tiles(p);
    int item = blockIdx.x, table_pos = 0;
    RingPos<C::kStagesK> kw;
    RingPos<C::kStagesV> vw;
    for (int j = 0;; ++j) {
      const WorkItem it = work_item<C::kBN>(p, item, tiles);
      int next = 0;
      if (threadIdx.x == 0) {
        handoff->item[j % HandoffT::kSlots] = it;
        if (Shape<D>::kPersistent && it.head >= 0) next = gridDim.x + atomicAdd(p.work_counter, 1);
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
      } else if constexpr (kPaged) {
        producer_paged<T, D>(p, it, kw, vw, table_pos, q_step, sK, sV, row_offsets, bars);
      } else {
        producer_ragged<T, D>(p, it, kw, vw, q_step, sK, sV, bars);
      }
      if (it.head < 0 || !Shape<D>::kPersistent) break;
      if constexpr (kPaged) {
        if (threadIdx.x == 0) handoff->next[j & 1] = next;
        asm volatile("bar.sync 3, 128;\n" ::: "memory");
        item = handoff->next[j & 1];
      } else {
        item = __shfl_sync(0xffffffff, next, 0);
      }
    }
    // Keep the thread alive until its copies landed (a CTA must not exit with copies in flight).
    if constexpr (kPaged) asm volatile("cp.async.wait_all;\n" ::: "memory");
  } else {
    cutlass::arch::warpgroup_reg_alloc<Shape<D>::kConsumerRegs[kPaged]>();
    const Scheduler sched{int(threadIdx.x - 128) / 128};
    if (sched.wg == 1) sched.pass_turn();  // warpgroup 0 issues first
    consumers<T, D, kPaged>(p, handoff, sched, sQ, sK, sV, bars);
    if (sched.wg == 0) sched.wait_turn();  // matches warpgroup 1's pass after its last turn
    // The last TMA stores of O are complete before the CTA exits (their threads waited only for
    // the reads of shared memory).
    if (C::kStagesQ > 1 && threadIdx.x % 128 == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }
}

// Rows [qo_indptr[num_batch], num_rows) belong to no request (q may be longer than the batch):
// they get o = 0 and lse = -inf so the output is fully defined.
template <typename T>
__global__ void fill_tail_kernel(T* o, float* lse, const int32_t* qo_indptr, int num_batch, int64_t num_rows,
                                 int64_t row_elems, int num_qo_heads) {
  const int64_t first = qo_indptr[num_batch];
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = first * row_elems + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < num_rows * row_elems;
       i += stride)
    o[i] = T(0.f);
  for (int64_t i = first * num_qo_heads + blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
       i < num_rows * num_qo_heads; i += stride)
    lse[i] = -INFINITY;
}

}  // namespace fa3
}  // namespace jaxinfer
