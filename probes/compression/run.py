"""The evaluation of KV-cache compression by streaming heads: for each selection rule (a score's
ranking, RazorAttention's echo ∪ induction, random heads as the control) and each kept fraction of
KV heads, the plan of :mod:`headlab.surgeon.streaming.rules` is measured on

- needle recall on held-out prompts of each length (every held-out needle at every depth), decoded
  greedily on the streaming cache (:func:`~headlab.surgeon.streaming.cache.streaming_cache`), which holds
  only what each head sees;
- perplexity on held-out text windows of each length;
- the KV-cache bytes held after each prompt.

The unedited model is measured the same way (rule ``full``). Recall intervals are 95% bootstrap
intervals over the prompts; the random rule's per-prompt value is the mean over its draws.

A checkpoint converted to linear attention is measured the same way, as it is (rule ``converted``),
against the model it was converted from (rule ``full``): :func:`conversion_runs` and
:func:`conversion_result`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ...core.errors import HeadlabError, ModelSpecError
from ...core.head_scores import HeadScores
from ...core.journal import Journal
from ...core.text import load_text, token_windows
from ...surgeon import Plan, attach, model_shape
from ...surgeon.compression.press import KVPress
from ...surgeon.compression.settings import PressSettings
from ...surgeon.losses import next_token_loss
from ...surgeon.sites import announcing_layers
from ...surgeon.streaming.rules import candidates, full_kv_heads, rule_ranking, streaming_plan
from ...surgeon.streaming.settings import StreamingSettings
from ..intervals import mean_interval
from ..scorers.long_tasks import LONG_TASKS, TaskPrompt, task_prompts
from ..scorers.needles import HELDOUT_NEEDLES, NEEDLES
from ..scorers.retrieval import (NeedlePrompt, Status, answer_stop, needle_grid, rouge1_recall,
                                 stop_rule)
from .file import COMPRESSION_FORMAT, CONVERTED, FULL
from .decoding import decoded
from .pressing import check_budgets, press_settings, press_window_loss
from .settings import PROGRESS_FILE, CompressionSettings

STREAMING_ONLY = ("rules", "keeps", "random_sets", "sinks", "window", "compensate", "scorers", "budgets",
                  "allocations", "hybrids", "modes", "press_window")  # not for a converted checkpoint
RESAMPLES = 2000


def conditions(shape, scores: dict[str, HeadScores] | None, settings: CompressionSettings,
               layer_types: list[str] | None = None, model_id: str | None = None, config=None) -> list[dict]:
    """Every measured condition: ``{"rule", "keep", "draw", "plan", "press", "full_heads"}`` (a plan of
    streaming heads, or a press whose ``keep`` is its budget), the unedited model first. Raises before
    any model work when a rule's scores are missing or (given the model's ``config``) a press's budget
    does not fit at a length."""
    unknown = [task for task in settings.tasks if task not in LONG_TASKS]
    if unknown:
        raise HeadlabError(f"unknown long task(s) {', '.join(unknown)} (--tasks: {', '.join(LONG_TASKS)})")
    out = [{"rule": FULL, "keep": 1.0, "draw": None, "plan": Plan(), "press": None,
            "full_heads": len(candidates(shape, layer_types))}]
    short = [length for length in settings.lengths if length <= settings.sinks + settings.window]
    if settings.rules and short:
        raise HeadlabError(f"--lengths {', '.join(map(str, short))}: not longer than the {settings.sinks} sinks and "
                           f"{settings.window}-position window streaming heads keep, so every streaming condition "
                           "would equal the full model; give longer lengths or a smaller --window")
    for rule in settings.rules:
        for draw in range(settings.random_sets if rule == "random" else 1):
            ranking = rule_ranking(rule, scores, shape, layer_types, settings.seed + draw)
            for keep in settings.keeps:
                stream = StreamingSettings(keep=keep, sinks=settings.sinks, window=settings.window,
                                           compensate=settings.compensate)
                out.append({"rule": rule, "keep": keep, "draw": draw if rule == "random" else None,
                            "plan": streaming_plan(ranking, shape, stream, model_id), "press": None,
                            "full_heads": len(full_kv_heads(ranking, keep)[0])})
    presses = press_settings(settings)

    def whole_heads(press: PressSettings) -> int:
        if not press.whole:
            return 0
        return len(full_kv_heads(rule_ranking(press.rule, scores, shape, layer_types, press.seed), press.whole)[0])

    for label, press in presses:
        if press.rule is not None:
            rule_ranking(press.rule, scores, shape, layer_types, press.seed)  # its scores are there
        out.append({"rule": label, "keep": press.budget, "draw": None, "plan": None, "press": press,
                    "full_heads": whole_heads(press)})
    if config is not None:
        check_budgets(config, [press for _, press in presses], settings.lengths, whole_heads)
    return out


def needle_run(model, tokenizer, prompt: NeedlePrompt, condition: Plan | KVPress, settings: CompressionSettings,
               stop, status: Status | None = None) -> dict:
    """One needle prompt under ``condition`` (a plan on its streaming cache, or a press): the response's
    ROUGE-1 recall, whether it counts as recalled, and the cache's bytes after the prompt. ``status``
    hears the prefill (layer by layer) and each decoding step as they start."""
    response, kv_bytes = decoded(model, tokenizer, prompt.input_ids, prompt.question_start, condition,
                                 settings.max_new_tokens, answer_stop(tokenizer, stop, prompt.needle.answer), status)
    recall = rouge1_recall(response, prompt.needle.answer)
    return {"recalled": float(recall > settings.rouge_min), "rouge1_recall": recall, "kv_bytes": kv_bytes,
            "response": response}


def task_run(model, tokenizer, prompt: TaskPrompt, condition: Plan | KVPress, stop,
             status: Status | None = None) -> dict:
    """One long-task prompt under ``condition``: the response's score (the fraction of the answers it
    holds), the cache's bytes after the prompt and the response."""
    def done(generated: list[int]) -> bool:  # the score cannot fall as the response grows
        return stop(generated) or prompt.score(tokenizer.decode(generated, skip_special_tokens=True)) == 1

    response, kv_bytes = decoded(model, tokenizer, prompt.input_ids, prompt.question_start, condition,
                                 LONG_TASKS[prompt.task].max_new_tokens, done, status)
    return {"task": prompt.task, "depth": prompt.depth, "score": prompt.score(response), "kv_bytes": kv_bytes,
            "response": response}


