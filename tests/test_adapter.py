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
    BlockInput,
    ModelAdapter,
    estimate_lipschitz,
    load_model,
    parse_dtype,
)
from crossint.models.architectures import ARCHITECTURES, get_architecture

VOCAB = 100
D_MODEL = 32
N_BLOCKS = 2


# Llama-like families: (config class, model class, what differs from the shared tiny config).
LLAMA_LIKE = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(mlp_bias=True, attention_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=8)),
    # Sandwich norms, soft-capped logits, sliding window on block 0.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=8, query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=5.0)),
    # Gemma 2 + per-head q/k norms, rotary frequencies per layer type.
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    # Per-head q/k norms, sliding window from block 1 on.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    # No pre-norms, post-norms, q/k norms over all heads together.
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(pad_token_id=0)),
    # Fused qkv and gate_up projections, partial rotary, sliding window.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=5,
        partial_rotary_factor=0.5)),
    # Residual, embedding, attention and logit multipliers.
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(
        residual_multiplier=0.3, embedding_multiplier=2.0, attention_multiplier=0.2,
        logits_scaling=2.0)),
}


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
    elif family in LLAMA_LIKE:
        config_class, model_class, overrides = LLAMA_LIKE[family]
        config = getattr(tf, config_class)(**{**llama_like, **overrides})
        model = getattr(tf, model_class)(config)
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
    # Larger-than-default weights so that nonlinearities and attention patterns matter, and
    # norm gains away from their initial 1 (or 0 for Gemma's 1 + weight) so that each counts.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "wte" not in name:
                param.mul_(5.0)
            elif "norm" in name.lower() and name.endswith("weight"):
                param.add_(0.3 * torch.randn_like(param))
    return model.eval()


FAMILIES = [
    "gpt2", "gpt_neo", "gpt_neox", "gpt_neox_sequential", "llama", "qwen2", "mistral", "gemma",
    "gemma2", "gemma3_text", "qwen3", "olmo2", "phi3", "granite", "bert", "roberta",
]  # fmt: skip
ENCODERS = {"bert", "roberta"}
PLAIN_MLP = {"gpt2", "gpt_neo", "gpt_neox", "bert", "roberta"}  # the others are gated


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request) -> ModelAdapter:
    return ModelAdapter(_build(request.param), name=request.param)


