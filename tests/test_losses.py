"""The losses (functional and modules) against the dense reference, pytorch-metric-learning's
FastAP, the published quantized-AP formula, gradcheck and torch.compile."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastap
import fastap.reference as R
from fastap import functional as Fn

from conftest import (make_scores, make_targets, reference_embedding_loss, to_device,
                      valid_rows)

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]


def _labels(n: int, classes: int, gen: torch.Generator, singletons: int = 1) -> torch.Tensor:
    """Labels with every class present at least twice, plus ``singletons`` unique labels
    (anchors without a positive when the batch is ranked against itself)."""
    base = torch.arange(n - singletons) % classes
    base = base[torch.randperm(base.numel(), generator=gen)]
    return torch.cat([base, 100 + torch.arange(singletons)])


# ---------------------------------------------------------------------------------------------
# ap_loss on scores
# ---------------------------------------------------------------------------------------------

def _reference_ap_loss(scores, targets, num_bins, score_range, weights, exclude_diagonal):
    """Reference loss and its gradients w.r.t. scores (and weights), float64.

    Rows without positives get NaN gradients from the reference's backward (0/0 in the division
    by N⁺, although the loss excludes them); their defined gradient is 0 and rows do not share
    anything before the final mean, so zeroing them leaves the other rows' gradients exact.
    """
    s = scores.detach().cpu().double().requires_grad_(True)
    w = None if weights is None else weights.detach().cpu().double().requires_grad_(True)
    tg = to_device(targets, "cpu")
    if isinstance(tg, torch.Tensor):
        tg = tg.double()
    loss = R.ap_loss(s, tg, num_bins, score_range, w, exclude_diagonal=exclude_diagonal)
    # (With no valid row the reference's loss does not use the weights at all.)
    grads = torch.autograd.grad(loss, [s] if w is None else [s, w], allow_unused=True)
    ok = valid_rows(tg, *s.shape, exclude_diagonal)
    return loss.detach(), torch.where(ok.unsqueeze(1), grads[0], 0), grads[1:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["matrix", "labels"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weights"])
@pytest.mark.parametrize("exclude_diagonal", [False, True], ids=["", "exdiag"])
@pytest.mark.parametrize("num_bins,score_range", [(25, (0.0, 1.0)), (5, (0.0, 1.0)),
                                                   (9, (-1.0, 1.0))])
def test_ap_loss_matches_reference(device, dtype, form, weighted, exclude_diagonal, num_bins,
                                   score_range):
    gen = torch.Generator().manual_seed(21)
    lo, hi = score_range
    for batch, size in [(1, 1), (1, 5), (3, 3), (4, 9), (6, 13)]:
        if exclude_diagonal and batch > size:
            continue
        scores = make_scores(batch, size, num_bins=num_bins, lo=lo, hi=hi, gen=gen,
                             on_centres=num_bins != 25, dtype=dtype)
        if form == "matrix":
            targets = make_targets(batch, size, gen=gen)
        else:
            targets = (torch.randint(0, 3, (batch,), generator=gen),
                       torch.randint(0, 3, (size,), generator=gen))
        weights = (torch.rand(batch, generator=gen, dtype=torch.float64).to(dtype) + 0.1
                   if weighted else None)
        ok = valid_rows(targets, batch, size, exclude_diagonal)

        s = scores.to(device).requires_grad_(True)
        w = None if weights is None else weights.to(device).requires_grad_(True)
        loss = Fn.ap_loss(s, to_device(targets, device), num_bins, score_range, w,
                          exclude_diagonal=exclude_diagonal)
        assert loss.shape == () and loss.dtype == dtype
        grads = torch.autograd.grad(loss, [s] if w is None else [s, w])
        assert torch.all(torch.isfinite(grads[0]))

        ref_loss, ref_grad, ref_wgrad = _reference_ap_loss(scores, targets, num_bins,
                                                           score_range, weights,
                                                           exclude_diagonal)
        if not ok.any():
            # The reference has no row to average either; the defined value is a zero.
            assert loss.item() == 0.0 and torch.all(grads[0] == 0)
            continue
        torch.testing.assert_close(loss.detach().cpu().double(), ref_loss, **TOL[dtype])
        torch.testing.assert_close(grads[0].cpu().double(), ref_grad, **TOL[dtype])
        if weighted:
            torch.testing.assert_close(grads[1].cpu().double(), ref_wgrad[0], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_ap_loss_low_precision(device, dtype):
    """Tolerances as in test_histogram_ap.test_op_low_precision_matches_reference: the loss is
    float32 (accumulated in float32 from exactly upcast scores, so 1e-5 against the float64
    reference on the same rounded scores); the score gradient is in the input dtype, one ulp."""
    gen = torch.Generator().manual_seed(20)
    scores = make_scores(5, 11, num_bins=5, gen=gen, dtype=dtype)
    y = make_targets(5, 11, gen=gen)
    weights = torch.rand(5, generator=gen) + 0.1
    s = scores.to(device).requires_grad_(True)
    loss = Fn.ap_loss(s, y.to(device), 5, weights=weights.to(device))
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, ref_grad, _ = _reference_ap_loss(scores, y, 5, (0.0, 1.0), weights, False)
    torch.testing.assert_close(loss.detach().cpu().double(), ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, atol=1e-5,
                               rtol=torch.finfo(dtype).eps)


def test_loss_is_mean_over_rows_with_positives(device):
    gen = torch.Generator().manual_seed(22)
    scores = make_scores(6, 10, gen=gen)
    y = make_targets(6, 10, gen=gen)
    y[2] = False
    ok = y.any(dim=1)
    assert 0 < ok.sum() < 6
    ap = R.average_precision(scores, y, 25)
    expected = 1 - ap[ok].mean()
    loss = Fn.ap_loss(scores.to(device), y.to(device))
    torch.testing.assert_close(loss.cpu(), expected, **TOL[torch.float64])
    weights = torch.rand(6, dtype=torch.float64, generator=gen)
    expected = 1 - (ap[ok] * weights[ok]).sum() / weights[ok].sum()
    loss = Fn.ap_loss(scores.to(device), y.to(device), weights=weights.to(device))
    torch.testing.assert_close(loss.cpu(), expected, **TOL[torch.float64])


def _assert_connected_zero(loss, *inputs):
    assert loss.item() == 0.0
    assert loss.grad_fn is not None and loss.requires_grad
    grads = torch.autograd.grad(loss, inputs, retain_graph=True)
    for g in grads:
        assert torch.all(torch.isfinite(g)) and torch.all(g == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16],
                         ids=["f64", "f32", "f16"])
def test_no_valid_row_loss_is_connected_zero(device, dtype):
    s = torch.rand(3, 5, device=device).to(dtype).requires_grad_(True)
    _assert_connected_zero(Fn.ap_loss(s, torch.zeros(3, 5, device=device)), s)
    _assert_connected_zero(
        Fn.ap_loss(s, torch.zeros(3, 5, device=device), weights=torch.ones(3, device=device)), s)
    labels = (torch.arange(3, device=device), torch.arange(10, 15, device=device))
    _assert_connected_zero(Fn.ap_loss(s, labels), s)
    # Only diagonal positives, and the diagonal is excluded.
    _assert_connected_zero(Fn.ap_loss(s, torch.eye(3, 5, device=device), exclude_diagonal=True),
                           s)


FUSED = [pytest.param(False, id="unfused"), pytest.param(True, id="fused")]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("loss_cls", [fastap.APLoss, fastap.FastAPLoss])
def test_no_valid_anchor_embedding_losses(device, loss_cls, fused):
    lin = torch.nn.Linear(6, 4).to(device)
    x = torch.randn(5, 6, device=device)
    crit = loss_cls(fused=fused)
    _assert_connected_zero(crit(lin(x), torch.arange(5, device=device)), lin.weight, lin.bias)
    ref = torch.randn(7, 4, device=device, requires_grad=True)
    loss = crit(lin(x), torch.zeros(5, dtype=torch.long, device=device), ref,
                torch.ones(7, dtype=torch.long, device=device))
    _assert_connected_zero(loss, lin.weight, ref)
    loss.backward()  # and .backward() through a module works
    assert torch.all(lin.weight.grad == 0)


# ---------------------------------------------------------------------------------------------
# APLoss / FastAPLoss on embeddings
# ---------------------------------------------------------------------------------------------

def _embedding_case(gen, batch, dim, classes, dtype, with_ref, size=None):
    emb = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    labels = _labels(batch, classes, gen)
    if not with_ref:
        return emb, labels, None, None
    size = size or batch + 3
    ref = torch.randn(size, dim, generator=gen, dtype=torch.float64).to(dtype)
    ref_labels = torch.randint(0, classes, (size,), generator=gen)
    return emb, labels, ref, ref_labels


def _module_and_reference(kind, emb, labels, ref, ref_labels, device, num_bins, score_range,
                          fused):
    crit = (fastap.APLoss(num_bins, score_range, fused=fused) if kind == "ap"
            else fastap.FastAPLoss(num_bins, fused=fused))
    e = emb.to(device).requires_grad_(True)
    r = None if ref is None else ref.to(device).requires_grad_(True)
    loss = crit(e, labels.to(device), r, None if ref_labels is None else ref_labels.to(device))
    inputs = [e] if r is None else [e, r]
    grads = torch.autograd.grad(loss, inputs)

    e64 = emb.detach().double().requires_grad_(True)
    r64 = None if ref is None else ref.detach().double().requires_grad_(True)
    ref_loss = reference_embedding_loss(kind, e64, labels, r64, ref_labels, num_bins=num_bins,
                                        score_range=score_range)
    ref_grads = torch.autograd.grad(ref_loss, [e64] if r64 is None else [e64, r64])
    return loss, grads, ref_loss, ref_grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("kind,num_bins,score_range", [
    ("ap", 25, (0.0, 1.0)), ("ap", 10, (-1.0, 1.0)), ("ap", 5, (-0.5, 1.0)),
    ("fastap", 10, None), ("fastap", 4, None), ("fastap", 33, None)])
def test_embedding_losses_match_reference(device, dtype, with_ref, fused, kind, num_bins,
                                          score_range):
    gen = torch.Generator().manual_seed(23)
    for batch, dim, classes in [(2, 3, 1), (8, 5, 3), (17, 16, 4)]:
        emb, labels, ref, ref_labels = _embedding_case(gen, batch, dim, classes, dtype, with_ref)
        loss, grads, ref_loss, ref_grads = _module_and_reference(
            kind, emb, labels, ref, ref_labels, device, num_bins, score_range or (0.0, 1.0),
            fused)
        assert loss.dtype == dtype
        torch.testing.assert_close(loss.detach().cpu().double(), ref_loss.detach(), **TOL[dtype])
        for g, rg in zip(grads, ref_grads):
            assert g.dtype == dtype
            torch.testing.assert_close(g.cpu().double(), rg, **TOL[dtype])
        # The oracle's own module-level function agrees on the value (its backward is not used:
        # it is NaN where an anchor has no positive).
        if kind == "ap":
            direct = R.embedding_ap_loss(emb.double(), labels, None if ref is None else
                                         ref.double(), ref_labels, num_bins, score_range)
        else:
            direct = R.fastap_loss(emb.double(), labels, None if ref is None else ref.double(),
                                   ref_labels, num_bins)
        torch.testing.assert_close(loss.detach().cpu().double(), direct, **TOL[dtype])


def test_functional_embedding_losses_match_modules_reference(device):
    gen = torch.Generator().manual_seed(24)
    emb, labels, ref, ref_labels = _embedding_case(gen, 9, 6, 3, torch.float64, True)
    emb, ref, labels, ref_labels = (emb.to(device), ref.to(device), labels.to(device),
                                    ref_labels.to(device))
    got = Fn.embedding_ap_loss(emb, labels, ref, ref_labels, num_bins=7, score_range=(-1, 1))
    want = R.embedding_ap_loss(emb.cpu(), labels.cpu(), ref.cpu(), ref_labels.cpu(), 7, (-1, 1))
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.float64])
    got = Fn.fastap_loss(emb, labels, num_bins=6)
    want = R.fastap_loss(emb.cpu(), labels.cpu(), num_bins=6)
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# Published implementations
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_bins", [1, 2, 5, 10, 20, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", FUSED)
def test_fastap_matches_pytorch_metric_learning(device, num_bins, dtype, fused):
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    gen = torch.Generator().manual_seed(25)
    # <= 24 rows keeps torch.cdist (inside pml) on its exact, non-matmul path.
    for batch, dim, classes in [(3, 4, 1), (12, 8, 3), (24, 32, 5)]:
        emb = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
        labels = _labels(batch, classes, gen)
        e1 = emb.clone().to(device).requires_grad_(True)
        e2 = emb.clone().requires_grad_(True)
        ours = fastap.FastAPLoss(num_bins, fused=fused)(e1, labels.to(device))
        peer = pml_losses.FastAPLoss(num_bins=num_bins)(e2, labels)
        (g1,) = torch.autograd.grad(ours, e1)
        (g2,) = torch.autograd.grad(peer, e2)
        torch.testing.assert_close(ours.detach().cpu(), peer.detach(), **TOL[dtype])
        # pml's gradient is autograd's, i.e. the true one (docs/estimators.md).
        torch.testing.assert_close(g1.cpu(), g2, **TOL[dtype])
    # Default num_bins is pml's default (10).
    assert fastap.FastAPLoss().num_bins == pml_losses.FastAPLoss().num_bins == 10


def naver_quantized_ap(scores: torch.Tensor, targets: torch.Tensor, num_bins: int = 25,
                       lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Per-row AP as the published quantized-AP module computes it (Revaud et al. 2019),
    re-derived from docs/estimators.md.

    Each bin k is the minimum of two straight lines through (z_k, 1): one falling to 0 at
    z_k + Δ, one rising from 0 at z_k - Δ, clamped at 0; the outermost lines (bin 0's falling
    one, bin M-1's rising one) are the constant 1, which makes the end bins open. Precision is
    the running positive mass over 1e-16 + the running total mass, recall the positive mass per
    bin normalised by its sum, AP = Σ precision · recall.
    """
    a = (num_bins - 1) / (hi - lo)  # 1/Δ
    centres = lo + (num_bins - 1 - torch.arange(num_bins, dtype=scores.dtype)) / a
    x = scores.unsqueeze(1)  # (B, 1, N)
    c = centres.view(1, -1, 1)  # (1, M, 1)
    falling = 1 - a * (x - c)
    rising = 1 + a * (x - c)
    falling[:, 0] = 1
    rising[:, -1] = 1
    q = torch.min(falling, rising).clamp(min=0)  # (B, M, N)
    nbs = q.sum(-1)
    rec = (q * targets.view(targets.shape[0], 1, -1).to(scores.dtype)).sum(-1)
    prec = rec.cumsum(-1) / (1e-16 + nbs.cumsum(-1))
    rec = rec / rec.sum(-1, keepdim=True)
    return (prec * rec).sum(-1)


