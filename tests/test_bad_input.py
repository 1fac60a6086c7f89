"""User errors: each raises the documented exception type with a message naming the argument."""

from __future__ import annotations

import pytest
import torch

import fastap
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
    with pytest.raises(RuntimeError, match=msg):
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
