"""Markdown summary of a pytest-benchmark JSON written by the fastap benchmarks.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json [--check]

Prints one table per group (family, B = N, device): median time, how many times faster than the
dense ``fastap.reference`` each implementation is (and than pytorch-metric-learning where it is
benchmarked), peak extra memory of one forward + backward and its ratio to the float32 (B, N) score
matrix. Then the targets of the CPU kernels at B = N = 4096: at least 50× faster than the dense
reference with 25 bins (the speed target is stated for 25 bins: FastAP's default 11 centres make
its dense reference about 3.4× cheaper, the shared similarity GEMM then dominates, and its
ratio is only reported) and at most 3× the score matrix of extra memory. ``--check`` exits with status 1 when a
target that could be evaluated is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

IMPL_ORDER = {"fastap": 0, "fastap_fused": 1, "pml": 2, "reference": 3}
IMPL_LABEL = {"fastap": "fastap", "fastap_fused": "fastap, fused (scores never stored)",
              "reference": "fastap.reference (dense)",
              "pml": "pytorch-metric-learning (dense)"}
TARGET_SIZE, TARGET_SPEEDUP, TARGET_MEMORY_RATIO = 4096, 50.0, 3.0
TARGET_CENTRES = 25


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def load(path: str) -> tuple[dict, dict[str, list[dict]]]:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        impl = info.get("impl") or bench.get("params", {}).get("impl") or bench["name"]
        groups[bench.get("group") or bench["name"]].append(
            {"impl": impl, "median_ms": bench["stats"]["median"] * 1e3,
             "rounds": bench["stats"]["rounds"], **info})
    return data, groups


def _group_key(item):
    name, rows = item
    first = rows[0]
    return (first.get("device", ""), first.get("B", 0), first.get("family", name))


def render(data: dict, groups: dict[str, list[dict]]) -> tuple[str, list[tuple[str, bool]]]:
    lines, checks = [], []
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw") or machine.get("processor", "")
    lines.append(f"Machine: {machine.get('node', '?')}, {cpu}; "
                 f"{data.get('datetime', '')}, pytest-benchmark {data.get('version', '')}.")
    for name, rows in sorted(groups.items(), key=_group_key):
        rows.sort(key=lambda r: IMPL_ORDER.get(r["impl"], 9))
        by_impl = {r["impl"]: r for r in rows}
        ref, pml = by_impl.get("reference"), by_impl.get("pml")
        first = rows[0]
        score_mb = first.get("score_matrix_MB")
        title = f"### {name}"
        if score_mb is not None:
            title += f" (score matrix {score_mb:.0f} MiB"
            title += f", {first['gpu']})" if first.get("gpu") else ")"
        lines += ["", title, ""]
        header = ["implementation", "median ms", "× faster than reference"]
        if pml:
            header.append("× faster than pml")
        header += ["peak extra MiB", "peak / score matrix"]
        if first.get("device") == "cpu":
            header += ["busy cores", "busy threads"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for r in rows:
            speedup = ref["median_ms"] / r["median_ms"] if ref else None
            cells = [IMPL_LABEL.get(r["impl"], r["impl"]), _fmt(r["median_ms"], ".1f"),
                     _fmt(speedup, ".1f", "×")]
            if pml:
                cells.append(_fmt(pml["median_ms"] / r["median_ms"], ".1f", "×"))
            cells += [_fmt(r.get("peak_extra_MB"), ".1f"),
                      _fmt(r.get("peak_extra_over_score_matrix"), ".2f", "×")]
            if first.get("device") == "cpu":
                cells += [_fmt(r.get("cpu_per_wall"), ".2f"), _fmt(r.get("busy_threads"), "d")]
            lines.append("| " + " | ".join(cells) + " |")
        if first.get("device") == "cpu" and first.get("B") == TARGET_SIZE:
            for fast in (r for r in rows if r["impl"].startswith("fastap")):
                label = f"{name}, {IMPL_LABEL.get(fast['impl'], fast['impl'])}"
                if ref and first.get("num_centres", TARGET_CENTRES) == TARGET_CENTRES:
                    speedup = ref["median_ms"] / fast["median_ms"]
                    checks.append((f"{label}: {speedup:.1f}× faster than the dense reference "
                                   f"(target ≥ {TARGET_SPEEDUP:.0f}×)", speedup >= TARGET_SPEEDUP))
                ratio = fast.get("peak_extra_over_score_matrix")
                if ratio is not None:
                    checks.append((f"{label}: peak extra memory {ratio:.2f}× the score matrix "
                                   f"(target ≤ {TARGET_MEMORY_RATIO:.0f}×)",
                                   ratio <= TARGET_MEMORY_RATIO))
    loads = [r["loadavg_1min"] for rows in groups.values() for r in rows if "loadavg_1min" in r]
    if loads:
        lines += ["", f"1-minute load average during the runs: {min(loads):.1f}–{max(loads):.1f} "
                      f"(busy cores = process CPU time / wall time of the timed calls, which competing "
                      f"processes lower; busy threads = threads that did at least a quarter of the "
                      f"busiest thread's work)."]
    if checks:
        lines += ["", f"Targets (CPU, B = N = {TARGET_SIZE}; for the embedding losses the "
                      f"times include the B×N×D similarity matmul that every implementation "
                      f"shares):", ""]
        lines += [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    return "\n".join(lines), checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a CPU target at B = N = 4096 is missed")
    args = parser.parse_args(argv)
    try:
        data, groups = load(args.json)
    except (OSError, ValueError) as err:  # no such file (forgot --benchmark-json?), not JSON
        print(f"report.py: cannot read {args.json}: {err}; write it with "
              "`pytest benchmarks/ --benchmark-only --benchmark-json=bench.json`", file=sys.stderr)
        return 2
    if not groups:
        print(f"{args.json}: no benchmarks recorded")
        return 1 if args.check else 0
    text, checks = render(data, groups)
    print(text)
    return 1 if args.check and not all(ok for _, ok in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
