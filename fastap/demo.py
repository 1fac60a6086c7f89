"""``fastap demo``: the paper's comparison at small scale, offline, on a synthetic benchmark.

Wu, Luo & Wunsch (IEEE SSCI 2022) compare, on Revisited Oxford/Paris, the off-the-shelf features
of a supervised classifier with those of a contrastively pre-trained network, and then fine-tune
the contrastive network with a listwise AP loss. :func:`run_demo` does the same in minutes on a
CPU:

0. **Data.** :func:`fastap.datasets.synthetic.generate` draws a revisitop-layout benchmark
   (queries with boxes, database views labelled easy/hard/junk, distractors) and a labelled
   training split of *other* landmark instances (other families: no benchmark instance is ever
   trained on). The training images are decoded once into one uint8 tensor.
1. **Supervised**: the trunk + GeM + a linear classifier over the training instances, trained
   with cross-entropy; its off-the-shelf GeM descriptors are evaluated.
2. **Contrastive**: the same trunk pre-trained by instance discrimination (SimCLR's NT-Xent over
   two augmented views through a projection head, :func:`fastap.training.nt_xent`), no labels.
3. **Contrastive + AP**: the contrastive weights fine-tuned with :class:`fastap.APLoss` on
   class-balanced batches (P instances × K images, :class:`~fastap.training.ClassBalancedBatchSampler`),
   every image of the batch ranked against all the others.

The three rows share the architecture (:data:`fastap.models.SMALL_ARCHS`), the training images,
and the evaluation: :func:`fastap.retrieval.evaluate_model` with GeM + L2N descriptors at the
same image size and the revisitop protocol (queries cropped by their box; Easy/Medium/Hard mAP and
mP@1,5,10). Augmentations are drawn on whole batches of in-memory tensors
(:func:`fastap.training.augment_batch`: random resized crops by an affine resampling, colour
jitter, grayscale, blur) from one seeded generator per stage, so a run is a function of ``seed``
(on the CPU, up to the thread scheduling of reductions).

The pieces are :mod:`fastap.training`'s (the trainer's optimizer and schedule builders, its
samplers, :func:`~fastap.training.fit_steps`), :mod:`fastap.plots`' figures and
:func:`fastap.retrieval.format_results`' table; this module holds the configuration, the three
stages' losses and the order of the run.

Outputs in ``output``: ``report.json`` (rows with per-setup mAP and mP@1,5,10 in percent,
timings, the configuration), ``report.txt`` (the printed table), ``map.png`` (bar chart of the
mAPs), ``retrieval.png`` (the top results of a few queries for each row) and ``models/*.pt``
(fastap checkpoints: ``fastap eval --model <file>`` reads them).
"""

from __future__ import annotations

import ast
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import as_int
from ._device import autocast, resolve_device, resolve_precision
from .retrieval.report import format_results
from .training.config import OptimConfig, ScheduleConfig
from .training.data import seeded_rng, shuffled_batches
from .training.in_memory import Augment, augment_batch, fit_steps, swap_surroundings, unit_float
from .training.trainer import build_optimizer, build_scheduler

__all__ = ["PRESETS", "DemoConfig", "augment_batch", "format_report", "override", "run_demo"]

PathLike = Union[str, os.PathLike]

