// CUDA kernels of the exact top-k similarity search.
//
// Per database block of kBlockCols rows: one cuBLAS product (at::mm) of a query chunk with the
// block into a (chunk × block) tile, then one thread block per query row that
//   1. keeps the tile entries ranked before the row's current k-th best (all of them while the
//      running top-k is not full), compacting them into shared memory,
//   2. sorts those candidates best first (bitonic sort in shared memory),
//   3. merges them with the row's running top-k by rank: an element's output position is its
//      position in its own sorted list plus the number of elements of the other list ranked
//      before it (the order is strict, so positions never collide), and keeps positions < k.
// The running top-k is ping-ponged between two (B, k) buffers. The candidate order is the same
// strict total order as on the CPU (ranks_before), so both devices return identical rankings.
#include <algorithm>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "topk_similarity.h"

namespace fastap {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
// Database rows per block: the candidates of one row (value + int32 column) must fit the
// default 48 KiB of shared memory: 4096 × 8 B for float, 2048 × 12 B for double.
template <typename acc_t>
constexpr int64_t block_cols() {
  return sizeof(acc_t) == 4 ? 4096 : 2048;
}
// Queries per product: a tile of at most 64 MiB.
constexpr int64_t kTileBytes = int64_t(64) << 20;

template <typename acc_t, bool largest>
__global__ void merge_tile_kernel(const acc_t* __restrict__ tile, int n, int cap, int64_t offset,
                                  const acc_t* __restrict__ old_v,
                                  const int64_t* __restrict__ old_i, acc_t* __restrict__ new_v,
                                  int64_t* __restrict__ new_i, int64_t k) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* cand_v = reinterpret_cast<acc_t*>(smem);
  int* cand_j = reinterpret_cast<int*>(cand_v + cap);
  __shared__ int count;

  const int64_t row = blockIdx.x;
  const acc_t* s = tile + row * n;
  old_v += row * k;
  old_i += row * k;
  new_v += row * k;
  new_i += row * k;

  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  // 1. Candidates: ranked before the current worst (an empty worst admits everything).
  const acc_t worst_v = old_v[k - 1];
  const int64_t worst_i = old_i[k - 1];
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const acc_t x = s[j];
    if (ranks_before<acc_t, largest>(x, offset + j, worst_v, worst_i)) {
      const int p = atomicAdd(&count, 1);
      cand_v[p] = x;
      cand_j[p] = j;
    }
  }
  __syncthreads();
  const int m = count;
  int padded = 1;
  while (padded < m) padded <<= 1;
  for (int p = m + threadIdx.x; p < padded; p += blockDim.x) {
    cand_v[p] = acc_t(0);
    cand_j[p] = -1;  // empty: ranked after everything
  }
  __syncthreads();

  // 2. Bitonic sort of the padded candidates, best first.
  auto before = [&](int a, int b) {
    const int ja = cand_j[a], jb = cand_j[b];
    return ranks_before<acc_t, largest>(cand_v[a], ja < 0 ? int64_t(-1) : offset + ja, cand_v[b],
                                        jb < 0 ? int64_t(-1) : offset + jb);
  };
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < padded / 2; t += blockDim.x) {
        const int a = 2 * t - (t & (stride - 1));
        const int b = a + stride;
        const bool best_first = (a & size) == 0;
        if (best_first ? before(b, a) : before(a, b)) {
          const acc_t tv = cand_v[a];
          cand_v[a] = cand_v[b];
          cand_v[b] = tv;
          const int tj = cand_j[a];
          cand_j[a] = cand_j[b];
          cand_j[b] = tj;
        }
      }
      __syncthreads();
    }
  }

  // 3. Merge by rank. Old entries: own position + candidates ranked before them.
  for (int64_t p = threadIdx.x; p < k; p += blockDim.x) {
    const acc_t v = old_v[p];
    const int64_t ix = old_i[p];
    int lo = 0, hi = m;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (ranks_before<acc_t, largest>(cand_v[mid], offset + cand_j[mid], v, ix)) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const int64_t r = p + lo;
    if (r < k) {
      new_v[r] = v;
      new_i[r] = ix;
    }
  }
  // Candidates: own position + old entries ranked before them.
  for (int q = threadIdx.x; q < m && q < k; q += blockDim.x) {
    const acc_t v = cand_v[q];
    const int64_t ix = offset + cand_j[q];
    int64_t lo = 0, hi = k;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (ranks_before<acc_t, largest>(old_v[mid], old_i[mid], v, ix)) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const int64_t r = q + lo;
    if (r < k) {
      new_v[r] = v;
      new_i[r] = ix;
    }
  }
}

