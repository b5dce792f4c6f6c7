"""Held-out text for analysing a trained crosscoder: which run, which model, which tokens.

Every analysis (`eval`, `interactions`, `fidelity`, `cluster`, the feature profiles and the
sweep's measurements) runs the subject model on text the crosscoder never trained on, described
by one ``HeldoutRequest``. By default that is the training cache's corpus and context length:
for the built-in stories with a story seed that harvests do not use (12345); for a file or hf:
corpus the documents that the corpus split holds out from harvests
(``crossint.data.corpus.split_corpus``, recorded in the cache manifest as ``corpus_split``).
Special tokens (BOS/EOS/PAD) are left out, as in the harvest.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from crossint.data.cache import CORPUS_FILE_KEY, SPLIT_KEY
from crossint.data.corpus import CorpusSplit, split_corpus
from crossint.errors import CrossintError
from crossint.io import read_json, sha256_file
from crossint.rundir import RunDir

HELDOUT_SEED = 12345  # default text seed for analyses; harvests default to seed 0
DEFAULT_CORPUS = "stories"  # when the run's training cache is unknown
DEFAULT_CONTEXT_LENGTH = 128
# The command-line flag behind each field, for error messages (`crossint sweep` spells the seed
# and batch-size flags --text-seed and --text-batch-size).
FLAGS = {
    "n_tokens": "--tokens", "n_texts": "--texts", "corpus": "--corpus",
    "seed": "--seed/--text-seed", "context_length": "--context-length",
    "batch_size": "--batch-size/--text-batch-size", "model": "--model", "device": "--device",
    "text_field": "text_field",
}


@dataclass(frozen=True)
class HeldoutRequest:
    """Which held-out text an analysis runs the subject model on (validated on construction).

    Exactly one of ``n_tokens`` (contexts until at least this many non-special tokens) and
    ``n_texts`` (exactly this many contexts, fewer if the corpus runs out), in batches of
    ``batch_size`` contexts. ``corpus``, ``context_length`` and ``text_field`` None: the training
    cache's (``resolve``), else stories, 128 and "text". ``seed`` picks the stories; file and
    hf: corpora ignore it (their held-out documents are fixed by the split). ``model`` None: the
    run's subject model. ``split`` None: the corpus split the training cache recorded, else the
    one computed from the corpus (``resolve`` fills it; it stays None for stories).
    """

    n_tokens: int | None = None
    n_texts: int | None = None
    corpus: str | None = None
    seed: int = HELDOUT_SEED
    context_length: int | None = None
    batch_size: int = 16
    model: str | None = None
    device: str = "cpu"
    text_field: str | None = None
    split: CorpusSplit | None = None

    def __post_init__(self) -> None:
        if isinstance(self.corpus, Path):
            object.__setattr__(self, "corpus", str(self.corpus))
        if (self.n_tokens is None) == (self.n_texts is None):
            raise CrossintError(
                f"held-out text needs exactly one of n_tokens (--tokens) and n_texts (--texts), "
                f"got n_tokens={self.n_tokens!r} and n_texts={self.n_texts!r}"
            )
        for name, least in (("n_tokens", 1), ("n_texts", 1), ("batch_size", 1), ("seed", 0),
                            ("context_length", 2)):
            value = getattr(self, name)
            if value is None and name in ("n_tokens", "n_texts", "context_length"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "a positive integer" if least == 1 else f"an integer >= {least}"
                raise CrossintError(f"{FLAGS[name]} ({name}) must be {kind}, got {value!r}")
        for name in ("corpus", "model", "device", "text_field"):
            value = getattr(self, name)
            if (value is not None or name == "device") and not (isinstance(value, str) and value):
                raise CrossintError(f"{FLAGS[name]} ({name}) must be a non-empty string, "
                                    f"got {value!r}")
        if self.split is not None and not isinstance(self.split, CorpusSplit):
            raise CrossintError(f"split must be a CorpusSplit, got {type(self.split).__name__}")

    def resolve(self, run_dir: str | Path) -> HeldoutRequest:
        """This request with the defaults taken from the run's training cache: corpus, context
        length, text field and the corpus split (a run trained on a cache that records no split
        of its file corpus, harvested by an older crossint, gets a RuntimeWarning). The text
        settings come from the run's config.json (``source.text``), else from the cache's
        manifest; a run whose cache is gone and whose config records no text needs ``corpus``
        (CrossintError naming --corpus: never a silent switch to other text)."""
        manifest = training_text(run_dir, needs_corpus=self.corpus is None)
        corpus = self.corpus or recorded_corpus(run_dir, manifest)
        trained_on = manifest if corpus in (manifest.get("corpus"),
                                            manifest.get(CORPUS_FILE_KEY)) else {}
        text_field = self.text_field or trained_on.get("text_field") or "text"
        split = self.split
        if split is None and corpus != "stories":
            split = _training_split(run_dir, corpus, text_field, trained_on)
        return dataclasses.replace(
            self, corpus=corpus, text_field=text_field, split=split,
            context_length=self.context_length or manifest.get("context_length",
                                                               DEFAULT_CONTEXT_LENGTH),
        )

    def record(self) -> dict[str, Any]:
        """The request as the JSON outputs store it (their ``request``): every field but the
        device (it does not change the numbers), the split as ``CorpusSplit.record()``."""
        record = self.keywords()
        del record["device"]
        record["split"] = None if self.split is None else self.split.record()
        return record

    def keywords(self) -> dict[str, Any]:
        """The fields as JSON-safe keyword arguments (all but ``split``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "split"}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> HeldoutRequest:
        """The request a ``record()`` describes; a record written before requests recorded
        their split (or before n_texts, text_field) gives those fields their defaults."""
        given = {name: record[name] for name in FIELD_NAMES
                 if name in record and name not in ("device", "split")}
        if record.get("split") is not None:
            given["split"] = CorpusSplit.from_record(record["split"])
        return cls(**given)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(HeldoutRequest))


