"""The ``fastap`` command line: ``info`` and ``download`` (against a static HTTP server on
127.0.0.1 serving a fabricated mirror)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

import fastap
import fastap.download as dl
from fastap.cli import build_parser, main
from fastap.datasets import RevisitedDataset

DB, Q = ["oxford_000001", "oxford_000002"], ["all_souls_000013"]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A static mirror folder (``<base name>/<path>`` as fastap expects), served on 127.0.0.1."""
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    folder = tmp_path / "mirror"
    gnd = pickle.dumps({"imlist": DB, "qimlist": Q, "gnd": [
        {"bbx": [0, 0, 4, 4], "easy": [0], "hard": [1], "junk": []}]}, protocol=3)
    (folder / "revisitop" / "roxford5k").mkdir(parents=True)
    (folder / "revisitop" / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(gnd)
    spec = dl.DATASETS["roxford5k"]
    monkeypatch.setitem(dl.DATASETS, "roxford5k", dataclasses.replace(
        spec, index=dataclasses.replace(spec.index, md5=hashlib.md5(gnd).hexdigest())))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in DB + Q:
            image = io.BytesIO()
            Image.new("RGB", (6, 6), (9, 99, 199)).save(image, format="JPEG")
            info = tarfile.TarInfo(f"oxbuild_images/{name}.jpg")
            info.size = len(image.getvalue())
            image.seek(0)
            tar.addfile(info, image)
    (folder / "oxbuildings").mkdir()
    (folder / "oxbuildings" / "oxbuild_images-v1.tgz").write_bytes(buf.getvalue())

    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"fastap {fastap.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert f"CUDA kernels compiled: {'yes' if fastap.WITH_CUDA else 'no'}" in out
    assert f"GPU visible: {'yes' if torch.cuda.is_available() else 'no'}" in out


def test_download_with_mirror_option(mirror, tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["download", "roxford5k", "--root", str(root), "--mirror", mirror]) == 0
    captured = capsys.readouterr()
    assert f"roxford5k: {root / 'roxford5k'}" in captured.out
    assert "oxbuild_images-v1.tgz" in captured.err  # progress messages go to stderr
    ds = RevisitedDataset(root, "roxford5k")
    assert ds.missing_images() == [] and len(ds.queries()) == 1


def test_download_with_environment_mirror_and_keep_archives(mirror, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setenv(dl.MIRROR_ENV, mirror)
    assert main(["download", "roxford5k", "--root", str(tmp_path), "--quiet",
                 "--keep-archives"]) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "roxford5k" / ".download" / "oxbuild_images-v1.tgz").exists()
    assert len(list((tmp_path / "roxford5k" / "jpg").iterdir())) == 3


def test_download_error_is_one_line_naming_the_url(mirror, tmp_path, capsys):
    # The mirror has no rparis6k ground truth: a 404, reported without a traceback.
    assert main(["download", "rparis6k", "--root", str(tmp_path), "--mirror", mirror,
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastap: error: HTTP 404")
    assert f"{mirror}/revisitop/rparis6k/gnd_rparis6k.pkl" in err
    assert "Traceback" not in err


def test_arguments_are_validated(capsys):
    for argv in ([], ["download", "oxford105k", "--root", "x"], ["download", "roxford5k"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    capsys.readouterr()
    parser = build_parser()
    args = parser.parse_args(["download", "roxford5k", "rparis6k", "revisitop1m", "--root", "d"])
    assert args.datasets == ["roxford5k", "rparis6k", "revisitop1m"] and args.retries == 3


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "fastap.cli", "info"], capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"fastap {fastap.__version__}")


def test_precision_follows_the_cpus_bfloat16_units(monkeypatch):
    """auto: bf16 only where the CPU has the units; bf16 asked for without them: float32 and a
    warning; fp32 always; other values are refused by name. (Capability forced both ways.)"""
    import fastap._device as dev

    monkeypatch.setattr(dev, "cpu_bf16_units", lambda: "AVX512-BF16")
    assert dev.resolve_precision("auto", "cpu") == ("bf16", "this CPU has AVX512-BF16 units")
    assert dev.resolve_precision("bf16", "cpu")[0] == "bf16"
    assert dev.resolve_precision("fp32", "cpu")[0] == "fp32"
    monkeypatch.setattr(dev, "cpu_bf16_units", lambda: None)
    assert dev.resolve_precision("auto", "cpu") == (
        "fp32", "this CPU has no bfloat16 units (avx512_bf16 or amx_bf16)")
    with pytest.warns(RuntimeWarning, match=r"^--precision bf16: this CPU has no bfloat16 units"):
        assert dev.resolve_precision("bf16", "cpu", "--precision")[0] == "fp32"
    with pytest.raises(ValueError, match=r"^train\.precision: expected one of auto, fp32, bf16"):
        dev.resolve_precision("half", "cpu", "train.precision")
    with dev.autocast("bf16", "cpu"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with dev.autocast("fp32", "cpu"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_info_names_the_precision_of_training(monkeypatch, capsys):
    import fastap._device as dev

    monkeypatch.setattr(dev, "cpu_bf16_units", lambda: None)
    assert main(["info"]) == 0
    assert "CPU training and extraction (--precision auto): fp32 (this CPU has no" in \
        capsys.readouterr().out


def test_device_choices_are_checked_by_one_rule(monkeypatch):
    from fastap._device import resolve_device

    assert resolve_device("cpu", "--device") == torch.device("cpu")
    assert resolve_device(None, "--device").type == ("cuda" if torch.cuda.is_available()
                                                       else "cpu")
    for bad in ("gpu", "meta", "cuda:x", 3.5):
        with pytest.raises(ValueError, match=r"^--device: expected cpu, cuda or cuda:N, got"):
            resolve_device(bad, "--device")
    # One visible GPU: cuda:0 exists, cuda:3 does not (checked without touching a GPU).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0", "train.device") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"^train\.device: 'cuda:3', but only 1 CUDA GPU"):
        resolve_device("cuda:3", "train.device")
