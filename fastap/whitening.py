"""Post-processing of global descriptors: learned and PCA whitening, αQE and DBA.

Conventions: descriptors are rows — X is (N, D) — and every function takes and returns torch
tensors. Whitening is learned in float64 and returned as a :class:`Whitening` ``(mean, projection)``
whose rows are sorted by decreasing variance, so that ``projection[:dim]`` is the best
``dim``-dimensional reduction::

    apply_whitening(x, w, dim) = L2N( (x − m) P[:dim]ᵀ )

:meth:`fastap.models.RetrievalNet.set_whitening` loads a ``Whitening`` into the net's linear layer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from ._io import DamagedFileError, atomic_torch_save, load_torch_file

__all__ = [
    "Whitening",
    "alpha_query_expansion",
    "apply_whitening",
    "database_augmentation",
    "learn_whitening",
    "load_whitening",
    "parse_whiten",
    "pca_whitening",
    "save_whitening",
]


class Whitening(NamedTuple):
    """An affine whitening ``x ↦ P (x − m)``: ``mean`` m (D,), ``projection`` P (D, D) float64,
    rows ordered by decreasing eigenvalue."""

    mean: torch.Tensor
    projection: torch.Tensor

    def apply(self, x: torch.Tensor, dim: Optional[int] = None, normalize: bool = True
              ) -> torch.Tensor:
        """See :func:`apply_whitening`."""
        return apply_whitening(x, self, dim, normalize)

    def to(self, *args, **kwargs) -> "Whitening":
        return Whitening(self.mean.to(*args, **kwargs), self.projection.to(*args, **kwargs))


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-d (N, D) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def _cholesky_regularised(s: torch.Tensor, max_tries: int = 40) -> torch.Tensor:
    """Lower L with L Lᵀ = S + αI, the smallest α in {0, 1e-10, 1e-9, …} that makes it PD."""
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    alpha = 0.0
    for _ in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(s + alpha * eye)
        if int(info) == 0:
            return chol
        alpha = 1e-10 if alpha == 0 else alpha * 10
    raise ValueError("learn_whitening: the pair-difference covariance is not positive definite "
                     f"even after adding {alpha:g}·I")


def learn_whitening(x: torch.Tensor, query_idx: torch.Tensor, positive_idx: torch.Tensor
                    ) -> Whitening:
    """Learned (supervised) whitening of Radenović et al. from matching pairs.

    Args:
        x: (N, D) descriptors.
        query_idx, positive_idx: (K,) indices into ``x``; ``x[query_idx[k]]`` and
            ``x[positive_idx[k]]`` match.

    With q_k = x[query_idx[k]], p_k = x[positive_idx[k]] (float64):

        m  = (1/K) Σ_k q_k
        S  = (1/K) Σ_k (q_k − p_k)(q_k − p_k)ᵀ              (the "intra-class" covariance)
        P1 = L⁻¹ with L Lᵀ = S + αI (Cholesky; α grows from 0 until S + αI is PD)
        C  = Σ_n P1(x_n − m)(P1(x_n − m))ᵀ = V diag(λ) Vᵀ  (λ decreasing)
        P  = Vᵀ P1

    so that P S Pᵀ = I (matching-pair differences are whitened) and the projected data's
    covariance is diagonal with decreasing variances. Returns ``Whitening(m, P)`` in float64.
    """
    _check_matrix(x, "x")
    x = x.detach().to(torch.float64)
    qi = torch.as_tensor(query_idx, dtype=torch.long, device=x.device).reshape(-1)
    pi = torch.as_tensor(positive_idx, dtype=torch.long, device=x.device).reshape(-1)
    if qi.numel() != pi.numel() or qi.numel() == 0:
        raise ValueError(f"query_idx and positive_idx must be non-empty and of equal length, got "
                         f"{qi.numel()} and {pi.numel()}")
    q, p = x[qi], x[pi]
    m = q.mean(dim=0)
    df = q - p
    s = df.T @ df / df.shape[0]
    p1 = torch.linalg.solve_triangular(_cholesky_regularised(s),
                                       torch.eye(x.shape[1], dtype=x.dtype, device=x.device),
                                       upper=False)
    y = (x - m) @ p1.T
    evals, evecs = torch.linalg.eigh(y.T @ y)
    order = torch.argsort(evals, descending=True)
    return Whitening(m, evecs[:, order].T @ p1)


def pca_whitening(x: torch.Tensor, eps: float = 1e-12) -> Whitening:
    """PCA whitening learned on a descriptor set.

    Args:
        x: (N, D) descriptors (e.g. of an independent database).
        eps: added to the eigenvalues before the inverse square root (guards null directions).

    With m = mean of the rows, C = (1/N) Σ_n (x_n − m)(x_n − m)ᵀ = V diag(λ) Vᵀ (λ decreasing):
    ``P = diag(λ + eps)^(-1/2) Vᵀ``, so (x − m) Pᵀ has identity covariance (before any L2N).
    Returns ``Whitening(m, P)`` in float64.
    """
    _check_matrix(x, "x")
    x = x.detach().to(torch.float64)
    m = x.mean(dim=0)
    xc = x - m
    cov = xc.T @ xc / x.shape[0]
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp(min=0), evecs[:, order]
    return Whitening(m, (evals + eps).rsqrt().unsqueeze(1) * evecs.T)


def apply_whitening(x: torch.Tensor, whitening: Whitening, dim: Optional[int] = None,
                    normalize: bool = True) -> torch.Tensor:
    """(N, D) → (N, dim): ``L2N((x − m) P[:dim]ᵀ)`` (no L2N with ``normalize=False``).

    Computed in ``x``'s floating dtype (float32 for integer input); ``dim=None`` keeps all D.
    """
    _check_matrix(x, "x")
    m, proj = whitening
    if dim is not None:
        if not 0 < dim <= proj.shape[0]:
            raise ValueError(f"dim must be in [1, {proj.shape[0]}], got {dim}")
        proj = proj[:dim]
    dtype = x.dtype if x.is_floating_point() else torch.float32
    y = (x.to(dtype) - m.to(x.device, dtype)) @ proj.to(x.device, dtype).T
    return F.normalize(y, dim=-1) if normalize else y


def _weighted_neighbours(q: torch.Tensor, x: torch.Tensor, n: int, alpha: float,
                         block_size: int) -> torch.Tensor:
    """Σ over the top-n rows of x by similarity to each q of max(sim, 0)^α · x_i, in blocks.

    The neighbours come from the exact search (:func:`fastap.topk_similarity`: ties to the lower
    index, no block × N score matrix); where it runs a low-precision pass, x is converted once for
    all the blocks (DBA searches the database with every one of its own rows).
    """
    from .search import PreparedDatabase, search_precision, topk_similarity

    target = x
    if x.device.type == "cpu" and x.dtype == torch.float32 and q.dtype == torch.float32 and \
            search_precision("auto")[0] != "fp32":
        target = PreparedDatabase.prepare(x)
    out = torch.empty_like(q)
    for start in range(0, q.shape[0], block_size):
        top, idx = topk_similarity(q[start:start + block_size], target, n)
        w = top.to(q.dtype).clamp(min=0).pow(alpha)
        out[start:start + block_size] = (w.unsqueeze(-1) * x[idx]).sum(dim=1)
    return out


def alpha_query_expansion(queries: torch.Tensor, database: torch.Tensor, n: int = 2,
                          alpha: float = 3.0, include_query: bool = True,
                          block_size: int = 1024) -> torch.Tensor:
    """α-weighted query expansion (αQE, Radenović et al.).

    Args:
        queries: (Q, D) L2-normalised query descriptors.
        database: (N, D) L2-normalised database descriptors.
        n: neighbours used (the top n of the database by cosine similarity s_qi = q·x_i).
        alpha: weight exponent; α = 0 is average query expansion.
        include_query: add the query itself with weight 1 (= its self-similarity^α), as in the
            published method where queries are not part of the database.

    Returns (Q, D): ``q' = L2N([q] + Σ_{i ∈ top-n(q)} max(s_qi, 0)^α x_i)``.
    """
    _check_matrix(queries, "queries")
    _check_matrix(database, "database")
    if not 0 <= n <= database.shape[0]:
        raise ValueError(f"n must be in [0, {database.shape[0]}], got {n}")
    q = queries.float() if not queries.is_floating_point() else queries
    x = database.to(q.dtype)
    agg = _weighted_neighbours(q, x, n, alpha, block_size) if n > 0 else torch.zeros_like(q)
    if include_query:
        agg = agg + q
    return F.normalize(agg, dim=-1)


def database_augmentation(database: torch.Tensor, n: int = 10, alpha: float = 3.0,
                          block_size: int = 1024) -> torch.Tensor:
    """Database-side augmentation (DBA): αQE applied to every database vector.

    Args:
        database: (N, D) L2-normalised descriptors.
        n: neighbours, counted *including* the vector itself (it is its own nearest neighbour,
            similarity 1), as in the usual DBA implementations.
        alpha: weight exponent (α = 0: plain average of the n neighbours).
        block_size: database rows per similarity block, to bound memory at block_size × N.

    Returns (N, D): ``x_j' = L2N(Σ_{i ∈ top-n(x_j)} max(x_j·x_i, 0)^α x_i)``. Queries are then
    matched against the augmented database (and are usually expanded with αQE on it).
    """
    _check_matrix(database, "database")
    if not 1 <= n <= database.shape[0]:
        raise ValueError(f"n must be in [1, {database.shape[0]}], got {n}")
    x = database.float() if not database.is_floating_point() else database
    return F.normalize(_weighted_neighbours(x, x, n, alpha, block_size), dim=-1)


# ----------------------------------------------------------------------------------------------
# Whitening files and the ``--whiten`` option
# ----------------------------------------------------------------------------------------------


def save_whitening(whitening: Whitening, path: Union[str, os.PathLike], **extra: Any) -> Path:
    """Write a :class:`~fastap.whitening.Whitening` as ``{'mean', 'projection', **extra}``
    (plain tensors, readable with ``weights_only=True``) — the file ``--whiten learned:FILE``
    reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, {"mean": whitening.mean.detach().cpu(),
                             "projection": whitening.projection.detach().cpu(), **extra})
    return path


