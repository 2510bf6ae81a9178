"""Head-level hybrids on this CPU: which softmax heads keep a converted model's needle recall.

    python examples/head_hybrids.py --model smollm2-135m --work /tmp/head-hybrids --out examples/results
    python examples/head_hybrids.py --model smollm2-135m --work /tmp/head-hybrids --out examples/results \
        --lengths 256,512 --tag short      # the same conditions' checkpoints (resumed from --work), shorter prompts
    python examples/head_hybrids.py --model gemma3-270m --data text --steps 30,15 --tokens 512 --accumulation 2 \
        --work /tmp/head-hybrids --out examples/results

Every full-attention layer is converted to the LoLCATs hybrid (softmax over a 64-token window plus
Hedgehog linear attention; Gemma 3: its three global layers); stage 1 (attention transfer of every
head's feature maps) runs once.
Then, per condition, chosen KV heads (or whole layers) of the converted layers keep softmax attention
over the whole context, stage 2 (LoRA, next-token loss on chat conversations the original model
answered) trains the rest, and the condition is measured: held-out perplexity, and the recall gate
(needle recall inside, just outside and far from the window at --lengths tokens, with 95% intervals
and paired intervals against the original model on the same prompts). Conditions (rule, unit,
budget): heads by the report's retrieval score, random heads (the control), heads by greedy KL to the
original model, uniformly spaced layers, layers by greedy KL, and no softmax head at all.

Stage 1 is shared: its transfer loss trains each head's feature maps from that head's output alone,
so which heads later stay softmax changes only the loss's averaging (``headlab convert`` with a
static rule leaves the softmax heads out of it). Each condition's stage 2 starts from the same
stage-1 weights. Results land in ``--out/head_hybrids_MODEL.json`` after every condition (a rerun
skips the conditions already there), with each condition's recall against the random control of its
budget, paired by prompt (``against_random``; ``--summarize`` adds it to a results file alone).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from headlab.core.files import write_json
from headlab.core.head_scores import load_scores_file
from headlab.core.text import TextWindows
from headlab.probes.validation.recall_gate import RecallGate, by_distance
from headlab.surgeon import load_model
from headlab.surgeon.conversion.converted import convert, converted_layers
from headlab.surgeon.conversion.data import training_windows
from headlab.surgeon.conversion.pipeline import cache_record
from headlab.surgeon.conversion.selection import (KL_RULE, kl_selection, next_token_log_probs, softmax_choice,
                                                  use_softmax_heads)
from headlab.surgeon.conversion.settings import ConversionSettings
from headlab.surgeon.conversion.support import convertible_layers
from headlab.surgeon.conversion.training import (add_lora, run_stage, stage1_parameters, transfer_loss,
                                                 transfer_mode)
from headlab.surgeon.losses import heldout_loss, next_token_loss

CONDITIONS = {  # name: (rule, unit, fraction of the converted layers' KV heads or layers)
    "smollm2-135m": {  # 30 converted layers of 3 KV heads
        "retrieval heads 25%": ("retrieval", "heads", 0.25),
        "random heads 25%": ("random", "heads", 0.25),
        "kl heads 25%": ("kl", "heads", 0.25),
        "no softmax heads": (None, "heads", 0.0),
        "uniform layers 10%": ("uniform", "layers", 0.1),
        "kl layers 10%": ("kl", "layers", 0.1),
        "retrieval heads 10%": ("retrieval", "heads", 0.1),
        "random heads 10%": ("random", "heads", 0.1),
    },
    "gemma3-270m": {  # 3 converted global layers of one KV head (the 15 sliding-window layers stay softmax)
        "retrieval heads 1 of 3": ("retrieval", "heads", 1 / 3),
        "kl heads 1 of 3": ("kl", "heads", 1 / 3),
        "random heads 1 of 3": ("random", "heads", 1 / 3),
        "no softmax heads": (None, "heads", 0.0),
    },
}
SCORES = {"smollm2-135m": "examples/results/report_smollm2_scores.json",
          "gemma3-270m": "examples/results/report_gemma3_scores.json"}


def perplexity(model, windows) -> float:
    return math.exp(heldout_loss(model, windows, True, "perplexity"))


def against_control(result: dict) -> None:
    """Each condition's recall gate summarised again from its per-prompt runs, against the original
    (``bins``) and against the random condition of the same budget (``against_random``: the condition
    minus the control), paired by prompt, per distance bin."""
    conditions = result["conditions"]
    original = result["original"]["gate"]
    original["terrace"] = True  # the hybrid's default window, which every condition uses
    original["bins"] = by_distance(original["runs"], original["distances"], original["window"])
    for record in conditions.values():
        gate = record["gate"]
        gate["terrace"] = True
        gate["bins"] = by_distance(gate["runs"], gate["distances"], gate["window"], original["runs"])
    for name, record in conditions.items():
        control = next((other for other_name, other in conditions.items() if other["rule"] == "random"
                        and other["unit"] == record["unit"] and other["keep"] == record["keep"]), None)
        if control is None or record is control:
            continue
        gate = record["gate"]
        record["against_random"] = by_distance(gate["runs"], gate["distances"], gate["window"], control["gate"]["runs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(SCORES))
    parser.add_argument("--work", default="/tmp/head-hybrids", help="folder for training state and chat data")
    parser.add_argument("--out", default="examples/results", help="folder for the results JSON")
    parser.add_argument("--steps", default="60,20", help="stage-1 steps (shared), stage-2 steps (per condition)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per training window")
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--lengths", default="1024,2048", help="recall-gate prompt lengths")
    parser.add_argument("--conditions", default=None, help="conditions to run, in order (default: all of the model's)")
    parser.add_argument("--tag", default="", help="appended to the results file's name (head_hybrids_MODEL_TAG.json)")
    parser.add_argument("--summarize", action="store_true", help="only add the paired comparisons with the random "
                                                                      "control to the results file")
    parser.add_argument("--data", default="chat", choices=("chat", "text"), help="training data (text: for a model "
                                                                               "without a chat template)")
    args = parser.parse_args()
    path = Path(args.out) / f"head_hybrids_{args.model.split('-')[0]}{'_' + args.tag if args.tag else ''}.json"
    if args.summarize:
        result = json.loads(path.read_text())
        against_control(result)
        write_json(path, result)
        return
    steps1, steps2 = (int(x) for x in args.steps.split(","))
    settings = ConversionSettings(data=args.data, steps=(steps1, steps2), accumulation=args.accumulation,
                                  eval_every=10, text=TextWindows(windows=4, tokens=args.tokens))
    work = Path(args.work) / args.model
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    layers = convertible_layers(model)
    linear = settings.linear_settings(tuple(layers))
    stage1, stage2 = settings.stages()
    train, held_out = training_windows(model, tokenizer, settings, max(steps1, steps2) * args.accumulation, work)
    train_ids, val_ids = torch.cat(train), torch.cat(held_out)
    result = json.loads(path.read_text()) if path.exists() else {}
    gate = RecallGate(linear.window, [int(x) for x in args.lengths.split(",")], 6)
    if "original" not in result:
        started = time.perf_counter()
        measured = gate(model, tokenizer)
        result = {"model": args.model, "settings": vars(args), "threads": torch.get_num_threads(),
                  "converted_layers": layers, "window": linear.window, "conditions": {},
                  "original": {"perplexity": perplexity(model, held_out), "gate": measured,
                               "seconds": round(time.perf_counter() - started, 1)}}
        write_json(path, result)
    else:
        gate.original = result["original"]["gate"]["runs"]
    target = next_token_log_probs(model, train[:settings.kl_windows])  # chosen on training data, not held out
    convert(model, linear)
    started = time.perf_counter()
    with transfer_mode(model, stage1.loss) as converted:
        summary1 = run_stage("stage1", model, stage1_parameters(model),
                             lambda ids: transfer_loss(model, ids, converted, stage1.loss_scale),
                             train_ids, val_ids, stage1, work)
    result["stage1"] = {**summary1, "wall_s": round(time.perf_counter() - started, 1)}
    after_stage1 = {name: value.clone() for name, value in model.state_dict().items()}
    scores = load_scores_file(SCORES[args.model], None)
    conditions = CONDITIONS[args.model]
    for name in args.conditions.split(",") if args.conditions else conditions:
        if name in result["conditions"]:
            continue
        rule, unit, keep = conditions[name]
        model.load_state_dict(after_stage1)
        started = time.perf_counter()
        record = {"rule": rule, "unit": unit, "keep": keep}
        if rule is None:
            heads = ()
        else:
            choice = softmax_choice(ConversionSettings(softmax=rule, softmax_unit=unit, softmax_keep=keep),
                                    model.config, layers, scores)
            record.update(count=choice.count, candidates=choice.candidates)
            if rule == KL_RULE:
                heads, record["kl_trace"] = kl_selection(model, choice.count, unit, train[:settings.kl_windows], target)
            else:
                heads = choice.heads
        chosen = use_softmax_heads(model, heads)
        record.update(heads=[list(h) for h in heads], cache=cache_record(model.config, chosen, 4096),
                      perplexity_after_stage1=perplexity(model, held_out))
        torch.manual_seed(settings.seed)  # every condition's adapters start from the same draw
        peft_model = add_lora(model, stage2)
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        record["stage2"] = run_stage("stage2", peft_model, params, lambda ids: next_token_loss(peft_model, ids),
                                     train_ids, val_ids, stage2, work / name.replace(" ", "-").replace("%", ""))
        merged = peft_model.merge_and_unload()
        record["perplexity"] = perplexity(merged, held_out)
        record["gate"] = gate(merged, tokenizer)
        record["wall_s"] = round(time.perf_counter() - started, 1)
        result["conditions"][name] = record
        against_control(result)
        write_json(path, result)
        recall = {bin_: row["recalled"]["mean"] for bin_, row in record["gate"]["bins"].items()}
        print(name, f"perplexity {record['perplexity']:.2f}", recall, flush=True)
        model = merged
        assert sorted(converted_layers(model)) == layers


if __name__ == "__main__":
    main()
