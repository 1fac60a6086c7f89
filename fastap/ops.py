"""The registered operators: fake (meta) implementations and autograd, plus thin wrappers.

The kernels are declared in ``csrc/fastap.cpp`` and implemented per device in ``csrc/cpu`` and
``csrc/cuda``. Relevance is either a (B, N) 0/1 matrix ``targets`` or the pair
``(query_labels (B,), database_labels (N,))`` so that the (B, N) matrix is never stored.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (registers torch.ops.fastap.*)
from ._checks import as_int, as_labels, check_flag, check_tensor

__all__ = ["histogram_ap", "histogram_ap_backward", "embedding_ap", "topk_similarity",
           "topk_similarity_update", "prepare_lowp", "topk_similarity_lowp_update",
           "exact_dot_pairs"]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_same_device(first: Tensor, **others: Optional[Tensor]) -> None:
    # A mix of real and meta tensors dispatches to the fake kernels, so they check devices too.
    for name, tensor in others.items():
        if tensor is not None:
            torch._check(tensor.device == first.device,
                         lambda: f"{name} is on {tensor.device} but the scores are on "
                                 f"{first.device}")


# Both forward ops take four tensors (the scores or the two embedding sets, then relevance) and
# the bin parameters (num_bins, lo, hi, open_ends, exclude_diagonal), and return
# (ap, pos_hist, all_hist, num_pos). Their backward ops take (grad_ap, the four tensors, the three
# state tensors, the bin parameters) and return the gradients of the first one or two inputs.

def _state_fake(first: Tensor, num_bins: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, acc = first.shape[0], _accumulation_dtype(first.dtype)
    return (first.new_empty((batch,), dtype=acc), first.new_empty((batch, num_bins), dtype=acc),
            first.new_empty((batch, num_bins), dtype=acc), first.new_empty((batch,), dtype=acc))


@torch.library.register_fake("fastap::histogram_ap")
def _histogram_ap_fake(scores, targets, query_labels, database_labels, num_bins, *_params):
    torch._check(scores.dim() == 2, lambda: "scores must be a 2-D (B, N) tensor")
    torch._check(2 <= num_bins <= 2**24, lambda: "num_bins must be in [2, 2^24]")
    _check_same_device(scores, targets=targets, query_labels=query_labels,
                       database_labels=database_labels)
    return _state_fake(scores, num_bins)


@torch.library.register_fake("fastap::histogram_ap_backward")
def _histogram_ap_backward_fake(grad_ap, scores, *_rest):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastap::embedding_ap")
def _embedding_ap_fake(queries, database, query_labels, database_labels, num_bins, *_params):
    torch._check(queries.dim() == 2 and database.dim() == 2,
                 lambda: "queries and database must be 2-D")
    torch._check(2 <= num_bins <= 2**24, lambda: "num_bins must be in [2, 2^24]")
    _check_same_device(queries, database=database, query_labels=query_labels,
                       database_labels=database_labels)
    return _state_fake(queries, num_bins)


@torch.library.register_fake("fastap::embedding_ap_backward")
def _embedding_ap_backward_fake(grad_ap, queries, database, query_labels, database_labels,
                                pos_hist, all_hist, num_pos, num_bins, lo, hi, open_ends,
                                exclude_diagonal, output_mask):
    torch._check(len(output_mask) == 2, lambda: "output_mask must hold two booleans")
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) if wanted
                 else x.new_empty((0,)) for x, wanted in zip((queries, database), output_mask))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4], *output[1:])
    ctx.params = inputs[4:]
    # Only the AP is differentiable; the histograms are bookkeeping for the backward.
    ctx.mark_non_differentiable(*output[1:])


def _wanted_grads(ctx, num_differentiable: int) -> list[bool]:
    """Which of the first inputs' gradients this backward must compute: those that require
    grad, less those the running backward will not use. ``torch.autograd.grad(loss, queries)``
    does not use the database's, and the engine can say so for an input computed by another
    node (the losses' normalised rows); for a leaf it cannot (it raises), nor under torch.func
    (no graph edges), and the gradient is computed."""
    wanted = list(ctx.needs_input_grad[:num_differentiable])
    edges = getattr(ctx, "next_functions", ())
    for i, (node, _) in enumerate(edges[:num_differentiable]):
        if wanted[i] and node is not None:
            try:
                wanted[i] = bool(torch._C._will_engine_execute_node(node))
            except RuntimeError:  # a leaf under torch.autograd.grad
                pass
    return wanted


def _ap_backward(ctx, grad_ap, backward_call, num_differentiable: int) -> tuple:
    """The gradients of an AP op's inputs; ``backward_call`` runs its backward op (the op
    itself, or its :func:`_backward_call` Function)."""
    grads = [None] * (4 + len(ctx.params))
    wanted = _wanted_grads(ctx, num_differentiable)
    if num_differentiable == 1 and wanted[0]:
        grads[0] = backward_call(grad_ap, *ctx.saved_tensors, *ctx.params)
    elif any(wanted):
        # Only the gradients autograd asks for: an entirely detached database (a fixed
        # gallery) costs no (N, D) gradient and one GEMM less.
        result = backward_call(grad_ap, *ctx.saved_tensors, *ctx.params, wanted)
        grads[:num_differentiable] = [g if w else None for g, w in zip(result, wanted)]
    return tuple(grads)


def _register_autograd(name: str, backward_op, num_differentiable: int) -> None:
    """The autograd formula of the op itself, for direct ``torch.ops.fastap`` callers."""
    def backward(ctx, grad_ap, *_state_grads):
        return _ap_backward(ctx, grad_ap, backward_op, num_differentiable)

    torch.library.register_autograd(name, backward, setup_context=_setup_context)


def _vmap_by_slices(function, info, in_dims, args) -> tuple:
    """A vmap rule for the AP functions: one call per vmapped slice, stacked. (Each call is a
    whole AP computation over its own rows and columns; folding the vmapped dimension into the
    rows would mix up the diagonal and the labels of different slices.)"""
    # (A list argument, output_mask, has a list of Nones as its in_dim: it is not batched.)
    results = [function.apply(*(a.select(d, i) if isinstance(d, int) else a
                                for a, d in zip(args, in_dims)))
               for i in range(info.batch_size)]
    if isinstance(results[0], Tensor):
        return torch.stack(results), 0
    return tuple(torch.stack(parts) for parts in zip(*results)), (0,) * len(results[0])


def _backward_call(backward_op):
    """An autograd.Function that calls an AP backward op: without a second derivative, and
    with a vmap rule for per-sample gradients (``vmap(grad(...))``)."""

    class BackwardCall(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return backward_op(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, *grads):
            _no_double_backward(ctx)

        @staticmethod
        def vmap(info, in_dims, *args):
            return _vmap_by_slices(BackwardCall, info, in_dims, args)

    return BackwardCall


_HISTOGRAM_AP_BACKWARD = _backward_call(torch.ops.fastap.histogram_ap_backward)
_EMBEDDING_AP_BACKWARD = _backward_call(torch.ops.fastap.embedding_ap_backward)


def _ap_function(op, backward_call, num_differentiable: int):
    """An AP op as an autograd.Function with ``setup_context`` and a vmap rule, so that
    :mod:`torch.func` transforms (``grad``, ``vmap``, ``jacrev``) go through it; the op's
    registered autograd formula serves direct ``torch.ops.fastap`` callers."""

    class APFunction(torch.autograd.Function):
        @staticmethod
        def forward(*inputs):
            return op(*inputs)

        setup_context = staticmethod(_setup_context)

        @staticmethod
        def backward(ctx, grad_ap, *_state_grads):
            return _ap_backward(ctx, grad_ap, backward_call, num_differentiable)

        @staticmethod
        def vmap(info, in_dims, *args):
            return _vmap_by_slices(APFunction, info, in_dims, args)

    return APFunction


_HistogramAP = _ap_function(torch.ops.fastap.histogram_ap, _HISTOGRAM_AP_BACKWARD.apply, 1)
_EmbeddingAP = _ap_function(torch.ops.fastap.embedding_ap, _EMBEDDING_AP_BACKWARD.apply, 2)


def _call(function, *inputs):
    """Runs an AP op through its autograd.Function (what torch.func needs) or, while
    torch.compile traces, through the op and its registered autograd formula (what Dynamo
    traces; it does not follow these Functions' nested backward calls)."""
    if torch.compiler.is_compiling():
        return function.forward(*inputs)
    return function.apply(*inputs)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastap's AP gradients are closed-form kernels without second derivatives: "
        "differentiating a gradient of an AP loss (create_graph=True followed by a backward "
        "through that gradient) is not supported")


