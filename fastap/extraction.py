"""Multi-scale global-descriptor extraction, in memory or to a resumable folder of chunks.

Multi-scale descriptors (docs/models.md): the normalised image is resized bilinearly by each scale
(default single scale; the usual set is 1, 1/√2, 1/2), each resized image gives an L2-normalised
descriptor f_s, and the result is the L2-normalised generalised mean of the f_s::

    f = L2N( ( (1/S) Σ_s f_s^p )^(1/p) )

with p = GeM's exponent for a GeM net without whitening, and p = 1 (a plain average) for MAC/SPoC
and for nets with whitening, whose descriptors can be negative (the choice of cirtorch).

Writing to disk (``out=<folder>``) keeps a 1M-image run restartable::

    <out>/meta.json            {"format": "fastap-descriptors", "net": net.meta, "fingerprint",
                                "scales", "count", "dim", "chunk_size", "amp", ``key``...,
                                "completed": [...], "complete": bool,
                                "crc32": {file name: CRC-32 of its bytes}}
    <out>/chunk_00000.npy      rows [0, chunk_size) as float32, one file per finished chunk
    <out>/chunk_00000.json     {"crc32": ...}: written by the process of a group that finished
                               the chunk (meta.json is rank 0's); merged into meta.json later
    <out>/descriptors.npy      the assembled (count, dim) float32 array, once all chunks exist

Every file is written to a temporary name and moved into place with ``os.replace``. A rerun
with the same net (same meta and weights fingerprint), scales, amp, ``key`` and chunk size skips
the chunks listed as completed; once ``descriptors.npy`` exists the chunk files are removed (unless
``keep_chunks``) and later calls just open it. A ``descriptors.npy`` that no longer opens (cut
short, of another dtype or shape than ``meta.json`` records, holding NaN or Inf, or with bytes
that fail the CRC-32 recorded when it was written) is discarded with a notice on stderr and
rebuilt from the chunks still on disk, extracting the missing or damaged ones again (with a
notice too). A ``meta.json`` that is not the metadata described above is refused with an error
naming it. Write errors name the file; on a full disk a rerun resumes.

Under a ``torch.distributed`` process group (``torchrun``) the processes share the work: rank 0
checks the folder, the chunks still missing are dealt out in turn (chunk ``todo[i]`` to rank
``i mod W``), each process writes its own chunks and their records, and rank 0 assembles once
all are done while the others wait in a collective. A rerun with any number of processes
extracts only the chunks that are still missing (docs/distributed.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ._checks import as_int
from ._io import Crc32Writer, atomic_write, file_crc32, named_os_error, naming_write_errors
from ._progress import progress_bar
from .distributed import (broadcast_object, gather_objects, on_main, propagate_failures,
                          raise_if_peer_failed, rank, use_group, world_size)
from .models import GeM

__all__ = [
    "DEFAULT_SCALES",
    "MULTISCALE",
    "extract_descriptors",
    "load_descriptors",
    "multiscale_descriptors",
    "net_fingerprint",
]

PathLike = Union[str, os.PathLike]

DEFAULT_SCALES = (1.0,)
#: The multi-scale set of docs/models.md.
MULTISCALE = (1.0, 1.0 / math.sqrt(2.0), 0.5)

_FORMAT = "fastap-descriptors"
_VERSION = 1
_META = "meta.json"
_RESULT = "descriptors.npy"


# ----------------------------------------------------------------------------------------------
# Descriptors of a batch
# ----------------------------------------------------------------------------------------------


def _normalise(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    meta = getattr(net, "meta", {}) or {}
    if meta.get("mean") is None:
        return images
    mean = torch.tensor(meta["mean"], dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def multiscale_power(net: torch.nn.Module, scales: Sequence[float]) -> float:
    """The exponent that averages the scales: GeM's p for a GeM net without whitening, else 1."""
    pool = getattr(net, "pool", None)
    if len(scales) > 1 and isinstance(pool, GeM) and getattr(net, "whiten", None) is None:
        return float(pool.p.detach().float().item())
    return 1.0


