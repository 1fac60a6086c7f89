"""Multi-stage backpropagation against plain backpropagation (the oracle).

The oracle differentiates ``loss(model(whole batch))`` with ordinary autograd; multi-stage
backprop never holds the whole graph. With BatchNorm frozen (eval mode) the two must give the same
parameter gradients; in float64 they agree to rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastap
from fastap.models import RetrievalNet
from fastap.training import multistage_backward
from fastap.training.multistage import bn_train_mode_present


@pytest.fixture(autouse=True)
def _one_thread():
    # Two shared cores: one intra-op thread avoids OpenMP barrier stalls under load.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyNet(nn.Module):
    """Conv → BN → ReLU → GeM-free average → Linear: enough to exercise BN and a real trunk."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.drop(h))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _batch(n=10, size=8, dtype=torch.float64, classes=3):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=gen, dtype=dtype)
    labels = torch.arange(n) % classes
    return x, labels


def _prepared(model: nn.Module, train_bn: bool) -> nn.Module:
    model.train()
    if not train_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    # Non-trivial running statistics so that eval-mode BN is not the identity.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, None])
def test_gradients_equal_plain_backprop_frozen_bn(chunk):
    torch.manual_seed(0)
    model = _prepared(TinyNet().double(), train_bn=False)
    oracle = copy.deepcopy(model)
    x, labels = _batch()
    loss_fn = fastap.APLoss(num_bins=10, score_range=(-1, 1))

    ref_loss = loss_fn(oracle(x), labels)
    ref_loss.backward()

    result = multistage_backward(model, x, lambda f: loss_fn(f, labels), chunk)
    assert torch.allclose(result.loss, ref_loss.detach(), rtol=0, atol=1e-12)
    got, want = _grads(model), _grads(oracle)
    assert got.keys() == want.keys() and len(got) == 6
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)
    # Frozen BN: running statistics untouched by either pass.
    torch.testing.assert_close(model.bn.running_mean, oracle.bn.running_mean, rtol=0, atol=0)


def test_resnet_retrieval_net_gradients_equal_plain_backprop():
    """The real trunk: RetrievalNet(resnet18) with GeM and whitening, frozen BN. The head runs in
    float32 by design, so this comparison is at float32 rounding (chunked vs whole-batch GEMMs)."""
    torch.manual_seed(0)
    net = RetrievalNet("resnet18", whitening_dim=16)
    _prepared(net, train_bn=False)
    # A random (not identity) whitening spreads the cosine similarities of a random trunk over
    # many bins; otherwise they all sit near 1 and most gradients are rounding noise.
    nn.init.normal_(net.whiten.weight)
    oracle = copy.deepcopy(net)
    # 64 px: the trunk output is 2x2, so GeM p has a gradient (over 1x1 GeM is the identity).
    x, labels = _batch(n=6, size=64, classes=2, dtype=torch.float32)
    loss_fn = fastap.APLoss()  # the Quantized-AP preset, M = 25 on [0, 1]

    ref = loss_fn(oracle(x), labels)
    ref.backward()
    result = multistage_backward(net, x, lambda f: loss_fn(f, labels), chunk_size=4)
    torch.testing.assert_close(result.loss, ref.detach(), rtol=0, atol=1e-6)
    got, want = _grads(net), _grads(oracle)
    assert "pool.p" in got and "whiten.weight" in got and len(got) == len(want)
    for n in want:
        assert want[n].abs().max() > 1e-6, n  # a gradient that is not just noise
        torch.testing.assert_close(got[n], want[n], rtol=1e-3,
                                   atol=1e-4 * want[n].abs().max().item(), msg=n)


def test_train_mode_bn_differs_from_whole_batch_but_matches_per_chunk_oracle():
    """The documented caveat: train-mode BN normalises each chunk by its own statistics. The
    gradient is then that of a net run chunk by chunk (oracle: forward each chunk with a graph,
    concatenate, backprop once), and BN running stats are updated once per chunk."""
    torch.manual_seed(0)
    model = _prepared(TinyNet().double(), train_bn=True)
    whole, per_chunk = copy.deepcopy(model), copy.deepcopy(model)
    assert bn_train_mode_present(model)
    x, labels = _batch()
    loss_fn = fastap.APLoss(num_bins=10, score_range=(-1, 1))

    loss_fn(whole(x), labels).backward()
    out = torch.cat([per_chunk(x[i:i + 5]) for i in range(0, 10, 5)])
    loss_fn(out, labels).backward()
    multistage_backward(model, x, lambda f: loss_fn(f, labels), chunk_size=5)

    got, chunked, plain = _grads(model), _grads(per_chunk), _grads(whole)
    for name in chunked:
        torch.testing.assert_close(got[name], chunked[name], rtol=1e-9, atol=1e-12)
    assert any(not torch.allclose(got[n], plain[n], rtol=1e-6, atol=1e-9) for n in plain)
    torch.testing.assert_close(model.bn.running_mean, per_chunk.bn.running_mean, rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(model.bn.running_var, per_chunk.bn.running_var, rtol=1e-12, atol=0)
    assert int(model.bn.num_batches_tracked) == 2


def test_dropout_masks_are_replayed():
    """Step 3 must draw the same dropout masks as step 1 (RNG state saved per chunk)."""
    model = _prepared(TinyNet(dropout=0.5).double(), train_bn=False)
    oracle = copy.deepcopy(model)
    x, labels = _batch()
    loss_fn = fastap.APLoss(num_bins=10, score_range=(-1, 1))
    torch.manual_seed(123)
    out = torch.cat([oracle(x[i:i + 4]) for i in range(0, 10, 4)])
    ref = loss_fn(out, labels)
    ref.backward()
    torch.manual_seed(123)
    result = multistage_backward(model, x, lambda f: loss_fn(f, labels), chunk_size=4)
    torch.testing.assert_close(result.loss, ref.detach(), rtol=0, atol=1e-12)
    for name, g in _grads(oracle).items():
        torch.testing.assert_close(_grads(model)[name], g, rtol=1e-9, atol=1e-12)


def test_scaled_backward_and_tuple_inputs_and_extras():
    """A gradient-scaler style backward multiplies every parameter gradient by the scale; tuple
    inputs are sliced together; extras from the loss come back."""
    model = _prepared(TinyNet().double(), train_bn=False)
    oracle = copy.deepcopy(model)
    x, labels = _batch()

    class TwoInputs(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, a, b):
            return self.inner(a) + self.inner(b)

    loss_fn = fastap.FastAPLoss(num_bins=10)
    ref = loss_fn(TwoInputs(oracle)(x, x.flip(0)), labels)
    (ref * 8.0).backward()
    result = multistage_backward(TwoInputs(model), (x, x.flip(0)),
                                 lambda f: (loss_fn(f, labels), {"n": f.shape[0]}), chunk_size=3,
                                 backward=lambda loss: (loss * 8.0).backward())
    assert result.extras == {"n": 10} and result.outputs.shape == (10, 6)
    for name, g in _grads(oracle).items():
        torch.testing.assert_close(_grads(model)[name], g, rtol=1e-9, atol=1e-12)


def test_errors():
    model = TinyNet().double()
    x, labels = _batch()
    with pytest.raises(ValueError, match="chunk_size"):
        multistage_backward(model, x, lambda f: f.sum(), chunk_size=0)
    with pytest.raises(RuntimeError, match="does not depend"):
        multistage_backward(model, x, lambda f: torch.zeros((), requires_grad=True), chunk_size=4)
