// CPU kernels of the exact top-k similarity search.
//
// Work is split into lanes: a lane owns a chunk of query rows (and, when there are fewer chunks
// than threads, a slice of the database). A lane walks its database rows in sub-blocks and, per
// sub-block, multiplies its query chunk by the sub-block with at::mm (MKL; single-threaded
// inside the parallel region, so the threads never wait on each other) into a private tile small
// enough to stay in its core's L2 cache, and folds the tile into its rows' heaps while it is
// still hot. The (B, N) score matrix never exists; extra memory is one tile per thread (about
// 1 MiB), plus a block converted to the accumulation dtype when the database is not already in
// it (float16/bfloat16 or non-unit column stride), plus per-slice states for small batches.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "topk_similarity.h"

namespace fastap {
namespace {

using at::Tensor;

// Largest query chunk per lane: its slice of the queries (chunk × D) is re-read by every
// sub-block product and stays in cache below this size.
constexpr int64_t kMaxChunkRows = 512;
// Rows a lane needs before query chunks are split further rather than the database.
constexpr int64_t kMinChunkRows = 32;
// A lane's score tile (chunk rows × sub-block rows): within half of a 2 MiB L2 cache, so that
// the selection reads what the product has just written without going to memory.
constexpr int64_t kTileBytes = int64_t(1) << 20;
// Database rows converted per block when the database is not in the accumulation dtype.
constexpr int64_t kConvertBytes = int64_t(16) << 20;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Running top-k of one query row as a binary heap whose root is the worst kept candidate, i.e.
// the threshold a new candidate must beat.
template <typename acc_t, bool largest>
struct RowHeap {
  acc_t* v;
  int64_t* ix;
  int64_t k;

  // Puts (nv, ni) at `pos` of the heap [0, size) and lets it sink below every better child.
  void sift_down(int64_t pos, int64_t size, acc_t nv, int64_t ni) {
    while (true) {
      int64_t c = 2 * pos + 1;
      if (c >= size) break;
      if (c + 1 < size && ranks_before<acc_t, largest>(v[c], ix[c], v[c + 1], ix[c + 1])) ++c;
      if (!ranks_before<acc_t, largest>(nv, ni, v[c], ix[c])) break;
      v[pos] = v[c];
      ix[pos] = ix[c];
      pos = c;
    }
    v[pos] = nv;
    ix[pos] = ni;
  }

  // Any arrangement in, a heap out; empty slots (index < 0) get the sentinel value the
  // prefilter in fold_row relies on.
  void make() {
    for (int64_t p = 0; p < k; ++p) {
      if (ix[p] < 0) {
        ix[p] = -1;
        v[p] = empty_slot_value<acc_t, largest>();
      }
    }
    for (int64_t p = k / 2 - 1; p >= 0; --p) sift_down(p, k, v[p], ix[p]);
  }

  void offer(acc_t s, int64_t i) {
    if (ranks_before<acc_t, largest>(s, i, v[0], ix[0])) sift_down(0, k, s, i);
  }

