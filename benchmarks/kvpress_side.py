"""The kvpress side of ``kvpress_side_by_side.py``: runs in kvpress' own environment (``.venv-kvpress``,
built by ``scripts/setup.sh --tests``; kvpress 0.5.5 needs transformers < 5.3) and imports nothing of
headlab. It reads the prompts the driver wrote (token ids, where the question starts, the stop tokens),
loads the checkpoint the driver saved, and for every prompt, mode, press and budget decodes greedily on
the compressed cache:

- ``agnostic``: the press compresses the context's cache (``input_ids[:question_start]``); the question
  part but its last token is then fed uncompressed, and decoding starts from the last token (what
  kvpress' pipeline does with a separate ``question``);
- ``aware``: the press compresses the prefill of the whole prompt but its last token (the question is
  inside the compressed cache); decoding starts from the last token.

Positions continue from the uncompressed lengths (as the pipeline passes ``position_ids``). Press
``none`` is the uncompressed baseline. After the compressed prefill the cache's entries (one per layer,
KV head and position) are counted twice: what the tensors hold, and what is not masked (AdaKV and
DuoAttention keep the full tensors and mask entries with fake keys during decoding). Each finished run
is appended to ``<out>.partial.jsonl``; a rerun with the same settings skips the runs found there.

A model with sliding-window layers (Gemma 3) has only its global layers compressed, as kvpress does for
``Gemma3ForConditionalGeneration`` (:func:`compressing`). There the agnostic mode feeds the question one
token at a time: in one chunk after a compressed prefill its causal mask would come from the positions
of the (uncompressed) first layer while the compressed layers hold fewer entries, so in those layers
every question token would see the ones after it (kvpress' pipeline does this; on a tiny random Gemma 3
the chunk's logits then differ from token-by-token feeding by ~0.06, with no press by ~1e-7).

    .venv-kvpress/bin/python benchmarks/kvpress_side.py --prompts P.json --model-dir DIR --out OUT.json \\
        --presses SnapKVPress,KnormPress --budgets 0.25,0.5 --modes agnostic,aware
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

PRESSES = ("StreamingLLMPress", "SnapKVPress", "ExpectedAttentionPress", "AdaKVPress", "KnormPress", "TOVAPress",
           "DuoAttentionPress")
LABELS = {"AdaKVPress": "AdaKVPress(SnapKVPress())"}
MODES = ("agnostic", "aware")
FORMAT = "headlab-kvpress-side/1"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prompts", required=True, help="prompts JSON written by kvpress_side_by_side.py")
    parser.add_argument("--model-dir", required=True, help="checkpoint folder (save_pretrained of model and tokenizer)")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--presses", default=",".join(PRESSES[:-1]),
                        help=f"comma-separated, of {', '.join(PRESSES)} (AdaKVPress is AdaKVPress(SnapKVPress())); "
                             "the baseline 'none' always runs")
    parser.add_argument("--budgets", default="0.25,0.35,0.5",
                        help="fractions of the compressed prefill's cache kept (compression_ratio = 1 - budget)")
    parser.add_argument("--modes", default="agnostic,aware", help="agnostic and/or aware")
    parser.add_argument("--duo-mask", help="JSON list of [layer, kv_head] pairs kept whole (DuoAttentionPress)")
    parser.add_argument("--duo-sinks", type=int, default=4, help="first tokens a DuoAttention streaming head keeps")
    parser.add_argument("--duo-window", type=int, default=256,
                        help="latest prefill positions a DuoAttention streaming head keeps")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def make_press(name: str, budget: float | None, duo: dict | None):
    """The kvpress press ``name`` keeping ``budget`` of the cache (None for ``none``)."""
    import kvpress

    if name == "none":
        return None
    if name == "DuoAttentionPress":
        return fixed_duo(duo)
    ratio = round(1 - budget, 10)
    if name == "AdaKVPress":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    return getattr(kvpress, name)(compression_ratio=ratio)


def fixed_duo(duo: dict):
    """DuoAttentionPress with a given streaming mask: kvpress 0.5.5 keeps its head pattern in
    ``streaming_mask`` (``[layers, kv_heads]`` bool, True = streaming), ``sink_size`` and
    ``recent_size``, set by ``post_init_from_model`` from the DuoAttention repository (a download)
    or from BookSum on the fly; here they are set directly and ``post_init_from_model`` does nothing."""
    import torch
    from kvpress import DuoAttentionPress

    class FixedDuoAttentionPress(DuoAttentionPress):
        def post_init_from_model(self, model):
            pass

    press = FixedDuoAttentionPress()
    press.sink_size, press.recent_size = duo["sinks"], duo["window"]
    press.streaming_mask = torch.tensor(duo["streaming"], dtype=torch.bool)
    return press


def load_duo(path: str, config, sinks: int, window: int) -> dict:
    pairs = json.loads(Path(path).read_text())
    if isinstance(pairs, dict):
        pairs = pairs.get("full_kv_heads", pairs.get("kv_heads"))
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        sys.exit(f"{path}: expected a JSON list of [layer, kv_head] pairs kept whole")
    streaming = [[True] * kv_heads for _ in range(layers)]
    for layer, head in pairs:
        if not (0 <= layer < layers and 0 <= head < kv_heads):
            sys.exit(f"{path}: [{layer}, {head}] is outside the model's {layers} layers x {kv_heads} KV heads")
        streaming[layer][head] = False
    return {"streaming": streaming, "sinks": sinks, "window": window, "full": sorted(map(tuple, pairs))}


def sliding_layers(model) -> list[int]:
    types = getattr(model.config, "layer_types", None) or []
    return [i for i, t in enumerate(types) if t != "full_attention"]


def decoder(model):
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


@contextmanager
def compressing(press, model):
    """``with press(model)``; on a model with sliding-window layers (a text-only Gemma 3, which
    kvpress' ``BasePress.__call__`` would hook whole: it skips the sliding layers of
    ``Gemma3ForConditionalGeneration`` only) the same hooks on the full-attention layers alone, and
    their ``rotary_emb`` (which ExpectedAttentionPress calls as ``rotary_emb(x, position_ids)``) given
    the ``layer_type="full_attention"`` that Gemma 3's rotary embedding needs in transformers 5.x."""
    if press is None:
        yield
        return
    skipped = set(sliding_layers(model))
    if not skipped:
        with press(model):
            yield
        return
    press.post_init_from_model(model)
    language_model = decoder(model)
    hooks = []
    try:
        for index, layer in enumerate(language_model.layers):
            if index in skipped:
                continue
            layer.self_attn.rotary_emb = full_attention_rotary(language_model.rotary_emb)
            # (kvpress sets language_model.rotary_emb itself; ExpectedAttentionPress then fails on Gemma 3)
            hooks.append(layer.self_attn.register_forward_hook(press.forward_hook, with_kwargs=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()


def full_attention_rotary(rotary):
    """``rotary`` called with ``layer_type="full_attention"`` where its ``forward`` takes a layer type
    (a module, so that it can replace the ``rotary_emb`` that an earlier ``press(model)`` set as a
    submodule); else ``rotary`` itself."""
    import inspect

    import torch

    if "layer_type" not in inspect.signature(rotary.forward).parameters:
        return rotary

    class FullAttentionRotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rotary = rotary

        def forward(self, x, position_ids):
            return self.rotary(x, position_ids, layer_type="full_attention")

    return FullAttentionRotary()


def held_entries(cache, model) -> dict:
    """The cache's entries (batch x KV heads x positions, summed over layers): what the tensors hold
    (``entries_tensor``) and what a head-wise press did not mask (``entries_unmasked``;
    ``masked_key_indices`` of the attention modules), over all layers and over the layers a press
    compresses (``*_compressed``: all but the sliding-window layers)."""
    sliding = set(sliding_layers(model))
    out = dict.fromkeys(("entries_tensor", "entries_unmasked", "entries_tensor_compressed",
                         "entries_unmasked_compressed"), 0)
    for index, layer in enumerate(cache.layers):
        keys = layer.keys
        count = keys.shape[0] * keys.shape[1] * keys.shape[2] if keys is not None and keys.dim() == 4 else 0
        masked = getattr(decoder(model).layers[index].self_attn, "masked_key_indices", None)
        unmasked = count - (0 if masked is None else int(masked[0].numel()))
        for suffix in ("", "_compressed") if index not in sliding else ("",):
            out["entries_tensor" + suffix] += count
            out["entries_unmasked" + suffix] += unmasked
    return out


def run_one(model, ids: list[int], question_start: int, press, mode: str, stops: dict, max_new_tokens: int,
            tokenizer) -> dict:
    import torch
    from transformers import DynamicCache

    tokens = torch.tensor([ids])
    prefill = question_start if mode == "agnostic" else len(ids) - 1
    for layer in decoder(model).layers:
        layer.self_attn.masked_key_indices = None
    started = time.perf_counter()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with compressing(press, model):
            decoder(model)(input_ids=tokens[:, :prefill], past_key_values=cache, use_cache=True)
        prefill_seconds = time.perf_counter() - started
        entries = held_entries(cache, model)
        if prefill < len(ids) - 1:  # agnostic: the question but its last token, uncompressed
            # With sliding-window layers (uncompressed) beside compressed global layers, one chunk would get
            # the positions of the sliding layers' length while the global layers hold fewer entries: the
            # causal mask inside the chunk would then let the question's tokens see the ones after them.
            # One token at a time needs no mask within the chunk.
            step = 1 if sliding_layers(model) and press is not None else len(ids) - 1 - prefill
            for first in range(prefill, len(ids) - 1, step):
                last = min(first + step, len(ids) - 1)
                decoder(model)(input_ids=tokens[:, first:last], past_key_values=cache, use_cache=True,
                               position_ids=torch.arange(first, last)[None])
        generated: list[int] = []
        token, position = tokens[:, -1:], len(ids) - 1
        for _ in range(max_new_tokens):
            logits = model(input_ids=token, past_key_values=cache, use_cache=True,
                           position_ids=torch.tensor([[position]]), logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            generated.append(int(token))
            position += 1
            if stopped(generated, stops, tokenizer):
                break
    seconds = time.perf_counter() - started
    response = None if tokenizer is None else tokenizer.decode(generated, skip_special_tokens=True)
    return {"generated": generated, "response": response, "prefill_tokens": prefill, **entries,
            "seconds": round(seconds, 4), "prefill_seconds": round(prefill_seconds, 4)}


def stopped(generated: list[int], stops: dict, tokenizer) -> bool:
    """headlab's stop rule: an end token; without a chat template also a newline once the response
    holds text."""
    last = generated[-1]
    if last in stops["end_ids"]:
        return True
    if last in stops.get("newline_ids", []):
        if tokenizer is None:
            return True
        return bool(tokenizer.decode(generated, skip_special_tokens=True).strip())
    return False


def versions() -> dict:
    import kvpress  # noqa: F401
    import torch
    import transformers
    from importlib.metadata import version

    return {"kvpress": version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}


def main(argv=None) -> None:
    args = parse_args(argv)
    presses = [p for p in args.presses.split(",") if p and p != "none"]
    unknown = [p for p in presses if p not in PRESSES]
    if unknown:
        sys.exit(f"unknown presses {unknown}; known: {', '.join(PRESSES)}")
    if "DuoAttentionPress" in presses and not args.duo_mask:
        sys.exit("DuoAttentionPress needs --duo-mask")
    budgets = [float(b) for b in args.budgets.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes) or any(not 0 < b < 1 for b in budgets):
        sys.exit("modes are agnostic/aware; budgets lie in (0, 1)")

    import torch
    import kvpress  # noqa: F401  (patches the attention functions for the head-wise presses)
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight while loading

    data = json.loads(Path(args.prompts).read_text())
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    except (OSError, ValueError):
        tokenizer = None
    duo = load_duo(args.duo_mask, model.config, args.duo_sinks, args.duo_window) if args.duo_mask else None

    conditions = [("none", None)] + [(p, None if p == "DuoAttentionPress" else b) for p in presses
                                     for b in (budgets if p != "DuoAttentionPress" else [None])]
    identity = {"prompts": data["prompts"], "model_dir": str(Path(args.model_dir).resolve()),
                "max_new_tokens": args.max_new_tokens, "duo": duo}
    partial = Path(str(args.out) + ".partial.jsonl")
    done = _journal(partial, identity)
    runs = []
    todo = [(i, mode, press, budget) for i in range(len(data["prompts"])) for mode in modes
            for press, budget in conditions]
    bar = tqdm(total=len(todo), desc="kvpress", unit="run", disable=args.no_progress, file=sys.stderr)
    with partial.open("a") as journal:
        for index, mode, name, budget in todo:
            key = json.dumps([index, mode, name, budget])
            if key in done:
                runs.append(done[key])
                bar.update()
                continue
            prompt = data["prompts"][index]
            bar.set_postfix_str(f"prompt {index + 1}, {mode}, {name} {'' if budget is None else budget}")
            record = {"prompt": index, "mode": mode, "press": name, "label": LABELS.get(name, name),
                      "budget": budget, "compression_ratio": None if budget is None else round(1 - budget, 10)}
            try:
                press = make_press(name, budget, duo)
                record.update(run_one(model, prompt["input_ids"], prompt["question_start"], press, mode,
                                      data["stops"], args.max_new_tokens, tokenizer))
                if name == "DuoAttentionPress":
                    record["compression_ratio"] = press.compression_ratio_
            except Exception as err:  # a press that cannot run on this model: say why, go on
                record["error"] = f"{type(err).__name__}: {err}"
            runs.append(record)
            journal.write(json.dumps({"key": key, "run": record}) + "\n")
            journal.flush()
            bar.update()
    bar.close()
    out = {"format": FORMAT, "versions": versions(), "model_class": type(model).__name__,
           "compressed_layers": [i for i in range(model.config.num_hidden_layers) if i not in sliding_layers(model)],
           "duo": duo, "runs": runs}
    tmp = Path(str(args.out) + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, args.out)


def _journal(path: Path, identity: dict) -> dict:
    """The runs already in ``path`` when its first line is ``identity``; else a new journal."""
    header = json.dumps({"identity": identity}, sort_keys=True)
    if path.exists():
        lines = path.read_text().splitlines()
        if lines and lines[0] == header:
            done = {}
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    break
                done[entry["key"]] = entry["run"]
            path.write_text("\n".join([header] + [json.dumps({"key": k, "run": r}) for k, r in done.items()]) + "\n")
            return done
    path.write_text(header + "\n")
    return {}


if __name__ == "__main__":
    main()