@torch.no_grad()
def window_loss(model, window: torch.Tensor, plan: Plan) -> float:
    """Mean next-token cross-entropy (nats) of ``window [1, n]`` under ``plan``."""
    with attach(model, plan):
        return float(next_token_loss(model, window))


def run_key(rule: str, keep: float, draw: int | None, length: int) -> str:
    """A run's key in an evaluation's :class:`~headlab.core.journal.Journal`."""
    return json.dumps([rule, keep, draw, length])


def streaming_identity(measured: list[dict], settings: CompressionSettings, model_id: str | None) -> dict:
    """What an evaluation of streaming heads measures, for its journal."""
    return {"kind": "streaming", "model_id": model_id, "settings": dataclasses.asdict(settings),
            "conditions": [[c["rule"], c["keep"], c["draw"], c["plan"].to_dict() if c["press"] is None else
                            dataclasses.asdict(c["press"])] for c in measured]}


def evaluate_compression(model, tokenizer, scores: dict[str, HeadScores] | None,
                         settings: CompressionSettings | None = None, model_id: str | None = None,
                         progress: bool = True, journal_path: str | Path | None = None) -> dict:
    """Measure every condition at every length (see the module docstring); returns the JSON-ready
    result with per-prompt values and the summary per rule, kept fraction and length. With
    ``journal_path`` each finished run is kept there and a run found there is not measured again
    (:class:`~headlab.core.journal.Journal`)."""
    settings = settings or CompressionSettings()
    shape = model_shape(model)
    layer_types = _layer_types(model)
    measured = conditions(shape, scores, settings, layer_types, model_id, model.config)
    journal = Journal(journal_path, streaming_identity(measured, settings, model_id), "compression")
    inputs = _inputs(tokenizer, settings)  # every length's, so that a length too long fails before any run
    stop = stop_rule(tokenizer)
    runs = []
    bar = _bar(settings, len(measured), "compression", progress)
    for length, (prompts, windows, tasks) in inputs.items():
        for condition in measured:
            label = f"{length} tokens, {condition['rule']} keep {condition['keep']:.0%}"
            bar.set_postfix_str(label)
            key = run_key(condition["rule"], condition["keep"], condition["draw"], length)
            run = journal.get(key)
            if run is None:
                run = journal.put(key, {"rule": condition["rule"], "keep": condition["keep"], "draw": condition["draw"],
                                        "full_heads": condition["full_heads"], "length": length,
                                        **_measure(model, tokenizer, _bound(model, condition, scores), prompts,
                                                   windows, settings, stop, bar, label, tasks)})
            else:
                bar.update(len(prompts) + len(windows) + len(tasks))
            runs.append(run)
    bar.close()
    return {"format": COMPRESSION_FORMAT, "kind": "streaming", "model_id": model_id,
            "settings": dataclasses.asdict(settings), "kv_heads": len(candidates(shape, layer_types)),
            "items": _items(settings),
            "runs": runs, "summary": summarize_runs(runs, settings.seed)}


