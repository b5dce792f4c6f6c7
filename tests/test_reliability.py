"""What docs/reliability.md promises, checked the way a user breaks things: two commands on one
directory, killed processes, flipped bytes, a moved cache, a different cache on resume, hostile
flags and files, a full disk, an encoder without a head, NaN input, a machine without a virtual
environment."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import Interrupt, build_tiny_tokenizer, interrupt_at
from crossint import lock
from crossint.cli import main
from crossint.crosscoder.config import CrosscoderConfig, TrainConfig
from crossint.crosscoder.model import Crosscoder
from crossint.crosscoder.train import train
from crossint.data.cache import TensorActivations
from crossint.data.harvest import harvest
from crossint.errors import CrossintError
from crossint.rundir import LOCK, RunDir

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ["blocks.0.resid_pre", "blocks.1.resid_pre"]
D = 8


def acts(n: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, len(HOOKS), D, generator=torch.Generator().manual_seed(seed))


def configs(hookpoints=HOOKS, d_model=D, models=("tiny",), **train_changes):
    crosscoder = CrosscoderConfig(hookpoints=list(hookpoints), models=list(models),
                                  d_model=d_model, n_features=32, activation="topk", k=2)
    settings = {"steps": 12, "batch_size": 32, "checkpoint_every": 5, "log_every": 5,
                "normalisation_tokens": 256, **train_changes}
    return crosscoder, TrainConfig(**settings)


def weights(model: Crosscoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1, err
    return err


def flip_low_bits(path: Path, offsets: list[int]) -> None:
    """Flip the lowest bit of bytes of ``path`` (in float32 data: a tiny, finite change)."""
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def held_by_another_process(directory: Path, command: str):
    """A second process holding ``directory``'s lock until the block ends."""
    code = ("import sys; from crossint.lock import acquire; acquire(sys.argv[1], sys.argv[2]); "
            "print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory), command],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def caches(tiny_model_dir, tiny_text_file, tmp_path_factory) -> dict[int, Path]:
    """Two small caches of the tiny GPT-2 with the same hookpoints and other tokens (seeds)."""
    from crossint.models.adapter import load_model

    root = tmp_path_factory.mktemp("reliability_caches")
    adapter = load_model(tiny_model_dir)
    for seed in (0, 1):
        harvest(adapter, root / f"seed{seed}", "resid", n_tokens=600,
                corpus=str(tiny_text_file), context_length=32, shard_tokens=300, seed=seed,
                progress=False)
    return {seed: root / f"seed{seed}" for seed in (0, 1)}


# --- 2. eval never switches text silently ------------------------------------------------------
def copy_run(run: Path, dest: Path, edit_source) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoint", "clusters",
                                                             "interactions", "eval", "*.html"))
    config = json.loads((dest / "config.json").read_text())
    edit_source(config["source"])
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_eval_reads_the_recorded_text_when_the_cache_has_moved(trained_paper_run, tiny_text_file,
                                                               tmp_path):
    from crossint.analysis.evaluate import evaluate

    gone = str(tmp_path / "moved_away")
    run = copy_run(trained_paper_run, tmp_path / "run", lambda s: s.update(path=gone))
    result = evaluate(run, n_tokens=60, progress=False)
    assert result["corpus"] == str(tiny_text_file) and result["context_length"] == 32
    assert result["request"]["split"] is not None  # the held-out part of the file, as before

    def old_run(source):  # written before config.json recorded the text
        source.update(path=gone)
        source.pop("text")

    old = copy_run(trained_paper_run, tmp_path / "old", old_run)
    with pytest.raises(CrossintError, match="is gone.*pass --corpus"):
        evaluate(old, n_tokens=60, progress=False)


