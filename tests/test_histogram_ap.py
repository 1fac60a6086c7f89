"""The histogram-AP op (forward, backward, registration) against the dense reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastap.reference as R
from fastap import functional as Fn
from fastap.ops import histogram_ap

from conftest import (make_scores, make_targets, nudge_off_centres, reference_ap_and_grad,
                      relevance_matrix, to_device, valid_rows)

SHAPES = [(1, 1), (1, 6), (4, 1), (3, 7), (5, 12), (6, 6)]

# (num_bins, lo, hi, on_centres): dyadic grids get scores exactly on their centres (exact in
# every dtype); the others (the quantized-AP default and the FastAP num_bins = 10 similarity axis)
# get only off-centre scores, as exact centres there are not representable.
GRIDS = [
    pytest.param(5, 0.0, 1.0, True, id="M5[0,1]"),
    pytest.param(9, -1.0, 1.0, True, id="M9[-1,1]"),
    pytest.param(25, 0.0, 1.0, False, id="M25[0,1]"),
    pytest.param(11, -1.0, 1.0, False, id="M11[-1,1]"),
]

# float64 is compared to 1e-10 and float32 to 1e-5 (the kernels' stated accuracy); float32
# accumulates sums of at most a few dozen O(1) weights, so its error is a few float32 ulps of
# numbers of order 1-20.
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def _relevance(form: str, y: torch.Tensor, gen: torch.Generator):
    """The same relevance as a (B, N) matrix or as labels (labels drawn, matrix derived)."""
    if form == "matrix":
        return y
    batch, size = y.shape
    q = torch.randint(0, 3, (batch,), generator=gen)
    d = torch.randint(0, 3, (size,), generator=gen)
    if batch >= 2:
        q[-1] = 7  # a query whose label no database item carries: no positive
    return q, d


def _run(scores, targets, *, num_bins, lo, hi, open_ends, exclude_diagonal, grad_ap):
    s = scores.detach().requires_grad_(True)
    kw = ({"targets": targets} if isinstance(targets, torch.Tensor)
          else {"query_labels": targets[0], "database_labels": targets[1]})
    ap, pos_hist, all_hist, num_pos = histogram_ap(
        s, **kw, num_bins=num_bins, lo=lo, hi=hi, open_ends=open_ends,
        exclude_diagonal=exclude_diagonal)
    # grad_ap goes straight to the backward, so rows without positives (AP NaN) receive a
    # non-zero dL/dAP too and must still come back with zero gradient.
    (grad,) = torch.autograd.grad(ap, s, grad_outputs=grad_ap.to(ap.dtype))
    return ap, pos_hist, all_hist, num_pos, grad


def _reference_histograms(scores, targets, *, num_bins, lo, hi, open_ends, exclude_diagonal):
    batch, size = scores.shape
    w = R.bin_weights(scores.cpu().double(), num_bins, lo, hi, open_ends)
    keep = torch.ones(batch, size, dtype=torch.float64)
    if exclude_diagonal:
        keep -= torch.eye(batch, size, dtype=torch.float64)
    y = relevance_matrix(to_device(targets, "cpu"), batch, size).double() * keep
    w = w * keep.unsqueeze(-1)
    return (w * y.unsqueeze(-1)).sum(1), w.sum(1), y.sum(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("open_ends", [True, False], ids=["open", "closed"])
@pytest.mark.parametrize("num_bins,lo,hi,on_centres", GRIDS)
@pytest.mark.parametrize("form", ["matrix", "labels"])
@pytest.mark.parametrize("exclude_diagonal", [False, True], ids=["", "exdiag"])
def test_op_matches_reference(device, dtype, open_ends, num_bins, lo, hi, on_centres, form,
                              exclude_diagonal):
    """AP, histograms, N⁺ and dAP/ds over shapes with B = 1, N = 1, all-positive/negative rows,
    ties, out-of-range scores and (dyadic grids) scores exactly on bin centres."""
    gen = torch.Generator().manual_seed(1234)
    params = dict(num_bins=num_bins, lo=lo, hi=hi, open_ends=open_ends,
                  exclude_diagonal=exclude_diagonal)
    for batch, size in SHAPES:
        if exclude_diagonal and batch > size:
            continue
        scores = make_scores(batch, size, num_bins=num_bins, lo=lo, hi=hi, gen=gen,
                             on_centres=on_centres, dtype=dtype)
        targets = _relevance(form, make_targets(batch, size, gen=gen), gen)
        grad_ap = torch.randn(batch, generator=gen, dtype=torch.float64)
        grad_ap[0] = 0.0 if batch > 2 else grad_ap[0]  # a row whose AP does not reach the loss

        ap, pos_hist, all_hist, num_pos, grad = _run(
            scores.to(device), to_device(targets, device), grad_ap=grad_ap.to(device, dtype),
            **params)
        ref_ap, ref_grad = reference_ap_and_grad(scores, targets, grad_ap.to(dtype), **params)
        ref_pos, ref_all, ref_np = _reference_histograms(scores, targets, **params)

        assert ap.dtype == dtype and grad.dtype == dtype and pos_hist.dtype == dtype
        assert ap.shape == (batch,) and pos_hist.shape == all_hist.shape == (batch, num_bins)
        assert grad.shape == (batch, size)
        ok = valid_rows(targets, batch, size, exclude_diagonal)
        assert torch.equal(torch.isnan(ap).cpu(), ~ok), (batch, size)
        torch.testing.assert_close(ap.cpu().double(), ref_ap, equal_nan=True, **TOL[dtype])
        torch.testing.assert_close(pos_hist.cpu().double(), ref_pos, **TOL[dtype])
        torch.testing.assert_close(all_hist.cpu().double(), ref_all, **TOL[dtype])
        torch.testing.assert_close(num_pos.cpu().double(), ref_np, atol=0, rtol=0)
        torch.testing.assert_close(grad.cpu().double(), ref_grad, **TOL[dtype])
        # Rows without positives have no AP and so exactly no gradient.
        assert torch.all(grad.cpu()[~ok] == 0)


# The CUDA kernels keep 8 copies of a row's histograms in shared memory while they fit, then
# one, up to a limit; the bin counts at each switch (and the last one below the limit) once
# launched with exactly 48 KiB plus the kernels' static ints, which fails. On the CPU these are
# plain large-M cases.
@pytest.mark.parametrize("dtype,num_bins", [(torch.float32, 763), (torch.float32, 6131),
                                            (torch.float64, 379), (torch.float64, 3063)],
                         ids=["f32-763", "f32-6131", "f64-379", "f64-3063"])
def test_bin_counts_at_the_shared_memory_limits(device, dtype, num_bins):
    gen = torch.Generator().manual_seed(5)
    scores = make_scores(3, 40, num_bins=num_bins, gen=gen, dtype=dtype, on_centres=False)
    targets = make_targets(3, 40, gen=gen)
    grad_ap = torch.randn(3, generator=gen, dtype=torch.float64).to(dtype)
    params = dict(num_bins=num_bins, lo=0.0, hi=1.0, open_ends=True, exclude_diagonal=False)
    ap, _, _, _, grad = _run(scores.to(device), targets.to(device), grad_ap=grad_ap.to(device),
                             **params)
    ref_ap, ref_grad = reference_ap_and_grad(scores, targets, grad_ap, **params)
    torch.testing.assert_close(ap.cpu().double(), ref_ap, equal_nan=True, **TOL[dtype])
    # A float32 kernel places a score in its bin with an error of about eps·M bin widths and
    # the gradient is ∓1/Δ per weight, so its error grows with M: measured on the CPU, 1.2e-5
    # (M = 763) and 9.2e-5 (M = 6131) of the largest entry; allowed: 5e-8·M of it.
    tol = (TOL[dtype] if dtype == torch.float64
           else dict(rtol=0, atol=5e-8 * num_bins * ref_grad.abs().max().item()))
    torch.testing.assert_close(grad.cpu().double(), ref_grad, **tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("dtype,limit", [(torch.float32, 6131), (torch.float64, 3063)],
                         ids=["f32", "f64"])
def test_cuda_refuses_more_bins_than_shared_memory_holds(dtype, limit):
    scores = torch.rand(2, 5, device="cuda", dtype=dtype)
    targets = torch.ones(2, 5, dtype=torch.bool, device="cuda")
    with pytest.raises(ValueError, match=rf"num_bins = {limit + 1} is too many bins for the "
                                         rf"CUDA kernel \(at most {limit}\)"):
        histogram_ap(scores, targets, num_bins=limit + 1, lo=0.0, hi=1.0, open_ends=True)


# Half and bfloat16 scores are read exactly into float32, the kernel accumulates and returns AP in
# float32, so against the reference run in float64 on the *same rounded scores* the AP agrees to
# float32 accumulation error (1e-5, as for float32). Gradients are returned in the input dtype: the
# float32 value is rounded once to half/bfloat16 (error <= 1/2 ulp, relative 2^-11 / 2^-8), so they
# are compared with rtol = eps(dtype) (one ulp, i.e. twice the rounding error) plus atol = 1e-5 for
# the float32 accumulation error of entries near 0.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("open_ends", [True, False], ids=["open", "closed"])
@pytest.mark.parametrize("num_bins,lo,hi,on_centres", GRIDS)
@pytest.mark.parametrize("form", ["matrix", "labels"])
def test_op_low_precision_matches_reference(device, dtype, open_ends, num_bins, lo, hi,
                                            on_centres, form):
    gen = torch.Generator().manual_seed(99)
    params = dict(num_bins=num_bins, lo=lo, hi=hi, open_ends=open_ends, exclude_diagonal=False)
    for batch, size in SHAPES + [(4, 40)]:
        scores = make_scores(batch, size, num_bins=num_bins, lo=lo, hi=hi, gen=gen,
                             on_centres=on_centres, dtype=dtype)
        targets = _relevance(form, make_targets(batch, size, gen=gen), gen)
        grad_ap = torch.randn(batch, generator=gen)
        ap, pos_hist, _, _, grad = _run(scores.to(device), to_device(targets, device),
                                        grad_ap=grad_ap.to(device), **params)
        ref_ap, ref_grad = reference_ap_and_grad(scores, targets, grad_ap, **params)
        assert ap.dtype == torch.float32 and pos_hist.dtype == torch.float32
        assert grad.dtype == dtype
        torch.testing.assert_close(ap.cpu().double(), ref_ap, equal_nan=True, atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(grad.cpu().double(), ref_grad, atol=1e-5,
                                   rtol=torch.finfo(dtype).eps)


def test_functional_average_precision_is_the_open_end_preset(device):
    gen = torch.Generator().manual_seed(5)
    scores = make_scores(5, 9, num_bins=5, gen=gen)
    y = make_targets(5, 9, gen=gen)
    s = scores.to(device).requires_grad_(True)
    ap = Fn.average_precision(s, y.to(device), num_bins=5, score_range=(0.0, 1.0))
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(ap, s, grad_outputs=g.to(device))
    ref_ap, ref_grad = reference_ap_and_grad(scores, y, g, num_bins=5, lo=0.0, hi=1.0)
    torch.testing.assert_close(ap.detach().cpu(), ref_ap, equal_nan=True, **TOL[torch.float64])
    torch.testing.assert_close(grad.cpu(), ref_grad, **TOL[torch.float64])
    # Default arguments are the published quantized-AP preset: 25 bins on (0, 1).
    torch.testing.assert_close(Fn.average_precision(s, y.to(device)).detach().cpu(),
                               R.average_precision(scores, y), equal_nan=True,
                               **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# Hand-computed values (M = 5 on (0, 1): Δ = 1/4, centres 1, .75, .5, .25, 0)
# ---------------------------------------------------------------------------------------------

def _ap(scores, targets, open_ends=True):
    s = torch.tensor([scores], dtype=torch.float64, requires_grad=True)
    ap, *_ = histogram_ap(s, torch.tensor([targets]), num_bins=5, lo=0.0, hi=1.0,
                          open_ends=open_ends)
    (grad,) = torch.autograd.grad(ap.sum(), s)
    return ap.item(), grad[0].tolist()


def test_hand_computed_values():
    # Ranking (+, -, +) on centres: (1 + 2/3)/2, the exact AP; derivatives 0 on centres.
    ap, grad = _ap([1.0, 0.75, 0.5], [1, 0, 1])
    assert ap == pytest.approx(5 / 6, abs=1e-15) and grad == [0.0, 0.0, 0.0]
    # A tie between a positive and a negative: precision 1/2.
    ap, grad = _ap([0.5, 0.5], [1, 0])
    assert ap == pytest.approx(0.5, abs=1e-15) and grad == [0.0, 0.0]
    # Positive at 0.65 (bins 1, 2 with weights a = .6, .4), negative at 0.375 (bins 2, 3 with
    # b = .5, .5): AP = a + (1 - a)/(1 + b) = 13/15 although the gap exceeds one bin width;
    # dAP/dp = 4b/(1 + b) = 4/3, dAP/dn = -4(1 - a)/(1 + b)^2 = -32/45.
    ap, grad = _ap([0.65, 0.375], [1, 0])
    assert ap == pytest.approx(13 / 15, abs=1e-14)
    assert grad == pytest.approx([4 / 3, -32 / 45], abs=1e-12)
    # Open ends saturate: far above/below the range is the same as on hi/lo, with no gradient.
    ap, grad = _ap([7.0, -3.0, 0.5], [0, 1, 1])
    # (negative in bin 0, positives in bins 2 and 4: (1/2 + 2/3)/2)
    assert ap == pytest.approx(7 / 12, abs=1e-15)
    assert grad == [0.0, 0.0, 0.0]
    # Closed ends: a positive at 1.1 keeps weight 0.6 in bin 0 and loses 0.4 off the axis, so
    # AP = 0.6·0.6/0.6 = 0.6 and dAP/dp = -1/Δ = -4 (FastAP's falling end triangle).
    ap, grad = _ap([1.1, 0.5], [1, 0], open_ends=False)
    assert ap == pytest.approx(0.6, abs=1e-14)
    assert grad == pytest.approx([-4.0, 0.0], abs=1e-12)
    # Closed ends, a score one Δ beyond hi touches no bin at all: AP 0, derivative 0 (the kink).
    ap, grad = _ap([1.25, 0.5], [1, 0], open_ends=False)
    assert ap == 0.0 and grad == [0.0, 0.0]
    # Extreme magnitudes: open ends saturate, closed ends drop the score.
    ap, grad = _ap([1e300, -1e300, 0.5], [0, 1, 1])
    assert ap == pytest.approx(7 / 12, abs=1e-15) and grad == [0.0, 0.0, 0.0]
    ap, grad = _ap([1e300, -1e300, 0.5], [1, 0, 1], open_ends=False)
    assert ap == pytest.approx(1 / 2, abs=1e-15) and grad == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
def test_extreme_finite_scores_low_precision(device, dtype):
    big = torch.finfo(dtype).max  # in float32, (hi - s)/Δ overflows to -inf
    s = torch.tensor([[big, -big, 0.5]], dtype=dtype, device=device, requires_grad=True)
    for open_ends, y, want in [(True, [0, 1, 1], 7 / 12), (False, [1, 0, 1], 1 / 2)]:
        ap, *_ = histogram_ap(s, torch.tensor([y], device=device), num_bins=5, lo=0.0, hi=1.0,
                              open_ends=open_ends)
        assert ap.item() == pytest.approx(want, abs=1e-6)
        (grad,) = torch.autograd.grad(ap.sum(), s)
        assert torch.all(grad == 0)


def test_rows_without_positive_are_nan_and_have_zero_gradient(device):
    s = torch.rand(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.zeros(3, 5, dtype=torch.bool, device=device)
    y[1, 2] = True
    ap = Fn.average_precision(s, y)
    assert torch.isnan(ap[0]) and torch.isnan(ap[2]) and not torch.isnan(ap[1])
    (grad,) = torch.autograd.grad(ap[1], s)
    assert torch.all(grad[[0, 2]] == 0)
    # The only positive on the diagonal, which is excluded: no positive left.
    eye = torch.eye(3, 5, dtype=torch.bool, device=device)
    ap = Fn.average_precision(s, eye, exclude_diagonal=True)
    assert torch.isnan(ap).all()
    ap = Fn.average_precision(s, eye)
    assert not torch.isnan(ap).any()


# ---------------------------------------------------------------------------------------------
# Relevance forms, dtypes and layouts
# ---------------------------------------------------------------------------------------------

TARGET_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16,
                 torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("tdtype", TARGET_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_target_dtypes(device, tdtype):
    gen = torch.Generator().manual_seed(3)
    scores = make_scores(4, 10, gen=gen)
    y = make_targets(4, 10, gen=gen)
    g = torch.randn(4, generator=gen, dtype=torch.float64)
    ap, *_, grad = _run(scores.to(device), y.to(device, tdtype), num_bins=5, lo=0.0, hi=1.0,
                        open_ends=True, exclude_diagonal=False, grad_ap=g.to(device))
    ref_ap, ref_grad = reference_ap_and_grad(scores, y, g, num_bins=5, lo=0.0, hi=1.0)
    torch.testing.assert_close(ap.detach().cpu(), ref_ap, equal_nan=True, **TOL[torch.float64])
    torch.testing.assert_close(grad.cpu(), ref_grad, **TOL[torch.float64])


@pytest.mark.parametrize("ldtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_label_pair_matches_matrix_reference(device, ldtype):
    gen = torch.Generator().manual_seed(4)
    scores = make_scores(5, 8, gen=gen)
    q = torch.randint(0, 3, (5,), generator=gen)
    d = torch.randint(0, 3, (8,), generator=gen)
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    ap, *_, grad = _run(scores.to(device), (q.to(device, ldtype), d.to(device, ldtype)),
                        num_bins=5, lo=0.0, hi=1.0, open_ends=True, exclude_diagonal=True,
                        grad_ap=g.to(device))
    # The oracle gets the explicit (B, N) matrix, not the labels.
    y = q.view(5, 1) == d.view(1, 8)
    ref_ap, ref_grad = reference_ap_and_grad(scores, y, g, num_bins=5, lo=0.0, hi=1.0,
                                             exclude_diagonal=True)
    torch.testing.assert_close(ap.detach().cpu(), ref_ap, equal_nan=True, **TOL[torch.float64])
    torch.testing.assert_close(grad.cpu(), ref_grad, **TOL[torch.float64])


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded_targets"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_non_contiguous_inputs(device, layout, dtype):
    gen = torch.Generator().manual_seed(6)
    batch, size = 4, 9
    scores = make_scores(batch, size, gen=gen).to(dtype)
    y = make_targets(batch, size, gen=gen)
    if layout == "transposed":
        s_in = scores.T.contiguous().to(device).T
        y_in = y.to(torch.uint8).T.contiguous().to(device).T
        assert not s_in.is_contiguous() and not y_in.is_contiguous()
    elif layout == "strided":
        big = torch.zeros(batch * 2, size * 3, dtype=dtype)
        big[::2, ::3] = scores
        s_in = big.to(device)[::2, ::3]
        bigy = torch.ones(batch, size * 2, dtype=torch.float32)  # non-0/1 junk between is fine
        bigy[:, ::2] = y.float()
        y_in = bigy.to(device)[:, ::2]
        assert not s_in.is_contiguous() and not y_in.is_contiguous()
    else:
        s_in = scores.to(device)
        y = y[1:2].expand(batch, size)
        y_in = y[:1].to(device).expand(batch, size)  # a copy to another device is contiguous
        assert y_in.stride(0) == 0
    g = torch.randn(batch, generator=gen, dtype=torch.float64).to(dtype)
    ap, *_, grad = _run(s_in, y_in, num_bins=5, lo=0.0, hi=1.0, open_ends=True,
                        exclude_diagonal=True, grad_ap=g.to(device))
    ref_ap, ref_grad = reference_ap_and_grad(scores, y, g, num_bins=5, lo=0.0, hi=1.0,
                                             exclude_diagonal=True)
    torch.testing.assert_close(ap.detach().cpu().double(), ref_ap, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(grad.cpu().double(), ref_grad, **TOL[dtype])
    assert grad.shape == (batch, size)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("form", ["matrix", "labels"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_long_rows_match_reference(device, layout, form, dtype):
    """Rows of 557 scores: the CPU kernels bin a row in chunks of 256, so this covers full and
    partial chunks, the excluded diagonal inside a later chunk and strided rows."""
    gen = torch.Generator().manual_seed(11)
    batch, size = 557, 557
    scores = make_scores(batch, size, num_bins=9, lo=-1.0, hi=1.0, gen=gen).to(dtype)
    targets = _relevance(form, make_targets(batch, size, gen=gen, p=0.05), gen)
    s_in = scores.to(device)
    if layout == "strided":
        big = torch.zeros(batch, size * 3, dtype=dtype, device=device)
        big[:, ::3] = s_in
        s_in = big[:, ::3]
    g = torch.randn(batch, generator=gen, dtype=torch.float64)
    ap, pos_hist, all_hist, num_pos, grad = _run(
        s_in, to_device(targets, device), num_bins=9, lo=-1.0, hi=1.0, open_ends=True,
        exclude_diagonal=True, grad_ap=g.to(device))
    ref_pos, ref_all, ref_npos = _reference_histograms(
        scores.double(), targets, num_bins=9, lo=-1.0, hi=1.0, open_ends=True,
        exclude_diagonal=True)
    ref_ap, ref_grad = reference_ap_and_grad(scores, targets, g, num_bins=9, lo=-1.0, hi=1.0,
                                             exclude_diagonal=True)
    # Histogram bins sum up to ~300 weights here: float32 is compared relative to the count.
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pos_hist.cpu().double(), ref_pos, **tol)
    torch.testing.assert_close(all_hist.cpu().double(), ref_all, **tol)
    torch.testing.assert_close(num_pos.cpu().double(), ref_npos, **TOL[torch.float64])
    torch.testing.assert_close(ap.detach().cpu().double(), ref_ap, equal_nan=True, **tol)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, **tol)


@pytest.mark.parametrize("column", [255, 256, 556])
def test_bad_entries_in_any_chunk_are_refused(device, column):
    """A non-finite score or a non-binary target anywhere in a long row raises, except a NaN on
    the excluded diagonal, which is not part of the ranking."""
    gen = torch.Generator().manual_seed(12)
    scores = torch.rand(557, 557, generator=gen).to(device)
    targets = (torch.rand(557, 557, generator=gen) < 0.1).float().to(device)
    row = 300
    kw = dict(num_bins=25, lo=0.0, hi=1.0, open_ends=True)
    bad_scores = scores.clone()
    bad_scores[row, column] = float("nan")
    with pytest.raises(ValueError, match=r"scores contains NaN or Inf"):
        histogram_ap(bad_scores, targets, **kw)
    bad_targets = targets.clone()
    bad_targets[row, column] = 0.5
    with pytest.raises(ValueError, match=r"targets must contain only 0 and 1"):
        histogram_ap(scores, bad_targets, **kw)
    on_diagonal = scores.clone()
    on_diagonal[column, column] = float("nan")
    ap, *_ = histogram_ap(on_diagonal, targets, **kw, exclude_diagonal=True)
    expected, *_ = histogram_ap(scores, targets, **kw, exclude_diagonal=True)
    torch.testing.assert_close(ap, expected, rtol=0, atol=0, equal_nan=True)


def test_non_contiguous_labels(device):
    gen = torch.Generator().manual_seed(7)
    scores = make_scores(3, 6, gen=gen)
    q = torch.randint(0, 2, (6,), generator=gen)
    d = torch.randint(0, 2, (12,), generator=gen)
    ap = Fn.average_precision(scores.to(device), (q.to(device)[::2], d.to(device)[::2]),
                              num_bins=5)
    ref = R.average_precision(scores, (q[::2], d[::2]), 5)
    torch.testing.assert_close(ap.cpu(), ref, equal_nan=True, **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# autograd.gradcheck and opcheck
# ---------------------------------------------------------------------------------------------

def _off_kink_scores(batch, size, num_bins, lo, hi, gen):
    """Scores at least 0.1Δ from every bin centre and from lo/hi (gradcheck's eps is 1e-6)."""
    delta = (hi - lo) / (num_bins - 1)
    k = torch.randint(-1, num_bins, (batch, size), generator=gen).double()
    u = 0.1 + 0.8 * torch.rand(batch, size, generator=gen, dtype=torch.float64)
    return hi - (k + u) * delta  # k = -1 puts some scores above hi, k = M - 1 below lo


@pytest.mark.parametrize("open_ends", [True, False], ids=["open", "closed"])
def test_gradcheck_op(open_ends):
    gen = torch.Generator().manual_seed(8)
    s = _off_kink_scores(4, 7, 6, -0.5, 1.5, gen).requires_grad_(True)
    y = make_targets(4, 7, gen=gen)
    y[:, 6] = True  # every row needs a positive off the diagonal: NaN has no derivative

    def f(x):
        return histogram_ap(x, y, num_bins=6, lo=-0.5, hi=1.5, open_ends=open_ends,
                            exclude_diagonal=True)[0]

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7)


