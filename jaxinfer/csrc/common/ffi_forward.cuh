// The XLA FFI surface shared by the custom calls "jaxinfer_fa2_forward" (fa2_ffi.cu) and
// "jaxinfer_fa3_forward" (fa3_ffi.cu), registered from jaxinfer/backends/ffi/ops.py:
//   args: q [nnz_q, Hq, D], k, v (ragged [nnz_kv, Hkv, D] or paged caches
//         [P, page_size, Hkv, D] (NHD) / [P, Hkv, page_size, D] (HND)), qo_indptr [B+1],
//         kv_indptr [B+1], kv_indices [nnz_pages], kv_lens [B], tile_batch [T], tile_qstart [T]
//         (int32; B and T padded by the planner: tile_batch = -1 marks padding tiles), sinks
//         (float32 [Hq]: each head's attention sink times log2(e), when has_sinks; otherwise any
//         float32 array, never read);
//   rets: o [nnz_q, Hq, D] in q's dtype, lse [nnz_q, Hq] float32 base 2;
//   attrs: causal, window_left, logits_soft_cap (0 = off), sm_scale, page_size, paged,
//          kv_layout_hnd, has_sinks.
// The sink joins each row's softmax denominator in the kernels' epilogues (math.cuh, join_sink):
// they write final rows (no split-KV), so each row counts it once. The custom call takes the
// operand in every call (a 1-element dummy without sinks, ops.py) and has_sinks says whether it
// holds them: no [Hq] array to make up, and the flag cannot be mistaken for a real [1] sink of
// a one-head model.
// Here: the checks of those operands, the kernel parameters they give (ForwardParams of
// ffi_params.cuh, which Fa2Params and fa3::Params extend), CUDA errors as ffi::Error, and the handler binding. No host
// synchronisation and no allocation, so the handlers are command-buffer (CUDA graph) safe.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "ffi_params.cuh"
#include "xla/ffi/api/ffi.h"

