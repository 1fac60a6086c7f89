"""Shared fixtures and oracles for the fastap core tests.

Everything here builds *inputs* or evaluates the independent dense oracle (``fastap.reference``);
nothing calls the kernels, so a test that compares a kernel result with a helper's result compares
two independent computations.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fastap.reference as R

# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(),
                           reason="needs a CUDA device (torch.cuda.is_available() is False)"),
    ]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every test that takes ``device`` runs on the CPU and, where one exists, on a CUDA GPU."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def bin_centres(num_bins: int, lo: float, hi: float) -> torch.Tensor:
    """z_k = hi - kΔ (float64); exact for dyadic grids such as num_bins = 5 on (0, 1)."""
    delta = (hi - lo) / (num_bins - 1)
    return torch.tensor([hi - k * delta for k in range(num_bins)], dtype=torch.float64)


def make_scores(batch: int, size: int, *, num_bins: int = 5, lo: float = 0.0, hi: float = 1.0,
                gen: torch.Generator | None = None, on_centres: bool = True,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(B, N) scores of ``dtype`` mixing the hard cases of the estimator.

    Uniform draws over a range 30% wider than (lo, hi) on each side (so the open end bins
    saturate and the closed ones fall off), ties (copies of other entries of the row) and, when
    ``on_centres`` (use only with dyadic grids so every dtype holds them exactly), scores exactly
    on bin centres including lo and hi themselves.
    """
    width = hi - lo
    s = lo - 0.3 * width + 1.6 * width * torch.rand(batch, size, generator=gen,
                                                    dtype=torch.float64)
    pick = torch.rand(batch, size, generator=gen)
    if on_centres:
        centres = bin_centres(num_bins, lo, hi)
        idx = torch.randint(0, num_bins, (batch, size), generator=gen)
        s = torch.where(pick < 0.25, centres[idx], s)
    if size > 1:
        src = torch.randint(0, size, (batch, size), generator=gen)
        s = torch.where(pick > 0.8, s.gather(1, src), s)  # ties
    s = s.to(dtype)
    if not on_centres:
        s = nudge_off_centres(s, num_bins, lo, hi)
    return s


def nudge_off_centres(scores: torch.Tensor, num_bins: int, lo: float, hi: float) -> torch.Tensor:
    """Move scores that lie on (or within rounding of) a bin centre by Δ/4, ties kept.

    On a non-dyadic grid (e.g. 25 bins on (0, 1), Δ = 1/24) some centres are still representable
    (0.625 = 1 - 9Δ) and rounding to float16 lands on them often. The kernel then sees the exact
    centre (t = (hi - s)/Δ = 9 exactly, derivative 0 by convention), while the reference builds
    its centres as hi - kΔ with Δ rounded, misses the centre by an ulp and takes a one-sided
    derivative ±1/Δ. Neither is wrong for that score; tests on such grids avoid the centres.
    """
    s = scores.double()
    delta = (hi - lo) / (num_bins - 1)
    t = (hi - s) / delta
    near = (t - t.round()).abs() < 1e-3
    return torch.where(near, s - 0.25 * delta, s).to(scores.dtype)


def make_targets(batch: int, size: int, *, gen: torch.Generator | None = None,
                 p: float = 0.4) -> torch.Tensor:
    """(B, N) bool relevance with an all-positive row 0 and an all-negative last row (B >= 3)."""
    y = torch.rand(batch, size, generator=gen) < p
    if batch >= 3:
        y[0] = True
        y[-1] = False
    return y


def relevance_matrix(targets, batch: int, size: int) -> torch.Tensor:
    if isinstance(targets, torch.Tensor):
        return targets.bool()
    q, d = targets
    return q.view(batch, 1) == d.view(1, size)


def valid_rows(targets, batch: int, size: int, exclude_diagonal: bool = False) -> torch.Tensor:
    """Rows with at least one positive (the diagonal left out when it is excluded)."""
    y = relevance_matrix(targets, batch, size).clone()
    if exclude_diagonal:
        n = min(batch, size)
        y[torch.arange(n), torch.arange(n)] = False
    return y.any(dim=1)


