// XLA FFI handler of the FlashAttention-2 forward kernel (fa2_kernel.cuh).
//
// Custom call "jaxinfer_fa2_forward" (registered from jaxinfer/ffi/ops.py):
//   args: q [nnz_q, Hq, D], k, v (ragged [nnz_kv, Hkv, D] or paged caches
//         [P, page_size, Hkv, D] (NHD) / [P, Hkv, page_size, D] (HND)), qo_indptr [B+1],
//         kv_indptr [B+1], kv_indices [nnz_pages], kv_lens [B], tile_batch [T], tile_qstart [T]
//         (int32; B and T padded by the planner: tile_batch = -1 marks padding tiles);
//   rets: o [nnz_q, Hq, D] in q's dtype, lse [nnz_q, Hq] float32 base 2;
//   attrs: causal, window_left, logits_soft_cap (0 = off), sm_scale, page_size, paged,
//          kv_layout_hnd.
// No host synchronisation and no allocation, so the handler is command-buffer (CUDA graph) safe.
#include <cstdint>
#include <string>

#include "fa2_kernel.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxinfer {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

ffi::Error cuda_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jaxinfer_fa2_forward: ") + what + ": " + cudaGetErrorString(err));
}

template <typename T, int D, int kMode>
ffi::Error launch(cudaStream_t stream, const Fa2Params& p, int num_tiles, int num_batch, int64_t num_rows) {
  constexpr int kSmem = fa2_smem_bytes<D>();
  auto kernel = fa2_forward_kernel<T, D, kMode>;
  // Needed above 48 KiB of dynamic shared memory; idempotent, no stream work.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) != cudaSuccess)
    return cuda_error("cudaFuncSetAttribute");
  if (num_tiles > 0 && p.num_qo_heads > 0) {
    // One CTA per (tile, qo head) in a 1-D grid, in the order of cta_tile_head.
    if (int64_t(num_tiles) * p.num_qo_heads > INT32_MAX)
      return ffi::Error::InvalidArgument("jaxinfer_fa2_forward: more than 2^31 - 1 (tile, qo head) pairs");
    kernel<<<num_tiles * p.num_qo_heads, 32 * Fa2Traits<D>::kWarps, kSmem, stream>>>(p);
    if (ffi::Error e = cuda_error("attention kernel launch"); e.failure()) return e;
  }
  if (num_rows > 0) {
    fa2_fill_tail_kernel<T><<<256, 256, 0, stream>>>(static_cast<T*>(p.o), p.lse, p.qo_indptr, num_batch, num_rows,
                                                     int64_t(p.num_qo_heads) * D, p.num_qo_heads);
    if (ffi::Error e = cuda_error("tail fill launch"); e.failure()) return e;
  }
  return ffi::Error::Success();
}

template <typename T, int D>
ffi::Error dispatch_kv_mode(cudaStream_t stream, const Fa2Params& p, int num_tiles, int num_batch, int64_t num_rows) {
  if (!p.paged) return launch<T, D, kKvRagged>(stream, p, num_tiles, num_batch, num_rows);
  if (p.page_shift >= 0) return launch<T, D, kKvPagedPow2>(stream, p, num_tiles, num_batch, num_rows);
  return launch<T, D, kKvPaged>(stream, p, num_tiles, num_batch, num_rows);
}

template <typename T>
ffi::Error dispatch_head_dim(int head_dim, cudaStream_t stream, const Fa2Params& p, int num_tiles, int num_batch,
                             int64_t num_rows) {
  switch (head_dim) {
    case 64: return dispatch_kv_mode<T, 64>(stream, p, num_tiles, num_batch, num_rows);
    case 128: return dispatch_kv_mode<T, 128>(stream, p, num_tiles, num_batch, num_rows);
    case 256: return dispatch_kv_mode<T, 256>(stream, p, num_tiles, num_batch, num_rows);
    default: return ffi::Error::InvalidArgument("jaxinfer_fa2_forward: head_dim must be 64, 128 or 256");
  }
}

