"""`crossint eval`: SPEC §3.6 metrics and CE-loss recovered (SPEC §6.2) by splicing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crossint.analysis import splicing
from crossint.analysis.evaluate import _Passes, _reconstruct, evaluate, format_table
from crossint.analysis.splicing import TextLosses, loss_recovered, replace_where
from crossint.cli import main
from crossint.crosscoder.model import Crosscoder, CrosscoderConfig
from crossint.models.adapter import ModelAdapter

HOOKPOINTS = ["blocks.0.resid_pre", "blocks.0.resid_mid", "blocks.1.mlp_in", "blocks.1.resid_post"]
D_MODEL = 32


def test_loss_recovered_formula():
    assert loss_recovered(2.0, 2.0, 5.0) == 1.0
    assert loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert loss_recovered(2.0, 3.5, 5.0) == pytest.approx(0.5)
    assert math.isnan(loss_recovered(2.0, 3.0, 2.0))


def exact_crosscoder(model_name: str) -> Crosscoder:
    """A ReLU crosscoder that reconstructs every activation exactly: features ±e_(x,d)."""
    X, D = len(HOOKPOINTS), D_MODEL
    config = CrosscoderConfig(
        hookpoints=HOOKPOINTS,
        models=[model_name],
        d_model=D,
        n_features=2 * X * D,
        activation="relu",
        k=1,
        folded=True,
    )
    crosscoder = Crosscoder(config)
    eye_FXD = torch.eye(X * D).reshape(X * D, X, D)
    with torch.no_grad():
        crosscoder.W_dec_HXD.copy_(torch.stack([eye_FXD, -eye_FXD], dim=1).reshape(-1, X, D))
        crosscoder.W_enc_XDH.copy_(crosscoder.W_dec_HXD.permute(1, 2, 0))
    return crosscoder


def test_exact_reconstruction_recovers_everything(tiny_model_dir, tiny_text_file, tmp_path):
    crosscoder = exact_crosscoder(str(tiny_model_dir))
    acts_BXD = torch.randn(5, len(HOOKPOINTS), D_MODEL)
    torch.testing.assert_close(crosscoder(acts_BXD).recon_BXD, acts_BXD)
    crosscoder.save_pretrained(tmp_path / "run")

    result = evaluate(
        tmp_path / "run",
        n_tokens=256,
        corpus=str(tiny_text_file),
        context_length=32,
        progress=False,
    )
    resid = ["blocks.0.resid_pre", "blocks.0.resid_mid", "blocks.1.resid_post"]
    assert set(result["fvu"]) == set(HOOKPOINTS)
    assert set(result["ce_recovered"]) == set(resid)  # mlp_in is not a residual hookpoint
    for name in HOOKPOINTS:
        assert result["fvu"][name] < 1e-10
    for name in resid:
        assert result["ce_recovered"][name] == pytest.approx(1.0, abs=1e-5)
        assert result["ce_recovered_mean_ablation"][name] == pytest.approx(1.0, abs=1e-5)
        # zero-ablation changes the loss, so CE recovered is defined (the random model need not
        # beat a zeroed stream on the held-out sentence)
        assert abs(result["ce_zero"][name] - result["ce_model"]) > 1e-4
    assert result["n_tokens"] >= 256
    assert result["l0"] == pytest.approx(len(HOOKPOINTS) * D_MODEL, rel=0.01)
    assert "blocks.1.resid_post" in format_table(result)


def test_random_crosscoder_loses_loss(tiny_model_dir, tiny_text_file, tmp_path):
    config = CrosscoderConfig(
        hookpoints=HOOKPOINTS,
        models=[str(tiny_model_dir)],
        d_model=D_MODEL,
        n_features=64,
        activation="topk",
        k=4,
        folded=True,
    )
    Crosscoder(config, seed=1).save_pretrained(tmp_path / "run")
    result = evaluate(
        tmp_path / "run",
        n_tokens=128,
        corpus=str(tiny_text_file),
        context_length=32,
        progress=False,
    )
    assert all(value > 0.5 for value in result["fvu"].values())
    assert result["l0"] == pytest.approx(4.0)
    assert 0.0 <= result["dead_fraction"] <= 1.0
    # A random reconstruction changes the model's loss wherever it is spliced in.
    for name, loss in result["ce_splice"].items():
        assert abs(loss - result["ce_model"]) > 1e-4, name


def test_eval_cli(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    exact_crosscoder(str(tiny_model_dir)).save_pretrained(tmp_path / "run")
    code = main(
        [
            "eval",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "ev"),
            "--tokens",
            "64",
            "--corpus",
            str(tiny_text_file),
            "--context-length",
            "32",
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    for key in ("fvu", "l0", "dead_fraction", "dense_fraction", "ce_recovered"):
        assert key in result
    assert "CE rec." in capsys.readouterr().out


def test_eval_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err


def _three_block_adapter(family: str) -> ModelAdapter:
    """A seeded tiny random model with 3 blocks: GPT-2 (learned positions) or Llama (rotary)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=D_MODEL,
                                                 n_layer=3, n_head=4))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=64, hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=3, intermediate_size=64, max_position_embeddings=32))
    return ModelAdapter(model, name=family)


