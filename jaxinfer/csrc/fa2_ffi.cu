// XLA FFI handler of the FlashAttention-2 forward kernel (fa2/kernel.cuh): custom call
// "jaxinfer_fa2_forward", operands and checks in common/ffi_forward.cuh.
#include <cstdint>

#include "common/ffi_forward.cuh"
#include "fa2/kernel.cuh"

namespace ffi = xla::ffi;

namespace jaxinfer {
namespace {

constexpr char kCall[] = "jaxinfer_fa2_forward";

template <typename T, int D, int kMode>
ffi::Error launch(cudaStream_t stream, const Fa2Params& p, int num_tiles, int num_batch, int64_t num_rows) {
  constexpr int kSmem = fa2_smem_bytes<D>();
  auto kernel = fa2_forward_kernel<T, D, kMode>;
  // Needed above 48 KiB of dynamic shared memory; idempotent, no stream work.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) != cudaSuccess)
    return cuda_error(kCall, "cudaFuncSetAttribute");
  if (num_tiles > 0 && p.num_qo_heads > 0) {
    // One CTA per (tile, qo head) in a 1-D grid, in the order of work_tile_head.
    if (int64_t(num_tiles) * p.num_qo_heads > INT32_MAX)
      return ffi::Error::InvalidArgument("jaxinfer_fa2_forward: more than 2^31 - 1 (tile, qo head) pairs");
    kernel<<<num_tiles * p.num_qo_heads, 32 * Fa2Traits<D>::kWarps, kSmem, stream>>>(p);
    if (ffi::Error e = cuda_error(kCall, "attention kernel launch"); e.failure()) return e;
  }
  if (num_rows > 0) {
    fa2_fill_tail_kernel<T><<<256, 256, 0, stream>>>(static_cast<T*>(p.o), p.lse, p.qo_indptr, num_batch, num_rows,
                                                     int64_t(p.num_qo_heads) * D, p.num_qo_heads);
    if (ffi::Error e = cuda_error(kCall, "tail fill launch"); e.failure()) return e;
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
                          ffi::Buffer<ffi::F32> sinks, ffi::Result<ffi::AnyBuffer> o,
                          ffi::Result<ffi::Buffer<ffi::F32>> lse, bool causal, int32_t window_left,
                          float logits_soft_cap, float sm_scale, int32_t page_size, bool paged,
                          bool kv_layout_hnd, bool has_sinks) {
  Fa2Params p{};
  ForwardShape sh;
  if (ffi::Error e = forward_params(kCall, q, k, v, qo_indptr, kv_indptr, kv_indices, kv_lens, tile_batch, tile_qstart,
                                    sinks, *o, *lse, causal, window_left, logits_soft_cap, sm_scale, page_size,
                                    paged, kv_layout_hnd, has_sinks, p, sh);
      e.failure())
    return e;
  p.paged = paged;
  const int head_dim = int(sh.head_dim), num_tiles = sh.num_tiles, num_batch = sh.num_batch;
  const int64_t num_rows = sh.num_rows;
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferFa2Forward, jaxinfer::Fa2ForwardImpl, JAXINFER_FORWARD_BINDING,
                              {xla::ffi::Traits::kCmdBufferCompatible});
