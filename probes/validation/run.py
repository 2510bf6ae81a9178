"""Masking validation of a head score, as the retrieval-head paper tests its heads: mask the score's
top-K heads, and random sets of K heads matched by layer (:mod:`.masking`), and measure a task on
held-out data. The task is needle recall on held-out needles and haystacks (counting only the
prompts the unmasked model answers) or next-token loss on held-out text windows; the statistics
(:mod:`.statistics`) say whether the top-K heads matter more than random ones.

Needle measures per prompt: ``recalled`` (ROUGE-1 recall of the answer above the threshold),
``rouge1_recall`` and ``answer_logprob`` (mean log-probability of the answer's tokens as the
response, teacher-forced under the same masking). In the default ``uniform`` mode the masking acts
on decode steps only, so one unmasked prefill per prompt serves every masked condition.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ...core.head_scores import HeadScores
from ...core.journal import Journal
from ...core.text import load_text, token_windows
from ...surgeon import Plan, attach
from ...surgeon.kv_cache import reserved_cache
from ...surgeon.losses import next_token_loss
from ...surgeon.sites import announcing_layers
from ...surgeon.stopping import run_for_taps
from ..scorers.needles import HELDOUT_NEEDLES
from ..scorers.retrieval import (
    NeedlePrompt,
    Status,
    answer_stop,
    greedy_from_cache,
    has_chat_template,
    needle_grid,
    rouge1_recall,
    stop_rule,
)
from .file import CURVE_FORMAT
from .masking import head_means, masking_plan, random_sets, top_heads
from .settings import METRICS, MaskingSettings, ValidationSettings
from .statistics import summarize

RETRIEVAL_THRESHOLD = 0.1  # the paper's retrieval-head threshold: random sets exclude heads above it


@dataclass(frozen=True)
class Measure:
    """One per-item quantity of a task and which direction is better."""

    name: str
    higher_is_better: bool
    description: str


NEEDLE_MEASURES = (
    Measure("recalled", True, "fraction of answers whose ROUGE-1 recall exceeds the threshold"),
    Measure("rouge1_recall", True, "ROUGE-1 recall of the answer (Porter stemming)"),
    Measure("answer_logprob", True, "mean log-probability of the answer's tokens as the response (teacher-forced)"),
)
LOSS_MEASURES = (Measure("loss", False, "next-token cross-entropy of a held-out window (nats)"),)


class NeedleTask:
    """Needle recall on held-out prompts (the settings' grid, or ``prompts``); ``mode`` says how heads
    are masked."""

    measures = NEEDLE_MEASURES

    def __init__(self, model, tokenizer, settings: ValidationSettings, mode: str,
                 prompts: list[NeedlePrompt] | None = None):
        self.model, self.tokenizer, self.settings, self.mode = model, tokenizer, settings, mode
        if prompts is None:
            haystack = load_text(settings.text.text_path, heldout=True)
            prompts = needle_grid(tokenizer, haystack, HELDOUT_NEEDLES[:settings.n_needles], settings.needle_lengths,
                                  settings.needle_depths, settings.prompt_style)
        self.prompts = prompts
        self.stop = stop_rule(tokenizer)
        self.shared_prefill = mode == "uniform"  # the masking edits decode calls only

    def items(self) -> list[dict]:
        """What each prompt is (needle, length, depth)."""
        return [{"needle": HELDOUT_NEEDLES.index(p.needle), "length": p.length, "depth": p.depth} for p in self.prompts]

    def answer_ids(self, prompt: NeedlePrompt) -> torch.Tensor:
        """``[1, n]`` tokens of the answer as the response's start (a plain prompt ends ``Answer:``,
        so the answer follows a space there)."""
        text = prompt.needle.answer if has_chat_template(self.tokenizer) else " " + prompt.needle.answer
        return torch.tensor([self.tokenizer(text, add_special_tokens=False).input_ids])

    @torch.no_grad()
    def prefill(self, prompt: NeedlePrompt):
        """The cache of the prompt without its last token (the harness decodes from that one)."""
        cache = reserved_cache(self.model, self.settings.max_new_tokens + 1)
        return run_for_taps(self.model, input_ids=prompt.input_ids[:, :-1], past_key_values=cache,
                            use_cache=True).past_key_values

    @torch.no_grad()
    def evaluate(self, prompt: NeedlePrompt, plan: Plan | None, shared_cache=None,
                 status: Status | None = None) -> dict:
        """The measures of one prompt under ``plan`` (and the response); ``status`` hears each forward."""
        say = status or (lambda text: None)
        with (attach(self.model, plan) if plan is not None else nullcontext()) as session:
            if shared_cache is None:
                with announcing_layers(self.model, status, f"prefill of {prompt.input_ids.shape[1] - 1:,} tokens"):
                    cache = self.prefill(prompt)
            else:
                if session is not None:
                    session.resume(prompt.length - 1)
                cache = shared_cache
            say("the answer's log-probability")
            logprob = self._answer_logprob(prompt, copy.deepcopy(cache))
            generated = greedy_from_cache(self.model, copy.deepcopy(cache), prompt.input_ids[:, -1:],
                                          self.settings.max_new_tokens, self._stop_for(prompt), status=status)
        response = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        recall = rouge1_recall(response, prompt.needle.answer)
        return {"recalled": float(recall > self.settings.rouge_min), "rouge1_recall": recall,
                "answer_logprob": logprob, "response": response}

    def _stop_for(self, prompt: NeedlePrompt):
        """The stop rule, and a stop once the whole answer is in the response (:func:`..scorers.retrieval.answer_stop`)."""
        return answer_stop(self.tokenizer, self.stop, prompt.needle.answer)

    def _answer_logprob(self, prompt: NeedlePrompt, cache) -> float:
        answer = self.answer_ids(prompt)
        inputs = torch.cat([prompt.input_ids[:, -1:], answer[:, :-1]], dim=1)
        logits = self.model(input_ids=inputs, past_key_values=cache, use_cache=True).logits[0].float()
        return float(torch.log_softmax(logits, -1).gather(-1, answer[0, :, None]).mean())

    def run(self, conditions: list[tuple[str, Plan]], progress: bool, journal: Journal | None = None):
        """Every prompt unmasked; the conditions on the prompts the unmasked model answers (a prompt
        ``journal`` holds is taken from it, a measured one kept there). Returns ``(baseline per
        prompt, indices of the answered prompts, {condition: per answered prompt})``."""
        journal = Journal(None, {}, "validation") if journal is None else journal
        bar = tqdm(total=len(self.prompts) * (1 + len(conditions)), desc="masking validation", unit="run",
                   disable=not progress)
        pieces = []
        for index, prompt in enumerate(self.prompts):
            piece = journal.get(str(index))
            if piece is None:
                piece = journal.put(str(index), self._measure(prompt, conditions, bar, index))
            else:
                bar.update(1 + len(conditions))
            pieces.append(piece)
        bar.close()
        return _gathered(pieces, conditions)

    def _measure(self, prompt: NeedlePrompt, conditions: list[tuple[str, Plan]], bar, index: int = 0) -> dict:
        """``{"baseline", "results": {condition: measures}}`` of one prompt (no conditions where the
        unmasked model does not answer it); ``bar``'s postfix says which prompt (``index``) and forward runs."""
        number = f"prompt {index + 1} of {len(self.prompts)}"
        shown = None if bar.disable else bar.set_postfix_str

        def status(condition: str) -> Status | None:
            return None if shown is None else lambda text: shown(f"{number}, {condition}: {text}")

        shared = None
        if self.shared_prefill:
            with announcing_layers(self.model, shown, f"{number}: prefill of {prompt.input_ids.shape[1] - 1:,} tokens"):
                shared = self.prefill(prompt)
        base = self.evaluate(prompt, None, shared, status("unmasked"))
        bar.update(1)
        results = {}
        if base["recalled"]:
            for name, plan in conditions:
                results[name] = self.evaluate(prompt, plan, shared, status(name))
                bar.update(1)
        else:
            bar.update(len(conditions))
        return {"baseline": base, "results": results}