def load_whitening(path: Union[str, os.PathLike]) -> Whitening:
    """Read a learned whitening: a saved :class:`~fastap.whitening.Whitening`, a
    ``(mean, projection)`` pair or a dict with ``mean`` and ``projection`` (or ``m``/``P``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"whitening file not found: {path}")
    try:
        with torch.serialization.safe_globals([Whitening]):
            obj = load_torch_file(path, map_location="cpu", weights_only=True)
    except DamagedFileError as err:
        raise ValueError(f"{err}; restore it or write it again") from err
    except Exception as err:  # torch raises several kinds for foreign or truncated files
        raise ValueError(f"{path} is not a readable whitening file: {type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                         ) from err
    mean = proj = None
    if isinstance(obj, Mapping):
        mean = obj.get("mean", obj.get("m"))
        proj = obj.get("projection", obj.get("P"))
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        mean, proj = obj
    if not (isinstance(mean, torch.Tensor) and isinstance(proj, torch.Tensor)):
        raise ValueError(f"{path}: expected a Whitening, a (mean, projection) pair or a dict "
                         f"with 'mean' and 'projection' tensors, got {type(obj).__name__}")
    if mean.dim() != 1 or proj.dim() != 2 or proj.shape[1] != mean.shape[0]:
        raise ValueError(f"{path}: mean must be (D,) and projection (D', D), got "
                         f"{tuple(mean.shape)} and {tuple(proj.shape)}")
    return Whitening(mean.to(torch.float64), proj.to(torch.float64))


def parse_whiten(value: Union[None, str, Whitening]) -> Union[None, str, Whitening]:
    """``None``/``"none"`` → ``None``; ``"pca"``; ``"learned:<file>"`` → the loaded Whitening
    (a ``Whitening`` passes through). Raises ``ValueError`` for anything else."""
    if value is None or isinstance(value, Whitening):
        return value
    text = str(value).strip()
    if text.lower() == "none":
        return None
    if text.lower() == "pca":
        return "pca"
    kind, sep, file = text.partition(":")
    if kind.lower() == "learned" and sep and file:
        return load_whitening(file)
    raise ValueError(f"whiten must be 'none', 'pca' or 'learned:<file>', got {value!r}")
