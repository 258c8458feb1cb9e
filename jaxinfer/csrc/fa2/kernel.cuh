// FlashAttention-2 forward for ragged queries over ragged or paged (BSR) KV, sm80+.
//
// Method: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
// Partitioning" (arXiv 2307.08691), sec. 3: one CTA per (query tile, qo head), KV streamed in
// tiles through a kStages-deep shared-memory ring filled by cp.async (one barrier per tile),
// S = Q K^T and O += P V on mma.sync m16n8k16 tensor cores (CuTe's SM80 MMA, ldmatrix and
// cp.async atoms), online softmax in base 2 (ex2) with the division by the row sum deferred to
// the end. Each warp owns 16*kMT query rows.
//
// What the inner loop keeps out (benchmarks/decisions/ffi.md): no per-row branch, division or
// 64-bit multiply for K/V addresses (the KV mode is a template parameter, ragged rows advance a
// pointer, page ids are loaded a tile ahead, only a partial tile has predicates); no swizzled
// ldmatrix address per (row block, chunk) held in registers (SwzRows); no rescaling of O on a
// tile that does not raise a row max by more than 2^8 (lazy rescaling); no mask and no soft cap
// code on a tile that needs none (one straight-line instantiation of the tile per case), and no
// work at all for a warp whose rows see none of the tile. CTAs run heavy query tiles first
// (work_tile_head).
//
// Semantics follow shared/DESIGN.md sec. 2-3: bottom-right causal / window masks, soft cap
// c*tanh(x/c), GQA (qo head h reads kv head h / group_size), lse base 2, a row with no visible
// key gives o = 0 and lse = -inf; with attention sinks (Params::sinks) the epilogue joins the
// head's sink to each row's denominator (common/math.cuh, join_sink): the lse includes it, and
// a row with no visible key gives o = 0, lse = the sink in base 2.
//
// Shared with fa3 (csrc/common/): the parameters and the work order, the SFU math, pack2 and the
// quad reductions, cp.async, the KV addressing and the tail fill.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../common/cp_async.cuh"
#include "../common/ffi_params.cuh"
#include "../common/kv_addressing.cuh"
#include "../common/math.cuh"
#include "../common/tail_fill.cuh"
#include "../common/work_order.cuh"

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

