"""CPU benchmark: SmolLM2 forward with edit plans vs the unedited SDPA forward, side by side.

Plans (all through the one hook):
  empty        no edits (delegates every layer to SDPA)
  act_3heads   ACT on 3 heads of layers 10-12 (only those heads get an eager fp32 map)
  act_all      ACT on every head of layers 2-28
  steer_3heads PASTA on 3 heads of layers 10-12, first half of the input emphasised
Each row also reports how many attention-map bytes the edited heads held per forward
(``edited_map_bytes``), against what maps for every head would need.

    python benchmarks/edits_cpu.py --tokens 512 2048 --out benchmarks/results/edits_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from headlab.surgeon import Calibrate, Plan, Request, Steer, attach, load_model, model_shape
from headlab.core.files import write_json


def plans(n_layers: int, n_heads: int) -> dict[str, Plan]:
    return {
        "empty": Plan(),
        "act_3heads": Plan([Calibrate(layer, (1,)) for layer in (10, 11, 12)]),
        "act_all": Plan([Calibrate(layer, tuple(range(n_heads))) for layer in range(2, n_layers - 1)]),
        "steer_3heads": Plan([Steer(layer, (1,), alpha=0.01) for layer in (10, 11, 12)]),
    }


def time_forward(run, repeats: int) -> list[float]:
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/edits_cpu.json"))
    args = parser.parse_args(argv)
    model, _ = load_model("smollm2-135m")
    shape = model_shape(model)
    rows = []
    for n_tokens in args.tokens:
        ids = torch.randint(100, 40000, (1, n_tokens), generator=torch.Generator().manual_seed(0))
        request = Request(emphasis=(0, n_tokens // 2))
        with torch.no_grad():
            base = time_forward(lambda: model(input_ids=ids), args.repeats)
            rows.append({"plan": "sdpa (no hook)", "tokens": n_tokens, "seconds": base,
                         "median_seconds": statistics.median(base), "ratio_vs_sdpa": 1.0})
            for name, plan in plans(shape.n_layers, shape.n_heads).items():
                def run():
                    with attach(model, plan, request=request):
                        model(input_ids=ids)
                seconds = time_forward(run, args.repeats)
                edited_heads = sum(len(e.heads) for e in plan.edits)
                rows.append({
                    "plan": name, "tokens": n_tokens, "seconds": seconds, "median_seconds": statistics.median(seconds),
                    "ratio_vs_sdpa": round(statistics.median(seconds) / statistics.median(base), 3),
                    "edited_heads": edited_heads,
                    "edited_map_bytes": 4 * edited_heads * n_tokens**2,
                    "all_heads_map_bytes": 4 * shape.n_layers * shape.n_heads * n_tokens**2,
                })
            print(json.dumps([r for r in rows if r["tokens"] == n_tokens], indent=1), flush=True)
    write_json(args.out, {
        "benchmark": "edited forward vs unedited SDPA forward, SmolLM2-135M, CPU",
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
