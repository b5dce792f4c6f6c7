"""Where training reads activations from: the source protocol, the checks that a source fits a
crosscoder, what a run records about it, and the device-side batch stream."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from crossint.crosscoder.config import CrosscoderConfig
from crossint.errors import CrossintError


class ActivationSource(Protocol):
    """What ``train`` reads activations from (``crossint.data.cache.ActivationCache``, the
    in-memory ``TensorActivations`` and ``crossint.data.stream.StreamingActivations``, which
    runs the model as training reads). A source for a multi-model crosscoder also exposes
    ``models`` and yields positions model-major."""

    hookpoints: list[str]
    dims: dict[str, int]
    n_tokens: int

    def batches(self, batch_size: int, seed: int, start_batch: int = 0) -> Iterator[Tensor]: ...

    def sample(self, n_tokens: int, seed: int) -> Tensor: ...


# What a run records of its cache's text (config.json source.text): the analyses read the same
# corpus, held-out part and context length from it even when the cache has been moved.
TEXT_KEYS = ("corpus", "corpus_file", "corpus_sha256", "text_field", "context_length",
             "corpus_split")


def source_signature(source: ActivationSource) -> dict[str, Any]:
    """What a run remembers about its data to refuse a mismatched resume: hookpoints, widths,
    models and, for a cache, its ``fingerprint`` (the shards' checksums; None for sources
    without one)."""
    models = getattr(source, "models", None)
    if models is None and isinstance(getattr(source, "model", None), str):
        models = [source.model]
    fingerprint = getattr(source, "fingerprint", None)
    return {
        "hookpoints": list(source.hookpoints),
        "dims": {h: int(source.dims[h]) for h in source.hookpoints},
        "models": list(models) if models is not None else None,
        "fingerprint": fingerprint if isinstance(fingerprint, str) else None,
    }


def describe_source(source: ActivationSource) -> dict[str, Any]:
    """Signature plus where the activations came from (recorded in config.json): the cache's
    path and model, ``text``, the settings of the text it was harvested from, and for a
    streaming source ``stream``, its settings."""
    description = {"type": type(source).__name__, **source_signature(source)}
    description["n_tokens"] = int(source.n_tokens)
    for attribute in ("path", "model"):
        value = getattr(source, attribute, None)
        if isinstance(value, (str, Path)):
            description[attribute] = str(Path(value).resolve()) if attribute == "path" else value
    manifest = getattr(source, "manifest", None)
    if isinstance(manifest, dict):
        description["text"] = {key: manifest[key] for key in TEXT_KEYS if key in manifest}
    stream = getattr(source, "stream_settings", None)
    if isinstance(stream, dict):  # what rebuilds a streaming source on resume
        description["stream"] = dict(stream)
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


def check_finite_batch(batch_BXD: Tensor, index: int, hookpoints: list[str] | None) -> None:
    """CrossintError naming the batch, tokens and hookpoints when the input holds NaN/Inf (the
    loss would turn non-finite and look like a diverged run)."""
    if bool(torch.isfinite(batch_BXD).all()):
        return
    bad_BX = ~torch.isfinite(batch_BXD).all(dim=-1)
    positions = bad_BX.any(dim=0).nonzero().flatten().tolist()
    names = [hookpoints[x] if hookpoints and x < len(hookpoints) else f"position {x}"
             for x in positions]
    rows = bad_BX.any(dim=1).nonzero().flatten().tolist()
    raise CrossintError(
        f"the input activations hold non-finite values (NaN/Inf): batch {index} (the batch of "
        f"step {index + 1}), {len(rows)} of its {batch_BXD.shape[0]} tokens, at "
        f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; training needs finite "
        f"activations: clean the source (this is not a learning-rate problem)"
    )


def device_batches(batches: Iterator[Tensor], device: torch.device, start: int = 0,
                   hookpoints: list[str] | None = None) -> Iterator[Tensor]:
    """Move batches to the device, refusing batches with NaN/Inf (``check_finite_batch``;
    ``start`` numbers the first batch). On CUDA a thread reads the next batches (pinned) while
    the GPU trains, so data loading overlaps compute; the order never changes."""
    if device.type != "cuda":
        for index, batch in enumerate(batches, start=start):
            check_finite_batch(batch, index, hookpoints)
            yield batch.to(device=device, dtype=torch.float32)
        return
    ready: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()

    def produce() -> None:
        try:
            for index, batch in enumerate(batches, start=start):
                check_finite_batch(batch, index, hookpoints)
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
