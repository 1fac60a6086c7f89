"""Model specs: the strings ``fastap eval --model`` accepts, parsed and loaded into a net.

- ``PATH`` — a checkpoint file; the layout is detected by :func:`fastap.models.from_pretrained`.
- ``torchvision:<arch>[:<weights>]`` — torchvision ImageNet weights; ``torchvision:resnet50`` is
  ``IMAGENET1K_V1``. ``torchvision:<weights>`` alone takes the arch from ``arch=``.
- ``<layout>:PATH`` with layout ``moco``, ``mocov3``, ``dino``, ``simclr``, ``byol``,
  ``torchvision`` or ``fastap`` — insists on that layout. Files of plain torchvision names are
  ambiguous (a SimCLR conversion saved as a bare dict looks like a DINO or BYOL one); the forced
  layout then decides the input preprocessing (SimCLR: raw [0, 1], the others: ImageNet mean/std).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..models import (ARCHS, CHECKPOINT_FORMAT, IMAGENET_MEAN, IMAGENET_STD, RetrievalNet,
                      detect_layout, from_pretrained, read_checkpoint)

__all__ = ["DEFAULT_TORCHVISION_WEIGHTS", "FORCED_LAYOUTS", "ModelSpec", "load_model",
           "parse_model_spec"]

#: Layouts a ``<layout>:PATH`` model spec may force.
FORCED_LAYOUTS = ("moco", "mocov3", "dino", "simclr", "byol", "torchvision", "fastap")
#: torchvision weights used by ``torchvision:<arch>`` (the supervised ImageNet baseline).
DEFAULT_TORCHVISION_WEIGHTS = "IMAGENET1K_V1"

# Checkpoints whose trunk carries plain torchvision names; which of these a file "is" cannot be
# told from its keys alone, so a forced layout among them only changes the preprocessing.
_PLAIN_LAYOUTS = {"dino", "simclr", "byol", "torchvision"}
_RAW_INPUT_LAYOUTS = {"simclr"}
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin", ".pkl", ".pth.tar")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``kind`` is ``"file"`` or ``"torchvision"``.

    ``file``: ``path`` and ``layout`` (``None`` = detect). ``torchvision``: ``arch`` (``None`` =
    the caller's) and ``weights`` (a torchvision weights name, possibly dotted).
    """

    text: str
    kind: str
    path: Optional[Path] = None
    layout: Optional[str] = None
    arch: Optional[str] = None
    weights: Optional[str] = None

    @property
    def slug(self) -> str:
        """A short file-name-safe name (used for the features cache)."""
        if self.kind == "torchvision":
            raw = f"torchvision-{self.arch or 'arch'}-{self.weights}"
        else:
            name = self.path.name if self.path is not None else "model"
            for suffix in _CHECKPOINT_SUFFIXES:
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
                    break
            raw = f"{self.layout}-{name}" if self.layout else name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-")[:80] or "model"


