"""Training data: list files, augmentations and resumable, deterministic batch samplers.

Determinism without shared RNG state. Every sample a sampler yields is an ``(index, seed)``
pair, and the dataset draws that sample's augmentation from a private generator seeded with
``seed``. The seeds are a function of ``(run seed, epoch, position in the epoch)`` only, so a
batch looks the same whichever DataLoader worker builds it, and a run resumed at batch ``b`` of
epoch ``e`` sees exactly the batches the uninterrupted run saw — no worker RNG has to be saved.

List files (:func:`read_list_file`):

- text: one image per line, ``<path> <label>`` (split at the last whitespace, so paths may
  contain spaces); ``#`` comments and blank lines are skipped; the contrastive stage accepts
  lines without a label.
- CSV with a header: a path column (``path``, ``image``, ``filename``, ``file``,
  ``image_path``) or a Google-Landmarks ``id`` column (the image is
  ``<root>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``, the GLDv2 layout), and a label column (``label``,
  ``class``, ``class_id``, ``landmark_id``, ``instance``, ``cluster``). GLDv2's
  ``train_clean.csv`` (``landmark_id,images`` with space-separated ids) is expanded.

Labels may be any strings; they are mapped to 0..C-1 in order of first appearance.
:func:`sfm120k_list` converts cirtorch's ``retrieval-SfM-120k.pkl`` (images named by ``cids``,
instance = the 3D model in ``cluster``) into such a list.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

from ..datasets import load_image
from .config import ConfigError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassBalancedBatchSampler",
    "ImageListData",
    "LabelledImages",
    "RandomBatchSampler",
    "TwoViewImages",
    "build_transform",
    "read_list_file",
    "sample_seed",
    "seeded_rng",
    "sfm120k_list",
    "shuffled_batches",
]

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
_PATH_COLUMNS = ("path", "image", "filename", "file", "image_path")
_LABEL_COLUMNS = ("label", "class", "class_id", "landmark_id", "instance", "cluster")


# ----------------------------------------------------------------------------------------------
# List files
# ----------------------------------------------------------------------------------------------


class ImageListData:
    """Parsed list file: ``paths`` (absolute), ``labels`` (0..C-1 ints or None), ``classes``
    (the original label of each class id) and ``source`` (the list file, for messages)."""

    def __init__(self, paths: list[Path], labels: Optional[list[int]], classes: list[str],
                 source: str):
        self.paths, self.labels, self.classes, self.source = paths, labels, classes, source

    def __len__(self) -> int:
        return len(self.paths)


def _gldv2_path(image_id: str) -> str:
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _read_csv(path: Path) -> tuple[list[str], list[Optional[str]], list[int]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        reader.fieldnames = fields
        label_col = next((c for c in _LABEL_COLUMNS if c in fields), None)
        path_col = next((c for c in _PATH_COLUMNS if c in fields), None)
        paths, labels, lines = [], [], []
        if path_col is None and "images" in fields and label_col:  # GLDv2 train_clean.csv
            for n, row in enumerate(reader, start=2):
                for image_id in (row["images"] or "").split():
                    paths.append(_gldv2_path(image_id))
                    labels.append(row[label_col])
                    lines.append(n)
            return paths, labels, lines
        if path_col is None and "id" not in fields:
            raise ConfigError(f"data.train_list: {path}: CSV header {fields} has no image column "
                              f"(one of {', '.join(_PATH_COLUMNS)}, or a GLDv2 'id')")
        for n, row in enumerate(reader, start=2):
            name = row[path_col] if path_col else _gldv2_path(row["id"].strip())
            if not name:
                raise ConfigError(f"data.train_list: {path}, line {n}: empty image path")
            paths.append(name.strip())
            labels.append(row[label_col].strip() if label_col else None)
            lines.append(n)
    return paths, labels, lines


def _read_text(path: Path) -> tuple[list[str], list[Optional[str]], list[int]]:
    paths, labels, lines = [], [], []
    with open(path) as f:
        for n, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            # A lone token, or a last token that looks like a file name, is an unlabelled line.
            if len(parts) == 1 or parts[1].lower().endswith(IMAGE_EXTENSIONS):
                paths.append(line)
                labels.append(None)
            else:
                paths.append(parts[0])
                labels.append(parts[1])
            lines.append(n)
    return paths, labels, lines


def read_list_file(list_file: PathLike, root: Optional[PathLike] = None, *,
                   need_labels: bool = True, check_files: bool = True) -> ImageListData:
    """Parse a training list (text ``path label`` lines, or CSV; see the module docstring).

    Relative paths are taken under ``root`` (default: the list file's folder). With
    ``check_files`` every image must exist: a ``FileNotFoundError`` names the list file, the
    line and the missing file (the first few, and how many in all). With ``need_labels`` every
    line must carry a label. A folder instead of a file (unlabelled use only) lists every image
    under it, sorted.
    """
    list_file = Path(list_file)
    if list_file.is_dir():
        if need_labels:
            raise ConfigError(f"data.train_list: {list_file} is a folder; labelled training (the "
                              "finetune stage) needs a list file of 'path label' lines")
        base = Path(root) if root is not None else list_file
        files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {base}")
        return ImageListData(files, None, [], str(list_file))
    if not list_file.is_file():
        raise FileNotFoundError(f"list file not found: {list_file}")
    with open(list_file, newline="") as f:
        head = f.readline()
    is_csv = list_file.suffix.lower() == ".csv" or ("," in head and any(
        c in head.lower() for c in _PATH_COLUMNS + ("id",)))
    names, raw_labels, lines = (_read_csv if is_csv else _read_text)(list_file)
    if not names:
        raise ConfigError(f"data.train_list: {list_file}: no images listed")
    base = Path(root) if root is not None else list_file.parent
    paths = [Path(p) if os.path.isabs(p) else base / p for p in names]
    labels: Optional[list[int]] = None
    classes: list[str] = []
    if need_labels:
        missing = [n for n, lab in zip(lines, raw_labels) if lab is None or lab == ""]
        if missing:
            raise ConfigError(f"data.train_list: {list_file}: line {missing[0]} has no label "
                              f"({len(missing)} unlabelled line(s)); the fine-tuning stage needs "
                              "'path label'")
        index: dict[str, int] = {}
        labels = [index.setdefault(str(lab), len(index)) for lab in raw_labels]
        classes = list(index)
    if check_files:
        absent = [(n, p) for n, p in zip(lines, paths) if not p.is_file()]
        if absent:
            shown = "; ".join(f"line {n}: {p}" for n, p in absent[:5])
            more = f" (and {len(absent) - 5} more)" if len(absent) > 5 else ""
            raise FileNotFoundError(f"{list_file}: {len(absent)} listed image(s) not found: "
                                    f"{shown}{more}")
    return ImageListData(paths, labels, classes, str(list_file))


def sfm120k_list(pkl_path: PathLike, out_path: PathLike, split: str = "train",
                 image_prefix: str = "ims") -> Path:
    """Write a ``path label`` list of cirtorch's retrieval-SfM-120k (or -30k) split.

    The pickle is ``{split: {'cids': [...], 'cluster': [...], 'qidxs', 'pidxs'}}``; image ``cid``
    lives at ``<image_prefix>/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>`` (cirtorch's
    ``cid2filename``) and its instance label is its 3D model, ``cluster``. Returns ``out_path``.
    """
    with open(pkl_path, "rb") as f:
        db = pickle.load(f)
    if split not in db or not {"cids", "cluster"} <= set(db[split]):
        raise ValueError(f"{pkl_path}: expected {{{split!r}: {{'cids', 'cluster', ...}}}}")
    cids, clusters = db[split]["cids"], db[split]["cluster"]
    if len(cids) != len(clusters):
        raise ValueError(f"{pkl_path}: {len(cids)} cids but {len(clusters)} cluster ids")
    out_path = Path(out_path)
    with open(out_path, "w") as f:
        for cid, cluster in zip(cids, clusters):
            f.write(f"{image_prefix}/{cid[-2:]}/{cid[-4:-2]}/{cid[-6:-4]}/{cid} {int(cluster)}\n")
    return out_path


# ----------------------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------------------


class _PILGaussianBlur:
    """MoCo v2's blur: PIL Gaussian filter with σ ~ U[sigma_min, sigma_max] (from torch's RNG,
    so the per-sample seed governs it)."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, image: Image.Image) -> Image.Image:
        s = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=s))