def test_gradcheck_average_precision():
    gen = torch.Generator().manual_seed(9)
    s = _off_kink_scores(3, 8, 25, 0.0, 1.0, gen).requires_grad_(True)
    q = torch.tensor([0, 1, 2])
    d = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    assert torch.autograd.gradcheck(lambda x: Fn.average_precision(x, (q, d)), (s,),
                                    eps=1e-6, atol=1e-7)


def _opcheck_cases(device):
    # Every row has a positive: opcheck compares eager and traced outputs without equal_nan.
    gen = torch.Generator().manual_seed(10)
    cases = []
    for dtype in (torch.float64, torch.float32, torch.float16):
        s = make_scores(3, 6, gen=gen).to(device, dtype)
        y = make_targets(3, 6, gen=gen)
        y[:, 5] = True
        y = y.to(device)
        q = torch.tensor([0, 1, 2], device=device)
        d = torch.tensor([0, 1, 1, 0, 2, 2], device=device)
        for open_ends in (True, False):
            cases.append((s, y, None, None, 5, 0.0, 1.0, open_ends, False))
            cases.append((s, None, q, d, 5, 0.0, 1.0, open_ends, True))
    return cases


_OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor",
                  "test_aot_dispatch_dynamic")


def test_opcheck_histogram_ap(device):
    for args in _opcheck_cases(device):
        s = args[0].detach().requires_grad_(args[0].dtype != torch.float16)
        torch.library.opcheck(torch.ops.fastap.histogram_ap.default, (s,) + args[1:],
                              test_utils=_OPCHECK_TESTS)


