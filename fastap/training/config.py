"""Training configuration: a typed tree of dataclasses, read from YAML plus ``key.sub=value``
overrides.

A recipe is a YAML mapping whose sections mirror :class:`Config` (``model``, ``data``, ``loss``,
``contrastive``, ``optim``, ``schedule``, ``train``, ``checkpoint``, ``log``, ``distributed``).
Keys left out take the defaults below. A recipe may start with ``_base_: other.yaml`` (a path
relative to the recipe): the base is read first and the recipe's keys are merged over it.
Command-line overrides are ``section.key=value`` with the value read as YAML
(``optim.lr=1e-4``, ``model.whitening_dim=null``, ``loss.score_range=[0,1]``).

Every unknown key, wrong type or out-of-range value raises :class:`ConfigError` naming the key
(with a close match suggested for a misspelling), before anything is built.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "ContrastiveConfig",
    "DataConfig",
    "DistributedConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    #: torchvision ResNet trunk (``fastap.models.ARCHS``).
    arch: str = "resnet50"
    #: ``gem``, ``mac`` or ``spoc`` (SPoC = the average pooling of the contrastive recipes).
    pooling: str = "gem"
    #: output size of a learned whitening layer trained with the net; ``null`` for none (and
    #: for the contrastive stage, whose projection head bypasses it).
    whitening_dim: Optional[int] = None
    #: weights to start from: a checkpoint in any layout ``fastap.models.from_pretrained`` reads,
    #: ``torchvision:<weights>``, or ``null`` for a random initialisation.
    pretrained: Optional[str] = None
    #: GeM's initial exponent and whether it is learned.
    gem_p: float = 3.0
    learn_p: bool = True
    #: keep every BatchNorm in eval mode (running statistics, no updates) while training. This is
    #: what retrieval fine-tuning does (cirtorch) and what makes multi-stage backpropagation
    #: exact: in train mode each chunk would be normalised by its own statistics.
    freeze_bn: bool = True
    #: input normalisation for a net built without ``pretrained`` (``imagenet`` or ``none``);
    #: pretrained weights bring their own.
    normalization: str = "imagenet"


@dataclass
class DataConfig:
    #: list file of training images: ``path label`` lines, or a CSV with a header naming a path
    #: column (path/image/filename/file) and, for the fine-tuning stage, a label column
    #: (label/class/class_id/landmark_id/instance/cluster). The contrastive stage ignores labels
    #: and also accepts a folder (every image under it).
    train_list: Optional[str] = None
    #: folder that relative paths in the list are read from (default: the list file's folder).
    root: Optional[str] = None
    #: side of the square training crops.
    image_size: int = 224
    #: RandomResizedCrop area range (fraction of the image).
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    #: augmentation family: ``retrieval`` (crop + flip), ``mocov2``, ``simclr`` or ``none``
    #: (resize to a square); the contrastive stage needs ``mocov2`` or ``simclr``.
    augment: str = "retrieval"
    #: class-balanced batches of the fine-tuning stage: P distinct classes x K images each
    #: (K >= 2: a query needs positives).
    classes_per_batch: int = 32
    images_per_class: int = 4
    #: batch size of the contrastive stage (unlabelled images).
    batch_size: int = 256
    #: batches in an epoch; default: every class once (fine-tuning) / every image once.
    batches_per_epoch: Optional[int] = None
    num_workers: int = 4
    #: check that every listed image exists before training starts.
    check_files: bool = True


@dataclass
class LossConfig:
    #: ``ap`` (quantized AP, Revaud et al. 2019) or ``fastap`` (Cakir et al. 2019).
    name: str = "ap"
    #: histogram bins; default 25 for ``ap`` and 10 for ``fastap`` when null.
    num_bins: Optional[int] = None
    score_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    #: λ of L = L_AP + λ·L_InfoNCE in the fine-tuning stage (0 disables the contrastive term).
    contrastive_weight: float = 0.0
    #: force the fused embedding→AP kernel on/off; null picks by size.
    fused: Optional[bool] = None


@dataclass
class ContrastiveConfig:
    #: ``moco`` (MoCo v2: momentum encoder + queue + InfoNCE) or ``simclr`` (NT-Xent).
    method: str = "moco"
    #: projection head: feat → hidden (→ BN) → ReLU → dim, output L2-normalised.
    dim: int = 128
    hidden_dim: int = 2048
    head_bn: bool = False
    temperature: float = 0.2
    #: MoCo: queue of negative keys and momentum of the key encoder.
    queue_size: int = 65536
    momentum: float = 0.999
    #: MoCo: shuffle the key batch across the BatchNorm groups (GPUs, or chunks on one device) so
    #: that BN statistics cannot leak which key matches which query.
    shuffle_bn: bool = True


@dataclass
class OptimConfig:
    #: ``sgd``, ``adam`` or ``adamw``.
    name: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    #: SGD momentum / Nesterov; Adam(W) betas and eps.
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    #: learning-rate factor of GeM's p (docs/models.md: 10x, no weight decay).
    p_lr_factor: float = 10.0
    #: clip the global gradient norm (after unscaling); null for no clipping.
    grad_clip: Optional[float] = None


@dataclass
class ScheduleConfig:
    #: ``constant``, ``cosine`` (to ``min_lr_factor``), ``step`` (× ``gamma`` at each of
    #: ``milestones`` steps), ``exponential`` (× ``gamma`` per ``decay_every`` steps) or
    #: ``linear`` (to ``min_lr_factor``).
    name: str = "constant"
    #: linear warm-up from 0 over this many optimizer steps.
    warmup_steps: int = 0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    decay_every: int = 1
    min_lr_factor: float = 0.0


@dataclass
class TrainConfig:
    #: length of the run: ``max_steps`` optimizer steps if set, else ``epochs`` epochs, i.e.
    #: ceil(epochs x batches_per_epoch / accumulate) steps: when ``accumulate`` does not
    #: divide that, the last step also takes the first batches of the next epoch.
    epochs: int = 1
    max_steps: Optional[int] = None
    #: micro-batches per optimizer step (gradient accumulation; the loss is averaged).
    accumulate: int = 1
    #: images per forward pass of multi-stage backpropagation; null = the whole batch at once.
    chunk_size: Optional[int] = None
    #: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    device: str = "auto"
    #: precision of the forward passes: ``fp32``; ``bf16`` (bfloat16 autocast: on a CPU with
    #: bfloat16 units, avx512_bf16 or AMX, or a GPU; elsewhere float32 with a warning); ``auto``
    #: (bf16 where the device has bfloat16 units, else fp32); ``fp16`` (float16 autocast with
    #: a gradient scaler, for GPUs).
    precision: str = "fp32"
    #: the older spelling of ``precision``: ``none``, ``bfloat16`` or ``float16`` (= fp16); a
    #: value other than ``none`` sets ``precision`` (then left at ``fp32``).
    amp: str = "none"
    #: deterministic algorithms (torch.use_deterministic_algorithms, no cuDNN autotuning); needed
    #: for bit-identical resumption.
    deterministic: bool = True


@dataclass
class CheckpointConfig:
    #: write a training checkpoint every N optimizer steps (and at the end); 0 = only at the end.
    every: int = 1000
    #: how many step checkpoints to keep (older ones are removed after a new one is complete).
    keep: int = 3


@dataclass
class LogConfig:
    #: log every N optimizer steps to CSV / TensorBoard.
    every: int = 10
    csv: bool = True
    tensorboard: bool = True
    progress: bool = True


@dataclass
class DistributedConfig:
    #: ``auto`` (NCCL on CUDA, gloo on CPU), ``nccl`` or ``gloo``; used when WORLD_SIZE > 1.
    backend: str = "auto"


@dataclass
class Config:
    #: ``finetune`` (listwise AP on labelled data) or ``contrastive`` (instance discrimination).
    stage: str = "finetune"
    #: folder receiving checkpoints/, log.csv, tensorboard/, config.yaml and final.pt.
    output_dir: str = "runs/fastap"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# ----------------------------------------------------------------------------------------------
# dict <-> dataclasses with type checks
# ----------------------------------------------------------------------------------------------


def _suggest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp``; floats accept ints and YAML's '1e-4'."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if value is None:
        raise ConfigError(f"{key}: may not be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # NaN passes every range check (all comparisons are false) and inf passes "> 0"; either
        # would only surface as a NaN loss or weights, steps later.
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a schema bug, not the user's


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "the configuration"
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}"
                              f"{_suggest(str(key), names)}; known keys"
                              f"{' in ' + prefix.rstrip('.') if prefix else ''}: "
                              f"{', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, key + ".")
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A validated :class:`Config` from a nested mapping (unknown keys and bad values raise)."""
    data = {k: v for k, v in data.items() if k != "_base_"}
    cfg = _build(Config, data, "")
    t = cfg.train
    if t.amp != "none" and t.amp in _AMP_PRECISION:
        if t.precision not in ("fp32", _AMP_PRECISION[t.amp]):
            raise ConfigError(f"train.amp: {t.amp!r} contradicts train.precision "
                              f"{t.precision!r}; give train.precision only")
        # One key from here on: the dumped config.yaml and resumption compare precision.
        t.precision, t.amp = _AMP_PRECISION[t.amp], "none"
    validate(cfg)
    return cfg


