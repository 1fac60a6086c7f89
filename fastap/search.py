"""Exact similarity search: the k best database items per query without the (B, N) score matrix.

``topk_similarity`` returns what ``torch.topk(queries @ database.T, k)`` would, with ties broken
by the lower database index (the order of a stable sort), but streams the database in blocks:
each block's scores come from one matrix product (MKL / cuBLAS through ``at::mm``) and are folded
into a running per-query top-k at once, so the extra memory is a few MiB of tiles rather than
B·N scores. A NumPy database (including ``numpy.memmap`` arrays larger than memory) is read block
by block and never loaded as a whole.
"""

from __future__ import annotations

import ctypes
import math
import sys
import warnings
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .ops import topk_similarity_update

__all__ = ["topk_similarity"]

ArrayLike = Union[Tensor, np.ndarray]

# Default size of one NumPy block handed to the kernel (rows × D × itemsize).
_NUMPY_BLOCK_BYTES = 32 << 20


def topk_similarity(queries: ArrayLike, database: ArrayLike, k: int, largest: bool = True, *,
                    block_rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    r"""Exact top-k of the similarity scores s_ij = ⟨queries_i, database_j⟩ for every query.

    Equal to ``torch.topk(queries @ database.T, k, largest=largest)`` except that it never
    forms the (B, N) score matrix and that the order is a strict total order: the better score
    first and, among equal scores, the lower database index (NaN ranks above every number, as in
    :func:`torch.sort`). Scores are computed block by block with ``at::mm``, so they equal the
    full product up to its floating-point rounding (exactly, when the product is exact).

    Args:
        queries: (B, D) float16, bfloat16, float32 or float64 tensor (or NumPy array).
        database: (N, D) tensor on the device of ``queries``, or any NumPy array, including a
            ``numpy.memmap`` on disk: it is then read ``block_rows`` rows at a time, each block is
            moved to the device of ``queries``, and the pages of a read-only or shared memmap
            are released after use, so that the whole array is never resident.
        k: number of results per query, 1 <= k <= N.
        largest: True for the k highest scores (inner-product / cosine similarity), False for
            the k lowest.
        block_rows: rows per NumPy block (default: about 32 MiB of the array). Ignored for a
            tensor database, which the kernel blocks itself.

    Returns:
        ``(values, indices)``, both (B, k), best first: the scores in float32 (float64 if either
        input is float64; float16/bfloat16 inputs are multiplied and ranked in float32) and the
        database row indices as int64.

    Not differentiable (no autograd formula is registered; the indices are discrete).
    """
    queries = _as_tensor(queries, "queries")
    if isinstance(database, Tensor):
        return torch.ops.fastap.topk_similarity(queries, database, int(k), bool(largest))
    return _topk_similarity_numpy(queries, database, int(k), bool(largest), block_rows)


def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.from_numpy(_native(np.asarray(x)))
    except TypeError as err:
        raise TypeError(f"{name} must be a tensor or a NumPy array, got {type(x).__name__}: "
                        f"{err}") from None


def _native(block: np.ndarray) -> np.ndarray:
    """A view torch.from_numpy accepts (native byte order, no negative strides), else a copy."""
    if not block.dtype.isnative or any(s < 0 for s in block.strides):
        return np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("="))
    return block


def _block_tensor(block: np.ndarray) -> Tensor:
    # A read-only memmap view is only read by the kernel; torch warns because it cannot enforce
    # that, which would be noise on every block.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(_native(block))


def _topk_similarity_numpy(queries: Tensor, database, k: int, largest: bool,
                           block_rows: Optional[int]) -> tuple[Tensor, Tensor]:
    array = np.asarray(database)
    if array.ndim != 2:
        raise ValueError(f"database must be a 2-D (N, D) array, got shape {array.shape}")
    if array.dtype.kind != "f" or array.itemsize not in (2, 4, 8):
        raise TypeError(f"database must be a float16, float32 or float64 array, got {array.dtype}")
    if queries.dim() != 2:
        raise ValueError(f"queries must be a 2-D (B, D) tensor, got shape {tuple(queries.shape)}")
    if not queries.is_floating_point():
        raise TypeError(f"queries must be float16, bfloat16, float32 or float64, got "
                        f"{queries.dtype}")
    num_db, dim = array.shape
    if queries.shape[1] != dim:
        raise ValueError(f"queries and database must have the same embedding dimension D, got "
                         f"queries {tuple(queries.shape)} and database {array.shape}")
    if num_db == 0:
        raise ValueError("database is empty (N = 0 rows): there is nothing to rank")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if k > num_db:
        raise ValueError(f"k = {k} exceeds the number of database items N = {num_db}")
    if block_rows is None:
        block_rows = max(1, _NUMPY_BLOCK_BYTES // max(1, dim * array.itemsize))
    elif block_rows <= 0:
        raise ValueError(f"block_rows must be positive, got {block_rows}")

    double = queries.dtype == torch.float64 or array.itemsize == 8
    acc = torch.float64 if double else torch.float32
    # Converted once here, not once per block inside the kernel (and not differentiable).
    queries = queries.detach().to(acc).contiguous()
    values = torch.full((queries.shape[0], k), -math.inf if largest else math.inf, dtype=acc,
                        device=queries.device)
    indices = torch.full((queries.shape[0], k), -1, dtype=torch.int64, device=queries.device)
    releasable = isinstance(database, np.memmap) and getattr(database, "mode", None) in ("r", "r+")
    for start in range(0, num_db, block_rows):
        block = array[start:start + block_rows]
        topk_similarity_update(queries, _block_tensor(block).to(queries.device), start, values,
                               indices, largest)
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
