// Operator schemas (one TORCH_LIBRARY block) and the argument checks both devices share.
// Device implementations live in cpu/ and cuda/; fake and autograd registrations in fastap/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "histogram_ap.h"

namespace fastap {

void check_histogram_ap_args(const HistogramApArgs& a) {
  const at::Tensor& s = a.scores;
  TORCH_CHECK_VALUE(s.dim() == 2, "scores must be a 2-D (B, N) tensor, got shape ", s.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()),
                   "scores must be float16, bfloat16, float32 or float64, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.size(0) > 0, "scores is an empty batch (B = 0 rows)");
  TORCH_CHECK_VALUE(s.size(1) > 0, "scores has no database items (N = 0 columns)");
  TORCH_CHECK_VALUE(a.num_bins >= 2, "num_bins must be at least 2, got ", a.num_bins);
  TORCH_CHECK_VALUE(std::isfinite(a.lo) && std::isfinite(a.hi) && a.lo < a.hi,
                    "score_range must be finite with lo < hi, got (", a.lo, ", ", a.hi, ")");
  TORCH_CHECK_VALUE(a.targets.has_value() != (a.query_labels.has_value() || a.database_labels.has_value()),
                    "give relevance either as targets (B, N) or as query_labels (B,) with "
                    "database_labels (N,), not both and not neither");
  if (a.targets.has_value()) {
    const at::Tensor& t = *a.targets;
    TORCH_CHECK_VALUE(t.sizes() == s.sizes(), "targets must have the shape of scores ", s.sizes(),
                      ", got ", t.sizes());
    TORCH_CHECK(t.device() == s.device(), "targets is on ", t.device(), " but scores is on ",
                s.device());
    TORCH_CHECK_TYPE(!t.is_complex(), "targets must be a bool or 0/1 real tensor, got ",
                     t.scalar_type());
  } else {
    TORCH_CHECK_VALUE(a.query_labels.has_value() && a.database_labels.has_value(),
                      "query_labels and database_labels must be given together");
    const at::Tensor& q = *a.query_labels;
    const at::Tensor& d = *a.database_labels;
    for (const auto& [name, lab, n] : {std::tuple<const char*, const at::Tensor&, int64_t>{
                                           "query_labels", q, s.size(0)},
                                       {"database_labels", d, s.size(1)}}) {
      TORCH_CHECK_VALUE(lab.dim() == 1 && lab.size(0) == n, name, " must have shape (", n,
                        ",) to match scores ", s.sizes(), ", got ", lab.sizes());
      TORCH_CHECK_TYPE(lab.scalar_type() == at::kLong, name, " must be int64, got ",
                       lab.scalar_type());
      TORCH_CHECK(lab.device() == s.device(), name, " is on ", lab.device(), " but scores is on ",
                  s.device());
    }
  }
  TORCH_CHECK_VALUE(!a.exclude_diagonal || s.size(0) <= s.size(1),
                    "exclude_diagonal needs B <= N (query i is database item i), got scores ",
                    s.sizes());
}

void raise_bad_input(int flags) {
  TORCH_CHECK_VALUE(!(flags & kNonFiniteScore), "scores contains NaN or Inf");
  TORCH_CHECK_VALUE(!(flags & kTargetNotBinary), "targets must contain only 0 and 1");
}

}  // namespace fastap

TORCH_LIBRARY(fastap, m) {
  // Per-row AP of histogram-binned scores (DESIGN §2) and the per-row state its backward needs:
  // (ap (B,), pos_hist (B, M), all_hist (B, M), num_pos (B,)), all in the accumulation dtype.
  m.def(
      "histogram_ap(Tensor scores, Tensor? targets, Tensor? query_labels, "
      "Tensor? database_labels, int num_bins, float lo, float hi, bool open_ends, "
      "bool exclude_diagonal) -> (Tensor, Tensor, Tensor, Tensor)");
  // dL/dscores (B, N) in the dtype of scores, given dL/dAP (B,) and the forward's histograms.
  m.def(
      "histogram_ap_backward(Tensor grad_ap, Tensor scores, Tensor? targets, "
      "Tensor? query_labels, Tensor? database_labels, Tensor pos_hist, Tensor all_hist, "
      "Tensor num_pos, int num_bins, float lo, float hi, bool open_ends, "
      "bool exclude_diagonal) -> Tensor");
}

// `import fastap._C` only needs to load this library; the ops are reached through torch.ops.fastap.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
