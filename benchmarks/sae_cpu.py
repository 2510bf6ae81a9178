"""CPU benchmark: training throughput (tokens/s) of headlab's TopK trainer step against a plain
dense torch TopK autoencoder step and SAELens' TopK training step, side by side in one run, at one
and at two torch threads, on synthetic activations of SmolLM2's head-output width (d_in 576).

All take an Adam step on the same batches (steps: ``sae_steps.py``); the dense baseline builds the
``B × d_sae`` code, decodes with a matmul and lets autograd differentiate the dense encoder;
headlab's step uses the sparse TopK ops (index-add encoder backward, embedding-bag decoder), the
decoder-norm constraint, gradient clipping and a fused Adam. SAELens pins transformer-lens 3.x, so
its step runs in its own environment (``.venv-saelens``, built by ``scripts/setup.sh --tests``) as a
subprocess of this script, on batches drawn from the same seed.

    python benchmarks/sae_cpu.py --out benchmarks/results/sae_cpu.json

Each rate is the median of ``--repeats`` timed passes over the batches, the three steps taking
turns, so a busy machine slows them alike; the JSON records the CPU model and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import cpu_model
from sae_steps import dense_step, headlab_step, saelens_step

ROOT = Path(__file__).resolve().parents[1]
SAELENS_PYTHON = ROOT / ".venv-saelens" / "bin" / "python"


def rate(step, batches) -> float:
    """Tokens per second of one pass of ``step`` over ``batches``."""
    start = time.perf_counter()
    for x in batches:
        step(x)
    return sum(x.shape[0] for x in batches) / (time.perf_counter() - start)


def draw_batches(args) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(args.batch, args.d_in) for _ in range(args.steps)]


def saelens_worker(args) -> None:
    """In SAELens' environment: print the median rate of its step, one JSON line."""
    torch.set_num_threads(args.threads[0])
    batches = draw_batches(args)
    step, note = saelens_step(args.d_in, args.d_sae, args.k, "cpu")
    if step is None:
        print(json.dumps({"note": note}))
        return
    step(batches[0])  # warm-up
    print(json.dumps({"note": note, "tokens_per_s": statistics.median(rate(step, batches)
                                                                        for _ in range(args.repeats))}))


def saelens_rate(args, d_sae: int, threads: int) -> dict:
    """SAELens' rate from its own environment, or why it was not measured."""
    if not SAELENS_PYTHON.exists():
        return {"note": f"not measured: {SAELENS_PYTHON} is missing (bash scripts/setup.sh --tests)"}
    command = [str(SAELENS_PYTHON), __file__, "--saelens-worker", "--d-in", str(args.d_in), "--d-sae", str(d_sae),
               "--k", str(args.k), "--batch", str(args.batch), "--steps", str(args.steps),
               "--repeats", str(args.repeats), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if done.returncode != 0:
        return {"note": f"not measured: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args, d_sae: int, threads: int) -> dict:
    """One row: dense and headlab taking turns at ``threads``, then SAELens."""
    from headlab.sae import SparseAutoencoder

    torch.set_num_threads(threads)
    batches = draw_batches(args)
    sae = SparseAutoencoder(args.d_in, d_sae, "topk", args.k, 9)
    steps = {"dense": dense_step(sae, args.k), "headlab": headlab_step(sae, args.k)}
    for step in steps.values():
        step(batches[0])  # warm-up
    rates = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            rates[name].append(rate(step, batches))
    row = {"d_in": args.d_in, "d_sae": d_sae, "k": args.k, "batch": args.batch, "threads": threads}
    row.update({f"{name}_tokens_per_s": statistics.median(values) for name, values in rates.items()})
    row["speedup"] = row["headlab_tokens_per_s"] / row["dense_tokens_per_s"]
    saelens = saelens_rate(args, d_sae, threads)
    row["saelens"] = saelens["note"]
    if "tokens_per_s" in saelens:
        row["saelens_tokens_per_s"] = saelens["tokens_per_s"]
        row["speedup_vs_saelens"] = row["headlab_tokens_per_s"] / saelens["tokens_per_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--expansions", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--d-sae", type=int, help=argparse.SUPPRESS)  # the worker's one size
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per step (the median is kept)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument("--out", default="benchmarks/results/sae_cpu.json")
    parser.add_argument("--saelens-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.saelens_worker:
        saelens_worker(args)
        return
    from headlab.core.files import write_json

    load_before = os.getloadavg()[0]
    rows = []
    for expansion in args.expansions:
        for threads in args.threads:
            rows.append(measure(args, expansion * args.d_in, threads))
            print(", ".join(f"{key} {value:.6g}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in rows[-1].items()), flush=True)
    write_json(args.out, {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "load_average_before_after": [load_before, os.getloadavg()[0]], "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
