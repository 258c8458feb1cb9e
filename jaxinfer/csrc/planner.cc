// jaxinfer's host library (plain C++17, loaded with ctypes by jaxinfer/plan/native.py): the
// planner of every kernel backend (jaxinfer/plan/planner.py's plan_work / plan_work_packed) and
// the batch checks of BatchSpec.create (jaxinfer/plan/checks.py). At B=256 their numpy forms were ~70 numpy calls whose
// fixed cost (2-3 us each on the GPU machine's host) dominated plan(); here each is one call, as
// FlashInfer's scheduler runs in C++ (FlashInfer paper, arXiv 2501.01005, sec. 3.3).
//
// The algorithm and every tie-break are plan_work's (module doc of jaxinfer/plan/planner.py), the
// buffer layout is jaxinfer/plan/layout.py's; tests keep the numpy planner (planner_ref.py) as the
// bit-for-bit oracle.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

#include "common/work_layout.h"

namespace {

using namespace jaxinfer;  // the work-row columns (common/work_layout.h)

enum Status { kOk = 0, kCapacity = 1, kBadArgument = 2 };

// The static arguments of a plan, int64 each, in the order of jaxinfer.plan.planner.PlanArgs.
// fixed_chunk > 0 splits every query tile's key range at multiples of it, whatever the batch
// (batch invariance, FlashInfer's fixed_split_size); 0 lets chunk_size pick the chunk per batch,
// by a makespan model in which a tile costs tile_startup key steps more than its keys.
struct Params {
  int64_t num_kv_heads, group_size, block_m, block_n, causal, window_left, num_ctas, split_budget, max_work_tiles,
      split_kv, min_chunk, kv_major, row_cost, fixed_chunk, tile_startup;
};
static_assert(sizeof(Params) == 15 * sizeof(int64_t), "Params is read from an int64 array");

struct Outputs {
  int32_t* work;          // [max_work_tiles, kNumFields]
  int32_t* cta_indptr;    // [num_ctas + 1]
  int32_t* merge_indptr;  // [split_budget / 2 + 1]
  int32_t* merge_dest;    // [split_budget / 2, kMergeFields]
};

// Page ids copied into the plan buffer next to the work buffers (one host-to-device copy).
struct Pages {
  const int32_t* src;  // [num_pages] or null
  int64_t num_pages;
  int32_t* dst;  // [capacity], zero-padded past num_pages; null: no page ids
  int64_t capacity;
};

// One work tile before it becomes a row: its query tile (a row of Scratch::q_tiles), KV head,
// key range and partial slot (-1: writes final rows).
struct Tile {
  int32_t q, head, lo, hi, slot;
};

int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// Scratch reused across calls of a thread (plan() runs per step; no allocation once warm).
struct Scratch {
  std::vector<int32_t> q_tiles;  // [n, kNumFields]: one row per query tile, every column but kv_head
  std::vector<int64_t> q_cost, nch, cost, sorted_cost;
  std::vector<int32_t> order, cta, cta_fill, by_row, radix_tmp;
  std::vector<uint64_t> digits;  // radix sort keys, by element
  std::vector<int32_t> histograms;  // radix sort: [passes][4][256]
  std::vector<uint32_t> blocks;  // chunk_size: key blocks of each query tile
  std::vector<int64_t> remainders;  // chunk_makespan: key blocks of each range's last chunk
  std::vector<Tile> tiles, sorted;  // split tiles in (query tile, KV head, chunk) order; all tiles sorted
  std::vector<std::pair<int64_t, int32_t>> least, least_tmp;  // (load, CTA id)
  std::vector<int64_t> bounds;
};

// The calling thread's scratch, looked up once per call: in the shared library every access to a
// thread_local may call __tls_get_addr, which the loops that use the scratch must not repeat (a
// B=256 decode plan took 12.0 us instead of 9.4 with the thread_local used directly).
__attribute__((noinline)) Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

// The message of the calling thread's last failed call (jaxinfer_error).
thread_local char last_error[256];

int fail(int code, const char* fmt, int64_t a, int64_t b) {
  std::snprintf(last_error, sizeof last_error, fmt, (long long)a, (long long)b);
  return code;
}

// One row per query tile (tokens_per_tile query tokens of one request), its key range trimmed to
// what some row of it sees (causal, sliding window; bottom-right aligned). kv_base null: 0.
void query_tiles(int32_t batch, const int32_t* qo_indptr, const int32_t* kv_lens, const int32_t* kv_base,
                 const int64_t* mask_offsets, int64_t tpt, const Params& p, std::vector<int32_t>& out) {
  int64_t n = 0;
  for (int32_t b = 0; b < batch; ++b) n += std::max<int64_t>(0, ceil_div(int64_t(qo_indptr[b + 1]) - qo_indptr[b], tpt));
  out.resize(n * kNumFields);
  int32_t* row = out.data();
  for (int32_t b = 0; b < batch; ++b) {
    const int64_t qo = int64_t(qo_indptr[b + 1]) - qo_indptr[b], kv_len = kv_lens[b];
    for (int64_t tok0 = 0; tok0 < qo; tok0 += tpt, row += kNumFields) {
      const int64_t ntok = std::min<int64_t>(tpt, qo - tok0);
      const int64_t q_pos0 = kv_len - qo + tok0;
      const int64_t hi = p.causal ? std::min(std::max<int64_t>(q_pos0 + ntok, 0), kv_len) : kv_len;
      const int64_t lo = p.window_left >= 0 ? std::min(std::max<int64_t>(q_pos0 - p.window_left, 0), hi) : 0;
      // int64 until the store: the mask offset plus tok0 * kv_len may pass 2**31 (the backend
      // refuses masks that large; the store wraps like numpy's int32 cast).
      const int64_t mask_base = mask_offsets ? mask_offsets[b] + tok0 * kv_len : 0;
      row[kKvHead] = 0;
      row[kQRow0] = int32_t(qo_indptr[b] + tok0);
      row[kQLen] = int32_t(ntok);
      row[kQPos0] = int32_t(q_pos0);
      row[kKvLo] = int32_t(lo);
      row[kKvHi] = int32_t(hi);
      row[kKvBase] = kv_base ? kv_base[b] : 0;
      row[kOutSlot] = -1;
      row[kValid] = 1;
      row[kKvLen] = int32_t(kv_len);
      row[kMaskBase] = int32_t(mask_base);
    }
  }
}

// The makespan model of the chunk choice, in key steps (block_n keys each): a work tile costs its
// steps plus tile_startup (the key pipeline's fill, the partial row's write), and a plan takes
// its mean CTA load plus kTailEighths / 8 of its most loaded CTA's excess over that mean (the
// CTAs left at the end stream faster than their share of the memory bandwidth). Fitted to the
// H100 split-factor sweep of benchmarks/decisions/pallas.md (Pallas decode, bf16 and e4m3).
constexpr int64_t kTailEighths = 3;

// The model's time (times 8 * num_ctas) of splitting key ranges of blocks[i] steps into chunks
// of k steps. The most loaded CTA is estimated by the LPT lower bound (r + 1) * t[r * num_ctas]
// over the tile costs t sorted descending (some CTA runs r + 1 of the r * num_ctas + 1 costliest
// tiles), and at least the mean. Every tile of a key range but its last costs k + tile_startup,
// the most of any; the last ones' steps are sorted into rem. 128-bit: at the limits of the int32
// arguments the products pass 2**63.
__int128 chunk_makespan(const std::vector<uint32_t>& blocks, int64_t n, int64_t k, const Params& p,
                       std::vector<int64_t>& rem) {
  int64_t tiles = 0, full = 0, steps = 0;
  rem.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t nch = std::max<int64_t>(1, (blocks[i] + k - 1) / k);
    tiles += nch;
    full += nch - 1;
    steps += blocks[i];
    rem[i] = blocks[i] - (nch - 1) * k;
  }
  std::sort(rem.begin(), rem.end(), std::greater<int64_t>());
  const int64_t hkv = p.num_kv_heads, ctas = p.num_ctas;
  tiles *= hkv;
  full *= hkv;
  const __int128 total = __int128(hkv) * steps + __int128(p.tile_startup) * tiles;
  __int128 most = 0;  // the LPT bound, times num_ctas
  for (int64_t r = 0; r * ctas < tiles; ++r) {
    const int64_t pos = r * ctas;
    const int64_t t = (pos < full ? k : rem[(pos - full) / hkv]) + p.tile_startup;
    most = std::max(most, __int128(r + 1) * t * ctas);
  }
  most = std::max(most, total);
  return (8 - kTailEighths) * total + kTailEighths * most;
}