def build_transform(kind: str, size: int, scale: Sequence[float] = (0.2, 1.0)) -> Callable:
    """PIL image → uint8 tensor (3, size, size) with the named augmentation.

    - ``retrieval``: RandomResizedCrop(size, scale) + horizontal flip (landmark fine-tuning).
    - ``mocov2`` (Chen et al. 2020, MoCo v2 code): RandomResizedCrop(size, scale), ColorJitter
      (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, Gaussian blur σ ∈ [0.1, 2] with
      p = 0.5, horizontal flip.
    - ``simclr`` (Chen et al. 2020, SimCLR, strength s = 1): RandomResizedCrop(size, scale), flip,
      ColorJitter(0.8, 0.8, 0.8, 0.2) with p = 0.8, grayscale p = 0.2, blur σ ∈ [0.1, 2] with
      p = 0.5 (applied as a PIL Gaussian of radius σ rather than SimCLR's 10%-of-size kernel).
    - ``none``: resize to (size, size).

    Images stay uint8 until they reach the device: a 4096 × 800² batch is 7.9 GB as uint8 on
    the host and four times that as float32. Every random draw uses torch's global generator,
    which the datasets seed per sample.
    """
    scale = (float(scale[0]), float(scale[1]))
    crop = T.RandomResizedCrop(size, scale=scale, antialias=True)
    if kind == "retrieval":
        ops = [crop, T.RandomHorizontalFlip()]
    elif kind == "mocov2":
        ops = [crop, T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
               T.RandomGrayscale(p=0.2), T.RandomApply([_PILGaussianBlur()], p=0.5),
               T.RandomHorizontalFlip()]
    elif kind == "simclr":
        ops = [crop, T.RandomHorizontalFlip(),
               T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
               T.RandomGrayscale(p=0.2), T.RandomApply([_PILGaussianBlur()], p=0.5)]
    elif kind == "none":
        ops = [T.Resize((size, size), antialias=True)]
    else:
        raise ValueError(f"unknown augmentation {kind!r}")
    return T.Compose(ops + [pil_to_tensor])


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Inside the block, torch's global CPU generator starts from ``seed``; afterwards it is
    where it was. What runs inside (a sample's augmentation, a new module's initialisation) is
    then a function of ``seed`` alone, whatever consumed random numbers before it, and the
    caller's stream is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _seeded(transform: Callable, image: Image.Image, seed: Optional[int]) -> torch.Tensor:
    if seed is None:
        return transform(image)
    with seeded_rng(seed):
        return transform(image)


