"""Crosscoder training loop (SPEC §3.3): Adam with warm-up/decay, gradient clipping, AuxK on dead
features, BatchTopK threshold estimation, atomic checkpoints with exact resume, metrics.jsonl.

A run directory holds::

    config.json          crosscoder + training settings + data source ("status": training/finished)
    metrics.jsonl        one JSON object every ``log_every`` steps
    checkpoint/state.pt  model, optimiser, step, RNG, dead-feature counters (atomic)
    model.safetensors    the final crosscoder, normalisation folded (SPEC §3.4)

Reruns with the same settings and seed are bit-identical on the CPU, and a resumed run ends with
exactly the weights an uninterrupted run would have.
"""

from __future__ import annotations

import copy
import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from crossint.config import JsonConfig, invalid, is_int, is_number
from crossint.crosscoder.activations import decoder_weighted_l1, jumprelu_l0
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.losses import (
    auxk_loss,
    fvu_X,
    learning_rate,
    reconstruction_loss,
    token_variance,
    update_dead_counter,
)
from crossint.crosscoder.model import CONFIG_NAME, WEIGHTS_NAME, Crosscoder, CrosscoderOutput
from crossint.errors import CrossintError
from crossint.io import atomic_write, atomic_write_json, atomic_write_text, read_json

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_NAME = "state.pt"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_FORMAT = "crossint.checkpoint"
# Settings that change nothing about the numbers, so a resume may use other values.
_RESUME_FREE_SETTINGS = frozenset({"checkpoint_every", "log_every", "device"})
_METRICS_FLUSH_SECONDS = 30.0
_SAMPLE_BYTES = 1 << 30  # normalisation sample cap (float32)
_CALIBRATION_TOKENS = 16384  # enough for a k/H quantile per feature at k/H >= 0.1%

ExtraLoss = Callable[[Crosscoder, Tensor, CrosscoderOutput], dict[str, Tensor]]
# Logged only (every log_every steps, without gradients), never added to the loss.
ExtraMetric = Callable[[Crosscoder, Tensor, CrosscoderOutput], dict[str, float]]


class ActivationSource(Protocol):
    """What ``train`` reads activations from (``crossint.data.cache.ActivationCache`` and
    the in-memory ``TensorActivations``). A source for a multi-model crosscoder also exposes
    ``models`` and yields positions model-major."""

    hookpoints: list[str]
    dims: dict[str, int]
    n_tokens: int

    def batches(self, batch_size: int, seed: int, start_batch: int = 0) -> Iterator[Tensor]: ...

    def sample(self, n_tokens: int, seed: int) -> Tensor: ...


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
        if not isinstance(self.device, str):
            fail("device", "must be a device name such as cpu or cuda")

    @classmethod
    def from_dict(cls, data: Any, where: str = "training config") -> TrainConfig:
        return super().from_dict(data, where)


# --- activation sources ------------------------------------------------------------------------
def source_signature(source: ActivationSource) -> dict[str, Any]:
    """What a run remembers about its data to refuse a mismatched resume."""
    models = getattr(source, "models", None)
    if models is None and isinstance(getattr(source, "model", None), str):
        models = [source.model]
    return {
        "hookpoints": list(source.hookpoints),
        "dims": {h: int(source.dims[h]) for h in source.hookpoints},
        "models": list(models) if models is not None else None,
    }


def describe_source(source: ActivationSource) -> dict[str, Any]:
    """Signature plus where the activations came from (recorded in config.json)."""
    description = {"type": type(source).__name__, **source_signature(source)}
    description["n_tokens"] = int(source.n_tokens)
    for attribute in ("path", "model"):
        value = getattr(source, attribute, None)
        if isinstance(value, (str, Path)):
            description[attribute] = str(Path(value).resolve()) if attribute == "path" else value
    return description


