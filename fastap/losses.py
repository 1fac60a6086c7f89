"""``nn.Module`` losses with the metric-learning call convention ``loss(embeddings, labels)``."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import functional
from ._checks import as_int, as_labels, as_range, check_flag, check_tensor, fastap_num_bins

__all__ = ["APLoss", "FastAPLoss", "CrossBatchMemory"]


def _no_indices_tuple(indices_tuple) -> None:
    # pytorch-metric-learning's losses take (embeddings, labels, indices_tuple, ref_emb, ...);
    # its loops pass indices_tuple=None when no miner is used.
    if indices_tuple is not None:
        raise TypeError(f"indices_tuple must be None, got {type(indices_tuple).__name__}: "
                        f"{functional.NO_MINER}")


class APLoss(nn.Module):
    """Quantized-AP loss (Revaud et al., ICCV 2019) over cosine similarities.

    ``loss(embeddings (B, D), labels (B,), ref_emb=None (N, D), ref_labels=None (N,))`` ranks every
    query against ``ref_emb`` (or against the rest of the batch) and returns 1 - mAP over queries
    with at least one positive (equal label). Bins: ``num_bins`` triangles on ``score_range``.
    ``fused=None`` switches to the kernel that never stores the (B, N) similarities when they
    would be large (see :func:`fastap.functional.embedding_ap_loss`); True/False force it.
    ``include_batch=True`` ranks against the rest of the batch followed by ``ref_emb`` (a memory
    bank, as :class:`CrossBatchMemory` does), differentiating only what needs a gradient.

    Embeddings are float16, bfloat16, float32 or float64; each row is L2-normalised (without
    overflow: rows scaled by 1e20, or float16 rows whose norm passes 65,504, give the loss of
    their directions). The loss is float64 for float64 embeddings and float32 otherwise: the
    kernels accumulate half and bfloat16 in float32, and the loss keeps that precision (where
    pytorch-metric-learning returns the input dtype; cast it if that is wanted). A miner's
    ``indices_tuple`` is refused: every pair is ranked.
    """

    def __init__(self, num_bins: int = 25, score_range: Sequence[float] = (0.0, 1.0),
                 fused: Optional[bool] = None):
        super().__init__()
        self.num_bins = as_int(num_bins, "num_bins", low=2)
        self.score_range = as_range(score_range, "score_range")
        self.fused = check_flag(fused, "fused", optional=True)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, *, exclude_self: Optional[bool] = None,
                include_batch: bool = False, indices_tuple: None = None) -> Tensor:
        _no_indices_tuple(indices_tuple)
        return functional.embedding_ap_loss(embeddings, labels, ref_emb, ref_labels,
                                            self.num_bins, self.score_range,
                                            exclude_self=exclude_self,
                                            include_batch=include_batch, fused=self.fused)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, score_range={self.score_range}"


class FastAPLoss(nn.Module):
    """FastAP loss with pytorch-metric-learning's ``FastAPLoss(num_bins)`` semantics.

    Same call convention, dtypes and normalisation as :class:`APLoss` (a float32 loss for
    float16/bfloat16 embeddings); unlike the peer it also accepts ``ref_emb`` / ``ref_labels``.
    """

    def __init__(self, num_bins: int = 10, fused: Optional[bool] = None):
        super().__init__()
        self.num_bins = fastap_num_bins(num_bins)
        self.fused = check_flag(fused, "fused", optional=True)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, *, exclude_self: Optional[bool] = None,
                include_batch: bool = False, indices_tuple: None = None) -> Tensor:
        _no_indices_tuple(indices_tuple)
        return functional.fastap_loss(embeddings, labels, ref_emb, ref_labels, self.num_bins,
                                      exclude_self=exclude_self, include_batch=include_batch,
                                      fused=self.fused)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}"


class CrossBatchMemory(nn.Module):
    """Ranks each batch against itself plus a memory of past embeddings (Wang et al., XBM 2020).

    ``memory(embeddings (B, D), labels (B,))`` returns ``loss(embeddings, labels, ref_emb=memory,
    ..., include_batch=True)``, each query ranked against the rest of the batch and the memory,
    then stores the batch (detached) in a ring buffer of ``memory_size`` entries. The memory gets
    no gradient and costs none (no (memory_size, D) gradient). With the AP losses the fused
    kernel keeps this cheap in memory: the (B, B + memory_size) similarities are never stored
    when they would be large.
    """

    def __init__(self, loss: Union[APLoss, FastAPLoss], embedding_size: int, memory_size: int):
        super().__init__()
        embedding_size = as_int(embedding_size, "embedding_size", low=1)
        memory_size = as_int(memory_size, "memory_size", low=1)
        if not callable(loss):
            raise TypeError(f"loss must be a loss module such as fastap.APLoss(), got "
                            f"{type(loss).__name__}")
        self.loss = loss
        self.register_buffer("embedding_memory", torch.zeros(memory_size, embedding_size))
        self.register_buffer("label_memory", torch.zeros(memory_size, dtype=torch.long))
        self.register_buffer("next_slot", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_tensor(embeddings, "embeddings")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_memory.shape[1]:
            raise ValueError(f"embeddings must be (B, {self.embedding_memory.shape[1]}), "
                             f"got {tuple(embeddings.shape)}")
        labels = as_labels(labels, "labels")  # int64, as the memory stores them
        filled = int(self.filled)
        # In the wider of the two dtypes (a bfloat16 batch under autocast meets the float32
        # memory as float32): no (memory_size, D) copy of the memory in the batch's dtype.
        loss = self.loss(embeddings, labels, self.embedding_memory[:filled],
                         self.label_memory[:filled], include_batch=True)
        self.enqueue(embeddings.detach(), labels)
        return loss

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> None:
        """Writes the newest entries over the oldest (the last ``memory_size`` if more)."""
        size = self.embedding_memory.shape[0]
        embeddings, labels = embeddings[-size:], labels[-size:]
        slots = (int(self.next_slot) + torch.arange(len(labels), device=labels.device)) % size
        self.embedding_memory[slots] = embeddings.to(self.embedding_memory.dtype)
        self.label_memory[slots] = labels.to(self.label_memory)
        self.next_slot.fill_((int(self.next_slot) + len(labels)) % size)
        self.filled.fill_(min(size, int(self.filled) + len(labels)))
