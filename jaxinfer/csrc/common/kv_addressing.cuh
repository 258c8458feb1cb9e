// Where a request's KV rows are: ragged [nnz_kv, Hkv, D] (token kv_indptr[b] + t), or paged caches
// [P, page_size, Hkv, D] (NHD) / [P, Hkv, page_size, D] (HND) through the page table kv_indices
// (shared/DESIGN.md sec. 3). Offsets in elements, of head 0 (add kv_head * kv_head_stride).
// Tested on the host against the page-table definition: csrc/tests/kv_offset_host_test.cu.
#pragma once

#include <cstdint>

#include "ffi_params.cuh"

namespace jaxinfer {

// How a request's KV rows are addressed, when it is a template parameter (fa2: the copy loop has
// no branch on it): ragged; paged with a power-of-2 page_size (shift and mask); paged otherwise.
enum KvMode : int { kKvRagged = 0, kKvPagedPow2 = 1, kKvPaged = 2 };

// Page-table slot (index into kv_indices from the request's first page) of token t.
template <int kMode> __host__ __device__ __forceinline__ int page_index(const ForwardParams& p, int t) {
  return kMode == kKvPagedPow2 ? t >> p.page_shift : t / p.page_size;
}

// The same for a page size known only at run time (page_shift < 0: not a power of 2).
__host__ __device__ __forceinline__ int page_index(const ForwardParams& p, int t) {
  return p.page_shift >= 0 ? t >> p.page_shift : t / p.page_size;
}

// A module-level run (jaxinfer.batch_prefill_ragged, ...) passes q and K/V whose row counts jit
// cannot check against the traced plan: each tile clamps its rows and keys to the arrays it was
// given, so a mismatched call never reads or writes outside them. (Page ids are clamped to the
// cache before the call: jaxinfer/backends/ffi/backend.py.)

// Rows of a query tile starting at q row `q_row0` that lie inside q (<= rows).
__host__ __device__ __forceinline__ int rows_inside(const ForwardParams& p, int64_t q_row0, int rows) {
  return int(rows < p.num_q_rows - q_row0 ? int64_t(rows) : p.num_q_rows - q_row0);
}

// Keys of a request starting at KV row `kv_start` that lie inside a ragged K/V (paged: kv_len).
__host__ __device__ __forceinline__ int keys_inside(const ForwardParams& p, int64_t kv_start, int kv_len) {
  const int64_t room = p.num_kv_tokens - kv_start;
  return int(kv_len < room ? int64_t(kv_len) : (room > 0 ? room : 0));
}

// Offset of row `in_page` of page `page` (a page id, an entry of kv_indices).
__host__ __device__ __forceinline__ int64_t page_row_offset(const ForwardParams& p, int page, int in_page) {
  return int64_t(page) * p.kv_page_stride + int64_t(in_page) * p.kv_tok_stride;
}

// Offset of token t of a request's KV; `page` is kv_indices[kv_start + page_index(t)] (paged
// modes: the caller loads it, fa2 one tile ahead so that its latency stays hidden).
template <int kMode>
__host__ __device__ __forceinline__ int64_t kv_row_offset(const ForwardParams& p, int64_t kv_start, int t, int page) {
  if constexpr (kMode == kKvRagged) {
    return (kv_start + t) * p.kv_tok_stride;
  } else {
    const int slot = kMode == kKvPagedPow2 ? t & (p.page_size - 1) : t - (t / p.page_size) * p.page_size;
    return page_row_offset(p, page, slot);
  }
}

// Offset of token t of a request's paged KV, the page id looked up here (fa3's paged producer,
// once per key and tile).
__device__ __forceinline__ int64_t paged_row_offset(const ForwardParams& p, int64_t kv_start, int t) {
  const int slot_idx = page_index(p, t);
  const int in_page = t - slot_idx * p.page_size;
  const int page = __ldg(p.kv_indices + kv_start + slot_idx);
  return page_row_offset(p, page, in_page);
}

}  // namespace jaxinfer
