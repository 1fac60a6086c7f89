"""Training on images held in memory (``fastap demo``): augmentation of whole batches on their
device, and a plain loop of optimizer steps.

:class:`~fastap.training.Trainer` reads images from files through DataLoader workers and
augments each with PIL (:func:`~fastap.training.build_transform`). When the training images fit
in one uint8 tensor, :func:`augment_batch` draws a whole batch's augmentations at once, on the
tensor's device, and :func:`fit_steps` runs the steps of a loss over batches of indices into it.
The optimizer and the schedule are the trainer's (:func:`~fastap.training.build_optimizer`,
:func:`~fastap.training.build_scheduler`); the batches of indices are a sampler's
(:func:`~fastap.training.shuffled_batches`, :class:`~fastap.training.ClassBalancedBatchSampler`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._progress import progress_bar

__all__ = ["Augment", "augment_batch", "fit_steps", "swap_surroundings", "unit_float"]


@dataclass
class Augment:
    """What :func:`augment_batch` draws, per image (probabilities and ranges)."""

    scale: tuple[float, float] = (0.35, 1.0)     # crop area, fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio
    rotate: float = 0.0                          # max |rotation|, degrees
    flip: float = 0.0                            # probability of a horizontal flip
    jitter: float = 0.0                          # brightness/contrast/saturation strength
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _gray(x: Tensor) -> Tensor:
    """Luma (B, 1, H, W) of RGB images (B, 3, H, W)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def augment_batch(images: Tensor, size: int, aug: Augment, gen: torch.Generator) -> Tensor:
    """Augment a batch: uint8 (B, 3, H, W) on any device, or float already scaled to [0, 1]
    (:func:`unit_float`), → float (B, 3, size, size) in [0, 1].

    Per image, all drawn from ``gen`` (a CPU generator, so the draws do not depend on the
    device): a random resized crop (area fraction in ``aug.scale``, aspect ratio log-uniform in
    ``aug.ratio``, position uniform inside the image) with an optional rotation and horizontal
    flip, resampled bilinearly in one ``grid_sample``; then, with probability ``jitter_p``,
    brightness, contrast and saturation factors in [1 − jitter, 1 + jitter] (random order is
    not modelled); grayscale with ``gray_p``; a blur (a random blend with a 3×3 box filter, or
    a 5×5 one) with ``blur_p``.
    """
    x = _resized_crops(images, size, aug, gen)
    b, device = x.shape[0], x.device

    def column(values: Tensor) -> Tensor:
        return values.float().to(device).view(b, 1, 1, 1)

    if aug.jitter_p > 0 and aug.jitter > 0:
        on = torch.rand(b, generator=gen) < aug.jitter_p
        lo, hi = 1 - aug.jitter, 1 + aug.jitter
        bright, contrast, sat = (torch.where(on, _uniform(gen, b, lo, hi).float(), 1.0)
                                 for _ in range(3))
        x = x * column(bright)
        mean = _gray(x).mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * column(contrast) + mean
        g = _gray(x)
        x = (g + (x - g) * column(sat)).clamp(0, 1)
    if aug.gray_p > 0:
        on = column(torch.rand(b, generator=gen) < aug.gray_p)
        x = torch.where(on.bool(), _gray(x).expand_as(x), x)
    if aug.blur_p > 0:
        on = torch.rand(b, generator=gen) < aug.blur_p
        strength = torch.where(on, torch.rand(b, generator=gen), 0.0)
        wide = torch.rand(b, generator=gen) < 0.5
        # Only the blurred images are filtered (the box filters were a third of the time of a
        # small view's augmentation); x + 0·(blurred − x) = x for the others, so the result is
        # the same as filtering all.
        for radius, chosen in ((1, on & ~wide), (2, on & wide)):
            rows = chosen.nonzero().squeeze(1).to(device)
            if rows.numel():
                part = x[rows]
                blurred = F.avg_pool2d(F.pad(part, (radius,) * 4, mode="replicate"),
                                       2 * radius + 1, stride=1)
                x[rows] = part + column(strength)[rows] * (blurred - part)
    return x


def _resized_crops(images: Tensor, size: int, aug: Augment, gen: torch.Generator) -> Tensor:
    """The geometric part of :func:`augment_batch`: float (B, 3, size, size) in [0, 1]."""
    b = images.shape[0]
    area = _uniform(gen, b, *aug.scale)
    log_r = _uniform(gen, b, math.log(aug.ratio[0]), math.log(aug.ratio[1]))
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(b, generator=gen, dtype=torch.float64) - 1)
    cy = (1 - h) * (2 * torch.rand(b, generator=gen, dtype=torch.float64) - 1)
    angle = torch.deg2rad(_uniform(gen, b, -aug.rotate, aug.rotate))
    flip = torch.where(torch.rand(b, generator=gen) < aug.flip, -1.0, 1.0).double()
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output (u, v) in [-1, 1]² samples the input at R(angle) · diag(flip·w, h) · (u, v) + c.
    theta = torch.stack([torch.stack([cos * w * flip, -sin * h, cx], 1),
                         torch.stack([sin * w * flip, cos * h, cy], 1)], 1)
    grid = F.affine_grid(theta.float().to(images.device), [b, 3, size, size],
                         align_corners=False)
    return F.grid_sample(unit_float(images), grid, mode="bilinear",
                         padding_mode="reflection", align_corners=False)


def unit_float(images: Tensor) -> Tensor:
    """uint8 images as float in [0, 1] (``x / 255``); floating images are returned as they are.
    A stage converts its images once with it, not every batch: converting the full-size batch
    for each of two 32-px views took most of their augmentation time on the CPU
    (benchmarks/test_bench_augment.py)."""
    return images.float().div(255.0) if images.dtype == torch.uint8 else images


def swap_surroundings(views: Tensor, p: float, keep: tuple[float, float],
                      gen: torch.Generator) -> Tensor:
    """Views (B, C, H, W) of which, with probability ``p`` each, only a central square is kept
    (its side a fraction of the view's, uniform in ``keep``) and the rest comes from another
    view of the batch (a random derangement): a label-free way to make two views of an image
    share part of the scene but not what surrounds it. Returns a new tensor; B < 2 returns
    ``views``."""
    b, _, h, w = views.shape
    if b < 2:
        return views
    other = (torch.arange(b) + torch.randint(1, b, (1,), generator=gen)) % b
    side = _uniform(gen, b, *keep)
    on = torch.rand(b, generator=gen) < p
    ys = torch.arange(h, dtype=torch.float64).add(0.5).div(h).sub(0.5).abs().view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float64).add(0.5).div(w).sub(0.5).abs().view(1, 1, w)
    half = (side / 2).view(b, 1, 1)
    inside = (ys < half) & (xs < half) | ~on.view(b, 1, 1)
    inside = inside.unsqueeze(1).to(views.device)
    return torch.where(inside, views, views[other.to(views.device)])


def fit_steps(loss_of: Callable[[Tensor], Tensor], batches: Iterable[Tensor],
              optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int, desc: str,
              progress: bool = True) -> dict:
    """One optimizer step per batch of indices, ``loss_of(indices)`` the scalar loss, then one
    scheduler step; ``steps`` (the number of batches) sizes the progress bar.

    Returns ``{"loss_first": the first loss, "loss_last": the mean of the last five}``.
    """
    losses = []
    with progress_bar(steps, desc, enabled=progress, unit="step") as bar:
        for idx in batches:
            loss = loss_of(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    return {"loss_first": losses[0], "loss_last": float(np.mean(losses[-5:]))}
