"""Exact retrieval evaluation: the Revisited Oxford/Paris protocol (docs/evaluation.md).

Two paths give the same numbers:

- :func:`compute_map` takes explicit rankings, with the signature and results of the official
  revisitop ``compute_map``, so scripts written for it can switch.
- :func:`compute_map_from_scores` (used by :func:`evaluate_revisited` and
  :func:`evaluate_original`) takes the (n_q, n_db) score matrix and never materialises a ranking.
  Only the positions of the positives and junk images matter, and those are counts:

      position(p) = #{j : s_j > s_p} + #{j < p : s_j = s_p},

  i.e. the position of p in ``torch.sort(scores, descending=True, stable=True)`` (ties go to the
  lower database index). Neither term needs the row sorted: only the few scores of the query's
  positives and junk are sorted, and a few linear passes over the row count the scores above each
  of them (a binary search among them only for the scores that fall right next to one); the
  second term is only computed for scores that actually occur more than once.

Per query, with r_0 < r_1 < … the 0-based ranks of the positives once junk images are removed
from the ranking and n⁺ the number of positives:

    AP   = (1/n⁺) Σ_j ½ (p0_j + p1_j),   p0_j = 1 if r_j = 0 else j/r_j,   p1_j = (j+1)/(r_j+1)
    P@k  = #{j : r_j + 1 ≤ k_q} / k_q,   k_q = min(r_last + 1, k)

Queries without positives get AP = P@k = NaN and are left out of the means.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["compute_map", "compute_map_from_scores", "evaluate_revisited", "evaluate_original",
           "REVISITED_SETUPS"]

ArrayLike = Union[Tensor, np.ndarray, Sequence]

#: Positive and junk lists of each Revisited setup, as unions of the ground truth's lists.
REVISITED_SETUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}

# --------------------------------------------------------------------------------------------
# argument checks


def _check_kappas(kappas: Iterable[int]) -> tuple[int, ...]:
    if isinstance(kappas, (str, bytes)) or not isinstance(kappas, Iterable):
        raise TypeError(f"kappas must be a sequence of positive integers, got {kappas!r}")
    out = []
    for k in kappas:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k <= 0:
            raise ValueError(f"kappas must be a sequence of positive integers, got {kappas!r}")
        out.append(int(k))
    return tuple(out)


def _query_list(gnd: Any) -> tuple[Sequence[Mapping], int | None]:
    """The per-query list of a ground truth, and the database size when it is known.

    Accepts the per-query list itself or the whole ``gnd_<dataset>.pkl`` dict.
    """
    n_db = None
    if isinstance(gnd, Mapping):
        if "gnd" not in gnd:
            raise ValueError("gnd must be the list of per-query dicts or the ground-truth dict "
                             f"with a 'gnd' entry; got a dict with keys {sorted(gnd)}")
        if "imlist" in gnd:
            n_db = len(gnd["imlist"])
        gnd = gnd["gnd"]
    if isinstance(gnd, (str, bytes)) or not isinstance(gnd, Sequence):
        raise TypeError(f"gnd must be a list of per-query dicts, got {type(gnd).__name__}")
    for i, q in enumerate(gnd):
        if not isinstance(q, Mapping):
            raise TypeError(f"gnd[{i}] must be a dict, got {type(q).__name__}")
    return gnd, n_db


def _indices(q: Mapping, key: str, i: int, n_db: int, db_arg: str,
             required: bool = True) -> np.ndarray:
    if key not in q:
        if required:
            raise ValueError(f"gnd[{i}] has no {key!r} list (keys: {sorted(q)})")
        return np.empty(0, dtype=np.int64)
    a = q[key]
    if isinstance(a, Tensor):
        a = a.detach().cpu()
    a = np.asarray(a)
    if a.size == 0:
        return np.empty(0, dtype=np.int64)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"gnd[{i}][{key!r}] must be a 1-D list of integer database indices, "
                         f"got dtype {a.dtype} and shape {a.shape}")
    a = a.astype(np.int64, copy=False)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= n_db:
        bad = lo if lo < 0 else hi
        raise ValueError(f"gnd[{i}][{key!r}] holds database index {bad}, outside [0, {n_db}) "
                         f"given by {db_arg}")
    return a


def _setup_lists(queries: Sequence[Mapping], setups: Mapping[str, tuple[tuple[str, ...],
                 tuple[str, ...]]], n_db: int, db_arg: str, optional: Iterable[str] = ()
                 ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per setup, per query: (positive list, junk list) as int64 arrays (duplicates kept)."""
    optional = set(optional)
    out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in setups}
    for i, q in enumerate(queries):
        cache = {}
        for name, (ok_keys, junk_keys) in setups.items():
            for key in ok_keys + junk_keys:
                if key not in cache:
                    cache[key] = _indices(q, key, i, n_db, db_arg, required=key not in optional)
            out[name].append((np.concatenate([cache[k] for k in ok_keys]),
                              np.concatenate([cache[k] for k in junk_keys])))
    return out


