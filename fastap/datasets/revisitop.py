"""Revisited Oxford/Paris and the revisitop1m distractors, in the official revisitop layout.

::

    <root>/<dataset>/gnd_<dataset>.pkl      ground truth (imlist, qimlist, gnd)
    <root>/<dataset>/jpg/<name>.jpg         database and query images
    <root>/revisitop1m/revisitop1m.txt      distractor names, one per line
    <root>/revisitop1m/jpg/<name>           distractor images (".jpg" added to names without one)

Query images follow the revisitop protocol (docs/evaluation.md): crop by ``bbx`` at full resolution,
then scale the crop by the factor its full image would get (longest side capped at
``max_size``), so that a query is seen at the same scale as the database images.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

__all__ = [
    "DISTRACTORS",
    "REVISITED",
    "DatabaseImages",
    "ImageList",
    "QueryImages",
    "Revisitop1M",
    "RevisitedDataset",
    "crop_and_scale",
    "image_to_tensor",
    "load_gnd",
    "load_image",
    "scale_factor",
    "scaled_size",
]

PathLike = Union[str, os.PathLike]

#: The Revisited benchmarks (names of their folders and ground-truth files).
REVISITED = ("roxford5k", "rparis6k")
#: The 1M distractor set.
DISTRACTORS = "revisitop1m"


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------


class _GndUnpickler(pickle.Unpickler):
    """Loads plain containers and numpy arrays only: a pickle must not be able to run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"ground-truth pickles may not reference {module}.{name}")


def load_gnd(path: PathLike) -> dict:
    """Read a revisitop ground-truth pickle: ``{'imlist', 'qimlist', 'gnd'}``.

    ``gnd[i]`` has ``bbx`` (x1, y1, x2, y2 in full-resolution pixels) and ``easy``/``hard``/
    ``junk`` index lists into ``imlist``. Only plain Python objects and numpy arrays are
    unpickled. Raises ``FileNotFoundError`` or ``ValueError`` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            cfg = _GndUnpickler(f).load()
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a revisitop ground-truth pickle ({err})") from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        keys = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{path} is not a revisitop ground-truth pickle: expected a dict with "
                         f"'imlist', 'qimlist', 'gnd', got {keys}")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"{path}: {len(cfg['gnd'])} ground-truth entries for "
                         f"{len(cfg['qimlist'])} queries")
    return cfg


class RevisitedDataset:
    """A Revisited Oxford/Paris benchmark on disk (``roxford5k`` or ``rparis6k``).

    Attributes: ``imlist`` (database names), ``qimlist`` (query names), ``gnd`` (per-query dicts
    with ``bbx``, ``easy``, ``hard``, ``junk``), ``dir``, ``image_dir``, ``gnd_file``.
    Any ``name`` with the same layout works (e.g. a re-annotated copy).
    """

    def __init__(self, root: PathLike, name: str):
        self.root = Path(root).expanduser()
        self.name = name
        self.dir = self.root / name
        self.image_dir = self.dir / "jpg"
        self.gnd_file = self.dir / f"gnd_{name}.pkl"
        if not self.gnd_file.exists():
            raise FileNotFoundError(
                f"{self.gnd_file} not found: download the dataset with "
                f"`fastap download {name} --root {self.root}`")
        cfg = load_gnd(self.gnd_file)
        self.imlist: list[str] = [str(n) for n in cfg["imlist"]]
        self.qimlist: list[str] = [str(n) for n in cfg["qimlist"]]
        self.gnd: list[dict] = list(cfg["gnd"])

    @property
    def num_database(self) -> int:
        return len(self.imlist)

    @property
    def num_queries(self) -> int:
        return len(self.qimlist)

    def image_path(self, name: str) -> Path:
        """``<root>/<dataset>/jpg/<name>.jpg``."""
        return self.image_dir / f"{name}.jpg"

    def database_paths(self) -> list[Path]:
        """Paths of the database images, in ``imlist`` order."""
        return [self.image_path(n) for n in self.imlist]

    def query_paths(self) -> list[Path]:
        """Paths of the (uncropped) query images, in ``qimlist`` order."""
        return [self.image_path(n) for n in self.qimlist]

    def query_bbox(self, i: int) -> tuple[float, float, float, float]:
        """Query ``i``'s box (x1, y1, x2, y2) in full-resolution pixels."""
        box = [float(v) for v in np.asarray(self.gnd[i]["bbx"]).reshape(-1)]
        if len(box) != 4:
            raise ValueError(f"{self.gnd_file}: query {i} has a bbx of {len(box)} values")
        return tuple(box)  # type: ignore[return-value]

    def missing_images(self) -> list[Path]:
        """Database and query images that are not on disk."""
        return [p for p in self.database_paths() + self.query_paths() if not p.exists()]

    def database(self, max_size: Optional[int] = 1024,
                 transform: Optional[Callable] = None) -> "DatabaseImages":
        return DatabaseImages(self, max_size=max_size, transform=transform)

    def queries(self, max_size: Optional[int] = 1024,
                transform: Optional[Callable] = None) -> "QueryImages":
        return QueryImages(self, max_size=max_size, transform=transform)

    def __repr__(self) -> str:
        return (f"RevisitedDataset({self.name!r}, root={str(self.root)!r}, "
                f"database={self.num_database}, queries={self.num_queries})")


