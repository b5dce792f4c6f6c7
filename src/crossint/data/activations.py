"""The streaming activation harvest and the on-disk activation cache.

A cache is a directory::

    manifest.json                 what was harvested, how, and a checksum per shard
    shard_00000.safetensors       one [n, dim] tensor per hookpoint, token-shuffled
    shard_00001.safetensors
    ...

Harvest (``harvest``): contexts from ``crossint.data.corpus`` go through the model adapter in
batches; at every position whose token is not special (BOS/EOS/PAD, unless ``include_special``)
the activations of every requested hookpoint are kept. The kept-token stream is cut into shards
of ``shard_tokens`` tokens and each shard is shuffled at token level (a shard is the shuffle
buffer). Shard ``k`` is a deterministic function of the settings and ``(seed, k)``, and the
manifest, rewritten atomically after every shard, records where in the batch stream the next
shard starts, so an interrupted harvest resumes exactly where it stopped and produces the same
bytes as an uninterrupted one.

Reading (``ActivationCache``): the manifest and shard files are validated (a checksum mismatch
names the file); ``batches`` is an infinite, deterministic stream over epochs that permutes the
shard order each epoch and shuffles tokens across a window of several shards.
``TensorActivations`` offers the same reading interface for activations already in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossint.errors import CrossintError
from crossint.io import atomic_write, atomic_write_json, read_json, sha256_file

FORMAT = "crossint.activations"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                  "bf16": "bfloat16"}
# Settings that decide the bytes of every shard: a resumed harvest must match all of them.
SETTING_KEYS: tuple[str, ...] = (
    "model", "model_info", "hookpoints", "dims", "dtype", "context_length", "corpus",
    "corpus_sha256", "text_field", "seed", "include_special", "batch_size", "shard_tokens",
    "n_tokens_target",
)
DEFAULT_MEMORY_BUDGET = 4 * 2**30  # bytes of shard data a cache keeps in memory across epochs
DEFAULT_WINDOW_SHARDS = 4  # shards whose tokens are mixed together by ``batches``

# Distinct first words for every random stream, so no two streams share a seed sequence.
_RNG_SHARD, _RNG_EPOCH, _RNG_WINDOW, _RNG_SAMPLE = 1, 2, 3, 4


def shard_file_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def canonical_dtype(dtype: str | torch.dtype) -> str:
    """'float32' | 'float16' | 'bfloat16' from a name, an alias (fp16, bf16...) or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
        name = str(dtype)
    else:
        name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise CrossintError(
            f"unsupported activation dtype {dtype!r}: use one of {', '.join(DTYPES)}"
        )
    return name


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(list(words))


def _permutation(n: int, *words: int) -> torch.Tensor:
    return torch.from_numpy(_rng(*words).permutation(n))


