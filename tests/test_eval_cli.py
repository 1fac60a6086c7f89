"""``fastap eval`` end to end on a fabricated Revisited-layout dataset, and the pieces of
:mod:`fastap.retrieval` it is made of (model specs, whitening files, caching, errors)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastap.retrieval as retrieval
from fastap.cli import main
from fastap.evaluation import evaluate_original, evaluate_revisited
from fastap.extraction import load_descriptors
from fastap.models import RetrievalNet, save_checkpoint
from fastap.whitening import Whitening, alpha_query_expansion, apply_whitening, pca_whitening

NAME = "roxford5k"
N_DB, N_Q, DIM = 12, 3, 32
BBX = [8, 10, 56, 50]
# Query 1 has no Easy positive (like ROxford's queries 11 and 66): it must drop out of Easy only.
GND = [
    {"bbx": BBX, "easy": [0, 1], "hard": [2, 3], "junk": [4]},
    {"bbx": BBX, "easy": [], "hard": [5, 6, 7], "junk": [8]},
    {"bbx": BBX, "easy": [9, 10], "hard": [11], "junk": [0, 1]},
]


def _image(seed: int, size=64) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)  # a coarse "landmark" pattern
    big = np.kron(base, np.ones((size // 4, size // 4, 1), np.uint8)).astype(np.int16)
    big += rng.integers(-20, 21, big.shape).astype(np.int16)
    return Image.fromarray(big.clip(0, 255).astype(np.uint8))


def write_dataset(root: Path, name: str = NAME, gnd=None) -> None:
    jpg = root / name / "jpg"
    jpg.mkdir(parents=True)
    imlist = [f"db_{i:02d}" for i in range(N_DB)]
    qimlist = [f"query_{i}" for i in range(N_Q)]
    for i, n in enumerate(imlist):
        _image(i % 4).save(jpg / f"{n}.jpg", quality=90)  # four groups of similar images
    for i, n in enumerate(qimlist):
        _image(i + 100).save(jpg / f"{n}.jpg", quality=90)
    with open(root / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd or GND}, f, protocol=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Dataset, random-weight resnet18 checkpoint and one full ``fastap eval`` run."""
    base = tmp_path_factory.mktemp("eval")
    root = base / "data"
    write_dataset(root)
    distractors = root / "revisitop1m"
    (distractors / "jpg").mkdir(parents=True)
    for i in range(4):
        _image(200 + i).save(distractors / "jpg" / f"d{i}.jpg")
    (distractors / "revisitop1m.txt").write_text("".join(f"d{i}\n" for i in range(4)))
    torch.manual_seed(0)
    # A whitening layer keeps descriptors 32-d, so that PCA/learned whitening tests are cheap.
    ckpt = save_checkpoint(RetrievalNet("resnet18", whitening_dim=DIM), base / "tiny.pt")
    args = common_args(ckpt, root, base / "features") + [
        "--output", str(base / "out"), "--save-scores", "--show-queries", "3"]
    code, out, err = run_cli(args)
    assert code == 0, err
    return {"base": base, "root": root, "ckpt": ckpt, "features": base / "features",
            "out": base / "out", "stdout": out, "args": args}


def common_args(ckpt, root, features=None) -> list[str]:
    args = ["eval", "--model", str(ckpt), "--dataset", NAME, "--root", str(root),
            "--max-size", "64", "--device", "cpu", "--workers", "0", "--quiet"]
    if features is not None:
        args += ["--features-dir", str(features)]
    return args


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def cached(result: dict, split: str) -> torch.Tensor:
    return torch.from_numpy(np.array(load_descriptors(result["features"][split]["path"])))


def gnd_dict(root: Path) -> dict:
    with open(root / NAME / f"gnd_{NAME}.pkl", "rb") as f:
        return pickle.load(f)


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------


