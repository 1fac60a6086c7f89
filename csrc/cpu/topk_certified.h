// The certified float32 top-k of the CPU (csrc/cpu/topk_certified.cpp; docs/search.md derives
// the bound). Used by topk_similarity.cpp for every float32 search, with a float32 coarse pass;
// the int8 and bfloat16 passes are the ops of topk_certified.cpp.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace fastap {

// The exact top-k of q32 (B, D) float32 contiguous against database (n, D) (any float dtype),
// database indices offset .. offset + n - 1, written best first into out_v / out_i (B, k). With
// merge_state the k entries already there (index -1: empty) take part as if seen before. The
// coarse pass is float32 (the low-precision passes are the ops of topk_certified.cpp).
void certified_topk(const at::Tensor& q32, const at::Tensor& database, int64_t offset, int64_t k,
                    bool largest, float* out_v, int64_t* out_i, bool merge_state);

}  // namespace fastap
