"""Interaction penalties as training losses (SPEC §4.4): what a penalty is, its kinds, and how it
plugs into :func:`crossint.crosscoder.train.train`.

A penalty is a small frozen dataclass: its weight λ, its kind's options, and ``value``, the
differentiable L_int of a batch of feature activations at the MLP blocks the crosscoder reads.
A new kind is one subclass registered in ``PENALTY_KINDS``; settings, validation, config.json
records, resume checks, the CLI flags' help and the sweep all go through this interface.

    penalty = DominancePenalty(weight=300, normalise="total")
    crosscoder = train_with_penalty(cc_config, train_config, cache, "runs/pen", penalty)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from crossint.crosscoder.distributed import divide, ranks_from_environment
from crossint.errors import CrossintError
from crossint.interactions.additivity import (
    PENALTY_NORMALISATIONS,
    additivity_penalty,
    keep_error_penalty,
)
from crossint.interactions.contributions import (
    ActiveFeatures,
    MLPFeatureBlock,
    Ratio,
    active_features,
    feature_blocks,
    mlp_on,
    resolve_chunk,
)
from crossint.interactions.mlp import (
    check_penalty_options,
    interaction_penalty,
)
from crossint.models.hookpoints import blocks_with_site, n_blocks_spanned

if TYPE_CHECKING:
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.model import Crosscoder, CrosscoderOutput
    from crossint.crosscoder.train import ActivationSource, ExtraLoss, ExtraMetric, TrainConfig
    from crossint.models.adapter import MLPWeights

CONFIG_KEY = "interaction_penalty"  # the run's config.json entry recording its penalty
LOSS_NAME = "interaction"  # metrics.jsonl: λ·L_int (the trained term)


@dataclass(frozen=True)
class Penalty:
    """An interaction penalty λ·L_int. Subclasses set ``kind``, add their options as fields
    (validated in ``__post_init__``) and implement :meth:`value`."""

    kind: ClassVar[str] = ""
    weight: float = 0.0
    # L_int on the first ``sample`` fraction of each batch's tokens: an unbiased estimate of the
    # batch mean (batches are random samples of the cache), at that fraction of the cost
    sample: float = dataclasses.field(default=1.0, kw_only=True)

    def __post_init__(self) -> None:
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                math.isfinite(weight) and weight >= 0):
            raise CrossintError(
                "the interaction penalty weight λ (--interaction-penalty) must be a finite "
                f"number >= 0, got {weight!r}"
            )
        sample = self.sample
        if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not (
                0 < sample <= 1):
            raise CrossintError(
                f"the penalty's token sample (--penalty-sample) must be a fraction in (0, 1], "
                f"got {sample!r}"
            )

    def sampled_tokens(self, n_tokens: int) -> int:
        """How many of a batch's ``n_tokens`` tokens L_int is computed on (at least one)."""
        return max(1, math.ceil(self.sample * n_tokens))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "weight")

    def options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.option_names()}

    def value(self, active: ActiveFeatures, blocks: Sequence[MLPFeatureBlock],
              chunk_tokens: int | None = None, ratio: Ratio = divide) -> Tensor:
        """L_int of the batch (unweighted), differentiable in f and in the decoder rows.
        ``ratio`` divides the sums of a normalised kind (``Ranks.ratio`` under torchrun)."""
        raise NotImplementedError

    def record(self, blocks: Sequence[int]) -> dict[str, Any]:
        """The config.json entry (``CONFIG_KEY``) of a run trained with this penalty."""
        return {"kind": self.kind, "lambda": float(self.weight), **self.options(),
                "blocks": list(blocks)}

    def with_weight(self, weight: float) -> Penalty:
        return dataclasses.replace(self, weight=weight)

    def describe(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options().items()
                            if not (k == "sample" and v == 1.0))
        return f"{self.kind} λ={self.weight:g}" + (f" ({options})" if options else "")


