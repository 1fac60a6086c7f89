"""One variant of the demo's contrastive stage: train it alone, print its off-the-shelf mAP.

    python benchmarks/contrastive_ablation.py NAME [seed=0] [preset=quick] [precision=bf16]
        [steps=N] [untrained=1] [KEY=VALUE ...]

KEY is a :class:`fastap.demo.DemoConfig` field, dotted into nested ones, the value a Python
literal: ``contrastive.augment.scale=(0.15,0.6)``, ``temperature=0.1``, ``local_crops=4``,
``unlabelled_instances=30``. ``untrained=1`` evaluates the randomly initialised net (the
floor the stage starts from). The net, the seed of its initial weights and of the stage, the data
(``<out>/data``) and the evaluation are the demo's (:func:`fastap.demo.run_demo`), so a variant
differs from the demo's contrastive row only by what is set here. One JSON line per run goes to
stdout and is appended to ``<out>/ablation.jsonl``; docs/demo.md lists the variants measured.
``--threads`` (default 1: the runs behind docs/demo.md shared two cores with other jobs).
"""

from __future__ import annotations

import ast
import copy
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    from fastap import demo
    from fastap.datasets.synthetic import generate, read_train_list

    if not argv or "=" in argv[0]:
        print(__doc__)
        return 2
    name, opts = argv[0], dict(a.split("=", 1) for a in argv[1:])
    out = Path(opts.pop("out", "contrastive-ablation"))
    seed, precision = int(opts.pop("seed", 0)), opts.pop("precision", "bf16")
    threads, untrained = int(opts.pop("threads", 1)), opts.pop("untrained", "0") == "1"
    cfg = copy.deepcopy(demo.PRESETS[opts.pop("preset", "quick")])
    if "steps" in opts:
        cfg.contrastive.steps = int(opts.pop("steps"))
    for key, text in opts.items():
        *path, last = key.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part)
        if not hasattr(obj, last):
            raise SystemExit(f"unknown DemoConfig key {key!r}")
        setattr(obj, last, ast.literal_eval(text))
    torch.set_num_threads(threads)
    root = out / "data"
    data = f"synthetic-{cfg.data_preset}-s{seed}"
    info = generate(root, data, seed=seed, preset=cfg.data_preset, workers=2)
    images = demo.load_images(read_train_list(info.train_list)[0])
    if cfg.unlabelled_instances:  # the pool run_demo adds
        images = torch.cat([images, demo.unlabelled_pool(root, data, seed, cfg)])
    net = demo._new_net(cfg, seed, 1, torch.device("cpu"))  # the demo's contrastive row
    t = time.perf_counter()
    train = {} if untrained else demo.train_contrastive(net, images, cfg, seed * 1000 + 2,
                                                        progress=False, precision=precision)
    seconds = time.perf_counter() - t
    net.to(memory_format=torch.contiguous_format)
    result, _ = demo._evaluate(net, data, root, cfg, torch.device("cpu"), False, precision)
    maps = {s[0].upper(): round(result["results"][s]["mAP"], 2) for s in demo.SETUPS}
    line = {"name": name, "seed": seed, "precision": precision, "images": len(images),
            "steps": 0 if untrained else cfg.contrastive.steps, "seconds": round(seconds, 1),
            **maps, **train}
    print(json.dumps(line), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "ablation.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
