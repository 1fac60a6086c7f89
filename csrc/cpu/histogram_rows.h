// Per-row building blocks of the CPU kernels, shared by the score-matrix ops (histogram_ap.cpp)
// and the fused embedding ops (embedding_ap.cpp), which feed them one tile of columns at a time.
#pragma once

#include <cmath>
#include <limits>

#include "histogram_ap.h"

namespace fastap::cpu {

// Adds the scores of row i, columns [col_begin, col_begin + count), to the padded histograms
// `all_pad` / `pos_pad` (length M + kHistPad). `row` points at column col_begin with stride
// `col_stride`. Returns the number of positives added; raises BadInput bits in `flags`.
template <typename score_t, typename acc_t, typename Relevance>
int64_t accumulate_row(const BinAxis<acc_t>& axis, const score_t* row, int64_t col_stride,
                       int64_t i, int64_t col_begin, int64_t count, const Relevance& relevant,
                       bool exclude_diagonal, acc_t* all_pad, acc_t* pos_pad, int& flags) {
  acc_t* c = all_pad + kPad;
  acc_t* cp = pos_pad + kPad;
  int64_t positives = 0;
  for (int64_t jj = 0; jj < count; ++jj) {
    const int64_t j = col_begin + jj;
    if (exclude_diagonal && j == i) continue;
    const acc_t score = static_cast<acc_t>(row[jj * col_stride]);
    const int y = relevant(i, j);
    if (!std::isfinite(score) || y > 1) {
      flags |= std::isfinite(score) ? kTargetNotBinary : kNonFiniteScore;
      continue;
    }
    const auto span = axis.locate(score);
    const acc_t upper_w = span.frac, lower_w = acc_t(1) - span.frac;
    c[span.lower] += lower_w;
    c[span.lower + 1] += upper_w;
    cp[span.lower] += y * lower_w;
    cp[span.lower + 1] += y * upper_w;
    positives += y;
  }
  return positives;
}

// Writes dL/ds for row i, columns [col_begin, col_begin + count), given the padded bin gradients
// G⁺ / G⁻ of the row (from ap_bin_gradients). `out` points at column col_begin (stride 1).
template <typename score_t, typename out_t, typename acc_t, typename Relevance>
void row_score_gradients(const BinAxis<acc_t>& axis, const score_t* row, int64_t col_stride,
                         int64_t i, int64_t col_begin, int64_t count, const Relevance& relevant,
                         bool exclude_diagonal, const acc_t* gpos_pad, const acc_t* gneg_pad,
                         out_t* out) {
  for (int64_t jj = 0; jj < count; ++jj) {
    const int64_t j = col_begin + jj;
    if (exclude_diagonal && j == i) {
      out[jj] = out_t(0);
      continue;
    }
    const auto span = axis.locate(static_cast<acc_t>(row[jj * col_stride]));
    const acc_t* bin_grad = relevant(i, j) == 1 ? gpos_pad : gneg_pad;
    out[jj] = static_cast<out_t>(score_gradient(axis, span, bin_grad));
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
