"""``python -m fastap.datasets.synthetic``: generate the benchmark from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence


from .build import generate
from .config import PRESETS


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fastap.datasets.synthetic ROOT [--name N] [--seed S] [--preset P] [--force]
    [--workers W]``."""
    p = argparse.ArgumentParser(prog="python -m fastap.datasets.synthetic",
                                description="Generate the synthetic revisitop-layout benchmark.")
    p.add_argument("root")
    p.add_argument("--name", default="synthetic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--force", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    info = generate(args.root, args.name, seed=args.seed, preset=args.preset, force=args.force,
                    workers=args.workers)
    state = "generated" if info.generated else "reused"
    print(f"{state} {info.dir} in {info.seconds:.1f} s: {json.dumps(info.counts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
