"""The descriptor cache of ``fastap eval`` and the extraction step that fills it.

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
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .._device import resolve_precision
from ..distributed import rank, world_size
from ..download import DATASETS
from ..extraction import extract_descriptors, load_descriptors, net_fingerprint, read_meta, use_amp
from ..models import RetrievalNet

# The most rows of one extraction chunk (a chunk is the unit of resumption and of sharing
# between processes).
_CHUNK = 10000


def model_key(net: RetrievalNet) -> str:
    meta = json.dumps(getattr(net, "meta", {}), sort_keys=True, default=str)
    return hashlib.sha1(f"{net_fingerprint(net)}|{meta}".encode()).hexdigest()[:12]


def cache_tag(scales: Sequence[float], max_size: Optional[int], amp: Optional[str]) -> str:
    """``s<scales>-m<max_size>``, with ``-x<hash>`` when ``.4g`` does not give the scales exactly
    (1/√2 vs 0.7071) and ``-amp_<dtype>`` on CUDA (``float16`` with amp, ``float32`` without)
    and for a bfloat16 trunk on the CPU (``bfloat16``; see :func:`fastap.extraction.amp_key`).

    Caches written before these suffixes (fastap of 2026-11-26 and earlier) are found again
    only for single-scale CPU runs; multi-scale (1/√2) and CUDA runs, and every queries folder
    (now keyed by the query boxes), extract once more under the new names.
    """
    s = "_".join(f"{v:.4g}" for v in scales)
    if any(float(f"{v:.4g}") != v for v in scales):
        s += "-x" + short_hash([repr(float(v)) for v in scales])
    return (f"s{s}-m{max_size if max_size is not None else 'full'}"
            + (f"-amp_{amp}" if amp else ""))


def short_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj).encode()).hexdigest()[:8]


def cached_descriptors(folder: Path, count: int, scales: Sequence[float],
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


def check_images(paths: Sequence[Path], what: str, root: Path, name: str) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        # `fastap download` knows the public datasets only; a user's own folder of the same
        # layout has to be completed by hand.
        fix = (f"download them with `fastap download {name} --root {root}`" if name in DATASETS
               else f"put them under {root / name / 'jpg'}")
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} {what} images are missing "
                                f"(e.g. {shown}); {fix}")


def trunk_precision(device: torch.device, amp: Optional[bool], precision: str
                     ) -> tuple[bool, torch.dtype, str, str]:
    """``(amp, amp_dtype, precision that runs, why)`` of the trunk during extraction."""
    if amp is not None and precision != "auto":
        raise ValueError(f"give amp ({amp}) or precision ({precision!r}), not both")
    if device.type == "cuda" and precision == "auto":  # CUDA's float16 default, as before
        on = use_amp(device, amp)
        return on, torch.float16, "fp16" if on else "fp32", ("amp" if on else "amp off")
    ran, why = resolve_precision(precision, device, "--precision")
    return ran == "bf16", torch.bfloat16, ran, why


def chunk_size(folder: Optional[Path], count: int, batch_size: int) -> int:
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


def describe(net, dataset, folder: Optional[Path], scales, key, cached, *, batch_size, workers,
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
                              chunk_size=chunk_size(folder, len(dataset), batch_size),
                              progress=progress, desc=desc, key=key, amp_dtype=amp_dtype,
                              distributed=sharded, stats=stats)
    if not load:
        return out, False
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(np.array(out, dtype=np.float32))
    return out.float(), False
