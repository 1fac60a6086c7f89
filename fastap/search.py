"""Exact similarity search: the k best database items per query without the (B, N) score matrix.

``topk_similarity`` streams the database in blocks: each block's scores come from matrix
products, are folded into a running per-query candidate list at once, and the survivors are
re-scored exactly, so the extra memory is a few MiB of tiles rather than B·N scores. A NumPy
database (including ``numpy.memmap`` arrays larger than memory) is read block by block and never
loaded as a whole.

float32 searches are *certified* (docs/search.md): the value of a pair is
v = fl32(Σ_d q_d·x_d) with the sum in float64 in one fixed order, so values and indices do not
depend on the BLAS, the block sizes, the thread count or the precision of the coarse pass. The
coarse pass runs in float32 or, where the CPU has int8 or bfloat16 dot-product units, on an int8
or bfloat16 copy, with a per-pair error bound that no candidate of the true top-k can escape; all
return identical results.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import _device
from ._checks import as_int
from ._device import cpu_bf16_units, cpu_int8_units  # re-exported: part of this module's API
from .certified import certified_update, rank_order
from .ops import prepare_lowp, topk_similarity_lowp_update, topk_similarity_update
from .ops import topk_similarity as _topk_similarity_op

__all__ = ["topk_similarity", "sharded_topk_similarity", "PreparedDatabase", "cpu_bf16_units",
           "cpu_int8_units", "search_precision", "PRECISIONS"]

ArrayLike = Union[Tensor, np.ndarray]

#: Values of ``precision``: "auto" picks "int8" or "bf16" where they are faster, "fp32" elsewhere.
PRECISIONS = ("auto", "fp32", "bf16", "int8")

# The dtype of each low-precision pass's copy of the database.
_LOWP_DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8}

# Default size of one NumPy block handed to the kernel (rows × D × itemsize).
_NUMPY_BLOCK_BYTES = 32 << 20


def search_precision(precision: str = "auto", *, device: Union[str, torch.device] = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """The coarse pass ``topk_similarity`` runs, ``"fp32"``, ``"bf16"`` or ``"int8"``, and why.

    All give identical results for float32 inputs; ``"bf16"`` and ``"int8"`` need float32
    queries and database, and ``"int8"`` runs on the CPU only. ``"auto"`` chooses, on the CPU,
    int8 where the CPU has int8 dot-product units (:func:`cpu_int8_units`), else bfloat16 where
    it has bfloat16 units (:func:`cpu_bf16_units`), else float32 (measured at B = 1000,
    N = 100,000, D = 512 on an AVX512-VNNI/BF16 CPU, docs/search.md); on CUDA, bfloat16 on
    devices of compute capability 8.0 or later (bfloat16 tensor cores).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, "
                         f"got {precision!r}")
    device = torch.device(device)
    if precision == "fp32":
        return "fp32", "asked for (precision='fp32')"
    if dtype != torch.float32:
        blocker = f"the inputs are {str(dtype).replace('torch.', '')}, not float32"
        if precision != "auto":
            raise ValueError(f"precision={precision!r} needs float32 queries and database: "
                             f"{blocker}; use precision='fp32' or 'auto'")
        return "fp32", blocker
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"precision='int8' runs on the CPU only, got {device.type} tensors; "
                         f"use precision='bf16', 'fp32' or 'auto'")
    if precision != "auto":
        return precision, f"asked for (precision={precision!r})"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return "fp32", f"this GPU (compute capability {major}.{minor}) has no bfloat16 " \
                           f"tensor cores"
        return "bf16", f"this GPU (compute capability {major}.{minor}) has bfloat16 tensor cores"
    if device.type != "cpu":
        return "fp32", f"no low-precision pass for {device.type}"
    # Looked up at call time: tests patch them there.
    int8_units, bf16_units = _device.cpu_int8_units(), _device.cpu_bf16_units()
    if int8_units is not None:
        return "int8", f"this CPU has {int8_units} units"
    if bf16_units is not None:
        return "bf16", f"this CPU has {bf16_units} units"
    return "fp32", "this CPU has no int8 or bfloat16 dot-product units (avx512_vnni, " \
                   "avx_vnni, amx_int8, avx512_bf16 or amx_bf16)"


