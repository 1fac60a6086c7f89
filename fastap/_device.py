"""A user's device and precision choices, checked before anything heavy runs (one rule for
every command), and what the CPU offers for them."""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Optional, Union

import torch

#: Values of a ``precision`` option: ``"auto"`` picks ``"bf16"`` where the hardware runs it
#: faster than float32, ``"fp32"`` elsewhere.
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: Union[str, torch.device, None], name: str) -> torch.device:
    """``device`` as a torch.device that exists here; ``None`` or ``"auto"``: CUDA when a GPU is
    visible, else the CPU.

    Raises ``ValueError`` naming ``name`` (e.g. ``"--device"``) for a string that is no device,
    CUDA without a GPU, a CUDA index past the visible GPUs, ``meta`` (no data) or another
    backend that does not work here.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parsed: Optional[torch.device]
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):  # torch's message lists 20 device types
        parsed = None
    if parsed is None or parsed.type == "meta":
        raise ValueError(f"{name}: expected cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {device!r}, but torch sees no CUDA GPU "
                             "(torch.cuda.is_available() is False); use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {device!r}, but only {torch.cuda.device_count()} CUDA "
                             "GPU(s) are visible")
    elif parsed.type != "cpu":
        try:  # other backends (mps, xpu, ...): one empty tensor tells whether they work
            torch.empty(0, device=parsed)
        except Exception as err:  # RuntimeError with a dispatcher dump, ModuleNotFoundError...
            text = str(err).strip() or type(err).__name__
            first = text.splitlines()[0].split(". ")[0]  # not the list of 60 dispatch keys
            raise ValueError(f"{name}: {device!r} is not usable here ({first})") from None
    return parsed


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    """The CPU flags of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)  # the flags do not change; every search asks
def cpu_int8_units() -> Optional[str]:
    """The CPU's int8 dot-product units, ``"AMX-INT8"``, ``"AVX512-VNNI"`` or ``"AVX-VNNI"``,
    or None.

    Read from the CPU flags at run time. They multiply int8 at about twice the bfloat16 rate
    (``benchmarks/coarse_product_rates.py``), and accumulate in int32 without saturating, which
    the certified int8 search needs (without them int8 products are summed in pairs in
    saturating int16).
    """
    flags = _cpu_flags()
    for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"),
                       ("avx_vnni", "AVX-VNNI")):
        if flag in flags:
            return name
    return None


@functools.lru_cache(maxsize=None)  # the flags do not change; every search asks
def cpu_bf16_units() -> Optional[str]:
    """The CPU's bfloat16 matrix units, ``"AMX-BF16"`` or ``"AVX512-BF16"``, or None.

    Read from the CPU flags at run time (``/proc/cpuinfo`` on Linux, torch's own check
    elsewhere); bfloat16 products run at about twice (AVX512-BF16) to eight times (AMX) the
    float32 rate where these exist, and slower than float32 where they do not.
    """
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if not flags:
        check = getattr(getattr(torch, "cpu", None), "_is_avx512_bf16_supported", None)
        if check is not None and check():
            return "AVX512-BF16"
    return None


def resolve_precision(precision: str, device: Union[str, torch.device], name: str = "precision"
                      ) -> tuple[str, str]:
    """The precision a network's forward passes run in on ``device``, ``"fp32"`` or ``"bf16"``
    (bfloat16 autocast), and why.

    ``"auto"``: bf16 on a CPU with bfloat16 units (:func:`cpu_bf16_units`) or a CUDA GPU that
    supports bfloat16, fp32 elsewhere. ``"bf16"`` on a CPU without the units falls back to fp32
    with a ``RuntimeWarning`` (there it is emulated, slower than float32); on a GPU without
    bfloat16 it is refused. An unknown value raises ``ValueError`` naming ``name``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{name}: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp32":
        return "fp32", f"asked for ({name} fp32)"
    if device.type == "cpu":
        units = cpu_bf16_units()
        if units is not None:
            return "bf16", (f"this CPU has {units} units" if precision == "auto"
                            else f"asked for ({name} bf16; this CPU has {units} units)")
        why = "this CPU has no bfloat16 units (avx512_bf16 or amx_bf16)"
        if precision == "bf16":
            warnings.warn(f"{name} bf16: {why}, where bfloat16 runs slower than float32; "
                          "running in float32 instead", RuntimeWarning, stacklevel=2)
            return "fp32", f"bf16 asked for, but {why}"
        return "fp32", why
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", ("this GPU supports bfloat16" if precision == "auto"
                            else f"asked for ({name} bf16)")
        if precision == "bf16":
            raise ValueError(f"{name} bf16: {device} does not support bfloat16; use fp32")
        return "fp32", "this GPU does not support bfloat16"
    if precision == "bf16":
        return "bf16", f"asked for ({name} bf16)"
    return "fp32", f"no bfloat16 rule for {device.type}"


def autocast(precision: str, device: Union[str, torch.device]
             ) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved ``precision`` (``"fp32"``: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
