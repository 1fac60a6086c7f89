// CUDA kernel of the certified search's exact re-score (the rest of the CUDA certified search is
// written with torch operations in fastap/certified.py; docs/search.md).
//
// out[p] = fl32(Σ_d q[d]·x[d]) for the pair (query_rows[p], database_rows[p]), with the products
// (exact in float64) summed in the order of the CPU's exact_dot (csrc/cpu/topk_certified.cpp):
// partial sum t holds the products of d ≡ t (mod 8) in increasing d, and the eight partial sums
// are added in the tree ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7)). Every device therefore
// returns the same bits. A group of 8 threads computes one pair, thread t partial sum t, and the
// tree is three shuffles within the group.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "topk_similarity.h"

namespace fastap {
namespace {

using at::Tensor;

constexpr int kThreads = 256;  // a multiple of 32, so a group of 8 never straddles a warp
constexpr int kGroup = 8;

__global__ void exact_dot_pairs_kernel(const float* __restrict__ q, const float* __restrict__ x,
                                       const int64_t* __restrict__ query_rows,
                                       const int64_t* __restrict__ database_rows, int64_t P,
                                       int64_t D, float* __restrict__ out) {
  const int64_t p = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kGroup;
  const int t = threadIdx.x % kGroup;
  double acc = 0.0;
  if (p < P) {
    const float* qr = q + query_rows[p] * D;
    const float* xr = x + database_rows[p] * D;
    // fma of an exact product rounds once, as the CPU's acc += q·x does.
    for (int64_t d = t; d < D; d += kGroup) acc = fma(double(qr[d]), double(xr[d]), acc);
  }
  // Every lane takes part in the shuffles (inactive ones carry 0), so the full mask is right.
  acc += __shfl_down_sync(0xffffffffu, acc, 4, kGroup);  // lane t < 4: s_t + s_{t+4}
  acc += __shfl_down_sync(0xffffffffu, acc, 2, kGroup);  // t < 2: (s0+s4)+(s2+s6), (s1+s5)+(s3+s7)
  acc += __shfl_down_sync(0xffffffffu, acc, 1, kGroup);  // t = 0: the whole tree
  if (p < P && t == 0) out[p] = float(acc);
}

Tensor exact_dot_pairs_cuda(const Tensor& queries, const Tensor& database,
                            const Tensor& query_rows, const Tensor& database_rows) {
  check_exact_dot_pairs_args(queries, database, query_rows, database_rows);
  const c10::cuda::OptionalCUDAGuard device_guard(queries.device());
  const Tensor q = queries.contiguous(), x = database.contiguous();
  const Tensor qi = query_rows.contiguous(), xi = database_rows.contiguous();
  const int64_t P = qi.numel();
  Tensor out = at::empty({P}, q.options());
  if (P == 0) return out;
  const int64_t blocks = (P * kGroup + kThreads - 1) / kThreads;
  TORCH_CHECK_VALUE(blocks <= 0x7FFFFFFF, "exact_dot_pairs: too many pairs (", P, ")");
  exact_dot_pairs_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                           c10::cuda::getCurrentCUDAStream()>>>(
      q.const_data_ptr<float>(), x.const_data_ptr<float>(), qi.const_data_ptr<int64_t>(),
      xi.const_data_ptr<int64_t>(), P, q.size(1), out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CUDA, m) { m.impl("exact_dot_pairs", &exact_dot_pairs_cuda); }

}  // namespace fastap
