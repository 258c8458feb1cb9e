// XLA FFI handler of the FlashAttention-3 forward kernel (fa3/kernel.cuh), sm90a only: custom
// call "jaxinfer_fa3_forward", operands and checks in common/ffi_forward.cuh, plus one more result: the
// work counter of the persistent grid (int32 [1], zeroed here on the stream before the launch).
// It also encodes the TMA descriptors of q, of k and v unless the gather producer loads them
// (ragged KV, or pages of a power-of-2 size of at least JAXINFER_FA3_TMA_MIN_PAGE rows), and of o
// with two Q buffers (host work, no synchronisation).
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

// A tensor map of `rank` dimensions (dims innermost first, strides in bytes of dims 1..rank-1)
// read in boxes of `box`, 128-byte swizzled; coordinates past dims read as zeros.
ffi::Error encode_tensor_map(CUtensorMap* map, const void* data, bool bf16, int rank, const cuuint64_t* dims,
                             const cuuint64_t* strides, const cuuint32_t* box) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr)
    return ffi::Error::Internal("jaxinfer_fa3_forward: the CUDA driver has no cuTensorMapEncodeTiled (driver < 12.0)");
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, rank,
                            const_cast<void*>(data), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return ffi::Error::Internal("jaxinfer_fa3_forward: cuTensorMapEncodeTiled failed with CUresult " +
                                std::to_string(int(r)));
  return ffi::Error::Success();
}

// The tensor map of a dense [rows, heads, head_dim] tensor read in boxes of 64 columns x 1 head x
// box_rows rows (fa3/config.cuh, Params).
ffi::Error encode_dense_map(CUtensorMap* map, const void* data, bool bf16, int64_t rows, int64_t heads,
                            int64_t head_dim, int box_rows) {
  if (rows == 0) return ffi::Error::Success();  // nothing is ever read through it
  const cuuint64_t dims[3] = {cuuint64_t(head_dim), cuuint64_t(heads), cuuint64_t(rows)};
  const cuuint64_t strides[2] = {cuuint64_t(head_dim * 2), cuuint64_t(heads * head_dim * 2)};
  const cuuint32_t box[3] = {64, 1, cuuint32_t(box_rows)};
  return encode_tensor_map(map, data, bf16, 3, dims, strides, box);
}

// The tensor map of a paged cache [P, page_size, Hkv, D] (NHD) or [P, Hkv, page_size, D] (HND),
// read in boxes of 64 columns x 1 head x box_rows rows of one page (Params).
ffi::Error encode_paged_map(CUtensorMap* map, const void* data, bool bf16, int64_t pages, int64_t page_size,
                            int64_t heads, int64_t head_dim, bool hnd, int box_rows) {
  if (pages == 0) return ffi::Error::Success();
  const int64_t row = head_dim * 2;  // bytes
  const cuuint64_t mid[2] = {cuuint64_t(hnd ? page_size : heads), cuuint64_t(hnd ? heads : page_size)};
  const cuuint64_t dims[4] = {cuuint64_t(head_dim), mid[0], mid[1], cuuint64_t(pages)};
  const cuuint64_t strides[3] = {cuuint64_t(row), cuuint64_t(row * mid[0]), cuuint64_t(row * page_size * heads)};
  const cuuint32_t box[4] = {64, hnd ? cuuint32_t(box_rows) : 1u, hnd ? 1u : cuuint32_t(box_rows), 1};
  return encode_tensor_map(map, data, bf16, 4, dims, strides, box);
}

// kKv: how the producer loads K/V (fa3/config.cuh, KvLoad).
template <typename T, int D, int kKv>
ffi::Error launch(cudaStream_t stream, Params& p, int num_tiles, int num_batch, int64_t num_rows, int64_t num_kv_rows,
                  int64_t num_kv_heads, bool kv_hnd) {
  using C = Config<T, D>;
  constexpr int kSmem = smem_bytes<T, D>();  // SharedStorage (fa3/smem_layout.cuh)
  constexpr bool kBf16 = std::is_same_v<T, cutlass::bfloat16_t>;
  if (ffi::Error e = encode_dense_map(&p.tma_q, p.q, kBf16, num_rows, p.num_qo_heads, D, kBM); e.failure()) return e;
  if constexpr (C::kStagesQ > 1) {  // O goes out in boxes of 64 rows, one per consumer warpgroup
    if (ffi::Error e = encode_dense_map(&p.tma_o, p.o, kBf16, num_rows, p.num_qo_heads, D, kBM / 2); e.failure())
      return e;
  }
  if constexpr (kKv != kKvGather) {
    p.kv_box_rows = kKv == kKvTmaPages ? std::min(p.page_size, C::kBN) : 0;
    p.kv_hnd = kv_hnd;
    for (auto [map, data] : {std::pair{&p.tma_k, p.k}, std::pair{&p.tma_v, p.v}}) {
      ffi::Error e = kKv == kKvTmaPages ? encode_paged_map(map, data, kBf16, num_kv_rows, p.page_size, num_kv_heads,
                                                           D, kv_hnd, p.kv_box_rows)
                                        : encode_dense_map(map, data, kBf16, num_kv_rows, num_kv_heads, D, C::kBN);
      if (e.failure()) return e;
    }
  }
  auto kernel = fa3_forward_kernel<T, D, kKv>;
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

template <typename T, int D, typename... Args>
ffi::Error dispatch_kv(int kv, Args&&... args) {
  switch (kv) {
    case kKvTmaRagged: return launch<T, D, kKvTmaRagged>(args...);
    case kKvTmaPages: return launch<T, D, kKvTmaPages>(args...);
    default: return launch<T, D, kKvGather>(args...);
  }
}

template <typename T, typename... Args>
ffi::Error dispatch(int head_dim, int kv, Args&&... args) {
  switch (head_dim) {
    case 64: return dispatch_kv<T, 64>(kv, args...);
    case 128: return dispatch_kv<T, 128>(kv, args...);
    case 256: return dispatch_kv<T, 256>(kv, args...);
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
  // Paged KV goes through TMA where its page_size is a power of 2 (page_shift set) of at least
  // JAXINFER_FA3_TMA_MIN_PAGE rows (Params::kv_box_rows).
  const bool tma_pages = p.page_shift >= 0 && p.page_size >= JAXINFER_FA3_TMA_MIN_PAGE;
  const int kv = !paged ? kKvTmaRagged : tma_pages ? kKvTmaPages : kKvGather;
  switch (q.element_type()) {
    case ffi::DataType::BF16:
      return dispatch<cutlass::bfloat16_t>(head_dim, kv, stream, p, num_tiles, num_batch, num_rows, num_kv_rows,
                                           num_kv_heads, kv_layout_hnd);
    case ffi::DataType::F16:
      return dispatch<cutlass::half_t>(head_dim, kv, stream, p, num_tiles, num_batch, num_rows, num_kv_rows,
                                       num_kv_heads, kv_layout_hnd);
    default: return ffi::Error::InvalidArgument("jaxinfer_fa3_forward: dtype must be bfloat16 or float16");
  }
}

}  // namespace
}  // namespace fa3
}  // namespace jaxinfer

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferFa3Forward, jaxinfer::fa3::Fa3ForwardImpl,
                              JAXINFER_FORWARD_BINDING.Ret<xla::ffi::Buffer<xla::ffi::S32>>() /* work counter */,
                              {xla::ffi::Traits::kCmdBufferCompatible});