def to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


# ---------------------------------------------------------------------------------------------
# Oracle evaluations (fastap.reference, float64)
# ---------------------------------------------------------------------------------------------

def reference_ap_and_grad(scores: torch.Tensor, targets, grad_ap: torch.Tensor, *,
                          num_bins: int, lo: float, hi: float, open_ends: bool = True,
                          exclude_diagonal: bool = False):
    """AP (B,) of the dense reference on ``scores`` upcast to float64, and dAP·grad_ap/ds.

    The reference's autograd gives NaN gradients in rows without positives (0/0 in the backward
    of the division by N⁺) even when their AP is masked out; such rows have no AP and the loss
    excludes them, so their gradient is defined as 0. Rows do not interact in the per-row AP, so
    the other rows' gradients are unaffected by this masking.
    """
    s = scores.detach().cpu().to(torch.float64).requires_grad_(True)
    tg = to_device(targets, "cpu")
    if isinstance(tg, torch.Tensor):
        tg = tg.to(torch.float64)
    ap = R.average_precision(s, tg, num_bins, (lo, hi), exclude_diagonal=exclude_diagonal,
                             open_ends=open_ends)
    ok = ~torch.isnan(ap)
    g = grad_ap.detach().cpu().to(torch.float64)
    (grad,) = torch.autograd.grad((torch.where(ok, ap, 0) * g).sum(), s)
    grad = torch.where(ok.unsqueeze(1), grad, 0)
    return ap.detach(), grad


def _zero_invalid_rows(sims: torch.Tensor, valid: torch.Tensor) -> None:
    # See reference_ap_and_grad: NaN backward of rows without positives is replaced by their
    # defined gradient, 0, before it reaches the shared embeddings.
    sims.register_hook(lambda g: torch.where(valid.unsqueeze(1), g, torch.zeros_like(g)))


def reference_embedding_loss(kind: str, embeddings: torch.Tensor, labels: torch.Tensor,
                             ref_emb: torch.Tensor | None = None,
                             ref_labels: torch.Tensor | None = None, *, num_bins: int,
                             score_range=(0.0, 1.0)) -> torch.Tensor:
    """fastap.reference's APLoss ("ap") / FastAPLoss ("fastap") value, with a NaN-free backward.

    Pairs are formed with plain PyTorch exactly as the reference does (cosine similarity for AP,
    squared ``cdist`` for FastAP) and the AP comes from ``reference.average_precision``.
    """
    exclude_self = ref_emb is None
    if exclude_self:
        ref_emb, ref_labels = embeddings, labels
    x = torch.nn.functional.normalize(embeddings, dim=1)
    r = torch.nn.functional.normalize(ref_emb, dim=1)
    batch, size = x.shape[0], r.shape[0]
    valid = valid_rows((labels, ref_labels), batch, size, exclude_self)
    if kind == "ap":
        scores, m, rng, open_ends = x @ r.T, num_bins, tuple(score_range), True
    else:
        scores, m, rng, open_ends = -torch.cdist(x, r) ** 2, num_bins + 1, (-4.0, 0.0), False
    if scores.requires_grad:
        _zero_invalid_rows(scores, valid)
    ap = R.average_precision(scores, (labels, ref_labels), m, rng, exclude_diagonal=exclude_self,
                             open_ends=open_ends)
    if not valid.any():
        return (scores * 0).sum()
    return 1 - ap[valid].mean()


# ---------------------------------------------------------------------------------------------
# Processes of a gloo group
# ---------------------------------------------------------------------------------------------

#: fork: the children inherit the imported torch/fastap, where a fresh interpreter spends seconds
#: importing them on a loaded machine.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int, outdir, *args) -> list:
    """Runs worker(rank, port, outdir, *args) in `world` processes and returns what each saved
    as ``outdir/rank<r>.pt``; skips without gloo."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.start_processes(worker, args=(free_port(), str(outdir), *args), nprocs=world, join=True,
                       start_method=START_METHOD)
    return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=True) for r in range(world)]
