"""A training run's directory (file names from :mod:`crossint.rundir`): the config.json written
while training and once finished, checkpoints with exact resume, the resume checks,
``read_run_configs`` and metrics.jsonl.

A checkpoint (``checkpoint/state.pt``, written atomically) holds the model, the optimiser, the
completed step, the RNG states, the dead-feature counters, and the settings the run was started
with (``RunSettings``), which a resume must repeat; ``checkpoint/state.sha256`` beside it holds
its sha256, verified before it is loaded. The settings include the source's fingerprint (the
cache's shard checksums), so a resume on other activations with the same hookpoints is refused,
the number of data-parallel processes (``world_size``) and the parts the cache was read in
(``data_parts``), which a resume must repeat.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from crossint.crosscoder.config import CrosscoderConfig, TrainConfig
from crossint.crosscoder.model import FORMAT, FORMAT_VERSION, Crosscoder
from crossint.crosscoder.source import ActivationSource, source_signature
from crossint.errors import CrossintError
from crossint.io import atomic_write, atomic_write_json, atomic_write_text, read_json, sha256_file
from crossint.rundir import CHECKPOINT_SUM, RunDir, metrics_text, read_metrics

CHECKPOINT_FORMAT = "crossint.checkpoint"
# Settings that change nothing about the numbers, so a resume may use other values.
RESUME_FREE_SETTINGS = frozenset({"checkpoint_every", "log_every", "device"})
# Top-level config.json entries of the run itself (extra_config may not use them).
RESERVED_CONFIG_KEYS = frozenset(
    {"format", "version", "status", "crosscoder", "training_crosscoder", "train", "source",
     "final_metrics", "weights_sha256", "world_size", "data_parts"}
)
METRICS_FLUSH_SECONDS = 30.0


@dataclass
class TrainingState:
    """What a checkpoint saves and restores, besides the RNG states."""

    model: Crosscoder
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter]  # the optimised parameters, in the optimiser's order
    tokens_since_fired_H: Tensor
    step: int  # steps completed


@dataclass(frozen=True)
class RunSettings:
    """What a run is started with: a checkpoint records it, a resume must repeat it."""

    crosscoder: CrosscoderConfig
    train: TrainConfig
    source: dict[str, Any]  # source_signature(source)
    extra_config: dict[str, Any]
    world_size: int = 1  # data-parallel processes (torchrun) sharing each batch
    data_parts: int = 1  # parts the source's shards are dealt into (TrainConfig.data_parts)

    @classmethod
    def of(
        cls,
        crosscoder: CrosscoderConfig,
        train: TrainConfig,
        source: ActivationSource,
        extra_config: dict[str, Any] | None,
        world_size: int = 1,
        data_parts: int = 1,
    ) -> RunSettings:
        return cls(crosscoder, train, source_signature(source), dict(extra_config or {}),
                   world_size, data_parts)

    def checkpoint_entries(self) -> dict[str, Any]:
        return {
            "crosscoder_config": self.crosscoder.to_dict(),
            "train_config": self.train.to_dict(),
            "source": self.source,
            "extra_config": self.extra_config,
            "world_size": self.world_size,
            "data_parts": self.data_parts,
        }


# --- config.json -------------------------------------------------------------------------------
def check_extra_config(extra_config: dict[str, Any] | None) -> None:
    clashes = sorted(RESERVED_CONFIG_KEYS & set(extra_config or {}))
    if clashes:
        raise CrossintError(f"extra_config keys {clashes} clash with the run's own entries")


def training_document(settings: RunSettings, description: dict[str, Any]) -> dict[str, Any]:
    """config.json of a run in progress (``description``: ``describe_source(source)``)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "status": "training",
        "crosscoder": settings.crosscoder.to_dict(),
        "training_crosscoder": settings.crosscoder.to_dict(),
        "train": settings.train.to_dict(),
        "world_size": settings.world_size,
        "data_parts": settings.data_parts,
        "source": description,
        **settings.extra_config,
    }


def write_training_document(run: RunDir, settings: RunSettings, description: dict) -> None:
    atomic_write_json(run.config, training_document(settings, description))


