"""Text corpora and context packing: the first step of the data path.

``iter_texts(spec)`` streams documents from one of four sources:

- ``stories``: the built-in procedural story corpus (infinite, deterministic for a seed);
- a ``.txt`` file: one document per non-empty line (blank lines are skipped, so a file of
  blank-line-separated paragraphs is read as one document per line of each paragraph);
- a ``.jsonl`` file: one JSON object per line, the document in a string field (``text`` by
  default);
- ``hf:NAME[:SPLIT[:FIELD]]``: a Hugging Face dataset, streamed (needs the optional ``datasets``
  package; SPLIT defaults to ``train`` and FIELD to ``text``).

Files are read lazily, in order; the seed only matters for ``stories`` (the harvest shuffles at
token level, so file order does not leak into training batches).

Harvested and held-out text never overlap. ``stories`` is split by its seed (harvests use seed
0, analyses 12345). Every other corpus is split by document (``split_corpus``): a document is
held out when the first 8 bytes of the sha256 of its text, read as a number in [0, 2^64), fall
below ``HELDOUT_FRACTION`` (10%) of that range, so the split depends only on each document's
text, never on its position or a seed, and copies of a document fall on the same side.
``iter_texts(spec, part="harvest")`` reads the rest, ``part="heldout"`` the held-out documents,
``part="all"`` (the default) everything.

``iter_contexts`` packs a document stream into fixed-length token contexts: documents are joined
with the EOS token between them and cut every ``context_length`` tokens, each context starting
with BOS when ``add_bos``. Documents longer than a context simply continue into the next one.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossint.errors import CrossintError

CORPUS_FORMS = "'stories', a .txt file, a .jsonl file, or hf:NAME[:SPLIT[:FIELD]]"
# Documents tokenized per call: the fast tokenizers batch across documents in Rust.
_TOKENIZE_CHUNK = 256
HELDOUT_FRACTION = 0.1  # share of a file or hf: corpus's documents held out from harvests
CORPUS_PARTS = ("all", "harvest", "heldout")
_KEY_RANGE = 2**64  # document keys are the first 8 bytes of a sha256


def iter_texts(
    spec: str | Path,
    seed: int = 0,
    text_field: str = "text",
    part: str = "all",
    split: CorpusSplit | None = None,
) -> Iterator[str]:
    """Stream the documents of a corpus (see the module docstring for the forms of ``spec``).

    ``part``: ``all``, ``harvest`` (what harvests read) or ``heldout`` (what analyses read); for
    ``stories`` the part is ignored (its ``seed`` splits it). ``split``: the split to apply,
    default ``split_corpus(spec, text_field)``. Raises CrossintError for an unknown form or part,
    a missing file, a malformed line, a corpus too small to split, or a corpus (part) that turns
    out to hold no text (raised when the iterator is exhausted without yielding).
    """
    if part not in CORPUS_PARTS:
        raise CrossintError(f"unknown corpus part {part!r}: use one of {', '.join(CORPUS_PARTS)}")
    spec_str = str(spec)
    if spec_str == "stories":
        return _require_text(_story_texts(seed), spec_str)
    texts = _source_texts(spec_str, seed, text_field)
    if part == "all":
        return _require_text(texts, spec_str)
    split = split or split_corpus(spec_str, text_field)
    heldout = part == "heldout"
    chosen = (text for text in texts if split.is_heldout(text) == heldout)
    return _require_text(chosen, f"{spec_str} ({part} part)")


def _source_texts(spec: str, seed: int, text_field: str) -> Iterator[str]:
    """Every document of a file or ``hf:`` corpus, in order."""
    if spec.startswith("hf:"):
        return _hf_texts(spec, seed)
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise CrossintError(f"unknown corpus {spec!r}: use {CORPUS_FORMS}")
    if not path.is_file():
        raise CrossintError(f"corpus file not found: {path}")
    return _txt_texts(path) if suffix == ".txt" else _jsonl_texts(path, text_field)


def document_key(text: str) -> int:
    """A document's place in the split: the first 8 bytes of the sha256 of its UTF-8 text,
    big-endian, an integer in [0, 2^64)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