class PreparedDatabase:
    """A float32 database (N, D) with what a certified low-precision search needs beside it.

    That is its int8 or bfloat16 copy (N, D) and the per-row bound terms, (N, 3) or (N, 2)
    (:func:`fastap.ops.prepare_lowp`). Searching it with :func:`topk_similarity` through the
    copy's pass converts nothing, so repeated searches of one database pay the conversion once;
    asked for another pass (``"auto"``: the pass this machine uses), the search reads the float32
    rows instead. Make one with :meth:`prepare` (in memory) or :meth:`open` (files on disk beside
    an ``.npy`` of descriptors, made once and reused while the descriptors are unchanged).

    Attributes:
        rows: the float32 database, a tensor or NumPy array (a memmap stays one).
        lowp: its low-precision copy: an int8 tensor or array, or a bfloat16 tensor or a NumPy
            ``uint16`` array of the bfloat16 bits.
        norms: float32, ``(‖x̂_j‖, ‖x_j − x̂_j‖)`` rounded up, and for int8 the row's scale
            ``s_j`` (``x̂_j = s_j·lowp_j``).
        precision: the pass the copy is for, ``"int8"`` or ``"bf16"``.
    """

    def __init__(self, rows: ArrayLike, lowp: ArrayLike, norms: ArrayLike):
        n, d = rows.shape
        self.precision = _copy_precision(lowp)
        cols = 3 if self.precision == "int8" else 2
        if tuple(lowp.shape) != (n, d) or tuple(norms.shape) != (n, cols):
            raise ValueError(f"a prepared {self.precision} database needs lowp ({n}, {d}) and "
                             f"norms ({n}, {cols}), got {tuple(lowp.shape)} and "
                             f"{tuple(norms.shape)}")
        self.rows, self.lowp, self.norms = rows, lowp, norms

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rows.shape)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __repr__(self) -> str:
        kind = type(self.rows).__name__
        return f"PreparedDatabase({self.shape[0]} × {self.shape[1]}, {self.precision}, " \
               f"rows: {kind})"

    @classmethod
    def prepare(cls, database: ArrayLike, *, precision: str = "auto",
                block_rows: Optional[int] = None) -> "PreparedDatabase":
        """Prepare a float32 CPU tensor or NumPy array in memory (NumPy block by block) for the
        ``precision`` pass: ``"int8"``, ``"bf16"`` or ``"auto"`` (the one this CPU's searches
        use; bfloat16 where that is float32)."""
        precision = _prepared_precision(precision)
        if isinstance(database, Tensor):
            _check_float32_rows(database, "database")
            if database.device.type != "cpu":
                raise ValueError(f"a prepared database lives on the CPU, got {database.device}")
            rows = database.detach()
            lowp, norms = prepare_lowp(rows, _LOWP_DTYPES[precision])
            return cls(rows, lowp, norms)
        array = _float32_array(database)
        lowp = np.empty(array.shape, dtype=_NUMPY_COPY_DTYPES[precision])
        norms = np.empty((array.shape[0], _norm_columns(precision)), dtype=np.float32)
        _prepare_blocks(array, lowp, norms, block_rows, precision)
        return cls(array, lowp, norms)

    @classmethod
    def open(cls, path: Union[str, os.PathLike], *, precision: str = "auto",
             block_rows: Optional[int] = None) -> "PreparedDatabase":
        """The prepared form of the float32 ``.npy`` file ``path``, memory-mapped.

        The copy for the ``precision`` pass (as in :meth:`prepare`) and its bound terms are kept
        beside it (``<stem>.<pass>.npy``, ``<stem>.<pass>norms.npy`` and ``<stem>.<pass>.json``,
        e.g. ``descriptors.int8.npy``; the JSON records the size and modification time of the
        descriptors they were made from). They are made block by block on the first call and
        reused afterwards; a copy that no longer matches its descriptors, or that cannot be
        read, is made again.
        """
        precision = _prepared_precision(precision)
        path = Path(path)
        rows = np.load(path, mmap_mode="r")
        array = _float32_array(rows, name=str(path))
        lowp_path, norms_path, meta_path = _companions(path, precision)
        stamp = _source_stamp(path, array.shape)
        copy_dtype = _NUMPY_COPY_DTYPES[precision]
        norms_shape = (array.shape[0], _norm_columns(precision))
        try:
            if json.loads(meta_path.read_text()) == stamp:
                lowp = np.load(lowp_path, mmap_mode="r")
                norms = np.load(norms_path, mmap_mode="r")
                if lowp.shape == array.shape and lowp.dtype == copy_dtype and \
                        norms.shape == norms_shape and norms.dtype == np.float32:
                    return cls(array, lowp, norms)
        except (OSError, ValueError):
            pass  # missing, stale or unreadable: made again below
        meta_path.unlink(missing_ok=True)
        tmp = [p.with_name(p.name + ".tmp") for p in (lowp_path, norms_path)]
        lowp = np.lib.format.open_memmap(tmp[0], mode="w+", dtype=copy_dtype, shape=array.shape)
        norms = np.lib.format.open_memmap(tmp[1], mode="w+", dtype=np.float32, shape=norms_shape)
        _prepare_blocks(array, lowp, norms, block_rows, precision)
        lowp.flush()
        norms.flush()
        del lowp, norms
        os.replace(tmp[0], lowp_path)
        os.replace(tmp[1], norms_path)
        meta_path.write_text(json.dumps(stamp))  # last: its presence means both files are whole
        return cls(array, np.load(lowp_path, mmap_mode="r"), np.load(norms_path, mmap_mode="r"))


