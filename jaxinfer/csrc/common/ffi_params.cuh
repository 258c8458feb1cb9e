// The kernel parameters the FFI handlers of fa2 and fa3 fill alike (common/ffi_forward.cuh): the
// request and tile arrays, the attention sinks, strides in elements, geometry and the logits
// pipeline's constants.
// Each kernel's Params adds its own fields (Fa2Params: paged; fa3::Params: the TMA descriptors).
#pragma once

#include <cstdint>

namespace jaxinfer {

struct ForwardParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  const int32_t* qo_indptr;   // [B+1]
  const int32_t* kv_indptr;   // [B+1], pages when paged, tokens otherwise
  const int32_t* kv_indices;  // [nnz_pages] (paged only)
  const int32_t* kv_lens;     // [B] tokens
  const int32_t* tile_batch;  // [T] request of each query tile, -1 = padding
  const int32_t* tile_qstart; // [T] first query row of the tile inside its request
  int64_t q_tok_stride, q_head_stride;
  int64_t kv_page_stride, kv_tok_stride, kv_head_stride;
  int num_qo_heads, group_size, page_size;
  // Extents of q and a ragged K/V (kv_addressing.cuh: the tiles stay inside them whatever the
  // traced plan says).
  int64_t num_q_rows;     // q.shape[0]
  int64_t num_kv_tokens;  // ragged: k.shape[0]; paged: INT64_MAX (no limit: page ids address the cache)
  int page_shift;   // log2(page_size) when a power of 2, else -1
  int window_left;  // -1: no window
  bool causal, soft_cap_on;
  float logit_scale;  // sm_scale*log2(e) without soft cap, sm_scale/c with it
  float cap_log2;     // c*log2(e) (soft cap only)
  // [Hq] attention sinks times log2(e), joined in the epilogues; nullptr: none. Last, so the
  // other fields keep their offsets in the kernels' parameter space.
  const float* sinks;
};

}  // namespace jaxinfer
