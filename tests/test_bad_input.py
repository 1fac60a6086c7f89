"""User errors: each raises the documented exception type with a message naming the argument."""

from __future__ import annotations

import pytest
import torch

import fastap
import fastap.reference as R
from fastap import functional as Fn

NAN, INF = float("nan"), float("inf")


def _scores(device, batch=3, size=4, dtype=torch.float32):
    return torch.rand(batch, size, device=device, dtype=dtype)


def _targets(device, batch=3, size=4):
    y = torch.zeros(batch, size, dtype=torch.bool, device=device)
    y[:, :1] = True
    return y


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------

def test_targets_shape_mismatch(device):
    s = _scores(device)
    for bad in (_targets(device)[:, :3], _targets(device)[:2], _targets(device, 4, 3),
                _targets(device)[0]):
        with pytest.raises(ValueError, match=r"targets must have the shape of scores"):
            Fn.average_precision(s, bad)
        with pytest.raises(ValueError, match=r"targets must have the shape of scores"):
            Fn.ap_loss(s, bad)


@pytest.mark.parametrize("shape", [(4,), (1, 3, 4), (), (2, 2, 2, 2)])
def test_scores_wrong_number_of_dimensions(device, shape):
    s = torch.rand(shape, device=device)
    y = torch.zeros(shape, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match=r"scores must be a 2-D \(B, N\) tensor"):
        Fn.average_precision(s, y)
    with pytest.raises(ValueError, match=r"scores must be a 2-D \(B, N\) tensor"):
        Fn.ap_loss(s, y)


def test_labels_wrong_length_or_dimensions(device):
    s = _scores(device)
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    with pytest.raises(ValueError, match=r"query_labels must have shape \(3,\)"):
        Fn.average_precision(s, (ar(2), ar(4)))
    with pytest.raises(ValueError, match=r"query_labels must have shape \(3,\)"):
        Fn.average_precision(s, (ar(3).view(3, 1), ar(4)))
    with pytest.raises(ValueError, match=r"database_labels must have shape \(4,\)"):
        Fn.average_precision(s, (ar(3), ar(5)))
    with pytest.raises(ValueError, match=r"database_labels must have shape \(4,\)"):
        Fn.ap_loss(s, (ar(3), ar(4).view(2, 2)))


def test_embedding_losses_bad_shapes(device):
    e = torch.randn(4, 3, device=device)
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    for crit in (fastap.APLoss(), fastap.FastAPLoss()):
        with pytest.raises(ValueError, match=r"labels must be \(4,\) to match embeddings"):
            crit(e, ar(3))
        with pytest.raises(ValueError, match=r"labels must be \(4,\) to match embeddings"):
            crit(e, ar(4).view(2, 2))
        with pytest.raises(ValueError, match=r"embeddings must be \(B, D\)"):
            crit(e[0], ar(4))
        with pytest.raises(ValueError, match=r"embeddings must be \(B, D\)"):
            crit(e.view(1, 4, 3), ar(4))
        with pytest.raises(ValueError, match=r"ref_labels must be \(5,\) to match ref_emb"):
            crit(e, ar(4), torch.randn(5, 3, device=device), ar(4))
        with pytest.raises(ValueError, match=r"ref_emb must be \(N, 3\)"):
            crit(e, ar(4), torch.randn(5, 2, device=device), ar(5))
        with pytest.raises(ValueError, match=r"ref_emb must be \(\w, \w\), got shape \(5,\)"):
            crit(e, ar(4), torch.randn(5, device=device), ar(5))


def test_ref_emb_without_ref_labels(device):
    e = torch.randn(4, 3, device=device)
    labels = torch.arange(4, device=device)
    for crit in (fastap.APLoss(), fastap.FastAPLoss()):
        with pytest.raises(ValueError, match=r"ref_emb and ref_labels must be given together"):
            crit(e, labels, ref_emb=torch.randn(5, 3, device=device))
        with pytest.raises(ValueError, match=r"ref_emb and ref_labels must be given together"):
            crit(e, labels, ref_labels=torch.arange(5, device=device))


