"""CPU benchmark of KV-cache presses on SmolLM2-135M-Instruct: the decode step under a budget against the
uncompressed step, and the peak memory of a generation, side by side in one run.

1. **Decode step** at ``--step-length`` tokens (default 16,384, past the model's 8,192 trained
   positions: the step's cost does not depend on that): the uncompressed cache (transformers'
   ``DynamicCache``, which copies itself every step, and headlab's ``reserved_cache``, which does not)
   against a press holding ``--step-budget`` of the cache (default 10%), each filled with random keys
   and values of that length (the step's cost does not depend on their values). The press runs its
   real decode path: a padded call over each head's positions and, every ``slack`` steps, a
   recompression scored by SnapKV. Steps alternate between the caches; the median of ``--steps``.
2. **Peak memory** of a ``--memory-length`` (default 4,096) token generation: a real prefill of that
   many tokens (only the last row's logits) then ``--new`` greedy tokens, once uncompressed and once
   per ``--memory-budgets`` press (SnapKV), each ``--repeats`` times in fresh processes, under glibc's
   default allocator and with its mmap threshold fixed; the median peak resident memory (the kernel's
   high-water mark, reset after loading the model) above the resident memory then, against the cache
   bytes the press drops.

    python benchmarks/kv_press_cpu.py --out benchmarks/results/kv_press_cpu.json
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

import torch

from headlab.core.files import write_json

MODEL = "smollm2-135m"


def rss_bytes() -> int:
    """The process's resident memory now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def reset_peak() -> None:
    """Start the kernel's peak resident memory (``VmHWM``) again from now (Linux ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def peak_bytes() -> int:
    """The peak resident memory since :func:`reset_peak` (``VmHWM`` of ``/proc/self/status``)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def filled_press_cache(press, length: int, shape) -> object:
    """A press cache whose every compressed head holds its budget's share of ``length`` random positions."""
    from headlab.surgeon.compression.cache import HeadStore

    cache = press.cache(length)
    keep = int(press.budget.per_head)
    generator = torch.Generator().manual_seed(0)
    for layer in press.layers:
        entry = cache.layers[layer]
        entry.dtype, entry.device, entry.is_initialized = torch.float32, torch.device("cpu"), True
        positions = torch.cat([torch.arange(4), torch.arange(length - keep + 4, length)])
        entry.heads = [HeadStore(torch.randn(keep, shape.head_dim, generator=generator),
                                 torch.randn(keep, shape.head_dim, generator=generator), positions.clone())
                       for _ in range(shape.n_kv_heads)]
        entry.before = [keep] * shape.n_kv_heads
        entry.length, entry.pending = length, None
        entry.recent_queries = torch.randn(1, shape.n_heads, 32, shape.head_dim, generator=generator)
        entry.recent_positions = torch.arange(length - 32, length)
    return cache


def filled_cache(cache, model, length: int, shape):
    """``cache`` with ``length`` random positions in every layer."""
    generator = torch.Generator().manual_seed(0)
    for layer in range(shape.n_layers):
        keys, values = (torch.randn(1, shape.n_kv_heads, length, shape.head_dim, generator=generator) for _ in range(2))
        cache.update(keys, values, layer)
    return cache


@torch.no_grad()
def decode_steps(args) -> dict:
    """Median decode-step seconds of the uncompressed caches and the press, alternating."""
    from headlab.surgeon import attach, load_model, model_shape
    from headlab.surgeon.compression import KVPress, PressSettings
    from headlab.surgeon.kv_cache import cache_bytes, reserved_cache
    from transformers.cache_utils import DynamicCache

    model, _ = load_model(MODEL)
    shape = model_shape(model)
    press = KVPress(model, PressSettings(scorer="snapkv", budget=args.step_budget))
    caches = {"dynamic": filled_cache(DynamicCache(config=model.config), model, args.step_length, shape),
              "reserved": filled_cache(reserved_cache(model, args.steps + 8), model, args.step_length, shape),
              "press": filled_press_cache(press, args.step_length, shape)}
    held = {name: cache_bytes(cache) for name, cache in caches.items()}
    token = torch.tensor([[42]])
    times = {name: [] for name in caches}
    for step in range(args.steps + 2):
        for name, cache in caches.items():
            started = time.perf_counter()
            if name == "press":
                with attach(model, compression=press):
                    model(input_ids=token, past_key_values=cache, use_cache=True)
            else:
                model(input_ids=token, past_key_values=cache, use_cache=True)
            if step >= 2:  # the first two warm up
                times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"length": args.step_length, "budget": args.step_budget, "steps": args.steps,
            "median_seconds": median, "cache_bytes": held,
            "press_over_dynamic": median["press"] / median["dynamic"],
            "press_over_reserved": median["press"] / median["reserved"]}


