"""The crosscoder's configuration (SPEC §3): what is saved next to the weights in ``config.json``,
and the optimisation settings of a training run (``TrainConfig``, saved there too).

Validated on construction so that a bad value fails before any tensor is allocated, with a
message that names the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crossint.config import JsonConfig, invalid, is_int, is_number
from crossint.crosscoder import activations
from crossint.crosscoder.activations import ACTIVATIONS

__all__ = ["ACTIVATIONS", "ENCODER_BIAS_INITS", "CrosscoderConfig", "TrainConfig"]

# SPEC §3.2: the valid ``activation`` names are the keys of the registry ``ACTIVATIONS``
# (crosscoder/activations.py), read at validation time.
ENCODER_BIAS_INITS: tuple[str, ...] = ("zero", "calibrated")


def _fail(name: str, value: Any, allowed: str) -> None:
    invalid("crosscoder", name, value, allowed)


@dataclass
class CrosscoderConfig(JsonConfig):
    """Shape and behaviour of a crosscoder.

    Positions are ``X = (models, hookpoints)`` in model-major order: for two models and hookpoints
    ``[a, b]`` the position axis reads ``(m0, a), (m0, b), (m1, a), (m1, b)``.
    """

    hookpoints: list[str]
    models: list[str] = field(default_factory=lambda: ["model"])
    d_model: int = 768
    n_features: int = 2048
    activation: str = "batchtopk"
    # Active features per token for topk/batchtopk; always validated 1 <= k < n_features.
    k: int = 20
    # JumpReLU (SPEC §3.2): rectangle-kernel width of the straight-through estimator and the
    # initial per-feature threshold (both in normalised pre-activation units).
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    # Sparsity penalties (SPEC §3.3): decoder-norm-weighted L1 for relu, L0 for jumprelu. A
    # feature pays for itself under L1 only if its contribution's norm exceeds λ, and those
    # norms grow like sqrt(d_model): λ = 5 (Anthropic's) suits D in the hundreds, use less for
    # smaller models.
    l1_coefficient: float = 5.0
    l0_coefficient: float = 0.1
    # AuxK (SPEC §3.3): None -> X*D/2 ("D/2 summed over positions"), capped by the dead count.
    aux_k: int | None = None
    # A feature is dead after this many tokens without firing; None -> min(2M, 10% of training).
    dead_tokens: int | None = None
    # Paper: decoder bias frozen at zero.
    train_decoder_bias: bool = False
    # Training only: b_dec starts at the activations' mean (normalised units) and the encoder
    # reads a − b_dec, so no feature has to encode the mean. Folded into b_enc at save, so the
    # saved model has exactly the SPEC §3.1 form, with b_dec = the mean instead of 0. Without it
    # (the paper), a few features learn the large shared mean, fire on every token and take
    # BatchTopK's budget: on synthetic data with a realistic mean ~75% of features died and
    # AuxK could not revive them; centred, under 1% died and FVU was lower.
    center_inputs: bool = True
    # BatchTopK: the inference threshold is an exponential moving average of each training
    # batch's smallest selected pre-activation with this momentum.
    threshold_momentum: float = 0.99
    # SPEC §3.5: decoder rows start with this norm at every position.
    init_decoder_norm: float = 0.1
    # SPEC §3.5: "zero" (paper), or "calibrated" so that each feature fires on ≈ k/H of the
    # tokens of the normalisation sample at init.
    init_encoder_bias: str = "zero"
    # SPEC §3.4: True once the normalisation is folded into the weights (scale_X == 1).
    folded: bool = False
    # Set when a BatchTopK crosscoder is saved: it then loads as JumpReLU with the learned θ.
    trained_activation: str | None = None

    def __post_init__(self) -> None:
        self.hookpoints = self._names("hookpoints", self.hookpoints)
        self.models = self._names("models", self.models)
        self._check_sizes()
        self._check_numbers()
        self._check_choices()

    def _check_sizes(self) -> None:
        for name in ("d_model", "n_features", "k"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                _fail(name, value, "must be a positive integer")
        self._check_activation("activation", self.activation)
        if self.k >= self.n_features:
            _fail(
                "k",
                self.k,
                f"active features per token must be smaller than n_features={self.n_features}",
            )

    def _check_numbers(self) -> None:
        for name in ("jumprelu_bandwidth", "init_decoder_norm"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                _fail(name, value, "must be a positive number")
        for name in ("jumprelu_init_threshold", "l1_coefficient", "l0_coefficient"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                _fail(name, value, "must be a number >= 0")
        for name in ("aux_k", "dead_tokens"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                _fail(name, value, "must be a positive integer or null (automatic)")
        if not is_number(self.threshold_momentum) or not 0 <= self.threshold_momentum < 1:
            _fail("threshold_momentum", self.threshold_momentum, "must be in [0, 1)")

    def _check_choices(self) -> None:
        for name in ("train_decoder_bias", "center_inputs", "folded"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
        if self.init_encoder_bias not in ENCODER_BIAS_INITS:
            _fail(
                "init_encoder_bias",
                self.init_encoder_bias,
                f"valid choices are {', '.join(ENCODER_BIAS_INITS)}",
            )
        if self.trained_activation is not None:
            self._check_activation("trained_activation", self.trained_activation)

    @staticmethod
    def _check_activation(field_name: str, value: Any) -> None:
        if not isinstance(value, str) or value not in activations.ACTIVATIONS:
            _fail(field_name, value, f"valid activations are {activations.activation_names()}")

    @staticmethod
    def _names(field_name: str, value: Any) -> list[str]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            _fail(field_name, value, "must be a list of names")
        names = list(value)
        if not names or not all(isinstance(n, str) and n for n in names):
            _fail(field_name, value, "must be a non-empty list of non-empty names")
        if len(set(names)) != len(names):
            _fail(field_name, value, "names must be distinct")
        return names

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def n_positions(self) -> int:
        return len(self.models) * len(self.hookpoints)

    @property
    def positions(self) -> list[tuple[str, str]]:
        """(model, hookpoint) for every X index, model-major."""
        return [(m, h) for m in self.models for h in self.hookpoints]

    @property
    def effective_aux_k(self) -> int:
        """SPEC §3.3 default: D/2 summed over the positions."""
        if self.aux_k is not None:
            return self.aux_k
        return max(1, self.n_positions * self.d_model // 2)

    @classmethod
    def from_dict(cls, data: Any, where: str = "crosscoder config") -> CrosscoderConfig:
        return super().from_dict(data, where)


@dataclass
class TrainConfig(JsonConfig):
    """Optimisation settings (SPEC §3.3).

    ``lr`` defaults to 1e-3, not the paper's 1e-4, which is tuned for far longer runs: on sparse
    synthetic activations (D 32-64, H 512-1024, a few hundred to a few thousand steps) 1e-4
    left FVU at 0.66-0.70 where 1e-3 reached 0.03-0.46, without instability (activations are
    normalised, SPEC §3.4, and gradients clipped). Pass ``lr=1e-4`` for the paper's setting.
    """

    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_fraction: float = 0.05
    decay_fraction: float = 0.25
    seed: int = 0
    aux_alpha: float = 1 / 32
    # Fraction of the steps over which the extra losses (the interaction penalty) ramp linearly
    # from 0 to their full weight, so features form before the penalty reshapes them.
    extra_loss_warmup: float = 0.0
    checkpoint_every: int = 500
    log_every: int = 10
    normalisation_tokens: int = 200_000
    device: str = "cpu"
    # Mixed precision: run the forward pass and the loss under torch.autocast in this dtype
    # (the parameters, Adam and the gradient clipping stay float32). Only bfloat16: float16
    # would need loss scaling.
    autocast: str | None = None
    # Parts an activation cache's shards are dealt into, each read by its own stream that gives
    # batch_size / data_parts rows of every batch (crossint.crosscoder.distributed.RankReader).
    # None: the number of torchrun processes when the cache's shards deal into that many even
    # parts (each process reads only its own), else 1 (every process reads the whole source).
    data_parts: int | None = None

    def __post_init__(self) -> None:
        def fail(name: str, allowed: str) -> None:
            invalid("training", name, getattr(self, name), allowed)

        for name in (
            "steps",
            "batch_size",
            "checkpoint_every",
            "log_every",
            "normalisation_tokens",
        ):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "must be a positive integer")
        if not is_int(self.seed) or self.seed < 0:
            fail("seed", "must be an integer >= 0")
        for name in ("lr", "adam_eps", "grad_clip"):
            if not is_number(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name, "must be a positive number")
        for name in ("adam_beta1", "adam_beta2"):
            if not is_number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                fail(name, "must be in [0, 1)")
        for name in ("warmup_fraction", "decay_fraction", "extra_loss_warmup"):
            if not is_number(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                fail(name, "must be in [0, 1]")
        if self.warmup_fraction + self.decay_fraction > 1:
            fail("decay_fraction", "warmup_fraction + decay_fraction must be at most 1")
        if not is_number(self.aux_alpha) or self.aux_alpha < 0:
            fail("aux_alpha", "must be a number >= 0")
        self._check_hardware_settings(fail)

    def _check_hardware_settings(self, fail: Any) -> None:
        if not isinstance(self.device, str):
            fail("device", "must be a device name such as cpu or cuda")
        if self.autocast not in (None, "bfloat16"):
            fail("autocast", "must be bfloat16 (or absent: float32 throughout)")
        if self.data_parts is not None and (not is_int(self.data_parts) or self.data_parts < 1):
            fail("data_parts", "must be a positive integer (or absent: one per process)")

    @classmethod
    def from_dict(cls, data: Any, where: str = "training config") -> TrainConfig:
        return super().from_dict(data, where)
