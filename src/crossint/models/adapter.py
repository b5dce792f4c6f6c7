"""The model adapter (SPEC §2): hookpoint names ⇄ Hugging Face modules, capture and patch, weights.

``load_model(name_or_path)`` returns a :class:`ModelAdapter` over a ``transformers`` model. The
adapter addresses activations by SPEC §2 hookpoint names (``blocks.{l}.{site}``), captures any set
of them in one forward pass that stops after the last one it needs, replaces them during a forward
pass (splicing), and exposes each block's MLP and attention weights in raw (unfolded) form.

Where each site is read, per architecture (module paths in ``architectures.py``):

Pre-LN blocks (GPT-2, GPT-Neo, GPT-NeoX, Llama family)
    ``resid_pre`` block input · ``attn_in`` ln1 output (= attention input) · ``attn_out``
    attention output · ``resid_mid`` = resid_pre + attn_out, the exact sum the block adds ·
    ``mlp_in`` ln2 output (= MLP input) · ``mlp_pre`` first linear's output (the gate for gated
    MLPs) · ``mlp_post`` output linear's input · ``mlp_out`` MLP output · ``resid_post`` block
    output. For *parallel-residual* blocks (GPT-NeoX with ``use_parallel_residual``) the MLP reads
    ln2(resid_pre), not resid_mid; resid_mid is still defined as resid_pre + attn_out so that
    resid_post = resid_mid + mlp_out holds for every pre-LN block.

Post-LN blocks (BERT, RoBERTa): ``x_mid = LN_a(x + attn(x))``, ``x_out = LN_m(x_mid + mlp(x_mid))``
    ``resid_pre`` = x (block input) · ``attn_in`` = x too (Q/K/V read the block input directly;
    patching it changes only what Q/K/V read) · ``attn_out`` = the attention output projection,
    the tensor added to the residual before LN_a · ``resid_mid`` = x_mid: after the add *and* LN_a,
    because that normalised tensor is what flows on as the residual · ``mlp_in`` = x_mid as well
    (exactly what the first linear reads; patching it changes only the MLP's input, patching
    resid_mid changes both the MLP's input and the residual) · ``mlp_pre``/``mlp_post`` as above ·
    ``mlp_out`` = the MLP output projection, added to x_mid before LN_m · ``resid_post`` = x_out,
    the block output after LN_m.

Sandwich-norm blocks (Gemma 2/3, OLMo-2) normalise each sublayer's output before the residual add:
``resid_mid = resid_pre + N_a(attn(ln1(resid_pre)))``, ``resid_post = resid_mid +
N_m(mlp(ln2(resid_mid)))`` (OLMo-2 has no ln1/ln2). The sites keep their meaning: ``attn_out`` and
``mlp_out`` are the *post-norm* outputs (what the residual adds), ``resid_mid`` is the residual
between the sublayers, ``attn_in``/``mlp_in`` what the Q/K/V and the MLP's first linear read
(after ln1/ln2; the residual itself in OLMo-2). Granite adds ``residual_multiplier ×`` each
sublayer output: ``attn_out``/``mlp_out`` are those products.

Patching ``resid_mid`` of a pre-LN block replaces the attention output by ``target − resid_pre``
(resid_pre as seen in the same pass), so everything downstream — the residual and the MLP input —
sees the target, exact to rounding; elements the patch leaves unchanged keep the model's own
values, so the identity patch is exact.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import mmap
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from crossint.errors import CrossintError
from crossint.models import hookpoints as hp
from crossint.models.architectures import Architecture, get_architecture

PatchFn = Callable[[Tensor], Tensor]

# SPEC §4.3: an upper bound on |φ'| (rounded up). GELU' peaks at 1.1289, SiLU' at 1.0998;
# quick_gelu = x·σ(1.702x) has the same peak slope as SiLU.
_LIPSCHITZ: Mapping[str, float] = MappingProxyType(
    {
        "relu": 1.0,
        "relu6": 1.0,
        "leaky_relu": 1.0,
        "tanh": 1.0,
        "linear": 1.0,
        "gelu": 1.13,
        "gelu_new": 1.13,
        "gelu_fast": 1.13,
        "gelu_accurate": 1.13,
        "gelu_python": 1.13,
        "gelu_pytorch_tanh": 1.13,
        "gelu_10": 1.13,
        "silu": 1.1,
        "swish": 1.1,
        "quick_gelu": 1.1,
    }
)


class _StopForward(Exception):
    """Raised by a hook once every requested tensor is captured; caught by the adapter."""


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NormWeights:
    """An RMS norm ``x / sqrt(mean(x²) + eps) · gain`` over the last axis. ``gain`` is the
    effective multiplier (Gemma's ``1 + weight``), in float32; ``apply`` is the model's own
    module, exact in every dtype."""

    gain_F: Tensor
    eps: float
    apply: Callable[[Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class MLPWeights:
    """One block's MLP in raw weights: ``MLP(u) = φ(u·W_in + b_in)·W_out + b_out`` (SPEC §4).

    Gated MLPs (Llama family): ``MLP(u) = (φ(u·W_in + b_in) * (u·W_up + b_up))·W_out + b_out``,
    where W_in is the gate projection. Note that the SPEC §4.3 bound is stated for plain MLPs;
    for gated ones the up projection multiplies the activation.
    Tensors are the model's own (treat them as read-only), in D×N / N×D orientation.

    ``MLP(u)`` is the MLP module's output. What the residual adds (``mlp_out``) is
    ``out_scale · out_norm(MLP(u))``: ``out_norm`` is the post-MLP norm of sandwich-norm models
    (Gemma 2/3, OLMo-2), ``out_scale`` Granite's residual multiplier (None and 1 elsewhere).
    """

    W_in_DN: Tensor
    b_in_N: Tensor
    W_out_ND: Tensor
    b_out_D: Tensor
    act: Callable[[Tensor], Tensor]
    act_name: str
    lipschitz: float
    W_up_DN: Tensor | None = None
    b_up_N: Tensor | None = None
    out_norm: NormWeights | None = None
    out_scale: float = 1.0

    @property
    def gated(self) -> bool:
        return self.W_up_DN is not None

    def pre(self, mlp_in_BD: Tensor) -> Tensor:
        """Neuron pre-activations z = mlp_in·W_in + b_in (gate pre-activations if gated)."""
        u_BD = mlp_in_BD.to(self.W_in_DN.dtype)
        return u_BD @ self.W_in_DN + self.b_in_N

    def post(self, mlp_in_BD: Tensor) -> Tensor:
        """What the output linear reads: φ(z), or φ(gate)·up for gated MLPs."""
        post_BN = self.act(self.pre(mlp_in_BD))
        if self.W_up_DN is not None:
            assert self.b_up_N is not None
            post_BN = post_BN * (mlp_in_BD.to(self.W_up_DN.dtype) @ self.W_up_DN + self.b_up_N)
        return post_BN

    def forward(self, mlp_in_BD: Tensor) -> Tensor:
        """The MLP output added to the residual stream (``mlp_out``), rebuilt from these
        weights."""
        return self.to_residual(self.post(mlp_in_BD) @ self.W_out_ND + self.b_out_D)

    def to_residual(self, output_BD: Tensor) -> Tensor:
        """What the residual adds for the MLP module's output ``output_BD`` (the identity
        unless the model has a post-MLP norm or a residual multiplier), in the model's order."""
        if self.out_norm is not None:
            output_BD = self.out_norm.apply(output_BD)
        return output_BD if self.out_scale == 1.0 else output_BD * self.out_scale


