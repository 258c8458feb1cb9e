// MLA decode/prefill kernel for sm90a: multi-head latent attention (DeepSeek-V2, arXiv 2405.04434,
// appendix C, the absorbed form) over paged latent caches, on the work tiles of the Pallas MLA plan
// (jaxinfer/backends/pallas/mla.py: 64 query rows of one head group per tile, split-KV chunks
// whose partial rows the Pallas merge kernel folds).
//
// A tile's S = Q K^T has K = Dc + Dp = 576 and O = P V has N = Dc = 512, V being the first 512
// columns of the K tile. O [64, 512] in float32 is 256 registers a thread over one warpgroup, so two
// warpgroups split its columns (FlashMLA's layout, github.com/deepseek-ai/FlashMLA, 2025): warpgroup
// 0 computes S, the online softmax and P, hands P and the rescale factors to warpgroup 1 through
// shared memory, and both run O[:, 256 w : 256 w + 256] += P V on the tensor cores. Warpgroup 1
// loads the KV tiles with cp.async (a 16-byte chunk per copy, any page size) into a ring of kStages
// slots (two by default: tile i + 1 is in flight while tile i is computed); one CTA barrier a step
// publishes a tile and frees a slot. One read of a latent tile serves the 64 rows;
// the two head groups of a 128-head model are adjacent tiles of the plan's longest-first order,
// which its LPT assignment hands to different CTAs at the same time, so the second read of each
// latent tile comes from L2.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../common/cp_async.cuh"
#include "../common/math.cuh"
#include "../common/sm90.cuh"
#include "../common/work_layout.h"

#include <cutlass/arch/barrier.h>

namespace jaxinfer {
namespace mla {

constexpr int kDc = 512, kDp = 64, kD = kDc + kDp;  // latent and RoPE widths (DeepSeek-V2/V3)
// Keys per step and depth of the latent tile ring (overridable with -D for tuning runs). Shared
// memory holds Q (64 x 576) and the ring, kStages x kBN x 576, 16-bit: 64 x 2 or 32 x 4 fill it
// (the deeper 32-key rings ran slower on an H100: benchmarks/decisions/ffi.md, "MLA kernel").
#ifndef JAXINFER_MLA_BN
#define JAXINFER_MLA_BN 64
#endif
#ifndef JAXINFER_MLA_STAGES
#define JAXINFER_MLA_STAGES 2
#endif
constexpr int kBM = 64, kBN = JAXINFER_MLA_BN, kStages = JAXINFER_MLA_STAGES;  // query rows, keys, ring slots
static_assert(kBN % 32 == 0 && kBN <= 64 && kStages >= 2, "kBN in {32, 64}, two stages or more");
constexpr int kThreads = 256;                        // two warpgroups

// Everything the kernel reads: the packed plan (jaxinfer/plan/layout.py, WorkLayout) and the
// arrays, flattened to rows: q_nope [nnz_q * H, Dc], q_pe [nnz_q * H, Dp], ckv [pages * page_size,
// Dc], kpe [pages * page_size, Dp] (row = page * page_size + slot), o [nnz_q * H, Dc] in q's dtype,
// lse [nnz_q * H] and the partial rows po [slots * 64, Dc], plse [slots * 64] in float32.
struct Params {
  const int32_t* plan;
  const void *q_nope, *q_pe, *ckv, *kpe;
  void* o;
  float *lse, *po, *plse;
  int64_t off_cta, off_kv_indices;
  int num_q_tokens;  // q_nope.shape[0] / H: rows past it are never read or written
  int num_pages;     // page ids are clamped to the caches
  int num_heads, group_size, page_size, page_shift;  // page_shift: log2(page_size), or -1
  bool causal;
  float scale_log2;  // sm_scale * log2(e)
};

template <typename T> struct Config {
  // Q and the K tiles K-major with the 128-byte swizzle, 9 column blocks of 64 (8 of ckv, 1 of
  // kpe), two K stages. V of warpgroup w is the same bytes read as the MN-major operand: columns
  // 256 w .. 256 w + 255 of a stage (fa3/config.cuh, LayoutVt).
  using LayoutQ = decltype(cute::tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                               cute::Shape<cute::Int<kBM>, cute::Int<kD>>{}));
  using LayoutK = decltype(cute::tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                               cute::Shape<cute::Int<kBN>, cute::Int<kD>, cute::Int<kStages>>{}));
  using LayoutVt1 = decltype(cute::tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{},
                                                 cute::Shape<cute::Int<kDc / 2>, cute::Int<kBN>>{},
                                                 cute::Step<cute::_2, cute::_1>{}));
  using LayoutVt = decltype(cute::composition(
      LayoutVt1{}.layout_a(), LayoutVt1{}.offset(),
      cute::append(LayoutVt1{}.layout_b(), cute::Layout<cute::Int<kStages>, cute::Int<kBN * kD>>{})));
  using MmaQK = decltype(cute::make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, cute::Shape<cute::Int<kBM>, cute::Int<kBN>, cute::Int<kD>>>()));
  using MmaPV = decltype(cute::make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, cute::Shape<cute::Int<kBM>, cute::Int<kDc / 2>, cute::Int<kBN>>,
                           GMMA::Major::K, GMMA::Major::MN>()));
};