# --------------------------------------------------------------------------------------------
# Harvest
# --------------------------------------------------------------------------------------------


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
    is a layout name (``paper``, ``resid``) or a list of hookpoint names. If ``out_dir`` already
    holds a cache with the same settings it is resumed (or returned as is when complete); any
    other non-empty directory is an error and nothing in it is touched. A finite corpus that
    runs out early ends the harvest with fewer tokens (the manifest says ``corpus_exhausted``).
    ``on_shard(index, entry)`` is called after each shard and its manifest entry are on disk.
    """
    if isinstance(adapter, (str, Path)):
        from crossint.models.adapter import load_model

        adapter = load_model(str(adapter))
    names = list(adapter.resolve_layout(hookpoints))
    dims = {name: int(adapter.hookpoint_dim(name)) for name in names}
    dtype_name = canonical_dtype(dtype)
    for field, value in (("n_tokens", n_tokens), ("batch_size", batch_size),
                         ("shard_tokens", shard_tokens)):
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

    from crossint.data.corpus import corpus_fingerprint, iter_contexts, iter_texts

    # Open the corpus and pack its first context before touching the output directory: a bad
    # or empty corpus writes nothing.
    contexts = iter_contexts(iter_texts(corpus, seed=seed, text_field=text_field),
                             adapter.tokenizer, context_length, corpus_name=str(corpus))
    contexts = itertools.chain([next(contexts)], contexts)
    config = getattr(adapter.model, "config", None)
    settings = {
        "model": str(adapter.name),
        "model_info": {
            "family": getattr(adapter, "family", None),
            "model_type": getattr(config, "model_type", None),
            "n_blocks": int(adapter.n_blocks),
            "d_model": int(adapter.d_model),
        },
        "hookpoints": names,
        "dims": dims,
        "dtype": dtype_name,
        "context_length": int(context_length),
        "corpus": str(corpus),
        "corpus_sha256": corpus_fingerprint(corpus),
        "text_field": text_field,
        "seed": int(seed),
        "include_special": bool(include_special),
        "batch_size": int(batch_size),
        "shard_tokens": int(shard_tokens),
        "n_tokens_target": int(n_tokens),
    }
    out = Path(out_dir)
    manifest = _open_for_harvest(out, settings)
    if manifest["complete"]:
        return ActivationCache(out)

    shards = manifest["shards"]
    first_batch, first_skip = (
        (shards[-1]["next_batch"], shards[-1]["next_skip"]) if shards else (0, 0)
    )
    contexts = itertools.islice(contexts, first_batch * batch_size, None)
    special_ids = torch.tensor(sorted(adapter.special_token_ids()), dtype=torch.long)
    writer = _ShardWriter(out, manifest, on_shard)
    capture = _Capture(adapter, names, dims, DTYPES[dtype_name], special_ids, include_special)

    from tqdm import tqdm

    with tqdm(total=n_tokens, initial=writer.written, unit="tok", unit_scale=True,
              desc="harvest", disable=not progress, dynamic_ncols=True) as bar:
        try:
            pending: _Pending | None = None
            batches = enumerate(_batches_of(contexts, batch_size), start=first_batch)
            for batch_index, ids_BS in batches:
                launched = capture.launch(batch_index, ids_BS)  # the device runs this batch...
                if pending is not None:  # ...while the host files the previous one
                    bar.update(writer.add(pending, first_batch, first_skip))
                pending = launched
                if writer.finished:
                    break
            if pending is not None and not writer.finished:
                bar.update(writer.add(pending, first_batch, first_skip))
        except BaseException:
            bar.leave = False  # an aborted bar is cleared, so the error is what remains
            raise
    if not writer.finished:
        writer.finish_exhausted()
    return ActivationCache(out)


def _batches_of(contexts: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
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
    rows_nF: torch.Tensor  # host tensor once ``event`` has completed
    colsum_F: torch.Tensor  # float32 column sums: non-finite when a column holds NaN/Inf
    event: Any = None  # torch.cuda.Event of the device-to-host copy, None on the CPU


class _Capture:
    """Runs the forward pass and moves the kept activations to the host, once, in cache dtype.

    On a GPU the gathered [n_kept, sum(dims)] block is copied to pinned memory on a side stream
    and the copy is only waited for after the next batch has been launched, so the transfer
    overlaps the next forward pass.
    """

    def __init__(self, adapter: Any, names: list[str], dims: dict[str, int], dtype: torch.dtype,
                 special_ids: torch.Tensor, include_special: bool) -> None:
        self.adapter = adapter
        self.names = names
        self.dims = dims
        self.dtype = dtype
        self.special_ids = special_ids
        self.include_special = include_special
        self.width = sum(dims.values())
        params = list(itertools.islice(adapter.model.parameters(), 1))
        self.device = params[0].device if params else torch.device("cpu")
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def launch(self, batch_index: int, ids_BS: torch.Tensor) -> _Pending:
        B, S = ids_BS.shape
        keep_T = None
        if not self.include_special and len(self.special_ids):
            keep_T = ~torch.isin(ids_BS, self.special_ids).reshape(-1)
            if bool(keep_T.all()):
                keep_T = None
        # Kept positions are known on the host (they depend only on the token ids): no sync.
        idx_T = None if keep_T is None else keep_T.nonzero().squeeze(1)
        n_kept = B * S if idx_T is None else len(idx_T)
        # Host ids: the adapter validates them on the host and moves them itself.
        acts = self.adapter.capture(ids_BS, self.names)
        out_nF = torch.empty(n_kept, self.width, dtype=self.dtype, device=self.device)
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
            out_nF[:, col : col + dim].copy_(acts_TD)  # the cast to cache dtype happens here
            col += dim
        del acts
        colsum_F = out_nF.sum(0, dtype=torch.float32)
        if self.copy_stream is None:  # CPU (no copy) or another accelerator (plain copy)
            return _Pending(batch_index, out_nF.cpu(), colsum_F.cpu())
        host_nF = torch.empty(out_nF.shape, dtype=self.dtype, pin_memory=True)
        host_F = torch.empty(colsum_F.shape, dtype=torch.float32, pin_memory=True)
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            host_nF.copy_(out_nF, non_blocking=True)
            host_F.copy_(colsum_F, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        # Keep the device blocks alive for the copy stream before the allocator reuses them.
        out_nF.record_stream(self.copy_stream)
        colsum_F.record_stream(self.copy_stream)
        return _Pending(batch_index, host_nF, host_F, event)


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
        self.dest_T = _permutation(self.size, self.manifest["seed"], _RNG_SHARD, index)
        self.fill = 0
        # Reuse the previous shard's buffers (already written out): no fresh page faults.
        if not self.buffers or next(iter(self.buffers.values())).shape[0] != self.size:
            self.buffers = {n: torch.empty(self.size, self.dims[n], dtype=self.dtype)
                            for n in self.names}

    def add(self, pending: _Pending, first_batch: int, first_skip: int) -> int:
        """File one captured batch; returns how many of its tokens went into shards."""
        if pending.event is not None:
            pending.event.synchronize()
        self._check_finite(pending)
        rows_nF = pending.rows_nF
        n_rows = rows_nF.shape[0]
        offset = first_skip if pending.batch_index == first_batch else 0
        added = 0
        while offset < n_rows and not self.finished:
            take = min(n_rows - offset, self.size - self.fill)
            dest = self.dest_T[self.fill : self.fill + take]
            col = 0
            for name in self.names:
                dim = self.dims[name]
                self.buffers[name].index_copy_(0, dest, rows_nF[offset : offset + take,
                                                                col : col + dim])
                col += dim
            self.fill += take
            offset += take
            added += take
            if self.fill == self.size:
                # Where the next shard starts: the rest of this batch, or the next batch.
                if offset < n_rows:
                    cursor = (pending.batch_index, offset)
                else:
                    cursor = (pending.batch_index + 1, 0)
                self._write(dict(self.buffers), cursor, exhausted=False)
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
            self._write(tensors, None, exhausted=True)
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
            count = int((~torch.isfinite(pending.rows_nF[:, col : col + dim])).sum())
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

    def _write(self, tensors: dict[str, torch.Tensor], cursor: tuple[int, int] | None,
               exhausted: bool) -> None:
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
        _validate_manifest(manifest, manifest_path, require_settings=True)
        diffs = [
            f"{key}: {manifest.get(key)!r} there, {settings[key]!r} now"
            for key in SETTING_KEYS
            if _jsonable(manifest.get(key)) != _jsonable(settings[key])
        ]
        if diffs:
            raise CrossintError(
                f"{out} already holds an activation cache harvested with other settings "
                f"({'; '.join(diffs)}); repeat its settings to resume it, or choose another "
                f"output directory"
            )
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
    # Names crossint.io.atomic_write gives its temporary files for our shards and manifest.
    name = path.name
    return name.endswith(".tmp") and (
        name.startswith(".shard_") or name.startswith(f".{MANIFEST_NAME}.")
    )


def _remove_stale_temporaries(out: Path) -> None:
    # Left behind only by a killed process; they are never part of the cache.
    for path in out.iterdir():
        if _is_temporary(path):
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _validate_manifest(manifest: Any, path: Path, require_settings: bool = False) -> None:
    def bad(what: str) -> CrossintError:
        return CrossintError(f"activation cache manifest {path} is invalid: {what}; "
                             f"re-run the harvest into a new directory")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad(f"it is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise bad(f"format version {version!r} is not supported (this crossint reads up to "
                  f"{FORMAT_VERSION})")
    hookpoints = manifest.get("hookpoints")
    if not (isinstance(hookpoints, list) and hookpoints
            and all(isinstance(h, str) for h in hookpoints)):
        raise bad("'hookpoints' must be a non-empty list of names")
    dims = manifest.get("dims")
    if not (isinstance(dims, dict) and set(dims) == set(hookpoints)
            and all(isinstance(d, int) and d > 0 for d in dims.values())):
        raise bad("'dims' must give a positive width for every hookpoint")
    if manifest.get("dtype") not in DTYPES:
        raise bad(f"'dtype' must be one of {', '.join(DTYPES)}")
    for key, kind in (("n_tokens", int), ("complete", bool), ("shards", list),
                      ("model", str)):
        if not isinstance(manifest.get(key), kind):
            raise bad(f"'{key}' is missing or not a {kind.__name__}")
    for i, entry in enumerate(manifest["shards"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("n_tokens"), int) and entry["n_tokens"] > 0
                and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
            raise bad(f"shard entry {i} needs file, n_tokens, bytes and sha256")
        if Path(entry["file"]).name != entry["file"] or entry["file"].startswith("."):
            raise bad(f"shard entry {i} names {entry['file']!r}, not a file in the cache")
    if sum(e["n_tokens"] for e in manifest["shards"]) != manifest["n_tokens"]:
        raise bad("'n_tokens' differs from the sum of the shard token counts")
    if require_settings:
        missing = [k for k in (*SETTING_KEYS, "corpus_exhausted") if k not in manifest]
        if missing:
            raise bad(f"missing {', '.join(missing)}")


class _ShuffledStream:
    """The batch stream shared by both activation sources.

    The data is one infinite token stream, epoch after epoch; each epoch is a list of windows
    (groups of rows) and each window is read through its own random permutation. Batches are
    consecutive runs of ``batch_size`` tokens of that stream, so batch k starts at token
    ``k * batch_size`` and can be located without reading anything before it.
    """

    def __init__(self, n_per_epoch: int, windows: Callable[[int], list[tuple[Any, int]]],
                 load: Callable[[Any], torch.Tensor], seed: int) -> None:
        self.n_per_epoch = n_per_epoch
        self.windows = windows
        self.load = load
        self.seed = seed

    def batches(self, batch_size: int, start_batch: int,
                device: str | torch.device | None) -> Iterator[torch.Tensor]:
        epoch, offset = divmod(start_batch * batch_size, self.n_per_epoch)
        windows = self.windows(epoch)
        w = 0
        while offset >= windows[w][1]:
            offset -= windows[w][1]
            w += 1
        pieces: list[torch.Tensor] = []
        need = batch_size
        while True:
            key, size = windows[w]
            data_NXD = self.load(key)
            perm_N = _permutation(size, self.seed, _RNG_WINDOW, epoch, w).to(data_NXD.device)
            while offset < size:
                take = min(need, size - offset)
                pieces.append(data_NXD[perm_N[offset : offset + take]])
                offset += take
                need -= take
                if need == 0:
                    batch = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                    if device is not None:
                        batch = batch.to(device, non_blocking=True)  # move in storage dtype
                    yield batch.float()
                    pieces, need = [], batch_size
            del data_NXD
            offset, w = 0, w + 1
            if w == len(windows):
                epoch, w = epoch + 1, 0
                windows = self.windows(epoch)


def _check_stream_args(batch_size: int, seed: int, start_batch: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CrossintError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise CrossintError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(start_batch, int) or start_batch < 0:
        raise CrossintError(f"start_batch must be a non-negative integer, got {start_batch!r}")


class ActivationCache:
    """A harvested activation cache on disk (see the module docstring).

    ``memory_budget`` (bytes): when all shards fit, each is kept in memory after its first read so
    later epochs do not touch the disk. Each shard's checksum is verified the first time this
    object reads it.
    """

    def __init__(self, path: str | Path, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CrossintError(
                f"activation cache not found: {self.path} (create it with crossint harvest "
                f"--out {self.path})"
            )
        manifest_path = self.path / MANIFEST_NAME
        manifest = read_json(manifest_path, "activation cache manifest")
        _validate_manifest(manifest, manifest_path)
        if not manifest["complete"]:
            target = manifest.get("n_tokens_target", "?")
            raise CrossintError(
                f"activation cache {self.path} is incomplete ({manifest['n_tokens']} of {target} "
                f"tokens, {len(manifest['shards'])} shards): resume it by running the same "
                f"harvest again (crossint harvest --model {manifest['model']} --tokens {target} "
                f"--out {self.path} with the settings in its {MANIFEST_NAME})"
            )
        self.manifest: dict = manifest
        self.hookpoints: list[str] = list(manifest["hookpoints"])
        self.dims: dict[str, int] = {h: int(manifest["dims"][h]) for h in self.hookpoints}
        self.n_tokens: int = int(manifest["n_tokens"])
        self.dtype: str = manifest["dtype"]
        self.model: str = manifest["model"]
        self.shard_sizes: list[int] = [int(s["n_tokens"]) for s in manifest["shards"]]
        if self.n_tokens < 1:
            raise CrossintError(f"activation cache {self.path} holds no tokens")
        for entry in manifest["shards"]:
            shard_path = self.path / entry["file"]
            if not shard_path.is_file():
                raise CrossintError(
                    f"shard {shard_path} listed in the manifest is missing; re-run the harvest"
                )
            if shard_path.stat().st_size != entry["bytes"]:
                raise self._checksum_error(shard_path)
        item_bytes = DTYPES[self.dtype].itemsize
        total_bytes = self.n_tokens * sum(self.dims.values()) * item_bytes
        self._keep_in_memory = total_bytes <= memory_budget
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._verified: set[int] = set()

    @property
    def n_shards(self) -> int:
        return len(self.shard_sizes)

    def __repr__(self) -> str:
        return (f"ActivationCache({str(self.path)!r}, model={self.model!r}, "
                f"hookpoints={len(self.hookpoints)}, n_tokens={self.n_tokens}, "
                f"dtype={self.dtype})")

    @staticmethod
    def _checksum_error(path: Path) -> CrossintError:
        return CrossintError(
            f"checksum mismatch in {path}: the file is corrupt or truncated; re-run the harvest"
        )

    def _raw_shard(self, index: int) -> dict[str, torch.Tensor]:
        """Shard tensors in storage dtype, verified on first read (checksum, shapes, finite)."""
        if not 0 <= index < self.n_shards:
            raise IndexError(f"shard index {index} out of range (cache has {self.n_shards})")
        if index in self._memory:
            return self._memory[index]
        from safetensors import SafetensorError
        from safetensors.torch import load as load_bytes

        entry = self.manifest["shards"][index]
        path = self.path / entry["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CrossintError(
                f"shard {path} listed in the manifest is missing; re-run the harvest"
            ) from None
        if index not in self._verified and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise self._checksum_error(path)
        try:
            tensors = load_bytes(data)
        except (SafetensorError, ValueError) as e:
            raise CrossintError(f"shard {path} cannot be read ({e}); re-run the harvest") from None
        if index not in self._verified:
            self._verify(path, tensors, entry["n_tokens"])
            self._verified.add(index)
        if self._keep_in_memory:
            self._memory[index] = tensors
        return tensors

    def _verify(self, path: Path, tensors: dict[str, torch.Tensor], n: int) -> None:
        if set(tensors) != set(self.hookpoints):
            raise CrossintError(
                f"shard {path} holds hookpoints {sorted(tensors)}, the manifest lists "
                f"{sorted(self.hookpoints)}; the cache is corrupt; re-run the harvest"
            )
        for name in self.hookpoints:
            t = tensors[name]
            expected = (n, self.dims[name])
            if tuple(t.shape) != expected or t.dtype != DTYPES[self.dtype]:
                raise CrossintError(
                    f"shard {path} holds {name} as {str(t.dtype).removeprefix('torch.')} "
                    f"{tuple(t.shape)}, the manifest says {self.dtype} {expected}; the cache is "
                    f"corrupt; re-run the harvest"
                )
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CrossintError(
                    f"shard {path} holds {bad} non-finite values at hookpoint {name}; "
                    f"re-run the harvest"
                )

    def _common_dim(self, what: str) -> int:
        widths = sorted(set(self.dims.values()))
        if len(widths) > 1:
            detail = ", ".join(f"{h}: {d}" for h, d in self.dims.items())
            raise CrossintError(
                f"{what} stacks hookpoints into [n, X, D] and needs one width, but the widths "
                f"differ ({detail}); use read_shard_dict for per-hookpoint access"
            )
        return widths[0]

    def read_shard_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Shard ``index`` as {hookpoint: float32 [n, dim]}."""
        return {h: t.float() for h, t in self._raw_shard(index).items()}

    def read_shard(self, index: int) -> torch.Tensor:
        """Shard ``index`` as float32 [n, X, D] (X in manifest hookpoint order)."""
        return self._stacked([index]).float()

    def _stacked(self, indices: Sequence[int]) -> torch.Tensor:
        """Shards concatenated as [n, X, D] in storage dtype."""
        D = self._common_dim("reading")
        n = sum(self.shard_sizes[i] for i in indices)
        out_NXD = torch.empty(n, len(self.hookpoints), D, dtype=DTYPES[self.dtype])
        row = 0
        for i in indices:
            raw = self._raw_shard(i)
            size = self.shard_sizes[i]
            for x, name in enumerate(self.hookpoints):
                out_NXD[row : row + size, x] = raw[name]
            row += size
        return out_NXD

    def batches(self, batch_size: int, seed: int, start_batch: int = 0, *,
                window_shards: int = DEFAULT_WINDOW_SHARDS,
                device: str | torch.device | None = None) -> Iterator[torch.Tensor]:
        """Infinite, deterministic float32 [B, X, D] batches.

        Each epoch visits the shards in a fresh random order, in windows of ``window_shards``
        shards whose tokens are shuffled together. ``start_batch=k`` yields exactly what a fresh
        iterator yields after k batches, reading only the window where batch k starts.
        """
        _check_stream_args(batch_size, seed, start_batch)
        self._common_dim("batches")
        if window_shards < 1:
            raise CrossintError(f"window_shards must be at least 1, got {window_shards}")

        def windows(epoch: int) -> list[tuple[Any, int]]:
            order = _rng(seed, _RNG_EPOCH, epoch).permutation(self.n_shards).tolist()
            groups = [tuple(order[i : i + window_shards])
                      for i in range(0, len(order), window_shards)]
            return [(g, sum(self.shard_sizes[i] for i in g)) for g in groups]

        stream = _ShuffledStream(self.n_tokens, windows, self._stacked, seed)
        return stream.batches(batch_size, start_batch, device)

    def sample(self, n_tokens: int, seed: int) -> torch.Tensor:
        """``n_tokens`` random tokens as float32 [n, X, D] (all tokens if the cache holds fewer).

        Reads whole shards in a random order until enough tokens are in hand (shards are already
        token-shuffled), then draws the tokens from those shards without replacement.
        """
        _check_stream_args(1, seed, 0)
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise CrossintError(f"n_tokens must be a positive integer, got {n_tokens!r}")
        n = min(n_tokens, self.n_tokens)
        order = _rng(seed, _RNG_SAMPLE, 0).permutation(self.n_shards).tolist()
        chosen, have = [], 0
        for i in order:
            chosen.append(i)
            have += self.shard_sizes[i]
            if have >= n:
                break
        data_NXD = self._stacked(chosen)
        rows = torch.from_numpy(_rng(seed, _RNG_SAMPLE, 1).choice(have, size=n, replace=False))
        return data_NXD[rows].float()


