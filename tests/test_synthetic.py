"""fastap.datasets.synthetic: determinism, the revisitop layout, ground-truth consistency, the
training split, reuse/atomic writes, and a pixel-baseline difficulty check."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastap.datasets import QueryImages, RevisitedDataset, crop_and_scale, load_gnd
from fastap.datasets import synthetic as syn
from fastap.datasets.synthetic.config import view_levels
from fastap.datasets.synthetic import (
    LABEL_RULES,
    PRESETS,
    SyntheticInfo,
    generate,
    read_train_list,
    synthetic_config,
)
from fastap.evaluation import evaluate_revisited

TINY = dict(image_size=64, families=2, instances_per_family=2, views_per_instance=5,
            distractors=6, train_families=1, train_instances_per_family=2,
            train_views_per_instance=2)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> SyntheticInfo:
    return generate(tmp_path_factory.mktemp("quick"), "synth", seed=0, preset="quick")


def _meta(info: SyntheticInfo) -> dict:
    with open(info.meta_file) as f:
        return json.load(f)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _thumbnail(image: Image.Image) -> np.ndarray:
    """8×8 colour thumbnail, L2-normalised."""
    v = np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BOX), np.float64).ravel()
    return v / np.linalg.norm(v)


def _colour_histogram(image: Image.Image) -> np.ndarray:
    """4×4×4 joint RGB histogram, square-rooted (Hellinger) and so L2-normalised."""
    a = np.asarray(image.convert("RGB")) // 64
    h = np.bincount(((a[..., 0] * 4 + a[..., 1]) * 4 + a[..., 2]).ravel(), minlength=64)
    return np.sqrt(h / h.sum())


def pixel_baseline_map(root: Path, name: str, descriptor) -> dict[str, float]:
    """E/M/H mAP of a trivial descriptor compared by cosine (queries cropped by bbx)."""
    ds = RevisitedDataset(root, name)
    db = np.stack([descriptor(Image.open(p)) for p in ds.database_paths()])
    q = np.stack([descriptor(crop_and_scale(Image.open(p), ds.query_bbox(i), None))
                  for i, p in enumerate(ds.query_paths())])
    result = evaluate_revisited(q @ db.T, ds.gnd)
    return {k: result[k]["mAP"] for k in ("easy", "medium", "hard")}


def _fmt(m: dict[str, float]) -> str:
    return f"{m['easy']:.1f}/{m['medium']:.1f}/{m['hard']:.1f}"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_presets_and_validation():
    default, quick = synthetic_config("default"), synthetic_config("quick")
    assert set(default) == set(quick)

    def images(c):
        return (c["families"] * c["instances_per_family"] * (c["views_per_instance"] + 1)
                + c["distractors"]
                + c["train_families"] * c["train_instances_per_family"]
                * c["train_views_per_instance"])

    assert images(default) >= 3 * images(quick)
    assert synthetic_config("quick", families=3)["families"] == 3
    with pytest.raises(TypeError, match="unknown synthetic dataset option"):
        synthetic_config(famillies=3)
    with pytest.raises(ValueError, match="unknown preset"):
        synthetic_config("huge")
    for bad in (dict(families=0), dict(image_size=8), dict(distractors=-1), dict(families=2.5),
                dict(view_mix=[0, 0, 0]), dict(view_mix=[1, 1]), dict(jpeg_quality=101),
                dict(train_hard_fraction=1.5)):
        with pytest.raises(ValueError):
            synthetic_config(**bad)
    with pytest.raises(ValueError, match="seed"):
        generate("/nonexistent-never-created", seed=-1)


@pytest.mark.parametrize("n", range(1, 13))
def test_view_levels(n):
    levels = view_levels(n, PRESETS["default"]["view_mix"])
    assert len(levels) == n
    if n >= 2:
        assert "easy" in levels and "hard" in levels
    assert view_levels(n, [1, 0, 0]) == ["easy"] * n


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(tmp_path):
    a = generate(tmp_path / "a", "s", seed=3, **TINY)
    b = generate(tmp_path / "b", "s", seed=3, **TINY)
    assert a.generated and b.generated
    fa, fb = _files(a.dir), _files(b.dir)
    assert fa.keys() == fb.keys()
    assert fa == fb  # gnd pickle, train.txt, meta.json, synthetic.json and every JPEG
    for rel in (k for k in fa if k.endswith(".jpg")):
        pa, pb = (np.asarray(Image.open(d.dir / rel)) for d in (a, b))
        assert np.array_equal(pa, pb), rel
    # The number of processes does not change a byte.
    c = generate(tmp_path / "c", "s", seed=3, workers=2, **TINY)
    assert _files(c.dir) == fa


def test_different_seed_differs(tmp_path):
    a = generate(tmp_path, "s0", seed=0, **TINY)
    b = generate(tmp_path, "s1", seed=1, **TINY)
    ga, gb = load_gnd(a.gnd_file), load_gnd(b.gnd_file)
    assert [g["bbx"] for g in ga["gnd"]] != [g["bbx"] for g in gb["gnd"]]
    ja = {p.name: np.asarray(Image.open(p)) for p in a.image_dir.iterdir()}
    jb = {p.name: np.asarray(Image.open(p)) for p in b.image_dir.iterdir()}
    assert ja.keys() == jb.keys()
    assert all(not np.array_equal(ja[k], jb[k]) for k in ja)


# ----------------------------------------------------------------------------------------------
# Layout and ground truth
# ----------------------------------------------------------------------------------------------


def test_layout_loads_as_revisited(quick):
    cfg = quick.config
    ds = RevisitedDataset(quick.root, quick.name)
    n_views = cfg["families"] * cfg["instances_per_family"] * cfg["views_per_instance"]
    assert ds.num_database == n_views + cfg["distractors"] == quick.counts["database"]
    assert ds.num_queries == (cfg["families"] * cfg["instances_per_family"]
                              * cfg["queries_per_instance"]) == quick.counts["queries"]
    assert ds.missing_images() == []
    assert len(set(ds.imlist)) == len(ds.imlist) and not set(ds.imlist) & set(ds.qimlist)
    assert sorted(os.listdir(ds.image_dir)) == sorted(f"{n}.jpg" for n in ds.imlist + ds.qimlist)
    for path in ds.database_paths()[:20] + ds.query_paths():
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (cfg["image_size"], cfg["image_size"])
    with open(quick.gnd_file, "rb") as f:
        raw = pickle.load(f)
    assert isinstance(raw["imlist"], list) and isinstance(raw["gnd"][0]["easy"], list)
    size = cfg["image_size"]
    for i in range(ds.num_queries):
        x1, y1, x2, y2 = ds.query_bbox(i)
        assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
        assert (x2 - x1) * (y2 - y1) >= 0.04 * size * size  # the landmark is not a speck
    queries = QueryImages(ds, max_size=None)
    tensor, _ = queries[0]
    x1, y1, x2, y2 = ds.query_bbox(0)
    assert tensor.shape == (3, round(y2) - round(y1), round(x2) - round(x1))


def test_ground_truth_is_consistent(quick):
    ds = RevisitedDataset(quick.root, quick.name)
    meta = _meta(quick)
    database = meta["database"]
    assert len(database) == ds.num_database
    distractors = {i for i, e in enumerate(database) if e["instance"] < 0}
    assert len(distractors) == quick.config["distractors"]
    covered: set[int] = set()
    for q, g in enumerate(ds.gnd):
        easy, hard, junk = (set(g[k]) for k in ("easy", "hard", "junk"))
        assert len(easy) == len(g["easy"]) and len(hard) == len(g["hard"])
        assert not (easy & hard or easy & junk or hard & junk)
        everything = easy | hard | junk
        assert all(0 <= i < ds.num_database for i in everything)
        assert len(easy) >= 1 and len(hard) >= 1
        assert not everything & distractors
        instance = meta["queries"][q]["instance"]
        # Exactly the views of the query's instance, each in the list of its label.
        assert everything == {i for i, e in enumerate(database) if e["instance"] == instance}
        for name, ids in (("easy", easy), ("hard", hard), ("junk", junk)):
            assert all(database[i]["label"] == name for i in ids)
        covered |= everything
    assert covered | distractors == set(range(ds.num_database))


def test_labels_follow_the_rules(quick):
    views = [e for e in _meta(quick)["database"] if e["instance"] >= 0]
    for e in views:
        junk = (e["visible"] < LABEL_RULES["junk_visible"]
                or e["extent"] < LABEL_RULES["junk_extent"])
        assert (e["label"] == "junk") == junk
        if e["label"] == "easy":
            assert e["visible"] >= LABEL_RULES["hard_visible"]
            assert e["extent"] >= LABEL_RULES["hard_extent"]
    labels = [e["label"] for e in views]
    assert {"easy", "hard", "junk"} <= set(labels)
    assert quick.counts["easy"] == labels.count("easy")
    assert quick.counts["junk"] == labels.count("junk")


def test_training_split(quick):
    cfg = quick.config
    paths, ids = read_train_list(quick.train_list)
    n_inst = cfg["train_families"] * cfg["train_instances_per_family"]
    assert len(paths) == n_inst * cfg["train_views_per_instance"] == quick.counts["train_images"]
    assert sorted(set(ids)) == list(range(n_inst))
    assert all(ids.count(i) == cfg["train_views_per_instance"] for i in range(n_inst))
    assert all(p.is_file() and p.suffix == ".jpg" for p in paths)
    for line in quick.train_list.read_text().splitlines():
        rel, label = line.split(" ")
        assert not os.path.isabs(rel) and (quick.train_list.parent / rel).is_file()
        assert label == str(int(label))
    with Image.open(paths[0]) as im:
        assert im.size == (cfg["image_size"], cfg["image_size"])
    fps = _meta(quick)["fingerprints"]
    assert len(set(fps["benchmark"])) == quick.counts["instances"]
    assert len(set(fps["train"])) == n_inst
    assert not set(fps["train"]) & set(fps["benchmark"])
    assert not set(fps["distractors"]) & (set(fps["benchmark"]) | set(fps["train"]))
    train_images = {p.resolve() for p in paths}
    assert not train_images & {p.resolve() for p in quick.image_dir.iterdir()}


def test_read_train_list_rejects_bad_lines(tmp_path):
    (tmp_path / "train.txt").write_text("a.jpg 1\nb.jpg\n")
    with pytest.raises(ValueError, match="train.txt:2"):
        read_train_list(tmp_path / "train.txt")


# ----------------------------------------------------------------------------------------------
# Reuse, regeneration, atomic writes
# ----------------------------------------------------------------------------------------------


def test_reuse_and_regenerate(tmp_path):
    first = generate(tmp_path, "s", seed=0, **TINY)
    assert first.generated
    stamp = first.gnd_file.stat().st_mtime_ns
    again = generate(tmp_path, "s", seed=0, **TINY)
    assert not again.generated and again.counts == first.counts
    assert again.gnd_file.stat().st_mtime_ns == stamp
    other = generate(tmp_path, "s", seed=0, **{**TINY, "distractors": 7})
    assert other.generated and other.counts["distractors"] == 7
    assert RevisitedDataset(tmp_path, "s").num_database == other.counts["database"]
    reseeded = generate(tmp_path, "s", seed=1, **{**TINY, "distractors": 7})
    assert reseeded.generated
    assert generate(tmp_path, "s", seed=1, force=True, **{**TINY, "distractors": 7}).generated
    # An incomplete folder (a file removed) is regenerated, not reused.
    next(reseeded.image_dir.iterdir()).unlink()
    assert generate(tmp_path, "s", seed=1, **{**TINY, "distractors": 7}).generated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary folders left
    stored = json.loads((tmp_path / "s" / "synthetic.json").read_text())
    assert stored["version"] == syn.VERSION and stored["seed"] == 1


def test_refuses_to_replace_foreign_folder(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        generate(tmp_path, "s", **TINY)
    assert (tmp_path / "s" / "precious.txt").read_text() == "keep me"


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(syn.build, "_train_unit", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, "s", **TINY)
    assert list(tmp_path.iterdir()) == []
    # An existing dataset survives an interrupted regeneration untouched.
    monkeypatch.undo()
    kept = generate(tmp_path, "s", seed=0, **TINY)
    before = _files(kept.dir)
    monkeypatch.setattr(syn.build, "_train_unit", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, "s", seed=5, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert _files(kept.dir) == before


# ----------------------------------------------------------------------------------------------
# Difficulty
# ----------------------------------------------------------------------------------------------


def test_pixels_do_not_solve_it(quick, capsys):
    thumb = pixel_baseline_map(quick.root, quick.name, _thumbnail)
    hist = pixel_baseline_map(quick.root, quick.name, _colour_histogram)
    with capsys.disabled():
        print(f"\n[synthetic quick] mAP E/M/H: 8x8 thumbnail {_fmt(thumb)}, "
              f"colour histogram {_fmt(hist)}")
    # The labels mean something (easy views look more like the query than hard ones) ...
    assert hist["easy"] > hist["hard"]
    # ... and pixels are far from solving it.
    for m in (thumb, hist):
        assert m["medium"] < 50 and m["hard"] < 50


@pytest.mark.slow
def test_default_preset_timing_and_difficulty(tmp_path, capsys):
    start = time.perf_counter()
    cpu = time.process_time()
    info = generate(tmp_path, "synthetic", seed=0)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    thumb = pixel_baseline_map(tmp_path, "synthetic", _thumbnail)
    hist = pixel_baseline_map(tmp_path, "synthetic", _colour_histogram)
    with capsys.disabled():
        print(f"\n[synthetic default] {info.counts['database']} database + "
              f"{info.counts['queries']} query + {info.counts['train_images']} training images "
              f"generated in {wall:.1f} s ({cpu:.1f} s CPU); mAP E/M/H: 8x8 thumbnail "
              f"{_fmt(thumb)}, colour histogram {_fmt(hist)}")
    for m in (thumb, hist):
        assert m["easy"] > m["hard"]
        assert m["medium"] < 50 and m["hard"] < 50