def test_analyses_find_the_corpus_from_any_directory_and_refuse_a_changed_or_lost_one(
        tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    from crossint.analysis.heldout import HeldoutRequest

    texts = tmp_path / "texts"
    texts.mkdir()
    corpus = texts / "stories.txt"
    shutil.copy(tiny_text_file, corpus)
    monkeypatch.chdir(texts)  # the harvest records the corpus as given: "stories.txt"
    cache = harvest(str(tiny_model_dir), tmp_path / "cache", "resid", n_tokens=300,
                    corpus="stories.txt", context_length=32, progress=False)
    run = tmp_path / "run"
    train(*configs(cache.hookpoints, 32, [cache.model]), cache, run, progress=False)
    monkeypatch.chdir(tmp_path)  # an analysis started elsewhere reads the same file
    request = HeldoutRequest(n_tokens=60)
    assert request.resolve(run).corpus == str(corpus.resolve())
    corpus.write_text(corpus.read_text() + "one more story\n")
    with pytest.raises(CrossintError, match="has changed since .*pass --corpus"):
        request.resolve(run)
    assert HeldoutRequest(n_tokens=60, corpus=str(corpus)).resolve(run).split is not None
    corpus.unlink()
    with pytest.raises(CrossintError, match="is not found .*pass --corpus"):
        request.resolve(run)


# --- 3. one writer per directory ---------------------------------------------------------------
def test_a_second_harvest_or_train_into_a_busy_directory_is_refused(
        tiny_model_dir, tiny_text_file, caches, tmp_path, capsys):
    cache = tmp_path / "cache"
    with held_by_another_process(cache, "crossint harvest") as other:
        assert main(["harvest", "--model", str(tiny_model_dir), "--corpus", str(tiny_text_file),
                     "--tokens", "300", "--context-length", "32", "--out", str(cache),
                     "--quiet"]) == 1
        assert f"in use by process {other.pid} (crossint harvest" in one_line_error(capsys)
        with pytest.raises(CrossintError, match="in use by process"):
            harvest(str(tiny_model_dir), cache, "resid", n_tokens=300, corpus=str(tiny_text_file),
                    context_length=32, progress=False)
        assert [p.name for p in cache.iterdir()] == [LOCK]  # nothing written
    run = tmp_path / "run"
    with held_by_another_process(run, "crossint train"):
        assert main(["train", "--activations", str(caches[0]), "--out", str(run), "--features",
                     "32", "--k", "2", "--steps", "4", "--batch-size", "32", "--quiet"]) == 1
        assert "in use by process" in one_line_error(capsys)
        with pytest.raises(CrossintError, match="in use by process"):
            train(*configs(), TensorActivations(acts(), HOOKS), run, progress=False)
        assert [p.name for p in run.iterdir()] == [LOCK]
    train(*configs(), TensorActivations(acts(), HOOKS), run, progress=False)  # free again
    assert RunDir(run).is_finished() and not (run / LOCK).exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    directory = tmp_path / "out"
    with held_by_another_process(directory, "crossint train") as other:
        other.kill()  # SIGKILL: no chance to clean up
        other.wait(timeout=30)
        assert lock.read_owner(directory)["pid"] == other.pid  # the stale lock file stays
        with lock.locked(directory, "crossint eval"):
            assert lock.read_owner(directory)["pid"] == os.getpid()
    assert not (directory / LOCK).exists()


def test_locks_are_reentrant_and_leave_no_empty_directories(tmp_path):
    directory = tmp_path / "a" / "b"
    with lock.locked(directory, "outer"):
        with lock.locked(directory, "inner"):
            assert lock.holds_lock(directory)
        assert (directory / LOCK).is_file()
    assert not lock.holds_lock(directory) and not (tmp_path / "a").exists()
    with lock.locked(directory, "writer"):
        (directory / "result.json").write_text("{}")
    assert [p.name for p in directory.iterdir()] == ["result.json"]


BLOCKING_TRAIN = """
import sys, time
import crossint.crosscoder.train as train_module
real_step, block_at = train_module.train_step, int(sys.argv[1])
def train_step(state, acts_BXD, step, *args, **kwargs):
    if step == block_at:
        print("blocked", flush=True)
        time.sleep(600)
    return real_step(state, acts_BXD, step, *args, **kwargs)
train_module.train_step = train_step
from crossint.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_then_sigkill_during_training_lose_nothing(caches, tmp_path, capsys,
                                                           monkeypatch):
    import signal

    import crossint.crosscoder.train as train_module

    settings = ["--activations", str(caches[0]), "--features", "32", "--k", "2", "--steps", "60",
                "--batch-size", "32", "--checkpoint-every", "10", "--log-every", "10", "--quiet"]
    run = tmp_path / "run"

    def checkpoint_step() -> int:
        from crossint.crosscoder.checkpoint import load_checkpoint  # verifies the checksum

        return load_checkpoint(RunDir(run).checkpoint)["step"]

    real_step = train_module.train_step

    def terminated_at_25(state, acts_BXD, step, *args, **kwargs):
        if step == 25:  # what a scheduler sends first; handled like Ctrl-C
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(state, acts_BXD, step, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(train_module, "train_step", terminated_at_25)
        assert main(["train", *settings, "--out", str(run)]) == 143
    err = capsys.readouterr().err
    assert "crossint train: terminated" in err and "--resume" in err
    assert checkpoint_step() == 20 and not (run / LOCK).exists()
    killed = subprocess.Popen([sys.executable, "-c", BLOCKING_TRAIN, "45", "train", *settings,
                               "--out", str(run), "--resume"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "blocked", killed.stderr.read()
    killed.kill()  # SIGKILL: no clean-up at all
    killed.wait(timeout=60)
    assert checkpoint_step() == 40 and lock.read_owner(run)["pid"] == killed.pid
    assert main(["train", *settings, "--out", str(run), "--resume"]) == 0  # takes the lock over
    assert main(["train", *settings, "--out", str(tmp_path / "whole")]) == 0
    resumed, whole = (weights(Crosscoder.from_pretrained(d)) for d in (run, tmp_path / "whole"))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert not list(run.rglob("*.tmp")) and not (run / LOCK).exists()


# --- 4. checksums of weights and checkpoints ---------------------------------------------------
def test_flipped_bytes_in_the_weights_are_refused_and_older_runs_still_load(tmp_path):
    run = tmp_path / "run"
    train(*configs(), TensorActivations(acts(), HOOKS), run, progress=False)
    path = RunDir(run).weights
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    flip_low_bits(path, [data_start + 400, data_start + 404])
    with pytest.raises(CrossintError, match="model.safetensors does not match the sha256"):
        Crosscoder.from_pretrained(run)
    config = json.loads(RunDir(run).config.read_text())
    del config["weights_sha256"]  # as saved by a crossint that recorded no checksum
    RunDir(run).config.write_text(json.dumps(config))
    Crosscoder.from_pretrained(run)


def test_flipped_bytes_in_a_checkpoint_stop_the_resume_and_older_ones_still_load(tmp_path):
    cc, tc = configs()
    source = TensorActivations(acts(), HOOKS)
    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(cc, tc, source, run, extra_losses=[interrupt_at(7)], progress=False)
    path = RunDir(run).checkpoint
    state = torch.load(path, weights_only=True)
    offset = path.read_bytes().index(state["model"]["W_dec_HXD"].numpy().tobytes()[:64])
    flip_low_bits(path, [offset, offset + 4])
    with pytest.raises(CrossintError, match="state.pt does not match the sha256"):
        train(cc, tc, source, run, resume=True, progress=False)
    flip_low_bits(path, [offset, offset + 4])  # the original bytes again
    (path.parent / "state.sha256").unlink()  # as saved by a crossint that recorded no checksum
    assert train(cc, tc, source, run, resume=True, progress=False) is not None


def test_killed_between_checksum_and_checkpoint_the_run_still_resumes_exactly(tmp_path,
                                                                              monkeypatch):
    cc, tc = configs()
    source = TensorActivations(acts(), HOOKS)
    full = weights(train(cc, tc, source, tmp_path / "full", progress=False))
    real_replace, replaced = os.replace, []

    def killed_at_second_checkpoint(src, dst):
        if str(dst).endswith("state.pt"):
            replaced.append(dst)
            if len(replaced) == 2:  # the new checksum is on disk, the new checkpoint is not
                raise Interrupt
        real_replace(src, dst)

    run = tmp_path / "run"
    monkeypatch.setattr("crossint.io.os.replace", killed_at_second_checkpoint)
    with pytest.raises(Interrupt):
        train(cc, tc, source, run, progress=False)
    monkeypatch.setattr("crossint.io.os.replace", real_replace)
    assert torch.load(RunDir(run).checkpoint, weights_only=True)["step"] == 5
    resumed = weights(train(cc, tc, source, run, resume=True, progress=False))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


# --- 5. a resume checks the cache's fingerprint ------------------------------------------------
def test_resume_refuses_another_cache_with_the_same_hookpoints(caches, tmp_path, capsys):
    from crossint.data.cache import ActivationCache

    first = ActivationCache(caches[0])
    assert first.hookpoints == ActivationCache(caches[1]).hookpoints
    cc, tc = configs(first.hookpoints, 32, [first.model])
    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(cc, tc, first, run, extra_losses=[interrupt_at(7)], progress=False)
    config = RunDir(run).config.read_text()
    assert main(["train", "--activations", str(caches[1]), "--out", str(run), "--resume",
                 "--quiet"]) == 1
    assert "trained on other activations" in one_line_error(capsys)
    assert RunDir(run).config.read_text() == config  # nothing rewritten
    moved = tmp_path / "moved"
    shutil.copytree(caches[0], moved)  # the same cache elsewhere resumes
    assert main(["train", "--activations", str(moved), "--out", str(run), "--resume",
                 "--quiet"]) == 0
    assert json.loads(RunDir(run).config.read_text())["source"]["path"] == str(moved.resolve())


# --- 6. ordinary failures are one line ---------------------------------------------------------
def test_an_out_that_is_a_file_or_cannot_be_written_is_one_line(tiny_model_dir, tmp_path, capsys,
                                                                monkeypatch):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("x")
    for argv in (["harvest", "--model", str(tiny_model_dir)], ["train", "--activations", "c"],
                 ["eval", str(tmp_path / "run")], ["sweep", "--activations", "c", "--lambdas",
                                                    "0"]):
        assert main([*argv, "--out", str(in_the_way), "--quiet"]) == 1
        assert "exists and is not a directory" in one_line_error(capsys)

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    with monkeypatch.context() as patched:  # tests may run as root, where chmod cannot deny
        patched.setattr(Path, "mkdir", denied)
        assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "new"), "--quiet"]) == 1
        assert "permission denied" in one_line_error(capsys)

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    with monkeypatch.context() as patched:
        patched.setattr(Path, "mkdir", read_only)
        assert main(["train", "--activations", "c", "--out", str(tmp_path / "new"),
                     "--quiet"]) == 1
        assert "read-only file system at" in one_line_error(capsys)
    monkeypatch.setattr("crossint.commands.eval._run", lambda args: denied(tmp_path / "x.json"))
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "ev"), "--quiet"]) == 1
    assert "x.json: permission denied" in one_line_error(capsys)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_out_is_one_line(tmp_path, capsys):
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    assert main(["eval", str(tmp_path / "run"), "--out", str(read_only / "x"), "--quiet"]) == 1
    assert "permission denied" in one_line_error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_torch_was_not_built_for_is_one_line(tiny_model_dir, tmp_path, capsys):
    assert main(["harvest", "--model", str(tiny_model_dir), "--device", "cuda", "--out",
                 str(tmp_path / "c"), "--quiet"]) == 1
    assert "'cuda' is not available" in one_line_error(capsys)
    assert main(["eval", str(tmp_path / "run"), "--device", "cuda", "--quiet"]) == 1
    assert "--device cuda is not available" in one_line_error(capsys)
    assert not (tmp_path / "c").exists() and not (tmp_path / "run").exists()


def test_an_impossible_dictionary_is_refused_with_the_estimate(caches, tmp_path, capsys,
                                                               monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--activations", str(caches[0]), "--out", str(run), "--features",
                 "1000000000", "--batch-size", "64", "--quiet"]) == 1
    err = one_line_error(capsys)
    assert "needs about" in err and "TB of memory" in err and "--features" in err
    monkeypatch.setattr("crossint.crosscoder.memory.available_bytes", lambda device: 10_000)
    cc, tc = configs()
    with pytest.raises(CrossintError, match=r"needs about .* but cpu has 10.0 KB free"):
        train(cc, tc, TensorActivations(acts(), HOOKS), run, progress=False)
    assert not run.exists()


def test_a_full_disk_is_one_line_and_leaves_no_half_written_files(tiny_model_dir, tiny_text_file,
                                                                  tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # what safetensors raises on ENOSPC
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                              'StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    cache = tmp_path / "cache"
    assert main(["harvest", "--model", str(tiny_model_dir), "--corpus", str(tiny_text_file),
                 "--tokens", "200", "--context-length", "32", "--out", str(cache),
                 "--quiet"]) == 1
    assert "no space left on the disk holding" in one_line_error(capsys)
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json"]  # no temporaries, no lock

    def enospc(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", enospc)
    from crossint.io import atomic_write_json

    with pytest.raises(CrossintError, match="no space left on the disk.* --resume for train"):
        atomic_write_json(tmp_path / "result.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_broken_model_directories_are_one_line(tiny_model_dir, tmp_path, capsys):
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights_file = truncated / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_model_dir, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "n_embd": 48}))
    for model, detail in ((truncated, "SafetensorError"), (mismatched, "first mismatch")):
        assert main(["harvest", "--model", str(model), "--out", str(tmp_path / "c"),
                     "--quiet"]) == 1
        err = one_line_error(capsys)
        assert "truncated, corrupt or do not match its config.json" in err and detail in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 25600000000 bytes"), "out of memory"),
    (AssertionError("Torch not compiled with CUDA enabled"), "device is not available"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/state.pt"),
     "no space left on the disk holding /data/run/state.pt"),
    (ValueError("a bug"), None),
    (AssertionError("an internal invariant"), None),
])
def test_ordinary_failures_map_to_one_line_and_bugs_keep_their_traceback(error, expected):
    from crossint.cli import user_error

    message = user_error(error)
    assert message == expected if expected is None else expected in message


@pytest.mark.parametrize("argv, flag", [
    (["eval", "RUN", "--batch-size", "0"], "--batch-size"),
    (["eval", "RUN", "--seed", "-4"], "--seed"),
    (["fidelity", "RUN", "--block", "0", "--out", "OUT", "--batch-size", "0"], "--batch-size"),
    (["demo", "--out", "OUT", "--steps", "0"], "--steps"),
])
def test_bad_numbers_are_refused_before_any_work(argv, flag, tmp_path, capsys):
    argv = [str(tmp_path / a) if a in ("RUN", "OUT") else a for a in argv]
    assert main([*argv, "--quiet"]) == 1
    assert flag in one_line_error(capsys)
    assert not any(tmp_path.iterdir())  # demo --steps 0: refused before the harvest


def test_train_resume_without_a_run_and_an_oversized_batch_are_refused(caches, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--activations", str(caches[0]), "--out", str(run), "--resume",
                 "--quiet"]) == 1
    assert "holds no training run to continue" in one_line_error(capsys)
    assert main(["train", "--activations", str(caches[0]), "--out", str(run), "--batch-size",
                 "100000", "--quiet"]) == 1
    assert "larger than the 600 tokens" in one_line_error(capsys)
    assert not run.exists()


@pytest.mark.parametrize("name, document, where", [
    ("eval/eval.json", [1, 2], "eval.json is not a crossint eval results file"),
    ("eval/eval.json", {"fvu": 3}, "eval.json: not in the shape crossint writes"),
    ("clusters/features.json", {"features": [{"no_id": 1}]},
     "features.json"),
])
def test_report_names_a_result_file_of_the_wrong_shape(name, document, where, tmp_path, capsys):
    run = tmp_path / "run"
    (run / name).parent.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"format": "crossint.crosscoder"}))
    (run / name).write_text(json.dumps(document))
    assert main(["report", str(run)]) == 1
    assert where in one_line_error(capsys)


# --- 7. encoders without a language-model head -------------------------------------------------
def test_an_encoder_without_lm_head_loads_bare_and_evaluates_without_ce(tiny_text_file, tmp_path,
                                                                        capsys):
    from transformers import BertConfig, BertModel

    from crossint.models.adapter import load_model

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    adapter = load_model(tmp_path / "bert")
    assert type(adapter.model).__name__ == "BertModel"  # no randomly initialised MLM head
    cache = harvest(adapter, tmp_path / "cache", "resid", n_tokens=300,
                    corpus=str(tiny_text_file), context_length=32, progress=False)
    cc, tc = configs(cache.hookpoints, 16, [cache.model], batch_size=64)
    train(cc, tc, cache, tmp_path / "run", progress=False)
    assert main(["eval", str(tmp_path / "run"), "--tokens", "60", "--quiet"]) == 0
    assert "CE recovered: not applicable" in capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert set(result["fvu"]) == set(cache.hookpoints) and result["l0"] > 0
    assert result["ce_recovered"] is None and "encoder" in result["ce_not_applicable"]


# --- 8. non-finite input is named as such ------------------------------------------------------
def test_nan_in_the_input_is_reported_as_input_not_as_divergence(tmp_path):
    data = acts()
    data[100, 1, 3] = float("nan")
    with pytest.raises(CrossintError, match="first at token 100, hookpoint blocks.1.resid_pre"):
        TensorActivations(data, HOOKS)

    class PoisonedSource:  # a source of the Python API with NaN in its fourth batch
        hookpoints, dims, n_tokens = HOOKS, dict.fromkeys(HOOKS, D), 512

        def batches(self, batch_size, seed, start_batch=0):
            for index in range(start_batch, 10**9):
                batch = acts(batch_size, seed=index)
                if index == 3:
                    batch[5, 0, 0] = float("inf")
                yield batch

        def sample(self, n_tokens, seed):
            return acts(n_tokens)

    with pytest.raises(CrossintError, match=r"non-finite values .*batch 3 .*blocks.0.resid_pre") \
            as caught:
        train(*configs(), PoisonedSource(), tmp_path / "run", progress=False)
    assert "learning rate" not in str(caught.value)

    class PoisonedSample(PoisonedSource):  # the normalisation sample is read first
        def sample(self, n_tokens, seed):
            sample = acts(n_tokens)
            sample[7, 1, 2] = float("nan")
            return sample

    with pytest.raises(CrossintError, match=r"non-finite values .*normalisation sample.*first at "
                                            r"token 7, at tiny/blocks.1.resid_pre"):
        train(*configs(), PoisonedSample(), tmp_path / "run2", progress=False)


# --- 9. dev.sh installs into a virtual environment ---------------------------------------------
FAKE_PYTHON = """#!/bin/sh
echo "$0 $*" >> "$FAKE_LOG"
case "$1 $2" in
    "-m venv") [ -n "$FAKE_NO_VENV" ] && exit 1
               for last; do :; done; mkdir -p "$last/bin"; cp "$0" "$last/bin/python"; exit 0 ;;
    "-c import torch") exit 1 ;;
