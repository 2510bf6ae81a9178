"""Training a converted model (docs/methods/conversion.md): stage 1 attention transfer, stage 2 low-rank adjusting.

Stage 1 trains only the feature maps and window weights; every converted layer computes its
softmax teacher from the same ``q, k, v`` and passes the teacher's output on, and the loss is
``1000 × mean over layers`` of the per-head output MSE (or the attention cross-entropy): each layer's
attention output aligned to the original's from the original's own layer inputs (RADLADS' first step
too). Stage 2 adds LoRA (peft) to ``q/k/v/o_proj`` and trains it, the feature maps frozen, with
next-token loss (``ce``, LoLCATs) or the KL divergence to the original model's next-token distribution
(``kl``, RADLADS' second step; the original is the same model with the adapters off and every head
softmax, so no second copy is held).

Both stages use AdamW, gradient clipping, micro-batch 1 with gradient accumulation,
ReduceLROnPlateau on the validation loss measured every ``eval_every`` steps, and keep the best
weights by validation loss. A stage is resumable: its checkpoint (trainable weights, optimiser,
scheduler, step, best weights, history) is written atomically every ``eval_every`` steps, and a
run resumed from it ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ...core.errors import InputFileError
from ...core.files import atomic_path
from ..losses import next_token_kl
from ..sites import announcing_layers
from .converted import converted_layers
from .settings import StageSettings

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@contextmanager
def transfer_mode(model, loss: str):
    """Converted layers compute their teacher and store their transfer loss inside the block."""
    layers = list(converted_layers(model).values())
    for layer in layers:
        layer.transfer = loss
    try:
        yield layers
    finally:
        for layer in layers:
            layer.transfer, layer.transfer_loss = None, None


def transfer_loss(model, ids: torch.Tensor, layers, scale: float) -> torch.Tensor:
    """``scale × mean`` of the converted layers' transfer losses for one sequence ``[1, T]``."""
    model(ids, use_cache=False)
    return scale * torch.stack([layer.transfer_loss for layer in layers]).mean()


@contextmanager
def every_head_softmax(model):
    """Every converted layer computes softmax attention on every head (the original model's layers),
    restoring each layer's own softmax heads afterwards."""
    layers = list(converted_layers(model).values())
    kept = [layer.softmax_kv for layer in layers]
    for layer in layers:
        layer.set_softmax_heads(range(layer.n_kv_heads))
    try:
        yield
    finally:
        for layer, heads in zip(layers, kept):
            layer.set_softmax_heads(heads)


def distillation_loss(peft_model, ids: torch.Tensor) -> torch.Tensor:
    """``KL(original ‖ converted)`` of the next-token distributions on ``ids [1, T]``, averaged over
    positions; the original is ``peft_model`` with its adapters disabled and every head softmax."""
    with torch.no_grad(), peft_model.disable_adapter(), every_head_softmax(peft_model):
        target = torch.log_softmax(peft_model(ids, use_cache=False).logits.float(), -1)
    return next_token_kl(target, peft_model(ids, use_cache=False).logits)


def stage1_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Feature maps and window weights; freezes everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = {}
    for name, p in model.named_parameters():
        if ".feature_q." in name or ".feature_k." in name or name.endswith(".mix_logit"):
            p.requires_grad_(True)
            chosen[name] = p
    if not chosen:
        raise ValueError("the model has no converted layers to train")
    return chosen


