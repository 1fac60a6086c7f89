"""Two CPU processes (gloo) against the single-process run on the concatenated batch.

Each rank holds half of the batch. The AP loss ranks each rank's queries against the *global*
batch (embeddings gathered with gradients), through DistributedDataParallel and multi-stage
backprop; the loss and the (DDP-averaged) parameter gradients must equal plain single-process
backpropagation of ``APLoss`` on the whole batch — computed in the parent process, which never
touches torch.distributed. The same for SimCLR's NT-Xent with global negatives, and for MoCo's
shuffling BN and queue.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import START_METHOD, free_port, run_ranks
from torch import nn

import fastap
from fastap.models import RetrievalNet
from fastap.training import QueryModel, ProjectionHead, MoCo, nt_xent

WORLD = 2
BATCH = 12  # global; 6 per rank


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet().double()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    model.train()
    model.bn.eval()  # frozen BN, as retrieval fine-tuning does
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 8, 8, generator=gen, dtype=torch.float64)
    # Classes straddle the two shards, and class 5 has a single member (no positive: excluded).
    labels = torch.tensor([0, 1, 2, 0, 3, 5, 1, 2, 3, 4, 4, 0])
    return x, labels


def _views():
    gen = torch.Generator().manual_seed(2)
    z1 = torch.nn.functional.normalize(torch.randn(BATCH, 5, generator=gen, dtype=torch.float64),
                                       dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(BATCH, 5, generator=gen, dtype=torch.float64),
                                       dim=1)
    return z1, z2


def _key_images():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (8, 3, 32, 32), generator=gen, dtype=torch.uint8)


def _moco() -> MoCo:
    torch.manual_seed(0)
    qm = QueryModel(RetrievalNet("resnet18", pooling="spoc"), ProjectionHead(512, 32, 8), "proj")
    moco = MoCo(qm, queue_size=10, momentum=0.9, temperature=0.2, seed=5)
    moco.key_model.eval()  # eval-mode BN: shuffling must not change the keys at all
    return moco


def _loss():
    return fastap.APLoss(num_bins=10, score_range=(-1.0, 1.0))


def _worker(rank: int, port: int, outdir: str) -> None:
    from fastap.training import global_nt_xent, global_ranking_loss, init_distributed, \
        multistage_backward

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    ctx = init_distributed("cpu", "auto")
    assert ctx.world_size == WORLD and ctx.rank == rank
    out = {}
    shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)

    # 1. AP loss over the global batch, DDP + multi-stage backprop (chunks of 4 of the 6).
    model = nn.parallel.DistributedDataParallel(_model(), broadcast_buffers=False)
    x, labels = _batch()
    loss_fn = _loss()
    values = {}

    def ranked(f):
        to_backward, value = global_ranking_loss(loss_fn, f, labels[shard])
        values["loss"] = value
        return to_backward

    multistage_backward(model, x[shard], ranked, chunk_size=4)
    out["ap_loss"] = values["loss"]
    out["ap_grads"] = {n: p.grad.clone() for n, p in model.module.named_parameters()}

    # 2. NT-Xent with negatives from every rank (no DDP: W x the local share's gradient).
    z1, z2 = _views()
    a = z1[shard].clone().requires_grad_(True)
    b = z2[shard].clone().requires_grad_(True)
    to_backward, value = global_nt_xent(a, b, 0.5)
    to_backward.backward()
    out["nt_loss"], out["nt_grads"] = value, (a.grad / WORLD, b.grad / WORLD)

    # 3. MoCo: keys with shuffling BN across ranks and chunks; the queue receives all ranks' keys.
    moco = _moco()
    images = _key_images()
    local = images[rank * 4:(rank + 1) * 4]
    gen = torch.Generator().manual_seed(99)
    keys = moco.keys(local, chunk_size=2, shuffle=gen)
    moco.enqueue(keys)
    out["keys"], out["queue"], out["ptr"] = keys, moco.queue.clone(), int(moco.queue_ptr)
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    ctx.close()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("ddp"))


def test_ap_loss_and_gradients_equal_single_process(ranks):
    torch.set_num_threads(1)
    model = _model()
    x, labels = _batch()
    loss = _loss()(model(x), labels)  # plain backprop on the concatenated batch
    loss.backward()
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["ap_loss"], loss.detach(), rtol=0, atol=1e-12,
                                   msg=f"rank {r}")
        for name, p in model.named_parameters():
            torch.testing.assert_close(res["ap_grads"][name], p.grad, rtol=1e-9, atol=1e-12,
                                       msg=f"rank {r}: {name}")


def test_nt_xent_with_global_negatives_equals_single_process(ranks):
    z1, z2 = _views()
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    loss = nt_xent(z1, z2, 0.5)
    loss.backward()
    for r, res in enumerate(ranks):
        shard = slice(r * BATCH // WORLD, (r + 1) * BATCH // WORLD)
        torch.testing.assert_close(res["nt_loss"], loss.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(res["nt_grads"][0], z1.grad[shard], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res["nt_grads"][1], z2.grad[shard], rtol=1e-9, atol=1e-12)


def test_moco_shuffled_keys_and_global_queue(ranks):
    torch.set_num_threads(1)
    moco = _moco()
    images = _key_images()
    with torch.no_grad():
        keys = moco.key_model(images)  # no shuffling, one process
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["keys"], keys[r * 4:(r + 1) * 4], rtol=1e-5, atol=1e-6)
    queue = moco.queue.clone()
    queue[:8] = keys
    for res in ranks:  # both ranks hold the same queue: rank 0's keys first, then rank 1's
        torch.testing.assert_close(res["queue"], queue, rtol=1e-5, atol=1e-6)
        assert res["ptr"] == 8


# ----------------------------------------------------------------------------------------------
# The whole trainer in two processes
# ----------------------------------------------------------------------------------------------


def _trainer_worker(rank: int, port: int, cfg_dict: dict) -> None:
    from fastap.training import train
    from fastap.training.config import config_from_dict

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    train(config_from_dict(cfg_dict), progress=False)


def _tiny_finetune_config(tmp_path) -> dict:
    """A 2-step fine-tuning recipe on 12 small PNGs of 4 classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    (tmp_path / "img").mkdir()
    for c in range(4):
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / "img" / f"{c}_{k}.png")
            lines.append(f"img/{c}_{k}.png {c}")
    (tmp_path / "l.txt").write_text("\n".join(lines) + "\n")
    return {"stage": "finetune", "seed": 1,
            "model": {"arch": "resnet18", "whitening_dim": 16},
            "data": {"train_list": str(tmp_path / "l.txt"), "image_size": 32,
                     "classes_per_batch": 2, "images_per_class": 2, "num_workers": 0},
            # SGD: linear in the gradient. (Adam turns rounding-level gradients, e.g. GeM p's on
            # a 1x1 feature map, into full-size steps of either sign.)
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "train": {"max_steps": 2, "chunk_size": 1, "accumulate": 2},
            "checkpoint": {"every": 1},
            "log": {"tensorboard": False, "progress": False}}


