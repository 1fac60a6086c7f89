"""The evaluation pipeline behind ``fastap eval``: model spec → descriptors → scores → mAP.

:func:`evaluate_model` runs the whole protocol of docs/evaluation.md on a Revisited benchmark::

    net      = load_model("torchvision:resnet50")          # or a checkpoint, "moco:PATH", a net
    q, x     = descriptors of the cropped queries and of the database (+ revisitop1m distractors)
    q, x     = whitening (learned or PCA) → DBA on x → αQE of q on x          (all optional)
    scores   = q @ xᵀ   (L2-normalised rows, computed in blocks of database rows)
    results  = evaluate_revisited(scores, gnd)   → Easy/Medium/Hard mAP and mP@1,5,10 (percent)

and returns a JSON-serialisable dict ``{model, dataset, sizes, options, results, queries,
features, timings}``; with ``output=`` it also writes ``<tag>.json``, ``<tag>.txt`` (the printed
table) and ``<tag>_retrieval.png`` (each shown query with its top 10, framed green/red/grey for
positive/negative/junk), where ``<tag>`` is the dataset name (``+1m`` with distractors).

Model specs (:func:`parse_model_spec`):

- ``PATH`` — a checkpoint file; the layout is detected by :func:`fastap.models.from_pretrained`.
- ``torchvision:<arch>[:<weights>]`` — torchvision ImageNet weights; ``torchvision:resnet50`` is
  ``IMAGENET1K_V1``. ``torchvision:<weights>`` alone takes the arch from ``arch=``.
- ``<layout>:PATH`` with layout ``moco``, ``mocov3``, ``dino``, ``simclr``, ``byol``,
  ``torchvision`` or ``fastap`` — insists on that layout. Files of plain torchvision names are
  ambiguous (a SimCLR conversion saved as a bare dict looks like a DINO or BYOL one); the forced
  layout then decides the input preprocessing (SimCLR: raw [0, 1], the others: ImageNet mean/std).

With ``features_dir=`` the raw descriptors are cached per model (weights fingerprint and meta),
dataset, split, scales, ``max_size``, the trunk's precision (CUDA: float16 with amp, float32
without; the CPU: bfloat16 or float32) and, for the queries, a hash of the query names and boxes::

    <features_dir>/<model>-<key>/<dataset>/{queries-b<boxes>,database}-<tag>/
    <features_dir>/<model>-<key>/revisitop1m/database-<tag>/

where ``<tag>`` is ``s<scales>[-x<hash>]-m<max_size>[-amp_<dtype>]`` (``-x``: a hash of the
exact scales, where ``.4g`` would not tell them apart). They are folders of
:func:`fastap.extraction.extract_descriptors` (resumable; a damaged result is rebuilt), so a
rerun with other post-processing options skips extraction, and the 1M distractors are shared by
both datasets.
"""

from __future__ import annotations

import contextlib
import hashlib
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
import torch.nn.functional as F

from ._device import resolve_device, resolve_precision
from ._io import (DamagedFileError, atomic_torch_save, atomic_write_text, load_torch_file,
                  naming_write_errors)
from .datasets import Revisitop1M, RevisitedDataset
from .distributed import broadcast_object, failures_propagated, rank, use_group, world_size
from .evaluation import REVISITED_SETUPS, evaluate_original, evaluate_revisited
from .download import DATASETS
from .extraction import (DEFAULT_SCALES, MULTISCALE, extract_descriptors, load_descriptors,
                         read_meta)
from .extraction import amp_key, net_fingerprint, use_amp
from .models import ARCHS, RetrievalNet, detect_layout, from_pretrained
from .whitening import (Whitening, alpha_query_expansion, apply_whitening,
                        database_augmentation, pca_whitening)

__all__ = [
    "FORCED_LAYOUTS",
    "KAPPAS",
    "ModelSpec",
    "compute_scores",
    "evaluate_model",
    "format_summary",
    "format_table",
    "load_model",
    "load_whitening",
    "parse_model_spec",
    "parse_whiten",
    "save_whitening",
]

PathLike = Union[str, os.PathLike]

KAPPAS = (1, 5, 10)
#: Layouts a ``<layout>:PATH`` model spec may force.
FORCED_LAYOUTS = ("moco", "mocov3", "dino", "simclr", "byol", "torchvision", "fastap")
#: torchvision weights used by ``torchvision:<arch>`` (the supervised ImageNet baseline).
DEFAULT_TORCHVISION_WEIGHTS = "IMAGENET1K_V1"