class LossTask:
    """Next-token loss on held-out windows; every window counts."""

    measures = LOSS_MEASURES

    def __init__(self, model, tokenizer, settings: ValidationSettings):
        self.model = model
        self.windows = token_windows(tokenizer, load_text(settings.text.text_path, heldout=True),
                                     settings.text.windows, settings.text.tokens, settings.seed)

    def items(self) -> list[dict]:
        return [{"window": i, "tokens": int(w.shape[1])} for i, w in enumerate(self.windows)]

    @torch.no_grad()
    def evaluate(self, window: torch.Tensor, plan: Plan | None) -> dict:
        with attach(self.model, plan):
            return {"loss": float(next_token_loss(self.model, window))}

    def run(self, conditions: list[tuple[str, Plan]], progress: bool, journal: Journal | None = None):
        """Every window unmasked and under every condition (a window ``journal`` holds is taken from
        it): ``(baseline, used, {condition: ...})``. The bar counts one forward per window and condition."""
        journal = Journal(None, {}, "validation") if journal is None else journal
        pieces = []
        with tqdm(total=len(self.windows) * (1 + len(conditions)), desc="masking validation", unit="run",
                  disable=not progress) as bar:
            for index, window in enumerate(self.windows):
                piece = journal.get(str(index))
                if piece is None:
                    bar.set_postfix_str(f"window {index + 1} of {len(self.windows)}")  # a no-op when disabled
                    baseline = self.evaluate(window, None)
                    bar.update(1)
                    results = {}
                    for name, plan in conditions:
                        results[name] = self.evaluate(window, plan)
                        bar.update(1)
                    piece = journal.put(str(index), {"baseline": baseline, "results": results})
                else:
                    bar.update(1 + len(conditions))
                pieces.append(piece)
        return _gathered(pieces, conditions)


