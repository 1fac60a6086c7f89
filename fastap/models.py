"""Global-descriptor networks and the checkpoint layouts of contrastive and supervised ResNets.

A :class:`RetrievalNet` is a torchvision ResNet trunk (no avgpool/fc) followed by pooling
(GeM, MAC or SPoC), L2 normalisation, an optional learned whitening (``nn.Linear`` with bias)
and a second L2 normalisation (docs/models.md)::

    f = L2N(W · L2N(pool(trunk(x))) + b)        (without whitening: f = L2N(pool(trunk(x))))

The network expects *normalised* input; :meth:`RetrievalNet.preprocess` maps images in [0, 1]
to it with the ``mean``/``std`` of ``net.meta`` (``None`` for weights trained on raw [0, 1]
input, such as SimCLR). Preprocessing is a property of the weights, so it travels in ``net.meta``
and in fastap checkpoints rather than being left to the caller.

:func:`from_pretrained` reads every checkpoint layout a user is likely to bring (MoCo v1/v2,
MoCo v3, DINO backbone and full checkpoints, SimCLR and BYOL conversions, torchvision ImageNet
weights, fastap's own checkpoints) and detects the layout from the keys. A fastap checkpoint is::

    {'format': 'fastap', 'version': 1, 'meta': net.meta, 'state_dict': net.state_dict(), **extra}

written atomically by :func:`save_checkpoint`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import urllib.error
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ._io import DamagedFileError, atomic_torch_save, load_torch_file

__all__ = [
    "ARCHS",
    "CHECKPOINT_FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SMALL_ARCHS",
    "GeM",
    "MAC",
    "SPoC",
    "RetrievalNet",
    "detect_layout",
    "from_pretrained",
    "load_checkpoint",
    "save_checkpoint",
]

PathLike = Union[str, os.PathLike]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Small ResNets for CPU-sized experiments on small images (``fastap demo``): torchvision's
#: ResNet with ``blocks`` BasicBlocks per stage, narrower stage ``widths``, per-stage
#: ``strides`` and, without ``maxpool``, an identity for the stem's max-pooling. resnet10_w32
#: has a total stride of 8 instead of 32, so that a 96-pixel image still leaves a 12×12 map to
#: pool and a query crop of 50 pixels a 7×7 one (at stride 16 the retrieval mAP of the demo drops
#: by a third: small crops are then all border). Module and parameter names are torchvision's,
#: so checkpoints, layouts and :func:`from_pretrained` treat them like the others (their shapes
#: differ: pass the right ``arch``).
SMALL_ARCHS: dict[str, dict[str, Any]] = {
    "resnet10_w32": {"blocks": (1, 1, 1, 1), "widths": (32, 64, 128, 256), "maxpool": False,
                     "strides": (1, 2, 2, 1)},
}

#: Supported trunks and the channel count of their last stage.
ARCHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
         "resnet152": 2048, **{name: spec["widths"][-1] for name, spec in SMALL_ARCHS.items()}}

CHECKPOINT_FORMAT = "fastap"
CHECKPOINT_VERSION = 1
_RESERVED = ("format", "version", "meta", "state_dict")

# The torchvision children that make up the trunk, in order (avgpool and fc are left out).
_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


# ----------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------


class GeM(nn.Module):
    """Generalised-mean pooling: (B, C, H, W) → (B, C), ``f_c = (mean_hw clamp(x, eps)^p)^(1/p)``.

    p = 1 is average pooling, p → ∞ approaches max pooling. With ``learnable`` p is an
    ``nn.Parameter`` (shape (1,)); otherwise a buffer, so that it is saved either way. The pooling
    is computed in float32 whatever the input dtype: ``x^p`` overflows float16 for ordinary
    activations.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True):
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM: p must be positive, got {p}")
        init = torch.full((1,), float(p))
        if learnable:
            self.p = nn.Parameter(init)
        else:
            self.register_buffer("p", init)
        self.eps = eps
        self.learnable = learnable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        x = x.float().clamp(min=self.eps).pow(p.view(1, -1, 1, 1))
        # eps^p underflows float32 once p passes about 6.3 (eps = 1e-6): a channel of zeros would
        # have a zero mean, whose p-th root has an infinite derivative. Bounding the mean at the
        # smallest normal number changes nothing where it is larger.
        return x.mean(dim=(-2, -1)).clamp(min=torch.finfo(torch.float32).tiny).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}, learnable={self.learnable}"


