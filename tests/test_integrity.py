"""What fastap reads back is checked: damaged checkpoints are refused by name, damaged descriptor
folders refused (metadata) or rebuilt with a notice (arrays, chunks), never used."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fastap import models as M
from fastap.extraction import extract_descriptors, load_descriptors
from fastap.retrieval import load_whitening, save_whitening
from fastap.training import CheckpointError, config_from_checkpoint
from fastap.whitening import Whitening


def _zero_middle(path, size: int = 4096) -> None:
    """``size`` bytes in the middle of the file overwritten with zeros (a bad sector)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + size] = bytes(size)
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    torch.manual_seed(0)
    return M.save_checkpoint(M.RetrievalNet("resnet18"),
                             tmp_path_factory.mktemp("ckpt") / "r18.pt")


@pytest.fixture
def damaged(r18_file, tmp_path):
    path = tmp_path / "damaged.pt"
    path.write_bytes(r18_file.read_bytes())
    _zero_middle(path)
    # The damage is inside a tensor's bytes: torch.load itself reads the file without a word.
    torch.load(path, map_location="cpu", weights_only=True)
    return path


_CRC = r"is damaged: its entry '[^']+' fails the CRC-32 check stored with it"


def test_damaged_fastap_checkpoint(r18_file, damaged):
    net, _ = M.load_checkpoint(r18_file)  # the intact file loads
    assert net.meta["arch"] == "resnet18"
    for load in (M.load_checkpoint, M.from_pretrained):
        with pytest.raises(ValueError, match=rf"^{damaged} {_CRC} .*; copy or download it again"):
            load(damaged)


def test_damaged_foreign_checkpoint(tmp_path):
    torch.manual_seed(0)
    trunk = M.RetrievalNet("resnet18").backbone.state_dict()
    # torch's pre-1.6 format is a pickle stream without CRCs: nothing to check, nothing refused.
    legacy = tmp_path / "legacy.pth"
    torch.save(trunk, legacy, _use_new_zipfile_serialization=False)
    loaded = M.from_pretrained(legacy, "resnet18")
    assert torch.equal(loaded.backbone.conv1.weight, trunk["conv1.weight"])
    path = tmp_path / "moco.pth"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in trunk.items()}}, path)
    M.from_pretrained(path, "resnet18")
    _zero_middle(path)
    with pytest.raises(ValueError, match=rf"^{path} {_CRC}"):
        M.from_pretrained(path, "resnet18")


def test_damaged_training_state(tmp_path):
    # The resume path (fastap train --resume / --resume-from) reads it with the same check.
    path = tmp_path / "step_00000010.pt"
    torch.save({"kind": "x", "weights": torch.randn(64, 1024)}, path)
    _zero_middle(path)
    with pytest.raises(CheckpointError, match=rf"^{path} {_CRC} .*; it was left untouched"):
        config_from_checkpoint(path)


def test_damaged_whitening_file(tmp_path):
    path = save_whitening(Whitening(torch.randn(256, dtype=torch.float64),
                                    torch.randn(256, 256, dtype=torch.float64)),
                          tmp_path / "w.pt")
    load_whitening(path)
    _zero_middle(path)
    with pytest.raises(ValueError, match=rf"^{path} {_CRC}"):
        load_whitening(path)


# ---------------------------------------------------------------------------------------------
# Descriptor folders
# ---------------------------------------------------------------------------------------------