// The chunk (multiple of block_n, >= min_chunk) of least chunk_makespan among those whose tiles
// fit split_budget, trying for the longest key range each count of chunks from 1 up (ties: fewer
// tiles); 0 when that is no split, when the unsplit tiles already fill the budget or when nothing
// is longer than the smallest chunk.
int64_t chunk_size(const std::vector<int32_t>& q_tiles, int64_t n, const Params& p, Scratch& s) {
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) longest = std::max<int64_t>(longest, q_tiles[i * kNumFields + kKvHi] - q_tiles[i * kNumFields + kKvLo]);
  const int64_t kmin = std::max<int64_t>(1, ceil_div(p.min_chunk, p.block_n));
  if (n * p.num_kv_heads >= p.split_budget || longest <= kmin * p.block_n) return 0;
  // ceil(span / (k * block_n)) == ceil(ceil(span / block_n) / k): search on block counts, each
  // below 2**31 (as k), so that the search divides in 32 bits (64-bit divisions took ~10% of a
  // B=64 split plan).
  std::vector<uint32_t>& blocks = s.blocks;
  blocks.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    blocks[i] = uint32_t(ceil_div(q_tiles[i * kNumFields + kKvHi] - q_tiles[i * kNumFields + kKvLo], p.block_n));
  }
  const auto count = [&blocks, n, &p](int64_t k) {
    const uint32_t k32 = uint32_t(k);
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += std::max<uint32_t>(1, (blocks[i] + k32 - 1) / k32);
    return total * p.num_kv_heads;
  };
  const int64_t longest_blocks = ceil_div(longest, p.block_n);
  int64_t lo = kmin, hi = std::max(kmin, longest_blocks);
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (count(mid) <= p.split_budget) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  // lo: the smallest chunk within the budget, whose count of chunks of the longest range is the most.
  int64_t best = 0, prev = 0;
  __int128 best_time = 0;
  for (int64_t m = 1, most = ceil_div(longest_blocks, lo); m <= most; ++m) {
    const int64_t k = std::max(lo, ceil_div(longest_blocks, m));
    if (k == prev) continue;
    prev = k;
    const __int128 time = chunk_makespan(blocks, n, k, p, s.remainders);
    if (!best || time < best_time) {
      best = k;
      best_time = time;
    }
  }
  return best >= longest_blocks ? 0 : best * p.block_n;
}

