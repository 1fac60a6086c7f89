// Tiling of scores = queries @ database.T shared by the fused embedding -> AP kernels of every
// device: the GEMM per tile is ATen's (MKL on CPU, cuBLAS on CUDA); only the binning is ours.
#pragma once

#include <algorithm>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include "histogram_ap.h"

namespace fastap {

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
      if (tile_dtype == Q.scalar_type()) {
        at::mm_out(tile, q_block, D.narrow(0, n0, nt).t());
      } else {
        at::mm_out(tile, q_block, D.narrow(0, n0, nt).t(), tile_dtype);
      }
      f(q0, bq, n0, nt, tile);
    }
  }
}

}  // namespace fastap
