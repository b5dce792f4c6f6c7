"""Text sources and context packing (crossint.data.corpus)."""

from __future__ import annotations

import importlib.util
import itertools
import json

import pytest
import torch

from conftest import TINY_TEXT, build_tiny_tokenizer
from crossint.data.corpus import (
    CorpusSplit,
    document_key,
    iter_contexts,
    iter_texts,
    split_corpus,
)
from crossint.errors import CrossintError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_txt_one_document_per_non_empty_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("  first doc  \n\n\nsecond doc\n   \nthird\n", encoding="utf-8")
    assert list(iter_texts(path)) == ["first doc", "second doc", "third"]
    assert list(iter_texts(str(path))) == ["first doc", "second doc", "third"]


def test_jsonl_default_and_custom_field(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "a b", "body": "x"}, {"text": "c d", "body": "y"}, {"text": "  ", "body": "z"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert list(iter_texts(path)) == ["a b", "c d"]
    assert list(iter_texts(path, text_field="body")) == ["x", "y", "z"]


def test_jsonl_bad_line_and_missing_field_name_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(CrossintError, match=r"c\.jsonl line 2 is not valid JSON"):
        list(iter_texts(path))
    path.write_text('{"text": "ok"}\n{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(CrossintError, match=r"line 2 has no string field 'text' \(fields: conte"):
        list(iter_texts(path))


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_file_is_an_error(tmp_path, content, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CrossintError, match="is empty"):
        list(iter_texts(path))


def test_missing_file_and_unknown_form_raise_at_call(tmp_path):
    with pytest.raises(CrossintError, match="corpus file not found"):
        iter_texts(tmp_path / "nope.txt")
    with pytest.raises(CrossintError, match=r"unknown corpus .*'stories', a \.txt file"):
        iter_texts(tmp_path / "data.csv")


def test_non_utf8_file_is_an_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CrossintError, match="not UTF-8"):
        list(iter_texts(path))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None,
                    reason="the 'datasets' extra is installed")
def test_hf_corpus_without_datasets_extra():
    with pytest.raises(CrossintError, match=r"needs the optional 'datasets' package"):
        iter_texts("hf:roneneldan/TinyStories:train:text")


def test_hf_corpus_spec_validation():
    with pytest.raises(CrossintError, match=r"hf:NAME\[:SPLIT\[:FIELD\]\]"):
        iter_texts("hf:")
    with pytest.raises(CrossintError, match=r"hf:NAME\[:SPLIT\[:FIELD\]\]"):
        iter_texts("hf:a:b:c:d")


def test_stories_are_infinite_and_seeded():
    a = list(itertools.islice(iter_texts("stories", seed=1), 5))
    b = list(itertools.islice(iter_texts("stories", seed=1), 5))
    c = list(itertools.islice(iter_texts("stories", seed=2), 5))
    assert a == b and a != c
    assert all(isinstance(t, str) and t for t in a)
    assert len(list(itertools.islice(iter_texts("stories", seed=0), 300))) == 300


