// What the two CPU top-k engines share: how a group of query rows is spread over the threads.
// topk_similarity.cpp keeps a reservoir of scores (float64), topk_certified.cpp a certified
// candidate list (float32).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

namespace fastap {
namespace topk_cpu {

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
// Reservoirs (2k entries per query row) of one group of queries.
constexpr int64_t kReservoirBytes = int64_t(32) << 20;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How a group of query rows is spread over the threads: `chunks` row chunks of `chunk_rows`,
// each split `splits` ways over the database; a lane is one (chunk, split) pair.
struct LanePlan {
  int64_t chunks, chunk_rows, splits, sub_rows;
};

inline LanePlan plan_lanes(int64_t rows, int64_t num_database, int64_t threads,
                           int64_t elem_bytes) {
  int64_t chunks = ceil_div(rows, kMaxChunkRows);
  if (chunks < threads) {
    chunks = std::min(threads, ceil_div(rows, kMinChunkRows));
  } else {
    chunks = ceil_div(chunks, threads) * threads;  // equal work per thread
  }
  const int64_t chunk_rows = ceil_div(rows, std::clamp<int64_t>(chunks, 1, rows));
  chunks = ceil_div(rows, chunk_rows);
  // Threads left over by a small batch take slices of the database, each into its own
  // reservoirs (cheap exactly because the batch is small), merged at the end.
  const int64_t splits =
      chunks >= threads ? 1 : std::clamp(ceil_div(threads, chunks), int64_t(1), num_database);
  const int64_t sub_rows = std::max<int64_t>(16, kTileBytes / (elem_bytes * chunk_rows));
  return {chunks, chunk_rows, splits, sub_rows};
}

// Walks the (query chunk × database sub-block) tiles of a group of `rows` query rows against
// `n` database rows on the threads, lane by lane: tile(state, split, r0, nr, t, ns) for query
// rows r0 .. r0 + nr and database rows t .. t + ns of split `split`, with one state per thread
// from make_state() (its scratch buffers).
template <typename MakeState, typename Tile>
inline void for_each_tile(const LanePlan& plan, int64_t rows, int64_t n, MakeState make_state,
                          Tile tile) {
  at::parallel_for(0, plan.chunks * plan.splits, 1, [&](int64_t lane_begin, int64_t lane_end) {
    auto state = make_state();
    for (int64_t lane = lane_begin; lane < lane_end; ++lane) {
      const int64_t chunk = lane / plan.splits, split = lane % plan.splits;
      const int64_t r0 = chunk * plan.chunk_rows, nr = std::min(plan.chunk_rows, rows - r0);
      const int64_t s0 = n * split / plan.splits, s1 = n * (split + 1) / plan.splits;
      for (int64_t t = s0; t < s1; t += plan.sub_rows) {
        tile(state, split, r0, nr, t, std::min(plan.sub_rows, s1 - t));
      }
    }
  });
}

// Database rows b0 .. b0 + nb as the products read them: in place when `buffer` is undefined,
// else copied (and converted) into it.
inline at::Tensor database_rows(const at::Tensor& database, int64_t b0, int64_t nb,
                                const at::Tensor& buffer) {
  at::Tensor block = database.narrow(0, b0, nb);
  if (!buffer.defined()) return block;
  at::Tensor converted = buffer.narrow(0, 0, nb);
  converted.copy_(block);
  return converted;
}

}  // namespace topk_cpu
}  // namespace fastap
