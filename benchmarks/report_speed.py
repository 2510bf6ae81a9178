"""The default SmolLM2 report, old code against this checkout, side by side in one run.

    python benchmarks/report_speed.py --old 751af67 --out benchmarks/results/report_speed.json

The old revision is checked out into a temporary git worktree; each report runs in its own process
(``python -S`` with this environment's site-packages on the path, and the ``headlab`` packages mapped
from that tree, so the editable install does not pick the code). Reported: wall seconds of each run, the
ratio new / old, and the largest difference between the two runs' scores (they must agree: any change
of method since the old revision shows here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RUNNER = """
import importlib.util, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("headlab", root + "/headlab/__init__.py",
                                              submodule_search_locations=[root + "/headlab"])
package = importlib.util.module_from_spec(spec); sys.modules["headlab"] = package
for part in ("kernels", "surgeon", "probes", "sae"):  # first: an older headlab/__init__ imports them eagerly
    part_spec = importlib.util.spec_from_file_location("headlab." + part, root + "/" + part + "/__init__.py",
                                                       submodule_search_locations=[root + "/" + part])
    module = importlib.util.module_from_spec(part_spec); sys.modules["headlab." + part] = module
    setattr(package, part, module); part_spec.loader.exec_module(module)
spec.loader.exec_module(package)
from headlab.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_report(tree: Path, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"], "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-S", "-c", RUNNER, str(tree), "report", "smollm2-135m", "--out", str(out)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the report from {tree} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)


def largest_difference(a: Path, b: Path) -> dict:
    old, new = (json.loads((p / "scores.json").read_text())["scores"] for p in (a, b))
    out = {}
    for name in sorted(set(old) & set(new)):
        pairs = [(x, y) for row_x, row_y in zip(old[name]["values"], new[name]["values"]) for x, y in zip(row_x, row_y)
                 if _number(x) and _number(y)]  # NaN (not analysed) is null in the files
        out[name] = max((abs(x - y) for x, y in pairs), default=0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the git revision to compare with")
    parser.add_argument("--out", default="benchmarks/results/report_speed.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.old], check=True,
                       capture_output=True)
        try:
            seconds_old = run_report(old_tree, Path(tmp) / "report-old")
            seconds_new = run_report(ROOT, Path(tmp) / "report-new")
            differences = largest_difference(Path(tmp) / "report-old", Path(tmp) / "report-new")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False)
    result = {"benchmark": "default SmolLM2 report, old revision vs this checkout, one run",
              "old_revision": args.old, "old_seconds": round(seconds_old, 1), "new_seconds": round(seconds_new, 1),
              "new_over_old": round(seconds_new / seconds_old, 3), "cpu": cpu_model(), "threads": os.cpu_count(),
              "largest_score_difference": differences}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
