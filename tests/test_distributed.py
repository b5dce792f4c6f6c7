"""Data-parallel training (crossint.crosscoder.distributed): two processes with the gloo backend
on the CPU train the crosscoder one process trains at the same global batch (up to float
rounding), resume exactly, refuse a resume with another world size, and stop with a clear message
when a rank dies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import Interrupt, interrupt_at
from crossint.cli import main
from crossint.crosscoder.checkpoint import load_checkpoint
from crossint.crosscoder.model import Crosscoder
from crossint.crosscoder.train import train
from crossint.data.cache import TensorActivations
from crossint.errors import CrossintError
from crossint.rundir import RunDir
from test_train import HOOKS, cc_config, synthetic_acts, tc_config

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo")

# AuxK engages (a feature is dead after one batch without firing) and the batch splits 64 + 64.
CC = {"dead_tokens": 128}
TC = {"batch_size": 128}
WEIGHT_TOLERANCE = 1e-5  # float32 rounding of gradients summed in two halves, over 20 Adam steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def source() -> TensorActivations:
    return TensorActivations(synthetic_acts(4096), HOOKS)


def join_as_rank(rank: int, port: int) -> None:
    """What torchrun does for a worker: the environment, then (here) the process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)


def train_two_ways(rank: int, port: int, root: Path) -> None:
    """Rank ``rank`` of: a whole run, and a run interrupted after 7 steps then resumed."""
    join_as_rank(rank, port)
    train(cc_config(**CC), tc_config(**TC), source(), root / "two", progress=False)
    try:
        train(cc_config(**CC), tc_config(**TC), source(), root / "cut", progress=False,
              extra_losses=[interrupt_at(7)])
    except Interrupt:
        pass
    train(cc_config(**CC), tc_config(**TC), source(), root / "cut", resume=True, progress=False)
    torch.distributed.destroy_process_group()


def rank_one_dies(rank: int, port: int, root: Path) -> None:
    """Rank 1 exits abruptly at step 8 (after the checkpoint of step 5); rank 0 records what it
    raised."""

    def die(crosscoder, acts_BXD, output):
        die.calls += 1
        if rank == 1 and die.calls == 8:
            os._exit(3)
        return {}

    die.calls = 0
    join_as_rank(rank, port)
    try:
        train(cc_config(**CC), tc_config(**TC), source(), root / "run", progress=False,
              extra_losses=[die])
    except CrossintError as e:
        (root / f"rank{rank}.error").write_text(str(e))


def streamed_run(model: str, corpus: str, out: Path) -> int:
    """Train on a stream of the tiny model (a buffer as large as the run); the number of
    forward passes this process ran."""
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.train import TrainConfig
    from crossint.data.stream import StreamingActivations

    source = StreamingActivations(model, 1280, "paper", corpus=corpus, context_length=32,
                                  batch_size=8, buffer_tokens=1280)
    launch, launches = source._capture.launch, []
    source._capture.launch = lambda *args: launches.append(1) or launch(*args)
    config = CrosscoderConfig(hookpoints=source.hookpoints, models=[source.model], d_model=32,
                              n_features=64, k=4)
    train(config, TrainConfig(steps=20, batch_size=64, log_every=5), source, out,
          progress=False)
    return len(launches)


def stream_two(rank: int, port: int, root: Path) -> None:
    join_as_rank(rank, port)
    paths = json.loads((root / "paths.json").read_text())
    launches = streamed_run(paths["model"], paths["corpus"], root / "stream_two")
    (root / f"launches{rank}").write_text(str(launches))
    torch.distributed.destroy_process_group()


def sharded_config(cache_path: Path):
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.data.cache import ActivationCache

    cache = ActivationCache(cache_path)
    return cache, CrosscoderConfig(hookpoints=cache.hookpoints, models=[cache.model],
                                   d_model=32, n_features=64, k=4, dead_tokens=128)