def multiscale_descriptors(net: torch.nn.Module, images: torch.Tensor,
                           scales: Sequence[float] = DEFAULT_SCALES, *,
                           normalized: bool = False) -> torch.Tensor:
    """Descriptors of a batch of equally sized images at several scales.

    Args:
        images: (B, 3, H, W), in [0, 1] (``normalized=False``; ``net.meta``'s mean/std are then
            applied) or already normalised.
        scales: resize factors, applied with bilinear interpolation (``align_corners=False``) to
            the normalised tensor; 1 means the image as it is.

    Returns (B, D) float32: ``L2N(((1/S) Σ_s net(resize_s(x))^p)^(1/p))`` with p from
    :func:`multiscale_power`. Runs under whatever grad/autocast mode the caller set.
    """
    if len(scales) == 0:
        raise ValueError("scales must not be empty")
    x = images if normalized else _normalise(net, images)
    power = multiscale_power(net, scales)
    total = None
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, scale_factor=float(s), mode="bilinear",
                                            align_corners=False)
        v = net(xs).float()
        v = v.pow(power) if power != 1.0 else v
        total = v if total is None else total + v
    assert total is not None
    v = total / len(scales)
    if power != 1.0:
        v = v.clamp(min=0).pow(1.0 / power)
    return F.normalize(v, dim=-1)


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------


def _collate(batch: list) -> list[torch.Tensor]:
    """Keep images as a list: sizes may differ; equal sizes are stacked later."""
    images = []
    for item in batch:
        image = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise TypeError("the dataset must yield (image, index) with image a C×H×W tensor, got "
                            f"{type(image).__name__}"
                            + (f" of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor)
                               else ""))
        images.append(image)
    return images


def _describe_batch(net, images: list[torch.Tensor], scales, device, amp, amp_dtype
                    ) -> torch.Tensor:
    """(len(images), D) descriptors; images of equal size go through the net together."""
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    out: list[Optional[torch.Tensor]] = [None] * len(images)
    for idx in groups.values():
        x = torch.stack([images[i] for i in idx]).to(device, non_blocking=True).float()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            v = multiscale_descriptors(net, x, scales)
        v = v.float().cpu()
        for row, i in enumerate(idx):
            out[i] = v[row]
    return torch.stack(out)  # type: ignore[arg-type]


def net_fingerprint(net: torch.nn.Module) -> str:
    """SHA-1 of the net's state (names, shapes, dtypes, bytes; BatchNorm counters left out).

    Tells descriptor folders written by different weights apart even when ``meta`` agrees.
    """
    h = hashlib.sha1()
    for name, t in net.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: What a rerun after a failed write keeps (the hint of a full disk's message).
_CHUNKS_KEPT = "finished chunks are kept"


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()), hint=_CHUNKS_KEPT)


def _chunk_path(out: Path, k: int) -> Path:
    return out / f"chunk_{k:05d}.npy"


