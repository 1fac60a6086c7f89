// Fused embedding -> AP on CPU: scores = queries @ database.T are formed one (query block x
// database tile) at a time with an ATen GEMM (MKL, multi-threaded) and binned at once, so extra
// memory is one tile plus O(B·M) histograms, independent of B·N. The backward recomputes each
// tile, turns it in place into dL/dscores and multiplies it straight into both embedding
// gradients: four GEMMs in all (forward, recomputation, two gradient products).
#include <atomic>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "cpu/histogram_rows.h"
#include "embedding_tiles.h"

namespace fastap {
namespace {

using at::Tensor;
using namespace fastap::cpu;

std::tuple<Tensor, Tensor, Tensor, Tensor> embedding_ap_cpu(
    const Tensor& queries, const Tensor& database, const Tensor& query_labels,
    const Tensor& database_labels, int64_t num_bins, double lo, double hi, bool open_ends,
    bool exclude_diagonal) {
  check_embedding_ap_args(queries, database, query_labels, database_labels, num_bins, lo, hi,
                          exclude_diagonal);
  const int64_t B = queries.size(0), M = num_bins, stride = M + kHistPad;
  const auto acc_dtype = accumulation_dtype(queries);
  const Tensor Q = queries.to(acc_dtype).contiguous(), D = database.to(acc_dtype).contiguous();
  const auto opts = Q.options();
  Tensor all_pad = at::zeros({B, stride}, opts), pos_pad = at::zeros({B, stride}, opts);
  std::vector<int64_t> positives(B, 0);
  std::atomic<int> bad_input{0};
  const auto relevant = label_relevance(query_labels, database_labels);

  Tensor ap = at::empty({B}, opts), pos_hist, all_hist, num_pos = at::empty({B}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "embedding_ap_cpu", [&] {
    using acc_t = scalar_t;
    const auto axis = BinAxis<acc_t>::make(M, lo, hi, open_ends);
    acc_t* c = all_pad.data_ptr<acc_t>();
    acc_t* cp = pos_pad.data_ptr<acc_t>();
    for_each_tile(Q, D, [&](int64_t q0, int64_t bq, int64_t n0, int64_t nt, const Tensor& tile) {
      const acc_t* s = tile.const_data_ptr<acc_t>();
      at::parallel_for(0, bq, row_grain(nt), [&](int64_t begin, int64_t end) {
        int flags = 0;
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = q0 + r;
          positives[i] += accumulate_row(axis, s + r * nt, 1, i, n0, nt, relevant,
                                         exclude_diagonal, c + i * stride, cp + i * stride, flags);
        }
        if (flags) bad_input.fetch_or(flags);
      });
    });
    raise_bad_input(bad_input.load());
    acc_t* ap_out = ap.data_ptr<acc_t>();
    acc_t* npos_out = num_pos.data_ptr<acc_t>();
    for (int64_t i = 0; i < B; ++i) {
      ap_out[i] = finish_row(c + i * stride, cp + i * stride, M, positives[i]);
      npos_out[i] = static_cast<acc_t>(positives[i]);
    }
  });
  pos_hist = pos_pad.narrow(1, kPad, M).contiguous();
  all_hist = all_pad.narrow(1, kPad, M).contiguous();
  return {ap, pos_hist, all_hist, num_pos};
}

std::tuple<Tensor, Tensor> embedding_ap_backward_cpu(
    const Tensor& grad_ap, const Tensor& queries, const Tensor& database,
    const Tensor& query_labels, const Tensor& database_labels, const Tensor& pos_hist,
    const Tensor& all_hist, const Tensor& num_pos, int64_t num_bins, double lo, double hi,
    bool open_ends, bool exclude_diagonal, std::array<bool, 2> output_mask) {
  check_embedding_ap_args(queries, database, query_labels, database_labels, num_bins, lo, hi,
                          exclude_diagonal);
  const int64_t B = queries.size(0), M = num_bins, stride = M + kHistPad;
  const auto acc_dtype = accumulation_dtype(queries);
  const BinState state = bin_state(grad_ap, pos_hist, all_hist, num_pos, B, M, acc_dtype);
  const Tensor Q = queries.to(acc_dtype).contiguous(), D = database.to(acc_dtype).contiguous();
  const auto [want_q, want_d] = output_mask;
  Tensor grad_q = want_q ? at::zeros_like(Q) : Tensor();
  Tensor grad_d = want_d ? at::zeros_like(D) : Tensor();
  // Bin gradients G⁺ / G⁻ per row, zero for rows without positives (no AP, no gradient).
  Tensor gpos_pad = at::zeros({B, stride}, Q.options()), gneg_pad = at::zeros({B, stride}, Q.options());
  const auto relevant = label_relevance(query_labels, database_labels);

  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "embedding_ap_backward_cpu", [&] {
    using acc_t = scalar_t;
    const auto axis = BinAxis<acc_t>::make(M, lo, hi, open_ends);
    const acc_t* g = state.grad_ap.const_data_ptr<acc_t>();
    const acc_t* np = state.num_pos.const_data_ptr<acc_t>();
    acc_t* gp = gpos_pad.data_ptr<acc_t>();
    acc_t* gn = gneg_pad.data_ptr<acc_t>();
    for (int64_t i = 0; i < B; ++i) {
      if (np[i] > acc_t(0) && g[i] != acc_t(0)) {
        ap_bin_gradients(state.pos_hist.const_data_ptr<acc_t>() + i * M,
                         state.all_hist.const_data_ptr<acc_t>() + i * M, M, np[i], g[i],
                         gp + i * stride + kPad, gn + i * stride + kPad);
      }
    }
    for_each_tile(Q, D, [&](int64_t q0, int64_t bq, int64_t n0, int64_t nt, Tensor& tile) {
      acc_t* s = tile.data_ptr<acc_t>();
      at::parallel_for(0, bq, row_grain(nt), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = q0 + r;
          // In place: each score is read before its gradient overwrites it.
          row_score_gradients(axis, s + r * nt, 1, i, n0, nt, relevant, exclude_diagonal,
                              gp + i * stride, gn + i * stride, s + r * nt);
        }
      });
      if (want_q) grad_q.narrow(0, q0, bq).addmm_(tile, D.narrow(0, n0, nt));
      if (want_d) grad_d.narrow(0, n0, nt).addmm_(tile.t(), Q.narrow(0, q0, bq));
    });
  });
  return {unless_masked(want_q, grad_q, queries), unless_masked(want_d, grad_d, database)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CPU, m) {
  m.impl("embedding_ap", &embedding_ap_cpu);
  m.impl("embedding_ap_backward", &embedding_ap_backward_cpu);
}

}  // namespace fastap