def _naive_contexts(texts, tokenizer, S, add_bos):
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        stream.append(tokenizer.eos_token_id)
    body = S - 1 if add_bos else S
    out = []
    for i in range(len(stream) // body):
        piece = stream[i * body : (i + 1) * body]
        out.append(([tokenizer.bos_token_id] if add_bos else []) + piece)
    return out


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("S", [2, 7, 32])
def test_context_packing_matches_naive(tokenizer, add_bos, S):
    texts = TINY_TEXT * 3
    got = list(iter_contexts(iter(texts), tokenizer, S, add_bos=add_bos))
    expected = _naive_contexts(texts, tokenizer, S, add_bos)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.long and g.shape == (S,)
        assert g.tolist() == e
    if add_bos:
        assert all(int(g[0]) == tokenizer.bos_token_id for g in got)


def test_context_packing_spans_many_tokenizer_chunks(tokenizer):
    texts = [f"Tom has {i} red balls." for i in range(700)]  # > one tokenize chunk
    got = [c.tolist() for c in iter_contexts(texts, tokenizer, 16)]
    assert got == _naive_contexts(texts, tokenizer, 16, True)


def test_corpus_shorter_than_one_context_is_empty(tokenizer):
    with pytest.raises(CrossintError, match=r"corpus tiny is empty: it holds \d+ tokens"):
        list(iter_contexts(["Tom."], tokenizer, 64, corpus_name="tiny"))
    with pytest.raises(CrossintError, match="is empty"):
        list(iter_contexts([], tokenizer, 8))


def test_context_length_too_short(tokenizer):
    with pytest.raises(CrossintError, match="context length 1 is too short"):
        list(iter_contexts(TINY_TEXT, tokenizer, 1))


# ---- the held-out split of file corpora --------------------------------------------------------
def many_lines(tmp_path, n=400, name="many.txt"):
    path = tmp_path / name
    lines = [f"Story {i}: Tom saw {i % 7} red balls and {i % 5} blue birds." for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, lines


def test_file_split_is_disjoint_covers_the_file_and_ignores_the_seed(tmp_path):
    path, lines = many_lines(tmp_path)
    harvested = list(iter_texts(path, part="harvest"))
    held_out = list(iter_texts(path, seed=12345, part="heldout"))
    assert set(harvested).isdisjoint(held_out)
    assert sorted(harvested + held_out) == sorted(lines)  # every document, once, in one part
    assert 0.05 < len(held_out) / len(lines) < 0.15  # about HELDOUT_FRACTION
    # the same on every call and for every seed: a function of the text only
    for seed in (0, 1, 12345):
        assert list(iter_texts(path, seed=seed, part="heldout")) == held_out
        assert list(iter_texts(path, seed=seed, part="harvest")) == harvested
    assert split_corpus(path) == split_corpus(str(path))
    assert list(iter_texts(path)) == lines  # part="all" is the whole file, in order
    # the split goes with the text, not the position: reversed file, same documents held out
    reversed_path = tmp_path / "reversed.txt"
    reversed_path.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    assert list(iter_texts(reversed_path, part="heldout")) == held_out[::-1]


def test_jsonl_split_and_copies_fall_on_one_side(tmp_path):
    path = tmp_path / "c.jsonl"
    texts = [f"document number {i}" for i in range(60)] * 2  # every document twice
    path.write_text("\n".join(json.dumps({"body": t}) for t in texts) + "\n", encoding="utf-8")
    held_out = list(iter_texts(path, text_field="body", part="heldout"))
    harvested = list(iter_texts(path, text_field="body", part="harvest"))
    assert held_out and harvested and set(held_out).isdisjoint(harvested)
    assert len(held_out) + len(harvested) == len(texts)
    assert all(held_out.count(t) == 2 for t in held_out)


def test_split_record_round_trips_and_is_checked():
    split = CorpusSplit(0.1, 1 << 60)
    record = split.record()
    assert record == {"method": "sha256", "heldout_fraction": 0.1,
                      "heldout_below": "1000000000000000"}
    assert CorpusSplit.from_record(json.loads(json.dumps(record))) == split
    for bad in (None, {}, {**record, "method": "md5"}, {**record, "heldout_fraction": 1.5},
                {**record, "heldout_below": "xyz"}):
        with pytest.raises(CrossintError, match="is not a corpus split"):
            CorpusSplit.from_record(bad)


def test_small_corpora_still_hold_out_one_document(tmp_path):
    # TINY_TEXT: four documents; whichever way their hashes fall, each part gets at least one
    for n in (2, 3, 4):
        path = tmp_path / f"small{n}.txt"
        path.write_text("\n".join(TINY_TEXT[:n]) + "\n", encoding="utf-8")
        held_out = list(iter_texts(path, part="heldout"))
        harvested = list(iter_texts(path, part="harvest"))
        assert held_out and harvested and sorted(held_out + harvested) == sorted(TINY_TEXT[:n])
    # a fraction that holds out nothing: the document with the smallest key is held out
    path = tmp_path / "small4.txt"
    split = split_corpus(path, heldout_fraction=1e-9)
    smallest = min(TINY_TEXT, key=document_key)
    assert list(iter_texts(path, part="heldout", split=split)) == [smallest]


@pytest.mark.parametrize("content, detail", [
    ("Once upon a time there was one long story.\n", "1 document."),
    ("The same line.\nThe same line.\n\nThe same line.\n", "3 documents (all the same text)"),
])
def test_a_corpus_too_small_to_split_is_refused(tmp_path, content, detail):
    path = tmp_path / "one.txt"
    path.write_text(content, encoding="utf-8")
    for call in (lambda: split_corpus(path), lambda: iter_texts(path, part="heldout"),
                 lambda: iter_texts(path, part="harvest")):
        with pytest.raises(CrossintError, match="too small to split") as caught:
            call()
        message = str(caught.value)
        assert str(path) in message and detail in message and "at least two different" in message
    assert list(iter_texts(path)) == [line for line in content.splitlines() if line]


def test_stories_are_split_by_seed_not_by_part():
    assert split_corpus("stories") is None
    first = list(itertools.islice(iter_texts("stories", seed=0, part="harvest"), 3))
    assert first == list(itertools.islice(iter_texts("stories", seed=0), 3))
    assert first == list(itertools.islice(iter_texts("stories", seed=0, part="heldout"), 3))
    with pytest.raises(CrossintError, match="unknown corpus part 'test'"):
        iter_texts("stories", part="test")
