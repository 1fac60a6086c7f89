"""A demo run's saved rows evaluated under other poolings than the GeM each row learned.

    python benchmarks/demo_pooling.py RUN [RUN ...] [--poolings learned 8 12 20 mac]

RUN is the folder of one `fastap demo` run (``report.json``, ``models/*.pt``; the data folder
``report.json`` names must still be there). Each row's trunk is evaluated as the demo evaluates
it (full-size images, one scale, the run's precision), with its pooling replaced by: ``learned``
(the row's own GeM, the demo's figure), a number (GeM with that fixed exponent p) or ``mac``
(max pooling, the limit p → ∞). Prints Easy / Medium / Hard mAP per row and pooling, the
contrastive row's Medium mAP over the supervised row's, and the lead of the fine-tuned row
(with its own learned GeM) over the better off-the-shelf row evaluated with that pooling.
docs/demo.md quotes it for the default and quick presets' seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastap.demo import ROW_NAMES, SETUPS

ROWS = tuple(ROW_NAMES)  # supervised, contrastive, contrastive+ap


def evaluate(run: Path, report: dict, key: str, pooling: str) -> dict[str, float]:
    """mAP (percent) of row ``key`` of ``run`` (whose ``report.json`` is ``report``) with
    ``pooling`` in place of its learned GeM."""
    from fastap.models import MAC, load_checkpoint
    from fastap.retrieval import evaluate_model

    net = load_checkpoint(run / "models" / f"{key.replace('+', '_')}.pt")[0]
    if pooling == "mac":
        net.pool = MAC()
    elif pooling != "learned":
        net.pool.p.data.fill_(float(pooling))
    result = evaluate_model(net, report["dataset"]["name"], report["dataset"]["root"],
                            max_size=report["config"]["eval_size"], batch_size=64, workers=0,
                            device="cpu", precision=report["precision"], output=None,
                            show_queries=0, progress=False)
    return {s: result["results"][s]["mAP"] for s in SETUPS}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--poolings", nargs="+", default=["learned", "8", "12", "20", "mac"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for run in args.runs:
        report = json.loads((run / "report.json").read_text())
        print(f"{run} (preset {report['preset']}, seed {report['seed']}, "
              f"{report['precision']}, {torch.get_num_threads()} thread(s)):")
        fine_tuned = evaluate(run, report, "contrastive+ap", "learned")
        for pooling in args.poolings:
            sup, con = (evaluate(run, report, key, pooling) for key in ROWS[:2])
            ft = fine_tuned if pooling == "learned" else evaluate(run, report, ROWS[2], pooling)
            lead = {s: fine_tuned[s] - max(sup[s], con[s]) for s in ("medium", "hard")}
            print(f"  {pooling:>7}: supervised " + " / ".join(f"{sup[s]:.1f}" for s in SETUPS)
                  + "   contrastive " + " / ".join(f"{con[s]:.1f}" for s in SETUPS)
                  + "   fine-tuned " + " / ".join(f"{ft[s]:.1f}" for s in SETUPS)
                  + f"   ratio (M) {con['medium'] / sup['medium']:.2f}"
                  + f"   lead of the fine-tuned row (learned GeM) M {lead['medium']:+.1f}"
                  + f" / H {lead['hard']:+.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
