"""Crosscoder activation functions (SPEC §3.2) and their sparsity penalties (SPEC §3.3).

The math is pure functions of the pre-activations ``pre_BH``; every one returns a dense ``f_BH``
that is exactly zero outside the active features (the model decodes the non-zeros sparsely).

Each activation is one :class:`Activation` subclass that calls that math and owns everything
else that depends on the kind: its threshold tensor, training vs inference forward, sparsity
loss and coefficient, update after the optimiser step, sparse or dense decoding, the encoder-bias
calibration level and the config it is saved with. ``ACTIVATIONS`` maps each
``CrosscoderConfig.activation`` name to its class: adding an activation is one new class and one
registry entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from crossint.errors import CrossintError

if TYPE_CHECKING:
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.distributed import Ranks
    from crossint.crosscoder.model import Crosscoder, CrosscoderOutput


def topk(pre_BH: Tensor, k: int) -> Tensor:
    """SPEC §3.2 TopK: keep the k largest pre-activations per token, ReLU them, zero the rest."""
    values_BK, indices_BK = pre_BH.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BH).scatter(-1, indices_BK, values_BK.relu())


def batchtopk(pre_BH: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """SPEC §3.2 BatchTopK: keep the k·B largest pre-activations of the whole batch, then ReLU.

    Returns ``(f_BH, smallest_selected)`` where ``smallest_selected`` (a detached 0-d tensor) is the
    smallest *positive* selected value, the quantity whose running mean is the inference threshold
    θ. A selected value <= 0 is zeroed by the ReLU and never fires, so it must not lower θ below 0
    (a negative θ would let negative pre-activations through ``pre·1[pre > θ]``).
    """
    n_tokens, n_features = pre_BH.shape
    flat_F = pre_BH.reshape(-1)
    values_E, indices_E = flat_F.topk(min(k * n_tokens, flat_F.numel()), sorted=False)
    values_E = values_E.relu()
    f_BH = torch.zeros_like(flat_F).scatter(0, indices_E, values_E).view(n_tokens, n_features)
    detached_E = values_E.detach()
    positive_min = torch.where(detached_E > 0, detached_E, torch.inf).min()
    smallest = torch.where(torch.isinf(positive_min), torch.zeros_like(positive_min), positive_min)
    return f_BH, smallest


def batchtopk_across_ranks(pre_BH: Tensor, k: int, ranks: Ranks) -> tuple[Tensor, Tensor]:
    """:func:`batchtopk` of the global batch when each data-parallel rank holds B/P of its tokens:
    keep this rank's pre-activations among the k·B largest of all ranks, then ReLU.

    The k·B largest overall are among every rank's own k·B largest, so the ranks all-gather
    those (detached) and each finds the same cutoff and ``smallest_selected``. Values tied with
    the cutoff are all kept (topk would keep some of them; ties do not happen with float data).
    """
    n_selected = k * pre_BH.shape[0] * ranks.world_size
    flat_F = pre_BH.detach().reshape(-1)
    candidates_E = flat_F.topk(min(n_selected, flat_F.numel()), sorted=False).values
    selected_E = ranks.gather(candidates_E).topk(n_selected, sorted=False).values
    f_BH = torch.where(pre_BH >= selected_E.min(), pre_BH.relu(), torch.zeros_like(pre_BH))
    positive_E = selected_E[selected_E > 0]
    smallest = positive_E.min() if positive_E.numel() else selected_E.new_zeros(())
    return f_BH, smallest


def threshold_activation(pre_BH: Tensor, threshold_H: Tensor) -> Tensor:
    """Inference form of BatchTopK and JumpReLU: ``f = pre · 1[pre > θ]`` (per token, no batch)."""
    return torch.where(pre_BH > threshold_H, pre_BH, torch.zeros_like(pre_BH))


def relu(pre_BH: Tensor) -> Tensor:
    """SPEC §3.2 ReLU (trained with the decoder-norm-weighted L1 penalty)."""
    return pre_BH.relu()


def _rectangle_BH(pre_BH: Tensor, threshold_H: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel K((pre − θ)/ε) with K(u) = 1[|u| < 1/2]."""
    return ((pre_BH - threshold_H).abs() < bandwidth / 2).to(pre_BH.dtype)