// Sorts v, a concatenation of ascending runs, by merging adjacent runs (bottom-up merge sort
// that starts from the runs).
template <typename T>
void merge_runs(std::vector<T>& v, std::vector<T>& tmp, std::vector<int64_t>& bounds) {
  const int64_t n = int64_t(v.size());
  bounds.assign(1, 0);
  for (int64_t i = 1; i < n; ++i) {
    if (v[i] < v[i - 1]) bounds.push_back(i);
  }
  bounds.push_back(n);
  tmp.resize(n);
  while (bounds.size() > 2) {
    size_t kept = 1;
    for (size_t j = 0; j + 1 < bounds.size(); j += 2) {
      const int64_t lo = bounds[j], mid = bounds[j + 1], hi = j + 2 < bounds.size() ? bounds[j + 2] : mid;
      std::merge(v.begin() + lo, v.begin() + mid, v.begin() + mid, v.begin() + hi, tmp.begin() + lo);
      bounds[kept++] = hi;
    }
    bounds.resize(kept);
    v.swap(tmp);
  }
}

// Sorts order, a permutation of the ids 0..n-1, stably by value(id): smallest first, or largest
// first when descending. The permutation of std::stable_sort, by an LSD radix sort of the values
// relative to their minimum (maximum), 8 bits a pass, as many passes as their range needs, every
// pass's histogram counted in one read of the keys, a pass whose digits all agree skipped: a few
// linear passes where stable_sort's merges took 5-25 us at 1-2k tiles (B=16..64 split decode
// plans, prefill's kv_major order).
template <typename Value>
void radix_sort(std::vector<int32_t>& order, bool descending, const Value& value, Scratch& s) {
  const int64_t n = int64_t(order.size());
  if (n < 2) return;
  s.digits.resize(n);
  uint64_t* key = s.digits.data();
  int64_t lo = value(0), hi = lo;
  for (int32_t id = 0; id < n; ++id) {
    const int64_t v = value(id);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    key[id] = uint64_t(v);
  }
  // Unsigned differences: exact for any two int64 values.
  const uint64_t base = uint64_t(descending ? hi : lo), range = uint64_t(hi) - uint64_t(lo);
  int passes = 0;
  while (passes < 8 && (range >> (8 * passes))) ++passes;
  // Four histograms a pass, by id % 4: equal digits in a row (a request's tiles) would otherwise
  // chain their increments through memory.
  s.histograms.assign(size_t(passes) * 4 * 256, 0);
  int32_t* count = s.histograms.data();  // [passes][4][256]
  for (int64_t id = 0; id < n; ++id) {
    key[id] = descending ? base - key[id] : key[id] - base;
    for (int p = 0; p < passes; ++p) ++count[(p * 4 + (id & 3)) * 256 + ((key[id] >> (8 * p)) & 255)];
  }
  s.radix_tmp.resize(n);
  for (int p = 0; p < passes; ++p) {
    const int shift = 8 * p;
    const auto digit = [key, &order, shift](int64_t i) { return (key[order[i]] >> shift) & 255; };
    int64_t start[256], sum = 0;
    for (int d = 0; d < 256; ++d) {
      start[d] = sum;
      const int32_t* c = count + p * 4 * 256 + d;
      sum += c[0] + c[256] + c[512] + c[768];
    }
    const uint64_t first = digit(0);
    if (start[first] == 0 && (first == 255 || start[first + 1] == n)) continue;  // one digit: the order stays
    // Runs of equal digits are copied with the position in a register, for the same reason.
    int32_t* out = s.radix_tmp.data();
    for (int64_t i = 0; i < n;) {
      const uint64_t d = digit(i);
      int64_t pos = start[d];
      do {
        out[pos++] = order[i++];
      } while (i < n && digit(i) == d);
      start[d] = pos;
    }
    order.swap(s.radix_tmp);
  }
}

