"""The model adapter (SPEC §2) on every supported family, with tiny random-config models."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import Tensor

from crossint.errors import CrossintError
from crossint.models import hookpoints as hp
from crossint.models.adapter import (
    AttentionWeights,
    ModelAdapter,
    estimate_lipschitz,
    load_model,
    parse_dtype,
)
from crossint.models.architectures import ARCHITECTURES, get_architecture

VOCAB = 100
D_MODEL = 32
N_BLOCKS = 2


def _build(family: str):
    """A seeded tiny random model: 2 blocks, d_model 32, 4 heads, vocab 100."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_attention_heads=4)
    llama_like = dict(
        common,
        num_hidden_layers=N_BLOCKS,
        intermediate_size=64,
        max_position_embeddings=64,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    if family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=D_MODEL, n_layer=N_BLOCKS, n_head=4,
            scale_attn_by_inverse_layer_idx=True,  # exercises the per-layer attention scale
        )  # fmt: skip
        model = tf.GPT2LMHeadModel(config)
    elif family == "gpt_neo":
        config = tf.GPTNeoConfig(
            vocab_size=VOCAB, max_position_embeddings=64, hidden_size=D_MODEL,
            num_layers=N_BLOCKS, attention_types=[[["global", "local"], 1]], num_heads=4,
            intermediate_size=128, window_size=3,
        )  # fmt: skip
        model = tf.GPTNeoForCausalLM(config)
    elif family in ("gpt_neox", "gpt_neox_sequential"):
        config = tf.GPTNeoXConfig(
            **common, num_hidden_layers=N_BLOCKS, intermediate_size=128,
            max_position_embeddings=64, rotary_pct=0.5,
            use_parallel_residual=family == "gpt_neox",
        )  # fmt: skip
        model = tf.GPTNeoXForCausalLM(config)
    elif family == "llama":
        config = tf.LlamaConfig(**llama_like, mlp_bias=True, attention_bias=True)
        model = tf.LlamaForCausalLM(config)
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**{**llama_like, "sliding_window": 4}))
    elif family == "gemma":
        config = tf.GemmaConfig(**{**llama_like, "num_key_value_heads": 1}, head_dim=8)
        model = tf.GemmaForCausalLM(config)
    elif family == "bert":
        config = tf.BertConfig(
            **common, num_hidden_layers=N_BLOCKS, intermediate_size=64, max_position_embeddings=64
        )
        model = tf.BertForMaskedLM(config)
    elif family == "roberta":
        config = tf.RobertaConfig(
            **common, num_hidden_layers=N_BLOCKS, intermediate_size=64,
            max_position_embeddings=66, pad_token_id=1,
        )  # fmt: skip
        model = tf.RobertaForMaskedLM(config)
    else:
        raise ValueError(family)
    # Larger-than-default weights so that nonlinearities and attention patterns matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "wte" not in name:
                param.mul_(5.0)
    return model.eval()


FAMILIES = [
    "gpt2", "gpt_neo", "gpt_neox", "gpt_neox_sequential", "llama", "qwen2", "mistral", "gemma",
    "bert", "roberta",
]  # fmt: skip
ENCODERS = {"bert", "roberta"}


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request) -> ModelAdapter:
    return ModelAdapter(_build(request.param), name=request.param)