def test_trainer_on_two_processes_matches_one(tmp_path):
    """`fastap train` under torch.distributed (what torchrun sets up) ends with the weights of the
    single-process run: same global batches, gradients of the global AP loss, DDP averaging."""
    from fastap.training import train
    from fastap.training.config import config_from_dict

    cfg = _tiny_finetune_config(tmp_path)
    two = dict(cfg, output_dir=str(tmp_path / "two"))
    mp.start_processes(_trainer_worker, args=(free_port(), two), nprocs=WORLD, join=True,
                       start_method=START_METHOD)
    torch.set_num_threads(1)
    det = torch.are_deterministic_algorithms_enabled()
    try:
        train(config_from_dict(dict(cfg, output_dir=str(tmp_path / "one"))), progress=False)
    finally:
        torch.use_deterministic_algorithms(det)
    a = torch.load(tmp_path / "one" / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two" / "final.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    init = torch.load(tmp_path / "two" / "checkpoints" / "step_00000001.pt", weights_only=True)
    assert len(init["rng"]) == WORLD and init["world_size"] == WORLD
    assert not torch.equal(init["state_dict"]["whiten.weight"], a["whiten.weight"])  # it trained
    import csv
    with open(tmp_path / "one" / "log.csv") as f1, open(tmp_path / "two" / "log.csv") as f2:
        for r1, r2 in zip(csv.DictReader(f1), csv.DictReader(f2)):
            assert float(r1["loss"]) == pytest.approx(float(r2["loss"]), rel=1e-5)


def _cli_worker(rank: int, port: int, config_path: str, outdir: str,
                fault: str = "full disk") -> None:
    """`fastap train --config ...` as rank `rank`, with a fault on rank 0: "full disk", it may
    write files of 1 MB at most, so its first checkpoint (a ResNet-18, 45 MB) fails with EFBIG;
    "ctrl-c", a KeyboardInterrupt as its second step begins. Writes the exit code, when the rank
    ended and when rank 0 was interrupted (0: not), then stderr."""
    import contextlib
    import io
    import resource
    import signal
    import time

    from fastap import cli
    from fastap.training.trainer import Trainer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    interrupted = []
    if rank == 0 and fault == "full disk":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))
    elif rank == 0 and fault == "ctrl-c":
        step = Trainer.train_step

        def train_step(self):
            if self.step == 1:
                interrupted.append(time.time())
                # What SIGINT's default handler raises, raised here rather than by os.kill:
                # the handler runs at the interpreter's next check, which can fall inside a
                # finalizer that the garbage collector runs, where the KeyboardInterrupt is
                # printed as "Exception ignored" and lost (once in CI: rank 0 trained on).
                raise KeyboardInterrupt
            return step(self)

        Trainer.train_step = train_step
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["train", "--config", config_path, "--quiet"])
    with open(os.path.join(outdir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{code} {time.time()} {interrupted[0] if interrupted else 0}\n{err.getvalue()}")


def _run_cli_ranks(tmp_path, config_path, fault: str) -> list:
    """Both ranks of `fastap train` with `fault`; per rank (code, ended, interrupted, the
    stderr lines starting with "fastap: ")."""
    import time

    context = mp.start_processes(_cli_worker,
                                 args=(free_port(), str(config_path), str(tmp_path), fault),
                                 nprocs=WORLD, join=False, start_method=START_METHOD)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"a rank was still running 300 s after the {fault}")
    runs = []
    for r in range(WORLD):
        head, stderr = (tmp_path / f"rank{r}.txt").read_text().split("\n", 1)
        code, ended, interrupted = head.split()
        runs.append((code, float(ended), float(interrupted),
                     [line for line in stderr.splitlines() if line.startswith("fastap: ")]))
    return runs


def test_a_write_failing_on_rank_0_stops_every_rank_with_its_cause(tmp_path):
    """Rank 0 writes the checkpoints alone; when that fails, the other ranks must not wait in
    their next collective for the process group's timeout (NCCL would, for 30 minutes): every
    rank stops at once with one error line, rank 1's naming rank 0's failure."""
    import yaml

    cfg = dict(_tiny_finetune_config(tmp_path), output_dir=str(tmp_path / "run"))
    config_path = tmp_path / "recipe.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    runs = _run_cli_ranks(tmp_path, config_path, "full disk")
    codes = [run[0] for run in runs]
    errors = [run[3] for run in runs]
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000001.pt"
    cause = f"writing {checkpoint}: File too large; free space and rerun"
    assert codes == ["1", "1"], errors
    assert len(errors[0]) == 1 and errors[0][0].startswith(f"fastap: error: {cause}"), errors
    assert len(errors[1]) == 1 and errors[1][0].startswith(
        f"fastap: error: rank 0 failed writing a checkpoint: {cause}"), errors
    assert not checkpoint.exists()


def test_ctrl_c_on_rank_0_stops_every_rank_with_its_cause(tmp_path):
    """A KeyboardInterrupt on rank 0 reaches rank 1, which waits in the second step's gather
    for rank 0's embeddings: it stops within seconds naming rank 0 and the interrupt."""
    import yaml

    cfg = _tiny_finetune_config(tmp_path)
    cfg = dict(cfg, output_dir=str(tmp_path / "run"), train=dict(cfg["train"], max_steps=4))
    config_path = tmp_path / "recipe.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    runs = _run_cli_ranks(tmp_path, config_path, "ctrl-c")
    assert runs[0][0] == "130" and runs[0][3] == ["fastap: interrupted"], runs[0]
    assert runs[1][0] == "1", runs[1]
    assert runs[1][3] == ["fastap: error: rank 0 failed training: interrupted "
                          "(KeyboardInterrupt)"], runs[1]
    assert runs[1][1] - runs[0][2] < 10.0  # the group's timeout is 30 minutes
    assert not (tmp_path / "run" / "final.pt").exists()
