"""NVIDIA kvpress side by side with headlab: kvpress' presses on headlab's held-out needle prompts at
headlab's budgets, scored as headlab scores them.

kvpress 0.5.5 needs transformers < 5.3 and headlab 5.23, so kvpress runs in its own environment
(``.venv-kvpress``, built by ``bash scripts/setup.sh --tests``) as a subprocess
(``benchmarks/kvpress_side.py``, which imports nothing of headlab). This script, run with headlab's
``.venv/bin/python``:

1. loads the model through headlab and saves it once (safetensors, ``save_pretrained`` of model and
   tokenizer) under ``<out folder>/.cache/kvpress-side/<model>/checkpoint``, where kvpress' transformers
   loads the same weights;
2. builds headlab's prompts (``needle_grid`` over the held-out haystack and ``HELDOUT_NEEDLES``) and
   decodes each greedily in headlab (prefill of all tokens but the last, then greedy decoding from the
   last, headlab's stop rule) as the reference the uncompressed kvpress run must reproduce;
3. writes the prompts (token ids, where the question starts, answer, needle, depth) to JSON and runs the
   kvpress side on them: every press at every budget (the fraction of the compressed prefill's cache
   kept; ``compression_ratio = 1 - budget``) in two modes, ``agnostic`` (the context compressed, the
   question fed after) and ``aware`` (the whole prompt but its last token compressed), plus the
   uncompressed baseline ``none``;
4. scores each response with headlab's ROUGE-1 recall (recalled when above 0.5) and writes one JSON
   with the settings, both environments' versions, the machine, the per-prompt values and, per
   (mode, press, budget), the recall with its 95% bootstrap interval and the mean kept fraction (the
   cache entries not masked after the compressed prefill over the uncompressed prefill's; also over the
   compressed layers alone, and counting what the tensors hold, which head-wise presses keep whole).

On Gemma 3 (sliding-window layers beside global ones) the kvpress side hooks the global layers only,
as kvpress does for ``Gemma3ForConditionalGeneration`` (for the text-only ``Gemma3ForCausalLM`` it
would hook every layer), feeds the question of the agnostic mode one token at a time (one chunk would
see its later tokens in the compressed layers: see ``kvpress_side.py``) and gives the global layers'
``rotary_emb`` the layer type that ExpectedAttentionPress does not pass.

DuoAttentionPress runs with the streaming mask of ``--duo-mask`` (a JSON list of ``[layer, kv_head]``
pairs kept whole; every other KV head streams with ``--duo-sinks`` first and ``--duo-window`` latest
prefill positions, headlab's streaming defaults); its kept fraction follows from the mask, so it runs
once per mode (budget null), not at each budget.

    .venv/bin/python benchmarks/kvpress_side_by_side.py --model smollm2-135m
    .venv/bin/python benchmarks/kvpress_side_by_side.py --model smollm2-135m --needles 1 --depths 0.5 \\
        --budgets 0.35 --length 1024 --presses SnapKVPress,KnormPress --out /tmp/kvpress_quick.json

A killed run resumes: the kvpress side keeps each finished run beside its output and skips it when the
same settings run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KVPRESS_PYTHON = ROOT / ".venv-kvpress" / "bin" / "python"
SIDE = Path(__file__).resolve().parent / "kvpress_side.py"
FORMAT = "headlab-kvpress-side-by-side/1"
PRESSES = ("StreamingLLMPress", "SnapKVPress", "ExpectedAttentionPress", "AdaKVPress", "KnormPress", "TOVAPress",
           "DuoAttentionPress")
MODES = ("agnostic", "aware")
MAX_NEW_TOKENS = 32
ROUGE_MIN = 0.5  # headlab's NeedleSettings.rouge_min
RESAMPLES = 2000  # as headlab's compression evaluation
SEED = 0
# A run's kept fractions: its cache entries after the compressed prefill over the baseline's (press none,
# same prompt and mode): not masked / held in the tensors, over all layers / over the compressed layers
# (all but the sliding-window layers, which kvpress leaves alone).
FRACTIONS = {"kept_fraction": "entries_unmasked", "tensor_fraction": "entries_tensor",
             "kept_fraction_compressed_layers": "entries_unmasked_compressed",
             "tensor_fraction_compressed_layers": "entries_tensor_compressed"}


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="kvpress 0.5.5's presses side by side with headlab on headlab's held-out needle prompts "
                    "(kvpress runs in .venv-kvpress; see the module docstring).")
    parser.add_argument("--model", default="smollm2-135m",
                        help="headlab model spec: smollm2-135m (default), gemma3-270m")
    parser.add_argument("--length", type=int, default=2048,
                        help="prompt length in tokens, chat template included (default: 2048)")
    parser.add_argument("--needles", type=int, default=6,
                        help="held-out needles, at most len(HELDOUT_NEEDLES) = 6 (default: 6)")
    parser.add_argument("--depths", type=floats, default="0.1,0.3,0.5,0.7,0.9",
                        help="needle depths, comma-separated (default: 0.1,0.3,0.5,0.7,0.9)")
    parser.add_argument("--budgets", type=floats, default="0.25,0.35,0.5",
                        help="fractions of the compressed prefill's cache kept, compression_ratio = 1 - budget "
                             "(default: 0.25,0.35,0.5)")
    parser.add_argument("--presses", type=names, default=None,
                        help=f"comma-separated, of {', '.join(PRESSES)} (AdaKVPress is AdaKVPress(SnapKVPress())); "
                             "default: all but DuoAttentionPress, and it too with --duo-mask; 'none' always runs")
    parser.add_argument("--modes", type=names, default="agnostic,aware",
                        help="agnostic (context compressed, question fed after) and/or aware (the question "
                             "compressed too) (default: agnostic,aware)")
    parser.add_argument("--duo-mask", help="JSON list of [layer, kv_head] pairs kept whole, for DuoAttentionPress")
    parser.add_argument("--duo-sinks", type=int, default=None,
                        help="first tokens a DuoAttention streaming head keeps (default: headlab's, 4)")
    parser.add_argument("--duo-window", type=int, default=None,
                        help="latest prefill positions a DuoAttention streaming head keeps (default: headlab's, 256)")
    parser.add_argument("--out", help="result JSON (default: benchmarks/results/kvpress_<model>.json)")
    parser.add_argument("--limit", type=int, help="only the first N prompts (a quick check)")
    args = parser.parse_args(argv)
    if args.presses is None:
        args.presses = [p for p in PRESSES if p != "DuoAttentionPress" or args.duo_mask]
    bad = [p for p in args.presses if p not in PRESSES and p != "none"]
    if bad:
        parser.error(f"unknown presses {bad}; known: {', '.join(PRESSES)}")
    args.presses = [p for p in args.presses if p != "none"]
    if "DuoAttentionPress" in args.presses and not args.duo_mask:
        parser.error("DuoAttentionPress needs --duo-mask")
    if args.duo_mask and not Path(args.duo_mask).is_file():
        parser.error(f"--duo-mask {args.duo_mask} is not a file")
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes takes {', '.join(MODES)}")
    if not args.budgets or any(not 0 < b < 1 for b in args.budgets):
        parser.error("--budgets lie in (0, 1)")
    if not args.depths or any(not 0 <= d <= 1 for d in args.depths):
        parser.error("--depths lie in [0, 1]")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit is at least 1")
    args.out = Path(args.out or ROOT / "benchmarks" / "results" / f"kvpress_{Path(args.model).name}.json")
    return args


def check_output(path: Path) -> None:
    """Refuse a ``path`` that exists and is not this benchmark's output."""
    if not path.exists():
        return
    try:
        ours = json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise SystemExit(f"{path} exists and is not this benchmark's output (format {FORMAT}); "
                         "move it away or give another --out")