#: train.amp's values as train.precision values.
_AMP_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The nested plain-dict form of ``cfg`` (YAML/JSON-serialisable)."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Value checks
# ----------------------------------------------------------------------------------------------


def _choice(key: str, value: Any, options: Sequence[str]) -> None:
    if value not in options:
        raise ConfigError(f"{key}: must be one of {', '.join(map(repr, options))}, "
                          f"got {value!r}{_suggest(str(value), options)}")


def _positive(key: str, value: Optional[float], allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range and choice checks; raises :class:`ConfigError` naming the offending key."""
    # Long because the recipe has many keys: one flat check per key (or pair of keys) reads
    # better than checks scattered over helpers, and the order is the recipe's.
    from ..models import ARCHS

    _choice("stage", cfg.stage, ("finetune", "contrastive"))
    m, d, lo, c, o, s, t = (cfg.model, cfg.data, cfg.loss, cfg.contrastive, cfg.optim,
                            cfg.schedule, cfg.train)
    _choice("model.arch", m.arch, sorted(ARCHS))
    _choice("model.pooling", m.pooling, ("gem", "mac", "spoc"))
    _positive("model.whitening_dim", m.whitening_dim)
    _positive("model.gem_p", m.gem_p)
    _choice("model.normalization", m.normalization, ("imagenet", "none"))
    _positive("data.image_size", d.image_size)
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise ConfigError(f"data.crop_scale: must be [min, max] with 0 < min <= max <= 1, "
                          f"got {d.crop_scale}")
    _choice("data.augment", d.augment, ("retrieval", "mocov2", "simclr", "none"))
    _positive("data.classes_per_batch", d.classes_per_batch)
    _positive("data.images_per_class", d.images_per_class)
    _positive("data.batch_size", d.batch_size)
    _positive("data.batches_per_epoch", d.batches_per_epoch)
    _positive("data.num_workers", d.num_workers, allow_zero=True)
    _choice("loss.name", lo.name, ("ap", "fastap"))
    if lo.num_bins is not None and lo.num_bins < (2 if lo.name == "ap" else 1):
        raise ConfigError(f"loss.num_bins: too small for {lo.name!r}: {lo.num_bins}")
    if len(lo.score_range) != 2 or not lo.score_range[0] < lo.score_range[1]:
        raise ConfigError(f"loss.score_range: must be [lo, hi] with lo < hi, "
                          f"got {lo.score_range}")
    _positive("loss.contrastive_weight", lo.contrastive_weight, allow_zero=True)
    _choice("contrastive.method", c.method, ("moco", "simclr"))
    _positive("contrastive.dim", c.dim)
    _positive("contrastive.hidden_dim", c.hidden_dim)
    _positive("contrastive.temperature", c.temperature)
    _positive("contrastive.queue_size", c.queue_size)
    if not 0 <= c.momentum < 1:
        raise ConfigError(f"contrastive.momentum: must be in [0, 1), got {c.momentum}")
    _choice("optim.name", o.name, ("sgd", "adam", "adamw"))
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.momentum", o.momentum, allow_zero=True)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas: must be two values in [0, 1), got {o.betas}")
    _positive("optim.eps", o.eps)
    _positive("optim.p_lr_factor", o.p_lr_factor)
    _positive("optim.grad_clip", o.grad_clip)
    _choice("schedule.name", s.name, ("constant", "cosine", "step", "exponential", "linear"))
    _positive("schedule.warmup_steps", s.warmup_steps, allow_zero=True)
    _positive("schedule.gamma", s.gamma)
    _positive("schedule.decay_every", s.decay_every)
    if not 0 <= s.min_lr_factor <= 1:
        raise ConfigError(f"schedule.min_lr_factor: must be in [0, 1], got {s.min_lr_factor}")
    if list(s.milestones) != sorted(s.milestones) or any(v <= 0 for v in s.milestones):
        raise ConfigError(f"schedule.milestones: must be increasing positive step numbers, "
                          f"got {s.milestones}")
    _positive("train.epochs", t.epochs)
    _positive("train.max_steps", t.max_steps)
    _positive("train.accumulate", t.accumulate)
    _positive("train.chunk_size", t.chunk_size)
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _choice("train.amp", t.amp, ("none", "bfloat16", "float16"))
    _choice("train.precision", t.precision, ("auto", "fp32", "bf16", "fp16"))
    _positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    _positive("log.every", cfg.log.every)
    _choice("distributed.backend", cfg.distributed.backend, ("auto", "nccl", "gloo"))
    if cfg.stage == "contrastive":
        if m.whitening_dim is not None:
            # The projection head reads the pooled features before the whitening layer, so it
            # would get no gradient (and DDP fails on parameters without one).
            raise ConfigError(f"model.whitening_dim: the contrastive stage does not train a "
                              f"whitening layer (its projection head reads the pooled features); "
                              f"set it to null here and give it to the finetune stage, got "
                              f"{m.whitening_dim}")
        if d.augment not in ("mocov2", "simclr"):
            raise ConfigError(f"data.augment: the contrastive stage needs 'mocov2' or 'simclr' "
                              f"views, got {d.augment!r}")
        if lo.contrastive_weight:
            raise ConfigError("loss.contrastive_weight: only used by the finetune stage (the "
                              "contrastive stage's loss is the contrastive term alone)")
    if cfg.stage == "finetune" and d.images_per_class < 2:
        # With one image per class no query has a positive in its batch: the AP loss is 0 and
        # nothing is learned.
        raise ConfigError(f"data.images_per_class: the finetune stage needs at least 2 images "
                          f"per class in a batch (a query's positives), got {d.images_per_class}")
    if cfg.stage == "finetune" and lo.contrastive_weight > 0 and c.method != "moco":
        raise ConfigError(f"contrastive.method: the AP + λ·InfoNCE fine-tuning term uses the MoCo "
                          f"formulation, got {c.method!r}")


# ----------------------------------------------------------------------------------------------
# Files and overrides
# ----------------------------------------------------------------------------------------------


def _yaml():
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml is a dependency of the trainer
        raise ImportError("fastap's trainer reads YAML recipes with PyYAML: pip install pyyaml"
                          ) from err
    return yaml


def _merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    yaml = _yaml()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: _base_ chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.get("_base_")
    if base is not None:
        base_path = Path(base) if os.path.isabs(base) else path.parent / base
        data = _merge(_read_yaml(base_path, seen + (path.resolve(),)),
                      {k: v for k, v in data.items() if k != "_base_"})
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """``data`` with each ``a.b.c=value`` applied (value parsed as YAML; ``a.b=`` sets null)."""
    yaml = _yaml()
    out = copy.deepcopy(dict(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"override {item!r}: bad key {key!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot read value {text!r}: {err}") from err
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(path: Optional[Union[str, os.PathLike]] = None,
                overrides: Sequence[str] = ()) -> Config:
    """Read a YAML recipe (or start from the defaults when ``path`` is None), apply overrides
    and validate. Raises :class:`ConfigError` naming the key of any problem."""
    data = _read_yaml(Path(path)) if path is not None else {}
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as err:
        if path is not None:
            raise ConfigError(f"{path}: {err}") from None
        raise


def dump_config(cfg: Config) -> str:
    """``cfg`` as YAML text (what ``output_dir/config.yaml`` holds)."""
    return _yaml().safe_dump(config_to_dict(cfg), sort_keys=False)
