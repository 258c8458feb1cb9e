// jaxinfer's host library (plain C++17, loaded with ctypes by jaxinfer/native.py): the Pallas
// backend's planner (jaxinfer/planner.py's plan_work / plan_work_packed) and the page-table checks
// of BatchSpec.create (jaxinfer/page.py). At B=256 their numpy forms were ~70 numpy calls whose
// fixed cost (2-3 us each on the GPU machine's host) dominated plan(); here each is one call, as
// FlashInfer's scheduler runs in C++ (FlashInfer paper, arXiv 2501.01005, sec. 3.3).
//
// The algorithm, the buffer layout and every tie-break are plan_work's (module doc of
// jaxinfer/planner.py); tests/planner_ref.py keeps the numpy planner as the bit-for-bit oracle.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

// Columns of a work row (jaxinfer.planner.WORK_FIELDS).
enum Field { kKvHead, kQRow0, kQLen, kQPos0, kKvLo, kKvHi, kKvBase, kOutSlot, kValid, kKvLen, kMaskBase, kNumFields };
constexpr int kMergeFields = 4;  // MERGE_FIELDS: kv_head, q_row0, q_len, q_pos0

enum Status { kOk = 0, kCapacity = 1, kBadArgument = 2 };

struct Params {
  int32_t num_kv_heads, group_size, block_m, block_n, causal, window_left, num_ctas, split_budget, max_work_tiles,
      split_kv, min_chunk;
};

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
  int32_t* dst;  // [capacity], zero-padded past num_pages
  int64_t capacity;
};

int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// Scratch reused across calls of a thread (plan() runs per step; no allocation once warm).
struct Scratch {
  std::vector<int32_t> q_tiles;  // [n, kNumFields]: one row per query tile, every column but kv_head
  std::vector<int64_t> q_cost, cost, sorted_cost;
  std::vector<int32_t> order, tile_q, tile_head, tile_lo, tile_hi, tile_slot, cta, cta_fill, by_row;
  std::vector<int64_t> nch;
  std::vector<std::pair<int64_t, int32_t>> least;
};

// One row per query tile (tokens_per_tile query tokens of one request), its key range trimmed to
// what some row of it sees (causal, sliding window; bottom-right aligned).
void query_tiles(int32_t batch, const int32_t* qo_indptr, const int32_t* kv_lens, const int32_t* kv_base,
                 const int64_t* mask_offsets, int32_t tpt, const Params& p, std::vector<int32_t>& out) {
  out.clear();
  for (int32_t b = 0; b < batch; ++b) {
    const int64_t qo = int64_t(qo_indptr[b + 1]) - qo_indptr[b], kv_len = kv_lens[b];
    for (int64_t tok0 = 0; tok0 < qo; tok0 += tpt) {
      const int64_t ntok = std::min<int64_t>(tpt, qo - tok0);
      const int64_t q_pos0 = kv_len - qo + tok0;
      const int64_t hi = p.causal ? std::min(std::max<int64_t>(q_pos0 + ntok, 0), kv_len) : kv_len;
      const int64_t lo = p.window_left >= 0 ? std::min(std::max<int64_t>(q_pos0 - p.window_left, 0), hi) : 0;
      // int64 until the store: the mask offset plus tok0 * kv_len may pass 2**31 (the backend
      // refuses masks that large; the store wraps like numpy's int32 cast).
      const int64_t mask_base = mask_offsets ? mask_offsets[b] + tok0 * kv_len : 0;
      const int32_t row[kNumFields] = {0,
                                       int32_t(qo_indptr[b] + tok0),
                                       int32_t(ntok),
                                       int32_t(q_pos0),
                                       int32_t(lo),
                                       int32_t(hi),
                                       kv_base[b],
                                       -1,
                                       1,
                                       int32_t(kv_len),
                                       int32_t(mask_base)};
      out.insert(out.end(), row, row + kNumFields);
    }
  }
}