def train_on_own_shards(rank: int, port: int, root: Path) -> None:
    """Rank ``rank`` of a whole run and of an interrupted then resumed run on root/node{rank}:
    the 8-shard cache's manifest with only this rank's part of the shards (as on a node of a
    multi-node run), recording which shards this process read."""
    from crossint.data.cache import ActivationCache

    read, original = set(), ActivationCache._raw_shard
    ActivationCache._raw_shard = lambda self, i: read.add(i) or original(self, i)
    join_as_rank(rank, port)
    cache, config = sharded_config(root / f"node{rank}")
    train(config, tc_config(**TC), cache, root / "parts_two", progress=False)
    try:
        train(config, tc_config(**TC), cache, root / "parts_cut", progress=False,
              extra_losses=[interrupt_at(7)])
    except Interrupt:
        pass
    train(config, tc_config(**TC), cache, root / "parts_cut", resume=True, progress=False)
    (root / f"read{rank}").write_text(json.dumps(sorted(read)))
    torch.distributed.destroy_process_group()


# The kinds whose value is a ratio of two sums over the batch.
NORMALISED_PENALTIES = (("dominance", {"normalise": "total"}),
                        ("keep_error", {"normalise": "effect"}),
                        ("additivity", {"normalise": "effect"}))


def train_normalised_penalties(rank: int, port: int, root: Path) -> None:
    join_as_rank(rank, port)
    for kind, options in NORMALISED_PENALTIES:
        penalised_run(root, kind, options, root / f"{kind}_two")
    torch.distributed.destroy_process_group()


def penalised_run(root: Path, kind: str, options: dict, out: Path, **train_changes) -> None:
    from crossint.interactions.penalty import make_penalty, train_with_penalty

    cache, config = sharded_config(root / "cache")
    train_with_penalty(config, tc_config(**TC, **train_changes), cache, out,
                       make_penalty(kind, weight=30.0, **options), progress=False)


