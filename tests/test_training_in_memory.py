"""Training on images held in memory (fastap.training.in_memory) and the trainer's builders it
shares: batch augmentation, the step loop, the optimizer and the schedule, the index batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastap.models import RetrievalNet
from fastap.training import (Augment, augment_batch, build_optimizer, build_scheduler, fit_steps,
                             seeded_rng, shuffled_batches, swap_surroundings, unit_float)
from fastap.training.config import OptimConfig, ScheduleConfig


def test_augment_batch_is_seeded_and_in_range():
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    aug = Augment(scale=(0.3, 1.0), rotate=15.0, flip=0.5, jitter=0.4, jitter_p=1.0,
                  gray_p=0.5, blur_p=0.5)
    a = augment_batch(images, 24, aug, torch.Generator().manual_seed(3))
    b = augment_batch(images, 24, aug, torch.Generator().manual_seed(3))
    c = augment_batch(images, 24, aug, torch.Generator().manual_seed(4))
    assert a.shape == (5, 3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_augment_batch_identity_crop_keeps_the_image():
    # A full-image crop without rotation, flip or photometric change resamples onto the same
    # pixel grid: the output is the input.
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    out = augment_batch(images, 16, Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0)),
                        torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images.float() / 255, atol=1e-5, rtol=0)


def test_augment_batch_takes_images_converted_once():
    """A stage converts its uint8 images to [0, 1] once (unit_float) and augments the float
    copy: the views are bit for bit those of the uint8 images, and float input is not scaled
    again."""
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    pixels = unit_float(images)
    assert pixels.dtype == torch.float32 and torch.equal(pixels, images.float() / 255)
    assert unit_float(pixels) is pixels
    aug = Augment(scale=(0.2, 0.9), rotate=10.0, flip=0.5, jitter=0.4, jitter_p=0.8,
                  gray_p=0.3, blur_p=0.5)
    a = augment_batch(images, 24, aug, torch.Generator().manual_seed(5))
    b = augment_batch(pixels, 24, aug, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(pixels, images.float() / 255)  # the stage's copy is left as it was


def _box_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Oracle: the mean of the (2r+1)² shifted copies of the edge-replicated images."""
    n = x.shape[-1]
    clamp = torch.arange(-radius, n + radius).clamp(0, n - 1)
    padded = x[..., clamp, :][..., clamp]
    side = 2 * radius + 1
    return sum(padded[..., i:i + n, j:j + n] for i in range(side) for j in range(side)) / side**2


def test_augment_batch_blur_blends_each_image_with_a_box_filter():
    """With an identity crop and only blur: each image is x + s·(box(x) − x) for a 3×3 or 5×5
    box filter and s in [0, 1) drawn per image; with blur_p = 0.5 some images are left as
    they are."""
    images = torch.randint(0, 256, (32, 3, 12, 12), dtype=torch.uint8)
    x = images.double() / 255
    boxes = {radius: _box_blur(x, radius) for radius in (1, 2)}
    aug = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, jitter_p=0.0, blur_p=0.5)
    out = augment_batch(images, 12, aug, torch.Generator().manual_seed(0)).double()
    kinds, strengths = [], set()
    for i in range(len(images)):
        if torch.allclose(out[i], x[i], atol=1e-6, rtol=0):
            kinds.append(0)
            continue
        fits = {}
        for radius, box in boxes.items():
            step = (box[i] - x[i]).flatten()
            s = float(step @ (out[i] - x[i]).flatten() / (step @ step))
            fits[radius] = (float((x[i] + s * (box[i] - x[i]) - out[i]).abs().max()), s)
        radius = min(fits, key=lambda r: fits[r][0])
        error, s = fits[radius]
        assert error < 1e-5 and 0.0 <= s < 1.0, (i, fits)
        kinds.append(radius)
        strengths.add(round(s, 4))
    assert {0, 1, 2} <= set(kinds), kinds
    assert len(strengths) > 1  # a strength drawn per image


def test_shuffled_batches_never_repeat_an_item_within_a_batch():
    batches = list(shuffled_batches(10, 4, 6, torch.Generator().manual_seed(0)))
    assert len(batches) == 6 and all(b.shape == (4,) for b in batches)
    assert all(len(set(b.tolist())) == 4 for b in batches)
    # Two batches per permutation (the last 2 of each are dropped): pairs cover 8 distinct items.
    for first in range(0, 6, 2):
        assert len(set(torch.cat(batches[first:first + 2]).tolist())) == 8


def test_shuffled_batches_draw_each_permutation_when_it_is_needed():
    # Lazy: the second permutation is drawn after what the caller drew in between, so the
    # stream of a loop that augments between batches is the one it always was.
    gen = torch.Generator().manual_seed(1)
    it = shuffled_batches(6, 3, 3, gen)
    next(it), next(it)
    between = torch.rand(1, generator=gen)
    third = next(it)
    ref = torch.Generator().manual_seed(1)
    torch.randperm(6, generator=ref)
    assert torch.equal(torch.rand(1, generator=ref), between)
    assert torch.equal(third, torch.randperm(6, generator=ref)[:3])


def test_seeded_rng_is_reproducible_and_leaves_the_global_stream_alone():
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    with seeded_rng(7):
        a = nn.Linear(3, 2).weight.detach().clone()
    with seeded_rng(7):
        b = nn.Linear(3, 2).weight.detach().clone()
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(2), expected)


def test_build_optimizer_groups_and_schedule():
    net = RetrievalNet("resnet10_w32")
    head = nn.Linear(net.feat_dim, 4)
    opt = build_optimizer(OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1), net, [head])
    assert isinstance(opt, torch.optim.AdamW)
    first, p_group = opt.param_groups
    ids = {id(p) for p in first["params"]}
    assert all(id(p) in ids for p in head.parameters())
    assert first["weight_decay"] == 0.1 and first["lr"] == 1e-3
    assert p_group["weight_decay"] == 0.0 and p_group["lr"] == pytest.approx(1e-2)  # GeM's p
    sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=2), 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])  # warm-up
    assert lrs[2 + 4] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_fit_steps_takes_one_step_per_batch():
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])  # a linear target the model can fit
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    batches = shuffled_batches(16, 4, 20, torch.Generator().manual_seed(0))
    info = fit_steps(lambda idx: nn.functional.mse_loss(model(x[idx]), y[idx]), batches, opt,
                     sched, 20, "fit", progress=False)
    assert sched.last_epoch == 20
    assert info["loss_last"] < info["loss_first"]


def test_swap_surroundings_keeps_the_centre_and_takes_the_rest_from_another_view():
    views = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 10, 10).clone()
    out = swap_surroundings(views, 1.0, (0.4, 0.4), torch.Generator().manual_seed(0))
    again = swap_surroundings(views, 1.0, (0.4, 0.4), torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and out.shape == views.shape
    assert torch.equal(out[:, :, 3:7, 3:7], views[:, :, 3:7, 3:7])  # the central 4 × 4 square
    border = out[:, 0, 0, 0]
    assert sorted(border.tolist()) == [0.0, 1.0, 2.0, 3.0]  # a permutation ...
    assert (border != views[:, 0, 0, 0]).all()  # ... without a fixed point
    assert torch.equal(swap_surroundings(views, 0.0, (0.4, 0.4), torch.Generator()), views)