def finished_entries(
    settings: RunSettings, description: dict[str, Any], final_metrics: dict[str, Any] | None
) -> dict[str, Any]:
    """What a finished run adds to the saved crosscoder's config.json."""
    return {
        "status": "finished",
        "training_crosscoder": settings.crosscoder.to_dict(),
        "train": settings.train.to_dict(),
        "world_size": settings.world_size,
        "data_parts": settings.data_parts,
        "source": description,
        **settings.extra_config,
        "final_metrics": final_metrics,
    }


def read_run_configs(out_dir: str | Path) -> tuple[CrosscoderConfig, TrainConfig]:
    """The training settings of an existing run (to resume it without repeating every flag)."""
    run = RunDir(out_dir)
    if run.checkpoint.is_file():
        state = load_checkpoint(run.checkpoint)
        cc_dict, tc_dict = state["crosscoder_config"], state["train_config"]
    else:
        document = read_json(run.config, "run config")
        if not isinstance(document, dict) or "train" not in document:
            raise CrossintError(f"{run.config} is not a training run's config")
        cc_dict = document.get("training_crosscoder", document.get("crosscoder"))
        tc_dict = document["train"]
    where = str(run.config)
    return CrosscoderConfig.from_dict(cc_dict, where), TrainConfig.from_dict(tc_dict, where)


# --- checkpoints -------------------------------------------------------------------------------
def checkpoint_path(out_dir: str | Path) -> Path:
    return RunDir(out_dir).checkpoint


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint, verified against the sha256 written beside it (``state.sha256``; a
    checkpoint written before crossint recorded one loads unchecked)."""
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CrossintError(f"checkpoint {path} is corrupt or truncated ({e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CrossintError(f"{path} is not a crossint checkpoint")
    return state


def save_checkpoint(path: Path, state: TrainingState, settings: RunSettings) -> None:
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "step": state.step,
        "model": {k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()},
        "optimizer": _to_cpu(state.optimizer.state_dict()),
        "tokens_since_fired_H": state.tokens_since_fired_H.cpu().clone(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        **settings.checkpoint_entries(),
    }

    def write(tmp: Path) -> None:
        torch.save(checkpoint, tmp)
        # The checksum goes down before the checkpoint replaces the old one and keeps the old
        # one's too: killed between the two, the old checkpoint still verifies.
        previous = sha256_file(path) if path.is_file() else None
        atomic_write_json(checksum_path(path), {"file": path.name, "sha256": sha256_file(tmp),
                                                "previous_sha256": previous})

    atomic_write(path, write)


def checksum_path(path: Path) -> Path:
    """Where the checksum of checkpoint ``path`` is kept (``checkpoint/state.sha256``)."""
    return path.with_name(CHECKPOINT_SUM)


def verify_checkpoint(path: Path) -> None:
    """CrossintError unless ``path`` has the sha256 recorded beside it (when one is)."""
    sums = checksum_path(path)
    if not sums.is_file() or not path.is_file():
        return
    record = read_json(sums, "checkpoint checksum")
    if not isinstance(record, dict):
        record = {}
    accepted = {record.get("sha256"), record.get("previous_sha256")} - {None}
    if sha256_file(path) not in accepted:
        raise CrossintError(
            f"checkpoint {path} does not match the sha256 recorded in {sums}: the file is "
            f"corrupt, so the run cannot resume from it; restore it from a backup, or delete "
            f"{path.parent} and train from the start"
        )


def restore_checkpoint(checkpoint: dict[str, Any], model: Crosscoder) -> tuple[Tensor, int]:
    """Load the model weights and the RNG states; returns (dead-feature counters, step)."""
    model.load_state_dict(checkpoint["model"])
    torch.set_rng_state(checkpoint["rng_cpu"])
    if checkpoint.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng_cuda"])
    return checkpoint["tokens_since_fired_H"].clone(), int(checkpoint["step"])


def _to_cpu(obj: Any) -> Any:
    """Optimizer state on the CPU so a checkpoint loads on any device."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


