"""Two models' caches of the same tokens as one two-model source (SPEC §9.3 groundwork)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_gpt2
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.train import TrainConfig, train
from crossint.data.cache import ActivationCache
from crossint.data.harvest import harvest
from crossint.data.paired import PairedActivations
from crossint.errors import CrossintError
from crossint.models.adapter import load_model


@pytest.fixture(scope="module")
def caches(tiny_model_dir, tiny_text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("paired")
    other = build_tiny_gpt2(root / "other_model", seed=5)
    settings = {"corpus": str(tiny_text_file), "context_length": 32, "batch_size": 4,
                "shard_tokens": 300, "progress": False}
    made = {}
    for name, model, seed in (("base", tiny_model_dir, 0), ("tuned", other, 0),
                              ("other_text", other, 1)):
        made[name] = harvest(load_model(str(model)), root / name, "resid", 900, seed=seed,
                             **settings)
    return made


def test_batches_stack_the_same_tokens_model_major(caches):
    paired = PairedActivations(caches["base"], caches["tuned"])
    assert paired.models == [caches["base"].model, caches["tuned"].model]
    P = len(paired.hookpoints)
    got = next(paired.batches(64, seed=3, start_batch=2))
    a = next(caches["base"].batches(64, seed=3, start_batch=2))
    b = next(caches["tuned"].batches(64, seed=3, start_batch=2))
    assert got.shape == (64, 2 * P, a.shape[2])
    torch.testing.assert_close(got[:, :P], a)
    torch.testing.assert_close(got[:, P:], b)
    sample = paired.sample(100, seed=1)
    torch.testing.assert_close(sample[:, :P], caches["base"].sample(100, seed=1))
    # In parts (each data-parallel rank its own shards) both caches deal their shards alike.
    assert paired.n_shards == 3 and paired.part_tokens(2, seed=3) == \
        caches["base"].part_tokens(2, seed=3)
    got = next(paired.batches(64, seed=3, start_batch=2, parts=2, part=1))
    a = next(caches["base"].batches(64, seed=3, start_batch=2, parts=2, part=1))
    b = next(caches["tuned"].batches(64, seed=3, start_batch=2, parts=2, part=1))
    assert got.shape == (32, 2 * P, a.shape[2])
    torch.testing.assert_close(got, torch.cat([a, b], dim=1))
    torch.testing.assert_close(paired.sample(100, seed=1, parts=2, part=0)[:, P:],
                               caches["tuned"].sample(100, seed=1, parts=2, part=0))


def test_a_two_model_crosscoder_trains_on_it(caches, tmp_path):
    paired = PairedActivations(caches["base"], caches["tuned"])
    config = CrosscoderConfig(hookpoints=paired.hookpoints, models=paired.models,
                              d_model=paired.dims[paired.hookpoints[0]], n_features=32, k=4)
    crosscoder = train(config, TrainConfig(steps=10, batch_size=64, checkpoint_every=5,
                                           log_every=5, normalisation_tokens=512),
                       paired, tmp_path / "run", progress=False)
    assert crosscoder.config.n_positions == 2 * len(paired.hookpoints)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["status"] == "finished"


def test_mismatched_caches_are_refused(caches, tmp_path):
    with pytest.raises(CrossintError, match="different tokens in shard 0"):
        PairedActivations(caches["base"], caches["other_text"])
    with pytest.raises(CrossintError, match="same model"):
        PairedActivations(caches["base"], caches["base"])
    # A cache from before the fingerprint existed.
    old = tmp_path / "old"
    old.mkdir()
    for f in caches["tuned"].path.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((old / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["tokens_sha256"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CrossintError, match="no token fingerprint"):
        PairedActivations(caches["base"], ActivationCache(old))