def _gathered(pieces: list[dict], conditions: list[tuple[str, Plan]]):
    """``(baseline per item, indices of the items measured under the conditions, {condition: per
    such item})`` from each item's ``{"baseline", "results"}``."""
    used = [index for index, piece in enumerate(pieces) if piece["results"]]
    results = {name: [pieces[index]["results"][name] for index in used] for name, _ in conditions}
    return [piece["baseline"] for piece in pieces], used, results


@dataclass(frozen=True)
class MaskingSetup:
    """What a validation masks: the metric, the threshold random sets stay under, and per K the
    top-K heads and the random sets."""

    metric: str
    exclude_above: float | None
    heads: dict[int, tuple[list, list]]


def masking_setup(score: HeadScores, settings: ValidationSettings) -> MaskingSetup:
    """The :class:`MaskingSetup` of validating ``score`` under ``settings`` (no model needed)."""
    masking = settings.masking
    metric = masking.metric or ("needle-recall" if score.name == "retrieval" else "loss")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    exclude_above = masking.exclude_above
    if exclude_above is None and score.name == "retrieval":
        exclude_above = RETRIEVAL_THRESHOLD
    heads = {}
    for k in masking.ks:
        top = top_heads(score, k)
        heads[k] = (top, random_sets(score, top, masking.random_sets, exclude_above, settings.seed))
    return MaskingSetup(metric, exclude_above, heads)


def validation_identity(score: HeadScores, settings: ValidationSettings, model_id: str | None) -> dict:
    """What a validation measures, for its :class:`~headlab.core.journal.Journal`."""
    setup = masking_setup(score, settings)
    return {"kind": "validation", "model_id": model_id or score.model_id, "score": score.name,
            "metric": setup.metric, "exclude_above": setup.exclude_above,
            "heads": {str(k): list(pair) for k, pair in setup.heads.items()}, "settings": dataclasses.asdict(settings)}


