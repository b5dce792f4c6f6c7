"""The training loss of one step (SPEC §3.3), term by term:

    loss = L_rec + α_aux·var·L_aux + λ·sparsity + ramp(step)·Σ extra losses

L_rec the reconstruction loss; L_aux AuxK on the dead features, weighted by the batch's token
variance; the sparsity term and its coefficient λ come from the activation (decoder-weighted L1
for ReLU, STE L0 for JumpReLU, none for TopK/BatchTopK); the extra losses (the interaction
penalty) ramp in over ``extra_loss_warmup`` of the steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from crossint.crosscoder.config import CrosscoderConfig, TrainConfig
from crossint.crosscoder.distributed import SINGLE_PROCESS, Ranks
from crossint.crosscoder.losses import auxk_loss, reconstruction_loss, token_variance
from crossint.crosscoder.model import Crosscoder, CrosscoderOutput
from crossint.errors import CrossintError

ExtraLoss = Callable[[Crosscoder, Tensor, CrosscoderOutput], dict[str, Tensor]]
# Logged only (every log_every steps, without gradients), never added to the loss.
ExtraMetric = Callable[[Crosscoder, Tensor, CrosscoderOutput], dict[str, float]]


def dead_threshold(config: CrosscoderConfig, train_config: TrainConfig) -> int:
    """SPEC §3.3 default: 2M tokens or 10% of training, whichever is smaller."""
    if config.dead_tokens is not None:
        return config.dead_tokens
    return max(1, min(2_000_000, train_config.steps * train_config.batch_size // 10))


def extra_loss_ramp(step: int, steps: int, warmup_fraction: float) -> float:
    """The weight of the extra losses at ``step`` (0-based): linear from 1/n to 1 over the first
    n = warmup_fraction·steps steps, then 1."""
    ramp_steps = int(round(warmup_fraction * steps))
    return 1.0 if step >= ramp_steps else (step + 1) / ramp_steps


def auxk_term(crosscoder: Crosscoder, out: CrosscoderOutput, dead_U: Tensor, k_aux: int,
              variance: Tensor | None = None) -> Tensor:
    """SPEC §3.3 L_aux of this batch: the dead features' top-k_aux reconstruct the residual
    (``variance``: the denominator, see :func:`auxk_loss`)."""
    residual_BXD = (out.acts_norm_BXD - out.recon_norm_BXD).detach()
    return auxk_loss(
        out.pre_BH,
        crosscoder.W_dec_HXD,
        dead_U,
        residual_BXD,
        out.acts_norm_BXD,
        min(k_aux, dead_U.numel()),
        variance,
    )


@dataclass(frozen=True)
class Objective:
    """The loss of a run; calling it gives ``(loss, terms)`` for one step, ``terms`` being the
    unweighted named terms that metrics.jsonl logs (extra losses as weighted by the ramp)."""

    aux_alpha: float
    k_aux: int
    dead_after: int  # tokens without firing after which a feature is dead
    steps: int
    extra_loss_warmup: float
    extra_losses: tuple[ExtraLoss, ...] = ()
    ranks: Ranks = SINGLE_PROCESS  # data-parallel: the batch is spread over these ranks

    @classmethod
    def for_run(
        cls, config: CrosscoderConfig, train_config: TrainConfig,
        extra_losses: Sequence[ExtraLoss] = (), ranks: Ranks = SINGLE_PROCESS,
    ) -> Objective:
        return cls(
            aux_alpha=train_config.aux_alpha,
            k_aux=config.effective_aux_k,
            dead_after=dead_threshold(config, train_config),
            steps=train_config.steps,
            extra_loss_warmup=train_config.extra_loss_warmup,
            extra_losses=tuple(extra_losses),
            ranks=ranks,
        )

    def dead(self, tokens_since_fired_H: Tensor) -> Tensor:
        """Boolean mask of the dead features."""
        return tokens_since_fired_H >= self.dead_after

    def __call__(
        self,
        crosscoder: Crosscoder,
        acts_BXD: Tensor,
        out: CrosscoderOutput,
        step: int,
        tokens_since_fired_H: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        terms = {"rec_loss": reconstruction_loss(out.acts_norm_BXD, out.recon_norm_BXD)}
        loss = terms["rec_loss"]
        loss = self._add_auxk(loss, terms, crosscoder, out, tokens_since_fired_H)
        loss = self._add_sparsity(loss, terms, crosscoder, out)
        loss = self._add_extra_losses(loss, terms, crosscoder, acts_BXD, out, step)
        return loss, terms

    def _add_auxk(self, loss: Tensor, terms: dict[str, Tensor], crosscoder: Crosscoder,
                  out: CrosscoderOutput, tokens_since_fired_H: Tensor) -> Tensor:
        if self.aux_alpha <= 0:
            return loss
        dead_U = self.dead(tokens_since_fired_H).nonzero().squeeze(1)
        if dead_U.numel() == 0:
            return loss
        if self.ranks.world_size == 1:
            terms["aux_loss"] = auxk_term(crosscoder, out, dead_U, self.k_aux)
            variance = token_variance(out.acts_norm_BXD)
        else:
            terms["aux_loss"], variance = self._auxk_across_ranks(crosscoder, out, dead_U)
        # SPEC §3.3's L_aux is normalised by the batch variance while L_rec is not; weight it by
        # that variance per token (detached) so α_aux = 1/32 means what it does in Gao et al.
        # (both losses in one unit). Unweighted, AuxK is X·D times weaker and, with gradient
        # clipping, cannot revive anything.
        return loss + self.aux_alpha * variance * terms["aux_loss"]

    def _auxk_across_ranks(self, crosscoder: Crosscoder, out: CrosscoderOutput,
                           dead_U: Tensor) -> tuple[Tensor, Tensor]:
        """L_aux and the token variance of the global batch, both about its global mean. L_aux
        is a ratio of sums over the batch: this rank's numerator counts P times because the
        ranks' losses (and gradients) are averaged."""
        total_variance = self.ranks.total_variance(out.acts_norm_BXD)
        n_tokens = out.acts_norm_BXD.shape[0] * self.ranks.world_size
        aux = auxk_term(crosscoder, out, dead_U, self.k_aux, total_variance)
        return self.ranks.world_size * aux, total_variance / n_tokens

    @staticmethod
    def _add_sparsity(loss: Tensor, terms: dict[str, Tensor], crosscoder: Crosscoder,
                      out: CrosscoderOutput) -> Tensor:
        activation = crosscoder.activation
        coefficient = activation.sparsity_coefficient
        if coefficient <= 0:
            return loss
        terms["sparsity_loss"] = activation.sparsity_loss(crosscoder, out)
        return loss + coefficient * terms["sparsity_loss"]

    def _add_extra_losses(self, loss: Tensor, terms: dict[str, Tensor], crosscoder: Crosscoder,
                          acts_BXD: Tensor, out: CrosscoderOutput, step: int) -> Tensor:
        ramp = extra_loss_ramp(step, self.steps, self.extra_loss_warmup)
        if self.extra_losses and torch.is_autocast_enabled(acts_BXD.device.type):
            out = _float32(out)  # the penalty kernels are float32 and float64 code
        for extra in self.extra_losses:
            with torch.autocast(acts_BXD.device.type, enabled=False):
                computed = extra(crosscoder, acts_BXD, out)
            for name, value in computed.items():
                if name in terms or name == "loss":
                    raise CrossintError(f"extra loss name {name!r} clashes with a built-in")
                value = value if ramp == 1.0 else ramp * value
                terms[name] = value
                loss = loss + value
        return loss


def _float32(out: CrosscoderOutput) -> CrosscoderOutput:
    """``out`` with its low-precision tensors (from a pass under autocast) in float32."""
    changes = {f.name: getattr(out, f.name).float() for f in dataclasses.fields(out)
               if isinstance(getattr(out, f.name), Tensor)
               and getattr(out, f.name).dtype in (torch.bfloat16, torch.float16)}
    return dataclasses.replace(out, **changes)
