// Hopper (sm90a) tensor-core helpers of the kernels built on wgmma (fa3/, mla/): addresses in the
// 128-byte-swizzled shared-memory layouts of GMMA operands, the accumulator of one wgmma regrouped
// as the register A operand of the next, and one warpgroup GEMM over all k slices.
#pragma once

#include <cute/tensor.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

namespace jaxinfer {

namespace GMMA = cute::SM90::GMMA;

// Address of element `coords` of a tile laid out by a GMMA smem layout (Swizzle o Layout). CuTe
// applies the swizzle to the byte address, not to the element index; tiles start 1 KiB-aligned,
// so applying it to the byte offset from the tile base is the same.
template <class Layout, typename T, class... Cs>
__device__ __forceinline__ T* smem_at(T* base, Cs... coords) {
  const int byte = int(Layout{}.layout_b()(coords...)) * int(sizeof(T));
  return reinterpret_cast<T*>(reinterpret_cast<char*>(base) + Layout{}.layout_a()(byte));
}

// The accumulator of a 64xN wgmma, ((2, 2, N/8), M, N'), regrouped as the A operand of the next
// wgmma, ((2, 2, 2), M, (N/16, N')): the register order of both is (column pair, row + 8,
// column + 8) per k16 slice, so P needs no shuffle between the two GEMMs.
template <class L> __device__ __forceinline__ auto acc_to_a_layout(L acc) {
  using X = cute::Underscore;
  auto l = cute::logical_divide(cute::get<0>(acc), cute::Shape<X, X, cute::_2>{});
  return cute::make_layout(cute::make_layout(cute::get<0>(l), cute::get<1>(l), cute::get<2, 0>(l)), cute::get<1>(acc),
                           cute::make_layout(cute::get<2, 1>(l), cute::get<2>(acc)));
}

// One warpgroup GEMM over all k slices of a, c = a b when `zero`, else c += a b (the wgmma's
// scale-d predicate); returns after the issue.
template <class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_gemm(Mma& mma, TA const& a, TB const& b, TC& c, bool zero) {
  cute::warpgroup_fence_operand(c);
  cute::warpgroup_arrive();
  mma.accumulate_ = zero ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < cute::size<2>(a); ++k) {
    cute::gemm(mma, a(cute::_, cute::_, k), b(cute::_, cute::_, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  cute::warpgroup_commit_batch();
  cute::warpgroup_fence_operand(c);
}

}  // namespace jaxinfer