def _drop_diagonal(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    return m.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_bins,lo,hi", [(25, 0.0, 1.0), (10, -1.0, 1.0), (3, 0.0, 1.0)])
def test_quantized_ap_matches_published_formula(device, dtype, num_bins, lo, hi):
    gen = torch.Generator().manual_seed(26)
    # Scores: float64 for the 1e-10 comparison; in float32 the published module runs in float32.
    scores = make_scores(6, 30, num_bins=num_bins, lo=lo, hi=hi, gen=gen, on_centres=False,
                         dtype=dtype)
    y = make_targets(6, 30, gen=gen)
    y[-1, 0] = True  # the published formula has no convention for rows without positives
    want = naver_quantized_ap(scores, y, num_bins, lo, hi)
    got = Fn.average_precision(scores.to(device), y.to(device), num_bins, (lo, hi))
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])

    # APLoss on embeddings: cosine similarities, each query left out of its own ranking.
    emb = torch.randn(12, 8, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.arange(12) % 4
    sims = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T
    rel = labels.view(-1, 1) == labels.view(1, -1)
    want = 1 - naver_quantized_ap(_drop_diagonal(sims), _drop_diagonal(rel), num_bins, lo,
                                  hi).mean()
    e = emb.to(device).requires_grad_(True)
    got = fastap.APLoss(num_bins, (lo, hi))(e, labels.to(device))
    torch.testing.assert_close(got.detach().cpu(), want, **TOL[dtype])
    if dtype == torch.float64:  # gradients: autograd through the published formula
        e64 = emb.clone().requires_grad_(True)
        s64 = F.normalize(e64, dim=1) @ F.normalize(e64, dim=1).T
        ref = 1 - naver_quantized_ap(_drop_diagonal(s64), _drop_diagonal(rel), num_bins, lo,
                                     hi).mean()
        torch.testing.assert_close(torch.autograd.grad(got, e)[0].cpu(),
                                   torch.autograd.grad(ref, e64)[0], **TOL[dtype])

    # With a separate database (ref_emb): no diagonal to drop.
    ref_emb = torch.randn(15, 8, generator=gen, dtype=torch.float64).to(dtype)
    ref_labels = torch.arange(15) % 4
    sims = F.normalize(emb, dim=1) @ F.normalize(ref_emb, dim=1).T
    rel = labels.view(-1, 1) == ref_labels.view(1, -1)
    want = 1 - naver_quantized_ap(sims, rel, num_bins, lo, hi).mean()
    got = fastap.APLoss(num_bins, (lo, hi))(emb.to(device), labels.to(device),
                                            ref_emb.to(device), ref_labels.to(device))
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])