def n_conditions(presses: list[str], budgets: list[float]) -> int:
    """Runs per prompt and mode: the baseline, each press at each budget, DuoAttention once."""
    return 1 + sum(1 if p == "DuoAttentionPress" else len(budgets) for p in presses)


def save_checkpoint(model, tokenizer, spec: str, folder: Path) -> Path:
    """``folder/checkpoint``: the model and tokenizer as headlab loaded them, written once."""
    import transformers

    target = folder / "checkpoint"
    marker = target / "headlab_source.json"
    source = {"spec": spec, "transformers": transformers.__version__,
              "parameters": sum(p.numel() for p in model.parameters())}
    if marker.exists() and json.loads(marker.read_text()) == source:
        return target
    from headlab.core.files import atomic_directory

    if target.exists():
        import shutil

        shutil.rmtree(target)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "headlab_source.json").write_text(json.dumps(source))
    return target


def stop_ids(tokenizer) -> dict:
    """headlab's stop rule (:func:`headlab.probes.scorers.retrieval.stop_rule`) as token ids."""
    from headlab.probes.scorers.retrieval import has_chat_template

    ends = {i for i in (getattr(tokenizer, "eos_token_id", None),) if i is not None}
    vocab = tokenizer.get_vocab()
    ends.update(i for t, i in vocab.items() if t in ("<|im_end|>", "<|endoftext|>", "</s>", "<end_of_turn>", "<eos>"))
    newlines = set() if has_chat_template(tokenizer) else {
        tokenizer(text, add_special_tokens=False).input_ids[-1] for text in ("\n", "\n\n")}
    return {"end_ids": sorted(ends), "newline_ids": sorted(newlines)}


