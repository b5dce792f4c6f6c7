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

``iter_contexts`` packs a document stream into fixed-length token contexts: documents are joined
with the EOS token between them and cut every ``context_length`` tokens, each context starting
with BOS when ``add_bos``. Documents longer than a context simply continue into the next one.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossint.errors import CrossintError

CORPUS_FORMS = "'stories', a .txt file, a .jsonl file, or hf:NAME[:SPLIT[:FIELD]]"
# Documents tokenized per call: the fast tokenizers batch across documents in Rust.
_TOKENIZE_CHUNK = 256


def iter_texts(spec: str | Path, seed: int = 0, text_field: str = "text") -> Iterator[str]:
    """Stream the documents of a corpus (see the module docstring for the forms of ``spec``).

    Raises CrossintError for an unknown form, a missing file, a malformed line, or a corpus that
    turns out to hold no text (raised when the iterator is exhausted without yielding).
    """
    spec_str = str(spec)
    if spec_str == "stories":
        texts: Iterator[str] = _story_texts(seed)
    elif spec_str.startswith("hf:"):
        texts = _hf_texts(spec_str, seed)
    else:
        path = Path(spec_str)
        suffix = path.suffix.lower()
        if suffix not in (".txt", ".jsonl"):
            raise CrossintError(f"unknown corpus {spec_str!r}: use {CORPUS_FORMS}")
        if not path.is_file():
            raise CrossintError(f"corpus file not found: {path}")
        texts = _txt_texts(path) if suffix == ".txt" else _jsonl_texts(path, text_field)
    return _require_text(texts, spec_str)


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
    for module_name in ("crossint.models.stories", "crossint.models.storylm"):
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
