"""Scenes: a landmark texture photographed in a scene (background, clutter, occluders, view
transform, light, blur, noise) and labelled easy/hard/junk from what is visible."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .config import LABEL_RULES, SUPERSAMPLE
from .landmarks import hsv, shade


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
        top = hsv(rng.uniform(0.55, 0.63), rng.uniform(0.35, 0.7), rng.uniform(0.6, 0.95))
        hor = hsv(rng.uniform(0.52, 0.6), rng.uniform(0.08, 0.25), rng.uniform(0.85, 1.0))
    elif sky_kind < 0.8:     # overcast
        v = rng.uniform(0.55, 0.85)
        top = np.array(hsv(rng.uniform(0.5, 0.7), 0.06, v))
        hor = np.array(hsv(rng.uniform(0.5, 0.7), 0.04, min(1, v + 0.1)))
    else:                    # dusk
        top = np.array(hsv(rng.uniform(0.6, 0.75), rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6)))
        hor = np.array(hsv(rng.uniform(0.02, 0.1), rng.uniform(0.4, 0.7), rng.uniform(0.75, 0.95)))
    ground_hues = ([0.25, 0.5, 0.5], [0.1, 0.15, 0.6], [0.0, 0.0, 0.5], [0.1, 0.4, 0.7],
                   [0.3, 0.4, 0.35])
    gh = ground_hues[int(rng.integers(len(ground_hues)))]
    ground = np.array(hsv(gh[0] + rng.uniform(-0.03, 0.03), gh[1] * rng.uniform(0.7, 1.2),
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
            arr[hy:][road] = arr[hy:][road] * 0.6 + 0.4 * np.asarray(hsv(0.1, 0.08, 0.55))
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
            d.ellipse([cx + ox - rx, cy - ry, cx + ox + rx, cy + ry], fill=hsv(0.6, 0.03, 0.97))
    for _ in range(int(rng.poisson(3 * amount))):  # generic distant buildings
        bw, bh = rng.uniform(0.08, 0.3) * C, rng.uniform(0.08, 0.45) * C
        x0 = rng.uniform(-0.1, 1.0) * C
        y1 = hy + rng.uniform(0, 0.04) * C
        col = hsv(rng.random(), rng.uniform(0.05, 0.4), rng.uniform(0.35, 0.85))
        d.rectangle([x0, y1 - bh, x0 + bw, y1], fill=col)
        if rng.random() < 0.4:
            d.polygon([(x0, y1 - bh), (x0 + bw / 2, y1 - bh - 0.3 * bw), (x0 + bw, y1 - bh)],
                      fill=shade(col, 0.7))
        wc = shade(col, rng.uniform(0.4, 0.7))
        step = max(4.0, rng.uniform(0.025, 0.05) * C)
        for yy in np.arange(y1 - bh + step / 2, y1 - step / 2, step):
            for xx in np.arange(x0 + step / 2, x0 + bw - step / 2, step):
                d.rectangle([xx, yy, xx + step * 0.45, yy + step * 0.5], fill=wc)
    for _ in range(int(rng.poisson(3 * amount))):  # trees at the horizon
        cx = rng.uniform(0, C)
        r = rng.uniform(0.03, 0.08) * C
        cy = hy - r * rng.uniform(0.2, 1.2)
        g = hsv(rng.uniform(0.22, 0.36), rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.55))
        d.rectangle([cx - r * 0.1, cy, cx + r * 0.1, hy + 0.02 * C], fill=(70, 50, 35))
        for _ in range(4):
            ox, oy = rng.uniform(-0.6, 0.6) * r, rng.uniform(-0.6, 0.4) * r
            d.ellipse([cx + ox - r * 0.7, cy + oy - r * 0.7, cx + ox + r * 0.7, cy + oy + r * 0.7],
                      fill=g)


def _tree(p: _Painter, rng: np.random.Generator, x0, y0, x1, y1) -> None:
    """Foliage blobs filling the box (x0, y0, x1, y1)."""
    w, h = max(2.0, x1 - x0), max(2.0, y1 - y0)
    r = max(2.0, 0.3 * min(w, h) + 0.1 * max(w, h) * 0.3)
    greens = [hsv(rng.uniform(0.2, 0.38), rng.uniform(0.45, 0.85), rng.uniform(0.18, 0.5))
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
        col = hsv(rng.random(), rng.uniform(0.05, 0.45), rng.uniform(0.3, 0.8))
        p.rectangle([xa, top, xb, 2 * C], col)
        wc = shade(col, 0.5)
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
                        hsv(0.3, 0.6, 0.3))
        else:
            col = hsv(rng.random(), rng.uniform(0.4, 0.9), rng.uniform(0.4, 0.9))
            p.rectangle([x0 - 0.3 * w, top, x1 + 0.3 * w, 2 * C], col)
            step = max(4.0, 0.1 * w)
            for xx in np.arange(x0 - 0.25 * w, x1 + 0.25 * w - step, step * 1.3):
                p.rectangle([xx, top + 0.1 * (y1 - top), xx + step, top + 0.45 * (y1 - top)],
                            shade(col, 0.35))
    else:  # a billboard / truck in the middle
        s = math.sqrt(frac) * 1.05
        bw, bh = s * w, s * h
        cx = x0 + bw / 2 + rng.random() * max(0.0, w - bw)
        cy = y0 + bh / 2 + rng.random() * max(0.0, h - bh)
        col = hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.4, 0.95))
        p.rectangle([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], col)
        p.rectangle([cx - bw * 0.4, cy - bh * 0.1, cx + bw * 0.4, cy + bh * 0.1], shade(col, 0.5))
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
            col = hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.2, 0.9))
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


def sample_view(rng: np.random.Generator, level: str) -> dict[str, Any]:
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


def label_view(m: dict[str, float], v: dict[str, Any]) -> str:
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


def _place(rng: np.random.Generator, C: int, tex: Image.Image, v: dict[str, Any]
           ) -> tuple[np.ndarray, float]:
    """Where the landmark goes on a C × C canvas: the corners (4, 2) of its transformed box
    (scale, perspective, rotation, position or crop through an edge) and the horizon."""
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
    return quad, horizon


def _paste_landmark(scene: Image.Image, tex: Image.Image, quad: np.ndarray, C: int
                    ) -> tuple[int, int, np.ndarray, float]:
    """Warps the texture onto ``quad`` of the scene; returns the pasted box's corner, the
    landmark's pixels in it (before occluders) and the area of the quad."""
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
    qx, qy = quad[:, 0], quad[:, 1]
    quad_area = 0.5 * abs(np.dot(qx, np.roll(qy, 1)) - np.dot(qy, np.roll(qx, 1)))
    return bx0, by0, region, quad_area