SETUPS = ("easy", "medium", "hard")
#: Added to the seed of the unlabelled pool's data (DemoConfig.unlabelled_instances), so that it
#: never equals the seed of a demo run's own data.
UNLABELLED_SEED = 1_000_000
ROW_NAMES = {"supervised": "Supervised (CE), off-the-shelf",
             "contrastive": "Contrastive (SimCLR), off-the-shelf",
             "contrastive+ap": "Contrastive + AP fine-tuning"}


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One training stage: optimizer steps, batch, AdamW learning rate and weight decay."""

    steps: int
    batch: int                  # images per batch (contrastive: images, two views each)
    lr: float
    weight_decay: float = 1e-4
    warmup: int = 0
    augment: Augment = field(default_factory=Augment)
    size: Optional[int] = None  # side of this stage's training crops; None: DemoConfig.train_size


@dataclass
class DemoConfig:
    """Everything a demo run depends on besides the seed and the device."""

    data_preset: str                    # fastap.datasets.synthetic preset
    arch: str = "resnet10_w32"
    train_size: int = 64                # side of the training crops (unless a Stage sets its own)
    eval_size: Optional[int] = None     # longest side at evaluation (None: the images' own)
    supervised: Stage = field(default_factory=lambda: Stage(60, 96, 2e-3))
    label_smoothing: float = 0.1
    contrastive: Stage = field(default_factory=lambda: Stage(60, 96, 2e-3))
    temperature: float = 0.2
    proj_hidden: int = 256
    proj_dim: int = 64
    #: Multi-crop (Caron et al., SwAV 2020): per image this many more views of side
    #: ``local_size`` drawn with ``local_augment``, each pulled towards both full-size views of
    #: its image against the other images' (cheap: a 24-px view costs a quarter of a 48-px one).
    local_crops: int = 0
    local_size: int = 24
    local_augment: Augment = field(default_factory=Augment)
    #: Unlabelled images added to the contrastive stage: the synthetic generator's training split
    #: of ``unlabelled_instances`` more instances per family (other instances, drawn from another
    #: seed), their labels discarded. 0: the labelled split's images only.
    unlabelled_instances: int = 0
    #: Background swap (label-free): with this probability the second view of an image keeps
    #: only a central square (side a fraction ``paste_size`` of the view) and takes the rest from
    #: the second view of another image of the batch, so that the two views of an image share a
    #: part of the scene but not its surroundings, as the benchmark's views of a landmark do.
    paste_p: float = 0.0
    paste_size: tuple[float, float] = (0.5, 0.8)
    finetune: Stage = field(default_factory=lambda: Stage(40, 72, 1e-3))
    classes_per_batch: int = 12
    num_bins: int = 25
    #: The fine-tuned net adds a learned whitening layer (docs/models.md; Linear, identity at the
    #: start) of this size, trained end to end by the AP loss as in Revaud et al. (ICCV 2019);
    #: None: plain GeM descriptors like the off-the-shelf rows.
    whitening_dim: Optional[int] = 256
    show_queries: int = 4


#: SimCLR's augmentation without its grayscale: crops, colour jitter, blur, flips. The colours
#: of a landmark's details are what tells its instances apart here, so grayscale views would
#: teach the features to ignore them (colour jitter 0.8 instead of 0.4 cost 3.4 points of
#: Medium mAP, docs/demo.md). The crops cover 15-60% of the image, not SimCLR's 8-100% or the
#: 35-100% used before: the benchmark's views show parts of a landmark (occlusion, cropping,
#: scale), and two crops that each cover most of an image can be matched without learning its
#: parts (+3.8 Medium, +4.9 Hard mAP at equal steps, docs/demo.md).
CONTRASTIVE_AUGMENT = Augment(scale=(0.15, 0.6), flip=0.5, jitter=0.4, jitter_p=0.8, gray_p=0.0,
                              blur_p=0.5)
#: Moderate augmentation of the labelled stages (supervised and AP fine-tuning).
LABELLED_AUGMENT = Augment(scale=(0.35, 1.0), rotate=10.0, jitter=0.2, jitter_p=0.5, blur_p=0.2)

#: The supervised and the AP stage see the same labelled images (steps × batch); the contrastive
#: stage comes on top, without labels, as in the paper (pre-training, then fine-tuning). The
#: contrastive row was short of training in both presets (docs/demo.md), and its steps are paid
#: for differently. The quick preset's 120 × 96 images, 4× the steps before, come from bfloat16
#: (its bfloat16 run takes as long as the float32 run of the earlier stage), spent as 360 steps of
#: 32 with the background swap (``paste_p``: 0.62-0.85 of the supervised row's Medium mAP over
#: seeds 0-4 instead of 0.44-0.70). The default preset's come from smaller views and from the
#: time the preset took before this work (311-314 s on two Zen 4 cores, measured on the code of
#: that time: benchmarks/old_demo_time.sh): 32-px views cost a third of 64-px ones (48-px views
#: do as well as 64-px ones at equal steps, below 32 px it turns worse), and its contrastive row
#: grows with the number of steps (seed 0: 11.7 Medium mAP at 320 steps of 64 px, 21.4 at 960 of
#: 32 px, 25.0 at 1440), so it takes the longest stage that fits that time; the swap cost it 1.5
#: points. The supervised and the contrastive stage warm up over 50 steps (was 10; the AP stage
#: keeps 10), and each keeps the rate that served it best of those tried (2-16 x 10^-3, at seed
#: 1, then checked at seeds 0 and 2): 2 x 10^-3 for the supervised stage (+2.4 to +5.0 Medium
#: mAP at seeds 0-2), 8 x 10^-3 for the contrastive one (+2.8 to +5.0; docs/demo.md). The
#: contrastive stage alone decays its weights by 0.2 (AdamW, as instance-discrimination recipes
#: do; the others keep 10^-4): decays of 0.05-0.2 lifted its Medium mAP by 0.8-1.6 points on
#: the mean of seeds 0-2 and did not lift the supervised stage's (docs/demo.md).
PRESETS: dict[str, DemoConfig] = {
    "default": DemoConfig(
        data_preset="default", train_size=64,
        supervised=Stage(240, 96, 2e-3, warmup=50, augment=LABELLED_AUGMENT),
        contrastive=Stage(1440, 96, 8e-3, weight_decay=0.2, warmup=50, size=32,
                          augment=CONTRASTIVE_AUGMENT),
        finetune=Stage(240, 96, 2e-3, warmup=10, augment=LABELLED_AUGMENT),
        classes_per_batch=12),
    "quick": DemoConfig(
        data_preset="quick", train_size=48,
        supervised=Stage(120, 96, 2e-3, warmup=10, augment=LABELLED_AUGMENT),
        contrastive=Stage(360, 32, 2e-3, warmup=10, augment=CONTRASTIVE_AUGMENT), paste_p=1.0,
        finetune=Stage(120, 96, 2e-3, warmup=10, augment=LABELLED_AUGMENT),
        classes_per_batch=12),
}


def override(cfg: DemoConfig, settings: Sequence[str]) -> DemoConfig:
    """A copy of ``cfg`` with ``KEY=VALUE`` settings applied: KEY a field, dotted into nested
    ones (``contrastive.steps``, ``contrastive.augment.scale``), VALUE a Python literal
    (``120``, ``(0.35, 1.0)``). The benchmark scripts' way to run a variant of a preset."""
    cfg = copy.deepcopy(cfg)
    for setting in settings:
        key, sep, text = setting.partition("=")
        *path, last = key.strip().split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part, None)
        if not sep or not is_dataclass(obj) or last not in {f.name for f in fields(obj)}:
            raise ValueError(f"{setting!r} is not KEY=VALUE with KEY a DemoConfig field")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{setting!r}: the value is not a Python literal") from None
        setattr(obj, last, value)
    return cfg


