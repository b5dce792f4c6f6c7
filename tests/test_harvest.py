"""`crossint harvest`: the command line over crossint.data.harvest."""

from __future__ import annotations

import json

import pytest
import torch

from crossint.cli import main
from crossint.data.cache import ActivationCache
from crossint.data.harvest import harvest


def args(model_dir, out, corpus, *extra):
    return [
        "harvest",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--corpus",
        str(corpus),
        "--tokens",
        "600",
        "--context-length",
        "32",
        "--batch-size",
        "4",
        "--shard-tokens",
        "250",
        "--device",
        "cpu",
        *extra,
    ]


def snapshot(directory):
    if not directory.exists():
        return None
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def assert_one_line_error(capsys, code, match):
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("crossint harvest: error: ") and match in lines[0], lines[0]


@pytest.mark.slow
def test_harvest_then_rerun(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(args(tiny_model_dir, out, tiny_text_file, "--quiet")) == 0
    printed = capsys.readouterr().out
    assert "harvested 600 tokens" in printed and "3 shards" in printed and "tokens/s" in printed
    cache = ActivationCache(out)
    assert cache.n_tokens == 600 and len(cache.hookpoints) == 9 and cache.shard_sizes[-1] == 100
    assert next(cache.batches(64, seed=0)).shape == (64, 9, 32)
    before = snapshot(out)
    assert main(args(tiny_model_dir, out, tiny_text_file, "--quiet")) == 0
    assert "already holds a complete cache" in capsys.readouterr().out
    assert snapshot(out) == before


@pytest.mark.slow
def test_interrupted_harvest_resumes_from_the_cli(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    from crossint.models.adapter import load_model

    class Interrupt(Exception):
        pass

    def stop(index, entry):
        raise Interrupt

    out = tmp_path / "cache"
    with pytest.raises(Interrupt):
        harvest(
            load_model(str(tiny_model_dir)),
            out,
            "paper",
            600,
            corpus=str(tiny_text_file),
            context_length=32,
            batch_size=4,
            shard_tokens=250,
            progress=False,
            on_shard=stop,
        )
    assert main(args(tiny_model_dir, out, tiny_text_file, "--quiet", "--resume")) == 0
    assert "harvested 350 tokens" in capsys.readouterr().out
    full = tmp_path / "full"
    assert main(args(tiny_model_dir, full, tiny_text_file, "--quiet")) == 0
    assert snapshot(out) == snapshot(full)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--context-length", "65"], "context length 65 is longer than the maximum context"),
        (["--layout", "blocks.7.mlp_in"], "unknown hookpoint 'blocks.7.mlp_in'"),
        (["--dtype", "int8"], "unsupported activation dtype 'int8'"),
        (["--tokens", "0"], "--tokens must be a positive integer"),
        (["--resume"], "holds no activation cache to continue"),
    ],
)
def test_bad_arguments(tiny_model_dir, tiny_text_file, tmp_path, capsys, extra, match):
    out = tmp_path / "cache"
    code = main(args(tiny_model_dir, out, tiny_text_file, *extra))
    assert_one_line_error(capsys, code, match)
    assert not out.exists()


def test_unknown_model(tiny_text_file, tmp_path, capsys):
    code = main(args(tmp_path / "no-such-model", tmp_path / "cache", tiny_text_file))
    assert_one_line_error(capsys, code, "could not load model")
    assert not (tmp_path / "cache").exists()


def test_empty_corpus(tiny_model_dir, tmp_path, capsys):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("\n")
    code = main(args(tiny_model_dir, tmp_path / "cache", corpus))
    assert_one_line_error(capsys, code, "is empty")
    assert not (tmp_path / "cache").exists()


def test_nan_activations(tiny_model_dir, tiny_text_file, tmp_path, capsys, monkeypatch):
    import crossint.models.adapter as adapter_module

    real_load = adapter_module.load_model

    def load_with_nan(name, **kwargs):
        adapter = real_load(name, **kwargs)
        capture = adapter.capture

        def poisoned(input_ids_BS, hookpoints, *a, **k):
            out = capture(input_ids_BS, hookpoints, *a, **k)
            out["blocks.0.mlp_in"][:, 1:3] = float("nan")  # positions 1, 2: never special here
            return out

        adapter.capture = poisoned
        return adapter

    monkeypatch.setattr(adapter_module, "load_model", load_with_nan)
    code = main(args(tiny_model_dir, tmp_path / "cache", tiny_text_file))
    assert_one_line_error(
        capsys, code, "non-finite values (NaN/Inf) in the activations at hookpoint blocks.0.mlp_in"
    )


