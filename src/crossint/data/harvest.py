"""The streaming activation harvest into an on-disk cache (format: ``crossint.data.cache``).

Contexts from ``crossint.data.corpus`` go through the model adapter in batches; at every position
whose token is not special (BOS/EOS/PAD, unless ``include_special``) the activations of every
requested hookpoint are kept. The kept-token stream is cut into shards of ``shard_tokens`` tokens
and each shard is shuffled at token level (a shard is the shuffle buffer). Shard ``k`` is a
deterministic function of the settings and ``(seed, k)``, and the manifest, rewritten atomically
after every shard, records where in the batch stream the next shard starts, so an interrupted
harvest resumes exactly where it stopped and produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crossint.data.cache import (
    CORPUS_FILE_KEY,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    RNG_SHARD,
    SETTING_KEYS,
    SPLIT_KEY,
    ActivationCache,
    canonical_dtype,
    permutation,
    shard_file_name,
    validate_manifest,
)
from crossint.errors import CrossintError
from crossint.io import atomic_write, atomic_write_json, read_json, sha256_file
from crossint.lock import locked
from crossint.rundir import LOCK


def harvest(
    adapter: Any,
    out_dir: str | Path,
    hookpoints: str | Sequence[str] = "paper",
    n_tokens: int = 200_000,
    corpus: str | Path = "stories",
    context_length: int = 128,
    batch_size: int = 32,
    dtype: str | torch.dtype = "float32",
    shard_tokens: int = 65536,
    seed: int = 0,
    include_special: bool = False,
    progress: bool = True,
    *,
    text_field: str = "text",
    on_shard: Callable[[int, dict], None] | None = None,
) -> ActivationCache:
    """Harvest ``n_tokens`` tokens of activations at ``hookpoints`` into a cache at ``out_dir``.

    ``adapter`` is a ``ModelAdapter`` (or a model name/path, loaded on the CPU). ``hookpoints``
    is a layout name (``paper``, ``resid``) or a list of hookpoint names. Only the harvest part
    of ``corpus`` is read (``crossint.data.corpus.split_corpus``: file and hf: corpora hold out
    about 10% of their documents for the analyses; the split goes into the manifest as
    ``corpus_split``). If ``out_dir`` already holds a cache with the same settings it is resumed
    (or returned as is when complete); any other non-empty directory is an error and nothing in
    it is touched. A finite corpus that runs out early ends the harvest with fewer tokens (the
    manifest says ``corpus_exhausted``). ``on_shard(index, entry)`` is called after each shard
    and its manifest entry are on disk. The harvest holds ``out_dir``'s lock
    (``crossint.lock``): a second harvest into it stops with a CrossintError.
    """
    if isinstance(adapter, (str, Path)):
        from crossint.models.adapter import load_model

        adapter = load_model(str(adapter))
    names = list(adapter.resolve_layout(hookpoints))
    dims = {name: int(adapter.hookpoint_dim(name)) for name in names}
    dtype_name = canonical_dtype(dtype)
    check_harvest_arguments(adapter, seed, context_length, n_tokens=n_tokens,
                            batch_size=batch_size, shard_tokens=shard_tokens)
    # Before touching the output directory: a bad, empty or unsplittable corpus writes nothing.
    split, contexts = open_contexts(adapter, corpus, seed, text_field, context_length)
    settings = harvest_settings(adapter, names, dims, dtype_name, {
        "context_length": context_length, "corpus": corpus, "text_field": text_field,
        "seed": seed, "include_special": include_special, "batch_size": batch_size,
        "shard_tokens": shard_tokens, "n_tokens_target": n_tokens,
    }, split)
    out = Path(out_dir)
    # One harvest per directory: a second one (another process) stops here, writing nothing.
    with locked(out, "crossint harvest"):
        manifest = _open_for_harvest(out, settings)
        if not manifest["complete"]:
            _harvest_shards(adapter, out, manifest, contexts, progress, on_shard)
        return ActivationCache(out)


def check_harvest_arguments(adapter: Any, seed: int, context_length: int,
                            **positive: int) -> None:
    """CrossintError for a bad seed or context length, or a ``positive`` setting (named by its
    keyword) that is not a positive integer."""
    for field, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise CrossintError(f"{field} must be a positive integer, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise CrossintError(f"seed must be a non-negative integer, got {seed!r}")
    if context_length > adapter.max_context:
        raise CrossintError(
            f"context length {context_length} is longer than the maximum context of model "
            f"{adapter.name} ({adapter.max_context} tokens): use a context length of at most "
            f"{adapter.max_context}"
        )
    if context_length < 2:
        raise CrossintError(f"context length must be at least 2, got {context_length}")
    if adapter.tokenizer is None:
        raise CrossintError(f"model {adapter.name} has no tokenizer, so it cannot read a corpus")


def open_contexts(adapter: Any, corpus: str | Path, seed: int, text_field: str,
                  context_length: int) -> tuple[Any, Iterator[torch.Tensor]]:
    """(the corpus split, the packed contexts of its harvest part), the first context already
    packed: a bad, empty or unsplittable corpus fails here, before anything else happens."""
    from crossint.data.corpus import iter_contexts, iter_texts, split_corpus

    split = split_corpus(corpus, text_field)
    texts = iter_texts(corpus, seed=seed, text_field=text_field, part="harvest", split=split)
    contexts = iter_contexts(texts, adapter.tokenizer, context_length, corpus_name=str(corpus))
    return split, itertools.chain([next(contexts)], contexts)


def weights_dtype(adapter: Any) -> str:
    """The dtype the model runs in ("float32", "bfloat16", ...)."""
    parameter = next(adapter.model.parameters(), None)
    return "float32" if parameter is None else str(parameter.dtype).removeprefix("torch.")


def _weights_dtype(adapter: Any) -> dict[str, str]:
    """``{"weights_dtype": ...}`` for a model run in low precision (float32 adds nothing, so
    caches harvested before this was recorded still resume)."""
    name = weights_dtype(adapter)
    return {} if name == "float32" else {"weights_dtype": name}


def harvest_settings(adapter: Any, names: list[str], dims: dict[str, int], dtype_name: str,
                      given: dict[str, Any], split: Any) -> dict[str, Any]:
    """The manifest's settings (``SETTING_KEYS``, and ``corpus_split`` for a split corpus)."""
    from crossint.data.corpus import corpus_file, corpus_fingerprint

    config = getattr(adapter.model, "config", None)
    corpus = given["corpus"]
    settings = {
        "model": str(adapter.name),
        "model_info": {
            "family": getattr(adapter, "family", None),
            "model_type": getattr(config, "model_type", None),
            "n_blocks": int(adapter.n_blocks),
            "d_model": int(adapter.d_model),
            **_weights_dtype(adapter),
        },
        "hookpoints": names,
        "dims": dims,
        "dtype": dtype_name,
        "context_length": int(given["context_length"]),
        "corpus": str(corpus),
        "corpus_sha256": corpus_fingerprint(corpus),
        "text_field": given["text_field"],
        "seed": int(given["seed"]),
        "include_special": bool(given["include_special"]),
        "batch_size": int(given["batch_size"]),
        "shard_tokens": int(given["shard_tokens"]),
        "n_tokens_target": int(given["n_tokens_target"]),
    }
    if split is not None:  # stories (split by seed) keep the manifest they always had
        settings[SPLIT_KEY] = split.record()
    if corpus_file(corpus) is not None:  # not a setting: a moved corpus file is the same text
        settings[CORPUS_FILE_KEY] = corpus_file(corpus)
    return settings