def test_empty_batch_and_empty_database(device):
    with pytest.raises(ValueError, match=r"scores is an empty batch \(B = 0 rows\)"):
        Fn.average_precision(_scores(device, 0, 4), _targets(device, 0, 4))
    with pytest.raises(ValueError, match=r"scores is an empty batch \(B = 0 rows\)"):
        Fn.ap_loss(_scores(device, 0, 4), (torch.arange(0, device=device),
                                           torch.arange(4, device=device)))
    with pytest.raises(ValueError, match=r"scores has no database items \(N = 0 columns\)"):
        Fn.average_precision(_scores(device, 3, 0), _targets(device, 3, 0))
    with pytest.raises(ValueError, match=r"embeddings is empty"):
        fastap.APLoss()(torch.randn(0, 3, device=device), torch.arange(0, device=device))
    with pytest.raises(ValueError, match=r"ref_emb is empty"):
        fastap.FastAPLoss()(torch.randn(2, 3, device=device), torch.arange(2, device=device),
                            torch.randn(0, 3, device=device), torch.arange(0, device=device))
    with pytest.raises(ValueError, match=r"database is empty"):
        Fn.ap_loss_from_embeddings(torch.randn(2, 3, device=device), torch.randn(0, 3, device=device),
                                   torch.arange(2, device=device), torch.arange(0, device=device))


def test_exclude_diagonal_needs_square_or_wide(device):
    with pytest.raises(ValueError, match=r"exclude_diagonal needs B <= N"):
        Fn.average_precision(_scores(device, 5, 4), _targets(device, 5, 4),
                             exclude_diagonal=True)


@pytest.mark.parametrize("fused", [False, True])
def test_exclude_self_needs_the_queries_in_ref_emb(device, fused):
    e, r = torch.randn(5, 3, device=device), torch.randn(4, 3, device=device)
    labels = torch.arange(5, device=device) % 2
    with pytest.raises(ValueError, match=r"exclude_self=True .* ref_emb has 4 rows for B = 5"):
        fastap.APLoss(fused=fused)(e, labels, r, labels[:4], exclude_self=True)


def test_include_batch_needs_a_memory_and_excludes_self(device):
    e, labels = torch.randn(5, 3, device=device), torch.arange(5, device=device) % 2
    with pytest.raises(ValueError, match=r"include_batch=True .* no ref_emb was given"):
        fastap.APLoss()(e, labels, include_batch=True)
    with pytest.raises(ValueError, match=r"exclude_self=False contradicts it"):
        fastap.FastAPLoss()(e, labels, e[:2], labels[:2], include_batch=True, exclude_self=False)


@pytest.mark.parametrize("bad", [-1.0, NAN, INF])
def test_weights_negative_or_not_finite(device, bad):
    # A negative total weight once read as "no valid row" and gave a silent zero loss.
    for weights in (torch.full((3,), bad, device=device), torch.tensor([1.0, bad, 0.0], device=device)):
        with pytest.raises(ValueError, match=r"weights must be finite and non-negative"):
            Fn.ap_loss(_scores(device), _targets(device), weights=weights)


def test_weights_wrong_shape(device):
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\) \(one per row\)"):
        Fn.ap_loss(_scores(device), _targets(device), weights=torch.ones(4, device=device))
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
        Fn.ap_loss(_scores(device), _targets(device), weights=torch.ones(3, 1, device=device))


# ---------------------------------------------------------------------------------------------
# Types and values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64], ids=str)
def test_non_floating_scores(device, dtype):
    s = (torch.rand(3, 4, device=device) * 2).to(dtype)
    with pytest.raises(TypeError, match=r"scores must be float16, bfloat16, float32 or float64"):
        Fn.average_precision(s, _targets(device))


@pytest.mark.parametrize("bad", [2.0, 0.5, -1.0, NAN, INF])
@pytest.mark.parametrize("tdtype", [torch.float32, torch.float64, torch.float16])
def test_targets_not_binary(device, bad, tdtype):
    y = _targets(device).to(tdtype)
    y[1, 2] = bad
    with pytest.raises(ValueError, match=r"targets must contain only 0 and 1"):
        Fn.average_precision(_scores(device), y)
    with pytest.raises(ValueError, match=r"targets must contain only 0 and 1"):
        Fn.ap_loss(_scores(device), y)


