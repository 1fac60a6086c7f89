"""Cases of the fused embedding -> AP benchmark (B queries x N database items, D dimensions).

- ``fused``: ``fastap.functional.ap_loss_from_embeddings`` (scores formed tile by tile, never
  stored), forward + gradients w.r.t. queries and database;
- ``fused_bank``: the same against an entirely detached database (a fixed gallery, a detached
  ``ref_emb``): forward + gradient w.r.t. the queries only, three of the four products;
- ``unfused``: ``fastap.functional.ap_loss(queries @ database.T, labels)``, which stores the
  (B, N) scores and their gradient;
- ``reference``: ``fastap.reference.ap_loss`` on the same scores (dense B×N×M);
- ``four_matmuls``: the floor the fused kernel is measured against: the four B×D-by-D×N products
  it cannot avoid (the forward product, its recomputation in the backward, and the two gradient
  products dL/dq = G D and dL/dd = Gᵀ Q), as plain full-size matmuls.

A memory bank (``CrossBatchMemory``: a trained batch of B ranked against itself and N stored,
detached embeddings), ``fastap.APLoss()`` with its defaults, gradient w.r.t. the batch:

- ``memory_bank``: ``loss(batch, labels, memory, memory_labels, include_batch=True)``, what
  ``CrossBatchMemory`` calls;
- ``memory_bank_concatenated``: ``loss(batch, labels, cat([batch, memory]), ...,
  exclude_self=True)``, the same loss through the concatenation (CrossBatchMemory's call before
  include_batch).

``python -m benchmarks.fused_cases IMPL B N D`` prints the peak extra memory of one step as JSON,
measured like ``benchmarks.peak_memory`` (VmHWM after minus VmRSS before, in a fresh process).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parent.parent))  # after the installed fastap
    from benchmarks.peak_memory import _reset_high_water, _status_bytes  # noqa: E402
else:
    from .peak_memory import _reset_high_water, _status_bytes

IMPLS = ("fused", "fused_bank", "unfused", "reference", "four_matmuls")
MEMORY_IMPLS = ("memory_bank", "memory_bank_concatenated")
NUM_CLASSES = 1000
MiB = 2**20


def make_inputs(batch: int, size: int, dim: int, seed: int = 0, device: str = "cpu",
                dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    database = torch.nn.functional.normalize(torch.randn(size, dim, generator=gen), dim=1)
    query_labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    database_labels = torch.randint(0, NUM_CLASSES, (size,), generator=gen)
    return (queries.to(device, dtype).requires_grad_(), database.to(device, dtype).requires_grad_(),
            query_labels.to(device), database_labels.to(device))


def make_step(impl: str, batch: int, size: int, dim: int, device: str = "cpu",
              dtype: torch.dtype = torch.float32):
    """``step()`` runs one forward + backward of ``impl`` on fixed inputs of ``dtype``
    (synchronised on CUDA)."""
    import fastap

    q, d, ql, dl = make_inputs(batch, size, dim, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if impl == "four_matmuls":
        def step():
            with torch.no_grad():
                scores = q @ d.T
                del scores
                grad_scores = q @ d.T  # stands in for dL/dscores, same shape and cost
                grads = grad_scores @ d, grad_scores.T @ q
            sync()
            return grads
        return step
    inputs = (q, d)
    if impl in ("fused", "fused_bank"):
        if impl == "fused_bank":
            d, inputs = d.detach(), (q,)

        def loss():
            return fastap.functional.ap_loss_from_embeddings(q, d, ql, dl)
    elif impl in MEMORY_IMPLS:
        memory, inputs = d.detach(), (q,)
        criterion = fastap.APLoss()
        if impl == "memory_bank":
            def loss():
                return criterion(q, ql, memory, dl, include_batch=True)
        else:
            def loss():
                return criterion(q, ql, torch.cat([q, memory]), torch.cat([ql, dl]),
                                 exclude_self=True)
    elif impl == "unfused":
        def loss():
            return fastap.functional.ap_loss(q @ d.T, (ql, dl))
    elif impl == "reference":
        def loss():
            return fastap.reference.ap_loss(q @ d.T, (ql, dl))
    else:
        raise ValueError(f"unknown implementation {impl!r}; have {IMPLS + MEMORY_IMPLS}")

    def step():
        grads = torch.autograd.grad(loss(), inputs)
        sync()
        return grads
    return step


def probe_cuda(impl: str, batch: int, size: int, dim: int, device: str,
               dtype: torch.dtype = torch.float32) -> dict:
    """Tensor memory of one step from the caching allocator's counters (in-process)."""
    make_step(impl, 64, 256, dim, device, dtype)()
    step = make_step(impl, batch, size, dim, device, dtype)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    return {"impl": impl, "B": batch, "N": size, "D": dim,
            "peak_extra_MB": (torch.cuda.max_memory_allocated(device) - before) / MiB,
            "score_matrix_MB": batch * size * dtype.itemsize / MiB,
            "method": "cuda max_memory_allocated - memory_allocated before"}


def probe(impl: str, batch: int, size: int, dim: int) -> dict:
    make_step(impl, 64, 256, dim)()  # load kernels, thread pools, autograd engine
    step = make_step(impl, batch, size, dim)
    gc.collect()
    reset = _reset_high_water()
    before = _status_bytes("VmRSS")
    step()
    peak = _status_bytes("VmHWM")
    return {"impl": impl, "B": batch, "N": size, "D": dim,
            "peak_extra_MB": (peak - before) / MiB,
            "score_matrix_MB": batch * size * 4 / MiB,
            "method": "VmHWM - VmRSS before, fresh process"
                      + ("" if reset else " (high-water mark not reset: upper bound)")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("impl", choices=IMPLS + MEMORY_IMPLS)
    parser.add_argument("batch", type=int)
    parser.add_argument("size", type=int)
    parser.add_argument("dim", type=int)
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.impl, args.batch, args.size, args.dim)))


if __name__ == "__main__":
    main()
