"""Learned and PCA whitening, αQE and DBA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastap import models as M
from fastap.whitening import (Whitening, alpha_query_expansion, apply_whitening,
                              database_augmentation, learn_whitening, pca_whitening)


def _pairs(num_classes=300, dim=8, seed=0):
    """Anisotropic class centres with correlated intra-class noise; two images per class."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    centres = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * torch.linspace(
        3, 0.5, dim, dtype=torch.float64)
    noise = torch.randn(2 * num_classes, dim, generator=g, dtype=torch.float64) @ mix * 0.3
    x = centres.repeat_interleave(2, dim=0) + noise + 1.5
    q = torch.arange(0, 2 * num_classes, 2)
    return x, q, q + 1


def test_learned_whitening_whitens_matching_pair_differences():
    x, qi, pi = _pairs()
    w = learn_whitening(x, qi, pi)
    assert isinstance(w, Whitening) and w.projection.shape == (8, 8)
    torch.testing.assert_close(w.mean, x[qi].mean(dim=0))
    diffs = apply_whitening(x[qi], w, normalize=False) - apply_whitening(x[pi], w, normalize=False)
    cov = diffs.T @ diffs / diffs.shape[0]
    torch.testing.assert_close(cov, torch.eye(8, dtype=torch.float64), atol=1e-8, rtol=0)
    # The projected data is decorrelated with decreasing variance along the rows of P.
    y = apply_whitening(x, w, normalize=False)
    c = y.T @ y
    off = c - torch.diag(torch.diag(c))
    assert off.abs().max() < 1e-6 * c.abs().max()
    assert (torch.diag(c)[:-1] >= torch.diag(c)[1:]).all()
    # Truncation keeps the leading rows; output is L2-normalised.
    z = apply_whitening(x.float(), w, dim=3)
    assert z.shape == (600, 3) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(600))
    torch.testing.assert_close(z, F.normalize(y[:, :3], dim=1).float())


def test_learned_whitening_regularises_singular_covariance():
    x, qi, pi = _pairs(num_classes=4, dim=8)  # 4 differences in 8 dimensions: S is singular
    w = learn_whitening(x, qi, pi)
    assert torch.isfinite(w.projection).all()
    with pytest.raises(ValueError, match="equal length"):
        learn_whitening(x, qi, pi[:-1])


def test_whitening_into_retrieval_net():
    torch.manual_seed(0)
    x, qi, pi = _pairs(num_classes=400, dim=512)
    w = learn_whitening(x, qi, pi)
    net = M.RetrievalNet("resnet18", whitening_dim=16)
    net.set_whitening(w.mean, w.projection)
    v = F.normalize(torch.rand(5, 512), dim=1)
    with torch.no_grad():
        got = F.normalize(net.whiten(v), dim=1)
    torch.testing.assert_close(got, w.apply(v, dim=16), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no whitening layer"):
        M.RetrievalNet("resnet18").set_whitening(w.mean, w.projection)


def test_pca_whitening_gives_identity_covariance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64) + 4
    w = pca_whitening(x)
    y = apply_whitening(x, w, normalize=False)
    torch.testing.assert_close(y.mean(dim=0), torch.zeros(6, dtype=torch.float64), atol=1e-10,
                               rtol=0)
    cov = y.T @ y / y.shape[0]
    torch.testing.assert_close(cov, torch.eye(6, dtype=torch.float64), atol=1e-8, rtol=0)
    # Rows are ordered by decreasing variance of the original data.
    evals = torch.linalg.eigvalsh(torch.cov(x.T, correction=0)).flip(0)
    torch.testing.assert_close(1 / w.projection.norm(dim=1) ** 2, evals, rtol=1e-8, atol=0)
    assert apply_whitening(x, w, dim=2).shape == (2000, 2)
    with pytest.raises(ValueError, match="dim"):
        apply_whitening(x, w, dim=7)


