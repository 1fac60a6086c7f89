"""torch.func transforms through the AP losses: ``grad``, ``vmap`` and per-sample gradients
(``vmap(grad(...))``) give what autograd and a Python loop over the slices give, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

import fastap
import fastap.functional as F

LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 3, 1, 2, 0])


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64),
                                         dim=-1)


LOSSES = {
    "APLoss": fastap.APLoss(),
    "APLoss-fused": fastap.APLoss(fused=True),
    "FastAPLoss": fastap.FastAPLoss(),
    "FastAPLoss-fused": fastap.FastAPLoss(fused=True),
}


def autograd_grad(fn, x):
    x = x.clone().requires_grad_()
    fn(x).backward()
    return x.grad


@pytest.mark.parametrize("name", LOSSES)
def test_grad_vmap_and_per_sample_grads_of_the_losses(name):
    loss = LOSSES[name]
    fn = lambda e: loss(e, LABELS)  # noqa: E731
    emb = unit(len(LABELS), 6)
    assert torch.equal(grad(fn)(emb), autograd_grad(fn, emb))
    batch = unit(3, len(LABELS), 6, seed=1)
    assert torch.equal(vmap(fn)(batch), torch.stack([fn(b) for b in batch]))
    per_sample = vmap(grad(fn))(batch)
    assert torch.equal(per_sample, torch.stack([autograd_grad(fn, b) for b in batch]))
    assert per_sample.abs().sum() > 0   # not a vacuous zero gradient


def test_grad_of_the_score_losses_and_a_vmapped_argument_with_a_shared_one():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(5, 30, generator=g, dtype=torch.float64)
    targets = torch.rand(5, 30, generator=g) > 0.6
    targets[:, 0] = True
    fn = lambda s: F.ap_loss(s, targets, num_bins=10)  # noqa: E731
    assert torch.equal(grad(fn)(scores), autograd_grad(fn, scores))
    stacked = torch.rand(4, 5, 30, generator=g, dtype=torch.float64)
    assert torch.equal(vmap(fn)(stacked), torch.stack([fn(s) for s in stacked]))
    # queries vmapped, the database shared by every slice
    database = unit(20, 6, seed=3)
    db_labels = torch.arange(20) % 4
    fn = lambda q: F.ap_loss_from_embeddings(q, database, LABELS[:5] % 4, db_labels)  # noqa: E731
    queries = unit(3, 5, 6, seed=4)
    assert torch.equal(vmap(grad(fn))(queries),
                       torch.stack([autograd_grad(fn, q) for q in queries]))


def test_second_derivative_is_still_refused_under_grad():
    fn = lambda e: fastap.APLoss()(e, LABELS)  # noqa: E731
    with pytest.raises(RuntimeError, match="without second derivatives"):
        grad(lambda e: grad(fn)(e).sum())(unit(len(LABELS), 6))


def test_nan_embeddings_are_refused_under_vmap():
    batch = unit(2, len(LABELS), 6)
    batch[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vmap(lambda e: fastap.APLoss()(e, LABELS))(batch)


@pytest.mark.parametrize("fused", [True, False])
def test_memory_bank_path_with_the_batch_included(fused):
    """ref_emb with include_batch=True: the queries are also the first database rows (the fused
    path gives them their second gradient in a Function of its own)."""
    loss = fastap.APLoss(fused=fused)
    memory, memory_labels = unit(9, 6, seed=5), torch.arange(9) % 4
    fn = lambda e: loss(e, LABELS, memory, memory_labels, include_batch=True)  # noqa: E731
    emb = unit(len(LABELS), 6, seed=6)
    assert torch.equal(grad(fn)(emb), autograd_grad(fn, emb))
    batch = unit(2, len(LABELS), 6, seed=7)
    assert torch.equal(vmap(grad(fn))(batch), torch.stack([autograd_grad(fn, b) for b in batch]))
