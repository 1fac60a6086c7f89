"""Unusual inputs for the kernels (strides, sizes, dtypes, scales) run in a child process, so that
a crash fails this test, naming the case, instead of ending the test run.

Each case is classified: ``ok`` cases must equal the dense reference (``fastap.reference``) on a
contiguous float64 copy of the same values; ``error`` cases must raise the given exception type
with a message that starts with the argument's name.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(r'''
    import json, sys, traceback
    import torch
    import fastap
    import fastap.reference as R
    from fastap import functional as Fn

    torch.manual_seed(0)
    s = torch.rand(4, 6)
    y = torch.zeros(4, 6, dtype=torch.bool)
    y[:, ::2] = True
    e = torch.randn(6, 5)
    lab = torch.tensor([0, 0, 1, 1, 2, 2])

    def emb_ref(kind, x, labels):
        x = x.detach().double()
        x = x / x.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
        fn = R.embedding_ap_loss if kind == "ap" else R.fastap_loss
        return fn(x, labels)

    def loss_case(kind, x, labels=lab, fused=None):
        crit = (fastap.APLoss if kind == "ap" else fastap.FastAPLoss)(fused=fused)
        return crit(x, labels), emb_ref(kind, x, labels)

    CASES = {
        # strides of the scores
        "scores flipped rows and columns": lambda: (
            Fn.average_precision(s.flip(0).flip(1), y.flip(0).flip(1)),
            R.average_precision(s.flip(0).flip(1).double(), y.flip(0).flip(1))),
        "scores transposed": lambda: (
            Fn.average_precision(s.T.contiguous().T, y),
            R.average_precision(s.double(), y)),
        "scores expanded (stride 0)": lambda: (
            Fn.average_precision(s[:1].expand(4, 6), y),
            R.average_precision(s[:1].expand(4, 6).double(), y)),
        "scores every other column": lambda: (
            Fn.average_precision(s[:, ::2], y[:, 1::2] | y[:, ::2]),
            R.average_precision(s[:, ::2].double(), y[:, 1::2] | y[:, ::2])),
        "labels flipped": lambda: (
            Fn.ap_loss(s, (lab[:4].flip(0), lab.flip(0))),
            R.ap_loss(s.double(), (lab[:4].flip(0), lab.flip(0)))),
        "weights every other element": lambda: (
            Fn.ap_loss(s, y, weights=torch.arange(8.0)[::2]),
            R.ap_loss(s.double(), y, weights=torch.arange(8.0)[::2].double())),
        "one score": lambda: (
            Fn.average_precision(torch.tensor([[0.3]]), torch.tensor([[True]])),
            torch.tensor([1.0], dtype=torch.float64)),
        # strides and sizes of the embeddings, both kernels
        **{f"{kind} {name} fused={fused}": (lambda kind=kind, x=x, fused=fused:
                                             loss_case(kind, x, fused=fused))
           for kind in ("ap", "fastap") for fused in (False, True)
           for name, x in (("embeddings flipped", e.flip(0).flip(1)),
                           ("embeddings transposed", e.T.contiguous().T),
                           ("embeddings expanded", e[:1].expand(6, 5)),
                           ("embeddings x 1e20", e * 1e20),
                           ("embeddings x 1e-30", e * 1e-30),
                           ("float16 rows past 65504", (e / e.abs().max() * 6e4).half()))},
        "one embedding": lambda: (fastap.APLoss()(e[:1], lab[:1]),
                                  torch.tensor(0.0, dtype=torch.float64)),
        "tiny weights": lambda: (Fn.ap_loss(s, y, weights=torch.full((4,), 1e-40)),
                                 R.ap_loss(s.double(), y)),
        # errors that name the argument
        "integer embeddings": lambda: fastap.APLoss()(e.long(), lab),
        "complex embeddings": lambda: fastap.FastAPLoss()(e.to(torch.complex64), lab),
        "embeddings without columns": lambda: fastap.APLoss()(e[:, :0], lab),
        "float ref_labels": lambda: fastap.APLoss()(e, lab, e, lab.float()),
        "0-d scores": lambda: Fn.average_precision(torch.tensor(0.5), torch.tensor(True)),
        "NaN embeddings fused": lambda: fastap.APLoss(fused=True)(
            e.masked_fill(e > 1, float("nan")), lab),
        "weights as a list": lambda: Fn.ap_loss(s, y, weights=[1.0] * 4),
        "score_range of text": lambda: fastap.APLoss(score_range="ab"),
        "memory_size 2.5": lambda: fastap.CrossBatchMemory(fastap.APLoss(), 5, 2.5),
        "embedding_size -1": lambda: fastap.CrossBatchMemory(fastap.APLoss(), -1, 8),
        "indices_tuple by name": lambda: fastap.APLoss()(e, lab, indices_tuple=(lab, lab, lab)),
    }

    for name in json.loads(sys.argv[1]):
        print(json.dumps({"started": name}), flush=True)
        try:
            got, want = CASES[name]()
            ok = torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-5,
                                equal_nan=True)
            out = {"case": name, "outcome": "ok" if ok else "wrong",
                   "detail": f"{got.tolist()} vs {want.tolist()}"}
        except Exception as err:
            out = {"case": name, "outcome": "error", "type": type(err).__name__,
                   "detail": str(err).splitlines()[0] if str(err) else ""}
        print(json.dumps(out), flush=True)
''')

EMBEDDING_CASES = [f"{kind} {name} fused={fused}" for kind in ("ap", "fastap")
                   for fused in (False, True)
                   for name in ("embeddings flipped", "embeddings transposed",
                                "embeddings expanded", "embeddings x 1e20",
                                "embeddings x 1e-30", "float16 rows past 65504")]
OK = ["scores flipped rows and columns", "scores transposed", "scores expanded (stride 0)",
      "scores every other column", "labels flipped", "weights every other element", "one score",
      "one embedding", "tiny weights", *EMBEDDING_CASES]
#: case -> (exception type, start of its message: the argument's name)
ERRORS = {
    "integer embeddings": ("TypeError", "embeddings must be a float16"),
    "complex embeddings": ("TypeError", "embeddings must be a float16"),
    "embeddings without columns": ("ValueError", "embeddings must have at least one column"),
    "float ref_labels": ("TypeError", "ref_labels must be integer class ids"),
    "0-d scores": ("ValueError", "scores must be a 2-D (B, N) tensor"),
    "NaN embeddings fused": ("ValueError", "embeddings contains NaN or Inf"),
    "weights as a list": ("TypeError", "weights must be a (4,) tensor, got list"),
    "score_range of text": ("ValueError", "score_range must be a pair (lo, hi) of numbers"),
    "memory_size 2.5": ("TypeError", "memory_size must be an integer, got 2.5"),
    "embedding_size -1": ("ValueError", "embedding_size must be at least 1, got -1"),
    "indices_tuple by name": ("TypeError", "indices_tuple must be None"),
}


def test_unusual_inputs_in_a_child_process(tmp_path):
    names = OK + list(ERRORS)
    # Away from the source tree: `python -c` puts the working folder first on sys.path, and the
    # uncompiled fastap there would shadow the installed one.
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(names)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = {r["case"]: r for r in lines if "case" in r}
    started = [r["started"] for r in lines if "started" in r]
    if proc.returncode != 0:
        pytest.fail(f"the child process ended with code {proc.returncode} during case "
                    f"{started[-1] if started else None!r}:\n{proc.stderr[-3000:]}")
    problems = []
    for name in OK:
        r = results[name]
        if r["outcome"] != "ok":
            problems.append(f"{name}: expected the reference's value, got {r}")
    for name, (kind, start) in ERRORS.items():
        r = results[name]
        if r["outcome"] != "error" or r["type"] != kind or not r["detail"].startswith(start):
            problems.append(f"{name}: expected {kind}: {start}..., got {r}")
    assert not problems, "\n".join(problems)