@pytest.mark.parametrize("tdtype", [torch.int64, torch.uint8, torch.int8])
def test_integer_targets_not_binary(device, tdtype):
    y = _targets(device).to(tdtype)
    y[2, 3] = 2
    with pytest.raises(ValueError, match=r"targets must contain only 0 and 1"):
        Fn.average_precision(_scores(device), y)
    if tdtype is torch.int8:
        y[2, 3] = -1
        with pytest.raises(ValueError, match=r"targets must contain only 0 and 1"):
            Fn.average_precision(_scores(device), y)


def test_complex_targets(device):
    with pytest.raises(TypeError, match=r"targets must be a bool or 0/1 real tensor"):
        Fn.average_precision(_scores(device), _targets(device).to(torch.complex64))


def test_targets_of_wrong_kind():
    with pytest.raises(TypeError, match=r"targets must be a \(B, N\) tensor or a pair"):
        Fn.average_precision(_scores("cpu"), "labels")
    with pytest.raises(TypeError, match=r"targets must be a \(B, N\) tensor or a pair"):
        Fn.ap_loss(_scores("cpu"), (torch.arange(3),))


@pytest.mark.parametrize("num_bins", [1, 0, -3])
def test_num_bins_too_small(device, num_bins):
    s, y = _scores(device), _targets(device)
    msg = rf"num_bins must be at least 2, got {num_bins}"
    with pytest.raises(ValueError, match=msg):
        Fn.average_precision(s, y, num_bins=num_bins)
    with pytest.raises(ValueError, match=msg):
        Fn.ap_loss(s, y, num_bins=num_bins)
    with pytest.raises(ValueError, match=msg):
        fastap.APLoss(num_bins)(torch.randn(4, 3, device=device),
                                torch.tensor([0, 0, 1, 1], device=device))
    if num_bins < 1:  # FastAP's num_bins counts intervals: 1 interval = 2 bin centres is valid
        with pytest.raises(ValueError, match=rf"num_bins must be between 1 and 2\^24 - 1 "
                                             rf"\(FastAP .*\), got {num_bins}"):
            fastap.FastAPLoss(num_bins)(torch.randn(4, 3, device=device),
                                        torch.tensor([0, 0, 1, 1], device=device))


def test_num_bins_too_large(device):
    # Float32 bin positions past 2^24 would round to an index beyond the histograms.
    s, y = _scores(device), _targets(device)
    msg = r"num_bins must be at most 2\^24 = 16777216, got 16777217"
    with pytest.raises(ValueError, match=msg):
        Fn.average_precision(s, y, num_bins=2**24 + 1)
    # FastAP's num_bins counts intervals: 2^24 of them would be 2^24 + 1 bin centres.
    with pytest.raises(ValueError, match=r"between 1 and 2\^24 - 1 .*got 16777216"):
        fastap.FastAPLoss(2**24)


@pytest.mark.parametrize("num_bins", [2.7, 10.0, "25", None])
def test_num_bins_not_an_integer(num_bins):
    # int() would silently truncate 2.7 to 2 bins.
    s, y = _scores("cpu"), _targets("cpu")
    msg = r"num_bins must be an integer, got"
    with pytest.raises(TypeError, match=msg):
        Fn.ap_loss(s, y, num_bins=num_bins)
    with pytest.raises(TypeError, match=msg):
        fastap.APLoss(num_bins)
    with pytest.raises(TypeError, match=msg):
        fastap.FastAPLoss(num_bins)
    with pytest.raises(TypeError, match=msg):
        Fn.fastap_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), num_bins=num_bins)


@pytest.mark.parametrize("score_range", [(1.0, 1.0), (1.0, 0.0), (0.0, INF), (-INF, 0.0),
                                         (NAN, 1.0)])