def conversion_identity(settings: CompressionSettings, model_id: str | None, base_id: str | None) -> dict:
    """What an evaluation of a converted checkpoint measures, for its journal."""
    return {"kind": "conversion", "model_id": model_id, "base_model": base_id, "settings": _recorded(settings)}


def conversion_runs(model, tokenizer, rule: str, settings: CompressionSettings | None = None,
                    progress: bool = True, journal: Journal | None = None) -> list[dict]:
    """The runs of ``model`` as it is (no plan) at every length of ``settings``, named ``rule``
    (``"converted"`` for a checkpoint converted to linear attention, ``"full"`` for its base): the
    same prompts, windows and measures as :func:`evaluate_compression`. Its ``keep`` is the fraction
    of the global layers' KV heads that keep the whole context: those of unconverted layers and the
    softmax heads of converted ones (the converted heads keep a state and a window). Runs ``journal``
    holds are taken from it."""
    from ...surgeon.conversion.converted import converted_layers

    settings = settings or CompressionSettings()
    heads = candidates(model_shape(model), _layer_types(model))
    converted = converted_layers(model)
    whole = [head for head in heads if head[0] not in converted or head[1] in converted[head[0]].softmax_kv]
    inputs = _inputs(tokenizer, settings)
    stop = stop_rule(tokenizer)
    journal = Journal(None, {}, "compression") if journal is None else journal
    keep = len(whole) / len(heads) if heads else 1.0
    runs = []
    bar = _bar(settings, 1, "base model" if rule == FULL else f"{rule} model", progress)
    for length, (prompts, windows, tasks) in inputs.items():
        bar.set_postfix_str(f"{length} tokens")
        key = run_key(rule, keep, None, length)
        run = journal.get(key)
        if run is None:
            run = journal.put(key, {"rule": rule, "keep": keep, "draw": None, "full_heads": len(whole),
                                    "length": length,
                                    **_measure(model, tokenizer, Plan(), prompts, windows, settings, stop, bar,
                                               f"{length} tokens", tasks)})
        else:
            bar.update(len(prompts) + len(windows) + len(tasks))
        runs.append(run)
    bar.close()
    return runs


def conversion_base(checkpoint: str, base: str | None, read_config: Callable) -> str | None:
    """The model the converted ``checkpoint`` is measured against: ``base``, else the one its conversion
    recorded; None for ``"none"``. Checked from the configs alone (``read_config(spec, needs)``, which
    refuses what is not a causal language model) before any weight is read: the same shape and
    vocabulary size as the checkpoint, and not converted itself."""
    from ...core.shape import model_shape
    from ...surgeon.conversion.converted import is_converted_directory, read_conversion

    named = base if base is not None else read_conversion(checkpoint)[1].get("base_model")
    if named is None:
        raise ModelSpecError(f"{checkpoint} does not record the model it was converted from: give --base MODEL (or "
                             "--base none to measure the checkpoint alone)")
    if named == "none":
        return None
    config = read_config(checkpoint, "needle recall and perplexity")
    try:
        base_config = read_config(named, "the base of a converted checkpoint")
    except ModelSpecError as error:
        if base is not None:
            raise
        raise ModelSpecError(f"the base model {checkpoint} records, {named!r}, cannot be read ({error}); give --base "
                             "MODEL or --base none") from None
    if Path(named).is_dir() and is_converted_directory(named):
        raise ModelSpecError(f"--base {named} is itself converted to linear attention; give the softmax model")
    mismatch = [what for what, a, b in (("shape", model_shape(config), model_shape(base_config)),
                                        ("vocabulary size", config.get_text_config(decoder=True).vocab_size,
                                         base_config.get_text_config(decoder=True).vocab_size)) if a != b]
    if mismatch:
        raise ModelSpecError(f"--base {named} differs from {checkpoint} in {' and '.join(mismatch)}; give the model "
                             "it was converted from")
    return named


