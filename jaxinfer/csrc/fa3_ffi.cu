// XLA FFI handler of the FlashAttention-3 forward kernel (fa3/kernel.cuh), sm90a only: custom
// call "jaxinfer_fa3_forward", operands and checks in common/ffi_forward.cuh, plus one more result: the
// work counter of the persistent grid (int32 [1], zeroed here on the stream before the launch).
// It also encodes the TMA descriptors of q, of k and v with ragged KV, and of o with two Q
// buffers (host work, no synchronisation).
#include <algorithm>
#include <climits>
#include <string>

#include <cudaTypedefs.h>

// XLA's header first: CuTe's SM100 MMA traits (pulled in by cute/tensor.hpp) turn
// -Wmissing-field-initializers into an error for the rest of the translation unit.
#include "common/ffi_forward.cuh"
#include "fa3/kernel.cuh"

namespace ffi = xla::ffi;

namespace jaxinfer {
namespace fa3 {
namespace {

constexpr char kCall[] = "jaxinfer_fa3_forward";

// cuTensorMapEncodeTiled from the driver, looked up once through the runtime (no -lcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// The tensor map of a dense [rows, heads, head_dim] tensor read in boxes of 64 columns x 1 head x
// box_rows rows, 128-byte swizzled (fa3/config.cuh, Params); rows past `rows` read as zeros.
ffi::Error encode_tensor_map(CUtensorMap* map, const void* data, bool bf16, int64_t rows, int64_t heads,
                             int64_t head_dim, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr)
    return ffi::Error::Internal("jaxinfer_fa3_forward: the CUDA driver has no cuTensorMapEncodeTiled (driver < 12.0)");
  if (rows == 0) return ffi::Error::Success();  // nothing is ever read through it
  const cuuint64_t dims[3] = {cuuint64_t(head_dim), cuuint64_t(heads), cuuint64_t(rows)};
  const cuuint64_t strides[2] = {cuuint64_t(head_dim * 2), cuuint64_t(heads * head_dim * 2)};  // bytes
  const cuuint32_t box[3] = {64, 1, cuuint32_t(box_rows)};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3,
                            const_cast<void*>(data), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return ffi::Error::Internal("jaxinfer_fa3_forward: cuTensorMapEncodeTiled failed with CUresult " +
                                std::to_string(int(r)));
  return ffi::Error::Success();
}

template <typename T, int D, bool kPaged>
ffi::Error launch(cudaStream_t stream, Params& p, int num_tiles, int num_batch, int64_t num_rows, int64_t num_kv_rows,
                  int64_t num_kv_heads) {
  using C = Config<T, D>;
  constexpr int kSmem = smem_bytes<T, D>();  // SharedStorage (fa3/smem_layout.cuh)
  constexpr bool kBf16 = std::is_same_v<T, cutlass::bfloat16_t>;
  if (ffi::Error e = encode_tensor_map(&p.tma_q, p.q, kBf16, num_rows, p.num_qo_heads, D, kBM); e.failure()) return e;
  if constexpr (C::kStagesQ > 1) {  // O goes out in boxes of 64 rows, one per consumer warpgroup
    if (ffi::Error e = encode_tensor_map(&p.tma_o, p.o, kBf16, num_rows, p.num_qo_heads, D, kBM / 2); e.failure())
      return e;
  }
  if constexpr (!kPaged) {
    for (auto [map, data] : {std::pair{&p.tma_k, p.k}, std::pair{&p.tma_v, p.v}})
      if (ffi::Error e = encode_tensor_map(map, data, kBf16, num_kv_rows, num_kv_heads, D, C::kBN); e.failure())
        return e;
  }
  auto kernel = fa3_forward_kernel<T, D, kPaged>;
  // Needed above 48 KiB of dynamic shared memory; idempotent, no stream work.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) != cudaSuccess)
    return cuda_error(kCall, "cudaFuncSetAttribute");
  const int64_t items = int64_t(num_tiles) * p.num_qo_heads;
  if (items > 0) {
    if (items > INT_MAX) return ffi::Error::InvalidArgument("jaxinfer_fa3_forward: more than 2^31 (tile, head) items");
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      return cuda_error(kCall, "SM count");
    const int grid = Shape<D>::kPersistent ? int(std::min<int64_t>(items, sms)) : int(items);
    p.num_tiles = num_tiles;
    if (cudaMemsetAsync(p.work_counter, 0, sizeof(int), stream) != cudaSuccess)
      return cuda_error(kCall, "work counter reset");
    kernel<<<grid, kThreads, kSmem, stream>>>(p);
    if (ffi::Error e = cuda_error(kCall, "attention kernel launch"); e.failure()) return e;
  }
  if (num_rows > 0) {
    fill_tail_kernel<T><<<256, 256, 0, stream>>>(static_cast<T*>(p.o), p.lse, p.qo_indptr, num_batch, num_rows,
                                                 int64_t(p.num_qo_heads) * D, p.num_qo_heads);
    if (ffi::Error e = cuda_error(kCall, "tail fill launch"); e.failure()) return e;
  }
  return ffi::Error::Success();
}

template <typename T, typename... Args>
ffi::Error dispatch(int head_dim, bool paged, Args&&... args) {
  switch (head_dim * 2 + int(paged)) {
    case 128: return launch<T, 64, false>(args...);
    case 129: return launch<T, 64, true>(args...);
    case 256: return launch<T, 128, false>(args...);
    case 257: return launch<T, 128, true>(args...);
    case 512: return launch<T, 256, false>(args...);
    case 513: return launch<T, 256, true>(args...);
    default: return ffi::Error::InvalidArgument("jaxinfer_fa3_forward: head_dim must be 64, 128 or 256");
  }
}

ffi::Error Fa3ForwardImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::Buffer<ffi::S32> qo_indptr, ffi::Buffer<ffi::S32> kv_indptr,
                          ffi::Buffer<ffi::S32> kv_indices, ffi::Buffer<ffi::S32> kv_lens,
                          ffi::Buffer<ffi::S32> tile_batch, ffi::Buffer<ffi::S32> tile_qstart,
                          ffi::Buffer<ffi::F32> sinks, ffi::Result<ffi::AnyBuffer> o,
                          ffi::Result<ffi::Buffer<ffi::F32>> lse, bool causal, int32_t window_left,
                          float logits_soft_cap, float sm_scale, int32_t page_size, bool paged,
                          bool kv_layout_hnd, bool has_sinks, ffi::Result<ffi::Buffer<ffi::S32>> work_counter) {
  Params p{};
  if (work_counter->element_count() != 1)
    return ffi::Error::InvalidArgument("jaxinfer_fa3_forward: the work counter must be int32 [1]");
  p.work_counter = work_counter->typed_data();
  ForwardShape sh;
  if (ffi::Error e = forward_params(kCall, q, k, v, qo_indptr, kv_indptr, kv_indices, kv_lens, tile_batch, tile_qstart,
                                    sinks, *o, *lse, causal, window_left, logits_soft_cap, sm_scale, page_size,
                                    paged, kv_layout_hnd, has_sinks, p, sh);
      e.failure())
    return e;
  const int head_dim = int(sh.head_dim), num_tiles = sh.num_tiles, num_batch = sh.num_batch;
  const int64_t num_rows = sh.num_rows, num_kv_rows = sh.num_kv_rows, num_kv_heads = sh.num_kv_heads;
  switch (q.element_type()) {
    case ffi::DataType::BF16:
      return dispatch<cutlass::bfloat16_t>(int(head_dim), paged, stream, p, num_tiles, num_batch, num_rows,
                                           num_kv_rows, num_kv_heads);
    case ffi::DataType::F16:
      return dispatch<cutlass::half_t>(int(head_dim), paged, stream, p, num_tiles, num_batch, num_rows, num_kv_rows,
                                       num_kv_heads);
    default: return ffi::Error::InvalidArgument("jaxinfer_fa3_forward: dtype must be bfloat16 or float16");
  }
}

}  // namespace
}  // namespace fa3
}  // namespace jaxinfer

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferFa3Forward, jaxinfer::fa3::Fa3ForwardImpl,
                              JAXINFER_FORWARD_BINDING.Ret<xla::ffi::Buffer<xla::ffi::S32>>() /* work counter */,
                              {xla::ffi::Traits::kCmdBufferCompatible});
