"""Functional forms of the listwise AP losses (docs/estimators.md).

Quantized AP (Revaud et al., ICCV 2019) bins scores into M triangles on ``score_range`` with open
end bins; FastAP (Cakir et al., CVPR 2019) bins squared distances of L2-normalised embeddings on
[0, 4] with closed end bins. Both are one kernel: each score touches at most two adjacent bins, so
the work is O(B·N) and the extra memory O(B·M).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import (as_labels, as_range, check_flag, check_float, check_tensor,
                      check_weights, fastap_num_bins, has_values, is_vmapped)
from .ops import embedding_ap, histogram_ap, histogram_ap_backward

__all__ = ["average_precision", "ap_loss", "ap_loss_from_embeddings", "embedding_ap_loss",
           "fastap_loss"]

Relevance = Union[Tensor, Sequence[Tensor]]


def _relevance_kwargs(targets: Relevance) -> dict:
    if isinstance(targets, Tensor):
        return {"targets": targets}
    if isinstance(targets, (tuple, list)) and len(targets) == 2:
        return {"query_labels": targets[0], "database_labels": targets[1]}
    raise TypeError("targets must be a (B, N) tensor or a pair (query_labels, database_labels), "
                    f"got {type(targets).__name__}")


def average_precision(scores: Tensor, targets: Relevance, num_bins: int = 25,
                      score_range: Sequence[float] = (0.0, 1.0), *,
                      exclude_diagonal: bool = False) -> Tensor:
    r"""Differentiable quantized AP of each row of ``scores``.

    With M bins of width Δ = (hi - lo)/(M - 1) centred at z_k = hi - kΔ (open end bins), the
    histograms c_k = Σ_j w_k(s_ij), c⁺_k = Σ_j y_ij w_k(s_ij) and their running sums C, C⁺ from
    the best bin give

        AP_i = (1/N⁺_i) Σ_k c⁺_k C⁺_k / C_k.

    Args:
        scores: (B, N) similarities, higher is better; any float dtype and strides.
        targets: (B, N) bool/0-1 relevance, or a pair ``(query_labels (B,), database_labels (N,))``
            of integer labels (equal labels are relevant) so that no (B, N) mask is stored.
        num_bins: M, at least 2.
        score_range: (lo, hi) of the bin centres; scores outside fall in the end bins.
        exclude_diagonal: leave database item i out of query i's ranking (a batch ranked
            against itself).

    Returns:
        (B,) AP in float32 (float64 for float64 scores); NaN for rows without positives.
    """
    lo, hi = as_range(score_range, "score_range")
    ap, *_ = histogram_ap(scores, **_relevance_kwargs(targets), num_bins=num_bins, lo=lo, hi=hi,
                          open_ends=True, exclude_diagonal=exclude_diagonal)
    return ap


def _mean_ap_loss(ap: Tensor, num_pos: Tensor, weights: Optional[Tensor]) -> Tensor:
    """1 - weighted mean AP over rows with positives; a graph-connected 0 when none counts."""
    valid = num_pos > 0
    row_weight = valid.to(ap.dtype)
    if weights is not None:
        weights = check_weights(weights, ap.shape[0])
        # Divided by the largest weight of a counted row, in the wider dtype, before they meet
        # the AP: weights of 1e-40 (below float32's normal range) or 1e38 (whose sum overflows)
        # are then the uniform weights they are.
        weights = torch.where(valid, weights.to(torch.promote_types(weights.dtype, ap.dtype)),
                              0)
        peak = weights.amax()
        row_weight = (weights / torch.where(peak > 0, peak, 1)).to(ap.dtype)
    weighted = (torch.where(valid, ap, torch.zeros_like(ap)) * row_weight).sum()
    total = row_weight.sum()
    return torch.where(total > 0, 1 - weighted / torch.where(total > 0, total, 1), weighted * 0)


def ap_loss(scores: Tensor, targets: Relevance, num_bins: int = 25,
            score_range: Sequence[float] = (0.0, 1.0), weights: Optional[Tensor] = None, *,
            exclude_diagonal: bool = False) -> Tensor:
    r"""Quantized-AP loss 1 - (Σ_i q_i AP_i)/(Σ_i q_i) over rows with at least one positive.

    Arguments as :func:`average_precision`; ``weights`` q is an optional (B,) finite,
    non-negative per-row weight of which only the ratios count (weights of 1e-40 are uniform
    weights: they are divided by the largest one of a row with a positive first). Returns a scalar; when no row has a positive (or every row with
    one has weight 0) it is 0 and still part of the autograd graph.
    """
    lo, hi = as_range(score_range, "score_range")
    ap, _, _, num_pos = histogram_ap(scores, **_relevance_kwargs(targets), num_bins=num_bins,
                                     lo=lo, hi=hi, open_ends=True,
                                     exclude_diagonal=exclude_diagonal)
    return _mean_ap_loss(ap, num_pos, weights)


#: Above this many bytes of (B, N) scores the embedding losses switch to the fused kernel, which
#: never stores them; below it one GEMM plus the score kernel is faster.
FUSED_THRESHOLD_BYTES = 256 * 2**20


def _all_finite(x: Tensor) -> bool:
    """Whether ``x`` holds no NaN or Inf. A NaN or an Inf makes the sum non-finite, so one
    reduction decides; ``torch.isfinite(x)``, whose temporaries take 1.75 times the memory of
    ``x`` (224 MiB for a 128 MiB memory bank), runs only when the sum is not finite, to tell an
    overflow of finite values apart."""
    low_precision = x.dtype in (torch.float16, torch.bfloat16)
    total = x.sum(dtype=torch.float32 if low_precision else None)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def _check_embeddings(embeddings: Tensor, labels: Tensor, name: str, labels_name: str,
                      may_be_empty: bool = False) -> Tensor:
    """Checks a (rows, D) float tensor of embeddings and their labels; returns the labels as
    int64."""
    check_float(embeddings, name)
    labels = as_labels(check_tensor(labels, labels_name), labels_name)
    if labels.device != embeddings.device:
        raise RuntimeError(f"{labels_name} is on {labels.device} but {name} is on "
                           f"{embeddings.device}")
    if embeddings.dim() != 2:
        rows = "B" if name in ("embeddings", "queries") else "N"
        raise ValueError(f"{name} must be ({rows}, D), got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column (D >= 1), got shape "
                         f"{tuple(embeddings.shape)}")
    if embeddings.shape[0] == 0 and not may_be_empty:
        raise ValueError(f"{name} is empty: there is nothing to rank")
    # The kernels would refuse the NaN similarities too, but by the name of their input
    # ("scores"); one host sync, skipped while compiling.
    if has_values(embeddings) and not _all_finite(embeddings):
        raise ValueError(f"{name} contains NaN or Inf")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{labels_name} must be ({embeddings.shape[0]},) to match {name}, "
                         f"got shape {tuple(labels.shape)}")
    return labels


#: The smallest exponent e for which 2^-e is finite, by accumulation dtype.
_MIN_EXPONENT = {dtype: 1 - math.frexp(torch.finfo(dtype).max)[1]
                 for dtype in (torch.float32, torch.float64)}


def _unit_rows(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """The rows of ``x`` scaled to unit L2 norm (into ``out`` if given).

    Each row is first multiplied by 2^-e, e the exponent of its largest magnitude: exact, and
    it brings that entry into [0.5, 1), so the sum of squares overflows no more (rows x 1e20,
    float16 rows whose norm passes 65,504) and does not underflow either. Half and bfloat16
    rows are normalised in float32 and rounded once. Rows of zeros stay zero.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    peak = x.detach().abs().amax(dim=1, keepdim=True).to(acc)
    scale = torch.exp2(-torch.frexp(peak).exponent.clamp_min(_MIN_EXPONENT[acc]).to(acc))
    if out is not None and x.dtype == acc == out.dtype:  # no (N, D) temporary
        return F.normalize(torch.mul(x, scale, out=out), dim=1, out=out)
    rows = F.normalize(x.to(acc) * scale, dim=1).to(x.dtype if out is None else out.dtype)
    return rows if out is None else out.copy_(rows)