def evaluate_conversion(checkpoint: str, base: str | None, settings: CompressionSettings | None = None,
                        journal_path: str | Path | None = None, max_memory: str | None = None) -> dict:
    """The evaluation of a checkpoint converted to linear attention against its ``base`` (None: the
    checkpoint alone): each loaded alone, in turn, and measured by :func:`conversion_runs` on the same
    prompts and windows (tokenised by the checkpoint's tokenizer, which convert saved from the base);
    ``max_memory`` caps the base's weights in memory. Finished runs are kept in the journal at
    ``journal_path`` and taken from it when the same evaluation is run again."""
    import gc

    from ...surgeon import load_model

    settings = settings or CompressionSettings()
    journal = Journal(journal_path, conversion_identity(settings, checkpoint, base), "compression")
    model, tokenizer = load_model(checkpoint)
    if tokenizer is None:
        raise ModelSpecError(f"{checkpoint} has no tokenizer files; its evaluation needs its tokenizer")
    kv_heads = len(candidates(model_shape(model), _layer_types(model)))
    runs = conversion_runs(model, tokenizer, CONVERTED, settings, journal=journal)
    if base is not None:
        del model
        gc.collect()
        runs += conversion_runs(load_model(base, max_memory=max_memory)[0], tokenizer, FULL, settings, journal=journal)
    return conversion_result(runs, settings, kv_heads, checkpoint, base)


def conversion_result(runs: list[dict], settings: CompressionSettings, kv_heads: int, model_id: str | None = None,
                      base_id: str | None = None) -> dict:
    """The JSON-ready evaluation of a converted checkpoint (``model_id``) against its base
    (``base_id``; None: not measured) from their :func:`conversion_runs`; ``kv_heads`` counts the
    base's global KV heads. The streaming-only settings are left out of its record."""
    return {"format": COMPRESSION_FORMAT, "kind": "conversion", "model_id": model_id, "base_model": base_id,
            "settings": _recorded(settings), "kv_heads": kv_heads, "items": _items(settings), "runs": runs,
            "summary": summarize_runs(runs, settings.seed)}


def _recorded(settings: CompressionSettings) -> dict:
    """The settings a converted checkpoint's evaluation records: all but the streaming-only ones."""
    return {name: value for name, value in dataclasses.asdict(settings).items() if name not in STREAMING_ONLY}


def _layer_types(model) -> list[str] | None:
    return getattr(model.config.get_text_config(decoder=True), "layer_types", None)


def _inputs(tokenizer, settings: CompressionSettings) -> dict[int, tuple[list[NeedlePrompt], list[torch.Tensor],
                                                                         list[TaskPrompt]]]:
    """``{length: (needle prompts, text windows, long-task prompts)}``: every needle at every depth, the
    perplexity windows and ``task_prompts`` prompts of every long task, of every length."""
    heldout = settings.split == "heldout"
    haystack = load_text(settings.text_path, heldout=heldout)
    needles = HELDOUT_NEEDLES if heldout else NEEDLES
    return {length: (needle_grid(tokenizer, haystack, needles[:settings.n_needles], [length], settings.depths,
                                 settings.prompt_style),
                     token_windows(tokenizer, haystack, settings.windows, length, settings.seed),
                     [prompt for task in settings.tasks for prompt in
                      task_prompts(tokenizer, haystack, task, length, settings.task_prompts, settings.seed + heldout,  # other keys than the selection split's
                                   settings.prompt_style)])
            for length in settings.lengths}


def _items(settings: CompressionSettings) -> list[dict]:
    """Which needle and depth each prompt of a length is, in the order of the runs' ``needles``."""
    return [{"needle": needle, "depth": depth} for needle in range(settings.n_needles) for depth in settings.depths]


def _bar(settings: CompressionSettings, conditions: int, desc: str, progress: bool):
    """A progress bar over every prompt and window of ``conditions`` conditions at every length."""
    per_length = settings.n_needles * len(settings.depths) + settings.windows + len(settings.tasks) * settings.task_prompts
    return tqdm(total=conditions * per_length * len(settings.lengths), desc=desc, unit="input", disable=not progress)


