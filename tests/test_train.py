"""Crosscoder training (SPEC §3.3): losses, schedule, AuxK revival, determinism, exact resume,
run-directory contents, and the `crossint train` command."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import Interrupt, interrupt_at
from crossint.cli import main
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.losses import (
    auxk_loss,
    fvu_X,
    learning_rate,
    reconstruction_loss,
    token_variance,
    update_dead_counter,
)
from crossint.crosscoder.model import Crosscoder
from crossint.crosscoder.train import TrainConfig, extra_loss_ramp, train
from crossint.data.cache import TensorActivations
from crossint.errors import CrossintError

HOOKS = ["blocks.0.resid_pre", "blocks.1.resid_pre", "blocks.1.resid_post"]
D = 16


def synthetic_acts(n: int, n_positions: int = 3, d: int = D, n_true: int = 48, active: int = 3,
                   seed: int = 0) -> torch.Tensor:
    """Sparse non-negative combinations of a random dictionary, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_true, n_positions, d, generator=g)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    chosen = torch.stack([torch.randperm(n_true, generator=g)[:active] for _ in range(n)])
    codes = torch.zeros(n, n_true).scatter(1, chosen, 0.5 + torch.rand(n, active, generator=g))
    noise = 0.02 * torch.randn(n, n_positions, d, generator=g)
    return torch.einsum("nf,fxd->nxd", codes, dictionary) + noise


@pytest.fixture(scope="module")
def source() -> TensorActivations:
    return TensorActivations(synthetic_acts(4096), HOOKS)


def cc_config(**changes) -> CrosscoderConfig:
    settings = {"hookpoints": HOOKS, "models": ["tiny"], "d_model": D, "n_features": 64,
                "activation": "batchtopk", "k": 4}
    return CrosscoderConfig(**{**settings, **changes})


def tc_config(**changes) -> TrainConfig:
    settings = {"steps": 20, "batch_size": 64, "lr": 1e-3, "checkpoint_every": 5,
                "log_every": 5, "normalisation_tokens": 1024}
    return TrainConfig(**{**settings, **changes})


def weights(model: Crosscoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- losses and schedule vs naive float64 ---------------------------------------------------
def test_reconstruction_loss_and_fvu_match_naive():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 3, 4, generator=g, dtype=torch.float64)
    r = torch.randn(7, 3, 4, generator=g, dtype=torch.float64)
    total = sum((a[b, x, d] - r[b, x, d]).item() ** 2
                for b in range(7) for x in range(3) for d in range(4))
    assert reconstruction_loss(a, r).item() == pytest.approx(total / 7, rel=1e-12)
    for x in range(3):
        mean = [sum(a[b, x, d].item() for b in range(7)) / 7 for d in range(4)]
        err = sum((a[b, x, d] - r[b, x, d]).item() ** 2 for b in range(7) for d in range(4))
        var = sum((a[b, x, d].item() - mean[d]) ** 2 for b in range(7) for d in range(4))
        assert fvu_X(a, r)[x].item() == pytest.approx(err / var, rel=1e-12)
    # token_variance = L_rec of the batch-mean reconstruction.
    mean_recon = a.mean(0, keepdim=True).expand_as(a)
    assert token_variance(a).item() == pytest.approx(
        reconstruction_loss(a, mean_recon).item(), rel=1e-12)


