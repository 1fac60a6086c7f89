"""An evaluation shaped like Revisited Oxford + 1M distractors, end to end, two ways side by side.

    python benchmarks/r1m_eval.py --n 1000000 --dim 2048

70 queries against an N × D float32 numpy memmap on disk whose first 4993 rows are the Oxford
images of the real ``gnd_roxford5k.pkl`` and the rest distractors. Both methods compute the
scores the same way (:func:`fastap.retrieval.compute_scores`, which streams the memmap block by
block) and then evaluate Easy/Medium/Hard:

- ``fastap``: :func:`fastap.evaluation.evaluate_revisited` on the score matrix (it counts the
  scores above each positive and junk image; nothing is sorted);
- ``revisitop``: the official revisitop method: a full ``np.argsort(-scores, axis=1)`` and its
  ``compute_map`` (copied below, ``np.in1d`` replaced by ``np.isin``).

Each method runs in a fresh process so that its peak memory is its own. Reported per method:
seconds of search, evaluation and both; ``peak_mib``, the highest anonymous resident memory of
the process (``RssAnon`` sampled every millisecond: the memmap's file pages, which the page cache
holds and can drop, are left out); ``evaluation_extra_mib``, the exact growth of the resident
set's high-water mark during the evaluation alone (``VmHWM`` reset through
``/proc/self/clear_refs`` after the memmap is closed and the heap's free pages are returned);
and ``search_hwm_mib``, the high-water mark at the end of the search, which counts the memmap's
pages. The two methods must agree on every mAP and mP@k to 1e-6 (in percent), or the
script exits with status 1 (a query's AP may differ by more where a positive ties with another
image: numpy's default argsort, which revisitop uses, orders ties arbitrarily, fastap puts the
lower database index first). It prints the CPU model and flags and writes a JSON of the results.

Descriptors (deterministic from ``--seed``): queries are random unit vectors; a database image
is Gaussian noise of norm about 1, plus, for an image in a query's easy/hard/junk list, a signal
along the weighted sum of those queries with an amplitude drawn log-uniformly per image (and
halved for hard positives), so that positives score from far above the distractors down into
them. The memmap and a sidecar JSON
(seed, shape, generator version) are written once to ``--data-dir`` and reused while they match.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# Run as a script: the repository root is appended for the shared memory probe, after the
# installed packages, so that `import fastap` still finds the installed (compiled) fastap.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
from benchmarks.peak_memory import _reset_high_water  # noqa: E402
DEFAULT_GND = Path(os.environ.get("FASTAP_REVISITOP_GND", REPO.parent / "shared/data/revisitop"))
MiB = 2**20
KAPPAS = (1, 5, 10)
SETUPS = {"easy": (("easy",), ("junk", "hard")),
          "medium": (("easy", "hard"), ("junk",)),
          "hard": (("hard",), ("junk", "easy"))}
# Changing how descriptors are generated must change this, so that cached memmaps are rebuilt.
GENERATOR_VERSION = 1
CHUNK_ROWS = 16384
# How strongly a query shows in an image it lists: the signal's direction mixes the queries by
# these weights, and its amplitude scales with the largest one (hard positives score lower).
LABEL_WEIGHTS = {"easy": 1.0, "hard": 0.5, "junk": 0.4}
# Signal norm over noise norm, log-uniform from 1/sqrt(D) (a cosine at the distractors' own
# spread: buried among a million of them) to 3 (a cosine of about 0.95).
TOP_AMPLITUDE = 3.0


# ----------------------------------------------------------------------------------------------
# revisitop's evaluation, for comparison


def revisitop_compute_map(ranks, gnd, kappas=()):
    """revisitop's ``compute_map`` (Radenović et al., the official Revisited Oxford/Paris code),
    its algorithm and loops unchanged except ``np.in1d`` → ``np.isin`` (numpy 2.4 has no in1d).

    ranks: (n_db, n_q) database indices by decreasing similarity; gnd: per query ``ok`` and
    ``junk`` arrays. Returns (mAP, APs, mP@k, P@k) as fractions; queries without positives are
    NaN and skipped.
    """
    m_ap = 0.0
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in np.arange(nq):
        qgnd = gnd[i]["ok"]
        if qgnd.shape[0] == 0:  # no positive images: skipped from the average
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        qgndj = gnd[i].get("junk", np.empty(0))
        # sorted positions of the positive and junk images (0-based)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            # lower each positive's position by the number of junk images before it
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = revisitop_compute_ap(pos, len(qgnd))
        m_ap = m_ap + ap
        aps[i] = ap
        pos += 1  # 1-based
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    m_ap = m_ap / (nq - nempty)
    pr = pr / (nq - nempty)
    return m_ap, aps, pr, prs


def revisitop_compute_ap(ranks, nres):
    """revisitop's ``compute_ap``: trapezoids of the precision-recall curve, one per positive."""
    ap = 0
    recall_step = 1.0 / nres
    for j in np.arange(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def revisitop_evaluate(scores: np.ndarray, gnd: list[dict]) -> dict:
    """revisitop's example evaluation: rank by a full argsort, then compute_map per setup."""
    ranks = np.argsort(-scores, axis=1).T  # (n_db, n_q), as revisitop's argsort(-sim, axis=0)
    out = {}
    for setup, (ok_keys, junk_keys) in SETUPS.items():
        gnd_t = [{"ok": np.concatenate([q[k] for k in ok_keys]),
                  "junk": np.concatenate([q[k] for k in junk_keys])} for q in gnd]
        m_ap, aps, m_pr, prs = revisitop_compute_map(ranks, gnd_t, KAPPAS)
        out[setup] = {"mAP": 100 * m_ap, "mP@k": list(100 * m_pr), "APs": 100 * aps}
    return out


# ----------------------------------------------------------------------------------------------
# data


def load_roxford(gnd_dir: Path) -> dict:
    from fastap.datasets.revisitop import load_gnd

    path = gnd_dir / "gnd_roxford5k.pkl"
    if not path.is_file():
        sys.exit(f"error: {path} not found; pass --gnd-dir or set FASTAP_REVISITOP_GND to the "
                 "folder holding gnd_roxford5k.pkl")
    cfg = load_gnd(path)
    cfg["md5"] = hashlib.md5(path.read_bytes()).hexdigest()
    return cfg


def make_queries(n_q: int, dim: int, seed: int) -> np.ndarray:
    q = np.random.default_rng([seed, 0]).standard_normal((n_q, dim))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def oxford_signal(cfg: dict, queries: np.ndarray, seed: int) -> np.ndarray:
    """(n_oxford, D): for each Oxford image, the weighted sum of the queries that list it as easy,
    hard or junk, scaled to its amplitude; zero for the images no query lists."""
    n_oxford, dim = len(cfg["imlist"]), queries.shape[1]
    signal = np.zeros((n_oxford, dim))
    strongest = np.zeros((n_oxford, 1))
    for q, lists in zip(queries, cfg["gnd"]):
        for label, weight in LABEL_WEIGHTS.items():
            listed = np.asarray(lists[label], dtype=np.int64)
            signal[listed] += weight * q
            strongest[listed] = np.maximum(strongest[listed], weight)
    norm = np.linalg.norm(signal, axis=1, keepdims=True)
    lo, hi = np.log(1 / np.sqrt(dim)), np.log(TOP_AMPLITUDE)
    amplitude = np.exp(np.random.default_rng([seed, 1]).uniform(lo, hi, (n_oxford, 1)))
    return (signal / np.where(norm > 0, norm, 1) * amplitude * strongest).astype(np.float32)


def descriptor_file(args, cfg: dict, queries: np.ndarray) -> tuple[Path, float]:
    """The cached memmap for these arguments, written first if absent or stale; and the seconds
    spent writing it (0 when reused)."""
    path = args.data_dir / f"r1m_descriptors_{args.n}x{args.dim}_seed{args.seed}.f32"
    sidecar = path.with_name(path.name + ".json")
    meta = {"n": args.n, "dim": args.dim, "seed": args.seed, "dtype": "float32",
            "generator_version": GENERATOR_VERSION, "chunk_rows": CHUNK_ROWS,
            "gnd_md5": cfg["md5"]}
    size = args.n * args.dim * 4
    if (path.is_file() and path.stat().st_size == size and sidecar.is_file()
            and json.loads(sidecar.read_text()) == meta):
        return path, 0.0
    args.data_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.data_dir).free + (path.stat().st_size if path.exists() else 0)
    if free < size + 2**30:
        sys.exit(f"error: {size / 1e9:.1f} GB needed in {args.data_dir}, {free / 1e9:.1f} GB free; "
                 f"at most --n {max(0, (free - 2**30) // (args.dim * 4))} fits")
    print(f"writing {path} ({size / 1e9:.2f} GB) ...", flush=True)
    start = time.perf_counter()
    signal = oxford_signal(cfg, queries, args.seed)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        for c, first in enumerate(range(0, args.n, CHUNK_ROWS)):
            rows = min(CHUNK_ROWS, args.n - first)
            chunk = np.random.default_rng([args.seed, 2, c]).standard_normal(
                (rows, args.dim), dtype=np.float32)
            chunk *= np.float32(1 / np.sqrt(args.dim))  # noise of norm about 1
            oxford = max(0, min(rows, signal.shape[0] - first))
            chunk[:oxford] += signal[first:first + oxford]
            chunk.tofile(f)
    os.replace(partial, path)
    sidecar.write_text(json.dumps(meta, indent=1) + "\n")
    return path, time.perf_counter() - start