def test_bad_score_range(device, score_range):
    s, y = _scores(device), _targets(device)
    with pytest.raises(ValueError, match=r"score_range must be finite with lo < hi"):
        Fn.average_precision(s, y, score_range=score_range)
    with pytest.raises(ValueError, match=r"score_range must be finite with lo < hi"):
        fastap.APLoss(score_range=score_range)(torch.randn(4, 3, device=device),
                                               torch.tensor([0, 0, 1, 1], device=device))


def test_malformed_score_range():
    for bad in ((0.0,), (0.0, 0.5, 1.0), 1.0, ("a", "b")):
        with pytest.raises(ValueError, match=r"score_range must be a pair \(lo, hi\)"):
            Fn.average_precision(_scores("cpu"), _targets("cpu"), score_range=bad)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
def test_non_finite_scores(device, bad, dtype):
    s = _scores(device, dtype=dtype)
    s[2, 1] = bad
    with pytest.raises(ValueError, match=r"scores contains NaN or Inf"):
        Fn.average_precision(s, _targets(device))
    with pytest.raises(ValueError, match=r"scores contains NaN or Inf"):
        Fn.ap_loss(s, (torch.arange(3, device=device), torch.arange(4, device=device)))


def test_embedding_losses_name_wrong_argument_types():
    e, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    for crit in (fastap.APLoss(), fastap.FastAPLoss()):
        # A pytorch-metric-learning loop passes a miner's indices_tuple third.
        indices_tuple = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 3]))
        with pytest.raises(TypeError, match=r"^ref_emb must be a tensor, got a tuple: .*"
                                            r"indices_tuple"):
            crit(e, labels, indices_tuple)
        with pytest.raises(TypeError, match=r"^embeddings must be a tensor, got list"):
            crit(e.tolist(), labels)
        with pytest.raises(TypeError, match=r"^labels must be a tensor, got list"):
            crit(e, labels.tolist())
    with pytest.raises(TypeError, match=r"^embeddings must be a tensor, got list"):
        fastap.CrossBatchMemory(fastap.APLoss(), 3, 8)(e.tolist(), labels)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
def test_finiteness_check_of_embeddings(dtype):
    """The embedding check sums instead of building isfinite temporaries; its answer must be
    torch.isfinite's, also where the sum of finite values overflows."""
    from fastap.functional import _all_finite

    big = torch.finfo(dtype).max
    cases = {"plain": torch.randn(6, 4, dtype=torch.float64).to(dtype),
             "overflowing sum": torch.full((6, 4), big, dtype=dtype),
             "nan": torch.tensor([[0.5, NAN], [1.0, 2.0]], dtype=dtype),
             "inf": torch.tensor([[0.5, INF], [1.0, 2.0]], dtype=dtype),
             "-inf": torch.tensor([[0.5, -INF], [1.0, 2.0]], dtype=dtype),
             "inf and -inf": torch.tensor([[INF, -INF], [1.0, 2.0]], dtype=dtype)}
    for name, x in cases.items():
        assert _all_finite(x) == bool(torch.isfinite(x).all()), name


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_embeddings(device, bad, fused):
    # Named as the user's argument, not as the kernels' "scores".
    e, r = torch.randn(4, 3, device=device), torch.randn(5, 3, device=device)
    labels, ref_labels = torch.tensor([0, 0, 1, 1], device=device), torch.arange(5, device=device)
    for crit in (fastap.APLoss(fused=fused), fastap.FastAPLoss(fused=fused)):
        bad_e = e.clone()
        bad_e[1, 1] = bad
        with pytest.raises(ValueError, match=r"^embeddings contains NaN or Inf"):
            crit(bad_e, labels)
        bad_r = r.clone()
        bad_r[4, 0] = bad
        with pytest.raises(ValueError, match=r"^ref_emb contains NaN or Inf"):
            crit(e, labels, bad_r, ref_labels)
    with pytest.raises(ValueError, match=r"^database contains NaN or Inf"):
        Fn.ap_loss_from_embeddings(e, bad_r, labels, ref_labels)


# ---------------------------------------------------------------------------------------------
# The raw op: relevance forms, label dtypes, devices
# ---------------------------------------------------------------------------------------------