def _check_shape(shape: tuple[int, ...], arg: str, n_q: int, layout: str) -> None:
    if len(shape) != 2:
        raise ValueError(f"{arg} must be 2-D {layout}, got shape {tuple(shape)}")
    q_axis = 1 if arg == "ranks" else 0
    if shape[q_axis] != n_q:
        hint = ""
        if shape[1 - q_axis] == n_q:
            hint = " (it looks transposed)"
        raise ValueError(f"{arg} has shape {tuple(shape)}, expected {layout} with n_q = "
                         f"len(gnd) = {n_q}{hint}")


# --------------------------------------------------------------------------------------------
# per-query metrics from positions


def _ap_and_precision(pos: np.ndarray, junk_pos: np.ndarray, n_pos: int,
                      kappas: tuple[int, ...]) -> tuple[float, np.ndarray]:
    """Trapezoidal AP and P@k of one query.

    pos: positions (0-based, junk included) of the distinct positives in the ranking;
    junk_pos: positions of the distinct junk images; n_pos: the normaliser (the length of the
    ground truth's positive list, as the official code uses).
    """
    pos = np.sort(pos)
    # A junk image at a positive's own position is that positive (listed as both): the official
    # code removes only junk strictly before it, hence side='left'.
    r = (pos - np.searchsorted(np.sort(junk_pos), pos, side="left")).astype(np.float64)
    j = np.arange(r.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(r == 0, 1.0, j / r)
    p1 = (j + 1.0) / (r + 1.0)
    ap = float(np.sum(0.5 * (p0 + p1))) / n_pos
    r1 = r + 1.0
    last = float(r1.max())
    prec = np.empty(len(kappas), dtype=np.float64)
    for t, k in enumerate(kappas):
        kq = min(last, float(k))
        prec[t] = np.count_nonzero(r1 <= kq) / kq
    return ap, prec


def _evaluate(n_q: int, positions: Callable[[int, np.ndarray], np.ndarray],
              setups: dict[str, list[tuple[np.ndarray, np.ndarray]]],
              kappas: tuple[int, ...]) -> dict[str, tuple[float, np.ndarray, np.ndarray,
                                                           np.ndarray]]:
    """(mAP, APs, mP@k, P@k) per setup, in fractions; ``positions(i, items)`` gives the 0-based
    positions of the sorted distinct database indices ``items`` in query i's ranking."""
    aps = {name: np.full(n_q, np.nan) for name in setups}
    prs = {name: np.full((n_q, len(kappas)), np.nan) for name in setups}
    for i in range(n_q):
        lists = [setups[name][i] for name in setups]
        items = np.unique(np.concatenate([a for pair in lists for a in pair]))
        item_pos = positions(i, items)
        for name, (ok, junk) in zip(setups, lists):
            if ok.size == 0:
                continue
            pos = item_pos[np.searchsorted(items, np.unique(ok))]
            junk_pos = item_pos[np.searchsorted(items, np.unique(junk))]
            aps[name][i], prs[name][i] = _ap_and_precision(pos, junk_pos, ok.size, kappas)
    out = {}
    for name in setups:
        valid = ~np.isnan(aps[name])
        if valid.any():
            m_ap = float(aps[name][valid].mean())
            m_pr = prs[name][valid].mean(axis=0)
        else:
            m_ap, m_pr = float("nan"), np.full(len(kappas), np.nan)
        out[name] = (m_ap, aps[name], m_pr, prs[name])
    return out


# --------------------------------------------------------------------------------------------
# positions from explicit rankings


def _as_ranks(ranks: ArrayLike) -> np.ndarray:
    if isinstance(ranks, Tensor):
        ranks = ranks.detach().cpu().numpy()
    ranks = np.asarray(ranks)
    if ranks.dtype.kind not in "iu":
        raise TypeError(f"ranks must hold integer database indices, got dtype {ranks.dtype}")
    return ranks


def _rank_positions(ranks: np.ndarray) -> Callable[[int, np.ndarray], np.ndarray]:
    n_db = ranks.shape[0]
    arange = np.arange(n_db, dtype=np.int64)

    def positions(i: int, items: np.ndarray) -> np.ndarray:
        inv = np.full(n_db, -1, dtype=np.int64)
        inv[ranks[:, i]] = arange
        if (inv < 0).any():
            # n_db entries in [0, n_db) that miss a value must repeat another one
            missing = int(np.flatnonzero(inv < 0)[0])
            raise ValueError(f"ranks[:, {i}] is not a permutation of 0..{n_db - 1}: database "
                             f"index {missing} is missing")
        return inv[items]

    return positions


def compute_map(ranks: ArrayLike, gnd: Sequence[Mapping], kappas: Iterable[int] = ()
                ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    r"""mAP and mP@k of explicit rankings (the official revisitop ``compute_map``).

    Per query i with positives ``gnd[i]['ok']`` and junk ``gnd[i].get('junk', [])``: remove the
    junk images from the ranking, let r_0 < r_1 < … be the 0-based ranks of the positives left and
    n⁺ = ``len(gnd[i]['ok'])``; then

        AP_i  = (1/n⁺) Σ_j ½ (p0_j + p1_j),  p0_j = 1 if r_j = 0 else j/r_j,  p1_j = (j+1)/(r_j+1)
        P@k_i = #{j : r_j + 1 ≤ k_q} / k_q,  k_q = min(r_last + 1, k).

    A query without positives gets AP_i = P@k_i = NaN and is left out of the means. (As in the
    official code, an index listed both as positive and junk is ranked as a positive and removed
    as junk for the positives after it.)

    Args:
        ranks: (n_db, n_q) integer array or tensor; column i lists all database indices for query
            i by decreasing similarity (a permutation of 0..n_db-1).
        gnd: list of n_q dicts with ``ok`` (and optionally ``junk``) lists of database indices.
        kappas: the k of P@k, positive integers; none by default, as in revisitop's
            ``compute_map(ranks, gnd, kappas=[])`` (``evaluate_revisited`` reports 1, 5, 10).

    Returns:
        ``(mAP, APs, mP@k, P@k)`` as fractions: a float, an (n_q,) array, a (len(kappas),) array
        and an (n_q, len(kappas)) array (float64; NaN rows for queries without positives).
    """
    kappas = _check_kappas(kappas)
    queries, _ = _query_list(gnd)
    ranks = _as_ranks(ranks)
    _check_shape(ranks.shape, "ranks", len(queries), "(n_db, n_q)")
    n_db = ranks.shape[0]
    if ranks.size and (int(ranks.min()) < 0 or int(ranks.max()) >= n_db):
        raise ValueError(f"ranks must hold database indices in [0, n_db) = [0, {n_db}), got "
                         f"values in [{int(ranks.min())}, {int(ranks.max())}]")
    setups = _setup_lists(queries, {"ok": (("ok",), ("junk",))}, n_db,
                          f"ranks.shape[0] = {n_db}", optional=("junk",))
    return _evaluate(len(queries), _rank_positions(ranks), setups, kappas)["ok"]


# --------------------------------------------------------------------------------------------
# positions from scores


def _score_rows(scores: ArrayLike) -> tuple[tuple[int, int], Callable[[int], np.ndarray]]:
    """Shape of ``scores`` and a function giving row i as a CPU numpy array that compares fast."""
    if isinstance(scores, Tensor):
        if scores.dtype == torch.bool or scores.is_complex():
            raise TypeError(f"scores must be real numbers, got dtype {scores.dtype}")
        t = scores.detach()
        # half and bfloat16 widen exactly; numpy has no bfloat16 and compares float32 faster
        dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype

        def row(i: int) -> np.ndarray:
            return t[i].to(device="cpu", dtype=dtype).contiguous().numpy()

        return tuple(t.shape), row
    a = np.asarray(scores)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"scores must be real numbers, got dtype {a.dtype}")

    def row(i: int) -> np.ndarray:
        r = np.ascontiguousarray(a[i])
        return r.astype(np.float32) if r.dtype == np.float16 else r

    return a.shape, row


# Cells per probe in the grid of `_count_probes_below`: more cells leave fewer scores sharing a
# cell with a probe (those need a binary search) but make the per-cell tables larger.
_CELLS_PER_PROBE = 64
_MAX_CELLS = 1 << 16


def _count_probes_below(probes: np.ndarray, row: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How many scores of ``row`` have exactly k of the sorted distinct ``probes`` below them,
    for k = 0..P, as a (P + 1,) histogram; and the indices of the scores that may equal a probe
    with, for each, its number of probes below (``np.searchsorted(probes, s, side='left')``).

    A binary search per score costs about as much as sorting the row. Instead each score goes to
    a cell of an equal-width grid over the probes' range, f(s) = ⌊clip((s - origin) · scale)⌋.
    Every step of f is non-decreasing whatever the rounding, so f(p) < f(s) implies p < s and
    f(p) > f(s) implies p > s: a score in a cell without a probe has exactly the probes of the
    lower cells below it and equals none. Only scores sharing a cell with a probe need another
    look: one comparison where the cell holds one probe, a binary search where it holds more.
    """
    n_cells = min(_CELLS_PER_PROBE * probes.size, _MAX_CELLS)
    # float32 rows keep float32 arithmetic: half the memory traffic of float64
    work = np.float32 if row.dtype == np.float32 else np.float64
    lo, hi = np.float64(probes[0]), np.float64(probes[-1])
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scale = work(n_cells / (hi - lo))
        origin = work(lo - 1.0 / scale)  # cell 0 gathers the scores below lo
    if not (np.isfinite(scale) and scale > 0 and np.isfinite(origin)):
        # one probe, an infinite one, or a range too narrow (or wide) for a grid
        below = np.searchsorted(probes, row, side="left")
        return np.bincount(below, minlength=probes.size + 1), np.arange(row.shape[0]), below

    top = n_cells + 2  # the top cell gathers the scores far above hi

    def cell(x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # overflow to ±inf keeps the order; clipped below
            c = np.subtract(x, origin, dtype=work)
            c *= scale
        np.clip(c, 0, top, out=c)
        return c.astype(np.intp)

    probe_cell = cell(probes)
    row_cell = cell(row)
    per_cell = np.bincount(row_cell, minlength=top + 1)
    probes_in_cell = np.bincount(probe_cell, minlength=top + 1)
    holds_probe = probes_in_cell > 0
    # cells without a probe: all their scores have the probes of the lower cells below them
    below_cell = np.searchsorted(probe_cell, np.arange(top + 1), side="left")
    hist = np.bincount(below_cell[~holds_probe], weights=per_cell[~holds_probe],
                       minlength=probes.size + 1).astype(np.int64)
    unsure = np.flatnonzero(holds_probe[row_cell])
    scores, cells = row[unsure], row_cell[unsure]
    # a cell with one probe: one comparison with it; a crowded cell: a binary search
    unsure_below = below_cell[cells]
    unsure_below += scores > probes[unsure_below]
    crowded = np.flatnonzero(probes_in_cell[cells] > 1)
    unsure_below[crowded] = np.searchsorted(probes, scores[crowded], side="left")
    hist += np.bincount(unsure_below, minlength=probes.size + 1)
    return hist, unsure, unsure_below


def _stable_positions(row: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Positions of the distinct database indices ``items`` in the stable descending order of
    ``row``: #{j : s_j > s_p} + #{j < p : s_j = s_p}, without sorting the row.

    Only the items' own scores are sorted (the probes: usually a few hundred). One pass over the
    row counts how many probes lie below each score; the cumulative sum of those counts is the
    number of scores above each probe. The equal-score term needs only the scores equal to a
    probe, usually just the items themselves.
    """
    n = row.shape[0]
    # np.unique and the comparisons below treat -0.0 and +0.0 as one score, as torch.sort does
    probes, probe_of_item = np.unique(row[items], return_inverse=True)
    hist, unsure, unsure_below = _count_probes_below(probes, row)
    # s_j > probes[t] exactly when more than t probes lie below s_j
    pos = (n - np.cumsum(hist[:probes.size]))[probe_of_item]

    # s_j equals probes[k] if any, k its number of probes below; past the last probe, s_j > all
    equal = probes[np.minimum(unsure_below, probes.size - 1)] == row[unsure]
    equal_probe, equal_index = unsure_below[equal], unsure[equal]
    n_equal = np.bincount(equal_probe, minlength=probes.size)
    shared = n_equal[probe_of_item] > 1  # another image has exactly this item's score
    if not shared.any():
        return pos
    tied = n_equal[equal_probe] > 1
    probe, index = equal_probe[tied], equal_index[tied]
    # (probe, database index) keys in ascending order: the images sharing an item's score and
    # coming before it lie between (probe, 0) and (probe, item). The indices already ascend, so a
    # stable sort by probe orders the keys (a radix sort where probe numbers fit 16 bits).
    order = np.argsort(probe.astype(np.uint16) if probes.size <= 1 << 16 else probe,
                       kind="stable")
    keys = probe[order].astype(np.int64) * n + index[order]
    start = probe_of_item[shared].astype(np.int64) * n
    pos[shared] += np.searchsorted(keys, start + items[shared]) - np.searchsorted(keys, start)
    return pos


def _scores_positions(row: Callable[[int], np.ndarray]
                      ) -> Callable[[int, np.ndarray], np.ndarray]:
    def positions(i: int, items: np.ndarray) -> np.ndarray:
        r = row(i)
        if r.dtype.kind == "f" and np.isnan(r).any():
            j = int(np.flatnonzero(np.isnan(r))[0])
            raise ValueError(f"scores[{i}, {j}] is NaN; NaN scores have no rank")
        if items.size == 0:
            return np.empty(0, dtype=np.int64)
        return _stable_positions(r, items)

    return positions


def _scores_setups(scores: ArrayLike, gnd: Any, setups, optional=()):
    queries, n_imlist = _query_list(gnd)
    shape, row = _score_rows(scores)
    _check_shape(shape, "scores", len(queries), "(n_q, n_db)")
    n_db = shape[1]
    if n_imlist is not None and n_db < n_imlist:
        raise ValueError(f"scores has shape {tuple(shape)} but gnd's imlist has {n_imlist} "
                         "database images; distractors may only be appended after them")
    lists = _setup_lists(queries, setups, n_db, f"scores.shape[1] = {n_db}", optional)
    return len(queries), _scores_positions(row), lists


def compute_map_from_scores(scores: ArrayLike, gnd: Sequence[Mapping],
                            kappas: Iterable[int] = (1, 5, 10)
                            ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    r""":func:`compute_map` computed from scores, without ranking the database.

    The ranking is that of ``torch.sort(scores, dim=1, descending=True, stable=True)`` (ties go to
    the lower database index), so the result equals
    ``compute_map(that.indices.T, gnd, kappas)``; only the positions

        position(p) = #{j : s_j > s_p} + #{j < p : s_j = s_p}

    of the positives and junk images are computed, by counting the scores above them (the row is
    never sorted).

    Args:
        scores: (n_q, n_db) similarities (tensor on any device, or numpy), higher is better;
            NaN is an error. Database columns beyond the ground truth's indices are distractors.
        gnd: list of n_q dicts with ``ok`` (and optionally ``junk``) lists of database indices,
            or a dict with such a list under ``'gnd'``.
        kappas: the k of P@k, positive integers.

    Returns:
        ``(mAP, APs, mP@k, P@k)`` as fractions, shaped as in :func:`compute_map`.
    """
    kappas = _check_kappas(kappas)
    n_q, positions, lists = _scores_setups(scores, gnd, {"ok": (("ok",), ("junk",))},
                                           optional=("junk",))
    return _evaluate(n_q, positions, lists, kappas)["ok"]


def _percent(result: tuple[float, np.ndarray, np.ndarray, np.ndarray],
             kappas: tuple[int, ...]) -> dict[str, Any]:
    m_ap, aps, m_pr, prs = result
    return {"mAP": 100.0 * m_ap, "mP@k": [100.0 * float(p) for p in m_pr],
            "kappas": list(kappas), "APs": 100.0 * aps, "P@k": 100.0 * prs}


def evaluate_revisited(scores: ArrayLike, gnd: Any, kappas: Iterable[int] = (1, 5, 10)
                       ) -> dict[str, dict[str, Any]]:
    r"""Revisited Oxford/Paris evaluation (Easy/Medium/Hard) of a score matrix, in percent.

    Setups (everything else is a negative):

    ========  =================  =================
    setup     positives          junk
    ========  =================  =================
    easy      easy               junk + hard
    medium    easy + hard        junk
    hard      hard               junk + easy
    ========  =================  =================

    Per setup and query, with junk removed from the ranking and r_j the 0-based ranks of the n⁺
    positives: AP = (1/n⁺) Σ_j ½ (p0_j + p1_j), p0_j = 1 if r_j = 0 else j/r_j,
    p1_j = (j+1)/(r_j+1); P@k = #{j : r_j + 1 ≤ k_q}/k_q with k_q = min(r_last + 1, k). Queries
    without positives (ROxford 11 and 66 in Easy) are left out of the means. The ranking is the
    stable descending sort of each score row (see :func:`compute_map_from_scores`).

    Args:
        scores: (n_q, n_db) similarities, tensor (any device) or numpy; n_db may exceed the
            ground truth's database (distractors appended after it).
        gnd: the ``gnd_<dataset>.pkl`` dict or its ``'gnd'`` list of per-query dicts with
            ``easy``, ``hard`` and (optionally) ``junk`` index lists.
        kappas: the k of mP@k.

    Returns:
        ``{"easy" | "medium" | "hard": {"mAP": float, "mP@k": [float per k], "kappas": [k...],
        "APs": (n_q,) array, "P@k": (n_q, len(kappas)) array}}``, all in percent (NaN for
        queries without positives).
    """
    kappas = _check_kappas(kappas)
    n_q, positions, lists = _scores_setups(scores, gnd, REVISITED_SETUPS, optional=("junk",))
    results = _evaluate(n_q, positions, lists, kappas)
    return {name: _percent(results[name], kappas) for name in REVISITED_SETUPS}


def evaluate_original(scores: ArrayLike, gnd: Any, kappas: Iterable[int] = (1, 5, 10)
                      ) -> dict[str, Any]:
    r"""Original Oxford5k/Paris6k protocol: one setup with ``ok`` positives and ``junk``.

    Same AP and P@k as :func:`evaluate_revisited` (junk removed, trapezoidal AP, queries without
    positives skipped), in percent.

    Args:
        scores: (n_q, n_db) similarities, tensor (any device) or numpy.
        gnd: list of per-query dicts with ``ok`` and (optionally) ``junk`` index lists, or a dict
            holding that list under ``'gnd'``.
        kappas: the k of mP@k.

    Returns:
        ``{"mAP": float, "mP@k": [...], "kappas": [...], "APs": (n_q,), "P@k": (n_q, len(kappas))}``
        in percent.
    """
    kappas = _check_kappas(kappas)
    return _percent(compute_map_from_scores(scores, gnd, kappas), kappas)
