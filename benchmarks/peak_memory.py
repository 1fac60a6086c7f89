"""Peak *extra* memory of one forward + backward of a benchmark case.

    python -m benchmarks.peak_memory FAMILY IMPL SIZE [--device cpu|cuda]

prints one JSON object, e.g. ``{"peak_extra_MB": 4.3, "score_matrix_MB": 4.0, ...}``
(MB = MiB = 2**20 bytes).

Why resident-set size on the CPU: PyTorch's CPU allocator keeps no statistics
(``torch.cuda.max_memory_allocated`` has no CPU counterpart), but the Linux kernel tracks each
address space's high-water mark of resident memory exactly (``VmHWM`` in ``/proc/self/status``;
``getrusage().ru_maxrss`` reports the same number), even for a spike that lasts microseconds and
that sampling would miss. Each case runs in a *fresh* process so that the allocator starts clean and
the parent's own memory (pytest holding earlier cases) cannot leak into the figure. The probe imports
everything, runs the same case once on a tiny input (loading the kernels, the OpenMP thread pool and
the autograd engine's threads, whose stacks and code pages would otherwise count), allocates the
full-size inputs, reads the current RSS as the baseline and resets the high-water mark to it
(writing ``5`` to ``/proc/self/clear_refs``), then runs one forward + backward:
peak extra = ``VmHWM after − VmRSS before``.

Not ``ru_maxrss`` itself: Linux carries it across ``execve``, so a child spawned from a large
pytest process starts with the parent's RSS as its "peak" and small figures are hidden.

What it includes: every page the step touches that is still resident at the peak: the
intermediate tensors, the tensors autograd saves for the backward, the returned (B, N) or (B, D)
gradient, the score matrix itself for the embedding losses (it is computed inside the loss), and
allocator slack (glibc may keep freed small blocks in its heap; large blocks are mmapped and
returned on free). It excludes the inputs. Where ``clear_refs`` cannot be written, the baseline is
still the current RSS, which makes the figure an upper bound; the gap between the old high-water
mark and the baseline is then reported as ``baseline_slack_MB``.

On CUDA the probe uses the caching allocator's own counters instead:
``max_memory_allocated() − memory_allocated()`` around the step after ``reset_peak_memory_stats``
(tensor memory only; the allocator's reserved-but-free blocks and the CUDA context are excluded).
That needs no fresh process, so :func:`measure` runs it in-process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

# Running as a script (python benchmarks/peak_memory.py) needs the repository root importable.
if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parent.parent))  # after the installed fastap
    from benchmarks import cases  # noqa: E402
else:
    from . import cases

WARMUP_SIZE = 64


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field} (the CPU probe needs Linux)")


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _probe_cpu(family: str, impl: str, size: int) -> dict:
    warm_step, _ = cases.make_step(family, impl, WARMUP_SIZE, "cpu")
    warm_step()
    del warm_step
    step, _inputs = cases.make_step(family, impl, size, "cpu")
    gc.collect()
    reset = _reset_high_water()
    before, high_water_before = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    step()
    peak = _status_bytes("VmHWM")
    return {"peak_extra_MB": (peak - before) / cases.MiB,
            "baseline_slack_MB": max(0, high_water_before - before) / cases.MiB,
            "method": "VmHWM - VmRSS before, fresh process"
                      + ("" if reset else " (high-water mark not reset: upper bound)")}


def _probe_cuda(family: str, impl: str, size: int, device: str) -> dict:
    import torch

    warm_step, _ = cases.make_step(family, impl, WARMUP_SIZE, device)
    warm_step()
    del warm_step
    step, _inputs = cases.make_step(family, impl, size, device)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    peak = torch.cuda.max_memory_allocated(device)
    del step, _inputs
    return {"peak_extra_MB": (peak - before) / cases.MiB, "baseline_slack_MB": 0.0,
            "method": "cuda max_memory_allocated - memory_allocated before"}


def probe(family: str, impl: str, size: int, device: str = "cpu") -> dict:
    """Measure in *this* process (a fresh one for the CPU figure to mean anything)."""
    if device.startswith("cuda"):
        result = _probe_cuda(family, impl, size, device)
    else:
        result = _probe_cpu(family, impl, size)
    result.update(family=family, impl=impl, B=size, N=size, device=device,
                  score_matrix_MB=cases.score_matrix_bytes(size, size) / cases.MiB)
    return result


def measure(family: str, impl: str, size: int, device: str = "cpu", timeout: float = 900) -> dict:
    """Peak extra memory of one forward + backward, in a fresh subprocess on the CPU."""
    if device.startswith("cuda"):
        return probe(family, impl, size, device)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks.peak_memory", family, impl, str(size),
           "--device", device]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(cases.FAMILIES))
    parser.add_argument("impl", choices=sorted({i for v in cases.FAMILIES.values() for i in v}))
    parser.add_argument("size", type=int, help="B = N")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.family, args.impl, args.size, args.device)))


if __name__ == "__main__":
    main()