// LPT in rounds of num_ctas tiles over tiles sorted longest first: round r gives its tiles, in
// order, to the CTAs sorted by load (ties by CTA id). Writes each tile's CTA into s.cta.
//
// After a round the loads are the previous round's ascending loads plus the round's costs, which
// descend in steps (a query tile's KV heads cost the same, and requests often share a length):
// ascending runs, one per step, that merge_runs sorts 3x faster than std::sort (B=256 Zipf).
void assign_lpt(const std::vector<int64_t>& sorted_cost, int32_t num_ctas, Scratch& s) {
  const int64_t n = int64_t(sorted_cost.size());
  s.cta.resize(n);
  // (load, CTA id) in ascending order: the CTA order of a round.
  s.least.resize(num_ctas);
  for (int32_t c = 0; c < num_ctas; ++c) s.least[c] = {0, c};
  for (int64_t start = 0; start < n; start += num_ctas) {
    if (start) merge_runs(s.least, s.least_tmp, s.bounds);
    if (sorted_cost[start] == sorted_cost[n - 1]) {
      // Equal costs from here on keep the load order, so the rest goes round-robin.
      for (int64_t i = start, k = 0; i < n; ++i, k = k + 1 == num_ctas ? 0 : k + 1) s.cta[i] = s.least[k].second;
      return;
    }
    const int64_t end = std::min<int64_t>(n, start + num_ctas);
    for (int64_t i = start; i < end; ++i) {
      s.cta[i] = s.least[i - start].second;
      s.least[i - start].first += sorted_cost[i];
    }
  }
}

// Rows grouped by CTA, longest first within a CTA (a stable counting sort on the CTA id): the
// sorted position of the tile at each row into s.by_row, the CTA ranges into cta_indptr.
void group_by_cta(int64_t num_tiles, int32_t num_ctas, int32_t* cta_indptr, Scratch& s) {
  std::fill(cta_indptr, cta_indptr + num_ctas + 1, 0);
  for (int64_t i = 0; i < num_tiles; ++i) ++cta_indptr[s.cta[i] + 1];
  for (int32_t c = 0; c < num_ctas; ++c) cta_indptr[c + 1] += cta_indptr[c];
  s.cta_fill.assign(cta_indptr, cta_indptr + num_ctas);
  s.by_row.resize(num_tiles);
  for (int64_t i = 0; i < num_tiles; ++i) s.by_row[s.cta_fill[s.cta[i]]++] = int32_t(i);
}

// (Request, KV head)-major order, one tile per CTA: the sorted tiles reordered (stably) by
// (kv_base, KV head, longest key range first) into s.by_row (row r runs s.sorted[s.by_row[r]]):
// radix sorts by the key range, then by (kv_base, KV head) as one number; CTA c runs row c.
void kv_major_order(int64_t num_tiles, int32_t num_ctas, int32_t* cta_indptr, Scratch& s) {
  const Tile* tiles = s.sorted.data();
  const int32_t* q_tiles = s.q_tiles.data();
  const auto base = [tiles, q_tiles](int32_t i) { return q_tiles[int64_t(tiles[i].q) * kNumFields + kKvBase]; };
  s.by_row.resize(num_tiles);
  std::iota(s.by_row.begin(), s.by_row.end(), 0);
  radix_sort(s.by_row, true, [tiles](int32_t i) { return int64_t(tiles[i].hi) - tiles[i].lo; }, s);
  int32_t base_lo = INT32_MAX, head_lo = INT32_MAX, head_hi = 0;
  for (int64_t i = 0; i < num_tiles; ++i) {
    base_lo = std::min(base_lo, base(int32_t(i)));
    head_lo = std::min(head_lo, tiles[i].head);
    head_hi = std::max(head_hi, tiles[i].head);
  }
  // (kv_base - its minimum) * heads + head: below 2**32 * 2**31, in the order of the pairs.
  const int64_t heads = int64_t(head_hi) - head_lo + 1;
  const auto base_head = [&](int32_t i) { return (int64_t(base(i)) - base_lo) * heads + (tiles[i].head - head_lo); };
  radix_sort(s.by_row, false, base_head, s);
  for (int32_t c = 0; c <= num_ctas; ++c) cta_indptr[c] = int32_t(std::min<int64_t>(c, num_tiles));
}

bool in_int32(int64_t v, int64_t lo) { return v >= lo && v <= INT32_MAX; }

// What a batch's plan holds before its tiles are placed: tiles, partial slots, merge groups, chunk.
struct Counts {
  int64_t num_tiles, num_slots, num_groups, chunk;
};