def _spec_error(text: str, why: str) -> ValueError:
    return ValueError(
        f"unknown model spec {text!r}: {why}. Expected a checkpoint file, "
        f"torchvision:<arch>[:<weights>] (e.g. torchvision:resnet50) or <layout>:PATH with "
        f"layout one of {', '.join(FORCED_LAYOUTS)}")


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``PATH``, ``torchvision:<arch>[:<weights>]``, ``torchvision:<weights>`` or
    ``<layout>:PATH`` (see this module's docstring).

    An existing file always wins over the prefix syntax. A spec that looks like a file name
    (a folder separator or a checkpoint suffix) but does not exist raises ``FileNotFoundError``;
    anything else unrecognised raises ``ValueError`` listing the grammar.
    """
    text = str(text).strip()
    if not text:
        raise _spec_error(text, "it is empty")
    path = Path(text).expanduser()
    if path.is_file():
        return ModelSpec(text, "file", path=path)
    prefix, sep, rest = text.partition(":")
    prefix_l = prefix.lower()
    if sep and prefix_l == "torchvision":
        if rest and Path(rest).expanduser().is_file():
            return ModelSpec(text, "file", path=Path(rest).expanduser(), layout="torchvision")
        parts = rest.split(":") if rest else []
        if not parts or not all(parts) or len(parts) > 2:
            raise _spec_error(text, "torchvision specs are torchvision:<arch>[:<weights>]")
        if parts[0].lower() in ARCHS:
            arch = parts[0].lower()
            weights = parts[1] if len(parts) == 2 else DEFAULT_TORCHVISION_WEIGHTS
            return ModelSpec(text, "torchvision", arch=arch, weights=weights)
        if len(parts) == 2:
            raise _spec_error(text, f"{parts[0]!r} is not a supported arch "
                                    f"({', '.join(ARCHS)})")
        weights = parts[0]
        m = re.fullmatch(r"(?i)(resnet\d+)_weights\..+", weights)
        if m:  # a dotted torchvision name fixes the arch
            return ModelSpec(text, "torchvision", arch=m.group(1).lower(), weights=weights)
        if re.fullmatch(r"[A-Za-z0-9_]+", weights) and (weights.isupper() or "_" in weights
                                                        or weights.upper() == "DEFAULT"):
            return ModelSpec(text, "torchvision", arch=None, weights=weights)
        raise _spec_error(text, f"{weights!r} is neither a supported arch "
                                f"({', '.join(ARCHS)}) nor a torchvision weights name")
    if sep and prefix_l in FORCED_LAYOUTS and len(prefix) > 1:
        if not rest:
            raise _spec_error(text, f"no checkpoint path after {prefix}:")
        target = Path(rest).expanduser()
        if not target.exists():
            raise FileNotFoundError(f"checkpoint not found: {target} (model spec {text!r})")
        if target.is_dir():
            raise ValueError(f"{target} is a folder, not a checkpoint file (model spec {text!r})")
        return ModelSpec(text, "file", path=target, layout=prefix_l)
    looks_like_path = (os.sep in text or "/" in text or text.startswith(".")
                       or text.lower().endswith(_CHECKPOINT_SUFFIXES))
    if sep and not looks_like_path:
        raise _spec_error(text, f"{prefix!r} is not a known prefix")
    if looks_like_path:
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not a checkpoint file (model spec {text!r})")
        raise FileNotFoundError(f"checkpoint not found: {path} (model spec {text!r})")
    raise _spec_error(text, "no such file and no known prefix")


def _peek_layout(path: Path) -> str:
    """The layout of a checkpoint file as ``from_pretrained`` would see it (``fastap`` included)."""
    obj = read_checkpoint(path, True)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return "fastap"
    try:
        return detect_layout(obj)[0]
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def load_model(spec: Union[str, ModelSpec, RetrievalNet], arch: str = "resnet50",
               pooling: Optional[str] = None) -> RetrievalNet:
    """A :class:`~fastap.models.RetrievalNet` from a model spec (or the net itself).

    Args:
        spec: see :func:`parse_model_spec`.
        arch: the trunk of a foreign checkpoint or of ``torchvision:<weights>``; a fastap
            checkpoint restores its own.
        pooling: ``gem``/``mac``/``spoc``. ``None``: GeM for foreign weights, the stored pooling
            for a fastap checkpoint (which refuses a different one).

    A forced ``<layout>:`` must agree with the file: prefix layouts (MoCo, MoCo v3, DINO full,
    fastap) are recognised from their keys and must match; among the plain-torchvision-named
    layouts (DINO backbone, SimCLR, BYOL, torchvision) the forced one sets ``meta['layout']`` and
    the preprocessing (SimCLR: none; the others: ImageNet mean/std).
    """
    if isinstance(spec, RetrievalNet):
        return spec
    if not isinstance(spec, ModelSpec):
        spec = parse_model_spec(spec)
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    options: dict[str, Any] = {}
    if pooling is not None:
        options["pooling"] = pooling.lower()

    if spec.kind == "torchvision":
        return from_pretrained(f"torchvision:{spec.weights}", arch=spec.arch or arch, **options)

    assert spec.path is not None
    forced = spec.layout
    if forced is not None:
        found = _peek_layout(spec.path)
        ok = (found == forced or (forced == "dino" and found == "dino-full")
              or (forced in _PLAIN_LAYOUTS and found in _PLAIN_LAYOUTS))
        if not ok:
            hint = ("; drop the prefix" if found == "fastap" else
                    f"; use {found.replace('-full', '')}:{spec.path} or the bare path")
            raise ValueError(f"{spec.path} is a {found} checkpoint, not {forced}{hint}")
        net = from_pretrained(spec.path, arch=arch, **options)
        if found in _PLAIN_LAYOUTS and forced != found:
            net.meta["layout"] = forced
            if forced in _RAW_INPUT_LAYOUTS:
                net.meta["mean"], net.meta["std"] = None, None
            else:
                net.meta["mean"], net.meta["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
        return net

    # No pooling option unless asked: a fastap checkpoint restores its own (and refuses a
    # different one); foreign weights get RetrievalNet's default, GeM.
    return from_pretrained(spec.path, arch=arch, **options)
