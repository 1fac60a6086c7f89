"""The tables of results: several models (fastap demo) and one evaluation (fastap eval) share
one formatter."""

from __future__ import annotations

import math

from fastap.retrieval import format_results, format_summary, format_table

SETUPS = ("easy", "medium", "hard")


def _metrics(m):
    return {"mAP": m, "mP@k": {"1": m + 1, "5": m + 2, "10": math.nan}}


def test_several_models_are_a_line_each():
    results = {f"row {i}": {s: _metrics(10.0 * i + j) for j, s in enumerate(SETUPS)}
               for i in (1, 2)}
    table = format_results(results).splitlines()
    assert len(table) == 5 and "Easy" in table[0] and "Hard" in table[0]
    assert table[1].split()[:6] == ["model", "|", "mAP", "mP@1", "mP@5", "mP@10"]
    assert set(table[2]) == {"-"} and len(table[2]) == len(table[1])
    assert table[3].startswith("row 1") and "10.00" in table[3] and "12.00" in table[3]
    assert table[4].split()[3:6] == ["20.00", "21.00", "22.00"]
    assert "—" in table[4]  # a missing value is a dash, not "nan"
    assert len({len(line.rstrip()) for line in table[1:]}) == 1  # the columns line up


def test_an_evaluation_is_its_model_line_between_the_sizes_and_the_summary():
    result = {"dataset": "roxford5k", "tag": "roxford5k+1m", "kappas": [1, 5],
              "sizes": {"queries": 70, "database": 4993, "distractors": 1000},
              "model": {"spec": "torchvision:resnet50"},
              "results": {s: {"mAP": 50.0, "mP@k": {"1": 60.0, "5": None}} for s in SETUPS}}
    lines = format_table(result).splitlines()
    assert lines[0] == "roxford5k — 70 queries, 4993 database images + 1000 distractors"
    assert lines[2].split()[:5] == ["model", "|", "mAP", "mP@1", "mP@5"]
    assert lines[4].split()[:5] == ["torchvision:resnet50", "|", "50.00", "60.00", "—"]
    assert lines[5] == format_summary(result) == "roxford5k+1m: E 50.00  M 50.00  H 50.00"
    original = {"dataset": "oxford5k", "results": {"original": _metrics(5.0)}}
    assert "All" in format_table(original).splitlines()[1]
    assert format_summary({"dataset": "x", "results": {"easy": {"mAP": None}}}) == "x: E —"