# ----------------------------------------------------------------------------------------------
# Data in memory
# ----------------------------------------------------------------------------------------------


def unlabelled_pool(data_root: PathLike, name: str, seed: int, cfg: DemoConfig) -> Tensor:
    """The images (N, 3, H, W) uint8 of ``cfg.unlabelled_instances`` more instances per training
    family, for the label-free stage: the training split of the generator at seed
    ``UNLABELLED_SEED + seed`` (other instances than the run's own), its labels never read.
    Generated once into ``<data_root>/<name>-unlabelled<n>`` and reused."""
    from .datasets.synthetic import generate, read_train_list

    pool = generate(data_root, f"{name}-unlabelled{cfg.unlabelled_instances}",
                    seed=UNLABELLED_SEED + seed, preset=cfg.data_preset,
                    workers=min(4, os.cpu_count() or 1),
                    train_instances_per_family=cfg.unlabelled_instances, families=1,
                    instances_per_family=1, views_per_instance=2, queries_per_instance=1,
                    distractors=0)
    return load_images(read_train_list(pool.train_list)[0])


def load_images(paths: Sequence[PathLike]) -> Tensor:
    """Decode equally sized images into one uint8 tensor (N, 3, H, W)."""
    from torchvision.transforms.functional import pil_to_tensor

    from .datasets import load_image

    images = [pil_to_tensor(load_image(p)) for p in paths]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"training images must share one size, got {sorted(shapes)[:4]}")
    return torch.stack(images)


# ----------------------------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------------------------


def _fit(loss_of: Callable[[Tensor], Tensor], batches, net, modules: Sequence[nn.Module],
         stage: Stage, desc: str, progress: bool) -> dict:
    """The stage's steps (:func:`fastap.training.fit_steps`) with the trainer's AdamW over
    ``net`` and ``modules`` (GeM's p at 10× the rate without weight decay, docs/models.md) and
    its cosine schedule after a linear warm-up, decaying to 0 at the last step."""
    opt = build_optimizer(OptimConfig(name="adamw", lr=stage.lr,
                                      weight_decay=stage.weight_decay), net, modules)
    schedule = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=stage.warmup),
                               stage.steps)
    return fit_steps(loss_of, batches, opt, schedule, stage.steps, desc, progress)