def test_eval_writes_table_json_png_and_matches_an_independent_evaluation(setup):
    out = setup["out"]
    result = json.loads((out / f"{NAME}.json").read_text())
    assert set(result) >= {"model", "dataset", "options", "results", "timings"}
    assert result["dataset"] == NAME
    assert result["model"]["spec"] == str(setup["ckpt"])
    assert result["model"]["arch"] == "resnet18" and result["model"]["out_dim"] == DIM
    assert result["sizes"] == {"queries": N_Q, "database": N_DB, "distractors": 0}
    assert result["options"]["max_size"] == 64 and result["options"]["scales"] == [1.0]
    assert result["options"]["arch"] == "resnet18"  # the checkpoint's, not --arch's default
    assert set(result["results"]) == {"easy", "medium", "hard"}
    for row in result["results"].values():
        assert set(row) == {"mAP", "mP@k"} and set(row["mP@k"]) == {"1", "5", "10"}
    assert all(v >= 0 for v in result["timings"].values())
    assert result["timings"]["total"] >= result["timings"]["extract_database"]

    # Independent recomputation from the cached raw descriptors and from the saved scores.
    q, x = cached(result, "queries"), cached(result, "database")
    assert q.shape == (N_Q, DIM) and x.shape == (N_DB, DIM)
    expected = evaluate_revisited(q @ x.T, gnd_dict(setup["root"]))
    saved = np.load(out / f"{NAME}_scores.npy")
    np.testing.assert_allclose(saved, (q @ x.T).numpy(), atol=1e-5)
    from_saved = evaluate_revisited(saved, gnd_dict(setup["root"]))
    for setup_name in ("easy", "medium", "hard"):
        got = result["results"][setup_name]
        for exp in (expected[setup_name], from_saved[setup_name]):
            assert got["mAP"] == pytest.approx(exp["mAP"], abs=1e-6)
            assert [got["mP@k"][k] for k in ("1", "5", "10")] == pytest.approx(exp["mP@k"],
                                                                              abs=1e-6)
    # Query 1 has no Easy positive: null in JSON, left out of the Easy mean.
    assert result["queries"][1]["AP"]["easy"] is None
    assert result["queries"][1]["AP"]["hard"] is not None
    assert len(result["queries"][0]["top"]) == 10
    assert result["queries"][0]["top"][0] == f"db_{int((q[0] @ x.T).argmax()):02d}"

    # The printed table: the setups over their columns, the model's line with two decimals
    # (format_results of one model), the summary line; saved as text.
    stdout = setup["stdout"]
    lines = stdout.strip().splitlines()
    columns = next(i for i, line in enumerate(lines)
                   if re.search(r"mAP\s+mP@1\s+mP@5\s+mP@10", line))
    assert [s.strip() for s in lines[columns - 1].split("|")[1:]] == ["Easy", "Medium", "Hard"]
    model, *groups = lines[columns + 2].split("|")
    assert model.strip() == result["model"]["spec"]
    for group, key in zip(groups, ("easy", "medium", "hard"), strict=True):
        r = result["results"][key]
        assert group.split() == [f"{v:.2f}" for v in [r["mAP"]] + list(r["mP@k"].values())]
    summary = lines[-1]
    assert re.fullmatch(rf"{NAME}: E \d+\.\d\d  M \d+\.\d\d  H \d+\.\d\d", summary)
    assert f"E {result['results']['easy']['mAP']:.2f}" in summary
    assert (out / f"{NAME}.txt").read_text().strip() == stdout.strip()

    # The figure: a real PNG, 3 query rows of 11 images.
    png = out / f"{NAME}_retrieval.png"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert 1000 <= w <= 3000 and 300 <= h <= 1500, im.size
        colours = np.asarray(im.convert("RGB")).reshape(-1, 3)
    # Frames in the label colours are drawn (green positives exist: the query's own group).
    for colour in [(30, 170, 30), (210, 30, 30)]:
        assert (np.abs(colours.astype(int) - colour).sum(1) < 10).sum() > 100


