"""Argument checks of the public entry points, in one place. Each error names the argument, says
what it must be and shows what was passed: ``num_bins must be an integer, got 2.7``."""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_int(value: Any, name: str, *, low: Optional[int] = None,
           optional: bool = False) -> Optional[int]:
    """``value`` as an ``int``: an integer (not a bool, not a float that would be truncated) of
    at least ``low`` (None too when ``optional``)."""
    if value is None and optional:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if low is not None and number < low:
        raise ValueError(f"{name} must be at least {low}, got {number}")
    return number


def as_range(value: Any, name: str) -> tuple[float, float]:
    """``value`` as a pair ``(lo, hi)`` of finite numbers with ``lo < hi``."""
    try:
        if isinstance(value, (str, bytes)):  # "01" would read as (0.0, 1.0)
            raise TypeError
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi) of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be finite with lo < hi, got ({lo}, {hi})")
    return lo, hi


def check_flag(value: Any, name: str, *, optional: bool = False) -> Optional[bool]:
    """``value`` as a bool: True or False (None too when ``optional``), not a truthy string."""
    if value is None and optional:
        return None
    if not isinstance(value, (bool, np.bool_)):
        allowed = "True, False or None" if optional else "True or False"
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    return bool(value)


def check_tensor(value: Any, name: str, what: str = "a tensor") -> Tensor:
    """``value`` itself, which must be a tensor (``what`` says which kind, for the message)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def check_float(value: Any, name: str) -> Tensor:
    """``value`` itself, which must be a float16/bfloat16/float32/float64 tensor."""
    check_tensor(value, name)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got "
                        f"{value.dtype}")
    return value


def as_labels(value: Any, name: str) -> Optional[Tensor]:
    """Integer class ids as int64 (None stays None)."""
    if value is None:
        return None
    check_tensor(value, name, "a tensor of integer class ids")
    if value.is_floating_point() or value.is_complex():
        raise TypeError(f"{name} must be integer class ids, got {value.dtype}")
    return value.long()


def has_values(x: Tensor) -> bool:
    """Whether checks of the values of ``x`` can run: not while compiling (no host syncs in a
    graph), not on the meta device (no values to read) and not under ``torch.vmap`` (a batched
    tensor has no single value to branch on; the kernels still refuse NaN per slice)."""
    return not torch.compiler.is_compiling() and x.device.type != "meta" and not is_vmapped(x)


def is_vmapped(x: Tensor) -> bool:
    """Whether ``x`` is, or wraps (under ``torch.func.grad``), a ``vmap``-batched tensor."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace this test; vmap inside a compiled
        # function is not supported by these losses
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(x):
        if functorch.is_batchedtensor(x):
            return True
        x = functorch.get_unwrapped(x)
    return False


def check_weights(weights: Any, rows: int) -> Tensor:
    """Per-row weights: a real (rows,) tensor of finite, non-negative values."""
    check_tensor(weights, "weights", f"a ({rows},) tensor")
    if weights.is_complex():
        raise TypeError(f"weights must be real, got {weights.dtype}")
    if tuple(weights.shape) != (rows,):
        raise ValueError(f"weights must have shape ({rows},) (one per row), "
                         f"got {tuple(weights.shape)}")
    # A negative or non-finite weight makes the weighted mean meaningless (and a negative
    # total would read as "no row counts"). One host sync.
    if has_values(weights) and not bool((torch.isfinite(weights) & (weights >= 0)).all()):
        raise ValueError("weights must be finite and non-negative")
    return weights


def fastap_num_bins(num_bins: Any) -> int:
    """FastAP's ``num_bins`` (intervals, so ``num_bins + 1`` bin centres) checked: 1 to 2^24 - 1,
    the kernels' limit on centres."""
    num_bins = as_int(num_bins, "num_bins")
    if not 1 <= num_bins < 2**24:
        raise ValueError(f"num_bins must be between 1 and 2^24 - 1 (FastAP places num_bins + 1 "
                         f"bin centres), got {num_bins}")
    return num_bins