def test_opcheck_histogram_ap_backward(device):
    for args in _opcheck_cases(device):
        ap, pos_hist, all_hist, num_pos = torch.ops.fastap.histogram_ap(*args)
        grad_ap = torch.randn_like(ap)
        bwd_args = (grad_ap, args[0], args[1], args[2], args[3], pos_hist, all_hist, num_pos,
                    *args[4:])
        torch.library.opcheck(torch.ops.fastap.histogram_ap_backward.default, bwd_args,
                              test_utils=_OPCHECK_TESTS)
        out = torch.ops.fastap.histogram_ap_backward(*bwd_args)
        assert out.dtype == args[0].dtype and out.shape == args[0].shape


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ---------------------------------------------------------------------------------------------

# Scores are multiples of 2^-12 in [-0.5, 1.5]: exact in float64 and in (hi - s)·(M - 1), so on
# the dyadic grids (M - 1 a power of 2) a score is either exactly on a centre or at least 2^-12
# away; arbitrary floats would put scores within an ulp of a centre, where the side of the kink the
# kernel and the reference land on is decided by rounding. A small pool makes ties and exact
# centres frequent. M = 25 (Δ = 1/24) is kept off its centres (see nudge_off_centres).
_score = st.one_of(st.sampled_from([-0.5, 0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5]),
                   st.integers(-2048, 6144).map(lambda m: m / 4096))