def request_from(request: HeldoutRequest | None, fields: dict[str, Any],
                 **defaults: Any) -> HeldoutRequest:
    """The request an analysis runs on: ``request`` as given, or one made from keyword
    ``fields`` (``HeldoutRequest`` field names) over the analysis's ``defaults``; so
    ``evaluate(run, n_tokens=10_000)`` is ``evaluate(run, HeldoutRequest(n_tokens=10_000))``."""
    if request is not None:
        if not isinstance(request, HeldoutRequest):
            raise CrossintError(f"expected a HeldoutRequest, got {type(request).__name__}")
        if fields:
            raise CrossintError("give either a HeldoutRequest or its fields as keywords, not "
                                f"both (got {', '.join(sorted(fields))})")
        return request
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; held-out text "
                        f"fields are {', '.join(FIELD_NAMES)}")
    if "n_tokens" in fields or "n_texts" in fields:
        defaults = {k: v for k, v in defaults.items() if k not in ("n_tokens", "n_texts")}
    return HeldoutRequest(**{**defaults, **fields})


def recorded_corpus(run_dir: str | Path, text: dict[str, Any]) -> str:
    """The corpus a run's cache was harvested from (``text``: ``training_text``), stories if
    unknown. A local file is looked for where the harvest recorded it (its absolute path, then
    the path as given) and must still hold the same text: a file that is gone or changed is a
    CrossintError naming --corpus, never a silent switch to other text."""
    corpus = text.get("corpus", DEFAULT_CORPUS)
    if corpus == "stories" or corpus.startswith("hf:"):
        return corpus
    places = [place for place in (text.get(CORPUS_FILE_KEY), corpus) if place]
    found = next((place for place in places if Path(place).is_file()), None)
    if found is None:
        raise CrossintError(
            f"the corpus {' or '.join(dict.fromkeys(places))} that the training cache of "
            f"{run_dir} was harvested from is not found (moved or deleted): pass --corpus with "
            f"its new place, or put it back"
        )
    expected = text.get("corpus_sha256")
    if expected and sha256_file(found) != expected:
        raise CrossintError(
            f"the corpus {found} has changed since the training cache of {run_dir} was "
            f"harvested from it (its sha256 differs), so its held-out documents are not the "
            f"recorded ones: put the original back, or pass --corpus {found} to analyse the "
            f"file as it is now"
        )
    return found


def _training_split(run_dir: str | Path, corpus: str, text_field: str,
                    trained_on: dict[str, Any]) -> CorpusSplit | None:
    """The split of a file or hf: corpus: the one the training cache recorded for it, else
    computed from the corpus."""
    recorded = trained_on.get(SPLIT_KEY)
    if recorded is not None and text_field == trained_on.get("text_field"):
        return CorpusSplit.from_record(recorded,
                                       f"the corpus split of the training cache of {run_dir}")
    if trained_on and recorded is None:
        warnings.warn(
            f"the training cache of {run_dir} records no split of {corpus}: an older crossint "
            f"harvested it from the whole corpus, so the held-out documents analysed now may "
            f"have been trained on; harvest and train again for held-out numbers",
            RuntimeWarning,
            stacklevel=4,
        )
    return split_corpus(corpus, text_field)


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


def load_subject(run_dir: str | Path, request: HeldoutRequest, command: str = "eval"
                 ) -> tuple[Any, Any, HeldoutRequest]:
    """A single-model run's crosscoder and subject model (the request's ``model`` if given) on
    the request's device, and the request resolved against the run."""
    from crossint.models.adapter import load_model

    crosscoder, model_name = load_run(run_dir, command=command)
    request = request.resolve(run_dir)
    adapter = load_model(request.model or model_name, device=request.device)  # checks the device
    crosscoder.to(request.device)
    return crosscoder, adapter, request