def _harvest_shards(adapter: Any, out: Path, manifest: dict, contexts: Iterator[torch.Tensor],
                    progress: bool, on_shard: Callable[[int, dict], None] | None) -> None:
    """Capture batches and file them into shards from where ``manifest`` stopped until the
    target (or the end of the corpus)."""
    shards = manifest["shards"]
    first_batch, first_skip = (
        (shards[-1]["next_batch"], shards[-1]["next_skip"]) if shards else (0, 0)
    )
    batch_size = manifest["batch_size"]
    contexts = itertools.islice(contexts, first_batch * batch_size, None)
    writer = _ShardWriter(out, manifest, on_shard)
    capture = Capture(adapter, manifest["hookpoints"], manifest["dims"],
                      DTYPES[manifest["dtype"]], manifest["include_special"])

    from tqdm import tqdm

    with tqdm(total=manifest["n_tokens_target"], initial=writer.written, unit="tok",
              unit_scale=True, desc="harvest", disable=not progress, dynamic_ncols=True) as bar:
        try:
            batches = context_batches(contexts, batch_size)
            for pending in captured_batches(capture, batches, first_batch):
                bar.update(writer.add(pending, first_batch, first_skip))
                if writer.finished:
                    break
        except BaseException:
            bar.leave = False  # an aborted bar is cleared, so the error is what remains
            raise
    if not writer.finished:
        writer.finish_exhausted()


