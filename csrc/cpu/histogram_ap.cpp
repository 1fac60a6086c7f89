// CPU kernels of the histogram-binned AP: one row per task of at::parallel_for, each row scanned
// once (O(N)) into private histograms, so results do not depend on the thread count.
#include <atomic>
#include <limits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/histogram_rows.h"

namespace fastap {
namespace {

using namespace fastap::cpu;

using at::Tensor;
using c10::optional;

std::tuple<Tensor, Tensor, Tensor, Tensor> histogram_ap_cpu(
    const Tensor& scores, const optional<Tensor>& targets, const optional<Tensor>& query_labels,
    const optional<Tensor>& database_labels, int64_t num_bins, double lo, double hi,
    bool open_ends, bool exclude_diagonal) {
  check_histogram_ap_args(
      {scores, targets, query_labels, database_labels, num_bins, lo, hi, exclude_diagonal});
  const int64_t B = scores.size(0), N = scores.size(1), M = num_bins;
  const auto opts = scores.options().dtype(accumulation_dtype(scores));
  Tensor ap = at::empty({B}, opts), pos_hist = at::empty({B, M}, opts),
         all_hist = at::empty({B, M}, opts), num_pos = at::empty({B}, opts);
  std::atomic<int> bad_input{0};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "histogram_ap_cpu", [&] {
    using score_t = scalar_t;
    using acc_t = at::opmath_type<score_t>;
    const auto axis = BinAxis<acc_t>::make(M, lo, hi, open_ends);
    const score_t* s = scores.const_data_ptr<score_t>();
    const int64_t ss0 = scores.stride(0), ss1 = scores.stride(1);
    acc_t* ap_out = ap.data_ptr<acc_t>();
    acc_t* pos_out = pos_hist.data_ptr<acc_t>();
    acc_t* all_out = all_hist.data_ptr<acc_t>();
    acc_t* npos_out = num_pos.data_ptr<acc_t>();

    with_relevance(targets, query_labels, database_labels, [&](auto relevant) {
      at::parallel_for(0, B, row_grain(N), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> all_pad(M + kHistPad), pos_pad(M + kHistPad);
        int flags = 0;
        for (int64_t i = begin; i < end; ++i) {
          std::fill(all_pad.begin(), all_pad.end(), acc_t(0));
          std::fill(pos_pad.begin(), pos_pad.end(), acc_t(0));
          const int64_t positives =
              accumulate_row(axis, s + i * ss0, ss1, i, 0, N, relevant, exclude_diagonal,
                             all_pad.data(), pos_pad.data(), flags);
          std::copy_n(all_pad.data() + kPad, M, all_out + i * M);
          std::copy_n(pos_pad.data() + kPad, M, pos_out + i * M);
          npos_out[i] = static_cast<acc_t>(positives);
          ap_out[i] = finish_row(all_pad.data(), pos_pad.data(), M, positives);
        }
        if (flags) bad_input.fetch_or(flags);
      });
    });
  });
  raise_bad_input(bad_input.load());
  return {ap, pos_hist, all_hist, num_pos};
}

Tensor histogram_ap_backward_cpu(const Tensor& grad_ap, const Tensor& scores,
                                 const optional<Tensor>& targets,
                                 const optional<Tensor>& query_labels,
                                 const optional<Tensor>& database_labels, const Tensor& pos_hist,
                                 const Tensor& all_hist, const Tensor& num_pos, int64_t num_bins,
                                 double lo, double hi, bool open_ends, bool exclude_diagonal) {
  check_histogram_ap_args(
      {scores, targets, query_labels, database_labels, num_bins, lo, hi, exclude_diagonal});
  const int64_t B = scores.size(0), N = scores.size(1), M = num_bins;
  const BinState state =
      bin_state(grad_ap, pos_hist, all_hist, num_pos, B, M, accumulation_dtype(scores));
  Tensor grad_scores = at::empty({B, N}, scores.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "histogram_ap_backward_cpu", [&] {
    using score_t = scalar_t;
    using acc_t = at::opmath_type<score_t>;
    const auto axis = BinAxis<acc_t>::make(M, lo, hi, open_ends);
    const score_t* s = scores.const_data_ptr<score_t>();
    const int64_t ss0 = scores.stride(0), ss1 = scores.stride(1);
    score_t* out = grad_scores.data_ptr<score_t>();
    const acc_t* g = state.grad_ap.const_data_ptr<acc_t>();
    const acc_t* cp_ptr = state.pos_hist.const_data_ptr<acc_t>();
    const acc_t* c_ptr = state.all_hist.const_data_ptr<acc_t>();
    const acc_t* np = state.num_pos.const_data_ptr<acc_t>();

    with_relevance(targets, query_labels, database_labels, [&](auto relevant) {
      at::parallel_for(0, B, row_grain(N), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> gpos_pad(M + kHistPad, acc_t(0)), gneg_pad(M + kHistPad, acc_t(0));
        for (int64_t i = begin; i < end; ++i) {
          score_t* row = out + i * N;
          // A row without positives has no AP and so no gradient (the loss excludes it).
          if (!(np[i] > acc_t(0)) || g[i] == acc_t(0)) {
            std::fill(row, row + N, score_t(0));
            continue;
          }
          ap_bin_gradients(cp_ptr + i * M, c_ptr + i * M, M, np[i], g[i], gpos_pad.data() + kPad,
                           gneg_pad.data() + kPad);
          row_score_gradients(axis, s + i * ss0, ss1, i, 0, N, relevant, exclude_diagonal,
                              gpos_pad.data(), gneg_pad.data(), row);
        }
      });
    });
  });
  return grad_scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CPU, m) {
  m.impl("histogram_ap", &histogram_ap_cpu);
  m.impl("histogram_ap_backward", &histogram_ap_backward_cpu);
}

}  // namespace fastap
