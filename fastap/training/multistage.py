"""Multi-stage backpropagation: exact gradients of a batch-level (listwise) loss for batches
that do not fit in memory (Revaud et al., ICCV 2019, §4: 4096 images of 800 px on one GPU).

A listwise loss L(f_1, …, f_B) couples every embedding of the batch, so it cannot be split into
per-chunk losses. But the chain rule splits at the embeddings:

    ∂L/∂θ = Σ_i (∂L/∂f_i) · (∂f_i/∂θ)

1. **Embed** the whole batch chunk by chunk without an autograd graph: F = [f(x_1); …; f(x_B)].
2. **Loss**: evaluate L on a leaf copy of F and backpropagate to it: G = ∂L/∂F (B × D numbers,
   the fastap kernels keep this O(B·N) time and O(B·M) memory).
3. **Re-forward** each chunk with a graph and call ``backward(f_chunk, G_chunk)``; parameter
   gradients accumulate to exactly Σ_i G_i · ∂f_i/∂θ.

Peak activation memory is one chunk's; the price is one extra forward pass.

Exactness conditions (what the equality test checks):

- The network must compute the same f_i in steps 1 and 3 and must not couple samples.
  **BatchNorm in train mode couples the samples of a chunk** (it normalises by the chunk's
  statistics), so with train-mode BN the result is the gradient of a network whose BN uses
  per-chunk statistics — not plain whole-batch backpropagation. Retrieval fine-tuning keeps BN
  frozen in eval mode (``model.freeze_bn``), where the two agree. In train mode this module at
  least keeps the running statistics right: they are restored after step 1 so that each chunk
  updates them once, as in ordinary training on chunk-sized batches.
- Stochastic layers (dropout) must draw the same masks: the RNG state before each chunk of step
  1 is saved and restored for the same chunk in step 3 (as activation checkpointing does).
- Autocast must be the same in both passes (the ``autocast`` argument is entered for both).

With DistributedDataParallel, step 1 runs the wrapped module directly (no collectives) and step 3
synchronises gradients only on the last chunk (``no_sync`` for the others).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["MultistageResult", "bn_train_mode_present", "multistage_backward"]

Inputs = Union[Tensor, Sequence[Tensor]]


class MultistageResult:
    """``loss`` (detached scalar), ``outputs`` (detached (B, D) embeddings of step 1),
    ``extras`` (whatever else ``loss_fn`` returned, e.g. a dict of loss terms)."""

    __slots__ = ("loss", "outputs", "extras")

    def __init__(self, loss: Tensor, outputs: Tensor, extras: Any):
        self.loss, self.outputs, self.extras = loss, outputs, extras


def bn_train_mode_present(module: nn.Module) -> bool:
    """True when some BatchNorm of ``module`` is in train mode (chunking then changes results)."""
    return any(isinstance(m, _BatchNorm) and m.training for m in module.modules())


def _slice(inputs: Inputs, lo: int, hi: int) -> Inputs:
    if isinstance(inputs, Tensor):
        return inputs[lo:hi]
    return type(inputs)(x[lo:hi] for x in inputs)


def _size(inputs: Inputs) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    sizes = {x.shape[0] for x in inputs}
    if len(sizes) != 1:
        raise ValueError(f"all inputs must have the same batch size, got {sorted(sizes)}")
    return sizes.pop()


def _call(module: Callable, chunk: Inputs) -> Tensor:
    return module(chunk) if isinstance(chunk, Tensor) else module(*chunk)


def _bn_buffers(module: nn.Module) -> list[tuple[Tensor, Tensor]]:
    out = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(m, name)
                if buf is not None:
                    out.append((buf, buf.detach().clone()))
    return out


def _devices_of(chunk: Inputs) -> list[int]:
    xs = [chunk] if isinstance(chunk, Tensor) else list(chunk)
    return sorted({x.device.index or 0 for x in xs if x.is_cuda})


def _rng_state(devices: list[int]) -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def multistage_backward(model: nn.Module, inputs: Inputs, loss_fn: Callable[[Tensor], Any],
                        chunk_size: Optional[int] = None, *,
                        prepare: Optional[Callable[[Inputs], Inputs]] = None,
                        backward: Optional[Callable[[Tensor], None]] = None,
                        autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                        ) -> MultistageResult:
    """Backpropagate ``loss_fn(model(inputs))`` into ``model``'s parameters, ``chunk_size``
    samples per forward pass.

    Args:
        model: maps a chunk (B_c, …) to embeddings (B_c, D); may be wrapped in
            ``DistributedDataParallel``. ``inputs`` may be a tensor or a tuple of tensors
            (passed as positional arguments), all sliced along dim 0.
        inputs: the whole batch, e.g. uint8 images kept on the host.
        loss_fn: ``F (B, D) → loss`` or ``(loss, extras)``; it sees all B embeddings at once.
        chunk_size: samples per forward; ``None`` or ``>= B`` is ordinary backpropagation (one
            forward with a graph, no extra pass).
        prepare: applied to each chunk before ``model`` in both passes (e.g. moving it to the GPU).
        backward: how to backpropagate the scalar loss in step 2 (default ``loss.backward()``;
            pass ``lambda l: scaler.scale(l).backward()`` for a float16 gradient scaler — the
            scaled gradients then reach the parameters through step 3 unchanged).
        autocast: factory of the autocast context used for the forward passes.

    Returns:
        :class:`MultistageResult` with the detached loss and step-1 embeddings. Gradients are
        *accumulated* into ``.grad`` (zero them before, as with ``loss.backward()``).
    """
    prepare = prepare or (lambda x: x)
    backward = backward or (lambda loss: loss.backward())
    autocast = autocast or contextlib.nullcontext
    total = _size(inputs)
    if total == 0:
        raise ValueError("multistage_backward: empty batch")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")

    def split(result):
        if isinstance(result, tuple):
            return result[0], result[1]
        return result, None

    if chunk_size is None or chunk_size >= total:
        with autocast():
            out = _call(model, prepare(inputs))
        loss, extras = split(loss_fn(out))
        backward(loss)
        return MultistageResult(loss.detach(), out.detach(), extras)

    bounds = [(lo, min(lo + chunk_size, total)) for lo in range(0, total, chunk_size)]
    # Step 1: embeddings without a graph. The bare module avoids DDP's per-forward collectives.
    raw = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    saved_bn = _bn_buffers(raw)
    outs, rng_states = [], []
    with torch.no_grad():
        for lo, hi in bounds:
            chunk = prepare(_slice(inputs, lo, hi))
            rng_states.append((_devices_of(chunk), _rng_state(_devices_of(chunk))))
            with autocast():
                outs.append(_call(raw, chunk))
    for buf, value in saved_bn:  # each chunk updates BN running stats once, in step 3
        buf.copy_(value)

    # Step 2: loss and its gradient w.r.t. the embeddings.
    embeddings = torch.cat(outs).detach().requires_grad_(True)
    loss, extras = split(loss_fn(embeddings))
    backward(loss)
    grad = embeddings.grad
    if grad is None:
        raise RuntimeError("the loss does not depend on the embeddings (no gradient reached them)")

    # Step 3: re-forward each chunk with a graph and push its slice of the gradient through.
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    for n, ((lo, hi), (devices, (cpu_state, cuda_states))) in enumerate(zip(bounds, rng_states)):
        last = n == len(bounds) - 1
        sync = contextlib.nullcontext() if (last or not ddp) else model.no_sync()
        with sync, torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            for d, s in zip(devices, cuda_states):
                torch.cuda.set_rng_state(s, d)
            chunk = prepare(_slice(inputs, lo, hi))
            with autocast():
                out = _call(model, chunk)
            torch.autograd.backward(out, grad[lo:hi].to(out.dtype))
    return MultistageResult(loss.detach(), embeddings.detach(), extras)