@dataclass(frozen=True)
class DominancePenalty(Penalty):
    """The paper's penalty (SPEC §4.4): the non-dominant input S − Mx of every MLP neuron,
    weighted (``uniform`` or by ‖W_out[n]‖) and optionally normalised (``total``: one minus the
    mass-weighted dominant share; ``neuron``: one minus the dominant share itself)."""

    kind: ClassVar[str] = "dominance"
    weighting: str = "uniform"
    normalise: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "normalise", check_penalty_options(self.weighting,
                                                                    self.normalise))

    def value(self, active: ActiveFeatures, blocks: Sequence[MLPFeatureBlock],
              chunk_tokens: int | None = None, ratio: Ratio = divide) -> Tensor:
        return interaction_penalty(active, blocks, self.weighting, self.normalise, chunk_tokens,
                                   ratio)


@dataclass(frozen=True)
class OutputErrorPenalty(Penalty):
    """A SPEC §4.7 penalty on a squared MLP output error averaged over tokens and blocks, by
    ``error_sum`` (``normalise="effect"``: each block's divided by the features' whole effect)."""

    normalise: str = "none"
    error_sum: ClassVar[Any] = None  # (active, blocks, chunk_tokens, normalise, ratio) -> L_int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalise not in PENALTY_NORMALISATIONS:
            raise CrossintError(
                f"the {self.kind} penalty's normalisation must be one of "
                f"{', '.join(PENALTY_NORMALISATIONS)} (got {self.normalise!r}); 'effect' divides "
                "each block's error by its features' whole effect on the MLP"
            )

    def value(self, active: ActiveFeatures, blocks: Sequence[MLPFeatureBlock],
              chunk_tokens: int | None = None, ratio: Ratio = divide) -> Tensor:
        return self.error_sum(active, list(blocks), chunk_tokens, self.normalise, ratio)


@dataclass(frozen=True)
class KeepErrorPenalty(OutputErrorPenalty):
    """SPEC §4.7 ``keep_error``: the MLP output error of keeping only the dominant feature at
    each neuron, ‖(h(z) − h(z_keep))·W_out‖² (dominant slot held fixed in the backward). It asks
    for what Φ_keep_largest measures and ignores neurons where sharing does no harm."""

    kind: ClassVar[str] = "keep_error"
    error_sum: ClassVar[Any] = staticmethod(keep_error_penalty)


@dataclass(frozen=True)
class AdditivityPenalty(OutputErrorPenalty):
    """SPEC §4.7 ``additivity``: A² = ‖MLP(x̂) − MLP_ind(x̂)‖², the squared error of the
    independent-effects surrogate. Neurons in a linear or off regime stay free to be shared."""

    kind: ClassVar[str] = "additivity"
    error_sum: ClassVar[Any] = staticmethod(additivity_penalty)


# One line per kind: the name users pass as --penalty-kind and that config.json records.
PENALTY_KINDS: dict[str, type[Penalty]] = {
    cls.kind: cls for cls in (DominancePenalty, KeepErrorPenalty, AdditivityPenalty)
}
DEFAULT_KIND = DominancePenalty.kind


def penalty_class(kind: str) -> type[Penalty]:
    if kind not in PENALTY_KINDS:
        raise CrossintError(
            f"unknown penalty kind {kind!r}: valid kinds are {', '.join(PENALTY_KINDS)}"
        )
    return PENALTY_KINDS[kind]


def make_penalty(kind: str = DEFAULT_KIND, weight: float = 0.0, **options: Any) -> Penalty:
    """A penalty of ``kind``; an option the kind does not have is an error naming its options."""
    cls = penalty_class(kind)
    foreign = sorted(set(options) - set(cls.option_names()))
    if foreign:
        own = ", ".join(cls.option_names()) or "none"
        raise CrossintError(
            f"the {kind} penalty has no option {', '.join(foreign)} (its options: {own})"
        )
    return cls(weight=weight, **options)


def penalty_from_record(record: Mapping[str, Any] | None) -> Penalty:
    """The penalty a run's config.json records (no record: λ = 0). Records written before
    penalty kinds existed have no ``kind`` (they are dominance penalties) and may store the
    normalisation as a bool."""
    record = dict(record or {})
    kind = record.pop("kind", DEFAULT_KIND)
    weight = float(record.pop("lambda", 0.0))
    record.pop("blocks", None)
    return make_penalty(kind, weight, **record)