def _op(s, targets=None, q=None, d=None):
    return torch.ops.fastap.histogram_ap(s, targets, q, d, 5, 0.0, 1.0, True, False)


def test_op_relevance_both_or_neither(device):
    s, y = _scores(device), _targets(device)
    q, d = torch.arange(3, device=device), torch.arange(4, device=device)
    msg = r"give relevance either as targets \(B, N\) or as query_labels"
    with pytest.raises(ValueError, match=msg):
        _op(s)
    with pytest.raises(ValueError, match=msg):
        _op(s, y, q, d)
    with pytest.raises(ValueError, match=msg):
        _op(s, y, q)
    with pytest.raises(ValueError, match=r"query_labels and database_labels must be given "
                                         r"together"):
        _op(s, None, q)


def test_op_label_dtype(device):
    s = _scores(device)
    with pytest.raises(TypeError, match=r"query_labels must be int64, got Int"):
        _op(s, None, torch.arange(3, device=device, dtype=torch.int32),
            torch.arange(4, device=device))
    with pytest.raises(TypeError, match=r"database_labels must be int64, got Float"):
        _op(s, None, torch.arange(3, device=device), torch.arange(4, device=device).float())


def test_backward_op_bad_histograms(device):
    s, y = _scores(device), _targets(device)
    ap, pos_hist, all_hist, num_pos = _op(s, y)
    msg = r"pos_hist and all_hist must be \(B, num_bins\) = \(3, 5\) and grad_ap, num_pos \(B,\)"
    with pytest.raises(ValueError, match=msg):
        torch.ops.fastap.histogram_ap_backward(torch.ones_like(ap), s, y, None, None,
                                               pos_hist[:, :4], all_hist, num_pos, 5, 0.0, 1.0,
                                               True, False)
    with pytest.raises(ValueError, match=msg):
        torch.ops.fastap.histogram_ap_backward(torch.ones(2, device=device), s, y, None, None,
                                               pos_hist, all_hist, num_pos, 5, 0.0, 1.0,
                                               True, False)


_NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="device mismatch needs a CUDA device "
                                        "(torch.cuda.is_available() is False)")


@pytest.mark.cuda
@_NEEDS_CUDA
def test_device_mismatch():
    s, y = _scores("cpu"), _targets("cpu")
    q, d = torch.arange(3), torch.arange(4)
    msg = r"(targets|query_labels|database_labels) is on .* but (the )?scores (is|are) on"
    with pytest.raises(RuntimeError, match=msg):
        Fn.average_precision(s, y.cuda())
    with pytest.raises(RuntimeError, match=msg):
        Fn.average_precision(s.cuda(), y)
    with pytest.raises(RuntimeError, match=msg):
        Fn.average_precision(s.cuda(), (q, d.cuda()))
    with pytest.raises(RuntimeError, match=msg):
        Fn.average_precision(s, (q.cuda(), d))
    with pytest.raises(RuntimeError, match=r"^labels is on cpu but embeddings is on cuda"):
        fastap.APLoss()(torch.randn(4, 3, device="cuda"), torch.tensor([0, 0, 1, 1]))


def test_device_mismatch_with_meta_targets():
    # CPU scores with meta targets dispatch to the fake (Meta) kernel, which must still refuse
    # the mix instead of returning uninitialised CPU tensors.
    s = _scores("cpu")
    y = _targets("cpu").to("meta")
    with pytest.raises(RuntimeError, match="targets is on meta but the scores are on cpu"):
        Fn.average_precision(s, y)


def test_float_labels_are_refused():
    s = _scores("cpu")
    labels = torch.tensor([0.5, 1.0, 0.0])[: s.shape[0]]
    with pytest.raises(TypeError, match="query_labels must be integer class ids"):
        Fn.average_precision(s, (labels, torch.zeros(s.shape[1], dtype=torch.long)))


# ---------------------------------------------------------------------------------------------
# Scale: the losses normalise, so the same directions give the same loss
# ---------------------------------------------------------------------------------------------

