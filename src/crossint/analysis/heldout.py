"""Held-out text for analysing a trained crosscoder: which run, which model, which tokens.

Every analysis (`eval`, `interactions`, fidelity, ...) runs the subject model on text the
crosscoder never trained on: by default the training cache's corpus and context length with a
story seed that harvests do not use by default. Special tokens (BOS/EOS/PAD) are left out, as in
the harvest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossint.errors import CrossintError
from crossint.io import read_json

HELDOUT_SEED = 12345  # default text seed for analyses; harvests default to seed 0


def load_run(run_dir: str | Path, command: str = "eval"):
    """The saved crosscoder of a run (eval mode) and the name of its single subject model."""
    from crossint.crosscoder.model import Crosscoder

    crosscoder = Crosscoder.from_pretrained(run_dir)
    models = list(crosscoder.config.models)
    if len(models) != 1:
        raise CrossintError(
            f"{run_dir} is a {len(models)}-model crosscoder; `crossint {command}` works on "
            "single-model crosscoders"
        )
    return crosscoder.eval(), models[0]


def training_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of the activation cache a run was trained on ({} if unknown or gone)."""
    document = read_json(Path(run_dir) / "config.json", "crosscoder config")
    source = document.get("source") or {} if isinstance(document, dict) else {}
    path = source.get("path")
    if not path or not (Path(path) / "manifest.json").is_file():
        return {}
    return read_json(Path(path) / "manifest.json", "activation cache manifest")


def training_text_settings(run_dir: str | Path) -> dict[str, Any]:
    """Corpus and context length of the cache a run was trained on (empty if unknown)."""
    manifest = training_manifest(run_dir)
    return {k: manifest[k] for k in ("corpus", "context_length") if k in manifest}


def heldout_batches(
    adapter,
    corpus: str,
    seed: int,
    context_length: int,
    n_tokens: int | None,
    batch_size: int,
    n_contexts: int | None = None,
) -> list[Tensor]:
    """Contexts of held-out text holding at least ``n_tokens`` non-special tokens, or exactly
    ``n_contexts`` contexts (fewer if the corpus runs out), in batches of ``batch_size``."""
    if (n_tokens is None) == (n_contexts is None):
        raise ValueError("give exactly one of n_tokens and n_contexts")
    from crossint.data.corpus import iter_contexts, iter_texts

    if adapter.tokenizer is None:
        raise CrossintError(f"model {adapter.name!r} has no tokenizer; cannot tokenize {corpus!r}")
    if context_length > adapter.max_context:
        raise CrossintError(
            f"context length {context_length} is longer than the model's maximum "
            f"{adapter.max_context}"
        )
    special_ids = adapter.special_token_ids()
    contexts, n_usable = [], 0
    for ids_S in iter_contexts(iter_texts(corpus, seed=seed), adapter.tokenizer, context_length):
        contexts.append(ids_S)
        n_usable += int(non_special_BS(ids_S, special_ids).sum())
        if len(contexts) == n_contexts or (n_tokens is not None and n_usable >= n_tokens):
            break
    if not contexts:
        raise CrossintError(f"corpus {corpus!r} gave no text to evaluate on")
    return list(torch.stack(contexts).split(batch_size))


def non_special_BS(ids_BS: Tensor, special_ids: set[int]) -> Tensor:
    """True at every token that is not a special token (BOS/EOS/PAD)."""
    if not special_ids:
        return torch.ones_like(ids_BS, dtype=torch.bool)
    return ~torch.isin(ids_BS, torch.tensor(sorted(special_ids), device=ids_BS.device))


def capture_tokens(
    adapter: Any, ids_BS: Tensor, hookpoints: list[str], special_ids: set[int]
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """One forward pass: the captured tensors (B, S, D) by hookpoint, the non-special mask
    (B, S), and the non-special tokens' activations stacked as (N, X, D) float32."""
    with torch.no_grad():
        acts = adapter.capture(ids_BS, hookpoints)
    keep_BS = non_special_BS(ids_BS, special_ids)
    acts_NXD = torch.stack([acts[h][keep_BS] for h in hookpoints], dim=1).float()
    n_bad = int((~torch.isfinite(acts_NXD)).sum())
    if n_bad:
        raise CrossintError(f"model {adapter.name!r} produced {n_bad} NaN/Inf activations")
    return acts, keep_BS, acts_NXD