def tokens_fingerprint(ids_T: torch.Tensor) -> str:
    """sha256 of token ids as little-endian int64, in row order."""
    import hashlib

    return hashlib.sha256(ids_T.to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()


def context_batches(contexts: Iterable[torch.Tensor], batch_size: int
                    ) -> Iterator[torch.Tensor]:
    """Contexts stacked ``batch_size`` at a time into [B, S] forward-pass batches (the last one
    may be smaller)."""
    batch: list[torch.Tensor] = []
    for context in contexts:
        batch.append(context)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


@dataclass
class _Pending:
    """A captured batch on its way to the host: rows are kept tokens, columns all hookpoints."""

    batch_index: int
    rows_TF: torch.Tensor  # host tensor once ``event`` has completed
    colsum_F: torch.Tensor  # float32 column sums: non-finite when a column holds NaN/Inf
    ids_T: torch.Tensor  # host int64 token ids of the rows
    event: Any = None  # torch.cuda.Event of the device-to-host copy, None on the CPU

    def ready(self) -> _Pending:
        """This batch once its copy to the host has completed."""
        if self.event is not None:
            self.event.synchronize()
        return self


def special_id_tensor(adapter: Any) -> torch.Tensor:
    """The adapter's special token ids (BOS/EOS/PAD...), sorted, as a LongTensor."""
    return torch.tensor(sorted(adapter.special_token_ids()), dtype=torch.long)


def kept_positions(ids_BS: torch.Tensor, special_ids: torch.Tensor, include_special: bool
                   ) -> torch.Tensor | None:
    """The flat indices of the positions a harvest keeps (those not holding a special token
    unless ``include_special``); None when it keeps them all."""
    if include_special or not len(special_ids):
        return None
    keep_T = ~torch.isin(ids_BS, special_ids).reshape(-1)
    return None if bool(keep_T.all()) else keep_T.nonzero().squeeze(1)


def captured_batches(capture: Capture, batches: Iterable[torch.Tensor], first_batch: int
                     ) -> Iterator[_Pending]:
    """Each forward-pass batch captured (numbered from ``first_batch``) and ready on the host:
    the device runs batch j + 1 while the caller files batch j."""
    pending: _Pending | None = None
    for batch_index, ids_BS in enumerate(batches, start=first_batch):
        launched = capture.launch(batch_index, ids_BS)
        if pending is not None:
            yield pending.ready()
        pending = launched
    if pending is not None:
        yield pending.ready()


class Capture:
    """Runs the forward pass and moves the kept activations to the host, once, in cache dtype.

    On a GPU the gathered [n_kept, sum(dims)] block is copied to pinned memory on a side stream
    and the copy is only waited for after the next batch has been launched, so the transfer
    overlaps the next forward pass.
    """

    def __init__(self, adapter: Any, names: list[str], dims: dict[str, int], dtype: torch.dtype,
                 include_special: bool) -> None:
        self.adapter = adapter
        self.names = names
        self.dims = dims
        self.dtype = dtype
        self.special_ids = special_id_tensor(adapter)
        self.include_special = include_special
        self.width = sum(dims.values())
        params = list(itertools.islice(adapter.model.parameters(), 1))
        self.device = params[0].device if params else torch.device("cpu")
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def launch(self, batch_index: int, ids_BS: torch.Tensor) -> _Pending:
        B, S = ids_BS.shape
        # Kept positions are known on the host (they depend only on the token ids): no sync.
        idx_T = kept_positions(ids_BS, self.special_ids, self.include_special)
        n_kept = B * S if idx_T is None else len(idx_T)
        ids_T = ids_BS.reshape(-1).to("cpu", torch.int64)
        ids_T = ids_T if idx_T is None else ids_T[idx_T]
        # Host ids: the adapter validates them on the host and moves them itself.
        acts = self.adapter.capture(ids_BS, self.names)
        out_TF = torch.empty(n_kept, self.width, dtype=self.dtype, device=self.device)
        if idx_T is not None and self.copy_stream is not None:
            # From pinned memory the upload is asynchronous; from pageable memory it would wait
            # for the forward pass just queued.
            idx_T = idx_T.pin_memory().to(self.device, non_blocking=True)
        elif idx_T is not None:
            idx_T = idx_T.to(self.device)
        col = 0
        for name in self.names:
            acts_BSD = acts[name]
            dim = self.dims[name]
            if tuple(acts_BSD.shape) != (B, S, dim):
                raise RuntimeError(
                    f"capture returned shape {tuple(acts_BSD.shape)} for {name}, "
                    f"expected {(B, S, dim)}"
                )
            acts_TD = acts_BSD.reshape(B * S, dim)
            if idx_T is not None:
                acts_TD = acts_TD.index_select(0, idx_T)
            out_TF[:, col : col + dim].copy_(acts_TD)  # the cast to cache dtype happens here
            col += dim
        del acts
        colsum_F = out_TF.sum(0, dtype=torch.float32)
        if self.copy_stream is None:  # CPU (no copy) or another accelerator (plain copy)
            return _Pending(batch_index, out_TF.cpu(), colsum_F.cpu(), ids_T)
        host_TF = torch.empty(out_TF.shape, dtype=self.dtype, pin_memory=True)
        host_F = torch.empty(colsum_F.shape, dtype=torch.float32, pin_memory=True)
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            host_TF.copy_(out_TF, non_blocking=True)
            host_F.copy_(colsum_F, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        # Keep the device blocks alive for the copy stream before the allocator reuses them.
        out_TF.record_stream(self.copy_stream)
        colsum_F.record_stream(self.copy_stream)
        return _Pending(batch_index, host_TF, host_F, ids_T, event)


class _ShardWriter:
    """Files kept-token rows into token-shuffled shards and keeps the manifest up to date."""

    def __init__(self, out: Path, manifest: dict, on_shard: Callable[[int, dict], None] | None):
        self.out = out
        self.manifest = manifest
        self.on_shard = on_shard
        self.names: list[str] = manifest["hookpoints"]
        self.dims: dict[str, int] = manifest["dims"]
        self.dtype = DTYPES[manifest["dtype"]]
        self.target: int = manifest["n_tokens_target"]
        self.written = sum(s["n_tokens"] for s in manifest["shards"])
        self.finished = self.written >= self.target
        self.buffers: dict[str, torch.Tensor] = {}
        self._new_shard()

    def _new_shard(self) -> None:
        index = len(self.manifest["shards"])
        self.size = min(self.manifest["shard_tokens"], self.target - self.written)
        # Row t of the kept-token stream lands at row dest[t] of the shard: filling through a
        # permutation shuffles the shard without a second copy.
        self.dest_T = permutation(self.size, self.manifest["seed"], RNG_SHARD, index)
        self.fill = 0
        self.ids_T = torch.empty(self.size, dtype=torch.int64)
        # Reuse the previous shard's buffers (already written out): no fresh page faults.
        if not self.buffers or next(iter(self.buffers.values())).shape[0] != self.size:
            self.buffers = {n: torch.empty(self.size, self.dims[n], dtype=self.dtype)
                            for n in self.names}

    def add(self, pending: _Pending, first_batch: int, first_skip: int) -> int:
        """File one captured batch; returns how many of its tokens went into shards."""
        self._check_finite(pending)
        rows_TF = pending.rows_TF
        n_rows = rows_TF.shape[0]
        offset = first_skip if pending.batch_index == first_batch else 0
        added = 0
        while offset < n_rows and not self.finished:
            take = min(n_rows - offset, self.size - self.fill)
            dest = self.dest_T[self.fill : self.fill + take]
            col = 0
            for name in self.names:
                dim = self.dims[name]
                self.buffers[name].index_copy_(0, dest, rows_TF[offset : offset + take,
                                                                col : col + dim])
                col += dim
            self.ids_T.index_copy_(0, dest, pending.ids_T[offset : offset + take])
            self.fill += take
            offset += take
            added += take
            if self.fill == self.size:
                # Where the next shard starts: the rest of this batch, or the next batch.
                if offset < n_rows:
                    cursor = (pending.batch_index, offset)
                else:
                    cursor = (pending.batch_index + 1, 0)
                self._write(dict(self.buffers), self.ids_T, cursor, exhausted=False)
                if not self.finished:
                    self._new_shard()
        return added

    def finish_exhausted(self) -> None:
        """The corpus ran out: the partial shard becomes the last one."""
        if self.fill == 0 and not self.manifest["shards"]:
            raise CrossintError(
                f"corpus {self.manifest['corpus']} yielded no usable tokens (all were special "
                f"tokens); use a corpus with text or include special tokens"
            )
        # The filled rows, read in shard-row order, are a uniformly shuffled order of the tokens.
        rows = torch.sort(self.dest_T[: self.fill]).values
        tensors = {n: b.index_select(0, rows) for n, b in self.buffers.items()}
        if self.fill:
            self._write(tensors, self.ids_T.index_select(0, rows), None, exhausted=True)
        else:
            self.manifest["complete"] = True
            self.manifest["corpus_exhausted"] = True
            atomic_write_json(self.out / MANIFEST_NAME, self.manifest)
        warnings.warn(
            f"corpus {self.manifest['corpus']} ran out after {self.written} tokens "
            f"({self.target} requested); the cache holds {self.written} tokens",
            RuntimeWarning,
            stacklevel=3,
        )

    def _check_finite(self, pending: _Pending) -> None:
        if bool(torch.isfinite(pending.colsum_F).all()):
            return
        # Rare path: count exactly on the host (a huge but finite column sum is not an error).
        col = 0
        for name in self.names:
            dim = self.dims[name]
            count = int((~torch.isfinite(pending.rows_TF[:, col : col + dim])).sum())
            if count:
                hint = (" (float16 overflows beyond ±65504: try dtype bfloat16 or float32)"
                        if self.dtype == torch.float16 else "")
                raise CrossintError(
                    f"{count} non-finite values (NaN/Inf) in the activations at hookpoint "
                    f"{name} (batch {pending.batch_index}){hint}; nothing of this shard was "
                    f"written and the {len(self.manifest['shards'])} shards already written "
                    f"are kept"
                )
            col += dim

    def _write(self, tensors: dict[str, torch.Tensor], ids_T: torch.Tensor,
               cursor: tuple[int, int] | None, exhausted: bool) -> None:
        from safetensors.torch import save_file

        index = len(self.manifest["shards"])
        n = next(iter(tensors.values())).shape[0]
        path = self.out / shard_file_name(index)
        # One metadata key only: safetensors writes metadata from a hash map, so several keys
        # could come out in any order and break byte-identical resumes.
        metadata = {"format": FORMAT}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        entry = {
            "file": path.name,
            "n_tokens": int(n),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            # Which tokens, in row order: two caches of the same text pair up row by row
            # exactly when these agree (model diffing).
            "tokens_sha256": tokens_fingerprint(ids_T),
            "next_batch": None if cursor is None else int(cursor[0]),
            "next_skip": None if cursor is None else int(cursor[1]),
        }
        self.written += n
        self.manifest["shards"].append(entry)
        self.manifest["n_tokens"] = self.written
        self.finished = exhausted or self.written >= self.target
        self.manifest["complete"] = self.finished
        self.manifest["corpus_exhausted"] = exhausted
        atomic_write_json(self.out / MANIFEST_NAME, self.manifest)
        if self.on_shard is not None:
            self.on_shard(index, entry)


def _open_for_harvest(out: Path, settings: dict) -> dict:
    """The manifest to continue: a fresh one, or an existing one whose settings match."""
    from crossint import __version__

    if out.exists() and not out.is_dir():
        raise CrossintError(f"output path {out} exists and is not a directory")
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = read_json(manifest_path, "activation cache manifest")
        validate_manifest(manifest, manifest_path, require_settings=True)
        _check_same_settings(out, manifest, settings)
        _truncate_at_first_bad_shard(out, manifest)
        _remove_stale_temporaries(out)
        return manifest
    if out.is_dir() and any(not _is_temporary(p) for p in out.iterdir()):
        raise CrossintError(
            f"output directory {out} is not empty and holds no activation cache "
            f"({MANIFEST_NAME} missing); choose a new or empty directory"
        )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "crossint_version": __version__,
        **settings,
        "n_tokens": 0,
        "complete": False,
        "corpus_exhausted": False,
        "shards": [],
    }
    atomic_write_json(manifest_path, manifest)
    return manifest


def _check_same_settings(out: Path, manifest: dict, settings: dict) -> None:
    diffs = [
        f"{key}: {manifest.get(key)!r} there, {settings.get(key)!r} now"
        for key in (*SETTING_KEYS, SPLIT_KEY)
        if _jsonable(manifest.get(key)) != _jsonable(settings.get(key))
    ]
    if not diffs:
        return
    if SPLIT_KEY not in manifest and SPLIT_KEY in settings:
        remedy = ("it was started by an older crossint that read the whole corpus, without "
                  "holding out any text; harvest into a new output directory")
    else:
        remedy = "repeat its settings to resume it, or choose another output directory"
    raise CrossintError(
        f"{out} already holds an activation cache harvested with other settings "
        f"({'; '.join(diffs)}); {remedy}"
    )


def _jsonable(value: Any) -> Any:
    # Compare settings as they round-trip through JSON (tuples become lists, etc.).
    import json

    return json.loads(json.dumps(value))


def _truncate_at_first_bad_shard(out: Path, manifest: dict) -> None:
    """Re-verify written shards; from the first damaged one on, they are harvested again.

    Shards are deterministic, so re-harvesting them rewrites the same bytes: nothing is lost.
    """
    for index, entry in enumerate(manifest["shards"]):
        path = out / entry["file"]
        ok = (path.is_file() and path.stat().st_size == entry["bytes"]
              and sha256_file(path) == entry["sha256"])
        if not ok:
            warnings.warn(
                f"shard {path} is missing, corrupt or truncated; harvesting it and the shards "
                f"after it again",
                RuntimeWarning,
                stacklevel=3,
            )
            kept = manifest["shards"][:index]
            manifest["shards"] = kept
            manifest["n_tokens"] = sum(s["n_tokens"] for s in kept)
            manifest["complete"] = False
            manifest["corpus_exhausted"] = False
            atomic_write_json(out / MANIFEST_NAME, manifest)
            return


def _is_temporary(path: Path) -> bool:
    # Names crossint.io.atomic_write gives its temporary files for our shards and manifest, and
    # the directory's lock (held while harvesting).
    name = path.name
    return name == LOCK or name.endswith(".tmp") and (
        name.startswith(".shard_") or name.startswith(f".{MANIFEST_NAME}.")
    )


def _remove_stale_temporaries(out: Path) -> None:
    # Left behind only by a killed process; they are never part of the cache.
    for path in out.iterdir():
        if _is_temporary(path) and path.name != LOCK:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