# How each pass's copy is stored in NumPy (bfloat16 as its bits).
_NUMPY_COPY_DTYPES = {"bf16": np.uint16, "int8": np.int8}


def _norm_columns(precision: str) -> int:
    return 3 if precision == "int8" else 2


def _copy_precision(lowp: ArrayLike) -> str:
    """The pass a low-precision copy is for, from its dtype."""
    if lowp.dtype in (torch.int8, np.int8):
        return "int8"
    if lowp.dtype in (torch.bfloat16, np.uint16):
        return "bf16"
    raise TypeError(f"a prepared database's copy must be int8 or bfloat16 (a NumPy uint16 array "
                    f"of bfloat16 bits), got {lowp.dtype}")


def _prepared_precision(precision: str) -> str:
    if precision not in PRECISIONS or precision == "fp32":
        raise ValueError(f"a prepared database holds a low-precision copy: precision must be "
                         f"'auto', 'bf16' or 'int8', got {precision!r}")
    if precision == "auto":
        path, _ = search_precision("auto")
        return "bf16" if path == "fp32" else path
    return precision


def _companions(path: Path, precision: str) -> tuple[Path, Path, Path]:
    stem = path.name[:-4] if path.name.endswith(".npy") else path.name
    return (path.with_name(f"{stem}.{precision}.npy"),
            path.with_name(f"{stem}.{precision}norms.npy"),
            path.with_name(f"{stem}.{precision}.json"))


def _source_stamp(path: Path, shape: tuple[int, ...]) -> dict:
    st = path.stat()
    return {"source": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "shape": list(shape), "format": 1}


def _prepare_blocks(array: np.ndarray, lowp: np.ndarray, norms: np.ndarray,
                    block_rows: Optional[int], precision: str) -> None:
    step = _block_rows(block_rows, array.shape[1], array.itemsize)
    for start in range(0, array.shape[0], step):
        block_lowp, block_norms = prepare_lowp(_block_tensor(array[start:start + step]),
                                               _LOWP_DTYPES[precision])
        if precision == "bf16":
            block_lowp = block_lowp.view(torch.int16)
        lowp[start:start + step] = block_lowp.numpy().view(lowp.dtype)
        norms[start:start + step] = block_norms.numpy()


def _check_float32_rows(t: Tensor, name: str) -> None:
    if t.dim() != 2 or t.dtype != torch.float32:
        raise TypeError(f"{name} must be a 2-D float32 (N, D) tensor to be prepared, got "
                        f"{t.dtype} of shape {tuple(t.shape)}")


def _float32_array(database, name: str = "database") -> np.ndarray:
    array = np.asarray(database)
    if array.ndim != 2 or array.dtype.kind != "f" or array.itemsize != 4:
        raise TypeError(f"{name} must be a 2-D float32 (N, D) array to be prepared, got "
                        f"{array.dtype} of shape {array.shape}")
    return array