def _split_item(item: Any) -> tuple[int, Optional[int]]:
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), None


class LabelledImages(Dataset):
    """Augmented labelled images: ``item (index, seed)`` → ``(uint8 (3, S, S), label, index)``.

    With ``views=2`` it returns ``(view1, view2, label, index)``: two augmentations of the same
    image (seeds ``seed`` and ``seed + 1``), used by the contrastive term.
    """

    def __init__(self, data: ImageListData, transform: Callable, views: int = 1):
        if data.labels is None:
            raise ValueError(f"{data.source}: LabelledImages needs labels")
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        self.data, self.transform, self.views = data, transform, views

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: Any):
        index, seed = _split_item(item)
        image = load_image(self.data.paths[index])
        view = _seeded(self.transform, image, seed)
        label = self.data.labels[index]
        if self.views == 1:
            return view, label, index
        other = _seeded(self.transform, image, None if seed is None else seed + 1)
        return view, other, label, index


class TwoViewImages(Dataset):
    """Unlabelled images for instance discrimination: ``(index, seed)`` →
    ``(view1, view2, index)``, two independent augmentations (uint8 (3, S, S))."""

    def __init__(self, data: ImageListData, transform: Callable):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: Any):
        index, seed = _split_item(item)
        image = load_image(self.data.paths[index])
        v1 = _seeded(self.transform, image, seed)
        v2 = _seeded(self.transform, image, None if seed is None else seed + 1)
        return v1, v2, index


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


def shuffled_batches(n: int, batch: int, steps: int, gen: torch.Generator
                     ) -> Iterator[torch.Tensor]:
    """``steps`` batches of ``batch`` indices into ``n`` items (int64 tensors), consecutive
    slices of random permutations drawn from ``gen``: a permutation whose rest cannot fill a
    batch is left for a new one (drop-last), so a batch never holds an item twice.

    Lazy: each permutation is drawn when its first batch is taken, so the draws interleave
    with whatever else the caller draws from ``gen`` in between.
    """
    order, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos:pos + batch]
        pos += batch


