#!/usr/bin/env bash
# Wall time of `fastap demo` on the code of commit 4e0767d, the last one before issue 18's work
# (float32 only, contiguous layout): the time the presets are held to (README, wall-time table).
#
#   bash benchmarks/old_demo_time.sh [WORKDIR [PRESET...]]    (defaults: /tmp/fastap-4e0767d,
#                                                               default quick)
#
# Checks the commit out into WORKDIR/src, installs it into its own virtual environment
# (WORKDIR/venv, with this environment's torch: --system-site-packages) and runs
# `fastap demo --seed 0 --threads 2` per preset, printing the seconds of report.json's timings
# without the data generation, as benchmarks/demo_seeds.py counts them. Run it on an idle machine.
set -euo pipefail
commit=4e0767d
work=${1:-/tmp/fastap-$commit}
shift || true
presets=${*:-default quick}
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
python=${PYTHON:-python}

[ -d "$work/src" ] || git -C "$repo" worktree add --detach "$work/src" "$commit"
[ -x "$work/venv/bin/python" ] || "$python" -m venv --system-site-packages "$work/venv"
[ -e "$work/venv/.built" ] ||
    { FASTAP_CUDA=OFF "$work/venv/bin/pip" install -q --no-build-isolation --no-deps "$work/src" &&
      touch "$work/venv/.built"; }

cd "$work"  # not the checkout: `python -` puts the working directory first on sys.path
for preset in $presets; do
    flag=$([ "$preset" = quick ] && echo --quick || true)
    "$work/venv/bin/python" - "$work/$preset" $flag <<'EOF'
import json, sys
from pathlib import Path

# An editable install of the current fastap (pip install -e) hooks `import fastap` into
# sys.meta_path, ahead of this environment's copy of the old code: drop that hook.
sys.meta_path[:] = [f for f in sys.meta_path if "fastap" not in type(f).__module__]
import fastap
from fastap.cli import main

out, flags = Path(sys.argv[1]), sys.argv[2:]
assert Path(fastap.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), fastap.__file__
main(["demo", *flags, "--seed", "0", "--threads", "2", "--output", str(out / "run"),
      "--data-root", str(out / "data"), "--quiet"])
t = json.loads((out / "run" / "report.json").read_text())["timings"]
print(f"{'quick' if flags else 'default'} (code of 4e0767d, fp32, seed 0, 2 threads): "
      f"{t['total'] - t['data']:.1f} s; supervised {t['train_supervised']:.1f} s, contrastive "
      f"{t['train_contrastive']:.1f} s, AP fine-tuning {t['train_contrastive+ap']:.1f} s",
      flush=True)
EOF
done