# --- resuming ----------------------------------------------------------------------------------
def resume_checkpoint(run: RunDir, settings: RunSettings, resume: bool) -> dict[str, Any] | None:
    """The checkpoint a run continues from (None: start at step 0). A fresh run refuses a
    directory that already holds one; a resume must repeat the checkpoint's settings."""
    if not resume:
        if run.has_run():
            raise CrossintError(
                f"{run.path} already holds a training run; resume it (--resume) or choose a new "
                "output directory"
            )
        return None
    if not run.checkpoint.is_file():
        return None
    checkpoint = load_checkpoint(run.checkpoint)
    check_resume(checkpoint, settings, run.path)
    return checkpoint


def check_resume(checkpoint: dict[str, Any], settings: RunSettings, run: Path) -> None:
    """Refuse a resume whose source, settings, extra_config or number of processes differ from
    the checkpoint's."""
    _check_resume_world_size(checkpoint.get("world_size", 1), settings.world_size, run)
    _check_resume_data_parts(checkpoint.get("data_parts", 1), settings.data_parts, run)
    _check_resume_source(checkpoint["source"], settings.source, run)
    given = settings.checkpoint_entries()
    for kind, key in (("crosscoder", "crosscoder_config"), ("training", "train_config")):
        _check_resume_settings(kind, checkpoint[key], given[key], run)
    if "extra_config" in checkpoint:  # older checkpoints did not record one
        _check_resume_extra(checkpoint["extra_config"], settings.extra_config, run)


def _check_resume_world_size(saved: int, given: int, run: Path) -> None:
    # The ranks split each batch, so the numbers agree across world sizes only up to rounding;
    # an exact resume needs the same split.
    if saved != given:
        how = ("a single process (without torchrun)" if saved == 1 else
               f"{saved} processes in all (torchrun --nproc-per-node {saved} on one node)")
        raise CrossintError(
            f"cannot resume {run}: it was trained by {saved} data-parallel process(es), but "
            f"{given} are running now; resume it with {how}"
        )


def _check_resume_data_parts(saved: int, given: int, run: Path) -> None:
    # The parts decide which rows make up each batch, so another split is another data order.
    if saved != given:
        raise CrossintError(
            f"cannot resume {run}: it read its cache in {saved} part(s), but {given} now; resume "
            f"it with --data-parts {saved}"
        )


def _check_resume_source(saved: dict[str, Any], current: dict[str, Any], run: Path) -> None:
    for key in ("hookpoints", "dims", "models"):
        if key == "models" and (saved.get(key) is None or current[key] is None):
            continue
        if saved.get(key) != current[key]:
            raise CrossintError(
                f"cannot resume {run}: it was trained on activations with {key} "
                f"{saved.get(key)}, but the activations given have {current[key]}"
            )
    # Checkpoints written before fingerprints, and in-memory sources, have none to compare.
    if saved.get("fingerprint") and current.get("fingerprint") \
            and saved["fingerprint"] != current["fingerprint"]:
        raise CrossintError(
            f"cannot resume {run}: it was trained on other activations (fingerprint "
            f"{saved['fingerprint'][:16]}..., the activations given have "
            f"{current['fingerprint'][:16]}...); resume with the cache it was started on (a "
            f"moved or copied cache is fine) or the stream settings it was started with, or "
            f"use a new run directory"
        )


def _check_resume_settings(kind: str, saved: dict, given: dict, run: Path) -> None:
    differences = [
        f"{name}={saved.get(name)!r} (given {given[name]!r})"
        for name in given
        if name not in RESUME_FREE_SETTINGS and saved.get(name) != given[name]
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


# --- metrics.jsonl -----------------------------------------------------------------------------
class MetricsLog:
    """A run's metrics.jsonl: the rows logged so far, in memory, rewritten atomically by
    :meth:`write` (at checkpoints) and by :meth:`append` at most every 30 s. Rows already in
    the file up to ``up_to_step`` (the checkpoint) are kept; later ones are recomputed."""

    def __init__(self, path: Path, up_to_step: int) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = read_metrics(path, up_to_step)
        self._written = time.perf_counter()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if time.perf_counter() - self._written > METRICS_FLUSH_SECONDS:
            self.write()

    def write(self) -> None:
        atomic_write_text(self.path, metrics_text(self.rows))
        self._written = time.perf_counter()

    @property
    def last(self) -> dict[str, Any] | None:
        return self.rows[-1] if self.rows else None