class _QueriesAsDatabaseRows(torch.autograd.Function):
    """Identity on the AP of queries ranked by the fused kernel over ``[queries; rest]``, given to
    it with the queries' copy detached, so that ``rest`` (a memory bank) costs no gradient unless
    it has one. The backward adds what the kernel then leaves out, the queries' gradient as the
    database's first B rows: dL/dq_j += Σ_i g_ij q_i over the (B, B) block of score gradients
    g_ij, formed from the rows' full histograms by the score kernel's backward."""

    generate_vmap_rule = True  # its forward and backward are vmappable operations

    @staticmethod
    def forward(ap, queries, query_labels, pos_hist, all_hist, num_pos, axis):
        return ap.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, queries, query_labels, pos_hist, all_hist, num_pos, axis = inputs
        ctx.save_for_backward(queries, query_labels, pos_hist, all_hist, num_pos)
        ctx.axis = axis

    @staticmethod
    def backward(ctx, grad_ap):
        # Not once_differentiable (which would silently cut grad_ap from the graph, a zero
        # forward-mode derivative): a second derivative reaches histogram_ap_backward, which
        # refuses it by name.
        queries, labels, pos_hist, all_hist, num_pos = ctx.saved_tensors
        grad_queries = None
        if ctx.needs_input_grad[1]:
            # In the histograms' dtype: float32 products of half/bfloat16 rows, as the kernel's.
            q = queries.to(pos_hist.dtype)
            num_bins, lo, hi, open_ends = ctx.axis
            block_grad = histogram_ap_backward(
                grad_ap, q @ q.T, query_labels=labels, database_labels=labels,
                pos_hist=pos_hist, all_hist=all_hist, num_pos=num_pos, num_bins=num_bins, lo=lo,
                hi=hi, open_ends=open_ends, exclude_diagonal=True)
            grad_queries = (block_grad.T @ q).to(queries.dtype)
        return grad_ap, grad_queries, None, None, None, None, None