class TensorActivations:
    """Activations already in memory, with the reading interface of ``ActivationCache``.

    ``acts_NXD``: [N tokens, X hookpoints, D]; any float dtype, any device (batches come out on
    the same device unless ``device`` is given).
    """

    def __init__(self, acts_NXD: torch.Tensor, hookpoints: Sequence[str]) -> None:
        if not isinstance(acts_NXD, torch.Tensor) or acts_NXD.dim() != 3:
            shape = tuple(acts_NXD.shape) if isinstance(acts_NXD, torch.Tensor) else type(acts_NXD)
            raise CrossintError(f"activations must be a 3-d tensor [N, X, D], got {shape}")
        if not acts_NXD.is_floating_point():
            raise CrossintError(f"activations must be floating point, got {acts_NXD.dtype}")
        names = list(hookpoints)
        if len(names) != acts_NXD.shape[1] or len(set(names)) != len(names):
            raise CrossintError(
                f"need {acts_NXD.shape[1]} distinct hookpoint names for activations of shape "
                f"{tuple(acts_NXD.shape)}, got {names}"
            )
        if acts_NXD.shape[0] < 1:
            raise CrossintError("activations hold no tokens")
        self.acts_NXD = acts_NXD
        self.hookpoints: list[str] = names
        self.dims: dict[str, int] = {h: int(acts_NXD.shape[2]) for h in names}
        self.n_tokens: int = int(acts_NXD.shape[0])
        self.dtype: str = str(acts_NXD.dtype).removeprefix("torch.")
        self.model: str | None = None

    def __repr__(self) -> str:
        return f"TensorActivations(shape={tuple(self.acts_NXD.shape)}, dtype={self.dtype})"

    def batches(self, batch_size: int, seed: int, start_batch: int = 0, *,
                device: str | torch.device | None = None) -> Iterator[torch.Tensor]:
        """Infinite, deterministic float32 [B, X, D] batches; a fresh permutation every epoch."""
        _check_stream_args(batch_size, seed, start_batch)
        stream = _ShuffledStream(self.n_tokens, lambda epoch: [(None, self.n_tokens)],
                                 lambda key: self.acts_NXD, seed)
        return stream.batches(batch_size, start_batch, device)

    def sample(self, n_tokens: int, seed: int) -> torch.Tensor:
        """``n_tokens`` random tokens as float32 [n, X, D] (all tokens if there are fewer)."""
        _check_stream_args(1, seed, 0)
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise CrossintError(f"n_tokens must be a positive integer, got {n_tokens!r}")
        n = min(n_tokens, self.n_tokens)
        rows = _rng(seed, _RNG_SAMPLE, 1).choice(self.n_tokens, size=n, replace=False)
        return self.acts_NXD[torch.from_numpy(rows).to(self.acts_NXD.device)].float()


def cache_size_bytes(path: str | Path) -> int:
    """Bytes on disk of a cache directory's manifest and shards."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


__all__ = [
    "ActivationCache",
    "TensorActivations",
    "harvest",
    "canonical_dtype",
    "shard_file_name",
    "cache_size_bytes",
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
]