def sample_seed(*parts: int) -> int:
    """A 62-bit seed from integers, stable across processes and Python versions (SHA-256;
    Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


class _ResumableBatchSampler(Sampler):
    """Base: an epoch is a deterministic plan of global batches; this rank yields its slice.

    ``set_epoch(epoch, start_batch)`` picks the epoch and the first batch to yield (resumption).
    The global batch is cut into ``world_size`` contiguous shards, so rank r's samples are the
    r-th block of what a single process would see: concatenating the ranks' batches gives the
    single-process batch.
    """

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int):
        if batch_size % world_size:
            raise ConfigError(f"the global batch ({batch_size} images: data.batch_size, or "
                              f"data.classes_per_batch x data.images_per_class) must be divisible "
                              f"by the number of processes ({world_size})")
        self.batch_size, self.seed = batch_size, int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    @property
    def batches_per_epoch(self) -> int:
        raise NotImplementedError

    def _plan(self, gen: torch.Generator) -> list[list[int]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0))
        plan = self._plan(gen)
        shard = self.batch_size // self.world_size
        lo = self.rank * shard
        for b in range(self.start_batch, len(plan)):
            batch = plan[b][lo:lo + shard]
            # The seed of a sample depends on where it sits in the epoch, not on the rank or
            # the worker that loads it.
            yield [(i, sample_seed(self.seed, self.epoch, b, lo + j)) for j, i in enumerate(batch)]


class RandomBatchSampler(_ResumableBatchSampler):
    """Batches of ``batch_size`` from a fresh permutation every epoch (drop-last); an epoch has
    ``batches_per_epoch`` batches (default ``len // batch_size``; more take new permutations,
    :func:`shuffled_batches`: no batch spans two of them, so none holds an image twice)."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0,
                 batches_per_epoch: Optional[int] = None, rank: int = 0, world_size: int = 1):
        super().__init__(batch_size, seed, rank, world_size)
        if num_samples < batch_size:
            raise ConfigError(f"data.batch_size: {batch_size}, but the training list has only "
                              f"{num_samples} images: not one full batch")
        self.num_samples = num_samples
        self._batches = batches_per_epoch or num_samples // batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self._batches

    def _plan(self, gen: torch.Generator) -> list[list[int]]:
        return [b.tolist() for b in shuffled_batches(self.num_samples, self.batch_size,
                                                     self._batches, gen)]


class ClassBalancedBatchSampler(_ResumableBatchSampler):
    """P classes × K images per batch (``classes_per_batch`` × ``images_per_class``).

    Each epoch walks random permutations of the classes with at least two images (one image
    alone has no positive), P classes per batch; each class contributes K distinct images drawn
    at random, completed with repeats (different augmentations) when it has fewer than K. A
    batch never spans two permutations (the last ``classes mod P`` classes of each are skipped),
    so its P classes are distinct. The default epoch visits every eligible class at most once:
    ``batches_per_epoch = classes // P``; a longer one draws a new permutation every
    ``classes // P`` batches. Every query of a batch thus has K - 1 positives in it.
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int, images_per_class: int, *,
                 seed: int = 0, batches_per_epoch: Optional[int] = None, rank: int = 0,
                 world_size: int = 1):
        super().__init__(classes_per_batch * images_per_class, seed, rank, world_size)
        members: dict[int, list[int]] = {}
        for i, lab in enumerate(labels):
            members.setdefault(int(lab), []).append(i)
        self.members = [members[c] for c in sorted(members) if len(members[c]) >= 2]
        if len(self.members) < classes_per_batch:
            raise ConfigError(f"data.classes_per_batch: {classes_per_batch} classes per batch, but "
                              f"only {len(self.members)} classes have two or more images (a "
                              "class needs a positive)")
        self.p, self.k = classes_per_batch, images_per_class
        self._batches = batches_per_epoch or len(self.members) // classes_per_batch

    @property
    def batches_per_epoch(self) -> int:
        return self._batches

    def _plan(self, gen: torch.Generator) -> list[list[int]]:
        # Whole batches of each permutation only: a batch made of one permutation's tail and the
        # next one's head could hold a class twice (fewer than P classes, 2K "positives").
        whole = len(self.members) // self.p * self.p
        classes: list[int] = []
        while len(classes) < self._batches * self.p:
            classes += torch.randperm(len(self.members), generator=gen).tolist()[:whole]
        plan = []
        for b in range(self._batches):
            batch: list[int] = []
            for c in classes[b * self.p:(b + 1) * self.p]:
                pool = self.members[c]
                pick = torch.randperm(len(pool), generator=gen)[:self.k].tolist()
                while len(pick) < self.k:
                    pick.append(int(torch.randint(len(pool), (1,), generator=gen)))
                batch += [pool[j] for j in pick]
            plan.append(batch)
        return plan
