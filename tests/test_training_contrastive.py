"""InfoNCE / NT-Xent against explicit per-sample formulas, MoCo's key side, and the exports."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastap.models import RetrievalNet, from_pretrained
from fastap.training import MoCo, ProjectionHead, QueryModel, export_trunk, info_nce, nt_xent


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _unit(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def test_info_nce_matches_the_formula():
    q, k, queue, tau = _unit(5, 4), _unit(5, 4, seed=1), _unit(7, 4, seed=2), 0.2
    want = 0.0
    for i in range(5):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = sum(math.exp(float(q[i] @ n) / tau) for n in queue)
        want += -math.log(pos / (pos + neg))
    assert info_nce(q, k, queue, tau).item() == pytest.approx(want / 5, rel=1e-12)
    q.requires_grad_(True)
    k.requires_grad_(True)
    info_nce(q, k, queue, tau).backward()
    assert k.grad is None and q.grad.abs().sum() > 0  # keys are constants, as in MoCo


def test_nt_xent_matches_the_formula():
    z1, z2, tau = _unit(4, 3), _unit(4, 3, seed=1), 0.5
    z = torch.cat([z1, z2])
    want = 0.0
    for a in range(8):
        p = (a + 4) % 8
        num = math.exp(float(z[a] @ z[p]) / tau)
        den = sum(math.exp(float(z[a] @ z[b]) / tau) for b in range(8) if b != a)
        want += -math.log(num / den)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(want / 8, rel=1e-12)


def _query_model(output="proj", pooling="spoc", **kw):
    torch.manual_seed(0)
    return QueryModel(RetrievalNet("resnet18", pooling=pooling, **kw),
                      ProjectionHead(512, 16, 8), output)


def test_query_model_outputs():
    qm = _query_model("both", pooling="gem").eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), generator=gen, dtype=torch.uint8)
    with torch.no_grad():
        both = qm(images)
        x = qm.net.preprocess(images.float() / 255)
        desc = qm.net(x)
        proj = F.normalize(qm.head(qm.net.pool(qm.net.features(x))), dim=1)
    assert both.shape == (3, 512 + 8)
    torch.testing.assert_close(both[:, :512], desc)
    torch.testing.assert_close(both[:, 512:], proj)
    torch.testing.assert_close(qm(images.float() / 255), both)  # float [0, 1] input too


def test_moco_momentum_update_and_ring_queue():
    qm = _query_model()
    moco = MoCo(qm, queue_size=5, momentum=0.75, temperature=0.2, seed=3)
    assert torch.allclose(moco.queue.norm(dim=1), torch.ones(5))
    assert not any(p.requires_grad for p in moco.key_model.parameters())
    key_before = {n: p.clone() for n, p in moco.key_model.named_parameters()}
    with torch.no_grad():
        for p in qm.parameters():
            p.add_(1.0)
    moco.momentum_update(qm)
    for n, p in qm.named_parameters():
        torch.testing.assert_close(dict(moco.key_model.named_parameters())[n],
                                   0.75 * key_before[n] + 0.25 * p)
    keys = _unit(3, 8).float()
    moco.enqueue(keys)
    moco.enqueue(keys.flip(0))
    assert int(moco.queue_ptr) == 1
    torch.testing.assert_close(moco.queue[[1, 2, 3, 4, 0]], torch.cat([keys, keys.flip(0)])[1:])


def test_shuffled_keys_follow_the_shuffled_bn_groups():
    """Train-mode BN in a single process: keys are computed on a permuted batch in BN groups of
    ``chunk_size`` and put back in order (oracle: the same steps written out by hand)."""
    qm = _query_model()
    moco = MoCo(qm, queue_size=4, seed=1)
    moco.key_model.train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=gen, dtype=torch.uint8)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        shuffled = torch.cat([moco.key_model(images[perm][i:i + 3]) for i in (0, 3)])
        want = torch.empty_like(shuffled)
        want[perm] = shuffled
        plain = torch.cat([moco.key_model(images[i:i + 3]) for i in (0, 3)])
    got = moco.keys(images, chunk_size=3, shuffle=torch.Generator().manual_seed(42))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)  # the shuffle really changes the BN groups


def test_export_trunk_round_trips_through_from_pretrained(tmp_path):
    qm = _query_model()
    moco = MoCo(qm, queue_size=6, seed=1)
    payload = export_trunk(qm, moco)
    sd = payload["state_dict"]
    assert "module.encoder_q.fc.0.weight" in sd and "module.encoder_q.fc.2.bias" in sd
    assert sd["module.queue"].shape == (8, 6) and "module.encoder_k.conv1.weight" in sd
    torch.save(payload, tmp_path / "encoder.pth")
    net = from_pretrained(tmp_path / "encoder.pth", "resnet18", pooling="gem")
    assert net.meta["layout"] == "moco" and net.meta["mean"] is not None
    for k, v in qm.net.backbone.state_dict().items():
        torch.testing.assert_close(net.backbone.state_dict()[k], v, rtol=0, atol=0)

    raw = _query_model(mean=None, std=None)
    torch.save(export_trunk(raw), tmp_path / "raw.pth")
    net = from_pretrained(tmp_path / "raw.pth", "resnet18")
    assert net.meta["layout"] == "simclr" and net.meta["mean"] is None
