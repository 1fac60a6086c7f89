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

import datetime
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._device import resolve_device
from .._io import error_message
from .config import ConfigError

__all__ = [
    "DistributedContext",
    "GatherWithGrad",
    "MainRankError",
    "all_gather_nograd",
    "gather_with_grad",
    "global_ranking_loss",
    "init_distributed",
    "on_main",
    "is_distributed",
    "world_size",
    "rank",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class DistributedContext:
    """What :func:`init_distributed` set up: ``rank``, ``world_size``, ``local_rank``,
    ``device`` and whether this process created the group (and should destroy it)."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device,
                 owns_group: bool):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device, self.owns_group = device, owns_group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and is_distributed():
            dist.destroy_process_group()


def init_distributed(device: str = "auto", backend: str = "auto",
                     timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT`` in the environment), or run as a single process.

    ``device``: ``auto`` (CUDA if available), ``cpu`` or ``cuda``; with CUDA each process uses
    ``cuda:LOCAL_RANK``. ``backend``: ``auto`` = NCCL for CUDA, gloo for CPU. Many machines work
    the same way: ``torchrun --nnodes N --node_rank k --rdzv_endpoint host:port ...``. An
    already initialised group is reused (and not destroyed by ``close``).
    """
    try:
        device = resolve_device(device, "train.device").type
    except ValueError as err:
        raise ConfigError(str(err)) from None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if is_distributed():
        owns, size = False, dist.get_world_size()
    else:
        size = int(os.environ.get("WORLD_SIZE", 1))
        owns = size > 1
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if owns:
        if backend == "auto":
            backend = "nccl" if device == "cuda" else "gloo"
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistributedContext(rank(), world_size(), local_rank, dev, owns)


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


class MainRankError(RuntimeError):
    """Raised on the other ranks when rank 0 fails in work that only it does (writing files)."""


def on_main(ctx: DistributedContext, work: Callable[[], object], what: str):
    """Run ``work()`` on rank 0 only, as a collective (every rank calls it): a failure there
    raises on every rank, rank 0 its own error and the others :class:`MainRankError` with its
    message (``what`` says what rank 0 was doing, e.g. "writing a checkpoint"), instead of
    leaving them waiting in their next collective until the process group's timeout (NCCL does
    not notice a peer that died). Returns ``work()``'s value on rank 0, else None."""
    result, failure = None, None
    if ctx.is_main:
        try:
            result = work()
        except Exception as err:  # shared, then re-raised below
            failure = err
    try:
        if ctx.world_size > 1:
            message = None
            if failure is not None:
                message = " ".join((error_message(failure) or repr(failure)).split())
            message = broadcast_object(message)
            if message is not None and not ctx.is_main:
                raise MainRankError(f"rank 0 failed {what}: {message}")
    finally:
        if failure is not None:
            raise failure  # also when the broadcast itself failed: the cause comes first
    return result


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Optional[DistributedContext] = None) -> None:
    if is_distributed():
        if ctx is not None and ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()
