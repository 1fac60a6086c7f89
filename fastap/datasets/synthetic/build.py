"""Generation: the benchmark, the distractors and the training split, built in parallel units and
written atomically in the revisitop layout."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from .config import (FORCED_TRIES, LABEL_RULES, SUPERSAMPLE, TRIES, VERSION, PathLike, item_rng,
                     synthetic_config, view_levels)
from .landmarks import draw_landmark, family_params, instance_fingerprint, instance_params
from .scenes import label_view, render_view, sample_view

# Roles that seed the per-item random streams (never reuse a number for another purpose).
_R_FAMILY, _R_INSTANCE, _R_VIEW, _R_QUERY = 1, 2, 3, 4
_R_DISTRACTOR, _R_TRAIN_FAMILY, _R_TRAIN_INSTANCE, _R_TRAIN_VIEW = 5, 6, 7, 8
_R_ORDER, _R_DISTRACTOR_BUILDING, _R_DISTRACTOR_FAMILY = 9, 10, 11


@dataclass
class SyntheticInfo:
    """Where a generated benchmark lives and what it holds.

    ``dir`` = ``<root>/<name>`` (load it with ``RevisitedDataset(root, name)``), ``gnd_file``,
    ``image_dir`` (``dir/jpg``), ``train_list`` (``dir/train.txt``, see :func:`read_train_list`),
    ``meta_file`` (``dir/meta.json``), ``counts`` (database, views, distractors, queries,
    instances, families, train_images, train_instances, and easy/hard/junk totals),
    ``generated`` (False when an identical existing dataset was reused), ``seconds`` spent.
    """

    root: Path
    name: str
    seed: int
    config: dict[str, Any]
    counts: dict[str, int]
    generated: bool
    seconds: float
    dir: Path = field(init=False)
    gnd_file: Path = field(init=False)
    image_dir: Path = field(init=False)
    train_list: Path = field(init=False)
    meta_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir = self.root / self.name
        self.gnd_file = self.dir / f"gnd_{self.name}.pkl"
        self.image_dir = self.dir / "jpg"
        self.train_list = self.dir / "train.txt"
        self.meta_file = self.dir / "meta.json"


def read_train_list(path: PathLike) -> tuple[list[Path], list[int]]:
    """Parse a ``train.txt``: ``(absolute image paths, instance ids)`` in file order."""
    path = Path(path)
    paths, labels = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected '<path> <instance_id>', got {line!r}")
            paths.append(path.parent / parts[0])
            labels.append(int(parts[1]))
    return paths, labels


def _landmark_of(seed: int, role: int, fam_role: int, f: int, i: int, tex_height: int
                 ) -> tuple[dict, dict, Image.Image, float]:
    """Family and instance parameters, texture and its opaque fraction, from (seed, roles, f, i)."""
    fam = family_params(item_rng(seed, fam_role, f))
    rng = item_rng(seed, role, fam_role, f, i)
    inst = instance_params(fam, rng)
    tex = draw_landmark(fam, inst, tex_height, rng)
    alpha = float((np.asarray(tex.getchannel("A")) > 127).mean())
    return fam, inst, tex, alpha


def _render_for_label(rng: np.random.Generator, size: int, tex: Image.Image, alpha: float,
                      target: str, tries: int, accept: Sequence[str]
                      ) -> tuple[Image.Image, dict, dict, str]:
    last = None
    for _ in range(tries):
        v = sample_view(rng, target)
        img, meas = render_view(rng, size, tex, v, alpha)
        label = label_view(meas, v)
        last = (img, v, meas, label)
        if label in accept:
            return last
    assert last is not None
    return last


def _save_jpeg(img: Image.Image, path: Path, quality: int) -> None:
    img.save(path, "JPEG", quality=quality, optimize=False, progressive=False, subsampling=0)


def _bench_unit(out: Path, seed: int, cfg: dict[str, Any], f: int, i: int,
                names: Sequence[str], qnames: Sequence[str]) -> dict[str, Any]:
    """All database views and queries of benchmark instance (f, i)."""
    size, quality = cfg["image_size"], cfg["jpeg_quality"]
    fam, inst, tex, alpha = _landmark_of(seed, _R_INSTANCE, _R_FAMILY, f, i, _tex_height(size))
    uid = f * cfg["instances_per_family"] + i
    levels = view_levels(cfg["views_per_instance"], cfg["view_mix"])
    forced = ({levels.index(x) for x in ("easy", "hard") if x in levels} if len(levels) >= 2
              else set())
    views = []
    for k, target in enumerate(levels):
        rng = item_rng(seed, _R_VIEW, f, i, k)
        tries = FORCED_TRIES if k in forced else TRIES
        img, v, meas, label = _render_for_label(rng, size, tex, alpha, target, tries, (target,))
        if k in forced and label != target:
            raise RuntimeError(f"could not draw a {target} view of instance {uid}")
        _save_jpeg(img, out / "jpg" / f"{names[k]}.jpg", quality)
        views.append({"instance": uid, "family": f, "label": label, "target": target,
                      "visible": meas["visible"], "extent": meas["extent"],
                      "kind": fam["kind"], "view": _view_record(v)})
    queries = []
    for q, qname in enumerate(qnames):
        rng = item_rng(seed, _R_QUERY, f, i, q)
        for _ in range(FORCED_TRIES):
            v = sample_view(rng, "query")
            img, meas = render_view(rng, size, tex, v, alpha)
            if meas["bbox"] is not None and label_view(meas, v) == "easy":
                break
        else:
            raise RuntimeError(f"could not draw a query of instance {uid}")
        x1, y1, x2, y2 = meas["bbox"]
        bbx = [max(0.0, x1 - 1.0), max(0.0, y1 - 1.0), min(float(size), x2 + 1.0),
               min(float(size), y2 + 1.0)]
        _save_jpeg(img, out / "jpg" / f"{qname}.jpg", quality)
        queries.append({"instance": uid, "family": f, "bbx": bbx, "kind": fam["kind"]})
    return {"views": views, "queries": queries, "fingerprint": instance_fingerprint(fam, inst)}


def _distractor_unit(out: Path, seed: int, cfg: dict[str, Any], k0: int,
                     names: Sequence[str]) -> dict[str, Any]:
    """Distractors k0, k0 + 1, ...: clutter, or a building that is no benchmark instance."""
    size, quality = cfg["image_size"], cfg["jpeg_quality"]
    entries = []
    for k, name in enumerate(names, start=k0):
        rng = item_rng(seed, _R_DISTRACTOR, k)
        v = sample_view(rng, "easy" if rng.random() < 0.7 else "hard")
        v["occlusion"] = min(v["occlusion"], 0.3)
        v["clutter"] = float(rng.uniform(0.6, 2.0))
        what = rng.random()
        tex, alpha, kind, fp = None, 1.0, None, None
        if what < 0.6:
            # Half are new instances of the benchmark's families (hard negatives), half of
            # families of their own.
            if what < 0.3:
                fam_role, f = _R_FAMILY, int(rng.integers(cfg["families"]))
            else:
                fam_role, f = _R_DISTRACTOR_FAMILY, k
            fam, inst, tex, alpha = _landmark_of(seed, _R_DISTRACTOR_BUILDING, fam_role, f, k,
                                                 _tex_height(size))
            kind, fp = fam["kind"], instance_fingerprint(fam, inst)
        img, _ = render_view(rng, size, tex, v, alpha)
        _save_jpeg(img, out / "jpg" / f"{name}.jpg", quality)
        entries.append({"instance": -1, "family": -1, "label": "distractor", "kind": kind,
                        "fingerprint": fp})
    return {"views": entries}


def _train_unit(out: Path, seed: int, cfg: dict[str, Any], f: int, i: int) -> dict[str, Any]:
    """The training views of training instance (f, i)."""
    size, quality = cfg["image_size"], cfg["jpeg_quality"]
    fam, inst, tex, alpha = _landmark_of(seed, _R_TRAIN_INSTANCE, _R_TRAIN_FAMILY, f, i,
                                         _tex_height(size))
    uid = f * cfg["train_instances_per_family"] + i
    lines, meta = [], []
    for k in range(cfg["train_views_per_instance"]):
        rng = item_rng(seed, _R_TRAIN_VIEW, f, i, k)
        target = "hard" if rng.random() < cfg["train_hard_fraction"] else "easy"
        img, v, meas, label = _render_for_label(rng, size, tex, alpha, target, TRIES,
                                                (target, "easy", "hard"))
        rel = f"train/t{uid:04d}_{k:02d}.jpg"
        _save_jpeg(img, out / rel, quality)
        lines.append(f"{rel} {uid}\n")
        meta.append({"path": rel, "instance": uid, "family": f, "label": label,
                     "kind": fam["kind"], "visible": meas["visible"], "extent": meas["extent"],
                     "view": _view_record(v)})
    return {"lines": lines, "train": meta, "fingerprint": instance_fingerprint(fam, inst)}


def _view_record(v: dict[str, Any]) -> dict[str, float]:
    """The transformation parameters of a view, for meta.json."""
    keys = ("extent", "rotation", "yaw", "pitch", "crop", "occlusion", "blur", "gain")
    return {k: round(float(v[k]), 4) for k in keys}


def _run_unit(job: tuple) -> dict[str, Any]:
    kind, *args = job
    units = {"bench": _bench_unit, "distractors": _distractor_unit, "train": _train_unit}
    return units[kind](*args)


def _tex_height(size: int) -> int:
    return int(round(1.6 * size * SUPERSAMPLE / 2))


_DISTRACTOR_CHUNK = 25


def _units(out: Path, seed: int, cfg: dict[str, Any], names: list[str], qimlist: list[str]
           ) -> list[tuple]:
    """The units of work: one per benchmark instance (its views under their database names,
    its queries), per chunk of distractors and per training instance."""
    F, I, V = cfg["families"], cfg["instances_per_family"], cfg["views_per_instance"]
    Q, D = cfg["queries_per_instance"], cfg["distractors"]
    jobs: list[tuple] = []
    for f in range(F):
        for i in range(I):
            u = f * I + i
            jobs.append(("bench", out, seed, cfg, f, i, names[u * V:(u + 1) * V],
                         qimlist[u * Q:(u + 1) * Q]))
    for k0 in range(0, D, _DISTRACTOR_CHUNK):
        k1 = min(D, k0 + _DISTRACTOR_CHUNK)
        jobs.append(("distractors", out, seed, cfg, k0, names[F * I * V + k0:F * I * V + k1]))
    for f in range(cfg["train_families"]):
        for i in range(cfg["train_instances_per_family"]):
            jobs.append(("train", out, seed, cfg, f, i))
    return jobs


def _run_units(jobs: list[tuple], workers: int) -> list[dict[str, Any]]:
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        # fork: workers need only numpy and PIL, and must not re-import the caller's modules.
        method = "fork" if "fork" in mp.get_all_start_methods() else None
        with mp.get_context(method).Pool(min(workers, len(jobs))) as pool:
            return pool.map(_run_unit, jobs, chunksize=1)
    return [_run_unit(job) for job in jobs]


def _ground_truth(database: list[dict[str, Any]], queries: list[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """revisitop's ``gnd``: per query its box and the database indices of its instance's easy,
    hard and junk views."""
    by_instance: dict[int, dict[str, list[int]]] = {}
    for idx, entry in enumerate(database):
        if entry["instance"] >= 0:
            lists = by_instance.setdefault(entry["instance"], {"easy": [], "hard": [], "junk": []})
            lists[entry["label"]].append(idx)
    gnd = []
    for q in queries:
        lists = by_instance.get(q["instance"], {"easy": [], "hard": [], "junk": []})
        gnd.append({"bbx": [float(x) for x in q["bbx"]], "easy": sorted(lists["easy"]),
                    "hard": sorted(lists["hard"]), "junk": sorted(lists["junk"])})
    return gnd


def _build(out: Path, name: str, seed: int, cfg: dict[str, Any], workers: int = 1
           ) -> dict[str, Any]:
    """Renders every unit and writes the ground truth, ``train.txt`` and ``meta.json`` into
    ``out``; returns the counts."""
    (out / "jpg").mkdir(parents=True)
    (out / "train").mkdir()
    F, I, V = cfg["families"], cfg["instances_per_family"], cfg["views_per_instance"]
    Q, D = cfg["queries_per_instance"], cfg["distractors"]
    n_db = F * I * V + D
    # Database entry j (views instance by instance, then distractors) is imlist[position[j]].
    position = np.empty(n_db, np.int64)
    position[item_rng(seed, _R_ORDER).permutation(n_db)] = np.arange(n_db)
    imlist = [f"im{p:05d}" for p in range(n_db)]
    qimlist = [f"q{q:04d}" for q in range(F * I * Q)]
    names = [imlist[p] for p in position]

    jobs = _units(out, seed, cfg, names, qimlist)
    results = _run_units(jobs, workers)

    entries: list[dict[str, Any]] = []
    queries: list[dict[str, Any]] = []
    lines: list[str] = []
    train_meta: list[dict[str, Any]] = []
    fp_bench, fp_train, fp_distractors = [], [], []
    for job, res in zip(jobs, results):
        if job[0] == "bench":
            entries += res["views"]
            queries += res["queries"]
            fp_bench.append(res["fingerprint"])
        elif job[0] == "distractors":
            entries += res["views"]
            fp_distractors += [e.pop("fingerprint") for e in res["views"]]
        else:
            lines += res["lines"]
            train_meta += res["train"]
            fp_train.append(res["fingerprint"])
    database: list[dict[str, Any]] = [{}] * n_db
    for j, entry in enumerate(entries):
        database[position[j]] = entry

    with open(out / f"gnd_{name}.pkl", "wb") as fh:
        pickle.dump({"gnd": _ground_truth(database, queries), "imlist": imlist,
                     "qimlist": qimlist}, fh, protocol=4)
    with open(out / "train.txt", "w") as fh:
        fh.writelines(lines)

    labels = [e["label"] for e in database]
    counts = {
        "database": n_db, "views": F * I * V, "distractors": D, "queries": len(queries),
        "instances": F * I, "families": F,
        "easy": labels.count("easy"), "hard": labels.count("hard"), "junk": labels.count("junk"),
        "train_images": len(lines),
        "train_instances": cfg["train_families"] * cfg["train_instances_per_family"],
        "train_families": cfg["train_families"],
    }
    meta = {"version": VERSION, "seed": seed, "label_rules": LABEL_RULES, "database": database,
            "queries": queries, "train": train_meta,
            "fingerprints": {"benchmark": fp_bench, "train": fp_train,
                             "distractors": [fp for fp in fp_distractors if fp is not None]}}
    with open(out / "meta.json", "w") as fh:
        json.dump(meta, fh, separators=(",", ":"))
    return counts


def _record(seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    return {"version": VERSION, "seed": int(seed), "config": cfg}


def _existing(dir: Path, name: str, record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The stored JSON of ``dir`` if it holds exactly ``record``'s dataset, complete."""
    try:
        with open(dir / "synthetic.json") as fh:
            stored = json.load(fh)
    except (OSError, ValueError):
        return None
    # A damaged file (a list, null, counts of another shape) describes no dataset to reuse.
    if not isinstance(stored, dict) or {k: stored.get(k) for k in record} != record:
        return None
    counts = stored.get("counts")
    if not isinstance(counts, dict):
        return None
    try:
        n_jpg = len(os.listdir(dir / "jpg"))
        n_train = len(os.listdir(dir / "train"))
    except OSError:
        return None
    if (n_jpg != counts.get("database", -1) + counts.get("queries", -1)
            or n_train != counts.get("train_images", -1)
            or not (dir / f"gnd_{name}.pkl").is_file() or not (dir / "train.txt").is_file()):
        return None
    return stored