class MAC(nn.Module):
    """Max pooling over space: (B, C, H, W) → (B, C), ``f_c = max_hw x``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().amax(dim=(-2, -1))


class SPoC(nn.Module):
    """Sum (average) pooling over space: (B, C, H, W) → (B, C), ``f_c = mean_hw x``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(-2, -1))


_POOLINGS = {"gem": GeM, "mac": MAC, "spoc": SPoC}


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


def _small_resnet(blocks: Sequence[int], widths: Sequence[int], maxpool: bool = True,
                  strides: Sequence[int] = (1, 2, 2, 2)) -> nn.Module:
    """A torchvision ``ResNet`` of BasicBlocks with ``blocks`` per stage, stage ``widths`` and
    stage ``strides`` (torchvision's initialisation; the 1000-way ``fc`` is kept so the names
    stay torchvision's). ``maxpool=False`` replaces the stem's max-pooling by an identity."""
    from torchvision.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, list(blocks))
    net.inplanes = widths[0]
    net.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(widths[0])
    for stage, (n, width) in enumerate(zip(blocks, widths), start=1):
        setattr(net, f"layer{stage}", net._make_layer(BasicBlock, width, n,
                                                      stride=strides[stage - 1]))
    net.fc = nn.Linear(widths[-1], 1000)
    if not maxpool:
        net.maxpool = nn.Identity()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def _resnet(arch: str) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if arch in SMALL_ARCHS:
        return _small_resnet(**SMALL_ARCHS[arch])
    return getattr(torchvision.models, arch)(weights=None)


def _check_norm(mean, std) -> tuple[Optional[list[float]], Optional[list[float]]]:
    if (mean is None) != (std is None):
        raise ValueError("mean and std must both be given or both be None")
    if mean is None:
        return None, None
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean/std must be 3 values each (std > 0), got {mean}, {std}")
    return mean, std


