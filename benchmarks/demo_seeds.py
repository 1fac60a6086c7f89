"""`fastap demo` over seeds and precisions: the table of every seed the README shows.

    python benchmarks/demo_seeds.py --preset quick --seeds 0-4 --precision bf16 fp32

Runs the demo once per (precision, seed), one run at a time, in this process (``run_demo``, the
code behind ``fastap demo``), each into ``<output>/<preset>-<precision>-s<seed>``, sharing the
generated data under ``<output>/data``. Prints, per run, the three rows' Easy/Medium/Hard mAP,
the fine-tuned row's lead over the better off-the-shelf row on Medium and Hard, the ratio of the
contrastive to the supervised off-the-shelf Medium mAP, the wall time (data generation
excluded: it is made once and reused), and per precision the mean of each column; writes
``<output>/<preset>-seeds.json`` with everything. A markdown table (``--markdown``) is what the
README pastes. ``--set KEY=VALUE ...`` runs a variant of the preset (:func:`fastap.demo.override`),
e.g. the default preset's contrastive stage as it was before issue 18 (120 steps of 64-px crops
covering 35-100 % of the image) on today's code::

    python benchmarks/demo_seeds.py --preset default --seeds 0 --precision fp32 --threads 2 \
        --set contrastive.steps=120 contrastive.size=64 "contrastive.augment.scale=(0.35,1.0)"

The wall-time baseline of the README is the code of that time itself
(``benchmarks/old_demo_time.sh``), which was slower than today's code running its presets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from fastap.demo import PRESETS, SETUPS, override, run_demo


def seeds(text: str) -> list[int]:
    """``0-4`` or ``0,2,5``."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def summary(report: dict) -> dict:
    rows = {r["key"]: r for r in report["rows"]}
    m = {k: {s: rows[k][s]["mAP"] for s in SETUPS} for k in rows}
    best = {s: max(m["supervised"][s], m["contrastive"][s]) for s in SETUPS}
    t = report["timings"]
    return {"seed": report["seed"], "precision": report["precision"], "mAP": m,
            "lead": {s: m["contrastive+ap"][s] - best[s] for s in ("medium", "hard")},
            "ratio_medium": m["contrastive"]["medium"] / max(m["supervised"]["medium"], 1e-9),
            "seconds": t["total"] - t["data"],
            "train_seconds": {k: t[f"train_{k}"] for k in rows}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["quick", "default"], default="quick")
    p.add_argument("--seeds", type=seeds, default=[0, 1, 2, 3, 4])
    p.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default="demo-seeds")
    p.add_argument("--markdown", action="store_true", help="print a markdown table as well")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="change the preset's DemoConfig fields (fastap.demo.override)")
    args = p.parse_args(argv)
    try:
        config = override(PRESETS[args.preset], args.set)
    except ValueError as e:
        p.error(str(e))
    out = Path(args.output)
    results = []
    for precision in args.precision:
        for seed in args.seeds:
            report = run_demo(out / f"{args.preset}-{precision}-s{seed}",
                              quick=args.preset == "quick", seed=seed, precision=precision,
                              threads=args.threads, config=config, data_root=out / "data",
                              progress=False, log=lambda msg: None)
            s = {**summary(report), "settings": args.set}
            results.append(s)
            m = s["mAP"]
            print(f"{args.preset} {s['precision']} seed {seed}: "
                  + "  ".join(f"{k} " + "/".join(f"{m[k][x]:.1f}" for x in SETUPS) for k in m)
                  + f"  lead M {s['lead']['medium']:+.1f} H {s['lead']['hard']:+.1f}"
                  + f"  con/sup M {s['ratio_medium']:.2f}  {s['seconds']:.0f} s", flush=True)
    (out / f"{args.preset}-seeds.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        print("\n| precision | seed | supervised E/M/H | contrastive E/M/H | contrastive + AP "
              "E/M/H | lead M / H | contrastive ÷ supervised (M) | seconds |")
        print("|---|---:|---|---|---|---|---:|---:|")
        for s in results:
            m = s["mAP"]
            cells = [" / ".join(f"{m[k][x]:.1f}" for x in SETUPS)
                     for k in ("supervised", "contrastive", "contrastive+ap")]
            print(f"| {s['precision']} | {s['seed']} | " + " | ".join(cells)
                  + f" | {s['lead']['medium']:+.1f} / {s['lead']['hard']:+.1f} | "
                  f"{s['ratio_medium']:.2f} | {s['seconds']:.0f} |")
        for precision in dict.fromkeys(s["precision"] for s in results):
            mine = [s for s in results if s["precision"] == precision]
            mean = {k: {x: statistics.mean(s["mAP"][k][x] for s in mine) for x in SETUPS}
                    for k in mine[0]["mAP"]}
            cells = [" / ".join(f"{mean[k][x]:.1f}" for x in SETUPS)
                     for k in ("supervised", "contrastive", "contrastive+ap")]
            lead = {x: statistics.mean(s["lead"][x] for s in mine) for x in ("medium", "hard")}
            print(f"| {precision} | mean | " + " | ".join(cells)
                  + f" | {lead['medium']:+.1f} / {lead['hard']:+.1f} | "
                  f"{statistics.mean(s['ratio_medium'] for s in mine):.2f} | "
                  f"{statistics.mean(s['seconds'] for s in mine):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