@dataclass(frozen=True)
class CorpusSplit:
    """The documents of a file or ``hf:`` corpus held out from harvests: those whose
    ``document_key`` is below ``heldout_below`` (about ``heldout_fraction`` of them)."""

    heldout_fraction: float
    heldout_below: int

    def is_heldout(self, text: str) -> bool:
        return document_key(text) < self.heldout_below

    def record(self) -> dict[str, Any]:
        """The manifest's ``corpus_split``: enough to repeat the split exactly."""
        return {"method": "sha256", "heldout_fraction": self.heldout_fraction,
                "heldout_below": f"{self.heldout_below:016x}"}

    @classmethod
    def from_record(cls, record: Any, where: str = "corpus split") -> CorpusSplit:
        """The split a ``record()`` describes (CrossintError naming ``where`` if malformed)."""
        try:
            fraction = float(record["heldout_fraction"])
            below = int(record["heldout_below"], 16)
            ok = record["method"] == "sha256" and 0 < fraction < 1 and 0 < below <= _KEY_RANGE
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CrossintError(
                f"{where} {record!r} is not a corpus split: expected {{method: sha256, "
                f"heldout_fraction in (0, 1), heldout_below: hex}}"
            )
        return cls(fraction, below)


def split_corpus(
    spec: str | Path, text_field: str = "text", heldout_fraction: float = HELDOUT_FRACTION
) -> CorpusSplit | None:
    """How harvests and analyses share a corpus: None for ``stories`` (split by seed), else the
    documents whose key is below ``heldout_fraction`` · 2^64 are held out.

    A corpus where that holds out nothing (or everything) — a small one — holds out the
    documents with the smallest key (or harvests those with the largest). Documents are read
    only until both parts have one, so this is quick unless the corpus is small. Raises
    CrossintError when the corpus cannot be split: one document, or copies of one.
    """
    if str(spec) == "stories":
        return None
    if not 0 < heldout_fraction < 1:
        raise CrossintError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    threshold = math.ceil(Fraction(str(heldout_fraction)) * _KEY_RANGE)  # 0.1 means 1/10
    lowest, highest, n_docs = _KEY_RANGE, -1, 0
    for text in iter_texts(spec, text_field=text_field):
        key = document_key(text)
        lowest, highest, n_docs = min(lowest, key), max(highest, key), n_docs + 1
        if lowest < threshold <= highest:
            return CorpusSplit(heldout_fraction, threshold)
    if lowest == highest:
        copies = " (all the same text)" if n_docs > 1 else ""
        raise CrossintError(
            f"corpus {spec} is too small to split into harvested and held-out text: it holds "
            f"{n_docs} document{'s' if n_docs > 1 else ''}{copies}. crossint holds out about "
            f"{heldout_fraction:.0%} of a corpus's documents (chosen by a hash of their text) so "
            f"that eval and the analyses never read harvested text; give a corpus of at least "
            f"two different documents (one per non-empty line of a .txt file, one per line of "
            f"a .jsonl file)"
        )
    return CorpusSplit(heldout_fraction, lowest + 1 if lowest >= threshold else highest)


def corpus_file(spec: str | Path) -> str | None:
    """The absolute path of a local corpus file, else None. Recorded beside the corpus as given
    (often relative to where the harvest ran), so that analyses started from another directory
    still find the file."""
    path = Path(str(spec))
    if str(spec) != "stories" and not str(spec).startswith("hf:") and path.is_file():
        return str(path.resolve())
    return None


def corpus_fingerprint(spec: str | Path) -> str | None:
    """sha256 of a local corpus file (so a resumed harvest can tell the file changed), else None."""
    from crossint.io import sha256_file

    path = Path(str(spec))
    if str(spec) != "stories" and not str(spec).startswith("hf:") and path.is_file():
        return sha256_file(path)
    return None


