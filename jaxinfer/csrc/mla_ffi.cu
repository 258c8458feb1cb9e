// XLA FFI handler of the MLA kernel (mla/kernel.cuh), sm90a only: custom call "jaxinfer_mla_forward",
// registered from jaxinfer/backends/ffi/ops.py (mla_forward):
//   args: plan (int32, the packed plan of jaxinfer/backends/pallas/mla.py), q_nope [nnz_q, H, 512],
//         q_pe [nnz_q, H, 64], ckv [P, page_size, 512], kpe [P, page_size, 64] (one 16-bit dtype);
//   rets: o [nnz_q, H, 512] in q's dtype, lse [nnz_q, H] float32 base 2, and the split-KV partial
//         rows po [slots * 64, 512], plse [slots * 64] float32 (the Pallas merge kernel folds them);
//   attrs: num_ctas, off_cta, off_kv_indices (the plan's WorkLayout), group_size, page_size,
//          causal, sm_scale.
// Rows no work tile writes (padding past the plan's queries) get o = 0 and lse = -inf: o is zeroed
// and lse filled on the stream before the kernel. No host synchronisation, no allocation: the
// handler is command-buffer (CUDA graph) safe.
#include <cstdint>
#include <string>

#include "common/ffi_forward.cuh"
#include "mla/kernel.cuh"

namespace ffi = xla::ffi;

namespace jaxinfer {
namespace mla {
namespace {

constexpr char kCall[] = "jaxinfer_mla_forward";

__global__ void fill_kernel(float* x, int64_t n, float value) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = value;
}

template <typename T> ffi::Error launch(cudaStream_t stream, const Params& p, int num_ctas, int64_t o_bytes,
                                        int64_t rows) {
  constexpr int kSmem = int(sizeof(SharedStorage<T>));
  auto kernel = mla_kernel<T>;
  // Needed above 48 KiB of dynamic shared memory; idempotent, no stream work.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) != cudaSuccess)
    return cuda_error(kCall, "cudaFuncSetAttribute");
  if (rows > 0) {
    if (cudaMemsetAsync(p.o, 0, o_bytes, stream) != cudaSuccess) return cuda_error(kCall, "o reset");
    fill_kernel<<<int((rows + 255) / 256 < 1024 ? (rows + 255) / 256 : 1024), 256, 0, stream>>>(p.lse, rows,
                                                                                              -INFINITY);
    if (ffi::Error e = cuda_error(kCall, "lse fill launch"); e.failure()) return e;
  }
  if (num_ctas > 0 && rows > 0) {
    kernel<<<num_ctas, kThreads, kSmem, stream>>>(p);
    if (ffi::Error e = cuda_error(kCall, "MLA kernel launch"); e.failure()) return e;
  }
  return ffi::Error::Success();
}

ffi::Error MlaForwardImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> plan, ffi::AnyBuffer q_nope, ffi::AnyBuffer q_pe,
                          ffi::AnyBuffer ckv, ffi::AnyBuffer kpe, ffi::Result<ffi::AnyBuffer> o,
                          ffi::Result<ffi::Buffer<ffi::F32>> lse, ffi::Result<ffi::Buffer<ffi::F32>> po,
                          ffi::Result<ffi::Buffer<ffi::F32>> plse, int32_t num_ctas, int32_t off_cta,
                          int32_t off_kv_indices, int32_t group_size, int32_t page_size, bool causal,
                          float sm_scale) {
  auto invalid = [](const std::string& what) { return ffi::Error::InvalidArgument(std::string(kCall) + ": " + what); };
  const auto qd = q_nope.dimensions(), pd = q_pe.dimensions(), cd = ckv.dimensions(), kd = kpe.dimensions();
  if (qd.size() != 3 || qd[2] != kDc) return invalid("q_nope must be [nnz_q, H, 512]");
  if (pd.size() != 3 || pd[0] != qd[0] || pd[1] != qd[1] || pd[2] != kDp) return invalid("q_pe must be [nnz_q, H, 64]");
  if (cd.size() != 3 || cd[1] != page_size || cd[2] != kDc) return invalid("ckv must be [P, page_size, 512]");
  if (kd.size() != 3 || kd[0] != cd[0] || kd[1] != page_size || kd[2] != kDp)
    return invalid("kpe must be [P, page_size, 64] (ckv's P)");
  const auto dtype = q_nope.element_type();
  if (q_pe.element_type() != dtype || ckv.element_type() != dtype || kpe.element_type() != dtype ||
      o->element_type() != dtype)
    return invalid("q_nope, q_pe, ckv, kpe and o must share one dtype");
  const int64_t rows = qd[0] * qd[1];
  if (int64_t(o->element_count()) != rows * kDc || int64_t(lse->element_count()) != rows)
    return invalid("o must be [nnz_q, H, 512] and lse [nnz_q, H]");
  if (po->element_count() != plse->element_count() * kDc || plse->element_count() % kBM != 0)
    return invalid("po must be [slots * 64, 512] and plse [slots * 64]");
  if (group_size < 1 || qd[1] % group_size != 0 || page_size < 1 || cd[0] < 1 || num_ctas < 0 ||
      plan.element_count() < size_t(off_kv_indices) || off_cta + int64_t(num_ctas) + 1 > off_kv_indices)
    return invalid("bad plan geometry (group_size, page_size, num_ctas or the plan offsets)");
  if (rows > INT32_MAX || cd[0] * page_size > INT32_MAX) return invalid("more than 2^31 rows");
  Params p{};
  p.plan = plan.typed_data();
  p.q_nope = q_nope.untyped_data();
  p.q_pe = q_pe.untyped_data();
  p.ckv = ckv.untyped_data();
  p.kpe = kpe.untyped_data();
  p.o = o->untyped_data();
  p.lse = lse->typed_data();
  p.po = po->typed_data();
  p.plse = plse->typed_data();
  p.off_cta = off_cta;
  p.off_kv_indices = off_kv_indices;
  p.num_q_tokens = int(qd[0]);
  p.num_pages = int(cd[0]);
  p.num_heads = int(qd[1]);
  p.group_size = group_size;
  p.page_size = page_size;
  p.page_shift = (page_size & (page_size - 1)) == 0 ? __builtin_ctz(unsigned(page_size)) : -1;
  p.causal = causal;
  p.scale_log2 = sm_scale * 1.4426950408889634f;
  const int64_t o_bytes = rows * kDc * 2;
  switch (dtype) {
    case ffi::DataType::BF16: return launch<cutlass::bfloat16_t>(stream, p, num_ctas, o_bytes, rows);
    case ffi::DataType::F16: return launch<cutlass::half_t>(stream, p, num_ctas, o_bytes, rows);
    default: return invalid("dtype must be bfloat16 or float16");
  }
}

}  // namespace
}  // namespace mla
}  // namespace jaxinfer

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferMlaForward, jaxinfer::mla::MlaForwardImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // plan
                                  .Arg<xla::ffi::AnyBuffer>()              // q_nope
                                  .Arg<xla::ffi::AnyBuffer>()              // q_pe
                                  .Arg<xla::ffi::AnyBuffer>()              // ckv
                                  .Arg<xla::ffi::AnyBuffer>()              // kpe
                                  .Ret<xla::ffi::AnyBuffer>()              // o
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // lse
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // po
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // plse
                                  .Attr<int32_t>("num_ctas")
                                  .Attr<int32_t>("off_cta")
                                  .Attr<int32_t>("off_kv_indices")
                                  .Attr<int32_t>("group_size")
                                  .Attr<int32_t>("page_size")
                                  .Attr<bool>("causal")
                                  .Attr<float>("sm_scale"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
