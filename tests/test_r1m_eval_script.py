"""benchmarks/r1m_eval.py runs end to end at a small size: both methods, the agreement check,
the JSON, and the cached memmap reused on a second run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GND_DIR = Path(os.environ.get("FASTAP_REVISITOP_GND", REPO.parent / "shared/data/revisitop"))


def run_script(tmp_path, *extra):
    cmd = [sys.executable, str(REPO / "benchmarks" / "r1m_eval.py"), "--n", "20000",
           "--dim", "64", "--data-dir", str(tmp_path / "data"), "--gnd-dir", str(GND_DIR),
           "--json", str(tmp_path / "out.json"), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads((tmp_path / "out.json").read_text())


def test_r1m_eval_script_small(tmp_path):
    if not (GND_DIR / "gnd_roxford5k.pkl").is_file():
        pytest.skip(f"real ground truth not found in {GND_DIR}; set FASTAP_REVISITOP_GND")
    out, report = run_script(tmp_path)
    assert "the methods agree" in out and "CPU:" in out and "avx512_bf16=" in out
    assert report["agree"] and report["n"] == 20000 and report["n_oxford"] == 4993
    fastap, revisitop = report["methods"]["fastap"], report["methods"]["revisitop"]
    for setup in ("easy", "medium", "hard"):
        assert fastap["results"][setup]["mAP"] == pytest.approx(
            revisitop["results"][setup]["mAP"], abs=1e-6)
        assert 0 < fastap["results"][setup]["mAP"] < 100  # positives score, but not perfectly
    for run in (fastap, revisitop):
        assert run["total_s"] >= run["search_s"] > 0 and run["evaluation_s"] > 0
        assert run["peak_mib"] > 0 and run["search_hwm_mib"] > 0
    assert report["memmap_write_s"] > 0
    # the second run finds the memmap and its sidecar and does not rewrite them
    memmap = Path(report["memmap"])
    stamp = memmap.stat().st_mtime_ns
    out, report = run_script(tmp_path)
    assert "reused" in out and report["memmap_write_s"] == 0
    assert memmap.stat().st_mtime_ns == stamp