def _pooled(net, x: Tensor) -> Tensor:
    """GeM-pooled trunk features (B, C) of images in [0, 1], not normalised."""
    return net.pool(net.features(net.preprocess(x)))


def train_supervised(net, images: Tensor, labels: Tensor, cfg: DemoConfig, seed: int,
                     progress: bool = True, precision: str = "fp32") -> dict:
    """Cross-entropy over the training instances: trunk → GeM → Linear(C). ``precision``:
    ``"fp32"`` or ``"bf16"`` (autocast of the forward pass), as in every stage."""
    stage = cfg.supervised
    gen = torch.Generator().manual_seed(seed)
    with seeded_rng(seed):
        classifier = nn.Linear(net.feat_dim, int(labels.max()) + 1).to(images.device)
    pixels = unit_float(images)
    net.train()

    def loss_of(idx: Tensor) -> Tensor:
        idx = idx.to(images.device)
        x = augment_batch(pixels[idx], stage.size or cfg.train_size, stage.augment, gen)
        with autocast(precision, x.device):
            logits = classifier(_pooled(net, x))
        return F.cross_entropy(logits.float(), labels[idx], label_smoothing=cfg.label_smoothing)

    return _fit(loss_of, shuffled_batches(images.shape[0], stage.batch, stage.steps, gen), net,
                [classifier], stage, "1/3 supervised (CE)", progress)


def train_contrastive(net, images: Tensor, cfg: DemoConfig, seed: int,
                      progress: bool = True, precision: str = "fp32") -> dict:
    """Instance discrimination without labels: SimCLR's NT-Xent on two views per image, plus,
    with ``cfg.local_crops``, a multi-crop term: each small view's projection classifies its
    image among the batch's full-size views (cross-entropy of its similarities / τ to both
    full-size views of every image), averaged with NT-Xent by number of views."""
    from .training import ProjectionHead, QueryModel, nt_xent

    stage = cfg.contrastive
    gen = torch.Generator().manual_seed(seed)
    with seeded_rng(seed):
        head = ProjectionHead(net.feat_dim, cfg.proj_hidden, cfg.proj_dim, batchnorm=True)
    model = QueryModel(net, head.to(images.device), output="proj")
    pixels = unit_float(images)
    model.train()

    def loss_of(idx: Tensor) -> Tensor:
        batch, n = pixels[idx.to(images.device)], len(idx)
        views = torch.cat([augment_batch(batch, stage.size or cfg.train_size, stage.augment, gen)
                           for _ in range(2)])
        if cfg.paste_p > 0:  # the second view's surroundings from another image
            views[n:] = swap_surroundings(views[n:], cfg.paste_p, cfg.paste_size, gen)
        local = [augment_batch(batch, cfg.local_size, cfg.local_augment, gen)
                 for _ in range(cfg.local_crops)]
        with autocast(precision, views.device):
            z = model(views)
            z_local = model(torch.cat(local)) if local else None  # (its own BN statistics)
        loss = nt_xent(z[:n], z[n:], cfg.temperature)
        if z_local is None:
            return loss
        own = torch.arange(n, device=z.device).repeat(cfg.local_crops)
        local_loss = sum(F.cross_entropy(z_local @ g.T / cfg.temperature, own)
                         for g in (z[:n], z[n:])) / 2
        return (2 * loss + cfg.local_crops * local_loss) / (2 + cfg.local_crops)

    return _fit(loss_of, shuffled_batches(images.shape[0], stage.batch, stage.steps, gen), net,
                [head], stage, "2/3 contrastive (SimCLR)", progress)


