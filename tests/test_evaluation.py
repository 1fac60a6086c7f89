"""Tests of fastap.evaluation (DESIGN §3).

The oracle is `naive_query` below: DESIGN §3's four steps written as plain Python lists on an
explicit ranking, sharing no code with fastap. Rankings come from
`torch.sort(scores, descending=True, stable=True)`, the ranking fastap's score path is defined to
reproduce.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fastap import evaluation as ev

GND_DIR = Path(os.environ.get("FASTAP_REVISITOP_GND",
                              Path(__file__).resolve().parents[2] / "shared/data/revisitop"))
KAPPAS = (1, 5, 10)
SETUPS = {"easy": (("easy",), ("junk", "hard")),
          "medium": (("easy", "hard"), ("junk",)),
          "hard": (("hard",), ("junk", "easy"))}


# ---------------------------------------------------------------------------------------------
# the independent oracle


def naive_query(ranking, positives, junk, kappas=KAPPAS):
    """AP and P@k of one query, step by step from DESIGN §3 (lists only)."""
    # 1. no positives: no AP
    if len(positives) == 0:
        return math.nan, [math.nan] * len(kappas)
    positives, junk = set(int(p) for p in positives), set(int(j) for j in junk)
    # 2. remove junk; r_j = 0-based rank of the j-th positive in what is left
    kept = [x for x in ranking if x not in junk]
    r = [rank for rank, x in enumerate(kept) if x in positives]
    # 3. trapezoidal AP
    ap = 0.0
    for j, rj in enumerate(r):
        p0 = 1.0 if rj == 0 else j / rj
        p1 = (j + 1) / (rj + 1)
        ap += 0.5 * (p0 + p1)
    ap /= len(positives)
    # 4. P@k with 1-based ranks, kq = min(last positive's rank, k)
    ranks1 = [rj + 1 for rj in r]
    prec = []
    for k in kappas:
        kq = min(ranks1[-1], k)
        prec.append(sum(1 for x in ranks1 if x <= kq) / kq)
    return ap, prec


def naive_evaluate(rankings, gnd_lists, kappas=KAPPAS):
    """(mAP, APs, mP@k) over queries; `gnd_lists` = [(positives, junk)] per query."""
    aps, precs = [], []
    for ranking, (pos, junk) in zip(rankings, gnd_lists):
        ap, prec = naive_query(ranking, pos, junk, kappas)
        aps.append(ap)
        precs.append(prec)
    valid = [i for i, a in enumerate(aps) if not math.isnan(a)]
    m_ap = sum(aps[i] for i in valid) / len(valid)
    m_pr = [sum(precs[i][t] for i in valid) / len(valid) for t in range(len(kappas))]
    return m_ap, aps, m_pr


def setup_lists(gnd, setup):
    ok_keys, junk_keys = SETUPS[setup]
    return [([x for k in ok_keys for x in q[k]], [x for k in junk_keys for x in q[k]])
            for q in gnd]


def as_ok_junk(lists):
    return [{"ok": np.array(p, dtype=np.int64), "junk": np.array(j, dtype=np.int64)}
            for p, j in lists]


def stable_ranking(scores):
    """(n_q, n_db) scores → (n_db, n_q) ranks, the definition of the score path's ranking."""
    return torch.sort(torch.as_tensor(scores), dim=1, descending=True, stable=True).indices.T


# ---------------------------------------------------------------------------------------------
# real ground truth


def load_gnd(dataset):
    path = GND_DIR / f"gnd_{dataset}.pkl"
    if not path.is_file():
        pytest.skip(f"real ground truth {path} not found; set FASTAP_REVISITOP_GND to the folder "
                    "holding gnd_roxford5k.pkl and gnd_rparis6k.pkl")
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module", params=["roxford5k", "rparis6k"])
def cfg(request):
    return load_gnd(request.param)


@pytest.fixture(scope="module")
def roxford():
    return load_gnd("roxford5k")