// The checks of the static arguments, the query tiles (into s.q_tiles), the chunk, each query
// tile's cost and chunk count (s.q_cost, s.nch) and the plan's counts: the part of plan() that
// jaxinfer_count_work shares.
int prepare(int32_t batch, const int32_t* qo_indptr, const int32_t* kv_lens, const int32_t* kv_base,
            const int64_t* mask_offsets, const Params& p, Scratch& s, Counts& counts) {
  if (batch < 0 || !in_int32(p.num_kv_heads, 1) || !in_int32(p.group_size, 1) || !in_int32(p.block_m, 1) ||
      !in_int32(p.block_n, 1) || !in_int32(p.num_ctas, 1) || !in_int32(p.split_budget, 2) ||
      !in_int32(p.max_work_tiles, 0) || !in_int32(p.min_chunk, 0) || !in_int32(p.window_left, -1) ||
      !in_int32(p.row_cost, 0) || !in_int32(p.fixed_chunk, 0) || !in_int32(p.tile_startup, 0)) {
    return fail(kBadArgument,
                "plan_work needs batch >= 0, num_kv_heads, group_size, block_m, block_n, num_ctas >= 1, "
                "split_budget >= 2, max_work_tiles, min_chunk, row_cost, fixed_chunk, tile_startup >= 0, window_left >= -1, "
                "all < 2**31 (got batch=%lld, split_budget=%lld)",
                batch, p.split_budget);
  }
  if (p.fixed_chunk && !p.split_kv) {
    return fail(kBadArgument, "fixed_chunk=%lld splits every request: it needs split_kv (got split_kv=%lld)",
                p.fixed_chunk, p.split_kv);
  }
  query_tiles(batch, qo_indptr, kv_lens, kv_base, mask_offsets, std::max<int64_t>(1, p.block_m / p.group_size), p,
              s.q_tiles);
  const int64_t nq = int64_t(s.q_tiles.size()) / kNumFields;
  const int64_t chunk = p.fixed_chunk ? p.fixed_chunk : p.split_kv ? chunk_size(s.q_tiles, nq, p, s) : 0;
  s.q_cost.resize(nq);
  s.nch.resize(nq);
  int64_t tiles = 0, slots = 0, split_tiles = 0;
  for (int64_t q = 0; q < nq; ++q) {
    const int32_t* t = &s.q_tiles[q * kNumFields];
    const int64_t span = int64_t(t[kKvHi]) - t[kKvLo];
    s.q_cost[q] = span + p.row_cost * p.group_size * t[kQLen];
    s.nch[q] = chunk ? std::max<int64_t>(1, ceil_div(span, chunk)) : 1;
    tiles += s.nch[q];
    if (s.nch[q] > 1) {
      slots += s.nch[q];
      ++split_tiles;
    }
  }
  counts = {tiles * p.num_kv_heads, slots * p.num_kv_heads, split_tiles * p.num_kv_heads, chunk};
  return kOk;
}

