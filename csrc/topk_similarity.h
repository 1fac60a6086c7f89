// Exact top-k of similarity scores s = queries · databaseᵀ, streamed over database blocks.
// The order is shared by the CPU and CUDA kernels so that both rank exactly alike.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>

#include "common.h"

namespace fastap {

// A candidate is (score, database index). Ranking is a strict total order: better score first,
// then the lower index, so ties never depend on block sizes or thread counts and the result is
// that of a stable sort of the whole row. NaN ranks like torch.topk / torch.sort: above every
// number, so first for largest = true and last for largest = false. An index < 0 marks an empty
// slot of the running state, below every real candidate.
template <typename acc_t, bool largest>
FASTAP_HD bool ranks_before(acc_t a, int64_t ia, acc_t b, int64_t ib) {
  if (ib < 0) return ia >= 0;
  if (ia < 0) return false;
  if (largest ? a > b : a < b) return true;
  if (largest ? a < b : a > b) return false;
  const bool a_nan = a != a, b_nan = b != b;  // isnan without <cmath> on the device
  if (a_nan != b_nan) return largest ? a_nan : b_nan;
  return ia < ib;
}

// The value an empty slot holds: the end of the axis a candidate must pass, so that a cheap
// `not below the threshold` prefilter always sends the first k candidates to the full comparison.
template <typename acc_t, bool largest>
FASTAP_HD acc_t empty_slot_value() {
  return largest ? -INFINITY : INFINITY;
}

// Argument checks shared by the device implementations (messages name the Python arguments).
// Returns the dtype scores are computed and returned in: float64 if either input is float64,
// float32 otherwise (float16/bfloat16 are multiplied and ranked in float32).
at::ScalarType check_topk_similarity_args(const at::Tensor& queries, const at::Tensor& database,
                                          const char* database_name);
void check_topk_k(int64_t k, int64_t num_database);
void check_exact_dot_pairs_args(const at::Tensor& queries, const at::Tensor& database,
                                const at::Tensor& query_rows, const at::Tensor& database_rows);
void check_topk_state(const at::Tensor& queries, const at::Tensor& values,
                      const at::Tensor& indices, at::ScalarType acc_dtype, int64_t index_offset,
                      int64_t block_rows);

}  // namespace fastap
