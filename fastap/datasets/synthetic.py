"""A synthetic instance-level retrieval benchmark in the revisitop layout, generated offline.

:func:`generate` draws procedural "landmarks" (facades, towers, gates, domed halls, temples,
castles) and photographs each of them from several viewpoints, then writes

::

    <root>/<name>/gnd_<name>.pkl     imlist, qimlist, gnd (bbx, easy, hard, junk), as revisitop
    <root>/<name>/jpg/<image>.jpg    database images (views + distractors) and query images
    <root>/<name>/train.txt          the labelled training split (format below)
    <root>/<name>/train/<image>.jpg  its images
    <root>/<name>/meta.json          per-image details (instance, family, label, visibility, view)
    <root>/<name>/synthetic.json     version + seed + config + counts (written last)

so that ``RevisitedDataset(root, name)`` and :func:`fastap.evaluation.evaluate_revisited`
work on it unchanged.

**Instances and families.** A family fixes a landmark's style: kind, proportions, wall/roof/window
colours, window shape, wall texture, roof shape and the typical window grid. Its instances share all
of that and differ in a few details: window grid (±1 row/column), the accent colours of door,
band, shutters and flag, the motif (rosette, clock, star, shield, ...) and where it sits, the door
position and the pattern of lit windows. Other instances of a query's family are therefore hard
negatives.

**Views.** Each view renders the landmark into a scene (sky, ground, generic background
buildings, trees, clouds, people, lamp posts) with a perspective/scale/rotation/position drawn for
a target difficulty, foreground occluders (buildings, trees, walls, buses, billboards),
illumination (gain, colour cast, gamma), blur, noise and JPEG compression. The *measured* outcome
labels it, as the Revisited Oxford annotators did (:data:`LABEL_RULES`):

* junk — barely visible: less than 25% of the landmark visible (occluded or out of frame), or
  tiny (its longest side under 22% of the image);
* hard — recognisable but strongly transformed: under 65% visible, or smaller than 45% of the
  image, or rotated more than 18°, or foreshortened (an edge shrunk below 0.68 of its opposite),
  or blurred (σ ≥ 1.2 px at 128 px), or badly lit (gain outside [0.6, 1.5]);
* easy — everything else.

Each query is a separate image of its instance (a clean view, object fully visible, with clutter
around it) whose ``bbx`` is the box of the landmark's pixels. Distractors contain no benchmark
instance (clutter, or buildings that are new instances of benchmark or fresh families).
Database names are opaque (``im00000``...) and ``imlist`` is shuffled.

**Training split.** Instances of other families (drawn from the same style distribution, never a
benchmark instance) seen in easy and hard views. ``train.txt`` has one line per image::

    <path> <instance_id>

separated by one space, ``<path>`` relative to the folder holding ``train.txt`` (e.g.
``train/t0012_03.jpg``, no spaces), ``<instance_id>`` an integer in
``0 .. train_instances - 1`` (instances numbered family by family). :func:`read_train_list`
parses it.

Everything is a deterministic function of ``seed`` and the config (per-image random streams
derived from ``(seed, role, indices)``), so identical arguments give byte-identical files on the
same numpy/Pillow. A folder whose ``synthetic.json`` records the same version, seed and config is
reused; generation happens in a temporary folder renamed into place, so an interrupted run
leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import json
import math
import os
import pickle
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "LABEL_RULES",
    "PRESETS",
    "VERSION",
    "SyntheticInfo",
    "generate",
    "read_train_list",
    "synthetic_config",
]

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

_SUPERSAMPLE = 2          # scenes are drawn at twice the size, then box-downsampled
_TRIES = 8                # attempts at a view's target label before accepting the measured one
_FORCED_TRIES = 60        # attempts for the views that guarantee >= 1 easy and >= 1 hard

# Roles that seed the per-item random streams (never reuse a number for another purpose).
_R_FAMILY, _R_INSTANCE, _R_VIEW, _R_QUERY = 1, 2, 3, 4
_R_DISTRACTOR, _R_TRAIN_FAMILY, _R_TRAIN_INSTANCE, _R_TRAIN_VIEW = 5, 6, 7, 8
_R_ORDER, _R_DISTRACTOR_BUILDING, _R_DISTRACTOR_FAMILY = 9, 10, 11

_KINDS = ("facade", "tower", "gate", "dome", "temple", "castle")


def _rng(seed: int, *path: int) -> np.random.Generator:
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


def _view_levels(n: int, mix: Sequence[float]) -> list[str]:
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


# ----------------------------------------------------------------------------------------------
# Colours
# ----------------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _shade(c: Sequence[int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(x * f)))) for x in c[:3])  # type: ignore[return-value]


def _accent(rng: np.random.Generator) -> list[float]:
    return [float(rng.random()), float(rng.uniform(0.55, 0.95)), float(rng.uniform(0.45, 0.95))]


# ----------------------------------------------------------------------------------------------
# Landmarks: family style + instance details -> an RGBA texture
# ----------------------------------------------------------------------------------------------

_ASPECT = {"facade": (0.85, 1.35), "tower": (0.32, 0.48), "gate": (0.85, 1.2),
           "dome": (0.8, 1.1), "temple": (1.1, 1.45), "castle": (1.0, 1.35)}
_GRID = {"facade": ((2, 4), (3, 6)), "tower": ((4, 7), (1, 2)), "gate": ((1, 2), (2, 2)),
         "dome": ((1, 2), (3, 6)), "temple": ((1, 1), (4, 8)), "castle": ((2, 3), (2, 4))}
_ROOFS = {"facade": ("gable", "flat", "stepped", "battlement", "mansard"),
          "tower": ("spire", "dome", "battlement", "pyramid"),
          "gate": ("attic", "statue", "pediment"), "dome": ("dome", "onion"),
          "temple": ("pediment",), "castle": ("battlement", "cones")}
_WINDOWS = ("rect", "arch", "round", "slit", "double")
_TEXTURES = ("plain", "bricks", "blocks", "hstripes", "pilasters")
_MOTIFS = ("rosette", "clock", "star", "diamond", "shield", "banner", "ring", "cross")
_ROOF_HUES = ([0.03, 0.65, 0.55], [0.6, 0.15, 0.35], [0.45, 0.45, 0.55], [0.0, 0.0, 0.25],
              [0.08, 0.5, 0.4], [0.13, 0.7, 0.75])


def _family_params(rng: np.random.Generator) -> dict[str, Any]:
    kind = _KINDS[int(rng.integers(len(_KINDS)))]
    (r0, r1), (c0, c1) = _GRID[kind]
    roof = _ROOF_HUES[int(rng.integers(len(_ROOF_HUES)))]
    return {
        "kind": kind,
        "aspect": float(rng.uniform(*_ASPECT[kind])),
        "wall": [float(rng.random()), float(rng.uniform(0.08, 0.55)),
                 float(rng.uniform(0.55, 0.92))],
        "trim_shade": float(rng.choice([0.62, 0.75, 1.25])),
        "roof": [roof[0] + float(rng.uniform(-0.03, 0.03)), roof[1], roof[2]],
        "roof_style": str(rng.choice(_ROOFS[kind])),
        "window_style": str(rng.choice(_WINDOWS)),
        "window": [float(rng.random()), float(rng.uniform(0.2, 0.6)),
                   float(rng.uniform(0.12, 0.35))],
        "window_w": float(rng.uniform(0.4, 0.62)),
        "window_h": float(rng.uniform(0.5, 0.72)),
        "texture": str(rng.choice(_TEXTURES)),
        "texture_scale": float(rng.uniform(0.022, 0.04)),
        "rows": int(rng.integers(r0, r1 + 1)),
        "cols": int(rng.integers(c0, c1 + 1)),
        "roof_height": float(rng.uniform(0.14, 0.26)),
        "ground_floor": float(rng.uniform(0.18, 0.28)),
    }


def _instance_params(fam: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    (r0, r1), (c0, c1) = _GRID[fam["kind"]]
    rows = int(np.clip(fam["rows"] + rng.integers(-1, 2), max(1, r0 - 1), r1 + 1))
    cols = int(np.clip(fam["cols"] + rng.integers(-1, 2), max(1, c0 - 1), c1 + 1))
    h, s, v = fam["wall"]
    return {
        "rows": rows,
        "cols": cols,
        "wall": [h + float(rng.uniform(-0.02, 0.02)), s + float(rng.uniform(-0.05, 0.05)),
                 v + float(rng.uniform(-0.05, 0.05))],
        "accent": _accent(rng),
        "accent2": _accent(rng),
        "motif": str(rng.choice(_MOTIFS)),
        "motif_pos": int(rng.integers(3)),
        "motif_angle": float(rng.uniform(0, 2 * math.pi)),
        "door_pos": float(rng.uniform(0.15, 0.85)),
        "lit": [int(b) for b in (rng.random(64) < 0.25)],
        "band": bool(rng.random() < 0.6),
        "band_at": float(rng.uniform(0.2, 0.8)),
        "shutters": bool(rng.random() < 0.5),
        "flag": bool(rng.random() < 0.5),
        "flag_x": float(rng.uniform(0.2, 0.8)),
    }


def _fingerprint(fam: dict[str, Any], inst: dict[str, Any]) -> str:
    text = json.dumps({"family": fam, "instance": inst}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _draw_motif(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
                c1: tuple, c2: tuple, angle: float) -> None:
    if r < 1.5:
        return
    box = [cx - r, cy - r, cx + r, cy + r]
    lw = max(1, int(r / 6))
    if kind == "rosette":
        d.ellipse(box, fill=c1, outline=_shade(c1, 0.5), width=lw)
        for k in range(8):
            a = angle + k * math.pi / 4
            d.line([cx, cy, cx + r * math.cos(a), cy + r * math.sin(a)], fill=c2, width=lw)
        d.ellipse([cx - r / 3, cy - r / 3, cx + r / 3, cy + r / 3], fill=c2)
    elif kind == "clock":
        d.ellipse(box, fill=(235, 232, 220), outline=c1, width=max(1, int(r / 4)))
        for a, length in ((angle, 0.8), (angle * 3.7, 0.55)):
            d.line([cx, cy, cx + length * r * math.cos(a), cy + length * r * math.sin(a)],
                   fill=(20, 20, 20), width=lw)
    elif kind == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = angle + k * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=c1, outline=c2)
    elif kind == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=c1)
        q = r * 0.5
        d.polygon([(cx, cy - q), (cx + q * 0.75, cy), (cx, cy + q), (cx - q * 0.75, cy)], fill=c2)
    elif kind == "shield":
        pts = [(cx - r * 0.8, cy - r), (cx + r * 0.8, cy - r), (cx + r * 0.8, cy),
               (cx, cy + r), (cx - r * 0.8, cy)]
        d.polygon(pts, fill=c1)
        d.polygon([(cx, cy - r), (cx + r * 0.8, cy - r), (cx + r * 0.8, cy), (cx, cy + r)], fill=c2)
    elif kind == "banner":
        for k, c in enumerate((c1, c2, c1)):
            d.rectangle([cx - r * 0.6, cy - r + k * 2 * r / 3, cx + r * 0.6,
                         cy - r + (k + 1) * 2 * r / 3], fill=c)
    elif kind == "ring":
        d.ellipse(box, fill=c1)
        d.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=c2)
        d.ellipse([cx - r * 0.25, cy - r * 0.25, cx + r * 0.25, cy + r * 0.25], fill=c1)
    else:  # cross
        d.rectangle([cx - r, cy - r * 0.3, cx + r, cy + r * 0.3], fill=c1)
        d.rectangle([cx - r * 0.3, cy - r, cx + r * 0.3, cy + r], fill=c1)
        d.rectangle([cx - r * 0.15, cy - r * 0.15, cx + r * 0.15, cy + r * 0.15], fill=c2)


def _draw_window(d: ImageDraw.ImageDraw, style: str, cx: float, cy: float, w: float, h: float,
                 fill: tuple, trim: tuple) -> None:
    lw = 1 if w < 10 else 2
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if style == "rect":
        d.rectangle([x0, y0, x1, y1], fill=fill, outline=trim, width=lw)
        d.line([cx, y0, cx, y1], fill=trim, width=1)
    elif style == "arch":
        r = min(w / 2, h / 2)
        d.rectangle([x0, y0 + r, x1, y1], fill=fill, outline=trim, width=lw)
        d.pieslice([x0, y0, x1, y0 + 2 * r], 180, 360, fill=fill, outline=trim, width=lw)
    elif style == "round":
        r = min(w, h) / 2
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=trim, width=lw)
    elif style == "slit":
        d.rectangle([cx - w * 0.18, y0, cx + w * 0.18, y1], fill=fill, outline=trim, width=1)
    else:  # double
        d.rectangle([x0, y0, cx - w * 0.08, y1], fill=fill, outline=trim, width=1)
        d.rectangle([cx + w * 0.08, y0, x1, y1], fill=fill, outline=trim, width=1)


def _wall_texture(kind: str, w: int, h: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative (h, w) luminance map of a wall texture."""
    step = max(3, int(round(scale * h)))
    y = np.arange(h)[:, None]
    x = np.arange(w)[None, :]
    tex = np.ones((h, w), np.float32)
    if kind == "bricks":
        row = y // step
        mortar = (y % step == 0) | (((x + (row % 2) * step) % (2 * step)) == 0)
        tex = np.where(mortar, 0.8, 1.0).astype(np.float32)
    elif kind == "blocks":
        mortar = (y % (2 * step) == 0) | ((x % (3 * step)) == 0)
        tex = np.where(mortar, 0.85, 1.0).astype(np.float32)
    elif kind == "hstripes":
        tex = np.where((y // step) % 2 == 0, 0.9, 1.05).astype(np.float32) * np.ones((1, w))
    elif kind == "pilasters":
        tex = np.where((x // (2 * step)) % 3 == 0, 1.1, 0.95).astype(np.float32) * np.ones((h, 1))
    grain = rng.normal(1.0, 0.03, (h, w)).astype(np.float32)
    weather = 1.0 - 0.08 * (y / h)  # grime near the ground
    return (tex * grain * weather).astype(np.float32)


def _landmark(fam: dict[str, Any], inst: dict[str, Any], height: int, seed_rng: np.random.Generator
              ) -> Image.Image:
    """The landmark's RGBA texture (transparent outside its silhouette), ``height`` pixels high."""
    kind = fam["kind"]
    H = int(height)
    W = max(8, int(round(fam["aspect"] * H)))
    wall = _hsv(*inst["wall"])
    trim = _shade(wall, fam["trim_shade"])
    roof = _hsv(*fam["roof"])
    win = _hsv(*fam["window"])
    lit = (250, 214, 120)
    acc, acc2 = _hsv(*inst["accent"]), _hsv(*inst["accent2"])
    rows, cols = inst["rows"], inst["cols"]

    img = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    rh = fam["roof_height"] * H
    details: list = []  # deferred drawing calls (after the wall texture)

    def windows(x0, y0, x1, y1, nr, nc, style=fam["window_style"], offset=0):
        cw, ch = (x1 - x0) / nc, (y1 - y0) / nr
        for r in range(nr):
            for c in range(nc):
                cx, cy = x0 + (c + 0.5) * cw, y0 + (r + 0.5) * ch
                on = inst["lit"][(offset + r * nc + c) % len(inst["lit"])]
                ww, hh = cw * fam["window_w"], ch * fam["window_h"]
                details.append(("win", style, cx, cy, ww, hh, lit if on else win))
                if inst["shutters"] and style in ("rect", "arch", "double"):
                    sw = ww * 0.28
                    details.append(("rect", [cx - ww / 2 - sw, cy - hh / 2, cx - ww / 2,
                                             cy + hh / 2], acc))
                    details.append(("rect", [cx + ww / 2, cy - hh / 2, cx + ww / 2 + sw,
                                             cy + hh / 2], acc))

    def door(x0, x1, y1, hfrac):
        dw = min((x1 - x0) * 0.22, 0.3 * W)
        cx = x0 + dw / 2 + inst["door_pos"] * (x1 - x0 - dw)
        dh = hfrac
        details.append(("rect", [cx - dw / 2, y1 - dh, cx + dw / 2, y1], acc2))
        details.append(("pie", [cx - dw / 2, y1 - dh - dw / 2, cx + dw / 2, y1 - dh + dw / 2],
                        acc2))
        return cx, y1 - dh - dw / 2

    motif_r = 0.07 * min(W, H) + 0.03 * H
    motif_at: list[tuple[float, float, float]] = []

    if kind in ("facade", "castle"):
        top = rh if fam["roof_style"] not in ("flat", "battlement") else rh * 0.35
        x0, x1 = (0.0, W) if kind == "facade" else (0.18 * W, 0.82 * W)
        d.rectangle([x0, top, x1, H], fill=wall)
        style = fam["roof_style"]
        if style == "gable":
            d.polygon([(x0, top), ((x0 + x1) / 2, top - rh * 0.95), (x1, top)], fill=roof)
            motif_at.append(((x0 + x1) / 2, top - rh * 0.35, motif_r * 0.7))
        elif style == "stepped":
            steps = 4
            for k in range(steps):
                f = k / steps
                d.rectangle([x0 + f * (x1 - x0) / 2, top - (k + 1) * rh / steps,
                             x1 - f * (x1 - x0) / 2, top], fill=wall)
            motif_at.append(((x0 + x1) / 2, top - rh * 0.4, motif_r * 0.6))
        elif style == "mansard":
            d.polygon([(x0, top), (x0 + 0.1 * W, top - rh), (x1 - 0.1 * W, top - rh), (x1, top)],
                      fill=roof)
            windows(x0 + 0.15 * W, top - rh * 0.8, x1 - 0.15 * W, top - rh * 0.1, 1,
                    max(1, cols - 1), "round", 50)
            motif_at.append(((x0 + x1) / 2, top + rh * 0.4, motif_r * 0.6))
        elif style == "battlement":
            n = 2 * max(2, cols) + 1
            mw = (x1 - x0) / n
            for k in range(0, n, 2):
                d.rectangle([x0 + k * mw, 0, x0 + (k + 1) * mw, top], fill=wall)
            motif_at.append(((x0 + x1) / 2, top + rh * 0.6, motif_r * 0.6))
        else:  # flat
            d.rectangle([x0, 0, x1, top], fill=trim)
            motif_at.append(((x0 + x1) / 2, top + rh * 0.6, motif_r * 0.6))
        if kind == "castle":
            tw = 0.2 * W
            for tx0 in (0.0, W - tw):
                d.rectangle([tx0, rh * 0.25, tx0 + tw, H], fill=_shade(wall, 0.93))
                if fam["roof_style"] == "cones":
                    d.polygon([(tx0 - 2, rh * 0.25), (tx0 + tw / 2, 0), (tx0 + tw + 2, rh * 0.25)],
                              fill=roof)
                else:
                    for k in range(3):
                        d.rectangle([tx0 + k * tw / 2.5, 0, tx0 + k * tw / 2.5 + tw / 5, rh * 0.25],
                                    fill=_shade(wall, 0.93))
                windows(tx0, rh * 0.5, tx0 + tw, H * 0.8, max(2, rows), 1, "slit", 30)
        gf = fam["ground_floor"] * (H - top)
        windows(x0 + 0.04 * W, top + 0.06 * (H - top), x1 - 0.04 * W, H - gf, rows, cols)
        if inst["band"]:
            by = top + inst["band_at"] * (H - top - gf)
            details.append(("rect", [x0, by - 0.012 * H, x1, by + 0.012 * H], acc))
        dx, dy = door(x0, x1, H, gf * 0.9)
        motif_at.append((dx, dy - motif_r * 0.9, motif_r * 0.6))
        motif_at.append(((x0 + x1) / 2, top + 0.5 * (H - top - gf), motif_r))
    elif kind == "tower":
        style = fam["roof_style"]
        top = rh * 1.3 if style in ("spire", "pyramid") else rh * 0.6
        d.rectangle([0, top, W, H], fill=wall)
        if style == "spire":
            d.polygon([(0, top), (W / 2, 0), (W, top)], fill=roof)
        elif style == "pyramid":
            d.polygon([(0, top), (W * 0.35, top * 0.35), (W * 0.65, top * 0.35), (W, top)],
                      fill=roof)
            d.polygon([(W * 0.35, top * 0.35), (W / 2, 0), (W * 0.65, top * 0.35)], fill=roof)
        elif style == "dome":
            d.pieslice([0, 0, W, 2 * top], 180, 360, fill=roof)
        else:
            n = 5
            for k in range(0, n, 2):
                d.rectangle([k * W / n, 0, (k + 1) * W / n, top], fill=wall)
        clock_y = top + 0.12 * (H - top)
        motif_at.append((W / 2, clock_y, min(W * 0.33, motif_r * 1.2)))
        windows(0.1 * W, clock_y + motif_r * 1.4, 0.9 * W, H * 0.85, rows, cols)
        if inst["band"]:
            by = top + inst["band_at"] * (H - top)
            details.append(("rect", [0, by - 0.01 * H, W, by + 0.01 * H], acc))
        dx, dy = door(0, W, H, 0.1 * H)
        motif_at.append((W / 2, H * 0.55, motif_r * 0.6))
        motif_at.append((dx, dy - motif_r * 0.7, motif_r * 0.5))
    elif kind == "gate":
        top = rh * 0.9
        d.rectangle([0, top, W, H], fill=wall)
        style = fam["roof_style"]
        if style == "pediment":
            d.polygon([(0, top), (W / 2, 0), (W, top)], fill=roof)
        elif style == "statue":
            d.rectangle([W * 0.44, top * 0.2, W * 0.56, top], fill=_shade(roof, 0.8))
            d.ellipse([W * 0.45, 0, W * 0.55, top * 0.3], fill=_shade(roof, 0.8))
        else:  # attic
            d.rectangle([W * 0.1, top * 0.3, W * 0.9, top], fill=trim)
        aw = W * (0.3 + 0.04 * cols)
        ay = top + 0.33 * (H - top)
        d.rectangle([W / 2 - aw / 2, ay + aw / 2, W / 2 + aw / 2, H], fill=(0, 0, 0, 0))
        d.pieslice([W / 2 - aw / 2, ay, W / 2 + aw / 2, ay + aw], 180, 360, fill=(0, 0, 0, 0))
        for px in (0.06 * W, W / 2 - aw / 2 - 0.08 * W, W / 2 + aw / 2 + 0.02 * W, 0.88 * W):
            details.append(("rect", [px, top + 0.05 * H, px + 0.06 * W, H], trim))
        windows(0.02 * W, ay, W / 2 - aw / 2 - 0.1 * W, H * 0.9, rows + 1, 1, offset=5)
        windows(W / 2 + aw / 2 + 0.1 * W, ay, 0.98 * W, H * 0.9, rows + 1, 1, offset=9)
        if inst["band"]:
            details.append(("rect", [0, top + 0.02 * H, W, top + 0.05 * H], acc))
        motif_at.append((W / 2, top + 0.16 * (H - top), motif_r))
        motif_at.append((W / 2, top * 0.6, motif_r * 0.6))
        motif_at.append((0.25 * W, top + 0.16 * (H - top), motif_r * 0.6))
    elif kind == "dome":
        base = H * 0.5
        d.rectangle([0, base, W, H], fill=wall)
        dw = W * 0.5
        drum = base - H * 0.1
        d.rectangle([W / 2 - dw / 2, drum, W / 2 + dw / 2, base], fill=trim)
        if fam["roof_style"] == "onion":
            d.ellipse([W / 2 - dw / 2, drum - H * 0.3, W / 2 + dw / 2, drum + H * 0.02], fill=roof)
            d.polygon([(W / 2 - dw * 0.2, drum - H * 0.26), (W / 2, drum - H * 0.4),
                       (W / 2 + dw * 0.2, drum - H * 0.26)], fill=roof)
        else:
            d.pieslice([W / 2 - dw / 2, drum - H * 0.22, W / 2 + dw / 2, drum + H * 0.22], 180, 360,
                       fill=roof)
            d.rectangle([W / 2 - W * 0.03, drum - H * 0.3, W / 2 + W * 0.03, drum - H * 0.2],
                        fill=trim)
        windows(W / 2 - dw / 2, drum, W / 2 + dw / 2, base, 1, max(2, cols - 1), "arch", 40)
        windows(0.03 * W, base + 0.05 * H, 0.97 * W, H * 0.85, rows, cols)
        if inst["band"]:
            details.append(("rect", [0, base, W, base + 0.02 * H], acc))
        dx, dy = door(0, W, H, 0.12 * H)
        motif_at.append((W / 2, drum - H * 0.12, motif_r * 0.7))
        motif_at.append((W / 2, base + 0.08 * H, motif_r * 0.7))
        motif_at.append((dx, dy - motif_r * 0.6, motif_r * 0.5))
    else:  # temple
        ped = rh
        d.polygon([(0, ped), (W / 2, 0), (W, ped)], fill=roof)
        d.rectangle([0, ped, W, ped + 0.08 * H], fill=trim)
        d.rectangle([0, H - 0.1 * H, W, H], fill=_shade(wall, 0.9))
        for k in range(3):
            d.rectangle([k * 0.03 * W, H - (k + 1) * 0.033 * H, W - k * 0.03 * W,
                         H - k * 0.033 * H], fill=_shade(wall, 0.85 + 0.05 * k))
        cw = W / (2 * cols + 1)
        y0c, y1c = ped + 0.08 * H, H - 0.1 * H
        d.rectangle([0, y0c, W, y1c], fill=_shade(win, 1.3))
        for k in range(cols + 1):
            d.rectangle([2 * k * cw, y0c, (2 * k + 1) * cw, y1c], fill=wall)
        for k in range(cols):
            if inst["lit"][k]:
                details.append(("rect", [(2 * k + 1.3) * cw, y1c - 0.25 * (y1c - y0c),
                                         (2 * k + 1.7) * cw, y1c], lit))
        if inst["band"]:
            details.append(("rect", [0, ped + 0.03 * H, W, ped + 0.05 * H], acc))
        dx = W * (0.5 + 0.3 * (inst["door_pos"] - 0.5))
        details.append(("rect", [dx - cw * 0.4, y1c - 0.3 * (y1c - y0c), dx + cw * 0.4, y1c], acc2))
        motif_at.append((W / 2, ped * 0.6, min(ped * 0.35, motif_r)))
        motif_at.append((W / 2, ped + 0.04 * H, motif_r * 0.35))
        motif_at.append((W * 0.2, ped * 0.85, motif_r * 0.3))

    # Wall texture on everything drawn so far (silhouette), details stay crisp on top.
    arr = np.asarray(img).astype(np.float32)
    tex = _wall_texture(fam["texture"], W, H, fam["texture_scale"], seed_rng)
    arr[..., :3] *= tex[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGBA")
    d = ImageDraw.Draw(img)
    for item in details:
        if item[0] == "win":
            _draw_window(d, item[1], item[2], item[3], item[4], item[5], item[6], trim)
        elif item[0] == "rect":
            d.rectangle(item[1], fill=item[2])
        else:
            d.pieslice(item[1], 180, 360, fill=item[2])
    mx, my, mr = motif_at[inst["motif_pos"] % len(motif_at)]
    _draw_motif(d, inst["motif"], mx, my, mr, acc, acc2, inst["motif_angle"])
    if inst["flag"]:
        fx = inst["flag_x"] * W
        ys = np.nonzero(np.asarray(img)[:, int(min(W - 1, fx)), 3] > 0)[0]
        fy = float(ys[0]) if len(ys) else 0.0
        pole = max(4.0, 0.12 * H)
        if fy > pole * 0.8:
            d.line([fx, fy, fx, fy - pole], fill=(60, 60, 60), width=max(1, H // 120))
            d.rectangle([fx, fy - pole, fx + 0.5 * pole, fy - 0.6 * pole], fill=acc)
    return img


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------


class _Painter:
    """Draws foreground shapes on the scene and, identically, on an occlusion mask."""

    def __init__(self, scene: Image.Image):
        self.d = ImageDraw.Draw(scene)
        self.mask = Image.new("L", scene.size, 0)
        self.m = ImageDraw.Draw(self.mask)

    def polygon(self, pts, fill):
        self.d.polygon(pts, fill=fill)
        self.m.polygon(pts, fill=255)

    def rectangle(self, box, fill):
        self.d.rectangle(box, fill=fill)
        self.m.rectangle(box, fill=255)

    def ellipse(self, box, fill):
        self.d.ellipse(box, fill=fill)
        self.m.ellipse(box, fill=255)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amp: float) -> np.ndarray:
    small = rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32)
    img = Image.fromarray(small, "F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img) * amp


def _background(rng: np.random.Generator, C: int, horizon: float) -> Image.Image:
    sky_kind = rng.random()
    if sky_kind < 0.55:      # blue
        top = _hsv(rng.uniform(0.55, 0.63), rng.uniform(0.35, 0.7), rng.uniform(0.6, 0.95))
        hor = _hsv(rng.uniform(0.52, 0.6), rng.uniform(0.08, 0.25), rng.uniform(0.85, 1.0))
    elif sky_kind < 0.8:     # overcast
        v = rng.uniform(0.55, 0.85)
        top = np.array(_hsv(rng.uniform(0.5, 0.7), 0.06, v))
        hor = np.array(_hsv(rng.uniform(0.5, 0.7), 0.04, min(1, v + 0.1)))
    else:                    # dusk
        top = np.array(_hsv(rng.uniform(0.6, 0.75), rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6)))
        hor = np.array(_hsv(rng.uniform(0.02, 0.1), rng.uniform(0.4, 0.7), rng.uniform(0.75, 0.95)))
    ground_hues = ([0.25, 0.5, 0.5], [0.1, 0.15, 0.6], [0.0, 0.0, 0.5], [0.1, 0.4, 0.7],
                   [0.3, 0.4, 0.35])
    gh = ground_hues[int(rng.integers(len(ground_hues)))]
    ground = np.array(_hsv(gh[0] + rng.uniform(-0.03, 0.03), gh[1] * rng.uniform(0.7, 1.2),
                           gh[2] * rng.uniform(0.75, 1.2)), np.float32)
    # Drawn at half the canvas size and upsampled: sky and ground are smooth.
    n = max(8, C // 2)
    hy = int(np.clip(horizon, 0.05, 1.0) * n)
    top, hor = np.asarray(top, np.float32), np.asarray(hor, np.float32)
    t = (np.arange(n, dtype=np.float32) / max(1, hy))[:, None, None].clip(0, 1)
    arr = np.empty((n, n, 3), np.float32)
    arr[:] = top * (1 - t) + hor * t
    if hy < n:
        depth = np.linspace(0.85, 1.1, n - hy, dtype=np.float32)[:, None, None]
        tex = 1.0 + _smooth_noise(rng, n, 16, 0.08)[hy:, :, None]
        tex = tex + rng.normal(0, 0.05, (n - hy, n, 1)).astype(np.float32)
        arr[hy:] = ground * depth * tex
        if rng.random() < 0.5:  # a path / road
            x0 = rng.uniform(0.2, 0.6) * n
            xx = np.arange(n)[None, :]
            yy = np.arange(n - hy)[:, None] / max(1, n - hy)
            road = (xx > x0 - yy * 0.3 * n) & (xx < x0 + 0.15 * n + yy * 0.3 * n)
            arr[hy:][road] = arr[hy:][road] * 0.6 + 0.4 * np.asarray(_hsv(0.1, 0.08, 0.55))
    small = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return small.resize((C, C), Image.Resampling.BILINEAR)


def _back_clutter(img: Image.Image, rng: np.random.Generator, C: int, horizon: float,
                  amount: float) -> None:
    d = ImageDraw.Draw(img)
    hy = horizon * C
    for _ in range(int(rng.poisson(2 * amount))):  # clouds
        cx, cy = rng.uniform(0, C), rng.uniform(0, hy * 0.7)
        for _ in range(3):
            rx, ry = rng.uniform(0.05, 0.14) * C, rng.uniform(0.02, 0.05) * C
            ox = rng.uniform(-0.06, 0.06) * C
            d.ellipse([cx + ox - rx, cy - ry, cx + ox + rx, cy + ry], fill=_hsv(0.6, 0.03, 0.97))
    for _ in range(int(rng.poisson(3 * amount))):  # generic distant buildings
        bw, bh = rng.uniform(0.08, 0.3) * C, rng.uniform(0.08, 0.45) * C
        x0 = rng.uniform(-0.1, 1.0) * C
        y1 = hy + rng.uniform(0, 0.04) * C
        col = _hsv(rng.random(), rng.uniform(0.05, 0.4), rng.uniform(0.35, 0.85))
        d.rectangle([x0, y1 - bh, x0 + bw, y1], fill=col)
        if rng.random() < 0.4:
            d.polygon([(x0, y1 - bh), (x0 + bw / 2, y1 - bh - 0.3 * bw), (x0 + bw, y1 - bh)],
                      fill=_shade(col, 0.7))
        wc = _shade(col, rng.uniform(0.4, 0.7))
        step = max(4.0, rng.uniform(0.025, 0.05) * C)
        for yy in np.arange(y1 - bh + step / 2, y1 - step / 2, step):
            for xx in np.arange(x0 + step / 2, x0 + bw - step / 2, step):
                d.rectangle([xx, yy, xx + step * 0.45, yy + step * 0.5], fill=wc)
    for _ in range(int(rng.poisson(3 * amount))):  # trees at the horizon
        cx = rng.uniform(0, C)
        r = rng.uniform(0.03, 0.08) * C
        cy = hy - r * rng.uniform(0.2, 1.2)
        g = _hsv(rng.uniform(0.22, 0.36), rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.55))
        d.rectangle([cx - r * 0.1, cy, cx + r * 0.1, hy + 0.02 * C], fill=(70, 50, 35))
        for _ in range(4):
            ox, oy = rng.uniform(-0.6, 0.6) * r, rng.uniform(-0.6, 0.4) * r
            d.ellipse([cx + ox - r * 0.7, cy + oy - r * 0.7, cx + ox + r * 0.7, cy + oy + r * 0.7],
                      fill=g)


def _tree(p: _Painter, rng: np.random.Generator, x0, y0, x1, y1) -> None:
    """Foliage blobs filling the box (x0, y0, x1, y1)."""
    w, h = max(2.0, x1 - x0), max(2.0, y1 - y0)
    r = max(2.0, 0.3 * min(w, h) + 0.1 * max(w, h) * 0.3)
    greens = [_hsv(rng.uniform(0.2, 0.38), rng.uniform(0.45, 0.85), rng.uniform(0.18, 0.5))
              for _ in range(3)]
    nx, ny = max(1, int(math.ceil(w / r))), max(1, int(math.ceil(h / r)))
    for i in range(nx + 1):
        for j in range(ny + 1):
            cx = x0 + i * w / nx + rng.uniform(-0.3, 0.3) * r
            cy = y0 + j * h / ny + rng.uniform(-0.3, 0.3) * r
            rr = r * rng.uniform(0.75, 1.05)
            p.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], greens[(i + j) % 3])


def _occluder(p: _Painter, rng: np.random.Generator, C: int, box, frac: float) -> None:
    """Foreground occluder(s) covering about ``frac`` of the box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    kind = int(rng.integers(4))
    left = rng.random() < 0.5
    if kind == 0:  # a nearer building entering from one side
        cut = frac * w
        xa, xb = (-C, x0 + cut) if left else (x1 - cut, 2 * C)
        top = y0 + rng.uniform(-0.2, 0.1) * h
        col = _hsv(rng.random(), rng.uniform(0.05, 0.45), rng.uniform(0.3, 0.8))
        p.rectangle([xa, top, xb, 2 * C], col)
        wc = _shade(col, 0.5)
        step = max(4.0, 0.07 * C)
        for yy in np.arange(top + step / 2, C, step):
            for xx in np.arange(max(xa, -step), min(xb, C) - step * 0.6, step):
                p.rectangle([xx + step * 0.2, yy, xx + step * 0.65, yy + step * 0.55], wc)
    elif kind == 1:  # trees on one side
        cut = frac * w * 1.05
        xa, xb = (x0 - 0.1 * w, x0 + cut) if left else (x1 - cut, x1 + 0.1 * w)
        p.rectangle([(xa + xb) / 2 - 0.03 * w, y1 - 0.1 * h, (xa + xb) / 2 + 0.03 * w, 2 * C],
                    (70, 50, 35))
        _tree(p, rng, xa, y0 - 0.05 * h, xb, y1 + 0.05 * h)
    elif kind == 2:  # a wall, hedge or bus covering the bottom
        top = y1 - frac * h * 1.05
        if rng.random() < 0.5:
            _tree(p, rng, x0 - 0.15 * w, top, x1 + 0.15 * w, y1 + 0.2 * h)
            p.rectangle([x0 - 0.2 * w, top + 0.2 * (y1 - top), x1 + 0.2 * w, 2 * C],
                        _hsv(0.3, 0.6, 0.3))
        else:
            col = _hsv(rng.random(), rng.uniform(0.4, 0.9), rng.uniform(0.4, 0.9))
            p.rectangle([x0 - 0.3 * w, top, x1 + 0.3 * w, 2 * C], col)
            step = max(4.0, 0.1 * w)
            for xx in np.arange(x0 - 0.25 * w, x1 + 0.25 * w - step, step * 1.3):
                p.rectangle([xx, top + 0.1 * (y1 - top), xx + step, top + 0.45 * (y1 - top)],
                            _shade(col, 0.35))
    else:  # a billboard / truck in the middle
        s = math.sqrt(frac) * 1.05
        bw, bh = s * w, s * h
        cx = x0 + bw / 2 + rng.random() * max(0.0, w - bw)
        cy = y0 + bh / 2 + rng.random() * max(0.0, h - bh)
        col = _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.4, 0.95))
        p.rectangle([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], col)
        p.rectangle([cx - bw * 0.4, cy - bh * 0.1, cx + bw * 0.4, cy + bh * 0.1], _shade(col, 0.5))
        p.rectangle([cx - bw * 0.04, cy + bh / 2, cx + bw * 0.04, 2 * C], (60, 60, 60))


def _front_clutter(p: _Painter, rng: np.random.Generator, C: int, horizon: float,
                   amount: float) -> None:
    ground = horizon * C
    for _ in range(int(rng.poisson(2.5 * amount))):
        kind = rng.random()
        x = rng.uniform(0, C)
        y = rng.uniform(max(ground, 0.55 * C), 1.05 * C)
        s = (0.6 + 0.8 * (y - ground) / max(1.0, C - ground)) * C
        if kind < 0.5:  # person
            hh = 0.1 * s
            col = _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.2, 0.9))
            p.ellipse([x - hh * 0.18, y - hh * 0.85, x + hh * 0.18, y], col)
            p.ellipse([x - hh * 0.1, y - hh, x + hh * 0.1, y - hh * 0.8], (224, 180, 150))
        elif kind < 0.75:  # lamp post
            hh = 0.25 * s
            p.rectangle([x - 0.006 * s, y - hh, x + 0.006 * s, y], (40, 40, 45))
            p.ellipse([x - 0.02 * s, y - hh - 0.02 * s, x + 0.02 * s, y - hh + 0.01 * s],
                      (240, 230, 180))
        else:  # bush
            r = 0.05 * s
            _tree(p, rng, x - r, y - r, x + r, y)


def _homography(dst: np.ndarray, src: np.ndarray) -> tuple:
    """Coefficients of PIL's PERSPECTIVE transform mapping output points ``dst`` to ``src``."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for k, ((x, y), (u, v)) in enumerate(zip(dst, src)):
        a[2 * k] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * k + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * k], b[2 * k + 1] = u, v
    return tuple(float(c) for c in np.linalg.solve(a, b))


_HARD_FACTORS = ("occlusion", "crop", "rotation", "perspective", "scale", "blur", "light")
# From just past the hard threshold of LABEL_RULES to the strongest a hard view gets.
_HARD_RANGES = {"occlusion": (0.38, 0.6), "crop": (0.38, 0.58), "rotation": (20.0, 32.0),
                "perspective": (0.64, 0.45), "scale": (0.42, 0.3), "blur": (1.3, 2.0),
                "light": (0.55, 0.38)}


def _sample_view(rng: np.random.Generator, level: str) -> dict[str, Any]:
    """Random view parameters aimed at a target label (``query`` = a clean, easy view)."""
    v = {"extent": rng.uniform(0.55, 0.88), "rotation": rng.uniform(-6, 6),
         "yaw": rng.uniform(0.82, 1.0), "pitch": rng.uniform(0.85, 1.0),
         "crop": 0.0, "occlusion": 0.0 if rng.random() < 0.6 else rng.uniform(0.0, 0.12),
         "blur": rng.uniform(0.0, 0.6), "gain": rng.uniform(0.8, 1.2),
         "cast": rng.uniform(-0.06, 0.06, 3), "gamma": rng.uniform(0.9, 1.1),
         "noise": rng.uniform(0.0, 3.0), "clutter": rng.uniform(0.3, 1.2)}
    if level == "query":
        v.update(extent=rng.uniform(0.5, 0.8), occlusion=0.0, blur=rng.uniform(0, 0.4))
    elif level == "hard":
        # One strong transformation, or two milder ones (each just past its hard threshold).
        n = 1 if rng.random() < 0.6 else 2
        reach = 1.0 if n == 1 else 0.55
        picks = rng.choice(len(_HARD_FACTORS), size=n, replace=False)
        chosen = {_HARD_FACTORS[int(i)] for i in picks}
        if {"occlusion", "crop"} <= chosen:     # both would make it junk too often
            chosen.discard("crop")
        for f in sorted(chosen):
            lo, hi = _HARD_RANGES[f]
            x = lo + (hi - lo) * reach * rng.random()
            if f == "rotation":
                v["rotation"] = x * rng.choice([-1.0, 1.0])
            elif f == "perspective":
                v["yaw"] = x
                v["pitch"] = rng.uniform(0.8, 1.0)
            elif f == "light":
                v["gain"] = x if rng.random() < 0.6 else 2.1 - x  # dark, or as much too bright
                v["cast"] = rng.uniform(-0.15, 0.15, 3)
            else:
                v[{"scale": "extent"}.get(f, f)] = x
    elif level == "junk":
        f = int(rng.integers(3))
        if f == 0:
            v["extent"] = rng.uniform(0.1, 0.19)
        elif f == 1:
            v["occlusion"] = rng.uniform(0.88, 1.0)
        else:
            v["crop"] = rng.uniform(0.86, 0.95)
        if rng.random() < 0.5:
            v["rotation"] = rng.uniform(-25, 25)
            v["blur"] = rng.uniform(0.0, 1.5)
    v["cast"] = [float(c) for c in v["cast"]]
    return {k: (float(x) if isinstance(x, (float, np.floating)) else x) for k, x in v.items()}


def _label(m: dict[str, float], v: dict[str, Any]) -> str:
    rules = LABEL_RULES
    if m["visible"] < rules["junk_visible"] or m["extent"] < rules["junk_extent"]:
        return "junk"
    if (m["visible"] < rules["hard_visible"] or m["extent"] < rules["hard_extent"]
            or abs(v["rotation"]) > rules["hard_rotation"]
            or min(v["yaw"], v["pitch"]) < rules["hard_perspective"]
            or v["blur"] >= rules["hard_blur"]
            or not rules["hard_gain_low"] <= v["gain"] <= rules["hard_gain_high"]):
        return "hard"
    return "easy"


def _render(rng: np.random.Generator, size: int, tex: Optional[Image.Image],
            v: dict[str, Any], alpha_fraction: float = 1.0
            ) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one photograph (``size`` × ``size`` RGB) of the landmark texture ``tex`` (or of no
    landmark), and measure what is visible of it."""
    ss = _SUPERSAMPLE
    C = size * ss
    meas: dict[str, Any] = {"visible": 0.0, "extent": 0.0, "bbox": None}
    quad = None
    if tex is not None:
        tw, th = tex.size
        # Object box before rotation: its longest side is `extent` of the image.
        scale = v["extent"] * C / max(tw, th)
        w, h = tw * scale, th * scale
        yaw, pitch = v["yaw"], v["pitch"]
        # Perspective: one vertical edge shrinks to `yaw`, the top edge to `pitch` (converging
        # verticals of a photo taken from the ground); widths foreshorten with the yaw.
        w_eff = w * (0.55 + 0.45 * yaw)
        far = rng.random() < 0.5
        ly, ry = (yaw, 1.0) if far else (1.0, yaw)
        pts = np.array([[-w_eff / 2 * pitch, -h / 2 * ly], [w_eff / 2 * pitch, -h / 2 * ry],
                        [w_eff / 2, h / 2 * ry], [-w_eff / 2, h / 2 * ly]])
        a = math.radians(v["rotation"])
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        pts = pts @ rot.T
        bw = pts[:, 0].max() - pts[:, 0].min()
        bh = pts[:, 1].max() - pts[:, 1].min()
        if v["crop"] > 0:  # push a fraction `crop` of the box out through one edge
            side = int(rng.integers(4))
            cx = rng.uniform(bw / 2, max(bw / 2, C - bw / 2)) if bw < C else C / 2
            cy = rng.uniform(bh / 2, max(bh / 2, C - bh / 2)) if bh < C else C / 2
            if side == 0:
                cx = -bw / 2 + (1 - v["crop"]) * bw
            elif side == 1:
                cx = C + bw / 2 - (1 - v["crop"]) * bw
            elif side == 2:
                cy = -bh / 2 + (1 - v["crop"]) * bh
            else:
                cy = C + bh / 2 - (1 - v["crop"]) * bh
        else:
            m = 0.02 * C
            cx = rng.uniform(m + bw / 2, C - m - bw / 2) if bw + 2 * m < C else C / 2
            cy = rng.uniform(m + bh / 2, C - m - bh / 2) if bh + 2 * m < C else C / 2
        quad = pts + np.array([cx, cy])
        horizon = float(np.clip((quad[:, 1].max() - rng.uniform(0.0, 0.08) * C) / C, 0.3, 0.95))
    else:
        horizon = float(rng.uniform(0.45, 0.85))

    scene = _background(rng, C, horizon)
    _back_clutter(scene, rng, C, horizon, v["clutter"])
    obj_mask = None
    if tex is not None and quad is not None:
        src = np.array([[0, 0], [tex.size[0], 0], [tex.size[0], tex.size[1]], [0, tex.size[1]]],
                       float)
        shrink = max(tex.size) / max(1.0, np.ptp(quad, axis=0).max())
        level = 1
        while shrink >= 2 * level and level < 8:
            level *= 2
        t = tex if level == 1 else tex.reduce(level)
        # Warp only the landmark's box (clipped to the canvas), then paste it there.
        bx0, by0 = (max(0, int(math.floor(c))) for c in quad.min(axis=0))
        bx1, by1 = (min(C, int(math.ceil(c)) + 1) for c in quad.max(axis=0))
        if bx1 > bx0 and by1 > by0:
            coeffs = _homography(quad - np.array([bx0, by0]), src / level)
            warped = t.transform((bx1 - bx0, by1 - by0), Image.Transform.PERSPECTIVE, coeffs,
                                 Image.Resampling.BILINEAR)
            scene.paste(warped, (bx0, by0), warped)
            region = np.asarray(warped.getchannel("A")) > 127
        else:
            bx0 = by0 = 0
            region = np.zeros((0, 0), bool)
        obj_mask = (bx0, by0, region)
        qx, qy = quad[:, 0], quad[:, 1]
        quad_area = 0.5 * abs(np.dot(qx, np.roll(qy, 1)) - np.dot(qy, np.roll(qx, 1)))
        full_area = quad_area * alpha_fraction
        meas["extent"] = float(max(np.ptp(qx), np.ptp(qy)) / C)

    p = _Painter(scene)
    if tex is not None and quad is not None and v["occlusion"] > 0:
        box = (quad[:, 0].min(), quad[:, 1].min(), quad[:, 0].max(), quad[:, 1].max())
        _occluder(p, rng, C, box, v["occlusion"])
    _front_clutter(p, rng, C, horizon, v["clutter"])

    if obj_mask is not None:
        bx0, by0, region = obj_mask
        occluded = np.asarray(p.mask)[by0:by0 + region.shape[0], bx0:bx0 + region.shape[1]]
        visible = region & (occluded == 0)
        count = int(visible.sum())
        meas["visible"] = float(min(1.0, count / max(1.0, full_area)))
        if count:
            cols = np.nonzero(visible.any(axis=0))[0]
            rows = np.nonzero(visible.any(axis=1))[0]
            meas["bbox"] = [float(bx0 + cols[0]) / ss, float(by0 + rows[0]) / ss,
                            float(bx0 + cols[-1] + 1) / ss, float(by0 + rows[-1] + 1) / ss]

    img = scene.reduce(ss)
    # Illumination as a per-channel lookup table: gain * (1 + cast) * x ** gamma.
    x = np.arange(256, dtype=np.float64) / 255.0
    lut = np.concatenate([np.clip(255.0 * v["gain"] * (1.0 + c) * x ** v["gamma"] + 0.5, 0, 255)
                          for c in v["cast"]]).astype(np.uint8)
    img = img.point(lut.tolist())
    if v["blur"] > 0.05:  # sigma in pixels of a 128-pixel image
        img = img.filter(ImageFilter.GaussianBlur(v["blur"] * size / 128.0))
    if v["noise"] > 0:
        arr = np.asarray(img).astype(np.float32)
        # Luminance noise (one field for the three channels).
        arr += rng.standard_normal(arr.shape[:2] + (1,), dtype=np.float32) * np.float32(v["noise"])
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
    return img, meas


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


@dataclass
class SyntheticInfo:
    """Where a generated benchmark lives and what it holds.

    ``dir`` = ``<root>/<name>`` (load it with ``RevisitedDataset(root, name)``), ``gnd_file``,
    ``image_dir`` (``dir/jpg``), ``train_list`` (``dir/train.txt``, see :func:`read_train_list`),
    ``meta_file`` (``dir/meta.json``), ``counts`` (database, views, distractors, queries,
    instances, families, train_images, train_instances, and easy/hard/junk totals),
    ``generated`` (False when an identical existing dataset was reused), ``seconds`` spent.
    """

    root: Path
    name: str
    seed: int
    config: dict[str, Any]
    counts: dict[str, int]
    generated: bool
    seconds: float
    dir: Path = field(init=False)
    gnd_file: Path = field(init=False)
    image_dir: Path = field(init=False)
    train_list: Path = field(init=False)
    meta_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir = self.root / self.name
        self.gnd_file = self.dir / f"gnd_{self.name}.pkl"
        self.image_dir = self.dir / "jpg"
        self.train_list = self.dir / "train.txt"
        self.meta_file = self.dir / "meta.json"


def read_train_list(path: PathLike) -> tuple[list[Path], list[int]]:
    """Parse a ``train.txt``: ``(absolute image paths, instance ids)`` in file order."""
    path = Path(path)
    paths, labels = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected '<path> <instance_id>', got {line!r}")
            paths.append(path.parent / parts[0])
            labels.append(int(parts[1]))
    return paths, labels


def _landmark_of(seed: int, role: int, fam_role: int, f: int, i: int, tex_height: int
                 ) -> tuple[dict, dict, Image.Image, float]:
    """Family and instance parameters, texture and its opaque fraction, from (seed, roles, f, i)."""
    fam = _family_params(_rng(seed, fam_role, f))
    rng = _rng(seed, role, fam_role, f, i)
    inst = _instance_params(fam, rng)
    tex = _landmark(fam, inst, tex_height, rng)
    alpha = float((np.asarray(tex.getchannel("A")) > 127).mean())
    return fam, inst, tex, alpha


def _render_for_label(rng: np.random.Generator, size: int, tex: Image.Image, alpha: float,
                      target: str, tries: int, accept: Sequence[str]
                      ) -> tuple[Image.Image, dict, dict, str]:
    last = None
    for _ in range(tries):
        v = _sample_view(rng, target)
        img, meas = _render(rng, size, tex, v, alpha)
        label = _label(meas, v)
        last = (img, v, meas, label)
        if label in accept:
            return last
    assert last is not None
    return last


def _save_jpeg(img: Image.Image, path: Path, quality: int) -> None:
    img.save(path, "JPEG", quality=quality, optimize=False, progressive=False, subsampling=0)


def _bench_unit(out: Path, seed: int, cfg: dict[str, Any], f: int, i: int,
                names: Sequence[str], qnames: Sequence[str]) -> dict[str, Any]:
    """All database views and queries of benchmark instance (f, i)."""
    size, quality = cfg["image_size"], cfg["jpeg_quality"]
    fam, inst, tex, alpha = _landmark_of(seed, _R_INSTANCE, _R_FAMILY, f, i, _tex_height(size))
    uid = f * cfg["instances_per_family"] + i
    levels = _view_levels(cfg["views_per_instance"], cfg["view_mix"])
    forced = ({levels.index(x) for x in ("easy", "hard") if x in levels} if len(levels) >= 2
              else set())
    views = []
    for k, target in enumerate(levels):
        rng = _rng(seed, _R_VIEW, f, i, k)
        tries = _FORCED_TRIES if k in forced else _TRIES
        img, v, meas, label = _render_for_label(rng, size, tex, alpha, target, tries, (target,))
        if k in forced and label != target:
            raise RuntimeError(f"could not draw a {target} view of instance {uid}")
        _save_jpeg(img, out / "jpg" / f"{names[k]}.jpg", quality)
        views.append({"instance": uid, "family": f, "label": label, "target": target,
                      "visible": meas["visible"], "extent": meas["extent"],
                      "kind": fam["kind"], "view": _view_record(v)})
    queries = []
    for q, qname in enumerate(qnames):
        rng = _rng(seed, _R_QUERY, f, i, q)
        for _ in range(_FORCED_TRIES):
            v = _sample_view(rng, "query")
            img, meas = _render(rng, size, tex, v, alpha)
            if meas["bbox"] is not None and _label(meas, v) == "easy":
                break
        else:
            raise RuntimeError(f"could not draw a query of instance {uid}")
        x1, y1, x2, y2 = meas["bbox"]
        bbx = [max(0.0, x1 - 1.0), max(0.0, y1 - 1.0), min(float(size), x2 + 1.0),
               min(float(size), y2 + 1.0)]
        _save_jpeg(img, out / "jpg" / f"{qname}.jpg", quality)
        queries.append({"instance": uid, "family": f, "bbx": bbx, "kind": fam["kind"]})
    return {"views": views, "queries": queries, "fingerprint": _fingerprint(fam, inst)}


def _distractor_unit(out: Path, seed: int, cfg: dict[str, Any], k0: int,
                     names: Sequence[str]) -> dict[str, Any]:
    """Distractors k0, k0 + 1, ...: clutter, or a building that is no benchmark instance."""
    size, quality = cfg["image_size"], cfg["jpeg_quality"]
    entries = []
    for k, name in enumerate(names, start=k0):
        rng = _rng(seed, _R_DISTRACTOR, k)
        v = _sample_view(rng, "easy" if rng.random() < 0.7 else "hard")
        v["occlusion"] = min(v["occlusion"], 0.3)
        v["clutter"] = float(rng.uniform(0.6, 2.0))
        what = rng.random()
        tex, alpha, kind, fp = None, 1.0, None, None
        if what < 0.6:
            # Half are new instances of the benchmark's families (hard negatives), half of
            # families of their own.
            if what < 0.3:
                fam_role, f = _R_FAMILY, int(rng.integers(cfg["families"]))
            else:
                fam_role, f = _R_DISTRACTOR_FAMILY, k
            fam, inst, tex, alpha = _landmark_of(seed, _R_DISTRACTOR_BUILDING, fam_role, f, k,
                                                 _tex_height(size))
            kind, fp = fam["kind"], _fingerprint(fam, inst)
        img, _ = _render(rng, size, tex, v, alpha)
        _save_jpeg(img, out / "jpg" / f"{name}.jpg", quality)
        entries.append({"instance": -1, "family": -1, "label": "distractor", "kind": kind,
                        "fingerprint": fp})
    return {"views": entries}


def _train_unit(out: Path, seed: int, cfg: dict[str, Any], f: int, i: int) -> dict[str, Any]:
    """The training views of training instance (f, i)."""
    size, quality = cfg["image_size"], cfg["jpeg_quality"]
    fam, inst, tex, alpha = _landmark_of(seed, _R_TRAIN_INSTANCE, _R_TRAIN_FAMILY, f, i,
                                         _tex_height(size))
    uid = f * cfg["train_instances_per_family"] + i
    lines, meta = [], []
    for k in range(cfg["train_views_per_instance"]):
        rng = _rng(seed, _R_TRAIN_VIEW, f, i, k)
        target = "hard" if rng.random() < cfg["train_hard_fraction"] else "easy"
        img, v, meas, label = _render_for_label(rng, size, tex, alpha, target, _TRIES,
                                                (target, "easy", "hard"))
        rel = f"train/t{uid:04d}_{k:02d}.jpg"
        _save_jpeg(img, out / rel, quality)
        lines.append(f"{rel} {uid}\n")
        meta.append({"path": rel, "instance": uid, "family": f, "label": label,
                     "kind": fam["kind"], "visible": meas["visible"], "extent": meas["extent"],
                     "view": _view_record(v)})
    return {"lines": lines, "train": meta, "fingerprint": _fingerprint(fam, inst)}


def _view_record(v: dict[str, Any]) -> dict[str, float]:
    """The transformation parameters of a view, for meta.json."""
    keys = ("extent", "rotation", "yaw", "pitch", "crop", "occlusion", "blur", "gain")
    return {k: round(float(v[k]), 4) for k in keys}


def _run_unit(job: tuple) -> dict[str, Any]:
    kind, *args = job
    units = {"bench": _bench_unit, "distractors": _distractor_unit, "train": _train_unit}
    return units[kind](*args)


def _tex_height(size: int) -> int:
    return int(round(1.6 * size * _SUPERSAMPLE / 2))


_DISTRACTOR_CHUNK = 25


def _build(out: Path, name: str, seed: int, cfg: dict[str, Any], workers: int = 1
           ) -> dict[str, Any]:
    (out / "jpg").mkdir(parents=True)
    (out / "train").mkdir()
    F, I, V = cfg["families"], cfg["instances_per_family"], cfg["views_per_instance"]
    Q, D = cfg["queries_per_instance"], cfg["distractors"]
    n_db = F * I * V + D
    # Database entry j (views instance by instance, then distractors) is imlist[position[j]].
    position = np.empty(n_db, np.int64)
    position[_rng(seed, _R_ORDER).permutation(n_db)] = np.arange(n_db)
    imlist = [f"im{p:05d}" for p in range(n_db)]
    qimlist = [f"q{q:04d}" for q in range(F * I * Q)]
    names = [imlist[p] for p in position]

    jobs: list[tuple] = []
    for f in range(F):
        for i in range(I):
            u = f * I + i
            jobs.append(("bench", out, seed, cfg, f, i, names[u * V:(u + 1) * V],
                         qimlist[u * Q:(u + 1) * Q]))
    for k0 in range(0, D, _DISTRACTOR_CHUNK):
        k1 = min(D, k0 + _DISTRACTOR_CHUNK)
        jobs.append(("distractors", out, seed, cfg, k0, names[F * I * V + k0:F * I * V + k1]))
    for f in range(cfg["train_families"]):
        for i in range(cfg["train_instances_per_family"]):
            jobs.append(("train", out, seed, cfg, f, i))

    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        # fork: workers need only numpy and PIL, and must not re-import the caller's modules.
        method = "fork" if "fork" in mp.get_all_start_methods() else None
        with mp.get_context(method).Pool(min(workers, len(jobs))) as pool:
            results = pool.map(_run_unit, jobs, chunksize=1)
    else:
        results = [_run_unit(job) for job in jobs]

    entries: list[dict[str, Any]] = []
    queries: list[dict[str, Any]] = []
    lines: list[str] = []
    train_meta: list[dict[str, Any]] = []
    fp_bench, fp_train, fp_distractors = [], [], []
    for job, res in zip(jobs, results):
        if job[0] == "bench":
            entries += res["views"]
            queries += res["queries"]
            fp_bench.append(res["fingerprint"])
        elif job[0] == "distractors":
            entries += res["views"]
            fp_distractors += [e.pop("fingerprint") for e in res["views"]]
        else:
            lines += res["lines"]
            train_meta += res["train"]
            fp_train.append(res["fingerprint"])
    database: list[dict[str, Any]] = [{}] * n_db
    for j, entry in enumerate(entries):
        database[position[j]] = entry

    by_instance: dict[int, dict[str, list[int]]] = {}
    for idx, entry in enumerate(database):
        if entry["instance"] >= 0:
            lists = by_instance.setdefault(entry["instance"], {"easy": [], "hard": [], "junk": []})
            lists[entry["label"]].append(idx)
    gnd = []
    for q in queries:
        lists = by_instance.get(q["instance"], {"easy": [], "hard": [], "junk": []})
        gnd.append({"bbx": [float(x) for x in q["bbx"]], "easy": sorted(lists["easy"]),
                    "hard": sorted(lists["hard"]), "junk": sorted(lists["junk"])})
    with open(out / f"gnd_{name}.pkl", "wb") as fh:
        pickle.dump({"gnd": gnd, "imlist": imlist, "qimlist": qimlist}, fh, protocol=4)
    with open(out / "train.txt", "w") as fh:
        fh.writelines(lines)

    labels = [e["label"] for e in database]
    counts = {
        "database": n_db, "views": F * I * V, "distractors": D, "queries": len(queries),
        "instances": F * I, "families": F,
        "easy": labels.count("easy"), "hard": labels.count("hard"), "junk": labels.count("junk"),
        "train_images": len(lines),
        "train_instances": cfg["train_families"] * cfg["train_instances_per_family"],
        "train_families": cfg["train_families"],
    }
    meta = {"version": VERSION, "seed": seed, "label_rules": LABEL_RULES, "database": database,
            "queries": queries, "train": train_meta,
            "fingerprints": {"benchmark": fp_bench, "train": fp_train,
                             "distractors": [fp for fp in fp_distractors if fp is not None]}}
    with open(out / "meta.json", "w") as fh:
        json.dump(meta, fh, separators=(",", ":"))
    return counts


def _record(seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    return {"version": VERSION, "seed": int(seed), "config": cfg}


def _existing(dir: Path, name: str, record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The stored JSON of ``dir`` if it holds exactly ``record``'s dataset, complete."""
    try:
        with open(dir / "synthetic.json") as fh:
            stored = json.load(fh)
    except (OSError, ValueError):
        return None
    # A damaged file (a list, null, counts of another shape) describes no dataset to reuse.
    if not isinstance(stored, dict) or {k: stored.get(k) for k in record} != record:
        return None
    counts = stored.get("counts")
    if not isinstance(counts, dict):
        return None
    try:
        n_jpg = len(os.listdir(dir / "jpg"))
        n_train = len(os.listdir(dir / "train"))
    except OSError:
        return None
    if (n_jpg != counts.get("database", -1) + counts.get("queries", -1)
            or n_train != counts.get("train_images", -1)
            or not (dir / f"gnd_{name}.pkl").is_file() or not (dir / "train.txt").is_file()):
        return None
    return stored


def generate(root: PathLike, name: str = "synthetic", *, seed: int = 0, preset: str = "default",
             force: bool = False, workers: int = 1, **overrides: Any) -> SyntheticInfo:
    """Generate (or reuse) the synthetic benchmark ``<root>/<name>`` and its training split.

    Args:
        root: folder receiving ``<root>/<name>/`` (created if needed).
        name: dataset name, used for the folder and ``gnd_<name>.pkl``.
        seed: everything is a deterministic function of ``(seed, config)``.
        preset: ``"default"`` (128 px; 8 families × 6 instances × 8 views, 2 queries each,
            300 distractors; training 8 × 10 instances × 10 views: 1580 images) or ``"quick"``
            (96 px; 5 × 4 × 5, 2 queries each, 60 distractors; training 6 × 6 × 6: 416 images).
            See :data:`PRESETS`.
        force: regenerate even if an identical dataset exists.
        workers: processes rendering in parallel (forked; the files do not depend on it).
        **overrides: any :data:`PRESETS` key (``image_size``, ``families``,
            ``instances_per_family``, ``views_per_instance``, ``queries_per_instance``,
            ``distractors``, ``train_families``, ``train_instances_per_family``,
            ``train_views_per_instance``, ``view_mix`` = target easy/hard/junk shares,
            ``train_hard_fraction``, ``jpeg_quality``).

    Returns:
        :class:`SyntheticInfo`. An existing ``<root>/<name>`` with the same version, seed and config
        (``synthetic.json``) is reused (``generated=False``); one with another config is replaced;
        a folder that is not a synthetic dataset raises ``FileExistsError``. Files are written to
        a temporary sibling folder that is renamed into place only when complete.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not name or os.sep in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"invalid dataset name {name!r}")
    cfg = synthetic_config(preset, **overrides)
    record = _record(int(seed), cfg)
    root = Path(root).expanduser()
    target = root / name
    start = time.perf_counter()
    if target.exists() and not force:
        stored = _existing(target, name, record)
        if stored is not None:
            return SyntheticInfo(root, name, int(seed), cfg, stored["counts"], False,
                                 time.perf_counter() - start)
    if target.exists() and not (target / "synthetic.json").is_file():
        raise FileExistsError(f"{target} exists and is not a synthetic dataset "
                              f"(no synthetic.json): refusing to replace it")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        counts = _build(tmp, name, int(seed), cfg, workers=int(workers))
        with open(tmp / "synthetic.json", "w") as fh:
            json.dump({**record, "counts": counts}, fh, indent=1, sort_keys=True)
        old = None
        if target.exists():
            old = root / f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            # Someone else finished the same dataset meanwhile: keep theirs if it matches.
            if old is not None and not target.exists():
                os.rename(old, target)
                old = None
            if _existing(target, name, record) is None:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return SyntheticInfo(root, name, int(seed), cfg, counts, True, time.perf_counter() - start)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fastap.datasets.synthetic ROOT [--name N] [--seed S] [--preset P] [--force]
    [--workers W]``."""
    p = argparse.ArgumentParser(prog="python -m fastap.datasets.synthetic",
                                description="Generate the synthetic revisitop-layout benchmark.")
    p.add_argument("root")
    p.add_argument("--name", default="synthetic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--force", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    info = generate(args.root, args.name, seed=args.seed, preset=args.preset, force=args.force,
                    workers=args.workers)
    state = "generated" if info.generated else "reused"
    print(f"{state} {info.dir} in {info.seconds:.1f} s: {json.dumps(info.counts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
