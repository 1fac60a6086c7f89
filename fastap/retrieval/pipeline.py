"""The evaluation pipeline behind ``fastap eval``, as small steps over one options object.

:func:`evaluate_model` checks its arguments into an :class:`EvalOptions`, then

1. :func:`_open_benchmark` — the ground truth, the distractors, the checks that need sizes;
2. :func:`_load_net` — the model, and the checks that need its dimension;
3. :func:`_extract_splits` — descriptors of queries, database and distractors (cached);
4. :func:`_score` — whitening, DBA, αQE and the cosine scores;
5. :func:`_evaluate` — Easy/Medium/Hard (or original) mAP and mP@k, per query AP and top list;
6. :func:`_write_outputs` — ``<tag>.json``, ``<tag>.txt``, the scores and the figure.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .._checks import as_int
from .._device import resolve_device
from .._io import atomic_write_text, naming_write_errors
from ..datasets import Revisitop1M, RevisitedDataset
from ..distributed import broadcast_object, failures_propagated, rank, use_group, world_size
from ..evaluation import REVISITED_SETUPS, evaluate_original, evaluate_revisited
from ..extraction import DEFAULT_SCALES, MULTISCALE, amp_key, load_descriptors
from ..models import RetrievalNet
from ..whitening import Whitening, parse_whiten
from .cache import (cache_tag, cached_descriptors, check_images, describe, model_key, short_hash,
                    trunk_precision)
from .report import KAPPAS, finite_or_none, format_table
from .scoring import compute_scores, postprocess
from .specs import ModelSpec, load_model, parse_model_spec

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class EvalOptions:
    """The checked options of one evaluation (see :func:`evaluate_model` for each)."""

    arch: str
    pooling: Optional[str]
    max_size: Optional[int]
    scales: tuple[float, ...]
    device: torch.device
    batch_size: int
    workers: int
    amp: bool
    amp_dtype: torch.dtype
    precision: str          # the trunk's precision that runs
    precision_reason: str
    distractors: bool
    features_dir: Optional[Path]
    whiten: Union[None, str, Whitening]
    whiten_label: Optional[str]
    whiten_dim: Optional[int]
    qe: int
    qe_alpha: float
    dba: int
    dba_alpha: float
    kappas: tuple[int, ...]
    output: Optional[Path]
    show_queries: int
    show_setup: str
    save_scores: bool
    progress: bool
    log: Callable[[str], None]
    keep_arrays: bool
    sharded: bool


def _options(*, arch, pooling, max_size, multiscale, scales, device, batch_size, workers, amp,
             precision, distractors, features_dir, whiten, whiten_dim, qe, qe_alpha, dba,
             dba_alpha, kappas, output, show_queries, show_setup, save_scores, progress, log,
             keep_arrays, distributed) -> EvalOptions:
    """The arguments of :func:`evaluate_model` checked, before anything is loaded."""
    for name, value in (("qe_alpha", qe_alpha), ("dba_alpha", dba_alpha)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if show_setup not in REVISITED_SETUPS:
        raise ValueError(f"show_setup must be one of {', '.join(REVISITED_SETUPS)}, "
                         f"got {show_setup!r}")
    if scales is not None and multiscale:
        raise ValueError("give either multiscale=True or scales, not both")
    scales = tuple(float(s) for s in (scales if scales is not None
                                      else MULTISCALE if multiscale else DEFAULT_SCALES))
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"scales must be positive numbers, got {scales}")
    whiten_dim = as_int(whiten_dim, "whiten_dim", low=1, optional=True)
    whiten_label = whiten if isinstance(whiten, str) or whiten is None else "learned"
    whiten = parse_whiten(whiten)
    if whiten_dim is not None and whiten is None:
        raise ValueError("whiten_dim needs a whitening (whiten='pca' or 'learned:<file>')")
    device = resolve_device(device, "--device")
    amp, amp_dtype, ran, why = trunk_precision(device, amp, precision)
    return EvalOptions(
        arch=arch, pooling=pooling, max_size=as_int(max_size, "max_size", low=1, optional=True),
        scales=scales, device=device, batch_size=as_int(batch_size, "batch_size", low=1),
        workers=as_int(workers, "workers", low=0), amp=amp, amp_dtype=amp_dtype,
        precision=ran, precision_reason=why, distractors=bool(distractors),
        features_dir=Path(features_dir).expanduser() if features_dir is not None else None,
        whiten=whiten, whiten_label=whiten_label, whiten_dim=whiten_dim,
        qe=as_int(qe, "qe", low=0), qe_alpha=float(qe_alpha), dba=as_int(dba, "dba", low=0),
        dba_alpha=float(dba_alpha), kappas=tuple(int(k) for k in kappas),
        output=Path(output).expanduser() if output is not None else None,
        show_queries=as_int(show_queries, "show_queries", low=0), show_setup=show_setup,
        save_scores=bool(save_scores), progress=progress, log=log or (lambda msg: None),
        keep_arrays=keep_arrays, sharded=use_group(distributed))


def _ground_truth_kind(gnd: Sequence[Mapping]) -> str:
    if all("easy" in g and "hard" in g for g in gnd):
        return "revisited"
    if all("ok" in g for g in gnd):
        return "original"
    raise ValueError("the ground truth has neither easy/hard (Revisited) nor ok (original "
                     "Oxford/Paris) lists")


@dataclass
class _Benchmark:
    name: str
    dataset: RevisitedDataset
    kind: str                         # "revisited" or "original"
    distractors: Optional[Revisitop1M]


def _open_benchmark(dataset_name: str, root: PathLike, opts: EvalOptions) -> _Benchmark:
    """The benchmark; options that cannot work on it fail here, not after the extraction."""
    dataset = RevisitedDataset(root, dataset_name)
    bench = _Benchmark(dataset_name, dataset, _ground_truth_kind(dataset.gnd),
                       Revisitop1M(root) if opts.distractors else None)
    n_total = dataset.num_database + (len(bench.distractors) if bench.distractors else 0)
    for flag, n in (("qe", opts.qe), ("dba", opts.dba)):
        if n > n_total:
            raise ValueError(f"{flag}={n} exceeds the database size {n_total} (lower --{flag})")
    return bench


def _load_net(net_or_spec: Union[str, ModelSpec, RetrievalNet], opts: EvalOptions
              ) -> tuple[RetrievalNet, Optional[ModelSpec], str]:
    """(net, its spec or None for a net passed in, the spec's text); the whitening options are
    checked against the net's descriptor dimension."""
    if isinstance(net_or_spec, RetrievalNet):
        spec, spec_text = None, net_or_spec.meta.get("source") or "RetrievalNet"
    elif isinstance(net_or_spec, ModelSpec):
        spec, spec_text = net_or_spec, net_or_spec.text
    else:
        spec_text = str(net_or_spec)
        spec = parse_model_spec(spec_text)
    net = load_model(net_or_spec if spec is None else spec, arch=opts.arch, pooling=opts.pooling)
    if isinstance(opts.whiten, Whitening):
        d_in, d_out = opts.whiten.mean.shape[0], opts.whiten.projection.shape[0]
        if d_in != net.out_dim:
            raise ValueError(f"--whiten {opts.whiten_label}: the whitening expects {d_in}-d "
                             f"descriptors, the model gives {net.out_dim}-d")
    else:
        d_out = net.out_dim  # PCA: at most the descriptor dimension
    if opts.whiten_dim is not None and opts.whiten_dim > d_out:
        raise ValueError(f"--whiten-dim {opts.whiten_dim} exceeds the {d_out} dimensions of the "
                         f"whitening ({opts.whiten_label})")
    return net, spec, spec_text


def _cache_root(net: RetrievalNet, spec: Optional[ModelSpec], opts: EvalOptions
                ) -> Optional[Path]:
    if opts.features_dir is None:
        return None
    slug = spec.slug if spec is not None else re.sub(
        r"[^A-Za-z0-9._-]+", "-", f"net-{net.meta.get('arch')}")
    return opts.features_dir / f"{slug}-{model_key(net)}"


def _extract_splits(net: RetrievalNet, bench: _Benchmark, cache_root: Optional[Path],
                    opts: EvalOptions, timings: dict) -> tuple[dict, dict, list[int]]:
    """Descriptors of the queries, the database and the distractors: (descriptors by split,
    the report's ``features``, images each process extracted)."""
    dataset = bench.dataset
    amp_name = amp_key(opts.device, opts.amp, opts.amp_dtype)  # as the extraction records it
    tag = cache_tag(opts.scales, opts.max_size, amp_name)
    # The query crops depend on the names and boxes of the ground truth: a re-annotated file
    # with as many queries must not reuse the old crops' descriptors.
    boxes = short_hash([[name, list(dataset.query_bbox(i))]
                        for i, name in enumerate(dataset.qimlist)])

    def folder(ds_name: str, split: str) -> Optional[Path]:
        return None if cache_root is None else cache_root / ds_name / f"{split}-{tag}"

    name = bench.name
    splits = [("queries", dataset.queries(max_size=opts.max_size),
               folder(name, f"queries-b{boxes}"), {"query_boxes": boxes},
               dataset.query_paths(), name),
              ("database", dataset.database(max_size=opts.max_size), folder(name, "database"),
               {}, dataset.database_paths(), name)]
    if bench.distractors is not None:
        other = bench.distractors
        splits.append(("distractors", other.database(max_size=opts.max_size),
                       folder(other.name, "database"), {}, None, other.name))
    descs: dict[str, Any] = {}
    features: dict[str, Any] = {}
    images_per_rank = [0] * (world_size() if opts.sharded else 1)
    for split, images, where, key, paths, owner in splits:
        t = time.perf_counter()
        cached = None if where is None else cached_descriptors(where, len(images), opts.scales,
                                                               dict(key, amp=amp_name))
        if opts.sharded and where is not None:
            # Extracting is a collective: every process follows rank 0's look at the cache
            # (another job may finish the folder between two processes' looks).
            if not broadcast_object(cached is not None):
                cached = None
            elif cached is None:
                cached = load_descriptors(where)
        if cached is None:  # (the million distractor paths are listed only when needed)
            check_images(paths if paths is not None else bench.distractors.database_paths(),
                         split if split != "distractors" else "distractor", dataset.root, owner)
        stats: dict[str, Any] = {}
        descs[split], hit = describe(
            net, images, where, opts.scales, key, cached,
            desc=f"{name} {split}" if split != "distractors" else "revisitop1m", stats=stats,
            batch_size=opts.batch_size, workers=opts.workers, device=opts.device, amp=opts.amp,
            amp_dtype=opts.amp_dtype, progress=opts.progress, log=opts.log,
            sharded=opts.sharded)
        timings[f"extract_{split}"] = time.perf_counter() - t
        features[split] = {"cached": hit, "path": str(where) if where is not None else None,
                           "count": int(descs[split].shape[0]), "dim": int(descs[split].shape[1]),
                           "images_per_rank": stats["images_per_rank"]}
        images_per_rank = [a + b for a, b in zip(images_per_rank, stats["images_per_rank"])]
    return descs, features, images_per_rank


def _score(descs: dict, opts: EvalOptions, timings: dict
           ) -> tuple[torch.Tensor, torch.Tensor, int, dict, torch.Tensor]:
    """(queries, database + distractors after post-processing, benchmark database size,
    what post-processing applied, the (n_q, n_db [+ distractors]) cosine scores)."""
    q, x = descs["queries"], descs["database"]
    n_db = x.shape[0]
    if "distractors" in descs:
        x = torch.cat([x, descs["distractors"]])
    t = time.perf_counter()
    q, x, applied = postprocess(q, x, n_db, whiten=opts.whiten, whiten_dim=opts.whiten_dim,
                                qe=opts.qe, qe_alpha=opts.qe_alpha, dba=opts.dba,
                                dba_alpha=opts.dba_alpha, device=opts.device, log=opts.log)
    timings["postprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = compute_scores(q, x, device=opts.device)
    timings["scores"] = time.perf_counter() - t
    return q, x, n_db, applied, scores


def _evaluate(bench: _Benchmark, scores: torch.Tensor, n_db: int, opts: EvalOptions,
              timings: dict) -> tuple[dict, list[dict], np.ndarray]:
    """(results by setup, per query records, the top database indices of every query)."""
    dataset = bench.dataset
    t = time.perf_counter()
    gnd = {"imlist": dataset.imlist, "gnd": dataset.gnd}
    if bench.kind == "revisited":
        raw = evaluate_revisited(scores, gnd, opts.kappas)
    else:
        raw = {"original": evaluate_original(scores, gnd, opts.kappas)}
    timings["evaluate"] = time.perf_counter() - t
    results = {setup: {"mAP": finite_or_none(r["mAP"]),
                       "mP@k": {str(k): finite_or_none(v) for k, v in zip(opts.kappas, r["mP@k"])}}
               for setup, r in raw.items()}
    top = scores.topk(min(max(max(opts.kappas), 10), scores.shape[1]), dim=1).indices.numpy()
    distractor_names = bench.distractors.imlist if bench.distractors is not None else []

    def db_name(j: int) -> str:
        return dataset.imlist[j] if j < n_db else distractor_names[j - n_db]

    queries = [{"name": dataset.qimlist[i],
                "AP": {setup: finite_or_none(r["APs"][i]) for setup, r in raw.items()},
                "top": [db_name(int(j)) for j in top[i]]}
               for i in range(len(dataset.qimlist))]
    return results, queries, top


def _report_options(net: RetrievalNet, opts: EvalOptions, kind: str, applied: dict) -> dict:
    return {"arch": net.meta.get("arch"), "pooling": net.meta.get("pooling"),
            "max_size": opts.max_size, "scales": list(opts.scales),
            "distractors": opts.distractors,
            "whiten": opts.whiten_label if opts.whiten_label is not None else "none",
            "whiten_dim": opts.whiten_dim, "qe": opts.qe, "qe_alpha": opts.qe_alpha,
            "dba": opts.dba, "dba_alpha": opts.dba_alpha, "device": str(opts.device),
            "batch_size": opts.batch_size, "workers": opts.workers, "amp": opts.amp,
            "precision": opts.precision, "precision_reason": opts.precision_reason,
            "protocol": kind, "applied": applied}


def _write_outputs(result: dict, bench: _Benchmark, scores: torch.Tensor, top: np.ndarray,
                   opts: EvalOptions, cached: bool, t_start: float) -> None:
    """``<tag>.txt`` and ``<tag>.json`` (written first, so the numbers are safe on disk), the
    scores if asked, then the figure (and the JSON again with its path and time)."""
    timings, files = result["timings"], result["files"]
    out, base = opts.output, result["tag"]
    # A full disk here loses only this run's output; the extracted descriptors stay cached.
    hint = "the cached descriptors are reused" if cached else "the descriptors are extracted again"
    with naming_write_errors(out, hint):
        out.mkdir(parents=True, exist_ok=True)
    files["json"], files["text"] = str(out / f"{base}.json"), str(out / f"{base}.txt")
    if opts.save_scores:
        files["scores"] = str(out / f"{base}_scores.npy")
        with naming_write_errors(files["scores"], hint):
            np.save(files["scores"], scores.numpy())

    def write() -> None:
        timings["total"] = time.perf_counter() - t_start
        atomic_write_text(files["text"], format_table(result) + "\n", hint=hint)
        atomic_write_text(files["json"], json.dumps(result, indent=1) + "\n", hint=hint)

    write()
    if not opts.show_queries:
        return
    from ..plots import plot_retrieval_results, spread_queries

    t = time.perf_counter()
    dataset, setup = bench.dataset, opts.show_setup
    path = out / f"{base}_retrieval.png"
    chosen = spread_queries(len(dataset.qimlist), opts.show_queries)
    aps = [result["queries"][i]["AP"] for i in chosen]
    plot_retrieval_results(
        dataset, chosen, top[:, :10], path, setup=setup,
        distractor_paths=bench.distractors.database_paths() if bench.distractors else [],
        aps=[ap.get(setup, ap.get("original")) for ap in aps],
        title=f"{result['tag']} — {result['model']['spec']}")
    files["png"] = str(path)
    timings["plot"] = time.perf_counter() - t
    write()


@failures_propagated("evaluating")
def evaluate_model(net_or_spec: Union[str, ModelSpec, RetrievalNet], dataset_name: str,
                   root: PathLike, *,
                   arch: str = "resnet50", pooling: Optional[str] = None,
                   max_size: Optional[int] = 1024, multiscale: bool = False,
                   scales: Optional[Sequence[float]] = None,
                   device: Union[str, torch.device, None] = None, batch_size: int = 1,
                   workers: int = 0, amp: Optional[bool] = None, precision: str = "auto",
                   distractors: bool = False,
                   features_dir: Optional[PathLike] = None,
                   whiten: Union[None, str, Whitening] = None, whiten_dim: Optional[int] = None,
                   qe: int = 0, qe_alpha: float = 3.0, dba: int = 0, dba_alpha: float = 3.0,
                   kappas: Sequence[int] = KAPPAS, output: Optional[PathLike] = None,
                   show_queries: int = 5, show_setup: str = "medium",
                   save_scores: bool = False, progress: bool = True,
                   log: Optional[Callable[[str], None]] = None,
                   keep_arrays: bool = False, distributed: Optional[bool] = None) -> dict:
    """Evaluate a model on a Revisited benchmark (docs/evaluation.md); a JSON-serialisable dict.

    Args:
        net_or_spec: a :class:`~fastap.models.RetrievalNet` or a model spec
            (:func:`parse_model_spec`): ``PATH``, ``torchvision:<arch>[:<weights>]``,
            ``<layout>:PATH``.
        dataset_name, root: ``<root>/<dataset_name>/gnd_<dataset_name>.pkl`` and ``jpg/``.
        arch, pooling: see :func:`load_model`.
        max_size: longest side of the (full) images; ``None`` keeps full resolution. Queries
            are cropped by their box first and scaled by their full image's factor.
        multiscale: scales (1, 1/√2, 1/2); ``scales`` gives any other set (default (1,)).
        device: where the net and the post-processing run (default CUDA when available); one
            that is unknown or absent here raises ``ValueError`` before anything is loaded.
        batch_size, workers, amp: passed to :func:`~fastap.extraction.extract_descriptors`
            (amp: a float16 trunk, default on for CUDA; cached apart from float32 descriptors).
        precision: the trunk's precision, ``"auto"``, ``"fp32"`` or ``"bf16"``
            (:func:`fastap._device.resolve_precision`). ``"auto"`` on the CPU: bfloat16
            autocast where the CPU has bfloat16 units (avx512_bf16 or AMX), float32 elsewhere;
            on CUDA, ``amp`` decides as before. ``"bf16"`` on a CPU without the units falls back
            to float32 with a warning. Give ``amp`` or a precision other than ``"auto"``, not
            both. The result's ``options`` record ``precision`` and the reason.
        distractors: append the revisitop1m descriptors (``<root>/revisitop1m``) to the database.
        features_dir: cache of raw descriptors (see the module docstring).
        whiten: ``None``/``"none"``, ``"pca"`` (PCA-whitening learned on the benchmark's database
            descriptors, the common "PCAw on the database" variant; reduced to the database's
            rank when that is below the dimension), ``"learned:<file>"`` (:func:`load_whitening`)
            or a :class:`~fastap.whitening.Whitening`.
        whiten_dim: keep the first ``whiten_dim`` whitened dimensions.
        qe, qe_alpha: αQE with the top ``qe`` database vectors (0 = off).
        dba, dba_alpha: database-side augmentation with ``dba`` neighbours (0 = off).
        kappas: the k of mP@k.
        output: a folder receiving ``<tag>.json``, ``<tag>.txt`` and ``<tag>_retrieval.png``
            (``<tag>`` = dataset name, ``+1m`` with distractors); ``None`` writes nothing.
        show_queries: queries in the PNG (evenly spread over the query list; 0 = no PNG).
        show_setup: the setup whose positive/junk lists colour the PNG frames.
        save_scores: also write ``<tag>_scores.npy``, the (n_q, n_db) float32 score matrix.
        progress: tqdm bars while extracting. ``log``: receives progress messages.
        keep_arrays: add ``"arrays"`` (not JSON-serialisable): the final query and database
            descriptors and the scores, as tensors.
        distributed: under an initialised ``torch.distributed`` group (``torchrun``; ``None``
            detects it, ``False`` works alone): every process calls this with the same
            arguments, the processes share the extraction (see
            :func:`~fastap.extraction.extract_descriptors`), rank 0 alone post-processes,
            searches, evaluates and writes the files, and every process returns its result.
            A failing process stops the others with its rank and cause
            (:func:`fastap.distributed.propagate_failures`). docs/distributed.md.

    Returns:
        ``{"model": {"spec", meta…}, "dataset", "tag", "sizes", "options", "kappas",
        "results": {setup: {"mAP", "mP@k": {"1": …, "5": …, "10": …}}},
        "queries": [{"name", "AP": {setup: …}, "top": [database names]}], "features",
        "timings", "files", "world_size", "images_per_rank"}`` (``images_per_rank``: the images
        each process extracted in this call, all splits together) with numbers in percent and
        ``None`` where a setup has no query with positives. Setups are easy/medium/hard
        (``original`` for an Oxford5k/Paris6k-style ground truth with ``ok`` lists).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    opts = _options(arch=arch, pooling=pooling, max_size=max_size, multiscale=multiscale,
                    scales=scales, device=device, batch_size=batch_size, workers=workers,
                    amp=amp, precision=precision, distractors=distractors,
                    features_dir=features_dir, whiten=whiten, whiten_dim=whiten_dim, qe=qe,
                    qe_alpha=qe_alpha, dba=dba, dba_alpha=dba_alpha, kappas=kappas,
                    output=output, show_queries=show_queries, show_setup=show_setup,
                    save_scores=save_scores, progress=progress, log=log,
                    keep_arrays=keep_arrays, distributed=distributed)
    opts.log(f"precision {opts.precision} ({opts.precision_reason})")
    bench = _open_benchmark(dataset_name, root, opts)
    t = time.perf_counter()
    net, spec, spec_text = _load_net(net_or_spec, opts)
    timings["load_model"] = time.perf_counter() - t
    cache_root = _cache_root(net, spec, opts)
    descs, features, images_per_rank = _extract_splits(net, bench, cache_root, opts, timings)
    if opts.sharded and rank() != 0:
        # Rank 0 evaluates alone (the search and the mAP are those of one process); the others
        # wait for its result in this broadcast. Should rank 0 fail, its report (see
        # failures_propagated) ends the wait with its cause.
        return broadcast_object(None)

    q, x, n_db, applied, scores = _score(descs, opts, timings)
    del descs
    results, queries, top = _evaluate(bench, scores, n_db, opts, timings)
    result: dict[str, Any] = {
        "model": {"spec": spec_text, **json.loads(json.dumps(net.meta, default=str)),
                  "gem_p": net.gem_p},
        "dataset": dataset_name,
        "tag": dataset_name + ("+1m" if opts.distractors else ""),
        "sizes": {"queries": len(bench.dataset.qimlist), "database": n_db,
                  "distractors": x.shape[0] - n_db},
        "options": _report_options(net, opts, bench.kind, applied),
        "kappas": list(opts.kappas),
        "results": results,
        "queries": queries,
        "features": features,
        "timings": timings,
        "files": {},
        "world_size": len(images_per_rank),
        "images_per_rank": images_per_rank,
    }
    if opts.output is not None:
        _write_outputs(result, bench, scores, top, opts, cache_root is not None, t_start)
    else:
        timings["total"] = time.perf_counter() - t_start
    if opts.keep_arrays:
        result["arrays"] = {"queries": q.cpu(), "database": x.cpu(), "scores": scores}
    return broadcast_object(result) if opts.sharded else result
