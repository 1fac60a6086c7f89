// The histogram-binned AP estimator (docs/estimators.md), written once for host and device so
// that the CPU and CUDA kernels evaluate exactly the same arithmetic.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>

#include "common.h"

namespace fastap {

// Where a score falls on the bin axis. Bin `lower` carries weight 1 - frac and bin lower + 1
// carries frac; either index may lie outside [0, M) and is then skipped. `sloped` is false where
// the weights do not move with the score: a saturated open end, or exactly on a bin centre (the
// same convention as autograd's relu'(0) = abs'(0) = 0 in the dense reference).
template <typename acc_t, typename index_t = int64_t>
struct BinSpan {
  index_t lower;
  acc_t frac;
  bool sloped;
};

// Bin centres z_k = hi - k·Δ, k = 0..M-1, so bin 0 holds the highest scores.
template <typename acc_t>
struct BinAxis {
  acc_t hi;
  acc_t inv_delta;  // 1 / Δ = (M - 1) / (hi - lo)
  int64_t num_bins;
  bool open_ends;

  // Branch-free (selects compile to min/max and conditional moves): real score matrices put most
  // scores in a saturated end bin or not, at random, and a branch there mispredicts half the time
  // (measured: 3x slower on cosine similarities of random embeddings). index_t = int32_t lets a
  // CPU loop over many scores vectorise the float -> integer conversion (SSE2 has no packed
  // conversion to int64); the clamped t always fits.
  template <typename index_t = int64_t>
  FASTAP_HD BinSpan<acc_t, index_t> locate(acc_t score) const {
    const acc_t t_raw = (hi - score) * inv_delta;  // 0 at hi, M - 1 at lo
    const acc_t last = static_cast<acc_t>(num_bins - 1);
    // Open ends saturate at the end centres. Closed ends: a triangle only reaches one Δ beyond the
    // end centres; clamping keeps the integer conversion defined for far-away scores without
    // changing which bins are touched.
    const acc_t t_min = open_ends ? acc_t(0) : acc_t(-2);
    const acc_t t_max = open_ends ? last : last + acc_t(2);
    // Written so that a NaN score (refused by the forward kernels, which still locate it before
    // raising; possible in a direct call of a backward op) lands on an end bin instead of an
    // undefined integer conversion.
    const acc_t t_low = t_raw >= t_min ? t_raw : t_min;
    const acc_t t = t_low > t_max ? t_max : t_low;
    // floor(t) without a libm call (x86-64 builds without SSE4.1 do not inline floor): t >= -2,
    // so truncating t + 2 gives it, except where t + 2 rounded up to the next integer.
    index_t lower = static_cast<index_t>(t + acc_t(2)) - 2;
    lower -= static_cast<acc_t>(lower) > t ? 1 : 0;
    const acc_t frac = t - static_cast<acc_t>(lower);
    // `&` rather than `&&`: no branch, so that loops over many scores vectorise.
    return {lower, frac, static_cast<bool>((t == t_raw) & (frac != acc_t(0)))};
  }

  FASTAP_HD bool in_range(int64_t bin) const { return bin >= 0 && bin < num_bins; }

