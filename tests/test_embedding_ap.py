"""The fused embedding -> AP op against the dense reference and the unfused score kernel."""

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fastap
import fastap.reference as R
from fastap import functional as Fn
from fastap.ops import embedding_ap


def _embeddings(batch, size, dim, dtype=torch.float64, classes=4, device="cpu"):
    q = F.normalize(torch.randn(batch, dim, dtype=dtype), dim=1).to(device)
    d = F.normalize(torch.randn(size, dim, dtype=dtype), dim=1).to(device)
    return q, d, torch.randint(0, classes, (batch,)).to(device), torch.randint(0, classes, (size,)).to(device)


@pytest.mark.parametrize("open_ends,num_bins,score_range", [(True, 25, (0.0, 1.0)),
                                                           (True, 7, (-0.5, 0.8)),
                                                           (False, 11, (-1.0, 1.0))])
@pytest.mark.parametrize("shape", [(1, 1), (5, 9), (17, 40)])
def test_matches_reference_float64(device, open_ends, num_bins, score_range, shape):
    q, d, ql, dl = _embeddings(*shape, dim=6, device=device)
    q.requires_grad_(), d.requires_grad_()
    ap, pos_hist, all_hist, num_pos = embedding_ap(q, d, ql, dl, num_bins=num_bins,
                                                   lo=score_range[0], hi=score_range[1],
                                                   open_ends=open_ends)
    q_ref, d_ref = q.detach().cpu().clone().requires_grad_(), d.detach().cpu().clone().requires_grad_()
    ap_ref = R.average_precision(q_ref @ d_ref.T, (ql.cpu(), dl.cpu()), num_bins, score_range,
                                 open_ends=open_ends)
    valid = ~ap_ref.isnan()
    assert torch.equal(ap.isnan().cpu(), ~valid)
    torch.testing.assert_close(ap[valid.to(device)].cpu(), ap_ref[valid], rtol=0, atol=1e-10)
    assert num_pos.cpu().tolist() == (ql.cpu()[:, None] == dl.cpu()[None]).sum(1).double().tolist()
    weights = torch.rand(shape[0], dtype=torch.float64)
    if valid.any():
        (ap[valid.to(device)] * weights[valid].to(device)).sum().backward()
        (ap_ref[valid] * weights[valid]).sum().backward()
        torch.testing.assert_close(q.grad.cpu(), q_ref.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(d.grad.cpu(), d_ref.grad, rtol=0, atol=1e-10)


def test_several_tiles_match_unfused_kernel():
    # 2050 queries x 4100 items spans two query blocks and two database tiles of the kernel.
    q, d, ql, dl = _embeddings(2050, 4100, dim=8, classes=50)
    q.requires_grad_(), d.requires_grad_()
    ap = embedding_ap(q, d, ql, dl, num_bins=25, lo=0.0, hi=1.0, open_ends=True,
                      exclude_diagonal=True)[0]
    q2, d2 = q.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()
    ap2 = Fn.average_precision(q2 @ d2.T, (ql, dl), exclude_diagonal=True)
    valid = ~ap2.isnan()
    torch.testing.assert_close(ap[valid], ap2[valid], rtol=0, atol=1e-10)
    ap[valid].sum().backward()
    ap2[valid].sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(d.grad, d2.grad, rtol=0, atol=1e-10)


def _reference_ap_and_grads(q, d, ql, dl, weights, exclude_diagonal=False):
    """The dense reference on the upcast (already rounded) embeddings: AP per row, d/dq, d/dd of
    sum(weights * AP) over valid rows, all float64 on the CPU."""
    q64 = q.detach().cpu().double().requires_grad_()
    d64 = d.detach().cpu().double().requires_grad_()
    ap = R.average_precision(q64 @ d64.T, (ql.cpu(), dl.cpu()), 25, (0.0, 1.0),
                             exclude_diagonal=exclude_diagonal)
    valid = ~ap.isnan()
    gq, gd = torch.autograd.grad((ap[valid] * weights[valid]).sum(), (q64, d64))
    return ap.detach(), valid, gq, gd


# Per dtype: how far the kernel may sit from the float64 reference, relative to the largest
# gradient entry. Half/bfloat16 inputs are multiplied with float32 accumulation; the score
# gradients enter the two gradient products rounded to the input dtype (2^-11 / 2^-8 relative)
# and the results are rounded to it again.
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _assert_grads_near_reference(grads, reference_grads, dtype):
    tol = GRAD_TOLERANCE[dtype]
    for got, want in zip(grads, reference_grads):
        assert got.isfinite().all()
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol,
                                   atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduced_precision_is_multiplied_in_float32(device, dtype):
    q, d, ql, dl = _embeddings(12, 30, dim=16, dtype=dtype, device=device)
    weights = torch.rand(12, dtype=torch.float64)
    ref, valid, gq_ref, gd_ref = _reference_ap_and_grads(q, d, ql, dl, weights)
    q.requires_grad_(), d.requires_grad_()
    ap = embedding_ap(q, d, ql, dl, num_bins=25, lo=0.0, hi=1.0, open_ends=True)[0]
    assert ap.dtype == torch.float32
    # Only float32 rounding of the products and of the histogram sums separates the two.
    torch.testing.assert_close(ap[valid.to(device)].double().cpu(), ref[valid], rtol=0,
                               atol=1e-5)
    gq, gd = torch.autograd.grad((ap[valid.to(device)] * weights[valid].to(device)).sum(),
                                 (q, d))
    assert gq.dtype == dtype and gd.dtype == dtype
    _assert_grads_near_reference((gq, gd), (gq_ref, gd_ref), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_masked_gradient_leaves_the_other_unchanged(device, dtype):
    """Each gradient computed alone (output_mask) equals, bit for bit, the same gradient of the
    call that computes both, in every dtype (half/bfloat16 go through their own CUDA path); the
    one not asked for is an empty tensor of its input's dtype and device."""
    q, d, ql, dl = _embeddings(12, 30, dim=16, dtype=dtype, device=device)
    _, pos_hist, all_hist, num_pos = embedding_ap(q, d, ql, dl, num_bins=25, lo=0.0, hi=1.0,
                                                  open_ends=True)
    grad_ap = torch.rand(12, dtype=torch.float32, device=device)

    def backward(mask):
        return torch.ops.fastap.embedding_ap_backward(grad_ap, q, d, ql, dl, pos_hist, all_hist,
                                                     num_pos, 25, 0.0, 1.0, True, False, mask)

    both = backward([True, True])
    for k, mask in ((0, [True, False]), (1, [False, True])):
        alone = backward(mask)
        assert torch.equal(alone[k], both[k]), mask
        empty = alone[1 - k]
        assert empty.shape == (0,) and empty.dtype == dtype and empty.device == q.device


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_gradients_under_a_large_loss_scale(device, dtype):
    # A loss scaled by 2^17 (as loss scalers do) makes the largest score gradient of this
    # problem 9.5e4 (half inputs), past half's largest value 65,504, while the embedding
    # gradients (2.9e4 at most) still fit: the kernel must not overflow in between.
    factor = 2.0**17
    q, d, ql, dl = _embeddings(64, 200, dim=128, dtype=dtype, classes=8, device=device)
    weights = torch.full((64,), factor, dtype=torch.float64)
    _, valid, gq_ref, gd_ref = _reference_ap_and_grads(q, d, ql, dl, weights)
    q.requires_grad_(), d.requires_grad_()
    ap = embedding_ap(q, d, ql, dl, num_bins=25, lo=0.0, hi=1.0, open_ends=True)[0]
    gq, gd = torch.autograd.grad(ap[valid.to(device)].sum() * factor, (q, d))
    _assert_grads_near_reference((gq, gd), (gq_ref, gd_ref), dtype)


def test_gradcheck():
    q, d, ql, dl = _embeddings(6, 11, dim=4, classes=3)
    ql[0] = dl[0]  # at least one positive
    assert torch.autograd.gradcheck(
        lambda a, b: Fn.ap_loss_from_embeddings(a, b, ql, dl, num_bins=9, score_range=(-1, 1)),
        (q.requires_grad_(), d.requires_grad_()))


def test_opcheck():
    q, d, ql, dl = _embeddings(5, 9, dim=4, dtype=torch.float32, classes=2)
    ql[:] = dl[0]  # every row has a positive, so no NaN (opcheck treats NaN as unequal)
    args = (q.requires_grad_(), d.requires_grad_(), ql, dl, 10, 0.0, 1.0, True, False)
    torch.library.opcheck(torch.ops.fastap.embedding_ap.default, args)
    ap, pos_hist, all_hist, num_pos = torch.ops.fastap.embedding_ap(*args)
    for output_mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(torch.ops.fastap.embedding_ap_backward.default,
                              (torch.ones(5), q.detach(), d.detach(), ql, dl, pos_hist, all_hist,
                               num_pos, 10, 0.0, 1.0, True, False, output_mask))


@pytest.mark.parametrize("trained", ["queries", "database"])
def test_only_the_gradient_autograd_asks_for(device, trained):
    """A detached database (a fixed gallery, a detached ref_emb) or detached queries: the other
    gradient is right (dense reference) and the backward op hands back an empty tensor for the
    one nobody wants, its GEMM skipped."""
    q, d, ql, dl = _embeddings(17, 40, dim=6, device=device)
    leaf = q if trained == "queries" else d
    leaf.requires_grad_()
    ap = embedding_ap(q, d, ql, dl, num_bins=25, lo=0.0, hi=1.0, open_ends=True)[0]
    q_ref, d_ref = q.detach().cpu().requires_grad_(), d.detach().cpu().requires_grad_()
    ap_ref = R.average_precision(q_ref @ d_ref.T, (ql.cpu(), dl.cpu()), 25, (0.0, 1.0))
    valid = ~ap_ref.isnan()
    ap[valid.to(device)].sum().backward()
    ap_ref[valid].sum().backward()
    expected = q_ref.grad if trained == "queries" else d_ref.grad
    torch.testing.assert_close(leaf.grad.cpu(), expected, rtol=0, atol=1e-10)

    _, pos_hist, all_hist, num_pos = embedding_ap(q.detach(), d.detach(), ql, dl, num_bins=25,
                                                  lo=0.0, hi=1.0, open_ends=True)
    mask = [trained == "queries", trained == "database"]
    grads = torch.ops.fastap.embedding_ap_backward(
        torch.ones(17, dtype=torch.float64, device=device), q.detach(), d.detach(), ql, dl,
        pos_hist, all_hist, num_pos, 25, 0.0, 1.0, True, False, mask)
    assert [tuple(g.shape) for g in grads] == [(17, 6) if mask[0] else (0,),
                                               (40, 6) if mask[1] else (0,)]


@pytest.mark.parametrize("loss_cls", [fastap.APLoss, fastap.FastAPLoss])
def test_fused_and_unfused_losses_agree(loss_cls):
    emb = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (40,))
    fused = loss_cls(fused=True)(emb, labels)
    (g_fused,) = torch.autograd.grad(fused, emb)
    unfused = loss_cls(fused=False)(emb, labels)
    (g_unfused,) = torch.autograd.grad(unfused, emb)
    ref_fn = R.embedding_ap_loss if loss_cls is fastap.APLoss else R.fastap_loss
    ref = ref_fn(emb, labels)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(unfused, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_fused, g_unfused, rtol=0, atol=1e-12)


_LOSSES = {"APLoss": (Fn.embedding_ap_loss, R.embedding_ap_loss),
           "FastAPLoss": (Fn.fastap_loss, R.fastap_loss)}


@pytest.mark.parametrize("memory_trained", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("loss", list(_LOSSES))
def test_include_batch_equals_the_concatenated_database(device, loss, fused, memory_trained):
    """include_batch=True against the dense reference on [batch; memory] with exclude_self=True:
    the same loss, the batch's gradient in both of its roles, and the memory's own gradient
    when it has one."""
    fn, reference = _LOSSES[loss]
    torch.manual_seed(3)
    x = torch.randn(9, 6, dtype=torch.float64, device=device, requires_grad=True)
    memory = torch.randn(23, 6, dtype=torch.float64, device=device, requires_grad=memory_trained)
    y = torch.randint(0, 3, (9,), device=device)
    memory_y = torch.randint(0, 3, (23,), device=device)
    got = fn(x, y, memory, memory_y, include_batch=True, fused=fused)
    x_ref = x.detach().cpu().requires_grad_()
    memory_ref = memory.detach().cpu().requires_grad_(memory_trained)
    expected = reference(x_ref, y.cpu(), torch.cat([x_ref, memory_ref]),
                         torch.cat([y, memory_y]).cpu(), exclude_self=True)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=1e-12)
    inputs, ref_inputs = ((x, memory), (x_ref, memory_ref)) if memory_trained else ((x,), (x_ref,))
    grads, ref_grads = torch.autograd.grad(got, inputs), torch.autograd.grad(expected, ref_inputs)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu(), g_ref, rtol=0, atol=1e-12)