def _register_once_differentiable(name: str) -> None:
    # Without an autograd kernel a backward op called under create_graph=True would run with
    # autograd below it (its inner GEMMs then refuse out= tensors) or hand back a gradient that
    # is silently detached; this makes the second derivative an explicit error instead.
    torch.library.register_autograd(name, _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


_register_autograd("fastap::histogram_ap", torch.ops.fastap.histogram_ap_backward, 1)
_register_autograd("fastap::embedding_ap", torch.ops.fastap.embedding_ap_backward, 2)
_register_once_differentiable("fastap::histogram_ap_backward")
_register_once_differentiable("fastap::embedding_ap_backward")


def histogram_ap(scores: Tensor, targets: Optional[Tensor] = None, *,
                 query_labels: Optional[Tensor] = None, database_labels: Optional[Tensor] = None,
                 num_bins: int, lo: float, hi: float, open_ends: bool,
                 exclude_diagonal: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Histogram-binned AP per row (docs/estimators.md) and its bookkeeping.

    Args:
        scores: (B, N) float16/bfloat16/float32/float64, any strides; higher is better.
        targets: (B, N) bool or 0/1 relevance, or None when labels are given.
        query_labels, database_labels: (B,) and (N,) integer labels; equal labels are relevant.
        num_bins: M >= 2 bin centres z_k = hi - k (hi - lo)/(M - 1).
        open_ends: True puts scores >= hi fully in bin 0 and <= lo fully in bin M-1 (quantized
            AP); False lets the end triangles fall to zero (FastAP).
        exclude_diagonal: ignore database item i when ranking for query i.

    Returns:
        ``(ap, pos_hist, all_hist, num_pos)``: AP (B,) with NaN for rows without positives, the
        positive and total histograms (B, M) and the positive counts (B,), all float32
        (float64 for float64 scores). Only ``ap`` is differentiable.
    """
    query_labels = as_labels(query_labels, "query_labels")
    database_labels = as_labels(database_labels, "database_labels")
    return _call(_HistogramAP, check_tensor(scores, "scores"), targets, query_labels,
                 database_labels, as_int(num_bins, "num_bins"), float(lo), float(hi),
                 bool(open_ends), check_flag(exclude_diagonal, "exclude_diagonal"))


def histogram_ap_backward(grad_ap: Tensor, scores: Tensor, targets: Optional[Tensor] = None, *,
                          query_labels: Optional[Tensor] = None,
                          database_labels: Optional[Tensor] = None, pos_hist: Tensor,
                          all_hist: Tensor, num_pos: Tensor, num_bins: int, lo: float,
                          hi: float, open_ends: bool, exclude_diagonal: bool = False) -> Tensor:
    """dL/dscores (B, N) of :func:`histogram_ap` given dL/dap (B,) and the state it returned
    (``pos_hist``, ``all_hist``, ``num_pos``); the other arguments are those of the forward.
    Has no derivative of its own (a second derivative is refused)."""
    return _call(_HISTOGRAM_AP_BACKWARD, grad_ap, scores, targets, query_labels, database_labels,
                 pos_hist, all_hist, num_pos, as_int(num_bins, "num_bins"), float(lo), float(hi),
                 bool(open_ends), check_flag(exclude_diagonal, "exclude_diagonal"))


def embedding_ap(queries: Tensor, database: Tensor, query_labels: Tensor,
                 database_labels: Tensor, *, num_bins: int, lo: float, hi: float,
                 open_ends: bool, exclude_diagonal: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`histogram_ap` of ``scores = queries @ database.T`` without storing the scores.

    Args:
        queries: (B, D) and database: (N, D), one float dtype. Half/bfloat16 products are
            accumulated in float32 (on CUDA with tensor-core GEMMs, whose backward takes the
            score gradients rounded to the input dtype, scaled by a power of two to stay in
            range). Pass L2-normalised embeddings for cosine similarities.
        query_labels, database_labels: (B,) and (N,) integer labels; equal labels are relevant.
        exclude_diagonal: query i is database item i and is left out of its own ranking.

    Memory: one tile of scores (at most 2048 × 4096) plus O(B·M) histograms, whatever B·N is;
    the backward recomputes the tiles (four B×D×N matrix products in all).
    """
    return _call(_EmbeddingAP, check_tensor(queries, "queries"),
                 check_tensor(database, "database"), as_labels(query_labels, "query_labels"),
                 as_labels(database_labels, "database_labels"), as_int(num_bins, "num_bins"),
                 float(lo), float(hi), bool(open_ends),
                 check_flag(exclude_diagonal, "exclude_diagonal"))


# Exact top-k similarity search (fastap.search.topk_similarity). Neither op is differentiable:
# the indices are discrete and the values are a gather of scores a caller can recompute.


def _topk_accumulation_dtype(queries: Tensor, database: Tensor) -> torch.dtype:
    double = torch.float64 in (queries.dtype, database.dtype)
    return torch.float64 if double else torch.float32


@torch.library.register_fake("fastap::topk_similarity")
def _topk_similarity_fake(queries, database, k, largest=True):
    torch._check(queries.dim() == 2, lambda: "queries must be a 2-D (B, D) tensor")
    torch._check(database.dim() == 2, lambda: "database must be a 2-D (N, D) tensor")
    torch._check(queries.device == database.device,
                 lambda: f"database is on {database.device} but queries is on {queries.device}")
    torch._check(k > 0, lambda: f"k must be positive, got {k}")
    torch._check(k <= database.shape[0], lambda: f"k = {k} exceeds the number of database "
                 f"items N = {database.shape[0]}")
    batch = queries.shape[0]
    return (queries.new_empty((batch, k), dtype=_topk_accumulation_dtype(queries, database)),
            queries.new_empty((batch, k), dtype=torch.int64))


def _topk_similarity_setup_context(ctx, inputs, output):
    # Declared non-differentiable rather than left without autograd, so the outputs of inputs
    # that require grad are plain tensors instead of carrying a grad_fn that warns on backward.
    ctx.mark_non_differentiable(*output)


def _topk_similarity_backward(ctx, grad_values, grad_indices):
    return None, None, None, None


torch.library.register_autograd("fastap::topk_similarity", _topk_similarity_backward,
                                setup_context=_topk_similarity_setup_context)


@torch.library.register_fake("fastap::topk_similarity_update")
def _topk_similarity_update_fake(queries, database_block, index_offset, values, indices,
                                 largest=True):
    return None


def topk_similarity_update(queries: Tensor, database_block: Tensor, index_offset: int,
                           values: Tensor, indices: Tensor, largest: bool = True) -> None:
    """Merge database rows ``index_offset ..`` into a running exact top-k, in place.

    ``values`` (B, k) in the accumulation dtype (float32, or float64 if an input is float64)
    and ``indices`` (B, k) int64 are updated and left sorted best first; slots with index -1 are
    empty. Not differentiable.
    """
    torch.ops.fastap.topk_similarity_update(queries, database_block, int(index_offset), values,
                                            indices, bool(largest))


def topk_similarity(queries: Tensor, database: Tensor, k: int, largest: bool = True
                    ) -> tuple[Tensor, Tensor]:
    """The exact top-k of ``queries @ database.T`` (see :func:`fastap.topk_similarity`)."""
    return torch.ops.fastap.topk_similarity(queries, database, int(k), bool(largest))


@torch.library.register_fake("fastap::prepare_lowp")
def _prepare_lowp_fake(database, dtype=None):
    torch._check(database.dim() == 2, lambda: "database must be a 2-D (N, D) tensor")
    torch._check(database.dtype == torch.float32,
                 lambda: f"database must be float32 for a low-precision copy, got "
                         f"{database.dtype}")
    dtype = torch.bfloat16 if dtype is None else dtype
    torch._check(dtype in (torch.bfloat16, torch.int8),
                 lambda: f"the low-precision copy must be bfloat16 or int8, got {dtype}")
    cols = 3 if dtype == torch.int8 else 2
    return (database.new_empty(database.shape, dtype=dtype),
            database.new_empty((database.shape[0], cols)))


def prepare_lowp(database: Tensor, dtype: Optional[torch.dtype] = None
                 ) -> tuple[Tensor, Tensor]:
    """The low-precision copy of a float32 database (N, D) and its per-row bound terms.

    ``dtype=torch.bfloat16`` (default): row j of the copy is x̂_j = bf16(x_j) (round to nearest
    even, subnormals flushed to zero, as the bfloat16 dot-product instructions see them), and
    the terms are (‖x̂_j‖, ‖x_j − x̂_j‖) (N, 2). ``dtype=torch.int8``: the copy is X_j =
    round(x_j / s_j) in [−127, 127] with s_j = max_d |x_jd| / 127, so x̂_j = s_j·X_j, and the
    terms are (‖x̂_j‖, ‖x_j − x̂_j‖, s_j) (N, 3). Norms are rounded up; a row holding NaN or Inf
    has NaN terms (its pairs are always re-scored). Together they are what the certified
    search needs besides the float32 rows (docs/search.md).
    """
    return torch.ops.fastap.prepare_lowp(database, dtype)


@torch.library.register_fake("fastap::topk_similarity_lowp_update")
def _topk_similarity_lowp_update_fake(queries, database_block, lowp_block, lowp_norms,
                                      index_offset, values, indices, largest=True,
                                      lowp_dtype=None):
    torch._check(queries.device == database_block.device,
                 lambda: f"database_block is on {database_block.device} but queries is on "
                         f"{queries.device}")
    return queries.new_empty((queries.shape[0],), dtype=torch.int64)


def topk_similarity_lowp_update(queries: Tensor, database_block: Tensor,
                                lowp_block: Optional[Tensor], lowp_norms: Optional[Tensor],
                                index_offset: int, values: Tensor,
                                indices: Tensor, largest: bool = True,
                                lowp_dtype: Optional[torch.dtype] = None) -> Tensor:
    """:func:`topk_similarity_update` with a low-precision coarse pass: the same result,
    certified.

    ``lowp_block`` and ``lowp_norms`` are :func:`prepare_lowp` of ``database_block`` (float32),
    whose dtype names the pass, or both None to convert the block as the search goes to
    ``lowp_dtype`` (``torch.bfloat16``, the default, or ``torch.int8``); ``values`` must be
    float32. Only the candidates' float32 rows of ``database_block`` are read, so a
    memory-mapped block costs the pages of those rows. Returns the number of exact re-scores
    per query (B,) int64: the candidates the coarse bound could not settle.
    """
    return torch.ops.fastap.topk_similarity_lowp_update(queries, database_block, lowp_block,
                                                        lowp_norms, int(index_offset), values,
                                                        indices, bool(largest), lowp_dtype)


@torch.library.register_fake("fastap::exact_dot_pairs")
def _exact_dot_pairs_fake(queries, database, query_rows, database_rows):
    torch._check(query_rows.dim() == 1 and database_rows.shape == query_rows.shape,
                 lambda: "query_rows and database_rows must be 1-D of one length")
    return queries.new_empty(query_rows.shape, dtype=torch.float32)


def exact_dot_pairs(queries: Tensor, database: Tensor, query_rows: Tensor,
                    database_rows: Tensor) -> Tensor:
    """The certified values of chosen pairs, (P,) float32.

    out[p] = fl32(Σ_d queries[query_rows[p], d]·database[database_rows[p], d]), the exact
    products summed in float64 in one fixed order (the value every float32 search returns, the
    same bits on every device). ``queries`` (B, D) and ``database`` (N, D) float32, the row
    indices (P,) int64. Not differentiable.
    """
    return torch.ops.fastap.exact_dot_pairs(queries, database, query_rows, database_rows)

