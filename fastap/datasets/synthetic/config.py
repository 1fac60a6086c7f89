"""Presets, the labelling rules and the random streams of the synthetic benchmark."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence, Union

import numpy as np


PathLike = Union[str, os.PathLike]

#: Bumped whenever the images or the ground truth a given config produces change.
VERSION = 1

#: Sizes of the two presets; any key can be overridden in :func:`generate`.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "image_size": 128,               # square images, pixels
        "families": 8,                   # benchmark families
        "instances_per_family": 6,       # benchmark instances per family
        "views_per_instance": 8,         # database views per instance
        "queries_per_instance": 2,
        "distractors": 300,              # database images without any benchmark instance
        "train_families": 8,
        "train_instances_per_family": 10,
        "train_views_per_instance": 10,
        "view_mix": [0.4, 0.4, 0.2],     # target easy/hard/junk shares of a landmark's views
        "train_hard_fraction": 0.5,      # share of hard (vs easy) training views
        "jpeg_quality": 90,
    },
    "quick": {
        "image_size": 96,
        "families": 5,
        "instances_per_family": 4,
        "views_per_instance": 5,
        "queries_per_instance": 2,
        "distractors": 60,
        "train_families": 6,
        "train_instances_per_family": 6,
        "train_views_per_instance": 6,
        "view_mix": [0.4, 0.4, 0.2],
        "train_hard_fraction": 0.5,
        "jpeg_quality": 90,
    },
}

#: Thresholds turning a view's measured visibility/geometry/photometry into easy, hard or junk.
LABEL_RULES: dict[str, float] = {
    "junk_visible": 0.25,     # visible fraction of the landmark below this -> junk
    "junk_extent": 0.22,      # longest side of the landmark / image side below this -> junk
    "hard_visible": 0.65,     # below -> hard
    "hard_extent": 0.45,      # below -> hard
    "hard_rotation": 18.0,    # |in-plane rotation| in degrees above -> hard
    "hard_perspective": 0.68,  # shortest/longest opposite edge ratio below -> hard
    "hard_blur": 1.2,         # Gaussian blur sigma (pixels of a 128-px image) at or above -> hard
    "hard_gain_low": 0.6,     # illumination gain outside [low, high] -> hard
    "hard_gain_high": 1.5,
}

SUPERSAMPLE = 2          # scenes are drawn at twice the size, then box-downsampled
TRIES = 8                # attempts at a view's target label before accepting the measured one
FORCED_TRIES = 60        # attempts for the views that guarantee >= 1 easy and >= 1 hard

KINDS = ("facade", "tower", "gate", "dome", "temple", "castle")


def item_rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(p) for p in path]])


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def synthetic_config(preset: str = "default", **overrides: Any) -> dict[str, Any]:
    """The full, validated config of ``preset`` with ``overrides`` applied (JSON-normalised)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)}")
    cfg = dict(PRESETS[preset])
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise TypeError(f"unknown synthetic dataset option(s) {unknown}: expected some of "
                        f"{sorted(cfg)}")
    cfg.update(overrides)
    cfg["view_mix"] = [float(v) for v in cfg["view_mix"]]
    minimum = {"image_size": 32, "families": 1, "instances_per_family": 1, "views_per_instance": 1,
               "queries_per_instance": 1, "distractors": 0, "train_families": 0,
               "train_instances_per_family": 0, "train_views_per_instance": 0, "jpeg_quality": 1}
    for key, low in minimum.items():
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        cfg[key] = int(value)
    if cfg["jpeg_quality"] > 100:
        raise ValueError(f"jpeg_quality must be at most 100, got {cfg['jpeg_quality']}")
    mix = cfg["view_mix"]
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0 or not all(map(math.isfinite, mix)):
        raise ValueError(f"view_mix must be 3 non-negative shares (easy, hard, junk) with a "
                         f"positive sum, got {mix}")
    frac = cfg["train_hard_fraction"] = float(cfg["train_hard_fraction"])
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"train_hard_fraction must lie in [0, 1], got {frac}")
    return json.loads(json.dumps(cfg))


def view_levels(n: int, mix: Sequence[float]) -> list[str]:
    """Target labels of an instance's ``n`` views: largest-remainder shares of ``mix``, with at
    least one easy and one hard view when both shares are positive and ``n`` >= 2."""
    total = sum(mix)
    raw = [n * m / total for m in mix]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(3), key=lambda k: (-(raw[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    if n >= 2:
        for need in (0, 1):
            if mix[need] > 0 and counts[need] == 0:
                spare = [k for k in range(3) if k != need
                         and counts[k] > (1 if k < 2 and mix[k] > 0 else 0)]
                donor = max(spare, key=lambda k: (counts[k], -k))
                counts[donor] -= 1
                counts[need] += 1
    return ["easy"] * counts[0] + ["hard"] * counts[1] + ["junk"] * counts[2]
