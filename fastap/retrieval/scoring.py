"""Scores of the evaluation: post-processing of the descriptors (whitening, DBA, αQE) and the
cosine similarities of queries and database."""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..whitening import (Whitening, alpha_query_expansion, apply_whitening,
                         database_augmentation, pca_whitening)

# Database rows moved to the device at a time by compute_scores.
_BLOCK = 65536


def compute_scores(queries: Union[torch.Tensor, np.ndarray],
                   database: Union[torch.Tensor, np.ndarray], *,
                   device: Union[str, torch.device, None] = None,
                   block_size: int = _BLOCK) -> torch.Tensor:
    """Cosine similarities ``L2N(q) @ L2N(x)ᵀ``: (Q, D) × (N, D) → (Q, N) float32 on the CPU.

    Database rows are moved to ``device`` ``block_size`` at a time (a memmap works), so only
    one block and the (Q, N) result need to be in memory at once.
    """
    q = torch.as_tensor(np.asarray(queries) if isinstance(queries, np.ndarray) else queries)
    device = torch.device(device) if device is not None else q.device
    q = F.normalize(q.to(device, torch.float32), dim=-1)
    n = database.shape[0]
    if database.shape[1] != q.shape[1]:
        raise ValueError(f"queries are {q.shape[1]}-d but the database is {database.shape[1]}-d")
    out = torch.empty(q.shape[0], n, dtype=torch.float32)
    for start in range(0, n, block_size):
        block = database[start:start + block_size]
        if isinstance(block, np.ndarray):
            block = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
        block = F.normalize(block.to(device, torch.float32), dim=-1)
        out[:, start:start + block.shape[0]] = (q @ block.T).cpu()
    return out


def postprocess(q: torch.Tensor, x: torch.Tensor, n_db: int, *, whiten, whiten_dim, qe,
                 qe_alpha, dba, dba_alpha, device, log) -> tuple[torch.Tensor, torch.Tensor,
                                                                  dict]:
    """Whitening → DBA → αQE. Returns the new (q, x) and what was actually applied."""
    applied: dict[str, Any] = {}
    q = F.normalize(q.to(device, torch.float32), dim=-1)
    x = F.normalize(x.to(device, torch.float32), dim=-1)
    if whiten is not None:
        if isinstance(whiten, Whitening):
            w, kind = whiten, "learned"
        else:
            # PCA-whitening learned on the benchmark's own database (distractors excluded):
            # the common "PCAw on the database" variant.
            w, kind = pca_whitening(x[:n_db]), "pca"
        d_in = w.mean.shape[0]
        if d_in != q.shape[1]:
            raise ValueError(f"the whitening expects {d_in}-d descriptors, the model gives "
                             f"{q.shape[1]}-d")
        dim = whiten_dim
        max_dim = w.projection.shape[0]
        if kind == "pca" and dim is None and n_db - 1 < max_dim:
            # Directions beyond the database's rank have no variance to learn from; keeping
            # them would blow up noise by 1/sqrt(eps).
            dim = max(1, n_db - 1)
            log(f"pca whitening: {n_db} database images span at most {dim} dimensions; "
                f"keeping {dim}")
        if dim is not None and not 1 <= dim <= max_dim:
            raise ValueError(f"whiten_dim must be in [1, {max_dim}], got {dim}")
        w = w.to(device)
        q, x = apply_whitening(q, w, dim), apply_whitening(x, w, dim)
        applied["whiten"] = {"kind": kind, "dim": int(q.shape[1])}
    if dba:
        if dba > x.shape[0]:
            raise ValueError(f"dba={dba} exceeds the database size {x.shape[0]}")
        x = database_augmentation(x, n=dba, alpha=dba_alpha)
        applied["dba"] = {"n": dba, "alpha": dba_alpha}
    if qe:
        if qe > x.shape[0]:
            raise ValueError(f"qe={qe} exceeds the database size {x.shape[0]}")
        q = alpha_query_expansion(q, x, n=qe, alpha=qe_alpha)
        applied["qe"] = {"n": qe, "alpha": qe_alpha}
    return q, x, applied
