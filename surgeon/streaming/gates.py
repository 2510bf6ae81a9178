"""DuoAttention's gates (Xiao et al., 2024): learn, per KV head of the global layers, how much of the
full attention a head needs, by mixing full and streaming attention with a gate ``α`` in ``[0, 1]``
(:class:`~headlab.surgeon.streaming.mixing.StreamMix`) and training the gates alone on synthetic passkey
samples so that the model's final hidden states at the answer stay those of the unedited model,
with a penalty ``λ·mean|α|`` that pushes gates to 0 (streaming).

Each step draws its sample from the seed and the step number, so a run killed and started again
from its saved state (every ``save_every`` steps) reaches the same gates. The result is a score
(``duo_gate``: each query head carries its KV head's gate; sliding layers are not analysed) and a
plan that keeps the whole context for the KV heads with ``α ≥ 0.5``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ...core.errors import InputFileError
from ...core.files import atomic_path, write_json
from ...core.head_scores import HeadScores
from ...core.text import load_text
from .. import Plan, attach, model_shape
from ..losses import needs_recompute, recomputed_in_backward
from ..sites import announcing_layers
from .mixing import StreamMix
from .rules import candidates, global_layers, score_ranking, streaming_plan
from .settings import GateSettings, StreamingSettings

GATE_SCORE = "duo_gate"
STATE_FILE, GATES_FILE, PLAN_FILE = "gates-state.pt", "gates.json", "plan.json"
THRESHOLD = 0.5  # DuoAttention's binarisation: a KV head with α ≥ 0.5 keeps the whole context


@dataclass
class PasskeySample:
    """``input_ids [1, N]`` and ``targets [T]``: the positions whose final hidden state predicts an answer token."""

    input_ids: torch.Tensor
    targets: torch.Tensor


def sample_lengths(settings: GateSettings, limit: int | None) -> list[int]:
    """``settings.intervals`` lengths evenly from the shortest to the longest (capped at ``limit``)."""
    longest = min(settings.max_length, limit) if limit else settings.max_length
    shortest = min(settings.min_length, longest)
    if settings.intervals == 1:
        return [shortest]
    step = (longest - shortest) / (settings.intervals - 1)
    return sorted({round(shortest + i * step) for i in range(settings.intervals)})


def passkey_sample(tokenizer, haystack: list[int], words: list[str], settings: GateSettings, step: int,
                   lengths: list[int]) -> PasskeySample:
    """The sample of ``step``: a stretch of the ``haystack`` ids with the passkey sentences inserted at
    sorted random depths in 5-95%, then the request to repeat them and the answer; ``length`` ids in
    all (drawn from ``lengths``)."""
    rng = random.Random(f"{settings.seed}/{step}")
    length = rng.choice(lengths)
    keys = [" ".join(rng.choice(words) for _ in range(settings.passkey_words)) for _ in range(settings.passkeys)]
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    sentences = [encode(f" Passkey {i + 1}: {key}.") for i, key in enumerate(keys)]
    question = encode("\nRepeat every passkey in order.\nAnswer:")
    answer = encode("".join(f" Passkey {i + 1}: {key}." for i, key in enumerate(keys)))
    fill = length - sum(map(len, sentences)) - len(question) - len(answer)
    if fill < 1:
        raise InputFileError(f"a {length}-token sample cannot hold {settings.passkeys} passkeys of "
                             f"{settings.passkey_words} words; use fewer passkeys or longer samples")
    if fill > len(haystack):
        raise InputFileError(f"the haystack text has {len(haystack)} tokens, fewer than the {fill} a {length}-token "
                             "sample needs; give a longer --text-file or a lower --max-length")
    start = rng.randrange(len(haystack) - fill + 1)
    stretch = haystack[start:start + fill]
    cuts = sorted(round(rng.uniform(0.05, 0.95) * fill) for _ in keys)
    ids, previous = [], 0
    for cut, sentence in zip(cuts, sentences):
        ids += stretch[previous:cut] + sentence
        previous = cut
    ids += stretch[previous:] + question
    targets = torch.arange(len(ids) - 1, len(ids) + len(answer) - 1)
    return PasskeySample(torch.tensor([ids + answer]), targets)


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, N, d_model]``: the decoder's last hidden state (after its final norm)."""
    return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


def settings_key(settings: GateSettings) -> str:
    """What a resumed run must share: everything but how long it trains and how often it saves (a
    step's sample and update do not depend on them, so a run can be extended)."""
    fixed = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("steps", "save_every")}
    return json.dumps(fixed, sort_keys=True)