def _ids(batch: int = 2, seq: int = 9, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


def _close(a: Tensor, b: Tensor, tol: float = 1e-5) -> bool:
    a, b = a.double(), b.double()
    return bool(torch.allclose(a, b, atol=tol * max(1.0, float(b.abs().max())), rtol=tol))


# --- the four issue tests -------------------------------------------------------------------


def test_mlp_pre_is_mlp_in_times_W_in(adapter):
    acts = adapter.capture(_ids(), [f"blocks.{l}.{s}" for l in range(2) for s in hp.SITES])
    for l in range(adapter.n_blocks):
        w = adapter.mlp_weights(l)
        mlp_in_BSD = acts[f"blocks.{l}.mlp_in"].double()
        naive_BSN = torch.einsum("bsd,dn->bsn", mlp_in_BSD, w.W_in_DN.double()) + w.b_in_N.double()
        assert _close(naive_BSN, acts[f"blocks.{l}.mlp_pre"])
        assert _close(w.pre(acts[f"blocks.{l}.mlp_in"]), acts[f"blocks.{l}.mlp_pre"])


def test_mlp_rebuilt_from_weights_maps_mlp_in_to_mlp_out(adapter):
    acts = adapter.capture(_ids(), adapter.hookpoints())
    for l in range(adapter.n_blocks):
        w = adapter.mlp_weights(l)
        mlp_in_BSD = acts[f"blocks.{l}.mlp_in"]
        assert w.W_in_DN.shape == (adapter.d_model, adapter.d_mlp)
        assert w.W_out_ND.shape == (adapter.d_mlp, adapter.d_model)
        assert w.gated == (adapter.family == "llama")
        assert _close(w.post(mlp_in_BSD), acts[f"blocks.{l}.mlp_post"])
        assert _close(w.forward(mlp_in_BSD), acts[f"blocks.{l}.mlp_out"])
        # The same MLP in float64 from the raw tensors: φ(u·W_in + b_in) [* up] · W_out + b_out.
        u = mlp_in_BSD.double()
        post = w.act(u @ w.W_in_DN.double() + w.b_in_N.double())
        if w.gated:
            post = post * (u @ w.W_up_DN.double() + w.b_up_N.double())
        assert _close(post @ w.W_out_ND.double() + w.b_out_D.double(), acts[f"blocks.{l}.mlp_out"])


@pytest.mark.parametrize("site", hp.SITES)
def test_identity_patch_leaves_logits_unchanged(adapter, site):
    ids = _ids()
    with torch.no_grad():
        reference = adapter.logits(ids)
        for l in range(adapter.n_blocks):
            calls: list[int] = []

            def identity(x: Tensor, calls: list[int] = calls) -> Tensor:
                calls.append(1)
                return x.clone()

            patched = adapter.logits(ids, patches={f"blocks.{l}.{site}": identity})
            assert calls == [1]
            assert _close(patched, reference, 1e-5)


def test_identity_patch_everywhere_at_once(adapter):
    ids = _ids()
    with torch.no_grad():
        reference = adapter.logits(ids)
        patched = adapter.logits(
            ids, patches={n: lambda x: x.clone() for n in adapter.hookpoints()}
        )
    assert _close(patched, reference, 1e-5)


def test_unknown_hookpoint_lists_valid_ones(adapter):
    for bad in ("blocks.9.mlp_in", "blocks.0.mlp_inn", "mlp_in", "blocks.-1.resid_pre"):
        with pytest.raises(CrossintError) as err:
            adapter.capture(_ids(), [bad])
        message = str(err.value)
        assert bad in message and "resid_pre" in message and "mlp_post" in message
        assert "blocks.{0..1}" in message
    with pytest.raises(CrossintError, match="valid hookpoints"):
        adapter.logits(_ids(), patches={"blocks.5.resid_post": lambda x: x})


# --- sites mean what SPEC §2 says --------------------------------------------------------------


def test_sites_are_the_tensors_spec_defines(adapter):
    acts = adapter.capture(_ids(), adapter.hookpoints())
    arch = adapter.arch
    for l in range(adapter.n_blocks):
        a = {s: acts[f"blocks.{l}.{s}"] for s in hp.SITES}
        if arch.post_ln:
            assert torch.equal(a["attn_in"], a["resid_pre"])
            assert torch.equal(a["mlp_in"], a["resid_mid"])
            ln_a = adapter.module("ln2", l)
            assert _close(ln_a(a["resid_pre"] + a["attn_out"]), a["resid_mid"])
        else:
            assert _close(adapter.module("ln1", l)(a["resid_pre"]), a["attn_in"])
            assert torch.equal(a["resid_mid"], a["resid_pre"] + a["attn_out"])
            assert _close(a["resid_post"], a["resid_mid"] + a["mlp_out"])
            mlp_reads = a["resid_pre"] if adapter.parallel_residual else a["resid_mid"]
            assert _close(adapter.module("ln2", l)(mlp_reads), a["mlp_in"])
        w = adapter.mlp_weights(l)
        if not w.gated:
            assert _close(w.act(a["mlp_pre"]), a["mlp_post"])
        if l + 1 < adapter.n_blocks:
            assert torch.equal(a["resid_post"], acts[f"blocks.{l + 1}.resid_pre"])


def test_hookpoint_dim_matches_captured_tensors(adapter):
    acts = adapter.capture(_ids(batch=3, seq=5), adapter.hookpoints())
    for name, tensor in acts.items():
        assert tensor.shape == (3, 5, adapter.hookpoint_dim(name)), name
    assert adapter.hookpoint_dim("blocks.0.mlp_pre") == adapter.d_mlp != adapter.d_model
    assert adapter.hookpoint_dim("blocks.1.attn_in") == adapter.d_model == D_MODEL


def test_layouts(adapter):
    paper = adapter.resolve_layout("paper")
    assert len(paper) == 4 * adapter.n_blocks + 1
    assert paper[-1] == f"blocks.{adapter.n_blocks - 1}.resid_post"
    resid = adapter.resolve_layout("resid")
    assert resid == ["blocks.0.resid_pre", "blocks.1.resid_pre", "blocks.1.resid_post"]
    explicit = adapter.resolve_layout("blocks.1.mlp_in, blocks.0.mlp_in")
    assert explicit == ["blocks.1.mlp_in", "blocks.0.mlp_in"]
    acts = adapter.capture(_ids(), "paper")
    assert list(acts) == paper


# --- early stop --------------------------------------------------------------------------------


def test_capture_with_early_stop_equals_full_pass(adapter):
    ids = _ids()
    full = adapter.capture(ids, adapter.hookpoints())
    calls = []
    last_block = adapter.module("blocks")[adapter.n_blocks - 1]
    handle = last_block.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        early = adapter.capture(ids, ["blocks.0.mlp_in", "blocks.0.resid_pre", "blocks.0.mlp_pre"])
        assert calls == []  # stopped before the last block ran
        adapter.capture(ids, ["blocks.1.resid_pre"])
        assert calls == [1]
    finally:
        handle.remove()
    for name, tensor in early.items():
        assert torch.equal(tensor, full[name])
    assert list(early) == ["blocks.0.mlp_in", "blocks.0.resid_pre", "blocks.0.mlp_pre"]


def test_capture_is_no_grad_and_leaves_no_hooks(adapter):
    acts = adapter.capture(_ids(), "paper")
    assert all(not t.requires_grad for t in acts.values())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in adapter.model.modules())


