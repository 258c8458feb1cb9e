// The order in which both kernels start their work items (fa2: CTA blockIdx.x; fa3: item index
// of the persistent grid's scheduler, fa3/tile_scheduler.cuh).
#pragma once

namespace jaxinfer {

// Work item `item` of num_tiles * num_heads (query tile, qo head) items, in the order the kernels
// start them: heads in groups of `group`, and inside a group the planner's tile order (widest KV
// range first) with the group's heads varying fastest. Heavy tiles start first and the work ends
// on light ones (a short tail), while the items running at once read the K/V of only a few heads
// (L2 reuse).
__device__ __forceinline__ void work_tile_head(int item, int num_tiles, int num_heads, int group, int& tile,
                                               int& head) {
  group = min(group, num_heads);
  const int first_head = (item / (group * num_tiles)) * group;
  const int size = min(group, num_heads - first_head);
  const int rest = item - first_head * num_tiles;
  tile = rest / size;
  head = first_head + rest - tile * size;
}

}  // namespace jaxinfer
