// The output rows that belong to no request.
#pragma once

#include <cmath>
#include <cstdint>

namespace jaxinfer {

// Rows [qo_indptr[num_batch], num_rows) belong to no request (q may be longer than the batch):
// they get o = 0 and lse = -inf so the output is fully defined. The body of each family's tail
// kernel (fa2_fill_tail_kernel, fa3::fill_tail_kernel), a grid-stride loop.
template <typename T>
__device__ __forceinline__ void fill_tail(T* o, float* lse, const int32_t* qo_indptr, int num_batch, int64_t num_rows,
                                          int64_t row_elems, int num_qo_heads) {
  const int64_t first = qo_indptr[num_batch];
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = first * row_elems + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < num_rows * row_elems;
       i += stride)
    o[i] = T(0.f);
  for (int64_t i = first * num_qo_heads + blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
       i < num_rows * num_qo_heads; i += stride)
    lse[i] = -INFINITY;
}

}  // namespace jaxinfer
