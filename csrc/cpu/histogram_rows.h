// Per-row building blocks of the CPU kernels, shared by the score-matrix ops (histogram_ap.cpp)
// and the fused embedding ops (embedding_ap.cpp), which feed them one tile of columns at a time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "histogram_ap.h"

namespace fastap::cpu {

// Rows are binned kChunk scores at a time, in two loops: the first only locates the scores on
// the bin axis, into small buffers, so that the compiler vectorises it (float -> int32
// conversions, selects); the second does the scattered histogram updates, which stay scalar.
// At B = N = 4096 this took the forward from 57 to 22 ms and the backward from 66 to 33 ms on
// two cores, with bit-identical results (the arithmetic and the order of the additions are
// those of a loop that locates each score where it adds it).
constexpr int64_t kChunk = 256;

template <typename acc_t>
struct ChunkBins {
  int32_t lower[kChunk];
  acc_t frac[kChunk];
  acc_t sloped[kChunk];  // 1 where the weights move with the score, else 0 (see BinSpan)
};

// Locates scores row[0], row[col_stride], ... (count <= kChunk of them) into `bins`: lower and
// frac for the forward, lower and sloped for the backward.
template <bool for_backward, typename score_t, typename acc_t>
inline void locate_chunk(const BinAxis<acc_t>& axis, const score_t* row, int64_t col_stride,
                         int64_t count, ChunkBins<acc_t>& bins) {
  const BinAxis<acc_t> local_axis = axis;  // a copy the stores below cannot alias
  for (int64_t jj = 0; jj < count; ++jj) {
    const auto span = local_axis.template locate<int32_t>(static_cast<acc_t>(row[jj * col_stride]));
    bins.lower[jj] = span.lower;
    if constexpr (for_backward) {
      bins.sloped[jj] = span.sloped ? acc_t(1) : acc_t(0);
    } else {
      bins.frac[jj] = span.frac;
    }
  }
}

// Adds the scores of row i, columns [col_begin, col_begin + count), to the padded histograms
// `all_pad` / `pos_pad` (length M + kHistPad). `row` points at column col_begin with stride
// `col_stride`. Returns the number of positives added; raises BadInput bits in `flags` (a
// flagged score is still binned, harmlessly: the caller raises instead of returning results).
template <typename score_t, typename acc_t, typename Relevance>
int64_t accumulate_row(const BinAxis<acc_t>& axis, const score_t* row, int64_t col_stride,
                       int64_t i, int64_t col_begin, int64_t count, const Relevance& relevant,
                       bool exclude_diagonal, acc_t* all_pad, acc_t* pos_pad, int& flags) {
  acc_t* c = all_pad + kPad;
  acc_t* cp = pos_pad + kPad;
  int64_t positives = 0;
  // Local copies: the histogram stores could alias `flags` and `relevant` as far as the
  // compiler knows, which would reload and store them for every score.
  int local_flags = 0;
  const Relevance local_relevant = relevant;
  ChunkBins<acc_t> bins;
  for (int64_t j0 = 0; j0 < count; j0 += kChunk) {
    const int64_t n = std::min(kChunk, count - j0);
    const score_t* chunk = row + j0 * col_stride;
    locate_chunk<false>(axis, chunk, col_stride, n, bins);
    for (int64_t jj = 0; jj < n; ++jj) {
      const int64_t j = col_begin + j0 + jj;
      if (exclude_diagonal && j == i) continue;
      const int y = local_relevant(i, j);
      const bool finite = std::isfinite(static_cast<acc_t>(chunk[jj * col_stride]));
      local_flags |= (finite ? 0 : kNonFiniteScore) | (y > 1 ? kTargetNotBinary : 0);
      const int32_t k = bins.lower[jj];
      const acc_t upper_w = bins.frac[jj], lower_w = acc_t(1) - upper_w;
      c[k] += lower_w;
      c[k + 1] += upper_w;
      // Positives are rare in retrieval batches, so this branch is predicted well.
      if (y != 0) {
        cp[k] += y * lower_w;
        cp[k + 1] += y * upper_w;
        positives += y;
      }
    }
  }
  flags |= local_flags;
  return positives;
}

// Writes dL/ds for row i, columns [col_begin, col_begin + count), given the padded bin gradients
// G⁺ / G⁻ of the row (from ap_bin_gradients). `out` points at column col_begin (stride 1); it
// may be `row` itself (each chunk is read before it is overwritten).
template <typename score_t, typename out_t, typename acc_t, typename Relevance>
void row_score_gradients(const BinAxis<acc_t>& axis, const score_t* row, int64_t col_stride,
                         int64_t i, int64_t col_begin, int64_t count, const Relevance& relevant,
                         bool exclude_diagonal, const acc_t* gpos_pad, const acc_t* gneg_pad,
                         out_t* out) {
  const Relevance local_relevant = relevant;  // as in accumulate_row
  ChunkBins<acc_t> bins;
  for (int64_t j0 = 0; j0 < count; j0 += kChunk) {
    const int64_t n = std::min(kChunk, count - j0);
    locate_chunk<true>(axis, row + j0 * col_stride, col_stride, n, bins);
    for (int64_t jj = 0; jj < n; ++jj) {
      const int64_t j = col_begin + j0 + jj;
      const acc_t grad = score_gradient(axis, bins.lower[jj], bins.sloped[jj],
                                        local_relevant(i, j) == 1 ? gpos_pad : gneg_pad);
      out[j0 + jj] = exclude_diagonal && j == i ? out_t(0) : static_cast<out_t>(grad);
    }
  }
}

// AP of a finished row, NaN without positives.
template <typename acc_t>
acc_t finish_row(const acc_t* all_pad, const acc_t* pos_pad, int64_t num_bins, int64_t positives) {
  if (positives == 0) return std::numeric_limits<acc_t>::quiet_NaN();
  return ap_from_histograms(pos_pad + kPad, all_pad + kPad, num_bins,
                            static_cast<acc_t>(positives));
}

// Rows per parallel task: enough scores per task (about 32k) to amortise the scheduling.
inline int64_t row_grain(int64_t num_cols) { return std::max<int64_t>(1, 32768 / num_cols); }

}  // namespace fastap::cpu
