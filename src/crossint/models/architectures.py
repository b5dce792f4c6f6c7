"""One small table entry per Hugging Face architecture family (SPEC §2).

An :class:`Architecture` names, relative to a block, the modules whose inputs and outputs *are*
the hookpoint tensors of SPEC §2, plus where the MLP and attention weights live and how to read
them. The adapter (``crossint.models.adapter``) turns these names into forward hooks and weight
tensors; nothing in it is specific to one family. Adding a family is one entry in
:data:`ARCHITECTURES`, keyed by ``config.model_type``.

Module paths are dotted attribute paths: ``blocks`` and ``final_norm`` from the model's
``base_model`` (e.g. ``GPT2Model`` inside ``GPT2LMHeadModel``), every other path from one block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from crossint.errors import CrossintError

# How the query/key/value projections are stored:
#   "separate"          three modules q, k, v (nn.Linear, out features = heads × head_dim)
#   "fused_split"       one module whose output is [q | k | v] along features (GPT-2 c_attn;
#                       Phi-3 qkv_proj, where k and v have the key/value heads' width)
#   "fused_interleaved" one module whose output is per head [q_h | k_h | v_h] (GPT-NeoX)
QKV_STYLES: tuple[str, ...] = ("separate", "fused_split", "fused_interleaved")
POSITIONAL: tuple[str, ...] = ("absolute", "rotary", "alibi")


def _config_value(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _no_window(config: Any, block: int) -> int | None:
    return None


def _not_parallel(config: Any) -> bool:
    return False


def _no_softcap(config: Any) -> float | None:
    return None


def _unit_residual_scale(config: Any) -> float:
    return 1.0


@dataclass(frozen=True)
class Architecture:
    """Where the SPEC §2 tensors of one family live. Paths are relative to one block.

    Hookpoint sites are read from these modules (every module is looked up by path):

    - ``resid_pre``: the block's input; ``resid_post``: the block's output.
    - ``attn_in``: the input of ``attn``, the module whose Q/K/V projections read it.
    - ``attn_out``: the output of ``attn_out`` (or its first element) times
      ``residual_scale``: the tensor added to the residual stream.
    - ``resid_mid``: pre-LN blocks: ``resid_pre + attn_out`` (exactly the sum the block
      computes; for parallel-residual blocks it is that sum, which the MLP does not read).
      Post-LN blocks: the output of ``attn_block`` (the attention sublayer after its LayerNorm).
    - ``mlp_in``: the input of ``mlp``; ``mlp_pre``: the output of ``mlp_in_linear`` (the gate
      for gated MLPs; its first half when ``gate_up_fused``); ``mlp_post``: the input of
      ``mlp_out_linear``; ``mlp_out``: the output of ``mlp_out_module`` times
      ``residual_scale``, the tensor added to the residual stream.

    Sandwich-norm blocks (Gemma 2/3, OLMo-2) normalise each sublayer's output before the residual
    add: ``attn_post_norm`` / ``mlp_post_norm`` name those norms, which are then also
    ``attn_out`` / ``mlp_out_module`` (their outputs are what the residual adds).
    """

    family: str
    blocks: str
    final_norm: str | None
    ln1: str | None
    attn: str
    attn_out: str
    ln2: str | None
    mlp: str
    mlp_in_linear: str
    act: str
    mlp_out_linear: str
    mlp_out_module: str
    qkv_style: str
    o_proj: str
    positional: str
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv_proj: str | None = None
    mlp_up_linear: str | None = None  # gated MLPs: the "up" projection multiplied into φ(gate)
    gate_up_fused: bool = False  # mlp_in_linear's output is [gate | up] (Phi-3 gate_up_proj)
    q_norm: str | None = None  # RMS norm of the queries (per head, or over all heads), pre-rotary
    k_norm: str | None = None
    attn_post_norm: str | None = None  # sandwich norms: applied to the sublayer output
    mlp_post_norm: str | None = None
    norm_offset: float = 0.0  # RMS norms scale by (norm_offset + weight): Gemma's 1 + weight
    attn_block: str | None = None  # post-LN: the attention sublayer including its LayerNorm
    post_ln: bool = False  # LayerNorm after each residual add (BERT-style encoders)
    encoder: bool = False  # bidirectional attention, masked-LM head, no next-token loss
    conv1d: bool = False  # GPT-2 Conv1D stores weights in×out (already D×N)
    parallel_residual: Callable[[Any], bool] = _not_parallel
    window: Callable[[Any, int], int | None] = _no_window  # local / sliding attention window
    act_name: Callable[[Any], str] = lambda config: str(
        _config_value(config, "activation_function", "hidden_act", "hidden_activation")
    )
    # The attention logit scale; None reads the attention module's own ``scaling``.
    scale: Callable[[Any, int], float] | None = None
    # Attention logits soft-capped as cap·tanh(score / cap) (Gemma 2); None: no cap.
    softcap: Callable[[Any], float | None] = _no_softcap
    # The residual adds residual_scale × each sublayer's output (Granite's residual_multiplier).
    residual_scale: Callable[[Any], float] = _unit_residual_scale
    max_context: Callable[[Any], int] = lambda config: int(
        _config_value(config, "n_positions", "max_position_embeddings", default=0)
    )

    def __post_init__(self) -> None:
        if self.qkv_style not in QKV_STYLES:
            raise ValueError(f"qkv_style must be one of {QKV_STYLES}, got {self.qkv_style!r}")
        if self.positional not in POSITIONAL:
            raise ValueError(f"positional must be one of {POSITIONAL}, got {self.positional!r}")
        separate = (self.q_proj, self.k_proj, self.v_proj)
        if self.qkv_style == "separate" and None in separate:
            raise ValueError("qkv_style 'separate' needs q_proj, k_proj and v_proj")
        if self.qkv_style != "separate" and self.qkv_proj is None:
            raise ValueError(f"qkv_style {self.qkv_style!r} needs qkv_proj")
        if self.post_ln and self.attn_block is None:
            raise ValueError("post-LN architectures need attn_block (the attention + LayerNorm)")
        if self.gate_up_fused and self.mlp_up_linear is not None:
            raise ValueError("gate_up_fused reads the up projection from mlp_in_linear")
        if (self.q_norm is None) != (self.k_norm is None):
            raise ValueError("q_norm and k_norm come together")


def _gpt2_scale(config: Any, block: int) -> float:
    # GPT-2 can switch off 1/sqrt(d_head) and optionally divide by the layer number.
    scale = 1.0
    if getattr(config, "scale_attn_weights", True):
        head_dim = config.hidden_size // config.num_attention_heads
        scale = head_dim**-0.5
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(block + 1)
    return scale


def _gpt_neo_window(config: Any, block: int) -> int | None:
    return config.window_size if config.attention_layers[block] == "local" else None


def _config_sliding_window(config: Any, block: int) -> int | None:
    # Mistral: one window for every layer (None = full causal attention).
    return getattr(config, "sliding_window", None)


def _layer_type_window(config: Any, block: int) -> int | None:
    # Qwen2/3, Gemma 2/3: layer_types says which layers use the sliding window.
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[block] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", False):
        return config.sliding_window
    return None


def _roberta_max_context(config: Any) -> int:
    # RoBERTa's positions start after the padding index, so two embeddings are never used.
    return int(config.max_position_embeddings) - int(config.pad_token_id) - 1


def _pre_ln_decoder(family: str, mlp_linears: tuple[str, str, str], **fields: Any) -> Architecture:
    """An entry for the common decoder layout: the ``attn`` module's output and the ``mlp``
    module's output are the tensors added to the residual stream (so they are also ``attn_out``
    and ``mlp_out_module``), and the MLP's in linear, activation and out linear are
    ``mlp_linears`` inside ``mlp``."""
    mlp_in_linear, act, mlp_out_linear = (f"mlp.{name}" for name in mlp_linears)
    return Architecture(
        family=family, attn_out=fields["attn"], mlp="mlp", mlp_out_module="mlp",
        mlp_in_linear=mlp_in_linear, act=act, mlp_out_linear=mlp_out_linear, **fields,
    )


GPT2 = _pre_ln_decoder(
    "gpt2",
    blocks="h", final_norm="ln_f", ln1="ln_1", ln2="ln_2",
    attn="attn", qkv_style="fused_split", qkv_proj="attn.c_attn", o_proj="attn.c_proj",
    mlp_linears=("c_fc", "act", "c_proj"),
    positional="absolute",
    conv1d=True,
    scale=_gpt2_scale,
)

# GPT-Neo keeps GPT-2's module names, with separate nn.Linear Q/K/V projections.
GPT_NEO = dataclasses.replace(
    GPT2,
    family="gpt_neo",
    qkv_style="separate", qkv_proj=None,
    q_proj="attn.attention.q_proj", k_proj="attn.attention.k_proj",
    v_proj="attn.attention.v_proj", o_proj="attn.attention.out_proj",
    conv1d=False,
    window=_gpt_neo_window,
    scale=lambda config, block: 1.0,  # GPT-Neo does not scale attention logits
)

GPT_NEOX = _pre_ln_decoder(
    "gpt_neox",
    blocks="layers", final_norm="final_layer_norm",
    ln1="input_layernorm", ln2="post_attention_layernorm",
    attn="attention", qkv_style="fused_interleaved", qkv_proj="attention.query_key_value",
    o_proj="attention.dense",
    mlp_linears=("dense_h_to_4h", "act", "dense_4h_to_h"),
    positional="rotary",
    parallel_residual=lambda config: bool(getattr(config, "use_parallel_residual", True)),
)

LLAMA = _pre_ln_decoder(
    "llama",
    blocks="layers", final_norm="norm", ln1="input_layernorm", ln2="post_attention_layernorm",
    attn="self_attn", qkv_style="separate",
    q_proj="self_attn.q_proj", k_proj="self_attn.k_proj", v_proj="self_attn.v_proj",
    o_proj="self_attn.o_proj",
    mlp_linears=("gate_proj", "act_fn", "down_proj"), mlp_up_linear="mlp.up_proj",
    positional="rotary",
)

def _sandwich(entry: Architecture, family: str, **fields: Any) -> Architecture:
    """A pre-LN entry whose sublayer outputs are normalised before the residual add (Gemma 2/3,
    OLMo-2): the post-norms' outputs are attn_out and mlp_out."""
    return dataclasses.replace(
        entry, family=family,
        attn_out="post_attention_layernorm", attn_post_norm="post_attention_layernorm",
        mlp_out_module="post_feedforward_layernorm", mlp_post_norm="post_feedforward_layernorm",
        **fields,
    )  # fmt: skip


