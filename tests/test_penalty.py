"""Penalties as library objects (crossint.interactions.penalty): kinds, records of every
version, the training plug-in, resume, and the CLI's view of the registry."""

from __future__ import annotations

import json

import pytest
import torch

from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.train import TrainConfig, train
from crossint.data.cache import TensorActivations
from crossint.errors import CrossintError
from crossint.interactions.penalty import (
    CONFIG_KEY,
    PENALTY_KINDS,
    DominancePenalty,
    make_penalty,
    penalty_from_record,
    run_penalty,
    same_penalty,
    train_with_penalty,
)
from crossint.rundir import RunDir


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny GPT-2's paper-layout activations in memory and its MLP weights."""
    from crossint.models.adapter import load_model

    adapter = load_model(str(tiny_model_dir))
    hookpoints = adapter.resolve_layout("paper")
    ids_BS = torch.randint(0, adapter.vocab_size, (12, 32),
                           generator=torch.Generator().manual_seed(0))
    captured = adapter.capture(ids_BS, hookpoints)
    acts_TXD = torch.stack([captured[h].reshape(-1, adapter.d_model) for h in hookpoints], dim=1)
    mlps = {block: adapter.mlp_weights(block) for block in range(adapter.n_blocks)}
    config = CrosscoderConfig(hookpoints=hookpoints, models=["tiny"], d_model=adapter.d_model,
                              n_features=48, k=4)
    return TensorActivations(acts_TXD, hookpoints), mlps, config


def settings(steps: int = 20) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=64, lr=3e-3, checkpoint_every=5, log_every=5,
                       normalisation_tokens=384)


def test_kinds_options_and_errors():
    penalty = make_penalty("dominance", 3.0, normalise="neuron")
    assert penalty == DominancePenalty(3.0, normalise="neuron")
    assert penalty.options() == {"sample": 1.0, "weighting": "uniform", "normalise": "neuron"}
    with pytest.raises(CrossintError, match="unknown penalty kind 'curly'.*dominance"):
        make_penalty("curly", 1.0)
    with pytest.raises(CrossintError, match="no option sharpness.*sample, weighting, normalise"):
        make_penalty("dominance", 1.0, sharpness=2)
    for weight in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(CrossintError, match="--interaction-penalty"):
            DominancePenalty(weight)
    with pytest.raises(CrossintError, match="weighting"):
        DominancePenalty(1.0, weighting="l2")
    assert make_penalty("additivity", 2.0, normalise="effect").options() == {
        "sample": 1.0, "normalise": "effect"}
    for sample in (0.0, 1.5, float("nan"), True):
        with pytest.raises(CrossintError, match="--penalty-sample"):
            make_penalty("additivity", 1.0, sample=sample)
    assert make_penalty("dominance", 1.0, sample=0.25).sampled_tokens(10) == 3
    assert make_penalty("keep_error", 2.0).describe() == "keep_error λ=2 (normalise=none)"
    with pytest.raises(CrossintError, match="no option weighting"):
        make_penalty("keep_error", 1.0, weighting="w_out")
    with pytest.raises(CrossintError, match="none, effect"):
        make_penalty("additivity", 1.0, normalise="total")


def test_records_of_every_version_read_back():
    penalty = DominancePenalty(100.0, normalise="total")
    record = penalty.record([0, 1])
    assert record == {"kind": "dominance", "lambda": 100.0, "sample": 1.0, "weighting": "uniform",
                      "normalise": "total", "blocks": [0, 1]}
    assert penalty_from_record(record) == penalty
    # before kinds existed: no "kind"; before the per-neuron normalisation: a bool
    old = {"lambda": 100.0, "weighting": "uniform", "normalise": True, "blocks": [0, 1]}
    assert penalty_from_record(old) == penalty and same_penalty(old, penalty)
    assert penalty_from_record(None) == DominancePenalty(0.0)
    assert not same_penalty({"kind": "curly"}, penalty)


def test_cli_help_names_every_registered_kind():
    from crossint.commands.train import PENALTY_KINDS_HELP, PENALTY_OPTION_FLAGS

    for kind in PENALTY_KINDS:
        assert kind in PENALTY_KINDS_HELP
    options = {name for cls in PENALTY_KINDS.values() for name in cls.option_names()}
    assert options == set(PENALTY_OPTION_FLAGS)


def test_train_with_penalty_records_logs_and_resumes_exactly(tiny, tmp_path):
    source, mlps, config = tiny
    penalty = DominancePenalty(5.0, normalise="total")
    whole = train_with_penalty(config, settings(), source, tmp_path / "whole", penalty,
                               mlps=mlps, progress=False)
    run = RunDir(tmp_path / "whole")
    assert run.read_config()[CONFIG_KEY] == penalty.record([0, 1])
    assert run_penalty(run.path) == penalty
    last = run.last_metrics()
    assert last["interaction"] == pytest.approx(5.0 * last["interaction_penalty"], rel=1e-5)
    assert 0 < last["dominant_share"] <= 1

    # Interrupt the same run at step 12 (after the checkpoint at 10), then resume it.
    def stop_at_12(crosscoder, acts_BXD, output, calls=[0]):  # noqa: B006
        if calls[0] == 12:
            raise Interrupt
        calls[0] += 1
        return {}

    from crossint.interactions.penalty import penalty_loss

    with pytest.raises(Interrupt):
        train(config, settings(), source, tmp_path / "cut", progress=False,
              extra_losses=[penalty_loss(penalty, mlps), stop_at_12],
              extra_config={CONFIG_KEY: penalty.record([0, 1])})
    resumed = train_with_penalty(config, settings(), source, tmp_path / "cut", penalty,
                                 resume=True, mlps=mlps, progress=False)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_resume_keeps_an_older_record_of_the_same_penalty(tiny, tmp_path):
    source, mlps, config = tiny
    old = {"lambda": 2.0, "weighting": "uniform", "normalise": True, "blocks": [0, 1]}
    from crossint.interactions.penalty import penalty_loss

    penalty = DominancePenalty(2.0, normalise="total")

    def stop_at_7(crosscoder, acts_BXD, output, calls=[0]):  # noqa: B006
        if calls[0] == 7:
            raise Interrupt
        calls[0] += 1
        return {}

    with pytest.raises(Interrupt):
        train(config, settings(10), source, tmp_path / "old", progress=False,
              extra_losses=[penalty_loss(penalty, mlps), stop_at_7],
              extra_config={CONFIG_KEY: old})
    train_with_penalty(config, settings(10), source, tmp_path / "old", penalty, resume=True,
                       mlps=mlps, progress=False)
    document = json.loads((tmp_path / "old" / "config.json").read_text())
    assert document["status"] == "finished" and document[CONFIG_KEY] == old
    with pytest.raises(CrossintError, match="cannot resume"):
        train_with_penalty(config, settings(10), source, tmp_path / "old",
                           DominancePenalty(3.0), resume=True, mlps=mlps, progress=False)