@dataclass(frozen=True, eq=False)
class AttentionWeights:
    """One block's attention in raw per-head weights (SPEC §5). A = attention heads, d = head_dim.

    ``q_h = attn_in·W_Q[h] + b_Q[h]`` (likewise K, V), then rotary (if any) on the first
    ``rotary_dim`` dims of q and k in the rotate-half convention: dims i and i + rotary_dim/2
    turn together by the angle ``position·rotary_inv_freq[i]``. ``score = scale·q·kᵀ``, causal
    unless the model is an encoder, and a key j is visible from query i only if
    ``i − j < window`` when ``window`` is set (local / sliding-window attention). Output
    ``Σ_h softmax(score)·v_h·W_O[h] + b_O``. Grouped-query attention: W_K / W_V have
    ``n_kv_heads`` heads and query head h reads kv head ``h // (n_heads // n_kv_heads)``.
    Missing biases are zeros.

    Variants (None / 1 where absent): ``q_norm``/``k_norm`` normalise q and k before rotary,
    per head when their gain has ``head_dim`` entries (Qwen3, Gemma 3), else over all heads'
    features together (OLMo-2); ``softcap`` replaces the score by ``softcap·tanh(score /
    softcap)`` before masking (Gemma 2); the residual adds ``out_scale · out_norm(output)``
    (sandwich norms of Gemma 2/3 and OLMo-2; Granite's residual multiplier), which is
    ``attn_out``. ``family`` names the architecture, for error messages.
    """

    W_Q_ADd: Tensor
    W_K_ADd: Tensor
    W_V_ADd: Tensor
    b_Q_Ad: Tensor
    b_K_Ad: Tensor
    b_V_Ad: Tensor
    W_O_AdD: Tensor
    b_O_D: Tensor
    n_kv_heads: int
    scale: float
    positional: str
    rotary_dim: int
    rope_theta: float | None
    rotary_inv_freq: Tensor | None = None
    window: int | None = None
    causal: bool = True
    q_norm: NormWeights | None = None
    k_norm: NormWeights | None = None
    softcap: float | None = None
    out_norm: NormWeights | None = None
    out_scale: float = 1.0
    family: str = ""

    @property
    def n_heads(self) -> int:
        return self.W_Q_ADd.shape[0]

    @property
    def head_dim(self) -> int:
        return self.W_Q_ADd.shape[2]

    def kv_head(self, head: int) -> int:
        """The key/value head that query head ``head`` reads (grouped-query attention)."""
        return head // (self.n_heads // self.n_kv_heads)


def _rotary_problem(rope_type: str | None, cos_scale: float) -> str | None:
    """Why a rotary embedding is not the fixed rotation AttentionWeights describes, or None."""
    if rope_type in ("dynamic", "longrope"):
        return "changes its frequencies with the sequence length"
    if cos_scale != 1.0:  # yarn, longrope: q·k would be scaled by cos_scale²
        return f"scales cos and sin by {cos_scale:.4g}"
    return None


def _in_out_weight(module: nn.Module, conv1d: bool) -> tuple[Tensor, Tensor | None]:
    """A linear layer's weight as (in, out) and its bias, detached from autograd."""
    weight = module.weight.detach()
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    # nn.Linear stores out×in; GPT-2's Conv1D already stores in×out.
    return (weight if conv1d else weight.t().contiguous()), bias


def _bias_or_zeros(bias: Tensor | None, n: int, like: Tensor) -> Tensor:
    return bias if bias is not None else torch.zeros(n, dtype=like.dtype, device=like.device)


