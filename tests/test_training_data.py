"""List files, augmentations and the resumable samplers."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fastap.training import (ClassBalancedBatchSampler, ConfigError, LabelledImages,
                             RandomBatchSampler, TwoViewImages, build_transform, read_list_file,
                             sfm120k_list)


def _image(path, seed=0, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_text_list_with_spaces_comments_and_root(tmp_path):
    for name in ("a 1.png", "b.png", "sub/c.png"):
        _image(tmp_path / "imgs" / name)
    lst = tmp_path / "train.txt"
    lst.write_text("# header comment\nimgs/a 1.png  eiffel\n\nimgs/b.png louvre\n"
                   "imgs/sub/c.png eiffel\n")
    data = read_list_file(lst)
    assert [p.name for p in data.paths] == ["a 1.png", "b.png", "c.png"]
    assert data.labels == [0, 1, 0] and data.classes == ["eiffel", "louvre"]
    (tmp_path / "elsewhere").mkdir()
    other = tmp_path / "elsewhere" / "list.txt"
    other.write_text("a 1.png 3\n")
    assert read_list_file(other, tmp_path / "imgs").paths == [tmp_path / "imgs" / "a 1.png"]


def test_csv_and_gldv2_layouts(tmp_path):
    _image(tmp_path / "x.jpg")
    _image(tmp_path / "y.jpg")
    (tmp_path / "l.csv").write_text("path,label\nx.jpg,7\ny.jpg,9\n")
    assert read_list_file(tmp_path / "l.csv").labels == [0, 1]
    for image_id in ("abc123", "abd999", "f00000"):
        _image(tmp_path / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg")
    (tmp_path / "train_clean.csv").write_text("landmark_id,images\n12,abc123 abd999\n40,f00000\n")
    data = read_list_file(tmp_path / "train_clean.csv", tmp_path / "train")
    assert data.labels == [0, 0, 1] and data.classes == ["12", "40"]
    assert data.paths[2] == tmp_path / "train" / "f" / "0" / "0" / "f00000.jpg"
    (tmp_path / "train.csv").write_text("id,url,landmark_id\nabc123,http://x,5\n")
    assert read_list_file(tmp_path / "train.csv", tmp_path / "train").paths[0].name == "abc123.jpg"


def test_missing_images_are_named(tmp_path):
    _image(tmp_path / "ok.png")
    lst = tmp_path / "train.txt"
    lst.write_text("ok.png 0\nmissing_one.png 0\nok.png 1\n")
    with pytest.raises(FileNotFoundError, match=r"train\.txt: 1 listed image\(s\) not found: "
                                                r"line 2: .*missing_one\.png"):
        read_list_file(lst)
    assert len(read_list_file(lst, check_files=False)) == 3
    with pytest.raises(FileNotFoundError, match="list file not found"):
        read_list_file(tmp_path / "absent.txt")


def test_labels_required_for_finetuning_and_folders_for_contrastive(tmp_path):
    _image(tmp_path / "f" / "a.png")
    _image(tmp_path / "f" / "b" / "c.jpg")
    (tmp_path / "u.txt").write_text("f/a.png\n")
    with pytest.raises(ConfigError, match=r"data\.train_list: .*u\.txt: line 1 has no label"):
        read_list_file(tmp_path / "u.txt")
    assert read_list_file(tmp_path / "u.txt", need_labels=False).labels is None
    folder = read_list_file(tmp_path / "f", need_labels=False)
    assert [p.name for p in folder.paths] == ["a.png", "c.jpg"]
    with pytest.raises(ConfigError, match=r"data\.train_list: .*f is a folder"):
        read_list_file(tmp_path / "f")


def test_sfm120k_conversion(tmp_path):
    db = {"train": {"cids": ["0123456789abcdef", "fedcba9876543210"], "cluster": [4, 9],
                    "qidxs": [0], "pidxs": [1]}}
    (tmp_path / "db.pkl").write_bytes(pickle.dumps(db))
    out = sfm120k_list(tmp_path / "db.pkl", tmp_path / "train.txt")
    assert out.read_text().splitlines() == ["ims/ef/cd/ab/0123456789abcdef 4",
                                            "ims/10/32/54/fedcba9876543210 9"]


@pytest.mark.parametrize("kind", ["retrieval", "mocov2", "simclr", "none"])
def test_augmentations_are_a_function_of_the_sample_seed(tmp_path, kind):
    _image(tmp_path / "a.png", size=(40, 30))
    (tmp_path / "l.txt").write_text("a.png 0\na.png 1\n")
    data = read_list_file(tmp_path / "l.txt")
    ds = LabelledImages(data, build_transform(kind, 16, (0.3, 1.0)), views=2)
    torch.manual_seed(0)
    v1, v2, label, index = ds[(1, 1234)]
    state = torch.get_rng_state()
    assert v1.dtype == torch.uint8 and v1.shape == (3, 16, 16) and (label, index) == (1, 1)
    torch.manual_seed(99)  # the global RNG does not matter...
    w1, w2, _, _ = ds[(1, 1234)]
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    torch.manual_seed(0)
    ds[(1, 1234)]
    assert torch.equal(torch.get_rng_state(), state)  # ...and is left untouched
    if kind != "none":
        assert not torch.equal(v1, v2)  # two different views
        assert not torch.equal(ds[(1, 1)][0], v1)
    views = TwoViewImages(data, build_transform(kind, 16))[(0, 7)]
    assert len(views) == 3 and views[0].shape == (3, 16, 16)


def _labels():
    # 7 classes with 2..6 images, one singleton class (no positive, never sampled).
    return [0] * 3 + [1] * 2 + [2] * 6 + [3] * 4 + [4] * 2 + [5] * 5 + [6] * 3 + [7]


def test_class_balanced_batches():
    labels = _labels()
    sampler = ClassBalancedBatchSampler(labels, 3, 4, seed=5)
    assert sampler.batches_per_epoch == 7 // 3
    seen = Counter()
    for batch in sampler:
        idx = [i for i, _ in batch]
        counts = Counter(labels[i] for i in idx)
        assert len(batch) == 12 and len(counts) == 3 and set(counts.values()) == {4}
        for c in counts:  # distinct images first, repeats only for classes smaller than K
            distinct = len({i for i in idx if labels[i] == c})
            assert distinct == min(4, labels.count(c))
        seen.update(counts)
        assert len({s for _, s in batch}) == 12  # every sample its own augmentation seed
    assert 7 not in seen and len(seen) == 6  # each class at most once per epoch
    with pytest.raises(ConfigError, match=r"data\.classes_per_batch: 8 .* only 7 classes"):
        ClassBalancedBatchSampler(labels, 8, 2)


def _assert_shards_split(batches, labels, p, k, *, epoch, world_size, **options):
    """The processes' shards of every batch, concatenated in rank order, are that batch."""
    shards = [ClassBalancedBatchSampler(labels, p, k, rank=r, world_size=world_size, **options)
              for r in range(world_size)]
    for s in shards:
        s.set_epoch(epoch)
    for b, parts in enumerate(zip(*shards)):
        assert [x for part in parts for x in part] == batches[b]