def validate_score(model, tokenizer, score: HeadScores, settings: ValidationSettings | None = None,
                   model_id: str | None = None, progress: bool = True, journal_path: str | Path | None = None) -> dict:
    """The masking validation of ``score`` (the JSON object :func:`.page.write_curve_page` draws):
    per K the top-K heads and the random sets, every item's measures under each, and per measure
    and K the means, the rank and paired tests and bootstrap intervals. With ``journal_path`` each
    item's measures are kept there as they finish and an item found there is not measured again."""
    settings = settings or ValidationSettings()
    masking = settings.masking
    setup = masking_setup(score, settings)
    metric, exclude_above, heads = setup.metric, setup.exclude_above, setup.heads
    journal = Journal(journal_path, validation_identity(score, settings, model_id), "validation")
    started = time.perf_counter()
    task = (NeedleTask(model, tokenizer, settings, masking.mode) if metric == "needle-recall"
            else LossTask(model, tokenizer, settings))
    plan_of = _plan_maker(model, tokenizer, settings, masking, metric, heads, progress)
    conditions = [(f"top/{k}", plan_of(top)) for k, (top, _) in heads.items()]
    conditions += [(f"random/{k}/{i}", plan_of(chosen)) for k, (_, sets) in heads.items()
                   for i, chosen in enumerate(sets)]
    baseline, used, results = task.run(conditions, progress, journal)
    curve = {
        "format": CURVE_FORMAT, "score": score.name, "model_id": model_id or score.model_id, "metric": metric,
        "mode": masking.mode, "n_items": len(baseline), "n_used": len(used),
        "settings": {**dataclasses.asdict(settings), "masking": {**dataclasses.asdict(masking),
                                                                 "exclude_above": exclude_above, "metric": metric}},
        "measures": [dataclasses.asdict(m) for m in task.measures],
        "k": list(masking.ks),
        "items": [{**item, "used": i in used, "response": baseline[i].get("response")}
                  for i, item in enumerate(task.items())],
        "heads": {"top": {str(k): top for k, (top, _) in heads.items()},
                  "random": {str(k): sets for k, (_, sets) in heads.items()}},
        "values": _values(task.measures, baseline, used, results, heads),
    }
    curve["summary"] = _summary(task.measures, curve["values"], masking, settings.seed, bool(used))
    curve["seconds"] = round(time.perf_counter() - started, 1)
    return curve


def _plan_maker(model, tokenizer, settings: ValidationSettings, masking: MaskingSettings, metric: str, heads,
                progress: bool = False):
    """A function from a head set to its masking plan; mean masking measures the heads' means once,
    on held-out windows."""
    rows = "decode" if metric == "needle-recall" else "all"
    means = None
    if masking.mode == "mean":
        needed = {h for top, sets in heads.values() for chosen in (top, *sets) for h in chosen}
        windows = token_windows(tokenizer, load_text(settings.text.text_path, heldout=True),
                                settings.text.windows, settings.text.tokens, settings.seed)
        means = head_means(model, windows, needed, progress)
    return lambda chosen: masking_plan(chosen, masking.mode, rows, means)


def _values(measures, baseline, used, results, heads) -> dict:
    """Per condition and measure, the value of every used item (random sets: one list per set)."""
    def column(runs, name):
        return [float(run[name]) for run in runs]

    values = {"baseline": {m.name: column([baseline[i] for i in used], m.name) for m in measures},
              "top": {}, "random": {}, "top_responses": {}}
    for k, (_, sets) in heads.items():
        values["top"][str(k)] = {m.name: column(results[f"top/{k}"], m.name) for m in measures}
        values["random"][str(k)] = {m.name: [column(results[f"random/{k}/{i}"], m.name) for i in range(len(sets))]
                                    for m in measures}
        values["top_responses"][str(k)] = [run.get("response") for run in results[f"top/{k}"]]
    return values


def _summary(measures, values, masking: MaskingSettings, seed: int, any_used: bool) -> dict:
    """Per measure: the baseline mean and, per K, :func:`.statistics.summarize` (empty when no item
    was used: the unmasked model answered nothing)."""
    summary = {}
    for m in measures:
        base = values["baseline"][m.name]
        by_k = {}
        if any_used:
            for k in masking.ks:
                top = np.array(values["top"][str(k)][m.name])
                random = np.array(values["random"][str(k)][m.name])
                by_k[str(k)] = summarize(top, random, m.higher_is_better, masking.bootstrap, seed)
        summary[m.name] = {"baseline_mean": float(np.mean(base)) if base else None, "by_k": by_k}
    return summary


__all__ = ["LOSS_MEASURES", "LossTask", "MaskingSetup", "Measure", "NEEDLE_MEASURES", "NeedleTask",
           "RETRIEVAL_THRESHOLD", "masking_setup", "validate_score", "validation_identity"]
