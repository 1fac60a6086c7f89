"""A user's device choice, checked before anything heavy runs (one rule for every command)."""

from __future__ import annotations

from typing import Optional, Union

import torch


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
