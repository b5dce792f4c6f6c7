"""Crosscoder training loop (SPEC §3.3): Adam with warm-up/decay, gradient clipping, AuxK on dead
features, the activation's sparsity term and update (BatchTopK threshold estimation, JumpReLU's
θ >= 0), atomic checkpoints with exact resume, metrics.jsonl.

A run directory (names in :mod:`crossint.rundir`) holds::

    config.json          crosscoder + training settings + data source ("status": training/finished)
    metrics.jsonl        one JSON object every ``log_every`` steps
    checkpoint/state.pt  model, optimiser, step, RNG, dead-feature counters (atomic)
    model.safetensors    the final crosscoder, normalisation folded (SPEC §3.4)

Reruns with the same settings and seed are bit-identical on the CPU, and a resumed run ends with
exactly the weights an uninterrupted run would have.

Under torchrun the same loop runs data-parallel, one rank per process (``distributed``): each
rank trains on its slice of every global batch, gradients and batch statistics are reduced over
the ranks, and rank 0 alone writes the run directory.

The pieces: ``source`` (what activations are read from), ``objective`` (the loss terms),
``checkpoint`` (the run directory, checkpoints, resume checks); here the training state at step
0 or at the checkpoint, :func:`train_step`, the metrics row and :func:`train`, which strings
them together. The names other modules use are re-exported here.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossint.crosscoder.checkpoint import (
    RESUME_FREE_SETTINGS,
    MetricsLog,
    RunSettings,
    TrainingState,
    check_extra_config,
    checkpoint_path,
    finished_entries,
    read_run_configs,
    restore_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    write_training_document,
)
from crossint.crosscoder.config import CrosscoderConfig, TrainConfig
from crossint.crosscoder.distributed import (
    SINGLE_PROCESS,
    RankLost,
    RankReader,
    Ranks,
    data_parallel,
    ranks_from_environment,
    resolve_data_parts,
    writer_lock,
)
from crossint.crosscoder.losses import (
    advance_dead_counter,
    fvu_X,
    learning_rate,
    token_variance,
)
from crossint.crosscoder.memory import check_training_memory
from crossint.crosscoder.model import Crosscoder, CrosscoderOutput
from crossint.crosscoder.objective import ExtraLoss, ExtraMetric, Objective, extra_loss_ramp
from crossint.crosscoder.source import (
    ActivationSource,
    check_source,
    describe_source,
    device_batches,
    source_signature,
)
from crossint.errors import CrossintError
from crossint.rundir import RunDir

__all__ = [
    "RESUME_FREE_SETTINGS",
    "ActivationSource",
    "ExtraLoss",
    "ExtraMetric",
    "StepResult",
    "TrainConfig",
    "TrainingState",
    "check_source",
    "checkpoint_path",
    "describe_source",
    "extra_loss_ramp",
    "initial_state",
    "read_run_configs",
    "source_signature",
    "train",
    "train_step",
]

_SAMPLE_BYTES = 1 << 30  # normalisation sample cap (float32)
_CALIBRATION_TOKENS = 16384  # enough for a k/H quantile per feature at k/H >= 0.1%


# --- the state at step 0, or at the checkpoint -------------------------------------------------
def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise CrossintError(f"device {name!r} is not available ({e})") from None
    return device


def _initialise_from_sample(
    model: Crosscoder, cc: CrosscoderConfig, tc: TrainConfig, source: RankReader
) -> None:
    """The data-dependent init: normalisation (SPEC §3.4), b_dec at the mean for centring,
    calibrated b_enc (SPEC §3.5)."""
    # SPEC §3.4 asks for a few hundred thousand tokens; cap the sample's memory (a mean norm is
    # precise long before that for wide paper-layout crosscoders).
    affordable = max(1, _SAMPLE_BYTES // (4 * cc.n_positions * cc.d_model))
    n_sample = min(tc.normalisation_tokens, int(source.n_tokens), affordable)
    sample_TXD = source.sample(n_sample, seed=tc.seed).to("cpu", torch.float32)
    model.estimate_normalisation(sample_TXD)
    if cc.train_decoder_bias or cc.center_inputs:
        with torch.no_grad():
            model.b_dec_XD.copy_(model.normalise(sample_TXD).mean(dim=0))
    if cc.init_encoder_bias == "calibrated":
        model.calibrate_encoder_bias(sample_TXD[:_CALIBRATION_TOKENS])


def initial_state(
    cc: CrosscoderConfig,
    tc: TrainConfig,
    source: ActivationSource | RankReader,
    checkpoint: dict[str, Any] | None,
    device: torch.device,
    ranks: Ranks = SINGLE_PROCESS,
) -> TrainingState:
    """A fresh model initialised from a sample of ``source``, or the checkpoint's state (the
    RNG state included), on ``device`` in training mode, with its Adam optimiser. Every rank
    draws the same sample (``RankReader.sample``), so the ranks start alike."""
    if not isinstance(source, RankReader):
        source = RankReader(source, ranks=ranks)
    model = Crosscoder(cc, seed=tc.seed, ranks=ranks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tokens_since_fired_H = torch.zeros(cc.n_features, dtype=torch.int64)
    step = 0
    if checkpoint is not None:
        tokens_since_fired_H, step = restore_checkpoint(checkpoint, model)
    else:
        torch.manual_seed(tc.seed)  # for extra losses that draw random numbers
        _initialise_from_sample(model, cc, tc, source)
    model.to(device).train()
    optimizer = torch.optim.Adam(
        trainable, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps
    )
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    return TrainingState(model, optimizer, trainable, tokens_since_fired_H.to(device), step)


# --- one step ----------------------------------------------------------------------------------
@dataclass
class StepResult:
    out: CrosscoderOutput  # the forward pass (weights before the update)
    loss: Tensor
    terms: dict[str, Tensor]  # named loss terms (see Objective)
    lr: float
    grad_norm: Tensor  # before clipping
    logged: dict[str, float]  # the extra metrics' values


def train_step(
    state: TrainingState,
    acts_BXD: Tensor,
    step: int,
    tc: TrainConfig,
    objective: Objective,
    extra_metrics: Sequence[ExtraMetric] = (),
) -> StepResult:
    """Optimiser step ``step`` (0-based): learning rate, forward, loss, backward, clipping,
    Adam, the activation's after-step update and the dead-feature counters; ``state.step``
    becomes ``step + 1``. ``extra_metrics`` are evaluated without gradients before the update.
    Data-parallel (``objective.ranks``): ``acts_BXD`` is this rank's share of the batch, the
    gradients are averaged over the ranks and the counters count the whole batch."""
    ranks = objective.ranks
    model, optimizer = state.model, state.optimizer
    lr = learning_rate(step, tc.steps, tc.lr, tc.warmup_fraction, tc.decay_fraction)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(acts_BXD.device.type, dtype=torch.bfloat16,
                        enabled=tc.autocast == "bfloat16"):
        out = model(acts_BXD)
        loss, terms = objective(model, acts_BXD, out, step, state.tokens_since_fired_H)
    logged: dict[str, float] = {}
    with torch.no_grad():
        for metric in extra_metrics:
            for name, value in metric(model, acts_BXD, out).items():
                logged[name] = float(value)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ranks.average_gradients(state.trainable)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.trainable, tc.grad_clip)
    optimizer.step()
    with torch.no_grad():
        model.activation.after_step(model, out, step)
        fired_H = ranks.any((out.f_BH != 0).any(dim=0))
        state.tokens_since_fired_H = advance_dead_counter(
            state.tokens_since_fired_H, fired_H, out.f_BH.shape[0] * ranks.world_size)
    state.step = step + 1
    return StepResult(out, loss, terms, lr, grad_norm, logged)


def _round(value: float) -> float:
    return float(f"{value:.6g}") if math.isfinite(value) else value


def metrics_row(
    state: TrainingState, result: StepResult, objective: Objective, batch_size: int,
    elapsed_s: float,
) -> dict[str, Any]:
    """The metrics.jsonl row after ``result`` (values rounded to 6 significant digits; with
    several ranks each value is the mean of the ranks' values)."""
    model, out, completed = state.model, result.out, state.step
    with torch.no_grad():
        row = {
            "step": completed,
            "tokens": completed * batch_size,
            "loss": result.loss.item(),
            **{name: value.item() for name, value in result.terms.items()},
            "l0": (out.f_BH != 0).sum(dim=1).double().mean().item(),
            "dead_fraction": objective.dead(state.tokens_since_fired_H).double().mean().item(),
            "fvu": fvu_X(out.acts_norm_BXD, out.recon_norm_BXD).mean().item(),
            "variance": token_variance(out.acts_norm_BXD).item(),
            "lr": result.lr,
            "grad_norm": result.grad_norm.item(),
            "elapsed_s": elapsed_s,
            **model.activation.metrics(model, out),
        }
    for name, value in result.logged.items():
        if name in row:
            raise CrossintError(f"extra metric name {name!r} clashes with a logged value")
        row[name] = value
    row.setdefault("aux_loss", 0.0)
    row = objective.ranks.mean_values(row)  # before the check below, so every rank stops alike
    if not math.isfinite(row["loss"]):
        raise CrossintError(
            f"training diverged at step {completed} (loss {row['loss']}); "
            "try a lower learning rate"
        )
    return {k: _round(v) if isinstance(v, float) else v for k, v in row.items()}


def _position_names(cc: CrosscoderConfig) -> list[str]:
    """A name per input position, for error messages (``model:hookpoint`` when M > 1)."""
    if cc.n_models == 1:
        return list(cc.hookpoints)
    return [f"{model}:{hookpoint}" for model, hookpoint in cc.positions]


# --- the loop ----------------------------------------------------------------------------------
@dataclass
class _Run:
    """What stays fixed while one call of :func:`train` runs its steps."""

    dir: RunDir
    settings: RunSettings
    objective: Objective
    extra_metrics: tuple[ExtraMetric, ...]
    metrics: MetricsLog  # written by rank 0 only

    def run_steps(self, state: TrainingState, batches: Iterator[Tensor], bar: Any) -> None:
        tc = self.settings.train
        started = time.perf_counter()
        for step in range(state.step, tc.steps):
            completed = step + 1
            log = completed % tc.log_every == 0 or completed == tc.steps
            metrics = self.extra_metrics if log else ()
            result = train_step(state, next(batches), step, tc, self.objective, metrics)
            bar.update(1)
            if log:
                row = metrics_row(state, result, self.objective, tc.batch_size,
                                  time.perf_counter() - started)
                if self.objective.ranks.is_main:
                    self.metrics.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}", l0=f"{row['l0']:.1f}",
                                fvu=f"{row['fvu']:.3f}", refresh=False)
            if completed % tc.checkpoint_every == 0 or completed == tc.steps:
                self.checkpoint(state)

    def checkpoint(self, state: TrainingState) -> None:
        if not all(torch.isfinite(p).all() for p in state.model.parameters()):
            raise CrossintError(
                f"training diverged at step {state.step} (non-finite weights); "
                "try a lower learning rate"
            )
        if self.objective.ranks.is_main:
            save_checkpoint(self.dir.checkpoint, state, self.settings)
            self.metrics.write()


