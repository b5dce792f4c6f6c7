"""Two models' activation caches of the same tokens as one source for a two-model crosscoder
(SPEC §3.1 with M = 2, the model-diffing crosscoder of SPEC §9.3).

Both caches must hold the same tokens in the same rows: same hookpoints, shard sizes and, per
shard, the same token fingerprint (``tokens_sha256``, written by the harvest). Harvest both
models with the same corpus, seed, context length and shard size; their tokenizers must agree.
Batches and samples then read the same rows of both and stack them model-major, as
``Crosscoder`` expects: positions ``(first, h) for h in hookpoints`` then ``(second, h) ...``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from crossint.data.cache import ActivationCache
from crossint.errors import CrossintError


class PairedActivations:
    """``first`` and ``second`` (``ActivationCache``) read together; see the module docstring."""

    def __init__(self, first: ActivationCache, second: ActivationCache) -> None:
        where = f"activation caches {first.path} and {second.path}"
        if first.model == second.model:
            raise CrossintError(f"{where} come from the same model {first.model!r}")
        for name in ("hookpoints", "dims", "shard_sizes"):
            if getattr(first, name) != getattr(second, name):
                raise CrossintError(
                    f"{where} differ in {name} ({getattr(first, name)} vs "
                    f"{getattr(second, name)}); harvest both with the same settings"
                )
        for index, (a, b) in enumerate(zip(first.manifest["shards"], second.manifest["shards"],
                                           strict=True)):
            if "tokens_sha256" not in a or "tokens_sha256" not in b:
                raise CrossintError(
                    f"{where}: shard {index} has no token fingerprint (harvested by an older "
                    "crossint); harvest both again to pair them"
                )
            if a["tokens_sha256"] != b["tokens_sha256"]:
                raise CrossintError(
                    f"{where} hold different tokens in shard {index}: harvest both models with "
                    "the same corpus, seed, context length and shard size (and one tokenizer)"
                )
        self.first, self.second = first, second
        self.models = [first.model, second.model]
        self.hookpoints = list(first.hookpoints)
        self.dims = dict(first.dims)
        self.n_tokens = first.n_tokens

    def __repr__(self) -> str:
        return f"PairedActivations({self.first!r}, {self.second!r})"

    @property
    def fingerprint(self) -> str:
        """Both caches' fingerprints in one (checked when a training run resumes)."""
        import hashlib

        both = f"{self.first.fingerprint}\n{self.second.fingerprint}\n"
        return hashlib.sha256(both.encode()).hexdigest()

    @property
    def n_shards(self) -> int:
        return self.first.n_shards

    # Both caches hold the same shard sizes, so they deal their shards alike.
    def part_tokens(self, parts: int, seed: int) -> list[int]:
        return self.first.part_tokens(parts, seed)

    def check_parts(self, batch_size: int, parts: int, seed: int,
                    part: int | None = None) -> None:
        for cache in (self.first, self.second):
            cache.check_parts(batch_size, parts, seed, part)

    def batches(self, batch_size: int, seed: int, start_batch: int = 0, *, parts: int = 1,
                part: int | None = None) -> Iterator[torch.Tensor]:
        """[B, 2P, D] batches: the same tokens of both caches, model-major (``parts``, ``part``:
        as ``ActivationCache.batches``; both caches deal their shards alike)."""
        read = {"parts": parts, "part": part}
        pairs = zip(self.first.batches(batch_size, seed, start_batch, **read),  # both infinite
                    self.second.batches(batch_size, seed, start_batch, **read), strict=False)
        for a_BPD, b_BPD in pairs:
            yield torch.cat([a_BPD, b_BPD], dim=1)

    def sample(self, n_tokens: int, seed: int, *, parts: int = 1,
               part: int | None = None) -> torch.Tensor:
        read = {"parts": parts, "part": part}
        return torch.cat([self.first.sample(n_tokens, seed, **read),
                          self.second.sample(n_tokens, seed, **read)], dim=1)
