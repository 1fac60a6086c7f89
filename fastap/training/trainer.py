"""The training loop of both stages: contrastive pre-training and listwise-AP fine-tuning.

``Trainer(cfg).fit()`` (or ``fastap train --config recipe.yaml``) runs optimizer steps until
``train.max_steps`` (or ``train.epochs`` epochs, rounded up to whole optimizer steps); each
step accumulates ``train.accumulate`` micro-batches, each backpropagated with
:func:`~fastap.training.multistage.multistage_backward` in chunks of ``train.chunk_size`` images.

- ``finetune``: class-balanced batches (P classes × K images), ``fastap.APLoss`` (or
  ``FastAPLoss``) ranking every query against the whole (global, across processes) batch, plus
  optionally λ·InfoNCE of a MoCo head on a second view.
- ``contrastive``: unlabelled images, two views each; MoCo v2 (momentum encoder, queue, shuffling
  BN) or SimCLR (NT-Xent with negatives from all processes).

Outputs in ``output_dir``: ``config.yaml``, ``log.csv``, ``tensorboard/``,
``checkpoints/step_XXXXXXXX.pt`` (training state, written atomically every
``checkpoint.every`` steps, the newest ``checkpoint.keep`` kept) and, at the end, ``final.pt``
(a fastap checkpoint of the retrieval net, for :func:`fastap.models.from_pretrained`) and, for
the contrastive stage, ``encoder.pth`` (the trunk in the MoCo/SimCLR layout).

Exact resumption. A checkpoint holds the net and the trainer's other modules (head, MoCo key
encoder and queue), the optimizer, scheduler and gradient-scaler states, the step, the data
position (epoch, batch) and every process's RNG states. Augmentations are drawn from per-sample
seeds that depend only on (seed, epoch, position) (see :mod:`fastap.training.data`), so with
``train.deterministic`` a run killed at any point and resumed from its last checkpoint ends with
the same weights, bit for bit on the CPU, as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from .._io import DamagedFileError, atomic_torch_save, load_torch_file, naming_write_errors
from .._device import resolve_precision
from .._progress import progress_bar
from ..losses import APLoss, FastAPLoss
from ..models import IMAGENET_MEAN, IMAGENET_STD, RetrievalNet, from_pretrained, load_checkpoint, \
    save_checkpoint
from . import distributed as D
from .config import (Config, ConfigError, OptimConfig, ScheduleConfig, apply_overrides,
                     config_from_dict, config_to_dict, dump_config)
from .contrastive import MoCo, ProjectionHead, QueryModel, export_trunk, global_nt_xent
from .data import (ClassBalancedBatchSampler, LabelledImages, RandomBatchSampler, TwoViewImages,
                   build_transform, read_list_file, sample_seed)
from .multistage import multistage_backward

__all__ = ["CheckpointError", "Trainer", "build_net", "build_optimizer", "build_scheduler",
           "config_from_checkpoint", "find_checkpoint", "lr_factor", "train"]

PathLike = Union[str, os.PathLike]

STATE_KIND = "fastap-train-state"
_STEP_FILE = re.compile(r"^step_(\d{8,})\.pt$")


#: What a rerun keeps, in a full-disk message (see fastap._io.write_error_message).
_UNTOUCHED = "no checkpoint was touched"
_CHECKPOINTS_KEPT = "with --resume: the checkpoints so far are kept"


class CheckpointError(RuntimeError):
    """A training checkpoint that cannot be resumed from; the message names the file."""


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def build_net(cfg: Config, meta: Optional[dict] = None) -> RetrievalNet:
    """The :class:`RetrievalNet` of ``cfg.model``, from ``pretrained`` weights when given.

    A fastap checkpoint whose pooling/whitening differ from the requested ones (e.g. a SPoC net
    from contrastive pre-training fine-tuned with GeM) contributes its trunk and its input
    normalisation only. A missing ``pretrained`` file raises ``FileNotFoundError``; an
    unreadable one, an unknown layout or unknown torchvision weights :class:`ConfigError`.

    With ``meta`` (the net meta of a training checkpoint being resumed) no weights are read:
    the net is the one that was being trained (its arch, pooling and whitening must still be
    ``cfg.model``'s; GeM's ``learn_p``, input normalisation and provenance come from ``meta``)
    and the caller loads the checkpoint's weights. ``model.pretrained`` may then be gone.
    """
    m = cfg.model
    options = dict(pooling=m.pooling, whitening_dim=m.whitening_dim, p=m.gem_p,
                   learn_p=m.learn_p)
    if meta is not None:
        for key in ("arch", "pooling", "whitening_dim"):
            if meta.get(key) != getattr(m, key):
                raise ConfigError(f"model.{key}: {getattr(m, key)!r}, but the checkpoint being "
                                  f"resumed holds a net with {meta.get(key)!r}")
        # A fastap checkpoint as model.pretrained keeps its own learn_p (see below), so the
        # trained net's may differ from cfg's.
        if meta.get("learn_p") is not None:
            options["learn_p"] = bool(meta["learn_p"])
        net = RetrievalNet(m.arch, mean=meta.get("mean"), std=meta.get("std"), **options)
        structure = ("arch", "pooling", "whitening_dim", "out_dim", "learn_p", "mean", "std")
        net.meta.update({k: v for k, v in meta.items() if k not in structure})
        return net
    if m.pretrained is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if m.normalization == "imagenet" else (None,
                                                                                          None)
        return RetrievalNet(m.arch, mean=mean, std=std, source="random init", **options)
    source = m.pretrained
    if not source.startswith("torchvision:"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained: checkpoint not found: {path}")
        try:
            obj = load_torch_file(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a zip checkpoint, or not weights-only: let from_pretrained say
            obj = None
        if isinstance(obj, dict) and obj.get("format") == "fastap":
            with _names_pretrained():
                src, _ = load_checkpoint(path)
            if src.meta["arch"] != m.arch:
                raise ConfigError(f"model.arch: {m.arch!r} but {path} holds a {src.meta['arch']}")
            same = (src.meta["pooling"], src.meta.get("whitening_dim")) == (m.pooling,
                                                                             m.whitening_dim)
            if same:
                return src
            net = RetrievalNet(m.arch, mean=src.meta.get("mean"), std=src.meta.get("std"),
                               source=str(path), **options)
            net.backbone.load_state_dict(src.backbone.state_dict())
            net.meta["layout"] = "fastap-trunk"
            return net
        del obj
    with _names_pretrained():
        return from_pretrained(source, m.arch, **options)


@contextlib.contextmanager
def _names_pretrained():
    """from_pretrained/load_checkpoint raise ValueError for an unreadable file, an unknown
    layout or unknown torchvision weights: the user's model.pretrained, not a bug."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(f"model.pretrained: {err}") from err