def training_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of the activation cache a run was trained on ({} if unknown or gone)."""
    from crossint.data.cache import MANIFEST_NAME

    source = RunDir(run_dir).read_config().get("source") or {}
    path = source.get("path")
    if not path or not (Path(path) / MANIFEST_NAME).is_file():
        return {}
    return read_json(Path(path) / MANIFEST_NAME, "activation cache manifest")


def training_text(run_dir: str | Path, needs_corpus: bool = True) -> dict[str, Any]:
    """The settings of the text a run's cache was harvested from (``corpus``,
    ``context_length``, ``text_field``, ``corpus_split``, ...): those config.json records
    (``source.text``), else the cache's manifest, else {} for a run trained without a cache.
    A run trained on a cache that is gone, with no record, raises a CrossintError naming
    --corpus when ``needs_corpus``."""
    run = RunDir(run_dir)
    source = run.read_config().get("source") or {}
    recorded = source.get("text") if isinstance(source, dict) else None
    if isinstance(recorded, dict) and isinstance(recorded.get("corpus"), str):
        return recorded
    manifest = training_manifest(run_dir)
    if manifest or not needs_corpus or not source.get("path"):
        return manifest
    raise CrossintError(
        f"the activation cache {source['path']} that {run_dir} was trained on is gone (moved "
        f"or deleted) and {run.config} does not record which text it was harvested from: pass "
        f"--corpus (stories, the .txt/.jsonl file or hf:NAME of the harvest) and "
        f"--context-length, or put the cache back"
    )


def training_text_settings(run_dir: str | Path) -> dict[str, Any]:
    """Corpus and context length of the cache a run was trained on (empty if unknown)."""
    manifest = training_manifest(run_dir)
    return {k: manifest[k] for k in ("corpus", "context_length") if k in manifest}


def heldout_batches(adapter: Any, request: HeldoutRequest) -> list[Tensor]:
    """The request's held-out contexts, at least ``n_tokens`` non-special tokens or exactly
    ``n_texts`` contexts (fewer if the corpus runs out), in batches of ``batch_size``.

    The request must name its corpus and context length (``request.resolve(run_dir)`` fills
    them); a file or hf: corpus without a ``split`` is split here."""
    from crossint.data.corpus import iter_contexts, iter_texts

    corpus, context_length = request.corpus, request.context_length
    if corpus is None or context_length is None:
        raise CrossintError("the held-out request names no corpus or context length: resolve "
                            "it against a run first (request.resolve(run_dir))")
    if adapter.tokenizer is None:
        raise CrossintError(f"model {adapter.name!r} has no tokenizer; cannot tokenize {corpus!r}")
    if context_length > adapter.max_context:
        raise CrossintError(
            f"context length {context_length} is longer than the model's maximum "
            f"{adapter.max_context}"
        )
    texts = iter_texts(corpus, seed=request.seed, text_field=request.text_field or "text",
                       part="heldout", split=request.split)
    special_ids = adapter.special_token_ids()
    contexts, n_usable = [], 0
    for ids_S in iter_contexts(texts, adapter.tokenizer, context_length, corpus_name=corpus):
        contexts.append(ids_S)
        n_usable += int(non_special_BS(ids_S, special_ids).sum())
        if len(contexts) == request.n_texts or (request.n_tokens is not None
                                                and n_usable >= request.n_tokens):
            break
    return list(torch.stack(contexts).split(request.batch_size))


def non_special_BS(ids_BS: Tensor, special_ids: set[int]) -> Tensor:
    """True at every token that is not a special token (BOS/EOS/PAD)."""
    if not special_ids:
        return torch.ones_like(ids_BS, dtype=torch.bool)
    return ~torch.isin(ids_BS, torch.tensor(sorted(special_ids), device=ids_BS.device))


class Captured(NamedTuple):
    """One forward pass of the subject model: the captured tensors (B, S, D) by hookpoint, the
    non-special mask (B, S), and the non-special tokens' activations as (T, X, D) float32."""

    acts: dict[str, Tensor]
    keep_BS: Tensor
    acts_TXD: Tensor


def capture_tokens(
    adapter: Any, ids_BS: Tensor, hookpoints: list[str], special_ids: set[int],
    also: Sequence[str] = (),
) -> Captured:
    """Run the model on ``ids_BS`` and keep ``hookpoints`` (NaN/Inf activations refused);
    ``also``: more hookpoints captured in the same pass, in ``acts`` only."""
    with torch.no_grad():
        acts = adapter.capture(ids_BS, list(dict.fromkeys([*hookpoints, *also])))
    keep_BS = non_special_BS(ids_BS, special_ids)
    acts_TXD = torch.stack([acts[h][keep_BS] for h in hookpoints], dim=1).float()
    n_bad = int((~torch.isfinite(acts_TXD)).sum())
    if n_bad:
        raise CrossintError(f"model {adapter.name!r} produced {n_bad} NaN/Inf activations")
    return Captured(acts, keep_BS, acts_TXD)