  // Heap sort: repeatedly move the worst to the back, leaving the row best first.
  void sort_best_first() {
    for (int64_t end = k - 1; end > 0; --end) {
      const acc_t lv = v[end];
      const int64_t li = ix[end];
      v[end] = v[0];
      ix[end] = ix[0];
      sift_down(0, end, lv, li);
    }
  }
};

// Folds scores s[0..n) of database items offset..offset+n-1 into one row's heap. O(n) compares
// against the threshold; only candidates that pass it pay for the full comparison and the heap.
template <typename acc_t, bool largest>
void fold_row(const acc_t* s, int64_t n, int64_t offset, RowHeap<acc_t, largest> heap) {
  acc_t thr = heap.v[0];
  // `not worse than the threshold` is true for equal scores and NaN, which the exact comparison
  // then settles; an empty root holds ∓inf, so every candidate passes until the heap is full.
  auto passes = [&thr](acc_t x) { return largest ? !(x < thr) : !(x > thr); };
  auto consider = [&](int64_t j) {
    if (passes(s[j])) {
      heap.offer(s[j], offset + j);
      thr = heap.v[0];
    }
  };
  constexpr int64_t W = 16;  // a branch-free group the compiler vectorises
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    bool hit = false;
    for (int64_t t = 0; t < W; ++t) hit |= passes(s[j + t]);
    if (hit) {
      for (int64_t t = j; t < j + W; ++t) consider(t);
    }
  }
  for (; j < n; ++j) consider(j);
}

// Folds every row of `database` (N, D), database indices offset..offset+N-1, into the heaps
// vals/idx (B, k) of the queries `q` (B, D), contiguous in the accumulation dtype acc_t.
template <typename acc_t, bool largest>
void fold_database(const Tensor& q, const Tensor& database, int64_t offset, acc_t* vals,
                   int64_t* idx, int64_t k) {
  const int64_t B = q.size(0), N = database.size(0), D = q.size(1);
  if (B == 0 || N == 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());

  int64_t chunks = ceil_div(B, kMaxChunkRows);
  if (chunks < threads) {
    chunks = std::min(threads, ceil_div(B, kMinChunkRows));
  } else {
    chunks = ceil_div(chunks, threads) * threads;  // equal work per thread
  }
  const int64_t chunk_rows = ceil_div(B, std::clamp<int64_t>(chunks, 1, B));
  chunks = ceil_div(B, chunk_rows);
  // Threads left over by a small batch take slices of the database, each into its own states
  // (cheap exactly because the batch is small), merged at the end.
  const int64_t splits = chunks >= threads ? 1 : std::min(ceil_div(threads, chunks), N);
  const int64_t sub_rows =
      std::max<int64_t>(16, kTileBytes / (int64_t(sizeof(acc_t)) * chunk_rows));

  std::vector<acc_t> split_vals((splits - 1) * B * k, empty_slot_value<acc_t, largest>());
  std::vector<int64_t> split_idx((splits - 1) * B * k, -1);

  // MKL reads the database in place when its rows are unit-stride in the right dtype; otherwise
  // blocks are converted into one reused buffer, so half-precision or strided databases cost
  // kConvertBytes, not a full copy.
  const bool in_place = database.scalar_type() == q.scalar_type() &&
                        (database.stride(1) == 1 || D <= 1);
  const int64_t block_rows =
      in_place ? N : std::max<int64_t>(1, kConvertBytes / (int64_t(sizeof(acc_t)) * std::max<int64_t>(D, 1)));
  Tensor convert_buf;
  if (!in_place) convert_buf = at::empty({std::min(block_rows, N), D}, q.options());

  for (int64_t b0 = 0; b0 < N; b0 += block_rows) {
    const int64_t nb = std::min(block_rows, N - b0);
    Tensor block = database.narrow(0, b0, nb);
    if (!in_place) {
      Tensor converted = convert_buf.narrow(0, 0, nb);
      converted.copy_(block);
      block = converted;
    }
    at::parallel_for(0, chunks * splits, 1, [&](int64_t lane_begin, int64_t lane_end) {
      Tensor tile = at::empty({chunk_rows * sub_rows}, q.options());
      for (int64_t lane = lane_begin; lane < lane_end; ++lane) {
        const int64_t chunk = lane / splits, split = lane % splits;
        const int64_t r0 = chunk * chunk_rows, rows = std::min(chunk_rows, B - r0);
        const int64_t s0 = nb * split / splits, s1 = nb * (split + 1) / splits;
        acc_t* lane_vals = split == 0 ? vals : split_vals.data() + (split - 1) * B * k;
        int64_t* lane_idx = split == 0 ? idx : split_idx.data() + (split - 1) * B * k;
        const Tensor qc = q.narrow(0, r0, rows);
        for (int64_t t = s0; t < s1; t += sub_rows) {
          const int64_t ns = std::min(sub_rows, s1 - t);
          Tensor scores = tile.narrow(0, 0, rows * ns).view({rows, ns});
          at::mm_out(scores, qc, block.narrow(0, t, ns).t());
          const acc_t* s = scores.const_data_ptr<acc_t>();
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t row = r0 + r;
            fold_row<acc_t, largest>(s + r * ns, ns, offset + b0 + t,
                                     {lane_vals + row * k, lane_idx + row * k, k});
          }
        }
      }
    });
  }

