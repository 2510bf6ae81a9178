"""The recall gate of a conversion: needle recall by the needle's distance from the end of the prompt
(inside the softmax window, just outside it, far from it), with intervals, for the original and
the converted model on the same held-out prompts, so a good perplexity cannot hide a collapse. The
bins follow the window's shape: a terrace window (the default) sees from ``window`` to ``2·window − 1``
tokens back depending on the position, so "just outside" starts at twice the window.

A prompt's distance is the number of tokens between the answer's last token and the prompt's end;
:func:`prompt_at_distance` finds the needle depth that puts it nearest a target distance.
"""

from __future__ import annotations

import numpy as np

from ...core.text import load_text
from ..intervals import mean_interval, paired_difference_interval
from ..scorers.needles import HELDOUT_NEEDLES
from ..scorers.retrieval import build_prompt
from .run import NEEDLE_MEASURES, NeedleTask
from .settings import ValidationSettings

RESAMPLES = 2000
MAX_NEW_TOKENS = 32


def window_reach(window: int, terrace: bool) -> int:
    """The smallest distance no query can see through its softmax window: a sliding window sees the
    ``window − 1`` tokens before it, a terrace window (its own block and the previous one) up to
    ``2·window − 1``."""
    return 2 * window if terrace else window


def distance_bins(window: int, terrace: bool = True) -> dict[str, tuple[int, int]]:
    """``{bin: (low, high)}`` distances (tokens) of the three bins around a softmax ``window``: inside it
    whatever the position, just outside it whatever the position (the next two windows), beyond.
    Distances a terrace window sees from some positions only (``window`` to ``2·window − 1``) are in no bin."""
    reach = window_reach(window, terrace)
    return {"inside the window": (0, window), "just outside": (reach, reach + 2 * window),
            "far": (reach + 2 * window, 10**9)}


