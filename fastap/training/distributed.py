"""torch.distributed helpers: process-group setup (``torchrun``), gathering with gradients, and
the listwise losses ranked against the *global* batch.

Why the loss needs care. With W processes each holding B_r samples, the single-process loss on
the concatenated batch is, for the AP losses (mean over the Q valid queries of all ranks),

    L = (1/Q) Σ_{all valid queries i} ℓ_i(f_i; F_global).

Each rank computes the part of that sum over its own queries, ranked against the gathered
global batch F_global: L_r = (1/Q) Σ_{i on r} ℓ_i, so that Σ_r L_r = L. The gather's backward
sums the gradient that every rank's L_r sends to each shard (:class:`GatherWithGrad`), so the
local embeddings receive ∂L/∂f_local in full, including the terms from other ranks' queries that
rank them. Parameter gradients on rank r are then ∂L/∂f_r · ∂f_r/∂θ, and their *sum* over
ranks is ∂L/∂θ. DistributedDataParallel *averages* over ranks, so the loss each rank
backpropagates is W·L_r (:func:`global_ranking_loss` returns it that way) and the averaged
gradient equals the single-process gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

# The process-group helpers live in fastap.distributed (extraction and evaluation use them too);
# they are re-exported here, where training code has always found them.
from ..distributed import (DistributedContext, MainRankError, PeerFailure, barrier,
                           broadcast_object, gather_objects, is_distributed, on_main,
                           propagate_failures, raise_if_peer_failed, rank, world_size)
from ..distributed import init_distributed as _init_distributed
from .._device import resolve_device
from .config import ConfigError

__all__ = [
    "DistributedContext",
    "GatherWithGrad",
    "MainRankError",
    "PeerFailure",
    "all_gather_nograd",
    "gather_with_grad",
    "global_ranking_loss",
    "init_distributed",
    "on_main",
    "propagate_failures",
    "raise_if_peer_failed",
    "is_distributed",
    "world_size",
    "rank",
]


def init_distributed(device: str = "auto", backend: str = "auto",
                     timeout_s: float = 1800.0) -> DistributedContext:
    """:func:`fastap.distributed.init_distributed` for ``train.device``: a device that does not
    exist here is a :class:`~fastap.training.config.ConfigError` naming that key."""
    try:
        resolve_device(device, "train.device")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return _init_distributed(device, backend, timeout_s)


class GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this rank's slice of the gradient *summed
    over all ranks* (each rank's loss sends gradient to every shard)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rank, ctx.size, ctx.rows = rank(), world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """(B_r, …) per rank → (W·B_r, …) in rank order, differentiable (see
    :class:`GatherWithGrad`). The identity in a single process. Every rank must pass the same
    shape (the class-balanced sampler gives equal shards)."""
    if not is_distributed() or world_size() == 1:
        return x
    return GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_nograd(x: Tensor) -> Tensor:
    """(B_r, …) per rank → (W·B_r, …) in rank order, no gradient (MoCo's ``concat_all_gather``)."""
    if not is_distributed() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _valid_queries(labels: Tensor, database_labels: Tensor) -> Tensor:
    """(B,) bool: query i has another item of its label in the database (itself included once)."""
    return (labels.view(-1, 1) == database_labels.view(1, -1)).sum(dim=1) >= 2


def global_ranking_loss(loss_fn: Callable[..., Tensor], embeddings: Tensor, labels: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """A batch-ranking loss (``fastap.APLoss`` / ``FastAPLoss`` convention: mean over queries
    with a positive) with each rank's queries ranked against the global batch.

    Args:
        loss_fn: called as ``loss_fn(queries, labels, ref_emb=database, ref_labels=...,
            exclude_self=True)`` where the database's first B_r rows are the queries.
        embeddings: (B_r, D) this rank's embeddings; labels: (B_r,).

    Returns:
        ``(to_backward, value)``: ``to_backward`` = W·L_r, whose DDP-averaged gradient equals
        the single-process gradient on the concatenated batch; ``value`` = L, the detached global
        loss (identical on all ranks, one scalar all-reduce). In a single process both are the
        ordinary ``loss_fn(embeddings, labels)``.
    """
    size = world_size()
    if size == 1:
        loss = loss_fn(embeddings, labels)
        return loss, loss.detach()
    me, rows = rank(), embeddings.shape[0]
    all_emb = gather_with_grad(embeddings)
    all_labels = all_gather_nograd(labels)
    # Queries first: exclude_self=True leaves database row i out of query i's ranking. The
    # order of the database does not change the AP.
    others = torch.cat([torch.arange(0, me * rows), torch.arange((me + 1) * rows, size * rows)]
                       ).to(all_labels.device)
    database = torch.cat([all_emb[me * rows:(me + 1) * rows], all_emb.index_select(0, others)])
    db_labels = torch.cat([labels, all_labels.index_select(0, others)])
    local_mean = loss_fn(embeddings, labels, ref_emb=database, ref_labels=db_labels,
                         exclude_self=True)
    n_local = _valid_queries(labels, all_labels).sum()
    n_global = _valid_queries(all_labels, all_labels).sum()
    # mean over local valid queries → this rank's share of the global mean.
    share = local_mean * (n_local.to(local_mean.dtype) / n_global.clamp_min(1).to(local_mean.dtype))
    value = share.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return share * size, value
