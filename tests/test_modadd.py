"""The modular-addition toy of the LIB comparison (SPEC §11): corpus, tokenizer, one sum per
6-token context, deterministic training, and `crossint lib` on it."""

from __future__ import annotations

import json

import torch

from crossint.analysis.heldout import HeldoutRequest, heldout_batches
from crossint.cli import main
from crossint.models.adapter import load_model
from crossint.toys.modadd import modadd_lines, modadd_tokenizer, sum_contexts

TINY = ["--p", "11", "--d-model", "16", "--n-heads", "2", "--d-mlp", "32", "--steps", "30",
        "--batch-size", "32", "--quiet"]


def test_sums_tokenize_to_one_token_per_word():
    lines = modadd_lines(7)
    assert len(lines) == 49 and lines[7 * 3 + 5] == "3 5 = 1"
    ids = modadd_tokenizer(7)(lines[:2], add_special_tokens=False)["input_ids"]
    assert ids == sum_contexts(lines[:2], 7)[:, 1:5].tolist()


def test_modadd_trains_deterministically_and_lib_reads_one_sum_per_context(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["toys", "modadd", "--out", str(first), *TINY]) == 0
    assert main(["toys", "modadd", "--out", str(second), *TINY]) == 0
    assert "held-out sums" in capsys.readouterr().out
    training = json.loads((first / "training.json").read_text())
    assert training["n_train_sums"] + training["n_heldout_sums"] == 121
    assert training["heldout"] == json.loads((second / "training.json").read_text())["heldout"]
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()

    adapter = load_model(str(first))
    assert adapter.max_context == 6
    request = HeldoutRequest(n_texts=4, corpus=str(first / "modadd.txt"), context_length=6)
    (ids_BS,) = heldout_batches(adapter, request)
    assert (ids_BS[:, 0] == 0).all() and (ids_BS[:, 5] == 0).all() and (ids_BS[:, 3] == 12).all()
    a, b, c = ids_BS[:, 1] - 1, ids_BS[:, 2] - 1, ids_BS[:, 4] - 1
    assert torch.equal((a + b) % 11, c)

    out = tmp_path / "lib"
    code = main(["lib", "--model", str(first), "--corpus", str(first / "modadd.txt"), "--tokens",
                 "1000", "--edge-tokens", "24", "--sources", "2", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    document = json.loads((out / "lib.json").read_text())
    assert document["request"]["context_length"] == 6
    assert document["node_layers"] == ["blocks.0.resid_pre", "blocks.0.resid_post"]