int plan(int32_t batch, const int32_t* qo_indptr, const int32_t* kv_lens, const int32_t* kv_base,
         const int64_t* mask_offsets, const Params& p, const Outputs& out, const Pages& pages, int64_t* result) {
  Scratch& s = thread_scratch();
  Counts counts;
  if (const int status = prepare(batch, qo_indptr, kv_lens, kv_base, mask_offsets, p, s, counts)) return status;
  const int32_t hkv = int32_t(p.num_kv_heads);
  const int64_t nq = int64_t(s.q_tiles.size()) / kNumFields, chunk = counts.chunk, num_tiles = counts.num_tiles;
  const bool split = counts.num_slots > 0;
  if (num_tiles > p.max_work_tiles) {
    return fail(kCapacity, "max_work_tiles=%lld is smaller than the batch's %lld work tiles", p.max_work_tiles, num_tiles);
  }
  if (p.kv_major && num_tiles > p.num_ctas) {
    return fail(kCapacity, "kv_major runs one tile per CTA: num_ctas=%lld is less than the plan's %lld work tiles",
                p.num_ctas, num_tiles);
  }
  // A chunk the planner picks keeps the slots within split_budget; a fixed one may not.
  if (counts.num_slots > p.split_budget) {
    return fail(kCapacity, "split_budget=%lld partial slots is less than the plan's %lld", p.split_budget,
                counts.num_slots);
  }
  const int32_t max_groups = int32_t(p.split_budget / 2);
  const int64_t num_groups = counts.num_groups;
  if (num_groups > max_groups) {
    return fail(kCapacity, "split_budget // 2 = %lld merge groups is less than the plan's %lld", max_groups, num_groups);
  }

  // Tiles ordered (query tile, KV head, chunk), so a split group's partial slots are
  // contiguous; then a stable sort by cost, longest first.
  // Filled by index: the counts give the size (push_back's capacity checks cost ~3 ns a tile).
  s.tiles.resize(split ? num_tiles : 0);
  s.cost.resize(split ? num_tiles : 0);
  if (split) {
    Tile* tile = s.tiles.data();
    int64_t* cost = s.cost.data();
    int32_t slot = 0;
    for (int64_t q = 0; q < nq; ++q) {
      const int32_t* t = &s.q_tiles[q * kNumFields];
      const int64_t extra = s.q_cost[q] - (int64_t(t[kKvHi]) - t[kKvLo]), nch = s.nch[q];
      for (int32_t h = 0; h < hkv; ++h) {
        for (int64_t c = 0; c < nch; ++c, ++tile, ++cost) {
          const int64_t lo = t[kKvLo] + c * chunk, hi = std::min<int64_t>(t[kKvHi], lo + chunk);
          *tile = {int32_t(q), h, int32_t(lo), int32_t(hi), nch > 1 ? slot++ : -1};
          *cost = hi - lo + extra;
        }
      }
    }
  }
  // Unsplit, every head of a query tile costs the same: sorting the query tiles (stable) gives
  // the order a stable sort of all tiles would.
  const int64_t* key = split ? s.cost.data() : s.q_cost.data();
  s.order.resize(split ? num_tiles : nq);
  std::iota(s.order.begin(), s.order.end(), 0);
  // Equal or descending costs (uniform batches) are sorted already.
  if (!std::is_sorted(s.order.begin(), s.order.end(), [key](int32_t a, int32_t b) { return key[a] > key[b]; })) {
    radix_sort(s.order, true, [key](int32_t i) { return key[i]; }, s);
  }

  // The costs in sorted order (position i: the i-th longest tile), and the tiles themselves where
  // the kv_major order sorts them again. Otherwise a row finds its tile through the order: split,
  // s.tiles[order[i]]; unsplit, head i % hkv of query tile order[i / hkv], whose row it copies
  // with only kv_head changed.
  s.sorted_cost.resize(num_tiles);
  s.sorted.resize(p.kv_major ? num_tiles : 0);
  if (split) {
    for (int64_t i = 0; i < num_tiles; ++i) s.sorted_cost[i] = s.cost[s.order[i]];
    for (int64_t i = 0; p.kv_major && i < num_tiles; ++i) s.sorted[i] = s.tiles[s.order[i]];
  } else {
    for (int64_t r = 0, i = 0; r < nq; ++r) {
      const int32_t q = s.order[r];
      const int32_t* t = &s.q_tiles[int64_t(q) * kNumFields];
      std::fill_n(s.sorted_cost.begin() + i, hkv, s.q_cost[q]);
      for (int32_t h = 0; p.kv_major && h < hkv; ++h) s.sorted[i + h] = {q, h, t[kKvLo], t[kKvHi], -1};
      i += hkv;
    }
  }
  const int32_t num_ctas = int32_t(p.num_ctas);
  if (p.kv_major) {
    kv_major_order(num_tiles, num_ctas, out.cta_indptr, s);
  } else {
    assign_lpt(s.sorted_cost, num_ctas, s);
    group_by_cta(num_tiles, num_ctas, out.cta_indptr, s);
  }
  // Rows written in order: the scattered form stalls on store-to-load dependencies.
  constexpr size_t kRowBytes = sizeof(int32_t) * kNumFields;
  const auto write_tile = [&](int32_t* row, const Tile& t) {
    std::memcpy(row, &s.q_tiles[int64_t(t.q) * kNumFields], kRowBytes);
    row[kKvHead] = t.head;
    row[kKvLo] = t.lo;
    row[kKvHi] = t.hi;
    row[kOutSlot] = t.slot;
  };
  int32_t* row = out.work;
  if (p.kv_major) {
    for (int64_t r = 0; r < num_tiles; ++r, row += kNumFields) write_tile(row, s.sorted[s.by_row[r]]);
  } else if (split) {
    for (int64_t r = 0; r < num_tiles; ++r, row += kNumFields) write_tile(row, s.tiles[s.order[s.by_row[r]]]);
  } else {
    for (int64_t r = 0; r < num_tiles; ++r, row += kNumFields) {
      const int32_t i = s.by_row[r];
      std::memcpy(row, &s.q_tiles[int64_t(s.order[i / hkv]) * kNumFields], kRowBytes);
      row[kKvHead] = i % hkv;
    }
  }
  for (int64_t i = num_tiles; i < p.max_work_tiles; ++i) {
    int32_t* row = out.work + i * kNumFields;
    std::fill(row, row + kNumFields, 0);
    row[kOutSlot] = -1;
  }

  // Merge groups: the (query tile, KV head) pairs split into more than one chunk, in pair order.
  std::fill(out.merge_dest, out.merge_dest + int64_t(max_groups) * kMergeFields, 0);
  int64_t g = 0, slots = 0;
  out.merge_indptr[0] = 0;
  for (int64_t q = 0; split && q < nq; ++q) {
    if (s.nch[q] < 2) continue;
    const int32_t* t = &s.q_tiles[q * kNumFields];
    for (int32_t h = 0; h < hkv; ++h, ++g) {
      slots += s.nch[q];
      out.merge_indptr[g + 1] = int32_t(slots);
      int32_t* dest = out.merge_dest + g * kMergeFields;
      dest[0] = h;
      dest[1] = t[kQRow0];
      dest[2] = t[kQLen];
      dest[3] = t[kQPos0];
    }
  }
  std::fill(out.merge_indptr + g + 1, out.merge_indptr + max_groups + 1, int32_t(slots));

  if (pages.dst) {
    std::copy_n(pages.src, pages.num_pages, pages.dst);
    std::fill(pages.dst + pages.num_pages, pages.dst + pages.capacity, 0);
  }

  if (result) {
    result[0] = num_tiles;
    result[1] = num_groups;
    result[2] = chunk;
  }
  return kOk;
}

Params read_params(const int64_t* params) {
  Params p;
  std::memcpy(&p, params, sizeof p);
  return p;
}

// A CSR row pointer of n >= 1 entries: starts at 0, never decreases, ends within int32. Copies it
// into out as int32 when out is not null; returns 1 when valid, 0 otherwise (the caller's numpy
// checks then name the error).
template <typename T>
int check_indptr(const T* indptr, int64_t n, int32_t* out) {
  bool ok = indptr[0] == 0 && indptr[n - 1] <= INT32_MAX;
  for (int64_t i = 1; i < n; ++i) ok &= indptr[i] >= indptr[i - 1];
  if (ok && out) std::copy_n(indptr, n, out);
  return ok;
}

// An int32 or int64 array read as int64.
struct Ints {
  const void* data;
  bool wide;
  int64_t operator[](int64_t i) const {
    return wide ? static_cast<const int64_t*>(data)[i] : int64_t(static_cast<const int32_t*>(data)[i]);
  }
};