def _ranked_ap(queries: Tensor, database: Tensor, query_labels: Tensor, database_labels: Tensor,
               *, num_bins: int, lo: float, hi: float, open_ends: bool, exclude_self: bool,
               fused: Optional[bool], batch_first: bool = False) -> tuple[Tensor, Tensor]:
    """(AP, num_pos) of every query ranked over the database by dot product.

    ``batch_first``: ``database[:B]`` holds the queries' values, detached (see
    :func:`_batch_then_memory`); query i is ranked without item i and the queries get their
    gradient in both roles, so the rest of the database costs no gradient unless it has one.
    """
    if check_flag(fused, "fused", optional=True) is None:
        fused = queries.shape[0] * database.shape[0] * 4 > FUSED_THRESHOLD_BYTES
    axis = dict(num_bins=num_bins, lo=lo, hi=hi, open_ends=open_ends)
    if fused:
        ap, pos_hist, all_hist, num_pos = embedding_ap(
            queries, database, query_labels, database_labels,
            exclude_diagonal=exclude_self or batch_first, **axis)
        if batch_first:
            ap = _QueriesAsDatabaseRows.apply(ap, queries, query_labels, pos_hist, all_hist,
                                              num_pos, (num_bins, lo, hi, open_ends))
    else:
        if batch_first:
            rest = database[queries.shape[0]:]
            scores = torch.cat([queries @ queries.T, queries @ rest.T], dim=1)
        else:
            scores = queries @ database.T
        ap, _, _, num_pos = histogram_ap(scores, query_labels=query_labels,
                                         database_labels=database_labels,
                                         exclude_diagonal=exclude_self or batch_first, **axis)
    return ap, num_pos


def _batch_then_memory(queries: Tensor, memory: Tensor) -> Tensor:
    """``[queries.detach(); normalize(memory)]`` (B + N, D). A memory without gradient (the usual
    bank) is normalised straight into its rows: one (N, D) tensor, not a normalised copy and a
    concatenation of it."""
    # (Under torch.vmap the rows cannot be written in place: no batching rule for out=.)
    if (memory.requires_grad and torch.is_grad_enabled()) or is_vmapped(queries):
        return torch.cat([queries.detach(), _unit_rows(memory.to(queries.dtype))])
    database = queries.new_empty((queries.shape[0] + memory.shape[0], queries.shape[1]))
    database[:queries.shape[0]] = queries.detach()
    with torch.no_grad():
        _unit_rows(memory, out=database[queries.shape[0]:])
    return database