def _write_checked(path: Path, write) -> int:
    """:func:`atomic_write` of ``write(file)``; returns the CRC-32 of the bytes written."""
    writer = None

    def run(f) -> None:
        nonlocal writer
        writer = Crc32Writer(f)
        write(writer)

    atomic_write(path, run, hint=_CHUNKS_KEPT)
    return writer.crc


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _meta_problem(state: Any) -> Optional[str]:
    """What makes ``state`` (a parsed ``meta.json`` with fastap's format tag) other than
    descriptor metadata, or None."""
    if not isinstance(state, dict):
        return f"holds a JSON {type(state).__name__}, not the metadata object"
    for key, low in (("count", 0), ("dim", 1), ("chunk_size", 1)):
        if not _is_int(state.get(key)) or state[key] < low:
            return f"{key} must be an integer >= {low}, got {state.get(key)!r}"
    num_chunks = -(-state["count"] // state["chunk_size"])
    done = state.get("completed")
    if not (isinstance(done, list) and all(_is_int(k) and 0 <= k < num_chunks for k in done)):
        return f"completed must be a list of chunk numbers 0 to {num_chunks - 1}, got {done!r}"
    if not isinstance(state.get("complete"), bool):
        return f"complete must be true or false, got {state.get('complete')!r}"
    scales = state.get("scales")
    if not (isinstance(scales, list) and all(isinstance(v, (int, float)) for v in scales)):
        return f"scales must be a list of numbers, got {scales!r}"
    crcs = state.get("crc32", {})
    if not (isinstance(crcs, dict) and all(_is_int(v) for v in crcs.values())):
        return f"crc32 must map file names to integers, got {crcs!r}"
    return None


def read_meta(path: Path) -> dict:
    """The ``meta.json`` at ``path``, checked to be descriptor metadata (ValueError naming it)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        problem = f"unreadable descriptor metadata ({err})"
    else:
        if isinstance(state, dict) and state.get("format") != _FORMAT:  # not fastap's folder
            raise ValueError(f"{path.parent} holds something other than fastap descriptors "
                             f"({path} has no format {_FORMAT!r}); choose another folder")
        problem = _meta_problem(state)
    if problem is not None:
        raise ValueError(f"{path} {problem}; remove the folder {path.parent} (or choose "
                         "another) and rerun to extract its descriptors again")
    return state


def _open_folder(out: Path, header: dict) -> dict:
    """Read ``meta.json`` if it exists and check it was written by the same run settings."""
    path = out / _META
    if not path.exists():
        state = dict(header, completed=[], complete=False, crc32={})
        with naming_write_errors(out, _CHUNKS_KEPT):
            out.mkdir(parents=True, exist_ok=True)
        _write_json(path, state)
        return state
    state = read_meta(path)
    state.setdefault("crc32", {})  # folders written before CRCs were recorded
    diffs = [f"{k}: folder has {state.get(k)!r}, this run {v!r}" for k, v in header.items()
             if state.get(k) != v]
    if diffs:
        raise ValueError(f"{out} holds descriptors of a different run; remove it or choose "
                         "another folder. " + "; ".join(diffs))
    return state


def _array_problem(path: Path, shape: tuple, crc: Optional[int]) -> Optional[str]:
    """Why the float32 ``.npy`` file at ``path`` cannot be used (None if it can): unreadable,
    another dtype or shape, bytes that fail the CRC-32 recorded at its writing (``crc``; None:
    none recorded), NaN or Inf. Reads the file in blocks of 16 MiB."""
    try:
        arr = np.load(path, mmap_mode="r")
        if arr.dtype != np.float32 or arr.shape != shape:
            return f"it holds {arr.dtype} {arr.shape}, not float32 {shape}"
        if crc is not None and file_crc32(path) != crc:
            return "its bytes fail the CRC-32 recorded when it was written"
    except (ValueError, EOFError) as err:  # cut short, garbage (an OSError is no damage)
        return f"it does not open as a .npy array: {err}"
    rows = max(1, 2**22 // max(1, shape[1]))
    for start in range(0, shape[0], rows):
        bad = ~np.isfinite(arr[start:start + rows]).all(axis=1)
        if bad.any():
            return f"row {start + int(bad.argmax())} holds NaN or Inf"
    return None


def use_amp(device: torch.device, amp: Optional[bool],
            amp_dtype: torch.dtype = torch.float16) -> bool:
    """Whether the trunk runs in reduced precision: on CUDA by default; on the CPU only in
    bfloat16 and when asked for (``amp=True``; see :func:`fastap._device.resolve_precision`)."""
    if device.type == "cpu":
        return bool(amp) and amp_dtype == torch.bfloat16
    return device.type == "cuda" and (amp is None or bool(amp))


def amp_key(device: torch.device, amp: bool, amp_dtype: torch.dtype = torch.float16
            ) -> Optional[str]:
    """The trunk's precision as recorded in a descriptors folder: the amp dtype's name (CUDA's
    float16 or bfloat16, the CPU's bfloat16), else ``"float32"`` on CUDA and ``None`` on the CPU. A float16 trunk gives other descriptors;
    ``None`` also matches folders written before this key existed, which is right for CPU
    ones, while a CUDA folder of then (amp on by default, no record) never passes for float32.
    """
    if amp:
        return str(amp_dtype).replace("torch.", "")
    return "float32" if device.type == "cuda" else None


def extract_descriptors(net: torch.nn.Module, dataset: Dataset,
                        scales: Sequence[float] = DEFAULT_SCALES, batch_size: int = 1,
                        num_workers: int = 0, device: Union[str, torch.device, None] = None,
                        amp: Optional[bool] = None, out: Optional[PathLike] = None,
                        chunk_size: int = 10000, *, progress: bool = True,
                        desc: str = "descriptors", amp_dtype: torch.dtype = torch.float16,
                        keep_chunks: bool = False,
                        key: Optional[dict] = None, distributed: Optional[bool] = None,
                        stats: Optional[dict] = None) -> Union[torch.Tensor, np.ndarray]:
    """Global descriptors of every image of ``dataset``, in dataset order.

    Args:
        net: a :class:`~fastap.models.RetrievalNet` (or any module mapping normalised
            (B, 3, H, W) images to (B, D) descriptors, with ``meta`` holding ``mean``/``std``).
        dataset: yields ``(image, index)`` (or a bare image) with image a float 3×H×W tensor in
            [0, 1]; rows of the result follow dataset order.
        scales: e.g. ``(1,)`` or :data:`MULTISCALE` ``(1, 1/√2, 1/2)``; see
            :func:`multiscale_descriptors`.
        batch_size: images per DataLoader batch; within a batch, images of equal size go through
            the net together and the others one size-group at a time, so any size mix works.
        num_workers: DataLoader workers.
        device: where the net runs; default the device of its parameters. The net is moved
            there for the run and back afterwards, and put in eval mode for the run.
        amp: autocast the trunk (``amp_dtype``); default on for CUDA. On the CPU only bfloat16
            autocast, and only with ``amp=True``. Pooling, whitening and normalisation run in
            float32 regardless.
        out: a folder for chunked, resumable output (see the module docstring); ``None`` keeps
            everything in memory.
        chunk_size: rows per chunk file.
        progress: show progress (``desc`` is its label): a bar on a terminal, else lines.
        keep_chunks: keep the chunk files after ``descriptors.npy`` has been assembled.
        key: more JSON-able settings that identify the run (e.g. a hash of the query boxes),
            stored in ``meta.json`` and compared on resume like the net and the scales.
        distributed: split the work over the processes of the initialised ``torch.distributed``
            group (``torchrun``): ``None`` (default) does so when a group of more than one
            process exists, ``False`` extracts everything in this process alone, ``True``
            insists on a group. Every process of the group must then call this function with
            the same arguments (it is a collective); each extracts its own chunks (see
            docs/distributed.md), rank 0 assembles, and every process returns the whole result.
            ``out`` must then be a folder all processes see (one machine, or a shared file
            system); in memory (``out=None``) the chunks are exchanged through the group.
        stats: a dict that receives ``world_size`` and ``images_per_rank`` (the images each
            process extracted in this call; 0 for chunks found on disk).

    Returns:
        ``out=None``: an (n, D) float32 CPU tensor. With ``out``: the (n, D) float32 array of
        ``<out>/descriptors.npy`` as a read-only ``np.memmap`` (``torch.from_numpy(np.array(a))``
        loads it; :func:`load_descriptors` reopens it later), so a 1M × 2048 result need not fit
        in memory.
    """
    scales = tuple(float(s) for s in scales)
    if not scales or any(not (s > 0) for s in scales):
        raise ValueError(f"scales must be positive numbers, got {scales}")
    batch_size = as_int(batch_size, "batch_size", low=1)
    chunk_size = as_int(chunk_size, "chunk_size", low=1)
    sharded = use_group(distributed)
    if not sharded:
        return _extract(net, dataset, scales, batch_size, num_workers, device, amp, out,
                        chunk_size, progress, desc, amp_dtype, keep_chunks, key, stats, False)
    # One failing process stops the others (unless the caller already guards the job).
    with propagate_failures("extracting descriptors"):
        return _extract(net, dataset, scales, batch_size, num_workers, device, amp, out,
                        chunk_size, progress, desc, amp_dtype, keep_chunks, key, stats, True)


def _plan_from_folder(outdir: Path, header: dict, n: int, dim: Optional[int], chunk_size: int,
                      sharded: bool) -> tuple[dict, Optional[list[int]]]:
    """The folder's state and its completed chunks (None: the result is finished and sound).
    Under a group one process reads and checks the folder and the others receive its picture,
    so that every process plans from the same one (the others' chunks of this run must not
    appear in it half-way)."""
    if dim is None:
        raise ValueError("writing to a folder needs net.out_dim")
    if not sharded:
        return _scan_folder(outdir, header, n, dim, chunk_size)
    return broadcast_object(on_main(
        None, lambda: _scan_folder(outdir, header, n, dim, chunk_size),
        f"opening the descriptor folder {outdir}"))


def _extract(net, dataset, scales, batch_size, num_workers, device, amp, out, chunk_size,
             progress, desc, amp_dtype, keep_chunks, key, stats, sharded: bool):
    """:func:`extract_descriptors`; ``sharded``: this process is one of a group's."""
    # One sequence, kept in one place because its steps share the plan: open (or resume) the
    # folder, deal out the missing chunks, extract this process's, gather the records, assemble.
    # The steps that stand alone are functions of their own (_plan_from_folder,
    # _describe_chunks, _assemble).
    n = len(dataset)  # type: ignore[arg-type]
    params = list(net.parameters()) + list(net.buffers())
    home = params[0].device if params else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    amp = use_amp(device, amp, amp_dtype)
    dim = int(getattr(net, "out_dim", 0)) or None
    me, size = (rank(), world_size()) if sharded else (0, 1)
    num_chunks = (n + chunk_size - 1) // chunk_size

    state = None
    outdir = Path(out) if out is not None else None
    if outdir is not None:
        header = {"format": _FORMAT, "version": _VERSION,
                  "net": _jsonable(getattr(net, "meta", {})),
                  "fingerprint": net_fingerprint(net), "scales": list(scales), "count": n,
                  "dim": dim, "chunk_size": chunk_size, "dtype": "float32",
                  "amp": amp_key(device, amp, amp_dtype),
                  **_jsonable(key or {})}
        state, completed = _plan_from_folder(outdir, header, n, dim, chunk_size, sharded)
        if completed is None:  # a finished, sound descriptors.npy
            if stats is not None:
                stats.update(world_size=size, images_per_rank=[0] * size)
            return np.load(outdir / _RESULT, mmap_mode="r")
    else:
        completed = []

    todo = [k for k in range(num_chunks) if k not in set(completed)]
    # Deterministic ownership: the chunks still missing, dealt out in turn. Every process
    # computes the same list, and a rerun (any number of processes) deals only what is missing.
    mine = todo[me::size]
    rows_of = [min(chunk_size, n - k * chunk_size) for k in range(num_chunks)]
    done_rows = sum(rows_of[k] for k in completed)
    pieces: dict[int, torch.Tensor] = {}  # in memory: this process's chunks
    records: dict[int, int] = {}  # to a folder: CRC-32 of each chunk this process wrote

    def keep(k: int, chunk: torch.Tensor) -> None:
        if outdir is None:
            pieces[k] = chunk
            return
        arr = chunk.numpy().astype(np.float32, copy=False)
        path = _chunk_path(outdir, k)
        crc = _write_checked(path, lambda f: np.save(f, arr))
        records[k] = crc
        if sharded:  # meta.json belongs to rank 0; this chunk's record goes beside it
            _write_json(_record_path(outdir, k), {"crc32": crc})
        else:
            state["crc32"][path.name] = crc
            state["completed"] = sorted(set(state["completed"]) | {k})
            _write_json(outdir / _META, state)

    shown = progress and me == 0
    label = desc if size == 1 else f"{desc} (rank 0 of {size})"
    total = n if size == 1 else sum(rows_of[k] for k in mine)
    dim = _describe_chunks(net, dataset, mine, chunk_size, n, dim, scales, batch_size,
                           num_workers, device, home, amp, amp_dtype, keep,
                           progress_bar(total, label, enabled=shown,
                                        initial=done_rows if size == 1 else 0, unit="img",
                                        leave=True))
    extracted = sum(rows_of[k] for k in mine)
    if sharded:
        # Also the point where every process has finished its chunks.
        shares = gather_objects((extracted, records, pieces if outdir is None else None))
        images_per_rank = [s[0] for s in shares]
    else:
        shares, images_per_rank = [(extracted, records, pieces)], [extracted]
    if stats is not None:
        stats.update(world_size=size, images_per_rank=images_per_rank)

    if outdir is None:
        for _, _, theirs in shares:
            pieces.update(theirs)
        if not pieces:
            return torch.empty(0, dim if dim is not None else 0)
        return torch.cat([pieces[k] for k in range(num_chunks)])
    if not sharded:
        return _assemble(outdir, state, n, dim, chunk_size, keep_chunks)

    def assemble() -> None:
        for _, theirs, _ in shares:
            for k, crc in theirs.items():
                state["crc32"][_chunk_path(outdir, k).name] = crc
                state["completed"] = sorted(set(state["completed"]) | {k})
        _write_json(outdir / _META, state)
        _assemble(outdir, state, n, dim, chunk_size, keep_chunks)

    on_main(None, assemble, f"assembling {outdir / _RESULT}")
    return np.load(outdir / _RESULT, mmap_mode="r")


def _record_path(out: Path, k: int) -> Path:
    """Where a process of a group records that it finished chunk ``k`` (and its CRC-32)."""
    return out / f"chunk_{k:05d}.json"


def _scan_folder(outdir: Path, header: dict, n: int, dim: int, chunk_size: int
                 ) -> tuple[dict, Optional[list[int]]]:
    """``(state, chunks done)`` of the descriptor folder ``outdir`` (created if new), with
    ``state`` its ``meta.json`` brought up to date; ``chunks done`` is None when a sound
    ``descriptors.npy`` is there. Damaged results and chunks are dropped with a notice."""
    state = _open_folder(outdir, header)
    final = outdir / _RESULT
    if state["complete"] and final.exists():
        problem = _array_problem(final, (n, dim), state["crc32"].get(_RESULT))
        if problem is None:
            return state, None
        # A damaged result must not block every later run: drop it and rebuild it
        # from the chunks still on disk (kept or unfinished ones), extracting the rest.
        tqdm.write(f"{final} is damaged ({problem}); discarding it and rebuilding it",
                   file=sys.stderr)
        final.unlink()
    state["complete"] = False
    # Chunks finished by the processes of a group are recorded beside them (meta.json is rank
    # 0's): a killed process's finished chunks count too.
    num_chunks = (n + chunk_size - 1) // chunk_size
    for k in range(num_chunks):
        record = _record_path(outdir, k)
        try:
            crc = json.loads(record.read_text())["crc32"]
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged record: the chunk is extracted again
        if _is_int(crc):
            state["crc32"][_chunk_path(outdir, k).name] = crc
            state["completed"] = sorted(set(state["completed"]) | {k})
    completed = []
    for k in sorted(set(state["completed"])):
        path = _chunk_path(outdir, k)
        problem = ("it is missing" if not path.exists() else _array_problem(
            path, (min(chunk_size, n - k * chunk_size), dim), state["crc32"].get(path.name)))
        if problem is None:
            completed.append(k)
        else:
            tqdm.write(f"{path} is damaged ({problem}); extracting its rows again",
                       file=sys.stderr)
    state["completed"] = completed
    _write_json(outdir / _META, state)
    return state, completed


def _describe_chunks(net, dataset, chunks: Sequence[int], chunk_size: int, n: int,
                     dim: Optional[int], scales, batch_size, num_workers, device, home, amp,
                     amp_dtype, keep, bar) -> Optional[int]:
    """Extract the chunks ``chunks`` of ``dataset`` in turn and hand each (rows, D) float32
    tensor to ``keep(k, chunk)``; returns the descriptor dimension (``dim`` or the net's)."""
    was_training = net.training
    net.eval()
    if device != home:
        net.to(device)
    try:
        with torch.inference_mode(), bar:
            for k in chunks:
                start, stop = k * chunk_size, min(n, (k + 1) * chunk_size)
                loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size,
                                    shuffle=False, num_workers=num_workers,
                                    collate_fn=_collate, pin_memory=device.type == "cuda")
                rows = []
                for images in loader:
                    raise_if_peer_failed()  # another process of the group failed: stop now
                    rows.append(_describe_batch(net, images, scales, device, amp, amp_dtype))
                    bar.update(len(images))
                chunk = torch.cat(rows) if rows else torch.empty(0, dim or 0)
                if chunk.shape[0] != stop - start:
                    raise RuntimeError(f"chunk {k}: got {chunk.shape[0]} descriptors for "
                                       f"{stop - start} images")
                if dim is None:
                    dim = chunk.shape[1]
                if chunk.shape[1] != dim:
                    raise RuntimeError(f"the net produced {chunk.shape[1]}-d descriptors, "
                                       f"net.out_dim says {dim}")
                if not torch.isfinite(chunk).all():
                    raise RuntimeError(f"the net produced NaN or Inf descriptors for images "
                                       f"{start} to {stop - 1} of the dataset")
                keep(k, chunk)
    finally:
        if device != home:
            net.to(home)
        net.train(was_training)
    return dim


def _assemble(outdir: Path, state: dict, n: int, dim: int, chunk_size: int,
              keep_chunks: bool) -> np.ndarray:
    """Concatenate the chunk files into ``descriptors.npy`` (atomically), then mark complete."""
    final = outdir / _RESULT
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
              "fortran_order": False, "shape": (n, dim)}

    def write(f) -> None:
        # Plain writes, not a memmap: a full disk is then an OSError, not a SIGBUS.
        np.lib.format.write_array_header_1_0(f, header)
        for k in range((n + chunk_size - 1) // chunk_size):
            try:
                chunk = np.load(_chunk_path(outdir, k))
            except (ValueError, EOFError) as err:  # damaged since the check at the start
                raise ValueError(f"reading {_chunk_path(outdir, k)} failed ({err}); delete it "
                                 "and rerun to extract its rows again") from err
            except OSError as err:  # EACCES, EIO...: not damage, and not the write's failure
                raise named_os_error(err, f"reading {_chunk_path(outdir, k)}: "
                                          f"{err.strerror or err}") from err
            f.write(np.ascontiguousarray(chunk, dtype=np.float32).tobytes())

    crc = _write_checked(final, write)
    if not keep_chunks:
        state["completed"], state["crc32"] = [], {}
    state["crc32"][_RESULT] = crc
    state["complete"] = True
    _write_json(outdir / _META, state)
    for k in range((n + chunk_size - 1) // chunk_size):
        # The records of a group's processes are in meta.json now; the chunks go unless kept.
        for path in (_record_path(outdir, k),) + (() if keep_chunks else (_chunk_path(outdir, k),)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
    return load_descriptors(outdir)


def load_descriptors(out: PathLike) -> np.ndarray:
    """Open a finished descriptor folder: its (n, D) float32 array as a read-only memmap.

    The file is read once to check it against ``meta.json`` (dtype, shape, the CRC-32 recorded
    when it was written, finite values); a damaged one is a ValueError naming it, which
    :func:`extract_descriptors` with the same arguments repairs."""
    outdir = Path(out)
    meta = outdir / _META
    final = outdir / _RESULT
    if not meta.exists():
        raise FileNotFoundError(f"no descriptor folder at {outdir} ({meta} is missing)")
    state = read_meta(meta)
    if not state["complete"] or not final.exists():
        done = len(state["completed"])
        total = (state["count"] + state["chunk_size"] - 1) // state["chunk_size"]
        raise ValueError(f"{outdir}: extraction is unfinished ({done}/{total} chunks); rerun "
                         "extract_descriptors with the same arguments to finish it")
    problem = _array_problem(final, (state["count"], state["dim"]),
                             state.get("crc32", {}).get(_RESULT))
    if problem is not None:
        raise ValueError(f"{final} is damaged ({problem}); rerun extract_descriptors with the "
                         "same arguments to rebuild it")
    return np.load(final, mmap_mode="r")
