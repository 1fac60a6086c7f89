// What the two CPU top-k engines share: how a group of query rows is spread over the threads.
// topk_similarity.cpp keeps a reservoir of scores (float64), topk_certified.cpp a certified
// candidate list (float32).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

inline LanePlan plan_lanes(int64_t rows, int64_t num_database, int64_t threads, int64_t elem_bytes) {
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

template <typename F>
inline void dispatch_largest(bool largest, F&& f) {
  if (largest) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace topk_cpu
}  // namespace fastap
