// CUDA kernels of the histogram-binned AP: one block per query row. Threads stride over the row
// and accumulate the two touched bins into per-warp shared-memory histograms (few collisions
// even when most scores share a bin); one thread then runs the O(M) scans.
#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/histogram_block.cuh"

namespace fastap {
namespace {

using namespace fastap::cuda;
using at::Tensor;
using c10::optional;

template <typename score_t, typename acc_t, typename Relevance>
__global__ void histogram_ap_kernel(const score_t* __restrict__ scores, int64_t ss0, int64_t ss1,
                                    Relevance relevant, int64_t num_cols, BinAxis<acc_t> axis,
                                    bool exclude_diagonal, int copies, acc_t* __restrict__ ap_out,
                                    acc_t* __restrict__ pos_out, acc_t* __restrict__ all_out,
                                    acc_t* __restrict__ npos_out, int* __restrict__ bad_input) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* hist = reinterpret_cast<acc_t*>(shared_bytes);
  __shared__ int positives, flags;
  const int64_t M = axis.num_bins, stride = M + kHistPad;
  const int64_t i = blockIdx.x;
  bin_row_block(scores + i * ss0, ss1, i, 0, num_cols, relevant, axis, exclude_diagonal, copies,
                hist, &positives, &flags);
  const acc_t* c0 = hist + kPad;
  const acc_t* cp0 = c0 + stride;
  for (int64_t k = threadIdx.x; k < M; k += blockDim.x) {
    all_out[i * M + k] = c0[k];
    pos_out[i * M + k] = cp0[k];
  }
  if (threadIdx.x == 0) {
    const acc_t npos = static_cast<acc_t>(positives);
    npos_out[i] = npos;
    ap_out[i] = positives > 0 ? ap_from_histograms(cp0, c0, M, npos)
                              : std::numeric_limits<acc_t>::quiet_NaN();
    if (flags) atomicOr(bad_input, flags);
  }
}

template <typename score_t, typename acc_t, typename Relevance>
__global__ void histogram_ap_backward_kernel(
    const acc_t* __restrict__ grad_ap, const score_t* __restrict__ scores, int64_t ss0,
    int64_t ss1, Relevance relevant, int64_t num_cols, BinAxis<acc_t> axis, bool exclude_diagonal,
    const acc_t* __restrict__ pos_hist, const acc_t* __restrict__ all_hist,
    const acc_t* __restrict__ num_pos, score_t* __restrict__ grad_scores) {
  extern __shared__ unsigned char shared_bytes[];
  const int64_t M = axis.num_bins, stride = M + kHistPad;
  acc_t* gpos = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* gneg = gpos + stride;
  const int64_t i = blockIdx.x;
  score_t* row = grad_scores + i * num_cols;
  // A row without positives has no AP and so no gradient (the loss excludes it).
  if (!(num_pos[i] > acc_t(0)) || grad_ap[i] == acc_t(0)) {
    for (int64_t j = threadIdx.x; j < num_cols; j += blockDim.x) row[j] = score_t(0);
    return;
  }
  for (int64_t k = threadIdx.x; k < 2 * stride; k += blockDim.x) gpos[k] = acc_t(0);
  __syncthreads();
  if (threadIdx.x == 0) {
    ap_bin_gradients(pos_hist + i * M, all_hist + i * M, M, num_pos[i], grad_ap[i], gpos + kPad,
                     gneg + kPad);
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < num_cols; j += blockDim.x) {
    if (exclude_diagonal && j == i) {
      row[j] = score_t(0);
      continue;
    }
    const auto span = axis.locate(static_cast<acc_t>(scores[i * ss0 + j * ss1]));
    row[j] = static_cast<score_t>(
        score_gradient(axis, span, relevant(i, j) == 1 ? gpos : gneg));
  }
}

// One block per row (grid.x is at most 2^31 - 1) and per-row positive counts in int.
void check_grid_rows(int64_t B, int64_t N) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(B <= kMax && N <= kMax, "scores of shape (", B, ", ", N,
                    ") exceed the CUDA kernel's 2^31 - 1 rows or columns; split the batch");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> histogram_ap_cuda(
    const Tensor& scores, const optional<Tensor>& targets, const optional<Tensor>& query_labels,
    const optional<Tensor>& database_labels, int64_t num_bins, double lo, double hi,
    bool open_ends, bool exclude_diagonal) {
  check_histogram_ap_args(
      {scores, targets, query_labels, database_labels, num_bins, lo, hi, exclude_diagonal});
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t B = scores.size(0), N = scores.size(1), M = num_bins;
  check_grid_rows(B, N);
  const auto opts = scores.options().dtype(accumulation_dtype(scores));
  Tensor ap = at::empty({B}, opts), pos_hist = at::empty({B, M}, opts),
         all_hist = at::empty({B, M}, opts), num_pos = at::empty({B}, opts);
  Tensor bad_input = at::zeros({1}, scores.options().dtype(at::kInt));
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "histogram_ap_cuda", [&] {
    using score_t = scalar_t;
    using acc_t = at::opmath_type<score_t>;
    const auto axis = BinAxis<acc_t>::make(M, lo, hi, open_ends);
    const int copies = histogram_copies<acc_t>(M);
    const size_t shared = 2 * (M + kHistPad) * copies * sizeof(acc_t);
    with_relevance(targets, query_labels, database_labels, [&](auto relevant) {
      histogram_ap_kernel<<<B, block_threads(N), shared, stream>>>(
          scores.const_data_ptr<score_t>(), scores.stride(0), scores.stride(1), relevant, N, axis,
          exclude_diagonal, copies, ap.data_ptr<acc_t>(), pos_hist.data_ptr<acc_t>(),
          all_hist.data_ptr<acc_t>(), num_pos.data_ptr<acc_t>(), bad_input.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // Reading the flag synchronises with the kernel: the price of an error instead of a silent NaN.
  raise_bad_input(bad_input.item<int>());
  return {ap, pos_hist, all_hist, num_pos};
}

Tensor histogram_ap_backward_cuda(const Tensor& grad_ap, const Tensor& scores,
                                  const optional<Tensor>& targets,
                                  const optional<Tensor>& query_labels,
                                  const optional<Tensor>& database_labels, const Tensor& pos_hist,
                                  const Tensor& all_hist, const Tensor& num_pos, int64_t num_bins,
                                  double lo, double hi, bool open_ends, bool exclude_diagonal) {
  check_histogram_ap_args(
      {scores, targets, query_labels, database_labels, num_bins, lo, hi, exclude_diagonal});
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t B = scores.size(0), N = scores.size(1), M = num_bins;
  check_grid_rows(B, N);
  const BinState state =
      bin_state(grad_ap, pos_hist, all_hist, num_pos, B, M, accumulation_dtype(scores));
  Tensor grad_scores = at::empty({B, N}, scores.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "histogram_ap_backward_cuda", [&] {
    using score_t = scalar_t;
    using acc_t = at::opmath_type<score_t>;
    const auto axis = BinAxis<acc_t>::make(M, lo, hi, open_ends);
    histogram_copies<acc_t>(M);  // the same bin limit as the forward
    const size_t shared = 2 * (M + kHistPad) * sizeof(acc_t);
    with_relevance(targets, query_labels, database_labels, [&](auto relevant) {
      histogram_ap_backward_kernel<<<B, block_threads(N), shared, stream>>>(
          state.grad_ap.const_data_ptr<acc_t>(), scores.const_data_ptr<score_t>(),
          scores.stride(0), scores.stride(1), relevant, N, axis, exclude_diagonal,
          state.pos_hist.const_data_ptr<acc_t>(), state.all_hist.const_data_ptr<acc_t>(),
          state.num_pos.const_data_ptr<acc_t>(),
          grad_scores.data_ptr<score_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CUDA, m) {
  m.impl("histogram_ap", &histogram_ap_cuda);
  m.impl("histogram_ap_backward", &histogram_ap_backward_cuda);
}

}  // namespace fastap