// Folds database rows (N, D), indices offset.., into the sorted running top-k held in
// state_v[0]/state_i[0]; returns which of the two buffers holds the result (0 or 1).
template <typename acc_t, bool largest>
int fold_database(const Tensor& q, const Tensor& database, int64_t offset, Tensor state_v[2],
                  Tensor state_i[2]) {
  const int64_t B = q.size(0), N = database.size(0), k = state_v[0].size(1);
  if (B == 0 || N == 0) return 0;
  const int64_t cols = block_cols<acc_t>();
  const int64_t chunk_rows =
      std::max<int64_t>(1, std::min<int64_t>(B, kTileBytes / (cols * int64_t(sizeof(acc_t)))));
  Tensor tile = at::empty({chunk_rows * std::min(cols, N)}, q.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int cur = 0;
  for (int64_t b0 = 0; b0 < N; b0 += cols) {
    const int n = static_cast<int>(std::min(cols, N - b0));
    int cap = 1;
    while (cap < n) cap <<= 1;
    const size_t smem = size_t(cap) * (sizeof(acc_t) + sizeof(int));
    // cuBLAS reads half-precision or oddly strided rows only after conversion; a block at a time.
    const Tensor block = database.narrow(0, b0, n).to(q.scalar_type());
    for (int64_t r0 = 0; r0 < B; r0 += chunk_rows) {
      const int64_t rows = std::min(chunk_rows, B - r0);
      Tensor scores = tile.narrow(0, 0, rows * n).view({rows, n});
      at::mm_out(scores, q.narrow(0, r0, rows), block.t());
      merge_tile_kernel<acc_t, largest><<<static_cast<unsigned>(rows), kThreads, smem, stream>>>(
          scores.const_data_ptr<acc_t>(), n, cap, offset + b0,
          state_v[cur].const_data_ptr<acc_t>() + r0 * k,
          state_i[cur].const_data_ptr<int64_t>() + r0 * k,
          state_v[1 - cur].mutable_data_ptr<acc_t>() + r0 * k,
          state_i[1 - cur].mutable_data_ptr<int64_t>() + r0 * k, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    cur = 1 - cur;
  }
  return cur;
}

std::tuple<Tensor, Tensor> topk_similarity_cuda(const Tensor& queries, const Tensor& database,
                                                int64_t k, bool largest) {
  const auto acc_dtype = check_topk_similarity_args(queries, database, "database");
  check_topk_k(k, database.size(0));
  const c10::cuda::OptionalCUDAGuard device_guard(queries.device());
  const int64_t B = queries.size(0);
  const auto opts = queries.options().dtype(acc_dtype);
  Tensor state_v[2] = {at::empty({B, k}, opts), at::empty({B, k}, opts)};
  Tensor state_i[2] = {at::empty({B, k}, opts.dtype(at::kLong)),
                       at::empty({B, k}, opts.dtype(at::kLong))};
  if (B == 0) return {state_v[0], state_i[0]};
  // Non-differentiable (fastap/ops.py): nothing inside may require grad (see the CPU kernel).
  const Tensor q = queries.detach().to(acc_dtype).contiguous();
  int result = 0;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "topk_similarity_cuda", [&] {
    dispatch_largest(largest, [&](auto largest_t) {
      constexpr bool kLargest = decltype(largest_t)::value;
      state_v[0].fill_(empty_slot_value<scalar_t, kLargest>());
      state_i[0].fill_(-1);
      result = fold_database<scalar_t, kLargest>(q, database.detach(), 0, state_v, state_i);
    });
  });
  return {state_v[result], state_i[result]};
}

void topk_similarity_update_cuda(const Tensor& queries, const Tensor& database_block,
                                 int64_t index_offset, const Tensor& values,
                                 const Tensor& indices, bool largest) {
  const auto acc_dtype = check_topk_similarity_args(queries, database_block, "database_block");
  check_topk_state(queries, values, indices, acc_dtype, index_offset, database_block.size(0));
  const c10::cuda::OptionalCUDAGuard device_guard(queries.device());
  if (queries.size(0) == 0 || database_block.size(0) == 0) return;
  const Tensor q = queries.detach().to(acc_dtype).contiguous();
  // The kernel merges sorted lists; the state is kept best first by every call.
  Tensor state_v[2] = {values, at::empty_like(values)};
  Tensor state_i[2] = {indices, at::empty_like(indices)};
  int result = 0;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "topk_similarity_update_cuda", [&] {
    dispatch_largest(largest, [&](auto largest_t) {
      constexpr bool kLargest = decltype(largest_t)::value;
      result = fold_database<scalar_t, kLargest>(q, database_block.detach(), index_offset,
                                                 state_v, state_i);
    });
  });
  if (result != 0) {
    values.copy_(state_v[1]);
    indices.copy_(state_i[1]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CUDA, m) {
  m.impl("topk_similarity", &topk_similarity_cuda);
  m.impl("topk_similarity_update", &topk_similarity_update_cuda);
}

}  // namespace fastap
