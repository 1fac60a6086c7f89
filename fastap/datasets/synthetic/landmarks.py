"""Landmarks: a family's style and an instance's details, drawn as an RGBA texture."""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .config import KINDS


# ----------------------------------------------------------------------------------------------
# Colours
# ----------------------------------------------------------------------------------------------


def hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def shade(c: Sequence[int], f: float) -> tuple[int, int, int]:
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


def family_params(rng: np.random.Generator) -> dict[str, Any]:
    kind = KINDS[int(rng.integers(len(KINDS)))]
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


def instance_params(fam: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
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


def instance_fingerprint(fam: dict[str, Any], inst: dict[str, Any]) -> str:
    text = json.dumps({"family": fam, "instance": inst}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _draw_motif(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
                c1: tuple, c2: tuple, angle: float) -> None:
    if r < 1.5:
        return
    box = [cx - r, cy - r, cx + r, cy + r]
    lw = max(1, int(r / 6))
    if kind == "rosette":
        d.ellipse(box, fill=c1, outline=shade(c1, 0.5), width=lw)
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


class _Sketch:
    """A landmark being drawn: its size, colours and silhouette so far, the details deferred until
    after the wall texture, and the places its motif may go."""

    def __init__(self, fam: dict[str, Any], inst: dict[str, Any], height: int):
        self.fam, self.inst, self.kind = fam, inst, fam["kind"]
        self.H = H = int(height)
        self.W = W = max(8, int(round(fam["aspect"] * H)))
        self.wall = hsv(*inst["wall"])
        self.trim = shade(self.wall, fam["trim_shade"])
        self.roof = hsv(*fam["roof"])
        self.win = hsv(*fam["window"])
        self.lit = (250, 214, 120)
        self.acc, self.acc2 = hsv(*inst["accent"]), hsv(*inst["accent2"])
        self.rows, self.cols = inst["rows"], inst["cols"]
        self.img = Image.new("RGBA", (W, H), (0, 0, 0, 0))
        self.d = ImageDraw.Draw(self.img)
        self.rh = fam["roof_height"] * H
        self.details: list = []  # deferred drawing calls (after the wall texture)
        self.motif_r = 0.07 * min(W, H) + 0.03 * H
        self.motif_at: list[tuple[float, float, float]] = []

    def windows(self, x0, y0, x1, y1, nr, nc, style=None, offset=0):
        """A grid of nr × nc windows in the box, lit by the instance's pattern, with shutters."""
        fam, inst, win, lit, acc = self.fam, self.inst, self.win, self.lit, self.acc
        style = fam["window_style"] if style is None else style
        cw, ch = (x1 - x0) / nc, (y1 - y0) / nr
        for r in range(nr):
            for c in range(nc):
                cx, cy = x0 + (c + 0.5) * cw, y0 + (r + 0.5) * ch
                on = inst["lit"][(offset + r * nc + c) % len(inst["lit"])]
                ww, hh = cw * fam["window_w"], ch * fam["window_h"]
                self.details.append(("win", style, cx, cy, ww, hh, lit if on else win))
                if inst["shutters"] and style in ("rect", "arch", "double"):
                    sw = ww * 0.28
                    self.details.append(("rect", [cx - ww / 2 - sw, cy - hh / 2, cx - ww / 2,
                                                  cy + hh / 2], acc))
                    self.details.append(("rect", [cx + ww / 2, cy - hh / 2, cx + ww / 2 + sw,
                                                  cy + hh / 2], acc))

    def door(self, x0, x1, y1, hfrac):
        """An arched door on the ground line y1 between x0 and x1; returns its arch's top."""
        dw = min((x1 - x0) * 0.22, 0.3 * self.W)
        cx = x0 + dw / 2 + self.inst["door_pos"] * (x1 - x0 - dw)
        dh = hfrac
        self.details.append(("rect", [cx - dw / 2, y1 - dh, cx + dw / 2, y1], self.acc2))
        self.details.append(("pie", [cx - dw / 2, y1 - dh - dw / 2, cx + dw / 2,
                                     y1 - dh + dw / 2], self.acc2))
        return cx, y1 - dh - dw / 2


def _draw_facade_or_castle(s: _Sketch) -> None:
    """A facade (full width) or a castle (a central block between two towers)."""
    fam, inst, W, H, d, rh, wall, trim = s.fam, s.inst, s.W, s.H, s.d, s.rh, s.wall, s.trim
    roof, acc, rows, cols, details, motif_r = s.roof, s.acc, s.rows, s.cols, s.details, s.motif_r
    motif_at, windows, door, kind = s.motif_at, s.windows, s.door, s.kind
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
            d.rectangle([tx0, rh * 0.25, tx0 + tw, H], fill=shade(wall, 0.93))
            if fam["roof_style"] == "cones":
                d.polygon([(tx0 - 2, rh * 0.25), (tx0 + tw / 2, 0), (tx0 + tw + 2, rh * 0.25)],
                          fill=roof)
            else:
                for k in range(3):
                    d.rectangle([tx0 + k * tw / 2.5, 0, tx0 + k * tw / 2.5 + tw / 5, rh * 0.25],
                                fill=shade(wall, 0.93))
            windows(tx0, rh * 0.5, tx0 + tw, H * 0.8, max(2, rows), 1, "slit", 30)
    gf = fam["ground_floor"] * (H - top)
    windows(x0 + 0.04 * W, top + 0.06 * (H - top), x1 - 0.04 * W, H - gf, rows, cols)
    if inst["band"]:
        by = top + inst["band_at"] * (H - top - gf)
        details.append(("rect", [x0, by - 0.012 * H, x1, by + 0.012 * H], acc))
    dx, dy = door(x0, x1, H, gf * 0.9)
    motif_at.append((dx, dy - motif_r * 0.9, motif_r * 0.6))
    motif_at.append(((x0 + x1) / 2, top + 0.5 * (H - top - gf), motif_r))


def _draw_tower(s: _Sketch) -> None:
    """A tower: a tall body under a spire, pyramid, dome or crenellation, with a clock."""
    fam, inst, W, H, d, rh, wall, roof = s.fam, s.inst, s.W, s.H, s.d, s.rh, s.wall, s.roof
    acc, rows, cols, details, motif_r = s.acc, s.rows, s.cols, s.details, s.motif_r
    motif_at, windows, door = s.motif_at, s.windows, s.door
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


def _draw_gate(s: _Sketch) -> None:
    """A triumphal gate: an arched opening under a pediment, statue or attic."""
    fam, inst, W, H, d, rh, wall, trim = s.fam, s.inst, s.W, s.H, s.d, s.rh, s.wall, s.trim
    roof, acc, rows, cols, details, motif_r = s.roof, s.acc, s.rows, s.cols, s.details, s.motif_r
    motif_at, windows = s.motif_at, s.windows
    top = rh * 0.9
    d.rectangle([0, top, W, H], fill=wall)
    style = fam["roof_style"]
    if style == "pediment":
        d.polygon([(0, top), (W / 2, 0), (W, top)], fill=roof)
    elif style == "statue":
        d.rectangle([W * 0.44, top * 0.2, W * 0.56, top], fill=shade(roof, 0.8))
        d.ellipse([W * 0.45, 0, W * 0.55, top * 0.3], fill=shade(roof, 0.8))
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


def _draw_dome(s: _Sketch) -> None:
    """A domed hall: a low body, a drum and a dome (round or onion)."""
    fam, inst, W, H, d, wall, trim, roof = s.fam, s.inst, s.W, s.H, s.d, s.wall, s.trim, s.roof
    acc, rows, cols, details, motif_r = s.acc, s.rows, s.cols, s.details, s.motif_r
    motif_at, windows, door = s.motif_at, s.windows, s.door
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


def _draw_temple(s: _Sketch) -> None:
    """A temple: a pediment over a colonnade on steps."""
    inst, W, H, d, rh, wall, trim, roof = s.inst, s.W, s.H, s.d, s.rh, s.wall, s.trim, s.roof
    win, lit, acc, acc2, cols, details = s.win, s.lit, s.acc, s.acc2, s.cols, s.details
    motif_r, motif_at = s.motif_r, s.motif_at
    ped = rh
    d.polygon([(0, ped), (W / 2, 0), (W, ped)], fill=roof)
    d.rectangle([0, ped, W, ped + 0.08 * H], fill=trim)
    d.rectangle([0, H - 0.1 * H, W, H], fill=shade(wall, 0.9))
    for k in range(3):
        d.rectangle([k * 0.03 * W, H - (k + 1) * 0.033 * H, W - k * 0.03 * W,
                     H - k * 0.033 * H], fill=shade(wall, 0.85 + 0.05 * k))
    cw = W / (2 * cols + 1)
    y0c, y1c = ped + 0.08 * H, H - 0.1 * H
    d.rectangle([0, y0c, W, y1c], fill=shade(win, 1.3))
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


_DRAW_KIND = {"facade": _draw_facade_or_castle, "castle": _draw_facade_or_castle,
              "tower": _draw_tower, "gate": _draw_gate, "dome": _draw_dome,
              "temple": _draw_temple}


def draw_landmark(fam: dict[str, Any], inst: dict[str, Any], height: int,
                  seed_rng: np.random.Generator) -> Image.Image:
    """The landmark's RGBA texture (transparent outside its silhouette), ``height`` pixels high:
    the silhouette of its kind, the wall texture over it, then the crisp details, the motif and
    the flag."""
    s = _Sketch(fam, inst, height)
    _DRAW_KIND[s.kind](s)
    img, W, H, trim, acc, acc2 = s.img, s.W, s.H, s.trim, s.acc, s.acc2
    details, motif_at = s.details, s.motif_at
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