def _block_rows(block_rows, dim: int, itemsize: int) -> int:
    if block_rows is None:
        return max(1, _NUMPY_BLOCK_BYTES // max(1, dim * itemsize))
    block_rows = as_int(block_rows, "block_rows")
    if block_rows <= 0:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    return block_rows


def topk_similarity(queries: ArrayLike, database: Union[ArrayLike, PreparedDatabase], k: int,
                    largest: bool = True, *, block_rows: Optional[int] = None,
                    precision: str = "auto") -> tuple[Tensor, Tensor]:
    r"""Exact top-k of the similarity scores s_ij = ⟨queries_i, database_j⟩ for every query.

    The order is a strict total order: the better score first and, among equal scores, the
    lower database index (NaN ranks above every number, as in :func:`torch.sort`). The (B, N)
    score matrix is never formed.

    For float32 (and float16/bfloat16) inputs the value of a pair is
    v_ij = fl32(Σ_d q_id·x_jd), the exact products summed in float64 in one fixed order and
    rounded to float32: within 2^-24·|s| + 2^-49·D·‖q‖‖x‖ of the exact dot product, and the same
    on every path, thread count and block size. Candidates are selected by a coarse pass with a
    certified error bound and re-scored exactly (docs/search.md). float64 inputs are multiplied
    and ranked in float64 (the BLAS's rounding).

    Args:
        queries: (B, D) float16, bfloat16, float32 or float64 tensor (or NumPy array).
        database: (N, D) tensor on the device of ``queries``; any NumPy array, including a
            ``numpy.memmap`` on disk, read ``block_rows`` rows at a time (the pages of a
            read-only or shared memmap are released after use); or a
            :class:`PreparedDatabase`, searched without converting it.
        k: number of results per query, an integer, 1 <= k <= N.
        largest: True for the k highest scores (inner-product / cosine similarity), False for
            the k lowest.
        block_rows: rows per NumPy block (default: about 32 MiB of the array). Ignored for a
            tensor database, which the kernel blocks itself.
        precision: the coarse pass, ``"auto"`` (default), ``"fp32"``, ``"bf16"`` or
            ``"int8"``; the result is the same. ``"bf16"`` and ``"int8"`` need float32 inputs,
            ``"int8"`` the CPU; ``"auto"`` uses int8 or bfloat16 where the CPU has their
            dot-product units (:func:`search_precision` says what it picks).

    Returns:
        ``(values, indices)``, both (B, k), best first: the scores in float32 (float64 if either
        input is float64) and the database row indices as int64.

    Not differentiable (the outputs are marked non-differentiable; the indices are discrete).
    """
    k = as_int(k, "k")
    largest = bool(largest)
    queries = _as_tensor(queries, "queries")
    if isinstance(database, PreparedDatabase):
        if queries.dim() == 2 and queries.dtype == torch.float64:
            raise TypeError("a PreparedDatabase is float32: search it with float32 (or float16/"
                            "bfloat16) queries, or search its rows with float64 queries")
        path, _ = search_precision(precision, device=queries.device,
                                   dtype=_pair_dtype(queries.dtype, torch.float32))
        if path == database.precision:
            return _search_prepared(queries, database, k, largest, block_rows)
        database, precision = database.rows, path  # another pass: it reads the float32 rows
    if isinstance(database, Tensor):
        path, _ = search_precision(precision, device=queries.device,
                                   dtype=_pair_dtype(queries.dtype, database.dtype))
        comparable = database.device == queries.device and queries.dim() == 2 and \
            database.dim() == 2
        if comparable and queries.is_cuda and _pair_dtype(queries.dtype, database.dtype) != \
                torch.float64:
            return _search_certified_torch(queries, database, k, largest,
                                           _torch_coarse(path, queries.device))
        if path in _LOWP_DTYPES and comparable:
            return _search_converting(queries, database, k, largest, path)
        return _topk_similarity_op(queries, database, k, largest)
    return _topk_similarity_numpy(queries, database, k, largest, block_rows, precision)


def sharded_topk_similarity(queries: ArrayLike, database: Union[ArrayLike, PreparedDatabase],
                            k: int, largest: bool = True, *, group=None,
                            block_rows: Optional[int] = None, precision: str = "auto"
                            ) -> tuple[Tensor, Tensor]:
    """:func:`topk_similarity` with the database split over the processes of a group.

    Under an initialised ``torch.distributed`` process group (``torchrun``), every process
    passes the same queries and the same (typically memory-mapped) database; process r of W
    searches rows ``N·r//W .. N·(r+1)//W`` only, the (B, k) results of all processes are
    gathered, and every process returns the top k of their union. The merge is exact: each item
    of the global top k is in its own share's top k, and the values of the float32 path do not
    depend on which rows a process searched, so the result is that of one process searching
    everything — values, indices and the tie rule (float64 inputs rank the BLAS's float64
    products, which may differ in the last bit between shares).

    Args:
        group: the process group (default: the default group). Without an initialised group
            this is :func:`topk_similarity`.
        The other arguments are those of :func:`topk_similarity`; ``queries`` must be on the
        device the group's backend communicates from (the CPU for gloo).

    Returns:
        ``(values, indices)`` (B, k) on every process, as :func:`topk_similarity`.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return topk_similarity(queries, database, k, largest, block_rows=block_rows,
                               precision=precision)
    k = as_int(k, "k")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    num_db = len(database) if isinstance(database, PreparedDatabase) else database.shape[0]
    if not 1 <= k <= num_db:
        raise ValueError(f"k must be in [1, N = {num_db}], got {k}")
    start, stop = num_db * rank // world, num_db * (rank + 1) // world
    queries = _as_tensor(queries, "queries")
    double = queries.dtype == torch.float64 or (
        not isinstance(database, PreparedDatabase) and database.dtype in (torch.float64,
                                                                          np.float64))
    local_k = min(k, stop - start)
    if local_k > 0:
        values, indices = topk_similarity(queries, _rows(database, start, stop), local_k,
                                          largest, block_rows=block_rows, precision=precision)
        indices = indices + start
    else:  # more processes than rows: this one has none
        values, indices = _empty_state(queries, 0, largest,
                                       torch.float64 if double else torch.float32)
    # Every share contributes k slots (empty ones: index -1, the worst value) so that the
    # gathered tensors have one shape.
    pad_values, pad_indices = _empty_state(queries, k - local_k, largest, values.dtype)
    values = torch.cat([values, pad_values], dim=1).contiguous()
    indices = torch.cat([indices, pad_indices], dim=1).contiguous()
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_indices = [torch.empty_like(indices) for _ in range(world)]
    dist.all_gather(all_values, values, group=group)
    dist.all_gather(all_indices, indices, group=group)
    return _merge_topk(torch.cat(all_values, dim=1), torch.cat(all_indices, dim=1), k, largest)


def _rows(database, start: int, stop: int):
    if isinstance(database, PreparedDatabase):
        return PreparedDatabase(database.rows[start:stop], database.lowp[start:stop],
                                database.norms[start:stop])
    return database[start:stop]


def _merge_topk(values: Tensor, indices: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The k best of candidate lists (B, M): better value first, equal values by the lower
    index, empty slots (index -1) last — the order of the kernels."""
    best = rank_order(values, indices, largest)[:, :k]
    return values.gather(1, best), indices.gather(1, best)


def _pair_dtype(queries: torch.dtype, database: torch.dtype) -> torch.dtype:
    """The dtype that decides the coarse pass: float64 if either is (the float64 path), else the
    database's (queries convert to float32 exactly; the bfloat16 pass needs float32 rows)."""
    return torch.float64 if torch.float64 in (queries, database) else database


def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.from_numpy(_native(np.asarray(x)))
    except TypeError as err:
        raise TypeError(f"{name} must be a tensor or a NumPy array, got {type(x).__name__}: "
                        f"{err}") from None


def _native(block: np.ndarray) -> np.ndarray:
    """A view torch.from_numpy accepts (native byte order, positive strides), else a copy."""
    if not block.dtype.isnative or any(s < 0 for s in block.strides):
        return np.array(block, dtype=block.dtype.newbyteorder("="), order="C", copy=True)
    return block


def _block_tensor(block: np.ndarray) -> Tensor:
    # A read-only memmap view is only read by the kernel; torch warns because it cannot enforce
    # that, which would be noise on every block.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(_native(block))


def _host_tensor(block: ArrayLike) -> Tensor:
    return block if isinstance(block, Tensor) else _block_tensor(np.asarray(block))


def _lowp_tensor(block: ArrayLike) -> Tensor:
    """A block of a prepared copy as the kernel takes it (NumPy bfloat16 bits viewed as
    bfloat16)."""
    if isinstance(block, Tensor):
        return block
    t = _block_tensor(np.ascontiguousarray(block))
    return t.view(torch.bfloat16) if t.dtype == torch.uint16 else t


def _empty_state(queries: Tensor, k: int, largest: bool, dtype: torch.dtype
                 ) -> tuple[Tensor, Tensor]:
    values = torch.full((queries.shape[0], k), -math.inf if largest else math.inf, dtype=dtype,
                        device=queries.device)
    indices = torch.full((queries.shape[0], k), -1, dtype=torch.int64, device=queries.device)
    return values, indices


def _check_search_shapes(queries: Tensor, num_db: int, dim: int, shape, k: int) -> None:
    if queries.dim() != 2:
        raise ValueError(f"queries must be a 2-D (B, D) tensor, got shape {tuple(queries.shape)}")
    if not queries.is_floating_point():
        raise TypeError(f"queries must be float16, bfloat16, float32 or float64, got "
                        f"{queries.dtype}")
    if queries.shape[1] != dim:
        raise ValueError(f"queries and database must have the same embedding dimension D, got "
                         f"queries {tuple(queries.shape)} and database {tuple(shape)}")
    if num_db == 0:
        raise ValueError("database is empty (N = 0 rows): there is nothing to rank")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if k > num_db:
        raise ValueError(f"k = {k} exceeds the number of database items N = {num_db}")


def _search_converting(queries: Tensor, database: Tensor, k: int, largest: bool, path: str
                       ) -> tuple[Tensor, Tensor]:
    """The int8 or bfloat16 pass (``path``) on a float32 CPU tensor, converted block by block as
    the search goes."""
    num_db, dim = database.shape
    _check_search_shapes(queries, num_db, dim, database.shape, k)
    queries = queries.detach().to(torch.float32).contiguous()
    values, indices = _empty_state(queries, k, largest, torch.float32)
    topk_similarity_lowp_update(queries, database.detach(), None, None, 0, values, indices,
                                largest, _LOWP_DTYPES[path])
    return values, indices


def _torch_coarse(path: str, device: torch.device) -> str:
    """The coarse inputs of the torch-operation path for a pass: CUDA's float32 pass rounds
    them to TF32 itself (so cuBLAS's TF32 setting cannot change the product)."""
    return "tf32" if path == "fp32" and device.type == "cuda" else path


def _search_certified_torch(queries: Tensor, database: Tensor, k: int, largest: bool,
                            coarse: str, block_rows: int = 65536) -> tuple[Tensor, Tensor]:
    """The certified search in torch operations (fastap/certified.py): the CUDA path; it runs
    on the CPU too, where the tests hold it to the C++ kernel. ``coarse``: see
    :func:`fastap.certified.certified_update`."""
    num_db, dim = database.shape
    _check_search_shapes(queries, num_db, dim, database.shape, k)
    if not database.is_floating_point():
        raise TypeError(f"database must be float16, bfloat16, float32 or float64, got "
                        f"{database.dtype}")
    queries = queries.detach().to(torch.float32).contiguous()
    values, indices = _empty_state(queries, k, largest, torch.float32)
    for start in range(0, num_db, block_rows):
        certified_update(queries, database[start:start + block_rows].detach(), start, values,
                         indices, largest, coarse=coarse)
    return values, indices


def _search_prepared(queries: Tensor, database: PreparedDatabase, k: int, largest: bool,
                     block_rows: Optional[int]) -> tuple[Tensor, Tensor]:
    num_db, dim = database.shape
    _check_search_shapes(queries, num_db, dim, database.shape, k)
    queries = queries.detach().to(torch.float32).contiguous()
    values, indices = _empty_state(queries, k, largest, torch.float32)
    if isinstance(database.rows, Tensor) and not queries.is_cuda:
        topk_similarity_lowp_update(queries, database.rows, _lowp_tensor(database.lowp),
                                    _as_tensor(database.norms, "norms"), 0, values, indices,
                                    largest)
        return values, indices
    step = _block_rows(block_rows, dim, 4)
    for start in range(0, num_db, step):
        rows = database.rows[start:start + step]
        lowp = database.lowp[start:start + step]
        blocks = (_host_tensor(rows), _lowp_tensor(lowp),
                  _host_tensor(database.norms[start:start + step]))
        if queries.is_cuda:  # the torch-operation path, on blocks copied to the GPU (bfloat16)
            x, x_lowp, x_norms = (b.to(queries.device) for b in blocks)
            certified_update(queries, x, start, values, indices, largest, coarse="bf16",
                             lowp_block=x_lowp, lowp_norms_block=x_norms)
        else:
            topk_similarity_lowp_update(queries, *blocks, start, values, indices, largest)
        for part in (rows, lowp):
            if _releasable(part):
                _release_pages(part)
    return values, indices


def _releasable(array) -> bool:
    return isinstance(array, np.memmap) and getattr(array, "mode", None) in ("r", "r+")


def _topk_similarity_numpy(queries: Tensor, database, k: int, largest: bool,
                           block_rows: Optional[int], precision: str) -> tuple[Tensor, Tensor]:
    array = np.asarray(database)
    if array.ndim != 2:
        raise ValueError(f"database must be a 2-D (N, D) array, got shape {array.shape}")
    if array.dtype.kind != "f" or array.itemsize not in (2, 4, 8):
        raise TypeError(f"database must be a float16, float32 or float64 array, got {array.dtype}")
    num_db, dim = array.shape
    _check_search_shapes(queries, num_db, dim, array.shape, k)
    step = _block_rows(block_rows, dim, array.itemsize)
    db_dtype = {2: torch.float16, 4: torch.float32, 8: torch.float64}[array.itemsize]
    path, _ = search_precision(precision, device=queries.device,
                               dtype=_pair_dtype(queries.dtype, db_dtype))

    double = queries.dtype == torch.float64 or array.itemsize == 8
    acc = torch.float64 if double else torch.float32
    # Converted once here, not once per block inside the kernel (and not differentiable).
    queries = queries.detach().to(acc).contiguous()
    values, indices = _empty_state(queries, k, largest, acc)
    releasable = _releasable(database)
    for start in range(0, num_db, step):
        block = array[start:start + step]
        rows = _block_tensor(block)
        if queries.is_cuda and not double:
            certified_update(queries, rows.to(queries.device), start, values, indices, largest,
                             coarse=_torch_coarse(path, queries.device))
        elif path in _LOWP_DTYPES:
            topk_similarity_lowp_update(queries, rows, None, None, start, values, indices,
                                        largest, _LOWP_DTYPES[path])
        else:
            topk_similarity_update(queries, rows.to(queries.device), start, values, indices,
                                   largest)
        if releasable:
            _release_pages(block)
    return values, indices


_MADV_DONTNEED = 4


def _release_pages(block: np.ndarray) -> None:
    """Drop the pages of a processed memmap block from this process's resident set.

    The file's pages stay in the page cache (a later access re-reads them from there); this only
    keeps the resident set of a sweep over a file larger than memory at one block. Safe for
    shared mappings (memmap modes 'r' and 'r+'), never used for copy-on-write ('c').
    """
    if not sys.platform.startswith("linux") or block.size == 0 or not block.flags.c_contiguous:
        return  # a non-C-order block is scattered over the file: nothing block-sized to drop
    try:
        libc = _libc()
        page = _page_size()
        begin = block.ctypes.data
        span = block.nbytes
        lo = -(-begin // page) * page  # whole pages inside the block only
        hi = (begin + span) // page * page
        if hi > lo:
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
    except (OSError, AttributeError, ValueError):
        pass


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _LIBC.madvise.restype = ctypes.c_int
    return _LIBC


def _page_size() -> int:
    import mmap

    return mmap.PAGESIZE


_LIBC = None
