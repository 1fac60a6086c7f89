"""Instance discrimination: projection head, InfoNCE (MoCo v2) and NT-Xent (SimCLR).

MoCo v2 (He et al. 2020; Chen et al. 2020): a query encoder f_q (trunk → pool → MLP head → L2N)
trained by backpropagation, a key encoder f_k updated as θ_k ← m θ_k + (1 − m) θ_q, and a queue of
the last K keys as negatives. For queries q_i, keys k_i (another view of image i) and queue
{n_j}:

    L_InfoNCE = −(1/B) Σ_i log [ exp(q_i·k_i/τ) / (exp(q_i·k_i/τ) + Σ_j exp(q_i·n_j/τ)) ]

SimCLR (Chen et al. 2020): the 2N projections z of two views of N images; for each row a its
positive p(a) is the other view, every other row is a negative:

    L_NT-Xent = −(1/2N) Σ_a log [ exp(z_a·z_p(a)/τ) / Σ_{b≠a} exp(z_a·z_b/τ) ]

The query side is a :class:`QueryModel`: the retrieval net and, when a contrastive term is
used, a projection head on the pooled (un-normalised) trunk features, as MoCo attaches its head
after the average pool. It is the module that DDP wraps and multi-stage backpropagation
re-forwards.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import IMAGENET_MEAN, IMAGENET_STD, RetrievalNet
from . import distributed as D
from .in_memory import unit_float

__all__ = [
    "MoCo",
    "ProjectionHead",
    "QueryModel",
    "export_trunk",
    "global_nt_xent",
    "info_nce",
    "nt_xent",
]


class ProjectionHead(nn.Sequential):
    """MLP head: Linear(in, hidden) → [BatchNorm1d] → ReLU → Linear(hidden, out).

    Without BN its layers are ``0``/``2``, the names of MoCo v2's ``encoder_q.fc`` head, so an
    export in the MoCo layout carries it.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128,
                 batchnorm: bool = False):
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        super().__init__(*layers)


class QueryModel(nn.Module):
    """Images → embeddings, the trainable part of every stage.

    ``forward(images)``: (B, 3, H, W) uint8 in [0, 255] or float in [0, 1] (normalised here with
    ``net.meta``'s mean/std) → per ``output``:

    - ``"desc"``: (B, out_dim) global descriptors ``net(x)``;
    - ``"proj"``: (B, dim) L2-normalised projections ``L2N(head(pool(trunk(x))))``;
    - ``"both"``: (B, out_dim + dim), descriptor and projection side by side (the fine-tuning
      stage with L = L_AP + λ·L_InfoNCE; one tensor so multi-stage backprop treats it whole).
    """

    def __init__(self, net: RetrievalNet, head: Optional[ProjectionHead] = None,
                 output: str = "desc"):
        super().__init__()
        if output not in ("desc", "proj", "both"):
            raise ValueError(f"output must be 'desc', 'proj' or 'both', got {output!r}")
        if output != "desc" and head is None:
            raise ValueError(f"output={output!r} needs a projection head")
        self.net, self.head, self.output = net, head, output

    @property
    def desc_dim(self) -> int:
        return self.net.out_dim

    def forward(self, images: Tensor) -> Tensor:
        x = self.net.preprocess(unit_float(images))
        fmap = self.net.features(x)
        if self.output == "desc":
            return self.net.head(fmap)
        with torch.autocast(fmap.device.type, enabled=False):
            pooled = self.net.pool(fmap.float())
        proj = F.normalize(self.head(pooled).float(), dim=1)
        if self.output == "proj":
            return proj
        return torch.cat([self.net.head(fmap), proj], dim=1)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: q, k (B, D) and queue (K, D), all L2-normalised → scalar (mean over B).

    Logits [q·k, q·queueᵀ]/τ, cross-entropy with the positive at index 0. ``k`` and ``queue``
    are treated as constants (no gradient), as in MoCo.
    """
    k, queue = k.detach().to(q.dtype), queue.detach().to(q.dtype)
    positive = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, q @ queue.T], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


def _nt_xent_rows(queries: Tensor, database: Tensor, self_index: Tensor, pos_index: Tensor,
                  temperature: float) -> Tensor:
    """Per-row −log softmax of the positive, each row's own entry left out. (R,)"""
    logits = queries @ database.T / temperature
    rows = torch.arange(queries.shape[0], device=queries.device)
    own = torch.zeros_like(logits, dtype=torch.bool)
    own[rows, self_index] = True
    logits = logits.masked_fill(own, float("-inf"))
    return torch.logsumexp(logits, dim=1) - logits[rows, pos_index]


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent for two views z1, z2 (N, D), L2-normalised → scalar (mean over 2N)."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    idx = torch.arange(2 * n, device=z.device)
    return _nt_xent_rows(z, z, idx, (idx + n) % (2 * n), temperature).mean()