  if (splits > 1) {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        RowHeap<acc_t, largest> heap{vals + row * k, idx + row * k, k};
        for (int64_t split = 1; split < splits; ++split) {
          const int64_t base = (split - 1) * B * k + row * k;
          for (int64_t e = 0; e < k; ++e) {
            if (split_idx[base + e] >= 0) heap.offer(split_vals[base + e], split_idx[base + e]);
          }
        }
      }
    });
  }
}

template <typename F>
void dispatch_largest(bool largest, F&& f) {
  if (largest) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Sorts every row's heap best first, in parallel over rows.
template <typename acc_t, bool largest>
void sort_rows(acc_t* vals, int64_t* idx, int64_t B, int64_t k) {
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      RowHeap<acc_t, largest>{vals + row * k, idx + row * k, k}.sort_best_first();
    }
  });
}

std::tuple<Tensor, Tensor> topk_similarity_cpu(const Tensor& queries, const Tensor& database,
                                               int64_t k, bool largest) {
  const auto acc_dtype = check_topk_similarity_args(queries, database, "database");
  check_topk_k(k, database.size(0));
  const int64_t B = queries.size(0);
  Tensor values = at::empty({B, k}, queries.options().dtype(acc_dtype));
  Tensor indices = at::empty({B, k}, queries.options().dtype(at::kLong));
  if (B == 0) return {values, indices};
  // Detached: the op has no autograd formula, and the products run on pool threads, where a
  // dispatch guard set here would not reach them, so nothing inside may require grad.
  const Tensor q = queries.detach().to(acc_dtype).contiguous();

  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "topk_similarity_cpu", [&] {
    dispatch_largest(largest, [&](auto largest_t) {
      constexpr bool kLargest = decltype(largest_t)::value;
      scalar_t* v = values.data_ptr<scalar_t>();
      int64_t* ix = indices.data_ptr<int64_t>();
      std::fill(v, v + B * k, empty_slot_value<scalar_t, kLargest>());
      std::fill(ix, ix + B * k, int64_t(-1));
      fold_database<scalar_t, kLargest>(q, database.detach(), 0, v, ix, k);
      sort_rows<scalar_t, kLargest>(v, ix, B, k);
    });
  });
  return {values, indices};
}

void topk_similarity_update_cpu(const Tensor& queries, const Tensor& database_block,
                                int64_t index_offset, const Tensor& values, const Tensor& indices,
                                bool largest) {
  const auto acc_dtype = check_topk_similarity_args(queries, database_block, "database_block");
  check_topk_state(queries, values, indices, acc_dtype, index_offset, database_block.size(0));
  const int64_t B = queries.size(0), k = values.size(1);
  if (B == 0) return;
  const Tensor q = queries.detach().to(acc_dtype).contiguous();  // see topk_similarity_cpu

  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "topk_similarity_update_cpu", [&] {
    dispatch_largest(largest, [&](auto largest_t) {
      constexpr bool kLargest = decltype(largest_t)::value;
      scalar_t* v = values.data_ptr<scalar_t>();
      int64_t* ix = indices.data_ptr<int64_t>();
      at::parallel_for(0, B, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          RowHeap<scalar_t, kLargest>{v + row * k, ix + row * k, k}.make();
        }
      });
      fold_database<scalar_t, kLargest>(q, database_block.detach(), index_offset, v, ix, k);
      sort_rows<scalar_t, kLargest>(v, ix, B, k);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CPU, m) {
  m.impl("topk_similarity", &topk_similarity_cpu);
  m.impl("topk_similarity_update", &topk_similarity_update_cpu);
}

}  // namespace fastap