// Both row pointers of a batch ([B+1] each): start at 0, never decrease, end within int32;
// copied into qo_out / kv_out as int32.
bool check_row_pointers(int32_t batch, Ints qo, Ints kv, int32_t* qo_out, int32_t* kv_out) {
  bool ok = qo[0] == 0 && kv[0] == 0 && qo[batch] <= INT32_MAX && kv[batch] <= INT32_MAX;
  for (int32_t i = 1; i <= batch; ++i) ok &= qo[i] >= qo[i - 1] && kv[i] >= kv[i - 1];
  if (!ok) return false;
  for (int32_t i = 0; i <= batch; ++i) {
    qo_out[i] = int32_t(qo[i]);
    kv_out[i] = int32_t(kv[i]);
  }
  return true;
}

}  // namespace

extern "C" {

// The message of the calling thread's last failed jaxinfer_plan_* call.
const char* jaxinfer_error() { return last_error; }

// Plan one batch into caller buffers (jaxinfer.plan.planner.plan_work; every entry of the outputs is
// written). params: the static arguments (Params, int64 each). Inputs: batch = B, qo_indptr
// [B+1], kv_lens [B], kv_base [B] int32, mask_offsets [B] int64 or null. Outputs: work,
// cta_indptr, merge_indptr, merge_dest (shapes in Outputs). result [3] (or null): num_tiles,
// num_groups, chunk. Returns 0, or 1 (a capacity is exceeded) / 2 (bad argument) with a message
// in jaxinfer_error().
int jaxinfer_plan_work(const int64_t* params, int32_t batch, const int32_t* qo_indptr, const int32_t* kv_lens,
                       const int32_t* kv_base, const int64_t* mask_offsets, int32_t* work, int32_t* cta_indptr,
                       int32_t* merge_indptr, int32_t* merge_dest, int64_t* result) {
  return plan(batch, qo_indptr, kv_lens, kv_base, mask_offsets, read_params(params),
              Outputs{work, cta_indptr, merge_indptr, merge_dest}, Pages{nullptr, 0, nullptr, 0}, result);
}

// jaxinfer_plan_work into one packed buffer of buffer_size int32 entries (jaxinfer.plan.planner.
// plan_work_packed; jaxinfer.plan.layout.WorkLayout): work [max_work_tiles, kNumFields] | cta_indptr
// [num_ctas+1] | merge_indptr [G+1] | merge_dest [G, 4] | page ids, G = split_budget / 2; the
// first num_pages ids of pages are copied there and zero-padded to the end of the buffer.
int jaxinfer_plan_packed(const int64_t* params, int32_t batch, const int32_t* qo_indptr, const int32_t* kv_lens,
                         const int32_t* kv_base, const int64_t* mask_offsets, const int32_t* pages, int64_t num_pages,
                         int32_t* buffer, int64_t buffer_size, int64_t* result) {
  const Params p = read_params(params);
  const int64_t groups = std::max<int64_t>(0, p.split_budget / 2);
  const int64_t off_cta = std::max<int64_t>(0, p.max_work_tiles) * kNumFields;
  const int64_t off_merge_indptr = off_cta + std::max<int64_t>(0, p.num_ctas) + 1;
  const int64_t off_merge_dest = off_merge_indptr + groups + 1;
  const int64_t off_pages = off_merge_dest + groups * kMergeFields;
  if (buffer_size < off_pages || num_pages < 0) {
    return fail(kBadArgument, "the plan buffer has %lld entries, its work buffers need %lld", buffer_size, off_pages);
  }
  if (num_pages > buffer_size - off_pages) {
    return fail(kCapacity, "%lld page ids do not fit the plan buffer's %lld", num_pages, buffer_size - off_pages);
  }
  return plan(batch, qo_indptr, kv_lens, kv_base, mask_offsets, p,
              Outputs{buffer, buffer + off_cta, buffer + off_merge_indptr, buffer + off_merge_dest},
              Pages{pages, num_pages, buffer + off_pages, buffer_size - off_pages}, result);
}

// The counts of the plan jaxinfer_plan_work would make (jaxinfer.plan.planner.count_work): result
// [4] = num_tiles, num_slots (partial slots), num_groups (merge groups), chunk; no capacity is
// checked (max_work_tiles, num_ctas and split_budget's limit on the slots), only the arguments.
// Returns 0 or 2 (bad argument) with a message in jaxinfer_error().
int jaxinfer_count_work(const int64_t* params, int32_t batch, const int32_t* qo_indptr, const int32_t* kv_lens,
                        int64_t* result) {
  Scratch& s = thread_scratch();
  Counts counts;
  if (const int status = prepare(batch, qo_indptr, kv_lens, nullptr, nullptr, read_params(params), s, counts)) {
    return status;
  }
  result[0] = counts.num_tiles;
  result[1] = counts.num_slots;
  result[2] = counts.num_groups;
  result[3] = counts.chunk;
  return kOk;
}

// Query tiles of a batch: sum over requests of ceil(qo_len / tokens_per_tile) (the unsplit
// plan has this many tiles per KV head).
int64_t jaxinfer_count_query_tiles(int32_t batch, const int32_t* qo_indptr, int32_t tokens_per_tile) {
  int64_t n = 0;
  for (int32_t b = 0; b < batch; ++b) n += std::max<int64_t>(0, ceil_div(int64_t(qo_indptr[b + 1]) - qo_indptr[b], tokens_per_tile));
  return n;
}

// check_indptr for int32 and int64 row pointers.
int jaxinfer_check_indptr_i32(const int32_t* indptr, int64_t n, int32_t* out) { return check_indptr(indptr, n, out); }
int jaxinfer_check_indptr_i64(const int64_t* indptr, int64_t n, int32_t* out) { return check_indptr(indptr, n, out); }

// The data pointer of a numpy array passed as its PyObject* (ctypes.py_object), read where numpy's
// PyArray_DATA reads it: PyArrayObject_fields.data, at data_offset (the size of PyObject_HEAD) in
// the object, an offset compiled into every numpy C extension. A Python address lookup costs ~1 us
// an array; jaxinfer.plan.native.array_data_offset checks the offset once per process.
const void* jaxinfer_array_data(const void* array, int64_t data_offset) {
  const void* data;
  std::memcpy(&data, static_cast<const char*>(array) + data_offset, sizeof data);
  return data;
}

// One pass over a batch (the checks of BatchSpec.create: jaxinfer.plan.checks.check_indptr and
// check_page_table), on C-contiguous 1-D numpy arrays passed as objects (jaxinfer_array_data):
// qo_indptr and kv_indptr [B+1] start at 0, never decrease and end within int32; for a page table
// (bit 3 of layout) also kv_indptr[B] <= num_indices, the used page ids of kv_indices are >= 0,
// and kv_last_page_len [B] is in 1..page_size for a request with pages and 0 otherwise (ragged KV:
// kv_indices and kv_last_page_len are not read). qo_indptr, kv_indptr and kv_last_page_len are
// int64 where bits 0, 1, 2 of layout are set, else int32; kv_indices is int32. Writes out =
// qo_indptr [B+1] | kv_indptr [B+1] | kv_lens [B] (tokens per request) | kv_last_page_len [B]
// (page tables only), int32, and addresses = the data addresses of out and kv_indices (0: ragged).
// Returns 1 when the batch is valid, 0 otherwise (the caller's numpy checks then name the error).
int jaxinfer_check_batch(int32_t batch, const void* qo_indptr, const void* kv_indptr, const void* kv_indices,
                         int64_t num_indices, const void* kv_last_page_len, int32_t page_size, int32_t layout,
                         int64_t data_offset, const void* out_array, int64_t* addresses) {
  const bool paged = layout & 8;
  const auto data = [data_offset](const void* array) { return jaxinfer_array_data(array, data_offset); };
  const Ints qo{data(qo_indptr), bool(layout & 1)}, indptr{data(kv_indptr), bool(layout & 2)};
  int32_t* out = static_cast<int32_t*>(const_cast<void*>(data(out_array)));
  const int32_t* ids = paged ? static_cast<const int32_t*>(data(kv_indices)) : nullptr;
  addresses[0] = reinterpret_cast<intptr_t>(out);
  addresses[1] = reinterpret_cast<intptr_t>(ids);
  int32_t* lens = out + 2 * (int64_t(batch) + 1);
  if (!check_row_pointers(batch, qo, indptr, out, out + batch + 1)) return 0;
  if (!paged) {
    for (int32_t b = 0; b < batch; ++b) lens[b] = int32_t(indptr[b + 1] - indptr[b]);
    return 1;
  }
  if (indptr[batch] > num_indices) return 0;
  const Ints last{data(kv_last_page_len), bool(layout & 4)};
  int32_t* last_out = lens + batch;
  bool ok = true;
  for (int32_t b = 0; b < batch; ++b) {
    const int64_t pages = indptr[b + 1] - indptr[b], tail = last[b];
    ok &= pages ? tail >= 1 && tail <= page_size : tail == 0;
    // int32 like numpy's seq_lens_host (a table of 2**31 tokens wraps there too).
    lens[b] = pages ? int32_t((pages - 1) * page_size + tail) : 0;
    last_out[b] = int32_t(tail);
  }
  if (!ok) return 0;
  // A negative id sets the sign bit: an OR reduction vectorizes with plain SSE2 (a signed min
  // needs SSE4.1), 3x faster than the min on 85k ids. Eight lanes: two vector ORs a step keep it
  // at memory speed (one ran 2x slower where the loop straddled a 64-byte line). AVX2 or AVX-512
  // clones of it gave nothing: 65k ids (256 KiB) scan at the L2 cache's speed either way.
  const int64_t used = indptr[batch];
  uint32_t bits[8] = {};
  int64_t i = 0;
  for (; i + 8 <= used; i += 8) {
    for (int k = 0; k < 8; ++k) bits[k] |= uint32_t(ids[i + k]);
  }
  for (; i < used; ++i) bits[0] |= uint32_t(ids[i]);
  for (int k = 1; k < 8; ++k) bits[0] |= bits[k];
  return int32_t(bits[0]) >= 0;
}

}  // extern "C"