def test_hooks_are_removed_after_an_exception(adapter):
    ids = _ids()
    with torch.no_grad():
        reference = adapter.logits(ids)

    def boom(x):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        adapter.logits(ids, patches={"blocks.0.mlp_out": boom, "blocks.1.resid_mid": boom})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in adapter.model.modules())
    with torch.no_grad():
        assert torch.equal(adapter.logits(ids), reference)


# --- patching changes what it should -----------------------------------------------------------


def test_patching_resid_mid_reaches_the_mlp_and_the_residual(adapter):
    ids = _ids()
    l = 0
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(ids.shape[0], ids.shape[1], adapter.d_model, generator=gen)
    names = [f"blocks.{l}.{s}" for s in hp.SITES]
    clean = adapter.capture(ids, names)
    acts = adapter.capture(ids, names, patches={f"blocks.{l}.resid_mid": lambda x: target})
    a = {s: acts[f"blocks.{l}.{s}"] for s in hp.SITES}
    assert torch.equal(a["resid_mid"], target)
    if adapter.arch.post_ln:
        assert torch.equal(a["mlp_in"], target)
        assert _close(adapter.module("mlp_out_module", l)(a["mlp_post"]), a["mlp_out"])
        ln_m = adapter.module("blocks")[l].output.LayerNorm
        assert _close(ln_m(target + a["mlp_out"]), a["resid_post"])
    else:
        assert _close(a["resid_post"], target + a["mlp_out"])
        if adapter.parallel_residual:  # the MLP reads ln2(resid_pre), untouched by the patch
            assert torch.equal(a["mlp_in"], clean[f"blocks.{l}.mlp_in"])
        else:
            assert _close(adapter.module("ln2", l)(target), a["mlp_in"])
            assert not _close(a["mlp_in"], clean[f"blocks.{l}.mlp_in"])


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post"])
def test_patching_the_whole_residual_transplants_another_run(adapter, site):
    # Replacing the residual stream of the last block by another input's makes everything
    # downstream compute that input's logits. (Parallel-residual blocks: the MLP reads
    # resid_pre, so a resid_mid transplant changes only the residual, not the MLP input.)
    ids, other = _ids(seed=1), _ids(seed=2)
    transplants = not (site == "resid_mid" and adapter.parallel_residual)
    name = f"blocks.{adapter.n_blocks - 1}.{site}"
    donor = adapter.capture(other, [name])[name]
    with torch.no_grad():
        want = adapter.logits(other)
        got = adapter.logits(ids, patches={name: lambda x: donor})
        clean = adapter.logits(ids)
    assert _close(got, want, 1e-4) == transplants
    assert not _close(clean, want, 1e-4)