namespace jaxinfer {

// Everything the kernel reads (common/ffi_params.cuh) and whether KV is paged.
struct Fa2Params : ForwardParams {
  bool paged;
};

// Tile shapes per head_dim: kMT m16 tiles per warp, kWarps warps, kBN keys per KV tile.
// Each field is overridable at build time (-DJAXINFER_FA2_BN_D128=64, ...) for tuning runs;
// 16 * kMT * kWarps must stay BLOCK_M of jaxinfer/backends/ffi/backend.py. kMinBlocks is the CTAs per SM
// the register allocation must allow (__launch_bounds__); kStages is the depth of the K/V
// shared-memory ring (tiles loaded ahead = kStages - 1). Defaults: the fastest of the variants
// timed (benchmarks/decisions/ffi.md).
#ifndef JAXINFER_FA2_MT_D64
#define JAXINFER_FA2_MT_D64 2
#endif
#ifndef JAXINFER_FA2_WARPS_D64
#define JAXINFER_FA2_WARPS_D64 4
#endif
#ifndef JAXINFER_FA2_BN_D64
#define JAXINFER_FA2_BN_D64 64
#endif
#ifndef JAXINFER_FA2_MINB_D64
#define JAXINFER_FA2_MINB_D64 2
#endif
#ifndef JAXINFER_FA2_STAGES_D64
#define JAXINFER_FA2_STAGES_D64 2
#endif
#ifndef JAXINFER_FA2_MT_D128
#define JAXINFER_FA2_MT_D128 2
#endif
#ifndef JAXINFER_FA2_WARPS_D128
#define JAXINFER_FA2_WARPS_D128 4
#endif
#ifndef JAXINFER_FA2_BN_D128
#define JAXINFER_FA2_BN_D128 64
#endif
#ifndef JAXINFER_FA2_MINB_D128
#define JAXINFER_FA2_MINB_D128 2
#endif
#ifndef JAXINFER_FA2_STAGES_D128
#define JAXINFER_FA2_STAGES_D128 2
#endif
#ifndef JAXINFER_FA2_MT_D256
#define JAXINFER_FA2_MT_D256 1
#endif
#ifndef JAXINFER_FA2_WARPS_D256
#define JAXINFER_FA2_WARPS_D256 4
#endif
#ifndef JAXINFER_FA2_BN_D256
#define JAXINFER_FA2_BN_D256 32
#endif
#ifndef JAXINFER_FA2_MINB_D256
#define JAXINFER_FA2_MINB_D256 2
#endif
#ifndef JAXINFER_FA2_STAGES_D256
#define JAXINFER_FA2_STAGES_D256 2
#endif
template <int D> struct Fa2Traits;
#define JAXINFER_FA2_TRAITS(D)                                                                     \
  template <> struct Fa2Traits<D> {                                                               \
    static constexpr int kMT = JAXINFER_FA2_MT_D##D, kWarps = JAXINFER_FA2_WARPS_D##D,             \
                         kBN = JAXINFER_FA2_BN_D##D, kMinBlocks = JAXINFER_FA2_MINB_D##D;          \
    static constexpr int kStages = JAXINFER_FA2_STAGES_D##D;                                      \
  };
JAXINFER_FA2_TRAITS(64)
JAXINFER_FA2_TRAITS(128)
JAXINFER_FA2_TRAITS(256)
#undef JAXINFER_FA2_TRAITS

template <int D> constexpr int fa2_block_m() { return 16 * Fa2Traits<D>::kMT * Fa2Traits<D>::kWarps; }

template <int D> constexpr int fa2_smem_bytes() {
  return (fa2_block_m<D>() + 2 * Fa2Traits<D>::kStages * Fa2Traits<D>::kBN) * D * 2;
}

template <typename T> struct MmaAtom;
template <> struct MmaAtom<__nv_bfloat16> { using type = cute::SM80_16x8x16_F32BF16BF16F32_TN; };
template <> struct MmaAtom<__half> { using type = cute::SM80_16x8x16_F32F16F16F32_TN; };

// Shared-memory rows of D elements in 16-byte chunks, chunk index XOR (row % 8): the 8 rows an
// ldmatrix phase reads (or a cp.async phase writes) then hit 8 different bank groups.
template <int D> __device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3);
}

// One thread's ldmatrix offsets split so that the loop adds only immediates: for compile-time
// R % 8 == 0 and even C, swz(R + rr, 8 * (C + cc)) = base[(C & 7) / 2] + R * D + 8 * (C & ~7),
// because (C + cc) ^ (rr & 7) only changes the low 3 bits of the chunk index. Without the split
// the compiler keeps one swizzled address per (row block, chunk) live across the KV loop: tens of
// registers, and the spills that come with them.
template <int D> struct SwzRows {
  int base[4];
  __device__ __forceinline__ SwzRows(int rr, int cc) {
#pragma unroll
    for (int m = 0; m < 4; ++m) base[m] = rr * D + ((((2 * m) | cc) ^ (rr & 7)) << 3);
  }
  __device__ __forceinline__ int at(int R, int C) const { return base[(C & 7) / 2] + R * D + ((C & ~7) << 3); }
};

// Pairwise reduction of N values (N a power of 2, x is overwritten): log2(N) dependent steps
// instead of N, so a row's max and sum do not serialise the softmax on FMNMX/FADD latency.
template <int N, typename Op> __device__ __forceinline__ float tree_reduce(float (&x)[N], Op op) {
  static_assert((N & (N - 1)) == 0, "tree_reduce needs a power of 2");
#pragma unroll
  for (int w = N / 2; w >= 1; w /= 2)
#pragma unroll
    for (int i = 0; i < w; ++i) x[i] = op(x[i], x[i + w]);
  return x[0];
}

