"""The trainer end to end on tiny images: both stages, accumulation, AMP, logs, checkpoints, and a
run killed with SIGKILL and resumed that must end with the weights of an uninterrupted run."""

from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import fastap
from fastap.cli import main
from fastap.models import load_checkpoint, from_pretrained
from fastap.training import Trainer, build_net, build_transform, load_config, train
from fastap.training.data import LabelledImages, read_list_file

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cheap_and_restored():
    # One intra-op thread (two shared cores); the trainer switches on deterministic algorithms
    # process-wide, which must not leak into other test files.
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


def _write_images(root: Path, classes: int = 6, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for c in range(classes):
        base = rng.integers(0, 255, 3)
        for k in range(per_class):
            pixels = np.clip(base + rng.integers(-60, 60, (20, 24, 3)), 0, 255).astype(np.uint8)
            name = f"img/c{c}_{k}.png"
            (root / "img").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / name)
            lines.append(f"{name} landmark{c}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root / "train.txt"


def _config(tmp_path: Path, run: str = "run", **sections) -> dict:
    cfg = {
        "stage": "finetune", "output_dir": str(tmp_path / run), "seed": 3,
        "model": {"arch": "resnet18", "pooling": "gem", "whitening_dim": 32},
        "data": {"train_list": str(_write_images(tmp_path)), "image_size": 32,
                 "classes_per_batch": 2, "images_per_class": 2, "num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "train": {"max_steps": 2},
        "checkpoint": {"every": 0},
        "log": {"every": 1, "tensorboard": False, "progress": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    return cfg


def _load(cfg: dict, tmp_path: Path, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path), path


def _read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------


def test_gradient_accumulation_and_multistage_match_manual_sgd(tmp_path):
    """One SGD step (no momentum) over 2 micro-batches in chunks of 3 equals
    w − lr·(∇L(batch 1) + ∇L(batch 2))/2 computed with plain backprop (GeM p at 10× lr)."""
    cfg, _ = _load(_config(tmp_path, optim={"momentum": 0.0, "lr": 0.1},
                           schedule={"name": "constant", "warmup_steps": 0},
                           data={"classes_per_batch": 3, "images_per_class": 2},
                           train={"max_steps": 1, "accumulate": 2, "chunk_size": 3}), tmp_path)
    trainer = Trainer(cfg)
    net0 = {n: p.detach().clone() for n, p in trainer.net.named_parameters()}
    oracle = copy.deepcopy(trainer.query_model)  # the initial weights, before the step
    trainer._set_modes()
    values = trainer.train_step()

    data = read_list_file(cfg.data.train_list)
    ds = LabelledImages(data, build_transform("retrieval", 32, cfg.data.crop_scale))
    trainer.sampler.set_epoch(0)
    batches = list(trainer.sampler)[:2]
    loss_fn = fastap.APLoss()
    oracle.train()
    for m in oracle.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    losses = []
    for batch in batches:
        items = [ds[item] for item in batch]
        images = torch.stack([i[0] for i in items])
        labels = torch.tensor([i[1] for i in items])
        loss = loss_fn(oracle(images), labels) / 2
        loss.backward()
        losses.append(loss.item() * 2)
    assert values["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    for name, p in oracle.net.named_parameters():
        lr = 1.0 if name == "pool.p" else 0.1
        want = net0[name] - lr * p.grad
        torch.testing.assert_close(dict(trainer.net.named_parameters())[name].detach(), want,
                                   rtol=1e-4, atol=1e-6, msg=name)


def test_finetune_with_infonce_term_bf16_logs_and_outputs(tmp_path):
    cfg, _ = _load(_config(tmp_path, loss={"contrastive_weight": 0.5},
                           contrastive={"queue_size": 16, "hidden_dim": 32, "dim": 8},
                           train={"max_steps": 2, "amp": "bfloat16", "chunk_size": 2},
                           checkpoint={"every": 1, "keep": 1},
                           log={"tensorboard": True}), tmp_path)
    final = train(cfg)
    run = Path(cfg.output_dir)
    rows = _read_log(run / "log.csv")
    assert [r["step"] for r in rows] == ["1", "2"]
    for r in rows:
        total = float(r["loss_ap"]) + 0.5 * float(r["loss_infonce"])
        assert float(r["loss"]) == pytest.approx(total, rel=1e-5)
        assert 0 <= float(r["loss_ap"]) <= 1 and float(r["loss_infonce"]) > 0
    assert float(rows[0]["lr"]) == pytest.approx(0.025)  # warm-up: (0 + 1)/2 of 0.05
    assert list((run / "tensorboard").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002.pt"]
    net, extra = load_checkpoint(final)
    assert net.meta["whitening_dim"] == 32 and extra["step"] == 2
    state = torch.load(run / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert int(state["modules"]["moco"]["queue_ptr"]) == 2 * 4 % 16
    assert from_pretrained(final).out_dim == 32


@pytest.mark.parametrize("method, amp", [("moco", "none"), ("simclr", "float16")])
def test_contrastive_stage(tmp_path, method, amp):
    cfg, _ = _load(_config(
        tmp_path, stage="contrastive", model={"pooling": "spoc", "whitening_dim": None,
                                              "freeze_bn": False},
        data={"augment": "mocov2" if method == "moco" else "simclr", "batch_size": 4},
        contrastive={"method": method, "queue_size": 8, "hidden_dim": 32, "dim": 8,
                     "head_bn": method == "simclr"},
        # MoCo: chunks of 2 are the BN groups its shuffled keys are spread over.
        train={"max_steps": 1, "chunk_size": 2 if method == "moco" else 4, "amp": amp}),
        tmp_path)
    final = train(cfg)
    run = Path(cfg.output_dir)
    assert float(_read_log(run / "log.csv")[0]["loss"]) > 0
    net = from_pretrained(run / "encoder.pth", "resnet18", pooling="gem")
    assert net.meta["layout"] == "moco"
    trained, _ = load_checkpoint(final)
    for k, v in trained.backbone.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k
    state = torch.load(run / "checkpoints" / "step_00000001.pt", weights_only=True)
    assert (state["scaler"] is not None) == (amp == "float16")
    # Fine-tuning starts from it with another pooling: the trunk (and preprocessing) carry over.
    finetune = load_config(None, [f"model.pretrained={final}", "model.arch=resnet18",
                                  "model.pooling=gem", "model.whitening_dim=16"])
    net = build_net(finetune)
    assert net.meta["pooling"] == "gem" and net.out_dim == 16
    assert net.meta["mean"] == trained.meta["mean"]
    for k, v in trained.backbone.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k


def test_refuses_to_overwrite_and_reports_corrupt_checkpoints(tmp_path, capsys):
    cfg_dict = _config(tmp_path, train={"max_steps": 2}, checkpoint={"every": 1, "keep": 5})
    cfg, path = _load(cfg_dict, tmp_path)
    train(cfg)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001.pt", "step_00000002.pt"]
    # A fresh run into the same folder would clobber the run: refused, nothing touched.
    assert main(["train", "--config", str(path), "--quiet"]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    # The newest checkpoint truncated (a disk problem): --resume names it and leaves it alone.
    newest = ckpts / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    before = newest.read_bytes()
    assert main(["train", "--config", str(path), "--resume", "train.max_steps=3"]) == 1
    err = capsys.readouterr().err
    assert "step_00000002.pt" in err and "corrupt" in err and "Traceback" not in err
    assert newest.read_bytes() == before and (ckpts / "step_00000001.pt").is_file()
    # The older one still works (and its own config is used without --config).
    assert main(["train", "--resume-from", str(ckpts / "step_00000001.pt"), "--quiet"]) == 0


def _cli(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastap.cli", "train", "--config", str(config), "--quiet",
            *extra]


def test_killed_run_resumes_to_identical_weights(tmp_path):
    """A subprocess is SIGKILLed right after its first checkpoint (mid-epoch), resumed with
    --resume, and must end with exactly the weights of an uninterrupted run (0 tolerance)."""
    base = _config(tmp_path, train={"max_steps": 8, "chunk_size": 2},
                   checkpoint={"every": 2, "keep": 2})
    _, straight_cfg = _load(dict(base, output_dir=str(tmp_path / "straight")), tmp_path, "a.yaml")
    _, killed_cfg = _load(dict(base, output_dir=str(tmp_path / "killed")), tmp_path, "b.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    # cwd away from the checkout: `python -m` puts the cwd first on sys.path, and the source tree
    # of a non-editable install has no compiled kernels.
    straight = subprocess.Popen(_cli(straight_cfg), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=tmp_path)
    victim = subprocess.Popen(_cli(killed_cfg), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=tmp_path)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())):
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final.pt").exists()
    newest = max(p for p in ckpts.iterdir() if p.name.startswith("step_"))
    state = torch.load(newest, weights_only=True)
    epoch, batch = state["data_position"]
    assert state["step"] < 8 and 0 < batch < 3, (state["step"], epoch, batch)  # mid-epoch
    weights_at_kill = state["state_dict"]

    resumed = subprocess.run(_cli(killed_cfg, "--resume"), env=env, capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err

    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "final.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The weights did move, and the resumed log reads as one run with the same losses.
    assert not torch.equal(weights_at_kill["whiten.weight"], a["whiten.weight"])
    log_a = _read_log(tmp_path / "straight" / "log.csv")
    log_b = _read_log(tmp_path / "killed" / "log.csv")
    assert [r["step"] for r in log_b] == [str(s) for s in range(1, 9)]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_step(tmp_path):
    cfg, _ = _load(_config(tmp_path, train={"max_steps": 2, "device": "cuda", "amp": "bfloat16",
                                            "chunk_size": 2},
                           loss={"contrastive_weight": 0.1},
                           contrastive={"queue_size": 16, "hidden_dim": 32, "dim": 8}), tmp_path)
    trainer = Trainer(cfg)
    assert next(trainer.net.parameters()).is_cuda
    values = trainer.train_step()
    assert np.isfinite(values["loss"])
    trainer.close()


@pytest.mark.parametrize("accumulate, epochs, steps, batches", [
    (2, 3, 5, 10),  # 3 x 3 = 9 batches -> ceil(9 / 2) = 5 steps = 10 batches (1 of epoch 4)
    (3, 2, 2, 6),  # 2 x 3 = 6 batches -> exactly 2 steps
    (4, 1, 1, 4),  # accumulate > batches per epoch: one step of 4 batches
])
def test_epochs_cover_every_batch_with_accumulation(tmp_path, accumulate, epochs, steps,
                                                    batches):
    """6 classes / P = 2: 3 batches an epoch. The run is ceil(epochs x 3 / accumulate) steps;
    it used to be epochs x (3 // accumulate), which skipped a batch of every epoch (or refused
    accumulate > 3)."""
    cfg, _ = _load(_config(tmp_path, train={"max_steps": None, "epochs": epochs,
                                            "accumulate": accumulate}), tmp_path)
    trainer = Trainer(cfg)
    assert trainer.sampler.batches_per_epoch == 3 and trainer.total_steps == steps
    trainer.fit()
    epoch, batch = trainer.stream.position  # of the next batch; (e, 3) is (e + 1, 0)
    assert trainer.step == steps and epoch * 3 + batch == batches
    trainer.close()


def test_resume_does_not_need_the_pretrained_weights(tmp_path, capsys):
    """model.pretrained is read when a run starts, not when it resumes (the checkpoint holds
    the whole net): deleting it after the start must not stop --resume, and the resumed run
    ends with the weights and meta of an uninterrupted one. The starting net freezes GeM's p
    (learn_p: false), which a fastap checkpoint keeps over the fine-tuning config's default:
    the resumed net must be built the same way, or its optimizer state would not fit."""
    _, pre = _load(_config(tmp_path, "pre", train={"max_steps": 1}, model={"learn_p": False}),
                   tmp_path, "pre.yaml")
    assert main(["train", "--config", str(pre), "--quiet"]) == 0
    init = tmp_path / "init.pt"
    init.write_bytes((tmp_path / "pre" / "final.pt").read_bytes())
    ft = _config(tmp_path, "straight", model={"pretrained": str(init)},
                 train={"max_steps": 4}, checkpoint={"every": 2})
    straight_cfg, _ = _load(ft, tmp_path, "a.yaml")
    train(straight_cfg)
    killed_cfg, killed = _load(dict(ft, output_dir=str(tmp_path / "killed")), tmp_path, "b.yaml")
    trainer = Trainer(killed_cfg)
    for _ in range(2):
        trainer.train_step()
    trainer.save()
    trainer.close()
    init.unlink()
    capsys.readouterr()
    assert main(["train", "--config", str(killed), "--resume", "--quiet"]) == 0, \
        capsys.readouterr().err
    a, _ = load_checkpoint(tmp_path / "straight" / "final.pt")
    b, _ = load_checkpoint(tmp_path / "killed" / "final.pt")
    assert a.meta == b.meta and a.meta["learn_p"] is False
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # A fresh start does need it, and says so.
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained: checkpoint not found"):
        build_net(straight_cfg)


def test_user_errors_are_one_line_naming_the_key(tmp_path, capsys):
    cfg_dict = _config(tmp_path)
    _, path = _load(cfg_dict, tmp_path)
    (tmp_path / "single.txt").write_text("".join(f"img/c{c}_0.png l{c}\n" for c in range(6)))
    (tmp_path / "nolabel.txt").write_text("".join(f"img/c{c}_0.png\n" for c in range(6)))
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04garbage" * 10)
    cases = [
        (["data.train_list=" + str(tmp_path / "single.txt")], "data.classes_per_batch"),
        (["data.train_list=" + str(tmp_path / "nolabel.txt")], "data.train_list"),
        (["data.train_list=" + str(tmp_path / "img")], "data.train_list"),
        (["stage=contrastive", "data.augment=simclr", "data.batch_size=64",
          "model.whitening_dim=null"], "data.batch_size"),  # 18 images
        (["model.pretrained=" + str(tmp_path / "corrupt.pt")], "model.pretrained"),
        (["model.pretrained=torchvision:NOPE"], "model.pretrained"),
    ]
    if not torch.cuda.is_available():
        cases.append((["train.device=cuda"], "train.device"))
    for i, (overrides, key) in enumerate(cases):
        rc = main(["train", "--config", str(path), "--quiet", f"output_dir={tmp_path}/r{i}",
                   *overrides])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"fastap: error: {key}: "), (overrides, rc, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_output_files_that_cannot_be_written_are_named(tmp_path, capsys):
    """config.yaml or log.csv that cannot be written (here: a folder in the way) end the run
    with one line naming the file, not an OSError without a name."""
    _, path = _load(_config(tmp_path), tmp_path)
    for i, name in enumerate(["config.yaml", "log.csv"]):
        out = tmp_path / f"r{i}"
        (out / name).mkdir(parents=True)
        rc = main(["train", "--config", str(path), "--quiet", f"output_dir={out}"])
        err = capsys.readouterr().err
        assert rc == 1 and err.startswith(f"fastap: error: writing {out / name}: "), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    """Resuming from step 2 while steps 4 and 6 exist: those (and that run's final.pt) belong
    to the abandoned trajectory; they are moved, intact, into checkpoints/
    abandoned_after_step_00000002/ so that --resume and checkpoint.keep see only the new run."""
    cfg, path = _load(_config(tmp_path, train={"max_steps": 6},
                              checkpoint={"every": 2, "keep": 3}), tmp_path)
    train(cfg)
    run = Path(cfg.output_dir)
    ckpts = run / "checkpoints"
    old = {name: (ckpts / name).read_bytes() for name in ("step_00000004.pt", "step_00000006.pt")}
    old["final.pt"] = (run / "final.pt").read_bytes()
    old_log = (run / "log.csv").read_text()
    capsys.readouterr()
    # A different learning rate: the new trajectory differs from the abandoned one.
    with pytest.warns(UserWarning, match="differs in: optim.lr"):
        assert main(["train", "--resume-from", str(ckpts / "step_00000002.pt"), "--quiet",
                     "optim.lr=0.01"]) == 0
    err = capsys.readouterr().err
    aside = ckpts / "abandoned_after_step_00000002"
    assert f"moved the abandoned run's newer step_00000004.pt, step_00000006.pt, final.pt to " \
           f"{aside}" in err
    assert sorted(p.name for p in aside.iterdir()) == ["final.pt", "log.csv", "step_00000004.pt",
                                                      "step_00000006.pt"]
    for name, data in old.items():
        assert (aside / name).read_bytes() == data, name
    assert (aside / "log.csv").read_text() == old_log
    # The new run's checkpoints are the ones in place, and what --resume would pick.
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == [
        "step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]
    new6 = torch.load(ckpts / "step_00000006.pt", weights_only=True)
    assert new6["config"]["optim"]["lr"] == 0.01
    assert (ckpts / "step_00000006.pt").read_bytes() != old["step_00000006.pt"]
    # Resuming from step 2 again keeps both abandoned sets.
    assert main(["train", "--resume-from", str(ckpts / "step_00000002.pt"), "--quiet"]) == 0
    assert (ckpts / "abandoned_after_step_00000002_1" / "step_00000006.pt").is_file()
    assert (aside / "step_00000006.pt").read_bytes() == old["step_00000006.pt"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    """Checkpoints, reports and plots used to be 0600 (mkstemp's mode, kept by os.replace)."""
    from fastap._io import atomic_write, atomic_write_text
    from fastap.models import RetrievalNet, save_checkpoint

    before = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.txt", "x")
        (tmp_path / "old.bin").write_bytes(b"old")
        os.chmod(tmp_path / "old.bin", 0o600)  # replacing a file does not keep its mode either
        atomic_write(tmp_path / "old.bin", lambda f: f.write(b"new"))
        save_checkpoint(RetrievalNet("resnet10_w32", pooling="mac"), tmp_path / "net.pt")
    finally:
        os.umask(before)
    for name in ("report.txt", "old.bin", "net.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert (tmp_path / "old.bin").read_bytes() == b"new"


def test_precision_key_picks_the_autocast_and_falls_back_without_bf16_units(tmp_path,
                                                                             monkeypatch):
    """train.precision: auto is bf16 with the CPU's bfloat16 units and fp32 without; bf16 on a
    CPU without them trains in float32 after a warning. The forward pass really runs in the
    chosen dtype (the trunk's activations under the trainer's autocast)."""
    import fastap._device as dev

    seen = []
    for units, asked, expected in [("AVX512-BF16", "auto", "bf16"), (None, "auto", "fp32"),
                                   (None, "bf16", "fp32"), ("AVX512-BF16", "fp32", "fp32")]:
        monkeypatch.setattr(dev, "cpu_bf16_units", lambda units=units: units)
        cfg, _ = _load(_config(tmp_path, run=f"r{len(seen)}", train={"precision": asked}),
                       tmp_path)
        if asked == "bf16" and units is None:
            with pytest.warns(RuntimeWarning, match="no bfloat16 units"):
                trainer = Trainer(cfg, progress=False)
        else:
            trainer = Trainer(cfg, progress=False)
        assert trainer.precision == expected, (units, asked)
        with trainer._autocast():
            fmap = trainer.net.features(torch.rand(2, 3, 32, 32))
        seen.append(fmap.dtype)
    assert seen == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
