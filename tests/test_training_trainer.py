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
