// CPU kernels of the exact top-k similarity search. float32 searches (float16/bfloat16 inputs
// included) go to the certified engine of topk_certified.cpp; this file ranks float64 scores.
//
// Work is split into lanes: a lane owns a chunk of query rows (and, when there are fewer chunks
// than threads, a slice of the database). A lane walks its database rows in sub-blocks and, per
// sub-block, multiplies its query chunk by the sub-block with at::mm (MKL; single-threaded
// inside the parallel region, so the threads never wait on each other) into a private tile small
// enough to stay in its core's L2 cache, and folds the tile into its rows' running top-k while
// it is still hot. The (B, N) score matrix never exists; extra memory is one tile per thread
// (about 1 MiB), the running top-k (2k entries per query row, at most kReservoirBytes: queries
// beyond that are processed in groups), and a block converted to float64 when the database is
// not already in it (a float32 database against float64 queries, or non-unit column stride).
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "topk_certified.h"
#include "topk_common.h"
#include "topk_similarity.h"

namespace fastap {
namespace {

using at::Tensor;
using namespace topk_cpu;

template <typename acc_t>
struct Entry {
  acc_t v;
  int64_t i;
};

template <typename acc_t, bool largest>
struct Better {
  bool operator()(const Entry<acc_t>& a, const Entry<acc_t>& b) const {
    return ranks_before<acc_t, largest>(a.v, a.i, b.v, b.i);
  }
};

// What a row keeps between tiles besides its entries: how many there are, and the threshold a
// new candidate must rank before (index -1, value ∓inf while fewer than k have been seen).
template <typename acc_t>
struct RowMeta {
  int64_t count;
  Entry<acc_t> thr;
};

// Running top-k of one query row as a reservoir: up to cap = 2k unordered entries, each ranked
// before the threshold when it arrived. When the reservoir is full, a selection (nth_element,
// O(cap)) keeps the k best and makes the k-th of them the threshold. Between selections the
// threshold only lags behind the true k-th best, which lets a few extra candidates in but never
// drops one that belongs to the top-k. Appends are sequential, so unlike a binary heap of k
// entries (log k scattered accesses per insertion) a large k stays cheap; the amortised cost is
// O(1) per admitted candidate.
template <typename acc_t, bool largest>
struct RowTopK {
  Entry<acc_t>* e;
  RowMeta<acc_t>* m;
  int64_t k;

  int64_t cap() const { return 2 * k; }

  void clear() {
    m->count = 0;
    m->thr = {empty_slot_value<acc_t, largest>(), -1};
  }

  void select() {
    std::nth_element(e, e + k - 1, e + m->count, Better<acc_t, largest>{});
    m->count = k;
    m->thr = e[k - 1];
  }

  // The caller has checked that (v, i) ranks before the threshold.
  void push(acc_t v, int64_t i) {
    e[m->count++] = {v, i};
    if (m->count == cap()) select();
  }

  void offer(acc_t v, int64_t i) {
    if (ranks_before<acc_t, largest>(v, i, m->thr.v, m->thr.i)) push(v, i);
  }

  // From a (k,) state row, best first or in any order; index < 0 marks an empty slot.
  void load(const acc_t* v, const int64_t* ix) {
    clear();
    for (int64_t p = 0; p < k; ++p) {
      if (ix[p] >= 0) e[m->count++] = {v[p], ix[p]};
    }
    if (m->count == k) select();
  }