// One CTA per (tile, qo head) in a 1-D grid of num_tiles * num_heads CTAs, in the order of
// work_tile_head (common/work_order.cuh); the hardware starts CTAs in index order. Heads go in
// groups of 8: faster than the tile-major order (groups of 1) and than all heads in one group
// (benchmarks/decisions/ffi.md).
constexpr int kHeadGroup = 8;

template <typename T, int D, int kMode>
__global__ void __launch_bounds__(32 * Fa2Traits<D>::kWarps, Fa2Traits<D>::kMinBlocks) fa2_forward_kernel(const Fa2Params p) {
  using Tr = Fa2Traits<D>;
  using Mma = typename MmaAtom<T>::type;
  using True = std::true_type;
  using False = std::false_type;
  constexpr int kMT = Tr::kMT, kBN = Tr::kBN, kWarps = Tr::kWarps, kStages = Tr::kStages;
  static_assert(kStages >= 2, "the KV ring needs at least two stages");
  constexpr int kThreads = 32 * kWarps;
  constexpr int kBM = fa2_block_m<D>();
  constexpr int kNT = kBN / 8;  // n8 tiles of S
  constexpr int kDT = D / 8;    // n8 tiles of O
  constexpr float kNegInf = -INFINITY;
  // Lazy rescaling threshold, log2 units (faster than rescaling O on every tile).
  constexpr float kRescaleThreshold = 8.f;

  int tile, head;
  work_tile_head(blockIdx.x, gridDim.x / p.num_qo_heads, p.num_qo_heads, kHeadGroup, tile, head);
  const int batch = p.tile_batch[tile];
  if (batch < 0) return;
  const int kv_head = head / p.group_size;
  const int q_start = p.qo_indptr[batch];
  const int qo_len = p.qo_indptr[batch + 1] - q_start;
  const int64_t kv_start = p.kv_indptr[batch];
  const int qs = p.tile_qstart[tile];
  const int rows_valid = rows_inside(p, q_start + qs, min(kBM, qo_len - qs));
  const int delta = p.kv_lens[batch] - qo_len;  // q_pos = row + delta
  const int kv_len = keys_inside(p, kv_start, p.kv_lens[batch]);
  const int qpos_min = qs + delta;
  const int qpos_max = qs + rows_valid - 1 + delta;

  // KV range any row of this tile can see.
  int n_hi = kv_len;
  if (p.causal) n_hi = min(n_hi, qpos_max + 1);
  int n_lo = 0;
  if (p.window_left >= 0) n_lo = max(0, qpos_min - p.window_left);
  const int t_first = (n_lo / kBN) * kBN;
  const int num_kv_tiles = n_hi > t_first ? (n_hi - t_first + kBN - 1) / kBN : 0;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * D;             // kStages K tiles
  T* sV = sK + kStages * kBN * D;  // kStages V tiles

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const T* q = static_cast<const T*>(p.q);

  {
    constexpr int kChunks = D / 8;
    const int ch = tid % kChunks;
#pragma unroll
    for (int r = tid / kChunks; r < kBM; r += kThreads / kChunks) {
      const bool ok = r < rows_valid;
      const T* src = ok ? q + (q_start + qs + r) * p.q_tok_stride + head * p.q_head_stride + ch * 8 : q;
      cp_async_16<L2Prefetch::k128B>(src, sQ + swz<D>(r, ch * 8), ok);
    }
  }
  // KV ring of kStages (K, V) tile pairs: tile i lives in slot i % kStages; one cp.async group
  // per tile (K and V of a tile in separate groups, V waited for only before P V, gained nothing
  // measurable); Q joins tile 0's group; kStages - 1 tiles in flight ahead of the one computed.
  // Each thread copies 16-byte chunk ld_ch of rows ld_row + j * kRowStep of every tile, of K and
  // of V alike (same layout, same row offsets); paged rows take their page ids from `pages`,
  // loaded one tile ahead. Rows past kv_len read zeros (never garbage: P is 0 there, but
  // 0 * NaN would still poison O); so do all rows of the tiles past the last (their groups keep
  // the wait counts exact), which read no global memory.
  constexpr int kChunks = D / 8, kRowStep = kThreads / kChunks, kRowsPerThread = kBN / kRowStep;
  static_assert(kThreads % kChunks == 0 && kBN % kRowStep == 0, "a KV tile must split evenly over the threads");
  const int ld_row = tid / kChunks, ld_ch = tid % kChunks;
  // This thread's chunk of K and V at token 0 of the request (ragged) or of page 0 (paged).
  const int64_t kv_base =
      (kMode == kKvRagged ? kv_start * p.kv_tok_stride : 0) + kv_head * p.kv_head_stride + ld_ch * 8;
  const T* k_base = static_cast<const T*>(p.k) + kv_base;
  const T* v_base = static_cast<const T*>(p.v) + kv_base;
  int pages[kRowsPerThread];
  auto fetch_pages = [&](int i) {
    if constexpr (kMode != kKvRagged) {
#pragma unroll
      for (int j = 0; j < kRowsPerThread; ++j) {
        const int t = t_first + i * kBN + ld_row + j * kRowStep;
        pages[j] = t < kv_len ? __ldg(p.kv_indices + kv_start + page_index<kMode>(p, t)) : 0;
      }
    }
  };
  // Rows of a full tile are all below kv_len, so only a partial tile pays for the predicates; a
  // row it does not read points at the start of the buffer (`any`).
  auto load_tile = [&](auto partial, const T* any, const T* base, T* ring, int i) {
    const int t0 = t_first + i * kBN;
    const int rows_left = (i < num_kv_tiles ? kv_len : 0) - t0 - ld_row;
    T* dst = ring + (i % kStages) * kBN * D;
    const T* src = base + int64_t(t0 + ld_row) * p.kv_tok_stride;  // ragged: advanced row by row
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const bool ok = !decltype(partial)::value || j * kRowStep < rows_left;
      if constexpr (kMode != kKvRagged) src = base + kv_row_offset<kMode>(p, 0, t0 + ld_row + j * kRowStep, pages[j]);
      cp_async_16<L2Prefetch::k128B>(ok ? src : any, dst + swz<D>(ld_row + j * kRowStep, ld_ch * 8), ok);
      if constexpr (kMode == kKvRagged) src += kRowStep * p.kv_tok_stride;
    }
  };
  auto load_kv = [&](const void* any, const T* base, T* ring, int i) {
    if (i < num_kv_tiles && t_first + (i + 1) * kBN <= kv_len)
      load_tile(False{}, static_cast<const T*>(any), base, ring, i);
    else
      load_tile(True{}, static_cast<const T*>(any), base, ring, i);
  };
  auto load_stage = [&](int i) {
    load_kv(p.k, k_base, sK, i);
    load_kv(p.v, v_base, sV, i);
    if (i < num_kv_tiles) fetch_pages(i + 1);
    cute::cp_async_fence();
  };
  fetch_pages(0);
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) load_stage(i);

  float o_acc[kMT][kDT][4];
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o_acc[mt][dt][e] = 0.f;
    row_max[mt][0] = row_max[mt][1] = kNegInf;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
  const int warp_row0 = warp * 16 * kMT;
  // The Q fragments' rows are the V fragments' rows shifted by warp_row0, so one SwzRows serves
  // both (four registers fewer to keep across the loop).
  const T* sQw = sQ + warp_row0 * D;
  const SwzRows<D> k_rows(lane % 8 + (lane / 16) * 8, (lane / 8) % 2);
  const SwzRows<D> qv_rows(lane % 16, lane / 16);
  // Query positions of this warp's valid rows (none when warp_rows <= 0): a KV tile is skipped by
  // the warps that see none of it, and masked only for those that see part of it.
  const int warp_rows = min(16 * kMT, rows_valid - warp_row0);
  const int wq_min = qs + warp_row0 + delta, wq_max = wq_min + warp_rows - 1;

  // One KV tile of this warp: S = Q K^T, soft cap, mask, online softmax, O += P V. A template
  // per (masked, soft cap), so the common tile is one straight block without either.
  auto tile_body = [&](auto masked, auto soft_cap, int i) {
    constexpr bool kMasked = decltype(masked)::value, kSoftCap = decltype(soft_cap)::value;
    const int t0 = t_first + i * kBN;
    const T* sKi = sK + (i % kStages) * kBN * D;
    const T* sVi = sV + (i % kStages) * kBN * D;

    float s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const T* src = sQw + qv_rows.at(mt * 16, kk * 2);
        cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(src), a[mt][0], a[mt][1], a[mt][2],
                                      a[mt][3]);
      }
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t b[4];
        const T* src = sKi + k_rows.at(np * 16, kk * 2);
        cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(src), b[0], b[1], b[2], b[3]);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float* c = s[mt][2 * np + h];
            Mma::fma(c[0], c[1], c[2], c[3], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b[2 * h], b[2 * h + 1], c[0],
                     c[1], c[2], c[3]);
          }
        }
      }
    }
    // Online softmax (base 2). Without soft cap the max is taken on raw q.k (sm_scale > 0 keeps
    // the order) and scaling folds into one FFMA per element: p = 2^(s*scale - max*scale).
    const float scale = kSoftCap ? 1.f : p.logit_scale;
    if constexpr (kSoftCap) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] = tanh_approx(s[mt][nt][e] * p.logit_scale) * p.cap_log2;
    }
    if constexpr (kMasked) {
      // Element (mt, nt, 2 * hr + e) is key t0 + 2 * t4 + c, c = 8 * nt + e, of row mt * 16 + g + 8 * hr:
      // visible for lo <= c < hi, one compile-time c against two bounds per row.
      const int c0 = t0 + 2 * t4;
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int qpos = wq_min + mt * 16 + g + hr * 8;
          const int hi = (p.causal ? min(kv_len, qpos + 1) : kv_len) - c0;
          const int lo = p.window_left >= 0 ? qpos - p.window_left - c0 : 0;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = nt * 8 + e;
              s[mt][nt][2 * hr + e] = c >= lo && c < hi ? s[mt][nt][2 * hr + e] : kNegInf;
            }
        }
    }
    float m_tile[kMT][2];
    bool grow = false;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float part[kNT];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) part[nt] = fmaxf(s[mt][nt][2 * hr], s[mt][nt][2 * hr + 1]);
        const float mx = quad_max(tree_reduce(part, [](float a, float b) { return fmaxf(a, b); }));
        m_tile[mt][hr] = mx * scale;
        grow |= m_tile[mt][hr] > row_max[mt][hr] + kRescaleThreshold;
      }
    }
    // Lazy rescaling: the running max moves (and O, l are rescaled) only when a row's tile max
    // exceeds it by more than kRescaleThreshold, for all rows of the warp at once; otherwise the
    // stale max stays, p <= 2^kRescaleThreshold, and o = O / l and lse stay exact because O and l
    // share one max. Past the first tiles the branch is almost never taken, and P V no longer
    // waits for 128 multiplies of O.
    if (__any_sync(0xffffffff, grow)) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const float m_new = fmaxf(row_max[mt][hr], m_tile[mt][hr]);
          // A row with nothing visible yet keeps max -inf; subtract 0 instead so 2^x gives 0, not NaN.
          const float rescale = exp2_approx(row_max[mt][hr] - (m_new == kNegInf ? 0.f : m_new));
          row_max[mt][hr] = m_new;
          row_sum[mt][hr] *= rescale;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            o_acc[mt][dt][2 * hr] *= rescale;
            o_acc[mt][dt][2 * hr + 1] *= rescale;
          }
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const float m_use = row_max[mt][hr] == kNegInf ? 0.f : row_max[mt][hr];
        float part[kNT];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) s[mt][nt][2 * hr + e] = exp2_approx(fmaf(s[mt][nt][2 * hr + e], scale, -m_use));
          part[nt] = s[mt][nt][2 * hr] + s[mt][nt][2 * hr + 1];
        }
        row_sum[mt][hr] += tree_reduce(part, [](float a, float b) { return a + b; });
      }
    }

