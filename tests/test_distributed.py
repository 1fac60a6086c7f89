"""Extraction and ``fastap eval`` shared by two gloo processes, and failures that stop them.

Each test starts real processes that join a gloo group through the environment variables torchrun
sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), runs ``fastap eval`` (or a guarded job) in
each, and compares with the oracle: the same command in one process, here in the test process,
which never touches torch.distributed. Faults are injected by patching, in one forked worker only,
the function that writes a chunk's record or describes a batch.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import START_METHOD, free_port

from fastap.cli import main
from fastap.datasets.synthetic import generate
from fastap.extraction import load_descriptors
from fastap.models import RetrievalNet, save_checkpoint

WORLD = 2
NAME = "synth"
# 12 queries and 48 views + 16 distractors = 64 database images: chunks of 8 (queries 8 + 4).
SMALL = dict(image_size=64, families=4, instances_per_family=3, views_per_instance=4,
             queries_per_instance=1, distractors=16, train_families=1,
             train_instances_per_family=2, train_views_per_instance=2)
N_QUERIES, N_DATABASE = 12, 64


def _gloo():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    info = generate(base / "data", NAME, seed=0, preset="quick", **SMALL)
    assert info.counts["database"] == N_DATABASE and info.counts["queries"] == N_QUERIES
    torch.manual_seed(0)
    ckpt = save_checkpoint(RetrievalNet("resnet18", whitening_dim=32), base / "tiny.pt")
    return {"base": base, "root": base / "data", "ckpt": ckpt}


def eval_args(bench, features, output) -> list[str]:
    args = ["eval", "--model", str(bench["ckpt"]), "--dataset", NAME, "--root",
            str(bench["root"]), "--max-size", "64", "--device", "cpu", "--workers", "0",
            "--quiet", "--show-queries", "0", "--output", str(output)]
    return args + (["--features-dir", str(features)] if features is not None else [])


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def one_process(argv) -> tuple[int, str, str]:
    """The oracle: the command in this process, on one thread as the workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_cli(argv)
    finally:
        torch.set_num_threads(threads)


def _join_env(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))


