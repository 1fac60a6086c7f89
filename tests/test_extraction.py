"""Descriptor extraction: multi-scale formula, batching, chunked resumable writing."""

from __future__ import annotations

import errno
import json
import math
import resource
import signal
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fastap import models as M
from fastap.extraction import (MULTISCALE, extract_descriptors, load_descriptors,
                               multiscale_descriptors, net_fingerprint)


class Images(Dataset):
    """Random images in [0, 1] yielding (image, index); counts reads and can fail on one item."""

    def __init__(self, n: int, sizes=((32, 32),), fail_at: int | None = None, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = [torch.rand(3, *sizes[i % len(sizes)], generator=g) for i in range(n)]
        self.fail_at = fail_at
        self.calls: Counter = Counter()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        self.calls[i] += 1
        if i == self.fail_at:
            raise OSError(f"simulated read failure on image {i}")
        return self.images[i], i


class TinyNet(nn.Module):
    """f(x) = L2N(GeM(|x| + 0.1)): no trunk, so the hand computation below is independent."""

    def __init__(self, p: float = 3.0, whiten: bool = False):
        super().__init__()
        self.pool = M.GeM(p=p)
        self.whiten = nn.Identity() if whiten else None
        self.meta = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 0.5]}
        self.out_dim = 3

    def forward(self, x):
        return F.normalize(self.pool(x.abs() + 0.1), dim=-1)


def _hand_descriptor(image: torch.Tensor, p: float, power: float) -> torch.Tensor:
    """Scales (1, 1/2) for TinyNet, by hand: 2×2 block means are bilinear halving."""
    mean = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)
    std = torch.tensor([0.5, 0.25, 0.5]).view(3, 1, 1)
    x = ((image - mean) / std).double()
    c, h, w = x.shape
    half = x.reshape(c, h // 2, 2, w // 2, 2).mean(dim=(2, 4))

    def f(t):
        v = ((t.abs() + 0.1) ** p).mean(dim=(1, 2)) ** (1 / p)
        return v / v.norm()

    avg = (f(x) ** power + f(half) ** power) / 2
    v = avg ** (1 / power)
    return (v / v.norm()).float()


@pytest.mark.parametrize("whiten", [False, True])
def test_multiscale_matches_hand_computation(whiten):
    data = Images(3, sizes=((8, 8), (6, 10)), seed=1)
    net = TinyNet(p=2.5, whiten=whiten)
    got = extract_descriptors(net, data, scales=(1.0, 0.5), progress=False)
    power = 1.0 if whiten else 2.5
    expected = torch.stack([_hand_descriptor(im, 2.5, power) for im in data.images])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    single = extract_descriptors(net, data, scales=(1.0,), progress=False)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)
    std = torch.tensor([0.5, 0.25, 0.5]).view(3, 1, 1)
    torch.testing.assert_close(single[1], net(((data.images[1] - mean) / std)[None])[0])


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return M.RetrievalNet("resnet18", "gem").eval()


