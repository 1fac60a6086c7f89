"""The scripts in examples/ run as a user runs them, and do what their docstrings say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _map_row(output: str, name: str) -> dict[str, float]:
    line = next(line for line in output.splitlines() if line.startswith(name))
    return {k: float(v) for k, v in re.findall(r"\b([EMH])\s+([\d.]+)", line)}


def test_train_embedding_learns_what_raw_features_miss(tmp_path):
    # Run from another folder, as a user would, so that the installed fastap is imported.
    done = subprocess.run([sys.executable, str(EXAMPLES / "train_embedding.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    raw = _map_row(done.stdout, "raw features")
    trained = _map_row(done.stdout, "APLoss-trained MLP")
    assert set(raw) == set(trained) == {"E", "M", "H"}
    # The docstring's claim: the AP-trained embedding retrieves what raw similarity does not.
    for setup in "EMH":
        assert trained[setup] > raw[setup] + 30, (setup, raw, trained)