def _full_forward_losses(passes: _Passes, batches: list[torch.Tensor], resid: list[str],
                         mean_XD: torch.Tensor) -> TextLosses:
    """The reference: one whole forward pass per hookpoint and variant."""
    adapter, losses = passes.adapter, TextLosses()
    for ids_BS in batches:
        (acts, keep_BS, _), out = _reconstruct(adapter, passes.crosscoder, ids_BS,
                                               passes.hookpoints, passes.special_ids)
        losses.new_batch(keep_BS[:, :-1])
        with torch.no_grad():
            losses.add("model", adapter.token_losses(ids_BS))
            for x, name in enumerate(passes.hookpoints):
                if name not in resid:
                    continue
                recon_BSD = torch.zeros_like(acts[name])
                recon_BSD[keep_BS] = out.recon_BXD[:, x]
                for variant, new_BSD in {"splice": recon_BSD, "zero": torch.zeros_like(recon_BSD),
                                         "mean": mean_XD[x].expand_as(recon_BSD)}.items():
                    patches = {name: replace_where(new_BSD, ~keep_BS)}
                    losses.add(f"{name}/{variant}", adapter.token_losses(ids_BS, patches=patches))
    return losses


@pytest.mark.parametrize(("family", "stacked_logits"), [("gpt2", 2**28), ("llama", 2**28),
                                                         ("gpt2", 1)])
def test_splices_started_at_the_block_equal_full_forward_passes(family, stacked_logits,
                                                                monkeypatch):
    """Every variant (splice, zero, mean) at every residual hookpoint of the paper layout on 3
    blocks, with its variants stacked in one pass or (stacked_logits 1) one pass each."""
    monkeypatch.setattr(splicing, "STACKED_LOGITS", stacked_logits)
    adapter = _three_block_adapter(family)
    hookpoints = adapter.resolve_layout("paper")
    config = CrosscoderConfig(hookpoints=hookpoints, models=[family], d_model=D_MODEL,
                              n_features=64, activation="topk", k=4, folded=True)
    passes = _Passes(adapter, Crosscoder(config, seed=0).eval(), hookpoints, {0}, "cpu",
                     lambda: None)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, 64, (3, 10), generator=gen) for _ in range(2)]
    batches[0][:, 0] = 0  # a special token keeps the model's own activations
    resid = [h for h in hookpoints if h.split(".")[-1].startswith("resid")]
    mean_XD = torch.randn(len(hookpoints), D_MODEL, generator=gen)

    started = passes.splices(batches, resid, mean_XD)
    full = _full_forward_losses(passes, batches, resid, mean_XD)
    keys = ["model", *(f"{h}/{v}" for h in resid for v in ("splice", "zero", "mean"))]
    assert len(resid) == 7
    for key in keys:
        torch.testing.assert_close(started.sums(key), full.sums(key), rtol=1e-6, atol=1e-5,
                                   msg=key)