def check_source(config: CrosscoderConfig, source: ActivationSource) -> None:
    """Refuse activations whose hookpoints, dims or models do not fit the crosscoder."""
    where = getattr(source, "path", None) or type(source).__name__
    hookpoints = list(source.hookpoints)
    if hookpoints != config.hookpoints:
        raise CrossintError(
            f"activations at {where} have hookpoints {hookpoints}, but the crosscoder reads "
            f"{config.hookpoints}"
        )
    wrong = {h: source.dims.get(h) for h in hookpoints if source.dims.get(h) != config.d_model}
    if wrong:
        raise CrossintError(
            f"activations at {where} have widths {wrong}, but the crosscoder has "
            f"d_model={config.d_model} at every hookpoint"
        )
    models = getattr(source, "models", None)
    if config.n_models > 1 and models is None:
        raise CrossintError(
            f"the crosscoder spans {config.n_models} models {config.models}, but the "
            f"activations at {where} come from a single model"
        )
    if models is not None and list(models) != config.models:
        raise CrossintError(
            f"activations at {where} come from models {list(models)}, but the crosscoder spans "
            f"{config.models}"
        )
    if source.n_tokens < 1:
        raise CrossintError(f"activations at {where} hold no tokens")


def _check_resume_source(saved: dict[str, Any], source: ActivationSource, run: Path) -> None:
    current = source_signature(source)
    for key in ("hookpoints", "dims", "models"):
        if key == "models" and (saved.get(key) is None or current[key] is None):
            continue
        if saved.get(key) != current[key]:
            raise CrossintError(
                f"cannot resume {run}: it was trained on activations with {key} "
                f"{saved.get(key)}, but the activations given have {current[key]}"
            )


def _check_resume_settings(kind: str, saved: dict, given: dict, run: Path) -> None:
    differences = [
        f"{name}={saved.get(name)!r} (given {given[name]!r})"
        for name in given
        if name not in _RESUME_FREE_SETTINGS and saved.get(name) != given[name]
    ]
    if differences:
        raise CrossintError(
            f"cannot resume {run}: it was started with {kind} settings "
            f"{', '.join(differences)}; resume with the same settings or use a new run directory"
        )


def _check_resume_extra(saved: dict, given: dict, run: Path) -> None:
    if saved != given:
        raise CrossintError(
            f"cannot resume {run}: it was started with {json.dumps(saved, sort_keys=True)}, "
            f"not {json.dumps(given, sort_keys=True)}; resume with the same settings or use a "
            "new run directory"
        )


_RESERVED_CONFIG_KEYS = frozenset(
    {"format", "version", "status", "crosscoder", "training_crosscoder", "train", "source",
     "final_metrics"}
)


def _device_batches(batches: Iterator[Tensor], device: torch.device) -> Iterator[Tensor]:
    """Move batches to the device. On CUDA a thread reads the next batches (pinned) while the
    GPU trains, so data loading overlaps compute; the order never changes."""
    if device.type != "cuda":
        for batch in batches:
            yield batch.to(device=device, dtype=torch.float32)
        return
    ready: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                item = batch.to(torch.float32)
                if item.device.type == "cpu":
                    item = item.pin_memory()
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the training thread, which raises it
            ready.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item.to(device, non_blocking=True)
    finally:
        stop.set()


# --- run directory -----------------------------------------------------------------------------
def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / CHECKPOINT_NAME


