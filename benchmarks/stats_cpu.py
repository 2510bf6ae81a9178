"""CPU benchmark: a bundled model's forward with all attention statistics recorded vs plain SDPA vs eager maps.

Each (mode, length) runs in its own child process so that peak RSS is measured per mode:
  sdpa        plain SDPA forward (the baseline)
  stats       forward through the headlab hook with statistics of every layer and head:
              LSE, entropy, first-token (sink) mass (on sliding-window layers, over the window only)
  stats_all   the same plus the top-8 keys of every row and column sums / counts
  stats_all_ops  stats_all with the native row pass switched off (HEADLAB_NATIVE=0): the torch-op
              fallback for machines without a C compiler
  eager       eager forward with output_attentions (only where the maps fit: 2048 tokens)
Time is the median of ``--repeats`` forwards after one warm-up; ratios are taken in this one run.
``--logits last`` computes the language-model head for the last position only in every mode
(Gemma 3's 262k-word vocabulary would otherwise hold 8.6 GB of logits at 8192 tokens).

    python benchmarks/stats_cpu.py --tokens 2048 8192 --out benchmarks/results/stats_cpu.json
    python benchmarks/stats_cpu.py --model gemma3-270m --logits last --tokens 2048 8192 \
        --out benchmarks/results/stats_cpu_gemma3.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model

MODES = ("sdpa", "stats", "stats_all", "stats_all_ops", "eager")
EAGER_MAX_TOKENS = 2048


def _input_ids(tokenizer, n_tokens: int):
    import torch

    from headlab.core.text import stdlib_docstrings

    ids = tokenizer(stdlib_docstrings(), add_special_tokens=False).input_ids
    if len(ids) < n_tokens:
        ids = (ids * (n_tokens // len(ids) + 1))
    return torch.tensor([ids[:n_tokens]])


def _child(model_name: str, mode: str, n_tokens: int, repeats: int, logits: str) -> dict:
    """Load the model, run ``repeats`` timed forwards in ``mode``; report seconds and peak RSS."""
    if mode == "stats_all_ops":
        os.environ["HEADLAB_NATIVE"] = "0"
    import torch

    from headlab import Taps, attach, load_model
    from headlab.kernels import native

    torch.manual_seed(0)
    model, tokenizer = load_model(model_name, attn_implementation="eager" if mode == "eager" else "sdpa")
    ids = _input_ids(tokenizer, n_tokens)
    head = {"logits_to_keep": 1} if logits == "last" else {}
    n_layers = model.config.num_hidden_layers
    first_token = torch.zeros(1, 1, n_tokens, dtype=torch.bool)
    first_token[..., 0] = True
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def forward():
        with torch.no_grad():
            if mode.startswith("stats"):
                everything = mode in ("stats_all", "stats_all_ops")
                taps = Taps(stats={layer: None for layer in range(n_layers)}, stats_key_groups=first_token,
                            stats_topk=8 if everything else 0, stats_columns=everything)
                with attach(model, taps=taps) as session:
                    model(input_ids=ids, **head)
                return session.recording
            return model(input_ids=ids, output_attentions=(mode == "eager"), **head)

    forward()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = forward()
        seconds.append(time.perf_counter() - start)
        del result
    return {
        "mode": mode,
        "tokens": n_tokens,
        "seconds": seconds,
        "median_seconds": statistics.median(seconds),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mib": rss_loaded / 1024,
        "native_row_pass": native.available(),
        "logits": logits,
    }


def _run_child(model_name: str, mode: str, n_tokens: int, repeats: int, logits: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", model_name, "--tokens", str(n_tokens),
           "--repeats", str(repeats), "--logits", logits]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"mode": mode, "tokens": n_tokens, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratios(rows: list[dict]) -> dict:
    by = {(r["mode"], r["tokens"]): r for r in rows if "error" not in r}
    out = {}
    for (mode, n), row in by.items():
        base = by.get(("sdpa", n))
        if mode == "sdpa" or base is None:
            continue
        out[f"{mode}/sdpa@{n}"] = {
            "time": round(row["median_seconds"] / base["median_seconds"], 3),
            "peak_rss": round(row["peak_rss_mib"] / base["peak_rss_mib"], 3),
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="input lengths")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per mode (after one warm-up)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--model", default="smollm2-135m", help="bundled model to run (default smollm2-135m)")
    parser.add_argument("--logits", choices=("all", "last"), default="all",
                        help="positions whose logits the forward computes (default all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write (default benchmarks/results/stats_cpu.json for smollm2-135m, "
                             "stats_cpu_<model>.json for others)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.model, args.child, args.tokens[0], args.repeats, args.logits)))
        return 0
    rows = []
    for n_tokens in args.tokens:
        for mode in args.modes:
            if mode == "eager" and n_tokens > EAGER_MAX_TOKENS:
                continue
            row = _run_child(args.model, mode, n_tokens, args.repeats, args.logits)
            print(json.dumps(row), flush=True)
            rows.append(row)
    import torch

    from headlab.core.files import write_json

    report = {
        "benchmark": f"attention statistics on {args.model}, CPU",
        "command": "python benchmarks/stats_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(),
                    "vector_unit": torch.backends.cpu.get_cpu_capability(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "rows": rows,
        "ratios": _ratios(rows),
        "targets": {"stats, stats_all / sdpa time": "<= 1.5", "stats, stats_all / sdpa peak RSS": "<= 1.2"},
    }
    default = "stats_cpu.json" if args.model == "smollm2-135m" else f"stats_cpu_{args.model}.json"
    write_json(args.out or Path("benchmarks/results") / default, report)
    print(json.dumps(report["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