ffi::Error Fa2ForwardImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::Buffer<ffi::S32> qo_indptr, ffi::Buffer<ffi::S32> kv_indptr,
                          ffi::Buffer<ffi::S32> kv_indices, ffi::Buffer<ffi::S32> kv_lens,
                          ffi::Buffer<ffi::S32> tile_batch, ffi::Buffer<ffi::S32> tile_qstart,
                          ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::Buffer<ffi::F32>> lse, bool causal,
                          int32_t window_left, float logits_soft_cap, float sm_scale, int32_t page_size, bool paged,
                          bool kv_layout_hnd) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 3) return ffi::Error::InvalidArgument("jaxinfer_fa2_forward: q must be [nnz_q, Hq, D]");
  const int64_t num_rows = qd[0], num_qo_heads = qd[1], head_dim = qd[2];
  if (kd.size() != (paged ? 4u : 3u))
    return ffi::Error::InvalidArgument("jaxinfer_fa2_forward: k/v rank does not match the paged attribute");
  const int64_t num_kv_heads = paged ? (kv_layout_hnd ? kd[1] : kd[2]) : kd[1];
  if (kd[kd.size() - 1] != head_dim || num_kv_heads <= 0 || num_qo_heads % num_kv_heads != 0)
    return ffi::Error::InvalidArgument("jaxinfer_fa2_forward: k/v head geometry does not match q");
  if (paged && (page_size < 1 || (kv_layout_hnd ? kd[2] : kd[1]) != page_size))
    return ffi::Error::InvalidArgument("jaxinfer_fa2_forward: cache page dimension != page_size");
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type() ||
      o->element_type() != q.element_type())
    return ffi::Error::InvalidArgument("jaxinfer_fa2_forward: q, k, v and o must share one dtype");

  Fa2Params p{};
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.o = o->untyped_data();
  p.lse = lse->typed_data();
  p.qo_indptr = qo_indptr.typed_data();
  p.kv_indptr = kv_indptr.typed_data();
  p.kv_indices = kv_indices.typed_data();
  p.kv_lens = kv_lens.typed_data();
  p.tile_batch = tile_batch.typed_data();
  p.tile_qstart = tile_qstart.typed_data();
  p.q_head_stride = head_dim;
  p.q_tok_stride = num_qo_heads * head_dim;
  if (!paged) {
    p.kv_tok_stride = num_kv_heads * head_dim;
    p.kv_head_stride = head_dim;
    p.kv_page_stride = 0;
  } else if (kv_layout_hnd) {
    p.kv_tok_stride = head_dim;
    p.kv_head_stride = int64_t(page_size) * head_dim;
    p.kv_page_stride = num_kv_heads * p.kv_head_stride;
  } else {
    p.kv_tok_stride = num_kv_heads * head_dim;
    p.kv_head_stride = head_dim;
    p.kv_page_stride = int64_t(page_size) * p.kv_tok_stride;
  }
  p.num_qo_heads = int(num_qo_heads);
  p.group_size = int(num_qo_heads / num_kv_heads);
  p.page_size = paged ? page_size : 1;
  p.page_shift = (p.page_size & (p.page_size - 1)) == 0 ? __builtin_ctz(unsigned(p.page_size)) : -1;
  p.window_left = window_left;
  p.paged = paged;
  p.causal = causal;
  p.soft_cap_on = logits_soft_cap > 0.f;
  p.logit_scale = p.soft_cap_on ? sm_scale / logits_soft_cap : sm_scale * kLog2e;
  p.cap_log2 = logits_soft_cap * kLog2e;

  const int num_tiles = int(tile_batch.element_count());
  const int num_batch = int(kv_lens.element_count());
  switch (q.element_type()) {
    case ffi::DataType::BF16:
      return dispatch_head_dim<__nv_bfloat16>(int(head_dim), stream, p, num_tiles, num_batch, num_rows);
    case ffi::DataType::F16:
      return dispatch_head_dim<__half>(int(head_dim), stream, p, num_tiles, num_batch, num_rows);
    default: return ffi::Error::InvalidArgument("jaxinfer_fa2_forward: dtype must be bfloat16 or float16");
  }
}

}  // namespace
}  // namespace jaxinfer

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferFa2Forward, jaxinfer::Fa2ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // qo_indptr
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_indptr
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_indices
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_batch
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_qstart
                                  .Ret<ffi::AnyBuffer>()         // o
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<bool>("causal")
                                  .Attr<int32_t>("window_left")
                                  .Attr<float>("logits_soft_cap")
                                  .Attr<float>("sm_scale")
                                  .Attr<int32_t>("page_size")
                                  .Attr<bool>("paged")
                                  .Attr<bool>("kv_layout_hnd"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