@st.composite
def _problems(draw, max_b=4, max_n=9):
    batch = draw(st.integers(1, max_b))
    size = draw(st.integers(1, max_n))
    s = draw(st.lists(_score, min_size=batch * size, max_size=batch * size))
    y = draw(st.lists(st.booleans(), min_size=batch * size, max_size=batch * size))
    num_bins = draw(st.sampled_from([2, 3, 5, 9, 17, 25]))
    open_ends = draw(st.booleans())
    s = torch.tensor(s, dtype=torch.float64).view(batch, size)
    if num_bins == 25:
        s = nudge_off_centres(s, num_bins, 0.0, 1.0)
    return s, torch.tensor(y).view(batch, size), num_bins, open_ends


@settings(max_examples=60, deadline=None)
@given(_problems())
def test_property_matches_reference(problem):
    s, y, num_bins, open_ends = problem
    g = torch.linspace(-1, 1, s.shape[0], dtype=torch.float64)
    params = dict(num_bins=num_bins, lo=0.0, hi=1.0, open_ends=open_ends, exclude_diagonal=False)
    ap, *_, grad = _run(s, y, grad_ap=g, **params)
    ref_ap, ref_grad = reference_ap_and_grad(s, y, g, **params)
    torch.testing.assert_close(ap.detach(), ref_ap, equal_nan=True, **TOL[torch.float64])
    torch.testing.assert_close(grad, ref_grad, **TOL[torch.float64])