class _JumpReLUFunction(torch.autograd.Function):
    """JumpReLU with the straight-through estimator of Rajamanoharan et al. (2024).

    d f/d pre = 1[pre > θ];  d f/d θ = −(θ/ε)·K((pre − θ)/ε)  (rectangle kernel K).
    """

    @staticmethod
    def forward(ctx, pre_BH: Tensor, threshold_H: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BH, threshold_H)
        ctx.bandwidth = bandwidth
        return torch.where(pre_BH > threshold_H, pre_BH, torch.zeros_like(pre_BH))

    @staticmethod
    def backward(ctx, grad_BH: Tensor):
        pre_BH, threshold_H = ctx.saved_tensors
        grad_pre = grad_threshold = None
        if ctx.needs_input_grad[0]:
            grad_pre = grad_BH * (pre_BH > threshold_H).to(grad_BH.dtype)
        if ctx.needs_input_grad[1]:
            kernel_BH = _rectangle_BH(pre_BH, threshold_H, ctx.bandwidth)
            grad_threshold = (-(threshold_H / ctx.bandwidth) * kernel_BH * grad_BH).sum_to_size(
                threshold_H.shape
            )
        return grad_pre, grad_threshold, None


class _StepFunction(torch.autograd.Function):
    """Heaviside step 1[pre > θ] with d/dθ = −(1/ε)·K((pre − θ)/ε) and no gradient to pre."""

    @staticmethod
    def forward(ctx, pre_BH: Tensor, threshold_H: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BH, threshold_H)
        ctx.bandwidth = bandwidth
        return (pre_BH > threshold_H).to(pre_BH.dtype)

    @staticmethod
    def backward(ctx, grad_BH: Tensor):
        pre_BH, threshold_H = ctx.saved_tensors
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            kernel_BH = _rectangle_BH(pre_BH, threshold_H, ctx.bandwidth)
            grad_threshold = (-(1.0 / ctx.bandwidth) * kernel_BH * grad_BH).sum_to_size(
                threshold_H.shape
            )
        grad_pre = torch.zeros_like(pre_BH) if ctx.needs_input_grad[0] else None
        return grad_pre, grad_threshold, None


def jumprelu(pre_BH: Tensor, threshold_H: Tensor, bandwidth: float) -> Tensor:
    """SPEC §3.2 JumpReLU ``pre · 1[pre > θ_H]`` with the rectangle-kernel STE for θ."""
    return _JumpReLUFunction.apply(pre_BH, threshold_H, bandwidth)


def jumprelu_l0(pre_BH: Tensor, threshold_H: Tensor, bandwidth: float) -> Tensor:
    """Mean number of active features per token, differentiable in θ through the STE."""
    return _StepFunction.apply(pre_BH, threshold_H, bandwidth).sum(dim=-1).mean()


def decoder_weighted_l1(f_BH: Tensor, W_dec_HXD: Tensor) -> Tensor:
    """SPEC §3.2 ReLU penalty: mean over tokens of Σ_h f_h Σ_x ‖W_dec[h, x]‖."""
    norm_H = W_dec_HXD.norm(dim=-1).sum(dim=-1)
    return (f_BH * norm_H).sum(dim=-1).mean()


