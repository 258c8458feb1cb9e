// fa3 tile scheduler: which work items a CTA runs, and how the producer hands them to the
// consumers. A work item is one (query tile of kBM rows, qo head) of one request.
//
// Persistent grids (Shape::kPersistent): the grid has at most one CTA per SM, and each CTA runs
// work items until none is left (FA3 paper sec. 3.1; its causal scheduler also hands tiles out
// dynamically). The first item of CTA c is item c, each later one comes from an atomic counter
// (Params::work_counter), in the order of work_tile_head (common/work_order.cuh): heavy tiles
// first. The producer fetches the next index at the start of an item, so the atomic's latency
// hides behind the item's loads. Otherwise one CTA per work item.
#pragma once

#include <cstdint>

#include "../common/kv_addressing.cuh"
#include "../common/work_order.cuh"
#include "config.cuh"

namespace jaxinfer {
namespace fa3 {

// What the two roles agree on: the request's geometry and the KV tile range of a work item.
struct TileWork {
  int q_start, qo_len, kv_len, qs, rows_valid, delta, qpos_min, qpos_max, t_first, num_kv_tiles;
  int64_t kv_start;
};

template <int kBN> __device__ __forceinline__ TileWork tile_work(const Params& p, int batch, int tile) {
  TileWork w;
  w.q_start = p.qo_indptr[batch];
  w.qo_len = p.qo_indptr[batch + 1] - w.q_start;
  w.kv_start = p.kv_indptr[batch];
  w.qs = p.tile_qstart[tile];
  w.rows_valid = rows_inside(p, w.q_start + w.qs, min(kBM, w.qo_len - w.qs));
  w.delta = p.kv_lens[batch] - w.qo_len;  // q_pos = row + delta
  w.kv_len = keys_inside(p, w.kv_start, p.kv_lens[batch]);
  w.qpos_min = w.qs + w.delta;
  w.qpos_max = w.qs + w.rows_valid - 1 + w.delta;
  int n_hi = w.kv_len;
  if (p.causal) n_hi = min(n_hi, w.qpos_max + 1);
  const int n_lo = p.window_left >= 0 ? max(0, w.qpos_min - p.window_left) : 0;
  w.t_first = (n_lo / kBN) * kBN;
  w.num_kv_tiles = n_hi > w.t_first ? (n_hi - w.t_first + kBN - 1) / kBN : 0;
  return w;
}

// One work item, a (query tile, qo head), as the producer hands it to the consumers; head < 0:
// no work is left. sink_log2: the head's attention sink times log2(e) when Params::sinks is set
// (the producer's load, issued beside the item's other loads, so the consumers' epilogue reads it
// from shared memory instead of waiting for global memory); unset otherwise. The struct keeps
// its size (it fills TileWork's 8-byte alignment padding).
struct WorkItem {
  TileWork w;
  int head;
  float sink_log2;
};

// The hand-off in shared memory: item j in slot j % kSlots, written by the producer as soon as it
// has it and published by the Q barrier of item j; the consumers read it there while they run
// the item. With kStagesQ Q buffers the producer writes item j only after the consumers released
// Q of item j - 1 - kStagesQ, so after all of them finished item j - 2 - kStagesQ, the slot's
// previous user (kSlots = kStagesQ + 2). And the gather producer's broadcast of its next item
// index, by item parity (its threads are at most one item apart).
template <int kStagesQ> struct Handoff {
  static constexpr int kSlots = kStagesQ + 2;
  WorkItem item[kSlots];
  int next[2];
};

// Planned tiles: tile_batch holds them first, then the padding (-1) of a fixed plan capacity.
__device__ __forceinline__ int planned_tiles(const Params& p) {
  int lo = 0, hi = p.num_tiles;
  if (hi == 0 || p.tile_batch[hi - 1] >= 0) return hi;
  while (lo < hi) {  // first padding tile
    const int mid = (lo + hi) / 2;
    if (p.tile_batch[mid] < 0) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Heads per group of the work order (work_tile_head).
#ifndef JAXINFER_FA3_HEAD_GROUP
#define JAXINFER_FA3_HEAD_GROUP 1
#endif

// Item `item` of the first `tiles` tiles x all qo heads; head = -1 past the last. A padding tile
// among them (not the planner's order, but allowed) is an item with no rows and no KV tiles.
template <int kBN> __device__ __forceinline__ WorkItem work_item(const Params& p, int item, int tiles) {
  WorkItem it{};
  it.head = -1;
  if (item < tiles * p.num_qo_heads) {
    int tile;
    work_tile_head(item, tiles, p.num_qo_heads, JAXINFER_FA3_HEAD_GROUP, tile, it.head);
    if (p.sinks != nullptr) it.sink_log2 = __ldg(p.sinks + it.head);
    const int batch = p.tile_batch[tile];
    if (batch >= 0) it.w = tile_work<kBN>(p, batch, tile);
  }
  return it;
}

// The index of a CTA's first work item, and of each later one (persistent grids): the grid's
// first gridDim.x items are its CTAs' first ones, the counter hands out the rest.
__device__ __forceinline__ int first_work_item() { return blockIdx.x; }
__device__ __forceinline__ int claim_next_work_item(const Params& p) { return gridDim.x + atomicAdd(p.work_counter, 1); }

}  // namespace fa3
}  // namespace jaxinfer