esac
case "$*" in
    *base_prefix*) [ -n "$FAKE_IN_ENV" ] && exit 0; exit 1 ;;
esac
exit 0
"""


def run_dev_sh(tmp_path: Path, **env: str) -> tuple[int, list[str], str]:
    """``bash dev.sh setup`` in a copy of the project, with a fake python3 first on PATH."""
    project, bin_dir = tmp_path / "project", tmp_path / "bin"
    project.mkdir()
    bin_dir.mkdir()
    shutil.copy(ROOT / "dev.sh", project / "dev.sh")
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV",
                                                                     "CONDA_DEFAULT_ENV")}
    environment.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log),
                       **env)
    done = subprocess.run(["bash", "dev.sh", "setup"], cwd=project, env=environment,
                          capture_output=True, text=True, timeout=60)
    return done.returncode, log.read_text().splitlines(), done.stderr


def called(calls: list[str], command: str) -> bool:
    return any(call.endswith(command) for call in calls)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dev_sh_installs_into_a_project_venv_outside_a_virtual_environment(tmp_path):
    code, calls, _ = run_dev_sh(tmp_path)
    assert code == 0
    assert called(calls, "bin/python3 -m venv --clear --system-site-packages .venv")
    assert called(calls, ".venv/bin/python -m pip install --quiet torch==2.13.0")
    assert called(calls, ".venv/bin/python -m pip install --quiet "
                         "--disable-pip-version-check -e .[test]")
    assert not any("python3 -m pip" in call for call in calls)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dev_sh_uses_the_active_environment_and_says_how_to_fix_a_missing_venv(tmp_path):
    tmp_path.joinpath("in").mkdir()
    code, calls, _ = run_dev_sh(tmp_path / "in", FAKE_IN_ENV="1")
    assert code == 0 and not any("-m venv" in call for call in calls)
    assert called(calls, "bin/python3 -m pip install --quiet --disable-pip-version-check "
                         "-e .[test]")
    tmp_path.joinpath("no_venv").mkdir()
    code, calls, err = run_dev_sh(tmp_path / "no_venv", FAKE_NO_VENV="1")
    assert code == 1 and "apt-get install python3-venv" in err
    assert not any("pip install" in call for call in calls)


def test_the_project_venv_is_not_committed():
    assert ".venv/" in (ROOT / ".gitignore").read_text().splitlines()
