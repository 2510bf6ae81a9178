"""CPU benchmark: training throughput (tokens/s) of headlab's TopK trainer step against a plain
dense torch TopK autoencoder step, side by side in one run, on synthetic activations of
SmolLM2's head-output width (d_in 576).

Both take the same Adam step on the same batches; the dense baseline builds the ``B × d_sae``
code, decodes with a matmul and lets autograd differentiate the dense encoder; headlab's step
uses the sparse TopK ops (index-add encoder backward, embedding-bag decoder), the decoder-norm
constraint and gradient clipping.

    python benchmarks/sae_cpu.py --out benchmarks/results/sae_cpu.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from headlab.sae import SparseAutoencoder
from headlab.sae.training import TrainSettings, _loss
from headlab.surgeon.files import write_json


def dense_step(params, optimizer, x, k):
    w_enc, b_enc, w_dec, b_dec = params
    pre = F.relu((x - b_dec) @ w_enc + b_enc)
    values, indices = pre.topk(k, dim=-1)
    codes = torch.zeros_like(pre).scatter(1, indices, values)
    loss = (codes @ w_dec + b_dec - x).pow(2).sum(1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def headlab_step(sae, optimizer, x, settings):
    loss, _ = _loss(sae, x, settings, 1.0, torch.zeros(sae.d_sae, dtype=torch.bool))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_gradient()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    optimizer.step()
    sae.normalise_decoder()


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
    for expansion in args.expansions:
        d_sae = expansion * args.d_in
        sae = SparseAutoencoder(args.d_in, d_sae, "topk", args.k, 9)
        settings = TrainSettings(k=args.k)
        ours_opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        params = [p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
        dense_opt = torch.optim.Adam(params, lr=1e-4)
        dense = tokens_per_second(lambda x: dense_step(params, dense_opt, x, args.k), batches, args.repeats)
        ours = tokens_per_second(lambda x: headlab_step(sae, ours_opt, x, settings), batches, args.repeats)
        row = {"d_in": args.d_in, "d_sae": d_sae, "k": args.k, "batch": args.batch,
               "dense_tokens_per_s": statistics.median(dense), "headlab_tokens_per_s": statistics.median(ours)}
        row["speedup"] = row["headlab_tokens_per_s"] / row["dense_tokens_per_s"]
        rows.append(row)
        print(f"d_sae {d_sae:6d}: dense {row['dense_tokens_per_s']:8.0f} tok/s, headlab "
              f"{row['headlab_tokens_per_s']:8.0f} tok/s, x{row['speedup']:.2f}")
    write_json(args.out, {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