def test_rerun_reuses_cached_features(setup, monkeypatch):
    result = json.loads((setup["out"] / f"{NAME}.json").read_text())
    finals = [Path(result["features"][s]["path"]) / "descriptors.npy"
              for s in ("queries", "database")]
    mtimes = [p.stat().st_mtime_ns for p in finals]
    calls = []
    real = retrieval.cache.extract_descriptors
    monkeypatch.setattr(retrieval.cache, "extract_descriptors",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    out2 = setup["base"] / "out2"
    code, stdout, err = run_cli(setup["args"][:setup["args"].index("--output")]
                                + ["--output", str(out2), "--show-queries", "0"])
    assert code == 0, err
    assert calls == []
    assert [p.stat().st_mtime_ns for p in finals] == mtimes
    again = json.loads((out2 / f"{NAME}.json").read_text())
    assert again["features"]["queries"]["cached"] and again["features"]["database"]["cached"]
    assert not result["features"]["queries"]["cached"]
    assert again["results"] == result["results"]
    assert stdout.strip().splitlines()[-1] == setup["stdout"].strip().splitlines()[-1]
    assert not (out2 / f"{NAME}_retrieval.png").exists()


def _api(setup, **options) -> dict:
    return retrieval.evaluate_model(str(setup["ckpt"]), NAME, setup["root"], max_size=64,
                                    device="cpu", features_dir=setup["features"],
                                    progress=False, **options)


def _check(result: dict, scores: torch.Tensor, root: Path) -> None:
    expected = evaluate_revisited(scores, gnd_dict(root))
    for name in ("easy", "medium", "hard"):
        assert result["results"][name]["mAP"] == pytest.approx(expected[name]["mAP"], abs=1e-6)


def test_qe_dba_and_pca_whitening_change_results_deterministically(setup):
    base = _api(setup)
    q, x = cached(base, "queries"), cached(base, "database")

    qe = _api(setup, qe=2, qe_alpha=3.0, keep_arrays=True)
    assert qe["options"]["applied"] == {"qe": {"n": 2, "alpha": 3.0}}
    assert _api(setup, qe=2)["results"] == qe["results"]
    q_exp = alpha_query_expansion(q, x, n=2, alpha=3.0)
    torch.testing.assert_close(qe["arrays"]["scores"], q_exp @ x.T, atol=1e-5, rtol=0)
    _check(qe, q_exp @ x.T, setup["root"])
    assert not torch.allclose(q_exp @ x.T, q @ x.T)

    pca = _api(setup, whiten="pca", keep_arrays=True)
    # 12 database images span at most 11 dimensions: the whitening keeps those.
    assert pca["options"]["applied"]["whiten"] == {"kind": "pca", "dim": N_DB - 1}
    w = pca_whitening(x)
    scores = apply_whitening(q, w, N_DB - 1) @ apply_whitening(x, w, N_DB - 1).T
    torch.testing.assert_close(pca["arrays"]["scores"], scores, atol=1e-4, rtol=0)
    _check(pca, scores, setup["root"])
    assert _api(setup, whiten="pca")["results"] == pca["results"]

    dba = _api(setup, dba=3, qe=1)
    assert dba["options"]["applied"] == {"dba": {"n": 3, "alpha": 3.0},
                                         "qe": {"n": 1, "alpha": 3.0}}
    assert dba["features"]["database"]["cached"]


def test_learned_whitening_file(setup, tmp_path):
    base = _api(setup)
    q, x = cached(base, "queries"), cached(base, "database")
    w = Whitening(x.double().mean(0), torch.linalg.qr(torch.randn(DIM, DIM,
                                                                  dtype=torch.float64))[0])
    path = retrieval.save_whitening(w, tmp_path / "w.pt")
    result = _api(setup, whiten=f"learned:{path}", whiten_dim=16, keep_arrays=True)
    assert result["options"]["applied"]["whiten"] == {"kind": "learned", "dim": 16}
    expected = apply_whitening(q, w, 16) @ apply_whitening(x, w, 16).T
    torch.testing.assert_close(result["arrays"]["scores"], expected, atol=1e-4, rtol=0)
    # A bare Whitening tuple saved with torch.save loads too.
    torch.save(w, tmp_path / "tuple.pt")
    assert torch.equal(retrieval.load_whitening(tmp_path / "tuple.pt").projection, w.projection)
    # A whitening of the wrong dimension is refused with both sizes named.
    retrieval.save_whitening(Whitening(torch.zeros(8), torch.eye(8)), tmp_path / "small.pt")
    code, _, err = run_cli(common_args(setup["ckpt"], setup["root"], setup["features"])
                           + ["--whiten", f"learned:{tmp_path / 'small.pt'}",
                              "--show-queries", "0", "--output", str(tmp_path / "o")])
    assert code == 1 and "8-d" in err and f"{DIM}-d" in err


def test_distractors_extend_the_database(setup, tmp_path):
    result = _api(setup, distractors=True, keep_arrays=True, output=tmp_path,
                  show_queries=1)
    assert result["sizes"] == {"queries": N_Q, "database": N_DB, "distractors": 4}
    assert result["tag"] == f"{NAME}+1m"
    assert result["arrays"]["scores"].shape == (N_Q, N_DB + 4)
    assert "revisitop1m" in result["features"]["distractors"]["path"]
    assert result["features"]["database"]["cached"]
    _check(result, result["arrays"]["scores"], setup["root"])
    assert (tmp_path / f"{NAME}+1m.json").exists()
    assert (tmp_path / f"{NAME}+1m_retrieval.png").exists()
    assert format_summary_ok(result)


def format_summary_ok(result) -> bool:
    return retrieval.format_summary(result).startswith(f"{NAME}+1m: E ")


def test_original_protocol_ground_truth(setup, tmp_path):
    gnd = [{"bbx": BBX, "ok": [0, 1, 2], "junk": [3]}, {"bbx": BBX, "ok": [5], "junk": []},
           {"bbx": BBX, "ok": [9, 10], "junk": []}]
    write_dataset(tmp_path, "oxford5k", gnd)
    result = retrieval.evaluate_model(str(setup["ckpt"]), "oxford5k", tmp_path, max_size=64,
                                      device="cpu", progress=False, keep_arrays=True)
    assert set(result["results"]) == {"original"}
    expected = evaluate_original(result["arrays"]["scores"], gnd)
    assert result["results"]["original"]["mAP"] == pytest.approx(expected["mAP"])
    assert "All" in retrieval.format_table(result)


# ----------------------------------------------------------------------------------------------
# Model specs
# ----------------------------------------------------------------------------------------------


def test_parse_model_spec(tmp_path):
    P = retrieval.parse_model_spec
    s = P("torchvision:resnet50")
    assert (s.kind, s.arch, s.weights) == ("torchvision", "resnet50", "IMAGENET1K_V1")
    s = P("torchvision:resnet101:IMAGENET1K_V2")
    assert (s.arch, s.weights) == ("resnet101", "IMAGENET1K_V2")
    s = P("torchvision:IMAGENET1K_V2")
    assert (s.arch, s.weights) == (None, "IMAGENET1K_V2")
    s = P("torchvision:ResNet50_Weights.IMAGENET1K_V2")
    assert (s.arch, s.weights) == ("resnet50", "ResNet50_Weights.IMAGENET1K_V2")
    f = tmp_path / "m.pth"
    f.write_bytes(b"x")
    assert (P(str(f)).kind, P(str(f)).layout) == ("file", None)
    s = P(f"moco:{f}")
    assert (s.layout, s.path) == ("moco", f)
    assert P(f"torchvision:{f}").layout == "torchvision"
    assert P(f"dino:{f}").slug == "dino-m"
    for bad in ("resnet50", "foo:bar", "torchvision:vgg16", "torchvision:resnet50:a:b",
                "torchvision:", ""):
        with pytest.raises(ValueError, match="unknown model spec"):
            P(bad)
    for missing in (str(tmp_path / "nope.pth"), f"moco:{tmp_path / 'nope.pth'}"):
        with pytest.raises(FileNotFoundError, match="nope.pth"):
            P(missing)


def test_torchvision_spec_goes_to_from_pretrained(monkeypatch):
    calls = []

    def fake(source, arch="resnet50", **options):
        calls.append((source, arch, options))
        return RetrievalNet("resnet18")

    monkeypatch.setattr(retrieval.specs, "from_pretrained", fake)
    retrieval.load_model("torchvision:resnet50")
    retrieval.load_model("torchvision:IMAGENET1K_V2", arch="resnet101", pooling="mac")
    assert calls == [("torchvision:IMAGENET1K_V1", "resnet50", {}),
                     ("torchvision:IMAGENET1K_V2", "resnet101", {"pooling": "mac"})]


def test_forced_layouts(tmp_path):
    torch.manual_seed(0)
    trunk = {f"{k}": v for k, v in RetrievalNet("resnet18").backbone.state_dict().items()}
    bare = tmp_path / "bare.pth"  # plain torchvision names without fc: detected as DINO
    torch.save(trunk, bare)
    net = retrieval.load_model(str(bare), arch="resnet18")
    assert net.meta["layout"] == "dino" and net.meta["mean"] is not None
    net = retrieval.load_model(f"simclr:{bare}", arch="resnet18")
    assert net.meta["layout"] == "simclr" and net.meta["mean"] is None and net.meta["std"] is None
    moco = tmp_path / "moco.pth"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in trunk.items()}}, moco)
    assert retrieval.load_model(f"moco:{moco}", arch="resnet18").meta["layout"] == "moco"
    with pytest.raises(ValueError, match="is a moco checkpoint, not dino"):
        retrieval.load_model(f"dino:{moco}", arch="resnet18")
    fast = save_checkpoint(RetrievalNet("resnet18"), tmp_path / "fast.pt")
    assert retrieval.load_model(f"fastap:{fast}").meta["arch"] == "resnet18"
    with pytest.raises(ValueError, match="fastap checkpoint, not moco"):
        retrieval.load_model(f"moco:{fast}")
    with pytest.raises(ValueError, match="arch must be one of"):
        retrieval.load_model(str(bare), arch="resnet9")


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_clear_errors(setup, tmp_path, capsys):
    root, ckpt = setup["root"], setup["ckpt"]
    out = ["--output", str(tmp_path / "o"), "--show-queries", "0"]

    code, _, err = run_cli(common_args("resnet50", root) + out)
    assert code == 1 and "unknown model spec 'resnet50'" in err and "torchvision:" in err
    assert "Traceback" not in err
    code, _, err = run_cli(common_args(tmp_path / "missing.pt", root) + out)
    assert code == 1 and "checkpoint not found" in err

    empty = tmp_path / "empty"
    code, _, err = run_cli(common_args(ckpt, empty) + out)
    assert code == 1 and f"fastap download {NAME} --root" in err

    (root / NAME / "jpg" / "db_03.jpg").rename(tmp_path / "moved.jpg")
    try:
        code, _, err = run_cli(common_args(ckpt, root) + out)
    finally:
        (tmp_path / "moved.jpg").rename(root / NAME / "jpg" / "db_03.jpg")
    assert code == 1 and "1 of 12 database images are missing" in err and "db_03" in err

    # A folder of the same layout under another name: `fastap download` cannot fetch it.
    own = tmp_path / "own"
    write_dataset(own, "mine")
    (own / "mine" / "jpg" / "db_03.jpg").unlink()
    code, _, err = run_cli(common_args(ckpt, own) + out + ["--dataset", "mine"])
    assert code == 1 and "1 of 12 database images are missing" in err, err
    assert "fastap download" not in err and f"put them under {own / 'mine' / 'jpg'}" in err

    code, _, err = run_cli(common_args(ckpt, root, setup["features"]) + out + ["--qe", "50"])
    assert code == 1 and "qe=50 exceeds the database size 12" in err
    code, _, err = run_cli(common_args(ckpt, root) + out + ["--pooling", "mac"])
    assert code == 1 and "pooling='mac' disagrees" in err
    code, _, err = run_cli(common_args(ckpt, root) + out + ["--whiten", "learned:/no/such.pt"])
    assert code == 1 and "whitening file not found" in err
    write_dataset(tmp_path / "nod")  # a dataset without the revisitop1m folder
    code, _, err = run_cli(common_args(ckpt, tmp_path / "nod") + out + ["--distractors"])
    assert code == 1 and "fastap download revisitop1m" in err

    for bad, message in ((["--qe", "-1"], "must be >= 0"), (["--whiten", "zca"], "pca"),
                         (["--max-size", "big"], "expected an integer"),
                         (["--qe-alpha", "nan"], "finite number"),
                         (["--scales", "1,0"], "positive"),
                         (["--multiscale", "--scales", "1"], "not allowed with"),
                         (["--show-setup", "all"], "invalid choice")):
        with pytest.raises(SystemExit) as info:
            main(common_args(ckpt, root) + bad)
        assert info.value.code == 2
        assert message in capsys.readouterr().err

    with pytest.raises(ValueError, match="show_setup"):
        _api(setup, show_setup="all")
    with pytest.raises(ValueError, match="qe must be at least 0, got -2"):
        _api(setup, qe=-2)
    with pytest.raises(ValueError, match="whiten must be"):
        _api(setup, whiten="zca")