def _ids(batch: int = 2, seq: int = 9, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


def _close(a: Tensor, b: Tensor, tol: float = 1e-5) -> bool:
    a, b = a.double(), b.double()
    return bool(torch.allclose(a, b, atol=tol * max(1.0, float(b.abs().max())), rtol=tol))


def _rms_norm(norm, x: Tensor) -> Tensor:
    """Naive float64 RMS norm from exposed weights: x / sqrt(mean(x²) + eps) · gain."""
    x = x.double()
    return x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * norm.gain_F.double()


def _to_residual(w, output: Tensor) -> Tensor:
    """What the residual adds for a sublayer output: out_scale · out_norm(output), in float64."""
    output = output.double()
    if w.out_norm is not None:
        output = _rms_norm(w.out_norm, output)
    return output * w.out_scale


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
        assert w.gated == (adapter.model_type not in PLAIN_MLP)
        # Bit-exact: the same operations in the same order as the model's own forward.
        assert torch.equal(w.post(mlp_in_BSD), acts[f"blocks.{l}.mlp_post"])
        assert torch.equal(w.forward(mlp_in_BSD), acts[f"blocks.{l}.mlp_out"])
        # The same MLP in float64 from the raw tensors: φ(u·W_in + b_in) [* up] · W_out + b_out,
        # then the residual's post-norm / multiplier.
        u = mlp_in_BSD.double()
        post = w.act(u @ w.W_in_DN.double() + w.b_in_N.double())
        if w.gated:
            post = post * (u @ w.W_up_DN.double() + w.b_up_N.double())
        output = post @ w.W_out_ND.double() + w.b_out_D.double()
        assert _close(_to_residual(w, output), acts[f"blocks.{l}.mlp_out"])


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
            assert torch.equal(patched, reference)


def test_identity_patch_everywhere_at_once(adapter):
    ids = _ids()
    with torch.no_grad():
        reference = adapter.logits(ids)
        patched = adapter.logits(
            ids, patches={n: lambda x: x.clone() for n in adapter.hookpoints()}
        )
    assert torch.equal(patched, reference)


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
            assert torch.equal(_pre_norm(adapter, "ln1", l, a["resid_pre"]), a["attn_in"])
            assert torch.equal(a["resid_mid"], a["resid_pre"] + a["attn_out"])
            assert _close(a["resid_post"], a["resid_mid"] + a["mlp_out"])  # parallel: other order
            mlp_reads = a["resid_pre"] if adapter.parallel_residual else a["resid_mid"]
            assert torch.equal(_pre_norm(adapter, "ln2", l, mlp_reads), a["mlp_in"])
        w = adapter.mlp_weights(l)
        if not w.gated:
            assert _close(w.act(a["mlp_pre"]), a["mlp_post"])
        if l + 1 < adapter.n_blocks:
            assert torch.equal(a["resid_post"], acts[f"blocks.{l + 1}.resid_pre"])


def _pre_norm(adapter, role: str, block: int, x: Tensor) -> Tensor:
    """ln1 / ln2 applied to x; the identity for blocks without that norm (OLMo-2)."""
    if getattr(adapter.arch, role) is None:
        return x
    with torch.no_grad():
        return adapter.module(role, block)(x)


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
            assert _close(_pre_norm(adapter, "ln2", l, target), a["mlp_in"])
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


# --- family details ----------------------------------------------------------------------------


def test_fused_gate_up_mlp_pre_is_the_gate_half_and_patches_only_it():
    adapter = ModelAdapter(_build("phi3"))
    names = ["blocks.0.mlp_in", "blocks.0.mlp_pre", "blocks.0.mlp_post"]
    clean = adapter.capture(_ids(), names)
    with torch.no_grad():
        gate_up = adapter.module("mlp_in_linear", 0)(clean["blocks.0.mlp_in"])
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(clean["blocks.0.mlp_pre"], gate)
    w = adapter.mlp_weights(0)
    assert torch.equal(w.pre(clean["blocks.0.mlp_in"]), gate)
    target = torch.randn(gate.shape, generator=torch.Generator().manual_seed(5))
    patched = adapter.capture(_ids(), names, patches={"blocks.0.mlp_pre": lambda x: target})
    assert torch.equal(patched["blocks.0.mlp_post"], up * w.act(target))


def test_granite_sublayer_outputs_are_scaled_by_the_residual_multiplier():
    adapter = ModelAdapter(_build("granite"))
    assert adapter.residual_scale == 0.3
    outputs: list[Tensor] = []
    handle = adapter.module("attn", 0).register_forward_hook(
        lambda module, args, output: outputs.append(output[0]))
    try:
        acts = adapter.capture(_ids(), ["blocks.0.attn_out"])
    finally:
        handle.remove()
    assert torch.equal(acts["blocks.0.attn_out"], outputs[0] * 0.3)
    # A patched attn_out is what the residual adds.
    generator = torch.Generator().manual_seed(6)
    target = torch.randn(acts["blocks.0.attn_out"].shape, generator=generator)
    names = ["blocks.0.resid_pre", "blocks.0.resid_mid"]
    got = adapter.capture(_ids(), names, patches={"blocks.0.attn_out": lambda x: target})
    assert _close(got["blocks.0.resid_mid"], got["blocks.0.resid_pre"] + target, 1e-6)


@pytest.mark.parametrize("model_type, rope, problem", [
    ("phi3", dict(rope_type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4,
                  original_max_position_embeddings=32), "changes its frequencies"),
    ("qwen3", dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=32),
     "scales cos and sin by 1.069"),
])  # fmt: skip
def test_rotary_that_is_not_a_fixed_rotation_is_refused_by_attention_weights(
    model_type, rope, problem
):
    import transformers as tf

    config_class, model_class, overrides = LLAMA_LIKE[model_type]
    config = getattr(tf, config_class)(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_attention_heads=4, num_hidden_layers=N_BLOCKS,
        intermediate_size=64, max_position_embeddings=64, num_key_value_heads=2,
        **{**overrides, "partial_rotary_factor": 1.0, "head_dim": 8},
        rope_parameters={**rope, "rope_theta": 10_000.0},
    )  # fmt: skip
    adapter = ModelAdapter(getattr(tf, model_class)(config))
    with pytest.raises(CrossintError, match=f"{model_type} .* block 0: .*{problem}"):
        adapter.attention_weights(0)
    assert len(adapter.capture(_ids(), "paper")) == 4 * N_BLOCKS + 1  # hookpoints still work


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