# --- the activations as classes ----------------------------------------------------------------
class Activation:
    """One activation kind (SPEC §3.2), built from the crosscoder's config.

    A subclass sets ``name`` (its ``CrosscoderConfig.activation`` value) and defines
    :meth:`forward`; the other defaults describe a dense activation with an unused threshold, no
    sparsity penalty and no after-step update, and subclasses override what differs.
    ``Crosscoder`` registers ``threshold_H`` through :meth:`register_threshold` and calls
    :meth:`forward`, :meth:`decodes_sparsely`, :attr:`calibration_level` and
    :meth:`saved_config`; the trainer adds ``sparsity_coefficient · sparsity_loss`` to the loss
    (when the coefficient is > 0), calls :meth:`after_step` after every optimiser step and logs
    :meth:`metrics`.
    """

    name: ClassVar[str]

    def __init__(self, config: CrosscoderConfig, ranks: Ranks | None = None) -> None:
        self.config = config
        # Data-parallel training: the ranks whose tokens form one batch (None: this process's).
        self.ranks = ranks

    def register_threshold(self, crosscoder: nn.Module) -> None:
        """Give the crosscoder its ``threshold_H``: by default a zero buffer (unused)."""
        crosscoder.register_buffer("threshold_H", torch.zeros(self.config.n_features))

    def forward(
        self, pre_BH: Tensor, threshold_H: Tensor, training: bool
    ) -> tuple[Tensor, Tensor | None]:
        """``(f_BH, batch_threshold)``: the features, and a batch statistic for
        :meth:`after_step` (None unless the activation has one)."""
        raise NotImplementedError

    @property
    def sparsity_coefficient(self) -> float:
        """Weight of :meth:`sparsity_loss` in the training loss (0: no sparsity term)."""
        return 0.0

    def sparsity_loss(self, crosscoder: Crosscoder, out: CrosscoderOutput) -> Tensor:
        """The unweighted sparsity term (SPEC §3.3); only called when the coefficient is > 0."""
        return out.pre_BH.new_zeros(())

    def after_step(self, crosscoder: Crosscoder, out: CrosscoderOutput, step: int) -> None:
        """Called without gradients after the optimiser step of 0-based ``step``."""

    def decodes_sparsely(self, training_with_grad: bool) -> bool:
        """Whether :class:`Crosscoder` gathers the active decoder rows (else a dense product)."""
        return False

    @property
    def calibration_level(self) -> float:
        """SPEC §3.5 calibrated init: the pre-activation level at which a feature starts firing."""
        return 0.0

    def saved_config(self) -> CrosscoderConfig:
        """The config a saved copy carries (the activation it runs as at inference)."""
        return self.config

    def metrics(self, crosscoder: Crosscoder, out: CrosscoderOutput) -> dict[str, float]:
        """Extra values for metrics.jsonl at a logging step (after the update)."""
        return {}


class TopK(Activation):
    """SPEC §3.2 TopK: the k largest pre-activations of every token; no sparsity penalty."""

    name = "topk"

    def forward(
        self, pre_BH: Tensor, threshold_H: Tensor, training: bool
    ) -> tuple[Tensor, Tensor | None]:
        return topk(pre_BH, self.config.k), None

    def decodes_sparsely(self, training_with_grad: bool) -> bool:
        return True


class BatchTopK(TopK):
    """SPEC §3.2 BatchTopK: the k·B largest pre-activations of the batch while training; at
    inference ``pre·1[pre > θ]`` with θ (buffer ``threshold_H``, one value for every feature)
    the running mean of the smallest selected value. Saved as JumpReLU with that θ."""

    name = "batchtopk"

    def forward(
        self, pre_BH: Tensor, threshold_H: Tensor, training: bool
    ) -> tuple[Tensor, Tensor | None]:
        if training and self.ranks is not None and self.ranks.world_size > 1:
            return batchtopk_across_ranks(pre_BH, self.config.k, self.ranks)
        if training:
            return batchtopk(pre_BH, self.config.k)
        # Inference uses θ so that a token's features never depend on its batch.
        return threshold_activation(pre_BH, threshold_H), None

    def after_step(self, crosscoder: Crosscoder, out: CrosscoderOutput, step: int) -> None:
        """θ ← m·θ + (1 − m)·smallest selected value (the first step takes the value as is)."""
        if out.batch_threshold is None:
            return
        threshold_H = crosscoder.threshold_H
        theta = out.batch_threshold.to(threshold_H.dtype)
        if step > 0:
            m = self.config.threshold_momentum
            theta = m * threshold_H + (1 - m) * theta
        threshold_H.copy_(theta.expand_as(threshold_H))

    def saved_config(self) -> CrosscoderConfig:
        return self.config.replace(activation=JumpReLU.name, trained_activation=self.name)

    def metrics(self, crosscoder: Crosscoder, out: CrosscoderOutput) -> dict[str, float]:
        if out.batch_threshold is None:
            return {}
        return {"threshold": crosscoder.threshold_H[0].item()}