def _bound(model, condition: dict, scores: dict[str, HeadScores] | None) -> Plan | KVPress:
    """A condition's plan, or its press bound to ``model``."""
    return condition["plan"] if condition["press"] is None else KVPress(model, condition["press"], scores)


def _measure(model, tokenizer, plan: Plan | KVPress, prompts: list[NeedlePrompt], windows,
             settings: CompressionSettings, stop, bar, label: str = "", tasks: list[TaskPrompt] = ()) -> dict:
    """``{"needles", "losses", "tasks", "seconds"}`` of ``model`` under ``plan`` (a plan or a press) on
    one length's inputs, advancing ``bar`` by one per prompt and window; its postfix, ``label`` and
    what runs now."""
    loss_of = press_window_loss if isinstance(plan, KVPress) else window_loss
    started = time.perf_counter()
    needles, losses = [], []
    label = f"{label}, " if label else ""
    shown = None if bar.disable else bar.set_postfix_str
    for number, prompt in enumerate(prompts, 1):
        needle = f"{label}needle prompt {number} of {len(prompts)}"
        needles.append(needle_run(model, tokenizer, prompt, plan, settings, stop,
                                  None if shown is None else lambda text: shown(f"{needle}: {text}")))
        bar.update(1)
    for number, window in enumerate(windows, 1):
        with announcing_layers(model, shown, f"{label}perplexity window {number} of {len(windows)}"):
            losses.append(loss_of(model, window, plan))
        bar.update(1)
    answered = []
    for number, prompt in enumerate(tasks, 1):
        what = f"{label}{prompt.task} prompt {number} of {len(tasks)}"
        answered.append(task_run(model, tokenizer, prompt, plan, stop,
                                 None if shown is None else lambda text: shown(f"{what}: {text}")))
        bar.update(1)
    return {"needles": needles, "losses": losses, "tasks": answered, "seconds": time.perf_counter() - started}


def summarize_runs(runs: list[dict], seed: int = 0) -> list[dict]:
    """Per (rule, keep, length): recall mean and interval, ROUGE-1, perplexity, KV bytes (mean over
    prompts, and as a fraction of the unedited model's), wall seconds; the draws of a rule pooled."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["rule"], run["keep"], run["length"]), []).append(run)
    full_bytes = {run["length"]: np.mean([n["kv_bytes"] for n in run["needles"]]) for run in runs
                  if run["rule"] == FULL}
    rows = []
    for (rule, keep, length), draws in groups.items():
        recalled = np.mean([[n["recalled"] for n in d["needles"]] for d in draws], axis=0)  # per prompt
        kv_bytes = float(np.mean([n["kv_bytes"] for d in draws for n in d["needles"]]))
        loss = float(np.mean([x for d in draws for x in d["losses"]]))
        rows.append({"rule": rule, "keep": keep, "length": length, "draws": len(draws),
                     "full_heads": draws[0]["full_heads"], "recall": float(recalled.mean()),
                     "recall_ci": mean_interval(recalled, RESAMPLES, seed),
                     "rouge1_recall": float(np.mean([n["rouge1_recall"] for d in draws for n in d["needles"]])),
                     "loss": loss, "perplexity": math.exp(loss), "kv_bytes": kv_bytes,
                     "kv_fraction": kv_bytes / full_bytes[length] if length in full_bytes else None,
                     "seconds": float(sum(d["seconds"] for d in draws)), **_task_summary(draws, seed)})
    return rows


def _task_summary(draws: list[dict], seed: int) -> dict:
    """``{"tasks": {task: {"score", "score_ci"}}}`` of runs that measured long tasks (the draws' mean per
    prompt, a 95% bootstrap interval over the prompts); empty otherwise."""
    names = list(dict.fromkeys(answer["task"] for answer in draws[0].get("tasks", ())))
    if not names:
        return {}
    out = {}
    for name in names:
        per_prompt = np.mean([[a["score"] for a in d["tasks"] if a["task"] == name] for d in draws], axis=0)
        out[name] = {"score": float(per_prompt.mean()), "score_ci": mean_interval(per_prompt, RESAMPLES, seed)}
    return {"tasks": out}


__all__ = ["PROGRESS_FILE", "STREAMING_ONLY", "conditions", "conversion_base", "conversion_identity",
           "conversion_result", "conversion_runs", "evaluate_compression", "evaluate_conversion", "needle_run", "run_key",
           "streaming_identity", "summarize_runs", "window_loss"]