class _OutputShapes(TorchDispatchMode):
    """Records the shape of every new tensor (not a view of an input) that the ops called under
    it return."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("fused", [False, True])
def test_include_batch_forms_no_memory_gradient(fused):
    # The memory bank gets no gradient, and no (N, D) or (B + N, D) tensor is formed for it in
    # the backward (with the concatenated database, both paths formed a (B + N, D) gradient).
    x = torch.randn(9, 6, requires_grad=True)
    memory, y, memory_y = torch.randn(23, 6), torch.randint(0, 3, (9,)), torch.randint(0, 3, (23,))
    loss = fastap.APLoss(fused=fused)(x, y, memory, memory_y, include_batch=True)
    with _OutputShapes() as recorded:
        loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not recorded.shapes & {(23, 6), (32, 6), (6, 23), (6, 32)}, recorded.shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_include_batch_in_reduced_precision(device, dtype):
    """The fused path's extra backward term (the batch as the database's first rows) multiplies
    half/bfloat16 rows in float32, as the kernel does. On dot products of the batch as given
    (the losses' normalisation of it, which rounds to the dtype, left out) with the memory as
    the losses normalise it: AP per row and d/dq of a weighted sum against the float64 dense
    reference."""
    q, memory, ql, memory_labels = _embeddings(12, 30, dim=16, dtype=dtype, device=device)
    weights = torch.rand(12, dtype=torch.float64)
    database = Fn._batch_then_memory(q, memory)  # [q; the memory normalised again, in dtype]
    ref, valid, gq_ref, gd_ref = _reference_ap_and_grads(
        q, database, ql, torch.cat([ql, memory_labels]), weights, exclude_diagonal=True)
    gq_ref = gq_ref + gd_ref[:12]  # the queries are also the database's first 12 rows
    q.requires_grad_()
    ap, _ = Fn._ranked_ap(q, database, ql, torch.cat([ql, memory_labels]), num_bins=25, lo=0.0,
                          hi=1.0, open_ends=True, exclude_self=True, fused=True, batch_first=True)
    torch.testing.assert_close(ap[valid.to(device)].double().cpu(), ref[valid], rtol=0, atol=1e-5)
    (gq,) = torch.autograd.grad((ap[valid.to(device)] * weights[valid].to(device)).sum(), q)
    assert gq.dtype == dtype
    _assert_grads_near_reference((gq,), (gq_ref,), dtype)


def test_include_batch_gradcheck():
    q, d, ql, dl = _embeddings(6, 11, dim=4, classes=3)
    assert torch.autograd.gradcheck(
        lambda a, b: Fn.embedding_ap_loss(a, ql, b, dl, num_bins=9, score_range=(-1, 1),
                                          include_batch=True, fused=True),
        (q.requires_grad_(), d.requires_grad_()))


def test_ap_loss_from_embeddings_equals_ap_loss_on_dot_products():
    q, d, ql, dl = _embeddings(9, 20, dim=5)
    q = q * 0.7  # dot products, not cosines: the fused loss does not normalise
    expected = R.ap_loss(q @ d.T, (ql, dl), 25, (0.0, 1.0))
    torch.testing.assert_close(Fn.ap_loss_from_embeddings(q, d, ql, dl), expected, rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("fused", [False, True])
def test_cross_batch_memory_ranks_against_batch_and_memory(fused):
    torch.manual_seed(1)
    memory = fastap.CrossBatchMemory(fastap.APLoss(fused=fused), embedding_size=6,
                                     memory_size=20).double()
    history_x, history_y = [], []
    for step in range(4):
        x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, 3, (8,))
        # Oracle: the batch first, then the last 20 stored entries (the newest 20 of the past).
        past_x = torch.cat(history_x)[-20:] if history_x else x[:0].detach()
        past_y = torch.cat(history_y)[-20:] if history_y else y[:0]
        expected = R.embedding_ap_loss(x, y, torch.cat([x, past_x]), torch.cat([y, past_y]),
                                       exclude_self=True)
        loss = memory(x, y)
        # Memory order differs from the oracle's (a ring buffer), which AP does not see.
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
        (g,) = torch.autograd.grad(loss, x)
        (g_ref,) = torch.autograd.grad(expected, x)
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
        history_x.append(x.detach())
        history_y.append(y)
    assert int(memory.filled) == 20


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.uint8, torch.bool])
def test_cross_batch_memory_takes_any_integer_labels(label_dtype):
    # The memory stores int64 labels; narrower integer labels once crashed the write after the
    # loss had been computed.
    torch.manual_seed(2)
    memory = fastap.CrossBatchMemory(fastap.APLoss(), embedding_size=4, memory_size=5).double()
    labels = [torch.randint(0, 2, (3,)) for _ in range(3)]
    xs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
    for step, (x, y) in enumerate(zip(xs, labels)):
        past_x, past_y = torch.cat(xs[:step] or [x[:0]])[-5:], torch.cat(labels[:step] or [y[:0]])[-5:]
        expected = R.embedding_ap_loss(x, y, torch.cat([x, past_x]), torch.cat([y, past_y]),
                                       exclude_self=True)
        torch.testing.assert_close(memory(x, y.to(label_dtype)), expected, rtol=0, atol=1e-12)
    assert memory.label_memory.dtype == torch.int64
    with pytest.raises(TypeError, match="labels must be integer class ids"):
        memory(xs[0], labels[0].float())


def test_bad_input():
    q, d, ql, dl = _embeddings(3, 4, dim=5)
    with pytest.raises(ValueError, match="same embedding size"):
        embedding_ap(q, d[:, :4], ql, dl, num_bins=5, lo=0, hi=1, open_ends=True)
    with pytest.raises(ValueError, match="database_labels must have shape"):
        embedding_ap(q, d, ql, dl[:3], num_bins=5, lo=0, hi=1, open_ends=True)
    with pytest.raises(TypeError, match="share one floating dtype"):
        embedding_ap(q, d.float(), ql, dl, num_bins=5, lo=0, hi=1, open_ends=True)
    with pytest.raises(ValueError, match="exclude_self needs B <= N"):
        embedding_ap(d, q, dl, ql, num_bins=5, lo=0, hi=1, open_ends=True, exclude_diagonal=True)
    with pytest.raises(ValueError, match="scores contains NaN or Inf"):
        embedding_ap(q, torch.full_like(d, float("nan")), ql, dl, num_bins=5, lo=0, hi=1,
                     open_ends=True)
    with pytest.raises(ValueError, match="memory_size must be at least 1"):
        fastap.CrossBatchMemory(fastap.APLoss(), 5, 0)


@pytest.mark.parametrize("fused", [False, True])
def test_include_batch_compiles(fused):
    # fullgraph: the autograd.Function that adds the batch-as-database term traces through
    # AOTAutograd with the ops' fake kernels.
    torch._dynamo.reset()
    torch.manual_seed(5)
    lin = torch.nn.Linear(8, 4, dtype=torch.float64)
    memory = torch.randn(15, 4, dtype=torch.float64)
    memory_labels = torch.randint(0, 3, (15,))
    criterion = fastap.APLoss(num_bins=9, fused=fused)

    def step(x, labels):
        return criterion(lin(x), labels, memory, memory_labels, include_batch=True)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x, labels = torch.randn(10, 8, dtype=torch.float64), torch.randint(0, 3, (10,))
    got = compiled(x, labels)
    (got_grad,) = torch.autograd.grad(got, lin.weight)
    out = x @ lin.weight.T + lin.bias
    expected = R.embedding_ap_loss(out, labels, torch.cat([out, memory]),
                                   torch.cat([labels, memory_labels]), num_bins=9,
                                   exclude_self=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, torch.autograd.grad(expected, lin.weight)[0], rtol=0,
                               atol=1e-12)


def test_autograd_grad_computes_only_the_gradients_asked_for():
    """torch.autograd.grad(loss, embeddings) with a memory bank that requires grad: the fused
    backward is asked for the queries' gradient only (and the other way round), and each
    gradient equals the one .backward() computes."""

    class Masks(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "embedding_ap_backward" in str(func):
                self.seen.append(list(args[-1]))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(21)
    emb = torch.randn(12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels, memory_labels = torch.arange(12) % 3, torch.arange(20) % 3
    crit = fastap.APLoss(fused=True)
    with Masks() as masks:
        grad_emb, = torch.autograd.grad(crit(emb, labels, memory, memory_labels), emb)
        grad_memory, = torch.autograd.grad(crit(emb, labels, memory, memory_labels), memory)
        crit(emb, labels, memory, memory_labels).backward()
    assert masks.seen == [[True, False], [False, True], [True, True]]
    assert torch.equal(grad_emb, emb.grad) and torch.equal(grad_memory, memory.grad)
    assert grad_emb.abs().sum() > 0 and grad_memory.abs().sum() > 0