def test_sampler_epochs_resumption_and_shards():
    labels = _labels()
    full = ClassBalancedBatchSampler(labels, 2, 3, seed=1, batches_per_epoch=5)
    full.set_epoch(3)
    epoch3 = list(full)
    assert list(full) == epoch3  # deterministic
    full.set_epoch(4)
    assert list(full) != epoch3
    resumed = ClassBalancedBatchSampler(labels, 2, 3, seed=1, batches_per_epoch=5)
    resumed.set_epoch(3, start_batch=2)
    assert len(resumed) == 3 and list(resumed) == epoch3[2:]
    _assert_shards_split(epoch3, labels, 2, 3, epoch=3, world_size=3, seed=1,
                         batches_per_epoch=5)
    with pytest.raises(ValueError, match="divisible"):
        ClassBalancedBatchSampler(labels, 2, 3, world_size=4)


def test_random_batches_cover_the_data():
    sampler = RandomBatchSampler(10, 3, seed=2)
    batches = list(sampler)
    assert len(batches) == 3
    idx = [i for b in batches for i, _ in b]
    assert len(set(idx)) == 9
    long = RandomBatchSampler(10, 4, seed=2, batches_per_epoch=6)
    assert Counter(i for b in long for i, _ in b).most_common(1)[0][1] <= 3


def test_long_epochs_keep_the_classes_of_a_batch_distinct():
    """The demo's shape: 80 classes, P = 12, K = 8, 120 batches an epoch (18 permutations of
    the classes). A batch made of one permutation's tail and the next one's head used to hold a
    class twice (3 of these 120 batches); now each permutation gives 80 // 12 = 6 whole batches
    and every batch has 12 distinct classes with 8 images each."""
    labels = [c for c in range(80) for _ in range(10)]
    sampler = ClassBalancedBatchSampler(labels, 12, 8, seed=3, batches_per_epoch=120)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = [[labels[i] for i, _ in b] for b in sampler]
        assert len(batches) == 120
        for b in batches:
            assert sorted(Counter(b).values()) == [8] * 12
        for first in range(0, 120, 6):  # 6 batches = one permutation: 72 different classes
            assert len({c for b in batches[first:first + 6] for c in b}) == 72
    # Resuming at any batch (here past a permutation boundary) and sharding over processes
    # give the same batches.
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_epoch(1, start_batch=7)
    assert list(sampler) == full[7:]
    _assert_shards_split(full, labels, 12, 8, epoch=1, world_size=4, seed=3,
                         batches_per_epoch=120)


def test_sizes_that_cannot_fill_a_batch_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.batch_size: 12, .* only 10 images"):
        RandomBatchSampler(10, 12)
    with pytest.raises(ConfigError, match=r"data\.classes_per_batch: 2 .* only 0 classes"):
        ClassBalancedBatchSampler([0, 1, 2], 2, 2)