@settings(max_examples=60, deadline=None)
@given(_problems())
def test_property_ap_in_unit_interval_and_nan_iff_no_positive(problem):
    s, y, num_bins, open_ends = problem
    ap, *_ = histogram_ap(s, y, num_bins=num_bins, lo=0.0, hi=1.0, open_ends=open_ends)
    has_pos = y.any(dim=1)
    assert torch.equal(torch.isnan(ap), ~has_pos)
    a = ap[has_pos]
    assert torch.all(a >= 0) and torch.all(a <= 1 + 1e-12)
    if open_ends:
        # Every positive has unit weight somewhere, so its own bin has precision > 0.
        assert torch.all(a > 0)


@settings(max_examples=40, deadline=None)
@given(_problems(max_b=3, max_n=8), st.randoms(use_true_random=False))
def test_property_column_permutation_invariance(problem, rnd):
    s, y, num_bins, open_ends = problem
    perm = list(range(s.shape[1]))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    sp = s.requires_grad_(True)
    ap, *_ = histogram_ap(sp, y, num_bins=num_bins, lo=0.0, hi=1.0, open_ends=open_ends)
    ap_p, *_ = histogram_ap(sp[:, perm], y[:, perm], num_bins=num_bins, lo=0.0, hi=1.0,
                            open_ends=open_ends)
    torch.testing.assert_close(ap_p, ap, equal_nan=True, atol=1e-12, rtol=1e-12)
    ok = ~torch.isnan(ap)
    if ok.any():
        (g1,) = torch.autograd.grad(ap[ok].sum(), sp)
        (g2,) = torch.autograd.grad(ap_p[ok].sum(), sp)
        torch.testing.assert_close(g2, g1, atol=1e-10, rtol=1e-10)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 25), st.integers(1, 6), st.integers(1, 6), st.booleans(),
       st.data())