#: Why a miner's indices_tuple is refused, and what to pass instead.
NO_MINER = ("fastap's AP losses rank every pair and take no miner's indices_tuple "
            "(pytorch-metric-learning's third argument); pass a reference set as ref_emb=..., "
            "ref_labels=...")


def _cosine_ranking(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                    ref_labels: Optional[Tensor], exclude_self: Optional[bool],
                    include_batch: bool):
    """L2-normalised (queries, database, labels...) and whether query i is database item i;
    with ``include_batch`` the database is :func:`_batch_then_memory`."""
    exclude_self = check_flag(exclude_self, "exclude_self", optional=True)
    include_batch = check_flag(include_batch, "include_batch")
    labels = _check_embeddings(embeddings, labels, "embeddings", "labels")
    if isinstance(ref_emb, tuple):
        # pytorch-metric-learning losses take (embeddings, labels, indices_tuple, ref_emb, ...).
        raise TypeError(f"ref_emb must be a tensor, got a tuple: {NO_MINER}")
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together")
    if include_batch and ref_emb is None:
        raise ValueError("include_batch=True ranks each query against the rest of the batch and "
                         "ref_emb (a memory bank), but no ref_emb was given")
    if include_batch and exclude_self is False:
        raise ValueError("include_batch=True leaves each query out of its own ranking; "
                         "exclude_self=False contradicts it")
    if ref_emb is None:
        if exclude_self is False:
            raise ValueError("exclude_self=False needs ref_emb: a batch ranked against itself "
                             "always leaves each query out of its own ranking")
        queries = _unit_rows(embeddings.to(_ranking_dtype(embeddings)))
        return queries, queries, labels, labels, True
    # An empty memory (nothing stored yet) still leaves the batch to rank.
    ref_labels = _check_embeddings(ref_emb, ref_labels, "ref_emb", "ref_labels",
                                   may_be_empty=include_batch)
    if ref_emb.device != embeddings.device:
        raise RuntimeError(f"ref_emb is on {ref_emb.device} but embeddings is on "
                           f"{embeddings.device}")
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(f"ref_emb must be (N, {embeddings.shape[1]}), got {tuple(ref_emb.shape)}")
    if exclude_self and not include_batch and ref_emb.shape[0] < embeddings.shape[0]:
        raise ValueError("exclude_self=True says the first B rows of ref_emb are the queries, "
                         f"but ref_emb has {ref_emb.shape[0]} rows for B = {embeddings.shape[0]}")
    dtype = _ranking_dtype(embeddings, ref_emb)
    queries = _unit_rows(embeddings.to(dtype))
    if include_batch:  # (the memory is normalised into the database's dtype there)
        return (queries, _batch_then_memory(queries, ref_emb), labels,
                torch.cat([labels, ref_labels]), True)
    return queries, _unit_rows(ref_emb.to(dtype)), labels, ref_labels, bool(exclude_self)


def _ranking_dtype(*embeddings: Tensor) -> torch.dtype:
    """float64 if any input is, else float32. Half and bfloat16 embeddings (what autocast hands
    a loss) are ranked in float32: upcast exactly, normalised and multiplied without rounding
    back, so their loss is the float32 loss of their values; autograd returns their gradient
    in their own dtype. (Rounding the unit rows or the scores to bfloat16 moved the loss by
    2e-4 and its gradient by most of its size on 48 random rows.)"""
    return torch.float64 if any(e.dtype == torch.float64 for e in embeddings) else torch.float32


