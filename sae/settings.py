"""Settings of sparse-autoencoder training and of the ``sae`` commands, one definition for the
library and the command line (:mod:`headlab.core.settings`). Importing this module costs no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.kinds import Integer, Maybe, Number, Registered
from ..core.settings import check_settings, setting
from .architectures import ARCHITECTURES, Architecture, architecture


@dataclass
class TrainSettings:
    """Everything that determines a run besides its data.

    ``batch_tokens`` is the global batch (split evenly over ranks). ``lr`` None applies the rule
    ``2e-4 / sqrt(d_sae / 2^14)``; warm-up is linear over ``warmup_steps`` (capped at 5% of the
    run), then constant, then a linear decay to 0 over the last ``decay_fraction``. The ReLU + L1
    preset instead uses Adam with betas (0, 0.9999), ``lr`` 1.2e-3 and a cosine decay over the run
    whose linear warm-up restarts after each resample; every ``resample_every`` steps (at most
    ``resample_times`` times) latents firing on less than ``dead_frequency`` of the tokens since
    the previous resample are re-initialised from high-loss inputs.
    ``l1_coefficient`` (ReLU, on inputs normalised to ``E‖x‖² = d_in``) and ``l0_coefficient``
    (JumpReLU, inputs normalised to ``E‖x‖² = 1``) are unverified defaults. A latent is dead
    after ``dead_tokens`` tokens without firing (None: min(10M, a tenth of the run), since short
    CPU runs never reach 10M); AuxK decodes the top ``k_aux`` (None: ``d_in // 2``) dead
    pre-activations with weight ``aux_coefficient``. The defaults are sized for a CPU run
    (200k tokens); published runs train on hundreds of millions.
    """

    arch: str = setting("topk", lambda: "architecture: " + "; ".join(f"{name}: {a.summary}"
                                                                    for name, a in ARCHITECTURES.items()),
                        kind=Registered(ARCHITECTURES, "SAE architectures"), flag="--arch")
    k: int = setting(32, "active latents (topk, batchtopk)", kind=Integer(1), flag="--k")
    expansion: int = setting(16, "d_sae = expansion x n_heads x d_head", kind=Integer(1), flag="--expansion")
    train_tokens: int = setting(200_000, "training tokens", kind=Integer(1), flag="--train-tokens")
    batch_tokens: int = setting(1024, "global batch in tokens", kind=Integer(1), flag="--batch-tokens")
    buffer_tokens: int = setting(32768, "shuffle buffer size in tokens (at most --train-tokens are gathered)",
                                 kind=Integer(1), flag="--buffer-tokens")
    lr: float | None = setting(None, "learning rate (default: 2e-4 / sqrt(d_sae / 2^14); relu: 1.2e-3)",
                               kind=Maybe(Number(0.0, low_open=True)), flag="--lr")
    warmup_steps: int = setting(1000, "linear warm-up steps (at most 5% of the run)", kind=Integer(0))
    decay_fraction: float = setting(0.2, "final fraction of the run with a linear decay", kind=Number(0.0, 1.0))
    l1_coefficient: float = setting(1.0, "relu: L1 coefficient on inputs normalised to E|x|^2 = d_in (unverified "
                                         "default)", kind=Number(0.0), flag="--l1")
    l0_coefficient: float = setting(0.002, "jumprelu: L0 coefficient", kind=Number(0.0))
    aux_coefficient: float = setting(1 / 32, "AuxK loss weight", kind=Number(0.0))
    k_aux: int | None = setting(None, "dead latents AuxK decodes (default d_in // 2)", kind=Maybe(Integer(1)))
    dead_tokens: int | None = setting(None, "tokens without firing after which a latent is dead",
                                      kind=Maybe(Integer(1)))
    init_rows: int = setting(32768, "rows for the decoder-bias initialisation (at most --train-tokens)", kind=Integer(1))
    threshold_ema: float = setting(0.999, "BatchTopK: EMA factor of the inference threshold (a run of fewer than "
                                          "10k steps averages over its last tenth instead)",
                                   kind=Number(0.0, 1.0, high_open=True))
    seed: int = setting(0, "seed", kind=Integer(0), flag="--seed")
    checkpoint_every: int = setting(50, "steps between checkpoints", kind=Integer(1), flag="--checkpoint-every")
    resample_every: int = setting(25_000, "relu: steps between dead-latent resamples (at most 4)", kind=Integer(1),
                                  flag="--resample-every")
    resample_times: int = setting(4, "relu: most resamples", kind=Integer(0))
    dead_frequency: float = setting(1e-6, "relu: firing frequency below which a latent is resampled",
                                    kind=Number(0.0, 1.0, True, True))

    def __post_init__(self):
        check_settings(self)

    def threshold_decay(self) -> float:
        """BatchTopK's threshold EMA factor: ``threshold_ema``, or for a short run one whose window is a
        tenth of the steps, so the threshold estimated from the first step on reflects the trained
        encoder of the run's end (never the 0 of a threshold not yet estimated)."""
        window = min(1 / (1 - self.threshold_ema), max(1.0, self.steps / 10))
        return 1 - 1 / window

    @property
    def steps(self) -> int:
        return max(1, self.train_tokens // self.batch_tokens)

    @property
    def architecture(self) -> Architecture:
        return architecture(self.arch)

    @property
    def resamples(self) -> bool:
        """Whether dead latents are resampled (the ReLU + L1 preset)."""
        return self.architecture.resamples and self.resample_times > 0

    def learning_rate(self, d_sae: int) -> float:
        return self.lr if self.lr is not None else self.architecture.learning_rate(d_sae)

    def adam_betas(self) -> tuple[float, float]:
        return self.architecture.adam_betas

    def lr_factor(self, step: int, warm_from: int = 0) -> float:
        """Multiplier of the learning rate at ``step`` (0-based); ``warm_from`` is the step of the
        last resample, where the ReLU preset's warm-up restarts."""
        return self.architecture.lr_factor(self, step, warm_from)

    def dead_after(self) -> int:
        return self.dead_tokens if self.dead_tokens is not None else min(10_000_000, max(1, self.train_tokens // 10))


__all__ = ["TrainSettings"]