def test_property_separated_positives_give_ap_one(num_bins, n_pos, n_neg, open_ends, data):
    """Positives and negatives never share a bin when every positive outranks every negative by
    at least 2Δ (one Δ is not enough: see test_hand_computed_values, 13/15), so AP = 1.

    With closed ends the positives must also keep their full weight, i.e. stay inside [lo, hi].
    """
    lo, hi = -1.0, 1.0
    delta = (hi - lo) / (num_bins - 1)
    top = hi + (0.5 if open_ends else 0.0)
    # The negatives' ceiling c and the positives' floor: 2Δ above c, measured on the axis where
    # scores beyond the range count as lo / hi (open) or lose weight (closed).
    if hi - 2 * delta < lo - 0.5:
        return
    c = data.draw(st.floats(lo - 0.5, hi - 2 * delta), label="c")
    floor = max(c, lo) + 2 * delta
    pos = data.draw(st.lists(st.floats(floor, top), min_size=n_pos, max_size=n_pos), label="pos")
    neg = data.draw(st.lists(st.floats(lo - 0.5, c), min_size=n_neg, max_size=n_neg),
                    label="neg")
    s = torch.tensor([pos + neg], dtype=torch.float64)
    y = torch.tensor([[True] * n_pos + [False] * n_neg])
    ap, *_ = histogram_ap(s, y, num_bins=num_bins, lo=lo, hi=hi, open_ends=open_ends)
    assert ap.item() == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Determinism and devices
