// Operator schemas (one TORCH_LIBRARY block) and the argument checks both devices share.
// Device implementations live in cpu/ and cuda/; fake and autograd registrations in fastap/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <limits>

#include <ATen/ops/aminmax.h>

#include "histogram_ap.h"
#include "topk_similarity.h"

namespace fastap {

void check_bins(int64_t num_bins, double lo, double hi) {
  TORCH_CHECK_VALUE(num_bins >= 2, "num_bins must be at least 2, got ", num_bins);
  // Bin positions are float32 for all but float64 scores: past 2^24 the end of the axis rounds
  // up to an index beyond the padded histograms (a write out of bounds), and the CPU kernels'
  // int32 bin indices need the bound too.
  TORCH_CHECK_VALUE(num_bins <= (int64_t{1} << 24), "num_bins must be at most 2^24 = ",
                    int64_t{1} << 24, ", got ", num_bins);
  TORCH_CHECK_VALUE(std::isfinite(lo) && std::isfinite(hi) && lo < hi,
                    "score_range must be finite with lo < hi, got (", lo, ", ", hi, ")");
}

void check_labels(const at::Tensor& query_labels, const at::Tensor& database_labels,
                  int64_t num_queries, int64_t num_database, const at::Device& device) {
  for (const auto& [name, lab, n] :
       {std::tuple<const char*, const at::Tensor&, int64_t>{"query_labels", query_labels,
                                                            num_queries},
        {"database_labels", database_labels, num_database}}) {
    TORCH_CHECK_VALUE(lab.dim() == 1 && lab.size(0) == n, name, " must have shape (", n,
                      ",), one label per ", name[0] == 'q' ? "query" : "database item", ", got ",
                      lab.sizes());
    TORCH_CHECK_TYPE(lab.scalar_type() == at::kLong, name, " must be int64, got ",
                     lab.scalar_type());
    TORCH_CHECK(lab.device() == device, name, " is on ", lab.device(), " but the scores are on ",
                device);
  }
}

void check_histogram_ap_args(const HistogramApArgs& a) {
  const at::Tensor& s = a.scores;
  TORCH_CHECK_VALUE(s.dim() == 2, "scores must be a 2-D (B, N) tensor, got shape ", s.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()),
                   "scores must be float16, bfloat16, float32 or float64, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.size(0) > 0, "scores is an empty batch (B = 0 rows)");
  TORCH_CHECK_VALUE(s.size(1) > 0, "scores has no database items (N = 0 columns)");
  check_bins(a.num_bins, a.lo, a.hi);
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
    check_labels(*a.query_labels, *a.database_labels, s.size(0), s.size(1), s.device());
  }
  TORCH_CHECK_VALUE(!a.exclude_diagonal || s.size(0) <= s.size(1),
                    "exclude_diagonal needs B <= N (query i is database item i), got scores ",
                    s.sizes());
}

void check_embedding_ap_args(const at::Tensor& queries, const at::Tensor& database,
                             const at::Tensor& query_labels, const at::Tensor& database_labels,
                             int64_t num_bins, double lo, double hi, bool exclude_diagonal) {
  TORCH_CHECK_VALUE(queries.dim() == 2, "queries must be a 2-D (B, D) tensor, got shape ",
                    queries.sizes());
  TORCH_CHECK_VALUE(database.dim() == 2, "database must be a 2-D (N, D) tensor, got shape ",
                    database.sizes());
  TORCH_CHECK_VALUE(queries.size(1) == database.size(1),
                    "queries and database must have the same embedding size, got ",
                    queries.size(1), " and ", database.size(1));
  TORCH_CHECK_TYPE(at::isFloatingType(queries.scalar_type()) &&
                       queries.scalar_type() == database.scalar_type(),
                   "queries and database must share one floating dtype, got ",
                   queries.scalar_type(), " and ", database.scalar_type());
  TORCH_CHECK(queries.device() == database.device(), "queries is on ", queries.device(),
              " but database is on ", database.device());
  TORCH_CHECK_VALUE(queries.size(0) > 0, "queries is an empty batch (B = 0 rows)");
  TORCH_CHECK_VALUE(database.size(0) > 0, "database is empty (N = 0 rows)");
  check_bins(num_bins, lo, hi);
  check_labels(query_labels, database_labels, queries.size(0), database.size(0),
               queries.device());
  TORCH_CHECK_VALUE(!exclude_diagonal || queries.size(0) <= database.size(0),
                    "exclude_self needs B <= N (query i is database item i), got B = ",
                    queries.size(0), ", N = ", database.size(0));
}