def test_patching_resid_post_changes_logits(adapter):
    # (A uniform scale or constant shift would be invisible through a LayerNorm; use a
    # random direction.)
    ids = _ids()
    direction_D = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        clean = adapter.logits(ids)
        for l in range(adapter.n_blocks):
            patch = {f"blocks.{l}.resid_post": lambda x: x + 3 * direction_D * x.std()}
            assert (adapter.logits(ids, patches=patch) - clean).abs().max() > 1e-3


def test_patch_with_wrong_shape_is_an_error(adapter):
    with pytest.raises(CrossintError, match="original shape"):
        adapter.logits(_ids(), patches={"blocks.0.mlp_pre": lambda x: x[..., :3]})
    with pytest.raises(CrossintError, match="must be a function"):
        adapter.logits(_ids(), patches={"blocks.0.mlp_pre": 3.0})


# --- attention weights -------------------------------------------------------------------------


def _rotate(x_BASd: Tensor, rotary_dim: int, theta: float) -> Tensor:
    """Naive rotary embedding: dims i and i + rotary_dim/2 turn by position·theta^(-2i/rd)."""
    out = x_BASd.clone()
    half = rotary_dim // 2
    positions = torch.arange(x_BASd.shape[2], dtype=torch.float64)
    for i in range(half):
        angle_S = positions * theta ** (-2.0 * i / rotary_dim)
        cos, sin = angle_S.cos(), angle_S.sin()
        a, b = x_BASd[..., i], x_BASd[..., i + half]
        out[..., i] = a * cos - b * sin
        out[..., i + half] = b * cos + a * sin
    return out


def _reference_attention(w: AttentionWeights, attn_in_BSD: Tensor) -> Tensor:
    """The attention sublayer recomputed from the exposed weights alone, in float64."""
    x = attn_in_BSD.double()
    S = x.shape[1]
    rep = w.n_heads // w.n_kv_heads
    q = torch.einsum("bsD,hDd->bhsd", x, w.W_Q_ADd.double()) + w.b_Q_Ad.double()[None, :, None]
    k = torch.einsum("bsD,hDd->bhsd", x, w.W_K_ADd.double()) + w.b_K_Ad.double()[None, :, None]
    v = torch.einsum("bsD,hDd->bhsd", x, w.W_V_ADd.double()) + w.b_V_Ad.double()[None, :, None]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if w.positional == "rotary":
        q, k = _rotate(q, w.rotary_dim, w.rope_theta), _rotate(k, w.rotary_dim, w.rope_theta)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * w.scale
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = torch.ones(S, S, dtype=torch.bool)
    if w.causal:
        allowed &= j <= i
    if w.window is not None:
        allowed &= (i - j) < w.window
    pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    z = torch.einsum("bhij,bhjd->bhid", pattern, v)
    return torch.einsum("bhid,hdD->biD", z, w.W_O_AdD.double()) + w.b_O_D.double()


def test_attention_recomputed_from_weights_matches_attn_out(adapter):
    acts = adapter.capture(_ids(seq=12), adapter.hookpoints())
    for l in range(adapter.n_blocks):
        w = adapter.attention_weights(l)
        A, d = w.n_heads, w.head_dim
        assert w.W_Q_ADd.shape == (A, adapter.d_model, d)
        assert w.W_K_ADd.shape == w.W_V_ADd.shape == (w.n_kv_heads, adapter.d_model, d)
        assert w.W_O_AdD.shape == (A, d, adapter.d_model)
        assert w.b_Q_Ad.shape == (A, d) and w.b_K_Ad.shape == (w.n_kv_heads, d)
        recomputed = _reference_attention(w, acts[f"blocks.{l}.attn_in"])
        assert _close(recomputed, acts[f"blocks.{l}.attn_out"], 1e-4), f"block {l}"


