"""A TopK autoencoder on a middle layer of SmolLM2-135M, trained on this machine's CPU.

    python examples/sae_smollm2.py --work /tmp/sae-smollm2 --out examples/results

Trains with ``headlab sae train`` (Python standard-library docstrings, first token excluded),
evaluates on held-out windows, writes the feature dashboard of the most frequent latents, and
summarises into ``--out/sae_smollm2.json``: the metrics, tokens, wall time and the heads the
strongest latents attribute to (decoder-norm share). The weights stay in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from headlab.cli import main as headlab
from headlab.sae import decoder_head_shares, load_sae
from headlab.core.files import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/sae-smollm2", help="folder for the weights and checkpoints")
    parser.add_argument("--out", default="examples/results", help="folder for the summary and dashboard")
    parser.add_argument("--layers", type=int, default=15, help="the layer encoded")
    parser.add_argument("--train-tokens", type=int, default=150_000)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    start = time.perf_counter()
    code = headlab(["sae", "train", "smollm2-135m", "--layers", str(args.layers), "--arch", "topk", "--k", str(args.k),
                    "--expansion", str(args.expansion), "--train-tokens", str(args.train_tokens), "--out", str(work)])
    if code:
        raise SystemExit(code)
    train_s = time.perf_counter() - start
    headlab(["sae", "dashboard", str(work), "--top", "6", "--windows", "24", "--out", str(work / "dashboard.html")])
    shutil.copy(work / "dashboard.html", out / "sae_smollm2_dashboard.html")
    sae, config = load_sae(work)
    metrics = json.loads((work / "metrics.json").read_text())
    shares = decoder_head_shares(sae)
    strength = sae.W_enc.norm(dim=0) * sae.W_dec.norm(dim=1)
    strongest = strength.topk(10).indices.tolist()
    summary = {
        "model": "smollm2-135m", "layer": args.layers, "hook_name": config["metadata"]["hook_name"],
        "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k, "metrics": metrics,
        "tokens_trained": config["headlab"]["provenance"]["tokens_trained"],
        "wall_s_train_and_eval": round(train_s, 1),
        "strongest_latents": [{"latent": i, "top_heads": [[h, round(s, 3)] for s, h in
                                                          zip(*[t.tolist() for t in shares[i].topk(2)])]}
                              for i in strongest],
        "mean_share_of_top_head": shares.max(1).values.mean().item(),
        "latents_by_dominant_head": torch.bincount(shares.argmax(1), minlength=sae.n_heads).tolist(),
    }
    print(write_json(out / "sae_smollm2.json", summary))


if __name__ == "__main__":
    main()