def _unit(*v):
    t = torch.tensor(v, dtype=torch.float64)
    return t / t.norm()


def test_alpha_query_expansion_hand_example():
    q = _unit(1.0, 0.0).unsqueeze(0)
    a, b, c = _unit(1.0, 1.0), _unit(1.0, 2.0), _unit(-1.0, 0.1)
    db = torch.stack([c, a, b])
    sa, sb = 1 / math.sqrt(2), 1 / math.sqrt(5)  # cosines with q; c is the farthest
    expected = q[0] + sa ** 3 * a + sb ** 3 * b
    got = alpha_query_expansion(q, db, n=2, alpha=3.0)
    torch.testing.assert_close(got[0], expected / expected.norm())
    without = alpha_query_expansion(q, db, n=2, alpha=3.0, include_query=False)
    expected = sa ** 3 * a + sb ** 3 * b
    torch.testing.assert_close(without[0], expected / expected.norm())
    # α = 0 is average query expansion; n = 0 returns the (normalised) query.
    avg = alpha_query_expansion(q, db, n=1, alpha=0.0)
    torch.testing.assert_close(avg[0], F.normalize(q[0] + a, dim=0))
    torch.testing.assert_close(alpha_query_expansion(q, db, n=0), q)
    # Negative similarities get no weight.
    far = alpha_query_expansion(q, c.unsqueeze(0), n=1, alpha=3.0)
    torch.testing.assert_close(far, q)


def test_database_augmentation_hand_example():
    a, b, c = _unit(1.0, 0.0), _unit(1.0, 1.0), _unit(0.0, 1.0)
    db = torch.stack([a, b, c])
    s = 1 / math.sqrt(2)  # a·b = b·c; a·c = 0
    got = database_augmentation(db, n=2, alpha=2.0, block_size=2)  # blocks of 2 rows
    exp_a = a + s ** 2 * b
    exp_c = c + s ** 2 * b
    torch.testing.assert_close(got[0], exp_a / exp_a.norm())
    torch.testing.assert_close(got[2], exp_c / exp_c.norm())
    # b's two nearest are itself and one of a/c (a tie): either way the same weight s².
    assert got[1] @ b > 0.9
    torch.testing.assert_close(database_augmentation(db, n=1), db)
    full = database_augmentation(db, n=3, alpha=1.0)
    exp_b = b + s * a + s * c
    torch.testing.assert_close(full[1], exp_b / exp_b.norm())


@pytest.mark.parametrize("units", [None, "AVX512-BF16"])
def test_expansion_neighbours_match_a_dense_float64_ranking(monkeypatch, units):
    """αQE and DBA take their neighbours from the exact search; with bfloat16 units that is the
    certified bfloat16 pass on a database prepared once. The oracle: dense float64 similarities,
    a stable sort, the same weights."""
    import fastap._device

    monkeypatch.setattr(fastap._device, "cpu_bf16_units", lambda: units)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(300, 24, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(70, 24, generator=g), dim=1)

    def dense(queries, n, alpha):
        sims = (queries.double() @ x.double().T).float()
        order = torch.sort(sims, dim=1, descending=True, stable=True)
        top, idx = order.values[:, :n], order.indices[:, :n]
        w = top.double().clamp(min=0).pow(alpha)
        return (w.unsqueeze(-1) * x.double()[idx]).sum(1)

    expected_qe = torch.nn.functional.normalize(dense(q, 5, 3.0) + q.double(), dim=1)
    torch.testing.assert_close(alpha_query_expansion(q, x, n=5, alpha=3.0).double(), expected_qe,
                               atol=1e-6, rtol=0)
    expected_dba = torch.nn.functional.normalize(dense(x, 4, 2.0), dim=1)
    torch.testing.assert_close(database_augmentation(x, n=4, alpha=2.0, block_size=64).double(),
                               expected_dba, atol=1e-6, rtol=0)