def same_penalty(record: Mapping[str, Any] | None, penalty: Penalty) -> bool:
    """Whether a stored record means exactly ``penalty`` (whatever version wrote it)."""
    try:
        return penalty_from_record(record) == penalty
    except CrossintError:
        return False


# --- the MLPs a penalty needs --------------------------------------------------------------------
def source_blocks(source: ActivationSource) -> list[int]:
    """The blocks l whose ``blocks.{l}.mlp_in`` the activations hold."""
    return blocks_with_site(list(source.hookpoints), "mlp_in")


def load_penalty_mlps(source: ActivationSource, device: str = "cpu") -> dict[int, MLPWeights]:
    """The subject model's MLP weights at every mlp_in block of ``source`` (a harvested cache:
    its manifest names the model; a stream: its own loaded model, not loaded again). The
    penalty needs the model's own W_in and W_out."""
    from crossint.models.adapter import check_model_matches, load_model

    where = getattr(source, "path", None) or type(source).__name__
    blocks = source_blocks(source)
    if not blocks:
        raise CrossintError(
            f"activations at {where} have no blocks.{{l}}.mlp_in hookpoint (they have "
            f"{', '.join(source.hookpoints)}); the interaction penalty needs the MLP inputs: "
            "harvest with the paper layout or add blocks.{l}.mlp_in"
        )
    model = getattr(source, "model", None)
    if not isinstance(model, str):
        raise CrossintError(
            f"activations at {where} do not name their model; pass the MLP weights "
            "({block: adapter.mlp_weights(block)}) yourself"
        )
    adapter = getattr(source, "adapter", None) or load_model(model, device=device)
    manifest = getattr(source, "manifest", None) or {}
    check_model_matches(adapter, manifest.get("model_info") or {}, set(source.dims.values()),
                        f"activations at {where}")
    if n_blocks_spanned(source.hookpoints) > adapter.n_blocks:
        raise CrossintError(f"activations at {where} read blocks model {model!r} lacks")
    return {block: adapter.mlp_weights(block) for block in blocks}


# --- the training plug-in ------------------------------------------------------------------------
class _PlacedMLPs:
    """The MLP weights moved to the crosscoder's device and dtype once, not at every step."""

    def __init__(self, mlps: Mapping[int, MLPWeights], model: str | None) -> None:
        if not mlps:
            raise CrossintError("no MLP blocks given: pass {block: adapter.mlp_weights(block)}")
        self.mlps, self.model = dict(mlps), model
        self._placed: dict[tuple[torch.device, torch.dtype], dict[int, MLPWeights]] = {}

    def blocks(self, crosscoder: Crosscoder) -> list[MLPFeatureBlock]:
        key = (crosscoder.W_dec_HXD.device, crosscoder.W_dec_HXD.dtype)
        if key not in self._placed:
            self._placed = {key: {b: mlp_on(m, *key) for b, m in self.mlps.items()}}
        return feature_blocks(crosscoder, self._placed[key], model=self.model)


def penalty_loss(penalty: Penalty, mlps: Mapping[int, MLPWeights], model: str | None = None,
                 chunk_tokens: int | None = None) -> ExtraLoss:
    """``penalty`` as a training ``extra_losses`` callable: ``fn(crosscoder, acts_BXD, output)
    -> {"interaction": λ·L_int}`` with the crosscoder's current decoder at every given block's
    ``mlp_in``. ``model`` selects the model of a multi-model crosscoder."""
    if chunk_tokens is not None:
        resolve_chunk(chunk_tokens, torch.device("cpu"))
    placed = _PlacedMLPs(mlps, model)
    ratio = ranks_from_environment().ratio  # a normalised kind's ratio over the global batch

    def loss(crosscoder: Crosscoder, acts_BXD: Tensor,
             output: CrosscoderOutput) -> dict[str, Tensor]:
        f_BH = output.f_BH[: penalty.sampled_tokens(output.f_BH.shape[0])]
        active = active_features(f_BH)
        return {LOSS_NAME: penalty.weight * penalty.value(active, placed.blocks(crosscoder),
                                                          chunk_tokens, ratio)}

    return loss