  static BinAxis make(int64_t num_bins, double lo, double hi, bool open_ends) {
    return {static_cast<acc_t>(hi), static_cast<acc_t>((num_bins - 1) / (hi - lo)), num_bins,
            open_ends};
  }
};

// AP = (1/N⁺) Σ_k c⁺_k C⁺_k / C_k from one row's histograms (a term with C_k = 0 is 0).
template <typename acc_t>
FASTAP_HD acc_t ap_from_histograms(const acc_t* pos_hist, const acc_t* all_hist, int64_t num_bins,
                                   acc_t num_pos) {
  acc_t cum_all = 0, cum_pos = 0, sum = 0;
  for (int64_t k = 0; k < num_bins; ++k) {
    cum_all += all_hist[k];
    cum_pos += pos_hist[k];
    if (cum_all > acc_t(0)) sum += pos_hist[k] * cum_pos / cum_all;
  }
  return sum / num_pos;
}

// dAP/dc⁺_m and dAP/dc⁻_m for every bin m (docs/estimators.md), by one forward and one reverse
// scan:
//   G⁺_m = (1/N⁺) [C⁺_m / C_m + Σ_{k≥m} c⁺_k C⁻_k / C_k²],  G⁻_m = -(1/N⁺) Σ_{k≥m} c⁺_k C⁺_k / C_k².
// `grad_pos` / `grad_neg` receive G⁺ / G⁻ scaled by `scale` (the incoming dL/dAP).
template <typename acc_t>
FASTAP_HD void ap_bin_gradients(const acc_t* pos_hist, const acc_t* all_hist, int64_t num_bins,
                                acc_t num_pos, acc_t scale, acc_t* grad_pos, acc_t* grad_neg) {
  // Forward pass stores the cumulative counts in the output arrays to avoid the cancellation
  // that recovering C_k from the total by subtraction would cause.
  acc_t cum_all = 0, cum_pos = 0;
  for (int64_t k = 0; k < num_bins; ++k) {
    cum_all += all_hist[k];
    cum_pos += pos_hist[k];
    grad_pos[k] = cum_pos;
    grad_neg[k] = cum_all;
  }
  const acc_t coef = scale / num_pos;
  acc_t tail_pos = 0, tail_neg = 0;
  for (int64_t m = num_bins - 1; m >= 0; --m) {
    const acc_t C = grad_neg[m], Cp = grad_pos[m];
    acc_t ratio = 0;
    if (C > acc_t(0)) {
      const acc_t inv_sq = acc_t(1) / (C * C);
      tail_pos += pos_hist[m] * (C - Cp) * inv_sq;
      tail_neg += pos_hist[m] * Cp * inv_sq;
      ratio = Cp / C;
    }
    grad_pos[m] = coef * (ratio + tail_pos);
    grad_neg[m] = -coef * tail_neg;
  }
}

// Kernels keep histograms and bin gradients in arrays padded by kPad zeros on each side
// (length M + kHistPad), so that the two bins a score touches are addressed without range checks:
// `locate` never returns lower < -kPad or lower + 1 >= M + kPad + 1.
constexpr int64_t kPad = 2;
constexpr int64_t kHistPad = 2 * kPad + 1;

// dAP/ds for one score from the padded bin gradients of its class (G⁺ for a positive, G⁻
// otherwise): w_lower rises and w_lower+1 falls with slope 1/Δ as the score grows. `sloped` is
// BinSpan::sloped as 0 or 1: a multiplication rather than a select, which compilers turn into a
// branch that mispredicts on rows whose scores fall in and out of a saturated end bin at random.
template <typename acc_t, typename index_t>
FASTAP_HD acc_t score_gradient(const BinAxis<acc_t>& axis, index_t lower, acc_t sloped,
                               const acc_t* padded_bin_grad) {
  const acc_t* g = padded_bin_grad + kPad + lower;
  return (g[0] - g[1]) * axis.inv_delta * sloped;
}

template <typename acc_t>
FASTAP_HD acc_t score_gradient(const BinAxis<acc_t>& axis, const BinSpan<acc_t>& span,
                               const acc_t* padded_bin_grad) {
  return score_gradient(axis, span.lower, static_cast<acc_t>(span.sloped), padded_bin_grad);
}

// Relevance of database item j to query i, from a (B, N) 0/1 matrix of any real dtype and
// strides: 0 or 1, or 2 for a value that is neither.
template <typename target_t>
struct MatrixRelevance {
  const target_t* data;
  int64_t stride0, stride1;
  FASTAP_HD int operator()(int64_t i, int64_t j) const {
    // Half and bfloat16 compare through float (their own operators are ambiguous in device code).
    const auto v = static_cast<at::opmath_type<target_t>>(data[i * stride0 + j * stride1]);
    if (v == 0) return 0;
    return v == 1 ? 1 : 2;
  }
};

// Relevance from labels, so the (B, N) matrix is never stored: equal labels are relevant.
struct LabelRelevance {
  const int64_t* query;
  const int64_t* database;
  int64_t query_stride, database_stride;
  FASTAP_HD int operator()(int64_t i, int64_t j) const {
    return query[i * query_stride] == database[j * database_stride] ? 1 : 0;
  }
};

inline LabelRelevance label_relevance(const at::Tensor& query_labels,
                                      const at::Tensor& database_labels) {
  return {query_labels.const_data_ptr<int64_t>(), database_labels.const_data_ptr<int64_t>(),
          query_labels.stride(0), database_labels.stride(0)};
}

// Calls f(relevance) with the functor matching the given form of relevance (host code).
template <typename F>
void with_relevance(const c10::optional<at::Tensor>& targets,
                    const c10::optional<at::Tensor>& query_labels,
                    const c10::optional<at::Tensor>& database_labels, F&& f) {
  if (targets.has_value()) {
    const at::Tensor& t = *targets;
    AT_DISPATCH_V2(t.scalar_type(), "fastap_targets", AT_WRAP([&] {
      f(MatrixRelevance<scalar_t>{t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1)});
    }), AT_EXPAND(AT_ALL_TYPES), at::kBool, at::kHalf, at::kBFloat16);
  } else {
    f(label_relevance(*query_labels, *database_labels));
  }
}

// Bit flags a kernel raises on bad data; the host turns them into errors naming the argument.
enum BadInput : int { kNonFiniteScore = 1, kTargetNotBinary = 2 };

// Argument checks shared by the device implementations (messages name the Python arguments).
struct HistogramApArgs {
  const at::Tensor& scores;
  const c10::optional<at::Tensor>& targets;
  const c10::optional<at::Tensor>& query_labels;
  const c10::optional<at::Tensor>& database_labels;
  int64_t num_bins;
  double lo;
  double hi;
  bool exclude_diagonal;
};
void check_histogram_ap_args(const HistogramApArgs& args);
void check_embedding_ap_args(const at::Tensor& queries, const at::Tensor& database,
                             const at::Tensor& query_labels, const at::Tensor& database_labels,
                             int64_t num_bins, double lo, double hi, bool exclude_diagonal);

// AP and histograms accumulate in float32 for half/bfloat16/float32 inputs, float64 for float64.
inline at::ScalarType accumulation_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The forward's per-row state as a backward kernel reads it: checked against (B, num_bins) and
// made contiguous in the accumulation dtype.
struct BinState {
  at::Tensor grad_ap, pos_hist, all_hist, num_pos;
};
BinState bin_state(const at::Tensor& grad_ap, const at::Tensor& pos_hist,
                   const at::Tensor& all_hist, const at::Tensor& num_pos, int64_t num_queries,
                   int64_t num_bins, at::ScalarType acc_dtype);

void raise_bad_input(int flags);

}  // namespace fastap
