// Fused embedding -> AP on CUDA: each (query block x database tile) of scores is one cuBLAS GEMM
// into a reused buffer, binned by one block per row into running histograms in global memory.
// The backward recomputes each tile, rewrites it in place as dL/dscores and multiplies it into
// both embedding gradients (four GEMMs in all); the scores are never stored whole.
#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/histogram_block.cuh"
#include "embedding_tiles.h"

namespace fastap {
namespace {

using namespace fastap::cuda;
using at::Tensor;

// Adds one tile's scores of row i = q0 + blockIdx.x to its running padded histograms
// `hist[i] = [c (M + kHistPad), c⁺ (M + kHistPad)]` and positive count.
template <typename acc_t>
__global__ void bin_tile_kernel(const acc_t* __restrict__ tile, int64_t q0, int64_t n0,
                                int64_t nt, LabelRelevance relevant, BinAxis<acc_t> axis,
                                bool exclude_diagonal, int copies, acc_t* __restrict__ hist,
                                int64_t* __restrict__ positives, int* __restrict__ bad_input) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* block_hist = reinterpret_cast<acc_t*>(shared_bytes);
  __shared__ int block_positives, flags;
  const int64_t r = blockIdx.x, i = q0 + r, width = 2 * (axis.num_bins + kHistPad);
  bin_row_block(tile + r * nt, 1, i, n0, nt, relevant, axis, exclude_diagonal, copies, block_hist,
                &block_positives, &flags);
  // One block owns row i for this tile and tiles run in stream order: no atomics needed.
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) hist[i * width + k] += block_hist[k];
  if (threadIdx.x == 0) {
    positives[i] += block_positives;
    if (flags) atomicOr(bad_input, flags);
  }
}

template <typename acc_t>
__global__ void finish_rows_kernel(const acc_t* __restrict__ hist,
                                   const int64_t* __restrict__ positives, int64_t B, int64_t M,
                                   acc_t* __restrict__ ap, acc_t* __restrict__ num_pos) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= B) return;
  const int64_t stride = M + kHistPad;
  const acc_t* c = hist + i * 2 * stride + kPad;
  const acc_t npos = static_cast<acc_t>(positives[i]);
  num_pos[i] = npos;
  ap[i] = positives[i] > 0 ? ap_from_histograms(c + stride, c, M, npos)
                           : std::numeric_limits<acc_t>::quiet_NaN();
}

// G⁺ / G⁻ of every row into `bin_grad[i] = [G⁺ padded, G⁻ padded]` (zero-initialised; rows
// without positives or without incoming gradient stay zero).
template <typename acc_t>
__global__ void bin_gradients_kernel(const acc_t* __restrict__ grad_ap,
                                     const acc_t* __restrict__ pos_hist,
                                     const acc_t* __restrict__ all_hist,
                                     const acc_t* __restrict__ num_pos, int64_t B, int64_t M,
                                     acc_t* __restrict__ bin_grad) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= B || !(num_pos[i] > acc_t(0)) || grad_ap[i] == acc_t(0)) return;
  const int64_t stride = M + kHistPad;
  acc_t* gpos = bin_grad + i * 2 * stride;
  ap_bin_gradients(pos_hist + i * M, all_hist + i * M, M, num_pos[i], grad_ap[i], gpos + kPad,
                   gpos + stride + kPad);
}

// Rewrites one tile of scores in place as dL/dscores.
template <typename acc_t>
__global__ void tile_gradient_kernel(acc_t* __restrict__ tile, int64_t q0, int64_t n0,
                                     int64_t nt, LabelRelevance relevant, BinAxis<acc_t> axis,
                                     bool exclude_diagonal, const acc_t* __restrict__ bin_grad) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* g = reinterpret_cast<acc_t*>(shared_bytes);
  const int64_t r = blockIdx.x, i = q0 + r, stride = axis.num_bins + kHistPad;
  for (int64_t k = threadIdx.x; k < 2 * stride; k += blockDim.x) g[k] = bin_grad[i * 2 * stride + k];
  __syncthreads();
  acc_t* row = tile + r * nt;
  for (int64_t jj = threadIdx.x; jj < nt; jj += blockDim.x) {
    const int64_t j = n0 + jj;
    if (exclude_diagonal && j == i) {
      row[jj] = acc_t(0);
      continue;
    }
    const auto span = axis.locate(row[jj]);
    row[jj] = score_gradient(axis, span, relevant(i, j) == 1 ? g : g + stride);
  }
}

int row_blocks(int64_t B) { return static_cast<int>((B + kThreads - 1) / kThreads); }