def _directions(device, batch=6, dim=5):
    e = torch.randn(batch, dim, dtype=torch.float64, device=device)
    return e, torch.tensor([0, 0, 1, 1, 2, 2], device=device)[:batch]


def _reference(kind, embeddings, labels):
    """The dense float64 oracle's loss and gradient (where the scaled values do not overflow)."""
    x = embeddings.detach().double().requires_grad_()
    fn = R.embedding_ap_loss if kind == "ap" else R.fastap_loss
    loss = fn(x, labels)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["ap", "fastap"])
@pytest.mark.parametrize("case", ["float32 x 1e20", "float32 x 1e-30", "float64 x 1e300",
                                  "float64 x 1e-300", "float16 norm > 65504",
                                  "bfloat16 x 1e37"])
def test_scaled_embeddings_give_the_loss_of_their_directions(device, fused, kind, case):
    # The norm once overflowed (or underflowed) and the loss was that of all-zero embeddings
    # with a zero gradient. The oracle: the float64 reference on the same (rounded) values.
    e, labels = _directions(device)
    dtype, factor = {"float32 x 1e20": (torch.float32, 1e20),
                     "float32 x 1e-30": (torch.float32, 1e-30),
                     "float64 x 1e300": (torch.float64, 1e300),
                     "float64 x 1e-300": (torch.float64, 1e-300),
                     "float16 norm > 65504": (torch.float16, 6e4 / float(e.abs().max())),
                     "bfloat16 x 1e37": (torch.bfloat16, 1e37)}[case]
    x = (e * factor).to(dtype).requires_grad_()
    crit = (fastap.APLoss if kind == "ap" else fastap.FastAPLoss)(fused=fused)
    loss = crit(x, labels)
    loss.backward()
    # The oracle in float64 on the directions of the values passed (float64 overflows too at
    # 1e300, so the rounded rows are rescaled first; the loss does not depend on the scale).
    rows = x.detach().double()
    unit = rows / rows.abs().amax(dim=1, keepdim=True)
    ref_loss, ref_grad = _reference(kind, unit, labels)
    tol = 1e-6 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 3e-3)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=tol)
    # d loss/d x = (d loss/d unit) / scale of the row: compare in the oracle's units.
    scale = rows.abs().amax(dim=1, keepdim=True)
    grad = x.grad.double() * scale
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=30 * tol * float(ref_grad.abs().max()))


@pytest.mark.parametrize("fused", [False, True])
def test_memory_bank_scaled_like_the_batch(device, fused):
    # CrossBatchMemory's path normalises the memory into the database rows in place.
    e, labels = _directions(device)
    e = e.float()
    crit = fastap.APLoss(fused=fused)
    plain = crit(e[:3], labels[:3], e[3:], labels[3:], include_batch=True)
    scaled = crit(e[:3] * 1e20, labels[:3], e[3:] * 1e20, labels[3:], include_batch=True)
    torch.testing.assert_close(scaled, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-40, 1e-45, 1e38, 3.0])
def test_weights_of_any_scale_are_their_ratios(device, scale):
    # A clamp of the total to float32's smallest normal number once gave 1e-40 weights another
    # loss than uniform ones, and 1e38 weights overflowed their sum.
    s, y = _scores(device, 5, 7), _targets(device, 5, 7)
    y[:, 3] = True
    y[4] = False  # a row without positives, whose weight does not count
    # The row without positives weighs most: the scale is the largest weight that counts.
    ratios = torch.tensor([1.0, 2.0, 0.0, 3.0, 1e30 if scale < 1 else 3.3], device=device)
    weights = (ratios * scale).float() if scale != 1e-45 else torch.full((5,), scale,
                                                                         device=device)
    loss = Fn.ap_loss(s, y, weights=weights)
    # The oracle: the dense reference with the same weights made O(1) (exact float64 ratios).
    exact = weights.double() / weights.double().max()
    ref = R.ap_loss(s.double(), y, weights=exact)
    torch.testing.assert_close(loss.double(), ref, rtol=0, atol=1e-6)
    uniform = Fn.ap_loss(s, y, weights=torch.full((5,), 1e-40, device=device))
    torch.testing.assert_close(uniform.double(), R.ap_loss(s.double(), y), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Messages that name the argument
# ---------------------------------------------------------------------------------------------

_NOT_FLOAT = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]