def headlab_reference(model, tokenizer, prompts) -> list[dict]:
    """headlab's uncompressed greedy decoding of each prompt: generated ids, response, seconds."""
    from tqdm.auto import tqdm

    from headlab.probes.scorers.retrieval import greedy_with_top_keys, stop_rule

    stop, out = stop_rule(tokenizer), []
    for prompt in tqdm(prompts, desc="headlab reference", unit="prompt"):
        started = time.perf_counter()
        generated, _ = greedy_with_top_keys(model, prompt.input_ids, MAX_NEW_TOKENS, stop, record=False)
        out.append({"generated": generated, "response": tokenizer.decode(generated, skip_special_tokens=True).strip(),
                    "seconds": round(time.perf_counter() - started, 4)})
    return out


def summarize(runs: list[dict], seed: int = SEED) -> list[dict]:
    """Per (mode, press, budget): prompts, recall with its bootstrap interval, ROUGE-1, the mean kept
    fraction (unmasked entries / the baseline's) and its tensor counterpart, seconds, errors."""
    import numpy as np

    from headlab.probes.intervals import mean_interval

    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["mode"], run["press"], run["budget"]), []).append(run)
    rows = []
    for (mode, press, budget), group in groups.items():
        ok = [r for r in group if "error" not in r]
        row = {"mode": mode, "press": press, "label": group[0]["label"], "budget": budget,
               "prompts": len(ok), "errors": len(group) - len(ok)}
        if ok:
            recalled = np.array([r["recalled"] for r in ok], dtype=float)
            row.update({"recall": float(recalled.mean()), "recall_ci": mean_interval(recalled, RESAMPLES, seed),
                        "rouge1_recall": float(np.mean([r["rouge1_recall"] for r in ok])),
                        **{name: float(np.mean([r[name] for r in ok])) for name in FRACTIONS},
                        "seconds": float(np.mean([r["seconds"] for r in ok]))})
            if press == "none":
                row["matches_headlab"] = sum(r["matches_headlab"] for r in ok)
        else:
            row["error"] = group[0]["error"]
        rows.append(row)
    return rows


