"""The benchmarked cases: inputs and one forward + backward step per (family, implementation).

Shared by the timing benchmarks (``test_bench_ap_loss.py``) and the peak-memory probe
(``peak_memory.py``) so that both measure exactly the same call.

Families (docs/estimators.md), all with B = N:

- ``ap_loss``: ``fastap.functional.ap_loss(scores, targets)`` on a random (B, N) float32 score
  matrix in [0, 1] with about 1% positives (bool targets), 25 bins.
- ``APLoss``: ``fastap.APLoss()(emb, labels)`` on (B, 128) embeddings with about B/8 classes
  (the batch ranked against itself), 25 bins.
- ``FastAPLoss``: ``fastap.FastAPLoss(10)(emb, labels)`` on the same embeddings, 10 bins
  (11 bin centres).

Implementations:

- ``fastap``: the kernels through the public API with its defaults (below
  ``fastap.functional.FUSED_THRESHOLD_BYTES`` of scores, the embedding losses form the (B, N)
  similarities with a matmul and run the score kernel on them);
- ``fastap_fused``: the embedding losses with ``fused=True``, the kernel that never stores the
  similarities;
- ``reference``: ``fastap.reference``, the dense B×N×M pure-PyTorch formulation of the published
  code;
- ``pml`` (FastAP only): ``pytorch_metric_learning.losses.FastAPLoss``.
"""

from __future__ import annotations

from typing import Callable

import torch

FAMILIES: dict[str, tuple[str, ...]] = {
    "ap_loss": ("fastap", "reference"),
    "APLoss": ("fastap", "fastap_fused", "reference"),
    "FastAPLoss": ("fastap", "fastap_fused", "reference", "pml"),
}
DENSE_IMPLS = ("reference", "pml")
# Bin centres M per family (FastAP's num_bins = 10 means 11 centres 0, 0.4, ..., 4).
NUM_CENTRES = {"ap_loss": 25, "APLoss": 25, "FastAPLoss": 11}
EMBEDDING_DIM = 128
POSITIVE_RATE = 0.01
MiB = 2**20


def score_matrix_bytes(batch: int, size: int) -> int:
    """Bytes of the float32 (B, N) score matrix: the unit the memory targets are stated in."""
    return batch * size * 4


def dense_peak_bytes_estimate(family: str, batch: int, size: int) -> int:
    """Rough peak extra memory of a dense implementation: a handful of live (B, N, M) float32
    tensors (measured: about 4 of them for fastap.reference at B = N = 1024, 25 bins)."""
    return 5 * batch * size * NUM_CENTRES[family] * 4


def make_inputs(family: str, size: int, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of one case; the first tensor is the differentiable leaf."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if family == "ap_loss":
        scores = torch.rand(size, size, generator=gen)
        targets = torch.rand(size, size, generator=gen) < POSITIVE_RATE
        return scores.to(device).requires_grad_(), targets.to(device)
    emb = torch.randn(size, EMBEDDING_DIM, generator=gen)
    labels = torch.randint(0, max(1, size // 8), (size,), generator=gen)
    return emb.to(device).requires_grad_(), labels.to(device)


def make_loss(family: str, impl: str) -> Callable[..., torch.Tensor]:
    """The loss callable ``loss(*inputs) -> scalar`` of one (family, implementation)."""
    if impl not in FAMILIES[family]:
        raise ValueError(f"no implementation {impl!r} for {family!r}; have {FAMILIES[family]}")
    import fastap

    if family == "ap_loss":
        return fastap.functional.ap_loss if impl == "fastap" else fastap.reference.ap_loss
    if family == "APLoss":
        if impl == "reference":
            return fastap.reference.embedding_ap_loss
        return fastap.APLoss(fused=True) if impl == "fastap_fused" else fastap.APLoss()
    if impl == "fastap":
        return fastap.FastAPLoss(10)
    if impl == "fastap_fused":
        return fastap.FastAPLoss(10, fused=True)
    if impl == "reference":
        return lambda emb, labels: fastap.reference.fastap_loss(emb, labels, num_bins=10)
    from pytorch_metric_learning import losses as pml_losses

    return pml_losses.FastAPLoss(10)


def make_step(family: str, impl: str, size: int, device: str, seed: int = 0):
    """``(step, inputs)``: ``step()`` runs one forward + backward and returns the (detached) loss.

    The backward is ``torch.autograd.grad`` rather than ``.backward()`` so that repeated calls do
    not accumulate into ``.grad`` (which would add a (B, N) add per call for ``ap_loss``); the
    gradient is still computed and materialised. On CUDA the step synchronises, so a timer around
    it measures the kernels and not just their launch.
    """
    inputs = make_inputs(family, size, device, seed)
    loss_fn = make_loss(family, impl)
    leaf = inputs[0]
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def step():
        loss = loss_fn(*inputs)
        torch.autograd.grad(loss, leaf)
        sync()
        return loss.detach()

    return step, inputs
