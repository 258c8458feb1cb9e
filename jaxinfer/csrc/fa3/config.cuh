// fa3 configuration: the kernel's parameters, the tuning knobs (tile shapes, ring depths, Q
// buffers, persistence, register split; each overridable with -D for tuning runs), and per
// (dtype, head_dim) the shared-memory layouts of the tiles and the tensor-core ops.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "../common/ffi_params.cuh"
#include "../common/sm90.cuh"

namespace jaxinfer {
namespace fa3 {

// Everything the kernel reads (common/ffi_params.cuh), and the tensor maps (TMA descriptors,
// encoded on the host per call) of q [nnz_q, Hq, D], of k and v unless a gather producer loads
// them, and with two Q buffers of o [nnz_q, Hq, D] (written in boxes of 64 rows, one per consumer
// warpgroup), each box 64 columns (128 bytes, the swizzle width) x 1 head x rows, 128-byte
// swizzled. q, o and ragged k, v [nnz_kv, Hkv, D] are 3-d tensors (D, heads, rows) in boxes of a
// tile of rows; paged caches are 4-d tensors (D, heads, page rows, pages) for NHD and (D, page
// rows, heads, pages) for HND (each dimension's stride above the previous one's, as the encoder
// asks), in boxes of kv_box_rows rows of one page.
struct Params : ForwardParams {
  CUtensorMap tma_q, tma_k, tma_v, tma_o;
  int num_tiles;       // entries of tile_batch / tile_qstart, the planned tiles first, then padding
  int* work_counter;   // work items handed out past the grid's first ones; zero at launch
  int kv_box_rows;     // kKvTmaPages: rows of a box, min(page_size, kBN)
  bool kv_hnd;         // kKvTmaPages: the cache is HND (the box's head and row coordinates swap)
};

// How the producer loads K/V tiles, a template parameter of the kernel (fa3/producer.cuh): TMA
// boxes of a tile of ragged K/V, TMA boxes of the pages of a tile, or rows gathered with cp.async
// through the page table. Each is its own instance so that one's code never costs another
// registers.
enum KvLoad : int { kKvTmaRagged = 0, kKvTmaPages = 1, kKvGather = 2 };

// Paged KV goes through TMA (kKvTmaPages), one box per page of a tile, when page_size is a power
// of 2 of at least this many rows; smaller or other pages are gathered (kKvGather). A box's rows
// fill whole 1 KiB periods of the 128-byte swizzle only from 8 rows up (8 x 128 bytes), so 8 is
// the smallest valid value.
#ifndef JAXINFER_FA3_TMA_MIN_PAGE
#define JAXINFER_FA3_TMA_MIN_PAGE 8
#endif
static_assert(JAXINFER_FA3_TMA_MIN_PAGE >= 8, "a TMA box of fewer than 8 rows breaks the 128-byte swizzle's period");

// Keys per KV tile and depths of the K and V rings per head_dim. V gets the deeper ring where it
// fits: a V slot is freed one iteration later than a K slot (after P V, not Q K^T). Shared memory
// (smem_bytes(), fa3/smem_layout.cuh): the Q buffers of 128 x D plus the K and V tiles of kBN x D,
// 16-bit: D=64 144 KiB, D=128 192 KiB, D=256 192 KiB (of 227). kBN=128 at D=256 would not fit
// two stages; at D=128 a third V stage does not fit beside two Q buffers.
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
// the current one, so an item never starts by waiting for its Q, and the consumers stage O in the
// finished item's buffer for a TMA store; with 1, the next Q loads after the current item's last
// Q K^T and O is stored from registers. Persistent grids only (one item per CTA needs one).
#ifndef JAXINFER_FA3_QSTAGES_D64
#define JAXINFER_FA3_QSTAGES_D64 2
#endif
#ifndef JAXINFER_FA3_QSTAGES_D128
#define JAXINFER_FA3_QSTAGES_D128 2
#endif
#ifndef JAXINFER_FA3_QSTAGES_D256
#define JAXINFER_FA3_QSTAGES_D256 1
#endif
// Whether the grid is persistent (one CTA per SM running work items until none is left,
// fa3/tile_scheduler.cuh) or one CTA per work item. D=256's consumers spill in the work-item loop
// (ptxas -v), so they run one item per CTA.
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
// consumer <= 384 * 168; above it setmaxnreg.inc waits forever (the kernel hangs). TMA KV (ragged,
// and paged with pages TMA loads), then gathered paged KV (whose producer is 128 threads). D=64
// and gathered D=128: the fewest producer registers with no spill in either role (ptxas -v). TMA
// D=128: 232 consumer registers, with which ptxas waits for P V after the first row's max instead
// of before it (with 224 it reuses P's registers for the max); the producer warp then spills a
// few bytes, stored and loaded once per work item. The gather producer was slower with that
// split, so it keeps 56/224. D=256: the split that spills least.
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
#ifndef JAXINFER_FA3_GATHER_PRODUCER_REGS_D64
#define JAXINFER_FA3_GATHER_PRODUCER_REGS_D64 56
#endif
#ifndef JAXINFER_FA3_GATHER_CONSUMER_REGS_D64
#define JAXINFER_FA3_GATHER_CONSUMER_REGS_D64 224
#endif
#ifndef JAXINFER_FA3_GATHER_PRODUCER_REGS_D128
#define JAXINFER_FA3_GATHER_PRODUCER_REGS_D128 56
#endif
#ifndef JAXINFER_FA3_GATHER_CONSUMER_REGS_D128
#define JAXINFER_FA3_GATHER_CONSUMER_REGS_D128 224
#endif
#ifndef JAXINFER_FA3_GATHER_PRODUCER_REGS_D256
#define JAXINFER_FA3_GATHER_PRODUCER_REGS_D256 24
#endif
#ifndef JAXINFER_FA3_GATHER_CONSUMER_REGS_D256
#define JAXINFER_FA3_GATHER_CONSUMER_REGS_D256 240
#endif

constexpr int kThreads = 384;
constexpr int kLaunchRegs = 168;  // 65536 / kThreads, rounded down to a multiple of 8
template <int D> struct Shape;
#define JAXINFER_FA3_SHAPE(D)                                                                      \
  template <> struct Shape<D> {                                                                   \
    static constexpr int kBN = JAXINFER_FA3_BN_D##D, kStagesQ = JAXINFER_FA3_QSTAGES_D##D,         \
                         kStagesK = JAXINFER_FA3_KSTAGES_D##D, kStagesV = JAXINFER_FA3_VSTAGES_D##D;   \
    /* [gather]: KV by TMA, KV by the gather producer */                                        \
    static constexpr int kProducerRegs[2] = {JAXINFER_FA3_PRODUCER_REGS_D##D,                      \
                                             JAXINFER_FA3_GATHER_PRODUCER_REGS_D##D},               \
                         kConsumerRegs[2] = {JAXINFER_FA3_CONSUMER_REGS_D##D,                      \
                                             JAXINFER_FA3_GATHER_CONSUMER_REGS_D##D};               \
    static constexpr bool kPersistent = JAXINFER_FA3_PERSISTENT_D##D;                              \
    static constexpr bool kLateConvert = D != 256; /* see the software pipeline in consumers() */  \
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
// contiguous), which is the MN-major B operand of O += P V for 16-bit types. Where the tiles sit
// in shared memory: SharedStorage (fa3/smem_layout.cuh).
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
  // Elements of one Q buffer, of the K ring and of the V ring.
  static constexpr int kQElems = kBM * D, kKElems = kBN * D * kStagesK, kVElems = kBN * D * kStagesV;
};

// What a consumer thread (ctid 0..255 of the two consumer warpgroups) holds of a 64xN wgmma
// accumulator: warpgroup 0 owns rows 0-63, warpgroup 1 rows 64-127; accumulator register i of S
// (and of O, with D for kBN) is column col0 + (i & 1) + 8 * (i / 4) of row row0 + 8 * ((i / 2) & 1).
struct ConsumerThread {
  int ctid, lane, wg;
  int row0;  // this thread's rows: row0 and row0 + 8
  int col0;  // its columns: col0, col0 + 1 of every 8
  __device__ __forceinline__ explicit ConsumerThread(int consumer_tid)
      : ctid(consumer_tid), lane(ctid % 32), wg(ctid / 128), row0((ctid / 32) * 16 + lane / 4), col0(2 * (lane % 4)) {}
};

}  // namespace fa3
}  // namespace jaxinfer