def test_penalty_needs_mlp_weights_or_a_named_model(tiny, tmp_path):
    source, _, config = tiny
    with pytest.raises(CrossintError, match="do not name their model"):
        train_with_penalty(config, settings(), source, tmp_path / "r", DominancePenalty(1.0),
                           progress=False)
    assert not (tmp_path / "r").exists()


def test_the_cli_builds_every_kind_from_its_flags():
    import argparse

    from crossint.commands.train import add_penalty_arguments, penalty_from_args

    parser = argparse.ArgumentParser()
    add_penalty_arguments(parser)

    def penalty(*flags: str):
        return penalty_from_args(parser.parse_args(list(flags)))

    assert penalty() == DominancePenalty(0.0)
    assert penalty("--interaction-penalty", "3", "--penalty-kind", "additivity",
                   "--penalty-normalise", "effect") == make_penalty("additivity", 3.0,
                                                                    normalise="effect")
    recorded = make_penalty("keep_error", 2.0, normalise="effect")
    assert penalty_from_args(parser.parse_args([]), recorded=recorded) == recorded
    with pytest.raises(CrossintError, match="no option weighting"):
        penalty("--penalty-kind", "keep_error", "--penalty-weighting", "w_out")
    with pytest.raises(CrossintError, match="unknown penalty kind"):
        penalty("--penalty-kind", "curvature")


def test_the_logged_share_is_the_analysis_share(tiny):
    from crossint.crosscoder.model import Crosscoder
    from crossint.interactions import MLPInteractionMeter, active_features, feature_blocks
    from crossint.interactions.penalty import batch_dominant_share

    source, mlps, config = tiny
    crosscoder = Crosscoder(config, seed=1).eval()
    with torch.no_grad():
        f_BH = crosscoder.encode(source.acts_TXD[:200])
        blocks = feature_blocks(crosscoder, mlps)
        meter = MLPInteractionMeter(blocks)
        meter.update(f_BH)
        logged = batch_dominant_share(active_features(f_BH).by_count(), blocks)
    assert logged == pytest.approx(meter.result()["dominant_share"], rel=1e-5)


def test_a_sampled_penalty_is_the_penalty_of_the_batch_s_first_tokens(tiny):
    from crossint.crosscoder.model import Crosscoder
    from crossint.interactions.contributions import active_features, feature_blocks
    from crossint.interactions.penalty import penalty_loss

    source, mlps, config = tiny
    crosscoder = Crosscoder(config, seed=0)
    acts_BXD = source.acts_TXD[:40]
    output = crosscoder(acts_BXD)
    penalty = make_penalty("additivity", 3.0, sample=0.25)
    loss = penalty_loss(penalty, mlps)(crosscoder, acts_BXD, output)["interaction"]
    blocks = feature_blocks(crosscoder, mlps)
    expected = 3.0 * make_penalty("additivity", 1.0).value(active_features(output.f_BH[:10]),
                                                           blocks)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    f_BH = output.f_BH
    f_BH.retain_grad()
    loss.backward()
    assert f_BH.grad[10:].abs().sum() == 0 and f_BH.grad[:10].abs().sum() > 0


@pytest.mark.parametrize("kind", PENALTY_KINDS)
def test_every_penalty_kind_trains_under_bfloat16_autocast(tiny, tmp_path, kind):
    """The penalty kernels run in float32 outside autocast, on the pass's float32 copies."""
    source, mlps, config = tiny
    penalty = make_penalty(kind, 1.0)
    base = settings(6)
    mixed = TrainConfig(**{**base.to_dict(), "autocast": "bfloat16"})
    train_with_penalty(config, mixed, source, tmp_path / kind, penalty, mlps=mlps,
                       progress=False)
    last = RunDir(tmp_path / kind).last_metrics()
    assert last["interaction_penalty"] > 0 and torch.isfinite(torch.tensor(last["loss"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", PENALTY_KINDS)
def test_every_penalty_kind_trains_on_cuda(tiny, tmp_path, kind):
    """The torch path of the penalty kernels (numba serves the CPU)."""
    source, mlps, config = tiny
    cuda = TrainConfig(**{**settings(6).to_dict(), "device": "cuda"})
    train_with_penalty(config, cuda, source, tmp_path / kind, make_penalty(kind, 1.0),
                       mlps=mlps, progress=False)
    last = RunDir(tmp_path / kind).last_metrics()
    assert last["interaction_penalty"] > 0 and torch.isfinite(torch.tensor(last["loss"]))
