"""Training sparse autoencoders (docs/methods/sae.md): initialisation, losses, AuxK, the decoder-norm
constraint, the learning-rate rule and schedule, dead-latent resampling (ReLU preset), atomic
resumable checkpoints and data-parallel training over ``torch.distributed`` ranks.

A run is deterministic given its seed and its batches: a killed run resumed from its last
checkpoint ends with the same weights as an uninterrupted run (the checkpoint holds the model,
the optimiser, the step, the dead-latent counters and the batch source's state).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ..core.distributed import all_gather_rows, all_reduce, rank_and_world
from ..core.files import atomic_path
from .model import SparseAutoencoder
from .settings import TrainSettings


class Batches(Protocol):
    def next_batch(self) -> torch.Tensor: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def geometric_median(points: torch.Tensor, tolerance: float = 1e-5, max_iterations: int = 100) -> torch.Tensor:
    """Weiszfeld's algorithm on ``points [n, d]``: the point minimising the sum of distances."""
    median = points.mean(0)
    for _ in range(max_iterations):
        weights = 1 / (points - median).norm(dim=1).clamp(min=1e-8)
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        if (updated - median).norm() <= tolerance * median.norm().clamp(min=1e-8):
            return updated
        median = updated
    return median


@torch.no_grad()
def initialise(sae: SparseAutoencoder, sample: torch.Tensor) -> float:
    """The initialisation, on a raw ``sample [n, d_in]``: the input scale ``c`` (``E‖c·x‖² = d_in``, or 1 for
    JumpReLU), ``b_dec`` = geometric median of ``c·x``, ``W_enc = W_decᵀ`` scaled so that initial
    reconstructions have the inputs' mean centred norm. Returns the variance ``E‖c·x − mean‖²``
    that normalises the TopK/BatchTopK reconstruction loss."""
    target = 1.0 if sae.architecture.input_norm == "one" else float(sae.d_in)
    sae.scale.fill_(math.sqrt(target / sample.pow(2).sum(1).mean().item()))
    x = sample * sae.scale
    sae.b_dec.copy_(geometric_median(x))
    sae.W_enc.copy_(sae.W_dec.t())
    centred = (x - sae.b_dec).norm(dim=1).mean()
    reconstructed = (sae(x).x_hat - sae.b_dec).norm(dim=1).mean().clamp(min=1e-8)
    sae.W_enc.mul_(centred / reconstructed)
    return (x - x.mean(0)).pow(2).sum(1).mean().item()