def generate(root: PathLike, name: str = "synthetic", *, seed: int = 0, preset: str = "default",
             force: bool = False, workers: int = 1, **overrides: Any) -> SyntheticInfo:
    """Generate (or reuse) the synthetic benchmark ``<root>/<name>`` and its training split.

    Args:
        root: folder receiving ``<root>/<name>/`` (created if needed).
        name: dataset name, used for the folder and ``gnd_<name>.pkl``.
        seed: everything is a deterministic function of ``(seed, config)``.
        preset: ``"default"`` (128 px; 8 families × 6 instances × 8 views, 2 queries each,
            300 distractors; training 8 × 10 instances × 10 views: 1580 images) or ``"quick"``
            (96 px; 5 × 4 × 5, 2 queries each, 60 distractors; training 6 × 6 × 6: 416 images).
            See :data:`PRESETS`.
        force: regenerate even if an identical dataset exists.
        workers: processes rendering in parallel (forked; the files do not depend on it).
        **overrides: any :data:`PRESETS` key (``image_size``, ``families``,
            ``instances_per_family``, ``views_per_instance``, ``queries_per_instance``,
            ``distractors``, ``train_families``, ``train_instances_per_family``,
            ``train_views_per_instance``, ``view_mix`` = target easy/hard/junk shares,
            ``train_hard_fraction``, ``jpeg_quality``).

    Returns:
        :class:`SyntheticInfo`. An existing ``<root>/<name>`` with the same version, seed and config
        (``synthetic.json``) is reused (``generated=False``); one with another config is replaced;
        a folder that is not a synthetic dataset raises ``FileExistsError``. Files are written to
        a temporary sibling folder that is renamed into place only when complete.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not name or os.sep in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"invalid dataset name {name!r}")
    cfg = synthetic_config(preset, **overrides)
    record = _record(int(seed), cfg)
    root = Path(root).expanduser()
    target = root / name
    start = time.perf_counter()
    if target.exists() and not force:
        stored = _existing(target, name, record)
        if stored is not None:
            return SyntheticInfo(root, name, int(seed), cfg, stored["counts"], False,
                                 time.perf_counter() - start)
    if target.exists() and not (target / "synthetic.json").is_file():
        raise FileExistsError(f"{target} exists and is not a synthetic dataset "
                              f"(no synthetic.json): refusing to replace it")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        counts = _build(tmp, name, int(seed), cfg, workers=int(workers))
        with open(tmp / "synthetic.json", "w") as fh:
            json.dump({**record, "counts": counts}, fh, indent=1, sort_keys=True)
        old = None
        if target.exists():
            old = root / f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            # Someone else finished the same dataset meanwhile: keep theirs if it matches.
            if old is not None and not target.exists():
                os.rename(old, target)
                old = None
            if _existing(target, name, record) is None:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return SyntheticInfo(root, name, int(seed), cfg, counts, True, time.perf_counter() - start)