class JumpReLU(Activation):
    """SPEC §3.2 JumpReLU ``pre·1[pre > θ_H]`` with a learned per-feature θ (parameter
    ``threshold_H``, straight-through estimator) and the STE L0 penalty."""

    name = "jumprelu"

    def register_threshold(self, crosscoder: nn.Module) -> None:
        cfg = self.config
        crosscoder.threshold_H = nn.Parameter(
            torch.full((cfg.n_features,), cfg.jumprelu_init_threshold)
        )

    def forward(
        self, pre_BH: Tensor, threshold_H: Tensor, training: bool
    ) -> tuple[Tensor, Tensor | None]:
        return jumprelu(pre_BH, threshold_H, self.config.jumprelu_bandwidth), None

    @property
    def sparsity_coefficient(self) -> float:
        return self.config.l0_coefficient

    def sparsity_loss(self, crosscoder: Crosscoder, out: CrosscoderOutput) -> Tensor:
        return jumprelu_l0(out.pre_BH, crosscoder.threshold_H, self.config.jumprelu_bandwidth)

    def after_step(self, crosscoder: Crosscoder, out: CrosscoderOutput, step: int) -> None:
        crosscoder.threshold_H.clamp_(min=0.0)  # θ >= 0 keeps f = pre·1[pre > θ] >= 0

    def decodes_sparsely(self, training_with_grad: bool) -> bool:
        # θ's straight-through gradient needs the upstream gradient at features just below θ,
        # which are zero in f and so absent from a sparse decode.
        return not training_with_grad

    @property
    def calibration_level(self) -> float:
        return self.config.jumprelu_init_threshold


class ReLU(Activation):
    """SPEC §3.2 ReLU, trained with the decoder-norm-weighted L1 penalty."""

    name = "relu"

    def forward(
        self, pre_BH: Tensor, threshold_H: Tensor, training: bool
    ) -> tuple[Tensor, Tensor | None]:
        return relu(pre_BH), None

    @property
    def sparsity_coefficient(self) -> float:
        return self.config.l1_coefficient

    def sparsity_loss(self, crosscoder: Crosscoder, out: CrosscoderOutput) -> Tensor:
        return decoder_weighted_l1(out.f_BH, crosscoder.W_dec_HXD)


# The registry: CrosscoderConfig.activation names -> classes (validation reads it).
ACTIVATIONS: dict[str, type[Activation]] = {
    cls.name: cls for cls in (TopK, BatchTopK, JumpReLU, ReLU)
}


def activation_names() -> str:
    """The registered names, for error messages."""
    return ", ".join(ACTIVATIONS)


def make_activation(config: CrosscoderConfig, ranks: Ranks | None = None) -> Activation:
    """The activation object ``config.activation`` names (``ranks``: the data-parallel ranks
    that share a batch while training)."""
    cls = ACTIVATIONS.get(config.activation)
    if cls is None:
        raise CrossintError(
            f"unknown activation {config.activation!r}: valid activations are "
            f"{activation_names()}"
        )
    return cls(config, ranks)
