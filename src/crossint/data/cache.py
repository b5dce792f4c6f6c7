"""The on-disk activation cache (written by ``crossint.data.harvest``) and in-memory sources.

A cache is a directory::

    manifest.json                 what was harvested, how, and a checksum per shard
    shard_00000.safetensors       one [n, dim] tensor per hookpoint, token-shuffled
    shard_00001.safetensors
    ...

Reading (``ActivationCache``): the manifest and shard files are validated (a checksum mismatch
names the file; a reader refuses the absent shard files it needs, ``check_present``);
``batches`` is an infinite, deterministic stream over epochs that permutes the shard order each
epoch and shuffles tokens across a window of several shards.
``TensorActivations`` offers the same reading interface for activations already in memory.
"""


import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossint.errors import CrossintError
from crossint.io import read_json

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
# How the corpus was split between harvests and analyses (``CorpusSplit.record()``): written
# for file and hf: corpora, absent for ``stories`` (split by seed) and in caches harvested before
# crossint split file corpora (those read the whole file). A resume must match it too.
SPLIT_KEY = "corpus_split"
# The absolute path of a local corpus file (``corpus`` is the path as given, often relative to
# where the harvest ran): analyses started elsewhere find the file by it. Not a setting.
CORPUS_FILE_KEY = "corpus_file"
DEFAULT_MEMORY_BUDGET = 4 * 2**30  # bytes of shard data a cache keeps in memory across epochs
DEFAULT_WINDOW_SHARDS = 4  # shards whose tokens are mixed together by ``batches``

# Distinct first words for every random stream, so no two streams share a seed sequence.
RNG_SHARD, RNG_EPOCH, RNG_WINDOW, RNG_SAMPLE, RNG_PARTS = 1, 2, 3, 4, 5


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


def permutation(n: int, *words: int) -> torch.Tensor:
    return torch.from_numpy(_rng(*words).permutation(n))


# --------------------------------------------------------------------------------------------
# Harvest
# --------------------------------------------------------------------------------------------