def _qk_norm(norm, x_BASd: Tensor) -> Tensor:
    """A query/key norm: per head (gain of head_dim entries) or over all heads together."""
    if norm is None:
        return x_BASd
    if norm.gain_F.numel() == x_BASd.shape[-1]:
        return _rms_norm(norm, x_BASd)
    B, A, S, d = x_BASd.shape
    flat_BSF = x_BASd.transpose(1, 2).reshape(B, S, A * d)
    return _rms_norm(norm, flat_BSF).reshape(B, S, A, d).transpose(1, 2)


def _reference_attention(w: AttentionWeights, attn_in_BSD: Tensor) -> Tensor:
    """The attention sublayer recomputed from the exposed weights alone, in float64: what the
    residual adds (after the post-norm and the residual multiplier, where the model has them)."""
    x = attn_in_BSD.double()
    S = x.shape[1]
    rep = w.n_heads // w.n_kv_heads
    q = torch.einsum("bsD,hDd->bhsd", x, w.W_Q_ADd.double()) + w.b_Q_Ad.double()[None, :, None]
    k = torch.einsum("bsD,hDd->bhsd", x, w.W_K_ADd.double()) + w.b_K_Ad.double()[None, :, None]
    v = torch.einsum("bsD,hDd->bhsd", x, w.W_V_ADd.double()) + w.b_V_Ad.double()[None, :, None]
    q, k = _qk_norm(w.q_norm, q), _qk_norm(w.k_norm, k)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if w.positional == "rotary":
        q, k = _rotate(q, w.rotary_dim, w.rope_theta), _rotate(k, w.rotary_dim, w.rope_theta)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * w.scale
    if w.softcap is not None:
        scores = w.softcap * torch.tanh(scores / w.softcap)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = torch.ones(S, S, dtype=torch.bool)
    if w.causal:
        allowed &= j <= i
    if w.window is not None:
        allowed &= (i - j) < w.window
    pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    z = torch.einsum("bhij,bhjd->bhid", pattern, v)
    output = torch.einsum("bhid,hdD->biD", z, w.W_O_AdD.double()) + w.b_O_D.double()
    return _to_residual(w, output)


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
    expected_kv = {"gpt2": 4, "gpt_neo": 4, "gpt_neox": 4, "bert": 4, "roberta": 4, "gemma": 1}
    assert w0.n_kv_heads == expected_kv.get(adapter.model_type, 2)
    assert w0.kv_head(w0.n_heads - 1) == w0.n_kv_heads - 1
    assert w0.causal == (adapter.model_type not in ENCODERS)
    if w0.positional == "rotary":
        rd = w0.rotary_dim
        partial = adapter.model_type in ("gpt_neox", "phi3")  # rotary on half of d_head 8
        assert rd == (4 if partial else 8)
        for w in (w0, w1):
            freqs = w.rope_theta ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
            assert torch.allclose(w.rotary_inv_freq.double(), freqs, rtol=1e-6)
    else:
        assert w0.positional == "absolute" and w0.rotary_dim == 0
    if adapter.model_type == "gemma3_text":  # local and global layers turn at their own rates
        assert (w0.rope_theta, w1.rope_theta) == (10_000.0, 1_000_000.0)
    windows = {"gpt_neo": (None, 3), "mistral": (4, 4), "gemma2": (4, None),
               "gemma3_text": (4, None), "qwen3": (None, 4), "phi3": (5, 5)}
    assert (w0.window, w1.window) == windows.get(adapter.model_type, (None, None))
    assert w0.softcap == (5.0 if adapter.model_type == "gemma2" else None)
    qk_norm = adapter.model_type in ("gemma3_text", "qwen3", "olmo2")
    assert (w0.q_norm is not None) == (w0.k_norm is not None) == qk_norm
    sandwich = adapter.model_type in ("gemma2", "gemma3_text", "olmo2")
    assert (w0.out_norm is not None) == sandwich == (adapter.mlp_weights(0).out_norm is not None)
    assert w0.out_scale == (0.3 if adapter.model_type == "granite" else 1.0)
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


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "mlp_out", "resid_post"])
def test_a_pass_started_at_a_block_equals_the_full_pass(adapter, site):
    """Eval and fidelity start a patched pass at the patched block from the clean residual
    stream, with variants stacked along the batch: the losses must be the full pass's."""
    if adapter.arch.encoder:
        return
    ids = _ids(seq=7).repeat(2, 1)  # two variants of the same texts stacked along the batch
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for l in range(adapter.n_blocks):
            resid_pre = adapter.capture(ids, [f"blocks.{l}.resid_pre"])[f"blocks.{l}.resid_pre"]
            noise = torch.randn(resid_pre.shape, generator=gen)
            patches = {f"blocks.{l}.{site}": lambda x, noise=noise: x + noise}
            full = adapter.token_losses(ids, patches=patches)
            mlp_shapes: list[tuple] = []  # (a one-token probe of the block output may run)
            handle = adapter.module("mlp", 0).register_forward_hook(
                lambda module, args, out, shapes=mlp_shapes: shapes.append(tuple(out.shape[:2])))
            try:
                started = adapter.token_losses(ids, patches=patches,
                                               start=BlockInput(l, resid_pre))
            finally:
                handle.remove()
            assert _close(started, full, 1e-6), l
            assert (tuple(ids.shape) in mlp_shapes) == (l == 0)  # blocks before l did not run
            assert not any("forward" in vars(block) for block in adapter._blocks)


