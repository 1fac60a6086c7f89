// Fused embedding -> AP on CUDA: each (query block x database tile) of scores is one cuBLAS GEMM
// into a reused float32 buffer, binned by one block per row into running histograms in global
// memory. The backward recomputes each tile, turns it into dL/dscores and multiplies that into
// both embedding gradients (four GEMMs in all); the scores are never stored whole. Half and
// bfloat16 embeddings are multiplied as they are (tensor cores, float32 accumulation): the
// score gradients go back into the two gradient GEMMs as a half/bfloat16 tile.
#include <algorithm>
#include <cmath>
#include <limits>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
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

// Writes one tile's dL/dscores, times `scale`, into `grad`: the tile itself (float32/float64
// embeddings) or its half/bfloat16 copy for the tensor-core gradient products.
template <typename acc_t, typename grad_t>
__global__ void tile_gradient_kernel(const acc_t* tile, grad_t* grad, int64_t q0, int64_t n0,
                                     int64_t nt, LabelRelevance relevant, BinAxis<acc_t> axis,
                                     bool exclude_diagonal, acc_t scale,
                                     const acc_t* __restrict__ bin_grad) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* g = reinterpret_cast<acc_t*>(shared_bytes);
  const int64_t r = blockIdx.x, i = q0 + r, stride = axis.num_bins + kHistPad;
  for (int64_t k = threadIdx.x; k < 2 * stride; k += blockDim.x) {
    g[k] = bin_grad[i * 2 * stride + k];
  }
  __syncthreads();
  const acc_t* row = tile + r * nt;
  grad_t* out = grad + r * nt;
  for (int64_t jj = threadIdx.x; jj < nt; jj += blockDim.x) {
    const int64_t j = n0 + jj;
    acc_t value = 0;
    if (!(exclude_diagonal && j == i)) {
      const auto span = axis.locate(row[jj]);
      value = scale * score_gradient(axis, span, relevant(i, j) == 1 ? g : g + stride);
    }
    out[jj] = static_cast<grad_t>(value);
  }
}

int row_blocks(int64_t B) { return static_cast<int>((B + kThreads - 1) / kThreads); }

// The dtype the GEMMs read the embeddings in: half and bfloat16 as they are, with float32
// outputs (cuBLAS refuses those while torch.backends.cuda.matmul.allow_fp16_accumulation is
// set, so half is converted then, as is everything before torch 2.8), everything else as its
// accumulation dtype.
at::ScalarType gemm_dtype(const Tensor& embeddings) {
  const auto dtype = embeddings.scalar_type();
#if FASTAP_FLOAT_OUTPUT_GEMM
  if (dtype == at::kBFloat16 ||
      (dtype == at::kHalf && !at::globalContext().allowFP16AccumulationCuBLAS())) {
    return dtype;
  }
#endif
  return accumulation_dtype(embeddings);
}

// 2^14: a quarter of half's largest finite value.
constexpr double kHalfGradientCeiling = 16384.0;

// A power of two (exact to apply and undo) that brings the largest |dL/ds| of the backward near
// kHalfGradientCeiling, so that a half copy of the score gradients neither overflows (a loss
// scaler's large factors) nor sinks into half's subnormals (1/B-weighted means of big batches).
// |dL/ds| = |G_k - G_k+1| / Δ <= 2 max|G| / Δ over the bin gradients G of every row.
double half_gradient_scale(const Tensor& bin_grad, double inv_delta) {
  const double bound = 2.0 * bin_grad.abs().max().item<double>() * inv_delta;
  if (!(bound > 0.0) || !std::isfinite(bound)) return 1.0;
  int exponent = 0;
  std::frexp(kHalfGradientCeiling / bound, &exponent);  // = f 2^exponent, f in [0.5, 1)
  return std::ldexp(1.0, std::clamp(exponent - 1, -100, 100));
}