GEMMA = dataclasses.replace(LLAMA, norm_offset=1.0)

# Gemma 2: ln1, attention, post-norm; pre-norm (ln2), MLP, post-norm; soft-capped logits.
GEMMA2 = _sandwich(
    GEMMA, "gemma2",
    ln2="pre_feedforward_layernorm",
    window=_layer_type_window,
    softcap=lambda config: getattr(config, "attn_logit_softcapping", None),
)

# Gemma 3: Gemma 2 plus per-head query/key norms (and per-layer-type rotary frequencies).
GEMMA3 = dataclasses.replace(
    GEMMA2, family="gemma3", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"
)

# Qwen3: Llama with per-head query/key norms.
QWEN3 = dataclasses.replace(
    LLAMA, family="qwen3", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
    window=_layer_type_window,
)  # fmt: skip

# OLMo-2: no pre-norms (attention and MLP read the residual), post-norms on both sublayers,
# query/key norms over all heads together.
OLMO2 = _sandwich(
    LLAMA, "olmo2",
    ln1=None, ln2=None, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
)  # fmt: skip

# Phi-3: Llama with fused qkv_proj ([q | k | v]) and gate_up_proj ([gate | up]).
PHI3 = dataclasses.replace(
    LLAMA, family="phi3",
    qkv_style="fused_split", qkv_proj="self_attn.qkv_proj", q_proj=None, k_proj=None, v_proj=None,
    mlp_in_linear="mlp.gate_up_proj", act="mlp.activation_fn", mlp_up_linear=None,
    gate_up_fused=True,
    window=_config_sliding_window,
)  # fmt: skip