// Shared memory, every tile 1 KiB-aligned (the swizzle's period): 225 KiB of the 227 a CTA may have.
template <typename T> struct alignas(1024) SharedStorage {
  T q[kBM * kD];
  T kv[kStages][kBN * kD];
  uint32_t p[kBM * kBN / 2];  // P as 16-bit pairs, in warpgroup 0's register order: [kBN / 4][128 threads]
  float alpha[kBM];           // per row: the step's rescale factor of O
  float row_m[kBM], row_l[kBM];  // per row: the final max and sum (l = NaN: a poisoned row)
  uint32_t bad[kBN / 32];     // keys of the step whose latent is not finite (causal steps only)
};
static_assert(sizeof(SharedStorage<cutlass::bfloat16_t>) <= 232448, "more shared memory than a CTA may have");

__device__ __forceinline__ void bar_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Named barriers: 0 the whole CTA at each step, 1 "P ready" and 2 "row statistics ready" from
// warpgroup 0 to warpgroup 1.
enum Barrier : int { kStep = 0, kPReady = 1, kRowsReady = 2 };

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) mla_kernel(const __grid_constant__ Params p) {
  using namespace cute;
  using C = Config<T>;
  extern __shared__ __align__(1024) char smem_raw[];
  SharedStorage<T>& s = *reinterpret_cast<SharedStorage<T>*>(smem_raw);
  const int tid = threadIdx.x, wg = tid / 128, wtid = tid % 128, lane = tid % 32;
  // The rows and columns a thread of either warpgroup holds of a 64-row accumulator: rows row0 and
  // row0 + 8; register i is column (i & 1) + 8 * (i / 4) + col0 of row row0 + 8 * ((i / 2) & 1).
  const int row0 = (wtid / 32) * 16 + lane / 4, col0 = 2 * (lane % 4);
  const int32_t* pages = p.plan + p.off_kv_indices;
  const T* q_nope = static_cast<const T*>(p.q_nope);
  const T* q_pe = static_cast<const T*>(p.q_pe);
  const T* ckv = static_cast<const T*>(p.ckv);
  const T* kpe = static_cast<const T*>(p.kpe);
  constexpr float kNegInf = -INFINITY;

  typename C::MmaQK mma_qk;
  typename C::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(wtid);
  auto thr_pv = mma_pv.get_thread_slice(wtid);
  Tensor tSrQ = thr_qk.partition_fragment_A(make_tensor(make_smem_ptr(s.q), typename C::LayoutQ{}));
  Tensor tSrK = thr_qk.partition_fragment_B(make_tensor(make_smem_ptr(s.kv[0]), typename C::LayoutK{}));
  Tensor tOrV = thr_pv.partition_fragment_B(
      make_tensor(make_smem_ptr(s.kv[0] + wg * kBN * kDc / 2), typename C::LayoutVt{}));
  Tensor tSrS = partition_fragment_C(mma_qk, make_shape(Int<kBM>{}, Int<kBN>{}));
  Tensor tOrO = partition_fragment_C(mma_pv, make_shape(Int<kBM>{}, Int<kDc / 2>{}));
  static_assert(size(tSrS) == kBN / 2 && size(tOrO) == kDc / 4, "unexpected accumulator shape");
  Tensor rP = make_tensor<T>(tSrS.layout());
  Tensor tOrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
  uint32_t* rp = reinterpret_cast<uint32_t*>(rP.data());

  // Copy roles: a thread copies 16-byte chunk c (8 columns) of 128-byte column blocks; Q: rows
  // r0 and r0 + 32 over all 256 threads, K: rows r0 + 16 j over warpgroup 1. Shared addresses of
  // other rows, blocks and stages are compile-time offsets (the swizzle depends on row % 8 and on
  // the chunk only).
  const int c8 = (tid % 8) * 8;
  const int q_r0 = tid / 8, k_r0 = wtid / 8;
  const uint32_t q_dst = cast_smem_ptr_to_uint(smem_at<typename C::LayoutQ>(s.q, q_r0, c8));
  const uint32_t k_dst = cast_smem_ptr_to_uint(smem_at<typename C::LayoutK>(s.kv[0], k_r0, c8, 0));
  // A 128-byte column block of Q and of a K tile, and a ring slot.
  constexpr uint32_t kQBlockBytes = kBM * 128, kKBlockBytes = kBN * 128, kStageBytes = sizeof(T) * kBN * kD;

  const int g = p.group_size;
  const int32_t* cta = p.plan + p.off_cta;
  for (int t = cta[blockIdx.x]; t < cta[blockIdx.x + 1]; ++t) {
    const int32_t* w = p.plan + int64_t(t) * kNumFields;
    const int head0 = w[kKvHead] * g, q_row0 = w[kQRow0], q_pos0 = w[kQPos0];
    const int q_len = min(w[kQLen], p.num_q_tokens - q_row0);
    const int kv_lo = w[kKvLo], kv_hi = w[kKvHi], kv_base = w[kKvBase], out_slot = w[kOutSlot];
    const int n_steps = kv_hi > kv_lo ? (kv_hi - kv_lo + kBN - 1) / kBN : 0;
    // Steps [0, full) have every key visible to every row: no mask.
    const int key_hi = p.causal ? min(kv_hi, q_pos0 + 1) : kv_hi;
    const int full = min(max(key_hi - kv_lo, 0) / kBN, n_steps);
    // Global q/o row of tile row r (-1: padding, never read or written).
    auto global_row = [&](int r) {
      const int tok = r / g;
      return tok < q_len ? (q_row0 + tok) * p.num_heads + head0 + r % g : -1;
    };

    auto load_kv = [&](int i, int stage) {
      CUTE_UNROLL
      for (int j = 0; j < kBN / 16; ++j) {
        const int pos = kv_lo + i * kBN + k_r0 + 16 * j;
        const bool ok = pos < kv_hi;
        int64_t row = 0;
        if (ok) {
          const int page_idx = p.page_shift >= 0 ? pos >> p.page_shift : pos / p.page_size;
          const int slot = p.page_shift >= 0 ? pos & (p.page_size - 1) : pos - page_idx * p.page_size;
          const int page = min(max(pages[kv_base + page_idx], 0), p.num_pages - 1);
          row = int64_t(page) * p.page_size + slot;
        }
        const uint32_t dst = k_dst + stage * kStageBytes + j * 16 * 128;
        CUTE_UNROLL
        for (int b = 0; b < kDc / 64; ++b) cp_async_16(ckv + row * kDc + b * 64 + c8, dst + b * kKBlockBytes, ok);
        cp_async_16(kpe + row * kDp + c8, dst + (kDc / 64) * kKBlockBytes, ok);
      }
    };

    // The previous tile's reads of Q, K and the row statistics are done (and its copies landed:
    // a tile without keys never waits for its Q).
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    bar_sync(kStep);
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      const int r = q_r0 + 32 * j, grow = global_row(r);
      const int64_t src = grow >= 0 ? grow : 0;
      const uint32_t dst = q_dst + j * 32 * 128;
      CUTE_UNROLL
      for (int b = 0; b < kDc / 64; ++b)
        cp_async_16(q_nope + src * kDc + b * 64 + c8, dst + b * kQBlockBytes, grow >= 0);
      cp_async_16(q_pe + src * kDp + c8, dst + (kDc / 64) * kQBlockBytes, grow >= 0);
    }
    // Copy groups: Q with tile 0, then one group per tile (empty ones too, so that every thread
    // counts the same groups); tiles 0 .. kStages - 2 go out now.
    CUTE_UNROLL
    for (int j = 0; j < kStages - 1; ++j) {
      if (wg == 1 && j < n_steps) load_kv(j, j);
      cp_async_commit();
    }

    float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.f, 0.f};
    bool poisoned[2] = {false, false};
    clear(tOrO);
    for (int i = 0, stage = 0; i < n_steps; ++i, stage = stage == kStages - 1 ? 0 : stage + 1) {
      const bool masked = i >= full;
      // Tile i (and Q) landed: each thread waits for its own copies (all but the kStages - 2
      // newest groups), then the barrier publishes them; cp.async writes through the generic
      // proxy and wgmma reads through the async one.
      asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 2) : "memory");
      cutlass::arch::fence_view_async_shared();
      bar_sync(kStep);
      // Every warp is past step i - 1: its slot takes tile i + kStages - 1.
      const int ahead = i + kStages - 1;
      if (wg == 1 && ahead < n_steps) load_kv(ahead, stage == 0 ? kStages - 1 : stage - 1);
      cp_async_commit();
      // A non-finite latent that the causal mask hides from some rows of the step must not reach
      // them through V (0 * inf): such keys are zeroed here and the rows that see one poisoned.
      // Only causal steps past `full` have keys some rows do not see.
      if (p.causal && masked) {
        if (tid < kBN / 32) s.bad[tid] = 0u;
        bar_sync(kStep);
        T* tile = s.kv[stage];
        for (int key = tid / 4; key < kBN; key += kThreads / 4) {
          bool bad = false;
          for (int col = (tid % 4) * 8; col < kD; col += 32) {
            const T* x = smem_at<typename C::LayoutK>(tile, key, col, 0);
            CUTE_UNROLL
            for (int e = 0; e < 8; ++e) bad |= !isfinite(float(x[e]));
          }
          if (bad) atomicOr(&s.bad[key / 32], 1u << (key % 32));
        }
        bar_sync(kStep);
        for (int key = tid / 4; key < kBN; key += kThreads / 4) {
          if (!(s.bad[key / 32] >> (key % 32) & 1u)) continue;
          for (int col = (tid % 4) * 8; col < kD; col += 32) {
            T* x = smem_at<typename C::LayoutK>(tile, key, col, 0);
            CUTE_UNROLL
            for (int e = 0; e < 8; ++e) x[e] = T(0.f);
          }
        }
        cutlass::arch::fence_view_async_shared();
        bar_sync(kStep);
      }

      if (wg == 0) {
        wgmma_gemm(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS, true);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tSrS);
        if (masked) {
          const int t0 = kv_lo + i * kBN + col0;
          CUTE_UNROLL
          for (int hr = 0; hr < 2; ++hr) {
            const int r = row0 + 8 * hr;
            // Keys t0 + c with c < hi are visible to row r.
            const int hi = (p.causal ? min(kv_hi, q_pos0 + r / g + 1) : kv_hi) - t0;
            CUTE_UNROLL
            for (int e = 0; e < size(tSrS); ++e) {
              if (((e / 2) & 1) != hr) continue;
              const int c = (e & 1) + 8 * (e / 4);
              if (c < hi) {
                if (p.causal) poisoned[hr] |= s.bad[(col0 + c) / 32] >> ((col0 + c) % 32) & 1u;
              } else {
                tSrS(e) = kNegInf;
              }
            }
          }
        }
        float alpha[2];
        CUTE_UNROLL
        for (int hr = 0; hr < 2; ++hr) {
          float mx = kNegInf;
          CUTE_UNROLL
          for (int nb = 0; nb < kBN / 8; ++nb) mx = fmaxf(mx, fmaxf(tSrS(4 * nb + 2 * hr), tSrS(4 * nb + 2 * hr + 1)));
          const float m_new = fmaxf(row_max[hr], quad_max(mx) * p.scale_log2);
          // A row with nothing visible yet keeps max -inf; subtract 0 so that 2^x gives 0, not NaN.
          const float m_use = m_new == kNegInf ? 0.f : m_new;
          alpha[hr] = exp2_approx(row_max[hr] - m_use);
          row_max[hr] = m_new;
          float sum = 0.f;
          CUTE_UNROLL
          for (int nb = 0; nb < kBN / 8; ++nb) {
            CUTE_UNROLL
            for (int e = 0; e < 2; ++e) {
              float& x = tSrS(4 * nb + 2 * hr + e);
              x = exp2_approx(fmaf(x, p.scale_log2, -m_use));
              sum += x;
            }
          }
          row_sum[hr] = row_sum[hr] * alpha[hr] + sum;
        }
        CUTE_UNROLL
        for (int e = 0; e < size(tSrS) / 2; ++e) {
          rp[e] = pack2<T>(tSrS(2 * e), tSrS(2 * e + 1));
          s.p[e * 128 + wtid] = rp[e];
        }
        if (lane % 4 == 0) {
          s.alpha[row0] = alpha[0];
          s.alpha[row0 + 8] = alpha[1];
        }
        bar_arrive(kPReady);
        CUTE_UNROLL
        for (int e = 0; e < size(tOrO); ++e) tOrO(e) *= alpha[(e / 2) & 1];
      } else {
        bar_sync(kPReady);
        CUTE_UNROLL
        for (int e = 0; e < size(tSrS) / 2; ++e) rp[e] = s.p[e * 128 + wtid];
        const float alpha[2] = {s.alpha[row0], s.alpha[row0 + 8]};
        CUTE_UNROLL
        for (int e = 0; e < size(tOrO); ++e) tOrO(e) *= alpha[(e / 2) & 1];
      }
      warpgroup_fence_operand(rP);
      wgmma_gemm(mma_pv, tOrP, tOrV(_, _, _, stage), tOrO, false);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
    }

    // Row statistics: warpgroup 0 holds them (a quad's partial sums), warpgroup 1 reads them.
    if (wg == 0) {
      CUTE_UNROLL
      for (int hr = 0; hr < 2; ++hr) {
        row_sum[hr] = quad_sum(row_sum[hr]);
        poisoned[hr] = quad_max(poisoned[hr] ? 1.f : 0.f) > 0.f;  // a quad's threads hold different keys
        if (lane % 4 == 0) {
          s.row_m[row0 + 8 * hr] = row_max[hr];
          s.row_l[row0 + 8 * hr] = poisoned[hr] ? NAN : row_sum[hr];
        }
      }
      bar_arrive(kRowsReady);
    } else {
      bar_sync(kRowsReady);
      CUTE_UNROLL
      for (int hr = 0; hr < 2; ++hr) {
        row_max[hr] = s.row_m[row0 + 8 * hr];
        row_sum[hr] = s.row_l[row0 + 8 * hr];
      }
    }
    // o = O / l (0 for a row with nothing visible, NaN for a poisoned one), lse = m + log2(l).
    float inv[2];
    int grow[2];
    CUTE_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      const float l = row_sum[hr];
      inv[hr] = l != l ? NAN : l > 0.f ? 1.f / l : 0.f;
      grow[hr] = global_row(row0 + 8 * hr);
      const float lse = l > 0.f || l != l ? row_max[hr] + log2f(l) : kNegInf;
      if (wg == 0 && lane % 4 == 0 && grow[hr] >= 0) {
        if (out_slot < 0) p.lse[grow[hr]] = lse;
        else p.plse[int64_t(out_slot) * kBM + row0 + 8 * hr] = lse;
      }
    }
    const int col_base = wg * (kDc / 2) + col0;
    CUTE_UNROLL
    for (int e = 0; e < size(tOrO); e += 2) {
      const int hr = (e / 2) & 1, col = col_base + 8 * (e / 4);
      if (grow[hr] < 0) continue;
      const float a = tOrO(e) * inv[hr], b = tOrO(e + 1) * inv[hr];
      if (out_slot < 0) {
        *reinterpret_cast<uint32_t*>(static_cast<T*>(p.o) + int64_t(grow[hr]) * kDc + col) = pack2<T>(a, b);
      } else {
        *reinterpret_cast<float2*>(p.po + (int64_t(out_slot) * kBM + row0 + 8 * hr) * kDc + col) = make_float2(a, b);
      }
    }
  }
}

}  // namespace mla
}  // namespace jaxinfer
