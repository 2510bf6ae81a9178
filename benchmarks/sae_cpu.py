"""CPU benchmark: training throughput (tokens/s) of headlab's TopK trainer step against a plain
dense torch TopK autoencoder step (and SAELens' TopK training step where ``sae_lens`` imports),
side by side in one run, on synthetic activations of SmolLM2's head-output width (d_in 576).

All take an Adam step on the same batches (steps: ``sae_steps.py``); the dense baseline builds the
``B × d_sae`` code, decodes with a matmul and lets autograd differentiate the dense encoder;
headlab's step uses the sparse TopK ops (index-add encoder backward, embedding-bag decoder), the
decoder-norm constraint and gradient clipping. SAELens pins transformer-lens 3.x, so it only
imports in its own environment (headlab installed there with ``--no-deps``).

    python benchmarks/sae_cpu.py --out benchmarks/results/sae_cpu.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from sae_steps import dense_step, headlab_step, saelens_step

from headlab.sae import SparseAutoencoder
from headlab.surgeon.files import write_json


def tokens_per_second(step, batches, repeats: int) -> list[float]:
    step(batches[0])  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x in batches:
            step(x)
        rates.append(sum(x.shape[0] for x in batches) / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--expansions", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/sae_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    batches = [torch.randn(args.batch, args.d_in) for _ in range(args.steps)]
    rows = []
    saelens_note = None
    for expansion in args.expansions:
        d_sae = expansion * args.d_in
        sae = SparseAutoencoder(args.d_in, d_sae, "topk", args.k, 9)
        steps = {"dense": dense_step(sae, args.k), "headlab": headlab_step(sae, args.k)}
        saelens, saelens_note = saelens_step(args.d_in, d_sae, args.k, "cpu")
        if saelens is not None:
            steps["saelens"] = saelens
        row = {"d_in": args.d_in, "d_sae": d_sae, "k": args.k, "batch": args.batch}
        for name, step in steps.items():
            row[f"{name}_tokens_per_s"] = statistics.median(tokens_per_second(step, batches, args.repeats))
        row["speedup"] = row["headlab_tokens_per_s"] / row["dense_tokens_per_s"]
        if saelens is not None:
            row["speedup_vs_saelens"] = row["headlab_tokens_per_s"] / row["saelens_tokens_per_s"]
        rows.append(row)
        print(", ".join(f"{key} {value:.6g}" for key, value in row.items()), flush=True)
    write_json(args.out, {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "saelens": saelens_note, "rows": rows})


if __name__ == "__main__":
    main()