def test_aploss_defaults_are_the_published_preset():
    crit = fastap.APLoss()
    assert crit.num_bins == 25 and tuple(crit.score_range) == (0.0, 1.0)
    gen = torch.Generator().manual_seed(27)
    emb = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    labels = torch.arange(10) % 3
    sims = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T
    rel = labels.view(-1, 1) == labels.view(1, -1)
    want = 1 - naver_quantized_ap(_drop_diagonal(sims), _drop_diagonal(rel)).mean()
    torch.testing.assert_close(crit(emb, labels), want, **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)
# ---------------------------------------------------------------------------------------------

def _kink_distance(sims: torch.Tensor, num_bins: int, lo: float, hi: float) -> float:
    """Distance of the off-diagonal similarities to the nearest bin centre (open or closed)."""
    delta = (hi - lo) / (num_bins - 1)
    t = (hi - sims) / delta
    d = (t - t.round()).abs() * delta
    if sims.shape[0] == sims.shape[1]:
        d = d + torch.eye(sims.shape[0], dtype=d.dtype) * 10  # the excluded diagonal
    return d.min().item()


def _embeddings_off_kinks(batch, dim, num_bins, lo, hi, seed, ref_size=0):
    """Embeddings whose similarities are >= 1e-3 from every kink (gradcheck's eps is 1e-6)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        emb = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
        ref = torch.randn(ref_size, dim, generator=gen, dtype=torch.float64)
        other = ref if ref_size else emb
        sims = F.normalize(emb, dim=1) @ F.normalize(other, dim=1).T
        if _kink_distance(sims, num_bins, lo, hi) > 1e-3:
            return emb, ref


def test_gradcheck_ap_loss_with_weights():
    gen = torch.Generator().manual_seed(28)
    delta = 1 / 24
    k = torch.randint(-1, 25, (4, 9), generator=gen).double()
    s = (1 - (k + 0.1 + 0.8 * torch.rand(4, 9, generator=gen, dtype=torch.float64)) * delta)
    y = make_targets(4, 9, gen=gen)  # includes a row without positives: excluded, no NaN
    w = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda a, b: Fn.ap_loss(a, y, weights=b),
                                    (s.requires_grad_(True), w.requires_grad_(True)),
                                    eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
def test_gradcheck_fastap_loss(with_ref):
    num_bins = 10
    emb, ref = _embeddings_off_kinks(7, 5, num_bins + 1, -1.0, 1.0, seed=29,
                                     ref_size=9 if with_ref else 0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    ref_labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4])
    if with_ref:
        fn = lambda a, b: Fn.fastap_loss(a, labels, b, ref_labels, num_bins)  # noqa: E731
        inputs = (emb.requires_grad_(True), ref.requires_grad_(True))
    else:
        fn = lambda a: Fn.fastap_loss(a, labels, num_bins=num_bins)  # noqa: E731
        inputs = (emb.requires_grad_(True),)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_gradcheck_embedding_ap_loss():
    emb, _ = _embeddings_off_kinks(8, 4, 25, 0.0, 1.0, seed=30)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    assert torch.autograd.gradcheck(lambda a: Fn.embedding_ap_loss(a, labels),
                                    (emb.requires_grad_(True),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("memory", [False, True], ids=["batch", "memory_bank"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("loss_cls", [fastap.APLoss, fastap.FastAPLoss])
def test_double_backward_is_refused(device, loss_cls, fused, memory):
    # The closed-form backward has no second derivative: create_graph=True must still give the
    # plain first-order gradient, and differentiating that gradient (or a forward-mode
    # derivative, which torch.autograd.functional.jvp forms by double backward) must raise, not
    # return a silently detached (wrong) Hessian-vector product or a zero.
    emb, _ = _embeddings_off_kinks(8, 4, 25, 0.0, 1.0, seed=30)
    emb = emb.to(device).requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3], device=device)
    crit = loss_cls(fused=fused)

    def loss(e):
        if memory:  # the first five rows as the batch, the last three as a memory bank
            return crit(e[:5], labels[:5], emb[5:].detach(), labels[5:], include_batch=True)
        return crit(e, labels)

    (plain,) = torch.autograd.grad(loss(emb), emb)
    (grad,) = torch.autograd.grad(loss(emb), emb, create_graph=True)
    torch.testing.assert_close(grad, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="without second derivatives"):
        torch.autograd.grad(grad.pow(2).sum(), emb)
    with pytest.raises(RuntimeError, match="without second derivatives"):
        torch.autograd.functional.jvp(loss, emb.detach(), torch.ones_like(emb))


def test_double_backward_on_scores_is_refused(device):
    s = make_scores(4, 9, gen=torch.Generator().manual_seed(3)).to(device)
    y = make_targets(4, 9, gen=torch.Generator().manual_seed(4)).to(device)
    s.requires_grad_(True)
    (grad,) = torch.autograd.grad(Fn.ap_loss(s, y), s, create_graph=True)
    with pytest.raises(RuntimeError, match="without second derivatives"):
        torch.autograd.grad(grad.sum(), s)


@pytest.mark.parametrize("fused", [False, True])
def test_half_batch_against_float_reference_set(device, fused):
    # A bfloat16 batch (a model under autocast) ranked against a float32 memory bank: both
    # paths compute in the wider dtype and agree with the float64 reference on the same values.
    gen = torch.Generator().manual_seed(5)
    emb = torch.randn(12, 8, generator=gen).to(device=device, dtype=torch.bfloat16)
    ref = torch.randn(20, 8, generator=gen).to(device)
    labels, ref_labels = torch.arange(12, device=device) % 4, torch.arange(20, device=device) % 4
    emb.requires_grad_(True)
    loss = fastap.APLoss(fused=fused)(emb, labels, ref, ref_labels)
    (grad,) = torch.autograd.grad(loss, emb)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    emb64 = emb.detach().double().requires_grad_(True)
    expected = R.embedding_ap_loss(emb64, labels, ref.double(), ref_labels)
    (grad64,) = torch.autograd.grad(expected, emb64)
    torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad64, rtol=0, atol=1e-2 * grad64.abs().max().item())


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------

# Inductor's cold compile of this step took ~42 s on the 2-core build machine (5 s with a warm
# cache), aot_eager ~3 s; aot_eager still traces the fake kernels and the registered backward
# through AOTAutograd, which is what the op registration has to get right. Set
# FASTAP_TEST_INDUCTOR=1 to also run the inductor backend.
_INDUCTOR = pytest.param("inductor", marks=[
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FASTAP_TEST_INDUCTOR") != "1",
                       reason="inductor compile is slow on CPU; set FASTAP_TEST_INDUCTOR=1")])


@pytest.mark.parametrize("backend", ["aot_eager", _INDUCTOR])
@pytest.mark.parametrize("loss_cls", [fastap.APLoss, fastap.FastAPLoss])
def test_compiled_training_step_matches_eager(device, backend, loss_cls):
    torch._dynamo.reset()
    torch.manual_seed(31)
    lin = torch.nn.Linear(8, 4, dtype=torch.float64).to(device)
    crit = loss_cls(num_bins=9)

    def step(x, labels):
        return crit(lin(x), labels)

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for batch in (12, 10):  # a second batch size exercises the fake kernels' shapes again
        x = torch.randn(batch, 8, dtype=torch.float64, device=device)
        labels = (torch.arange(batch, device=device) % 4)
        lin.zero_grad()
        eager = step(x, labels)
        eager.backward()
        eager_grads = [p.grad.clone() for p in lin.parameters()]
        lin.zero_grad()
        got = compiled(x, labels)
        got.backward()
        torch.testing.assert_close(got.detach(), eager.detach(), **TOL[torch.float64])
        for p, g in zip(lin.parameters(), eager_grads):
            torch.testing.assert_close(p.grad, g, **TOL[torch.float64])
        # ...and both are the oracle's.
        kind = "ap" if loss_cls is fastap.APLoss else "fastap"
        w = lin.weight.detach().cpu().clone().requires_grad_(True)
        out = x.cpu() @ w.T + lin.bias.detach().cpu()
        ref = reference_embedding_loss(kind, out, labels.cpu(), num_bins=9)
        torch.testing.assert_close(got.detach().cpu(), ref.detach(), **TOL[torch.float64])
        torch.testing.assert_close(lin.weight.grad.cpu(), torch.autograd.grad(ref, w)[0],
                                   **TOL[torch.float64])


@pytest.mark.parametrize("fused", [False, True], ids=["dense", "fused"])
@pytest.mark.parametrize("make", [lambda fused: fastap.APLoss(fused=fused),
                                  lambda fused: fastap.FastAPLoss(fused=fused)],
                         ids=["APLoss", "FastAPLoss"])
def test_bfloat16_embeddings_give_the_float32_loss_of_their_values(make, fused):
    """What autocast hands a loss: bfloat16 embeddings. The loss is accumulated in float32, so it
    equals the float32 loss of the same (exactly upcast) values; the gradient comes back in
    bfloat16, the float32 gradient rounded (to bfloat16's 2^-8 relative precision)."""
    gen = torch.Generator().manual_seed(31)
    x16 = torch.randn(48, 24, generator=gen).to(torch.bfloat16)
    labels = torch.arange(12).repeat(4)
    loss_fn = make(fused)
    a = x16.clone().requires_grad_(True)
    b = x16.float().requires_grad_(True)
    got, want = loss_fn(a, labels), loss_fn(b, labels)
    got.backward()
    want.backward()
    assert got.dtype == torch.float32 and a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    scale = b.grad.abs().max().item()
    torch.testing.assert_close(a.grad.float(), b.grad, rtol=2**-7, atol=2**-7 * scale)
    assert a.grad.float().abs().sum() > 0