BinState bin_state(const at::Tensor& grad_ap, const at::Tensor& pos_hist,
                   const at::Tensor& all_hist, const at::Tensor& num_pos, int64_t num_queries,
                   int64_t num_bins, at::ScalarType acc_dtype) {
  TORCH_CHECK_VALUE(pos_hist.dim() == 2 && pos_hist.size(0) == num_queries &&
                        pos_hist.size(1) == num_bins && all_hist.sizes() == pos_hist.sizes() &&
                        num_pos.numel() == num_queries && grad_ap.numel() == num_queries,
                    "backward: pos_hist and all_hist must be (B, num_bins) = (", num_queries, ", ",
                    num_bins, ") and grad_ap, num_pos (B,), as the forward returned them");
  return {grad_ap.to(acc_dtype).contiguous(), pos_hist.to(acc_dtype).contiguous(),
          all_hist.to(acc_dtype).contiguous(), num_pos.to(acc_dtype).contiguous()};
}

void raise_bad_input(int flags) {
  TORCH_CHECK_VALUE(!(flags & kNonFiniteScore), "scores contains NaN or Inf");
  TORCH_CHECK_VALUE(!(flags & kTargetNotBinary), "targets must contain only 0 and 1");
}

at::ScalarType check_topk_similarity_args(const at::Tensor& queries, const at::Tensor& database,
                                          const char* database_name) {
  TORCH_CHECK_VALUE(queries.dim() == 2, "queries must be a 2-D (B, D) tensor, got shape ",
                    queries.sizes());
  TORCH_CHECK_VALUE(database.dim() == 2, database_name, " must be a 2-D (N, D) tensor, got shape ",
                    database.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(queries.scalar_type()),
                   "queries must be float16, bfloat16, float32 or float64, got ",
                   queries.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(database.scalar_type()), database_name,
                   " must be float16, bfloat16, float32 or float64, got ", database.scalar_type());
  TORCH_CHECK_VALUE(queries.size(1) == database.size(1), "queries and ", database_name,
                    " must have the same embedding dimension D, got queries ", queries.sizes(),
                    " and ", database_name, " ", database.sizes());
  TORCH_CHECK(queries.device() == database.device(), database_name, " is on ", database.device(),
              " but queries is on ", queries.device());
  const bool dbl = queries.scalar_type() == at::kDouble || database.scalar_type() == at::kDouble;
  return dbl ? at::kDouble : at::kFloat;
}

void check_exact_dot_pairs_args(const at::Tensor& queries, const at::Tensor& database,
                                const at::Tensor& query_rows, const at::Tensor& database_rows) {
  TORCH_CHECK_VALUE(queries.dim() == 2 && database.dim() == 2 &&
                        queries.size(1) == database.size(1),
                    "queries (B, D) and database (N, D) must be 2-D with the same D, got ",
                    queries.sizes(), " and ", database.sizes());
  TORCH_CHECK_TYPE(queries.scalar_type() == at::kFloat && database.scalar_type() == at::kFloat,
                   "queries and database must be float32, got ", queries.scalar_type(), " and ",
                   database.scalar_type());
  TORCH_CHECK_VALUE(query_rows.dim() == 1 && database_rows.sizes() == query_rows.sizes(),
                    "query_rows and database_rows must be 1-D of one length, got ",
                    query_rows.sizes(), " and ", database_rows.sizes());
  TORCH_CHECK_TYPE(query_rows.scalar_type() == at::kLong &&
                       database_rows.scalar_type() == at::kLong,
                   "query_rows and database_rows must be int64");
  for (const at::Tensor* t : {&database, &query_rows, &database_rows}) {
    TORCH_CHECK(t->device() == queries.device(), "every input must be on the device of queries (",
                queries.device(), "), got one on ", t->device());
  }
  if (query_rows.numel() == 0) return;
  // A row index out of range would read outside the inputs: checked here, on any device.
  const auto [q_min, q_max] = at::aminmax(query_rows);
  const auto [x_min, x_max] = at::aminmax(database_rows);
  TORCH_CHECK_INDEX(q_min.item<int64_t>() >= 0 && q_max.item<int64_t>() < queries.size(0),
                    "query_rows must lie in [0, ", queries.size(0), ")");
  TORCH_CHECK_INDEX(x_min.item<int64_t>() >= 0 && x_max.item<int64_t>() < database.size(0),
                    "database_rows must lie in [0, ", database.size(0), ")");
}

void check_topk_k(int64_t k, int64_t num_database) {
  TORCH_CHECK_VALUE(num_database > 0, "database is empty (N = 0 rows): there is nothing to rank");
  TORCH_CHECK_VALUE(k > 0, "k must be positive, got ", k);
  TORCH_CHECK_VALUE(k <= num_database, "k = ", k, " exceeds the number of database items N = ",
                    num_database);
}

