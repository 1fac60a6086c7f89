"""The tables of results: :func:`format_results` (several models, a line each), the printed
evaluation (``<tag>.txt``, :func:`format_table`) and its one-line summary. ``fastap eval`` and
``fastap demo`` print them."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

KAPPAS = (1, 5, 10)
_SETUP_NAMES = {"easy": "Easy", "medium": "Medium", "hard": "Hard", "original": "All"}
_WIDTH = 7  # of a number column: "100.00" and "mP@10" with a space before


def finite_or_none(v: float) -> Optional[float]:
    """A metric as a JSON number: None for NaN (a setup without queries with positives)."""
    v = float(v)
    return None if math.isnan(v) else v


def _fmt(v: Optional[float], width: int) -> str:
    return f"{'—':>{width}}" if v is None or not math.isfinite(v) else f"{v:{width}.2f}"


def format_results(results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                   kappas: Sequence[int] = KAPPAS) -> str:
    """The metrics of several models as one table: a line per model, its name first, then per
    setup (Easy, Medium, Hard; All for an original-protocol ground truth) its mAP and mP@k in
    percent, two decimals; a dash where a value is missing (a setup without queries with
    positives).

    ``results``: ``{model name: {setup: {"mAP": …, "mP@k": {"1": …, …}}}}``, every model with
    the same setups (the ``"results"`` of :func:`~fastap.retrieval.evaluate_model`).
    """
    setups = list(next(iter(results.values())))
    columns = ["mAP"] + [f"mP@{k}" for k in kappas]
    group = len(columns) * _WIDTH
    name_w = max(len("model"), *(len(name) for name in results))
    head = f"{'':<{name_w}}" + "".join(f" | {_SETUP_NAMES.get(s, s):^{group - 1}}"
                                       for s in setups)
    names = f"{'model':<{name_w}}" + "".join(
        " |" + "".join(f"{c:>{_WIDTH}}" for c in columns) for _ in setups)
    lines = [head, names, "-" * len(names)]
    for name, res in results.items():
        values = ([res[s]["mAP"]] + [res[s]["mP@k"][str(k)] for k in kappas] for s in setups)
        lines.append(f"{name:<{name_w}}" + "".join(
            " |" + "".join(_fmt(v, _WIDTH) for v in group_values) for group_values in values))
    return "\n".join(lines)


def format_table(result: Mapping[str, Any]) -> str:
    """One evaluation's table: a line naming the dataset and its sizes, :func:`format_results`
    of the model (named by its spec) and the one-line summary of :func:`format_summary`."""
    sizes = result.get("sizes", {})
    head = f"{result['dataset']}"
    if sizes:
        head += (f" — {sizes.get('queries')} queries, {sizes.get('database')} database images"
                 + (f" + {sizes['distractors']} distractors" if sizes.get("distractors") else ""))
    model = result.get("model", {}).get("spec") or result.get("tag", result["dataset"])
    table = format_results({model: result["results"]}, result.get("kappas", KAPPAS))
    return "\n".join([head, table, format_summary(result)])


def format_summary(result: Mapping[str, Any]) -> str:
    """``roxford5k: E 67.34  M 49.22  H 22.81`` (``roxford5k+1m`` with distractors)."""
    tag = result.get("tag", result["dataset"])
    parts = []
    for setup, row in result["results"].items():
        letter = _SETUP_NAMES.get(setup, setup)[0]
        parts.append(f"{letter} {_fmt(row['mAP'], 0).strip()}")
    return f"{tag}: " + "  ".join(parts)
