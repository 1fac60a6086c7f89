"""Configuration of the benchmark suite (``pytest benchmarks/ --benchmark-only``).

Environment variables:

- ``FASTAP_BENCH_SIZES``: comma-separated B = N values (default ``1024,4096``).
- ``FASTAP_BENCH_DEVICES``: comma-separated devices (default ``cpu,cuda``; cuda cases skip
  without a GPU).
- ``FASTAP_BENCH_SKIP_LARGE_DENSE=1``: skip the dense baselines (``reference``, ``pml``) at
  B = N >= 4096; the same cases also carry the marker ``large_dense``, so
  ``-m "not large_dense"`` deselects them. Without either, a dense case skips itself when the
  machine has less free memory than it needs (about 8 GB for B = N = 4096, 25 bins);
  ``FASTAP_BENCH_FORCE_DENSE=1`` runs it regardless.
- ``FASTAP_BENCH_MEMORY=0``: do not measure peak memory (it costs one extra forward + backward
  per case, in a fresh subprocess on the CPU).
- ``FASTAP_BENCH_TIME_BUDGET``: seconds of timed rounds aimed at per fast case (default 2).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch

from benchmarks import cases

LARGE = 4096


def _env_list(name: str, default: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


SIZES = [int(v) for v in _env_list("FASTAP_BENCH_SIZES", "1024,4096")]
DEVICES = _env_list("FASTAP_BENCH_DEVICES", "cpu,cuda")
MEASURE_MEMORY = os.environ.get("FASTAP_BENCH_MEMORY", "1").strip() != "0"
TIME_BUDGET_S = float(os.environ.get("FASTAP_BENCH_TIME_BUDGET", "2"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "large_dense: a dense baseline at B = N >= 4096 (several GB, tens of seconds "
                   "per call on a CPU)")


def _free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def skip_reason(family: str, impl: str, size: int, device: str) -> str | None:
    """Why this case cannot run here, or None."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return "no CUDA device"
        if impl.startswith("fastap"):
            import fastap

            if not fastap.WITH_CUDA:
                return "fastap was built without its CUDA kernels (rebuild with FASTAP_CUDA=ON)"
    if impl == "pml":
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            return "pytorch-metric-learning is not installed"
    if impl in cases.DENSE_IMPLS:
        if size >= LARGE and _env_flag("FASTAP_BENCH_SKIP_LARGE_DENSE"):
            return f"FASTAP_BENCH_SKIP_LARGE_DENSE is set (dense baseline at B = N = {size})"
        need = cases.dense_peak_bytes_estimate(family, size, size)
        free = _free_bytes(device)
        if need > free and not _env_flag("FASTAP_BENCH_FORCE_DENSE"):
            return (f"the dense {impl} at B = N = {size} needs about {need / 1e9:.1f} GB but only "
                    f"{free / 1e9:.1f} GB is free on {device}; set FASTAP_BENCH_FORCE_DENSE=1 to "
                    f"run it anyway or FASTAP_BENCH_SKIP_LARGE_DENSE=1 to silence this")
    return None


class Case(NamedTuple):
    family: str
    impl: str
    size: int
    device: str


def _case_params():
    """One param per (device, size, family, impl), ordered so that one shape's cases sit together."""
    params = []
    for device in DEVICES:
        for size in SIZES:
            for family, impls in cases.FAMILIES.items():
                for impl in impls:
                    marks = [pytest.mark.large_dense] if (
                        impl in cases.DENSE_IMPLS and size >= LARGE) else []
                    params.append(pytest.param(Case(family, impl, size, device), marks=marks,
                                               id=f"{device}-{family}-B{size}-{impl}"))
    return params


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", _case_params(), indirect=True)


@pytest.fixture
def case(request) -> Case:
    """The benchmark case of this test, skipped with a reason when it cannot run here."""
    reason = skip_reason(*request.param)
    if reason:
        pytest.skip(reason)
    return request.param