# Checkpoints whose trunk carries plain torchvision names; which of these a file "is" cannot be
# told from its keys alone, so a forced layout among them only changes the preprocessing.
_PLAIN_LAYOUTS = {"dino", "simclr", "byol", "torchvision"}
_RAW_INPUT_LAYOUTS = {"simclr"}
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin", ".pkl", ".pth.tar")
_ROW_NAMES = {"easy": "Easy", "medium": "Medium", "hard": "Hard", "original": "All"}
_BLOCK = 65536
_CHUNK = 10000


# ----------------------------------------------------------------------------------------------
# Model specs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``kind`` is ``"file"`` or ``"torchvision"``.

    ``file``: ``path`` and ``layout`` (``None`` = detect). ``torchvision``: ``arch`` (``None`` =
    the caller's) and ``weights`` (a torchvision weights name, possibly dotted).
    """

    text: str
    kind: str
    path: Optional[Path] = None
    layout: Optional[str] = None
    arch: Optional[str] = None
    weights: Optional[str] = None

    @property
    def slug(self) -> str:
        """A short file-name-safe name (used for the features cache)."""
        if self.kind == "torchvision":
            raw = f"torchvision-{self.arch or 'arch'}-{self.weights}"
        else:
            name = self.path.name if self.path is not None else "model"
            for suffix in _CHECKPOINT_SUFFIXES:
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
                    break
            raw = f"{self.layout}-{name}" if self.layout else name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-")[:80] or "model"


def _spec_error(text: str, why: str) -> ValueError:
    return ValueError(
        f"unknown model spec {text!r}: {why}. Expected a checkpoint file, "
        f"torchvision:<arch>[:<weights>] (e.g. torchvision:resnet50) or <layout>:PATH with "
        f"layout one of {', '.join(FORCED_LAYOUTS)}")


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``PATH``, ``torchvision:<arch>[:<weights>]``, ``torchvision:<weights>`` or
    ``<layout>:PATH`` (see the module docstring).

    An existing file always wins over the prefix syntax. A spec that looks like a file name
    (a folder separator or a checkpoint suffix) but does not exist raises ``FileNotFoundError``;
    anything else unrecognised raises ``ValueError`` listing the grammar.
    """
    text = str(text).strip()
    if not text:
        raise _spec_error(text, "it is empty")
    path = Path(text).expanduser()
    if path.is_file():
        return ModelSpec(text, "file", path=path)
    prefix, sep, rest = text.partition(":")
    prefix_l = prefix.lower()
    if sep and prefix_l == "torchvision":
        if rest and Path(rest).expanduser().is_file():
            return ModelSpec(text, "file", path=Path(rest).expanduser(), layout="torchvision")
        parts = rest.split(":") if rest else []
        if not parts or not all(parts) or len(parts) > 2:
            raise _spec_error(text, "torchvision specs are torchvision:<arch>[:<weights>]")
        if parts[0].lower() in ARCHS:
            arch = parts[0].lower()
            weights = parts[1] if len(parts) == 2 else DEFAULT_TORCHVISION_WEIGHTS
            return ModelSpec(text, "torchvision", arch=arch, weights=weights)
        if len(parts) == 2:
            raise _spec_error(text, f"{parts[0]!r} is not a supported arch "
                                    f"({', '.join(ARCHS)})")
        weights = parts[0]
        m = re.fullmatch(r"(?i)(resnet\d+)_weights\..+", weights)
        if m:  # a dotted torchvision name fixes the arch
            return ModelSpec(text, "torchvision", arch=m.group(1).lower(), weights=weights)
        if re.fullmatch(r"[A-Za-z0-9_]+", weights) and (weights.isupper() or "_" in weights
                                                        or weights.upper() == "DEFAULT"):
            return ModelSpec(text, "torchvision", arch=None, weights=weights)
        raise _spec_error(text, f"{weights!r} is neither a supported arch "
                                f"({', '.join(ARCHS)}) nor a torchvision weights name")
    if sep and prefix_l in FORCED_LAYOUTS and len(prefix) > 1:
        if not rest:
            raise _spec_error(text, f"no checkpoint path after {prefix}:")
        target = Path(rest).expanduser()
        if not target.exists():
            raise FileNotFoundError(f"checkpoint not found: {target} (model spec {text!r})")
        if target.is_dir():
            raise ValueError(f"{target} is a folder, not a checkpoint file (model spec {text!r})")
        return ModelSpec(text, "file", path=target, layout=prefix_l)
    looks_like_path = (os.sep in text or "/" in text or text.startswith(".")
                       or text.lower().endswith(_CHECKPOINT_SUFFIXES))
    if sep and not looks_like_path:
        raise _spec_error(text, f"{prefix!r} is not a known prefix")
    if looks_like_path:
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not a checkpoint file (model spec {text!r})")
        raise FileNotFoundError(f"checkpoint not found: {path} (model spec {text!r})")
    raise _spec_error(text, "no such file and no known prefix")


def _peek_layout(path: Path) -> str:
    """The layout of a checkpoint file as ``from_pretrained`` would see it (``fastap`` included)."""
    from .models import CHECKPOINT_FORMAT, _torch_load  # the loader with fastap's error messages

    obj = _torch_load(path, True)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return "fastap"
    try:
        return detect_layout(obj)[0]
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def load_model(spec: Union[str, ModelSpec, RetrievalNet], arch: str = "resnet50",
               pooling: Optional[str] = None) -> RetrievalNet:
    """A :class:`~fastap.models.RetrievalNet` from a model spec (or the net itself).

    Args:
        spec: see :func:`parse_model_spec`.
        arch: the trunk of a foreign checkpoint or of ``torchvision:<weights>``; a fastap
            checkpoint restores its own.
        pooling: ``gem``/``mac``/``spoc``. ``None``: GeM for foreign weights, the stored pooling
            for a fastap checkpoint (which refuses a different one).

    A forced ``<layout>:`` must agree with the file: prefix layouts (MoCo, MoCo v3, DINO full,
    fastap) are recognised from their keys and must match; among the plain-torchvision-named
    layouts (DINO backbone, SimCLR, BYOL, torchvision) the forced one sets ``meta['layout']`` and
    the preprocessing (SimCLR: none; the others: ImageNet mean/std).
    """
    if isinstance(spec, RetrievalNet):
        return spec
    if not isinstance(spec, ModelSpec):
        spec = parse_model_spec(spec)
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    options: dict[str, Any] = {}
    if pooling is not None:
        options["pooling"] = pooling.lower()

    if spec.kind == "torchvision":
        return from_pretrained(f"torchvision:{spec.weights}", arch=spec.arch or arch, **options)

    assert spec.path is not None
    forced = spec.layout
    if forced is not None:
        found = _peek_layout(spec.path)
        ok = (found == forced or (forced == "dino" and found == "dino-full")
              or (forced in _PLAIN_LAYOUTS and found in _PLAIN_LAYOUTS))
        if not ok:
            hint = ("; drop the prefix" if found == "fastap" else
                    f"; use {found.replace('-full', '')}:{spec.path} or the bare path")
            raise ValueError(f"{spec.path} is a {found} checkpoint, not {forced}{hint}")
        net = from_pretrained(spec.path, arch=arch, **options)
        if found in _PLAIN_LAYOUTS and forced != found:
            net.meta["layout"] = forced
            if forced in _RAW_INPUT_LAYOUTS:
                net.meta["mean"], net.meta["std"] = None, None
            else:
                from .models import IMAGENET_MEAN, IMAGENET_STD
                net.meta["mean"], net.meta["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
        return net

    # No pooling option unless asked: a fastap checkpoint restores its own (and refuses a
    # different one); foreign weights get RetrievalNet's default, GeM.
    return from_pretrained(spec.path, arch=arch, **options)


# ----------------------------------------------------------------------------------------------
# Whitening files and options
# ----------------------------------------------------------------------------------------------


def save_whitening(whitening: Whitening, path: PathLike, **extra: Any) -> Path:
    """Write a :class:`~fastap.whitening.Whitening` as ``{'mean', 'projection', **extra}``
    (plain tensors, readable with ``weights_only=True``) — the file ``--whiten learned:FILE``
    reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, {"mean": whitening.mean.detach().cpu(),
                             "projection": whitening.projection.detach().cpu(), **extra})
    return path


def load_whitening(path: PathLike) -> Whitening:
    """Read a learned whitening: a saved :class:`~fastap.whitening.Whitening`, a
    ``(mean, projection)`` pair or a dict with ``mean`` and ``projection`` (or ``m``/``P``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"whitening file not found: {path}")
    try:
        with torch.serialization.safe_globals([Whitening]):
            obj = load_torch_file(path, map_location="cpu", weights_only=True)
    except DamagedFileError as err:
        raise ValueError(f"{err}; restore it or write it again") from err
    except Exception as err:  # torch raises several kinds for foreign or truncated files
        raise ValueError(f"{path} is not a readable whitening file: {type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                         ) from err
    mean = proj = None
    if isinstance(obj, Mapping):
        mean = obj.get("mean", obj.get("m"))
        proj = obj.get("projection", obj.get("P"))
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        mean, proj = obj
    if not (isinstance(mean, torch.Tensor) and isinstance(proj, torch.Tensor)):
        raise ValueError(f"{path}: expected a Whitening, a (mean, projection) pair or a dict "
                         f"with 'mean' and 'projection' tensors, got {type(obj).__name__}")
    if mean.dim() != 1 or proj.dim() != 2 or proj.shape[1] != mean.shape[0]:
        raise ValueError(f"{path}: mean must be (D,) and projection (D', D), got "
                         f"{tuple(mean.shape)} and {tuple(proj.shape)}")
    return Whitening(mean.to(torch.float64), proj.to(torch.float64))


def parse_whiten(value: Union[None, str, Whitening]) -> Union[None, str, Whitening]:
    """``None``/``"none"`` → ``None``; ``"pca"``; ``"learned:<file>"`` → the loaded Whitening
    (a ``Whitening`` passes through). Raises ``ValueError`` for anything else."""
    if value is None or isinstance(value, Whitening):
        return value
    text = str(value).strip()
    if text.lower() == "none":
        return None
    if text.lower() == "pca":
        return "pca"
    kind, sep, file = text.partition(":")
    if kind.lower() == "learned" and sep and file:
        return load_whitening(file)
    raise ValueError(f"whiten must be 'none', 'pca' or 'learned:<file>', got {value!r}")


# ----------------------------------------------------------------------------------------------
# Descriptors
# ----------------------------------------------------------------------------------------------


def _model_key(net: RetrievalNet) -> str:
    meta = json.dumps(getattr(net, "meta", {}), sort_keys=True, default=str)
    return hashlib.sha1(f"{net_fingerprint(net)}|{meta}".encode()).hexdigest()[:12]


def _cache_tag(scales: Sequence[float], max_size: Optional[int], amp: Optional[str]) -> str:
    """``s<scales>-m<max_size>``, with ``-x<hash>`` when ``.4g`` does not give the scales exactly
    (1/√2 vs 0.7071) and ``-amp_<dtype>`` on CUDA (``float16`` with amp, ``float32`` without)
    and for a bfloat16 trunk on the CPU (``bfloat16``; see :func:`fastap.extraction.amp_key`).

    Caches written before these suffixes (fastap of 2026-11-26 and earlier) are found again
    only for single-scale CPU runs; multi-scale (1/√2) and CUDA runs, and every queries folder
    (now keyed by the query boxes), extract once more under the new names.
    """
    s = "_".join(f"{v:.4g}" for v in scales)
    if any(float(f"{v:.4g}") != v for v in scales):
        s += "-x" + _short_hash([repr(float(v)) for v in scales])
    return (f"s{s}-m{max_size if max_size is not None else 'full'}"
            + (f"-amp_{amp}" if amp else ""))


def _short_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj).encode()).hexdigest()[:8]


def _cached(folder: Path, count: int, scales: Sequence[float],
            key: Mapping[str, Any]) -> Optional[np.ndarray]:
    """The finished descriptors of ``folder`` when they match, without touching the net."""
    meta = folder / "meta.json"
    if not meta.exists():
        return None
    try:
        state = read_meta(meta)
    except ValueError:
        return None  # extract_descriptors refuses it by name
    if (not state["complete"] or state["count"] != count
            or [float(s) for s in state["scales"]] != [float(s) for s in scales]
            or any(state.get(k) != v for k, v in key.items())):
        return None
    try:
        return load_descriptors(folder)
    except (OSError, ValueError, EOFError):
        return None  # extract_descriptors rebuilds a damaged result (or says why it cannot)


def _check_images(paths: Sequence[Path], what: str, root: Path, name: str) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        # `fastap download` knows the public datasets only; a user's own folder of the same
        # layout has to be completed by hand.
        fix = (f"download them with `fastap download {name} --root {root}`" if name in DATASETS
               else f"put them under {root / name / 'jpg'}")
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} {what} images are missing "
                                f"(e.g. {shown}); {fix}")