def read_run_configs(out_dir: str | Path) -> tuple[CrosscoderConfig, TrainConfig]:
    """The training settings of an existing run (to resume it without repeating every flag)."""
    out_dir = Path(out_dir)
    ckpt = checkpoint_path(out_dir)
    if ckpt.is_file():
        state = _load_checkpoint(ckpt)
        cc_dict, tc_dict = state["crosscoder_config"], state["train_config"]
    else:
        document = read_json(out_dir / CONFIG_NAME, "run config")
        if not isinstance(document, dict) or "train" not in document:
            raise CrossintError(f"{out_dir / CONFIG_NAME} is not a training run's config")
        cc_dict = document.get("training_crosscoder", document.get("crosscoder"))
        tc_dict = document["train"]
    where = str(out_dir / CONFIG_NAME)
    return CrosscoderConfig.from_dict(cc_dict, where), TrainConfig.from_dict(tc_dict, where)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CrossintError(f"checkpoint {path} is corrupt or truncated ({e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CrossintError(f"{path} is not a crossint checkpoint")
    return state


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Metrics already logged up to the checkpoint (later lines are recomputed on resume)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= up_to_step:
            records.append(record)
    return records


def _write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _has_run(out_dir: Path) -> bool:
    return any(
        p.exists()
        for p in (
            out_dir / CONFIG_NAME,
            out_dir / WEIGHTS_NAME,
            checkpoint_path(out_dir),
            out_dir / METRICS_NAME,
        )
    )


# --- the loop ----------------------------------------------------------------------------------
def _dead_threshold(config: CrosscoderConfig, train_config: TrainConfig) -> int:
    """SPEC §3.3 default: 2M tokens or 10% of training, whichever is smaller."""
    if config.dead_tokens is not None:
        return config.dead_tokens
    return max(1, min(2_000_000, train_config.steps * train_config.batch_size // 10))


def extra_loss_ramp(step: int, steps: int, warmup_fraction: float) -> float:
    """The weight of the extra losses at ``step`` (0-based): linear from 1/n to 1 over the first
    n = warmup_fraction·steps steps, then 1."""
    ramp_steps = int(round(warmup_fraction * steps))
    return 1.0 if step >= ramp_steps else (step + 1) / ramp_steps


def _round(value: float) -> float:
    return float(f"{value:.6g}") if math.isfinite(value) else value


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
    """
    from tqdm.auto import tqdm

    cc, tc = crosscoder_config, train_config
    out_dir = Path(out_dir)
    clashes = sorted(_RESERVED_CONFIG_KEYS & set(extra_config or {}))
    if clashes:
        raise CrossintError(f"extra_config keys {clashes} clash with the run's own entries")
    check_source(cc, source)
    ckpt_file = checkpoint_path(out_dir)
    state: dict[str, Any] | None = None
    if resume:
        if ckpt_file.is_file():
            state = _load_checkpoint(ckpt_file)
            _check_resume_source(state["source"], source, out_dir)
            _check_resume_settings("crosscoder", state["crosscoder_config"], cc.to_dict(), out_dir)
            _check_resume_settings("training", state["train_config"], tc.to_dict(), out_dir)
            if "extra_config" in state:  # older checkpoints did not record one
                _check_resume_extra(state["extra_config"], extra_config or {}, out_dir)
    elif _has_run(out_dir):
        raise CrossintError(
            f"{out_dir} already holds a training run; resume it (--resume) or choose a new "
            "output directory"
        )
    try:
        device = torch.device(tc.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise CrossintError(f"device {tc.device!r} is not available ({e})") from None

    model = Crosscoder(cc, seed=tc.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tokens_since_fired_H = torch.zeros(cc.n_features, dtype=torch.int64)
    start_step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        tokens_since_fired_H = state["tokens_since_fired_H"].clone()
        start_step = int(state["step"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
    else:
        torch.manual_seed(tc.seed)  # for extra losses that draw random numbers
        # SPEC §3.4 asks for a few hundred thousand tokens; cap the sample's memory (a mean norm
        # is precise long before that for wide paper-layout crosscoders).
        affordable = max(1, _SAMPLE_BYTES // (4 * cc.n_positions * cc.d_model))
        n_sample = min(tc.normalisation_tokens, int(source.n_tokens), affordable)
        sample_NXD = source.sample(n_sample, seed=tc.seed).to("cpu", torch.float32)
        model.estimate_normalisation(sample_NXD)
        if cc.train_decoder_bias or cc.center_inputs:
            with torch.no_grad():
                model.b_dec_XD.copy_(model.normalise(sample_NXD).mean(dim=0))
        if cc.init_encoder_bias == "calibrated":
            model.calibrate_encoder_bias(sample_NXD[:_CALIBRATION_TOKENS])
        del sample_NXD
    model.to(device).train()
    tokens_since_fired_H = tokens_since_fired_H.to(device)
    optimizer = torch.optim.Adam(
        trainable, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    del state

    description = describe_source(source)
    run_document = {
        "format": "crossint.crosscoder",
        "version": 1,
        "status": "training",
        "crosscoder": cc.to_dict(),
        "training_crosscoder": cc.to_dict(),
        "train": tc.to_dict(),
        "source": description,
        **(extra_config or {}),
    }
    if start_step == 0:
        atomic_write_json(out_dir / CONFIG_NAME, run_document)
    metrics_file = out_dir / METRICS_NAME
    records = _read_metrics(metrics_file, start_step)
    dead_after = _dead_threshold(cc, tc)
    k_aux = cc.effective_aux_k

    def save_checkpoint(completed: int) -> None:
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "step": completed,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": _to_cpu(optimizer.state_dict()),
            "tokens_since_fired_H": tokens_since_fired_H.cpu().clone(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "crosscoder_config": cc.to_dict(),
            "train_config": tc.to_dict(),
            "source": source_signature(source),
            "extra_config": extra_config or {},
        }
        atomic_write(ckpt_file, lambda tmp: torch.save(checkpoint, tmp))

    batches = _device_batches(
        iter(source.batches(tc.batch_size, seed=tc.seed, start_batch=start_step)), device
    )
    bar = tqdm(
        total=tc.steps,
        initial=start_step,
        disable=not progress,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    last_flush = started
    try:
        for step in range(start_step, tc.steps):
            acts_BXD = next(batches)
            lr = learning_rate(step, tc.steps, tc.lr, tc.warmup_fraction, tc.decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr

            out = model(acts_BXD)
            terms: dict[str, Tensor] = {
                "rec_loss": reconstruction_loss(out.acts_norm_BXD, out.recon_norm_BXD)
            }
            loss = terms["rec_loss"]
            dead_U = (tokens_since_fired_H >= dead_after).nonzero().squeeze(1)
            if tc.aux_alpha > 0 and dead_U.numel() > 0:
                residual_BXD = (out.acts_norm_BXD - out.recon_norm_BXD).detach()
                terms["aux_loss"] = auxk_loss(
                    out.pre_BH,
                    model.W_dec_HXD,
                    dead_U,
                    residual_BXD,
                    out.acts_norm_BXD,
                    min(k_aux, dead_U.numel()),
                )
                # SPEC §3.3's L_aux is normalised by the batch variance while L_rec is not; weight
                # it by that variance per token (detached) so α_aux = 1/32 means what it does in
                # Gao et al. (both losses in one unit). Unweighted, AuxK is X·D times weaker
                # and, with gradient clipping, cannot revive anything.
                loss = loss + tc.aux_alpha * token_variance(out.acts_norm_BXD) * terms["aux_loss"]
            if cc.activation == "relu" and cc.l1_coefficient > 0:
                terms["sparsity_loss"] = decoder_weighted_l1(out.f_BH, model.W_dec_HXD)
                loss = loss + cc.l1_coefficient * terms["sparsity_loss"]
            if cc.activation == "jumprelu" and cc.l0_coefficient > 0:
                terms["sparsity_loss"] = jumprelu_l0(
                    out.pre_BH, model.threshold_H, cc.jumprelu_bandwidth
                )
                loss = loss + cc.l0_coefficient * terms["sparsity_loss"]
            ramp = extra_loss_ramp(step, tc.steps, tc.extra_loss_warmup)
            for extra in extra_losses:
                for name, value in extra(model, acts_BXD, out).items():
                    if name in terms or name == "loss":
                        raise CrossintError(f"extra loss name {name!r} clashes with a built-in")
                    value = value if ramp == 1.0 else ramp * value
                    terms[name] = value
                    loss = loss + value

            # Logged-only metrics see the same weights as this step's output (before the update).
            logged_metrics: dict[str, float] = {}
            if extra_metrics and ((step + 1) % tc.log_every == 0 or step + 1 == tc.steps):
                with torch.no_grad():
                    for metric in extra_metrics:
                        for name, value in metric(model, acts_BXD, out).items():
                            logged_metrics[name] = float(value)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
            optimizer.step()
            with torch.no_grad():
                if cc.activation == "jumprelu":
                    model.threshold_H.clamp_(min=0.0)  # θ > 0 keeps f = pre·1[pre > θ] >= 0
                if out.batch_threshold is not None:  # SPEC §3.2 running θ for inference
                    theta = out.batch_threshold.to(model.threshold_H.dtype)
                    if step > 0:
                        m = cc.threshold_momentum
                        theta = m * model.threshold_H + (1 - m) * theta
                    model.threshold_H.copy_(theta.expand_as(model.threshold_H))
                tokens_since_fired_H = update_dead_counter(tokens_since_fired_H, out.f_BH)

            completed = step + 1
            bar.update(1)
            if completed % tc.log_every == 0 or completed == tc.steps:
                with torch.no_grad():
                    record = {
                        "step": completed,
                        "tokens": completed * tc.batch_size,
                        "loss": loss.item(),
                        **{name: value.item() for name, value in terms.items()},
                        "l0": (out.f_BH != 0).sum(dim=1).double().mean().item(),
                        "dead_fraction": (tokens_since_fired_H >= dead_after)
                        .double()
                        .mean()
                        .item(),
                        "fvu": fvu_X(out.acts_norm_BXD, out.recon_norm_BXD).mean().item(),
                        "variance": token_variance(out.acts_norm_BXD).item(),
                        "lr": lr,
                        "grad_norm": grad_norm.item(),
                        "elapsed_s": time.perf_counter() - started,
                    }
                    if out.batch_threshold is not None:
                        record["threshold"] = model.threshold_H[0].item()
                    for name, value in logged_metrics.items():
                        if name in record:
                            raise CrossintError(
                                f"extra metric name {name!r} clashes with a logged value"
                            )
                        record[name] = value
                record.setdefault("aux_loss", 0.0)
                if not math.isfinite(record["loss"]):
                    raise CrossintError(
                        f"training diverged at step {completed} (loss {record['loss']}); "
                        "try a lower learning rate"
                    )
                records.append(
                    {k: _round(v) if isinstance(v, float) else v for k, v in record.items()}
                )
                bar.set_postfix(
                    loss=f"{record['loss']:.4g}",
                    l0=f"{record['l0']:.1f}",
                    fvu=f"{record['fvu']:.3f}",
                    refresh=False,
                )
                now = time.perf_counter()
                if now - last_flush > _METRICS_FLUSH_SECONDS:
                    _write_metrics(metrics_file, records)
                    last_flush = now
            if completed % tc.checkpoint_every == 0 or completed == tc.steps:
                if not all(torch.isfinite(p).all() for p in model.parameters()):
                    raise CrossintError(
                        f"training diverged at step {completed} (non-finite weights); "
                        "try a lower learning rate"
                    )
                save_checkpoint(completed)
                _write_metrics(metrics_file, records)
                last_flush = time.perf_counter()
    finally:
        bar.close()
        batches.close()

    final = copy.deepcopy(model).eval().fold_normalisation()
    final_metrics = records[-1] if records else None
    final.save_pretrained(
        out_dir,
        extra={
            "status": "finished",
            "training_crosscoder": cc.to_dict(),
            "train": tc.to_dict(),
            "source": description,
            **(extra_config or {}),
            "final_metrics": final_metrics,
        },
    )
    return final


def _to_cpu(obj: Any) -> Any:
    """Optimizer state on the CPU so a checkpoint loads on any device."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