def _loss(sae: SparseAutoencoder, x: torch.Tensor, settings: TrainSettings, variance: float,
          dead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, codes)`` for one normalised batch (the architecture's loss terms)."""
    out = sae(x)
    return sae.architecture.loss(sae, out, x, settings, variance, dead), out.codes


class Trainer:
    """One training run of ``sae`` on ``batches`` (this rank's share of each global batch),
    checkpointing into ``folder`` (``checkpoint.pt``, one per rank under ``torch.distributed``)."""

    def __init__(self, sae: SparseAutoencoder, batches: Batches, settings: TrainSettings, folder: str | Path | None = None):
        self.sae, self.batches, self.settings = sae, batches, settings
        self.rank, self.world = rank_and_world()
        if settings.batch_tokens % self.world:
            raise ValueError(f"batch size {settings.batch_tokens} does not split over {self.world} ranks")
        self.folder = Path(folder) if folder is not None else None
        # fused: one pass per parameter instead of a dozen small ops, each a thread barrier; with two
        # threads on a busy machine those barriers cost more than the sparse ops save
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=settings.learning_rate(sae.d_sae),
                                          betas=settings.adam_betas(), eps=6.25e-10, fused=True)
        self.step, self.variance = 0, 1.0
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long)
        # the ReLU preset's resampling window: firings per latent and tokens since the last resample
        self.window_fires = torch.zeros(sae.d_sae, dtype=torch.long)
        self.window_tokens, self.resampled, self.last_resample = 0, 0, 0
        self.history: list[dict] = []

    @property
    def checkpoint_path(self) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / ("checkpoint.pt" if self.world == 1 else f"checkpoint.rank{self.rank}.pt")

    def save_checkpoint(self) -> None:
        """Write the whole run state atomically."""
        state = {"sae": self.sae.state_dict(), "config": self.sae.config(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "variance": self.variance, "since_fired": self.since_fired,
                 "resampling": {"fires": self.window_fires, "tokens": self.window_tokens, "count": self.resampled,
                                "last": self.last_resample},
                 "batches": self.batches.state_dict(), "settings": asdict(self.settings), "history": self.history}
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def resume(self) -> bool:
        """Load the checkpoint if one exists (``weights_only``); False when starting fresh."""
        path = self.checkpoint_path
        if path is None or not path.exists():
            return False
        state = torch.load(path, weights_only=True)
        if state["settings"] != asdict(self.settings) or state["config"] != self.sae.config():
            raise ValueError(f"{path} was written by a run with other settings; use another folder or the same "
                             f"settings (checkpoint: {state['settings']}, {state['config']})")
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.variance = state["step"], state["variance"]
        self.since_fired = state["since_fired"]
        resampling = state["resampling"]
        self.window_fires, self.window_tokens = resampling["fires"], resampling["tokens"]
        self.resampled, self.last_resample = resampling["count"], resampling["last"]
        self.batches.load_state_dict(state["batches"])
        self.history = state["history"]
        return True

    def _initialise(self, progress: bool = False) -> None:
        init_rows = min(self.settings.init_rows, self.settings.train_tokens)  # a short run gathers no more than it trains on
        n_batches = max(1, init_rows // self.settings.batch_tokens)
        if progress:
            tqdm.write(f"initialising the autoencoder from {n_batches * self.settings.batch_tokens:,} activation rows "
                       "(input scale, geometric median)", file=sys.stderr)
        rows = [self.batches.next_batch() for _ in range(n_batches)]
        sample = all_gather_rows(torch.cat(rows))  # every rank initialises from the same rows
        self.variance = initialise(self.sae, sample)

    def run(self, progress: bool = True, stop_at: int | None = None) -> SparseAutoencoder:
        """Train to ``settings.steps`` (or stop after step ``stop_at``, as a kill would), resuming
        from the checkpoint when there is one."""
        if not self.resume():
            self._initialise(progress and self.rank == 0)
        settings, sae = self.settings, self.sae
        base_lr = settings.learning_rate(sae.d_sae)
        bar = tqdm(total=settings.steps, initial=self.step, desc="training SAE", disable=not progress or self.rank > 0)
        sae.train()
        while self.step < settings.steps and (stop_at is None or self.step < stop_at):
            x = self.batches.next_batch() * sae.scale
            dead = self.since_fired >= settings.dead_after()
            loss, codes = _loss(sae, x, settings, self.variance, dead)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._synchronise_gradients()
            sae.remove_parallel_gradient()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = base_lr * settings.lr_factor(self.step, self.last_resample)
            self.optimizer.step()
            sae.normalise_decoder()
            stats = self._track(loss.detach(), codes)
            self.step += 1
            if self._resample_due():
                count = self.resample(x)
                if count and self.rank == 0 and progress:
                    bar.write(f"step {self.step}: resampled {count} dead latents")
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", L0=f"{stats['l0']:.1f}", dead=f"{stats['dead']:.3f}")
            if self.folder is not None and (self.step % settings.checkpoint_every == 0 or self.step == settings.steps):
                self.save_checkpoint()
        bar.close()
        sae.eval()
        return sae

    def _synchronise_gradients(self) -> None:
        if self.world == 1:
            return
        for parameter in self.sae.parameters():
            if parameter.grad is not None:
                all_reduce(parameter.grad).div_(self.world)

    @torch.no_grad()
    def _track(self, loss: torch.Tensor, codes: torch.Tensor) -> dict:
        """Update dead-latent counters and BatchTopK's threshold; return the step's statistics."""
        active = codes > 0
        fired = all_reduce(active.any(0).to(torch.long), torch.distributed.ReduceOp.MAX if self.world > 1 else None)
        self.since_fired += self.settings.batch_tokens
        self.since_fired[fired.bool()] = 0
        if self.settings.resamples:
            self.window_fires += all_reduce(active.sum(0).to(torch.long))
            self.window_tokens += self.settings.batch_tokens
        self.sae.architecture.after_step(self.sae, codes, self.settings)
        totals = all_reduce(torch.stack([loss.double(), active.sum(1).double().mean()])) / self.world
        stats = {"step": self.step, "loss": totals[0].item(), "l0": totals[1].item(),
                 "dead": (self.since_fired >= self.settings.dead_after()).double().mean().item()}
        if self.step % 10 == 0:
            self.history.append(stats)
        return stats

    def _resample_due(self) -> bool:
        settings = self.settings
        return (settings.resamples and self.resampled < settings.resample_times
                and self.step % settings.resample_every == 0 and self.step < settings.steps)

    @torch.no_grad()
    def resample(self, x: torch.Tensor) -> int:
        """Re-initialise the latents that fired on less than ``dead_frequency`` of the tokens since
        the last resample (the ReLU preset) from this step's normalised batch ``x`` (all
        ranks' rows): inputs are drawn with probability ∝ their squared reconstruction loss (seeded
        by seed and step, so every rank and a resumed run draw the same); the decoder row becomes
        the unit direction of ``x − b_dec``, the encoder column that direction times 0.2 × the mean
        encoder norm of the live latents, ``b_enc`` 0, and their Adam moments are reset. Returns
        the number of latents resampled; starts a new window and restarts the warm-up."""
        sae = self.sae
        dead = (self.window_fires.double() / max(1, self.window_tokens) < self.settings.dead_frequency).nonzero().flatten()
        self.window_fires.zero_()
        self.window_tokens, self.resampled, self.last_resample = 0, self.resampled + 1, self.step
        if dead.numel() == 0:
            return 0
        rows = all_gather_rows(x)
        losses = (rows - sae(rows).x_hat).pow(2).sum(1)
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + self.step)
        weights = losses.pow(2).cpu().double()
        picked = torch.multinomial(weights if weights.sum() > 0 else torch.ones_like(weights), dead.numel(),
                                   replacement=True, generator=generator)
        directions = torch.nn.functional.normalize(rows[picked.to(rows.device)] - sae.b_dec, dim=1)
        alive = torch.ones(sae.d_sae, dtype=torch.bool)
        alive[dead] = False
        encoder_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        sae.W_dec[dead] = directions
        sae.W_enc[:, dead] = directions.t() * 0.2 * encoder_norm
        sae.b_enc[dead] = 0.0
        for parameter, where in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
            for moment in self.optimizer.state.get(parameter, {}).values():
                if moment.dim() > 0:
                    moment[where] = 0.0
        return dead.numel()
