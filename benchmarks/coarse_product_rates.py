"""Rate of one core at the products the certified search's coarse passes run.

    python benchmarks/coarse_product_rates.py [--queries 500 --tile 1048 --dim 512 --rows 20000]

The search multiplies a chunk of query rows by one tile of database rows at a time, one tile per
thread (csrc/cpu/topk_certified.cpp). This times that product on one thread for each pass —
float32 ``torch.mm``, bfloat16 ``torch.mm`` (bfloat16 output, as the kernel asks for) and
``torch._int_mm`` (int8 inputs, int32 output) — over ``--rows`` database rows, and prints each
rate in G multiply-adds × 2 per second of the process's CPU time (so that other load on the
machine costs this run wall time, not rate), with the CPU's int8 and bfloat16 units. It is the
measurement behind the order in which ``precision="auto"`` picks a pass (docs/search.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastap._device import cpu_bf16_units, cpu_int8_units


def product(kind: str, queries: int, tile: int, dim: int, rows: int):
    """A no-argument callable multiplying ``queries`` rows by ``rows`` database rows, a tile at
    a time, into one reused output buffer."""
    gen = torch.Generator().manual_seed(0)
    if kind == "int8":
        q = torch.randint(-127, 128, (queries, dim), dtype=torch.int8, generator=gen)
        x = torch.randint(-127, 128, (rows, dim), dtype=torch.int8, generator=gen)
        out = torch.empty(queries * tile, dtype=torch.int32)
        multiply = torch._int_mm
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[kind]
        q = torch.randn(queries, dim, generator=gen).to(dtype)
        x = torch.randn(rows, dim, generator=gen).to(dtype)
        out = torch.empty(queries * tile, dtype=dtype)
        multiply = torch.mm

    def run():
        for start in range(0, rows, tile):
            n = min(tile, rows - start)
            multiply(q, x[start:start + n].t(), out=out[:queries * n].view(queries, n))
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=500, help="query rows of a chunk")
    p.add_argument("--tile", type=int, default=1048, help="database rows of a tile")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rows", type=int, default=20000, help="database rows per timing")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    ops = 2 * args.queries * args.rows * args.dim
    print(f"CPU int8 units: {cpu_int8_units() or 'none'}; bfloat16 units: "
          f"{cpu_bf16_units() or 'none'}; torch {torch.__version__}, 1 thread; "
          f"{args.queries} x {args.tile} x {args.dim} tiles")
    for kind in ("fp32", "bf16", "int8"):
        run = product(kind, args.queries, args.tile, args.dim, args.rows)
        run()  # warm-up (oneDNN builds its kernels on the first call)
        seconds = []
        for _ in range(args.repeats):
            start = time.process_time()
            run()
            seconds.append(time.process_time() - start)
        median = statistics.median(seconds)
        print(f"{kind:5s} {median * 1e3:8.1f} ms CPU  {ops / median / 1e9:6.0f} GOP/s")


if __name__ == "__main__":
    main()