def read_state(path: Path | None, settings: GateSettings, gates_shape: tuple[int, int]) -> dict | None:
    """The training state saved at ``path`` (None where there is none), checked before any model work:
    a file torch cannot read as plain tensors, of other settings, of another model's shape (``gates_shape``:
    layers x KV heads), of more steps than ``settings.steps`` or with non-finite gates is refused
    (:class:`InputFileError`, one line)."""
    if path is None or not Path(path).exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
        alphas, step = state["alphas"], int(state["step"])
        missing = {"optimizer", "seconds", "history"} - set(state)  # every part a resume reads
        if missing:
            raise KeyError(sorted(missing)[0])
    except Exception as err:  # a damaged or foreign file: say which, never a traceback
        raise InputFileError(f"cannot resume gate training from {path} ({type(err).__name__}); move it away to "
                             "start afresh") from None
    if state.get("settings") != settings_key(settings):
        raise InputFileError(f"{path} holds a gate training with other settings; move it away or use the same "
                             "settings")
    if not isinstance(alphas, torch.Tensor) or tuple(alphas.shape) != tuple(gates_shape):
        shown = tuple(alphas.shape) if isinstance(alphas, torch.Tensor) else type(alphas).__name__
        raise InputFileError(f"{path} holds gates of shape {shown}, not this model's {tuple(gates_shape)} (layers x "
                             "KV heads): another model's training")
    if step > settings.steps:
        raise InputFileError(f"{path} holds {step} training steps, more than --steps {settings.steps}; ask for at "
                             "least as many")
    if not torch.isfinite(alphas).all():
        raise InputFileError(f"{path} holds gates that are not finite (NaN or infinity); move it away to start afresh")
    return state