class RetrievalNet(nn.Module):
    """ResNet trunk → pooling → L2N → optional whitening (Linear with bias) → L2N.

    Args:
        arch: ``resnet18``/``34``/``50``/``101``/``152`` (torchvision definitions), or a small
            CPU-sized trunk of :data:`SMALL_ARCHS` (``resnet10_w32``).
        pooling: ``"gem"``, ``"mac"`` or ``"spoc"``.
        whitening_dim: output size of the learned whitening layer; ``None`` for none. The layer
            starts as the identity on the first ``whitening_dim`` channels (zero bias), so an
            untrained layer does not scramble pretrained features; :meth:`set_whitening` loads a
            learned whitening into it.
        p, learn_p: GeM's initial exponent and whether it is trained.
        mean, std: input normalisation the trunk's weights expect (ImageNet statistics by
            default); ``None`` for weights that take raw [0, 1] input.
        source: where the weights came from (recorded in ``meta``).

    ``forward(x)``: (B, 3, H, W) normalised images → (B, out_dim) L2-normalised float32
    descriptors. ``features(x)`` gives the trunk's (B, C, h, w) activation map.

    Attributes: ``out_dim``; ``meta`` — a JSON-serialisable dict with ``arch``, ``pooling``,
    ``whitening_dim``, ``out_dim``, ``mean``, ``std``, ``source``, ``layout`` (the checkpoint
    layout the weights were read from, ``None`` for a freshly built net) and ``learn_p``.
    """

    def __init__(self, arch: str = "resnet50", pooling: str = "gem",
                 whitening_dim: Optional[int] = None, *, p: float = 3.0, learn_p: bool = True,
                 mean: Optional[Sequence[float]] = IMAGENET_MEAN,
                 std: Optional[Sequence[float]] = IMAGENET_STD,
                 source: Optional[str] = None):
        super().__init__()
        pooling = pooling.lower()
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {sorted(_POOLINGS)}, got {pooling!r}")
        resnet = _resnet(arch)
        self.backbone = nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in _TRUNK))
        self.pool = GeM(p=p, learnable=learn_p) if pooling == "gem" else _POOLINGS[pooling]()
        feat_dim = ARCHS[arch]
        if whitening_dim is not None:
            whitening_dim = int(whitening_dim)
            if whitening_dim <= 0:
                raise ValueError(f"whitening_dim must be positive, got {whitening_dim}")
            self.whiten: Optional[nn.Linear] = nn.Linear(feat_dim, whitening_dim, bias=True)
            with torch.no_grad():
                nn.init.eye_(self.whiten.weight)
                self.whiten.bias.zero_()
        else:
            self.whiten = None
        self.feat_dim = feat_dim
        self.out_dim = whitening_dim if whitening_dim is not None else feat_dim
        mean, std = _check_norm(mean, std)
        self.meta: dict[str, Any] = {
            "arch": arch, "pooling": pooling, "whitening_dim": whitening_dim,
            "out_dim": self.out_dim, "mean": mean, "std": std, "source": source,
            "layout": None, "learn_p": bool(learn_p) if pooling == "gem" else None,
        }

    # -- forward ---------------------------------------------------------------------------

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, C, h, w) trunk activations."""
        return self.backbone(x)

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) activations → (B, out_dim) descriptors, in float32 outside autocast."""
        with torch.autocast(fmap.device.type, enabled=False):
            v = F.normalize(self.pool(fmap.float()), dim=-1)
            if self.whiten is not None:
                v = F.normalize(self.whiten(v), dim=-1)
        return v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (3, H, W) or (B, 3, H, W) → the input the weights expect.

        ``(x − mean) / std`` per channel with ``meta['mean']``/``meta['std']``; unchanged when
        they are ``None`` (weights trained on raw [0, 1] input).
        """
        if self.meta["mean"] is None:
            return images
        shape = (-1, 1, 1)
        mean = torch.tensor(self.meta["mean"], dtype=images.dtype, device=images.device)
        std = torch.tensor(self.meta["std"], dtype=images.dtype, device=images.device)
        return (images - mean.view(shape)) / std.view(shape)

    # -- training helpers ------------------------------------------------------------------

    @property
    def gem_p(self) -> Optional[float]:
        """GeM's current exponent (``None`` for MAC/SPoC)."""
        return float(self.pool.p.item()) if isinstance(self.pool, GeM) else None

    def parameter_groups(self, lr: float, weight_decay: float = 0.0,
                         p_lr_factor: float = 10.0) -> list[dict]:
        """Optimizer groups: everything trainable at ``lr``/``weight_decay``; GeM's p at
        ``p_lr_factor × lr`` without weight decay (docs/models.md). Frozen parameters are left out.
        """
        p_params = [prm for prm in self.pool.parameters() if prm.requires_grad]
        p_ids = {id(prm) for prm in p_params}
        rest = [prm for prm in self.parameters() if prm.requires_grad and id(prm) not in p_ids]
        groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
        if p_params:
            groups.append({"params": p_params, "lr": lr * p_lr_factor, "weight_decay": 0.0})
        return groups

    def set_whitening(self, mean: torch.Tensor, projection: torch.Tensor) -> None:
        """Load a learned whitening ``x ↦ P[:dim](x − m)`` into the whitening layer.

        ``mean``: (feat_dim,); ``projection``: (≥ whitening_dim, feat_dim) — e.g. the result of
        :func:`fastap.whitening.learn_whitening`. Sets ``W = P[:dim]`` and ``b = −P[:dim] m``.
        """
        if self.whiten is None:
            raise ValueError("this net has no whitening layer (build it with whitening_dim=...)")
        dim = self.whiten.out_features
        if projection.shape[0] < dim or projection.shape[1] != self.feat_dim:
            raise ValueError(f"projection must be (>= {dim}, {self.feat_dim}), "
                             f"got {tuple(projection.shape)}")
        if mean.shape != (self.feat_dim,):
            raise ValueError(f"mean must be ({self.feat_dim},), got {tuple(mean.shape)}")
        w = projection[:dim].to(self.whiten.weight)
        with torch.no_grad():
            self.whiten.weight.copy_(w)
            self.whiten.bias.copy_(-(w @ mean.to(w)))

    def extra_repr(self) -> str:
        return f"arch={self.meta['arch']}, out_dim={self.out_dim}, source={self.meta['source']}"


