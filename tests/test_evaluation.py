"""Tests of fastap.evaluation (docs/evaluation.md).

The oracle is `naive_query` below: the four steps of docs/evaluation.md written as plain Python
lists on an explicit ranking, sharing no code with fastap. Rankings come from
`torch.sort(scores, descending=True, stable=True)`, the ranking fastap's score path is defined to
reproduce. A second oracle, `revisitop_compute_map`, follows the official revisitop code's
algorithm (argsort of the scores, then its loop) on rankings with many ties.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    """AP and P@k of one query, step by step from docs/evaluation.md (lists only)."""
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
            a = ev.compute_map(ranks, lists, KAPPAS)
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
# revisitop's own compute_map as a second oracle, on rankings with many ties


def revisitop_compute_map(ranks, gnd, kappas=KAPPAS):
    """The algorithm of revisitop's ``compute_map`` (the official Revisited Oxford/Paris code),
    step for step: positions of the positives and junk by membership along each ranking column,
    each positive's position lowered by the junk images before it (its while loop), trapezoidal
    AP summed term by term, P@k; queries without positives are NaN and left out of the means.
    ``np.isin`` stands in for ``np.in1d``, which numpy 2.4 no longer has.

    ranks: (n_db, n_q) database indices by decreasing score; gnd: per query {'ok', 'junk'}.
    """
    n_q = len(gnd)
    aps, prs = np.zeros(n_q), np.zeros((n_q, len(kappas)))
    m_ap, m_pr, n_empty = 0.0, np.zeros(len(kappas)), 0
    for i in range(n_q):
        ok = np.asarray(gnd[i]["ok"])
        if ok.shape[0] == 0:
            aps[i], prs[i, :] = np.nan, np.nan
            n_empty += 1
            continue
        junk = np.asarray(gnd[i].get("junk", []))
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], ok)]
        junk_pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], junk)]
        n_junk_before, ij = 0, 0
        for ip in range(len(pos)):
            while ij < len(junk_pos) and pos[ip] > junk_pos[ij]:
                n_junk_before += 1
                ij += 1
            pos[ip] -= n_junk_before
        ap = 0.0
        for j, rank in enumerate(pos):
            precision_0 = 1.0 if rank == 0 else float(j) / rank
            precision_1 = float(j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) * (1.0 / len(ok)) / 2.0
        aps[i] = ap
        m_ap += ap
        pos = pos + 1  # 1-based
        for j, k in enumerate(kappas):
            kq = min(pos.max(), k)
            prs[i, j] = (pos <= kq).sum() / kq
        m_pr += prs[i]
    return m_ap / (n_q - n_empty), aps, m_pr / (n_q - n_empty), prs


def revisitop_ranks(scores):
    """(n_q, n_db) scores → (n_db, n_q) ranks. revisitop sorts ``-scores`` with np.argsort, whose
    order among ties is unspecified; a stable sort fixes it to the lower database index first,
    the order fastap defines. Sorting the reversed row ascending avoids negating (unsigned
    integers, -0.0)."""
    s = np.asarray(scores)
    n_db = s.shape[1]
    return (n_db - 1 - np.argsort(s[:, ::-1], axis=1, kind="stable")[:, ::-1]).T


def revisitop_gnd(gnd, setup):
    """The per-setup ground truth as revisitop builds it: 'ok' and 'junk' concatenated lists."""
    ok_keys, junk_keys = SETUPS[setup]
    return [{"ok": np.concatenate([np.asarray(q[k], dtype=np.int64) for k in ok_keys]),
             "junk": np.concatenate([np.asarray(q[k], dtype=np.int64) for k in junk_keys])}
            for q in gnd]


def assert_matches_revisitop(got, expected):
    """fastap's (mAP, APs, mP@k, P@k) in fractions against revisitop's: the same up to the order
    of floating-point additions."""
    assert got[0] == pytest.approx(expected[0], abs=1e-12)
    for a, b in zip(got[1:], expected[1:]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)  # NaN where no positives


TIE_KINDS = ["quarter_steps", "signed_zeros", "int16_levels", "uint8_levels", "float16",
             "bfloat16", "float64_eighths"]


def tied_scores(kind, gnd, n_db, n_distractors, seed):
    """(n_q, n_db + n_distractors) scores where positives, junk, negatives and distractors share
    scores: Gaussian scores with positives and junk lifted (so APs spread over [0, 1]), then
    quantised or stored at low precision."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((len(gnd), n_db + n_distractors))
    for i, q in enumerate(gnd):
        s[i, q["easy"]] += 2.5
        s[i, q["hard"]] += 1.5
        s[i, q["junk"]] += 2.0
    if kind == "quarter_steps":
        return (np.round(s * 4) / 4).astype(np.float32)
    if kind == "signed_zeros":  # -0.0 and +0.0 mixed: equal scores
        s = np.round(s).astype(np.float32)
        s[(s == 0) & (rng.random(s.shape) < 0.5)] = -0.0
        return s
    if kind == "int16_levels":
        return np.round(s * 3).astype(np.int16)
    if kind == "uint8_levels":
        return np.clip(np.round(s * 20) + 100, 0, 255).astype(np.uint8)
    if kind == "float16":
        return s.astype(np.float16)
    if kind == "bfloat16":  # 8 significant bits
        return torch.from_numpy(s).to(torch.bfloat16)
    assert kind == "float64_eighths"
    return np.round(s * 8) / 8


