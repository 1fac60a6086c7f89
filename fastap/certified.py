"""The certified top-k search written in torch operations: the CUDA path.

It is the design of the CPU kernel (``csrc/cpu/topk_certified.cpp``; docs/search.md derives the
bound) in whole-tile tensor operations, which suit a GPU: per tile of queries × database rows,

1. a coarse product s̃ (cuBLAS) of rounded copies (bfloat16, or TF32 for the float32 pass)
   and a per-pair bound
   |s̃ − v| ≤ e = a_i·n_j + b_i·m_j + c·|s̃| + abs from per-row norms;
2. T_i = the larger of the k-th largest lower bound s̃ − e of the tile and the k-th value the
   query already holds: at least k items score T_i or more, so an item whose upper bound s̃ + e
   is below T_i ranks after k others and cannot be in the top k;
3. every other pair is re-scored exactly by ``fastap::exact_dot_pairs`` (v = fl32 of the float64
   sum in one fixed order, the same bits as the CPU), and merged into the running top-k by
   (value, lower index first).

The result is the CPU's, bit for bit, whatever the coarse pass. The functions run on any device,
so the CPU test suite runs them too (against the C++ kernel and a float64 ranking); on the CPU
the C++ kernel is the faster path and the one :func:`fastap.topk_similarity` uses.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import exact_dot_pairs

# Every computed bound term is inflated by this factor (it covers the rounding of the norms and
# of the bound's own float32 arithmetic), as in the CPU kernel.
_INFLATE = 1.0 + 2.0 ** -18
# Relative slack on |s̃| for the rounding of s̃ ± e.
_SLACK = 2.0 ** -20
# bfloat16 subnormals are flushed to zero before the product (docs/search.md, "Subnormals").
_SMALLEST_NORMAL = 2.0 ** -126
# Elements of one coarse tile: its few float32/bool temporaries stay around 100 MiB, and the
# exact pairs of a tile (at most one per element on adversarial data) around 64 MiB.
_TILE_ELEMENTS = 1 << 22


def to_lowp(x: Tensor) -> Tensor:
    """bfloat16 copy of float32 ``x`` as the bound sees it: round to nearest even, subnormals
    flushed to signed zero, NaN kept (what ``prepare_lowp`` computes on the CPU)."""
    return torch.where(x.abs() < _SMALLEST_NORMAL, x * 0, x).to(torch.bfloat16)


def to_tf32(x: Tensor) -> Tensor:
    """float32 ``x`` rounded to 11 significant bits (TF32's), to nearest even, subnormals
    flushed to signed zero, NaN kept: the CUDA float32 pass multiplies these, so its product is
    the same whether cuBLAS runs TF32 tensor cores or IEEE float32 (every product is exact)."""
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    out = torch.where(torch.isnan(x), x, rounded.view(torch.float32))
    return torch.where(x.abs() < _SMALLEST_NORMAL, x * 0, out)


def _round_inputs(x: Tensor, coarse: str) -> Tensor:
    return to_lowp(x) if coarse == "bf16" else to_tf32(x)


def _round_up(x64: Tensor) -> Tensor:
    """float32 not below each float64 entry (a bound must not shrink when stored)."""
    f = x64.to(torch.float32)
    return torch.where(f.double() < x64, torch.nextafter(f, torch.full_like(f, float("inf"))), f)


def _upper_norms(rows64: Tensor) -> Tensor:
    """Upper bounds of the row norms of a float64 tensor, as float32 (the float64 sum's
    relative rounding, below D·2^-53, is added back; float64 squares of float32 values never
    underflow)."""
    dim = rows64.shape[-1]
    return _round_up((rows64.square().sum(-1) * (1 + 2 * dim * 2.0 ** -53)).sqrt() * _INFLATE)


def lowp_norms(rows: Tensor, lowp: Tensor) -> Tensor:
    """(‖x̂_j‖, ‖x_j − x̂_j‖) per row, rounded up, (n, 2) float32: ``prepare_lowp``'s norms."""
    rows64, lowp64 = rows.double(), lowp.double()
    return torch.stack([_upper_norms(lowp64), _upper_norms(rows64 - lowp64)], dim=1)


def _constants(dim: int, device: torch.device) -> tuple[float, float, float]:
    """(γ, r, abs) of the bound for dimension ``dim`` (docs/search.md, "The bound").

    γ bounds the coarse product's float32 accumulation relative to Σ|q̂_d·x̂_d|: D·2^-24/(1 −
    D·2^-24) for IEEE float32 with round to nearest; four times that on CUDA, whose tensor
    cores (bfloat16, TF32) may truncate and align several products at once.
    """
    g32 = dim * 2.0 ** -24 / (1 - dim * 2.0 ** -24)
    g64 = dim * 2.0 ** -53 / (1 - dim * 2.0 ** -53)
    gamma = 4 * g32 if device.type == "cuda" else g32
    return gamma, 2.0 ** -24 + 2 * g64, (2 * dim + 8) * 2.0 ** -126


# c: the coarse output's own rounding where it is bfloat16 (8 significant bits), plus slack.
_REL = {torch.bfloat16: 2.0 ** -8 / (1 - 2.0 ** -8) + _SLACK, torch.float32: _SLACK}


def _coarse_product(q: Tensor, x: Tensor) -> Tensor:
    """s̃ = q·xᵀ accumulated in float32; bfloat16 inputs give a float32 result on CUDA and a
    bfloat16 one on the CPU (the bound reads which from the dtype)."""
    if q.dtype == torch.bfloat16 and q.is_cuda:
        try:
            return torch.mm(q, x.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without mm(..., out_dtype=)
            # bfloat16 values are exact in TF32 and float32: the same products, float32 out.
            return torch.mm(q.float(), x.float().t())
    return torch.mm(q, x.t())


def _key(values: Tensor, largest: bool) -> Tensor:
    """The score as a key, larger always better (a NaN key is replaced by the caller)."""
    return values if largest else -values


def _state_threshold(values: Tensor, indices: Tensor, largest: bool) -> Tensor:
    """The key of each row's k-th held value: −inf for an empty slot, and NaN (which ranks above
    every number for largest, below for smallest) as ±inf."""
    v, i = values[:, -1], indices[:, -1]
    nan_key = float("inf") if largest else float("-inf")
    key = torch.where(torch.isnan(v), torch.full_like(v, nan_key), _key(v, largest))
    return torch.where(i < 0, torch.full_like(v, float("-inf")), key)


def rank_order(values: Tensor, indices: Tensor, largest: bool) -> Tensor:
    """Per row, the permutation that sorts (values, indices) best first in the order of the
    kernels: the better value, then the lower index; NaN above every number (largest) or below
    (smallest); empty slots (index < 0) last. Three stable sorts, least significant key first."""
    empty = indices < 0
    nan = torch.isnan(values)
    index_key = torch.where(empty, torch.iinfo(torch.int64).max, indices)
    # + 0.0 makes −0.0 equal +0.0 (a radix sort would tell their bits apart).
    value_key = torch.where(nan | empty, torch.zeros_like(values), _key(values, largest)) + 0.0
    nan_group, number_group = (2, 1) if largest else (1, 2)
    group = torch.where(empty, 0, torch.where(nan, nan_group, number_group))
    order = torch.sort(index_key, dim=1, stable=True).indices
    order = order.gather(1, torch.sort(value_key.gather(1, order), dim=1, descending=True,
                                       stable=True).indices)
    return order.gather(1, torch.sort(group.gather(1, order), dim=1, descending=True,
                                      stable=True).indices)


def _merge(values: Tensor, indices: Tensor, query_rows: Tensor, counts: Tensor,
           new_values: Tensor, new_indices: Tensor, largest: bool) -> None:
    """Merges scored pairs (query row, database index, exact value) into the running top-k
    (values, indices) (G, k), in place, best first; ``counts`` (G,): the pairs of each row."""
    k = values.shape[1]
    width = int(counts.max()) if query_rows.numel() else 0
    if width == 0:
        return
    # nonzero() lists pairs row by row, so a pair's column is its rank within its row.
    starts = torch.cumsum(counts, 0) - counts
    column = torch.arange(query_rows.numel(), device=values.device) - starts[query_rows]
    cand_v = values.new_zeros((len(counts), width))
    cand_i = indices.new_full((len(counts), width), -1)
    cand_v[query_rows, column] = new_values
    cand_i[query_rows, column] = new_indices
    all_v = torch.cat([values, cand_v], dim=1)
    all_i = torch.cat([indices, cand_i], dim=1)
    best = rank_order(all_v, all_i, largest)[:, :k]
    values.copy_(all_v.gather(1, best))
    indices.copy_(all_i.gather(1, best))


def certified_update(queries: Tensor, database_block: Tensor, index_offset: int, values: Tensor,
                     indices: Tensor, largest: bool = True, *, coarse: str = "bf16",
                     lowp_block: Optional[Tensor] = None,
                     lowp_norms_block: Optional[Tensor] = None) -> Tensor:
    """Merges database rows ``index_offset ..`` into a running top-k, certified.

    Args:
        queries: (B, D) float32.
        database_block: (n, D) float32 on the device of ``queries``.
        index_offset: database index of the block's first row.
        values, indices: (B, k) float32 and int64, best first, updated in place; index -1 marks
            an empty slot.
        largest: the k highest scores (True) or the k lowest.
        coarse: the coarse product's inputs: ``"bf16"`` (bfloat16 copies), ``"tf32"`` (float32
            rounded to TF32's 11 bits: the CUDA float32 pass) or ``"fp32"`` (the inputs
            themselves, for IEEE float32 products: the CPU).
        lowp_block, lowp_norms_block: :func:`to_lowp` of the block and its :func:`lowp_norms`
            (what ``prepare_lowp`` returns), or None to compute them here.

    Returns:
        (B,) int64: the exact re-scores done per query.
    """
    B, dim = queries.shape
    n, k = database_block.shape[0], values.shape[1]
    rescored = torch.zeros(B, dtype=torch.int64, device=queries.device)
    if B == 0 or n == 0:
        return rescored
    q = queries.to(torch.float32).contiguous()
    x = database_block.to(torch.float32).contiguous()
    gamma, rescore, abs_term = _constants(dim, q.device)
    q_norm = q.double().norm(dim=1)
    if coarse in ("bf16", "tf32"):
        q_coarse = _round_inputs(q, coarse)
        q_lowp64 = q_coarse.double()
        a = _round_up(((_upper_norms(q.double() - q_lowp64) + gamma * _upper_norms(q_lowp64)
                        + rescore * q_norm) * _INFLATE))
        b = _round_up((1 + rescore) * q_norm * _INFLATE)
        x_coarse = _round_inputs(x, coarse) if lowp_block is None else lowp_block
        norms = lowp_norms(x, x_coarse) if lowp_norms_block is None else lowp_norms_block.float()
        x_norm, x_delta_norm = norms[:, 0], norms[:, 1]
    else:
        q_coarse, x_coarse = q, x
        a = _round_up((gamma + rescore) * q_norm * _INFLATE)
        b = torch.zeros_like(a)
        x_norm, x_delta_norm = _upper_norms(x.double()), torch.zeros(n, device=x.device)

    rows_per_tile = max(1, _TILE_ELEMENTS // n)
    for r0 in range(0, B, rows_per_tile):
        r1 = min(B, r0 + rows_per_tile)
        s = _coarse_product(q_coarse[r0:r1], x_coarse)
        rel = _REL[s.dtype]
        s = s.float()
        err = (a[r0:r1, None] * x_norm + b[r0:r1, None] * x_delta_norm
               + rel * s.abs() + abs_term)
        key = _key(s, largest)
        lower, upper = key - err, key + err
        unusable = torch.isnan(lower) | torch.isnan(upper)  # only the exact value decides
        lower = lower.masked_fill(unusable, float("-inf"))
        upper = upper.masked_fill(unusable, float("inf"))
        threshold = _state_threshold(values[r0:r1], indices[r0:r1], largest)
        if n >= k:
            threshold = torch.maximum(threshold, lower.topk(k, dim=1).values[:, -1])
        del s, err, key, lower
        tile_rows, cols = (upper >= threshold[:, None]).nonzero(as_tuple=True)
        del upper
        exact = exact_dot_pairs(q, x, tile_rows + r0, cols)
        counts = torch.bincount(tile_rows, minlength=r1 - r0)
        _merge(values[r0:r1], indices[r0:r1], tile_rows, counts, exact, cols + index_offset,
               largest)
        rescored[r0:r1] += counts
    return rescored
