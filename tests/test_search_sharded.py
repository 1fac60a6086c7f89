"""sharded_topk_similarity under a real process group (gloo, two CPU processes): the merged
result equals one process searching the whole database, values and indices bit for bit.

The oracle is the single-process search in the parent (which never touches torch.distributed),
itself checked against a float64 ranking in test_topk_certified.py; here the float64 ranking is
checked as well, independently of both."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import run_ranks

import fastap
from fastap.search import sharded_topk_similarity

WORLD = 2


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(9, 20, generator=g), dim=1)
    x = q.mean(0) + 1e-3 * torch.randn(1001, 20, generator=g)   # a crowd near the k-th score
    x[500:520] = x[3]                                           # ties across the two shares
    return q, x


CASES = [  # (name, k, largest, precision)
    ("k5", 5, True, "fp32"), ("k600", 600, True, "bf16"), ("smallest", 7, False, "auto"),
    ("all", 1001, True, "fp32"),
]


def _worker(rank, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        q, x = _data()
        np.save(os.path.join(outdir, f"db{rank}.npy"), x.numpy())
        mm = np.load(os.path.join(outdir, f"db{rank}.npy"), mmap_mode="r")
        out = {}
        for name, k, largest, precision in CASES:
            out[name] = sharded_topk_similarity(q, x, k, largest, precision=precision)
            out[name + "-memmap"] = sharded_topk_similarity(q, mm, k, largest, block_rows=97,
                                                            precision=precision)
        out["prepared"] = sharded_topk_similarity(q, fastap.PreparedDatabase.prepare(x), 50)
        out["one-row"] = sharded_topk_similarity(q, x[:1], 1)   # a process with no rows
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("sharded"))


def _assert_identical(got, expected, what):
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0, msg=f"{what}: indices")
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0, msg=f"{what}: values")


@pytest.mark.parametrize("name,k,largest,precision", CASES)
def test_every_process_gets_the_single_process_result(ranks, name, k, largest, precision):
    q, x = _data()
    expected = fastap.topk_similarity(q, x, k, largest, precision=precision)
    scores = (q.double() @ x.double().T).float()
    order = torch.sort(scores, dim=1, descending=largest, stable=True)
    torch.testing.assert_close(expected[1], order.indices[:, :k], rtol=0, atol=0)
    for r, res in enumerate(ranks):
        _assert_identical(res[name], expected, f"rank {r}, {name}")
        _assert_identical(res[name + "-memmap"], expected, f"rank {r}, {name}, memmap")


def test_prepared_database_and_more_processes_than_rows(ranks):
    q, x = _data()
    for r, res in enumerate(ranks):
        _assert_identical(res["prepared"], fastap.topk_similarity(q, x, 50), f"rank {r}")
        _assert_identical(res["one-row"], fastap.topk_similarity(q, x[:1], 1), f"rank {r}")


def test_without_a_process_group_it_is_the_plain_search():
    q, x = _data()
    _assert_identical(sharded_topk_similarity(q, x, 11), fastap.topk_similarity(q, x, 11),
                      "no group")