# ---------------------------------------------------------------------------------------------

def test_cpu_result_independent_of_thread_count():
    # B·N = 64k scores: the kernel's row grain (32768 / N rows) splits the batch into 2 tasks.
    gen = torch.Generator().manual_seed(11)
    batch, size = 2048, 32
    s = make_scores(batch, size, gen=gen, num_bins=25, on_centres=False, dtype=torch.float32)
    y = make_targets(batch, size, gen=gen, p=0.2)
    g = torch.randn(batch, generator=gen)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            x = s.clone().requires_grad_(True)
            ap, pos_hist, all_hist, num_pos = histogram_ap(x, y, num_bins=25, lo=0.0, hi=1.0,
                                                           open_ends=True)
            (grad,) = torch.autograd.grad(ap, x, grad_outputs=g)
            results.append((ap.detach(), pos_hist, all_hist, num_pos, grad))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b, a, atol=0, rtol=0, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("open_ends", [True, False], ids=["open", "closed"])
def test_cuda_matches_cpu_kernel(dtype, open_ends):
    gen = torch.Generator().manual_seed(12)
    params = dict(num_bins=25, lo=0.0, hi=1.0, open_ends=open_ends, exclude_diagonal=True)
    for batch, size in [(1, 1), (7, 30), (64, 1000), (3, 5000)]:
        s = make_scores(batch, size, gen=gen, num_bins=25, on_centres=False, dtype=dtype)
        y = make_targets(batch, size, gen=gen)
        g = torch.randn(batch, generator=gen)
        cpu = _run(s, y, grad_ap=g.to(s.dtype if dtype == torch.float64 else torch.float32),
                   **params)
        gpu = _run(s.cuda(), y.cuda(),
                   grad_ap=g.cuda().to(s.dtype if dtype == torch.float64 else torch.float32),
                   **params)
        tol = (dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64
               else dict(atol=1e-4, rtol=1e-4))  # float32 sums of up to 5000 weights
        names = ("ap", "pos_hist", "all_hist", "num_pos")
        for name, a, b in zip(names, cpu[:4], gpu[:4]):
            torch.testing.assert_close(b.cpu(), a, equal_nan=True, msg=name, **tol)
        grad_tol = tol if dtype in (torch.float64, torch.float32) else dict(
            atol=1e-4, rtol=torch.finfo(dtype).eps)
        torch.testing.assert_close(gpu[4].cpu().double(), cpu[4].double(), **grad_tol)


def test_fake_matches_real_shapes_and_dtypes():
    """The fake implementation reports the shapes and accumulation dtypes of the real op."""
    for dtype, acc in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                       (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]:
        s = torch.empty(3, 8, dtype=dtype, device="meta")
        y = torch.empty(3, 8, dtype=torch.bool, device="meta")
        outs = torch.ops.fastap.histogram_ap(s, y, None, None, 7, 0.0, 1.0, True, False)
        real = torch.ops.fastap.histogram_ap(torch.rand(3, 8, dtype=dtype),
                                             torch.ones(3, 8, dtype=torch.bool), None, None, 7,
                                             0.0, 1.0, True, False)
        for o, r in zip(outs, real):
            assert o.shape == r.shape and o.dtype == r.dtype == acc
    assert math.isfinite(real[0].sum().item())