#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t b[4];
        const T* src = sVi + qv_rows.at(kk * 16, dp * 2);
        cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(src), b[0], b[1], b[2], b[3]);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float* c = o_acc[mt][2 * dp + h];
            Mma::fma(c[0], c[1], c[2], c[3], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b[2 * h], b[2 * h + 1], c[0],
                     c[1], c[2], c[3]);
          }
        }
      }
    }
  };

  auto kv_loop = [&](auto soft_cap) {
    for (int i = 0; i < num_kv_tiles; ++i) {
      // Tile i is in smem for every thread, and every warp is done with tile i - 1, whose slot the
      // next load reuses.
      cute::cp_async_wait<kStages - 2>();
      __syncthreads();
      load_stage(i + kStages - 1);
      const int t0 = t_first + i * kBN;
      const bool idle = warp_rows <= 0 || (p.causal && t0 > wq_max) ||
                        (p.window_left >= 0 && t0 + kBN - 1 < wq_min - p.window_left);
      const bool need_mask = t0 + kBN > kv_len || (p.causal && t0 + kBN - 1 > wq_min) ||
                             (p.window_left >= 0 && t0 < wq_max - p.window_left);
      if (idle) continue;
      if (need_mask)
        tile_body(True{}, soft_cap, i);
      else
        tile_body(False{}, soft_cap, i);
    }
  };
  if (p.soft_cap_on)
    kv_loop(True{});
  else
    kv_loop(False{});
  // The sink of this CTA's head, read once (an L2 hit past the first CTAs) and joined to each
  // row's max and sum: a uniform branch, so the code without sinks is the same.
  const bool has_sink = p.sinks != nullptr;
  const float sink_log2 = has_sink ? __ldg(p.sinks + head) : 0.f;
  cute::cp_async_wait<0>();

  T* o = static_cast<T*>(p.o);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = quad_sum(row_sum[mt][hr]), m = row_max[mt][hr], inv;
      if (has_sink) {
        const float factor = join_sink(l, m, sink_log2);
        inv = l > 0.f ? factor * (1.f / l) : 0.f;  // one reciprocal routine for both paths
      } else {
        inv = l > 0.f ? 1.f / l : 0.f;
      }
      const int r = warp_row0 + mt * 16 + g + hr * 8;
      if (r >= rows_valid) continue;
      const int64_t tok = q_start + qs + r;
      T* dst = o + tok * p.q_tok_stride + head * p.q_head_stride + 2 * t4;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        *reinterpret_cast<uint32_t*>(dst + dt * 8) =
            pack2<T>(o_acc[mt][dt][2 * hr] * inv, o_acc[mt][dt][2 * hr + 1] * inv);
      }
      if (t4 == 0) p.lse[tok * p.num_qo_heads + head] = l > 0.f ? m + __log2f(l) : kNegInf;
    }
  }
}

// Rows [qo_indptr[num_batch], num_rows) belong to no request: o = 0, lse = -inf (fill_tail).
template <typename T>
__global__ void fa2_fill_tail_kernel(T* o, float* lse, const int32_t* qo_indptr, int num_batch, int64_t num_rows,
                                     int64_t row_elems, int num_qo_heads) {
  fill_tail(o, lse, qo_indptr, num_batch, num_rows, row_elems, num_qo_heads);
}

}  // namespace jaxinfer
