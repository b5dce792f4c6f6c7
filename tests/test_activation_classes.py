"""The activation classes and their registry (crosscoder/activations.py): every registered class
round-trips through the config and the saved files, unknown names list the registry, and a new
activation registered here trains end to end with nothing else changed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from crossint.crosscoder.activations import (
    ACTIVATIONS,
    Activation,
    BatchTopK,
    JumpReLU,
    ReLU,
    TopK,
    make_activation,
    relu,
)
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.model import Crosscoder
from crossint.crosscoder.train import TrainConfig, train
from crossint.data.cache import TensorActivations
from crossint.errors import CrossintError
from crossint.rundir import RunDir

HOOKS = ["blocks.0.resid_pre", "blocks.1.resid_pre"]
D, H = 8, 32


def config(activation: str, **changes) -> CrosscoderConfig:
    return CrosscoderConfig(hookpoints=HOOKS, models=["m"], d_model=D, n_features=H,
                            activation=activation, k=3, **changes)


def test_registry_holds_the_four_activations_under_their_names():
    assert ACTIVATIONS == {"topk": TopK, "batchtopk": BatchTopK, "jumprelu": JumpReLU,
                           "relu": ReLU}
    for name, cls in ACTIVATIONS.items():
        assert issubclass(cls, Activation) and cls.name == name


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_every_registered_activation_round_trips_through_config_and_files(name, tmp_path):
    cfg = config(name)
    assert CrosscoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = Crosscoder(cfg, seed=1)
    assert type(model.activation) is ACTIVATIONS[name]
    with torch.no_grad():
        model.threshold_H.fill_(0.05)
    model.save_pretrained(tmp_path / name)
    saved = json.loads(RunDir(tmp_path / name).config.read_text())["crosscoder"]
    assert saved == model.activation.saved_config().to_dict()
    loaded = Crosscoder.from_pretrained(tmp_path / name)
    assert loaded.config == model.inference_config()
    assert type(loaded.activation) is ACTIVATIONS[saved["activation"]]
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    # A saved config saves as itself: loading and saving again changes nothing.
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads(RunDir(tmp_path / "again").config.read_text())["crosscoder"] == saved


def test_a_saved_batchtopk_runs_as_jumprelu():
    model = Crosscoder(config("batchtopk"))
    saved = model.inference_config()
    assert saved.activation == "jumprelu" and saved.trained_activation == "batchtopk"
    assert isinstance(make_activation(saved), JumpReLU)


def test_unknown_activation_names_list_the_registry(monkeypatch):
    with pytest.raises(CrossintError, match=r"activation='gelu'.*topk, batchtopk, jumprelu, relu"):
        config("gelu")
    with pytest.raises(CrossintError, match=r"trained_activation='gelu'.*topk, batchtopk"):
        config("jumprelu", trained_activation="gelu")
    with pytest.raises(CrossintError, match=r"activation=\['topk'\]"):
        config(["topk"])
    monkeypatch.setitem(ACTIVATIONS, "mine", ReLU)
    with pytest.raises(CrossintError, match=r"valid activations are .*relu, mine"):
        config("gelu")
    cfg = config("mine")  # validation reads the registry as it is now
    monkeypatch.delitem(ACTIVATIONS, "mine")
    with pytest.raises(CrossintError, match=r"unknown activation 'mine'.*topk, batchtopk"):
        make_activation(cfg)


def test_what_each_activation_owns():
    thresholds = {}
    for name in ACTIVATIONS:
        model = Crosscoder(config(name, jumprelu_init_threshold=0.02, l1_coefficient=0.5,
                                  l0_coefficient=0.25))
        thresholds[name] = model.threshold_H
        act = model.activation
        assert act.decodes_sparsely(training_with_grad=True) == (name in ("topk", "batchtopk"))
        assert act.decodes_sparsely(training_with_grad=False) == (name != "relu")
        assert act.calibration_level == (0.02 if name == "jumprelu" else 0.0)
        assert act.sparsity_coefficient == {"relu": 0.5, "jumprelu": 0.25}.get(name, 0.0)
    assert isinstance(thresholds["jumprelu"], nn.Parameter)
    assert torch.equal(thresholds["jumprelu"].detach(), torch.full((H,), 0.02))
    for name in ("topk", "batchtopk", "relu"):
        assert not isinstance(thresholds[name], nn.Parameter)
        assert torch.equal(thresholds[name], torch.zeros(H))


def test_after_step_updates():
    model = Crosscoder(config("batchtopk", threshold_momentum=0.75)).train()
    x = torch.randn(16, 2, D, generator=torch.Generator().manual_seed(0))
    out = model(x)
    with torch.no_grad():
        model.activation.after_step(model, out, 0)  # first step: the batch value as is
        assert torch.equal(model.threshold_H, out.batch_threshold.expand(H))
        model.threshold_H.fill_(1.0)
        model.activation.after_step(model, out, 1)
    torch.testing.assert_close(model.threshold_H, (0.75 + 0.25 * out.batch_threshold).expand(H))
    jump = Crosscoder(config("jumprelu"))
    with torch.no_grad():
        jump.threshold_H[:4] = -1.0
        jump.activation.after_step(jump, jump(x), 3)
    assert jump.threshold_H.min() == 0.0


class ShiftedReLU(Activation):
    """A new kind for the test: relu(pre − 0.05) with a sum-of-activations penalty."""

    name = "shiftedrelu"
    steps_seen: list[int] = []

    def forward(self, pre_BH: Tensor, threshold_H: Tensor, training: bool):
        return relu(pre_BH - 0.05), None

    @property
    def sparsity_coefficient(self) -> float:
        return self.config.l1_coefficient

    def sparsity_loss(self, crosscoder, out) -> Tensor:
        return out.f_BH.sum(dim=-1).mean()

    def after_step(self, crosscoder, out, step: int) -> None:
        ShiftedReLU.steps_seen.append(step)

    def decodes_sparsely(self, training_with_grad: bool) -> bool:
        return True

    def metrics(self, crosscoder, out) -> dict[str, float]:
        return {"active_mean": float(out.f_BH.mean())}


def test_a_new_registered_activation_trains_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setitem(ACTIVATIONS, ShiftedReLU.name, ShiftedReLU)
    monkeypatch.setattr(ShiftedReLU, "steps_seen", [])
    g = torch.Generator().manual_seed(0)
    source = TensorActivations(torch.randn(1024, 2, D, generator=g).relu(), HOOKS)
    cc = config("shiftedrelu", l1_coefficient=0.01)
    tc = TrainConfig(steps=12, batch_size=32, log_every=4, checkpoint_every=6,
                     normalisation_tokens=256)
    final = train(cc, tc, source, tmp_path / "run", progress=False)
    assert ShiftedReLU.steps_seen == list(range(12))
    run = RunDir(tmp_path / "run")
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert all(r["sparsity_loss"] > 0 and "active_mean" in r for r in rows)
    document = run.read_config()
    assert document["status"] == "finished"
    assert document["crosscoder"]["activation"] == "shiftedrelu"
    loaded = Crosscoder.from_pretrained(run.path)
    assert isinstance(loaded.activation, ShiftedReLU)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(source.acts_TXD[:64]),
                                   final.encode(source.acts_TXD[:64]))
    # Reruns are bit-identical for the new kind as for the built-in ones.
    again = train(cc, tc, source, tmp_path / "again", progress=False)
    assert run.weights.read_bytes() == RunDir(tmp_path / "again").weights.read_bytes()
    assert torch.equal(again.W_dec_HXD, final.W_dec_HXD)