def train(
    crosscoder_config: CrosscoderConfig,
    train_config: TrainConfig,
    source: ActivationSource,
    out_dir: str | Path,
    resume: bool = False,
    extra_losses: Sequence[ExtraLoss] = (),
    progress: bool = True,
    extra_metrics: Sequence[ExtraMetric] = (),
    extra_config: dict[str, Any] | None = None,
) -> Crosscoder:
    """Train a crosscoder on ``source`` and save the folded result in ``out_dir``.

    ``extra_losses`` are callables ``(crosscoder, acts_BXD, output) -> {name: scalar}`` whose
    values are added to the loss and logged (the interaction penalty plugs in here).
    ``extra_metrics`` have the same signature but are only logged (at logging steps, without
    gradients). ``extra_config`` (JSON-able) adds top-level entries to the run's config.json
    describing what the extra losses do; a resume must pass the same. Returns the saved (folded,
    eval-mode) crosscoder.

    Before anything is written: the source must fit the crosscoder and hold at least one
    batch, the device must exist and have memory for the estimate of
    :func:`crossint.crosscoder.memory.training_bytes`; then the run directory's lock
    (``crossint.lock``) is held for the whole run.

    Launched by torchrun (``WORLD_SIZE`` > 1), this process is one rank of a data-parallel run
    (``crossint.crosscoder.distributed``): ``batch_size`` is the global batch and must divide
    by the number of ranks; ``device="cuda"`` means this rank's GPU.
    """
    cc, tc = crosscoder_config, train_config
    ranks = ranks_from_environment()
    check_extra_config(extra_config)
    check_source(cc, source)
    check_batch_size(tc, source, ranks.world_size)
    parts = resolve_data_parts(tc.data_parts, source, ranks, tc.seed)
    reader = RankReader(source, parts, ranks)
    reader.check(tc.batch_size, tc.seed)
    settings = RunSettings.of(cc, tc, source, extra_config, ranks.world_size, reader.parts)
    device = _device(ranks.device_name(tc.device))
    check_training_memory(cc, tc, device)
    # One writer per run directory: a second train (another process) stops here.
    with data_parallel(ranks, device), writer_lock(out_dir, "crossint train", ranks):
        return _train_locked(settings, reader, RunDir(out_dir), resume, device,
                             extra_losses, progress, extra_metrics)


