"""``nn.Module`` losses with the metric-learning call convention ``loss(embeddings, labels)``."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from . import functional

__all__ = ["APLoss", "FastAPLoss"]


class APLoss(nn.Module):
    """Quantized-AP loss (Revaud et al., ICCV 2019) over cosine similarities.

    ``loss(embeddings (B, D), labels (B,), ref_emb=None (N, D), ref_labels=None (N,))`` ranks every
    query against ``ref_emb`` (or against the rest of the batch) and returns 1 - mAP over queries
    with at least one positive (equal label). Bins: ``num_bins`` triangles on ``score_range``.
    """

    def __init__(self, num_bins: int = 25, score_range: Sequence[float] = (0.0, 1.0)):
        super().__init__()
        self.num_bins = int(num_bins)
        self.score_range = tuple(float(v) for v in score_range)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None) -> Tensor:
        return functional.embedding_ap_loss(embeddings, labels, ref_emb, ref_labels,
                                            self.num_bins, self.score_range)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, score_range={self.score_range}"


class FastAPLoss(nn.Module):
    """FastAP loss with pytorch-metric-learning's ``FastAPLoss(num_bins)`` semantics.

    Same call convention as :class:`APLoss`; unlike the peer it also accepts ``ref_emb`` /
    ``ref_labels``.
    """

    def __init__(self, num_bins: int = 10):
        super().__init__()
        self.num_bins = int(num_bins)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None) -> Tensor:
        return functional.fastap_loss(embeddings, labels, ref_emb, ref_labels, self.num_bins)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}"
