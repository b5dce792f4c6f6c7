"""Training without a cache: activations streamed from the model through a shuffle buffer.

``StreamingActivations`` is an ``ActivationSource`` that runs the model over the corpus with the
harvest's own functions (context packing, special tokens left out, hookpoint capture, forward
passes of ``batch_size`` contexts) and writes nothing to disk. The stream of kept tokens is cut
into buffers of ``buffer_tokens`` tokens, and buffer b holds exactly the tokens, in the same row
order, of shard b of ``crossint harvest`` with ``shard_tokens = buffer_tokens``, ``n_tokens`` the
training budget and the same seed and batch size. Training reads the buffers in order, each
through the permutation ``ActivationCache.batches`` reads a window through. So:

- with one buffer as large as the budget, the batches, and the ``sample`` the normalisation is
  estimated from, are exactly those of the cache of the same tokens: the same crosscoder;
- with smaller buffers, the tokens of a buffer are shuffled together but never with the next
  buffer's (a cache also visits its shards in a new order every epoch; a stream cannot look
  ahead, and it reads each token once).

Memory: one buffer, ``buffer_tokens x sum(dims) x 4`` bytes, plus the batch being trained.

Several processes (torchrun): rank r runs the model on forward-pass batches r, r + P, ... and the
ranks exchange the rows (:meth:`StreamingActivations._captured_rows`), so each runs about 1/P of
the forward passes and all fill the same buffers.

Resume: the stream position at step k follows from k (buffer ``k·B // N`` begins at kept token
``b·N``), and the checkpoint records k. ``batches(start_batch=k)`` re-reads the corpus up to that
buffer counting kept tokens (tokenisation only, no forward pass, as a harvest's resume skips the
batches of its written shards), rebuilds the buffer by running the model from the forward-pass
batch that holds its first token, and continues: the buffer is rebuilt exactly, and a resumed run
trains on exactly the batches an uninterrupted run does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossint.data.cache import (
    RNG_SAMPLE,
    RNG_SHARD,
    RNG_WINDOW,
    SETTING_KEYS,
    SPLIT_KEY,
    check_stream_args,
    permutation,
)
from crossint.data.harvest import (
    Capture,
    captured_batches,
    check_harvest_arguments,
    context_batches,
    harvest_settings,
    kept_positions,
    open_contexts,
    weights_dtype,
)
from crossint.errors import CrossintError

DEFAULT_BUFFER_TOKENS = 65536  # the harvest's default shard: its shuffle buffer
MEMORY_FRACTION = 0.25  # of the available memory a default buffer may take


def buffer_tokens_for_memory(available_bytes: int | None, bytes_per_token: int,
                             n_tokens: int) -> int:
    """The default buffer: the largest power of two of tokens that fits in a quarter of
    ``available_bytes`` (a power of two, so that machines of about the same memory choose the
    same buffer and repeat each other's runs), at most the whole budget ``n_tokens``."""
    if available_bytes is None:
        return min(DEFAULT_BUFFER_TOKENS, n_tokens)
    fits = int(available_bytes * MEMORY_FRACTION) // bytes_per_token
    return min(2 ** int(math.log2(fits)) if fits >= 1 else 0, n_tokens)


class StreamingActivations:
    """Activations of ``adapter`` (a ``ModelAdapter`` or a model name) at ``hookpoints`` on
    ``n_tokens`` kept tokens of ``corpus``, produced as training reads them (see the module
    docstring). The other arguments are those of ``crossint.data.harvest.harvest``;
    ``buffer_tokens`` is the shuffle buffer (the harvest's ``shard_tokens``). ``model_dtype``
    is the dtype a model given by name runs in (a loaded model must already run in it; None:
    float32 for a name, the loaded model's own). ``progress`` shows a bar of the tokens
    harvested and trained."""

    def __init__(
        self,
        adapter: Any,
        n_tokens: int,
        hookpoints: str | Sequence[str] = "paper",
        corpus: str | Path = "stories",
        context_length: int = 128,
        batch_size: int = 32,
        buffer_tokens: int = DEFAULT_BUFFER_TOKENS,
        seed: int = 0,
        include_special: bool = False,
        text_field: str = "text",
        progress: bool = False,
        model_dtype: str | None = None,
    ) -> None:
        if isinstance(adapter, (str, Path)):
            from crossint.models.adapter import load_model

            adapter = load_model(str(adapter), dtype=model_dtype or "float32")
        if model_dtype is not None and weights_dtype(adapter) != model_dtype:
            raise CrossintError(f"the model runs in {weights_dtype(adapter)}, not the "
                                f"model_dtype {model_dtype} asked for")
        names = list(adapter.resolve_layout(hookpoints))
        dims = {name: int(adapter.hookpoint_dim(name)) for name in names}
        check_harvest_arguments(adapter, seed, context_length, n_tokens=n_tokens,
                                batch_size=batch_size, buffer_tokens=buffer_tokens)
        if len(set(dims.values())) > 1:
            detail = ", ".join(f"{h}: {d}" for h, d in dims.items())
            raise CrossintError(
                f"hookpoints of different widths ({detail}); a crosscoder needs one width: "
                "use hookpoints of one width (e.g. the paper or resid layout)"
            )
        split, _ = open_contexts(adapter, corpus, seed, text_field, context_length)
        self.adapter = adapter
        self.hookpoints: list[str] = names
        self.dims: dict[str, int] = dims
        self.n_tokens = n_tokens
        self.model = str(adapter.name)
        self.buffer_tokens = buffer_tokens
        self.progress = progress
        # What a run records to rebuild this stream on resume (``describe_source``).
        self.stream_settings: dict[str, Any] = {
            "corpus": str(corpus), "text_field": text_field, "context_length": context_length,
            "batch_size": batch_size, "buffer_tokens": buffer_tokens, "seed": seed,
            "include_special": include_special, "model_dtype": weights_dtype(adapter),
        }
        # The manifest of the harvest whose shards are these buffers: run configs read the
        # text settings from it, the interaction penalty the model's.
        self.manifest: dict[str, Any] = harvest_settings(adapter, names, dims, "float32", {
            **self.stream_settings, "shard_tokens": buffer_tokens, "n_tokens_target": n_tokens,
        }, split)
        self._capture = Capture(adapter, names, dims, torch.float32, include_special)
        self._ranks: tuple[int, int, Any] | None = None  # (rank, world size, gloo group)

    @property
    def fingerprint(self) -> str:
        """sha256 of the settings that decide every token's activations and place: a resumed
        run must stream what it started on."""
        settings = {key: self.manifest.get(key) for key in (*SETTING_KEYS, SPLIT_KEY)}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def __repr__(self) -> str:
        return (f"StreamingActivations(model={self.model!r}, hookpoints={len(self.hookpoints)}, "
                f"n_tokens={self.n_tokens}, buffer_tokens={self.buffer_tokens})")

    def check_batch_size(self, batch_size: int) -> None:
        """A batch must fit in the buffer (a buffer smaller than the budget)."""
        if batch_size > min(self.buffer_tokens, self.n_tokens):
            raise CrossintError(
                f"the shuffle buffer of {self.buffer_tokens} tokens is smaller than a batch of "
                f"{batch_size} tokens: use --buffer-tokens {batch_size} or more, or a smaller "
                f"--batch-size"
            )

    def batches(self, batch_size: int, seed: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """The float32 [B, X, D] batches of the budget from batch ``start_batch`` on (what a
        fresh stream yields after that many batches); asking for more is a CrossintError."""
        check_stream_args(batch_size, seed, start_batch)
        self.check_batch_size(batch_size)
        if start_batch * batch_size >= self.n_tokens:
            raise CrossintError(f"batch {start_batch} is past the end of the stream of "
                                f"{self.n_tokens} tokens")
        self._join_ranks()
        return self._batches(batch_size, seed, start_batch)

    def _batches(self, batch_size: int, seed: int, start_batch: int) -> Iterator[torch.Tensor]:
        first, offset = divmod(start_batch * batch_size, self.buffer_tokens)
        pieces: list[torch.Tensor] = []
        need, trained = batch_size, start_batch * batch_size
        bar = self._progress_bar(first * self.buffer_tokens)
        try:
            for index, buffer_TXD in self._buffers(first, bar.update):
                size = buffer_TXD.shape[0]
                order_T = permutation(size, seed, RNG_WINDOW, 0, index)  # the cache's window read
                while offset < size:
                    take = min(need, size - offset)
                    pieces.append(buffer_TXD[order_T[offset : offset + take]])  # a copy
                    offset, need = offset + take, need - take
                    if need == 0:
                        trained += batch_size
                        bar.set_postfix(trained=trained, refresh=False)
                        yield pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                        pieces, need = [], batch_size
                offset = 0
        finally:
            bar.close()
        raise CrossintError(
            f"the stream holds {self.n_tokens} tokens, fewer than training asked for: stream "
            f"at least steps x batch size tokens"
        )

    def sample(self, n_tokens: int, seed: int) -> torch.Tensor:
        """The first ``n_tokens`` kept tokens (at most the budget) as float32 [n, X, D], in a
        random order (that of ``ActivationCache.sample`` when they are all the budget)."""
        check_stream_args(1, seed, 0)
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise CrossintError(f"n_tokens must be a positive integer, got {n_tokens!r}")
        n = min(n_tokens, self.n_tokens)
        self._join_ranks()
        # Filled as the first shard of the harvest of n tokens, then drawn from as
        # ActivationCache.sample draws from it.
        sample_TF = torch.empty(n, self._width)
        dest_T = permutation(n, self.stream_settings["seed"], RNG_SHARD, 0)
        _fill(sample_TF, dest_T, self._rows_from(0), sample_TF[:0])
        rows = np.random.default_rng([seed, RNG_SAMPLE, 1]).choice(n, size=n, replace=False)
        return sample_TF[torch.from_numpy(rows)].view(n, len(self.hookpoints), -1)

    @property
    def _width(self) -> int:
        return sum(self.dims.values())

    def _buffers(self, first: int, on_rows: Callable[[int], Any]
                 ) -> Iterator[tuple[int, torch.Tensor]]:
        """(b, buffer b as float32 [n, X, D] in shard row order) from b = ``first`` to the end
        of the budget; one tensor, refilled in place (batches are copied out of it)."""
        N = self.buffer_tokens
        rows = self._rows_from(first * N)
        buffer_TF = torch.empty(min(N, self.n_tokens), self._width)
        carry_TF = buffer_TF[:0]
        for index in range(first, math.ceil(self.n_tokens / N)):
            size = min(N, self.n_tokens - index * N)
            dest_T = permutation(size, self.stream_settings["seed"], RNG_SHARD, index)
            carry_TF = _fill(buffer_TF, dest_T, rows, carry_TF, on_rows)
            yield index, buffer_TF[:size].view(size, len(self.hookpoints), -1)

    def _rows_from(self, start_token: int) -> Iterator[torch.Tensor]:
        """The kept-token stream as float32 [n, F] host blocks (F: the hookpoints side by side)
        from kept token ``start_token`` on. Forward passes cover the same contexts as in a
        harvest whatever the start, so every token's floats are the same."""
        settings = self.stream_settings
        _, contexts = open_contexts(self.adapter, settings["corpus"], settings["seed"],
                                    settings["text_field"], settings["context_length"])
        batches = context_batches(contexts, settings["batch_size"])
        first_batch, skip, batches = self._skip_to(start_token, batches)
        produced = start_token
        for rows_TF in self._captured_rows(batches, first_batch):
            rows_TF = rows_TF[skip:]
            skip, produced = 0, produced + rows_TF.shape[0]
            yield rows_TF
        raise self._exhausted(produced)

    def _join_ranks(self) -> None:
        """Under torch.distributed (torchrun) with several processes, a gloo group of its own
        for the stream's exchanges: created here, on the calling thread of every rank alike,
        because the batches may be read on a loader thread while training's collectives run."""
        import torch.distributed as dist

        if self._ranks is None and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            self._ranks = (dist.get_rank(), dist.get_world_size(), dist.new_group(backend="gloo"))

    def _captured_rows(self, batches: Iterator[torch.Tensor], first_batch: int
                       ) -> Iterator[torch.Tensor]:
        """The kept rows of each forward-pass batch, in order. With P processes, rank r runs
        the model on batches r, r + P, ... only and the ranks exchange their rows, so the
        forward passes are shared while every rank sees the whole stream (and P ranks train
        exactly as one process)."""
        if self._ranks is None:
            for pending in captured_batches(self._capture, batches, first_batch):
                yield pending.rows_TF
            return
        import torch.distributed as dist

        rank, world_size, group = self._ranks
        for turn, turn_batches in enumerate(_chunked(batches, world_size)):
            mine = turn_batches[rank:rank + 1]
            own = [pending.rows_TF for pending in captured_batches(
                self._capture, mine, first_batch + turn * world_size + rank)]
            rows: list[Any] = [None] * world_size
            dist.all_gather_object(rows, own[0] if own else None, group=group)
            yield from rows[:len(turn_batches)]

    def _skip_to(self, start_token: int, batches: Iterator[torch.Tensor]
                 ) -> tuple[int, int, Iterator[torch.Tensor]]:
        """(index of the forward-pass batch holding kept token ``start_token``, its kept tokens
        before that one, the batches from that one on), counting kept tokens without the
        model."""
        skipped = 0
        for index, ids_BS in enumerate(batches):
            kept_T = kept_positions(ids_BS, self._capture.special_ids,
                                    self.stream_settings["include_special"])
            kept = ids_BS.numel() if kept_T is None else kept_T.numel()
            if skipped + kept > start_token:
                return index, start_token - skipped, itertools.chain([ids_BS], batches)
            skipped += kept
        raise self._exhausted(skipped)

    def _exhausted(self, produced: int) -> CrossintError:
        return CrossintError(
            f"corpus {self.stream_settings['corpus']} ran out after {produced} tokens (of its "
            f"harvest part), but training streams {self.n_tokens} (steps x batch size): give a "
            f"larger corpus, fewer --steps or a smaller --batch-size"
        )

    def _progress_bar(self, harvested: int) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=self.n_tokens, initial=harvested, disable=not self.progress,
                    desc="stream", unit="tok", unit_scale=True, dynamic_ncols=True)


def _chunked(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _fill(buffer_TF: torch.Tensor, dest_T: torch.Tensor, rows: Iterator[torch.Tensor],
          carry_TF: torch.Tensor, on_rows: Callable[[int], Any] | None = None) -> torch.Tensor:
    """Put the next ``len(dest_T)`` stream rows (``carry_TF`` first, then blocks from ``rows``)
    at rows ``dest_T`` of ``buffer_TF``, as the harvest fills a shard; returns the rows of the
    last block left over for the next buffer."""
    fill = 0
    while fill < len(dest_T):
        if carry_TF.shape[0] == 0:
            carry_TF = next(rows)
        take = min(len(dest_T) - fill, carry_TF.shape[0])
        buffer_TF.index_copy_(0, dest_T[fill : fill + take], carry_TF[:take])
        carry_TF, fill = carry_TF[take:], fill + take
        if on_rows is not None:
            on_rows(take)
    return carry_TF