def read_through(path: Path) -> float:
    """Read the file once so that both methods find it in the page cache; seconds taken."""
    start = time.perf_counter()
    buf = bytearray(64 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# one method, in a fresh process


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class AnonPeak:
    """Highest RssAnon seen by a thread polling /proc/self/status every millisecond (large numpy
    and torch buffers live far longer than that)."""

    def __init__(self):
        self.peak_kib = _status_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.wait(0.001):
            self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))


def run_method(args) -> dict:
    import torch

    from fastap.evaluation import evaluate_revisited
    from fastap.retrieval import compute_scores

    cfg = load_roxford(args.gnd_dir)
    queries = make_queries(len(cfg["qimlist"]), args.dim, args.seed)
    path = args.data_dir / f"r1m_descriptors_{args.n}x{args.dim}_seed{args.seed}.f32"
    if args.method == "fastap":
        def evaluate(scores):
            return evaluate_revisited(scores, cfg)
    else:
        def evaluate(scores):
            return revisitop_evaluate(scores.numpy(), cfg["gnd"])

    # warm-up on the Oxford rows: library loading and thread pools are not part of the timings
    warm = np.memmap(path, dtype=np.float32, mode="r", shape=(args.n, args.dim))
    evaluate(compute_scores(queries, warm[:len(cfg["imlist"])]))
    del warm
    baseline_kib = _status_kib("RssAnon")
    with AnonPeak() as peak:
        start = time.perf_counter()
        database = np.memmap(path, dtype=np.float32, mode="r", shape=(args.n, args.dim))
        scores = compute_scores(queries, database)
        searched = time.perf_counter()
        search_hwm_kib = _status_kib("VmHWM")
        del database  # unmaps the file: its pages leave the resident set
        _return_free_heap()
        reset = _reset_high_water()
        rss_before_eval = _status_kib("VmRSS")
        eval_start = time.perf_counter()
        results = evaluate(scores)
        done = time.perf_counter()
        eval_extra_kib = _status_kib("VmHWM") - rss_before_eval
    return {
        "method": args.method,
        "search_s": searched - start, "evaluation_s": done - eval_start,
        "total_s": done - start,
        "peak_mib": peak.peak_kib / 1024, "baseline_mib": baseline_kib / 1024,
        "evaluation_extra_mib": eval_extra_kib / 1024 if reset else None,
        "search_hwm_mib": search_hwm_kib / 1024,
        "torch_threads": torch.get_num_threads(),
        "results": {s: {"mAP": float(r["mAP"]), "mP@k": [float(p) for p in r["mP@k"]],
                        "APs": [float(a) for a in r["APs"]]} for s, r in results.items()},
    }


