// Tiling of scores = queries @ database.T shared by the fused embedding -> AP kernels of every
// device: the GEMM per tile is ATen's (MKL on CPU, cuBLAS on CUDA); only the binning is ours.
#pragma once

#include <algorithm>
#include <array>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/version.h>

#include "histogram_ap.h"

// ATen's GEMM with a float32 output from half/bfloat16 inputs (mm.dtype_out) came in torch 2.8.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define FASTAP_FLOAT_OUTPUT_GEMM 1
#else
#define FASTAP_FLOAT_OUTPUT_GEMM 0
#endif

namespace fastap {

// out = a @ b in out's dtype: float32 from half/bfloat16 a and b (where FASTAP_FLOAT_OUTPUT_GEMM)
// accumulates their exact products in float32; otherwise out, a and b share one dtype.
inline void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
    return;
  }
#if FASTAP_FLOAT_OUTPUT_GEMM
  at::mm_out(out, a, b, out.scalar_type());
#else
  TORCH_CHECK(false, "fastap: a ", out.scalar_type(), " product of ", a.scalar_type(),
              " matrices needs torch >= 2.8");
#endif
}

// The backward's result for one input: its gradient accumulated in `grad`, in the input's
// dtype, or an empty (0,) tensor where output_mask did not ask for it.
inline at::Tensor unless_masked(bool wanted, const at::Tensor& grad, const at::Tensor& input) {
  return wanted ? grad.to(input.scalar_type()) : at::empty({0}, input.options());
}

// A 2048 x 4096 float32 tile is 32 MB: as fast per FLOP as one whole GEMM (measured with MKL on
// 2 cores), and small next to the 1 GB that 4096 queries x 65,536 items of scores would take.
constexpr int64_t kQueryBlock = 2048;
constexpr int64_t kDatabaseTile = 4096;

// Calls f(q0, bq, n0, nt, tile) for every tile, tile = Q[q0:q0+bq] @ D[n0:n0+nt]^T (bq x nt,
// contiguous, reused between calls, so f may overwrite it). The tile is float32 for
// half/bfloat16 Q and D (their products accumulated in float32, on tensor cores on CUDA) and in
// the dtype of Q and D otherwise.
template <typename F>
void for_each_tile(const at::Tensor& Q, const at::Tensor& D, F&& f) {
  const int64_t B = Q.size(0), N = D.size(0);
  const int64_t bq_max = std::min(B, kQueryBlock), nt_max = std::min(N, kDatabaseTile);
  const auto tile_dtype = accumulation_dtype(Q);
  at::Tensor buffer = at::empty({bq_max * nt_max}, Q.options().dtype(tile_dtype));
  for (int64_t q0 = 0; q0 < B; q0 += bq_max) {
    const int64_t bq = std::min(bq_max, B - q0);
    const at::Tensor q_block = Q.narrow(0, q0, bq);
    for (int64_t n0 = 0; n0 < N; n0 += nt_max) {
      const int64_t nt = std::min(nt_max, N - n0);
      at::Tensor tile = buffer.narrow(0, 0, bq * nt).view({bq, nt});
      mm_into(tile, q_block, D.narrow(0, n0, nt).t());
      f(q0, bq, n0, nt, tile);
    }
  }
}

}  // namespace fastap