@pytest.mark.parametrize("kind", TIE_KINDS)
def test_real_gnd_with_ties_and_distractors_matches_revisitop(cfg, kind):
    gnd = cfg["gnd"]
    n_db = len(cfg["imlist"])
    scores = tied_scores(kind, gnd, n_db, n_distractors=6000, seed=TIE_KINDS.index(kind))
    # the oracle sorts the scores themselves (bfloat16 widens to float32 exactly)
    plain = scores.float().numpy() if isinstance(scores, torch.Tensor) else scores
    medium_ok = [np.concatenate([q["easy"], q["hard"]]).astype(np.int64) for q in gnd]
    shared = [np.isin(plain[i, ok], np.delete(plain[i], ok)).mean() for i, ok in
              enumerate(medium_ok)]
    assert np.mean(shared) > 0.3  # many positives share their score with a non-positive
    ranks = revisitop_ranks(plain)
    result = ev.evaluate_revisited(scores, cfg)
    for setup in SETUPS:
        expected = revisitop_compute_map(ranks, revisitop_gnd(gnd, setup))
        lists = revisitop_gnd(gnd, setup)
        assert_matches_revisitop(ev.compute_map_from_scores(scores, lists), expected)
        got = result[setup]
        assert_matches_revisitop((got["mAP"] / 100, got["APs"] / 100,
                                  np.array(got["mP@k"]) / 100, got["P@k"] / 100), expected)
    aps = revisitop_compute_map(ranks, revisitop_gnd(gnd, "medium"))[1]
    assert np.ptp(aps) > 0.2  # rankings differ from query to query: not all-or-nothing


def test_real_gnd_continuous_scores_match_revisitop(cfg):
    # float32 scores without planned ties (the usual case), distractors interleaved
    gnd = cfg["gnd"]
    rng = np.random.default_rng(21)
    scores = tied_scores("float64_eighths", gnd, len(cfg["imlist"]), 6000, seed=21)
    scores = (scores + rng.standard_normal(scores.shape)).astype(np.float32)
    ranks = revisitop_ranks(scores)
    result = ev.evaluate_revisited(scores, cfg)
    for setup in SETUPS:
        expected = revisitop_compute_map(ranks, revisitop_gnd(gnd, setup))
        assert result[setup]["mAP"] == pytest.approx(100 * expected[0], abs=1e-10)
        np.testing.assert_allclose(result[setup]["APs"], 100 * expected[1], rtol=0, atol=1e-10)
        np.testing.assert_allclose(result[setup]["P@k"], 100 * expected[3], rtol=0, atol=1e-10)