def score(side_runs: list[dict], prompts: list[dict], reference: list[dict], tokenizer) -> list[dict]:
    """Each kvpress run scored as headlab scores a response (decoded with headlab's tokenizer)."""
    from headlab.probes.scorers.retrieval import rouge1_recall

    baseline = {(r["prompt"], r["mode"]): r for r in side_runs if r["press"] == "none" and "error" not in r}
    out = []
    for run in side_runs:
        run = dict(run)
        prompt = prompts[run["prompt"]]
        if "error" not in run:
            response = tokenizer.decode(run["generated"], skip_special_tokens=True).strip()
            recall = rouge1_recall(response, prompt["answer"])
            run["response_kvpress_tokenizer"] = run.pop("response")
            run.update({"response": response, "rouge1_recall": round(recall, 4), "recalled": recall > ROUGE_MIN})
            full = baseline.get((run["prompt"], run["mode"]))
            for name, entries in FRACTIONS.items():
                run[name] = run[entries] / full[entries] if full else None
            if run["press"] == "none":
                run["matches_headlab"] = run["generated"] == reference[run["prompt"]]["generated"]
        out.append(run)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    check_output(args.out)
    if not KVPRESS_PYTHON.exists():
        raise SystemExit(f"{KVPRESS_PYTHON} is missing: bash scripts/setup.sh --tests builds it")
    import torch
    import transformers

    import headlab
    from headlab.core.files import write_json
    from headlab.core.text import load_text
    from headlab.probes.scorers.needles import HELDOUT_NEEDLES
    from headlab.probes.scorers.retrieval import needle_grid
    from headlab.surgeon import load_model
    from headlab.surgeon.streaming.settings import STREAM_SINKS, STREAM_WINDOW

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import cpu_model

    if not 1 <= args.needles <= len(HELDOUT_NEEDLES):
        raise SystemExit(f"--needles is between 1 and {len(HELDOUT_NEEDLES)}")
    duo_sinks = STREAM_SINKS if args.duo_sinks is None else args.duo_sinks
    duo_window = STREAM_WINDOW if args.duo_window is None else args.duo_window
    transformers.utils.logging.disable_progress_bar()  # one bar per weight while loading and saving
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    work = args.out.parent / ".cache" / "kvpress-side" / Path(args.model).name
    checkpoint = save_checkpoint(model, tokenizer, args.model, work)
    prompts = needle_grid(tokenizer, load_text(None, heldout=True), HELDOUT_NEEDLES[:args.needles], [args.length],
                          args.depths)[:args.limit]
    per_prompt = n_conditions(args.presses, args.budgets) * len(args.modes)
    print(f"{len(prompts)} prompts x ({len(args.presses)} presses x {len(args.budgets)} budgets"
          f"{', DuoAttention once' if 'DuoAttentionPress' in args.presses else ''} + the baseline) x "
          f"{len(args.modes)} modes = {len(prompts) * per_prompt} kvpress runs of {args.length} tokens, "
          f"and {len(prompts)} headlab reference decodings", flush=True)
    reference = headlab_reference(model, tokenizer, prompts)
    records = [{"input_ids": p.input_ids[0].tolist(), "question_start": p.question_start, "answer": p.needle.answer,
                "needle": HELDOUT_NEEDLES.index(p.needle), "depth": p.depth, "length": p.length} for p in prompts]
    stops = stop_ids(tokenizer)
    del model
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps({"prompts": records, "stops": stops}))
    side_out = work / f"kvpress_runs_{args.length}.json"
    command = [str(KVPRESS_PYTHON), str(SIDE), "--prompts", str(prompts_file), "--model-dir", str(checkpoint),
               "--out", str(side_out), "--presses", ",".join(args.presses),
               "--budgets", ",".join(map(str, args.budgets)), "--modes", ",".join(args.modes),
               "--max-new-tokens", str(MAX_NEW_TOKENS), "--duo-sinks", str(duo_sinks), "--duo-window", str(duo_window)]
    if args.duo_mask:
        command += ["--duo-mask", str(Path(args.duo_mask).resolve())]
    side_started = time.perf_counter()
    done = subprocess.run(command)
    if done.returncode != 0:
        raise SystemExit(f"the kvpress side failed (exit {done.returncode}): {' '.join(command)}")
    side = json.loads(side_out.read_text())
    runs = score(side["runs"], records, reference, tokenizer)
    result = {
        "format": FORMAT,
        "command": " ".join([Path(sys.executable).name, "benchmarks/kvpress_side_by_side.py", *(argv or sys.argv[1:])]),
        "settings": {"model": args.model, "length": args.length, "needles": args.needles, "depths": args.depths,
                     "budgets": args.budgets, "presses": args.presses, "modes": args.modes,
                     "max_new_tokens": MAX_NEW_TOKENS, "rouge_min": ROUGE_MIN, "resamples": RESAMPLES, "seed": SEED,
                     "limit": args.limit, "duo_mask": args.duo_mask, "duo_sinks": duo_sinks, "duo_window": duo_window,
                     "stops": stops},
        "budget_meaning": "fraction of the compressed prefill's cache kept (compression_ratio = 1 - budget); "
                          "agnostic: the prefill is the context, aware: the whole prompt but its last token",
        "versions": {"headlab": {"headlab": headlab.__version__, "transformers": transformers.__version__,
                                 "torch": torch.__version__},
                     "kvpress": side["versions"]},
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
                    "platform": platform.platform()},
        "kvpress_model_class": side["model_class"], "compressed_layers": side["compressed_layers"],
        "prompts": [{k: v for k, v in r.items() if k != "input_ids"} | {"tokens": len(r["input_ids"]),
                    "headlab_response": reference[i]["response"], "headlab_generated": reference[i]["generated"],
                    "headlab_seconds": reference[i]["seconds"]} for i, r in enumerate(records)],
        "runs": runs,
        "summary": summarize(runs),
        "seconds": {"total": round(time.perf_counter() - started, 1),
                    "kvpress_side": round(time.perf_counter() - side_started, 1)},
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    for row in result["summary"]:
        recall = "error: " + row["error"] if "error" in row else (
            f"recall {row['recall']:.2f} [{row['recall_ci'][0]:.2f}, {row['recall_ci'][1]:.2f}]  "
            f"kept {row['kept_fraction']:.3f} (compressed layers {row['kept_fraction_compressed_layers']:.3f}, "
            f"tensors {row['tensor_fraction']:.3f})  {row['seconds']:.1f} s/prompt"
            + (f"  same as headlab {row['matches_headlab']}/{row['prompts']}" if row["press"] == "none" else ""))
        print(f"{row['mode']:9} {row['label']:26} {'' if row['budget'] is None else row['budget']:>5}  {recall}")


if __name__ == "__main__":
    main()