@pytest.mark.parametrize("dtype", _NOT_FLOAT, ids=str)
def test_embeddings_of_a_non_float_dtype(device, dtype):
    good, labels = torch.randn(4, 3, device=device), torch.tensor([0, 0, 1, 1], device=device)
    bad = torch.ones(4, 3, device=device).to(dtype)
    msg = r"must be a float16, bfloat16, float32 or float64 tensor, got " + str(dtype)
    for crit in (fastap.APLoss(), fastap.FastAPLoss()):
        with pytest.raises(TypeError, match="^embeddings " + msg):
            crit(bad, labels)
        with pytest.raises(TypeError, match="^ref_emb " + msg):
            crit(good, labels, bad, labels)
    with pytest.raises(TypeError, match="^queries " + msg):
        Fn.ap_loss_from_embeddings(bad, good, labels, labels)
    with pytest.raises(TypeError, match="^database " + msg):
        Fn.ap_loss_from_embeddings(good, bad, labels, labels)
    with pytest.raises(TypeError, match="^embeddings " + msg):
        fastap.CrossBatchMemory(fastap.APLoss(), 3, 8).to(device)(bad, labels)


def test_embeddings_without_columns():
    with pytest.raises(ValueError, match=r"^embeddings must have at least one column \(D >= 1\), "
                                         r"got shape \(4, 0\)"):
        fastap.APLoss()(torch.zeros(4, 0), torch.tensor([0, 0, 1, 1]))


def test_float_labels_named_as_passed(device):
    e, labels = torch.randn(4, 3, device=device), torch.tensor([0, 0, 1, 1], device=device)
    for crit in (fastap.APLoss(), fastap.FastAPLoss()):
        with pytest.raises(TypeError, match="^ref_labels must be integer class ids, got "
                                            "torch.float32"):
            crit(e, labels, e, labels.float())
        with pytest.raises(TypeError, match="^labels must be integer class ids, got "
                                            "torch.float64"):
            crit(e, labels.double())
    with pytest.raises(TypeError, match="^database_labels must be integer class ids"):
        Fn.ap_loss_from_embeddings(e, e, labels, labels.float())


def test_labels_on_another_device():
    e, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="^labels is on meta but embeddings is on cpu"):
        fastap.APLoss()(e, labels.to("meta"))
    with pytest.raises(RuntimeError, match="^ref_labels is on meta but ref_emb is on cpu"):
        fastap.FastAPLoss()(e, labels, e, labels.to("meta"))
    with pytest.raises(RuntimeError, match="^ref_emb is on meta but embeddings is on cpu"):
        fastap.FastAPLoss()(e, labels, e.to("meta"), labels.to("meta"))


