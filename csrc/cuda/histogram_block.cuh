// Block-level pieces of the CUDA kernels, shared by the score-matrix ops (histogram_ap.cu) and
// the fused embedding ops (embedding_ap.cu): one block bins one query row.
#pragma once

#include <algorithm>

#include "histogram_ap.h"

namespace fastap::cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Without an opt-in, a block's static and dynamic shared memory together stay within 48 KiB;
// the binning kernels also hold two static ints (the block's positives and flags).
constexpr size_t kSharedBudget = 48 * 1024 - 64;

template <typename acc_t>
inline int histogram_copies(int64_t num_bins) {
  const size_t per_copy = 2 * (num_bins + kHistPad) * sizeof(acc_t);
  TORCH_CHECK_VALUE(per_copy <= kSharedBudget, "num_bins = ", num_bins,
                    " is too many bins for the CUDA kernel (at most ",
                    kSharedBudget / (2 * sizeof(acc_t)) - kHistPad, ")");
  return per_copy * kWarps <= kSharedBudget ? kWarps : 1;
}

// Bins row i's scores at columns [col_begin, col_begin + count) (`row` points at col_begin) into
// shared memory. On return (after a barrier) the first histogram copy holds the row's c and c⁺,
// padded (index kPad is bin 0), and *positives / *flags the block's totals.
template <typename score_t, typename acc_t, typename Relevance>
__device__ void bin_row_block(const score_t* __restrict__ row, int64_t col_stride, int64_t i,
                              int64_t col_begin, int64_t count, const Relevance& relevant,
                              const BinAxis<acc_t>& axis, bool exclude_diagonal, int copies,
                              acc_t* hist, int* positives, int* flags) {
  const int64_t stride = axis.num_bins + kHistPad;
  for (int64_t k = threadIdx.x; k < 2 * stride * copies; k += blockDim.x) hist[k] = acc_t(0);
  if (threadIdx.x == 0) *positives = *flags = 0;
  __syncthreads();

  acc_t* c = hist + 2 * stride * ((threadIdx.x / 32) % copies) + kPad;
  acc_t* cp = c + stride;
  int my_positives = 0, my_flags = 0;
  for (int64_t jj = threadIdx.x; jj < count; jj += blockDim.x) {
    const int64_t j = col_begin + jj;
    if (exclude_diagonal && j == i) continue;
    const acc_t score = static_cast<acc_t>(row[jj * col_stride]);
    const int y = relevant(i, j);
    if (!::isfinite(score) || y > 1) {
      my_flags |= ::isfinite(score) ? kTargetNotBinary : kNonFiniteScore;
      continue;
    }
    const auto span = axis.locate(score);
    const acc_t upper_w = span.frac, lower_w = acc_t(1) - span.frac;
    atomicAdd(c + span.lower, lower_w);
    atomicAdd(c + span.lower + 1, upper_w);
    if (y) {
      atomicAdd(cp + span.lower, lower_w);
      atomicAdd(cp + span.lower + 1, upper_w);
    }
    my_positives += y;
  }
  if (my_positives) atomicAdd(positives, my_positives);
  if (my_flags) atomicOr(flags, my_flags);
  __syncthreads();

  // Fold the per-warp copies into the first one.
  for (int64_t k = threadIdx.x; k < 2 * stride; k += blockDim.x) {
    acc_t total = hist[k];
    for (int w = 1; w < copies; ++w) total += hist[w * 2 * stride + k];
    hist[k] = total;
  }
  __syncthreads();
}

inline int block_threads(int64_t num_cols) {
  return num_cols >= kThreads ? kThreads : static_cast<int>(std::max<int64_t>(32, (num_cols + 31) / 32 * 32));
}

}  // namespace fastap::cuda