def test_existing_files_are_never_lost(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    # A directory that is not a cache.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code = main(args(tiny_model_dir, other, tiny_text_file))
    assert_one_line_error(capsys, code, "is not empty and holds no activation cache")
    assert snapshot(other) == {"notes.txt": b"mine"}
    # A cache with a corrupt manifest.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{oops")
    code = main(args(tiny_model_dir, broken, tiny_text_file))
    assert_one_line_error(capsys, code, "is corrupt (not valid JSON")
    assert snapshot(broken) == {"manifest.json": b"{oops"}


@pytest.mark.slow
def test_other_settings_and_corrupt_shards(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(args(tiny_model_dir, out, tiny_text_file, "--quiet")) == 0
    capsys.readouterr()
    before = snapshot(out)
    code = main(args(tiny_model_dir, out, tiny_text_file, "--seed", "3"))
    assert_one_line_error(capsys, code, "seed: 0 there, 3 now")
    assert snapshot(out) == before
    # A truncated shard is reported (one warning line) and harvested again, byte for byte.
    shard = out / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    assert main(args(tiny_model_dir, out, tiny_text_file, "--quiet")) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line]
    assert (
        len(warning) == 1
        and "shard_00001.safetensors is missing, corrupt or truncated" in warning[0]
    )
    assert snapshot(out) == before
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


def test_help_mentions_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["harvest", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--tokens",
        "--out",
        "--layout",
        "--corpus",
        "--context-length",
        "--dtype",
        "--shard-tokens",
        "--include-special",
        "--resume",
    ):
        assert option in text


def test_shards_fingerprint_their_tokens(tiny_model_dir, tiny_text_file, tmp_path):
    """Two models with one tokenizer harvested on the same text hold the same tokens row by row
    (what model diffing pairs); other text gives other fingerprints."""
    from conftest import build_tiny_gpt2
    from crossint.models.adapter import load_model

    other_model = build_tiny_gpt2(tmp_path / "other", seed=3)
    settings = {"corpus": str(tiny_text_file), "context_length": 32, "batch_size": 4,
                "shard_tokens": 250, "progress": False}

    def fingerprints(model, out, **extra):
        cache = harvest(load_model(str(model)), out, "resid", 600, **{**settings, **extra})
        return [shard["tokens_sha256"] for shard in cache.manifest["shards"]]

    first = fingerprints(tiny_model_dir, tmp_path / "a")
    assert len(first) == 3 and len(set(first)) == 3
    assert fingerprints(other_model, tmp_path / "b") == first
    assert fingerprints(tiny_model_dir, tmp_path / "c", seed=1) != first


def test_bfloat16_model_harvest_is_recorded_and_close_to_float32(tiny_model_dir, tiny_text_file,
                                                                   tmp_path, capsys):
    """--model-dtype runs the model in low precision (the GPU path, here on the CPU); the
    manifest says so, so a float32 harvest does not resume it."""
    full, half = tmp_path / "fp32", tmp_path / "bf16"
    assert main(args(tiny_model_dir, full, tiny_text_file, "--quiet")) == 0
    assert main(args(tiny_model_dir, half, tiny_text_file, "--quiet",
                     "--model-dtype", "bfloat16")) == 0
    a, b = ActivationCache(full), ActivationCache(half)
    assert b.manifest["model_info"]["weights_dtype"] == "bfloat16"
    assert "weights_dtype" not in a.manifest["model_info"]
    x, y = a.sample(200, seed=0), b.sample(200, seed=0)
    assert not torch.equal(x, y)
    assert (x - y).norm() / x.norm() < 0.05  # bfloat16 keeps about 3 significant digits
    capsys.readouterr()
    code = main(args(tiny_model_dir, half, tiny_text_file, "--quiet", "--resume"))
    assert code == 1 and "weights_dtype" in capsys.readouterr().err
    code = main(args(tiny_model_dir, tmp_path / "x", tiny_text_file, "--model-dtype", "int8"))
    assert code == 1 and "unknown dtype" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_harvest_is_close_to_the_cpu(tiny_model_dir, tiny_text_file, tmp_path):
    """The GPU capture (pinned host blocks copied on a side stream) stores what the CPU does."""
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    assert main(args(tiny_model_dir, cpu, tiny_text_file, "--quiet", "--device", "cpu")) == 0
    assert main(args(tiny_model_dir, gpu, tiny_text_file, "--quiet", "--device", "cuda",
                     "--model-dtype", "bfloat16")) == 0
    x, y = ActivationCache(cpu).sample(200, seed=0), ActivationCache(gpu).sample(200, seed=0)
    assert (x - y).norm() / x.norm() < 0.05
