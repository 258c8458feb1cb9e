// Host test of the kernels' KV addressing (page_index / kv_row_offset of common/kv_addressing.cuh) against
// the page-table definition of shared/DESIGN.md sec. 3, for ragged KV and for paged NHD/HND caches
// of every page size 1..64 (every size through the general mode, power-of-2 sizes also through the
// shift-and-mask mode, and fa3's form: the run-time page_index, then the row within the page).
// Built and run by tests/backends/ffi/test_ffi.py; prints the number of mismatches and exits
// non-zero on any.
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "../common/kv_addressing.cuh"

using jaxinfer::ForwardParams;

// The kernel's offset of (token t, head h): page id looked up as the kernel does, plus the head.
template <int kMode> int64_t kernel_offset(const ForwardParams& p, int64_t kv_start, int t, int h) {
  const int page = kMode == jaxinfer::kKvRagged ? 0 : p.kv_indices[kv_start + jaxinfer::page_index<kMode>(p, t)];
  return jaxinfer::kv_row_offset<kMode>(p, kv_start, t, page) + h * p.kv_head_stride;
}

int main() {
  std::mt19937 rng(1234);
  const int heads = 3, head_dim = 64;
  long bad = 0, checked = 0;
  for (int page_size = 1; page_size <= 64; ++page_size) {
    for (int hnd = 0; hnd < 2; ++hnd) {
      const int num_pages = 300;
      std::vector<int32_t> pages(num_pages);
      for (int i = 0; i < num_pages; ++i) pages[i] = i;
      std::shuffle(pages.begin(), pages.end(), rng);
      ForwardParams p{};
      p.page_size = page_size;
      p.page_shift = (page_size & (page_size - 1)) == 0 ? __builtin_ctz(unsigned(page_size)) : -1;
      p.kv_indices = pages.data();
      p.kv_tok_stride = hnd ? head_dim : int64_t(heads) * head_dim;
      p.kv_head_stride = hnd ? int64_t(page_size) * head_dim : head_dim;
      p.kv_page_stride = int64_t(page_size) * heads * head_dim;
      const int64_t first_page = rng() % 50;  // kv_indptr[b]
      const int max_tokens = (num_pages - int(first_page)) * page_size;
      for (int t = 0; t < max_tokens; t += 1 + int(rng() % 3)) {
        for (int h = 0; h < heads; ++h) {
          // Element (page, slot, head) of [P, page_size, H, D] (NHD) or [P, H, page_size, D] (HND).
          const int64_t page = pages[first_page + t / page_size], slot = t % page_size;
          const int64_t want = hnd ? ((page * heads + h) * page_size + slot) * head_dim
                                   : ((page * page_size + slot) * heads + h) * head_dim;
          bad += kernel_offset<jaxinfer::kKvPaged>(p, first_page, t, h) != want;
          ++checked;
          // paged_row_offset's arithmetic (fa3; it loads the page id with __ldg, device only).
          const int idx = jaxinfer::page_index(p, t);
          bad += jaxinfer::page_row_offset(p, p.kv_indices[first_page + idx], t - idx * p.page_size) +
                     h * p.kv_head_stride != want;
          ++checked;
          if (p.page_shift >= 0) {
            bad += kernel_offset<jaxinfer::kKvPagedPow2>(p, first_page, t, h) != want;
            ++checked;
          }
        }
      }
    }
  }
  ForwardParams r{};  // ragged: token kv_indptr[b] + t of [nnz_kv, H, D]
  r.kv_tok_stride = int64_t(heads) * head_dim;
  r.kv_head_stride = head_dim;
  for (int t = 0; t < 1000; ++t)
    for (int h = 0; h < heads; ++h, ++checked) bad += kernel_offset<jaxinfer::kKvRagged>(r, 77, t, h) != ((77 + t) * heads + h) * head_dim;
  std::printf("%ld mismatches of %ld offsets\n", bad, checked);
  return bad != 0;
}