# Granite: Llama whose residual adds residual_multiplier × each sublayer output (its embedding,
# attention and logit multipliers act outside the blocks or through the module's ``scaling``).
GRANITE = dataclasses.replace(
    LLAMA, family="granite", residual_scale=lambda config: float(config.residual_multiplier)
)

BERT = Architecture(
    family="bert",
    blocks="encoder.layer",
    final_norm=None,  # post-LN: every block already ends in a LayerNorm
    ln1=None, ln2="attention.output.LayerNorm",
    attn="attention.self", attn_out="attention.output.dense", attn_block="attention",
    qkv_style="separate",
    q_proj="attention.self.query", k_proj="attention.self.key", v_proj="attention.self.value",
    o_proj="attention.output.dense",
    mlp="intermediate", mlp_in_linear="intermediate.dense",
    act="intermediate.intermediate_act_fn",
    mlp_out_linear="output.dense", mlp_out_module="output.dense",
    positional="absolute",
    post_ln=True,
    encoder=True,
)


# Keyed by ``config.model_type``. Families that only differ in a config detail share an entry.
# Read-only: a family is added here, in code, never at run time.
ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {
        "gpt2": GPT2,
        "gpt_neo": GPT_NEO,
        "gpt_neox": GPT_NEOX,
        "llama": LLAMA,
        "qwen2": dataclasses.replace(LLAMA, window=_layer_type_window),
        "qwen3": QWEN3,
        "mistral": dataclasses.replace(LLAMA, window=_config_sliding_window),
        "gemma": GEMMA,
        "gemma2": GEMMA2,
        "gemma3_text": GEMMA3,
        "olmo2": OLMO2,
        "phi3": PHI3,
        "granite": GRANITE,
        "bert": BERT,
        "roberta": dataclasses.replace(BERT, max_context=_roberta_max_context),
    }
)


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def get_architecture(model_type: str) -> Architecture:
    """The table entry for ``config.model_type``, or an error listing the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise CrossintError(
            f"unsupported model type {model_type!r}: supported model types are "
            f"{', '.join(supported_model_types())}"
        ) from None