def validate_manifest(manifest: Any, path: Path, require_settings: bool = False) -> None:
    def bad(what: str) -> CrossintError:
        return CrossintError(f"activation cache manifest {path} is invalid: {what}; "
                             f"re-run the harvest into a new directory")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad(f"it is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise bad(f"format version {version!r} is not supported (this crossint reads up to "
                  f"{FORMAT_VERSION})")
    problem = _layout_problem(manifest) or _shards_problem(manifest) or _split_problem(manifest)
    if problem:
        raise bad(problem)
    if require_settings:
        missing = [k for k in (*SETTING_KEYS, "corpus_exhausted") if k not in manifest]
        if missing:
            raise bad(f"missing {', '.join(missing)}")


def _layout_problem(manifest: dict) -> str | None:
    hookpoints = manifest.get("hookpoints")
    if not (isinstance(hookpoints, list) and hookpoints
            and all(isinstance(h, str) for h in hookpoints)):
        return "'hookpoints' must be a non-empty list of names"
    dims = manifest.get("dims")
    if not (isinstance(dims, dict) and set(dims) == set(hookpoints)
            and all(isinstance(d, int) and d > 0 for d in dims.values())):
        return "'dims' must give a positive width for every hookpoint"
    if manifest.get("dtype") not in DTYPES:
        return f"'dtype' must be one of {', '.join(DTYPES)}"
    for key, kind in (("n_tokens", int), ("complete", bool), ("shards", list),
                      ("model", str)):
        if not isinstance(manifest.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    return None


def _shards_problem(manifest: dict) -> str | None:
    for i, entry in enumerate(manifest["shards"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("n_tokens"), int) and entry["n_tokens"] > 0
                and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
            return f"shard entry {i} needs file, n_tokens, bytes and sha256"
        if Path(entry["file"]).name != entry["file"] or entry["file"].startswith("."):
            return f"shard entry {i} names {entry['file']!r}, not a file in the cache"
    if sum(e["n_tokens"] for e in manifest["shards"]) != manifest["n_tokens"]:
        return "'n_tokens' differs from the sum of the shard token counts"
    return None


def _split_problem(manifest: dict) -> str | None:
    if manifest.get(SPLIT_KEY) is None:
        return None
    from crossint.data.corpus import CorpusSplit

    try:
        CorpusSplit.from_record(manifest[SPLIT_KEY], f"'{SPLIT_KEY}'")
    except CrossintError as e:
        return str(e)
    return None


class _ShuffledStream:
    """The batch stream shared by both activation sources.

    The data is one infinite token stream, epoch after epoch; each epoch is a list of windows
    (groups of rows) and each window is read through its own random permutation. Batches are
    consecutive runs of ``batch_size`` tokens of that stream, so batch k starts at token
    ``k * batch_size`` and can be located without reading anything before it. ``words`` tell
    apart the random permutations of streams that share a seed (the parts of one cache).
    """

    def __init__(self, n_per_epoch: int, windows: Callable[[int], list[tuple[Any, int]]],
                 load: Callable[[Any], torch.Tensor], seed: int,
                 words: tuple[int, ...] = ()) -> None:
        self.n_per_epoch = n_per_epoch
        self.windows = windows
        self.load = load
        self.seed = seed
        self.words = words

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
            data_TXD = self.load(key)
            perm_T = permutation(size, self.seed, RNG_WINDOW, epoch, w, *self.words).to(
                data_TXD.device)
            while offset < size:
                take = min(need, size - offset)
                pieces.append(data_TXD[perm_T[offset : offset + take]])
                offset += take
                need -= take
                if need == 0:
                    batch = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                    if device is not None:
                        batch = batch.to(device, non_blocking=True)  # move in storage dtype
                    yield batch.float()
                    pieces, need = [], batch_size
            del data_TXD
            offset, w = 0, w + 1
            if w == len(windows):
                epoch, w = epoch + 1, 0
                windows = self.windows(epoch)


def _chosen_parts(parts: int, part: int | None) -> range | list[int]:
    """The parts a reader reads: all (``part`` None) or the one it names."""
    if part is None:
        return range(parts)
    if not isinstance(part, int) or not 0 <= part < parts:
        raise CrossintError(f"part must lie in [0, {parts}), got {part!r}")
    return [part]


def _part_words(parts: int, part: int) -> tuple[int, ...]:
    """The random words that set part ``part`` of ``parts`` apart. One part keeps the words of
    the whole cache's streams, so ``parts=1`` is the whole-cache stream."""
    return () if parts == 1 else (parts, part)


def check_stream_args(batch_size: int, seed: int, start_batch: int) -> None:
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
        validate_manifest(manifest, manifest_path)
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
        # A shard file may be absent (a node of a multi-node run can hold only its processes'
        # parts): readers check the shards they need before they start (check_present).
        self.missing: set[int] = set()
        for index, entry in enumerate(manifest["shards"]):
            shard_path = self.path / entry["file"]
            if not shard_path.is_file():
                self.missing.add(index)
            elif shard_path.stat().st_size != entry["bytes"]:
                raise self._checksum_error(shard_path)
        self._budget = memory_budget
        self._keep_in_memory = self._bytes(range(self.n_shards)) <= memory_budget
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._verified: set[int] = set()

    @property
    def n_shards(self) -> int:
        return len(self.shard_sizes)

    @property
    def fingerprint(self) -> str:
        """sha256 of the shards' checksums in order: caches holding the same bytes (a moved or
        copied cache) share it; a resumed training run must see the one it started on."""
        digest = hashlib.sha256()
        for entry in self.manifest["shards"]:
            digest.update(f"{entry['sha256']}\n".encode())
        return digest.hexdigest()

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
        out_TXD = torch.empty(n, len(self.hookpoints), D, dtype=DTYPES[self.dtype])
        row = 0
        for i in indices:
            raw = self._raw_shard(i)
            size = self.shard_sizes[i]
            for x, name in enumerate(self.hookpoints):
                out_TXD[row : row + size, x] = raw[name]
            row += size
        return out_TXD

    def shard_parts(self, parts: int, seed: int) -> list[list[int]]:
        """The shards dealt into ``parts`` fixed parts of nearly equal count (ascending shard
        indices in each part; dealt at random by ``seed`` so no part gets one stretch of the
        corpus). One part: every shard."""
        if not isinstance(parts, int) or parts < 1:
            raise CrossintError(f"parts must be a positive integer, got {parts!r}")
        if parts > self.n_shards:
            raise CrossintError(
                f"activation cache {self.path} has {self.n_shards} shard(s), fewer than the "
                f"{parts} parts asked for: harvest it with a smaller --shard-tokens (at least "
                f"{parts} shards), or let every process read the whole cache (--data-parts 1)"
            )
        if parts == 1:
            return [list(range(self.n_shards))]
        dealt = _rng(seed, RNG_PARTS).permutation(self.n_shards).tolist()
        return [sorted(dealt[r::parts]) for r in range(parts)]

    def batches(self, batch_size: int, seed: int, start_batch: int = 0, *,
                window_shards: int = DEFAULT_WINDOW_SHARDS,
                device: str | torch.device | None = None, parts: int = 1,
                part: int | None = None) -> Iterator[torch.Tensor]:
        """Infinite, deterministic float32 [B, X, D] batches.

        Each epoch visits the shards in a fresh random order, in windows of ``window_shards``
        shards whose tokens are shuffled together. ``start_batch=k`` yields exactly what a fresh
        iterator yields after k batches, reading only the window where batch k starts.

        ``parts=P`` deals the shards into P fixed parts (:meth:`shard_parts`); each part is such
        a stream over its own shards alone and gives B/P rows of every batch. ``part=None``
        yields the parts' rows concatenated in part order; ``part=r`` yields only part r's B/P
        rows and reads only its shards (what rank r of P data-parallel processes reads).
        """
        check_stream_args(batch_size, seed, start_batch)
        self._common_dim("batches")
        if window_shards < 1:
            raise CrossintError(f"window_shards must be at least 1, got {window_shards}")
        shard_parts = self._parts_for(batch_size, parts, part, seed)
        read = [i for shards in shard_parts.values() for i in shards]
        self._keep_in_memory = self._bytes(read) <= self._budget
        streams = [self._part_stream(shards, seed, window_shards, parts, r).batches(
                       batch_size // parts, start_batch, device)
                   for r, shards in shard_parts.items()]
        if len(streams) == 1:
            return streams[0]
        return (torch.cat(rows) for rows in zip(*streams, strict=False))  # all infinite

    def _parts_for(self, batch_size: int, parts: int, part: int | None,
                   seed: int) -> dict[int, list[int]]:
        """{part: its shards} for the parts a reader asked for (all of them when ``part`` is
        None)."""
        self.check_parts(batch_size, parts, seed, part)
        dealt = self.shard_parts(parts, seed)
        return {r: dealt[r] for r in _chosen_parts(parts, part)}

    def part_tokens(self, parts: int, seed: int) -> list[int]:
        """The tokens in each of the ``parts`` parts (:meth:`shard_parts`)."""
        return [sum(self.shard_sizes[i] for i in shards)
                for shards in self.shard_parts(parts, seed)]

    def check_present(self, shards: Iterable[int]) -> None:
        """Refuse to read when a shard file among ``shards`` is absent."""
        absent = sorted(set(shards) & self.missing)
        if absent:
            names = [self.manifest["shards"][i]["file"] for i in absent]
            raise CrossintError(
                f"activation cache {self.path} lacks {len(names)} shard file(s) listed in its "
                f"manifest and needed here: {', '.join(names[:4])}"
                f"{' ...' if len(names) > 4 else ''}; re-run the harvest, or copy them here (a "
                f"data-parallel process needs only its own part's shards)"
            )

    def check_parts(self, batch_size: int, parts: int, seed: int,
                    part: int | None = None) -> None:
        """Refuse a batch that does not split evenly among ``parts`` parts or outgrows the
        smallest, and a part to be read (``part``; all when None) whose shards are absent."""
        self.check_present(i for r in _chosen_parts(parts, part)
                           for i in self.shard_parts(parts, seed)[r])
        tokens = self.part_tokens(parts, seed)
        if batch_size % parts:
            raise CrossintError(f"batch size {batch_size} does not split into {parts} equal "
                                f"parts: use a multiple of {parts}")
        if batch_size // parts > min(tokens):
            raise CrossintError(
                f"each of the {parts} parts of activation cache {self.path} gives "
                f"{batch_size // parts} tokens to a batch of {batch_size}, but the smallest part "
                f"holds {min(tokens)}: use a smaller batch, fewer parts or more tokens"
            )

    def _part_stream(self, shards: list[int], seed: int, window_shards: int, parts: int,
                     part: int) -> _ShuffledStream:
        words = _part_words(parts, part)

        def windows(epoch: int) -> list[tuple[Any, int]]:
            order = [shards[i] for i in
                     _rng(seed, RNG_EPOCH, epoch, *words).permutation(len(shards)).tolist()]
            groups = [tuple(order[i : i + window_shards])
                      for i in range(0, len(order), window_shards)]
            return [(g, sum(self.shard_sizes[i] for i in g)) for g in groups]

        return _ShuffledStream(sum(self.shard_sizes[i] for i in shards), windows, self._stacked,
                               seed, words)

    def _bytes(self, shards: Sequence[int]) -> int:
        item_bytes = DTYPES[self.dtype].itemsize
        return sum(self.shard_sizes[i] for i in shards) * sum(self.dims.values()) * item_bytes

    def sample(self, n_tokens: int, seed: int, *, parts: int = 1,
               part: int | None = None) -> torch.Tensor:
        """``n_tokens`` random tokens as float32 [n, X, D] (all tokens if the cache holds fewer).

        Reads whole shards in a random order until enough tokens are in hand (shards are already
        token-shuffled), then draws the tokens from those shards without replacement.
        ``parts=P`` draws ceil(n/P) tokens (at most the smallest part's) from each part's shards
        alone, concatenated in part order; ``part=r`` returns only part r's draw.
        """
        check_stream_args(1, seed, 0)
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise CrossintError(f"n_tokens must be a positive integer, got {n_tokens!r}")
        dealt = self.shard_parts(parts, seed)
        n = min(-(-n_tokens // parts), *self.part_tokens(parts, seed))
        return torch.cat([self._sample_part(dealt[r], n, seed, _part_words(parts, r))
                          for r in _chosen_parts(parts, part)])

    def _sample_part(self, shards: list[int], n: int, seed: int,
                     words: tuple[int, ...]) -> torch.Tensor:
        order = [shards[i] for i in
                 _rng(seed, RNG_SAMPLE, 0, *words).permutation(len(shards)).tolist()]
        chosen, have = [], 0
        for i in order:
            chosen.append(i)
            have += self.shard_sizes[i]
            if have >= n:
                break
        data_TXD = self._stacked(chosen)
        rows = torch.from_numpy(_rng(seed, RNG_SAMPLE, 1, *words).choice(have, size=n,
                                                                         replace=False))
        return data_TXD[rows].float()


class TensorActivations:
    """Activations already in memory, with the reading interface of ``ActivationCache``.

    ``acts_TXD``: [T tokens, X hookpoints, D]; any float dtype, any device (batches come out on
    the same device unless ``device`` is given).
    """

    def __init__(self, acts_TXD: torch.Tensor, hookpoints: Sequence[str]) -> None:
        if not isinstance(acts_TXD, torch.Tensor) or acts_TXD.dim() != 3:
            shape = tuple(acts_TXD.shape) if isinstance(acts_TXD, torch.Tensor) else type(acts_TXD)
            raise CrossintError(f"activations must be a 3-d tensor [T, X, D], got {shape}")
        if not acts_TXD.is_floating_point():
            raise CrossintError(f"activations must be floating point, got {acts_TXD.dtype}")
        names = list(hookpoints)
        if len(names) != acts_TXD.shape[1] or len(set(names)) != len(names):
            raise CrossintError(
                f"need {acts_TXD.shape[1]} distinct hookpoint names for activations of shape "
                f"{tuple(acts_TXD.shape)}, got {names}"
            )
        if acts_TXD.shape[0] < 1:
            raise CrossintError("activations hold no tokens")
        _check_finite(acts_TXD, names)
        self.acts_TXD = acts_TXD
        self.hookpoints: list[str] = names
        self.dims: dict[str, int] = {h: int(acts_TXD.shape[2]) for h in names}
        self.n_tokens: int = int(acts_TXD.shape[0])
        self.dtype: str = str(acts_TXD.dtype).removeprefix("torch.")
        self.model: str | None = None

    def __repr__(self) -> str:
        return f"TensorActivations(shape={tuple(self.acts_TXD.shape)}, dtype={self.dtype})"

    def batches(self, batch_size: int, seed: int, start_batch: int = 0, *,
                device: str | torch.device | None = None) -> Iterator[torch.Tensor]:
        """Infinite, deterministic float32 [B, X, D] batches; a fresh permutation every epoch."""
        check_stream_args(batch_size, seed, start_batch)
        stream = _ShuffledStream(self.n_tokens, lambda epoch: [(None, self.n_tokens)],
                                 lambda key: self.acts_TXD, seed)
        return stream.batches(batch_size, start_batch, device)

    def sample(self, n_tokens: int, seed: int) -> torch.Tensor:
        """``n_tokens`` random tokens as float32 [n, X, D] (all tokens if there are fewer)."""
        check_stream_args(1, seed, 0)
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise CrossintError(f"n_tokens must be a positive integer, got {n_tokens!r}")
        n = min(n_tokens, self.n_tokens)
        rows = _rng(seed, RNG_SAMPLE, 1).choice(self.n_tokens, size=n, replace=False)
        return self.acts_TXD[torch.from_numpy(rows).to(self.acts_TXD.device)].float()


def _check_finite(acts_TXD: torch.Tensor, hookpoints: list[str], chunk: int = 65536) -> None:
    """CrossintError naming the first token and hookpoint holding NaN/Inf (in chunks of tokens,
    so the check needs no copy of the whole tensor)."""
    for start in range(0, acts_TXD.shape[0], chunk):
        bad_TX = ~torch.isfinite(acts_TXD[start : start + chunk]).all(dim=-1)
        if bool(bad_TX.any()):
            token, x = (int(i) for i in bad_TX.nonzero()[0])
            count = int((~torch.isfinite(acts_TXD)).sum())
            raise CrossintError(
                f"the activations hold {count} non-finite values (NaN/Inf), the first at token "
                f"{start + token}, hookpoint {hookpoints[x]}; a crosscoder needs finite inputs: "
                f"clean or drop those tokens first"
            )


def cache_size_bytes(path: str | Path) -> int:
    """Bytes on disk of a cache directory's manifest and shards."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


__all__ = [
    "ActivationCache",
    "TensorActivations",
    "canonical_dtype",
    "shard_file_name",
    "cache_size_bytes",
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
]
