"""The augmentation of one step of the demo's contrastive stage: two 32-px views of a batch of
96 images of 128 px (the default preset), from uint8 images or from a float copy made once.

    pytest benchmarks/test_bench_augment.py --benchmark-only

One pytest-benchmark group, ``augment-contrastive-96x128-to-32``:

- ``uint8``: the batch gathered from the uint8 images, and each view converting it to float
  (what the stages did before ``fastap.training.unit_float``);
- ``float-once``: the batch gathered from the stage's float copy (``unit_float``, made before
  the timing, as a stage makes it once) and both views sampled from it (what the stages do).

Both give the same views bit for bit (checked here before timing). ``extra_info`` records the
thread count. Set the threads with ``OMP_NUM_THREADS`` (the demo's stages: torch's default).
"""

from __future__ import annotations

import pytest
import torch

from fastap.demo import CONTRASTIVE_AUGMENT
from fastap.training import augment_batch, unit_float

N_IMAGES, SIDE, BATCH, VIEW = 800, 128, 96, 32


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (N_IMAGES, 3, SIDE, SIDE), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def _two_views(source: torch.Tensor, idx: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    batch = source[idx]
    return torch.cat([augment_batch(batch, VIEW, CONTRASTIVE_AUGMENT, gen) for _ in range(2)])


@pytest.mark.parametrize("source", ["uint8", "float-once"])
def test_contrastive_augmentation(benchmark, images, source):
    pixels = images if source == "uint8" else unit_float(images)
    idx = torch.randperm(N_IMAGES, generator=torch.Generator().manual_seed(1))[:BATCH]
    assert torch.equal(_two_views(pixels, idx, 2), _two_views(images, idx, 2))
    benchmark.group = f"augment-contrastive-{BATCH}x{SIDE}-to-{VIEW}"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark(_two_views, pixels, idx, 2)