@pytest.mark.parametrize("fused", [False, True])
def test_meta_tensors_give_a_meta_loss(fused):
    # Shape propagation: no values to check, and no host sync to fail on.
    e, labels = torch.randn(4, 3, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    for crit in (fastap.APLoss(fused=fused), fastap.FastAPLoss(fused=fused)):
        loss = crit(e, labels)
        assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
    loss = Fn.ap_loss(torch.rand(3, 4, device="meta"), _targets("meta"),
                      weights=torch.ones(3, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.parametrize("score_range", ["ab", "01", None, 1.0, (0.0,), ("a", "b")])
def test_score_range_not_a_pair_of_numbers(score_range):
    msg = r"^score_range must be a pair \(lo, hi\) of numbers, got "
    with pytest.raises(ValueError, match=msg):
        fastap.APLoss(score_range=score_range)
    with pytest.raises(ValueError, match=msg):
        Fn.ap_loss(_scores("cpu"), _targets("cpu"), score_range=score_range)


def test_score_range_refused_at_construction():
    with pytest.raises(ValueError, match=r"^score_range must be finite with lo < hi, got "
                                         r"\(1.0, 0.0\)"):
        fastap.APLoss(score_range=(1.0, 0.0))


@pytest.mark.parametrize("value", [2.5, "8", None, True])
def test_cross_batch_memory_sizes_not_integers(value):
    for name, args in (("embedding_size", (value, 8)), ("memory_size", (3, value))):
        with pytest.raises(TypeError, match=rf"^{name} must be an integer, got {value!r}"):
            fastap.CrossBatchMemory(fastap.APLoss(), *args)


@pytest.mark.parametrize("value", [0, -1])
def test_cross_batch_memory_sizes_too_small(value):
    with pytest.raises(ValueError, match=rf"^embedding_size must be at least 1, got {value}"):
        fastap.CrossBatchMemory(fastap.APLoss(), value, 8)
    with pytest.raises(ValueError, match=rf"^memory_size must be at least 1, got {value}"):
        fastap.CrossBatchMemory(fastap.APLoss(), 3, value)


def test_weights_not_a_tensor():
    s, y = _scores("cpu"), _targets("cpu")
    with pytest.raises(TypeError, match=r"^weights must be a \(3,\) tensor, got list"):
        Fn.ap_loss(s, y, weights=[1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match=r"^weights must be real, got torch.complex64"):
        Fn.ap_loss(s, y, weights=torch.ones(3, dtype=torch.complex64))


def test_num_bins_bool():
    with pytest.raises(TypeError, match=r"^num_bins must be an integer, got True"):
        fastap.APLoss(True)


def test_indices_tuple_by_keyword():
    e, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    indices_tuple = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 3]))
    for crit in (fastap.APLoss(), fastap.FastAPLoss()):
        with pytest.raises(TypeError, match=r"^indices_tuple must be None, got tuple: .*miner"):
            crit(e, labels, indices_tuple=indices_tuple)
        # pytorch-metric-learning's loops pass indices_tuple=None without a miner.
        assert torch.equal(crit(e, labels, indices_tuple=None), crit(e, labels))


def test_extraction_sizes():
    from fastap.extraction import extract_descriptors

    net, images = torch.nn.Identity(), [torch.rand(3, 4, 4)]
    with pytest.raises(TypeError, match=r"^batch_size must be an integer, got 2.5"):
        extract_descriptors(net, images, batch_size=2.5, progress=False)
    with pytest.raises(ValueError, match=r"^chunk_size must be at least 1, got 0"):
        extract_descriptors(net, images, chunk_size=0, progress=False)


def test_flags_that_are_not_booleans():
    # A truthy string once switched a flag on silently.
    e, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(TypeError, match=r"^fused must be True, False or None, got 'yes'"):
        fastap.APLoss(fused="yes")
    with pytest.raises(TypeError, match=r"^fused must be True, False or None, got 1"):
        fastap.FastAPLoss(fused=1)
    with pytest.raises(TypeError, match=r"^exclude_self must be True, False or None, got 'no'"):
        fastap.APLoss()(e, labels, e, labels, exclude_self="no")
    with pytest.raises(TypeError, match=r"^include_batch must be True or False, got 'yes'"):
        fastap.FastAPLoss()(e, labels, e, labels, include_batch="yes")
    with pytest.raises(TypeError, match=r"^exclude_self must be True or False, got 'no'"):
        Fn.ap_loss_from_embeddings(e, e, labels, labels, exclude_self="no")
    with pytest.raises(TypeError, match=r"^exclude_diagonal must be True or False, got 'no'"):
        Fn.average_precision(_scores("cpu"), _targets("cpu"), exclude_diagonal="no")
    with pytest.raises(TypeError, match=r"^fused must be True, False or None, got 'no'"):
        Fn.embedding_ap_loss(e, labels, fused="no")


def test_arguments_that_are_not_tensors():
    with pytest.raises(TypeError, match=r"^scores must be a tensor, got list"):
        Fn.average_precision(_scores("cpu").tolist(), _targets("cpu"))
    with pytest.raises(TypeError, match=r"^loss must be a loss module such as fastap.APLoss\(\), "
                                        r"got str"):
        fastap.CrossBatchMemory("APLoss", 3, 8)