def test_resnet_multiscale_formula(r18):
    data = Images(2, sizes=((48, 40),))
    got = extract_descriptors(r18, data, scales=MULTISCALE, progress=False)
    p = r18.gem_p
    with torch.no_grad():
        for i, im in enumerate(data.images):
            x = r18.preprocess(im)[None]
            acc = 0
            for s in (1.0, 1 / math.sqrt(2), 0.5):
                xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                                    align_corners=False)
                acc = acc + r18(xs) ** p
            v = F.normalize((acc / 3) ** (1 / p), dim=-1)[0]
            torch.testing.assert_close(got[i], v, rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32 and got.shape == (2, 512)


def test_batches_and_mixed_sizes_agree(r18):
    data = Images(5, sizes=((32, 32), (32, 48), (32, 32)))
    one = extract_descriptors(r18, data, batch_size=1, progress=False)
    many = extract_descriptors(r18, data, batch_size=4, progress=False, amp=True)  # amp: CPU off
    torch.testing.assert_close(many, one, rtol=1e-4, atol=1e-5)
    workers = extract_descriptors(r18, data, batch_size=2, num_workers=1, progress=False)
    torch.testing.assert_close(workers, one, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        direct = r18(r18.preprocess(data.images[1])[None])[0]
    torch.testing.assert_close(one[1], direct, rtol=1e-5, atol=1e-6)


def test_mode_restored_and_empty_dataset(r18):
    r18.train()
    out = extract_descriptors(r18, Images(0), progress=False)
    assert out.shape == (0, 512)
    assert r18.training
    r18.eval()


def test_resumable_extraction(r18, tmp_path):
    reference = extract_descriptors(r18, Images(9), progress=False)
    out = tmp_path / "desc"

    first = Images(9, fail_at=5)
    with pytest.raises(OSError, match="image 5"):
        extract_descriptors(r18, first, out=out, chunk_size=4, progress=False)
    state = json.loads((out / "meta.json").read_text())
    assert state["completed"] == [0] and not state["complete"]
    assert state["count"] == 9 and state["dim"] == 512 and state["scales"] == [1.0]
    assert state["net"]["arch"] == "resnet18"
    assert (out / "chunk_00000.npy").exists() and not (out / "chunk_00001.npy").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="unfinished"):
        load_descriptors(out)

    second = Images(9)
    result = extract_descriptors(r18, second, out=out, chunk_size=4, progress=False)
    assert all(second.calls[i] == 0 for i in range(4)), "completed chunk was recomputed"
    assert all(second.calls[i] == 1 for i in range(4, 9))
    assert isinstance(result, np.memmap) and result.dtype == np.float32
    assert result.shape == (9, 512)
    np.testing.assert_array_equal(np.asarray(result), reference.numpy())
    assert sorted(p.name for p in out.iterdir()) == ["descriptors.npy", "meta.json"]

    third = Images(9)
    again = extract_descriptors(r18, third, out=out, chunk_size=4, progress=False)
    assert sum(third.calls.values()) == 0
    np.testing.assert_array_equal(np.asarray(again), reference.numpy())
    np.testing.assert_array_equal(np.asarray(load_descriptors(out)), reference.numpy())


def test_resume_refuses_a_different_run(r18, tmp_path):
    out = tmp_path / "desc"
    with pytest.raises(OSError):
        extract_descriptors(r18, Images(6, fail_at=3), out=out, chunk_size=2, progress=False)
    with pytest.raises(ValueError, match="scales"):
        extract_descriptors(r18, Images(6), out=out, chunk_size=2, scales=MULTISCALE,
                            progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        extract_descriptors(r18, Images(6), out=out, chunk_size=3, progress=False)
    other = M.RetrievalNet("resnet18").eval()
    assert net_fingerprint(other) != net_fingerprint(r18)
    with pytest.raises(ValueError, match="fingerprint"):
        extract_descriptors(other, Images(6), out=out, chunk_size=2, progress=False)


def test_damaged_chunk_is_recomputed(r18, tmp_path):
    out = tmp_path / "desc"
    data = Images(4, fail_at=3)
    with pytest.raises(OSError):
        extract_descriptors(r18, data, out=out, chunk_size=2, progress=False)
    (out / "chunk_00000.npy").write_bytes(b"garbage")
    again = Images(4)
    result = extract_descriptors(r18, again, out=out, chunk_size=2, progress=False,
                                 keep_chunks=True)
    assert again.calls[0] == 1 and again.calls[3] == 1
    assert (out / "chunk_00000.npy").exists()
    np.testing.assert_array_equal(np.asarray(result),
                                  extract_descriptors(r18, Images(4), progress=False).numpy())


def test_damaged_result_is_rebuilt_not_fatal(r18, tmp_path, capsys):
    reference = extract_descriptors(r18, Images(5), progress=False).numpy()
    out = tmp_path / "desc"
    extract_descriptors(r18, Images(5), out=out, chunk_size=2, progress=False, keep_chunks=True)
    final = out / "descriptors.npy"
    final.write_bytes(final.read_bytes()[:200])  # cut short, as by a crash or a full disk
    capsys.readouterr()

    kept = Images(5)
    result = extract_descriptors(r18, kept, out=out, chunk_size=2, progress=False)
    assert sum(kept.calls.values()) == 0, "the kept chunks were recomputed"
    assert f"{final} is damaged" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(result), reference)
    assert sorted(p.name for p in out.iterdir()) == ["descriptors.npy", "meta.json"]

    # Without chunks the images are read again; a rerun then opens the rebuilt file as usual.
    # (Garbage fails numpy's header check with ValueError, an empty file with EOFError.)
    for damage in (b"garbage", b""):
        final.write_bytes(damage)
        again = Images(5)
        np.testing.assert_array_equal(
            np.asarray(extract_descriptors(r18, again, out=out, chunk_size=2, progress=False)),
            reference)
        assert all(again.calls[i] == 1 for i in range(5))
        np.testing.assert_array_equal(np.asarray(load_descriptors(out)), reference)


def test_full_disk_names_the_file_and_keeps_the_chunks(r18, tmp_path):
    reference = extract_descriptors(r18, Images(9), progress=False).numpy()
    out = tmp_path / "desc"
    # A file-size limit (SIGXFSZ ignored) fails writes as a full disk does, with EFBIG: each
    # 4-row chunk (8 KiB) fits under it, the assembled 9-row descriptors.npy (18 KiB) does not.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, hard))
    try:
        with pytest.raises(OSError) as info:
            extract_descriptors(r18, Images(9), out=out, chunk_size=4, progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert info.value.errno == errno.EFBIG
    assert info.value.strerror == (f"writing {out / 'descriptors.npy'}: File too large; free "
                                   "space and rerun (finished chunks are kept)")
    assert sorted(p.name for p in out.iterdir()) == [
        "chunk_00000.npy", "chunk_00001.npy", "chunk_00002.npy", "meta.json"]

    rerun = Images(9)
    result = extract_descriptors(r18, rerun, out=out, chunk_size=4, progress=False)
    assert sum(rerun.calls.values()) == 0
    np.testing.assert_array_equal(np.asarray(result), reference)


def test_bad_arguments(r18):
    with pytest.raises(ValueError, match="scales"):
        extract_descriptors(r18, Images(1), scales=(), progress=False)
    with pytest.raises(ValueError, match="scales"):
        extract_descriptors(r18, Images(1), scales=(1.0, -0.5), progress=False)

    class Bad(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return "not an image", i

    with pytest.raises(TypeError, match="C×H×W tensor"):
        extract_descriptors(r18, Bad(), progress=False)
    with pytest.raises(ValueError):
        multiscale_descriptors(r18, torch.rand(1, 3, 8, 8), scales=())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_cuda_amp_extraction_matches_cpu(r18, tmp_path):
    data = Images(6, sizes=((64, 64), (48, 64)))
    cpu = extract_descriptors(r18, data, scales=MULTISCALE, progress=False)
    gpu = extract_descriptors(r18, data, scales=MULTISCALE, batch_size=3, device="cuda",
                              progress=False)  # amp defaults to on for CUDA
    assert next(r18.parameters()).device.type == "cpu", "net not moved back"
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    assert ((gpu * cpu).sum(dim=1) > 0.999).all()
    exact = extract_descriptors(r18, data, scales=MULTISCALE, device="cuda", amp=False,
                                out=tmp_path / "d", chunk_size=4, num_workers=2, progress=False)
    # cuDNN may use TF32 for float32 convolutions, so compare directions, not digits.
    assert ((torch.from_numpy(np.array(exact)) * cpu).sum(dim=1) > 0.9999).all()


def test_recorded_trunk_precision():
    # CPU folders record nothing (as before the key existed, so their caches stay valid); a CUDA
    # float32 run records float32, so an old CUDA folder (float16 by default then) never
    # passes for one.
    from fastap.extraction import amp_key

    assert amp_key(torch.device("cpu"), False) is None
    assert amp_key(torch.device("cuda", 0), False) == "float32"
    assert amp_key(torch.device("cuda", 0), True) == "float16"
    assert amp_key(torch.device("cuda", 0), True, torch.bfloat16) == "bfloat16"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_amp_is_part_of_the_folder_identity(r18, tmp_path):
    out = tmp_path / "d"
    extract_descriptors(r18, Images(2), device="cuda", amp=True, out=out, progress=False)
    assert json.loads((out / "meta.json").read_text())["amp"] == "float16"
    # float16 descriptors are not those of a float32 run: the folder refuses to serve them.
    with pytest.raises(ValueError, match="amp"):
        extract_descriptors(r18, Images(2), device="cuda", amp=False, out=out, progress=False)
    # Nor does a CUDA folder of a version that did not record amp (then on by default).
    state = json.loads((out / "meta.json").read_text())
    del state["amp"]
    (out / "meta.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="amp"):
        extract_descriptors(r18, Images(2), device="cuda", amp=False, out=out, progress=False)