def gate_distances(window: int, length: int, terrace: bool = True) -> list[int]:
    """One target distance per bin: half the window, one window past the reach, and half the prompt
    (at least four windows past the reach)."""
    reach = window_reach(window, terrace)
    return [window // 2, reach + window, max(reach + 4 * window, length // 2)]


def prompt_at_distance(tokenizer, haystack, needle, length: int, distance: int):
    """The prompt of ``length`` tokens whose answer ends nearest ``distance`` tokens before the end
    (bisection over the needle's depth)."""
    def gap_of(prompt):
        return prompt.length - 1 - prompt.answer_positions[-1]

    last = build_prompt(tokenizer, haystack, needle, length, 1.0)  # the needle closing the context
    best = (gap_of(last), last)
    low, high = 0.0, 1.0
    for _ in range(14):
        depth = (low + high) / 2
        prompt = build_prompt(tokenizer, haystack, needle, length, depth)
        gap = gap_of(prompt)
        if abs(gap - distance) < abs(best[0] - distance):
            best = (gap, prompt)
        low, high = (depth, high) if gap > distance else (low, depth)
    return best[1]


def gate_prompts(tokenizer, window: int, lengths: list[int], n_needles: int, targets: list[int] | None = None,
                 terrace: bool = True):
    """``(prompts, distances)``: each of the first ``n_needles`` held-out needles at each length and
    target distance (default :func:`gate_distances`) that a prompt reaches (each prompt once)."""
    haystack = load_text(None, heldout=True)
    prompts, seen = [], set()
    for needle in HELDOUT_NEEDLES[:n_needles]:
        for length in lengths:
            for target in targets or gate_distances(window, length, terrace):
                prompt = prompt_at_distance(tokenizer, haystack, needle, length, target)
                key = (needle, length, prompt.answer_positions[-1])
                if key not in seen and abs(prompt.length - 1 - prompt.answer_positions[-1] - target) < target / 2 + 64:
                    seen.add(key)
                    prompts.append(prompt)
    return prompts, [p.length - 1 - p.answer_positions[-1] for p in prompts]


def needle_runs(model, tokenizer, prompts, done=None) -> list[dict]:
    """Each prompt's measures and response, decoded greedily from the model's own cache or state;
    ``done()`` is called after each prompt."""
    task = NeedleTask(model, tokenizer, ValidationSettings(max_new_tokens=MAX_NEW_TOKENS), "zero", prompts=prompts)
    runs = []
    for prompt in prompts:
        runs.append(task.evaluate(prompt, None))
        if done is not None:
            done()
    return runs


def by_distance(runs: list[dict], distances: list[int], window: int, reference: list[dict] | None = None,
                terrace: bool = True) -> dict:
    """Per distance bin and measure: the mean and its 95% bootstrap interval over prompts and, against
    ``reference`` (the original model's runs on the same prompts), its mean and the paired interval of
    the difference (this model minus the reference)."""
    out = {}
    for name, (low, high) in distance_bins(window, terrace).items():
        chosen = [i for i, d in enumerate(distances) if low <= d < high]
        if not chosen:
            continue
        row = {"n_prompts": len(chosen), "distances": [distances[i] for i in chosen]}
        for measure in NEEDLE_MEASURES:
            values = np.array([runs[i][measure.name] for i in chosen], dtype=float)
            row[measure.name] = {"mean": float(values.mean()), "ci": mean_interval(values, RESAMPLES, 0)}
            if reference is not None:
                base = np.array([reference[i][measure.name] for i in chosen], dtype=float)
                row[measure.name].update(reference_mean=float(base.mean()),
                                         difference_ci=paired_difference_interval(values, base, RESAMPLES, 0))
        out[name] = row
    return out


class RecallGate:
    """``gate(model, tokenizer)``: the needle runs of a conversion's recall gate, by distance bin. The
    first call measures the original model; later calls measure converted models on the same prompts
    and against it (paired intervals). ``progress``: a bar over each model's prompts."""

    def __init__(self, window: int, lengths: list[int], n_needles: int, terrace: bool = True, progress: bool = True):
        self.window, self.lengths, self.n_needles, self.terrace = window, lengths, n_needles, terrace
        self.progress = progress
        self.original: list[dict] | None = None

    def __call__(self, model, tokenizer) -> dict:
        from tqdm.auto import tqdm

        prompts, distances = gate_prompts(tokenizer, self.window, self.lengths, self.n_needles, terrace=self.terrace)
        which = "original" if self.original is None else "converted"
        bar = tqdm(total=len(prompts), desc=f"recall gate, {which}", unit="prompt", disable=not self.progress)
        runs = needle_runs(model, tokenizer, prompts, bar.update)
        bar.close()
        summary = by_distance(runs, distances, self.window, self.original, self.terrace)
        if self.original is None:
            self.original = runs
        return {"window": self.window, "terrace": self.terrace, "lengths": self.lengths, "distances": distances,
                "bins": summary, "runs": runs}


def gate_lines(gate: dict) -> list[str]:
    """One line per distance bin: recall of the original and the converted model and the paired interval."""
    converted = gate["converted"]["bins"]
    lines = [f"needle recall {name}: no prompt reaches it (the question after the needle is longer, or the prompt "
             "shorter, than it needs)" for name in distance_bins(gate["converted"]["window"], gate["converted"]["terrace"])
             if name not in converted]
    for name, row in converted.items():
        recall = row["recalled"]
        low, high = recall["difference_ci"]
        lines.append(f"needle recall {name} ({row['n_prompts']} prompts): {recall['mean']:.2f} against the original's "
                     f"{recall['reference_mean']:.2f} (difference 95% interval [{low:+.2f}, {high:+.2f}])")
    return lines


__all__ = ["RecallGate", "by_distance", "distance_bins", "gate_distances", "gate_lines", "gate_prompts", "needle_runs",
           "prompt_at_distance", "window_reach"]
