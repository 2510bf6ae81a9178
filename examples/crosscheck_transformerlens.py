"""Cross-check headlab's previous-token and induction scores against TransformerLens' head detector
run on a ``TransformerBridge`` of the same model.

    python examples/crosscheck_transformerlens.py --out examples/results

Writes ``--out/transformerlens_crosscheck.json`` with, over every head, the Spearman rank
correlation and the largest difference between:

* previous-token: headlab's report score (mean ``A[i, i-1]`` over rows ≥ 1) and
  TransformerLens' ``detect_head(bridge, text, "previous_token_head")`` ('mul' measure) on the same
  text windows (the bridge's BOS prepending off, so both see the same tokens);
* induction: headlab's report score (mean ``A[i, i-half+1]`` over the second copy of random tokens
  repeated twice) and TransformerLens' induction detection pattern scored by its
  ``compute_head_attention_similarity_score`` on the bridge's own attention patterns of the same
  token rows (``detect_head``'s body: it only takes text, and random ids do not survive a
  decode/encode round trip);
* the largest difference between headlab's attention maps and the bridge's ``hook_pattern``.

The two 'mul' measures divide by all rows (TransformerLens) or by the scored rows (headlab), so
values differ by a constant-ish factor; the rank correlation is the comparison.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr
from transformer_lens.head_detector import (
    compute_head_attention_similarity_score,
    detect_head,
    get_induction_head_detection_pattern,
)
from transformer_lens.model_bridge import TransformerBridge

from headlab.probes.scorers import importance
from headlab.core.text import load_text, token_windows
from headlab.probes.scorers.record import record_attention
from headlab.probes.scorers.patterns import pattern_scores
from headlab.surgeon import load_model, model_directory, model_shape
from headlab.core.files import write_json


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation over every head of two ``[layer, head]`` arrays."""
    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


def top_heads(scores: torch.Tensor, k: int = 5) -> list[str]:
    order = scores.flatten().argsort(descending=True)[:k]
    return [f"L{int(i) // scores.shape[1]}H{int(i) % scores.shape[1]}" for i in order]


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    return {"spearman": rank_correlation(ours, theirs), "max_abs_difference": float((ours - theirs).abs().max()),
            "top5_headlab": top_heads(ours), "top5_transformerlens": top_heads(theirs)}


def previous_token(model, tokenizer, bridge, windows) -> tuple[dict, float]:
    """Previous-token scores on text windows from both tools, and the largest map difference."""
    ours, theirs, largest = 0.0, 0.0, 0.0
    for ids in windows:
        text = tokenizer.decode(ids[0])
        if not torch.equal(bridge.to_tokens(text).cpu(), ids):
            raise RuntimeError("the bridge tokenised the text differently; cannot compare on the same tokens")
        maps = record_attention(model, ids).maps
        ours += pattern_scores(maps, causal=True)["previous_token"] / len(windows)
        theirs += detect_head(bridge, text, "previous_token_head") / len(windows)
        _, cache = bridge.run_with_cache(ids)
        for layer in range(maps.shape[0]):
            largest = max(largest, (cache["pattern", layer][0].float() - maps[layer]).abs().max().item())
    return compare(ours.double(), theirs.double()), largest


def induction(model, bridge, n_batch: int, half: int, seed: int) -> dict:
    """Induction scores on random tokens repeated twice: headlab's report score against
    TransformerLens' detection pattern and 'mul' measure on the bridge's patterns."""
    shape = model_shape(model)
    ours = importance.repeated_token_scores(model, n_batch, half, seed)["induction"]
    ids = importance.repeated_tokens(model.config.vocab_size, n_batch, half, seed)
    theirs = torch.zeros(shape.n_layers, shape.n_heads, dtype=torch.float64)
    for row in ids:
        tokens = row[None]
        pattern = get_induction_head_detection_pattern(tokens)
        _, cache = bridge.run_with_cache(tokens, remove_batch_dim=True)
        for layer in range(shape.n_layers):
            for head in range(shape.n_heads):
                theirs[layer, head] += compute_head_attention_similarity_score(
                    cache["pattern", layer][head].float(), pattern, exclude_bos=False, exclude_current_token=False,
                    error_measure="mul") / len(ids)
    return compare(ours.double(), theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="examples/results", help="folder for transformerlens_crosscheck.json")
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or local HF directory")
    parser.add_argument("--samples", type=int, default=4, help="text windows for previous-token (default 4)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per window (default 128)")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    bridge = TransformerBridge.boot_transformers(str(model_directory(args.model)), device="cpu")
    bridge.cfg.default_prepend_bos = False
    start = time.perf_counter()
    windows = token_windows(tokenizer, load_text(None), args.samples, args.tokens, seed=0)
    prev, largest = previous_token(model, tokenizer, bridge, windows)
    result = {
        "model": args.model,
        "transformer_lens": importlib.metadata.version("transformer-lens"),
        "previous_token": {**prev, "windows": args.samples, "tokens": args.tokens},
        "induction": {**induction(model, bridge, n_batch=10, half=50, seed=0), "n_batch": 10, "half": 50},
        "largest_attention_map_difference": largest,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(write_json(Path(args.out) / "transformerlens_crosscheck.json", result))
    for name in ("previous_token", "induction"):
        item = result[name]
        print(f"{name}: Spearman {item['spearman']:.4f}, max |difference| {item['max_abs_difference']:.3g}, "
              f"top-5 {item['top5_headlab']} vs {item['top5_transformerlens']}")
    print(f"largest attention-map difference {largest:.2e}")


if __name__ == "__main__":
    main()