class GateTraining:
    """One run of gate training, saved to and resumed from ``folder / STATE_FILE``."""

    def __init__(self, model, tokenizer, settings: GateSettings, folder: str | Path | None = None):
        self.model, self.settings = model, settings
        self.shape = model_shape(model)
        config = model.config.get_text_config(decoder=True)
        self.layer_types = getattr(config, "layer_types", None)
        self.layers = tuple(global_layers(self.shape, self.layer_types))
        self.lengths = sample_lengths(settings, getattr(config, "max_position_embeddings", None))
        text = load_text(settings.text_path)
        self.haystack = tokenizer(text, add_special_tokens=False).input_ids
        if len(self.haystack) < max(self.lengths):  # a sample's stretch of haystack is a little shorter
            raise InputFileError(f"the haystack text has {len(self.haystack)} tokens, fewer than the "
                                 f"{max(self.lengths)} of the longest sample; give a longer --text-file or a lower "
                                 "--max-length")
        self.words = sorted({w for w in text.split() if w.isalpha() and 3 <= len(w) <= 10})
        self.tokenizer = tokenizer
        self.alphas = torch.ones(self.shape.n_layers, self.shape.n_kv_heads, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.alphas], lr=settings.lr)
        self.step, self.seconds, self.history = 0, 0.0, []
        self._status: Callable[[str], None] | None = None  # hears each forward of a step (the bar's postfix)
        self.path = Path(folder) / STATE_FILE if folder is not None else None
        self._resume()

    def run(self, progress: bool = True, stop_at: int | None = None) -> torch.Tensor:
        """Train to ``settings.steps`` (or ``stop_at``); returns the gates ``[n_layers, n_kv_heads]``.
        ``progress``: a bar over the steps, whose postfix shows the last loss and mean gate and which
        forward of the step runs."""
        frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        bar = tqdm(total=self.settings.steps, initial=self.step, desc="gate training", unit="step",
                   disable=not progress)
        last = ""  # the last step's loss and mean gate

        def status(text: str) -> None:
            bar.set_postfix_str(f"{last}, {text}" if last else text)

        self._status = status if progress else None
        try:
            while self.step < self.settings.steps and (stop_at is None or self.step < stop_at):
                started = time.perf_counter()
                loss, mse = self._update()
                self.step += 1
                self.seconds += time.perf_counter() - started
                self.history.append({"step": self.step, "loss": loss, "mse": mse,
                                     "mean_gate": float(self.alphas.detach()[list(self.layers)].mean())})
                bar.update()
                last = f"loss={loss:.4g}, gate={self.history[-1]['mean_gate']:.3f}"
                bar.set_postfix_str(last)
                if self.step % self.settings.save_every == 0 or self.step == self.settings.steps:
                    self._save()
        finally:
            bar.close()
            self._status = None
            for p, flag in frozen:
                p.requires_grad_(flag)
        return self.alphas.detach().clone()

    def _update(self) -> tuple[float, float]:
        s, status = self.settings, self._status
        sample = passkey_sample(self.tokenizer, self.haystack, self.words, s, self.step, self.lengths)
        step = f"step {self.step + 1}, {sample.input_ids.shape[1]:,} tokens"
        with torch.no_grad(), announcing_layers(self.model, status, f"{step}: unedited forward"):
            teacher = final_hidden(self.model, sample.input_ids)[0, sample.targets]
        mixing = StreamMix(self.alphas, self.layers, s.sinks, s.window)
        long = needs_recompute(self.model, sample.input_ids.shape[1])
        # the backward runs inside: a block recomputed for a long sample needs the mixing again
        with attach(self.model, mixing=mixing), recomputed_in_backward(self.model) if long else nullcontext():
            with announcing_layers(self.model, status, f"{step}: gated forward", backward=f"{step}: backward"):
                student = final_hidden(self.model, sample.input_ids)[0, sample.targets]
            mse = ((student.float() - teacher.float()) ** 2).mean(-1).sum() / len(sample.targets)
            loss = mse + s.lam * self.alphas[list(self.layers)].abs().mean()
            self.optimizer.zero_grad(set_to_none=True)
            if status is not None:
                status(f"{step}: backward")
            loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.alphas.clamp_(0.0, 1.0)
        return float(loss.detach()), float(mse.detach())

    def _settings_key(self) -> str:
        return settings_key(self.settings)

    def _save(self) -> None:
        if self.path is None:
            return
        state = {"settings": self._settings_key(), "step": self.step, "seconds": self.seconds,
                 "history": self.history, "alphas": self.alphas.detach().clone(),
                 "optimizer": self.optimizer.state_dict()}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def _resume(self) -> None:
        state = read_state(self.path, self.settings, tuple(self.alphas.shape))
        if state is None:
            return
        with torch.no_grad():
            self.alphas.copy_(state["alphas"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.seconds, self.history = state["step"], state["seconds"], state["history"]

    def score(self, model_id: str) -> HeadScores:
        """The gates as a head score: each query head carries its KV head's ``α`` (NaN on sliding layers)."""
        values = torch.full((self.shape.n_layers, self.shape.n_heads), float("nan"))
        gates = self.alphas.detach().repeat_interleave(self.shape.group_size, dim=1)
        values[list(self.layers)] = gates[list(self.layers)]
        counts = torch.zeros_like(values)
        counts[list(self.layers)] = self.step
        return HeadScores(GATE_SCORE, values, counts, model_id,
                          "DuoAttention gate: 1 = the KV head needs the whole context, 0 = it can stream",
                          {**dataclasses.asdict(self.settings), "steps_done": self.step})

    def plan(self, model_id: str | None = None) -> Plan:
        """The KV heads with ``α ≥ 0.5`` keep the whole context; the others stream as in training."""
        score = self.score(model_id or "")
        ranking = score_ranking(score, self.shape, self.layer_types)
        gates = self.alphas.detach()
        kept = sum(1 for layer, kv in ranking if gates[layer, kv] >= THRESHOLD)
        settings = StreamingSettings(keep=kept / len(ranking), sinks=self.settings.sinks, window=self.settings.window)
        return streaming_plan(ranking, self.shape, settings, model_id)

    def write(self, folder: str | Path, model_id: str) -> None:
        """``gates.json`` (a scores file with the ``duo_gate`` score and the training history) and ``plan.json``."""
        folder = Path(folder)
        write_json(folder / GATES_FILE, {
            "model_id": model_id, "n_layers": self.shape.n_layers, "n_heads": self.shape.n_heads,
            "n_kv_heads": self.shape.n_kv_heads, "complete": self.step >= self.settings.steps,
            "provenance": {"steps": self.step, "seconds": round(self.seconds, 1), "history": self.history,
                           "kv_heads": len(candidates(self.shape, self.layer_types))},
            "scores": {GATE_SCORE: self.score(model_id).to_dict()}})
        self.plan(model_id).save(folder / PLAN_FILE)


__all__ = ["GATE_SCORE", "GateTraining", "PasskeySample", "final_hidden", "passkey_sample", "sample_lengths"]
