"""The held-out request shared by every analysis (crossint.analysis.heldout.HeldoutRequest):
validation, defaults from the training cache, the corpus split, records old and new, and the
sweep's re-use of a stored measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossint.analysis.heldout import HeldoutRequest, capture_tokens, request_from
from crossint.cli import main
from crossint.data.corpus import CorpusSplit, split_corpus
from crossint.errors import CrossintError
from crossint.io import sha256_file


def fake_run(tmp_path: Path, manifest: dict | None) -> Path:
    """A run directory whose config names a training cache with ``manifest`` (None: no cache)."""
    run = tmp_path / "run"
    run.mkdir(parents=True)
    source = {}
    if manifest is not None:
        cache = tmp_path / "cache"
        cache.mkdir()
        (cache / "manifest.json").write_text(json.dumps(manifest))
        source = {"path": str(cache)}
    (run / "config.json").write_text(json.dumps({"source": source}))
    (run / "model.safetensors").write_bytes(b"weights")
    return run


def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(f"Sentence number {i} about a cat." for i in range(100)) + "\n")
    return path


@pytest.mark.parametrize("fields, message", [
    ({}, "exactly one of n_tokens (--tokens) and n_texts (--texts)"),
    ({"n_tokens": 5, "n_texts": 5}, "exactly one of n_tokens"),
    ({"n_tokens": 0}, "--tokens (n_tokens) must be a positive integer, got 0"),
    ({"n_texts": -1}, "--texts (n_texts) must be a positive integer"),
    ({"n_tokens": True}, "--tokens (n_tokens) must be a positive integer"),
    ({"n_tokens": 5, "batch_size": 0}, "--batch-size/--text-batch-size (batch_size)"),
    ({"n_tokens": 5, "seed": -1}, "--seed/--text-seed (seed) must be an integer >= 0"),
    ({"n_tokens": 5, "context_length": 1}, "--context-length (context_length) must be an "
                                           "integer >= 2"),
    ({"n_tokens": 5, "corpus": ""}, "--corpus (corpus) must be a non-empty string"),
    ({"n_tokens": 5, "device": None}, "--device (device)"),
    ({"n_tokens": 5, "split": {"method": "sha256"}}, "split must be a CorpusSplit"),
])
def test_invalid_requests_name_the_flag(fields, message):
    with pytest.raises(CrossintError) as caught:
        HeldoutRequest(**fields)
    assert message in str(caught.value)


def test_request_is_frozen_and_takes_paths():
    request = HeldoutRequest(n_tokens=10, corpus=Path("a.txt"))
    assert request.corpus == "a.txt"
    with pytest.raises(AttributeError):
        request.n_tokens = 3  # type: ignore[misc]


def test_keywords_or_a_request():
    assert request_from(None, {}, n_tokens=20) == HeldoutRequest(n_tokens=20)
    assert request_from(None, {"n_texts": 4}, n_tokens=20) == HeldoutRequest(n_texts=4)
    given = HeldoutRequest(n_tokens=7, corpus="stories")
    assert request_from(given, {}, n_tokens=20) is given
    with pytest.raises(CrossintError, match="not both"):
        request_from(given, {"n_tokens": 3})
    with pytest.raises(TypeError, match="n_contexts"):
        request_from(None, {"n_contexts": 3})


def test_resolve_takes_the_training_cache_defaults_and_split(tmp_path):
    corpus = corpus_file(tmp_path)
    split = CorpusSplit(0.1, 1 << 62)
    run = fake_run(tmp_path, {"corpus": str(corpus), "context_length": 48, "text_field": "text",
                              "corpus_split": split.record()})
    resolved = HeldoutRequest(n_tokens=100).resolve(run)
    assert (resolved.corpus, resolved.context_length, resolved.text_field) == (str(corpus), 48,
                                                                                "text")
    assert resolved.split == split  # the recorded one, not recomputed
    assert resolved.resolve(run) == resolved
    # another corpus: its own split; stories: none
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"line {i}" for i in range(50)) + "\n")
    assert HeldoutRequest(n_tokens=1, corpus=str(other)).resolve(run).split == split_corpus(other)
    stories = HeldoutRequest(n_tokens=1, corpus="stories", context_length=16).resolve(run)
    assert stories.split is None and stories.context_length == 16
    # no known cache: built-in stories, 128
    bare = HeldoutRequest(n_tokens=1).resolve(fake_run(tmp_path / "x", None))
    assert (bare.corpus, bare.context_length, bare.split) == ("stories", 128, None)


def test_a_cache_from_before_the_split_still_works_with_a_warning(tmp_path):
    corpus = corpus_file(tmp_path)
    run = fake_run(tmp_path, {"corpus": str(corpus), "context_length": 32, "text_field": "text"})
    with pytest.warns(RuntimeWarning, match="records no split"):
        resolved = HeldoutRequest(n_tokens=100).resolve(run)
    assert resolved.split == split_corpus(corpus)


def test_records_round_trip_and_old_records_still_read():
    request = HeldoutRequest(n_texts=3, corpus="c.txt", context_length=32, device="cuda",
                             split=CorpusSplit(0.1, 12345))
    record = json.loads(json.dumps(request.record()))
    assert "device" not in record and record["split"]["heldout_below"] == f"{12345:016x}"
    assert HeldoutRequest.from_record(record) == HeldoutRequest(
        n_texts=3, corpus="c.txt", context_length=32, split=CorpusSplit(0.1, 12345))
    # interactions.json "request" as written before the split: extra keys, no split/text_field
    old = {"n_tokens": 600, "corpus": None, "seed": 12345, "context_length": None,
           "batch_size": 16, "model": None, "blocks": None, "top_pairs": 50, "delta2_pairs": 50}
    assert HeldoutRequest.from_record(old) == HeldoutRequest(n_tokens=600)


def test_capture_tokens_names_its_parts(tiny_model_dir):
    import torch

    from crossint.models.adapter import load_model

    adapter = load_model(str(tiny_model_dir))
    ids_BS = torch.tensor([[adapter.tokenizer.bos_token_id, 5, 6, 7]])
    captured = capture_tokens(adapter, ids_BS, ["blocks.0.mlp_in", "blocks.1.resid_pre"],
                              adapter.special_token_ids())
    assert captured.acts_TXD.shape == (3, 2, 32) and captured.keep_BS.tolist() == [
        [False, True, True, True]]
    assert set(captured.acts) == {"blocks.0.mlp_in", "blocks.1.resid_pre"}
    acts, keep_BS, acts_TXD = captured  # still unpacks like the tuple it was
    assert acts_TXD is captured.acts_TXD


OLD_REQUEST = {"n_tokens": 600, "corpus": None, "seed": 12345, "context_length": None,
               "batch_size": 16, "model": None, "blocks": None, "top_pairs": 5,
               "delta2_pairs": 5}


@pytest.mark.parametrize("corpus, reused", [("stories", True), ("file", False)])
def test_sweep_reuses_a_measurement_of_the_previous_version_only_for_stories(
        tmp_path, monkeypatch, corpus, reused):
    """An interactions.json written before requests recorded the split: for stories the text
    is the same, so it is re-used; for a file corpus it was measured on harvested text, so the
    run is measured again."""
    import crossint.analysis.interactions as interactions
    from crossint.analysis.sweep import measure_run

    spec = "stories" if corpus == "stories" else str(corpus_file(tmp_path))
    manifest = {"corpus": spec, "context_length": 32, "text_field": "text"}
    if corpus != "stories":
        manifest["corpus_split"] = split_corpus(spec).record()
    run = fake_run(tmp_path, manifest)
    stored = {"request": OLD_REQUEST, "crosscoder_sha256": sha256_file(run / "model.safetensors"),
              "dominant_share": 0.5}
    (run / "interactions").mkdir()
    (run / "interactions" / "interactions.json").write_text(json.dumps(stored))
    calls = []

    def analyse_interactions(run_dir, request, **settings):
        calls.append(request)
        return {"request": interactions.request_record(request, None, 5, 5), "new": True}

    monkeypatch.setattr(interactions, "analyse_interactions", analyse_interactions)
    monkeypatch.setattr(interactions, "write_outputs", lambda result, out_dir: None)
    result = measure_run(run, n_tokens=600, top_pairs=5, delta2_pairs=5, progress=False)
    assert (result == stored) is reused and len(calls) == (0 if reused else 1)
    # a record of this version for the same request is re-used; another request is not
    wanted = interactions.request_record(HeldoutRequest(n_tokens=600).resolve(run), None, 5, 5)
    (run / "interactions" / "interactions.json").write_text(json.dumps({**stored,
                                                                         "request": wanted}))
    assert measure_run(run, n_tokens=600, top_pairs=5, delta2_pairs=5)["request"] == wanted
    assert len(calls) == (0 if reused else 1)
    measure_run(run, n_tokens=601, top_pairs=5, delta2_pairs=5)
    assert len(calls) == (1 if reused else 2)


def test_cli_builds_one_request_and_refuses_bad_flags(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--tokens", "0", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tokens (n_tokens) must be a positive integer" in err
    assert main(["interactions", str(tmp_path), "--context-length", "1", "--quiet"]) == 1
    assert "--context-length (context_length)" in capsys.readouterr().err
