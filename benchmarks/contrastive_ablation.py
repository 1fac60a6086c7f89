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
``threads=N`` (default 1: the runs behind docs/demo.md shared two cores with other jobs).

``row=supervised`` trains the demo's supervised row instead (its stage, seed and initial
weights; the labels are read), the reference the contrastive row is compared with.

``diagnose=1`` adds what docs/demo.md uses to explain a row (from the generator's
``meta.json``, whose instance and family labels the stage never reads): the make-up of the
queries' top 10 (``top10``: shares of the same instance, another instance of its family, a
distractor, another family), the training images' nearest neighbour under the row's
descriptors (``train_nn``: shares of the same instance and of the same family) and the
effective rank of those descriptors (``erank``: exp of the entropy of the normalised
eigenvalues of their covariance; a collapsed representation has few directions).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def diagnose(net, images: torch.Tensor, meta: dict, top) -> dict:
    """The ``diagnose=1`` figures (module docstring) of a trained net."""
    from fastap import demo
    from fastap.training import unit_float

    database, kinds = meta["database"], ("instance", "family", "distractor", "other_family")
    counts = dict.fromkeys(kinds, 0)
    for query, row in zip(meta["queries"], top):
        for j in row:
            hit = database[j]
            kind = ("instance" if hit["instance"] == query["instance"] else
                    "distractor" if hit["instance"] < 0 else
                    "family" if hit["family"] == query["family"] else "other_family")
            counts[kind] += 1
    total = sum(counts.values())
    net.eval()
    with torch.no_grad():
        desc = torch.cat([demo._pooled(net, unit_float(chunk)) for chunk in images.split(100)])
    desc = F.normalize(desc.float(), dim=1)
    share = torch.linalg.svdvals(desc - desc.mean(0)) ** 2
    share = share / share.sum()
    similarity = desc @ desc.T
    similarity.fill_diagonal_(-2.0)
    nearest = similarity.argmax(1)
    train = meta["train"]
    same = {key: torch.tensor([t[key] for t in train]) for key in ("instance", "family")}
    return {"top10": {k: round(v / total, 3) for k, v in counts.items()},
            "train_nn": {k: round(float((v[nearest] == v).float().mean()), 3)
                         for k, v in same.items()},
            "erank": round(float(torch.exp(-(share * share.clamp_min(1e-12).log()).sum())), 1)}


def main(argv: list[str]) -> int:
    from fastap import demo

    if not argv or "=" in argv[0]:
        print(__doc__)
        return 2
    name, opts = argv[0], dict(a.split("=", 1) for a in argv[1:])
    out = Path(opts.pop("out", "contrastive-ablation"))
    seed, precision = int(opts.pop("seed", 0)), opts.pop("precision", "bf16")
    threads, untrained = int(opts.pop("threads", 1)), opts.pop("untrained", "0") == "1"
    diagnosis = opts.pop("diagnose", "0") == "1"
    row = opts.pop("row", "contrastive")
    if row not in ("contrastive", "supervised"):
        raise SystemExit(f"row must be contrastive or supervised, got {row!r}")
    if "steps" in opts:
        opts["contrastive.steps"] = opts.pop("steps")
    preset = opts.pop("preset", "quick")
    try:
        cfg = demo.override(demo.PRESETS[preset], [f"{k}={v}" for k, v in opts.items()])
    except ValueError as e:
        raise SystemExit(str(e)) from None
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    # The demo's data: its labels (numbered as it numbers them) and the images its contrastive
    # stage sees (with the unlabelled pool when there is one).
    data = demo._load_data(out / "data", seed, cfg, cpu, lambda msg: None, {})
    stage = cfg.supervised if row == "supervised" else cfg.contrastive
    net = demo._new_net(cfg, seed, 0 if row == "supervised" else 1, cpu)
    t = time.perf_counter()
    if untrained:
        train = {}
    elif row == "supervised":
        train = demo.train_supervised(net, data.images, data.labels, cfg, seed * 1000 + 1,
                                      progress=False, precision=precision)
    else:
        train = demo.train_contrastive(net, data.unlabelled, cfg, seed * 1000 + 2,
                                       progress=False, precision=precision)
    seconds = time.perf_counter() - t
    net.to(memory_format=torch.contiguous_format)
    result, top = demo._evaluate(net, data.name, data.root, cfg, cpu, False, precision)
    maps = {s[0].upper(): round(result["results"][s]["mAP"], 2) for s in demo.SETUPS}
    line = {"name": name, "row": row, "seed": seed, "precision": precision,
            "images": len(data.images if row == "supervised" else data.unlabelled),
            "steps": 0 if untrained else stage.steps, "seconds": round(seconds, 1),
            **maps, "gem_p": round(net.pool.p.item(), 2), **train}
    if diagnosis:
        meta = json.loads((data.root / data.name / "meta.json").read_text())
        line.update(diagnose(net, data.images, meta, top))
    print(json.dumps(line), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "ablation.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