def test_auxk_loss_matches_naive_and_uses_dead_pre_activations():
    g = torch.Generator().manual_seed(1)
    B, H, X, Dd = 5, 12, 2, 3
    pre = torch.randn(B, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(H, X, Dd, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(B, X, Dd, generator=g, dtype=torch.float64)
    e = torch.randn(B, X, Dd, generator=g, dtype=torch.float64)
    dead = torch.tensor([1, 4, 5, 9, 11])
    k_aux = 2
    loss = auxk_loss(pre, W, dead, e, a, k_aux)
    # Naive: per token, the k_aux largest dead pre-activations (ReLU'd) decode the residual.
    num = 0.0
    for b in range(B):
        ranked = sorted(dead.tolist(), key=lambda h: -pre[b, h].item())[:k_aux]
        e_hat = sum(max(pre[b, h].item(), 0.0) * W[h].detach() for h in ranked)
        num += (e[b] - e_hat).pow(2).sum().item()
    den = (a - a.mean(0)).pow(2).sum().item()
    assert loss.item() == pytest.approx(num / den, rel=1e-12)
    loss.backward()
    live = [h for h in range(H) if h not in dead.tolist()]
    assert torch.equal(pre.grad[:, live], torch.zeros(B, len(live), dtype=torch.float64))
    assert torch.equal(W.grad[live], torch.zeros(len(live), X, Dd, dtype=torch.float64))
    assert pre.grad[:, dead].abs().sum() > 0 and W.grad[dead].abs().sum() > 0
    assert auxk_loss(pre, W, torch.tensor([], dtype=torch.long), e, a, 3).item() == 0.0


def test_dead_counter():
    counter = torch.tensor([0, 5, 100, 7])
    f = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    assert update_dead_counter(counter, f).tolist() == [2, 0, 0, 9]


def test_learning_rate_schedule():
    lrs = [learning_rate(s, 100, 1.0, 0.05, 0.25) for s in range(100)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # 5% linear warm-up
    assert lrs[5:75] == [1.0] * 70  # constant
    assert lrs[75:] == pytest.approx([(100 - s) / 25 for s in range(75, 100)])  # decay to 0
    assert learning_rate(0, 10, 3e-4, 0.0, 0.0) == 3e-4


# --- AuxK revives a dead feature ---------------------------------------------------------------
def test_dead_feature_receives_gradient_only_through_aux_loss(source):
    model = Crosscoder(cc_config(activation="topk"), seed=0).train()
    model.estimate_normalisation(source.sample(512, seed=0))
    j = 7
    with torch.no_grad():
        model.W_enc_XDH[:, :, j] *= 0.01  # small positive pre-activations: never in the top k
    batch = next(iter(source.batches(64, seed=0)))
    out = model(batch)
    assert (out.f_BH[:, j] == 0).all() and (out.pre_BH[:, j] > 0).any()
    reconstruction_loss(out.acts_norm_BXD, out.recon_norm_BXD).backward(retain_graph=True)
    assert model.W_enc_XDH.grad[:, :, j].abs().sum() == 0
    assert model.W_dec_HXD.grad[j].abs().sum() == 0
    model.zero_grad()
    residual = (out.acts_norm_BXD - out.recon_norm_BXD).detach()
    auxk_loss(out.pre_BH, model.W_dec_HXD, torch.tensor([j]), residual, out.acts_norm_BXD,
              16).backward()
    assert model.W_enc_XDH.grad[:, :, j].abs().sum() > 0
    assert model.b_enc_H.grad[j].abs() > 0
    assert model.W_dec_HXD.grad[j].abs().sum() > 0


def kill_feature(at_call: int, killed: dict):
    """An extra loss that, at call ``at_call``, shrinks the encoder of the feature firing most
    in that batch by 1000x, so it stops firing (its direction is kept: worth reviving)."""
    calls = {"n": 0}

    def extra(crosscoder, acts_BXD, output):
        calls["n"] += 1
        if calls["n"] == at_call:
            j = int((output.f_BH != 0).sum(dim=0).argmax())
            with torch.no_grad():
                crosscoder.W_enc_XDH[:, :, j] *= 1e-3
                crosscoder.b_enc_H[j] = 0.0
            killed["j"] = j
        return {}

    return extra


def test_aux_loss_revives_a_dead_feature(source, tmp_path):
    fired = {}
    # α = 1 rather than 1/32 so that revival happens within a test-sized run.
    for aux_alpha in (0.0, 1.0):
        run = tmp_path / f"aux{aux_alpha}"
        killed: dict = {}
        model = train(cc_config(activation="topk", dead_tokens=128),
                      tc_config(steps=140, aux_alpha=aux_alpha, decay_fraction=0.0), source, run,
                      extra_losses=[kill_feature(20, killed)], progress=False)
        with torch.no_grad():
            f = model.encode(source.acts_TXD[:2048])
        fired[aux_alpha] = int((f[:, killed["j"]] != 0).sum())
        if aux_alpha > 0:
            assert any(r["aux_loss"] > 0 for r in metrics(run))
    assert fired[0.0] == 0  # without AuxK the feature stays dead...
    assert fired[1.0] > 0  # ...with AuxK on its pre-activations it fires again


# --- determinism and resume ----------------------------------------------------------------
def test_reruns_are_bit_identical(source, tmp_path):
    a = weights(train(cc_config(), tc_config(), source, tmp_path / "a", progress=False))
    b = weights(train(cc_config(), tc_config(), source, tmp_path / "b", progress=False))
    assert_bitwise_equal(a, b)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors").read_bytes()
    c = weights(train(cc_config(), tc_config(seed=1), source, tmp_path / "c", progress=False))
    assert not torch.equal(a["W_dec_HXD"], c["W_dec_HXD"])


@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu"])
def test_interrupted_then_resumed_run_equals_uninterrupted(activation, source, tmp_path):
    cc, tc = cc_config(activation=activation, dead_tokens=256), tc_config(steps=20)
    full = weights(train(cc, tc, source, tmp_path / "full", progress=False))

    run = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        train(cc, tc, source, run, extra_losses=[interrupt_at(12)], progress=False)
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == 10
    assert not (run / "model.safetensors").exists()
    resumed = weights(train(cc, tc, source, run, resume=True, progress=False))
    assert_bitwise_equal(full, resumed)
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in metrics(tmp_path / "full")]
    assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in metrics(run)] == strip
    assert [r["step"] for r in metrics(run)] == [5, 10, 15, 20]


def test_resume_refuses_other_settings_and_other_activations(source, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(cc_config(), tc_config(), source, run, extra_losses=[interrupt_at(7)],
              progress=False)
    before = tree_digest(run)
    with pytest.raises(CrossintError, match=r"n_features=64 \(given 128\)"):
        train(cc_config(n_features=128), tc_config(), source, run, resume=True, progress=False)
    with pytest.raises(CrossintError, match=r"steps=20 \(given 40\)"):
        train(cc_config(), tc_config(steps=40), source, run, resume=True, progress=False)
    other_hooks = TensorActivations(synthetic_acts(512), ["blocks.0.resid_pre", "x", "y"])
    with pytest.raises(CrossintError, match="hookpoints"):
        train(cc_config(), tc_config(), other_hooks, run, resume=True, progress=False)
    other_dims = TensorActivations(synthetic_acts(512, d=8), HOOKS)
    with pytest.raises(CrossintError, match="widths"):
        train(cc_config(), tc_config(), other_dims, run, resume=True, progress=False)
    with pytest.raises(CrossintError, match="already holds a training run"):
        train(cc_config(), tc_config(), source, run, progress=False)
    assert tree_digest(run) == before  # nothing written, nothing lost
    # Cosmetic settings may change on resume.
    train(cc_config(), tc_config(log_every=2), source, run, resume=True, progress=False)


def test_source_must_match_the_crosscoder(source, tmp_path):
    with pytest.raises(CrossintError, match=r"d_model=32"):
        train(cc_config(d_model=32), tc_config(), source, tmp_path / "r", progress=False)
    with pytest.raises(CrossintError, match="single model"):
        train(cc_config(models=["a", "b"]), tc_config(), source, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


# --- run directory, extra losses, training quality -----------------------------------------
def test_extra_losses_ramp_in_over_the_warmup(source, tmp_path):
    assert [extra_loss_ramp(step, 20, 0.25) for step in (0, 1, 4, 5, 19)] == [0.2, 0.4, 1.0, 1.0,
                                                                                1.0]
    assert extra_loss_ramp(0, 20, 0.0) == 1.0

    def constant(crosscoder, acts_BXD, output):
        return {"constant": crosscoder.W_enc_XDH.sum() * 0 + 2.0}

    run = tmp_path / "run"
    train(cc_config(), tc_config(extra_loss_warmup=0.5), source, run, extra_losses=[constant],
          progress=False)
    assert [r["constant"] for r in metrics(run)] == pytest.approx([1.0, 2.0, 2.0, 2.0])
    with pytest.raises(CrossintError, match="extra_loss_warmup"):
        tc_config(extra_loss_warmup=1.5)


def test_run_directory_contents_and_saved_model(source, tmp_path):
    run = tmp_path / "run"
    calls = []

    def enc_l2(crosscoder, acts_BXD, output):
        calls.append(acts_BXD.shape)
        return {"enc_l2": 1e-4 * crosscoder.W_enc_XDH.pow(2).sum()}

    final = train(cc_config(), tc_config(), source, run, extra_losses=[enc_l2], progress=False)
    assert len(calls) == 20 and calls[0] == (64, 3, D)
    rows = metrics(run)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    for key in ("step", "loss", "rec_loss", "aux_loss", "l0", "dead_fraction", "fvu", "lr",
                "enc_l2", "threshold"):
        assert key in rows[-1], key
    last = rows[-1]
    assert last["loss"] == pytest.approx(
        last["rec_loss"] + last["enc_l2"] + last["aux_loss"] * last["variance"] / 32, rel=1e-4
    )
    assert rows[0]["l0"] == pytest.approx(4.0, abs=1e-6)  # BatchTopK: K per token on average
    document = json.loads((run / "config.json").read_text())
    assert document["status"] == "finished"
    assert document["train"]["steps"] == 20
    assert document["training_crosscoder"]["activation"] == "batchtopk"
    assert document["source"]["hookpoints"] == HOOKS and document["source"]["n_tokens"] == 4096
    assert (run / "checkpoint" / "state.pt").is_file()

    loaded = Crosscoder.from_pretrained(run)
    assert loaded.config.folded and loaded.config.activation == "jumprelu"
    assert loaded.config.trained_activation == "batchtopk"
    assert torch.equal(loaded.scale_X, torch.ones(3))
    assert loaded.threshold_H.min() > 0 and torch.equal(loaded.threshold_H, final.threshold_H)
    # The folded file reads raw activations exactly as the trained, unfolded model did.
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
    unfolded = Crosscoder(cc_config())
    unfolded.load_state_dict(state["model"])
    unfolded.eval().double()
    raw = source.acts_TXD[:256]
    with torch.no_grad():
        want = unfolded(raw.double())
        got = loaded.double()(raw.double())
    torch.testing.assert_close(got.f_BH, want.f_BH)
    torch.testing.assert_close(got.recon_BXD, want.recon_BXD)


def test_trained_batchtopk_features_do_not_depend_on_the_batch(source, tmp_path):
    train(cc_config(), tc_config(), source, tmp_path / "run", progress=False)
    model = Crosscoder.from_pretrained(tmp_path / "run")
    raw = source.acts_TXD[:64]
    with torch.no_grad():
        together = model.encode(raw)
        alone = torch.cat([model.encode(raw[i : i + 1]) for i in range(64)])
        shuffled = model.encode(torch.cat([raw[32:], raw[:32]]))
    assert torch.equal(together != 0, alone != 0)
    torch.testing.assert_close(alone, together)
    torch.testing.assert_close(shuffled, torch.cat([together[32:], together[:32]]))
    assert (together != 0).sum(1).float().mean() > 0


class TwoModelSource:
    """Activations of two models at the same hookpoints, positions model-major."""

    def __init__(self, acts_TXD: torch.Tensor, hookpoints: list[str], models: list[str]):
        self.inner = TensorActivations(acts_TXD, [f"{m}/{h}" for m in models for h in hookpoints])
        self.hookpoints, self.models = hookpoints, models
        self.dims = {h: acts_TXD.shape[2] for h in hookpoints}
        self.n_tokens = acts_TXD.shape[0]

    def batches(self, batch_size, seed, start_batch=0):
        return self.inner.batches(batch_size, seed, start_batch)

    def sample(self, n_tokens, seed):
        return self.inner.sample(n_tokens, seed)


def test_two_model_crosscoder_trains(tmp_path):
    hooks = HOOKS[:2]
    acts = synthetic_acts(2048, n_positions=4)
    acts[:, 2:] *= 5.0  # the second model's activations live at another scale
    src = TwoModelSource(acts, hooks, ["base", "ft"])
    model = train(cc_config(hookpoints=hooks, models=["base", "ft"], activation="topk"),
                  tc_config(steps=40), src, tmp_path / "diff", progress=False)
    assert model.positions == [("base", hooks[0]), ("base", hooks[1]),
                               ("ft", hooks[0]), ("ft", hooks[1])]
    rows = metrics(tmp_path / "diff")
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    # Folded decoder norms carry the per-model scale: ft rows are ~5x the base rows.
    ratio = model.decoder(hooks[0], "ft").norm() / model.decoder(hooks[0], "base").norm()
    assert 2.0 < ratio.item() < 12.0
    with pytest.raises(CrossintError, match="come from models"):
        train(cc_config(hookpoints=hooks, models=["base", "other"]), tc_config(), src,
              tmp_path / "x", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["batchtopk", "topk", "jumprelu", "relu"])
def test_training_reduces_fvu_on_sparse_synthetic_data(activation, source, tmp_path):
    run = tmp_path / activation
    # The default λ = 5 suits d_model in the hundreds; with D = 16 a feature's contribution is
    # smaller than that and L1 would switch everything off.
    train(cc_config(activation=activation, l1_coefficient=0.3),
          tc_config(steps=300, batch_size=128, log_every=50, checkpoint_every=300),
          source, run, progress=False)
    rows = metrics(run)
    assert rows[-1]["fvu"] < 0.5 * rows[0]["fvu"] and rows[-1]["fvu"] < 0.4
    assert all(math.isfinite(r["loss"]) for r in rows)
    if activation in ("jumprelu", "relu"):
        assert rows[-1]["l0"] < 64  # the sparsity penalty keeps features from all firing


# --- the command line --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def caches(tiny_model_dir, tiny_text_file, tmp_path_factory) -> dict[str, Path]:
    from crossint.data.harvest import harvest

    root = tmp_path_factory.mktemp("caches")
    out = {}
    for name, layout in (("resid", "resid"), ("other", "blocks.0.resid_pre,blocks.1.resid_mid")):
        harvest(str(tiny_model_dir), root / name, hookpoints=layout, n_tokens=1500,
                corpus=str(tiny_text_file), context_length=32, shard_tokens=512, progress=False)
        out[name] = root / name
    return out


def cli(*args: str) -> int:
    return main(["train", *map(str, args)])


SMALL = ["--features", "48", "--k", "4", "--steps", "12", "--batch-size", "64",
         "--checkpoint-every", "4", "--log-every", "4", "--quiet"]


@pytest.mark.slow
def test_cli_trains_and_records_the_cache_and_model(caches, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("--activations", caches["resid"], "--out", run, *SMALL) == 0
    assert "-> " in capsys.readouterr().out
    document = json.loads((run / "config.json").read_text())
    assert document["source"]["path"] == str(caches["resid"].resolve())
    assert document["source"]["model"] == str(tiny_model_dir)
    model = Crosscoder.from_pretrained(run)
    assert model.config.models == [str(tiny_model_dir)] and model.config.d_model == 32
    assert model.config.hookpoints == ["blocks.0.resid_pre", "blocks.1.resid_pre",
                                       "blocks.1.resid_post"]


@pytest.mark.slow
def test_cli_resume_continues_exactly(caches, tmp_path):
    full = tmp_path / "full"
    assert cli("--activations", caches["resid"], "--out", full, *SMALL) == 0
    run = tmp_path / "run"
    # Interrupt the same run through the library, then let the command resume it.
    from crossint.data.cache import ActivationCache

    cache = ActivationCache(caches["resid"])
    cc = CrosscoderConfig(hookpoints=cache.hookpoints, models=[cache.model], d_model=32,
                          n_features=48, k=4)
    tc = TrainConfig(steps=12, batch_size=64, checkpoint_every=4, log_every=4)
    with pytest.raises(Interrupt):
        train(cc, tc, cache, run, extra_losses=[interrupt_at(9)], progress=False)
    assert cli("--activations", caches["resid"], "--out", run, "--resume", "--quiet") == 0
    assert_bitwise_equal(weights(Crosscoder.from_pretrained(full)),
                         weights(Crosscoder.from_pretrained(run)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--activation", "softmax"], "activation='softmax'"),
        (["--features", "16", "--k", "16"], "k=16"),
        (["--k", "0"], "k=0"),
        (["--lr", "-1"], "lr=-1"),
    ],
)
def test_cli_bad_settings_fail_with_one_line(caches, tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    args = SMALL[:2] + SMALL[4:] + (extra if "--k" in extra else ["--k", "4", *extra])
    assert cli("--activations", caches["resid"], "--out", run, *args) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not run.exists()


@pytest.mark.slow
def test_cli_refuses_a_mismatched_cache_and_loses_nothing(caches, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("--activations", caches["resid"], "--out", run, *SMALL) == 0
    capsys.readouterr()
    before = tree_digest(run)
    assert cli("--activations", caches["other"], "--out", run, "--resume", "--quiet") == 1
    err = capsys.readouterr().err.strip()
    assert "hookpoints" in err and len(err.splitlines()) == 1
    assert cli("--activations", caches["resid"], "--out", run, "--quiet") == 1
    assert "already holds a training run" in capsys.readouterr().err
    assert cli("--activations", tmp_path / "missing", "--out", tmp_path / "r2") == 1
    assert "not found" in capsys.readouterr().err
    assert tree_digest(run) == before


@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu"])
def test_bfloat16_autocast_trains_like_float32(activation, source, tmp_path):
    """Mixed precision (the GPU path, run here on the CPU): the forward pass in bfloat16, the
    parameters float32; the loss follows float32's within bfloat16's resolution."""
    runs = {}
    for autocast in (None, "bfloat16"):
        run = tmp_path / f"{activation}_{autocast}"
        model = train(cc_config(activation=activation, l1_coefficient=0.3),
                      tc_config(steps=60, batch_size=128, log_every=20, autocast=autocast),
                      source, run, progress=False)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        runs[autocast] = metrics(run)
    assert json.loads((tmp_path / f"{activation}_bfloat16" / "config.json").read_text())[
        "train"]["autocast"] == "bfloat16"
    pairs = list(zip(runs[None], runs["bfloat16"], strict=True))
    assert any(full["loss"] != mixed["loss"] for full, mixed in pairs)  # bfloat16 did run
    for full, mixed in pairs:
        assert math.isfinite(mixed["loss"])
        assert mixed["fvu"] == pytest.approx(full["fvu"], rel=0.1, abs=0.02)
    assert runs["bfloat16"][-1]["fvu"] < 0.9 * runs["bfloat16"][0]["fvu"]
    with pytest.raises(CrossintError, match="autocast"):
        TrainConfig(autocast="float16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_with_autocast_follows_the_cpu(source, tmp_path):
    """The GPU path (pinned non-blocking batches, bfloat16 autocast) trains as the CPU does."""
    rows = {}
    for device, autocast in (("cpu", None), ("cuda", "bfloat16")):
        run = tmp_path / device
        model = train(cc_config(), tc_config(steps=60, batch_size=128, log_every=20,
                                             device=device, autocast=autocast),
                      source, run, progress=False)
        assert all(p.device.type == "cpu" for p in model.parameters())  # saved on the host
        rows[device] = metrics(run)
    for cpu, gpu in zip(rows["cpu"], rows["cuda"], strict=True):
        assert gpu["fvu"] == pytest.approx(cpu["fvu"], rel=0.1, abs=0.02)