def check_batch_size(tc: TrainConfig, source: ActivationSource, world_size: int = 1) -> None:
    """A batch cannot hold more tokens than the source has (it would repeat tokens within one
    batch), and data-parallel ranks split it evenly."""
    if tc.batch_size % world_size:
        raise CrossintError(
            f"batch size {tc.batch_size} does not divide among the {world_size} data-parallel "
            f"processes: use a --batch-size that is a multiple of {world_size} (it is the "
            f"global batch; each process takes batch_size / {world_size} tokens)"
        )
    if tc.batch_size > source.n_tokens:
        where = getattr(source, "path", None) or type(source).__name__
        raise CrossintError(
            f"batch size {tc.batch_size} is larger than the {source.n_tokens} tokens of the "
            f"activations at {where}: use --batch-size {source.n_tokens} or less, or harvest "
            f"more tokens"
        )


def _train_locked(settings: RunSettings, reader: RankReader, run_dir: RunDir,
                  resume: bool, device: torch.device, extra_losses: Sequence[ExtraLoss],
                  progress: bool, extra_metrics: Sequence[ExtraMetric]) -> Crosscoder:
    """:func:`train` once the run directory's lock is held (by rank 0)."""
    from tqdm.auto import tqdm

    cc, tc, ranks = settings.crosscoder, settings.train, reader.ranks
    checkpoint = resume_checkpoint(run_dir, settings, resume)
    ranks.barrier()  # every rank has checked the directory before rank 0 writes into it
    state = initial_state(cc, tc, reader, checkpoint, device, ranks)
    del checkpoint
    description = describe_source(reader.source)
    if state.step == 0 and ranks.is_main:
        write_training_document(run_dir, settings, description)
    run = _Run(run_dir, settings, Objective.for_run(cc, tc, extra_losses, ranks),
               tuple(extra_metrics), MetricsLog(run_dir.metrics, state.step))
    batches = device_batches(reader.batches(tc.batch_size, tc.seed, state.step), device,
                             start=state.step, hookpoints=_position_names(cc))
    bar = tqdm(total=tc.steps, initial=state.step, disable=not progress or not ranks.is_main,
               desc="train", unit="step", dynamic_ncols=True)
    try:
        run.run_steps(state, batches, bar)
    except RankLost as e:
        raise RankLost(f"{e}; rank 0 writes checkpoints atomically, so the last one in "
                       f"{run_dir.path} is intact: resume with --resume and the same number of "
                       "processes") from None
    finally:
        bar.close()
        batches.close()
    final = copy.deepcopy(state.model).eval().fold_normalisation()
    if ranks.is_main:
        final.save_pretrained(run_dir.path,
                              extra=finished_entries(settings, description, run.metrics.last))
    ranks.barrier()  # on every rank, train returns once the run is complete on disk
    return final