def test_bad_device_is_refused_before_the_model_loads(setup, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(retrieval.pipeline, "load_model", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = common_args(setup["ckpt"], setup["root"])
    for device, message in (("foo", "--device: expected cpu, cuda or cuda:N, got 'foo'"),
                            ("cuda", "--device: 'cuda', but torch sees no CUDA GPU")):
        args[args.index("--device") + 1] = device
        code, _, err = run_cli(args + ["--output", str(tmp_path / "o")])
        assert code == 1 and err.startswith(f"fastap: error: {message}"), err
        assert err.count("\n") == 1
    assert loaded == []


def _evaluate(setup, root, features, **options) -> dict:
    return retrieval.evaluate_model(str(setup["ckpt"]), NAME, root, max_size=64, device="cpu",
                                    features_dir=features, progress=False, **options)


def _cached_run(setup, tmp_path) -> tuple[list[str], str]:
    """One successful `fastap eval` that fills the cache tmp_path/f: (its arguments, table)."""
    args = common_args(setup["ckpt"], setup["root"], tmp_path / "f") + [
        "--output", str(tmp_path / "o"), "--show-queries", "0"]
    code, table, err = run_cli(args)
    assert code == 0, err
    return args, table


def test_damaged_cached_descriptors_are_rebuilt(setup, tmp_path):
    args, table = _cached_run(setup, tmp_path)
    (final,) = (tmp_path / "f").glob(f"*/{NAME}/database-*/descriptors.npy")
    good = np.load(final)
    final.write_bytes(final.read_bytes()[:100])  # e.g. a copy cut short

    code, again, err = run_cli(args)
    assert code == 0, err
    assert f"{final} is damaged" in err and again == table
    np.testing.assert_array_equal(np.load(final), good)
    code, _, err = run_cli(args)  # and the rebuilt file serves the next run
    assert code == 0 and "damaged" not in err


def _zero_middle(path, size: int) -> None:
    """``size`` bytes in the middle of the file overwritten with zeros (a bad sector)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + size] = bytes(size)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["int32", "nan", "zeroed bytes"])
def test_cached_descriptors_of_the_wrong_content_are_rebuilt(setup, tmp_path, damage):
    # Once used silently: int32 values of the right shape (Medium mAP 26.0 -> 16.3, exit code
    # 0), NaN rows ("scores[0, 0] is NaN"), and finite bytes changed on disk.
    args, table = _cached_run(setup, tmp_path)
    (final,) = (tmp_path / "f").glob(f"*/{NAME}/database-*/descriptors.npy")
    good = np.load(final)
    if damage == "int32":
        np.save(final, (good * 1000).astype(np.int32))
    elif damage == "nan":
        bad = good.copy()
        bad[3, 5] = np.nan
        np.save(final, bad)
    else:
        _zero_middle(final, 64)
        assert np.isfinite(np.load(final)).all() and not np.array_equal(np.load(final), good)

    code, again, err = run_cli(args)
    assert code == 0, err
    assert f"{final} is damaged" in err and again == table
    np.testing.assert_array_equal(np.load(final), good)


@pytest.mark.parametrize("meta", ["[]", "null", '"text"', "completed strings",
                                  "completed nulls", "count negative"])
def test_damaged_cache_metadata_is_refused_by_name(setup, tmp_path, meta):
    # A list or null meta.json, or a completed list of strings or nulls, once ended in a
    # Python traceback.
    args, _ = _cached_run(setup, tmp_path)
    (path,) = (tmp_path / "f").glob(f"*/{NAME}/database-*/meta.json")
    state = json.loads(path.read_text())
    if meta.startswith("completed"):
        state.update(complete=False, completed=["0"] if meta == "completed strings" else [None])
        text = json.dumps(state)
    elif meta == "count negative":
        text = json.dumps(dict(state, count=-1))
    else:
        text = meta
    path.write_text(text)
    code, _, err = run_cli(args)
    assert code == 1
    assert err.startswith(f"fastap: error: {path} ") and "remove the folder" in err, err
    assert err.count("\n") == 1


def test_damaged_checkpoint_is_refused(setup, tmp_path):
    # 4 KiB of zeros inside the weights: torch.load reads it without complaint (the eval once
    # reported another mAP), the zip entry's CRC-32 does not match.
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(setup["ckpt"].read_bytes())
    _zero_middle(damaged, 4096)
    torch.load(damaged, map_location="cpu", weights_only=True)
    code, _, err = run_cli(common_args(damaged, setup["root"]) + ["--output",
                                                                  str(tmp_path / "o")])
    assert code == 1
    assert err.startswith(f"fastap: error: {damaged} is damaged: its entry ") and \
        "fails the CRC-32 check" in err, err


def test_scales_that_print_alike_get_their_own_cache(setup, tmp_path):
    paths = []
    for scales in ((1.0, 1 / math.sqrt(2)), (1.0, 0.7071)):
        result = _evaluate(setup, setup["root"], tmp_path, scales=scales)
        assert not result["features"]["database"]["cached"]
        path = Path(result["features"]["database"]["path"])
        assert json.loads((path / "meta.json").read_text())["scales"] == list(scales)
        paths.append(path)
    assert paths[0] != paths[1]
    again = _evaluate(setup, setup["root"], tmp_path, scales=(1.0, 1 / math.sqrt(2)))
    assert again["features"]["database"]["cached"]
    assert again["features"]["database"]["path"] == str(paths[0])
    # Scales that .4g gives exactly and amp off need no suffix.
    assert retrieval.cache.cache_tag((1.0, 0.5), 64, None) == "s1_0.5-m64"
    assert retrieval.cache.cache_tag((1.0,), None, "float16") == "s1-mfull-amp_float16"


def test_reannotated_query_boxes_are_not_served_from_the_cache(setup, tmp_path):
    root = tmp_path / "data"
    write_dataset(root)
    first = _evaluate(setup, root, tmp_path / "f", keep_arrays=True)
    gnd = gnd_dict(root)
    gnd["gnd"] = [dict(g, bbx=[0, 0, 40, 40]) for g in gnd["gnd"]]  # as many queries, new boxes
    with open(root / NAME / f"gnd_{NAME}.pkl", "wb") as f:
        pickle.dump(gnd, f, protocol=3)

    second = _evaluate(setup, root, tmp_path / "f", keep_arrays=True)
    assert not second["features"]["queries"]["cached"]
    assert second["features"]["database"]["cached"]
    fresh = _evaluate(setup, root, None, keep_arrays=True)
    torch.testing.assert_close(second["arrays"]["queries"], fresh["arrays"]["queries"])
    assert not torch.allclose(first["arrays"]["queries"], second["arrays"]["queries"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_amp_and_float32_descriptors_are_cached_apart(setup, tmp_path):
    runs = [retrieval.evaluate_model(str(setup["ckpt"]), NAME, setup["root"], max_size=64,
                                     device="cuda", amp=amp, features_dir=tmp_path,
                                     progress=False) for amp in (True, False, True)]
    assert [r["features"]["database"]["cached"] for r in runs] == [False, False, True]
    half, full = (Path(r["features"]["database"]["path"]) for r in runs[:2])
    assert half.name.endswith("-amp_float16") and full.name.endswith("-amp_float32")
    assert json.loads((half / "meta.json").read_text())["amp"] == "float16"
    assert json.loads((full / "meta.json").read_text())["amp"] == "float32"


def test_option_errors_come_before_extraction(setup, tmp_path, monkeypatch):
    def extract(*args, **kwargs):
        raise AssertionError("descriptors were extracted before the options were checked")

    monkeypatch.setattr(retrieval.cache, "extract_descriptors", extract)
    w16 = retrieval.save_whitening(Whitening(torch.zeros(16), torch.eye(16)), tmp_path / "w16.pt")
    w8 = retrieval.save_whitening(Whitening(torch.zeros(DIM), torch.eye(DIM)[:8]),
                                  tmp_path / "w8.pt")
    args = common_args(setup["ckpt"], setup["root"], tmp_path / "f") + [
        "--output", str(tmp_path / "o")]
    for extra, message in (
            (["--whiten", f"learned:{w16}"],
             f"--whiten learned:{w16}: the whitening expects 16-d descriptors, the model gives "
             f"{DIM}-d"),
            (["--whiten", f"learned:{w8}", "--whiten-dim", "16"],
             f"--whiten-dim 16 exceeds the 8 dimensions of the whitening (learned:{w8})"),
            (["--whiten", "pca", "--whiten-dim", "64"], f"--whiten-dim 64 exceeds the {DIM}"),
            (["--qe", "13"], "qe=13 exceeds the database size 12 (lower --qe)"),
            (["--dba", "17", "--distractors"], "dba=17 exceeds the database size 16")):
        code, _, err = run_cli(args + extra)
        assert code == 1 and err.startswith(f"fastap: error: {message}"), (extra, err)
    assert not (tmp_path / "f").exists()


def test_python_dash_m_fastap(tmp_path):
    # cwd away from the checkout: `python -m` puts the cwd first on sys.path, and the source tree
    # of a non-editable install has no compiled kernels.
    proc = subprocess.run([sys.executable, "-m", "fastap", "eval", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for option in ("--model", "--features-dir", "--whiten", "--qe", "--show-queries"):
        assert option in proc.stdout


def test_precision_runs_the_trunk_in_bfloat16_and_caches_it_apart(setup, tmp_path, monkeypatch):
    """bf16 descriptors are float32 ones up to bfloat16 rounding (close, not equal: the trunk
    really ran in bfloat16), cached in their own folder, and the result says which ran. On a
    CPU without bfloat16 units, bf16 falls back to float32 with a warning."""
    import fastap._device

    fp32 = _evaluate(setup, setup["root"], tmp_path / "f", precision="fp32")
    monkeypatch.setattr(fastap._device, "cpu_bf16_units", lambda: "AVX512-BF16")
    bf16 = _evaluate(setup, setup["root"], tmp_path / "f", precision="bf16")
    assert fp32["options"]["precision"] == "fp32" and bf16["options"]["precision"] == "bf16"
    for split in ("queries", "database"):
        assert bf16["features"][split]["path"] != fp32["features"][split]["path"]
        assert "-amp_bfloat16" in str(bf16["features"][split]["path"])
        a, b = cached(fp32, split), cached(bf16, split)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
        assert not torch.equal(a, b) and cos.min() > 0.99, cos.min()
    monkeypatch.setattr(fastap._device, "cpu_bf16_units", lambda: None)
    assert _evaluate(setup, setup["root"], None, precision="auto")["options"]["precision"] \
        == "fp32"
    with pytest.warns(RuntimeWarning, match="no bfloat16 units"):
        fallback = _evaluate(setup, setup["root"], None, precision="bf16")
    assert fallback["options"]["precision"] == "fp32"
    assert fallback["results"] == fp32["results"]
    with pytest.raises(ValueError, match="not both"):
        _evaluate(setup, setup["root"], None, precision="bf16", amp=True)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(common_args(setup["ckpt"], setup["root"]) + ["--precision", "fp16"])
    assert exit_info.value.code == 2