namespace jaxinfer {

// Sizes the handlers dispatch and launch on.
struct ForwardShape {
  int64_t num_rows, num_qo_heads, num_kv_heads, head_dim, num_kv_rows;
  int num_tiles, num_batch;
};

// The last CUDA error as an ffi::Error naming the custom call and the step, or Success.
inline xla::ffi::Error cuda_error(const char* call, const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return xla::ffi::Error::Success();
  return xla::ffi::Error::Internal(std::string(call) + ": " + what + ": " + cudaGetErrorString(err));
}

// Checks the operands of `call` and fills `p` (strides in elements, the log2-domain logit scale)
// and `s`; a failed check is an InvalidArgument error.
inline xla::ffi::Error forward_params(const char* call, xla::ffi::AnyBuffer q, xla::ffi::AnyBuffer k,
                                      xla::ffi::AnyBuffer v, xla::ffi::Buffer<xla::ffi::S32> qo_indptr,
                                      xla::ffi::Buffer<xla::ffi::S32> kv_indptr,
                                      xla::ffi::Buffer<xla::ffi::S32> kv_indices,
                                      xla::ffi::Buffer<xla::ffi::S32> kv_lens,
                                      xla::ffi::Buffer<xla::ffi::S32> tile_batch,
                                      xla::ffi::Buffer<xla::ffi::S32> tile_qstart,
                                      xla::ffi::Buffer<xla::ffi::F32> sinks, xla::ffi::AnyBuffer o,
                                      xla::ffi::Buffer<xla::ffi::F32> lse, bool causal, int32_t window_left,
                                      float logits_soft_cap, float sm_scale, int32_t page_size, bool paged,
                                      bool kv_layout_hnd, bool has_sinks, ForwardParams& p, ForwardShape& s) {
  constexpr float kLog2e = 1.4426950408889634f;
  auto invalid = [&](const char* what) { return xla::ffi::Error::InvalidArgument(std::string(call) + ": " + what); };
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 3) return invalid("q must be [nnz_q, Hq, D]");
  s.num_rows = qd[0];
  s.num_qo_heads = qd[1];
  s.head_dim = qd[2];
  if (kd.size() != (paged ? 4u : 3u)) return invalid("k/v rank does not match the paged attribute");
  s.num_kv_heads = paged ? (kv_layout_hnd ? kd[1] : kd[2]) : kd[1];
  s.num_kv_rows = kd[0];
  const int64_t d = s.head_dim, hq = s.num_qo_heads, hkv = s.num_kv_heads;
  if (kd[kd.size() - 1] != d || hkv <= 0 || hq % hkv != 0) return invalid("k/v head geometry does not match q");
  if (paged && (page_size < 1 || (kv_layout_hnd ? kd[2] : kd[1]) != page_size))
    return invalid("cache page dimension != page_size");
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type() ||
      o.element_type() != q.element_type())
    return invalid("q, k, v and o must share one dtype");
  if (has_sinks && (sinks.dimensions().size() != 1 || sinks.element_count() != size_t(hq)))
    return invalid("sinks must be float32 [Hq]");
  s.num_tiles = int(tile_batch.element_count());
  s.num_batch = int(kv_lens.element_count());

  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.o = o.untyped_data();
  p.lse = lse.typed_data();
  p.qo_indptr = qo_indptr.typed_data();
  p.kv_indptr = kv_indptr.typed_data();
  p.kv_indices = kv_indices.typed_data();
  p.kv_lens = kv_lens.typed_data();
  p.tile_batch = tile_batch.typed_data();
  p.tile_qstart = tile_qstart.typed_data();
  p.sinks = has_sinks ? sinks.typed_data() : nullptr;
  p.q_head_stride = d;
  p.q_tok_stride = hq * d;
  if (!paged) {
    p.kv_tok_stride = hkv * d;
    p.kv_head_stride = d;
    p.kv_page_stride = 0;
  } else if (kv_layout_hnd) {
    p.kv_tok_stride = d;
    p.kv_head_stride = int64_t(page_size) * d;
    p.kv_page_stride = hkv * p.kv_head_stride;
  } else {
    p.kv_tok_stride = hkv * d;
    p.kv_head_stride = d;
    p.kv_page_stride = int64_t(page_size) * p.kv_tok_stride;
  }
  p.num_qo_heads = int(hq);
  p.num_q_rows = s.num_rows;
  p.num_kv_tokens = paged ? INT64_MAX : s.num_kv_rows;
  p.group_size = int(hq / hkv);
  p.page_size = paged ? page_size : 1;
  p.page_shift = (p.page_size & (p.page_size - 1)) == 0 ? __builtin_ctz(unsigned(p.page_size)) : -1;
  p.window_left = window_left;
  p.causal = causal;
  p.soft_cap_on = logits_soft_cap > 0.f;
  p.logit_scale = p.soft_cap_on ? sm_scale / logits_soft_cap : sm_scale * kLog2e;
  p.cap_log2 = logits_soft_cap * kLog2e;
  return xla::ffi::Error::Success();
}

}  // namespace jaxinfer

// The handler binding of both custom calls (operands and attributes listed above).
#define JAXINFER_FORWARD_BINDING                                                 \
  xla::ffi::Ffi::Bind()                                                          \
      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()                             \
      .Arg<xla::ffi::AnyBuffer>()               /* q */                          \
      .Arg<xla::ffi::AnyBuffer>()               /* k */                          \
      .Arg<xla::ffi::AnyBuffer>()               /* v */                          \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   /* qo_indptr */                  \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   /* kv_indptr */                  \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   /* kv_indices */                 \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   /* kv_lens */                    \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   /* tile_batch */                 \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   /* tile_qstart */                \
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   /* sinks */                      \
      .Ret<xla::ffi::AnyBuffer>()               /* o */                          \
      .Ret<xla::ffi::Buffer<xla::ffi::F32>>()   /* lse */                        \
      .Attr<bool>("causal")                                                      \
      .Attr<int32_t>("window_left")                                              \
      .Attr<float>("logits_soft_cap")                                            \
      .Attr<float>("sm_scale")                                                   \
      .Attr<int32_t>("page_size")                                                \
      .Attr<bool>("paged")                                                       \
      .Attr<bool>("kv_layout_hnd")                                               \
      .Attr<bool>("has_sinks")
