"""Figures of retrieval results (matplotlib, drawn off-screen with the Agg canvas).

:func:`plot_retrieval` draws one row per query — the query crop (blue frame) followed by its
ranked results, each framed by its label: positive (green), negative (red), junk (grey) — with a
legend, and saves a PNG. :func:`plot_retrieval_results` builds those rows from a
:class:`~fastap.datasets.RevisitedDataset` and a ranking, labelling results with one Revisited
setup (Medium by default: positives easy+hard, junk junk), or from the rankings of several
models (a line per query and model). :func:`plot_map_bars` draws the mAP of several models per
setup as grouped bars.

matplotlib is an optional dependency of fastap; it is imported when a figure is drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ._io import atomic_write

__all__ = ["LABEL_COLOURS", "QUERY_COLOUR", "plot_map_bars", "plot_retrieval",
           "plot_retrieval_results", "spread_queries", "thumbnail"]

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


def spread_queries(num_queries: int, count: int) -> list[int]:
    """The ``count`` queries a figure shows (all when there are fewer): indices evenly spread
    over ``0 … num_queries − 1``, the first and the last included."""
    return np.unique(np.linspace(0, num_queries - 1, min(count, num_queries)).round()
                     ).astype(int).tolist()


def plot_retrieval_results(dataset, query_indices: Sequence[int],
                           ranking: Union[np.ndarray, Mapping[str, np.ndarray]],
                           path: PathLike, *, setup: str = "medium",
                           distractor_paths: Sequence[PathLike] = (),
                           aps: Union[None, Sequence[Optional[float]],
                                      Mapping[str, Sequence[Optional[float]]]] = None,
                           title: Optional[str] = None, size: int = 128) -> Path:
    """The figure of :func:`plot_retrieval` for queries of a Revisited dataset.

    Args:
        dataset: a :class:`~fastap.datasets.RevisitedDataset` (its ``gnd`` gives the labels).
        query_indices: which queries (rows of ``ranking``) to show.
        ranking: (n_q, k) database indices by decreasing similarity; indices ≥ the database
            size are distractors (``distractor_paths[j − n_db]``), always negatives. To compare
            models, a dict ``{model name: (n_q, k) ranking}``: each query is shown on one line
            per model, the name in the query's caption.
        setup: ``easy``/``medium``/``hard`` — its positive and junk lists label the frames (an
            Oxford5k-style ground truth with ``ok`` lists is used as it is).
        aps: the AP (percent) of each shown query, put in its caption (with several models, a
            dict of the same keys as ``ranking``).
    """
    from .evaluation import REVISITED_SETUPS

    if setup not in REVISITED_SETUPS:
        raise ValueError(f"setup must be one of {', '.join(REVISITED_SETUPS)}, got {setup!r}")
    models = ranking if isinstance(ranking, Mapping) else {None: ranking}
    model_aps = aps if isinstance(aps, Mapping) else dict.fromkeys(models, aps)
    queries, rows = [], []
    for row, i in enumerate(query_indices):
        positives, junk = _labelled(dataset.gnd[i], *REVISITED_SETUPS[setup])
        qimage = thumbnail(dataset.image_path(dataset.qimlist[i]), dataset.query_bbox(i), size)
        for name, ranked in models.items():
            caption = f"q{i}: {dataset.qimlist[i]}" if name is None else f"q{i} · {name}"
            ap = model_aps[name][row] if model_aps[name] is not None else None
            queries.append((qimage, caption + (f"\nAP {ap:.1f}" if ap is not None else "")))
            rows.append([_result_cell(dataset, int(j), rank, positives, junk,
                                      distractor_paths, size)
                         for rank, j in enumerate(np.asarray(ranked[i]).tolist(), start=1)])
    subtitle = f"{setup.capitalize()} setup"
    return plot_retrieval(queries, rows, path,
                          title=f"{title} ({subtitle})" if title else subtitle)


def _labelled(gnd: Mapping[str, Any], ok_keys: Sequence[str], junk_keys: Sequence[str]
              ) -> tuple[set[int], set[int]]:
    """The positive and the junk database indices of one query's ground truth."""
    if "ok" in gnd and not any(k in gnd for k in ok_keys):  # an Oxford5k-style ground truth
        ok_keys, junk_keys = ("ok",), ("junk",)

    def indices(keys: Sequence[str]) -> set[int]:
        return {int(j) for k in keys for j in np.asarray(gnd.get(k, [])).reshape(-1)}

    return indices(ok_keys), indices(junk_keys)


def _result_cell(dataset, j: int, rank: int, positives: set[int], junk: set[int],
                 distractor_paths: Sequence[PathLike], size: int
                 ) -> tuple[Image.Image, str, str]:
    """``(thumbnail, label, caption)`` of database (or distractor) image ``j`` at ``rank``."""
    n_db = dataset.num_database
    if j >= n_db:
        p = Path(distractor_paths[j - n_db])
        return thumbnail(p, None, size), "negative", f"{rank}. {p.stem}"
    name = dataset.imlist[j]
    label = "positive" if j in positives else "junk" if j in junk else "negative"
    return thumbnail(dataset.image_path(name), None, size), label, f"{rank}. {name}"


def plot_map_bars(results: Mapping[str, Mapping[str, Mapping[str, Any]]], path: PathLike, *,
                  title: Optional[str] = None) -> Path:
    """Save a bar chart of the mAP of several models, grouped by setup, as a PNG.

    ``results``: ``{model name: {setup: {"mAP": percent or None, ...}}}``, every model with the
    same setups (``evaluate_model``'s ``results``); a missing mAP is drawn as 0.
    """
    _, Figure, _ = _matplotlib()
    setups = list(next(iter(results.values())))
    fig = Figure(figsize=(7.5, 4.0), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(results)
    colours = ["#8c8c8c", "#4c72b0", "#dd8452"]
    top = 1.0
    for i, (name, res) in enumerate(results.items()):
        values = [res[s]["mAP"] or 0.0 for s in setups]
        top = max([top] + values)
        xs = np.arange(len(setups)) + (i - (len(results) - 1) / 2) * width
        bars = ax.bar(xs, values, width, label=name, color=colours[i % len(colours)])
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 0.8, f"{v:.1f}", ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(setups)), [s.capitalize() for s in setups])
    ax.set_ylabel("mAP (%)")
    ax.set_ylim(0, min(100.0, top * 1.2 + 5))
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path