void check_topk_state(const at::Tensor& queries, const at::Tensor& values,
                      const at::Tensor& indices, at::ScalarType acc_dtype, int64_t index_offset,
                      int64_t block_rows) {
  const int64_t B = queries.size(0);
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == B && values.size(1) > 0,
                    "values must be a (B, k) tensor with B = ", B, " and k > 0, got shape ",
                    values.sizes());
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), "indices must have the shape of values ",
                    values.sizes(), ", got ", indices.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == acc_dtype, "values must be ", acc_dtype,
                   " (the dtype scores are computed in for these inputs), got ",
                   values.scalar_type());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be int64, got ",
                   indices.scalar_type());
  TORCH_CHECK(values.device() == queries.device() && indices.device() == queries.device(),
              "values and indices must be on the device of queries (", queries.device(),
              "), got ", values.device(), " and ", indices.device());
  TORCH_CHECK_VALUE(values.is_contiguous() && indices.is_contiguous(),
                    "values and indices are updated in place and must be contiguous");
  TORCH_CHECK_VALUE(index_offset >= 0, "index_offset must be >= 0, got ", index_offset);
  TORCH_CHECK_VALUE(index_offset <= std::numeric_limits<int64_t>::max() - block_rows,
                    "index_offset + rows overflows int64");
}

}  // namespace fastap

TORCH_LIBRARY(fastap, m) {
  // Per-row AP of histogram-binned scores (docs/estimators.md) and the per-row state its
  // backward needs: (ap (B,), pos_hist (B, M), all_hist (B, M), num_pos (B,)), all in the
  // accumulation dtype.
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
  // The same AP with scores = queries @ database.T formed tile by tile and never stored.
  m.def(
      "embedding_ap(Tensor queries, Tensor database, Tensor query_labels, "
      "Tensor database_labels, int num_bins, float lo, float hi, bool open_ends, "
      "bool exclude_diagonal) -> (Tensor, Tensor, Tensor, Tensor)");
  // (dL/dqueries, dL/ddatabase), recomputing each tile of scores. output_mask says which of the
  // two are wanted (as convolution_backward's does); an unwanted one is returned empty, (0,),
  // and its GEMM skipped: an entirely detached database (a fixed gallery, a detached ref_emb)
  // needs no (N, D) database gradient.
  m.def(
      "embedding_ap_backward(Tensor grad_ap, Tensor queries, Tensor database, "
      "Tensor query_labels, Tensor database_labels, Tensor pos_hist, Tensor all_hist, "
      "Tensor num_pos, int num_bins, float lo, float hi, bool open_ends, "
      "bool exclude_diagonal, bool[2] output_mask) -> (Tensor, Tensor)");
  // Exact top-k per query of scores queries (B, D) · databaseᵀ (N, D), best first, ties to the
  // lower database index; the database is streamed in blocks, never the (B, N) score matrix.
  // Not differentiable: (values (B, k) in float32, float64 if an input is, indices (B, k) int64).
  m.def(
      "topk_similarity(Tensor queries, Tensor database, int k, bool largest=True) "
      "-> (Tensor values, Tensor indices)");
  // Merges the rows database_block (n, D) -- database indices index_offset .. index_offset+n-1 --
  // into a running top-k (values, indices) (B, k), in place and left best first. Empty slots have
  // index -1. Lets a caller stream a database that does not fit in memory block by block.
  m.def(
      "topk_similarity_update(Tensor queries, Tensor database_block, int index_offset, "
      "Tensor(a!) values, Tensor(b!) indices, bool largest=True) -> ()");
  // The low-precision copy of a float32 database (N, D) that a certified coarse pass multiplies
  // -- dtype bfloat16 (None) or int8 -- and its per-row bound terms, rounded up
  // (docs/search.md): (‖x̂_j‖, ‖x_j − x̂_j‖) (N, 2), and the row's scale s_j for int8 (N, 3).
  m.def("prepare_lowp(Tensor database, ScalarType? dtype=None) -> (Tensor lowp, Tensor norms)");
  // topk_similarity_update with a low-precision coarse pass on (lowp_block, lowp_norms), the
  // output of prepare_lowp for database_block (its dtype names the pass), or (both None) on a
  // copy of dtype lowp_dtype (default bfloat16) converted as the search goes: the same values
  // and indices, certified. Returns the number of exact re-scores done per query (B,) int64,
  // what the coarse pass could not settle.
  m.def(
      "topk_similarity_lowp_update(Tensor queries, Tensor database_block, Tensor? lowp_block, "
      "Tensor? lowp_norms, int index_offset, Tensor(a!) values, Tensor(b!) indices, "
      "bool largest=True, ScalarType? lowp_dtype=None) -> Tensor");
  // The certified value of P chosen pairs: out[p] = fl32(Σ_d queries[query_rows[p], d] ·
  // database[database_rows[p], d]), the exact products summed in float64 in the fixed order of
  // the CPU search (8 partial sums over d mod 8, then a fixed tree), so every device returns the
  // same bits. queries (B, D) and database (N, D) float32, the row indices (P,) int64 -> (P,).
  m.def(
      "exact_dot_pairs(Tensor queries, Tensor database, Tensor query_rows, "
      "Tensor database_rows) -> Tensor");
}

// `import fastap._C` only needs to load this library; the ops are reached through torch.ops.fastap.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