def _return_free_heap() -> None:
    """Give the heap's free pages back to the system (glibc keeps them otherwise), so that the
    evaluation's growth of the resident set is its own working memory, not reuse of pages the
    search freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------
# the driver


def cpu_description() -> dict:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"]
    return {"model": model, "cores": os.cpu_count(),
            "flags": {name: name in flags for name in wanted}}


def largest_difference(a: dict, b: dict, keys: tuple[str, ...]) -> float:
    """Largest |difference| between the two methods' values under ``keys`` over the setups
    (percent); infinite where one method skips a query that the other scores."""
    worst = 0.0
    for setup in SETUPS:
        for key in keys:
            for x, y in zip(np.atleast_1d(a[setup][key]), np.atleast_1d(b[setup][key])):
                if np.isnan(x) != np.isnan(y):
                    return float("inf")
                if not np.isnan(x):
                    worst = max(worst, abs(float(x) - float(y)))
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="database rows (default 1M)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "fastap_r1m",
                        help="where the memmap and its sidecar are cached")
    parser.add_argument("--gnd-dir", type=Path, default=DEFAULT_GND)
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default: <data-dir>/r1m_eval_<n>x<dim>.json)")
    parser.add_argument("--method", choices=["fastap", "revisitop"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.method:  # the child: one method, results as one JSON line
        print(json.dumps(run_method(args)))
        return 0

    cfg = load_roxford(args.gnd_dir)
    n_oxford = len(cfg["imlist"])
    if args.n < n_oxford:
        sys.exit(f"error: --n must be at least the {n_oxford} Oxford images")
    queries = make_queries(len(cfg["qimlist"]), args.dim, args.seed)
    path, write_s = descriptor_file(args, cfg, queries)
    read_s = read_through(path)
    cpu = cpu_description()
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; {flags}")
    print(f"database: {args.n:,} x {args.dim} float32 memmap {path} "
          f"({path.stat().st_size / 1e9:.2f} GB; {n_oxford} Oxford images + "
          f"{args.n - n_oxford:,} distractors); {len(queries)} queries"
          + (f"; written in {write_s:.1f} s" if write_s else "; reused")
          + f"; read through the page cache in {read_s:.1f} s")

    runs = {}
    for method in ("fastap", "revisitop"):
        cmd = [sys.executable, __file__, "--method", method, "--n", str(args.n),
               "--dim", str(args.dim), "--seed", str(args.seed),
               "--data-dir", str(args.data_dir), "--gnd-dir", str(args.gnd_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            sys.exit(f"error: the {method} run failed ({done.returncode})")
        runs[method] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"\n{'method':<10} {'search s':>9} {'eval s':>8} {'total s':>8} {'peak MiB':>9} "
          f"{'eval extra MiB':>15} {'search VmHWM MiB':>17}")
    for method, r in runs.items():
        extra = "-" if r["evaluation_extra_mib"] is None else f"{r['evaluation_extra_mib']:.0f}"
        print(f"{method:<10} {r['search_s']:9.2f} {r['evaluation_s']:8.2f} {r['total_s']:8.2f} "
              f"{r['peak_mib']:9.0f} {extra:>15} {r['search_hwm_mib']:17.0f}")
    print("(peak: highest anonymous resident memory of the process, the memmap's page-cache "
          "pages excluded; eval extra: growth of the resident high-water mark during the "
          "evaluation; search VmHWM: resident high-water mark of the search, counting the "
          "memmap's pages it had mapped)")
    print(f"\n{'setup':<8} {'fastap mAP':>11} {'revisitop mAP':>14}")
    for setup in SETUPS:
        print(f"{setup:<8} {runs['fastap']['results'][setup]['mAP']:11.4f} "
              f"{runs['revisitop']['results'][setup]['mAP']:14.4f}")
    a, b = runs["fastap"]["results"], runs["revisitop"]["results"]
    worst = largest_difference(a, b, ("mAP", "mP@k"))
    worst_ap = largest_difference(a, b, ("APs",))
    agree = worst <= 1e-6
    print(f"largest difference in mAP and mP@k: {worst:.3g} (percent) -> "
          + ("the methods agree" if agree else "MISMATCH")
          + f"; in a query's AP: {worst_ap:.3g} (numpy's default argsort orders tied scores "
          "arbitrarily, fastap puts the lower index first)")

    out = args.json or args.data_dir / f"r1m_eval_{args.n}x{args.dim}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"cpu": cpu, "n": args.n, "dim": args.dim, "n_queries": len(queries),
              "n_oxford": n_oxford, "seed": args.seed, "memmap": str(path),
              "memmap_write_s": write_s, "page_cache_read_s": read_s,
              "max_difference_map_mpk_percent": worst, "max_difference_ap_percent": worst_ap,
              "agree": agree,
              "methods": {m: {k: v for k, v in r.items() if k != "results"} | {
                  "results": {s: {"mAP": x["mAP"], "mP@k": x["mP@k"]}
                              for s, x in r["results"].items()}} for m, r in runs.items()}}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    if not agree:
        print("error: fastap and revisitop disagree by more than 1e-6", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
