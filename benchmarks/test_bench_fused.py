"""Fused embedding -> AP (issue target: B = 4096 queries, N = 65,536 items, D = 512, 25 bins).

Groups per shape: the fused kernel, the same against a detached database (``fused_bank``: no
database gradient), the unfused path (stores the (B, N) scores), the dense
reference where it fits in memory, and ``four_matmuls``, the GEMM floor the fused kernel is
judged against (target: fused within 1.5x of it, peak extra memory below 256 MB). On CUDA the
groups repeat for half and bfloat16 embeddings (tensor-core GEMMs; no dense reference there).

A memory bank (B trained queries against themselves plus N stored embeddings, default
B = 256 and 1024, N = 65,536, D = 512; the second past the fused threshold) compares
``include_batch=True`` with the concatenated database.

    pytest benchmarks/test_bench_fused.py --benchmark-only
    FASTAP_BENCH_FUSED_SHAPES=1024x8192x512 pytest benchmarks/test_bench_fused.py --benchmark-only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from . import fused_cases

DEVICES = [d.strip() for d in os.environ.get("FASTAP_BENCH_DEVICES", "cpu,cuda").split(",")]


def _shapes(variable: str, default: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in shape.split("x"))
            for shape in os.environ.get(variable, default).split(",")]


SHAPES = _shapes("FASTAP_BENCH_FUSED_SHAPES", "1024x8192x512,4096x65536x512")
MEMORY_SHAPES = _shapes("FASTAP_BENCH_MEMORY_SHAPES", "256x65536x512,1024x65536x512")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The dense reference holds about five (B, N, 25) float32 tensors.
DENSE_LIMIT_BYTES = 8 * 2**30


def _peak_memory(impl: str, batch: int, size: int, dim: int) -> dict:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root),
                                                                    os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "benchmarks.fused_cases", impl, str(batch),
                           str(size), str(dim)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {impl} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _time_and_measure(benchmark, impl: str, shape: tuple[int, int, int], device: str,
                      dtype: torch.dtype = torch.float32, slow: bool = False) -> None:
    """Times one forward + backward of the case, then records its peak extra memory."""
    step = fused_cases.make_step(impl, *shape, device, dtype)
    benchmark.pedantic(step, rounds=3 if slow else 5, iterations=1, warmup_rounds=0 if slow else 1)
    if os.environ.get("FASTAP_BENCH_MEMORY", "1") != "0":
        del step
        benchmark.extra_info.update(
            fused_cases.probe_cuda(impl, *shape, device, dtype) if device.startswith("cuda")
            else _peak_memory(impl, *shape))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}xN{}xD{}".format(*s))
@pytest.mark.parametrize("impl", fused_cases.IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_embedding_ap(benchmark, device, impl, shape, dtype):
    batch, size, dim = shape
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if dtype != "float32" and (device == "cpu" or impl == "reference"):
        pytest.skip("half/bfloat16 cases are CUDA-only (the CPU multiplies them in float32) and "
                    "have no dense reference")
    if impl == "reference" and 5 * batch * size * 25 * 4 > DENSE_LIMIT_BYTES:
        pytest.skip(f"the dense reference needs about {5 * batch * size * 25 * 4 / 2**30:.0f} GB "
                    f"at B={batch}, N={size}")
    benchmark.group = f"fused embedding AP B={batch} N={size} D={dim} {dtype} {device}"
    slow = (batch * size >= 2**28 or impl == "reference") and device == "cpu"
    _time_and_measure(benchmark, impl, shape, device, DTYPES[dtype], slow)


@pytest.mark.parametrize("shape", MEMORY_SHAPES, ids=lambda s: "B{}xN{}xD{}".format(*s))
@pytest.mark.parametrize("impl", fused_cases.MEMORY_IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_memory_bank(benchmark, device, impl, shape):
    batch, size, dim = shape
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    benchmark.group = f"memory bank B={batch} N={size} D={dim} {device}"
    _time_and_measure(benchmark, impl, shape, device)