def global_nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """NT-Xent of this rank's views against the views of all ranks (global negatives).

    Returns ``(to_backward, value)`` like :func:`fastap.training.distributed.global_ranking_loss`:
    ``value`` equals ``nt_xent`` of the concatenated batch, and the DDP-averaged gradient of
    ``to_backward`` (= W × this rank's share of the sum) equals its single-process gradient.
    """
    size = D.world_size()
    if size == 1:
        loss = nt_xent(z1, z2, temperature)
        return loss, loss.detach()
    me, n = D.rank(), z1.shape[0]
    all1, all2 = D.gather_with_grad(z1), D.gather_with_grad(z2)
    database = torch.cat([all1, all2])
    total = size * n
    local = torch.arange(me * n, (me + 1) * n, device=z1.device)
    self_index = torch.cat([local, local + total])
    pos_index = torch.cat([local + total, local])
    rows = _nt_xent_rows(torch.cat([z1, z2]), database, self_index, pos_index, temperature)
    share = rows.sum() / (2 * total)
    value = share.detach().clone()
    torch.distributed.all_reduce(value)
    return share * size, value


# ----------------------------------------------------------------------------------------------
# MoCo
# ----------------------------------------------------------------------------------------------


class MoCo(nn.Module):
    """MoCo's key side: momentum encoder and queue, around a :class:`QueryModel`.

    ``key_model`` is a copy of the query model with ``output="proj"`` and no gradients; the
    ``queue`` (K, dim) starts as random unit vectors from ``seed`` (the same on every rank).
    Per step: :meth:`momentum_update` (θ_k ← m θ_k + (1 − m) θ_q, parameters only, as in MoCo),
    :meth:`keys` of the second view, :meth:`loss` = InfoNCE against the queue, then
    :meth:`enqueue` of the keys of all ranks.
    """

    def __init__(self, query_model: QueryModel, queue_size: int = 65536, momentum: float = 0.999,
                 temperature: float = 0.2, seed: int = 0):
        super().__init__()
        if query_model.head is None:
            raise ValueError("MoCo needs a query model with a projection head")
        key = copy.deepcopy(query_model)
        key.output = "proj"
        for prm in key.parameters():
            prm.requires_grad_(False)
        self.key_model = key
        self.momentum, self.temperature = float(momentum), float(temperature)
        dim = query_model.head[-1].out_features
        gen = torch.Generator().manual_seed(int(seed))
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim, generator=gen),
                                                  dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self, query_model: nn.Module) -> None:
        q_params = dict(query_model.named_parameters())
        for name, pk in self.key_model.named_parameters():
            pk.mul_(self.momentum).add_(q_params[name].detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def keys(self, images: Tensor, *, chunk_size: Optional[int] = None,
             prepare: Callable[[Tensor], Tensor] = lambda x: x,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             shuffle: Optional[torch.Generator] = None) -> Tensor:
        """Keys (B_r, dim) of this rank's second views (B_r, 3, H, W), float32.

        ``shuffle`` (a generator seeded identically on every rank) enables MoCo's shuffling BN:
        the global batch of key images is permuted before being cut into BN groups (ranks, and
        chunks of ``chunk_size`` within a rank), then the keys are put back in order, so a key's
        BN statistics come from other samples than its query's.
        """
        size, me, rows = D.world_size(), D.rank(), images.shape[0]
        perm = None
        if shuffle is not None:
            # (On the device first: NCCL gathers only device tensors.)
            images = D.all_gather_nograd(prepare(images)) if size > 1 else images
            perm = torch.randperm(images.shape[0], generator=shuffle).to(images.device)
            images = images[perm][me * rows:(me + 1) * rows]
        step = chunk_size or rows
        outs = []
        for lo in range(0, rows, step):
            with autocast():
                outs.append(self.key_model(prepare(images[lo:lo + step])).float())
        k = torch.cat(outs)
        if perm is not None:
            k_all = D.all_gather_nograd(k)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=perm.device)
            k = k_all[inverse.to(k_all.device)][me * rows:(me + 1) * rows]
        return k

    def loss(self, q: Tensor, k: Tensor) -> Tensor:
        """InfoNCE of queries (B, dim) with keys (B, dim) against the current queue."""
        return info_nce(q, k, self.queue.clone(), self.temperature)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write the keys of all ranks over the oldest queue entries (a ring buffer)."""
        keys = D.all_gather_nograd(keys)
        size = self.queue.shape[0]
        keys = keys[-size:]
        slots = (int(self.queue_ptr) + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[slots.to(self.queue.device)] = keys.to(self.queue)
        self.queue_ptr.fill_((int(self.queue_ptr) + keys.shape[0]) % size)


def export_trunk(query_model: QueryModel, moco: Optional[MoCo] = None) -> dict:
    """The trained encoder in a layout that :func:`fastap.models.from_pretrained` (and other
    tools) read with any pooling.

    ImageNet-normalised nets: the MoCo v1/v2 layout ``{'state_dict': {'module.encoder_q.<trunk>',
    'module.encoder_q.fc.*' (the head), 'module.encoder_k.*', 'module.queue',
    'module.queue_ptr'}}``. Nets trained on raw [0, 1] input: the SimCLR layout
    ``{'state_dict': <torchvision names>}``, which implies no mean/std normalisation.
    """
    net = query_model.net
    trunk = {k: v.detach().cpu() for k, v in net.backbone.state_dict().items()}
    norm = net.meta.get("mean"), net.meta.get("std")
    if norm == (None, None):
        return {"state_dict": trunk, "arch": net.meta["arch"]}
    if [round(v, 3) for v in norm[0]] != [round(v, 3) for v in IMAGENET_MEAN] or \
            [round(v, 3) for v in norm[1]] != [round(v, 3) for v in IMAGENET_STD]:
        raise ValueError("export_trunk: the MoCo layout implies ImageNet mean/std; this net "
                         f"uses mean={norm[0]}, std={norm[1]}")
    sd = {f"module.encoder_q.{k}": v for k, v in trunk.items()}
    if query_model.head is not None:
        sd.update({f"module.encoder_q.fc.{k}": v.detach().cpu()
                   for k, v in query_model.head.state_dict().items()})
    if moco is not None:
        key = moco.key_model
        sd.update({f"module.encoder_k.{k}": v.detach().cpu()
                   for k, v in key.net.backbone.state_dict().items()})
        if key.head is not None:
            sd.update({f"module.encoder_k.fc.{k}": v.detach().cpu()
                       for k, v in key.head.state_dict().items()})
        sd["module.queue"] = moco.queue.detach().cpu().T.contiguous()  # MoCo stores (dim, K)
        sd["module.queue_ptr"] = moco.queue_ptr.detach().cpu().view(1)
    return {"state_dict": sd, "arch": net.meta["arch"]}