  // The k best, best first; slots beyond the entries seen are empty (∓inf, -1).
  void store(acc_t* v, int64_t* ix) {
    if (m->count > k) select();
    std::sort(e, e + m->count, Better<acc_t, largest>{});
    for (int64_t p = 0; p < k; ++p) {
      const bool full = p < m->count;
      v[p] = full ? e[p].v : empty_slot_value<acc_t, largest>();
      ix[p] = full ? e[p].i : -1;
    }
  }
};

// Folds scores s[0..n) of database items offset..offset+n-1 into one row's top-k. O(n) compares
// against the threshold; only candidates that pass it pay for the exact comparison.
template <typename acc_t, bool largest>
void fold_row(const acc_t* s, int64_t n, int64_t offset, RowTopK<acc_t, largest> row) {
  acc_t thr = row.m->thr.v;
  // `not worse than the threshold` is true for equal scores and NaN, which the exact comparison
  // then settles; an empty threshold holds ∓inf, so every candidate passes until k were seen.
  auto passes = [&thr](acc_t x) { return largest ? !(x < thr) : !(x > thr); };
  auto consider = [&](int64_t j) {
    if (passes(s[j])) {
      row.offer(s[j], offset + j);
      thr = row.m->thr.v;
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

// The exact top-k of rows of q (B, D), contiguous in acc_t, against database (N, D), database
// indices offset..offset+N-1, written best first to out_v/out_i (B, k). With `merge_state`, the
// k entries already in out_v/out_i (index -1: empty) take part as if seen before the database.
template <typename acc_t, bool largest>
void topk_rows(const Tensor& q, const Tensor& database, int64_t offset, int64_t k,
               acc_t* out_v, int64_t* out_i, bool merge_state) {
  const int64_t B = q.size(0), N = database.size(0), D = q.size(1);
  if (B == 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t entry_bytes = sizeof(Entry<acc_t>);
  // Queries are taken in groups whose reservoirs fit kReservoirBytes, each group streaming the
  // whole database, so that a huge B or k does not cost B·2k entries of extra memory.
  const int64_t group_rows = std::clamp<int64_t>(kReservoirBytes / (2 * k * entry_bytes),
                                                 std::min(B, threads), B);

  // MKL reads the database in place when its rows are unit-stride in the right dtype; otherwise
  // blocks are converted into one reused buffer, so half-precision or strided databases cost
  // kConvertBytes, not a full copy.
  const bool in_place = database.scalar_type() == q.scalar_type() &&
                        (database.stride(1) == 1 || D <= 1);
  const int64_t row_bytes = int64_t(sizeof(acc_t)) * std::max<int64_t>(D, 1);
  const int64_t block_rows =
      in_place ? std::max<int64_t>(N, 1) : std::max<int64_t>(1, kConvertBytes / row_bytes);
  Tensor convert_buf;
  if (!in_place && N > 0) convert_buf = at::empty({std::min(block_rows, N), D}, q.options());

  std::vector<Entry<acc_t>> entries;
  std::vector<RowMeta<acc_t>> meta;
  for (int64_t g0 = 0; g0 < B; g0 += group_rows) {
    const int64_t G = std::min(group_rows, B - g0);
    const LanePlan plan = plan_lanes(G, std::max<int64_t>(N, 1), threads, sizeof(acc_t));
    entries.resize(plan.splits * G * 2 * k);
    meta.resize(plan.splits * G);
    // Reservoir of row r (within the group) for database split p.
    auto row_topk = [&](int64_t p, int64_t r) {
      const int64_t slot = p * G + r;
      return RowTopK<acc_t, largest>{entries.data() + slot * 2 * k, meta.data() + slot, k};
    };
    at::parallel_for(0, G, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (merge_state) {
          row_topk(0, r).load(out_v + (g0 + r) * k, out_i + (g0 + r) * k);
        } else {
          row_topk(0, r).clear();
        }
        for (int64_t p = 1; p < plan.splits; ++p) row_topk(p, r).clear();
      }
    });

    const Tensor qg = q.narrow(0, g0, G);
    for (int64_t b0 = 0; b0 < N; b0 += block_rows) {
      const int64_t nb = std::min(block_rows, N - b0);
      const Tensor block = database_rows(database, b0, nb, convert_buf);
      for_each_tile(
          plan, G, nb, [&] { return at::empty({plan.chunk_rows * plan.sub_rows}, q.options()); },
          [&](Tensor& tile, int64_t split, int64_t r0, int64_t rows, int64_t t, int64_t ns) {
            Tensor scores = tile.narrow(0, 0, rows * ns).view({rows, ns});
            at::mm_out(scores, qg.narrow(0, r0, rows), block.narrow(0, t, ns).t());
            const acc_t* s = scores.const_data_ptr<acc_t>();
            for (int64_t r = 0; r < rows; ++r) {
              fold_row<acc_t, largest>(s + r * ns, ns, offset + b0 + t, row_topk(split, r0 + r));
            }
          });
    }

    at::parallel_for(0, G, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        RowTopK<acc_t, largest> row = row_topk(0, r);
        for (int64_t p = 1; p < plan.splits; ++p) {
          const RowTopK<acc_t, largest> part = row_topk(p, r);
          for (int64_t e = 0; e < part.m->count; ++e) row.offer(part.e[e].v, part.e[e].i);
        }
        row.store(out_v + (g0 + r) * k, out_i + (g0 + r) * k);
      }
    });
  }
}

std::tuple<Tensor, Tensor> topk_similarity_cpu(const Tensor& queries, const Tensor& database,
                                               int64_t k, bool largest) {
  const auto acc_dtype = check_topk_similarity_args(queries, database, "database");
  check_topk_k(k, database.size(0));
  const int64_t B = queries.size(0);
  Tensor values = at::empty({B, k}, queries.options().dtype(acc_dtype));
  Tensor indices = at::empty({B, k}, queries.options().dtype(at::kLong));
  if (B == 0) return {values, indices};
  // Detached: the op is registered as non-differentiable (fastap/ops.py), and the products run
  // on pool threads, where a dispatch guard set here would not reach them, so nothing inside
  // may require grad.
  const Tensor q = queries.detach().to(acc_dtype).contiguous();
  if (acc_dtype == at::kFloat) {
    certified_topk(q, database.detach(), 0, k, largest,
                   values.data_ptr<float>(), indices.data_ptr<int64_t>(), /*merge_state=*/false);
    return {values, indices};
  }
  dispatch_largest(largest, [&](auto largest_t) {
    constexpr bool kLargest = decltype(largest_t)::value;
    topk_rows<double, kLargest>(q, database.detach(), 0, k, values.data_ptr<double>(),
                                indices.data_ptr<int64_t>(), /*merge_state=*/false);
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
  if (acc_dtype == at::kFloat) {
    certified_topk(q, database_block.detach(), index_offset, k, largest,
                   values.data_ptr<float>(), indices.data_ptr<int64_t>(), /*merge_state=*/true);
    return;
  }
  dispatch_largest(largest, [&](auto largest_t) {
    constexpr bool kLargest = decltype(largest_t)::value;
    topk_rows<double, kLargest>(q, database_block.detach(), index_offset, k,
                                values.data_ptr<double>(), indices.data_ptr<int64_t>(),
                                /*merge_state=*/true);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CPU, m) {
  m.impl("topk_similarity", &topk_similarity_cpu);
  m.impl("topk_similarity_update", &topk_similarity_update_cpu);
}

}  // namespace fastap