// Smallest chunk (multiple of block_n, >= min_chunk) whose tile count fits split_budget; 0 when
// the unsplit tiles already fill the budget or nothing is longer than the smallest chunk.
int64_t chunk_size(const std::vector<int32_t>& q_tiles, int64_t n, const Params& p) {
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) longest = std::max<int64_t>(longest, q_tiles[i * kNumFields + kKvHi] - q_tiles[i * kNumFields + kKvLo]);
  const int64_t kmin = std::max<int64_t>(1, ceil_div(p.min_chunk, p.block_n));
  if (n * p.num_kv_heads >= p.split_budget || longest <= kmin * p.block_n) return 0;
  // ceil(span / (k * block_n)) == ceil(ceil(span / block_n) / k): search on block counts.
  auto count = [&](int64_t k) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t blocks = ceil_div(q_tiles[i * kNumFields + kKvHi] - q_tiles[i * kNumFields + kKvLo], p.block_n);
      total += std::max<int64_t>(1, ceil_div(blocks, k));
    }
    return total * p.num_kv_heads;
  };
  int64_t lo = kmin, hi = std::max(kmin, ceil_div(longest, p.block_n));
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (count(mid) <= p.split_budget) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo * p.block_n;
}

// LPT in rounds of num_ctas tiles over tiles sorted longest first: round r gives its tiles, in
// order, to the CTAs sorted by load (ties by CTA id). Writes each tile's CTA into s.cta.
void assign_lpt(const std::vector<int64_t>& sorted_cost, int32_t num_ctas, Scratch& s) {
  const int64_t n = int64_t(sorted_cost.size());
  s.cta.resize(n);
  // (load, CTA id) in ascending order: the CTA order of a round.
  s.least.resize(num_ctas);
  for (int32_t c = 0; c < num_ctas; ++c) s.least[c] = {0, c};
  for (int64_t start = 0; start < n; start += num_ctas) {
    if (start) std::sort(s.least.begin(), s.least.end());
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

int fail(char* msg, int64_t msg_size, int code, const char* fmt, int64_t a, int64_t b) {
  if (msg_size > 0) std::snprintf(msg, size_t(msg_size), fmt, (long long)a, (long long)b);
  return code;
}

int plan(int32_t batch, const int32_t* qo_indptr, const int32_t* kv_lens, const int32_t* kv_base,
         const int64_t* mask_offsets, const Params& p, const Outputs& out, const Pages& pages, int64_t* result,
         char* msg, int64_t msg_size) {
  const int32_t hkv = p.num_kv_heads;
  if (batch < 0 || hkv < 1 || p.group_size < 1 || p.block_m < 1 || p.block_n < 1 || p.num_ctas < 1 ||
      p.split_budget < 2 || p.max_work_tiles < 0 || p.min_chunk < 0) {
    return fail(msg, msg_size, kBadArgument,
                "plan_work needs batch >= 0, num_kv_heads, group_size, block_m, block_n, num_ctas >= 1, "
                "split_budget >= 2 (got batch=%lld, split_budget=%lld)",
                batch, p.split_budget);
  }
  static thread_local Scratch s;
  const int32_t tpt = std::max(1, p.block_m / p.group_size);
  query_tiles(batch, qo_indptr, kv_lens, kv_base, mask_offsets, tpt, p, s.q_tiles);
  const int64_t nq = int64_t(s.q_tiles.size()) / kNumFields;
  const int64_t chunk = p.split_kv ? chunk_size(s.q_tiles, nq, p) : 0;

  s.q_cost.resize(nq);
  s.nch.resize(nq);
  bool split = false;
  for (int64_t q = 0; q < nq; ++q) {
    const int32_t* t = &s.q_tiles[q * kNumFields];
    const int64_t span = int64_t(t[kKvHi]) - t[kKvLo];
    s.q_cost[q] = span + 2 * int64_t(p.group_size) * t[kQLen];
    s.nch[q] = chunk ? std::max<int64_t>(1, ceil_div(span, chunk)) : 1;
    split |= s.nch[q] > 1;
  }

  // Tiles ordered (query tile, KV head, chunk), so a split group's partial slots are
  // contiguous; then a stable sort by cost, longest first.
  s.tile_q.clear();
  s.tile_head.clear();
  s.tile_lo.clear();
  s.tile_hi.clear();
  s.tile_slot.clear();
  s.cost.clear();
  if (split) {
    int32_t slot = 0;
    for (int64_t q = 0; q < nq; ++q) {
      const int32_t* t = &s.q_tiles[q * kNumFields];
      const int64_t extra = s.q_cost[q] - (int64_t(t[kKvHi]) - t[kKvLo]);
      for (int32_t h = 0; h < hkv; ++h) {
        for (int64_t c = 0; c < s.nch[q]; ++c) {
          const int64_t lo = t[kKvLo] + c * chunk, hi = std::min<int64_t>(t[kKvHi], lo + chunk);
          s.tile_q.push_back(int32_t(q));
          s.tile_head.push_back(h);
          s.tile_lo.push_back(int32_t(lo));
          s.tile_hi.push_back(int32_t(hi));
          s.tile_slot.push_back(s.nch[q] > 1 ? slot++ : -1);
          s.cost.push_back(hi - lo + extra);
        }
      }
    }
    s.order.resize(s.cost.size());
  } else {
    // Every head of a query tile costs the same: sorting the query tiles (stable) gives the
    // order a stable sort of all tiles would.
    s.order.resize(nq);
  }
  const std::vector<int64_t>& key = split ? s.cost : s.q_cost;
  std::iota(s.order.begin(), s.order.end(), 0);
  std::stable_sort(s.order.begin(), s.order.end(), [&](int32_t a, int32_t b) { return key[a] > key[b]; });
  const int64_t num_tiles = split ? int64_t(s.order.size()) : nq * hkv;
  if (num_tiles > p.max_work_tiles) {
    return fail(msg, msg_size, kCapacity, "max_work_tiles=%lld is smaller than the batch's %lld work tiles",
                p.max_work_tiles, num_tiles);
  }
  const int32_t max_groups = p.split_budget / 2;
  int64_t num_groups = 0;
  if (split) {
    for (int64_t q = 0; q < nq; ++q) num_groups += s.nch[q] > 1 ? hkv : 0;
    if (num_groups > max_groups) {
      return fail(msg, msg_size, kCapacity, "split_budget // 2 = %lld merge groups is less than the plan's %lld",
                  max_groups, num_groups);
    }
  }

  s.sorted_cost.resize(num_tiles);
  if (split) {
    for (int64_t i = 0; i < num_tiles; ++i) s.sorted_cost[i] = s.cost[s.order[i]];
  } else {
    for (int64_t r = 0; r < nq; ++r) std::fill_n(&s.sorted_cost[r * hkv], hkv, s.q_cost[s.order[r]]);
  }
  assign_lpt(s.sorted_cost, p.num_ctas, s);

  // Rows grouped by CTA, longest first within a CTA (a stable counting sort on the CTA id).
  int32_t* cta_indptr = out.cta_indptr;
  std::fill(cta_indptr, cta_indptr + p.num_ctas + 1, 0);
  for (int64_t i = 0; i < num_tiles; ++i) ++cta_indptr[s.cta[i] + 1];
  for (int32_t c = 0; c < p.num_ctas; ++c) cta_indptr[c + 1] += cta_indptr[c];
  s.cta_fill.assign(cta_indptr, cta_indptr + p.num_ctas);
  s.by_row.resize(num_tiles);  // sorted position of the tile at each row
  for (int64_t i = 0; i < num_tiles; ++i) s.by_row[s.cta_fill[s.cta[i]]++] = int32_t(i);
  // Rows written in order: the scattered form stalls on store-to-load dependencies.
  for (int64_t r = 0; r < num_tiles; ++r) {
    int32_t* row = out.work + r * kNumFields;
    const int32_t i = s.by_row[r];
    if (split) {
      const int32_t t = s.order[i];
      std::memcpy(row, &s.q_tiles[int64_t(s.tile_q[t]) * kNumFields], sizeof(int32_t) * kNumFields);
      row[kKvHead] = s.tile_head[t];
      row[kKvLo] = s.tile_lo[t];
      row[kKvHi] = s.tile_hi[t];
      row[kOutSlot] = s.tile_slot[t];
    } else {
      // Sorted position i = rank * Hkv + head.
      std::memcpy(row, &s.q_tiles[int64_t(s.order[i / hkv]) * kNumFields], sizeof(int32_t) * kNumFields);
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

  result[0] = num_tiles;
  result[1] = num_groups;
  result[2] = chunk;
  return kOk;
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

}  // namespace

extern "C" {

// Plan one batch into caller buffers (jaxinfer.planner.plan_work; every entry of the outputs is
// written). Inputs: batch = B, qo_indptr [B+1], kv_lens [B], kv_base [B] int32, mask_offsets [B]
// int64 or null. Outputs: work, cta_indptr, merge_indptr, merge_dest (shapes in Outputs); when
// pages_out is not null, the first num_pages page ids of pages and zeros up to page_capacity.
// result [3]: num_tiles, num_groups, chunk.
// Returns 0, or 1 (a capacity is exceeded) / 2 (bad argument) with a message in msg.
int jaxinfer_plan_work(int32_t batch, const int32_t* qo_indptr, const int32_t* kv_lens, const int32_t* kv_base,
                       const int64_t* mask_offsets, int32_t num_kv_heads, int32_t group_size, int32_t block_m,
                       int32_t block_n, int32_t causal, int32_t window_left, int32_t num_ctas, int32_t split_budget,
                       int32_t max_work_tiles, int32_t split_kv, int32_t min_chunk, int32_t* work,
                       int32_t* cta_indptr, int32_t* merge_indptr, int32_t* merge_dest, const int32_t* pages,
                       int64_t num_pages, int32_t* pages_out, int64_t page_capacity, int64_t* result, char* msg,
                       int64_t msg_size) {
  const Params p{num_kv_heads, group_size, block_m,        block_n,  causal,   window_left,
                 num_ctas,     split_budget, max_work_tiles, split_kv, min_chunk};
  return plan(batch, qo_indptr, kv_lens, kv_base, mask_offsets, p, Outputs{work, cta_indptr, merge_indptr, merge_dest},
              Pages{pages, num_pages, pages_out, page_capacity}, result, msg, msg_size);
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

// One pass over an int32 BSR page table (the checks of jaxinfer.page.check_page_table):
// indptr [B+1] starts at 0 and never decreases, indptr[B] <= num_indices, the used page ids are
// >= 0, and last [B] is in 1..page_size for a request with pages and 0 otherwise. Writes
// kv_lens [B] (tokens per request) and returns 1 when the table is valid, 0 otherwise (the
// caller's numpy checks then name the error).
int jaxinfer_check_page_table(int32_t batch, const int32_t* indptr, const int32_t* indices, int64_t num_indices,
                              const int32_t* last, int32_t page_size, int32_t* kv_lens) {
  if (indptr[0] != 0 || indptr[batch] > num_indices) return 0;
  bool ok = true;
  for (int32_t b = 0; b < batch; ++b) {
    const int64_t pages = int64_t(indptr[b + 1]) - indptr[b];
    ok &= pages >= 0 && (pages ? last[b] >= 1 && last[b] <= page_size : last[b] == 0);
    kv_lens[b] = pages > 0 ? int32_t((pages - 1) * page_size + last[b]) : 0;
  }
  if (!ok) return 0;
  // A negative id sets the sign bit: an OR reduction vectorizes with plain SSE2 (a signed min
  // needs SSE4.1), 3x faster than the min on 85k ids.
  uint32_t bits = 0;
  for (int32_t i = 0; i < indptr[batch]; ++i) bits |= uint32_t(indices[i]);
  return int32_t(bits) >= 0;
}

}  // extern "C"