def _visible(bx0: int, by0: int, region: np.ndarray, occluders: Image.Image, full_area: float,
             ss: int) -> tuple[float, Optional[list[float]]]:
    """The landmark's visible fraction and its visible box in output pixels (None if hidden)."""
    occluded = np.asarray(occluders)[by0:by0 + region.shape[0], bx0:bx0 + region.shape[1]]
    visible = region & (occluded == 0)
    count = int(visible.sum())
    if not count:
        return float(min(1.0, count / max(1.0, full_area))), None
    cols = np.nonzero(visible.any(axis=0))[0]
    rows = np.nonzero(visible.any(axis=1))[0]
    return (float(min(1.0, count / max(1.0, full_area))),
            [float(bx0 + cols[0]) / ss, float(by0 + rows[0]) / ss,
             float(bx0 + cols[-1] + 1) / ss, float(by0 + rows[-1] + 1) / ss])


def _photograph(scene: Image.Image, rng: np.random.Generator, size: int, v: dict[str, Any]
                ) -> Image.Image:
    """The supersampled scene as the camera returns it: downsampled, lit, blurred, noisy."""
    img = scene.reduce(SUPERSAMPLE)
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
    return img


def render_view(rng: np.random.Generator, size: int, tex: Optional[Image.Image],
                v: dict[str, Any], alpha_fraction: float = 1.0
                ) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one photograph (``size`` × ``size`` RGB) of the landmark texture ``tex`` (or of no
    landmark), and measure what is visible of it. (The steps draw from ``rng`` in a fixed
    order: placement, background, back clutter, occluder, front clutter, noise.)"""
    C = size * SUPERSAMPLE
    meas: dict[str, Any] = {"visible": 0.0, "extent": 0.0, "bbox": None}
    quad = None
    if tex is not None:
        quad, horizon = _place(rng, C, tex, v)
    else:
        horizon = float(rng.uniform(0.45, 0.85))
    scene = _background(rng, C, horizon)
    _back_clutter(scene, rng, C, horizon, v["clutter"])
    if quad is not None:
        bx0, by0, region, quad_area = _paste_landmark(scene, tex, quad, C)
        meas["extent"] = float(max(np.ptp(quad[:, 0]), np.ptp(quad[:, 1])) / C)
    p = _Painter(scene)
    if quad is not None and v["occlusion"] > 0:
        box = (quad[:, 0].min(), quad[:, 1].min(), quad[:, 0].max(), quad[:, 1].max())
        _occluder(p, rng, C, box, v["occlusion"])
    _front_clutter(p, rng, C, horizon, v["clutter"])
    if quad is not None:
        meas["visible"], meas["bbox"] = _visible(bx0, by0, region, p.mask,
                                                 quad_area * alpha_fraction, SUPERSAMPLE)
    return _photograph(scene, rng, size, v), meas