class Revisitop1M:
    """The revisitop1m distractors: ``<root>/revisitop1m/revisitop1m.txt`` + ``jpg/``.

    Names in the list are used as paths under ``jpg/``; ``.jpg`` is appended to a name without
    an extension (as the official configdataset does).
    """

    def __init__(self, root: PathLike, list_file: Optional[PathLike] = None):
        self.root = Path(root).expanduser()
        self.name = DISTRACTORS
        self.dir = self.root / DISTRACTORS
        self.image_dir = self.dir / "jpg"
        self.list_file = Path(list_file) if list_file is not None else self.dir / "revisitop1m.txt"
        if not self.list_file.exists():
            raise FileNotFoundError(
                f"{self.list_file} not found: download the distractors with "
                f"`fastap download revisitop1m --root {self.root}`")
        with open(self.list_file) as f:
            self.imlist: list[str] = [line.strip() for line in f if line.strip()]

    def __len__(self) -> int:
        return len(self.imlist)

    def image_path(self, name: str) -> Path:
        return self.image_dir / (name if os.path.splitext(name)[1] else name + ".jpg")

    def database_paths(self) -> list[Path]:
        """Paths of the distractor images, in list order."""
        return [self.image_path(n) for n in self.imlist]

    def missing_images(self) -> list[Path]:
        return [p for p in self.database_paths() if not p.exists()]

    def database(self, max_size: Optional[int] = 1024,
                 transform: Optional[Callable] = None) -> "DatabaseImages":
        return DatabaseImages(self, max_size=max_size, transform=transform)

    def __repr__(self) -> str:
        return f"Revisitop1M(root={str(self.root)!r}, images={len(self)})"


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def load_image(path: PathLike) -> Image.Image:
    """Open an image as RGB.

    Like the official loader it tolerates truncated JPEG data (a few upstream files are cut
    short), but only for the file that needs it; any other failure names the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            try:
                return image.convert("RGB")
            except OSError as err:
                if "truncated" not in str(err):
                    raise
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            with open(path, "rb") as f:
                return Image.open(f).convert("RGB")
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def scale_factor(image_size: Sequence[int], max_size: Optional[int]) -> float:
    """Factor that caps the longest side of a ``(width, height)`` image at ``max_size``.

    Images are never enlarged (factor ≤ 1); ``max_size=None`` keeps full resolution.
    """
    if max_size is None:
        return 1.0
    if max_size <= 0:
        raise ValueError(f"max_size must be positive or None, got {max_size}")
    return min(1.0, max_size / max(image_size))


def _round(x: float) -> int:
    return max(1, int(math.floor(x + 0.5)))


def _crop_box(bbox: Sequence[float]) -> tuple[int, int, int, int]:
    # PIL's own rounding of a float box (Image.crop), which the official loader relies on.
    x1, y1, x2, y2 = (int(round(float(v))) for v in bbox)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty bounding box {tuple(bbox)}")
    return x1, y1, x2, y2


def scaled_size(image_size: Sequence[int], bbox: Optional[Sequence[float]] = None,
                max_size: Optional[int] = 1024) -> tuple[int, int]:
    """``(width, height)`` that :func:`crop_and_scale` produces, without touching pixels.

    The crop ``bbox`` is taken at full resolution and scaled by
    ``scale_factor(image_size, max_size)`` — the factor of the *full* image — each side rounded
    half up (at least 1 pixel).
    """
    s = scale_factor(image_size, max_size)
    if bbox is None:
        w, h = image_size
    else:
        x1, y1, x2, y2 = _crop_box(bbox)
        w, h = x2 - x1, y2 - y1
    if s == 1.0:
        return int(w), int(h)
    return _round(w * s), _round(h * s)


def crop_and_scale(image: Image.Image, bbox: Optional[Sequence[float]] = None,
                   max_size: Optional[int] = 1024,
                   resample: int = Image.Resampling.LANCZOS) -> Image.Image:
    """The revisitop query rule: crop ``bbox`` at full resolution, then scale like the full image.

    ``bbox`` = (x1, y1, x2, y2) in pixels of ``image`` (rounded as ``PIL.Image.crop`` does;
    parts outside the image come out black, as in the official code). The factor is
    :func:`scale_factor` of the full image's size, so a crop is never shrunk more than its
    image would be (a crop smaller than ``max_size`` still shrinks when its image is larger).
    Without ``bbox`` this is the database rule: longest side capped at ``max_size``. Pure: returns
    a new image.
    """
    size = scaled_size(image.size, bbox, max_size)
    if bbox is not None:
        image = image.crop(_crop_box(bbox))
    if image.size != size:
        image = image.resize(size, resample)
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 tensor (3, H, W) in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class ImageList(Dataset):
    """Images from ``paths`` as ``(tensor, index)``, optionally cropped by ``bboxes``.

    Each item is :func:`crop_and_scale` of the image (longest side of the full image capped at
    ``max_size``), converted to a float tensor (3, H, W) in [0, 1], then passed through
    ``transform`` (e.g. mean/std normalisation) if given. Images differ in size: use
    ``batch_size=1`` or a collate function that keeps a list.
    """

    def __init__(self, paths: Sequence[PathLike],
                 bboxes: Optional[Sequence[Optional[Sequence[float]]]] = None,
                 max_size: Optional[int] = 1024, transform: Optional[Callable] = None):
        self.paths = [Path(p) for p in paths]
        if bboxes is not None and len(bboxes) != len(self.paths):
            raise ValueError(f"{len(bboxes)} bounding boxes for {len(self.paths)} images")
        self.bboxes = None if bboxes is None else list(bboxes)
        scale_factor((1, 1), max_size)  # validate early
        self.max_size = max_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        bbox = None if self.bboxes is None else self.bboxes[index]
        image = crop_and_scale(load_image(self.paths[index]), bbox, self.max_size)
        tensor = image_to_tensor(image)
        if self.transform is not None:
            tensor = self.transform(tensor)
        return tensor, index

    def __repr__(self) -> str:
        cropped = ", cropped" if self.bboxes is not None else ""
        return f"{type(self).__name__}({len(self)} images, max_size={self.max_size}{cropped})"


class DatabaseImages(ImageList):
    """The database images of a :class:`RevisitedDataset` (or the :class:`Revisitop1M`
    distractors), whole, longest side capped at ``max_size``."""

    def __init__(self, dataset: Union[RevisitedDataset, Revisitop1M],
                 max_size: Optional[int] = 1024, transform: Optional[Callable] = None):
        super().__init__(dataset.database_paths(), None, max_size, transform)
        self.dataset = dataset


class QueryImages(ImageList):
    """The query images of a :class:`RevisitedDataset`, cropped by ``bbx`` at full resolution
    and scaled by their full image's factor (see :func:`crop_and_scale`)."""

    def __init__(self, dataset: RevisitedDataset, max_size: Optional[int] = 1024,
                 transform: Optional[Callable] = None):
        bboxes = [dataset.query_bbox(i) for i in range(dataset.num_queries)]
        super().__init__(dataset.query_paths(), bboxes, max_size, transform)
        self.dataset = dataset