def lr_factor(s: ScheduleConfig, step: int, total_steps: int) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up ``(step+1)/warmup_steps`` first; then, with t = step − warmup and
    T = total − warmup: constant 1; cosine ``min + (1−min)·½(1 + cos(π t/T))``; linear
    ``1 − (1−min)·t/T``; step ``gamma^(#milestones ≤ step)``; exponential
    ``gamma^⌊t/decay_every⌋``.
    """
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    t, span = step - s.warmup_steps, max(1, total_steps - s.warmup_steps)
    frac = min(t, span) / span
    if s.name == "cosine":
        return s.min_lr_factor + (1 - s.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * frac))
    if s.name == "linear":
        return 1 - (1 - s.min_lr_factor) * frac
    if s.name == "step":
        return s.gamma ** sum(1 for m in s.milestones if m <= step)
    if s.name == "exponential":
        return s.gamma ** (t // s.decay_every)
    return 1.0


def build_optimizer(o: OptimConfig, net: RetrievalNet, modules: Sequence[nn.Module] = ()
                    ) -> torch.optim.Optimizer:
    """The optimizer ``o`` names over the trainable parameters of ``net`` and of ``modules``
    (heads, classifiers), all at ``o.lr`` and ``o.weight_decay`` but GeM's p, which gets
    ``o.p_lr_factor`` × the rate and no weight decay (:meth:`RetrievalNet.parameter_groups`)."""
    groups = net.parameter_groups(o.lr, o.weight_decay, o.p_lr_factor)
    groups[0]["params"] = list(groups[0]["params"]) + [
        p for m in modules for p in m.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    adam = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return adam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, s: ScheduleConfig, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule ``s`` over ``total_steps`` optimizer steps: every group's rate times
    :func:`lr_factor` of the step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: lr_factor(s, step, total_steps))


def _rng_state() -> dict:
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest ``checkpoints/step_*.pt`` of a run folder, or None."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if (m := _STEP_FILE.match(p.name)))
    return steps[-1][1] if steps else None


def config_from_checkpoint(path: PathLike, overrides=()) -> Config:
    """The configuration a training checkpoint was written with (plus ``overrides``); lets
    ``fastap train --resume-from FILE`` run without ``--config``."""
    state = _load_state(Path(path))
    try:
        return config_from_dict(apply_overrides(state["config"], overrides))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _load_state(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = load_torch_file(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        what = (first if isinstance(err, DamagedFileError) else
                f"{path}: corrupt or unreadable checkpoint ({type(err).__name__}: {first})")
        raise CheckpointError(f"{what}; it was left untouched — resume from an older "
                              "checkpoints/step_*.pt with --resume-from") from err
    needed = {"state_dict", "meta", "kind", "config", "step", "data_position", "optimizer",
              "scheduler", "modules", "rng"}
    if not isinstance(obj, dict) or obj.get("kind") != STATE_KIND or not needed <= set(obj):
        missing = sorted(needed - set(obj)) if isinstance(obj, dict) else sorted(needed)
        raise CheckpointError(f"{path}: not a fastap training checkpoint (missing "
                              f"{', '.join(missing) or 'kind=' + STATE_KIND})")
    return obj


class _CsvLog:
    """``log.csv`` with a fixed header; on resume the rows after the resumed step (written by
    the interrupted run after its last checkpoint) are dropped so the log reads as one run."""

    def __init__(self, path: Path, fields: list[str], resume_step: Optional[int]):
        self.path, self.fields = path, fields
        rows: list[dict] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r.get("step") or 0) <= resume_step]
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self._file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore")

    def write(self, row: dict) -> None:
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        # Rows are flushed as they are written, so only a row whose write already failed (and
        # raised, naming the file) can be pending here: closing must not replace that error.
        with contextlib.suppress(OSError):
            self._file.close()


class _BatchStream:
    """Endless batches across epochs from a resumable sampler; ``position`` = (epoch, batch) of
    the next batch to *consume* (DataLoader prefetching does not move it)."""

    def __init__(self, dataset, sampler, num_workers: int, pin_memory: bool, epoch: int,
                 batch: int):
        self.dataset, self.sampler = dataset, sampler
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch, self.batch = epoch, batch
        self._it = None

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.batch

    def __next__(self):
        while True:
            if self.batch >= self.sampler.batches_per_epoch:
                self.epoch, self.batch, self._it = self.epoch + 1, 0, None
            if self._it is None:
                self.sampler.set_epoch(self.epoch, self.batch)
                self._it = iter(DataLoader(self.dataset, batch_sampler=self.sampler,
                                           num_workers=self.num_workers,
                                           pin_memory=self.pin_memory))
            try:
                item = next(self._it)
            except StopIteration:
                self._it = None
                self.batch = self.sampler.batches_per_epoch
                continue
            self.batch += 1
            return item


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


class Trainer:
    """Builds everything a :class:`~fastap.training.config.Config` describes and runs it.

    Args:
        cfg: the validated configuration.
        resume: ``None`` for a fresh run (refused if ``output_dir`` already holds checkpoints),
            ``True`` for the newest checkpoint of ``output_dir``, or a checkpoint path.
        progress: override ``log.progress`` (e.g. off for scripts).

    Attributes after construction: ``net`` (the :class:`RetrievalNet` being trained),
    ``query_model``, ``moco`` (or None), ``optimizer``, ``scheduler``, ``scaler`` (or None),
    ``step``, ``total_steps``, ``device``, ``ctx`` (the distributed context).
    """

    def __init__(self, cfg: Config, *, resume: Union[None, bool, PathLike] = None,
                 progress: Optional[bool] = None):
        self.cfg = cfg
        t = cfg.train
        if t.deterministic:
            # cuBLAS needs this before its first handle for deterministic GEMMs.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        state = self._resume_state(resume)  # before anything is built or written

        self.ctx = D.init_distributed(t.device, cfg.distributed.backend)
        self.device = self.ctx.device
        self.is_main = self.ctx.is_main
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)

        self._build_data()
        self._build_model(state)
        self._build_optim()
        self.step = 0
        epoch, batch = 0, 0
        if state is not None:
            epoch, batch = self._restore(state)
            D.on_main(self.ctx, self._set_aside_newer_checkpoints,
                      "setting the abandoned run's newer checkpoints aside")
        self.stream = _BatchStream(self.dataset, self.sampler, cfg.data.num_workers,
                                   self.device.type == "cuda", epoch, batch)
        self.progress = cfg.log.progress if progress is None else progress
        self._resumed_step = self.step if state is not None else None

    # -- construction ------------------------------------------------------------------------

    def _resume_state(self, resume) -> Optional[dict]:
        if resume is None or resume is False:
            existing = find_checkpoint(self.out)
            if existing is not None:
                raise CheckpointError(
                    f"{self.out} already holds checkpoints (newest: {existing}); pass --resume "
                    "to continue that run or choose another output_dir (nothing was changed)")
            return None
        if resume is True:
            path = find_checkpoint(self.out)
            if path is None:
                raise CheckpointError(f"--resume: no checkpoints/step_*.pt under {self.out}")
        else:
            path = Path(resume)
        state = _load_state(path)
        self.resumed_from = path
        saved = state["config"]
        mine = config_to_dict(self.cfg)
        differ = [f"{sec}.{k}" for sec, v in mine.items() if isinstance(v, dict)
                  for k in v if saved.get(sec, {}).get(k) != v[k]]
        differ += [k for k, v in mine.items() if not isinstance(v, dict) and saved.get(k) != v]
        if differ:
            warnings.warn(f"resuming {path} with a configuration that differs in: "
                          f"{', '.join(differ)}; the result will not match an uninterrupted run",
                          stacklevel=3)
        return state

    def _build_data(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        if d.train_list is None:
            raise ConfigError("data.train_list: required (a list file, or for the contrastive "
                              "stage a folder of images)")
        finetune = cfg.stage == "finetune"
        listing = read_list_file(d.train_list, d.root, need_labels=finetune,
                                 check_files=d.check_files)
        transform = build_transform(d.augment, d.image_size, d.crop_scale)
        rank, size = self.ctx.rank, self.ctx.world_size
        if finetune:
            views = 2 if cfg.loss.contrastive_weight > 0 else 1
            self.dataset = LabelledImages(listing, transform, views=views)
            self.sampler = ClassBalancedBatchSampler(
                listing.labels, d.classes_per_batch, d.images_per_class, seed=cfg.seed,
                batches_per_epoch=d.batches_per_epoch, rank=rank, world_size=size)
        else:
            self.dataset = TwoViewImages(listing, transform)
            self.sampler = RandomBatchSampler(len(listing), d.batch_size, seed=cfg.seed,
                                              batches_per_epoch=d.batches_per_epoch, rank=rank,
                                              world_size=size)
        self.listing = listing
        # The batch stream runs on across epoch boundaries, so `epochs` passes are
        # epochs x per_epoch micro-batches; rounded up to whole optimizer steps (the last step
        # may take up to accumulate - 1 batches of the next epoch) rather than down (which
        # would drop up to accumulate - 1 batches of every epoch).
        per_epoch = self.sampler.batches_per_epoch
        self.total_steps = cfg.train.max_steps or -(-cfg.train.epochs * per_epoch
                                                    // cfg.train.accumulate)

    def _build_model(self, state: Optional[dict] = None) -> None:
        cfg, c = self.cfg, self.cfg.contrastive
        # Resuming: the checkpoint holds the whole net, so model.pretrained is not read (it may
        # have been moved or deleted since the run started).
        self.net = build_net(cfg, meta=state["meta"] if state is not None else None)
        contrastive_stage = cfg.stage == "contrastive"
        use_head = contrastive_stage or cfg.loss.contrastive_weight > 0
        head = (ProjectionHead(self.net.feat_dim, c.hidden_dim, c.dim, c.head_bn)
                if use_head else None)
        output = "proj" if contrastive_stage else ("both" if use_head else "desc")
        self.query_model = QueryModel(self.net, head, output).to(self.device)
        self.moco = None
        if use_head and c.method == "moco":
            self.moco = MoCo(self.query_model, c.queue_size, c.momentum, c.temperature,
                             seed=sample_seed(cfg.seed, 17)).to(self.device)
        if cfg.stage == "finetune":
            num_bins = cfg.loss.num_bins or (25 if cfg.loss.name == "ap" else 10)
            self.loss = (APLoss(num_bins, cfg.loss.score_range, fused=cfg.loss.fused)
                         if cfg.loss.name == "ap" else FastAPLoss(num_bins, fused=cfg.loss.fused))
        self._set_modes()
        if self.ctx.world_size > 1:
            # Frozen BN buffers never change, so there is nothing to broadcast each forward.
            # (torch >= 2.14 renamed broadcast_buffers to forward_sync_buffers.)
            ddp = nn.parallel.DistributedDataParallel
            sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                    inspect.signature(ddp.__init__).parameters else "broadcast_buffers")
            self.model = ddp(self.query_model,
                             device_ids=[self.device.index] if self.device.type == "cuda" else None,
                             **{sync: not cfg.model.freeze_bn})
        else:
            self.model = self.query_model
        if cfg.train.precision == "fp16":
            self.precision, self.precision_reason = "fp16", "asked for (train.precision fp16)"
        else:
            self.precision, self.precision_reason = resolve_precision(
                cfg.train.precision, self.device, "train.precision")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def _build_optim(self) -> None:
        head = self.query_model.head
        self.optimizer = build_optimizer(self.cfg.optim, self.net,
                                         [head] if head is not None else [])
        self.scheduler = build_scheduler(self.optimizer, self.cfg.schedule, self.total_steps)
        self.scaler = (torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16
                       else None)

    def _set_modes(self) -> None:
        """Train mode, with every BatchNorm in eval mode when ``model.freeze_bn``."""
        modules = [self.query_model] + ([self.moco.key_model] if self.moco else [])
        for module in modules:
            module.train()
            if self.cfg.model.freeze_bn:
                for m in module.modules():
                    if isinstance(m, _BatchNorm):
                        m.eval()

    # -- state -------------------------------------------------------------------------------

    def _modules_state(self) -> dict:
        extra = {}
        if self.query_model.head is not None:
            extra["head"] = self.query_model.head.state_dict()
        if self.moco is not None:
            extra["moco"] = self.moco.state_dict()
        return extra

    def _restore(self, state: dict) -> tuple[int, int]:
        path = self.resumed_from
        try:
            self.net.load_state_dict(state["state_dict"])
            mods = state["modules"]
            if self.query_model.head is not None:
                self.query_model.head.load_state_dict(mods["head"])
            if self.moco is not None:
                self.moco.load_state_dict(mods["moco"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{path}: does not fit this configuration's model/optimizer: "
                                  f"{err}") from err
        self.step = int(state["step"])
        rngs = state["rng"]
        if len(rngs) != self.ctx.world_size:
            warnings.warn(f"{path} was written by {len(rngs)} processes, resuming with "
                          f"{self.ctx.world_size}: random states are not restored", stacklevel=3)
        else:
            _set_rng_state(rngs[self.ctx.rank])
        epoch, batch = (int(v) for v in state["data_position"])
        return epoch, batch

    def _set_aside_newer_checkpoints(self) -> None:
        """Move ``step_*.pt`` newer than the resumed step (and that run's ``final.pt`` and
        ``encoder.pth``, with a copy of its ``log.csv``) into
        ``checkpoints/abandoned_after_step_N/``.

        They belong to the trajectory given up by ``--resume-from`` an older checkpoint: left in
        place, a later ``--resume`` would pick them and ``checkpoint.keep`` would prune the new
        run's checkpoints as the older ones.
        """
        step = self.step
        newer = [p for p in sorted(self.ckpt_dir.glob("step_*.pt"))
                 if (m := _STEP_FILE.match(p.name)) and int(m.group(1)) > step]
        final = self.out / "final.pt"
        if final.is_file():
            try:
                final_step = load_torch_file(final, map_location="cpu", weights_only=True,
                                             mmap=True).get("step")
            except Exception:  # unreadable: leave it (the new run overwrites it at its end)
                final_step = None
            if isinstance(final_step, int) and final_step > step:
                newer += [p for p in (final, self.out / "encoder.pth") if p.is_file()]
        if not newer:
            return
        base = self.ckpt_dir / f"abandoned_after_step_{step:08d}"
        dest, n = base, 1
        while dest.exists():  # resumed from the same step before: keep both sets
            dest, n = base.with_name(f"{base.name}_{n}"), n + 1
        dest.mkdir()
        for p in newer:
            os.replace(p, dest / p.name)
        if (self.out / "log.csv").is_file():  # its rows past `step` are about to be dropped
            shutil.copy2(self.out / "log.csv", dest / "log.csv")
        print(f"fastap: resuming at step {step}: moved the abandoned run's newer "
              f"{', '.join(p.name for p in newer)} to {dest}", file=sys.stderr)

    def save(self, path: Optional[PathLike] = None) -> Optional[Path]:
        """Write a training checkpoint (collective: every process calls it; rank 0 writes).

        Atomic: a temporary file in the same folder is renamed over the target only when it is
        complete, so a crash leaves the previous checkpoint intact. Older ``step_*.pt`` beyond
        ``checkpoint.keep`` are removed afterwards.
        """
        rngs = D.gather_objects(_rng_state())
        path = Path(path) if path is not None else self.ckpt_dir / f"step_{self.step:08d}.pt"
        D.on_main(self.ctx, lambda: self._write_checkpoint(path, rngs), "writing a checkpoint")
        return path if self.is_main else None

    def _write_checkpoint(self, path: Path, rngs: list) -> None:
        save_checkpoint(
            self.net, path, kind=STATE_KIND, config=config_to_dict(self.cfg), step=self.step,
            data_position=list(self.stream.position), modules=self._modules_state(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None, rng=rngs,
            world_size=self.ctx.world_size, torch_version=str(torch.__version__))
        if path.parent == self.ckpt_dir:
            olds = sorted((int(m.group(1)), p) for p in self.ckpt_dir.iterdir()
                          if (m := _STEP_FILE.match(p.name)))
            for _, old in olds[:-self.cfg.checkpoint.keep]:
                old.unlink(missing_ok=True)

    # -- one step ----------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _backward(self, loss: Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _prepare(self, x: Tensor) -> Tensor:
        return x.to(self.device, non_blocking=True)

    def _shuffle_generator(self, micro: int) -> Optional[torch.Generator]:
        c, t = self.cfg.contrastive, self.cfg.train
        if not c.shuffle_bn or self.cfg.model.freeze_bn:
            return None  # BN in eval mode cannot leak anything
        if self.ctx.world_size == 1 and t.chunk_size is None:
            if not getattr(self, "_warned_shuffle", False):
                self._warned_shuffle = True
                warnings.warn("contrastive.shuffle_bn has no effect in one process without "
                              "train.chunk_size: the keys' BN statistics span the whole batch. "
                              "Set train.chunk_size to form BN groups (MoCo's single-GPU "
                              "SplitBatchNorm), or train on several processes", stacklevel=2)
            return None
        return torch.Generator().manual_seed(sample_seed(self.cfg.seed, self.step, micro, 29))

    def _micro_step(self, batch, micro: int) -> dict[str, Tensor]:
        cfg, accum = self.cfg, self.cfg.train.accumulate
        chunk = cfg.train.chunk_size
        ms = dict(chunk_size=chunk, prepare=self._prepare, backward=self._backward,
                  autocast=self._autocast)
        size = self.ctx.world_size
        logs: dict[str, Tensor] = {}

        def mean_over_ranks(x: Tensor) -> Tensor:
            x = x.detach().clone()
            if size > 1:
                torch.distributed.all_reduce(x)
                x /= size
            return x

        keys = None
        if self.moco is not None:
            if micro == 0:
                self.moco.momentum_update(self.query_model)
            keys = self.moco.keys(batch[1], chunk_size=chunk, prepare=self._prepare,
                                  autocast=self._autocast, shuffle=self._shuffle_generator(micro))

        if cfg.stage == "finetune":
            images, labels = batch[0], batch[-2].to(self.device)
            dim, lam = self.query_model.desc_dim, cfg.loss.contrastive_weight

            def loss_fn(out: Tensor):
                to_back, value = D.global_ranking_loss(self.loss, out[:, :dim], labels)
                logs["loss_ap"] = value
                if keys is not None:
                    c = self.moco.loss(out[:, dim:], keys)
                    to_back = to_back + lam * c
                    logs["loss_infonce"] = mean_over_ranks(c)
                    value = value + lam * logs["loss_infonce"]
                logs["loss"] = value
                return to_back / accum

            multistage_backward(self.model, images, loss_fn, **ms)
        elif cfg.contrastive.method == "moco":
            def loss_fn(q: Tensor):
                c = self.moco.loss(q, keys)
                logs["loss"] = mean_over_ranks(c)
                return c / accum

            multistage_backward(self.model, batch[0], loss_fn, **ms)
        else:
            views = torch.cat([batch[0], batch[1]])
            n = batch[0].shape[0]

            def loss_fn(z: Tensor):
                to_back, value = global_nt_xent(z[:n], z[n:], cfg.contrastive.temperature)
                logs["loss"] = value
                return to_back / accum

            multistage_backward(self.model, views, loss_fn, **ms)
        if keys is not None:
            self.moco.enqueue(keys)
        return logs

    def train_step(self) -> dict[str, float]:
        """One optimizer step (``train.accumulate`` micro-batches); returns the logged values."""
        self._set_modes()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        images = 0
        accum = self.cfg.train.accumulate
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        for micro in range(accum):
            D.raise_if_peer_failed()  # before this micro-batch's collectives
            batch = next(self.stream)
            images += batch[0].shape[0] * self.ctx.world_size
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            sync = self.model.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                logs = self._micro_step(batch, micro)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0) + v.float()
        clip = self.cfg.optim.grad_clip
        if self.scaler is not None:
            if clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.query_model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip:
                nn.utils.clip_grad_norm_(self.query_model.parameters(), clip)
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():
            # A float16 scaler skips the optimizer step after an overflow; the schedule still
            # advances by design (it counts steps taken, not updates applied).
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        self.step += 1
        out = {k: float(v) / accum for k, v in sums.items()}
        out.update(lr=lr, images=images)
        return out

    # -- the loop ----------------------------------------------------------------------------

    def _log_fields(self) -> list[str]:
        fields = ["step", "epoch", "lr", "loss"]
        if self.cfg.stage == "finetune":
            fields.append("loss_ap")
            if self.moco is not None:
                fields.append("loss_infonce")
        return fields + ["images_per_s", "elapsed_s"]

    def fit(self) -> Path:
        """Train to ``total_steps``; returns the path of ``final.pt`` (on every rank)."""
        cfg = self.cfg
        # Rank 0 writes every file; on_main makes each write a collective, so that its failure
        # stops all ranks at once.
        csv_log, writer = D.on_main(self.ctx, self._open_outputs,
                                    "preparing the output folder") or (None, None)
        bar = None
        if self.progress and self.is_main:
            print(f"fastap {cfg.stage}: precision {self.precision} ({self.precision_reason})",
                  file=sys.stderr, flush=True)
            bar = progress_bar(self.total_steps, f"fastap {cfg.stage}", initial=self.step,
                               unit="step", file=sys.stderr, leave=True)
        start = time.perf_counter()
        tick, images = start, 0
        try:
            while self.step < self.total_steps:
                values = self.train_step()
                images += values.pop("images")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
                if self.step % cfg.log.every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    row = dict(values, step=self.step, epoch=self.stream.position[0],
                               images_per_s=images / max(now - tick, 1e-9),
                               elapsed_s=now - start)
                    tick, images = now, 0
                    if cfg.log.csv or cfg.log.tensorboard:  # the same on every rank
                        D.on_main(self.ctx, lambda: self._write_logs(row, csv_log, writer),
                                  "writing the training log")
                every = cfg.checkpoint.every
                if every and self.step % every == 0 and self.step < self.total_steps:
                    self.save()
            self.save()
            final = self.out / "final.pt"
            D.on_main(self.ctx, lambda: self._write_final(final), "writing the final model")
            # Rank 0 must not leave the process group (train() closes it) while the others
            # still receive the broadcasts above: NCCL's send side does not wait for them.
            D.barrier(self.ctx)
            return final
        finally:
            if bar is not None:
                bar.close()
            if csv_log is not None:
                csv_log.close()
            if writer is not None:
                writer.close()

    def _open_outputs(self) -> tuple[Optional["_CsvLog"], object]:
        """Create the output folders and config.yaml; open log.csv and the TensorBoard writer."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        for stale in self.ckpt_dir.glob(".step_*.tmp"):  # left by a killed write
            stale.unlink(missing_ok=True)
        with naming_write_errors(self.out / "config.yaml", _UNTOUCHED):
            (self.out / "config.yaml").write_text(dump_config(cfg))
        csv_log = None
        if cfg.log.csv:
            with naming_write_errors(self.out / "log.csv", _UNTOUCHED):
                csv_log = _CsvLog(self.out / "log.csv", self._log_fields(), self._resumed_step)
        return csv_log, self._tensorboard() if cfg.log.tensorboard else None

    def _write_logs(self, row: dict, csv_log: Optional[_CsvLog], writer) -> None:
        if csv_log is not None:
            with naming_write_errors(csv_log.path, _CHECKPOINTS_KEPT):
                csv_log.write(row)
        if writer is not None:
            for k, v in row.items():
                if k not in ("step", "elapsed_s"):
                    writer.add_scalar(f"train/{k}", v, self.step)
            writer.flush()

    def _write_final(self, final: Path) -> None:
        save_checkpoint(self.net, final, config=config_to_dict(self.cfg), step=self.step)
        if self.cfg.stage == "contrastive":
            payload = export_trunk(self.query_model, self.moco)
            atomic_torch_save(self.out / "encoder.pth", payload)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("log.tensorboard is on but the tensorboard package is not installed "
                          "(pip install tensorboard); logging to CSV only", stacklevel=3)
            return None
        purge = self._resumed_step + 1 if self._resumed_step is not None else None
        return SummaryWriter(str(self.out / "tensorboard"), purge_step=purge)

    def close(self) -> None:
        """Leave the process group if this trainer created it."""
        self.ctx.close()


def train(cfg: Config, *, resume: Union[None, bool, PathLike] = None,
          progress: Optional[bool] = None) -> Path:
    """Build a :class:`Trainer`, run it and return ``output_dir/final.pt``."""
    trainer = Trainer(cfg, resume=resume, progress=progress)
    try:
        # A rank that fails (an exception, a full disk, Ctrl-C) stops the others at once with
        # its rank and cause, instead of leaving them in a collective until the timeout.
        with D.propagate_failures("training"):
            return trainer.fit()
    finally:
        trainer.close()