def estimate_lipschitz(
    act: Callable[[Tensor], Tensor], lo: float = -20.0, hi: float = 20.0
) -> float:
    """max |φ'| on a fine grid, rounded up to 0.01: for activations not in the table."""
    x = torch.linspace(lo, hi, 400_001, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(act(x).sum(), x)
    return math.ceil(float(grad.abs().max()) * 100 - 1e-9) / 100


def activation_lipschitz(act_name: str, act: Callable[[Tensor], Tensor]) -> float:
    """Lip(φ) for SPEC §4.3: the table value, else a numerical estimate of max |φ'|."""
    if act_name in _LIPSCHITZ:
        return _LIPSCHITZ[act_name]
    return estimate_lipschitz(act)


# ----------------------------------------------------------------------------------------------
# Hook plumbing
# ----------------------------------------------------------------------------------------------


def _first_input(args: tuple, kwargs: dict, where: str) -> Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError(f"cannot find the hidden-state input of module {where}")


def _with_first_input(args: tuple, kwargs: dict, new: Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _first_output(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_first_output(output: Any, new: Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new


def _apply_patch(name: str, fn: PatchFn, original: Tensor) -> Tensor:
    new = fn(original)
    if not isinstance(new, Tensor) or tuple(new.shape) != tuple(original.shape):
        got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise CrossintError(
            f"patch for {name} returned {got}: it must return a tensor of the original shape "
            f"{tuple(original.shape)}"
        )
    return new.to(device=original.device, dtype=original.dtype)


@dataclass(frozen=True)
class _View:
    """How a site's tensor is read from a module's output, and how a patched site tensor is
    written back: ``write(output, read, patched)`` returns the module output to continue with."""

    read: Callable[[Tensor], Tensor]
    write: Callable[[Tensor, Tensor, Tensor], Tensor]


_PLAIN = _View(read=lambda y: y, write=lambda y, read, new: new)


def _scaled_view(scale: float) -> _View:
    """The residual adds ``scale ×`` the module output (Granite): the site is that product. A
    patch is divided back by ``scale``, except where it left the product unchanged: those
    elements keep the module's own value, so the identity patch is exact."""
    if scale == 1.0:
        return _PLAIN
    return _View(
        read=lambda y: y * scale,
        write=lambda y, read, new: torch.where(new == read, y, new / scale),
    )


def _gate_half_view(width: int) -> _View:
    """A fused [gate | up] projection output (Phi-3): the site is the gate half; a patch
    replaces only that half."""
    return _View(
        read=lambda y: y[..., :width],
        write=lambda y, read, new: torch.cat([new, y[..., width:]], dim=-1),
    )


class _Pass:
    """What one forward pass captures and patches, and what it has captured so far."""

    def __init__(self, capture: Sequence[str], patches: Mapping[str, PatchFn], stop_at: str | None):
        self.capture = set(capture)
        self.patches = dict(patches)
        self.stop_at = stop_at
        self.captured: dict[str, Tensor] = {}
        self.resid_pre: dict[int, Tensor] = {}

    def visit(self, name: str, tensor: Tensor) -> Tensor:
        fn = self.patches.get(name)
        if fn is not None:
            tensor = _apply_patch(name, fn, tensor)
        self.record(name, tensor)
        return tensor

    def record(self, name: str, tensor: Tensor) -> None:
        if name in self.capture:
            self.captured[name] = tensor.detach()

    def maybe_stop(self, name: str) -> None:
        if name == self.stop_at:
            raise _StopForward


class BlockInput(NamedTuple):
    """Where a patched pass can start: ``resid_pre_BSD``, the residual stream entering block
    ``block`` in an unpatched pass over the same tokens. A pass given it skips blocks
    0..block−1 (their output is this tensor), so a patch in block l costs the blocks from l on
    rather than the whole model."""

    block: int
    resid_pre_BSD: Tensor


class _BlockHooks:
    """The hooks one pass puts on one block: each hands its site's tensor to the pass (capture,
    patch, stop) and puts a patched tensor back into the forward pass. ``handles`` keeps what
    was registered, for removal."""

    def __init__(self, l: int, sites: set[str], state: _Pass) -> None:
        self.l = l
        self.sites = sites
        self.state = state
        self.name = {site: hp.hookpoint(l, site) for site in hp.SITES}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def on_input(self, module: nn.Module, site: str, store_resid: bool = False) -> None:
        """``site`` is the first input of ``module``. ``store_resid``: also keep the (patched)
        input as the block's resid_pre, from which resid_mid is derived."""
        name, state = self.name[site], self.state

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            x = _first_input(args, kwargs, name)
            new = state.visit(name, x) if site in self.sites else x
            if store_resid:
                state.resid_pre[self.l] = new
            if site in self.sites:
                state.maybe_stop(name)
            return _with_first_input(args, kwargs, new) if new is not x else None

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def on_output(self, module: nn.Module, site: str, view: _View = _PLAIN) -> None:
        """``site`` is ``view.read`` of the output (or its first element) of ``module``."""
        name, state = self.name[site], self.state

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            y = _first_output(output)
            seen = view.read(y)
            new = state.visit(name, seen)
            state.maybe_stop(name)
            return _with_first_output(output, view.write(y, seen, new)) if new is not seen else None

        self.handles.append(module.register_forward_hook(hook))

    def on_derived_resid_mid(self, attn_out: nn.Module, view: _View = _PLAIN) -> None:
        """Pre-LN blocks: resid_mid from the output of the ``attn_out`` module, read through
        ``view`` (needs the block's resid_pre stored by :meth:`on_input`)."""

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            return self._resid_mid(output, view)

        self.handles.append(attn_out.register_forward_hook(hook))

    def _resid_mid(self, output: Any, view: _View) -> Any:
        # SPEC §2, pre-LN: resid_mid = resid_pre + attn_out, the block's own sum (the
        # addition is commutative, so this is bit-identical to the model's).
        state, name = self.state, self.name
        out = _first_output(output)
        attn_out = view.read(out)
        resid_pre = state.resid_pre[self.l]
        resid_mid = resid_pre + attn_out
        fn = state.patches.get(name["resid_mid"])
        new_out = attn_out
        if fn is not None:
            target = _apply_patch(name["resid_mid"], fn, resid_mid)
            # The block adds attn_out to resid_pre: make that sum equal the target. Elements
            # the patch left unchanged keep attn_out, so they stay exact (target − resid_pre
            # can differ from attn_out in the last bit).
            new_out = torch.where(target == resid_mid, attn_out, target - resid_pre)
            resid_mid = target
            state.record(name["attn_out"], new_out)
        state.record(name["resid_mid"], resid_mid)
        state.maybe_stop(name["resid_mid"])
        if new_out is attn_out:
            return None
        return _with_first_output(output, view.write(out, attn_out, new_out))


# ----------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------


class ModelAdapter:
    """A ``transformers`` model addressed by SPEC §2 hookpoint names.

    Build it with :func:`load_model`, or directly from an in-memory model:
    ``ModelAdapter(model, tokenizer=None, name="my-model")``. The model is put in eval mode.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, name: str | None = None) -> None:
        config = model.config
        self.arch: Architecture = get_architecture(getattr(config, "model_type", None))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.model_type: str = config.model_type
        self.name: str = name or getattr(config, "_name_or_path", "") or config.model_type
        self.family: str = self.arch.family
        base = getattr(model, "base_model", model)
        self._base = base
        self._blocks = self._lookup(base, self.arch.blocks, "the block list")
        self.n_blocks: int = len(self._blocks)
        for role, path in self._block_paths().items():
            self._lookup(self._blocks[0], path, role)
        for block in self._blocks:
            # BERT can split the MLP over sequence chunks, which would fire hooks per chunk;
            # chunking only saves memory, so switch it off.
            if getattr(block, "chunk_size_feed_forward", 0):
                block.chunk_size_feed_forward = 0
        self.d_model: int = int(config.hidden_size)
        self.d_mlp: int = int(self._mlp_in_weights(0)[0].shape[1])
        self.vocab_size: int = int(config.vocab_size)
        self.max_context: int = self.arch.max_context(config)
        self.parallel_residual: bool = self.arch.parallel_residual(config)
        self.residual_scale: float = float(self.arch.residual_scale(config))
        self._rotary_emb = self._find_rotary()

    # -- names ---------------------------------------------------------------------------------

    def hookpoints(self) -> list[str]:
        """Every valid hookpoint name, in forward order."""
        return hp.all_hookpoints(self.n_blocks)

    def resolve_layout(self, layout: str | Sequence[str]) -> list[str]:
        """``"paper"`` (SPEC §2, 4L+1 names), ``"resid"``, or an explicit (comma-separated) list."""
        return hp.resolve_layout(layout, self.n_blocks)

    def hookpoint_dim(self, name: str) -> int:
        """d_mlp for mlp_pre / mlp_post, d_model for every other site."""
        _, site = hp.parse_hookpoint(name, self.n_blocks)
        return self.d_mlp if site in ("mlp_pre", "mlp_post") else self.d_model

    def special_token_ids(self) -> set[int]:
        """BOS/EOS/PAD/CLS/SEP/... ids: tokens a harvest leaves out by default."""
        ids: set[int] = set()
        if self.tokenizer is not None:
            ids.update(int(i) for i in getattr(self.tokenizer, "all_special_ids", []))
        for attr in (
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "sep_token_id",
            "cls_token_id",
        ):
            value = getattr(self.config, attr, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            ids.update(int(v) for v in values if isinstance(v, int) and 0 <= v < self.vocab_size)
        return ids

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def module(self, role: str, block: int | None = None) -> nn.Module:
        """The module the architecture table names ``role`` (e.g. ``"ln2"``, ``"mlp"``) in
        ``block``, or a model-level one (``"final_norm"``, ``"blocks"``) when block is None."""
        path = getattr(self.arch, role, None)
        if not isinstance(path, str):
            raise CrossintError(
                f"{self.model_type} has no module for role {role!r}; roles with a module: "
                f"{', '.join(sorted(self._block_paths()))}, blocks, final_norm"
            )
        if block is None:
            return self._lookup(self._base, path, role)
        return self._module(block, path)

    # -- forward passes ------------------------------------------------------------------------

    def capture(
        self,
        input_ids_BS: Tensor,
        hookpoints: str | Sequence[str],
        attention_mask_BS: Tensor | None = None,
        patches: Mapping[str, PatchFn] | None = None,
    ) -> dict[str, Tensor]:
        """Capture the named hookpoints (a list, or a layout name) in one no-grad forward pass
        that stops right after the last of them; returns ``{name: Tensor(B, S, dim)}`` in the
        order asked. ``patches`` (optional) are applied in the same pass, as in :meth:`logits`,
        and the captured tensors are the (patched) values the model computed with."""
        names = self.resolve_layout(hookpoints)
        patches = self._check_patches(patches)
        stop_at = max(names, key=lambda n: hp.sort_key(n, self.n_blocks))
        state = _Pass(names, patches, stop_at)
        with torch.no_grad():
            self._run(input_ids_BS, attention_mask_BS, state)
        missing = [n for n in names if n not in state.captured]
        if missing:
            raise RuntimeError(f"hooks did not fire for {missing} on {self.model_type}")
        return {n: state.captured[n] for n in names}

    def logits(
        self,
        input_ids_BS: Tensor,
        attention_mask_BS: Tensor | None = None,
        patches: Mapping[str, PatchFn] | None = None,
        start: BlockInput | None = None,
    ) -> Tensor:
        """Output logits (B, S, V), with ``patches={hookpoint: fn(original_BSD) -> new_BSD}``
        replacing tensors during the pass. ``start`` (a :class:`BlockInput` for the same
        tokens) runs only the blocks from ``start.block`` on; the patches must lie there. Runs
        in the caller's grad mode (wrap it in ``torch.no_grad()`` unless you need gradients
        through the model)."""
        state = _Pass((), self._check_patches(patches), None)
        output = self._run(input_ids_BS, attention_mask_BS, state, start)
        logits = getattr(output, "logits", None)
        if logits is None:
            raise CrossintError(
                f"model {self.name!r} ({type(self.model).__name__}) has no output head: load it "
                f"with a language-model head (AutoModelForCausalLM / AutoModelForMaskedLM)"
            )
        return logits

    def token_losses(
        self,
        input_ids_BS: Tensor,
        attention_mask_BS: Tensor | None = None,
        patches: Mapping[str, PatchFn] | None = None,
        start: BlockInput | None = None,
    ) -> Tensor:
        """Next-token cross-entropy (B, S-1): entry t is the loss of predicting token t+1.
        ``patches`` and ``start`` as in :meth:`logits`.

        Positions whose target is padding (attention mask 0) are NaN, so that a plain mean
        cannot silently include them (use ``nanmean`` or the mask)."""
        if self.arch.encoder:
            raise CrossintError(
                f"model {self.name!r} is a {self.model_type} encoder: it has no next-token loss; "
                f"use a causal language model (gpt2, gpt_neo, gpt_neox, llama, ...) for losses"
            )
        input_ids_BS = self._check_input_ids(input_ids_BS)
        logits_BSV = self.logits(input_ids_BS, attention_mask_BS, patches, start)
        logprobs_BSV = torch.log_softmax(logits_BSV[:, :-1].float(), dim=-1)
        targets_BS = input_ids_BS[:, 1:]
        losses_BS = -logprobs_BSV.gather(-1, targets_BS.unsqueeze(-1)).squeeze(-1)
        if attention_mask_BS is not None:
            keep_BS = attention_mask_BS[:, 1:].to(losses_BS.device).bool()
            losses_BS = losses_BS.masked_fill(~keep_BS, float("nan"))
        return losses_BS

    # -- weights -------------------------------------------------------------------------------

    def mlp_weights(self, block: int) -> MLPWeights:
        """Block ``block``'s MLP weights (SPEC §4), D×N / N×D, with the model's own φ."""
        arch = self.arch
        W_in_DN, b_in, W_up_DN, b_up = self._mlp_in_weights(block)
        W_out_ND, b_out = _in_out_weight(self._module(block, arch.mlp_out_linear), arch.conv1d)
        b_up_N = None if W_up_DN is None else _bias_or_zeros(b_up, W_up_DN.shape[1], W_up_DN)
        act = self._module(block, arch.act)
        act_name = arch.act_name(self.config)
        return MLPWeights(
            W_in_DN=W_in_DN,
            b_in_N=_bias_or_zeros(b_in, W_in_DN.shape[1], W_in_DN),
            W_out_ND=W_out_ND,
            b_out_D=_bias_or_zeros(b_out, W_out_ND.shape[1], W_out_ND),
            act=act,
            act_name=act_name,
            lipschitz=activation_lipschitz(act_name, act),
            W_up_DN=W_up_DN,
            b_up_N=b_up_N,
            out_norm=self._norm(block, arch.mlp_post_norm),
            out_scale=self.residual_scale,
        )

    def attention_weights(self, block: int) -> AttentionWeights:
        """Block ``block``'s attention weights per head (SPEC §5); see :class:`AttentionWeights`."""
        arch = self.arch
        n_heads = int(self.config.num_attention_heads)
        (W_q, b_q), (W_k, b_k), (W_v, b_v), head_dim, n_kv = self._qkv(block, n_heads)
        W_o, b_o = _in_out_weight(self._module(block, arch.o_proj), arch.conv1d)
        d_model = W_q.shape[0]

        def per_head_ADd(W_DF: Tensor, heads: int) -> Tensor:
            return W_DF.reshape(d_model, heads, head_dim).permute(1, 0, 2).contiguous()

        rotary_dim, rope_theta, inv_freq = 0, None, None
        if arch.positional == "rotary":
            rotary_dim, rope_theta, inv_freq = self._rotary(block)
        return AttentionWeights(
            W_Q_ADd=per_head_ADd(W_q, n_heads),
            W_K_ADd=per_head_ADd(W_k, n_kv),
            W_V_ADd=per_head_ADd(W_v, n_kv),
            b_Q_Ad=b_q.reshape(n_heads, head_dim),
            b_K_Ad=b_k.reshape(n_kv, head_dim),
            b_V_Ad=b_v.reshape(n_kv, head_dim),
            W_O_AdD=W_o.reshape(n_heads, head_dim, W_o.shape[1]).contiguous(),
            b_O_D=_bias_or_zeros(b_o, W_o.shape[1], W_o),
            n_kv_heads=n_kv,
            scale=self._attention_scale(block, head_dim),
            positional=arch.positional,
            rotary_dim=rotary_dim,
            rope_theta=rope_theta,
            rotary_inv_freq=inv_freq,
            window=arch.window(self.config, block),
            causal=not arch.encoder,
            q_norm=self._norm(block, arch.q_norm),
            k_norm=self._norm(block, arch.k_norm),
            softcap=arch.softcap(self.config),
            out_norm=self._norm(block, arch.attn_post_norm),
            out_scale=self.residual_scale,
            family=arch.family,
        )

    def _qkv(self, block: int, n_heads: int
             ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor],
                        int, int]:
        """((W_q, b_q), (W_k, b_k), (W_v, b_v), head_dim, key/value heads) of ``block`` in
        D×F orientation, biases zero where the model has none, whatever the projections'
        storage (``Architecture.qkv_style``)."""
        arch, conv1d = self.arch, self.arch.conv1d
        if arch.qkv_style == "separate":
            W_q, b_q = _in_out_weight(self._module(block, arch.q_proj), conv1d)
            W_k, b_k = _in_out_weight(self._module(block, arch.k_proj), conv1d)
            W_v, b_v = _in_out_weight(self._module(block, arch.v_proj), conv1d)
            head_dim = W_q.shape[1] // n_heads
            n_kv = W_k.shape[1] // head_dim
            b_q = _bias_or_zeros(b_q, W_q.shape[1], W_q)
            b_k = _bias_or_zeros(b_k, W_k.shape[1], W_k)
            b_v = _bias_or_zeros(b_v, W_v.shape[1], W_v)
        else:
            W_qkv, b_qkv = _in_out_weight(self._module(block, arch.qkv_proj), conv1d)
            b_qkv = _bias_or_zeros(b_qkv, W_qkv.shape[1], W_qkv)
            n_kv = n_heads
            if arch.qkv_style == "fused_split":
                # GPT-2 c_attn, Phi-3 qkv_proj: output features are [q (all heads) | k | v],
                # k and v with the key/value heads (fewer under grouped-query attention).
                n_kv = int(getattr(self.config, "num_key_value_heads", None) or n_heads)
                head_dim = W_qkv.shape[1] // (n_heads + 2 * n_kv)
                widths = [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim]
                W_q, W_k, W_v = W_qkv.split(widths, dim=1)
                b_q, b_k, b_v = b_qkv.split(widths, dim=0)
            else:
                head_dim = W_qkv.shape[1] // (3 * n_heads)
                # GPT-NeoX query_key_value: output features are, per head, [q_h | k_h | v_h].
                W_D_A3d = W_qkv.reshape(W_qkv.shape[0], n_heads, 3, head_dim)
                b_A3d = b_qkv.reshape(n_heads, 3, head_dim)
                W_q, W_k, W_v = (W_D_A3d[:, :, i].reshape(W_qkv.shape[0], -1) for i in range(3))
                b_q, b_k, b_v = (b_A3d[:, i].reshape(-1) for i in range(3))
        return (W_q, b_q), (W_k, b_k), (W_v, b_v), head_dim, n_kv

    # -- internals -----------------------------------------------------------------------------

    def _block_paths(self) -> dict[str, str]:
        arch = self.arch
        roles = (
            "ln1", "attn", "attn_out", "attn_block", "ln2", "mlp", "mlp_in_linear",
            "mlp_up_linear", "act", "mlp_out_linear", "mlp_out_module", "q_proj", "k_proj",
            "v_proj", "qkv_proj", "o_proj", "q_norm", "k_norm", "attn_post_norm", "mlp_post_norm",
        )  # fmt: skip
        return {r: getattr(arch, r) for r in roles if getattr(arch, r) is not None}

    def _lookup(self, root: nn.Module, path: str, role: str) -> nn.Module:
        try:
            return root.get_submodule(path)
        except AttributeError:
            raise CrossintError(
                f"{self.model_type} model {type(self.model).__name__} has no module {path!r} "
                f"({role}): this transformers version lays the model out differently from "
                f"crossint's architecture table"
            ) from None

    def _module(self, block: int, path: str) -> nn.Module:
        if not isinstance(block, int) or not 0 <= block < self.n_blocks:
            raise CrossintError(
                f"block {block!r} out of range: the model has {self.n_blocks} blocks "
                f"(0..{self.n_blocks - 1})"
            )
        return self._blocks[block].get_submodule(path)

    def _mlp_in_weights(
        self, block: int
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """(W_in_DN, b_in, W_up_DN, b_up): the gate (or only) input projection and, for gated
        MLPs, the up projection, in×out; biases None where the model has none."""
        arch = self.arch
        W_in_DN, b_in = _in_out_weight(self._module(block, arch.mlp_in_linear), arch.conv1d)
        if arch.gate_up_fused:
            # One projection whose output features are [gate | up].
            W_in_DN, W_up_DN = (W.contiguous() for W in W_in_DN.chunk(2, dim=1))
            b_in, b_up = b_in.chunk(2) if b_in is not None else (None, None)
            return W_in_DN, b_in, W_up_DN, b_up
        if arch.mlp_up_linear is not None:
            W_up_DN, b_up = _in_out_weight(self._module(block, arch.mlp_up_linear), arch.conv1d)
            return W_in_DN, b_in, W_up_DN, b_up
        return W_in_DN, b_in, None, None

    def _norm(self, block: int, path: str | None) -> NormWeights | None:
        """The RMS norm at ``path`` in ``block`` (None for no path)."""
        if path is None:
            return None
        module = self._module(block, path)
        eps = getattr(module, "eps", None)
        eps = getattr(module, "variance_epsilon", None) if eps is None else eps
        weight = getattr(module, "weight", None)
        if weight is None or eps is None:
            raise CrossintError(
                f"{self.model_type}: cannot read the norm {path!r} ({type(module).__name__}): "
                f"crossint reads an RMS norm's weight and eps"
            )
        gain_F = weight.detach().float() + self.arch.norm_offset
        return NormWeights(gain_F=gain_F, eps=float(eps), apply=module)

    def _attention_scale(self, block: int, head_dim: int) -> float:
        if self.arch.scale is not None:
            return float(self.arch.scale(self.config, block))
        scaling = getattr(self._module(block, self.arch.attn), "scaling", None)
        return float(scaling) if scaling is not None else head_dim**-0.5

    def _find_rotary(self) -> nn.Module | None:
        """The model's rotary embedding module (None for models without rotary positions)."""
        if self.arch.positional != "rotary":
            return None
        for name, module in self.model.named_modules():
            if name.endswith("rotary_emb"):
                return module
        raise CrossintError(f"{self.model_type}: no rotary embedding module found")

    def _rotary(self, block: int) -> tuple[int, float | None, Tensor]:
        """(rotary_dim, rope_theta, inv_freq) of block ``block``. Gemma 3 keeps frequencies
        (and rope parameters) per layer type, e.g. ``sliding_attention_inv_freq``."""
        layer_types = getattr(self.config, "layer_types", None)
        layer_type = layer_types[block] if layer_types else None
        inv_freq = getattr(self._rotary_emb, f"{layer_type}_inv_freq", None)
        if not isinstance(inv_freq, Tensor):
            inv_freq = getattr(self._rotary_emb, "inv_freq", None)
        if not isinstance(inv_freq, Tensor):
            raise CrossintError(f"{self.model_type}: the rotary embedding has no frequencies")
        params = getattr(self.config, "rope_parameters", None) or {}
        if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
            params = params[layer_type]
        theta = params.get("rope_theta") if isinstance(params, dict) else None
        for attr in ("rope_theta", "rotary_emb_base"):
            theta = theta if theta is not None else getattr(self.config, attr, None)
        rope_type = params.get("rope_type") if isinstance(params, dict) else None
        cos_scale = getattr(self._rotary_emb, f"{layer_type}_attention_scaling", None)
        if cos_scale is None:
            cos_scale = getattr(self._rotary_emb, "attention_scaling", 1.0)
        problem = _rotary_problem(rope_type, float(cos_scale))
        if problem is not None:
            raise CrossintError(
                f"{self.family} ({self.model_type}) block {block}: rope type {rope_type!r} "
                f"{problem}; attention weights support rotary embeddings with fixed frequencies "
                f"and unscaled cos/sin (rope types default, linear, llama3)"
            )
        inv_freq = inv_freq.detach().float()
        return 2 * inv_freq.numel(), (float(theta) if theta is not None else None), inv_freq

    def _check_patches(self, patches: Mapping[str, PatchFn] | None) -> dict[str, PatchFn]:
        patches = dict(patches or {})
        for name, fn in patches.items():
            hp.parse_hookpoint(name, self.n_blocks)
            if not callable(fn):
                raise CrossintError(
                    f"patch for {name} must be a function original_BSD -> new_BSD, "
                    f"got {type(fn).__name__}"
                )
        return patches

    def _check_input_ids(self, input_ids_BS: Tensor) -> Tensor:
        if not isinstance(input_ids_BS, Tensor) or input_ids_BS.dim() != 2:
            shape = tuple(input_ids_BS.shape) if isinstance(input_ids_BS, Tensor) else None
            raise CrossintError(
                f"input_ids must be a 2-D tensor (batch, sequence) of token ids, got "
                f"{shape if shape is not None else type(input_ids_BS).__name__}"
            )
        if input_ids_BS.dtype not in (torch.int64, torch.int32):
            raise CrossintError(f"input_ids must hold integer token ids, got {input_ids_BS.dtype}")
        if self.max_context and input_ids_BS.shape[1] > self.max_context:
            raise CrossintError(
                f"sequence length {input_ids_BS.shape[1]} exceeds the model's context of "
                f"{self.max_context} tokens: use contexts of at most {self.max_context}"
            )
        if input_ids_BS.numel() and (
            int(input_ids_BS.min()) < 0 or int(input_ids_BS.max()) >= self.vocab_size
        ):
            raise CrossintError(
                f"token ids must lie in 0..{self.vocab_size - 1} (the model's vocabulary), got "
                f"{int(input_ids_BS.min())}..{int(input_ids_BS.max())}"
            )
        return input_ids_BS.to(self.device, torch.long)

    def _run(self, input_ids_BS: Tensor, attention_mask_BS: Tensor | None, state: _Pass,
             start: BlockInput | None = None) -> Any:
        input_ids_BS = self._check_input_ids(input_ids_BS)
        kwargs: dict[str, Any] = {"input_ids": input_ids_BS}
        if attention_mask_BS is not None:
            if tuple(attention_mask_BS.shape) != tuple(input_ids_BS.shape):
                raise CrossintError(
                    f"attention_mask shape {tuple(attention_mask_BS.shape)} must equal the "
                    f"input_ids shape {tuple(input_ids_BS.shape)}"
                )
            kwargs["attention_mask"] = attention_mask_BS.to(self.device)
        if not self.arch.encoder:
            kwargs["use_cache"] = False
        with self._hooks(state), self._skipping_blocks_before(start, input_ids_BS, state):
            try:
                return self.model(**kwargs)
            except _StopForward:
                return None

    @contextlib.contextmanager
    def _skipping_blocks_before(self, start: BlockInput | None, input_ids_BS: Tensor,
                                state: _Pass) -> Iterator[None]:
        """Blocks before ``start.block`` compute nothing and hand on ``start.resid_pre_BSD``.
        The model itself still runs around them (embeddings, masks, rotary tables, final norm,
        head), so whatever it does there stays exactly its own; only the blocks are skipped."""
        if start is None or start.block == 0:  # block 0's input is the model's own embedding
            yield
            return
        self._check_start(start, input_ids_BS, state)
        resid_pre_BSD = start.resid_pre_BSD.to(self.device, self.dtype)
        # Blocks return a tensor or a tuple (hidden, extras...) depending on family and
        # transformers version; the extras (attention weights) are read only when a caller
        # asks for them, which these passes never do.
        n_extras = self._block_extras
        skipped_output = resid_pre_BSD if n_extras is None else (resid_pre_BSD, *[None] * n_extras)

        def skip(*args: Any, **kwargs: Any) -> Any:
            return skipped_output

        skipped = self._blocks[: start.block]
        # Another library (accelerate's dispatch) may have set forward on the instance too.
        own_forwards = [block.__dict__.get("forward") for block in skipped]
        try:
            for block in skipped:
                block.forward = skip
            yield
        finally:
            for block, forward in zip(skipped, own_forwards, strict=True):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward

    def _check_start(self, start: BlockInput, input_ids_BS: Tensor, state: _Pass) -> None:
        if not 0 <= start.block < self.n_blocks:
            raise CrossintError(f"start block {start.block} is out of range: the model has "
                                f"{self.n_blocks} blocks (0..{self.n_blocks - 1})")
        expected = (*input_ids_BS.shape, self.d_model)
        if tuple(start.resid_pre_BSD.shape) != expected:
            raise CrossintError(f"the residual stream to start block {start.block} from has "
                                f"shape {tuple(start.resid_pre_BSD.shape)}; expected {expected} "
                                f"(batch, sequence of the input ids, d_model)")
        for name in [*state.capture, *state.patches]:
            block, _ = hp.parse_hookpoint(name, self.n_blocks)
            if block < start.block:
                raise CrossintError(f"{name} lies before block {start.block}, where this pass "
                                    f"starts: start at block {block} or earlier")

    @functools.cached_property
    def _block_extras(self) -> int | None:
        """None when a block returns its hidden state as a tensor, else how many values follow
        it in the tuple it returns; seen once, on a one-token pass that stops after block 0."""
        seen: list[Any] = []

        def record(module: nn.Module, args: tuple, output: Any) -> None:
            seen.append(output)
            raise _StopForward

        handle = self._blocks[0].register_forward_hook(record)
        try:
            with torch.no_grad():
                self._run(torch.zeros(1, 1, dtype=torch.long), None, _Pass((), {}, None))
        finally:
            handle.remove()
        return len(seen[0]) - 1 if isinstance(seen[0], (tuple, list)) else None

    @contextlib.contextmanager
    def _hooks(self, state: _Pass) -> Iterator[None]:
        """Register the hooks one pass needs; always remove them, even on exceptions."""
        needed: dict[int, set[str]] = {}
        for name in [*state.capture, *state.patches]:
            block, site = hp.parse_hookpoint(name, self.n_blocks)
            needed.setdefault(block, set()).add(site)
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for block in sorted(needed):
                handles.extend(self._register_block(block, needed[block], state))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _register_block(
        self, l: int, sites: set[str], state: _Pass
    ) -> list[torch.utils.hooks.RemovableHandle]:
        arch = self.arch
        block = self._blocks[l]
        derived_mid = "resid_mid" in sites and not arch.post_ln
        hooks = _BlockHooks(l, sites, state)
        # Hooks on one module run in registration order, so register in SITES order.
        if "resid_pre" in sites or derived_mid:
            hooks.on_input(block, "resid_pre", store_resid=derived_mid)
        if "attn_in" in sites:
            hooks.on_input(block.get_submodule(arch.attn), "attn_in")
        residual = _scaled_view(self.residual_scale)
        if "attn_out" in sites:
            hooks.on_output(block.get_submodule(arch.attn_out), "attn_out", residual)
        if "resid_mid" in sites:
            if arch.post_ln:
                assert arch.attn_block is not None
                hooks.on_output(block.get_submodule(arch.attn_block), "resid_mid")
            else:
                hooks.on_derived_resid_mid(block.get_submodule(arch.attn_out), residual)
        if "mlp_in" in sites:
            hooks.on_input(block.get_submodule(arch.mlp), "mlp_in")
        if "mlp_pre" in sites:
            gate = _gate_half_view(self.d_mlp) if arch.gate_up_fused else _PLAIN
            hooks.on_output(block.get_submodule(arch.mlp_in_linear), "mlp_pre", gate)
        if "mlp_post" in sites:
            hooks.on_input(block.get_submodule(arch.mlp_out_linear), "mlp_post")
        if "mlp_out" in sites:
            hooks.on_output(block.get_submodule(arch.mlp_out_module), "mlp_out", residual)
        if "resid_post" in sites:
            hooks.on_output(block, "resid_post")
        return hooks.handles

    def __repr__(self) -> str:
        return (
            f"ModelAdapter(name={self.name!r}, family={self.family!r}, n_blocks={self.n_blocks}, "
            f"d_model={self.d_model}, d_mlp={self.d_mlp}, vocab_size={self.vocab_size})"
        )


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float64": torch.float64,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch floating dtype from a dtype or its name ("float32", "bf16", ...)."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise CrossintError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")


def _parse_device(device: str | torch.device) -> torch.device:
    """A device that exists here (CrossintError for an unknown name, or a device torch was not
    built for or cannot see, before any model is loaded)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise CrossintError(
            f"unknown device {device!r}: use e.g. 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from None
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError) as e:
        raise CrossintError(f"device {device!r} is not available ({_one_line(e)}): use "
                            f"--device cpu") from None
    return parsed


def _storylm_path() -> Path:
    try:
        from crossint.toys.storylm import default_model_path
    except ImportError as e:
        raise CrossintError(f"the embedded model 'storylm' is not available: {e}") from None
    return Path(default_model_path())


_TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


def _load_tokenizer(auto_tokenizer: Any, source_id: str) -> Any:
    """The model's tokenizer, or None when it has none (the adapter works on token ids)."""
    source = Path(source_id)
    if source.is_dir() and not any((source / f).is_file() for f in _TOKENIZER_FILES):
        return None  # recent transformers would build an empty, special-tokens-only tokenizer
    try:
        tokenizer = auto_tokenizer.from_pretrained(source_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - the tokenizer is optional; a model without one still works
        return None
    return _useful_tokenizer(tokenizer)


def _useful_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer``, or None for a tokenizer that knows only its special tokens (it would
    silently map all text to <unk>)."""
    if tokenizer is not None and len(tokenizer) <= len(
        set(getattr(tokenizer, "all_special_ids", []))
    ):
        return None
    return tokenizer


def _dtype_keyword() -> str:
    """The name of from_pretrained's dtype argument: ``dtype`` from transformers 4.56 on."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


@contextlib.contextmanager
def _no_transformers_progress_bar() -> Iterator[None]:
    # transformers draws a bar while loading weights; crossint's own bars are the ones that
    # matter, and a failed run should leave only its one-line error on stderr.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# -- GGUF checkpoints (llama.cpp) ---------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_GGUF_INSTALL = "pip install 'crossint[gguf]'"
# What transformers' GGUF loader needs (its own minimum for gguf; accelerate as the extra pins it).
_GGUF_PACKAGES: tuple[tuple[str, str], ...] = (("gguf", "0.10.0"), ("accelerate", "1.1.0"))


def _is_gguf(source: Path) -> bool:
    """A path named ``*.gguf`` (existing or not), or a file that starts with the GGUF magic."""
    if source.is_dir():
        return False
    if source.suffix.lower() == ".gguf":
        return True
    try:
        with source.open("rb") as f:
            return f.read(len(_GGUF_MAGIC)) == _GGUF_MAGIC
    except OSError:
        return False


def _require_gguf_packages() -> None:
    """One line naming the extra when a package transformers' GGUF loader needs is missing."""
    import importlib
    import importlib.metadata

    from packaging.version import InvalidVersion, Version

    for package, minimum in _GGUF_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            raise CrossintError(
                f"loading a GGUF file needs the {package!r} package: {_GGUF_INSTALL}"
            ) from None
        try:
            too_old = Version(importlib.metadata.version(package)) < Version(minimum)
        except (importlib.metadata.PackageNotFoundError, InvalidVersion):
            too_old = False  # importable but not pip-installed (e.g. a source checkout): try it
        if too_old:
            raise CrossintError(
                f"loading a GGUF file needs {package}>={minimum}, found "
                f"{importlib.metadata.version(package)}: pip install -U 'crossint[gguf]'"
            )


# GGUF metadata value types of fixed width -> struct format (the GGUF spec's numbering).
_GGUF_SCALARS: Mapping[int, str] = MappingProxyType(
    {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
)


class _GgufReader:
    """Reads a GGUF file's header fields from a memory map of its ``size`` bytes. Reads past the
    end raise ``struct.error``; a metadata value of unknown type raises ``ValueError``."""

    def __init__(self, blob: mmap.mmap, size: int) -> None:
        self.blob = blob
        self.size = size

    def unpack(self, fmt: str, pos: int) -> tuple[tuple, int]:
        return struct.unpack_from("<" + fmt, self.blob, pos), pos + struct.calcsize("<" + fmt)

    def string(self, pos: int) -> tuple[bytes, int]:
        (length,), pos = self.unpack("Q", pos)
        if pos + length > self.size:
            raise struct.error("string past the end of the file")
        return bytes(self.blob[pos : pos + length]), pos + length

    def value(self, value_type: int, pos: int) -> tuple[Any, int]:
        """(a metadata value, or None for arrays, which are skipped; the position after it)."""
        if value_type in _GGUF_SCALARS:
            (v,), pos = self.unpack(_GGUF_SCALARS[value_type], pos)
            return v, pos
        if value_type == 8:
            return self.string(pos)
        if value_type == 9:
            (element_type, count), pos = self.unpack("IQ", pos)
            if element_type in _GGUF_SCALARS:
                pos += count * struct.calcsize("<" + _GGUF_SCALARS[element_type])
                if pos > self.size:
                    raise struct.error("array past the end of the file")
                return None, pos
            for _ in range(count):
                _, pos = self.value(element_type, pos)
            return None, pos
        raise ValueError(f"a metadata value has unknown type {value_type}")

    def alignment(self, pos: int, n_values: int) -> tuple[int, int]:
        """(the tensor data's alignment, from ``n_values`` metadata key/value pairs at ``pos``;
        the position after them)."""
        alignment = 32  # llama.cpp's default
        for _ in range(n_values):
            key, pos = self.string(pos)
            (value_type,), pos = self.unpack("I", pos)
            v, pos = self.value(value_type, pos)
            if key == b"general.alignment" and isinstance(v, int) and v > 0:
                alignment = v
        return alignment, pos

    def tensor_data_end(self, pos: int, n_tensors: int, quant_sizes: Mapping[int, tuple[int, int]]
                        ) -> tuple[int | None, int]:
        """(the end of the last tensor's data, relative to the start of the tensor data, from
        the table of ``n_tensors`` tensors at ``pos``, or None at a tensor type not in
        ``quant_sizes``: {type: (elements, bytes) per block}; the position after the table)."""
        end = 0
        for _ in range(n_tensors):
            _name, pos = self.string(pos)
            (n_dims,), pos = self.unpack("I", pos)
            dims, pos = self.unpack(f"{n_dims}Q", pos)
            (ggml_type, offset), pos = self.unpack("IQ", pos)
            if ggml_type not in quant_sizes:
                return None, pos
            block_elements, block_bytes = quant_sizes[ggml_type]
            end = max(end, offset + math.prod(dims) // block_elements * block_bytes)
        return end, pos


def _gguf_problem(source: Path) -> str | None:
    """Why ``source`` cannot be a complete GGUF file, or None: a walk over its header, metadata
    and tensor table (no tensor data is read) that checks the tensors fit in the file. Catches
    truncated and garbled files with a clear reason before transformers' reader fails on them
    with a numpy or struct error."""
    from gguf import GGML_QUANT_SIZES

    size = source.stat().st_size
    with source.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        reader = _GgufReader(blob, size)
        try:
            (version, n_tensors, n_values), pos = reader.unpack("IQQ", len(_GGUF_MAGIC))
            if version not in (2, 3):
                return f"corrupt or unsupported: GGUF version {version} (readable: 2 and 3)"
            alignment, pos = reader.alignment(pos, n_values)
            end, pos = reader.tensor_data_end(pos, n_tensors, GGML_QUANT_SIZES)
        except struct.error:
            return f"truncated or corrupt: its header ends early (the file has {size} bytes)"
        except ValueError as e:
            return f"corrupt: {e}"
        if end is None:
            return None  # a tensor type this gguf package does not know: let transformers say
        needed = -(-pos // alignment) * alignment + end
        if needed > size:
            return f"truncated: its {n_tensors} tensors need {needed} bytes, the file has {size}"
    return None


def _one_line(error: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, shortened: why a GGUF file could not be read."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    # transformers' GGUF reader draws its own tqdm bar while it dequantises, outside the
    # progress-bar switch of its logging module.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        import functools

        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def _as_dense(model: nn.Module, source: Path, dtype: torch.dtype) -> None:
    """Check every weight was dequantised, then drop the GGUF quantizer transformers attaches,
    so that the model is a plain dense one (savable with save_pretrained, trainable)."""
    packed = sorted(name for name, p in model.named_parameters() if not p.is_floating_point())
    if packed:
        raise CrossintError(
            f"could not load GGUF file {source}: {len(packed)} weights stayed quantized "
            f"(e.g. {packed[0]}) instead of being dequantised to {dtype}"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config


def _gguf_model_types() -> list[str]:
    """Model types whose GGUF files transformers can read and crossint's adapter supports."""
    from crossint.models.architectures import ARCHITECTURES

    readable: set[str] = set()
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

        readable.update(GGUF_CONFIG_MAPPING)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        readable.update(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return sorted(readable & set(ARCHITECTURES))


def _check_gguf_file(name: str, source: Path) -> None:
    """Refuse, with one line naming the file, a GGUF path that is missing, unreadable, not a
    GGUF file, truncated or corrupt, or that the installed packages cannot read."""
    if not source.is_file():
        raise CrossintError(f"could not load model {name!r}: GGUF file {source} does not exist")
    try:
        with source.open("rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as e:
        raise CrossintError(f"could not read GGUF file {source}: {_one_line(e)}") from None
    if magic != _GGUF_MAGIC:
        raise CrossintError(
            f"could not load GGUF file {source}: not a GGUF file (it starts with {magic!r}, "
            f"not {_GGUF_MAGIC!r})"
        )
    _require_gguf_packages()
    try:
        problem = _gguf_problem(source)
    except OSError as e:
        problem = _one_line(e)
    if problem is not None:
        raise CrossintError(f"could not load GGUF file {source}: {problem}")


def _read_gguf(source: Path, read: Callable[[], Any]) -> Any:
    """``read()`` (a transformers call on ``source``) without progress bars. A corrupt file can
    fail anywhere in transformers' reader (ValueError, struct.error, KeyError, ...): every
    failure becomes one line naming the file."""
    try:
        with _no_transformers_progress_bar(), _no_gguf_progress_bar():
            return read()
    except Exception as e:  # noqa: BLE001
        raise CrossintError(f"could not load GGUF file {source}: {_one_line(e)}") from None


def _load_gguf(
    name: str, source: Path, torch_dtype: torch.dtype, torch_device: torch.device
) -> ModelAdapter:
    """A GGUF file (llama.cpp) through transformers' GGUF loader, every weight dequantised to
    ``torch_dtype``; the tokenizer is rebuilt from the file's metadata."""
    _check_gguf_file(name, source)
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    options: dict[str, Any] = {_dtype_keyword(): torch_dtype}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        # Newer transformers can keep GGUF blocks packed in their own modules; crossint reads
        # raw weights, so always ask for a plain dense model.
        options["quantization_config"] = gguf_config(dequantize=True)
    directory, filename = str(source.parent), source.name
    config = _read_gguf(source, lambda: AutoConfig.from_pretrained(
        directory, gguf_file=filename, local_files_only=True))
    if config.model_type not in _gguf_model_types():
        raise CrossintError(
            f"could not load GGUF file {source}: unsupported model type {config.model_type!r}; "
            f"crossint reads GGUF files of {', '.join(_gguf_model_types())}"
        )
    arch = get_architecture(config.model_type)
    model_cls = AutoModelForMaskedLM if arch.encoder else AutoModelForCausalLM
    model = _read_gguf(source, lambda: model_cls.from_pretrained(
        directory, gguf_file=filename, config=config, local_files_only=True, **options))
    _as_dense(model, source, torch_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            directory, gguf_file=filename, local_files_only=True
        )
    except Exception:  # noqa: BLE001 - the tokenizer is optional, as for directories
        tokenizer = None
    model.to(torch_device)
    return ModelAdapter(model, _useful_tokenizer(tokenizer), name=name)


def load_model(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> ModelAdapter:
    """Load a model by name and wrap it in a :class:`ModelAdapter` (never touches the network).

    ``"storylm"`` is the packaged embedded model; otherwise a local ``save_pretrained``
    directory, a hub id that is already in the local Hugging Face cache, or a llama.cpp ``.gguf``
    file (needs the ``gguf`` extra; weights are dequantised to ``dtype``). Causal models load
    with their LM head; BERT-style encoders with their masked-LM head, or as their base model
    when the checkpoint has none (no random head: they have no loss to splice into). A device
    that is not available, and weights that are truncated, corrupt or do not match config.json,
    are CrossintErrors.
    """
    from transformers import AutoTokenizer

    name = str(name_or_path)
    torch_dtype = parse_dtype(dtype)
    torch_device = _parse_device(device)
    source = _storylm_path() if name == "storylm" else Path(name).expanduser()
    if name != "storylm" and _is_gguf(source):
        return _load_gguf(name, source, torch_dtype, torch_device)
    source_id = _pretrained_id(name, source)
    model = _load_pretrained(name, source_id, torch_dtype)
    tokenizer = _load_tokenizer(AutoTokenizer, source_id)
    model.to(torch_device)
    return ModelAdapter(model, tokenizer, name=name)


def _pretrained_id(name: str, source: Path) -> str:
    """What ``from_pretrained`` loads model ``name`` from: the directory ``source`` (it must hold
    a config.json) or, when nothing is at ``source``, ``name`` as a hub id."""
    if source.is_dir():
        if not (source / "config.json").is_file():
            ggufs = sorted(p.name for p in source.glob("*.gguf"))
            hint = f"; to load a GGUF file, pass its path: {source / ggufs[0]}" if ggufs else ""
            raise CrossintError(
                f"could not load model {name!r}: directory {source} has no config.json "
                f"(expected a directory written by save_pretrained){hint}"
            )
        return str(source)
    if source.exists():
        raise CrossintError(
            f"could not load model {name!r}: {source} is a file; pass the directory written by "
            f"save_pretrained, or a .gguf file"
        )
    if name == "storylm":
        raise CrossintError(f"the embedded model 'storylm' has no weights at {source}")
    return name


def _load_pretrained(name: str, source_id: str, torch_dtype: torch.dtype) -> nn.Module:
    """The model at ``source_id`` from local files only, with its LM head (the masked-LM head for
    encoders)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    try:
        # local_files_only: a hub id must already be cached; no network, no waiting on it.
        config = AutoConfig.from_pretrained(source_id, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CrossintError(
            f"could not load model {name!r}: not a local directory and not in the local Hugging "
            f"Face cache; pass 'storylm', a save_pretrained directory, or a hub id downloaded "
            f"beforehand ({type(e).__name__})"
        ) from None
    arch = get_architecture(config.model_type)  # unsupported families fail before loading
    if arch.encoder:
        # An encoder saved without its masked-LM head loads as its base model: asking for the
        # head would initialise a random one (transformers warns MISSING cls.predictions.*).
        model_cls = AutoModelForMaskedLM if _has_lm_head(config) else AutoModel
    else:
        model_cls = AutoModelForCausalLM
    log: list[str] = []
    try:
        with _no_transformers_progress_bar(), _transformers_log() as log:
            return model_cls.from_pretrained(
                source_id, config=config, local_files_only=True, **{_dtype_keyword(): torch_dtype}
            )
    except Exception as e:  # noqa: BLE001 - torch, safetensors and transformers raise many types
        mismatch = next((" ".join(line.split()) for message in log for line in message.splitlines()
                         if "MISMATCH" in line and "|" in line), None)
        detail = f" (first mismatch: {mismatch[:200]})" if mismatch else ""
        reason = _one_line(e).replace(" For details look at the above report!", "")
        raise CrossintError(
            f"could not load the weights of model {name!r}: {reason}{detail}; its files "
            f"are truncated, corrupt or do not match its config.json: download or save it again"
        ) from None


@contextlib.contextmanager
def _transformers_log() -> Iterator[list[str]]:
    """Hold back what transformers logs while loading: shown as usual when loading works; when
    it fails, the messages land in the yielded list (for the one-line error) instead of a
    multi-line report on stderr."""
    logger = logging.getLogger("transformers")
    records: list[logging.LogRecord] = []
    messages: list[str] = []
    keep = _Keep(records)
    handlers, propagate = logger.handlers[:], logger.propagate
    for handler in handlers:
        logger.removeHandler(handler)
    logger.addHandler(keep)
    logger.propagate = False
    failed = False
    try:
        yield messages
    except BaseException:
        failed = True
        messages.extend(record.getMessage() for record in records)
        raise
    finally:
        logger.removeHandler(keep)
        for handler in handlers:
            logger.addHandler(handler)
        logger.propagate = propagate
        if not failed:  # loading worked: show the messages as transformers would have
            for record in records:
                logger.handle(record)


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# Checkpoint classes that carry a language-model head (config.json "architectures").
_LM_HEAD_SUFFIXES = ("ForMaskedLM", "ForPreTraining", "ForCausalLM", "LMHeadModel")


def _has_lm_head(config: Any) -> bool:
    """Whether the checkpoint behind ``config`` holds an LM head (unknown: assume it does)."""
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        return True
    return any(str(name).endswith(_LM_HEAD_SUFFIXES) for name in architectures)


def check_model_matches(adapter: ModelAdapter, model_info: dict[str, Any], widths: set[int],
                        what: str) -> None:
    """Refuse a subject model whose architecture differs from the one ``what`` (a cache, a
    crosscoder) was made from: ``model_info`` as a cache manifest records it, ``widths`` the
    activation widths ``what`` holds."""
    if widths and widths != {adapter.d_model}:
        raise CrossintError(
            f"model {adapter.name!r} has d_model {adapter.d_model}, but {what} has width "
            f"{'/'.join(str(w) for w in sorted(widths))}: pass the model it was made from"
        )
    differences = [
        f"{key} {model_info[key]!r} (model has {getattr(adapter, key)!r})"
        for key in ("model_type", "n_blocks", "d_model")
        if key in model_info and model_info[key] != getattr(adapter, key)
    ]
    if differences:
        raise CrossintError(
            f"model {adapter.name!r} does not match {what}, which records "
            f"{', '.join(differences)}: pass the model it was made from"
        )