def add_lora(model, settings: StageSettings):
    """Wrap ``model`` with peft LoRA adapters on ``q/k/v/o_proj`` (everything else frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                        target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(model, config)


def run_stage(
    name: str,
    model,
    parameters: dict[str, torch.nn.Parameter],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    train: torch.Tensor,
    validation: torch.Tensor,
    settings: StageSettings,
    folder: str | Path | None = None,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict:
    """Train ``parameters`` on ``loss_fn`` over the sequences of ``train [n, T]`` (one per
    micro-batch, in a seeded order), validating on ``validation [m, T]``; resumes from
    ``folder/{name}.pt`` when present. Ends holding the best weights; returns the summary
    (losses, steps, tokens, seconds). ``stop_at`` halts early after that step (for tests of resuming).
    ``progress``: a bar over the steps, whose postfix says which sequence's forward or backward, which
    validation window or which checkpoint runs."""
    run = _Run(name, model, parameters, loss_fn, train, validation, settings, folder)
    return run.train(stop_at, progress)


class _Run:
    def __init__(self, name, model, parameters, loss_fn, train, validation, settings, folder):
        self.name, self.model, self.params = name, model, parameters
        self.loss_fn, self.train_ids, self.val_ids, self.settings = loss_fn, train, validation, settings
        self.path = Path(folder) / f"{name}.pt" if folder is not None else None
        self.optimizer = torch.optim.AdamW(list(parameters.values()), lr=settings.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=settings.factor, patience=settings.patience, min_lr=settings.min_lr)
        self.order = torch.randperm(len(train), generator=torch.Generator().manual_seed(settings.seed))
        self.step, self.seconds, self.history = 0, 0.0, []
        self.best = {"loss": math.inf, "step": 0, "weights": self._weights()}
        self.initial_val: float | None = None

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def _sequence(self, index: int) -> torch.Tensor:
        return self.train_ids[self.order[index % len(self.order)]][None]

    @torch.no_grad()
    def validate(self, status: Callable[[str], None] | None = None) -> float:
        losses = []
        for number, ids in enumerate(self.val_ids, 1):
            with announcing_layers(self.model, status, f"validating, window {number} of {len(self.val_ids)}"):
                losses.append(float(self.loss_fn(ids[None])))
        return sum(losses) / len(losses)

    def train(self, stop_at: int | None, progress: bool = True) -> dict:
        s = self.settings
        self._resume()
        bar = tqdm(total=s.steps, initial=self.step, desc=self.name, unit="step", disable=not progress)
        shown = ""  # the last step's loss and learning rate

        def status(text: str) -> None:
            bar.set_postfix_str(f"{shown}, {text}" if shown else text)

        say = status if progress else None
        if self.initial_val is None:
            self.initial_val = self.validate(None if say is None else lambda text: say(f"before training: {text}"))
        while self.step < s.steps:
            started = time.perf_counter()
            loss = self._update(say)
            self.step += 1
            self.seconds += time.perf_counter() - started
            bar.update()
            shown = f"loss={loss:.4g}, lr={self.optimizer.param_groups[0]['lr']:.1e}"
            bar.set_postfix_str(shown)
            if self.step % s.eval_every == 0 or self.step == s.steps:
                self._evaluate(loss, say)
                if say is not None:
                    say("saving the training state")
                self._save()
                bar.set_postfix_str(shown)
            if stop_at is not None and self.step >= stop_at:
                break
        bar.close()
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.best["weights"][k])
        return self.summary()

    def _update(self, status: Callable[[str], None] | None = None) -> float:
        s = self.settings
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(s.accumulation):
            step = f"step {self.step + 1}"
            if s.accumulation > 1:
                step += f", sequence {micro + 1} of {s.accumulation}"
            with announcing_layers(self.model, status, f"{step}: forward", backward=f"{step}: backward"):
                loss = self.loss_fn(self._sequence(self.step * s.accumulation + micro)) / s.accumulation
            if status is not None:
                status(f"{step}: backward")
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), s.clip)
        self.optimizer.step()
        return total

    def _evaluate(self, train_loss: float, status: Callable[[str], None] | None = None) -> None:
        val = self.validate(status)
        self.scheduler.step(val)
        self.history.append({"step": self.step, "train_loss": train_loss, "val_loss": val,
                             "lr": self.optimizer.param_groups[0]["lr"]})
        if val < self.best["loss"]:
            self.best = {"loss": val, "step": self.step, "weights": self._weights()}

    def summary(self) -> dict:
        tokens = self.step * self.settings.accumulation * self.train_ids.shape[1]
        return {"stage": self.name, "steps": self.step, "train_tokens": tokens, "seconds": round(self.seconds, 1),
                "initial_val_loss": self.initial_val, "best_val_loss": self.best["loss"],
                "best_step": self.best["step"], "history": self.history, "settings": self.settings.to_dict()}

    def _save(self) -> None:
        if self.path is None:
            return
        state = {"step": self.step, "seconds": self.seconds, "history": self.history,
                 "initial_val": self.initial_val, "weights": self._weights(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "best_loss": self.best["loss"], "best_step": self.best["step"], "best_weights": self.best["weights"]}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def _check_state_weights(self, weights: dict) -> None:
        """Refuse saved weights of other parameters, other shapes or values that are not finite."""
        if set(weights) != set(self.params):
            raise InputFileError(f"{self.path} was written for other parameters; remove it or choose another folder")
        wrong = [k for k, p in self.params.items() if not isinstance(weights[k], torch.Tensor)
                 or weights[k].shape != p.shape or not torch.isfinite(weights[k]).all()]
        if wrong:
            raise InputFileError(f"{self.path} holds {wrong[0]} at another shape or with values that are not finite; "
                                 "move it away to start afresh")

    def _resume(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            state = torch.load(self.path, weights_only=True)
            weights = dict(state["weights"])
            best = state["best_weights"]
            missing = {"step", "seconds", "history", "initial_val", "optimizer", "scheduler", "best_loss",
                       "best_step"} - set(state)
            if missing:
                raise KeyError(sorted(missing)[0])
        except Exception as err:  # a damaged or foreign file: say which, never a traceback
            raise InputFileError(f"cannot resume the training from {self.path} ({type(err).__name__}); move it away "
                                 "to start afresh") from None
        for kept in (weights, *([dict(best)] if best is not None else [])):
            self._check_state_weights(kept)
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state["weights"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.seconds, self.history = state["step"], state["seconds"], state["history"]
        self.initial_val = state["initial_val"]
        self.best = {"loss": state["best_loss"], "step": state["best_step"], "weights": state["best_weights"]}
