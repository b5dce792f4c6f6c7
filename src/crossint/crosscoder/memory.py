"""How much memory training a crosscoder needs, estimated before anything is allocated, and how
much the device has: an impossible ``--features`` is refused with the estimate, not met by an
allocator's error half-way through."""

from __future__ import annotations

import torch

from crossint.crosscoder.config import CrosscoderConfig, TrainConfig
from crossint.errors import CrossintError

FLOAT_BYTES = 4
# Copies of the parameters alive while training: the weights, their gradients and Adam's two
# moments; on the CPU also the checkpoint's copy of the weights and moments.
PARAMETER_COPIES = {"cpu": 7, "other": 4}
# [B, H] float tensors alive in one step (pre-activations, codes, their gradients, the AuxK and
# top-k work space).
BATCH_BY_FEATURE_COPIES = 8


def parameter_count(config: CrosscoderConfig) -> int:
    """Parameters and buffers of a crosscoder with ``config`` (SPEC §3.1)."""
    X, D, H = config.n_positions, config.d_model, config.n_features
    return 2 * X * D * H + 2 * H + 2 * X * D + X


def training_bytes(config: CrosscoderConfig, train_config: TrainConfig,
                   device_type: str = "cpu") -> int:
    """Estimated peak bytes of :func:`crossint.crosscoder.train.train` on a device of
    ``device_type`` (a lower bound: Python, torch and the data source come on top)."""
    B, H = train_config.batch_size, config.n_features
    batch = B * config.n_positions * config.d_model * 3  # input, reconstruction, its gradient
    copies = PARAMETER_COPIES["cpu" if device_type == "cpu" else "other"]
    return FLOAT_BYTES * (copies * parameter_count(config) + BATCH_BY_FEATURE_COPIES * B * H
                          + batch)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on ``device`` (None when it cannot be told)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    import psutil

    return int(psutil.virtual_memory().available)  # free plus reclaimable caches


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_training_memory(config: CrosscoderConfig, train_config: TrainConfig,
                          device: torch.device) -> None:
    """CrossintError with the estimate when training cannot fit in ``device``'s free memory."""
    needed = training_bytes(config, train_config, device.type)
    free = available_bytes(device)
    if free is None or needed <= free:
        return
    raise CrossintError(
        f"training a crosscoder with {config.n_features} features over {config.n_positions} "
        f"positions x {config.d_model} (batch {train_config.batch_size}) needs about "
        f"{human_bytes(needed)} of memory (weights, gradients, Adam state, one batch), but "
        f"{device.type} has {human_bytes(free)} free: use fewer --features (or a smaller "
        f"--batch-size)"
    )
