"""The evaluation's tables: the printed results (``<tag>.txt``) and the one-line summary."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

KAPPAS = (1, 5, 10)
_ROW_NAMES = {"easy": "Easy", "medium": "Medium", "hard": "Hard", "original": "All"}


def finite_or_none(v: float) -> Optional[float]:
    """A metric as a JSON number: None for NaN (a setup without queries with positives)."""
    v = float(v)
    return None if math.isnan(v) else v


def _fmt(v: Optional[float], width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}.2f}"


def format_table(result: Mapping[str, Any]) -> str:
    """The results table (rows Easy/Medium/Hard, columns mAP and mP@k, two decimals) followed
    by the one-line summary of :func:`format_summary`."""
    res = result["results"]
    kappas = result.get("kappas", list(KAPPAS))
    sizes = result.get("sizes", {})
    head = f"{result['dataset']}"
    if sizes:
        head += (f" — {sizes.get('queries')} queries, {sizes.get('database')} database images"
                 + (f" + {sizes['distractors']} distractors" if sizes.get("distractors") else ""))
    model = result.get("model", {}).get("spec")
    lines = [head + (f"; model {model}" if model else "")]
    cols = ["mAP"] + [f"mP@{k}" for k in kappas]
    lines.append(f"{'':<8}" + "".join(f"{c:>8}" for c in cols))
    for setup, row in res.items():
        values = [row["mAP"]] + [row["mP@k"][str(k)] for k in kappas]
        lines.append(f"{_ROW_NAMES.get(setup, setup):<8}" + "".join(_fmt(v, 8) for v in values))
    lines.append(format_summary(result))
    return "\n".join(lines)


def format_summary(result: Mapping[str, Any]) -> str:
    """``roxford5k: E 67.34  M 49.22  H 22.81`` (``roxford5k+1m`` with distractors)."""
    tag = result.get("tag", result["dataset"])
    parts = []
    for setup, row in result["results"].items():
        letter = _ROW_NAMES.get(setup, setup)[0]
        parts.append(f"{letter} {_fmt(row['mAP'], 0).strip()}")
    return f"{tag}: " + "  ".join(parts)
