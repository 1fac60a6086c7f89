"""Time of one demo training step in float32 and bfloat16, with and without channels_last.

    python benchmarks/train_step.py --arch resnet10_w32 --size 64 --batch 64

One step is what the demo's supervised stage does: forward of ``batch`` random images through
the trunk, GeM and a linear classifier, cross-entropy, backward and an AdamW step. Each variant
runs ``--warmup`` untimed steps, then ``--steps`` timed ones; the variants take turns
(``--rounds`` times) so that load from other processes on the machine spreads over all of them,
and the median step of each is printed with the CPU's bfloat16 units.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastap._device import autocast, cpu_bf16_units
from fastap.models import RetrievalNet

VARIANTS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet10_w32")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 36, (args.batch,))
    setups = {}
    for precision, cl in VARIANTS:
        net = RetrievalNet(args.arch)
        fmt = torch.channels_last if cl else torch.contiguous_format
        net = net.to(memory_format=fmt)
        clf = torch.nn.Linear(net.feat_dim, 36)
        opt = torch.optim.AdamW(list(net.parameters()) + list(clf.parameters()), lr=1e-3)
        setups[(precision, cl)] = (net, clf, opt, x.contiguous(memory_format=fmt))
    times: dict = {v: [] for v in VARIANTS}

    def step(v) -> None:
        net, clf, opt, xs = setups[v]
        with autocast(v[0], "cpu"):
            logits = clf(net.pool(net.features(net.preprocess(xs))))
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for v in VARIANTS:
        for _ in range(args.warmup):
            step(v)
    for _ in range(args.rounds):
        for v in VARIANTS:
            for _ in range(args.steps):
                t = time.perf_counter()
                step(v)
                times[v].append(time.perf_counter() - t)
    print(f"{args.arch}, {args.size} px, batch {args.batch}, {torch.get_num_threads()} threads; "
          f"CPU bfloat16 units: {cpu_bf16_units() or 'none'}; torch {torch.__version__}")
    base = statistics.median(times[("fp32", False)])
    for v in VARIANTS:
        med = statistics.median(times[v])
        print(f"  {v[0]:>4} {'channels_last' if v[1] else 'contiguous   '}: median "
              f"{1e3 * med:7.1f} ms/step ({base / med:.2f}x of fp32 contiguous; "
              f"{len(times[v])} steps)")


if __name__ == "__main__":
    main()
