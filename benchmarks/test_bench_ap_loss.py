"""Forward + backward of fastap's AP losses against the dense formulations.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json

One group per (family, B = N, device); in each, ``fastap`` (the kernels), ``reference``
(``fastap.reference``, the dense B×N×M PyTorch formulation) and, for FastAP,
``pml`` (pytorch-metric-learning). Each case also records, in ``extra_info``, the peak extra memory
of one forward + backward (``peak_extra_MB``, see ``peak_memory.py`` for how it is measured) and
the size of the float32 (B, N) score matrix (``score_matrix_MB``). Knobs: ``conftest.py``.
"""

from __future__ import annotations

import math
import os
import time

import torch

from benchmarks import cases, peak_memory
from benchmarks.conftest import MEASURE_MEMORY, TIME_BUDGET_S

# The dense baselines take seconds per call on a CPU (tens of seconds at B = N = 4096): three
# rounds without warm-up. Every other case gets one untimed warm-up call (lazy initialisation,
# cuBLAS handles, first-touch page faults), which also sizes the number of rounds.
SLOW_ROUNDS = 3
MIN_ROUNDS, MAX_ROUNDS = 5, 200


def _rounds(case, step) -> int:
    if case.device == "cpu" and case.impl in cases.DENSE_IMPLS:
        return SLOW_ROUNDS
    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    return max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(TIME_BUDGET_S / max(elapsed, 1e-6))))


def _thread_cpu_ticks() -> dict[str, int]:
    """CPU time (clock ticks) of each thread of this process so far (Linux)."""
    ticks = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return ticks
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            continue
    return ticks


def _busy_threads(before: dict[str, int], after: dict[str, int]) -> int:
    """Threads that did at least a quarter of the busiest thread's work. Unlike CPU time over
    wall time, this does not drop when other processes compete for the cores."""
    deltas = [after[t] - before.get(t, 0) for t in after]
    top = max(deltas, default=0)
    return sum(d >= 0.25 * top for d in deltas) if top > 0 else 0


def test_forward_backward(benchmark, case):
    family, impl, size, device = case
    benchmark.group = f"{family} B=N={size} {device}"
    step, _inputs = cases.make_step(family, impl, size, device)
    rounds = _rounds(case, step)

    # Process CPU time over wall time of the timed calls: about the number of busy cores, which
    # shows whether a CPU implementation actually runs in parallel (on an idle machine).
    used = {"cpu": 0.0, "wall": 0.0}
    ticks_before = _thread_cpu_ticks()

    def timed():
        cpu0, wall0 = time.process_time(), time.perf_counter()
        loss = step()
        used["cpu"] += time.process_time() - cpu0
        used["wall"] += time.perf_counter() - wall0
        return loss

    loss = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    ticks_after = _thread_cpu_ticks()
    info = benchmark.extra_info
    info.update(family=family, impl=impl, B=size, N=size, device=device,
                num_centres=cases.NUM_CENTRES[family], loss=float(loss),
                threads=torch.get_num_threads(), loadavg_1min=os.getloadavg()[0],
                score_matrix_MB=cases.score_matrix_bytes(size, size) / cases.MiB)
    if device == "cpu":
        info["cpu_per_wall"] = used["cpu"] / max(used["wall"], 1e-9)
        info["busy_threads"] = _busy_threads(ticks_before, ticks_after)
    else:
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    del step, _inputs

    if MEASURE_MEMORY:
        mem = peak_memory.measure(family, impl, size, device)
        info["peak_extra_MB"] = mem["peak_extra_MB"]
        info["peak_extra_over_score_matrix"] = mem["peak_extra_MB"] / info["score_matrix_MB"]
        info["baseline_slack_MB"] = mem["baseline_slack_MB"]
        info["memory_method"] = mem["method"]