def test_attention_metadata(adapter):
    w0, w1 = adapter.attention_weights(0), adapter.attention_weights(1)
    expected_kv = {"llama": 2, "qwen2": 2, "mistral": 2, "gemma": 1}
    assert w0.n_kv_heads == expected_kv.get(adapter.model_type, 4)
    assert w0.kv_head(w0.n_heads - 1) == w0.n_kv_heads - 1
    assert w0.causal == (adapter.model_type not in ENCODERS)
    if w0.positional == "rotary":
        rd = w0.rotary_dim
        assert rd == (4 if adapter.family == "gpt_neox" else 8)  # rotary_pct 0.5 of d_head 8
        freqs = w0.rope_theta ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
        assert torch.allclose(w0.rotary_inv_freq.double(), freqs, rtol=1e-6)
    else:
        assert w0.positional == "absolute" and w0.rotary_dim == 0
    windows = {"gpt_neo": (None, 3), "mistral": (4, 4)}
    assert (w0.window, w1.window) == windows.get(adapter.model_type, (None, None))
    if adapter.model_type == "gpt2":  # scale_attn_by_inverse_layer_idx
        assert w0.scale == pytest.approx(8**-0.5) and w1.scale == pytest.approx(8**-0.5 / 2)


def test_query_from_W_Q_matches_the_projection_module(adapter):
    # Check the per-head layout against the module that computes the queries.
    arch = adapter.arch
    acts = adapter.capture(_ids(), ["blocks.0.attn_in"])
    x = acts["blocks.0.attn_in"]
    w = adapter.attention_weights(0)
    q_BSAd = torch.einsum("bsD,hDd->bshd", x, w.W_Q_ADd) + w.b_Q_Ad
    with torch.no_grad():
        if arch.qkv_style == "separate":
            module_q = adapter.module("q_proj", 0)(x)
        else:
            fused = adapter.module("qkv_proj", 0)(x)
            if arch.qkv_style == "fused_split":
                module_q = fused[..., : adapter.d_model]
            else:  # per head [q | k | v]
                module_q = fused.view(*x.shape[:2], w.n_heads, 3 * w.head_dim)[..., : w.head_dim]
    assert _close(q_BSAd.reshape(*x.shape[:2], -1), module_q.reshape(*x.shape[:2], -1))


# --- MLP activation ----------------------------------------------------------------------------


def test_activation_is_the_models_own_and_lipschitz_bounds_it(adapter):
    w = adapter.mlp_weights(1)
    assert w.act is adapter.module("act", 1)
    expected = {"gelu": 1.13, "gelu_new": 1.13, "silu": 1.1, "gelu_pytorch_tanh": 1.13}
    assert w.lipschitz == expected[w.act_name]
    assert estimate_lipschitz(w.act) <= w.lipschitz


def test_lipschitz_estimate_of_known_functions():
    assert estimate_lipschitz(torch.relu) == 1.0
    assert estimate_lipschitz(torch.nn.functional.silu) == pytest.approx(1.1, abs=0.005)
    assert estimate_lipschitz(torch.nn.functional.gelu) == pytest.approx(1.13, abs=0.005)
    assert estimate_lipschitz(lambda x: 3 * torch.tanh(x)) == 3.0


# --- losses ------------------------------------------------------------------------------------


def test_token_losses_match_cross_entropy(adapter):
    ids = _ids()
    if adapter.arch.encoder:
        with pytest.raises(CrossintError, match="no next-token loss"):
            adapter.token_losses(ids)
        return
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with torch.no_grad():
        losses = adapter.token_losses(ids, attention_mask_BS=mask)
        logits = adapter.logits(ids, attention_mask_BS=mask).double()
    assert losses.shape == (2, ids.shape[1] - 1)
    naive = torch.empty(2, ids.shape[1] - 1, dtype=torch.float64)
    for b in range(2):
        for t in range(ids.shape[1] - 1):
            row = logits[b, t]
            naive[b, t] = torch.logsumexp(row, 0) - row[ids[b, t + 1]]
    assert torch.isnan(losses[0, -2:]).all() and not torch.isnan(losses[0, :-2]).any()
    keep = ~torch.isnan(losses)
    assert torch.allclose(losses[keep].double(), naive[keep], atol=1e-4)


# --- input checks ------------------------------------------------------------------------------


def test_bad_inputs_are_errors(adapter):
    with pytest.raises(CrossintError, match="2-D"):
        adapter.capture(torch.tensor([1, 2, 3]), ["blocks.0.mlp_in"])
    with pytest.raises(CrossintError, match="vocabulary"):
        adapter.capture(torch.tensor([[1, VOCAB]]), ["blocks.0.mlp_in"])
    with pytest.raises(CrossintError, match="context"):
        adapter.capture(torch.ones(1, adapter.max_context + 1, dtype=torch.long), "paper")
    with pytest.raises(CrossintError, match="out of range"):
        adapter.mlp_weights(adapter.n_blocks)


