"""The figures of fastap.plots: the retrieval grid built from a Revisited ground truth (one model
or several), the bar chart of several models' mAP, the choice of the queries shown."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastap import plots


class _Dataset:
    """What plot_retrieval_results reads of a RevisitedDataset: 2 queries, 4 database images."""

    def __init__(self, root: Path):
        self.root = root
        self.qimlist = ["q0", "q1"]
        self.imlist = [f"d{j}" for j in range(4)]
        self.num_database = 4
        self.gnd = [{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 8, 8]},
                    {"easy": [3], "hard": [], "junk": [], "bbx": [0, 0, 8, 8]}]
        for name in self.qimlist + self.imlist:
            Image.new("RGB", (16, 16), (120, 60, 30)).save(self.image_path(name))

    def image_path(self, name: str) -> Path:
        return self.root / f"{name}.jpg"

    def query_bbox(self, i: int):
        return tuple(self.gnd[i]["bbx"])


@pytest.fixture
def drawn(monkeypatch):
    """The queries and result rows plot_retrieval_results hands to plot_retrieval."""
    calls = []
    monkeypatch.setattr(plots, "plot_retrieval",
                        lambda queries, results, path, title=None: calls.append(
                            (queries, results, title)) or Path(path))
    return calls


def test_one_ranking_is_labelled_by_the_setup(tmp_path, drawn):
    ranking = np.array([[0, 1, 2, 3], [3, 0, 1, 2]])
    plots.plot_retrieval_results(_Dataset(tmp_path), [0, 1], ranking, tmp_path / "f.png",
                                 aps=[50.0, None], title="t")
    queries, results, title = drawn[0]
    assert [c for _, c in queries] == ["q0: q0\nAP 50.0", "q1: q1"]
    assert [(label, caption) for _, label, caption in results[0]] == [
        ("positive", "1. d0"), ("positive", "2. d1"), ("junk", "3. d2"), ("negative", "4. d3")]
    assert [label for _, label, _ in results[1]] == ["positive"] + ["negative"] * 3
    assert title == "t (Medium setup)"
    plots.plot_retrieval_results(_Dataset(tmp_path), [0], ranking, tmp_path / "f.png",
                                 setup="easy")
    assert [label for _, label, _ in drawn[1][1][0]] == ["positive", "junk", "junk", "negative"]


def test_several_models_get_a_line_each_per_query(tmp_path, drawn):
    rankings = {"a": np.array([[0, 1], [3, 0]]), "b": np.array([[2, 3], [0, 3]])}
    plots.plot_retrieval_results(_Dataset(tmp_path), [0, 1], rankings, tmp_path / "f.png",
                                 aps={"a": [10.0, 20.0], "b": [30.0, None]})
    queries, results, _ = drawn[0]
    assert [c for _, c in queries] == ["q0 · a\nAP 10.0", "q0 · b\nAP 30.0", "q1 · a\nAP 20.0",
                                       "q1 · b"]
    assert [[caption for _, _, caption in r] for r in results] == [
        ["1. d0", "2. d1"], ["1. d2", "2. d3"], ["1. d3", "2. d0"], ["1. d0", "2. d3"]]


def test_figures_are_written_as_png(tmp_path):
    dataset = _Dataset(tmp_path)
    path = plots.plot_retrieval_results(dataset, [0, 1], {"a": np.array([[0, 1], [3, 0]])},
                                        tmp_path / "grid.png", size=32)
    results = {"model a": {s: {"mAP": m} for s, m in zip(("easy", "medium", "hard"),
                                                          (50.0, 40.0, None))},
               "model b": {s: {"mAP": 20.0} for s in ("easy", "medium", "hard")}}
    bars = plots.plot_map_bars(results, tmp_path / "bars.png", title="mAP")
    for png in (path, bars):
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) >= 100


@pytest.mark.parametrize("n, count, expected", [(40, 4, [0, 13, 26, 39]), (3, 5, [0, 1, 2]),
                                                (10, 1, [0])])
def test_spread_queries(n, count, expected):
    assert plots.spread_queries(n, count) == expected