def ap_loss_from_embeddings(queries: Tensor, database: Tensor, query_labels: Tensor,
                            database_labels: Tensor, num_bins: int = 25,
                            score_range: Sequence[float] = (0.0, 1.0), exclude_self: bool = False
                            ) -> Tensor:
    r"""Quantized-AP loss of ``scores = queries @ database.T``, fused so the scores are never stored.

    Equal to ``ap_loss(queries @ database.T, (query_labels, database_labels), ...)``, but the
    kernel forms the similarities tile by tile, keeps only per-row histograms and, in the backward,
    recomputes each tile and multiplies dL/dscores straight into the embedding gradients. Extra
    memory is O((B + N)·(D + M)) instead of the B·N score matrix.

    Args:
        queries: (B, D); database: (N, D); pass L2-normalised rows for cosine similarities.
        query_labels: (B,), database_labels: (N,) integer labels; equal labels are relevant.
        exclude_self: query i is database item i and is left out of its own ranking (B <= N).
    """
    query_labels = _check_embeddings(queries, query_labels, "queries", "query_labels")
    database_labels = _check_embeddings(database, database_labels, "database", "database_labels")
    lo, hi = as_range(score_range, "score_range")
    ap, num_pos = _ranked_ap(queries, database, query_labels, database_labels, num_bins=num_bins,
                             lo=lo, hi=hi, open_ends=True,
                             exclude_self=check_flag(exclude_self, "exclude_self"), fused=True)
    return _mean_ap_loss(ap, num_pos, None)


def embedding_ap_loss(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                      ref_labels: Optional[Tensor] = None, num_bins: int = 25,
                      score_range: Sequence[float] = (0.0, 1.0), *,
                      exclude_self: Optional[bool] = None, include_batch: bool = False,
                      fused: Optional[bool] = None) -> Tensor:
    """Quantized-AP loss of cosine similarities, positives = equal labels.

    embeddings (B, D) and labels (B,) are the queries; without ``ref_emb`` (N, D) / ``ref_labels``
    (N,) the batch is ranked against itself with each query left out of its own ranking. With
    ``ref_emb``, ``exclude_self=True`` says that its first B rows are the queries themselves.
    ``include_batch=True`` ranks each query against the rest of the batch followed by
    ``ref_emb`` (a memory bank): the loss of ``ref_emb=cat([embeddings, ref_emb])`` with
    ``exclude_self=True``, but the batch's similarities to itself are differentiated on their
    own, so a ``ref_emb`` without gradient costs none (no (N, D) gradient, one product less).
    ``fused`` picks the kernel that never stores the (B, N) similarities; by default it is used
    when they would take over ``FUSED_THRESHOLD_BYTES``.
    """
    queries, database, q_labels, db_labels, exclude = _cosine_ranking(
        embeddings, labels, ref_emb, ref_labels, exclude_self, include_batch)
    lo, hi = as_range(score_range, "score_range")
    ap, num_pos = _ranked_ap(queries, database, q_labels, db_labels, num_bins=num_bins, lo=lo,
                             hi=hi, open_ends=True, exclude_self=exclude, fused=fused,
                             batch_first=include_batch)
    return _mean_ap_loss(ap, num_pos, None)


def fastap_loss(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, num_bins: int = 10, *,
                exclude_self: Optional[bool] = None, include_batch: bool = False,
                fused: Optional[bool] = None) -> Tensor:
    r"""FastAP loss (Cakir et al., CVPR 2019) with pytorch-metric-learning's semantics.

    Distances d = ‖x̂ - ŷ‖² = 2 - 2 cos ∈ [0, 4] are binned at num_bins + 1 centres
    0, 4/num_bins, …, 4 with closed end bins, ascending. Because d is affine in the cosine
    similarity, the same bins are the centres 1, 1 - 2/num_bins, …, -1 on the similarity axis,
    which is how the kernel bins them. Loss = mean over anchors with a positive of 1 - FastAP_i.
    Arguments as :func:`embedding_ap_loss`.
    """
    num_bins = fastap_num_bins(num_bins)
    queries, database, q_labels, db_labels, exclude = _cosine_ranking(
        embeddings, labels, ref_emb, ref_labels, exclude_self, include_batch)
    ap, num_pos = _ranked_ap(queries, database, q_labels, db_labels, num_bins=num_bins + 1,
                             lo=-1.0, hi=1.0, open_ends=False, exclude_self=exclude, fused=fused,
                             batch_first=include_batch)
    return _mean_ap_loss(ap, num_pos, None)