def batch_dominant_share(active: ActiveFeatures, blocks: Sequence[MLPFeatureBlock]) -> float:
    """The plain mean SPEC §4.2 dominant share over the batch's tokens × neurons × blocks, from
    the same fused maximum-and-sum pass the dominance penalty uses (tokens sorted by count)."""
    from crossint.interactions.contributions import SHARE_EPS, distinct_virtual_weights
    from crossint.interactions.kernels import dominant_magnitudes

    total, count = 0.0, 0
    for block in blocks:
        V_UN, row_BK = distinct_virtual_weights(active, block.d_HD, block.mlp.W_in_DN)
        chunk = resolve_chunk(None, V_UN.device, active.features_BK.shape[1] * V_UN.shape[1])
        _, Mx_BN, S_BN = dominant_magnitudes(active.f_BK.to(V_UN.dtype).abs(), V_UN.abs(),
                                             row_BK, active.counts_B, chunk, with_sum=True)
        total += float(((Mx_BN + SHARE_EPS) / (S_BN + SHARE_EPS)).double().sum())
        count += Mx_BN.numel()
    return total / max(count, 1)


def penalty_metrics(penalty: Penalty, mlps: Mapping[int, MLPWeights],
                    model: str | None = None) -> ExtraMetric:
    """A logged-only metric: the unweighted L_int (the same ``value`` the loss uses) and the
    plain mean dominant share (SPEC §4.2) of the batch."""
    placed = _PlacedMLPs(mlps, model)
    ratio = ranks_from_environment().ratio

    def metric(crosscoder: Crosscoder, acts_BXD: Tensor,
               output: CrosscoderOutput) -> dict[str, float]:
        with torch.no_grad():
            blocks = placed.blocks(crosscoder)
            active = active_features(output.f_BH.detach()).by_count()
            value = penalty.value(active, blocks, ratio=ratio)
        return {"interaction_penalty": float(value),
                "dominant_share": batch_dominant_share(active, blocks)}

    return metric


def train_with_penalty(
    crosscoder_config: CrosscoderConfig,
    train_config: TrainConfig,
    source: ActivationSource,
    out_dir: str | Path,
    penalty: Penalty | None = None,
    *,
    resume: bool = False,
    log_interactions: bool = False,
    mlps: Mapping[int, MLPWeights] | None = None,
    progress: bool = True,
) -> Crosscoder:
    """Train a crosscoder with ``penalty`` (None: λ = 0) and record it in config.json.

    The MLP weights come from the subject model the cache names unless ``mlps`` is given; they
    are loaded only when λ > 0 or ``log_interactions`` (which logs L_int and the dominant share
    in metrics.jsonl whatever λ). ``resume``: continue the run in ``out_dir`` from its last
    checkpoint; it must have been started with the same settings and penalty (a record written
    by an older crossint that means the same penalty is kept as it is)."""
    from crossint.crosscoder.train import train
    from crossint.rundir import RunDir

    penalty = penalty if penalty is not None else DominancePenalty()
    needs_mlps = penalty.weight > 0 or log_interactions
    if needs_mlps and mlps is None:
        # Under torchrun, on this rank's own GPU.
        device = ranks_from_environment().device_name(train_config.device)
        mlps = load_penalty_mlps(source, device=device)
    losses = [penalty_loss(penalty, mlps)] if penalty.weight > 0 else []
    metrics = [penalty_metrics(penalty, mlps)] if needs_mlps else []
    record = penalty.record(source_blocks(source))
    if resume:
        run = RunDir(out_dir)
        saved = run.read_config() if run.config.is_file() else None
        if saved is not None and CONFIG_KEY not in saved and penalty.weight == 0:
            record = None  # a run started without a penalty record (by plain ``train``)
        elif saved is not None and same_penalty(saved.get(CONFIG_KEY), penalty):
            record = saved[CONFIG_KEY]
    return train(crosscoder_config, train_config, source, out_dir, resume=resume,
                 progress=progress, extra_losses=losses, extra_metrics=metrics,
                 extra_config=None if record is None else {CONFIG_KEY: record})


def run_penalty(run_dir: str | Path) -> Penalty:
    """The penalty a run was trained with (λ = 0 if it records none)."""
    from crossint.rundir import RunDir

    return penalty_from_record(RunDir(run_dir).read_config().get(CONFIG_KEY))