def _trunk_precision(device: torch.device, amp: Optional[bool], precision: str
                     ) -> tuple[bool, torch.dtype, str, str]:
    """``(amp, amp_dtype, precision that runs, why)`` of the trunk during extraction."""
    if amp is not None and precision != "auto":
        raise ValueError(f"give amp ({amp}) or precision ({precision!r}), not both")
    if device.type == "cuda" and precision == "auto":  # CUDA's float16 default, as before
        on = use_amp(device, amp)
        return on, torch.float16, "fp16" if on else "fp32", ("amp" if on else "amp off")
    ran, why = resolve_precision(precision, device, "--precision")
    return ran == "bf16", torch.bfloat16, ran, why


def _chunk_size(folder: Optional[Path], count: int, batch_size: int) -> int:
    """Rows per chunk: the folder's own on resume, else about 1/64 of ``count`` (at least 8,
    at most ``_CHUNK`` = 10000) rounded up to whole batches.

    Chunks are the units the processes of a group share, so a small split needs small chunks;
    whole batches keep the batches those of one chunk-less pass.
    """
    if folder is not None and (folder / "meta.json").exists():
        with contextlib.suppress(ValueError):
            return int(read_meta(folder / "meta.json")["chunk_size"])
    rows = min(_CHUNK, max(8, -(-count // 64)))
    return batch_size * -(-rows // batch_size)


def _describe(net, dataset, folder: Optional[Path], scales, key, cached, *, batch_size, workers,
              device, amp, amp_dtype, progress, desc, log, sharded: bool, stats: dict
              ) -> tuple[Union[torch.Tensor, np.ndarray], bool]:
    """(descriptors, whether they came from the cache ``cached``): a float32 CPU tensor, or on
    the ranks > 0 of a group (which do not evaluate) the array as it is, a memmap from a folder.
    ``stats`` receives :func:`~fastap.extraction.extract_descriptors`'s."""
    load = not sharded or rank() == 0
    if cached is not None:
        log(f"{desc}: {len(cached)} descriptors from the cache {folder}")
        stats.update(world_size=world_size() if sharded else 1,
                     images_per_rank=[0] * (world_size() if sharded else 1))
        return (torch.from_numpy(np.array(cached, dtype=np.float32)) if load else cached), True
    out = extract_descriptors(net, dataset, scales=scales, batch_size=batch_size,
                              num_workers=workers, device=device, amp=amp, out=folder,
                              chunk_size=_chunk_size(folder, len(dataset), batch_size),
                              progress=progress, desc=desc, key=key, amp_dtype=amp_dtype,
                              distributed=sharded, stats=stats)
    if not load:
        return out, False
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(np.array(out, dtype=np.float32))
    return out.float(), False


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def compute_scores(queries: Union[torch.Tensor, np.ndarray],
                   database: Union[torch.Tensor, np.ndarray], *,
                   device: Union[str, torch.device, None] = None,
                   block_size: int = _BLOCK) -> torch.Tensor:
    """Cosine similarities ``L2N(q) @ L2N(x)ᵀ``: (Q, D) × (N, D) → (Q, N) float32 on the CPU.

    Database rows are moved to ``device`` ``block_size`` at a time (a memmap works), so only
    one block and the (Q, N) result need to be in memory at once.
    """
    q = torch.as_tensor(np.asarray(queries) if isinstance(queries, np.ndarray) else queries)
    device = torch.device(device) if device is not None else q.device
    q = F.normalize(q.to(device, torch.float32), dim=-1)
    n = database.shape[0]
    if database.shape[1] != q.shape[1]:
        raise ValueError(f"queries are {q.shape[1]}-d but the database is {database.shape[1]}-d")
    out = torch.empty(q.shape[0], n, dtype=torch.float32)
    for start in range(0, n, block_size):
        block = database[start:start + block_size]
        if isinstance(block, np.ndarray):
            block = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
        block = F.normalize(block.to(device, torch.float32), dim=-1)
        out[:, start:start + block.shape[0]] = (q @ block.T).cpu()
    return out


def _postprocess(q: torch.Tensor, x: torch.Tensor, n_db: int, *, whiten, whiten_dim, qe,
                 qe_alpha, dba, dba_alpha, device, log) -> tuple[torch.Tensor, torch.Tensor,
                                                                  dict]:
    """Whitening → DBA → αQE. Returns the new (q, x) and what was actually applied."""
    applied: dict[str, Any] = {}
    q = F.normalize(q.to(device, torch.float32), dim=-1)
    x = F.normalize(x.to(device, torch.float32), dim=-1)
    if whiten is not None:
        if isinstance(whiten, Whitening):
            w, kind = whiten, "learned"
        else:
            # PCA-whitening learned on the benchmark's own database (distractors excluded):
            # the common "PCAw on the database" variant.
            w, kind = pca_whitening(x[:n_db]), "pca"
        d_in = w.mean.shape[0]
        if d_in != q.shape[1]:
            raise ValueError(f"the whitening expects {d_in}-d descriptors, the model gives "
                             f"{q.shape[1]}-d")
        dim = whiten_dim
        max_dim = w.projection.shape[0]
        if kind == "pca" and dim is None and n_db - 1 < max_dim:
            # Directions beyond the database's rank have no variance to learn from; keeping
            # them would blow up noise by 1/sqrt(eps).
            dim = max(1, n_db - 1)
            log(f"pca whitening: {n_db} database images span at most {dim} dimensions; "
                f"keeping {dim}")
        if dim is not None and not 1 <= dim <= max_dim:
            raise ValueError(f"whiten_dim must be in [1, {max_dim}], got {dim}")
        w = w.to(device)
        q, x = apply_whitening(q, w, dim), apply_whitening(x, w, dim)
        applied["whiten"] = {"kind": kind, "dim": int(q.shape[1])}
    if dba:
        if dba > x.shape[0]:
            raise ValueError(f"dba={dba} exceeds the database size {x.shape[0]}")
        x = database_augmentation(x, n=dba, alpha=dba_alpha)
        applied["dba"] = {"n": dba, "alpha": dba_alpha}
    if qe:
        if qe > x.shape[0]:
            raise ValueError(f"qe={qe} exceeds the database size {x.shape[0]}")
        q = alpha_query_expansion(q, x, n=qe, alpha=qe_alpha)
        applied["qe"] = {"n": qe, "alpha": qe_alpha}
    return q, x, applied


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def _num(v: float) -> Optional[float]:
    v = float(v)
    return None if math.isnan(v) else v


def _fmt(v: Optional[float], width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}.2f}"


def format_table(result: Mapping[str, Any]) -> str:
    """The results table (rows Easy/Medium/Hard, columns mAP and mP@k, two decimals) followed
    by the one-line summary of :func:`format_summary`."""
    res = result["results"]
    kappas = result.get("kappas", list(KAPPAS))
    sizes = result.get("sizes", {})
    head = f"{result['dataset']}"
    if sizes:
        head += (f" — {sizes.get('queries')} queries, {sizes.get('database')} database images"
                 + (f" + {sizes['distractors']} distractors" if sizes.get("distractors") else ""))
    model = result.get("model", {}).get("spec")
    lines = [head + (f"; model {model}" if model else "")]
    cols = ["mAP"] + [f"mP@{k}" for k in kappas]
    lines.append(f"{'':<8}" + "".join(f"{c:>8}" for c in cols))
    for setup, row in res.items():
        values = [row["mAP"]] + [row["mP@k"][str(k)] for k in kappas]
        lines.append(f"{_ROW_NAMES.get(setup, setup):<8}" + "".join(_fmt(v, 8) for v in values))
    lines.append(format_summary(result))
    return "\n".join(lines)


def format_summary(result: Mapping[str, Any]) -> str:
    """``roxford5k: E 67.34  M 49.22  H 22.81`` (``roxford5k+1m`` with distractors)."""
    tag = result.get("tag", result["dataset"])
    parts = []
    for setup, row in result["results"].items():
        letter = _ROW_NAMES.get(setup, setup)[0]
        parts.append(f"{letter} {_fmt(row['mAP'], 0).strip()}")
    return f"{tag}: " + "  ".join(parts)


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def _ground_truth_kind(gnd: Sequence[Mapping]) -> str:
    if all("easy" in g and "hard" in g for g in gnd):
        return "revisited"
    if all("ok" in g for g in gnd):
        return "original"
    raise ValueError("the ground truth has neither easy/hard (Revisited) nor ok (original "
                     "Oxford/Paris) lists")


def _check_int(name: str, value: Any, lo: int, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


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
    log = log or (lambda msg: None)
    sharded = use_group(distributed)

    # -- options -------------------------------------------------------------------------------
    batch_size = _check_int("batch_size", batch_size, 1)
    workers = _check_int("workers", workers, 0)
    qe = _check_int("qe", qe, 0)
    dba = _check_int("dba", dba, 0)
    show_queries = _check_int("show_queries", show_queries, 0)
    whiten_dim = _check_int("whiten_dim", whiten_dim, 1, allow_none=True)
    max_size = _check_int("max_size", max_size, 1, allow_none=True)
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
    whiten_label = whiten if isinstance(whiten, str) or whiten is None else "learned"
    whiten = parse_whiten(whiten)
    if whiten_dim is not None and whiten is None:
        raise ValueError("whiten_dim needs a whitening (whiten='pca' or 'learned:<file>')")
    device = resolve_device(device, "--device")
    amp, amp_dtype, ran, why = _trunk_precision(device, amp, precision)
    log(f"precision {ran} ({why})")
    kappas = tuple(int(k) for k in kappas)

    # -- data and model ------------------------------------------------------------------------
    dataset = RevisitedDataset(root, dataset_name)
    kind = _ground_truth_kind(dataset.gnd)
    distractor_set = Revisitop1M(root) if distractors else None
    # Options that cannot work fail here, not after the whole extraction.
    n_total = dataset.num_database + (len(distractor_set) if distractor_set is not None else 0)
    for flag, n in (("qe", qe), ("dba", dba)):
        if n > n_total:
            raise ValueError(f"{flag}={n} exceeds the database size {n_total} (lower --{flag})")

    t = time.perf_counter()
    if isinstance(net_or_spec, RetrievalNet):
        spec, spec_text = None, net_or_spec.meta.get("source") or "RetrievalNet"
    elif isinstance(net_or_spec, ModelSpec):
        spec, spec_text = net_or_spec, net_or_spec.text
    else:
        spec_text = str(net_or_spec)
        spec = parse_model_spec(spec_text)
    net = load_model(net_or_spec if spec is None else spec, arch=arch, pooling=pooling)
    timings["load_model"] = time.perf_counter() - t
    if isinstance(whiten, Whitening):
        d_in, d_out = whiten.mean.shape[0], whiten.projection.shape[0]
        if d_in != net.out_dim:
            raise ValueError(f"--whiten {whiten_label}: the whitening expects {d_in}-d "
                             f"descriptors, the model gives {net.out_dim}-d")
    else:
        d_out = net.out_dim  # PCA: at most the descriptor dimension
    if whiten_dim is not None and whiten_dim > d_out:
        raise ValueError(f"--whiten-dim {whiten_dim} exceeds the {d_out} dimensions of the "
                         f"whitening ({whiten_label})")

    cache_root = None
    if features_dir is not None:
        slug = spec.slug if spec is not None else re.sub(
            r"[^A-Za-z0-9._-]+", "-", f"net-{net.meta.get('arch')}")
        cache_root = Path(features_dir).expanduser() / f"{slug}-{_model_key(net)}"
    amp_name = amp_key(device, amp, amp_dtype)  # as extract_descriptors records it
    tag = _cache_tag(scales, max_size, amp_name)
    # The query crops depend on the names and boxes of the ground truth: a re-annotated file
    # with as many queries must not reuse the old crops' descriptors.
    boxes = _short_hash([[name, list(dataset.query_bbox(i))]
                         for i, name in enumerate(dataset.qimlist)])

    def folder(ds_name: str, split: str) -> Optional[Path]:
        return None if cache_root is None else cache_root / ds_name / f"{split}-{tag}"

    common = dict(batch_size=batch_size, workers=workers, device=device, amp=amp,
                  amp_dtype=amp_dtype, progress=progress, log=log, sharded=sharded)
    features: dict[str, Any] = {}
    splits = [("queries", dataset.queries(max_size=max_size),
               folder(dataset_name, f"queries-b{boxes}"), {"query_boxes": boxes},
               dataset.query_paths(), dataset_name),
              ("database", dataset.database(max_size=max_size), folder(dataset_name, "database"),
               {}, dataset.database_paths(), dataset_name)]
    if distractor_set is not None:
        splits.append(("distractors", distractor_set.database(max_size=max_size),
                       folder(distractor_set.name, "database"), {}, None, distractor_set.name))
    descs: dict[str, Any] = {}
    images_per_rank = [0] * (world_size() if sharded else 1)
    for split, images, where, key, paths, owner in splits:
        t = time.perf_counter()
        cached = None if where is None else _cached(where, len(images), scales,
                                                    dict(key, amp=amp_name))
        if sharded and where is not None:
            # Extracting is a collective: every process follows rank 0's look at the cache
            # (another job may finish the folder between two processes' looks).
            if not broadcast_object(cached is not None):
                cached = None
            elif cached is None:
                cached = load_descriptors(where)
        if cached is None:
            check = paths if paths is not None else distractor_set.database_paths()
            _check_images(check, split if split != "distractors" else "distractor",
                          dataset.root, owner)
        stats: dict[str, Any] = {}
        descs[split], hit = _describe(net, images, where, scales, key, cached,
                                      desc=f"{dataset_name} {split}"
                                      if split != "distractors" else "revisitop1m",
                                      stats=stats, **common)
        timings[f"extract_{split}"] = time.perf_counter() - t
        features[split] = {"cached": hit, "path": str(where) if where is not None else None,
                           "count": int(descs[split].shape[0]), "dim": int(descs[split].shape[1]),
                           "images_per_rank": stats["images_per_rank"]}
        images_per_rank = [a + b for a, b in zip(images_per_rank, stats["images_per_rank"])]
    if sharded and rank() != 0:
        # Rank 0 evaluates alone (the search and the mAP are those of one process); the others
        # wait for its result in this broadcast. Should rank 0 fail, its report (see
        # failures_propagated) ends the wait with its cause.
        return broadcast_object(None)

    q = descs["queries"]
    x = descs["database"]
    n_db = x.shape[0]
    if "distractors" in descs:
        x = torch.cat([x, descs["distractors"]])
    del descs

    # -- post-processing and scores --------------------------------------------------------------
    t = time.perf_counter()
    q, x, applied = _postprocess(q, x, n_db, whiten=whiten, whiten_dim=whiten_dim, qe=qe,
                                 qe_alpha=qe_alpha, dba=dba, dba_alpha=dba_alpha, device=device,
                                 log=log)
    timings["postprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = compute_scores(q, x, device=device)
    timings["scores"] = time.perf_counter() - t

    t = time.perf_counter()
    gnd = {"imlist": dataset.imlist, "gnd": dataset.gnd}
    if kind == "revisited":
        raw = evaluate_revisited(scores, gnd, kappas)
    else:
        raw = {"original": evaluate_original(scores, gnd, kappas)}
    timings["evaluate"] = time.perf_counter() - t

    results = {setup: {"mAP": _num(r["mAP"]),
                       "mP@k": {str(k): _num(v) for k, v in zip(kappas, r["mP@k"])}}
               for setup, r in raw.items()}
    top_n = min(max(max(kappas), 10), scores.shape[1])
    top = scores.topk(top_n, dim=1).indices.numpy()
    n_distractors = x.shape[0] - n_db
    distractor_names = distractor_set.imlist if distractor_set is not None else []

    def db_name(j: int) -> str:
        return dataset.imlist[j] if j < n_db else distractor_names[j - n_db]

    queries = [{"name": dataset.qimlist[i],
                "AP": {setup: _num(r["APs"][i]) for setup, r in raw.items()},
                "top": [db_name(int(j)) for j in top[i]]}
               for i in range(len(dataset.qimlist))]

    result: dict[str, Any] = {
        "model": {"spec": spec_text, **json.loads(json.dumps(net.meta, default=str)),
                  "gem_p": net.gem_p},
        "dataset": dataset_name,
        "tag": dataset_name + ("+1m" if distractors else ""),
        "sizes": {"queries": len(dataset.qimlist), "database": n_db,
                  "distractors": n_distractors},
        "options": {"arch": net.meta.get("arch"), "pooling": net.meta.get("pooling"),
                    "max_size": max_size, "scales": list(scales), "distractors": bool(distractors),
                    "whiten": whiten_label if whiten_label is not None else "none",
                    "whiten_dim": whiten_dim, "qe": qe, "qe_alpha": float(qe_alpha),
                    "dba": dba, "dba_alpha": float(dba_alpha), "device": str(device),
                    "batch_size": batch_size, "workers": workers, "amp": amp,
                    "precision": ran, "precision_reason": why,
                    "protocol": kind, "applied": applied},
        "kappas": list(kappas),
        "results": results,
        "queries": queries,
        "features": features,
        "timings": timings,
        "files": {},
        "world_size": len(images_per_rank),
        "images_per_rank": images_per_rank,
    }

    # -- files -------------------------------------------------------------------------------
    if output is not None:
        out = Path(output).expanduser()
        # A full disk here loses only this run's output; the extracted descriptors stay cached.
        hint = ("the cached descriptors are reused" if cache_root is not None
                else "the descriptors are extracted again")
        with naming_write_errors(out, hint):
            out.mkdir(parents=True, exist_ok=True)
        base = result["tag"]
        files = result["files"]
        files["json"], files["text"] = str(out / f"{base}.json"), str(out / f"{base}.txt")
        if save_scores:
            files["scores"] = str(out / f"{base}_scores.npy")
            with naming_write_errors(files["scores"], hint):
                np.save(files["scores"], scores.numpy())

        def write() -> None:
            timings["total"] = time.perf_counter() - t_start
            atomic_write_text(files["text"], format_table(result) + "\n", hint=hint)
            atomic_write_text(files["json"], json.dumps(result, indent=1) + "\n", hint=hint)

        write()  # the numbers are safe on disk before the figure is drawn
        if show_queries:
            t = time.perf_counter()
            from .plots import plot_retrieval_results

            path = out / f"{base}_retrieval.png"
            chosen = np.unique(np.linspace(0, len(dataset.qimlist) - 1,
                                           min(show_queries, len(dataset.qimlist))).round()
                               ).astype(int).tolist()
            distractor_paths = (distractor_set.database_paths()
                                if distractor_set is not None else [])
            plot_retrieval_results(dataset, chosen, top[:, :10], path, setup=show_setup,
                                   distractor_paths=distractor_paths,
                                   aps=[queries[i]["AP"].get(show_setup,
                                                             queries[i]["AP"].get("original"))
                                        for i in chosen],
                                   title=f"{result['tag']} — {spec_text}")
            files["png"] = str(path)
            timings["plot"] = time.perf_counter() - t
            write()
    else:
        timings["total"] = time.perf_counter() - t_start

    if keep_arrays:
        result["arrays"] = {"queries": q.cpu(), "database": x.cpu(), "scores": scores}
    return broadcast_object(result) if sharded else result
