"""ACT on SmolLM2-135M: search calibration heads on two built-in tasks, then compare held-out
accuracy with and without the found plan. Writes OUT/plan.json, OUT/search.json (resumable
progress) and OUT/results.json.

    python examples/calibrate_smollm2.py --out results/act-smollm2 --layers 8-15 --calib 16 --test 100

The search measures every head of ``--layers`` alone on the calibration split (``--calib`` examples
per task), keeps heads that raise accuracy by more than ``--margin``, and evaluates the plan on
``--test`` fresh examples per task. Re-running resumes a stopped search.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from headlab.surgeon import load_model
from headlab.surgeon.search.accuracy import evaluate
from headlab.core.files import write_json
from headlab.surgeon.search.calibration import SearchSettings, calibration_search, default_candidates, plan_from_search
from headlab.surgeon.search.tasks import load_task

TASKS = ("kv-recall", "arithmetic")  # label-words is at 95% without calibration: little room


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/act-smollm2"))
    parser.add_argument("--layers", default="8-15", help="layers to search, FIRST-LAST")
    parser.add_argument("--calib", type=int, default=16, help="calibration examples per task")
    parser.add_argument("--test", type=int, default=100, help="held-out examples per task")
    parser.add_argument("--beta", type=float, default=0.4)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--margin", type=float, default=0.0)
    args = parser.parse_args()
    first, last = (int(x) for x in args.layers.split("-"))
    model, tokenizer = load_model("smollm2-135m")
    examples = [ex for task in TASKS for ex in load_task(task, "calibration", args.calib)]
    settings = SearchSettings(TASKS, len(examples), tuple(default_candidates(model, list(range(first, last + 1)))),
                              args.beta, args.threshold, args.margin)
    start = time.perf_counter()
    state = calibration_search(model, tokenizer, examples, settings, args.out / "search.json")
    search_seconds = time.perf_counter() - start
    plan = plan_from_search(model, "smollm2-135m", state, args.beta, args.threshold)
    plan.save(args.out / "plan.json")
    results = {"search": {"baseline_calibration_accuracy": state["baseline"], "kept_heads": state["kept"],
                          "n_candidates": len(settings.candidates), "n_calibration_examples": len(examples),
                          "seconds": round(search_seconds, 1)},
               "held_out": {}}
    for task in TASKS:
        test = load_task(task, "test", args.test)
        row = {"without_plan": evaluate(model, tokenizer, test).to_dict()}
        row["with_plan"] = evaluate(model, tokenizer, test, plan).to_dict() if plan.edits else row["without_plan"]
        results["held_out"][task] = row
    write_json(args.out / "results.json", results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