def test_a_started_pass_refuses_patches_before_its_block(adapter):
    if adapter.arch.encoder:
        return
    ids = _ids()
    resid_pre = adapter.capture(ids, ["blocks.1.resid_pre"])["blocks.1.resid_pre"]
    with pytest.raises(CrossintError, match="lies before block 1"):
        adapter.logits(ids, patches={"blocks.0.mlp_out": lambda x: x},
                       start=BlockInput(1, resid_pre))
    with pytest.raises(CrossintError, match="expected"):
        adapter.logits(ids, start=BlockInput(1, resid_pre[:1]))
    assert not any("forward" in vars(block) for block in adapter._blocks)


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
    with pytest.raises(CrossintError, match="bert, gemma, gemma2, gemma3_text, gpt2") as err:
        get_architecture("mamba")
    assert "'mamba'" in str(err.value)
    for family in ("granite", "olmo2", "phi3", "qwen3"):
        assert family in str(err.value)


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


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "qwen3", "granite"])
def test_end_to_end_chain_refuses_variants_its_constants_do_not_bound(family):
    """The bound chain's Lipschitz constants are for plain pre-LN blocks (SPEC §7)."""
    from crossint.analysis.bound_chain import _check_chainable

    model = ModelAdapter(_build(family), name=family)
    with pytest.raises(CrossintError, match=f"does not cover {model.family}.*--no-chain"):
        _check_chainable(model, model.attention_weights(0), model.mlp_weights(0))
    plain = ModelAdapter(_build("llama"), name="llama")
    _check_chainable(plain, plain.attention_weights(0), plain.mlp_weights(0))


@pytest.mark.parametrize("family", ["gemma2", "olmo2", "granite"])
def test_surrogate_mlp_outputs_are_what_the_residual_adds(family):
    """Fidelity's surrogates splice at mlp_out, which for sandwich-norm and Granite models is
    the MLP module's output after the post-norm or multiplier."""
    from crossint.analysis.fidelity import surrogate_outputs
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.model import Crosscoder
    from crossint.interactions import feature_blocks

    model = ModelAdapter(_build(family), name=family)
    D = model.d_model
    config = CrosscoderConfig(hookpoints=["blocks.0.mlp_in"], models=["m"], d_model=D,
                              n_features=8, k=4, activation="topk")
    crosscoder = Crosscoder(config, seed=0)
    (block,) = feature_blocks(crosscoder, {0: model.mlp_weights(0)}, dtype=torch.float64)
    f_TH = torch.rand(5, 8, dtype=torch.float64)
    out = surrogate_outputs(f_TH, block, ["none"])["none"]
    xhat_TD = block.b_dec_D + f_TH @ block.d_HD
    mlp = model.mlp_weights(0)
    expected = mlp.to_residual(mlp.post(xhat_TD.float()) @ mlp.W_out_ND + mlp.b_out_D)
    assert torch.allclose(out.float(), expected, atol=1e-4)
