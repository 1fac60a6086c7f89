// The certified float32 top-k of the CPU (csrc/cpu/topk_certified.cpp; docs/search.md derives
// the bound). Used by topk_similarity.cpp for every float32 search, with a float32 coarse pass,
// and by the bfloat16 ops with a bfloat16 one.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace fastap {

// The exact top-k of q32 (B, D) float32 contiguous against database (n, D) (any float dtype),
// database indices offset .. offset + n - 1, written best first into out_v / out_i (B, k). With
// merge_state the k entries already there (index -1: empty) take part as if seen before.
// lowp and lowp_norms, when defined, are the bfloat16 copy of the database and its per-row
// norms (prepare_lowp's output) and make the coarse pass bfloat16; otherwise it is float32.
void certified_topk(const at::Tensor& q32, const at::Tensor& database, const at::Tensor& lowp,
                    const at::Tensor& lowp_norms, int64_t offset, int64_t k, bool largest,
                    float* out_v, int64_t* out_i, bool merge_state);

}  // namespace fastap