# --- loading -----------------------------------------------------------------------------------


def test_load_save_pretrained_directory(tiny_model_dir):
    adapter = load_model(tiny_model_dir)
    assert adapter.family == "gpt2" and adapter.n_blocks == 2 and adapter.d_model == 32
    assert adapter.max_context == 64 and adapter.tokenizer is not None
    assert adapter.name == str(tiny_model_dir)
    eos = adapter.tokenizer.eos_token_id
    assert eos in adapter.special_token_ids()
    ids = torch.tensor([adapter.tokenizer.encode("Once upon a time there was a cat.")])
    acts = adapter.capture(ids, "paper")
    assert len(acts) == 9 and acts["blocks.1.resid_post"].dtype == torch.float32
    assert adapter.token_losses(ids).shape == (1, ids.shape[1] - 1)


def test_dtype_and_device_plumbing(tiny_model_dir):
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = load_model(tiny_model_dir)
    wide = load_model(tiny_model_dir, device="cpu", dtype="float64")
    assert wide.dtype == torch.float64 and wide.device == torch.device("cpu")
    acts = wide.capture(ids, ["blocks.1.mlp_pre", "blocks.0.resid_mid"])
    assert all(t.dtype == torch.float64 for t in acts.values())
    assert wide.mlp_weights(0).W_in_DN.dtype == torch.float64
    assert wide.attention_weights(0).W_Q_ADd.dtype == torch.float64
    with torch.no_grad():
        assert wide.logits(ids).dtype == torch.float64
        assert _close(wide.logits(ids), ref.logits(ids), 1e-4)
    half = load_model(tiny_model_dir, dtype=torch.bfloat16)
    assert half.capture(ids, ["blocks.0.mlp_in"])["blocks.0.mlp_in"].dtype == torch.bfloat16
    assert parse_dtype("bf16") == torch.bfloat16
    with pytest.raises(CrossintError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="float8")
    with pytest.raises(CrossintError, match="unknown device"):
        load_model(tiny_model_dir, device="not-a-device")


def test_unknown_model_name_fails_fast_with_a_clear_error(tmp_path):
    with pytest.raises(CrossintError, match="not in the local Hugging Face cache"):
        load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(CrossintError, match="not a local directory"):
        load_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(CrossintError, match="no config.json"):
        load_model(tmp_path)


def test_storylm_name_maps_to_the_packaged_model(tiny_model_dir, monkeypatch):
    fake = types.ModuleType("crossint.toys.storylm")
    fake.default_model_path = lambda: tiny_model_dir
    monkeypatch.setitem(sys.modules, "crossint.toys.storylm", fake)
    adapter = load_model("storylm")
    assert adapter.name == "storylm" and adapter.family == "gpt2"


def test_unsupported_model_type_lists_supported_ones(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
        num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
    )  # fmt: skip
    model = OPTForCausalLM(config)
    with pytest.raises(CrossintError, match="unsupported model type 'opt'") as err:
        ModelAdapter(model)
    assert "gpt2" in str(err.value) and "llama" in str(err.value)
    model.save_pretrained(tmp_path)
    with pytest.raises(CrossintError, match="supported model types are"):
        load_model(tmp_path)
    with pytest.raises(CrossintError, match="bert, gemma, gpt2"):
        get_architecture("mamba")


def test_every_table_entry_is_tested():
    covered = {"gpt_neox" if f.startswith("gpt_neox") else f for f in FAMILIES}
    assert covered == set(ARCHITECTURES)


def test_load_encoder_directory_with_its_masked_lm_head(tmp_path):
    model = _build("bert")
    model.save_pretrained(tmp_path)
    adapter = load_model(tmp_path)
    assert adapter.family == "bert" and adapter.tokenizer is None
    ids = _ids()
    with torch.no_grad():
        assert _close(adapter.logits(ids), model(input_ids=ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device(tiny_model_dir):
    adapter = load_model(tiny_model_dir, device="cuda", dtype="bfloat16")
    ids = torch.tensor([[5, 6, 7, 8]])  # CPU ids are moved to the model's device
    acts = adapter.capture(ids, "paper")
    assert all(t.device.type == "cuda" and t.dtype == torch.bfloat16 for t in acts.values())
    assert adapter.mlp_weights(0).W_in_DN.device.type == "cuda"
    assert torch.isfinite(adapter.token_losses(ids)).all()