def _cli_worker(rank: int, port: int, outdir: str, argv: list, fault) -> None:
    """``fastap eval`` as rank ``rank``; ``fault`` = (rank, kind) injects a failure there.
    Writes ``rank<r>.json``: exit code (or the exception), stdout, stderr, when it ended."""
    import fastap.extraction as extraction

    _join_env(rank, port)
    if fault is not None and fault[0] == rank:
        kind = fault[1]
        if kind == "killed after its first database chunk":
            write_json = extraction._write_json

            def write_then_die(path, obj):
                write_json(path, obj)
                if path.name.startswith("chunk_") and path.parent.name.startswith("database"):
                    os._exit(9)  # as SIGKILL would: nothing more runs

            extraction._write_json = write_then_die
        elif kind == "full output disk":  # rank 0, writing the report after the search
            import fastap.retrieval.pipeline as pipeline

            def no_space_left(path, *args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

            pipeline.atomic_write_text = no_space_left
        elif kind == "full disk":
            def no_space(*args):
                raise OSError(errno.ENOSPC, "No space left on device", "/full/disk/chunk")

            extraction._describe_batch = no_space
    elif fault is not None and fault[1] == "full disk":  # the healthy rank: slow, counting
        describe = extraction._describe_batch
        batches = []

        def slow(*args):
            batches.append(1)
            with open(os.path.join(outdir, f"batches{rank}.txt"), "w") as f:
                f.write(str(len(batches)))
            time.sleep(0.1)
            return describe(*args)

        extraction._describe_batch = slow
    try:
        code, out, err = run_cli(argv)
    except BaseException as exc:  # noqa: BLE001 - recorded for the test to judge
        code, out, err = repr(exc), "", ""
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump({"code": code, "stdout": out, "stderr": err, "ended": time.time()}, f)


def run_eval_ranks(tmp_path: Path, argv: list, fault=None, world: int = WORLD,
                   deadline_s: float = 240) -> list:
    """Start ``world`` processes of ``fastap eval`` and wait for each (not killing the others
    when one dies, as mp's join would); returns what each recorded (None: it died)."""
    _gloo()
    runs = tmp_path / f"runs{time.monotonic_ns()}"
    runs.mkdir()
    port = free_port()
    if world == 1:
        return [dict(zip(("code", "stdout", "stderr"), one_process(argv)))]
    context = mp.start_processes(_cli_worker, args=(port, str(runs), argv, fault), nprocs=world,
                                 join=False, start_method=START_METHOD)
    stop = time.monotonic() + deadline_s
    for p in context.processes:
        p.join(max(1.0, stop - time.monotonic()))
    alive = [p for p in context.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} rank(s) still running after {deadline_s} s"
    records = []
    for r in range(world):
        path = runs / f"rank{r}.json"
        records.append(json.loads(path.read_text()) if path.exists() else None)
    records.append(runs)
    return records


def report(output: Path) -> dict:
    return json.loads((output / f"{NAME}.json").read_text())


def descriptors(features: Path) -> dict:
    """The descriptor folders under ``features`` by split, as arrays."""
    found = {}
    for meta in features.rglob("meta.json"):
        split = meta.parent.name.split("-")[0]
        found[split] = np.array(load_descriptors(meta.parent))
    return found


@pytest.fixture(scope="module")
def oracle(bench):
    """One process, uninterrupted: the report and the descriptors."""
    base = bench["base"]
    code, out, err = one_process(eval_args(bench, base / "one_features", base / "one_out"))
    assert code == 0, err
    return {"report": report(base / "one_out"), "stdout": out,
            "descriptors": descriptors(base / "one_features")}


# ----------------------------------------------------------------------------------------------
# Two processes give the one-process result
# ----------------------------------------------------------------------------------------------


def test_two_process_eval_equals_one_process(bench, oracle, tmp_path):
    features, output = tmp_path / "features", tmp_path / "out"
    ranks = run_eval_ranks(tmp_path, eval_args(bench, features, output))
    assert [r["code"] for r in ranks[:WORLD]] == [0, 0], [r["stderr"] for r in ranks[:WORLD]]
    got, want = report(output), oracle["report"]
    for setup in ("easy", "medium", "hard"):
        assert got["results"][setup]["mAP"] == pytest.approx(want["results"][setup]["mAP"],
                                                             abs=1e-6)
        for k in ("1", "5", "10"):
            assert got["results"][setup]["mP@k"][k] == pytest.approx(
                want["results"][setup]["mP@k"][k], abs=1e-6)
    assert [q["top"] for q in got["queries"]] == [q["top"] for q in want["queries"]]

    # The report says who did what: both processes extracted about half of the images.
    assert got["world_size"] == WORLD and want["world_size"] == 1
    assert want["images_per_rank"] == [N_QUERIES + N_DATABASE]
    per_rank = got["images_per_rank"]
    assert sum(per_rank) == N_QUERIES + N_DATABASE and min(per_rank) >= 0.4 * sum(per_rank)
    assert got["features"]["database"]["images_per_rank"] == [32, 32]  # 8 chunks of 8
    assert got["features"]["queries"]["images_per_rank"] == [8, 4]  # chunks of 8 and 4
    # Rank 0 alone printed the table (the one of one process) and wrote the files.
    assert ranks[0]["stdout"] == oracle["stdout"] and ranks[1]["stdout"] == ""
    assert sorted(p.name for p in output.iterdir()) == [f"{NAME}.json", f"{NAME}.txt"]

    # The descriptors are those of one process, bit for bit, and no chunk is left behind.
    mine = descriptors(features)
    assert set(mine) == {"queries", "database"}
    for split, want_rows in oracle["descriptors"].items():
        np.testing.assert_array_equal(mine[split], want_rows, err_msg=split)
    leftovers = [p.name for p in features.rglob("chunk_*")]
    assert leftovers == []

    # A second run finds everything in the cache: nobody extracts.
    again = tmp_path / "again"
    ranks = run_eval_ranks(tmp_path, eval_args(bench, features, again))
    assert [r["code"] for r in ranks[:WORLD]] == [0, 0]
    assert report(again)["images_per_rank"] == [0, 0]
    assert report(again)["results"] == got["results"]


def test_two_process_eval_in_memory_equals_one_process(bench, oracle, tmp_path):
    """Without a features folder the chunks travel through the group."""
    output = tmp_path / "out"
    ranks = run_eval_ranks(tmp_path, eval_args(bench, None, output))
    assert [r["code"] for r in ranks[:WORLD]] == [0, 0], [r["stderr"] for r in ranks[:WORLD]]
    got = report(output)
    for setup in ("easy", "medium", "hard"):
        assert got["results"][setup]["mAP"] == pytest.approx(
            oracle["report"]["results"][setup]["mAP"], abs=1e-6)
    assert sum(got["images_per_rank"]) == N_QUERIES + N_DATABASE
    assert min(got["images_per_rank"]) >= 0.4 * (N_QUERIES + N_DATABASE)


# ----------------------------------------------------------------------------------------------
# A killed process: the rerun extracts only what is missing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rerun_world", [2, 1])
def test_killed_process_rerun_redoes_only_missing_chunks(bench, oracle, tmp_path, rerun_world):
    features, output = tmp_path / "features", tmp_path / "out"
    args = eval_args(bench, features, output)
    ranks = run_eval_ranks(tmp_path, args, fault=(1, "killed after its first database chunk"))
    assert ranks[1] is None  # rank 1 died without a word
    assert ranks[0]["code"] != 0  # rank 0 cannot finish without it
    database = next(features.rglob("database-*"))
    finished = sorted(p.name for p in database.glob("chunk_*.npy"))
    records = sorted(p.name for p in database.glob("chunk_*.json"))
    # Rank 0's chunks and rank 1's one chunk survive, recorded; the rest is missing.
    assert len(records) >= 2 and len(finished) == len(records) < N_DATABASE // 8
    assert not (database / "descriptors.npy").exists()

    ranks = run_eval_ranks(tmp_path, args, world=rerun_world)
    assert all(r["code"] == 0 for r in ranks[:rerun_world]), [
        r["stderr"] for r in ranks[:rerun_world]]
    got = report(output)
    # Only the missing chunks were extracted (the queries were finished in the first run).
    missing = N_DATABASE // 8 - len(records)
    assert got["features"]["database"]["images_per_rank"] == (
        [8 * missing] if rerun_world == 1 else [8 * ((missing + 1) // 2), 8 * (missing // 2)])
    assert got["features"]["queries"]["images_per_rank"] == [0] * rerun_world
    mine = descriptors(features)
    for split, want_rows in oracle["descriptors"].items():
        np.testing.assert_array_equal(mine[split], want_rows, err_msg=split)
    assert [p.name for p in features.rglob("chunk_*")] == []
    for setup in ("easy", "medium", "hard"):
        assert got["results"][setup]["mAP"] == pytest.approx(
            oracle["report"]["results"][setup]["mAP"], abs=1e-6)


def test_one_process_interrupted_then_two_finish(bench, oracle, tmp_path, monkeypatch):
    """The other direction: a single process stops half-way (its meta.json lists its chunks, no
    records beside them); two processes finish only what is missing."""
    import fastap.extraction as extraction

    features, output = tmp_path / "features", tmp_path / "out"
    args = eval_args(bench, features, output)
    describe, calls = extraction._describe_batch, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) > N_QUERIES + 20:  # the queries, then 20 database images: 2 chunks of 8
            raise KeyboardInterrupt
        return describe(*a)

    monkeypatch.setattr(extraction, "_describe_batch", interrupted)
    assert one_process(args)[0] == 130
    monkeypatch.undo()
    database = next(features.rglob("database-*"))
    assert json.loads((database / "meta.json").read_text())["completed"] == [0, 1]

    ranks = run_eval_ranks(tmp_path, args)
    assert [r["code"] for r in ranks[:WORLD]] == [0, 0], [r["stderr"] for r in ranks[:WORLD]]
    got = report(output)
    assert got["features"]["database"]["images_per_rank"] == [24, 24]  # chunks 2-7, dealt out
    for split, want_rows in oracle["descriptors"].items():
        np.testing.assert_array_equal(descriptors(features)[split], want_rows, err_msg=split)


# ----------------------------------------------------------------------------------------------
# A failing process stops the others at once, with its cause
# ----------------------------------------------------------------------------------------------


def test_a_failing_process_stops_the_other_with_its_cause(bench, tmp_path):
    """Rank 1's disk is full at its first image; rank 0, slowed to 0.1 s per batch (its share
    would take > 3 s), must stop within a batch or two with rank 1's cause, not finish its share
    and then wait for the process group (30 minutes)."""
    features, output = tmp_path / "features", tmp_path / "out"
    ranks = run_eval_ranks(tmp_path, eval_args(bench, features, output),
                           fault=(1, "full disk"))
    runs = ranks[-1]
    cause = "/full/disk/chunk: No space left on device"
    assert ranks[1]["code"] == 1 and ranks[1]["stderr"].strip() == f"fastap: error: {cause}"
    assert ranks[0]["code"] == 1
    assert ranks[0]["stderr"].strip() == f"fastap: error: rank 1 failed evaluating: {cause}"
    batches = int((runs / "batches0.txt").read_text()) if (runs / "batches0.txt").exists() else 0
    assert batches <= 8, f"rank 0 went on for {batches} batches of its 40"
    assert ranks[0]["ended"] - ranks[1]["ended"] < 5.0
    assert not output.exists()


def test_rank_0_failing_after_extraction_stops_the_waiting_ranks(bench, tmp_path):
    """The other ranks wait for rank 0's evaluation in a broadcast; its failure (the report's
    disk is full) ends that wait at once with its cause."""
    output = tmp_path / "out"
    ranks = run_eval_ranks(tmp_path, eval_args(bench, tmp_path / "features", output),
                           fault=(0, "full output disk"))
    cause = f"{output / (NAME + '.txt')}: No space left on device"
    assert ranks[0]["code"] == 1 and ranks[0]["stderr"].strip() == f"fastap: error: {cause}"
    assert ranks[1]["code"] == 1
    assert ranks[1]["stderr"].strip() == f"fastap: error: rank 0 failed evaluating: {cause}"
    assert abs(ranks[1]["ended"] - ranks[0]["ended"]) < 5.0


def _guarded_worker(rank: int, port: int, outdir: str, failing: int, waiting: str) -> None:
    """Rank ``failing`` raises inside propagate_failures after 0.5 s while the other waits in a
    barrier or computes in a loop that checks between steps."""
    import torch.distributed as dist

    from fastap.distributed import barrier, propagate_failures, raise_if_peer_failed

    _join_env(rank, port)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    start, outcome = time.time(), "finished"
    try:
        with propagate_failures("testing"):
            if rank == failing:
                time.sleep(0.5)
                if waiting == "interrupt":
                    raise KeyboardInterrupt
                raise ValueError("bad value on purpose")
            if waiting == "barrier":
                barrier()
            else:
                while time.time() - start < 60:
                    time.sleep(0.01)
                    raise_if_peer_failed()
    except BaseException as exc:  # noqa: BLE001 - recorded for the test to judge
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump({"outcome": outcome, "seconds": time.time() - start}, f)


@pytest.mark.parametrize("failing,waiting", [(1, "barrier"), (0, "barrier"), (1, "compute"),
                                             (0, "interrupt")])
def test_propagate_failures_names_the_failing_rank(tmp_path, failing, waiting):
    _gloo()
    mp.start_processes(_guarded_worker, args=(free_port(), str(tmp_path), failing, waiting),
                       nprocs=WORLD, join=True, start_method=START_METHOD)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    other = got[1 - failing]
    cause = ("interrupted (KeyboardInterrupt)" if waiting == "interrupt"
             else "bad value on purpose")
    assert got[failing]["outcome"].startswith("KeyboardInterrupt" if waiting == "interrupt"
                                              else "ValueError: bad value on purpose")
    assert other["outcome"] == f"PeerFailure: rank {failing} failed testing: {cause}"
    assert other["seconds"] < 5.0  # the group's timeout is 120 s


def _finishing_worker(rank: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    from fastap.distributed import gather_objects, propagate_failures

    _join_env(rank, port)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    with propagate_failures("testing"):
        got = gather_objects(rank * 10)
    with propagate_failures("testing again"):  # a second job of the same group
        got += gather_objects(rank)
    dist.destroy_process_group()
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(got))


def test_propagate_failures_lets_a_sound_job_finish(tmp_path):
    _gloo()
    mp.start_processes(_finishing_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD,
                       join=True, start_method=START_METHOD)
    for r in range(WORLD):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == [0, 10, 0, 1]


def test_torchrun_standalone(bench, oracle, tmp_path):
    """The command of docs/distributed.md, under torchrun itself (its agent hosts the group's
    store, which the failure channel shares)."""
    import subprocess
    import sys

    _gloo()
    output = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(WORLD), "-m", "fastap.cli",
                           *eval_args(bench, tmp_path / "features", output)],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)  # not the checkout, whose fastap has no kernels
    assert done.returncode == 0, done.stderr[-3000:]
    got = report(output)
    assert got["world_size"] == WORLD and sum(got["images_per_rank"]) == N_QUERIES + N_DATABASE
    assert min(got["images_per_rank"]) >= 0.4 * (N_QUERIES + N_DATABASE)
    for setup in ("easy", "medium", "hard"):
        assert got["results"][setup]["mAP"] == pytest.approx(
            oracle["report"]["results"][setup]["mAP"], abs=1e-6)
    assert done.stdout == oracle["stdout"]  # one table, rank 0's


def test_distributed_true_without_a_group_is_refused(bench):
    from fastap.datasets.revisitop import RevisitedDataset
    from fastap.extraction import extract_descriptors

    images = RevisitedDataset(bench["root"], NAME).queries(max_size=64)
    with pytest.raises(ValueError, match="distributed=True needs an initialised"):
        extract_descriptors(RetrievalNet("resnet18"), images, distributed=True, progress=False)