def train_ap(net, images: Tensor, labels: Tensor, cfg: DemoConfig, seed: int,
             progress: bool = True, precision: str = "fp32") -> dict:
    """Listwise AP fine-tuning: P classes × K images per batch, each image ranked against the
    rest of the batch by :class:`fastap.APLoss` on the net's descriptors."""
    from .losses import APLoss
    from .training import ClassBalancedBatchSampler, QueryModel

    stage = cfg.finetune
    gen = torch.Generator().manual_seed(seed)
    p = cfg.classes_per_batch
    sampler = ClassBalancedBatchSampler(labels.cpu().tolist(), p, max(2, stage.batch // p),
                                        seed=seed, batches_per_epoch=stage.steps)
    model = QueryModel(net, output="desc")
    criterion = APLoss(num_bins=cfg.num_bins)
    pixels = unit_float(images)
    model.train()

    def loss_of(idx: Tensor) -> Tensor:
        x = augment_batch(pixels[idx], stage.size or cfg.train_size, stage.augment, gen)
        with autocast(precision, x.device):
            desc = model(x)
        return criterion(desc, labels[idx])  # float32 descriptors (RetrievalNet.head)

    batches = (torch.tensor([i for i, _ in batch], device=images.device) for batch in sampler)
    return _fit(loss_of, batches, net, [], stage, "3/3 AP fine-tuning", progress)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def format_report(rows: Sequence[dict]) -> str:
    """One table: a line per row, per setup its mAP and mP@1,5,10 (percent;
    :func:`fastap.retrieval.format_results`)."""
    return format_results({r["name"]: r["results"] for r in rows})


def _figures(data: _DemoData, rows: Sequence[dict], tops: Sequence[np.ndarray],
             files: dict, n_queries: int, title: str, top_k: int = 8) -> None:
    """``map.png`` (the rows' mAP per setup) and ``retrieval.png``: a few queries, evenly
    spread, each on one line per row with that row's top ``top_k`` framed by the Medium
    setup's labels."""
    from .plots import plot_map_bars, plot_retrieval_results, spread_queries

    plot_map_bars({r["name"]: r["results"] for r in rows}, files["bars"], title=f"mAP — {title}")
    chosen = spread_queries(data.dataset.num_queries, n_queries)
    plot_retrieval_results(
        data.dataset, chosen, {r["key"]: top[:, :top_k] for r, top in zip(rows, tops)},
        files["retrieval"], aps={r["key"]: [r["queries"][i]["AP"]["medium"] for i in chosen]
                                 for r in rows},
        title=f"Top results — {title}", size=96)


# ----------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------


def _evaluate(net, name: str, root: Path, cfg: DemoConfig, device: torch.device,
              progress: bool, precision: str) -> tuple[dict, np.ndarray]:
    from .retrieval import evaluate_model

    result = evaluate_model(net, name, root, max_size=cfg.eval_size, batch_size=64, workers=0,
                            device=device, precision=precision, output=None, show_queries=0,
                            progress=progress, keep_arrays=True)
    scores = result.pop("arrays")["scores"]
    top = scores.topk(min(10, scores.shape[1]), dim=1).indices.numpy()
    return result, top


def run_demo(output: PathLike = "fastap-demo", *, quick: bool = False, seed: int = 0,
             device: Union[str, torch.device, None] = None,
             data_root: Optional[PathLike] = None, threads: Optional[int] = None,
             precision: str = "auto", progress: bool = True,
             log: Optional[Callable[[str], None]] = None,
             config: Optional[DemoConfig] = None) -> dict:
    """Run the three-row comparison and write its report; returns the report dict.

    Args:
        output: folder receiving ``report.json``, ``report.txt``, ``map.png``,
            ``retrieval.png`` and ``models/``.
        quick: the small preset (about a minute on two CPU cores) instead of the default one.
        seed: seeds the synthetic data and every training stage.
        device: default CUDA when available, else CPU.
        data_root: where the synthetic data are generated (reused when identical); default
            ``<output>/data``.
        threads: CPU threads (``torch.set_num_threads`` for the run, restored afterwards);
            ``None``: torch's default, one per core. On a machine whose cores are busy with
            other work, fewer threads can be much faster (an OpenMP team waits at every barrier
            for its slowest thread). Results are reproducible for a given seed and thread count
            (the reductions of the CPU kernels depend on the thread count).
        precision: ``"auto"`` (bfloat16 autocast where the CPU has bfloat16 units, avx512_bf16
            or AMX, or the GPU supports it; float32 elsewhere), ``"fp32"`` or ``"bf16"`` (on a
            CPU without the units: float32, with a warning). Training and extraction run in it;
            on the CPU the trunks train in channels_last. The report records it.
        progress: progress bars (a line per stage when stderr is no terminal); ``log``
            receives the progress messages (default: stderr).
        config: replaces the preset (experiments).

    Returns ``report.json``'s dict plus ``"table"`` (the printed table).
    """
    seed = as_int(seed, "seed", low=0)
    threads = as_int(threads, "threads", low=1, optional=True)
    device = resolve_device(device, "--device")
    ran, why = resolve_precision(precision, device, "--precision")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _run(output, quick=quick, seed=seed, device=device, data_root=data_root,
                    progress=progress, config=config, precision=(ran, why),
                    log=log or (lambda msg: print(msg, file=sys.stderr, flush=True)))
    finally:
        torch.set_num_threads(before)


@dataclass
class _DemoData:
    name: str
    root: Path
    dataset: Any                 # RevisitedDataset of the benchmark
    images: Tensor               # labelled training images
    labels: Tensor
    unlabelled: Tensor           # what the contrastive stage sees
    num_classes: int


def _load_data(data_root: Path, seed: int, cfg: DemoConfig, device, log, timings: dict
               ) -> _DemoData:
    """The synthetic benchmark and training split (generated, or reused when identical)."""
    from .datasets import RevisitedDataset
    from .datasets.synthetic import generate, read_train_list

    t = time.perf_counter()
    name = f"synthetic-{cfg.data_preset}-s{seed}"
    info = generate(data_root, name, seed=seed, preset=cfg.data_preset,
                    workers=min(4, os.cpu_count() or 1))
    paths, raw_labels = read_train_list(info.train_list)
    classes = {c: i for i, c in enumerate(sorted(set(raw_labels)))}
    labels = torch.tensor([classes[c] for c in raw_labels], device=device)
    images = load_images(paths).to(device)
    unlabelled = images
    if cfg.unlabelled_instances:
        unlabelled = torch.cat([images, unlabelled_pool(data_root, name, seed, cfg).to(device)])
    dataset = RevisitedDataset(data_root, name)
    timings["data"] = time.perf_counter() - t
    log(f"[data] {'generated' if info.generated else 'reused'} {info.dir}: "
        f"{dataset.num_queries} queries, {dataset.num_database} database images; training: "
        f"{len(paths)} images of {len(classes)} instances"
        + (f", {len(unlabelled)} unlabelled images for the contrastive stage"
           if unlabelled is not images else "") + f" ({timings['data']:.1f} s)")
    return _DemoData(name, data_root, dataset, images, labels, unlabelled, len(classes))


def _new_net(cfg: DemoConfig, seed: int, row: int, device: torch.device,
             whitening_dim: Optional[int] = None):
    """Row ``row``'s untrained net: its initial weights depend on (seed, row) only."""
    from .models import RetrievalNet

    with seeded_rng(seed * 10 + row):
        net = RetrievalNet(cfg.arch, whitening_dim=whitening_dim, source="fastap demo").to(device)
    # channels_last: oneDNN's convolutions on the CPU run 1.05-1.15x faster in it
    # (benchmarks/train_step.py); evaluation converts back (_train_rows' evaluate).
    return net.to(memory_format=torch.channels_last) if device.type == "cpu" else net


def _train_rows(data: _DemoData, out: Path, seed: int, cfg: DemoConfig, device, progress: bool,
                precision: str, log, timings: dict) -> tuple[list[dict], list[np.ndarray]]:
    """The three rows, each trained, evaluated and saved: (rows, their top results)."""
    from .models import save_checkpoint

    rows: list[dict] = []
    tops: list[np.ndarray] = []
    (out / "models").mkdir(exist_ok=True)

    def evaluate(key: str, net, train_info: dict) -> None:
        t = time.perf_counter()
        net.meta["source"] = f"fastap demo: {ROW_NAMES[key]}"
        # In the layout a loaded checkpoint has, so `fastap eval` of it gives these numbers.
        net.to(memory_format=torch.contiguous_format)
        result, top = _evaluate(net, data.name, data.root, cfg, device, progress, precision)
        timings[f"eval_{key}"] = time.perf_counter() - t
        save_checkpoint(net, out / "models" / f"{key.replace('+', '_')}.pt", demo_row=key,
                        seed=seed)
        rows.append({"key": key, "name": ROW_NAMES[key], "results": result["results"],
                     "train": train_info, "queries": result["queries"]})
        tops.append(top)
        res = result["results"]
        log(f"[{key}] trained in {train_info['seconds']:.1f} s, evaluated in "
            f"{timings[f'eval_{key}']:.1f} s: "
            + "  ".join(f"{s.capitalize()} mAP {res[s]['mAP']:.2f}" for s in SETUPS))

    def stage(key: str, train: Callable[[], dict]) -> dict:
        t = time.perf_counter()
        info = train()
        info["seconds"] = timings[f"train_{key}"] = time.perf_counter() - t
        return info

    images, labels = data.images, data.labels
    # 1. supervised classifier (cross-entropy over the training instances).
    net = _new_net(cfg, seed, 0, device)
    evaluate("supervised", net, stage("supervised", lambda: train_supervised(
        net, images, labels, cfg, seed * 1000 + 1, progress, precision)))
    # 2. contrastive pre-training (instance discrimination, no labels).
    net_con = _new_net(cfg, seed, 1, device)
    evaluate("contrastive", net_con, stage("contrastive", lambda: train_contrastive(
        net_con, data.unlabelled, cfg, seed * 1000 + 2, progress, precision)))
    # 3. AP fine-tuning of the contrastive weights with the training labels.
    net_ft = _new_net(cfg, seed, 2, device, cfg.whitening_dim)
    # Strict: every contrastive weight is taken over; only the whitening layer is new.
    net_ft.load_state_dict({**net_ft.state_dict(), **net_con.state_dict()})
    evaluate("contrastive+ap", net_ft, stage("contrastive+ap", lambda: train_ap(
        net_ft, images, labels, cfg, seed * 1000 + 3, progress, precision)))
    return rows, tops


def _run(output: PathLike, *, quick: bool, seed: int, device, data_root, progress: bool,
         config: Optional[DemoConfig], precision: tuple[str, str],
         log: Callable[[str], None]) -> dict:
    t_start = time.perf_counter()
    preset = "quick" if quick else "default"
    cfg = copy.deepcopy(config if config is not None else PRESETS[preset])
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(data_root).expanduser() if data_root is not None else out / "data"
    timings: dict[str, float] = {}
    precision, precision_reason = precision
    log(f"[demo] preset '{preset}', seed {seed}, device {device}"
        + (f" ({torch.get_num_threads()} CPU threads)" if device.type == "cpu" else "")
        + f", precision {precision} ({precision_reason})")
    data = _load_data(data_root, seed, cfg, device, log, timings)
    rows, tops = _train_rows(data, out, seed, cfg, device, progress, precision, log, timings)
    run = {"preset": preset, "seed": seed, "device": str(device), "precision": precision,
           "precision_reason": precision_reason, "threads": torch.get_num_threads()}
    return _write_report(out, data, cfg, rows, tops, run, timings, t_start)


def _write_report(out: Path, data: _DemoData, cfg: DemoConfig, rows: list[dict],
                  tops: list[np.ndarray], run: dict, timings: dict, t_start: float) -> dict:
    """``report.txt`` (the printed table), the figures and ``report.json``; returns the
    report's dict plus ``"table"``."""
    from ._io import atomic_write_text

    t = time.perf_counter()
    dataset = data.dataset
    table = (format_report(rows) + f"\n(preset '{run['preset']}', seed {run['seed']}, "
             f"{run['device']}, precision {run['precision']}: {run['precision_reason']})")
    title = (f"synthetic '{cfg.data_preset}' benchmark, seed {run['seed']}: "
             f"{dataset.num_queries} queries, {dataset.num_database} database images; "
             f"{cfg.arch}, {run['precision']}")
    files = {"json": out / "report.json", "text": out / "report.txt", "bars": out / "map.png",
             "retrieval": out / "retrieval.png"}
    _figures(data, rows, tops, files, cfg.show_queries, title)
    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    report = {
        "rows": [{"key": r["key"], "name": r["name"], **{s: r["results"][s] for s in SETUPS},
                  "train": r["train"]} for r in rows],
        "dataset": {"name": data.name, "root": str(data.root), "preset": cfg.data_preset,
                    "seed": run["seed"], "queries": dataset.num_queries,
                    "database": dataset.num_database, "train_images": len(data.images),
                    "train_instances": data.num_classes},
        **run, "config": asdict(cfg), "timings": timings,
        "files": {k: str(v) for k, v in files.items()},
    }
    atomic_write_text(files["text"], table + "\n")
    atomic_write_text(files["json"], json.dumps(report, indent=1) + "\n")
    report["table"] = table
    return report
