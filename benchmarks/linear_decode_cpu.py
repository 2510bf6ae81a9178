"""CPU benchmark: decoding cost vs context length, converted (hybrid, head-level hybrids, plain linear)
vs original softmax, measured side by side.

A random-weight model with SmolLM2-135M's exact config (30 layers, 9 query / 3 KV heads, head dim 64)
is converted without training: memory and time per token do not depend on the trained values (nor on
which heads stay softmax, so the head-level hybrids keep uniformly spaced KV heads). For each context
length N every model prefills N tokens with a cache, then greedily decodes ``--new`` tokens; we report
the median time per decoded token, its ratio to the original's at the same length, and the bytes the
cache holds after decoding (softmax: the KV cache, growing with N; converted: window keys plus the
state, flat; head-level hybrids: that plus the softmax heads' keys and values).

    python benchmarks/linear_decode_cpu.py --lengths 4096 16384 --out benchmarks/results/linear_decode_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from headlab.surgeon import model_directory
from headlab.surgeon.conversion.converted import convert
from headlab.core.files import write_json
from headlab.surgeon.conversion.selection import candidate_units, uniform_pick
from headlab.surgeon.conversion.settings import LinearSettings
from headlab.surgeon.kv_cache import cache_bytes


@torch.no_grad()
def decode(model, n_context: int, n_new: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, n_context), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    out = model(ids, use_cache=True)
    prefill = time.perf_counter() - started
    cache, token, times = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for _ in range(n_new):
        started = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - started)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return {"prefill_s": round(prefill, 3), "ms_per_token": round(1000 * statistics.median(times), 2),
            "cache_mib": round(cache_bytes(cache) / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--softmax-keep", type=float, nargs="+", default=[0.1, 0.25],
                        help="fractions of KV heads kept softmax in the head-level hybrids")
    parser.add_argument("--new", type=int, default=16, help="decoded tokens per length")
    parser.add_argument("--out", default="benchmarks/results/linear_decode_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_directory("smollm2-135m"))
    original = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    models = {"softmax (original)": original}
    for form in ("hybrid", "linear"):
        models[form] = convert(copy.deepcopy(original), LinearSettings(form=form))
    units = candidate_units(list(range(config.num_hidden_layers)), config.num_key_value_heads, "heads")
    for keep in args.softmax_keep:
        heads = tuple(sorted(uniform_pick(units, round(keep * len(units)))))
        models[f"hybrid, {len(heads)} of {len(units)} KV heads softmax"] = convert(
            copy.deepcopy(original), LinearSettings(softmax_heads=heads, layers=tuple(range(config.num_hidden_layers))))
    rows = []
    for n in args.lengths:
        base = None  # the original's row at this length (the first model)
        for name, model in models.items():
            row = {"model": name, "context": n, **decode(model, n, args.new)}
            base = base or row
            row["ms_per_token_vs_original"] = round(row["ms_per_token"] / base["ms_per_token"], 3)
            row["cache_vs_original"] = round(row["cache_mib"] / base["cache_mib"], 4)
            rows.append(row)
            print(row, flush=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "model": "SmolLM2-135M config, random weights", "new_tokens": args.new,
              "rows": rows}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
