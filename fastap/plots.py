"""Figures of retrieval results (matplotlib, drawn off-screen with the Agg canvas).

:func:`plot_retrieval` draws one row per query — the query crop (blue frame) followed by its
ranked results, each framed by its label: positive (green), negative (red), junk (grey) — with a
legend, and saves a PNG. :func:`plot_retrieval_results` builds those rows from a
:class:`~fastap.datasets.RevisitedDataset` and a ranking, labelling results with one Revisited
setup (Medium by default: positives easy+hard, junk junk).

matplotlib is an optional dependency of fastap; it is imported when a figure is drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ._io import atomic_write

__all__ = ["LABEL_COLOURS", "QUERY_COLOUR", "plot_retrieval", "plot_retrieval_results",
           "thumbnail"]

PathLike = Union[str, os.PathLike]

#: Frame colours of the result labels (RGB).
LABEL_COLOURS = {"positive": (30, 170, 30), "negative": (210, 30, 30), "junk": (150, 150, 150)}
QUERY_COLOUR = (30, 80, 220)


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("drawing retrieval figures needs matplotlib (pip install matplotlib); "
                          "`fastap eval --show-queries 0` skips the figure") from err
    return matplotlib, Figure, Patch


def _placeholder(size: int, text: str) -> Image.Image:
    image = Image.new("RGB", (size, size), (235, 235, 235))
    ImageDraw.Draw(image).text((6, size // 2 - 6), text, fill=(90, 90, 90))
    return image


def thumbnail(path: PathLike, bbox: Optional[Sequence[float]] = None, size: int = 128
              ) -> Image.Image:
    """An RGB thumbnail (longest side ``size``) of an image file, cropped by ``bbox`` (x1, y1,
    x2, y2 in full-resolution pixels) first. Unreadable or missing files give a grey
    placeholder rather than failing the figure."""
    from .datasets import load_image

    try:
        if bbox is None:
            with Image.open(path) as im:
                im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
                image = im.convert("RGB")
        else:
            x1, y1, x2, y2 = (int(round(float(v))) for v in bbox)
            image = load_image(path).crop((x1, y1, x2, y2))
    except FileNotFoundError:
        return _placeholder(size, "missing")
    except (OSError, ValueError):
        try:
            image = load_image(path)  # tolerates truncated JPEGs
        except (OSError, ValueError):
            return _placeholder(size, "unreadable")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def _framed(image: Image.Image, colour: tuple, width: int) -> np.ndarray:
    return np.asarray(ImageOps.expand(image.convert("RGB"), border=width, fill=colour))


def plot_retrieval(queries: Sequence[tuple[Image.Image, str]],
                   results: Sequence[Sequence[tuple[Image.Image, str, str]]],
                   path: PathLike, *, title: Optional[str] = None, cell: float = 1.5,
                   dpi: int = 100, frame: int = 6) -> Path:
    """Save a grid of queries and their ranked results as an image file (PNG by suffix).

    Args:
        queries: per row, ``(image, caption)`` of the query.
        results: per row, the ranked ``(image, label, caption)`` with label ``positive``,
            ``negative`` or ``junk`` (frame colours :data:`LABEL_COLOURS`).
        path: where to write; the folder must exist.
        title: a figure title. ``cell``: inches per image; ``frame``: frame width in pixels of
            the thumbnails.

    Returns the path. The figure is built off-screen (no pyplot state is touched).
    """
    _, Figure, Patch = _matplotlib()
    if len(queries) != len(results):
        raise ValueError(f"{len(queries)} queries but {len(results)} result rows")
    rows = max(1, len(queries))
    cols = 1 + max([len(r) for r in results] + [1])
    legend_h = 0.45
    title_h = 0.35 if title else 0.0
    fig = Figure(figsize=(cols * cell, rows * (cell + 0.25) + legend_h + title_h), dpi=dpi)
    height = fig.get_figheight()
    top = 1.0 - title_h / height
    bottom = legend_h / height
    grid = fig.add_gridspec(rows, cols, left=0.01, right=0.99, top=top, bottom=bottom,
                            wspace=0.06, hspace=0.3)
    for r, ((qimage, qcaption), ranked) in enumerate(zip(queries, results)):
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(_framed(qimage, QUERY_COLOUR, frame))
        ax.set_title(qcaption, fontsize=6.5, color=np.array(QUERY_COLOUR) / 255)
        ax.set_axis_off()
        for c, (image, label, caption) in enumerate(ranked, start=1):
            if label not in LABEL_COLOURS:
                raise ValueError(f"label must be one of {sorted(LABEL_COLOURS)}, got {label!r}")
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(_framed(image, LABEL_COLOURS[label], frame))
            ax.set_title(caption, fontsize=6)
            ax.set_axis_off()
    handles = [Patch(facecolor="none", edgecolor=np.array(QUERY_COLOUR) / 255, linewidth=3,
                     label="query")]
    handles += [Patch(facecolor="none", edgecolor=np.array(colour) / 255, linewidth=3,
                      label=label) for label, colour in LABEL_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.08 / height)
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    return path


def plot_retrieval_results(dataset, query_indices: Sequence[int], ranking: np.ndarray,
                           path: PathLike, *, setup: str = "medium",
                           distractor_paths: Sequence[PathLike] = (),
                           aps: Optional[Sequence[Optional[float]]] = None,
                           title: Optional[str] = None, size: int = 128) -> Path:
    """The figure of :func:`plot_retrieval` for queries of a Revisited dataset.

    Args:
        dataset: a :class:`~fastap.datasets.RevisitedDataset` (its ``gnd`` gives the labels).
        query_indices: which queries (rows of ``ranking``) to show.
        ranking: (n_q, k) database indices by decreasing similarity; indices ≥ the database
            size are distractors (``distractor_paths[j − n_db]``), always negatives.
        setup: ``easy``/``medium``/``hard`` — its positive and junk lists label the frames (an
            Oxford5k-style ground truth with ``ok`` lists is used as it is).
        aps: the AP (percent) of each shown query, put in its caption.
    """
    from .evaluation import REVISITED_SETUPS

    if setup not in REVISITED_SETUPS:
        raise ValueError(f"setup must be one of {', '.join(REVISITED_SETUPS)}, got {setup!r}")
    ok_keys, junk_keys = REVISITED_SETUPS[setup]
    n_db = dataset.num_database
    queries, rows = [], []
    for row, i in enumerate(query_indices):
        g = dataset.gnd[i]
        if "ok" in g and not any(k in g for k in ok_keys):
            ok_keys_i, junk_keys_i = ("ok",), ("junk",)
        else:
            ok_keys_i, junk_keys_i = ok_keys, junk_keys
        positives = {int(j) for k in ok_keys_i for j in np.asarray(g.get(k, [])).reshape(-1)}
        junk = {int(j) for k in junk_keys_i for j in np.asarray(g.get(k, [])).reshape(-1)}
        caption = f"q{i}: {dataset.qimlist[i]}"
        if aps is not None and aps[row] is not None:
            caption += f"\nAP {aps[row]:.1f}"
        queries.append((thumbnail(dataset.image_path(dataset.qimlist[i]),
                                  dataset.query_bbox(i), size), caption))
        ranked = []
        for rank, j in enumerate(np.asarray(ranking[i]).tolist(), start=1):
            j = int(j)
            if j < n_db:
                name = dataset.imlist[j]
                image = thumbnail(dataset.image_path(name), None, size)
                label = ("positive" if j in positives else "junk" if j in junk
                         else "negative")
            else:
                p = Path(distractor_paths[j - n_db])
                name, image, label = p.stem, thumbnail(p, None, size), "negative"
            ranked.append((image, label, f"{rank}. {name}"))
        rows.append(ranked)
    subtitle = f"{setup.capitalize()} setup"
    return plot_retrieval(queries, rows, path,
                          title=f"{title} ({subtitle})" if title else subtitle)