def random_scores(kind, n_q, n_db, gnd, seed):
    """Score matrices of several shapes: uniform, heavily tied, and 'good' rankings where
    positives mostly lead and junk is interleaved with them (so APs span [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(n_q, n_db, generator=g)
    if kind == "tied":
        return torch.randint(0, 12, (n_q, n_db), generator=g).float()
    s = torch.randn(n_q, n_db, generator=g, dtype=torch.float64)
    for i, q in enumerate(gnd):
        s[i, list(q["easy"])] += 2.5
        s[i, list(q["hard"])] += 1.5
        s[i, list(q["junk"])] += 2.0
    if kind == "good_rounded":  # ties between positives, junk and negatives alike
        s = torch.round(s * 2) / 2
    return s


SCORE_KINDS = ["uniform", "tied", "good", "good_rounded"]


@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_real_gnd_matches_naive_oracle(cfg, kind):
    gnd = cfg["gnd"]
    n_q, n_db = len(cfg["qimlist"]), len(cfg["imlist"])
    scores = random_scores(kind, n_q, n_db, gnd, seed=list(SCORE_KINDS).index(kind))
    ranks = stable_ranking(scores)
    rankings = ranks.T.tolist()
    result = ev.evaluate_revisited(scores, cfg)
    for setup in SETUPS:
        lists = setup_lists(gnd, setup)
        m_ap, aps, m_pr = naive_evaluate(rankings, lists)
        got_ranks = ev.compute_map(ranks, as_ok_junk(lists), KAPPAS)
        got_scores = ev.compute_map_from_scores(scores, as_ok_junk(lists), KAPPAS)
        for got in (got_ranks, got_scores):
            assert got[0] == pytest.approx(m_ap, abs=1e-6)
            np.testing.assert_allclose(got[1], aps, atol=1e-6)  # NaN where no positives
            np.testing.assert_allclose(got[2], m_pr, atol=1e-6)
        assert result[setup]["mAP"] == pytest.approx(100 * m_ap, abs=1e-4)
        np.testing.assert_allclose(result[setup]["mP@k"], [100 * p for p in m_pr], atol=1e-4)
        np.testing.assert_allclose(result[setup]["APs"], [100 * a for a in aps], atol=1e-4)
        assert result[setup]["kappas"] == list(KAPPAS)
    if kind == "good":  # the rankings are not degenerate: the oracle sees APs across [0, 1]
        aps = [a for a in naive_evaluate(rankings, setup_lists(gnd, "medium"))[1]]
        assert min(aps) < 0.5 < max(aps)


def test_real_gnd_facts(roxford):
    gnd = roxford["gnd"]
    assert (len(roxford["imlist"]), len(roxford["qimlist"])) == (4993, 70)
    assert [i for i, q in enumerate(gnd) if len(q["easy"]) == 0] == [11, 66]
    scores = random_scores("uniform", 70, 4993, gnd, seed=3)
    res = ev.evaluate_revisited(scores, roxford)
    assert np.flatnonzero(np.isnan(res["easy"]["APs"])).tolist() == [11, 66]
    assert np.isnan(res["easy"]["P@k"][[11, 66]]).all()
    assert not np.isnan(res["medium"]["APs"]).any() and not np.isnan(res["hard"]["APs"]).any()
    # the mean skips the two queries instead of counting them as 0
    assert res["easy"]["mAP"] == pytest.approx(np.delete(res["easy"]["APs"], [11, 66]).mean())


def test_real_gnd_perfect_ranking_is_100(cfg):
    # easy > hard > junk > rest: in every setup all positives lead once junk is removed
    # (Easy: hard is junk; Hard: easy is junk), so AP = P@k = 1 for every query.
    n_q, n_db = len(cfg["qimlist"]), len(cfg["imlist"])
    scores = torch.zeros(n_q, n_db)
    for i, q in enumerate(cfg["gnd"]):
        scores[i, list(q["junk"])] = 1
        scores[i, list(q["hard"])] = 2
        scores[i, list(q["easy"])] = 3
    res = ev.evaluate_revisited(scores, cfg)
    for setup in SETUPS:
        assert res[setup]["mAP"] == pytest.approx(100.0)
        assert res[setup]["mP@k"] == pytest.approx([100.0] * 3)


def test_paths_agree_on_real_gnd_with_ties(cfg):
    """compute_map(ranks) and the score path agree to 1e-6, scores with many ties."""
    n_q, n_db = len(cfg["qimlist"]), len(cfg["imlist"])
    g = torch.Generator().manual_seed(7)
    for scores in (torch.randint(0, 3, (n_q, n_db), generator=g).to(torch.float32),
                   torch.randint(0, 400, (n_q, n_db), generator=g).to(torch.float64),
                   torch.rand(n_q, n_db, generator=g).half()):
        ranks = stable_ranking(scores.float())
        for setup in SETUPS:
            lists = as_ok_junk(setup_lists(cfg["gnd"], setup))
            a = ev.compute_map(ranks, lists)
            b = ev.compute_map_from_scores(scores, lists)
            assert abs(a[0] - b[0]) < 1e-6
            for x, y in zip(a[1:], b[1:]):
                np.testing.assert_allclose(x, y, atol=1e-6)


def test_distractors(roxford):
    gnd = roxford["gnd"][:8]
    n_db = len(roxford["imlist"])
    g = torch.Generator().manual_seed(11)
    base = torch.rand(8, n_db, generator=g)
    ref = ev.evaluate_revisited(base, gnd)
    # distractors below everything change nothing
    low = torch.cat([base, torch.full((8, 3000), -1.0)], dim=1)
    low_res = ev.evaluate_revisited(low, gnd)
    for setup in SETUPS:
        np.testing.assert_allclose(low_res[setup]["APs"], ref[setup]["APs"])
    # distractors mixed in: compare with the oracle on the full ranking
    mixed = torch.cat([base, torch.rand(8, 3000, generator=g) * 1.2], dim=1)
    rankings = stable_ranking(mixed).T.tolist()
    res = ev.evaluate_revisited(mixed, {"gnd": gnd, "imlist": roxford["imlist"]})
    for setup in SETUPS:
        m_ap, aps, m_pr = naive_evaluate(rankings, setup_lists(gnd, setup))
        np.testing.assert_allclose(res[setup]["APs"], 100 * np.array(aps), atol=1e-4)
        assert res[setup]["mAP"] < ref[setup]["mAP"]


# ---------------------------------------------------------------------------------------------
# hand-computed cases


def both_paths(scores, gnd, kappas=KAPPAS):
    """Results of compute_map on the stable ranking and of the score path."""
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(len(gnd), -1)
    return [ev.compute_map(stable_ranking(scores), gnd, kappas),
            ev.compute_map_from_scores(scores, gnd, kappas)]


def test_trapezoid_example():
    # ranking [P, N, P], 2 positives at ranks r = [0, 2]:
    # j=0: p0 = 1 (r=0), p1 = 1/1 = 1        → ½(1 + 1)     = 1
    # j=1: p0 = 1/2,     p1 = 2/3             → ½(1/2 + 2/3) = 7/12
    # AP = (1 + 7/12)/2 = 19/24 = 0.7916667 (the non-interpolated AP would be (1 + 2/3)/2 = 0.8333)
    # P@k, 1-based ranks [1, 3]: k=1 → kq=1, 1/1; k=5 → kq=min(3,5)=3, 2/3; k=10 → 2/3
    gnd = [{"ok": [0, 2], "junk": []}]
    for m_ap, aps, m_pr, prs in both_paths([3.0, 2.0, 1.0], gnd):
        assert m_ap == pytest.approx(19 / 24, abs=1e-12)
        assert m_ap == pytest.approx(0.7916667, abs=1e-7)
        np.testing.assert_allclose(m_pr, [1, 2 / 3, 2 / 3])
        np.testing.assert_allclose(prs, [[1, 2 / 3, 2 / 3]])
        assert naive_query([0, 1, 2], [0, 2], [])[0] == pytest.approx(19 / 24)


def test_junk_at_top():
    # ranking [J, J, P, N, P] (database items 0..4 scored 5..1)
    # with items 0, 1 as junk: what remains is [P, N, P] → 19/24 as above, P@k [1, 2/3, 2/3]
    # with no junk: positives at r = [2, 4]:
    #   j=0: p0 = 0/2, p1 = 1/3 → 1/6;  j=1: p0 = 1/4, p1 = 2/5 → 13/40
    #   AP = (1/6 + 13/40)/2 = 59/240 = 0.2458333
    #   P@k, 1-based ranks [3, 5]: k=1 → kq=1, 0/1; k=5 → kq=5, 2/5; k=10 → kq=5, 2/5
    scores = [5.0, 4.0, 3.0, 2.0, 1.0]
    for m_ap, _, m_pr, _ in both_paths(scores, [{"ok": [2, 4], "junk": [0, 1]}]):
        assert m_ap == pytest.approx(19 / 24)
        np.testing.assert_allclose(m_pr, [1, 2 / 3, 2 / 3])
    for m_ap, _, m_pr, _ in both_paths(scores, [{"ok": [2, 4]}]):  # 'junk' may be absent
        assert m_ap == pytest.approx(59 / 240)
        np.testing.assert_allclose(m_pr, [0, 0.4, 0.4])


def test_single_positive_and_empty_query():
    # query 0: [P, N, P] → 19/24; query 1: no positives → NaN, skipped;
    # query 2: one positive at r = 3 → ½(0/3 + 1/4) = 1/8, P@k: ranks [4] → k=1: 0/1,
    #          k=5: kq = min(4, 5) = 4 → 1/4, k=10 → 1/4
    # mAP = (19/24 + 1/8)/2 = 11/24; mP@k = [(1+0)/2, (2/3+1/4)/2, (2/3+1/4)/2]
    scores = [[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]]
    gnd = [{"ok": [0, 2], "junk": []}, {"ok": [], "junk": [1]}, {"ok": [0], "junk": []}]
    for m_ap, aps, m_pr, prs in both_paths(scores, gnd):
        assert m_ap == pytest.approx(11 / 24)
        np.testing.assert_allclose(aps, [19 / 24, np.nan, 1 / 8])
        assert np.isnan(prs[1]).all()
        np.testing.assert_allclose(m_pr, [0.5, 11 / 24, 11 / 24])
    # all queries empty: no mean, as the official code's 0/0
    for m_ap, aps, m_pr, _ in both_paths([[1.0, 2.0]], [{"ok": []}]):
        assert math.isnan(m_ap) and np.isnan(m_pr).all()


def test_ties_break_by_lower_index():
    # all scores equal (incl. -0.0 == 0.0): the ranking is 0, 1, 2, 3; positives 1, 3 at r = [1, 3]:
    # j=0: ½(0/1 + 1/2) = 1/4;  j=1: ½(1/3 + 2/4) = 5/12;  AP = (1/4 + 5/12)/2 = 1/3
    gnd = [{"ok": [1, 3]}]
    for scores in ([0.0, -0.0, 0.0, -0.0], [0.5] * 4):
        for m_ap, *_ in both_paths(scores, gnd):
            assert m_ap == pytest.approx(1 / 3)
    # positive 2 ties with items 0 and 3 at 1.0 behind item 1 at 2.0: order 1, 0, 2, 3 → r = 2
    # AP = ½(0/2 + 1/3) = 1/6
    s = torch.tensor([[1.0, 2.0, 1.0, 1.0]])
    assert ev.compute_map_from_scores(s, [{"ok": [2]}])[0] == pytest.approx(1 / 6)


def test_ok_junk_overlap_follows_official_arithmetic():
    # The official code ranks an image listed as both positive and junk as a positive and removes
    # it as junk for later positives. Ranking [0, 1], ok = [0, 1], junk = [0]:
    # positions [0, 1] → [0 - 0, 1 - 1] = [0, 0]; AP = (½(1 + 1) + ½(1 + 2/1))/2 = 1.25
    for m_ap, *_ in both_paths([2.0, 1.0], [{"ok": [0, 1], "junk": [0]}]):
        assert m_ap == pytest.approx(1.25)


def test_original_protocol_in_percent():
    gnd = [{"ok": [2, 4], "junk": [0, 1]}, {"ok": [2, 4]}]
    res = ev.evaluate_original(np.array([[5.0, 4, 3, 2, 1]] * 2), gnd)
    # the two hand-computed APs of test_junk_at_top: 19/24 and 59/240
    assert res["mAP"] == pytest.approx(100 * (19 / 24 + 59 / 240) / 2)
    np.testing.assert_allclose(res["APs"], [100 * 19 / 24, 100 * 59 / 240])
    np.testing.assert_allclose(res["mP@k"], [50, 100 * (2 / 3 + 0.4) / 2, 100 * (2 / 3 + 0.4) / 2])
    assert res["kappas"] == [1, 5, 10]


def test_kappas_custom_and_beyond_database():
    # [P, N, P] (1-based ranks [1, 3]): k=2 → kq=2, 1/2; k=100 → kq=3, 2/3
    for _, _, m_pr, _ in both_paths([3.0, 2.0, 1.0], [{"ok": [0, 2]}], kappas=[2, 100]):
        np.testing.assert_allclose(m_pr, [0.5, 2 / 3])
    res = ev.evaluate_original(torch.tensor([[3.0, 2.0, 1.0]]), [{"ok": [0, 2]}], kappas=())
    assert res["mP@k"] == [] and res["kappas"] == []


# ---------------------------------------------------------------------------------------------
# random small cases against the oracle, and the fast path at scale


def test_random_small_cases_match_oracle():
    rng = np.random.default_rng(0)
    for trial in range(150):
        n_db = int(rng.integers(1, 40))
        n_q = int(rng.integers(1, 5))
        gnd = []
        for _ in range(n_q):
            perm = rng.permutation(n_db)
            n_ok = int(rng.integers(0, n_db + 1))
            n_junk = int(rng.integers(0, n_db - n_ok + 1))
            gnd.append({"ok": perm[:n_ok], "junk": perm[n_ok:n_ok + n_junk]})
        if trial % 2:
            scores = rng.integers(0, 4, (n_q, n_db)).astype(np.float32)  # many ties
        else:
            scores = rng.standard_normal((n_q, n_db))
        kappas = tuple(int(k) for k in rng.integers(1, 50, 3))
        rankings = stable_ranking(scores).T.tolist()
        aps = [naive_query(rk, q["ok"], q["junk"], kappas) for rk, q in zip(rankings, gnd)]
        for res in both_paths(scores, gnd, kappas):
            np.testing.assert_allclose(res[1], [a for a, _ in aps], atol=1e-12)
            np.testing.assert_allclose(res[3], [p for _, p in aps], atol=1e-12)


@pytest.mark.parametrize("levels, dtype", [
    (None, torch.float32), (None, torch.float64),  # ties only by chance
    (5, torch.float32), (5, torch.int64),          # few tied values: one pass per value
    (2000, torch.float32), (2000, torch.int32),    # many tied values: packed (score, index) keys
    (2000, torch.float64), (2000, torch.int64),    # ... too wide to pack: binary search
])
def test_score_path_exact_at_scale(levels, dtype):
    # 200k database items, negative, zero and positive scores; the positions must be those of
    # the stable descending sort.
    g = torch.Generator().manual_seed(levels or 0)
    n_q, n_db = 3, 200_000
    scores = torch.randn(n_q, n_db, generator=g, dtype=torch.float64)
    if levels:
        scores = torch.floor(torch.rand(n_q, n_db, generator=g, dtype=torch.float64) * levels)
        scores -= levels // 2
    scores = scores.to(dtype)
    gnd = [{"ok": torch.randperm(n_db, generator=g)[:300].numpy(),
            "junk": torch.randperm(n_db, generator=g)[:100].numpy()} for _ in range(n_q)]
    for q in gnd:  # disjoint lists
        q["junk"] = np.setdiff1d(q["junk"], q["ok"])
    a = ev.compute_map(stable_ranking(scores), gnd)
    b = ev.compute_map_from_scores(scores, gnd)
    assert a[0] == pytest.approx(b[0], abs=1e-12)
    np.testing.assert_allclose(a[1], b[1], atol=1e-12)
    np.testing.assert_allclose(a[3], b[3], atol=1e-12)


def test_packed_keys_small_dtypes():
    # uint32 on both sides of 2**31, uint8, int16 and float32 with -0.0/inf, all with many tied
    # values
    rng = np.random.default_rng(1)
    u32 = np.concatenate([[0, 1, 2**31 - 1, 2**31, 2**32 - 1], rng.integers(0, 2**32, 60)])
    for scores in (rng.choice(u32.astype(np.uint32), (2, 3000)),
                   rng.integers(0, 50, (2, 3000)).astype(np.uint8),
                   rng.integers(-50, 50, (2, 3000)).astype(np.int16),
                   rng.choice(np.array([-np.inf, -1, -0.0, 0.0, 1e-30, 2, np.inf] + list(range(60)),
                                       dtype=np.float32), (2, 3000))):
        gnd = [{"ok": rng.permutation(3000)[:400]} for _ in range(2)]
        ranks = np.argsort(-scores.astype(np.float64), axis=1, kind="stable").T
        a = ev.compute_map(ranks, gnd)
        b = ev.compute_map_from_scores(scores, gnd)
        np.testing.assert_allclose(a[1], b[1], atol=1e-12)
        np.testing.assert_allclose(a[3], b[3], atol=1e-12)


# ---------------------------------------------------------------------------------------------
# input forms and errors


def test_input_forms_agree(roxford):
    gnd = roxford["gnd"][:6]
    g = torch.Generator().manual_seed(5)
    s = torch.rand(6, len(roxford["imlist"]), generator=g)
    ref = ev.evaluate_revisited(s, gnd)
    variants = [s.numpy(), s.double(), s.T.contiguous().T, s.bfloat16().float()]
    for v in variants[:3]:
        out = ev.evaluate_revisited(v, {"gnd": gnd})
        for setup in SETUPS:
            np.testing.assert_allclose(out[setup]["APs"], ref[setup]["APs"])
    # bfloat16 scores are ranked as themselves (widened exactly)
    out = ev.evaluate_revisited(s.bfloat16(), gnd)
    exp = ev.evaluate_revisited(variants[3], gnd)
    for setup in SETUPS:
        np.testing.assert_allclose(out[setup]["APs"], exp[setup]["APs"])
    lists = as_ok_junk(setup_lists(gnd, "medium"))
    ranks = stable_ranking(s)
    np.testing.assert_allclose(ev.compute_map(ranks.numpy(), lists)[1],
                               ev.compute_map(ranks, lists)[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores(roxford):
    gnd = roxford["gnd"][:6]
    s = torch.rand(6, len(roxford["imlist"]))
    ref = ev.evaluate_revisited(s, gnd)
    out = ev.evaluate_revisited(s.cuda(), gnd)
    for setup in SETUPS:
        np.testing.assert_allclose(out[setup]["APs"], ref[setup]["APs"])


GND3 = [{"easy": [0, 1], "hard": [2], "junk": [3]}, {"easy": [], "hard": [4], "junk": []}]


@pytest.mark.parametrize("scores, match", [
    (torch.rand(3, 10), r"scores has shape \(3, 10\).*n_q = len\(gnd\) = 2"),
    (torch.rand(10, 2), r"looks transposed"),
    (torch.rand(10), r"scores must be 2-D"),
    (torch.rand(2, 4), r"gnd\[1\]\['hard'\] holds database index 4, outside \[0, 4\)"),
    (torch.tensor([[0.1, float("nan"), 0.2, 0.3, 0.4]] * 2), r"scores\[0, 1\] is NaN"),
])
def test_bad_scores(scores, match):
    with pytest.raises(ValueError, match=match):
        ev.evaluate_revisited(scores, GND3)


def test_bad_scores_type_and_imlist():
    with pytest.raises(TypeError, match="scores must be real"):
        ev.evaluate_revisited(torch.ones(2, 5, dtype=torch.bool), GND3)
    with pytest.raises(ValueError, match="imlist has 8 database images"):
        ev.evaluate_revisited(torch.rand(2, 5), {"gnd": GND3, "imlist": ["x"] * 8})
    with pytest.raises(ValueError, match=r"gnd\[0\] has no 'easy' list"):
        ev.evaluate_revisited(torch.rand(1, 5), [{"ok": [1]}])
    with pytest.raises(ValueError, match=r"gnd\[0\]\['ok'\] must be a 1-D list of integer"):
        ev.evaluate_original(torch.rand(1, 5), [{"ok": [1.0]}])


def test_bad_ranks():
    gnd = [{"ok": [0]}, {"ok": [1]}]
    good = np.array([[0, 1], [1, 0], [2, 2]])
    assert ev.compute_map(good, gnd)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"ranks has shape \(3, 3\)"):
        ev.compute_map(np.zeros((3, 3), dtype=int), gnd)
    with pytest.raises(ValueError, match="looks transposed"):
        ev.compute_map(good.T.copy(), gnd)
    with pytest.raises(ValueError, match=r"ranks must hold database indices in \[0, n_db\) = "
                                         r"\[0, 3\), got values in \[0, 3\]"):
        ev.compute_map(np.array([[0, 1], [1, 0], [3, 2]]), gnd)
    with pytest.raises(ValueError, match=r"ranks\[:, 1\] is not a permutation of 0..2: "
                                         "database index 2 is missing"):
        ev.compute_map(np.array([[0, 1], [1, 0], [2, 1]]), gnd)
    with pytest.raises(TypeError, match="ranks must hold integer"):
        ev.compute_map(good.astype(float), gnd)
    with pytest.raises(ValueError, match=r"gnd\[1\]\['ok'\] holds database index 7"):
        ev.compute_map(good, [{"ok": [0]}, {"ok": [7]}])


@pytest.mark.parametrize("kappas", [(0,), (1, -5), (1.5,), (True,), ("5",), [1, None]])
def test_bad_kappas(kappas):
    with pytest.raises(ValueError, match="kappas must be a sequence of positive integers"):
        ev.compute_map(np.array([[0], [1]]), [{"ok": [0]}], kappas)
    with pytest.raises(ValueError, match="kappas"):
        ev.evaluate_revisited(torch.rand(2, 5), GND3, kappas)


@pytest.mark.parametrize("kappas", [5, "15", None])
def test_kappas_not_a_sequence(kappas):
    with pytest.raises(TypeError, match="kappas must be a sequence"):
        ev.compute_map_from_scores(torch.rand(1, 2), [{"ok": [0]}], kappas)


def test_kappas_accepts_numpy_ints():
    res = ev.compute_map(np.array([[0], [1]]), [{"ok": [0]}], np.array([1, 2]))
    np.testing.assert_allclose(res[2], [1.0, 1.0])