@torch.no_grad()
def one_generation(length: int, new: int, budget: float | None) -> dict:
    """In this process: load, note the resident memory, prefill ``length`` tokens and generate ``new``;
    the peak resident memory above the loaded model's, and the cache bytes after the prompt."""
    from headlab.surgeon import attach, load_model
    from headlab.surgeon.compression import KVPress, PressSettings
    from headlab.surgeon.kv_cache import cache_bytes

    model, _ = load_model(MODEL)
    ids = torch.randint(100, 40000, (1, length), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids[:, :8])  # allocator and kernels warm
    reset_peak()  # the loading's own peak (dequantising the weights) is not the generation's
    loaded = rss_bytes()
    press = None if budget is None else KVPress(model, PressSettings(scorer="snapkv", budget=budget))
    cache = None if press is None else press.cache(length)
    context = attach(model, compression=press) if press is not None else _nothing()
    with context:
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        held = cache_bytes(cache)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(new):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
    return {"budget": budget, "cache_bytes": held, "peak_above_loaded": peak_bytes() - loaded}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


ALLOCATORS = {"glibc default": {}, "glibc, mmap threshold fixed at 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def peak_memory(args) -> dict:
    """Each generation ``--repeats`` times in fresh processes, under glibc's default allocator and with its
    mmap threshold fixed (its dynamic threshold makes the peak vary from run to run); the median peak of
    each, and the press's saving in peak memory against the bytes it drops."""
    out = {}
    for allocator, env in ALLOCATORS.items():
        runs = []
        for budget in (None, *args.memory_budgets):
            command = [sys.executable, __file__, "--generation", json.dumps([args.memory_length, args.new, budget])]
            peaks = [json.loads(subprocess.run(command, check=True, capture_output=True, text=True,
                                               env={**os.environ, **env}).stdout) for _ in range(args.repeats)]
            runs.append({"budget": budget, "cache_bytes": peaks[0]["cache_bytes"],
                         "peaks_above_loaded": [p["peak_above_loaded"] for p in peaks],
                         "peak_above_loaded": statistics.median(p["peak_above_loaded"] for p in peaks)})
        full = runs[0]
        for run in runs[1:]:
            run["dropped_bytes"] = full["cache_bytes"] - run["cache_bytes"]
            run["peak_saved"] = full["peak_above_loaded"] - run["peak_above_loaded"]
            run["saved_over_dropped"] = run["peak_saved"] / run["dropped_bytes"]
        out[allocator] = runs
    return {"length": args.memory_length, "new_tokens": args.new, "repeats": args.repeats, "allocators": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-length", type=int, default=16384, help="cached positions of the decode-step timing")
    parser.add_argument("--step-budget", type=float, default=0.1, help="the press's budget in the step timing")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per cache")
    parser.add_argument("--memory-length", type=int, default=4096, help="prompt tokens of the memory measurement")
    parser.add_argument("--memory-budgets", type=float, nargs="+", default=[0.35, 0.1],
                        help="press budgets of the memory measurement")
    parser.add_argument("--new", type=int, default=32, help="tokens generated after the prompt")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per generation (the median peak)")
    parser.add_argument("--out", help="write the results here (JSON)")
    parser.add_argument("--generation", help=argparse.SUPPRESS)  # one generation, in a child process
    args = parser.parse_args()
    if args.generation:
        print(json.dumps(one_generation(*json.loads(args.generation))))
        return
    from machine import cpu_model

    print(f"decode steps at {args.step_length:,} cached positions, then {1 + len(args.memory_budgets)} generations of "
          f"{args.memory_length:,} + {args.new} tokens in fresh processes: a few minutes on two cores", flush=True)
    steps = decode_steps(args)
    print(f"decode step at {steps['length']:,} tokens: press ({steps['budget']:.0%}) {steps['median_seconds']['press']:.4f} s, "
          f"DynamicCache {steps['median_seconds']['dynamic']:.4f} s (ratio {steps['press_over_dynamic']:.2f}), "
          f"reserved {steps['median_seconds']['reserved']:.4f} s (ratio {steps['press_over_reserved']:.2f})", flush=True)
    memory = peak_memory(args)
    for allocator, runs in memory["allocators"].items():
        for run in runs[1:]:
            print(f"peak memory ({allocator}), budget {run['budget']:.0%}: saved {run['peak_saved'] / 2**20:.1f} MiB "
                  f"of the {run['dropped_bytes'] / 2**20:.1f} MiB dropped ({run['saved_over_dropped']:.2f})",
                  flush=True)
    result = {"machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__}, "model": MODEL, "decode_step": steps, "peak_memory": memory}
    if args.out:
        write_json(args.out, result)
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
