"""fastap.datasets: the revisitop layout, ground truth, and the query crop-then-scale rule,
checked on image files written with PIL."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from fastap.datasets import (
    DatabaseImages,
    ImageList,
    QueryImages,
    Revisitop1M,
    RevisitedDataset,
    crop_and_scale,
    image_to_tensor,
    load_gnd,
    load_image,
    scale_factor,
    scaled_size,
)

REAL_GND = Path(__file__).resolve().parents[2] / "shared" / "data" / "revisitop"

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def landmark_image(size=(2000, 1000)) -> Image.Image:
    """Red background; a blue block at x 1000..1600, y 250..750 whose upper half is green."""
    w, h = size
    array = np.empty((h, w, 3), np.uint8)
    array[:] = RED
    array[250:750, 1000:1600] = BLUE
    array[250:500, 1000:1600] = GREEN
    return Image.fromarray(array)


BOX = (1000, 250, 1600, 750)


def write_dataset(root: Path, name="roxford5k", images=None, bbx=BOX) -> RevisitedDataset:
    images = images or {"db_a": landmark_image(), "db_b": Image.new("RGB", (800, 600), GREEN),
                        "query_0": landmark_image()}
    jpg = root / name / "jpg"
    jpg.mkdir(parents=True)
    for n, im in images.items():
        im.save(jpg / f"{n}.jpg", quality=95)
    qimlist = [n for n in images if n.startswith("query")]
    gnd = {"imlist": [n for n in images if not n.startswith("query")], "qimlist": qimlist,
           "gnd": [{"bbx": list(bbx), "easy": [0], "hard": [1], "junk": []} for _ in qimlist]}
    with open(root / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump(gnd, f, protocol=3)
    return RevisitedDataset(root, name)


def mean_colour(t: torch.Tensor) -> np.ndarray:
    return (t.mean(dim=(1, 2)) * 255).numpy()


# ----------------------------------------------------------------------------------------------
# The crop + scale rule
# ----------------------------------------------------------------------------------------------


def test_scale_factor_caps_longest_side_and_never_enlarges():
    assert scale_factor((2000, 1000), 1024) == pytest.approx(0.512)
    assert scale_factor((768, 1024), 1024) == 1.0
    assert scale_factor((800, 600), 1024) == 1.0
    assert scale_factor((5000, 10), None) == 1.0
    with pytest.raises(ValueError, match="max_size"):
        scale_factor((10, 10), 0)


def test_scaled_size_uses_the_full_image_factor():
    assert scaled_size((2000, 1000)) == (1024, 512)
    # 600 x 500 crop of a 2000-wide image: scaled by 0.512 although it is already < 1024.
    assert scaled_size((2000, 1000), BOX) == (307, 256)
    assert scaled_size((2000, 1000), BOX, max_size=500) == (150, 125)
    assert scaled_size((800, 600), (100, 100, 500, 400)) == (400, 300)
    assert scaled_size((2000, 1000), BOX, max_size=None) == (600, 500)
    assert scaled_size((4000, 3000), (0, 0, 1, 1)) == (1, 1)  # never below a pixel
    with pytest.raises(ValueError, match="empty"):
        scaled_size((100, 100), (50, 50, 50, 60))


def test_float_boxes_round_like_pil_crop():
    image = Image.new("RGB", (500, 500))
    box = (10.4, 20.6, 110.5, 220.5)
    assert crop_and_scale(image, box, None).size == image.crop(box).size == (100, 199)
    assert scaled_size(image.size, box, None) == (100, 199)


def test_crop_happens_at_full_resolution_before_scaling():
    image = landmark_image()
    out = crop_and_scale(image, BOX)
    assert out.size == (307, 256)
    a = np.asarray(out).astype(int)
    # Upper half green, lower half blue, no red: the box was cut from the full-size image.
    assert np.abs(a[10:118, 10:-10] - GREEN).max() <= 3
    assert np.abs(a[138:-10, 10:-10] - BLUE).max() <= 3
    # Scaling first and cropping the same box afterwards would mostly miss the block.
    wrong = image.resize((1024, 512)).crop(BOX)
    assert np.abs(np.asarray(wrong).astype(int)[10:118, 10:-10] - GREEN).max() > 100
    # Same pixels as cropping and resizing by hand.
    expected = image.crop(BOX).resize((307, 256), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert image.size == (2000, 1000)  # the input is untouched


def test_without_box_is_the_database_rule():
    assert crop_and_scale(landmark_image()).size == (1024, 512)
    small = Image.new("RGB", (300, 200))
    assert crop_and_scale(small) is small  # nothing to do: same image, not enlarged


def test_image_to_tensor():
    t = image_to_tensor(Image.new("RGB", (3, 2), (255, 0, 51)))
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert torch.allclose(t[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


# ----------------------------------------------------------------------------------------------
# RevisitedDataset and its torch datasets, on files written with PIL
# ----------------------------------------------------------------------------------------------


def test_revisited_dataset_layout(tmp_path):
    ds = write_dataset(tmp_path)
    jpg = tmp_path / "roxford5k" / "jpg"
    assert ds.imlist == ["db_a", "db_b"] and ds.qimlist == ["query_0"]
    assert ds.database_paths() == [jpg / "db_a.jpg", jpg / "db_b.jpg"]
    assert ds.query_paths() == [jpg / "query_0.jpg"]
    assert ds.query_bbox(0) == (1000.0, 250.0, 1600.0, 750.0)
    assert ds.gnd[0]["hard"] == [1]
    assert (ds.num_database, ds.num_queries) == (2, 1) and ds.missing_images() == []
    (jpg / "db_b.jpg").unlink()
    assert ds.missing_images() == [jpg / "db_b.jpg"]
    assert "roxford5k" in repr(ds)


def test_query_images_are_cropped_then_scaled(tmp_path):
    ds = write_dataset(tmp_path)
    queries = ds.queries()
    assert isinstance(queries, QueryImages) and len(queries) == 1
    t, i = queries[0]
    assert i == 0 and t.shape == (3, 256, 307)
    assert np.abs(mean_colour(t[:, 10:118, 10:-10]) - GREEN).max() < 4
    assert np.abs(mean_colour(t[:, 138:-10, 10:-10]) - BLUE).max() < 4
    expected = image_to_tensor(crop_and_scale(load_image(ds.query_paths()[0]), BOX))
    assert torch.equal(t, expected)
    full, _ = QueryImages(ds, max_size=None)[0]
    assert full.shape == (3, 500, 600)


def test_database_images_and_transform(tmp_path):
    ds = write_dataset(tmp_path)
    db = ds.database()
    assert isinstance(db, DatabaseImages) and len(db) == 2
    (a, ia), (b, ib) = db[0], db[1]
    assert (ia, ib) == (0, 1)
    assert a.shape == (3, 512, 1024) and b.shape == (3, 600, 800)  # 800 x 600 is not enlarged
    assert np.abs(mean_colour(b) - GREEN).max() < 3
    mean = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
    normalised, _ = DatabaseImages(ds, max_size=256, transform=lambda t: (t - mean) / 0.25)[1]
    assert normalised.shape == (3, 192, 256)
    assert torch.allclose(normalised.mean(dim=(1, 2)) * 0.25 + 0.5,
                          torch.tensor(GREEN) / 255, atol=0.02)


def test_works_with_a_dataloader(tmp_path):
    ds = write_dataset(tmp_path)
    batches = list(DataLoader(ds.queries(max_size=512), batch_size=1))
    assert len(batches) == 1
    images, index = batches[0]
    assert images.shape == (1, 3, 128, 154) and index.tolist() == [0]


def test_image_list_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="2 bounding boxes for 1 images"):
        ImageList([tmp_path / "a.jpg"], bboxes=[BOX, BOX])
    with pytest.raises(ValueError, match="max_size"):
        ImageList([tmp_path / "a.jpg"], max_size=-1)


def test_missing_ground_truth_says_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="fastap download rparis6k --root"):
        RevisitedDataset(tmp_path, "rparis6k")


def test_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(OSError, match="bad.jpg"):
        load_image(bad)


def test_truncated_jpeg_still_loads_without_changing_pil_globally(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "cut.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-600])
    with pytest.raises(OSError, match="truncated"):
        with Image.open(path) as im:
            im.load()
    assert load_image(path).size == (64, 64)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----------------------------------------------------------------------------------------------
# Ground-truth files
# ----------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, victim):
        self.victim = victim

    def __reduce__(self):
        return os.remove, (self.victim,)


def test_load_gnd_refuses_code_in_pickles(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    path = tmp_path / "gnd_x.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil(str(victim))]}))
    with pytest.raises(ValueError, match="gnd_x.pkl"):
        load_gnd(path)
    assert victim.read_text() == "still here"


def test_load_gnd_accepts_numpy_arrays_and_checks_keys(tmp_path):
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [
        {"bbx": np.array([1.0, 2.0, 3.0, 4.0]), "easy": np.array([0]), "hard": np.array([]),
         "junk": np.array([])}]}))
    cfg = load_gnd(path)
    assert cfg["gnd"][0]["easy"].tolist() == [0]
    path.write_bytes(pickle.dumps({"imlist": []}))
    with pytest.raises(ValueError, match="qimlist"):
        load_gnd(path)


@pytest.mark.parametrize("name,n_db", [("roxford5k", 4993), ("rparis6k", 6322)])
def test_real_ground_truth(tmp_path, name, n_db):
    src = REAL_GND / f"gnd_{name}.pkl"
    if not src.exists():
        pytest.skip("real ground truth not available")
    (tmp_path / name).mkdir()
    os.symlink(src, tmp_path / name / f"gnd_{name}.pkl")
    ds = RevisitedDataset(tmp_path, name)
    assert (ds.num_database, ds.num_queries) == (n_db, 70)
    assert not set(ds.qimlist) & set(ds.imlist)
    assert len(QueryImages(ds)) == 70 and len(DatabaseImages(ds)) == n_db
    for i in range(70):
        x1, y1, x2, y2 = ds.query_bbox(i)
        assert 0 <= x1 < x2 and 0 <= y1 < y2
    if name == "roxford5k":
        assert ds.query_bbox(0) == (136.5, 34.1, 648.5, 955.7)
        assert [i for i, g in enumerate(ds.gnd) if len(g["easy"]) == 0] == [11, 66]


# ----------------------------------------------------------------------------------------------
# revisitop1m
# ----------------------------------------------------------------------------------------------


def test_revisitop1m_list_and_images(tmp_path):
    folder = tmp_path / "revisitop1m"
    (folder / "jpg" / "ab").mkdir(parents=True)
    Image.new("RGB", (1500, 300), BLUE).save(folder / "jpg" / "ab" / "x1.jpg")
    Image.new("RGB", (40, 30), RED).save(folder / "jpg" / "x2.jpg")
    (folder / "revisitop1m.txt").write_text("ab/x1.jpg\n\nx2\n")
    d = Revisitop1M(tmp_path)
    assert d.imlist == ["ab/x1.jpg", "x2"] and len(d) == 2
    assert d.database_paths() == [folder / "jpg" / "ab" / "x1.jpg", folder / "jpg" / "x2.jpg"]
    assert d.missing_images() == []
    db = d.database()
    assert db[0][0].shape == (3, 205, 1024) and db[1][0].shape == (3, 30, 40)
    with pytest.raises(FileNotFoundError, match="fastap download revisitop1m"):
        Revisitop1M(tmp_path / "elsewhere")
