"""Exact top-k similarity search: fastap.topk_similarity vs torch (matmul + topk) vs FAISS.

    pytest benchmarks/test_bench_topk.py --benchmark-only

One pytest-benchmark group per shape and device, ``topk-similarity-<device>-B<B>-N<N>-D<D>-k<k>``:

- ``fastap``: ``fastap.topk_similarity(queries, database, k)``, the default ``precision="auto"``
  (streamed, no score matrix): on a CPU with int8 dot-product units the certified int8 coarse
  pass, with bfloat16 units only the bfloat16 pass, converting the database in the timed call;
  elsewhere the float32 pass. ``extra_info`` records which ran (``precision``) and why;
- ``fastap-bf16``: the same call with ``precision="bf16"`` (what a CPU with bfloat16 but no int8
  units runs; CPU only);
- ``fastap-fp32``: the same call with ``precision="fp32"``, the float32 coarse pass (what a CPU
  without either runs);
- ``fastap-prepared``: the ``"auto"`` pass on a :class:`fastap.PreparedDatabase` made before the
  timing (repeated searches of one database; CPU only); ``extra_info`` has
  ``rescored_per_query`` (mean and max of the exact re-scores the bound could not avoid, of N per
  query);
- ``torch``: ``torch.topk(queries @ database.T, k)`` (materialises the B×N float32 scores);
- ``faiss``: ``faiss.IndexFlatIP.search`` on the same float32 data (CPU only; building the index,
  which copies the database, is not timed). faiss-cpu is a benchmark-only dependency: the case
  skips without it.

The inputs are L2-normalised Gaussian vectors (so the scores are cosine similarities, as for
retrieval descriptors). Each case also records ``peak_extra_MB`` in its ``extra_info``: on the
CPU the growth of the resident-set high-water mark over one call, measured in a fresh process
after a warm-up call on a small input (``VmHWM`` after − RSS before, the high-water mark first
reset to the current RSS through ``/proc/self/clear_refs``); on CUDA
``max_memory_allocated`` − ``memory_allocated`` around the call. ``blas`` in ``extra_info`` lists
the BLAS libraries loaded and the kernels they chose (threadpoolctl), so that a FAISS figure
can be checked for the OpenBLAS core type it ran with: benchmark with ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` unset (``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest ...``).

Every fastap case must return exactly the indices and values of the float32 pass.

Environment variables:

- ``FASTAP_BENCH_TOPK_SHAPES``: ``B,N,D,k`` shapes separated by ``;``
  (default ``1000,100000,512,100``, the issue's target shape).
- ``FASTAP_BENCH_DEVICES``: comma-separated devices (default ``cpu,cuda``; cuda skips without a
  GPU).
- ``FASTAP_BENCH_MEMORY=0``: skip the peak-memory probe (one extra call per case in a subprocess).
- ``FASTAP_BENCH_ROUNDS``: timed rounds per case (default 5, after one warm-up round).

The file is self-contained (it can also be run as ``python benchmarks/test_bench_topk.py IMPL B N
D k [DEVICE]`` to print one peak-memory figure as JSON).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

# Run as a script by the memory probe, so the repository root must be importable.
if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parent.parent))  # after the installed fastap
from benchmarks.peak_memory import _reset_high_water, _status_bytes  # noqa: E402

MiB = 2 ** 20
IMPLS = ("fastap", "fastap-bf16", "fastap-fp32", "fastap-prepared", "torch", "faiss")


def _shapes():
    text = os.environ.get("FASTAP_BENCH_TOPK_SHAPES", "1000,100000,512,100")
    return [tuple(int(v) for v in s.split(",")) for s in text.split(";") if s.strip()]


def _devices():
    return [d.strip() for d in os.environ.get("FASTAP_BENCH_DEVICES", "cpu,cuda").split(",")
            if d.strip()]


def make_inputs(batch, size, dim, device="cpu", seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, dim, generator=gen)
    database = torch.randn(size, dim, generator=gen)
    # In place, so that no input-sized temporary raises the memory high-water mark.
    queries /= queries.norm(dim=1, keepdim=True)
    database /= database.norm(dim=1, keepdim=True)
    return queries.to(device), database.to(device)


def make_search(impl, queries, database, k):
    """A no-argument callable running one search (setup such as FAISS's index build done)."""
    import torch

    if impl.startswith("fastap"):
        import fastap

        if impl == "fastap-prepared":
            prepared = fastap.PreparedDatabase.prepare(database)
            return lambda: fastap.topk_similarity(queries, prepared, k,
                                                  precision=prepared.precision)
        precision = {"fastap-fp32": "fp32", "fastap-bf16": "bf16"}.get(impl, "auto")
        return lambda: fastap.topk_similarity(queries, database, k, precision=precision)
    if impl == "torch":
        return lambda: torch.topk(queries @ database.T, k)
    if impl == "faiss":
        import faiss

        index = faiss.IndexFlatIP(database.shape[1])
        index.add(database.numpy())
        q = queries.numpy()
        return lambda: index.search(q, k)
    raise ValueError(f"unknown implementation {impl!r}")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe_peak_memory(impl, batch, size, dim, k, device="cpu"):
    """Peak extra memory (MiB) of one search, measured in *this* process."""
    import torch

    warm_q, warm_x = make_inputs(min(batch, 64), min(size, 1000), dim, device, seed=1)
    make_search(impl, warm_q, warm_x, min(k, 1000))()
    queries, database = make_inputs(batch, size, dim, device)
    search = make_search(impl, queries, database, k)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        search()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MiB
    if _reset_high_water():
        before = _rss_bytes()
        search()
        return (_status_bytes("VmHWM") - before) / MiB
    before = _rss_bytes()  # an upper bound: includes any earlier peak above the current RSS
    search()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / MiB


def measure_peak_memory(impl, batch, size, dim, k, device="cpu"):
    """probe_peak_memory in a fresh process: the RSS high-water mark never goes down."""
    if device.startswith("cuda"):
        return probe_peak_memory(impl, batch, size, dim, k, device)
    cmd = [sys.executable, str(Path(__file__).resolve()), impl, str(batch), str(size), str(dim),
           str(k), device]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_MB"]


if __name__ == "__main__":
    impl, batch, size, dim, k = sys.argv[1], *map(int, sys.argv[2:6])
    device = sys.argv[6] if len(sys.argv) > 6 else "cpu"
    print(json.dumps({"impl": impl, "device": device,
                      "peak_extra_MB": probe_peak_memory(impl, batch, size, dim, k, device)}))
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# The benchmark cases (pytest)
# ---------------------------------------------------------------------------------------------

import pytest  # noqa: E402
import torch  # noqa: E402

import fastap  # noqa: E402
import fastap.search  # noqa: E402

_CASES = [
    pytest.param(device, shape, impl, id=f"{device}-B{shape[0]}-N{shape[1]}-D{shape[2]}"
                                          f"-k{shape[3]}-{impl}")
    for device in _devices() for shape in _shapes() for impl in IMPLS
]

_inputs_cache: dict = {}


def _inputs(device, shape):
    key = (device, shape)
    if key not in _inputs_cache:
        _inputs_cache.clear()  # one shape resident at a time
        _inputs_cache[key] = make_inputs(*shape[:3], device)
    return _inputs_cache[key]


@pytest.mark.parametrize("device,shape,impl", _CASES)
def test_topk_similarity(benchmark, device, shape, impl):
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if impl == "faiss":
        if device != "cpu":
            pytest.skip("faiss-cpu runs on the CPU only")
        pytest.importorskip("faiss", reason="faiss-cpu is not installed")
    if impl in ("fastap-prepared", "fastap-bf16") and device != "cpu":
        pytest.skip("a prepared database and the forced bfloat16 case are CPU cases")
    batch, size, dim, k = shape
    queries, database = _inputs(device, shape)
    search = make_search(impl, queries, database, k)
    if device.startswith("cuda"):
        def run():
            out = search()
            torch.cuda.synchronize(device)
            return out
    else:
        run = search

    benchmark.group = f"topk-similarity-{device}-B{batch}-N{size}-D{dim}-k{k}"
    benchmark.extra_info.update(impl=impl, B=batch, N=size, D=dim, k=k, device=device,
                                score_matrix_MB=batch * size * 4 / MiB, blas=_blas_info(),
                                cpu_bf16_units=fastap.search.cpu_bf16_units(),
                                cpu_int8_units=fastap.search.cpu_int8_units())
    if impl.startswith("fastap"):
        wanted = {"fastap-fp32": "fp32", "fastap-bf16": "bf16"}.get(impl, "auto")
        benchmark.extra_info["precision"] = fastap.search.search_precision(
            wanted, device=device)
    rounds = int(os.environ.get("FASTAP_BENCH_ROUNDS", "5"))
    result = benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)

    # Every implementation must find the same neighbours (up to rounding of near-equal scores),
    # and every fastap path exactly what the float32 pass finds.
    values = torch.as_tensor(result[0]).to(device="cpu", dtype=torch.float32)
    ref_values = _reference_values(device, shape, queries, database)
    torch.testing.assert_close(values, ref_values, rtol=1e-4, atol=1e-4)
    if impl.startswith("fastap"):
        exact = fastap.topk_similarity(queries, database, k, precision="fp32")
        torch.testing.assert_close(result[1].cpu(), exact[1].cpu(), rtol=0, atol=0)
        torch.testing.assert_close(result[0].cpu(), exact[0].cpu(), rtol=0, atol=0)
    if impl in ("fastap-prepared", "fastap-bf16"):
        # the pass of the case: bf16, or the one a prepared database is made for here
        prepared = fastap.PreparedDatabase.prepare(
            database, precision="bf16" if impl == "fastap-bf16" else "auto")
        benchmark.extra_info.update(_rescored(queries, prepared, k))

    if os.environ.get("FASTAP_BENCH_MEMORY", "1") != "0":
        benchmark.extra_info["peak_extra_MB"] = round(
            measure_peak_memory(impl, batch, size, dim, k, device), 1)


_reference_cache: dict = {}


def _blas_info():
    try:
        import threadpoolctl
    except ImportError:
        return "threadpoolctl is not installed"
    return [{key: lib.get(key) for key in ("internal_api", "prefix", "version", "architecture",
                                           "num_threads")}
            for lib in threadpoolctl.threadpool_info() if lib.get("user_api") == "blas"]


def _rescored(queries, prepared, k):
    """Exact re-scores per query of a prepared database's pass (what its bound could not
    settle)."""
    import math

    from fastap.ops import topk_similarity_lowp_update

    values = torch.full((queries.shape[0], k), -math.inf)
    indices = torch.full((queries.shape[0], k), -1, dtype=torch.int64)
    counts = topk_similarity_lowp_update(queries, prepared.rows, prepared.lowp, prepared.norms,
                                         0, values, indices)
    return {"rescored_per_query_mean": round(counts.double().mean().item(), 1),
            "rescored_per_query_max": int(counts.max())}


def _reference_values(device, shape, queries, database):
    key = (device, shape)
    if key not in _reference_cache:
        _reference_cache.clear()
        values, _ = torch.topk(queries @ database.T, shape[3])
        _reference_cache[key] = values.cpu()
    return _reference_cache[key]