# Scores at the edges of each dtype, drawn with repetition so that they tie: infinities, signed
# zeros, denormals, neighbouring floats, and integers beyond 2**53 that float64 cannot tell apart.
EDGE_SCORES = {
    "float32": np.array([-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0,
                         np.nextafter(np.float32(1), np.float32(2)), 3e38, np.inf],
                        dtype=np.float32),
    "float64": np.array([-np.inf, -1e308, -5e-324, -0.0, 0.0, 5e-324, 1.0,
                         np.nextafter(1.0, 2.0), 1e308, np.inf]),
    "float16": np.array([-np.inf, -65504, -0.0, 0.0, 6e-8, 1, np.inf], dtype=np.float16),
    "int64": np.array([-2**63, -1, 0, 2**62, 2**62 + 1, 2**62 + 2, 2**62 + 1000, 2**63 - 1],
                      dtype=np.int64),
    "uint64": np.array([0, 1, 2**64 - 3000, 2**64 - 2, 2**64 - 1], dtype=np.uint64),
    "int8": np.array([-128, -1, 0, 1, 127], dtype=np.int8),
}


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_edge_scores_match_revisitop(data):
    dtype = data.draw(st.sampled_from(sorted(EDGE_SCORES)))
    n_q = data.draw(st.integers(1, 3))
    n_db = data.draw(st.integers(1, 60))
    pool = EDGE_SCORES[dtype]
    picks = data.draw(st.lists(st.integers(0, pool.size - 1), min_size=n_q * n_db,
                               max_size=n_q * n_db))
    scores = pool[np.array(picks)].reshape(n_q, n_db)
    index = st.integers(0, n_db - 1)
    gnd = [{"ok": np.array(data.draw(st.lists(index, max_size=n_db, unique=True)), dtype=np.int64),
            "junk": np.array(data.draw(st.lists(index, max_size=n_db, unique=True)),
                             dtype=np.int64)}
           for _ in range(n_q)]
    if all(q["ok"].size == 0 for q in gnd):
        gnd[0]["ok"] = np.array([0])
    expected = revisitop_compute_map(revisitop_ranks(scores), gnd)
    assert_matches_revisitop(ev.compute_map_from_scores(scores, gnd), expected)


@pytest.mark.parametrize("case", ["int64_beyond_2_53", "positives_at_the_bottom", "one_score",
                                  "adjacent_floats"])
def test_counting_corner_cases_at_scale(case):
    """50,000 database images where placing scores by value alone is ambiguous: integers that
    float64 rounds together, every positive tied at the lowest score, a single score value, two
    neighbouring float32 values."""
    rng = np.random.default_rng(3)
    n_q, n_db = 2, 50_000
    if case == "int64_beyond_2_53":  # float64 steps by 1024 here: runs of ints round together
        scores = 2**62 + rng.integers(0, 2**20, (n_q, n_db))
    elif case == "positives_at_the_bottom":
        scores = rng.random((n_q, n_db), dtype=np.float32)
    elif case == "one_score":
        scores = np.full((n_q, n_db), 0.5, dtype=np.float32)
    else:
        one = np.float32(1)
        scores = np.where(rng.random((n_q, n_db)) < 0.5, one, np.nextafter(one, np.float32(2)))
    gnd = [{"ok": rng.choice(n_db, 300, replace=False),
            "junk": rng.choice(n_db, 100, replace=False)} for _ in range(n_q)]
    if case == "positives_at_the_bottom":
        for i, q in enumerate(gnd):
            scores[i, q["ok"][:100]] = scores[i].min()
    expected = revisitop_compute_map(revisitop_ranks(scores), gnd)
    assert_matches_revisitop(ev.compute_map_from_scores(scores, gnd), expected)


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
    (5, torch.float32), (5, torch.int64),          # few values: every score ties with a positive
    (2000, torch.float32), (2000, torch.int32),    # many tied values
    (2000, torch.float64), (2000, torch.int64),
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
    a = ev.compute_map(stable_ranking(scores), gnd, KAPPAS)
    b = ev.compute_map_from_scores(scores, gnd)
    assert a[0] == pytest.approx(b[0], abs=1e-12)
    np.testing.assert_allclose(a[1], b[1], atol=1e-12)
    np.testing.assert_allclose(a[3], b[3], atol=1e-12)


def test_small_int_dtypes_and_special_floats():
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
        a = ev.compute_map(ranks, gnd, KAPPAS)
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


def test_default_kappas_are_those_of_revisitop():
    """revisitop's compute_map(ranks, gnd, kappas=[]) returns an empty mP@k and an (n_q, 0) P@k;
    a call copied from it gets the same shapes (fastap's compute_map once defaulted to 1, 5,
    10)."""
    ranks = np.array([[0, 1], [1, 0], [2, 2]])
    gnd = [{"ok": [0]}, {"ok": [1]}]
    m_ap, aps, mpk, pks = ev.compute_map(ranks, gnd)
    assert m_ap == pytest.approx(1.0)
    assert aps.shape == (2,) and mpk.shape == (0,) and pks.shape == (2, 0)