class Images(Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.images = [torch.rand(3, 8, 8, generator=g) for _ in range(n)]
        self.calls = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        self.calls += 1
        return self.images[i], i


class MeanNet(nn.Module):
    """f(x) = L2N(channel means + 0.1): descriptors by hand, no trunk."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.meta, self.out_dim, self.nan_at, self.seen = {"mean": None}, 3, nan_at, 0

    def forward(self, x):
        v = x.mean(dim=(2, 3)) + 0.1
        if self.nan_at is not None and self.seen <= self.nan_at < self.seen + len(v):
            v[self.nan_at - self.seen, 0] = float("nan")
        self.seen += len(v)
        return F.normalize(v, dim=1)


def _expected(n: int) -> np.ndarray:
    return F.normalize(torch.stack(Images(n).images).mean(dim=(2, 3)) + 0.1, dim=1).numpy()


def _extract(out, n=5, **options):
    data = Images(n)
    result = extract_descriptors(MeanNet(), data, out=out, chunk_size=2, progress=False,
                                 **options)
    return np.array(result), data.calls  # a copy: the memmap follows the file


def _damage_array(path, kind: str) -> None:
    good = np.load(path)
    if kind == "int32":
        np.save(path, (good * 1000).astype(np.int32))
    elif kind == "float64":
        np.save(path, good.astype(np.float64))
    elif kind == "nan":
        bad = good.copy()
        bad[-1, 1] = np.nan
        np.save(path, bad)
    elif kind == "inf":
        bad = good.copy()
        bad[0, 0] = np.inf
        np.save(path, bad)
    else:  # finite bytes changed: only the CRC-32 recorded at writing tells
        data = bytearray(path.read_bytes())
        data[-8:-4] = np.float32(0.25).tobytes()
        path.write_bytes(bytes(data))
        assert np.isfinite(np.load(path)).all()


_ARRAY_DAMAGE = ["int32", "float64", "nan", "inf", "changed bytes"]


@pytest.mark.parametrize("kind", _ARRAY_DAMAGE)
def test_damaged_descriptors_are_refused_then_rebuilt(tmp_path, capsys, kind):
    out = tmp_path / "d"
    first, _ = _extract(out)
    np.testing.assert_allclose(first, _expected(5), rtol=1e-6)
    final = out / "descriptors.npy"
    _damage_array(final, kind)
    with pytest.raises(ValueError, match=rf"^{final} is damaged \(.*\); rerun "
                                         "extract_descriptors"):
        load_descriptors(out)
    capsys.readouterr()
    again, calls = _extract(out)
    assert f"{final} is damaged" in capsys.readouterr().err
    assert calls == 5  # the chunks were removed: every image is read again
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(np.asarray(load_descriptors(out)), first)


@pytest.mark.parametrize("kind", _ARRAY_DAMAGE)
def test_damaged_chunks_are_extracted_again(tmp_path, capsys, kind):
    out = tmp_path / "d"
    first, _ = _extract(out, keep_chunks=True)
    (out / "descriptors.npy").unlink()
    chunk = out / "chunk_00001.npy"
    _damage_array(chunk, kind)
    capsys.readouterr()
    again, calls = _extract(out, keep_chunks=True)
    assert f"{chunk} is damaged" in capsys.readouterr().err
    assert calls == 2  # chunk 1 only
    np.testing.assert_array_equal(again, first)


def test_a_net_giving_nan_is_refused(tmp_path):
    for out in (None, tmp_path / "d"):
        with pytest.raises(RuntimeError, match=r"^the net produced NaN or Inf descriptors for "
                                               r"images 2 to 3"):
            extract_descriptors(MeanNet(nan_at=3), Images(5), out=out, chunk_size=2,
                                progress=False)


def test_foreign_metadata_is_not_fastaps(tmp_path):
    # A folder of something else (a dataset's own meta.json) is not advised to be removed.
    out = tmp_path / "d"
    _extract(out)
    (out / "meta.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=rf"^{out} holds something other than fastap "
                                         r"descriptors .*; choose another folder$"):
        _extract(out)


@pytest.mark.parametrize("meta", ["[]", "null", "3", "{", "completed strings",
                                  "completed nulls", "completed past the end",
                                  "completed not a list", "dim zero", "count a string",
                                  "crc32 not a dict"])
def test_damaged_metadata_is_refused_by_name(tmp_path, meta):
    out = tmp_path / "d"
    _extract(out)
    path = out / "meta.json"
    state = json.loads(path.read_text())
    changes = {"completed strings": {"completed": ["0"]},
               "completed nulls": {"completed": [None]}, "completed past the end": {
                   "completed": [3]}, "completed not a list": {"completed": 0},
               "dim zero": {"dim": 0}, "count a string": {"count": "5"},
               "crc32 not a dict": {"crc32": [1]}}
    path.write_text(json.dumps(dict(state, complete=False, **changes[meta]))
                    if meta in changes else meta)
    message = rf"^{path} .*; remove the folder {out} \(or choose another\) and rerun"
    with pytest.raises(ValueError, match=message):
        load_descriptors(out)
    with pytest.raises(ValueError, match=message):
        _extract(out)


# ---------------------------------------------------------------------------------------------
# Synthetic datasets
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stored", ["[]", "null", "counts a list"])
def test_damaged_synthetic_record_is_regenerated(tmp_path, stored):
    # Once an AttributeError traceback; the dataset is a function of its seed: generate again.
    from fastap.datasets.synthetic import generate

    tiny = dict(image_size=64, families=2, instances_per_family=2, views_per_instance=5,
                distractors=6, train_families=1, train_instances_per_family=2,
                train_views_per_instance=2)
    first = generate(tmp_path, "s", seed=0, **tiny)
    record = tmp_path / "s" / "synthetic.json"
    text = record.read_text()
    record.write_text(json.dumps(dict(json.loads(text), counts=[1]))
                      if stored == "counts a list" else stored)
    again = generate(tmp_path, "s", seed=0, **tiny)
    assert again.generated and again.counts == first.counts
    assert json.loads(record.read_text()) == json.loads(text)

