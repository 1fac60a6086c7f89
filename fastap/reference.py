"""Dense pure-PyTorch formulations of the AP losses: the test oracle and the benchmark baseline.

These materialise the (B, N, M) bin weights exactly as the published implementations do
(naver/deep-image-retrieval's quantizer, pytorch-metric-learning's FastAP) and get their gradients
from autograd. They share no code with the kernels.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bin_weights", "average_precision", "ap_loss", "embedding_ap_loss", "fastap_loss",
           "topk_similarity"]


def bin_weights(scores: Tensor, num_bins: int, lo: float, hi: float, open_ends: bool) -> Tensor:
    """Triangular bin weights (B, N, M): w_k(s) = max(0, 1 - |s - z_k|/Δ), z_k = hi - kΔ.

    With open ends, bin 0 is 1 for s >= hi and bin M-1 is 1 for s <= lo.
    """
    delta = (hi - lo) / (num_bins - 1)
    centres = hi - delta * torch.arange(num_bins, dtype=scores.dtype, device=scores.device)
    s = scores.unsqueeze(-1)
    w = torch.relu(1 - (s - centres).abs() / delta)
    if open_ends:
        top = torch.relu(1 - torch.relu(hi - s[..., 0]) / delta)
        bottom = torch.relu(1 - torch.relu(s[..., 0] - lo) / delta)
        w = torch.cat([top.unsqueeze(-1), w[..., 1:-1], bottom.unsqueeze(-1)], dim=-1)
    return w


def _relevance_matrix(targets, batch: int, size: int) -> Tensor:
    if isinstance(targets, Tensor):
        return targets
    query_labels, database_labels = targets
    return query_labels.view(batch, 1) == database_labels.view(1, size)


def average_precision(scores: Tensor, targets, num_bins: int = 25,
                      score_range: Sequence[float] = (0.0, 1.0), *, exclude_diagonal: bool = False,
                      open_ends: bool = True) -> Tensor:
    """Per-row histogram AP (B,), NaN where a row has no positive; see fastap.functional."""
    lo, hi = (float(v) for v in score_range)
    batch, size = scores.shape
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.to(acc)
    y = _relevance_matrix(targets, batch, size).to(acc)
    keep = torch.ones(batch, size, dtype=acc, device=scores.device)
    if exclude_diagonal:
        keep = keep - torch.eye(batch, size, dtype=acc, device=scores.device)
    w = bin_weights(s, num_bins, lo, hi, open_ends) * keep.unsqueeze(-1)
    hist_all = w.sum(dim=1)
    hist_pos = (w * y.unsqueeze(-1)).sum(dim=1)
    cum_all = hist_all.cumsum(dim=1)
    cum_pos = hist_pos.cumsum(dim=1)
    nonzero = cum_all > 0
    terms = torch.where(nonzero, hist_pos * cum_pos / torch.where(nonzero, cum_all, 1), 0)
    num_pos = (y * keep).sum(dim=1)
    # NaN for rows without positives, without letting 0/0 poison the other rows' gradients.
    return torch.where(num_pos > 0, terms.sum(dim=1) / num_pos.clamp_min(1), torch.nan)


def _mean_loss(ap: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    valid = ~torch.isnan(ap)
    q = torch.ones_like(ap) if weights is None else weights.to(ap.dtype)
    if not valid.any():
        return ap.nan_to_num().sum() * 0
    return 1 - (ap[valid] * q[valid]).sum() / q[valid].sum()


def ap_loss(scores: Tensor, targets, num_bins: int = 25, score_range=(0.0, 1.0),
            weights: Optional[Tensor] = None, *, exclude_diagonal: bool = False) -> Tensor:
    """1 - weighted mean AP over rows with positives (dense)."""
    ap = average_precision(scores, targets, num_bins, score_range,
                           exclude_diagonal=exclude_diagonal)
    return _mean_loss(ap, weights)


def _normalised_pairs(embeddings, labels, ref_emb, ref_labels, exclude_self):
    if ref_emb is None:
        ref_emb, ref_labels, exclude_self = embeddings, labels, True
    x, r = F.normalize(embeddings, dim=1), F.normalize(ref_emb, dim=1)
    return x, r, (labels, ref_labels), bool(exclude_self)


def embedding_ap_loss(embeddings, labels, ref_emb=None, ref_labels=None, num_bins=25,
                      score_range=(0.0, 1.0), *, exclude_self=None) -> Tensor:
    """Dense quantized-AP loss on cosine similarities (the semantics of fastap.APLoss)."""
    x, r, targets, exclude = _normalised_pairs(embeddings, labels, ref_emb, ref_labels,
                                               exclude_self)
    return ap_loss(x @ r.T, targets, num_bins, score_range, exclude_diagonal=exclude)


def fastap_loss(embeddings, labels, ref_emb=None, ref_labels=None, num_bins=10, *,
                exclude_self=None) -> Tensor:
    """Dense FastAP on squared distances in [0, 4], ascending closed bins (fastap.FastAPLoss)."""
    x, r, targets, exclude = _normalised_pairs(embeddings, labels, ref_emb, ref_labels,
                                               exclude_self)
    dist = torch.cdist(x, r) ** 2
    # Ascending distance = descending score -d, so bin 0 (d = 0) holds the best items.
    ap = average_precision(-dist, targets, num_bins + 1, (-4.0, 0.0), exclude_diagonal=exclude,
                           open_ends=False)
    return _mean_loss(ap)


def topk_similarity(queries: Tensor, database: Tensor, k: int,
                    largest: bool = True) -> tuple[Tensor, Tensor]:
    """Dense oracle of :func:`fastap.topk_similarity`: the whole (B, N) score matrix, sorted.

    Scores queries @ database.T in float32 (float64 if an input is float64), then a *stable*
    sort, so equal scores keep the lower database index first (torch.topk does not promise
    that); NaN ranks above every number, as in torch.sort.
    """
    double = torch.float64 in (queries.dtype, database.dtype)
    acc = torch.float64 if double else torch.float32
    scores = queries.to(acc) @ database.to(acc).T
    values, indices = torch.sort(scores, dim=1, descending=largest, stable=True)
    return values[:, :k], indices[:, :k]