# ----------------------------------------------------------------------------------------------
# Checkpoint layouts
# ----------------------------------------------------------------------------------------------
#
# Each layout is a (name, preprocessing) pair and a function that turns the loaded object into a
# torchvision-named trunk state dict with the head already dropped.

_LAYOUT_NORM = {
    "moco": "imagenet", "mocov3": "imagenet", "dino": "imagenet", "dino-full": "imagenet",
    "byol": "imagenet", "torchvision": "imagenet", "simclr": "none",
}


#: Keys that ImageNet training scripts (pytorch/examples, MoCo's main_lincls) save next to
#: 'state_dict' and the SimCLR conversion does not.
_TRAINING_STATE_KEYS = {"epoch", "optimizer", "best_acc1", "scheduler", "lr_scheduler"}


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    """The string-keyed tensor entries of a mapping ({} for anything else)."""
    if not isinstance(obj, Mapping):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _has_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with the prefix removed; everything else is dropped."""
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def _drop_fc(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not (k == "fc" or k.startswith("fc."))}


def _torchvision_named(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return "conv1.weight" in keys and _has_prefix(keys, "layer1.")


def _describe_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def detect_layout(obj: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """Identify a loaded checkpoint's layout and return ``(layout, trunk_state_dict)``.

    The trunk state dict has torchvision ResNet names, the prefix stripped and the head
    (``fc.*``, projector, predictor, DINO head, momentum encoder, queue) dropped. Layouts:

    - ``moco``: ``{'state_dict': {'module.encoder_q.*', 'module.encoder_k.*', 'module.queue',
      …}}`` (MoCo v1/v2; ``module.`` optional).
    - ``mocov3``: ``{'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*',
      'module.predictor.*'}}`` or the inner dict alone (``module.`` optional).
    - ``dino-full``: ``{'teacher': {'module.backbone.*', 'module.head.*'}, 'student': …}``.
    - ``simclr``: ``{'state_dict': <torchvision names>}`` without training state (the SimCLR
      v1 conversion) — raw [0, 1] input, no mean/std.
    - ``dino``: a bare torchvision-named dict without ``fc.*`` (the DINO backbone release).
    - ``byol``: a bare torchvision-named dict with ``fc.*`` and no ``num_batches_tracked``.
    - ``torchvision``: a bare torchvision-named dict with ``fc.*`` and ``num_batches_tracked``,
      or an ImageNet training script's ``{'state_dict': <torchvision names, 'module.'
      optional>, 'epoch', 'arch', 'optimizer', …}`` (pytorch/examples, MoCo's ``main_lincls``).

    All but ``simclr`` expect ImageNet mean/std normalisation. A bare dict whose keys all start
    with ``module.`` (saved from DataParallel) is unwrapped first.

    Raises ``ValueError`` listing the top-level keys when no layout matches.
    """
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        raise ValueError("fastap checkpoints are restored whole; use from_pretrained/"
                         "load_checkpoint")
    if not isinstance(obj, Mapping):
        raise ValueError(f"cannot detect the checkpoint layout of a {type(obj).__name__} "
                         "(expected a dict)")

    if isinstance(obj.get("teacher"), Mapping):
        sd = _tensors(obj["teacher"])
        if sd and all(k.startswith("module.") for k in sd):
            sd = _strip(sd, "module.")
        if _has_prefix(sd, "backbone."):
            sd = _strip(sd, "backbone.")  # drops head.* as well
        if _torchvision_named(sd):
            return "dino-full", _drop_fc(sd)

    inner = obj.get("state_dict") if isinstance(obj.get("state_dict"), Mapping) else None
    for candidate, wrapped in ((_tensors(inner), True), (_tensors(obj), False)):
        if not candidate:
            continue
        keys = list(candidate)
        for prefix in ("module.encoder_q.", "encoder_q."):
            if _has_prefix(keys, prefix):
                return "moco", _drop_fc(_strip(candidate, prefix))
        for prefix in ("module.base_encoder.", "base_encoder."):
            if _has_prefix(keys, prefix):
                return "mocov3", _drop_fc(_strip(candidate, prefix))
        sd = dict(candidate)
        data_parallel = all(k.startswith("module.") for k in sd)
        if data_parallel:
            sd = _strip(sd, "module.")
        if _torchvision_named(sd):
            if wrapped:
                # The SimCLR conversion (and fastap's raw-input export) saves the state dict
                # without training state; training state or DataParallel names come from an
                # ImageNet-normalised training script, whose trunk would be fed the wrong input
                # if read as SimCLR's raw [0, 1].
                script = data_parallel or bool(_TRAINING_STATE_KEYS & set(obj))
                return ("torchvision" if script else "simclr"), _drop_fc(sd)
            if not _has_prefix(sd, "fc."):
                return "dino", sd
            if any(k.endswith("num_batches_tracked") for k in sd):
                return "torchvision", _drop_fc(sd)
            return "byol", _drop_fc(sd)

    top = list(obj.keys()) if isinstance(obj, Mapping) else []
    hint = ""
    if inner is not None:
        hint = f"; keys under 'state_dict': {_describe_keys(map(str, inner))}"
    raise ValueError("cannot detect the checkpoint layout: top-level keys "
                     f"{_describe_keys(map(str, top))}{hint}. Known layouts: MoCo v1/v2, MoCo v3, "
                     "DINO (backbone or full), SimCLR/BYOL conversions, torchvision, fastap")


def _guess_arch(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The torchvision ResNet whose block counts match ``sd`` (used in error messages)."""
    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(len(idx))
    bottleneck = "layer1.0.conv3.weight" in sd
    table = {("resnet18", False): [2, 2, 2, 2], ("resnet34", False): [3, 4, 6, 3],
             ("resnet50", True): [3, 4, 6, 3], ("resnet101", True): [3, 4, 23, 3],
             ("resnet152", True): [3, 8, 36, 3],
             **{(name, False): list(spec["blocks"]) for name, spec in SMALL_ARCHS.items()}}
    for (name, bn), counts in table.items():
        if bn == bottleneck and counts == blocks:
            return name
    return None


def _load_trunk(net: RetrievalNet, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Load a torchvision-named trunk dict into ``net.backbone`` (strict=False, checked).

    Missing keys may only be ``fc.weight``/``fc.bias`` (already dropped here) and BatchNorm's
    ``num_batches_tracked`` counters (absent from BYOL conversions; they do not affect the
    forward pass). Anything unexpected, anything else missing or any shape mismatch raises a
    ``ValueError`` that lists the keys.
    """
    arch = net.meta["arch"]
    # A dict without _metadata loads as "version 1", so BatchNorm fills a missing counter.
    sd = {k: v for k, v in sd.items()}
    expected = net.backbone.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        guess = _guess_arch(sd)
        parts = [f"{what} does not fit a torchvision {arch} trunk"]
        if guess is not None and guess != arch:
            parts.append(f"(it looks like {guess}: pass arch={guess!r})")
        if missing:
            parts.append(f"missing keys: {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe_keys(unexpected)}")
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes[:6])
                         + (f"; … ({len(shapes)} in all)" if len(shapes) > 6 else ""))
        raise ValueError("; ".join(parts))
    result = net.backbone.load_state_dict(sd, strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    assert not leftover and not result.unexpected_keys, (leftover, result.unexpected_keys)


def read_checkpoint(path: Path, weights_only: bool) -> Any:
    """The object a checkpoint file holds (``torch.load``), with errors that name the file and
    say what is wrong with it (missing, a folder, damaged, not a checkpoint)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    try:
        # DINO's full checkpoints carry their argparse.Namespace; it only holds plain values.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return load_torch_file(path, map_location="cpu", weights_only=weights_only)
    except DamagedFileError as err:
        raise ValueError(f"{err}; copy or download it again from its source") from err
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, …
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if weights_only and "weights_only" in str(err):
            raise ValueError(
                f"{path}: the checkpoint holds objects that are not plain tensors/containers "
                f"({msg}). Load it with weights_only=False only if you trust its origin."
            ) from err
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or another "
                         f"kind of file?): {type(err).__name__}: {msg}") from err


def _from_fastap(obj: Mapping, source: str, net_options: Mapping[str, Any]) -> RetrievalNet:
    meta = dict(obj.get("meta") or {})
    version = obj.get("version", CHECKPOINT_VERSION)
    if version > CHECKPOINT_VERSION:
        raise ValueError(f"{source}: fastap checkpoint version {version} is newer than this "
                         f"fastap reads ({CHECKPOINT_VERSION})")
    for key in ("arch", "pooling"):
        if key not in meta:
            raise ValueError(f"{source}: fastap checkpoint without meta[{key!r}]")
    stored = {"pooling": meta["pooling"], "whitening_dim": meta.get("whitening_dim")}
    for key, value in net_options.items():
        if key not in stored:
            raise ValueError(f"{source}: option {key!r} does not apply to a fastap checkpoint, "
                             "which restores the whole net")
        if value != stored[key]:
            raise ValueError(f"{source}: {key}={value!r} disagrees with the checkpoint's "
                             f"{stored[key]!r}; a fastap checkpoint restores the whole net")
    learn_p = meta.get("learn_p")
    net = RetrievalNet(meta["arch"], meta["pooling"], meta.get("whitening_dim"),
                       learn_p=True if learn_p is None else bool(learn_p),
                       mean=meta.get("mean"), std=meta.get("std"), source=meta.get("source"))
    try:
        result = net.load_state_dict(obj["state_dict"], strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{source}: fastap checkpoint does not match its own meta: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{source}: fastap checkpoint does not match its own meta; missing "
                         f"keys: {_describe_keys(result.missing_keys)}; unexpected keys: "
                         f"{_describe_keys(result.unexpected_keys)}")
    net.meta.update({k: v for k, v in meta.items() if k not in ("out_dim",)})
    net.meta["out_dim"] = net.out_dim
    return net


def _hub_checkpoints() -> str:
    """Where torch.hub keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _from_torchvision(spec: str, arch: str, net_options: Mapping[str, Any]) -> RetrievalNet:
    from torchvision.models import get_model_weights, get_weight

    name = spec.split(":", 1)[1]
    try:
        if "." in name:
            weights = get_weight(name)
        else:
            enum = get_model_weights(arch)
            weights = enum.DEFAULT if name.upper() == "DEFAULT" else enum[name]
    except (KeyError, ValueError) as err:
        raise ValueError(f"unknown torchvision weights {name!r} for {arch}: {err}") from err
    # A dotted name fixes the architecture; it must agree with the one requested.
    weights_arch = type(weights).__name__.replace("_Weights", "").lower()
    if weights_arch != arch:
        raise ValueError(f"torchvision weights {weights} are for {weights_arch}, not {arch}")
    transform = weights.transforms()
    mean = list(getattr(transform, "mean", IMAGENET_MEAN))
    std = list(getattr(transform, "std", IMAGENET_STD))
    net = RetrievalNet(arch, mean=mean, std=std, source=f"torchvision:{weights}", **net_options)
    cached = os.path.join(_hub_checkpoints(), os.path.basename(urlparse(weights.url).path))
    try:
        sd = weights.get_state_dict(progress=True, check_hash=True)
    except urllib.error.URLError as err:  # offline, proxy, DNS, HTTP errors
        raise OSError(f"downloading torchvision weights {weights} from {weights.url} failed "
                      f"({err.reason}); offline, put that file at {cached}") from err
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        if os.path.exists(cached):  # a cut-short or foreign file (a proxy's HTML page, say)
            raise ValueError(f"{cached} cannot be read as torchvision weights {weights} "
                             f"({err}); delete it to download it again") from err
        # torch.hub's hash check of a fresh download; it removes the file itself.
        raise ValueError(f"downloading torchvision weights {weights} from {weights.url}: "
                         f"{err}; rerun to download it again") from err
    _load_trunk(net, _drop_fc(sd), f"torchvision weights {weights}")
    net.meta["layout"] = "torchvision"
    return net


def from_pretrained(source: PathLike, arch: str = "resnet50", *, weights_only: bool = True,
                    **net_options: Any) -> RetrievalNet:
    """Build a :class:`RetrievalNet` from pretrained weights.

    Args:
        source: a checkpoint file in any layout of :func:`detect_layout`, a fastap checkpoint
            (:func:`save_checkpoint`), or ``"torchvision:<weights>"`` — e.g.
            ``"torchvision:IMAGENET1K_V1"``, ``"torchvision:DEFAULT"`` or the dotted
            ``"torchvision:ResNet50_Weights.IMAGENET1K_V2"`` (downloaded through torch.hub's cache).
        arch: the trunk of a foreign checkpoint. A fastap checkpoint restores its own arch,
            pooling, GeM p, whitening and preprocessing; ``arch`` is then ignored.
        weights_only: passed to ``torch.load``; only set it to False for a trusted file.
        **net_options: :class:`RetrievalNet` options (``pooling``, ``whitening_dim``, ``p``,
            ``learn_p``). Input normalisation is not one of them: it comes from the layout
            (ImageNet mean/std, or none for SimCLR) and is stored in ``net.meta``.

    The head is dropped, the trunk is loaded with ``strict=False`` and checked: a ``ValueError``
    lists the keys unless only ``fc.*`` (and BatchNorm counters) are missing and nothing is
    unexpected. Unreadable files and undetectable layouts raise ``ValueError`` naming the file.
    """
    for key in ("mean", "std"):
        if key in net_options:
            raise ValueError(f"{key} is not an option of from_pretrained: preprocessing comes "
                             "from the checkpoint's layout (set net.meta afterwards to override)")
    if isinstance(source, str) and source.startswith("torchvision:"):
        return _from_torchvision(source, arch, net_options)

    path = Path(source)
    obj = read_checkpoint(path, weights_only)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return _from_fastap(obj, str(path), net_options)
    try:
        layout, sd = detect_layout(obj)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    norm = _LAYOUT_NORM[layout]
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if norm == "imagenet" else (None, None)
    net = RetrievalNet(arch, mean=mean, std=std, source=str(path), **net_options)
    _load_trunk(net, sd, f"{path} ({layout} layout)")
    net.meta["layout"] = layout
    return net


# ----------------------------------------------------------------------------------------------
# fastap checkpoints
# ----------------------------------------------------------------------------------------------


def save_checkpoint(net: RetrievalNet, path: PathLike, **extra: Any) -> Path:
    """Write ``{'format': 'fastap', 'version': 1, 'meta', 'state_dict', **extra}`` atomically.

    The state dict is copied to the CPU. The file is written to a temporary file in the same
    folder, flushed to disk and moved into place with ``os.replace``, so a reader sees the old
    file or the complete new one, never a partial one; on failure the temporary file is removed.
    ``extra`` holds anything else worth keeping (epoch, optimizer state, metrics); its keys may
    not be ``format``, ``version``, ``meta`` or ``state_dict``. Returns the path.
    """
    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise ValueError(f"save_checkpoint: extra keys {clash} are reserved")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "meta": dict(net.meta),
               "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
               **extra}
    atomic_torch_save(path, payload)
    return path


def load_checkpoint(path: PathLike, *, weights_only: bool = True
                    ) -> tuple[RetrievalNet, dict[str, Any]]:
    """Restore a fastap checkpoint: ``(net, extra)`` where ``extra`` holds the keys given to
    :func:`save_checkpoint` beyond the net (epoch, optimizer state, …)."""
    path = Path(path)
    obj = read_checkpoint(path, weights_only)
    if not (isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT):
        raise ValueError(f"{path} is not a fastap checkpoint (use from_pretrained for "
                         "foreign layouts)")
    net = _from_fastap(obj, str(path), {})
    return net, {k: v for k, v in obj.items() if k not in _RESERVED}