// out += (a @ b) / scale. For half/bfloat16 a and b, the product is formed in float32 (out's
// dtype) in `buffer` (at least out's rows x columns) and added; otherwise scale is 1.
void add_product(Tensor out, const Tensor& a, const Tensor& b, double scale, Tensor& buffer) {
  if (a.scalar_type() == out.scalar_type()) {
    out.addmm_(a, b);
    return;
  }
  Tensor product = buffer.narrow(0, 0, out.numel()).view(out.sizes());
  mm_into(product, a, b);
  out.add_(product, 1.0 / scale);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> embedding_ap_cuda(
    const Tensor& queries, const Tensor& database, const Tensor& query_labels,
    const Tensor& database_labels, int64_t num_bins, double lo, double hi, bool open_ends,
    bool exclude_diagonal) {
  check_embedding_ap_args(queries, database, query_labels, database_labels, num_bins, lo, hi,
                          exclude_diagonal);
  const c10::cuda::CUDAGuard guard(queries.device());
  const int64_t B = queries.size(0), M = num_bins, stride = M + kHistPad;
  const auto acc_dtype = accumulation_dtype(queries), in_dtype = gemm_dtype(queries);
  const Tensor Q = queries.to(in_dtype).contiguous(), D = database.to(in_dtype).contiguous();
  const auto opts = Q.options().dtype(acc_dtype);
  Tensor hist = at::zeros({B, 2 * stride}, opts);
  Tensor positives = at::zeros({B}, opts.dtype(at::kLong));
  Tensor bad_input = at::zeros({1}, opts.dtype(at::kInt));
  Tensor ap = at::empty({B}, opts), num_pos = at::empty({B}, opts);
  const auto relevant = label_relevance(query_labels, database_labels);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "embedding_ap_cuda", [&] {
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
    bool open_ends, bool exclude_diagonal, std::array<bool, 2> output_mask) {
  check_embedding_ap_args(queries, database, query_labels, database_labels, num_bins, lo, hi,
                          exclude_diagonal);
  const c10::cuda::CUDAGuard guard(queries.device());
  const int64_t B = queries.size(0), M = num_bins, stride = M + kHistPad;
  const auto acc_dtype = accumulation_dtype(queries);
  const BinState state = bin_state(grad_ap, pos_hist, all_hist, num_pos, B, M, acc_dtype);
  const auto in_dtype = gemm_dtype(queries);
  const Tensor Q = queries.to(in_dtype).contiguous(), D = database.to(in_dtype).contiguous();
  const auto acc_opts = Q.options().dtype(acc_dtype);
  const auto [want_q, want_d] = output_mask;
  Tensor grad_q = want_q ? at::zeros(Q.sizes(), acc_opts) : Tensor(),
         grad_d = want_d ? at::zeros(D.sizes(), acc_opts) : Tensor();
  Tensor bin_grad = at::zeros({B, 2 * stride}, acc_opts);
  const auto relevant = label_relevance(query_labels, database_labels);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // For half/bfloat16 GEMMs: the score gradients of one tile, and one float32 product.
  const bool in_place = in_dtype == acc_dtype;
  const int64_t bq_max = std::min(B, kQueryBlock), nt_max = std::min(D.size(0), kDatabaseTile);
  Tensor grad_tile = in_place ? Tensor() : at::empty({bq_max * nt_max}, Q.options());
  Tensor product =
      in_place ? Tensor() : at::empty({std::max(bq_max, nt_max) * Q.size(1)}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "embedding_ap_cuda_bw", [&] {
    using grad_t = scalar_t;
    using acc_t = at::opmath_type<grad_t>;
    const auto axis = BinAxis<acc_t>::make(M, lo, hi, open_ends);
    histogram_copies<acc_t>(M);  // the same bin limit as the forward
    bin_gradients_kernel<<<row_blocks(B), kThreads, 0, stream>>>(
        state.grad_ap.const_data_ptr<acc_t>(), state.pos_hist.const_data_ptr<acc_t>(),
        state.all_hist.const_data_ptr<acc_t>(), state.num_pos.const_data_ptr<acc_t>(), B, M,
        bin_grad.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // bfloat16 has float32's exponent range: only half needs its gradients scaled.
    const double scale = in_dtype == at::kHalf
                             ? half_gradient_scale(bin_grad, static_cast<double>(axis.inv_delta))
                             : 1.0;
    for_each_tile(Q, D, [&](int64_t q0, int64_t bq, int64_t n0, int64_t nt, Tensor& tile) {
      Tensor grad = in_place ? tile : grad_tile.narrow(0, 0, bq * nt).view({bq, nt});
      tile_gradient_kernel<<<bq, block_threads(nt), 2 * stride * sizeof(acc_t), stream>>>(
          tile.const_data_ptr<acc_t>(), grad.data_ptr<grad_t>(), q0, n0, nt, relevant, axis,
          exclude_diagonal, static_cast<acc_t>(scale), bin_grad.const_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (want_q) {
        add_product(grad_q.narrow(0, q0, bq), grad, D.narrow(0, n0, nt), scale, product);
      }
      if (want_d) {
        add_product(grad_d.narrow(0, n0, nt), grad.t(), Q.narrow(0, q0, bq), scale, product);
      }
    });
  });
  return {unless_masked(want_q, grad_q, queries), unless_masked(want_d, grad_d, database)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CUDA, m) {
  m.impl("embedding_ap", &embedding_ap_cuda);
  m.impl("embedding_ap_backward", &embedding_ap_backward_cuda);
}

}  // namespace fastap
