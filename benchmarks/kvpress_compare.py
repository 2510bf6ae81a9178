"""headlab's presses against NVIDIA kvpress's on the same prompts, paired by prompt.

Reads the JSON of ``benchmarks/kvpress_side_by_side.py`` (kvpress's presses on headlab's held-out
needle prompts) and one or more ``compression.json`` of ``headlab stream-eval`` run on the same model,
length, needles and depths (checked: the prompts must be the same, in the same order), and writes, for
every headlab condition and every kvpress press of the same mode (query-agnostic or query-aware; the
unedited model against kvpress's own uncompressed run), the difference of their recall on the same
prompts with a 95% paired bootstrap interval (prompts resampled together), and the cache each holds.

    .venv/bin/python benchmarks/kvpress_compare.py benchmarks/results/kvpress_smollm2-135m.json \\
        examples/results/presses_smollm2.json --out benchmarks/results/kvpress_compare_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from headlab.core.files import write_json
from headlab.probes.intervals import mean_interval, paired_difference_interval

RESAMPLES = 2000
SEED = 0


def mode_of(rule: str) -> str | None:
    """The mode of a headlab condition: ``aware``, ``agnostic``, or None for the unedited model."""
    if rule == "full":
        return None
    return "aware" if "query-aware" in rule else "agnostic"


def headlab_conditions(paths: list[str], settings: dict) -> list[dict]:
    """Every condition of the headlab files: rule, budget, per-prompt recall in the kvpress file's
    order, and the cache's fraction; refuses files of other prompts."""
    out = []
    for path in paths:
        result = json.load(open(path))
        mine = result["settings"]
        if (result.get("model_id") != settings["model"] or list(mine["depths"]) != list(settings["depths"])
                or mine["n_needles"] != settings["needles"] or settings["length"] not in mine["lengths"]
                or mine.get("split", "heldout") != "heldout"):
            sys.exit(f"{path} measured other prompts than the kvpress file (model, length, needles, depths, split)")
        full_bytes = np.mean([n["kv_bytes"] for run in result["runs"] if run["rule"] == "full"
                              and run["length"] == settings["length"] for n in run["needles"]])
        for run in result["runs"]:
            if run["length"] != settings["length"]:
                continue
            out.append({"source": path, "rule": run["rule"], "budget": run["keep"], "mode": mode_of(run["rule"]),
                        "recalled": [n["recalled"] for n in run["needles"]],
                        "kv_fraction": float(np.mean([n["kv_bytes"] for n in run["needles"]]) / full_bytes)})
    return out


def kvpress_conditions(result: dict) -> list[dict]:
    """Every (mode, press, budget) of the kvpress file with its per-prompt recall in prompt order."""
    groups: dict[tuple, list[dict]] = {}
    for run in result["runs"]:
        if "error" not in run:
            groups.setdefault((run["mode"], run["press"], run["budget"]), []).append(run)
    out = []
    for (mode, press, budget), runs in groups.items():
        runs = sorted(runs, key=lambda r: r["prompt"])
        out.append({"mode": mode, "press": press, "budget": budget, "recalled": [r["recalled"] for r in runs],
                    "kept_fraction": float(np.mean([r["kept_fraction"] for r in runs])),
                    "tensor_fraction": float(np.mean([r["tensor_fraction"] for r in runs]))})
    return out


def comparisons(ours: list[dict], theirs: list[dict]) -> list[dict]:
    """Each headlab condition against each kvpress press of its mode (the unedited model against
    kvpress's uncompressed runs): the recall difference and its paired interval."""
    rows = []
    for mine in ours:
        for other in theirs:
            if (mine["mode"] is None) != (other["press"] == "none") or (mine["mode"] and mine["mode"] != other["mode"]):
                continue
            if len(mine["recalled"]) != len(other["recalled"]):
                continue
            a, b = np.array(mine["recalled"]), np.array(other["recalled"])
            rows.append({"headlab": mine["rule"], "budget": mine["budget"], "kv_fraction": mine["kv_fraction"],
                         "kvpress": other["press"], "kvpress_mode": other["mode"], "kvpress_budget": other["budget"],
                         "kvpress_kept_fraction": other["kept_fraction"],
                         "kvpress_tensor_fraction": other["tensor_fraction"],
                         "headlab_recall": float(a.mean()), "headlab_recall_ci": mean_interval(a, RESAMPLES, SEED),
                         "kvpress_recall": float(b.mean()), "kvpress_recall_ci": mean_interval(b, RESAMPLES, SEED),
                         "difference": float(a.mean() - b.mean()),
                         "difference_ci": paired_difference_interval(a, b, RESAMPLES, SEED)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kvpress", help="the JSON of benchmarks/kvpress_side_by_side.py")
    parser.add_argument("headlab", nargs="+", help="compression.json files of headlab stream-eval on the same prompts")
    parser.add_argument("--out", help="write the comparison here (JSON)")
    args = parser.parse_args()
    kvpress = json.load(open(args.kvpress))
    rows = comparisons(headlab_conditions(args.headlab, kvpress["settings"]), kvpress_conditions(kvpress))
    for row in rows:
        print(f"{row['headlab']:60} {row['kv_fraction']:.2f}  vs {row['kvpress']:22} {row['kvpress_mode'] or '':8} "
              f"{row['kvpress_kept_fraction']:.2f}: {row['headlab_recall']:.2f} - {row['kvpress_recall']:.2f} = "
              f"{row['difference']:+.2f} [{row['difference_ci'][0]:+.2f}, {row['difference_ci'][1]:+.2f}]")
    if args.out:
        write_json(args.out, {"kvpress_file": args.kvpress, "headlab_files": args.headlab, "resamples": RESAMPLES,
                              "seed": SEED, "comparisons": rows})
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