def spawn_two(function, root: Path) -> list[int | None]:
    """Run ``function(rank, port, root)`` in two fresh processes; their exit codes."""
    context, port = mp.get_context("spawn"), free_port()
    processes = [context.Process(target=function, args=(rank, port, root)) for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    return [process.exitcode for process in processes]


def tensors(run: Path) -> dict[str, torch.Tensor]:
    return Crosscoder.from_pretrained(run).state_dict()


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_what_one_does_and_resume_exactly(tmp_path, capsys):
    assert spawn_two(train_two_ways, tmp_path) == [0, 0]
    one = tmp_path / "one"
    train(cc_config(**CC), tc_config(**TC), source(), one, progress=False)
    assert_close(tensors(tmp_path / "two"), tensors(one), WEIGHT_TOLERANCE)
    two_rows, one_rows = metrics(tmp_path / "two"), metrics(one)
    assert max(row["aux_loss"] for row in one_rows) > 0  # AuxK took part
    for two_row, one_row in zip(two_rows, one_rows, strict=True):
        for key in ("loss", "rec_loss", "aux_loss", "l0", "dead_fraction", "threshold"):
            assert two_row[key] == pytest.approx(one_row[key], rel=1e-4, abs=1e-6), key
    # A resumed data-parallel run ends exactly where the uninterrupted one did.
    cut = tensors(tmp_path / "cut")
    assert all(torch.equal(cut[name], value) for name, value in tensors(tmp_path / "two").items())
    assert load_checkpoint(RunDir(tmp_path / "two").checkpoint)["world_size"] == 2
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    with pytest.raises(CrossintError, match=r"trained by 2 data-parallel process\(es\), but 1 "
                                            r"are running now.*--nproc-per-node 2") as refused:
        train(cc_config(**CC), tc_config(**TC), source(), tmp_path / "two", resume=True,
              progress=False)
    assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_two_processes_share_a_streams_forward_passes(tiny_model_dir, tiny_text_file, tmp_path):
    """Streaming under torchrun: each rank runs the model on every other forward-pass batch and
    the ranks exchange the rows, so they train as one process does, on half the passes each."""
    (tmp_path / "paths.json").write_text(json.dumps(
        {"model": str(tiny_model_dir), "corpus": str(tiny_text_file)}))
    assert spawn_two(stream_two, tmp_path) == [0, 0]
    alone = streamed_run(str(tiny_model_dir), str(tiny_text_file), tmp_path / "stream_one")
    assert_close(tensors(tmp_path / "stream_two"), tensors(tmp_path / "stream_one"),
                 WEIGHT_TOLERANCE)
    shares = [int((tmp_path / f"launches{rank}").read_text()) for rank in (0, 1)]
    # (one process also runs one batch ahead at the end of each read: 14 passes, 6 + 6 here)
    assert max(shares) <= alone // 2 + 1


@pytest.mark.slow
def test_each_rank_reads_only_its_own_shards(sharded_cache, tmp_path):
    """A cache of 8 shards under 2 processes: rank r reads only part r of the shards (its
    batches and its share of the initialisation sample) and needs no other shard file, and the
    pair trains what one process reading the cache in 2 parts trains, resuming exactly."""
    import shutil

    shutil.copytree(sharded_cache, tmp_path / "cache")
    cache, config = sharded_config(tmp_path / "cache")
    dealt = cache.shard_parts(2, seed=0)
    for rank, own in enumerate(dealt):
        node = shutil.copytree(sharded_cache, tmp_path / f"node{rank}")
        for index, entry in enumerate(cache.manifest["shards"]):
            if index not in own:
                (node / entry["file"]).unlink()
    assert spawn_two(train_on_own_shards, tmp_path) == [0, 0]
    assert [json.loads((tmp_path / f"read{r}").read_text()) for r in (0, 1)] == dealt
    assert json.loads((tmp_path / "parts_two" / "config.json").read_text())["data_parts"] == 2
    train(config, tc_config(**TC, data_parts=2), cache, tmp_path / "one", progress=False)
    assert_close(tensors(tmp_path / "parts_two"), tensors(tmp_path / "one"), WEIGHT_TOLERANCE)
    cut = tensors(tmp_path / "parts_cut")
    assert all(torch.equal(cut[name], value)
               for name, value in tensors(tmp_path / "parts_two").items())
    whole = tmp_path / "whole"  # reading the cache whole is another data order
    train(config, tc_config(**TC), cache, whole, progress=False)
    assert not torch.allclose(tensors(whole)["W_dec_HXD"], tensors(tmp_path / "one")["W_dec_HXD"])
    with pytest.raises(CrossintError, match=r"read its cache in 2 part\(s\), but 1 now; "
                                            r"resume it with --data-parts 2"):
        train(config, tc_config(**TC), cache, tmp_path / "one", resume=True, progress=False)


@pytest.mark.slow
def test_normalised_penalties_are_the_global_batchs_ratio(sharded_cache, tmp_path):
    """``total`` and ``effect`` divide two sums over the batch: each rank's term is built so
    that the ranks' mean has the global batch's value and gradient, so 2 processes train what
    one does (a mean of the two halves' ratios would not)."""
    import shutil

    shutil.copytree(sharded_cache, tmp_path / "cache")
    assert spawn_two(train_normalised_penalties, tmp_path) == [0, 0]
    for kind, options in NORMALISED_PENALTIES:
        one = tmp_path / f"{kind}_one"
        penalised_run(tmp_path, kind, options, one, data_parts=2)
        # A mean of the halves' ratios misses by 0.4 on W_enc and by 3e-4 (dominance) and 2e-2
        # (keep_error) on the first logged value; what is left here is rounding, which Adam
        # turns into steps of up to lr = 1e-3 on coordinates whose gradient is near zero.
        assert_close(tensors(tmp_path / f"{kind}_two"), tensors(one), 5e-3)
        rows = list(zip(metrics(tmp_path / f"{kind}_two"), metrics(one), strict=True))
        for index, (two_row, one_row) in enumerate(rows):
            for key in ("interaction", "interaction_penalty"):
                assert two_row[key] == pytest.approx(one_row[key], rel=1e-3 if index else 1e-5)


def test_how_many_parts_a_run_reads(sharded_cache):
    from crossint.crosscoder.distributed import (
        SINGLE_PROCESS,
        RankReader,
        Ranks,
        resolve_data_parts,
    )
    from crossint.data.cache import ActivationCache

    cache = ActivationCache(sharded_cache)  # 8 shards of 128 tokens

    def parts(requested, world_size, data=cache):
        return resolve_data_parts(requested, data, Ranks(0, world_size), seed=0)

    assert parts(None, 1) == 1
    assert parts(None, 8) == 8 and parts(None, 4) == 4  # one even part per process
    assert parts(None, 2, source()) == 1  # not made of shards: read whole
    assert parts(4, 1) == 4
    for world_size, why in ((16, r"its 8 shard\(s\) are fewer than the 16 processes"),
                            (3, "its shards deal into uneven parts of 256 to 384 tokens")):
        with pytest.warns(UserWarning, match=f"every process reads the whole cache: {why} "
                                             r"\(harvest equal shards, .* --data-parts"):
            assert parts(None, world_size) == 1
    for requested, data, world_size, match in (
        (2, source(), 1, "only an activation cache is made of shards to deal into parts, not "
                         "TensorActivations; use --data-parts 1"),
        (4, cache, 2, "--data-parts 4 with 2 processes: use 2 .* or 1"),
        (9, cache, 1, r"the cache has only 8 shard\(s\)"),
    ):
        with pytest.raises(CrossintError, match=match):
            parts(requested, world_size, data)
    with pytest.warns(UserWarning, match="parts hold 128 to 256 tokens: the smallest part's "
                                         "tokens are trained on 2.00 times as often"):
        RankReader(cache, 5).check(640, seed=0)  # asked for: dealt anyway, with a warning
    with pytest.raises(CrossintError, match="gives 321 tokens to a batch of 1284, but the "
                                            "smallest part holds 256"):
        RankReader(cache, 4).check(1280 + 4, seed=0)
    cache.missing = set(cache.shard_parts(2, seed=0)[1])  # a node holding only rank 0's part
    RankReader(cache, 2, Ranks(0, 2)).check(128, seed=0)
    for ranks in (Ranks(1, 2), SINGLE_PROCESS):
        with pytest.raises(CrossintError, match=r"lacks 4 shard file\(s\) listed in its "
                                                r"manifest and needed here: shard_"):
            RankReader(cache, 2 if ranks.world_size > 1 else 1, ranks).check(128, seed=0)


def test_the_command_line_shows_a_warning_in_one_line(sharded_cache, tmp_path, capsys):
    assert main(["train", "--activations", str(sharded_cache), "--features", "32", "--k", "4",
                 "--steps", "2", "--batch-size", "640", "--data-parts", "5", "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == ["crossint train: warning: the cache's 5 parts hold 128 to 256 tokens: "
                       "the smallest part's tokens are trained on 2.00 times as often as the "
                       "largest's (equal shards, as many as a multiple of the parts, even them "
                       "out)"]


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CrossintError, match="batch size 128 does not divide among the 3 "
                                            "data-parallel processes") as refused:
        train(cc_config(), tc_config(**TC), source(), tmp_path / "run", progress=False)
    assert "\n" not in str(refused.value) and not (tmp_path / "run").exists()


def test_when_a_rank_dies_the_others_stop_and_the_checkpoint_is_intact(tmp_path):
    assert spawn_two(rank_one_dies, tmp_path) == [0, 3]
    message = (tmp_path / "rank0.error").read_text()
    assert "rank 0 of 2 lost contact with the other training processes" in message
    assert "is intact: resume with --resume" in message and "\n" not in message
    assert load_checkpoint(RunDir(tmp_path / "run").checkpoint)["step"] == 5


@pytest.mark.slow
def test_torchrun_cli_with_a_penalty_matches_one_process(sharded_cache, tmp_path):
    """Each rank reads its own 4 of the 8 shards; one process reads them in the same 2 parts."""
    settings = ["--activations", str(sharded_cache), "--features", "48", "--k", "4",
                "--steps", "12", "--batch-size", "64", "--log-every", "4",
                "--interaction-penalty", "3", "--dead-tokens", "256", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(free_port()), "-m", "crossint", "train", *settings,
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300)
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.count("trained 48-feature batchtopk crosscoder") == 1  # rank 0 only
    assert main(["train", *settings, "--data-parts", "2", "--out", str(tmp_path / "one")]) == 0
    assert_close(tensors(tmp_path / "two"), tensors(tmp_path / "one"), WEIGHT_TOLERANCE)
    assert metrics(tmp_path / "two")[-1]["interaction"] == pytest.approx(
        metrics(tmp_path / "one")[-1]["interaction"], rel=1e-4)


@pytest.fixture(scope="module")
def sharded_cache(tiny_model_dir, tiny_text_file, tmp_path_factory) -> Path:
    from crossint.data.harvest import harvest

    return harvest(str(tiny_model_dir), tmp_path_factory.mktemp("parts") / "cache", "paper",
                   n_tokens=1024, corpus=str(tiny_text_file), context_length=32, batch_size=8,
                   shard_tokens=128, progress=False).path