def iter_contexts(
    texts: Iterable[str],
    tokenizer: Any,
    context_length: int,
    add_bos: bool = True,
    corpus_name: str = "corpus",
) -> Iterator[torch.Tensor]:
    """Pack documents into LongTensor contexts of exactly ``context_length`` tokens.

    Layout of the packed stream: ``doc_0 EOS doc_1 EOS ...``, cut into consecutive pieces of
    ``context_length - 1`` tokens each preceded by BOS (``add_bos``), or of ``context_length``
    tokens otherwise. A trailing partial context is dropped. Raises CrossintError when the corpus
    holds less than one full context.
    """
    bos_id, eos_id = special_ids(tokenizer)
    use_bos = add_bos and bos_id is not None
    body = context_length - (1 if use_bos else 0)
    if body < 1:
        raise CrossintError(
            f"context length {context_length} is too short: it must be at least "
            f"{2 if use_bos else 1} (BOS plus one token)"
        )
    sep = np.array([eos_id] if eos_id is not None else [], dtype=np.int64)
    bos = np.array([bos_id] if use_bos else [], dtype=np.int64)
    buf = np.empty(0, dtype=np.int64)
    n_seen = 0
    n_contexts = 0
    for chunk in _chunks(texts, _TOKENIZE_CHUNK):
        ids_per_doc = _tokenize(tokenizer, chunk)
        pieces = [buf]
        for ids in ids_per_doc:
            pieces.append(np.asarray(ids, dtype=np.int64))
            pieces.append(sep)
        buf = np.concatenate(pieces)
        n_seen += len(buf) - len(pieces[0])
        n_full = len(buf) // body
        for i in range(n_full):
            n_contexts += 1
            yield torch.from_numpy(np.concatenate([bos, buf[i * body : (i + 1) * body]]))
        buf = buf[n_full * body :]
    if n_contexts == 0:
        raise CrossintError(
            f"corpus {corpus_name} is empty: it holds {n_seen} tokens, fewer than one context of "
            f"{context_length}; give a larger corpus or a shorter context length"
        )


def special_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """(BOS, EOS) token ids, falling back to CLS/SEP for encoder tokenizers and to each other."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "cls_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    if bos is None:
        bos = eos
    if eos is None:
        eos = bos
    return bos, eos


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: documents longer than the model's context are expected here (they are
    # split across contexts), so the tokenizer's length warning would only be noise.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _require_text(texts: Iterator[str], spec: str) -> Iterator[str]:
    n = 0
    for text in texts:
        n += 1
        yield text
    if n == 0:
        raise CrossintError(f"corpus {spec} is empty: it holds no text documents")


def _story_texts(seed: int) -> Iterator[str]:
    # The story generator lives with the embedded model; imported lazily so that reading a local
    # corpus never pulls it in.
    for module_name in ("crossint.toys.stories", "crossint.toys.storylm"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        if hasattr(module, "iter_stories"):
            return iter(module.iter_stories(seed))
    raise CrossintError(
        "the built-in 'stories' corpus is not available in this installation; "
        f"use {CORPUS_FORMS}"
    )


def _open_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, start=1)
    except UnicodeDecodeError as e:
        raise CrossintError(f"corpus file {path} is not UTF-8 text ({e.reason})") from None


def _txt_texts(path: Path) -> Iterator[str]:
    for _, line in _open_lines(path):
        text = line.strip()
        if text:
            yield text


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    for line_no, line in _open_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CrossintError(
                f"corpus file {path} line {line_no} is not valid JSON ({e.msg})"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            fields = ", ".join(sorted(record)) if isinstance(record, dict) else "none"
            raise CrossintError(
                f"corpus file {path} line {line_no} has no string field {field!r} "
                f"(fields: {fields}); choose the field holding the text"
            )
        if record[field].strip():
            yield record[field]


def _hf_texts(spec: str, seed: int) -> Iterator[str]:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise CrossintError(f"bad Hugging Face corpus {spec!r}: use hf:NAME[:SPLIT[:FIELD]]")
    name = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else "train"
    field = parts[2] if len(parts) > 2 and parts[2] else "text"
    try:
        import datasets
    except ImportError:
        raise CrossintError(
            f"corpus {spec!r} needs the optional 'datasets' package: "
            f"pip install 'crossint[datasets]'"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is the user's dataset/network issue
        detail = " ".join(str(e).split())
        raise CrossintError(f"could not open dataset {name!r} split {split!r}: {detail}") from None
    return _hf_rows(dataset, spec, field)


def _hf_rows(dataset: Iterable[dict], spec: str, field: str) -> Iterator[str]:
    for row in dataset:
        text = row.get(field)
        if not isinstance(text, str):
            raise CrossintError(
                f"dataset {spec!r} has no string field {field!r} (fields: {', '.join(row)}); "
                f"name the field as hf:NAME:SPLIT:FIELD"
            )
        if text.strip():
            yield text