std::tuple<Tensor, Tensor, Tensor, Tensor> embedding_ap_cuda(
    const Tensor& queries, const Tensor& database, const Tensor& query_labels,
    const Tensor& database_labels, int64_t num_bins, double lo, double hi, bool open_ends,
    bool exclude_diagonal) {
  check_embedding_ap_args(queries, database, query_labels, database_labels, num_bins, lo, hi,
                          exclude_diagonal);
  const c10::cuda::CUDAGuard guard(queries.device());
  const int64_t B = queries.size(0), M = num_bins, stride = M + kHistPad;
  const Tensor Q = queries.to(accumulation_dtype(queries)).contiguous();
  const Tensor D = database.to(accumulation_dtype(queries)).contiguous();
  const auto opts = Q.options();
  Tensor hist = at::zeros({B, 2 * stride}, opts);
  Tensor positives = at::zeros({B}, opts.dtype(at::kLong));
  Tensor bad_input = at::zeros({1}, opts.dtype(at::kInt));
  Tensor ap = at::empty({B}, opts), num_pos = at::empty({B}, opts);
  const auto relevant = label_relevance(query_labels, database_labels);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "embedding_ap_cuda", [&] {
    using acc_t = scalar_t;
    const auto axis = BinAxis<acc_t>::make(M, lo, hi, open_ends);
    const int copies = histogram_copies<acc_t>(M);
    const size_t shared = 2 * stride * copies * sizeof(acc_t);
    for_each_tile(Q, D, [&](int64_t q0, int64_t bq, int64_t n0, int64_t nt, const Tensor& tile) {
      bin_tile_kernel<<<bq, block_threads(nt), shared, stream>>>(
          tile.const_data_ptr<acc_t>(), q0, n0, nt, relevant, axis, exclude_diagonal, copies,
          hist.data_ptr<acc_t>(), positives.data_ptr<int64_t>(), bad_input.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    finish_rows_kernel<<<row_blocks(B), kThreads, 0, stream>>>(
        hist.const_data_ptr<acc_t>(), positives.const_data_ptr<int64_t>(), B, M,
        ap.data_ptr<acc_t>(), num_pos.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  raise_bad_input(bad_input.item<int>());
  Tensor all_hist = hist.narrow(1, kPad, M).contiguous();
  Tensor pos_hist = hist.narrow(1, stride + kPad, M).contiguous();
  return {ap, pos_hist, all_hist, num_pos};
}

std::tuple<Tensor, Tensor> embedding_ap_backward_cuda(
    const Tensor& grad_ap, const Tensor& queries, const Tensor& database,
    const Tensor& query_labels, const Tensor& database_labels, const Tensor& pos_hist,
    const Tensor& all_hist, const Tensor& num_pos, int64_t num_bins, double lo, double hi,
    bool open_ends, bool exclude_diagonal) {
  check_embedding_ap_args(queries, database, query_labels, database_labels, num_bins, lo, hi,
                          exclude_diagonal);
  const c10::cuda::CUDAGuard guard(queries.device());
  const int64_t B = queries.size(0), M = num_bins, stride = M + kHistPad;
  const auto acc_dtype = accumulation_dtype(queries);
  const BinState state = bin_state(grad_ap, pos_hist, all_hist, num_pos, B, M, acc_dtype);
  const Tensor Q = queries.to(acc_dtype).contiguous(), D = database.to(acc_dtype).contiguous();
  Tensor grad_q = at::zeros_like(Q), grad_d = at::zeros_like(D);
  Tensor bin_grad = at::zeros({B, 2 * stride}, Q.options());
  const auto relevant = label_relevance(query_labels, database_labels);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "embedding_ap_backward_cuda", [&] {
    using acc_t = scalar_t;
    const auto axis = BinAxis<acc_t>::make(M, lo, hi, open_ends);
    histogram_copies<acc_t>(M);  // the same bin limit as the forward
    bin_gradients_kernel<<<row_blocks(B), kThreads, 0, stream>>>(
        state.grad_ap.const_data_ptr<acc_t>(), state.pos_hist.const_data_ptr<acc_t>(),
        state.all_hist.const_data_ptr<acc_t>(), state.num_pos.const_data_ptr<acc_t>(), B, M,
        bin_grad.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for_each_tile(Q, D, [&](int64_t q0, int64_t bq, int64_t n0, int64_t nt, Tensor& tile) {
      tile_gradient_kernel<<<bq, block_threads(nt), 2 * stride * sizeof(acc_t), stream>>>(
          tile.data_ptr<acc_t>(), q0, n0, nt, relevant, axis, exclude_diagonal,
          bin_grad.const_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_q.narrow(0, q0, bq).addmm_(tile, D.narrow(0, n0, nt));
      grad_d.narrow(0, n0, nt).addmm_(tile.t(), Q.narrow(0, q0, bq));
    });
  });
  return {grad_q.to(queries.scalar_type()), grad_d.to(database.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CUDA, m) {
  m.impl("embedding_ap", &embedding_ap_cuda);
  m.impl("embedding_ap_backward", &embedding_ap_backward_cuda);
}

}  // namespace fastap
