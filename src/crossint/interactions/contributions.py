"""Per-feature neuron contributions (SPEC §4.1) and per-neuron statistics (SPEC §4.2).

For block l with decoder rows ``d_h`` at ``blocks.l.mlp_in`` (raw units) the MLP pre-activation of a
reconstructed input splits into one term per active feature::

    V_HN = d_HD · W_in_DN              p[b,n,h] = f[b,h]·V[h,n]          z = Σ_h p + c

Only the active features of a token contribute, so everything here works on *padded active
slots*: token b's active features sit in slots ``0..count_b − 1`` of ``features_BK`` (ascending
feature index) and the remaining slots hold feature −1 with activation 0 (BatchTopK and JumpReLU
activate a different number of features per token). Virtual weights are computed only for the U
distinct features active in the batch, so the cost is O(U·D·N + B·K·N) and B×N×H never exists.
Internally contributions are stored slot-major (``p_BKN``) because every statistic reduces over
slots with the neuron axis contiguous; ``p_BNK`` is the SPEC-oriented view of the same memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from crossint.crosscoder.sparse import sparse_codes
from crossint.errors import CrossintError
from crossint.models.hookpoints import blocks_with_site, hookpoint

if TYPE_CHECKING:
    from crossint.crosscoder.model import Crosscoder
    from crossint.models.adapter import MLPWeights

SHARE_EPS = 1e-8  # SPEC §4.2 ε of the dominant share
# Chunk size when none is given, in elements of a chunk's B·K·N working set: small on the CPU so
# it stays in cache (the elementwise passes are memory-bound), large on accelerators to amortise
# kernel launches.
CPU_CHUNK_ELEMENTS = 1 << 18
ACCELERATOR_CHUNK_ELEMENTS = 1 << 25


# --- active features ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ActiveFeatures:
    """The non-zero features of a batch in padded slots (see the module docstring)."""

    features_BK: Tensor  # int64 feature index, −1 in padding slots
    f_BK: Tensor  # activation, 0 in padding slots; differentiable w.r.t. the f_BH it came from
    counts_B: Tensor  # int64 active features per token
    distinct_U: Tensor  # the distinct active features of the batch (sorted; [0] if none)
    row_BK: Tensor  # row of distinct_U each slot holds (padding: 0, an arbitrary real row)

    @property
    def n_tokens(self) -> int:
        return self.features_BK.shape[0]

    @property
    def mask_BK(self) -> Tensor:
        return self.features_BK >= 0

    def slice(self, start: int, stop: int) -> ActiveFeatures:
        """Tokens ``start:stop``, with the slot axis trimmed to that chunk's largest count."""
        counts_B = self.counts_B[start:stop]
        k = max(int(counts_B.max()), 1) if counts_B.numel() else 1
        return ActiveFeatures(
            self.features_BK[start:stop, :k], self.f_BK[start:stop, :k], counts_B,
            self.distinct_U, self.row_BK[start:stop, :k],
        )


    def by_count(self) -> ActiveFeatures:
        """The same tokens reordered by descending active count, so that consecutive chunks
        (see :meth:`slice`) need few padding slots: with BatchTopK the largest count is often
        twice the mean. ``f_BK`` stays differentiable through the reordering."""
        order_B = torch.argsort(self.counts_B, descending=True, stable=True)
        return ActiveFeatures(
            self.features_BK[order_B], self.f_BK[order_B], self.counts_B[order_B],
            self.distinct_U, self.row_BK[order_B],
        )


def active_features(f_BH: Tensor) -> ActiveFeatures:
    """Pad each token's non-zero features into K = max active count slots (at least 1)."""
    if f_BH.dim() != 2:
        raise CrossintError(
            f"feature activations must be a 2-d tensor (tokens, features), got shape "
            f"{tuple(f_BH.shape)}"
        )
    codes = sparse_codes(f_BH)
    n_tokens, device = f_BH.shape[0], f_BH.device
    nnz = codes.indices_E.numel()
    ends_B = torch.cat([codes.offsets_B[1:], torch.tensor([nnz], device=device)])[:n_tokens]
    counts_B = ends_B - codes.offsets_B
    k = max(int(counts_B.max()), 1) if n_tokens else 1
    rows_E = torch.repeat_interleave(torch.arange(n_tokens, device=device), counts_B)
    slots_E = torch.arange(nnz, device=device) - codes.offsets_B[rows_E]
    features_BK = torch.full((n_tokens, k), -1, dtype=torch.int64, device=device)
    features_BK[rows_E, slots_E] = codes.indices_E
    # Out-of-place index_put keeps the gradient path from f_BK back to f_BH.
    f_BK = f_BH.new_zeros((n_tokens, k)).index_put((rows_E, slots_E), codes.values_E)
    # The distinct features, shared by every block: V is computed for these rows only.
    distinct_U, row_E = torch.unique(codes.indices_E, return_inverse=True)
    if distinct_U.numel() == 0:  # nothing active: one row keeps every shape valid
        distinct_U = torch.zeros(1, dtype=torch.int64, device=device)
    row_BK = torch.zeros_like(features_BK)
    row_BK[rows_E, slots_E] = row_E
    return ActiveFeatures(features_BK, f_BK, counts_B, distinct_U, row_BK)


# --- virtual weights and contributions (SPEC §4.1) ---------------------------------------------
def virtual_weights(d_UD: Tensor, W_in_DN: Tensor) -> Tensor:
    """SPEC §4.1 V = d·W_in for the given decoder rows: (U, D) × (D, N) -> (U, N)."""
    return d_UD @ W_in_DN


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The promoted floating dtype of the inputs (float64 if any input is float64)."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def distinct_virtual_weights(
    active: ActiveFeatures, d_HD: Tensor, W_in_DN: Tensor
) -> tuple[Tensor, Tensor]:
    """V rows for the distinct active features only: returns ``(V_UN, row_BK)`` where slot
    (b, k) reads row ``row_BK[b, k]`` (padding slots read an arbitrary row; their f is 0)."""
    dtype = compute_dtype(d_HD, W_in_DN)
    V_UN = virtual_weights(d_HD[active.distinct_U].to(dtype), W_in_DN.to(dtype))
    return V_UN, active.row_BK


@dataclass(frozen=True)
class Contributions:
    """SPEC §4.1 contributions of the active slots of a chunk of tokens."""

    features_BK: Tensor  # feature index of every slot (−1: padding, contributes 0)
    f_BK: Tensor  # activation of every slot
    p_BKN: Tensor  # p[b,k,n] = f[b,k]·V[feature(b,k), n]

    @property
    def p_BNK(self) -> Tensor:
        """The SPEC's orientation (a view of ``p_BKN``)."""
        return self.p_BKN.transpose(1, 2)

    @property
    def z_BN(self) -> Tensor:
        """Σ_h p[b,n,h]: the reconstructed pre-activation without the constant c."""
        return self.p_BKN.sum(dim=1)


def slot_contributions(f_BK: Tensor, V_UN: Tensor, row_BK: Tensor) -> Tensor:
    """p_BKN = f_BK · V_UN[row_BK] (SPEC §4.1), O(B·K·N)."""
    return f_BK.to(V_UN.dtype)[:, :, None] * V_UN[row_BK]


def iter_contributions(
    f_BH: Tensor | ActiveFeatures,
    d_HD: Tensor,
    W_in_DN: Tensor,
    chunk_tokens: int | None = None,
) -> Iterator[tuple[int, Contributions]]:
    """Yield ``(start_token, Contributions)`` chunk by chunk: V is computed once for the batch's
    distinct active features, p for at most ``chunk_tokens`` tokens at a time."""
    active = f_BH if isinstance(f_BH, ActiveFeatures) else active_features(f_BH)
    chunk_tokens = resolve_chunk(chunk_tokens, active.f_BK.device,
                                 active.features_BK.shape[1] * W_in_DN.shape[1])
    V_UN, row_BK = distinct_virtual_weights(active, d_HD, W_in_DN)
    for start in range(0, active.n_tokens, chunk_tokens):
        stop = min(start + chunk_tokens, active.n_tokens)
        chunk = active.slice(start, stop)
        k = chunk.features_BK.shape[1]
        p_BKN = slot_contributions(chunk.f_BK, V_UN, row_BK[start:stop, :k])
        yield start, Contributions(chunk.features_BK, chunk.f_BK.to(V_UN.dtype), p_BKN)


def contributions(
    f_BH: Tensor, d_HD: Tensor, W_in_DN: Tensor, chunk_tokens: int | None = None
) -> Contributions:
    """SPEC §4.1 for a whole batch: p over every token's active features (K = the batch's
    largest active count). Computed in chunks of ``chunk_tokens``; the result holds B·K·N."""
    resolve_chunk(chunk_tokens, f_BH.device)
    active = active_features(f_BH)
    k = active.features_BK.shape[1]
    parts = [
        F.pad(c.p_BKN, (0, 0, 0, k - c.p_BKN.shape[1]))
        for _, c in iter_contributions(active, d_HD, W_in_DN, chunk_tokens)
    ]
    dtype = compute_dtype(d_HD, W_in_DN)
    p_BKN = torch.cat(parts) if parts else d_HD.new_zeros((0, k, W_in_DN.shape[1]), dtype=dtype)
    return Contributions(active.features_BK, active.f_BK.to(dtype), p_BKN)


Ratio = Callable[[Tensor, Tensor], Tensor]  # (numerator, denominator) -> the loss term


def resolve_chunk(chunk_tokens: int | None, device: torch.device, per_token: int = 1) -> int:
    """``chunk_tokens``, validated; ``None`` picks a size for ``device`` from the number of
    elements one token needs (``per_token`` = K·N)."""
    if chunk_tokens is None:
        budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
        return max(8, budget // max(per_token, 1))
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise CrossintError(
            f"chunk_tokens must be a positive integer (or None: automatic), got {chunk_tokens!r}"
        )
    return chunk_tokens


# --- per-neuron statistics (SPEC §4.2) ---------------------------------------------------------
_KEY_DTYPES = {torch.float32: torch.int32, torch.float64: torch.int64}


def dominant_slot(abs_BKN: Tensor, in_place: bool = False) -> Tensor:
    """The slot of the largest |p| per token and neuron (B×N, int64), ties to the first slot.

    Non-negative floats order like their bit patterns read as integers, so writing a slot code
    (larger for earlier slots) into the lowest mantissa bits makes one integer ``amax`` find the
    maximum and its slot together: 4 passes over B·K·N instead of the 6 of amax + first-match, and
    ``max(dim)`` with indices is slower still on the CPU. Values that agree in all but those
    ⌈log₂K⌉ bits count as ties (relative 2⁻¹⁷ for float32 and K ≤ 64, 2⁻⁴⁶ for float64); either
    is a valid subgradient. ``in_place`` overwrites ``abs_BKN`` (float32/float64 only)."""
    n_slots = abs_BKN.shape[1]
    if abs_BKN.dtype not in _KEY_DTYPES:
        abs_BKN, in_place = abs_BKN.float(), True
    key_dtype = _KEY_DTYPES[abs_BKN.dtype]
    code_mask = (1 << max((n_slots - 1).bit_length(), 1)) - 1
    keys_BKN = abs_BKN.view(key_dtype)
    keys_BKN = keys_BKN.bitwise_and_(~code_mask) if in_place else keys_BKN.bitwise_and(~code_mask)
    code_K = torch.arange(n_slots - 1, -1, -1, dtype=key_dtype, device=abs_BKN.device)
    best_BN = keys_BKN.bitwise_or_(code_K[:, None]).amax(dim=1)
    return (n_slots - 1) - best_BN.bitwise_and_(code_mask).long()


def magnitude_stats(abs_BKN: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """S = Σ_k |p|, Mx = max_k |p| and the slot of the maximum, from |p| per token and neuron.

    The single implementation behind the analysis statistics and the per-token score; the training
    penalty finds its slots with the same :func:`dominant_slot` (DESIGN: the logged metric and the
    penalty compute the same numbers). ``abs_BKN`` is left unchanged."""
    return abs_BKN.sum(dim=1), abs_BKN.amax(dim=1), dominant_slot(abs_BKN)


def abs_stats(p_BKN: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`magnitude_stats` of |p_BKN|."""
    return magnitude_stats(p_BKN.abs())


@dataclass(frozen=True)
class NeuronStats:
    """SPEC §4.2 statistics of one chunk at one block."""

    S_BN: Tensor  # total absolute contribution
    Mx_BN: Tensor  # largest absolute contribution
    slot_BN: Tensor  # slot of the dominant feature
    dominant_BN: Tensor  # dominant feature index; −1 where no feature contributes (S = 0)

    @property
    def share_BN(self) -> Tensor:
        """(Mx + ε) / (S + ε): 1 when one feature carries everything (or nothing is active)."""
        return (self.Mx_BN + SHARE_EPS) / (self.S_BN + SHARE_EPS)

    @property
    def nondominant_BN(self) -> Tensor:
        """S − Mx, the penalty term (paper: minus_max)."""
        return self.S_BN - self.Mx_BN

    @property
    def active_BN(self) -> Tensor:
        """(token, neuron) pairs with at least one non-zero contribution."""
        return self.S_BN > 0


def neuron_stats(contrib: Contributions) -> NeuronStats:
    """SPEC §4.2 S, Mx, dominant feature, share and S − Mx of a chunk."""
    S_BN, Mx_BN, slot_BN = abs_stats(contrib.p_BKN)
    dominant_BN = contrib.features_BK.gather(1, slot_BN)
    dominant_BN = torch.where(Mx_BN > 0, dominant_BN, torch.full_like(dominant_BN, -1))
    return NeuronStats(S_BN, Mx_BN, slot_BN, dominant_BN)


# --- one block's MLP seen through the crosscoder -----------------------------------------------
@dataclass(frozen=True, eq=False)
class MLPFeatureBlock:
    """Block l's MLP together with the crosscoder's decoder at ``blocks.l.mlp_in`` (raw units).

    ``d_HD`` keeps its autograd link to the crosscoder's decoder, so the penalty trains it."""

    block: int
    d_HD: Tensor
    b_dec_D: Tensor
    mlp: MLPWeights

    def __post_init__(self) -> None:
        D, N = self.mlp.W_in_DN.shape
        if self.d_HD.dim() != 2 or self.d_HD.shape[1] != D or tuple(self.b_dec_D.shape) != (D,):
            raise CrossintError(
                f"block {self.block}: decoder rows {tuple(self.d_HD.shape)} and bias "
                f"{tuple(self.b_dec_D.shape)} do not fit an MLP that reads width {D}"
            )
        if tuple(self.mlp.W_out_ND.shape[:1]) != (N,):
            raise CrossintError(
                f"block {self.block}: W_out has {self.mlp.W_out_ND.shape[0]} rows, W_in has "
                f"{N} neurons"
            )

    @property
    def hookpoint(self) -> str:
        return hookpoint(self.block, "mlp_in")

    @property
    def n_neurons(self) -> int:
        return self.mlp.W_in_DN.shape[1]

    @property
    def c_N(self) -> Tensor:
        """SPEC §4.1 c = b_in + b_dec[mlp_in]·W_in."""
        return self.mlp.b_in_N + self.b_dec_D.to(self.mlp.W_in_DN.dtype) @ self.mlp.W_in_DN

    @property
    def w_out_N(self) -> Tensor:
        """‖W_out[n]‖, the weight of neuron n in the SPEC §4.3 bound."""
        return self.mlp.W_out_ND.norm(dim=1)


def mlp_in_blocks(crosscoder: Crosscoder) -> list[int]:
    """Blocks whose ``mlp_in`` the crosscoder reads (sorted)."""
    return blocks_with_site(crosscoder.config.hookpoints, "mlp_in")


def mlp_on(mlp: MLPWeights, device: torch.device, dtype: torch.dtype) -> MLPWeights:
    """A copy of ``mlp`` with its tensors on ``device`` in ``dtype`` (no copy if already)."""
    changes = {
        field.name: getattr(mlp, field.name).to(device=device, dtype=dtype)
        for field in dataclasses.fields(mlp)
        if isinstance(getattr(mlp, field.name), Tensor)
    }
    return dataclasses.replace(mlp, **changes)


def feature_blocks(
    crosscoder: Crosscoder,
    mlp_weights_by_block: Mapping[int, MLPWeights],
    model: str | None = None,
    dtype: torch.dtype | None = None,
) -> list[MLPFeatureBlock]:
    """Pair each block's MLP with the crosscoder's decoder at its ``mlp_in``.

    ``dtype``: compute dtype (default: the decoder's); MLP weights are moved to the decoder's
    device and cast, decoder rows stay differentiable. ``model`` picks the model of a
    multi-model crosscoder."""
    if not mlp_weights_by_block:
        raise CrossintError("no MLP blocks given: pass {block: adapter.mlp_weights(block)}")
    available = mlp_in_blocks(crosscoder)
    chosen = sorted(mlp_weights_by_block)
    for block in chosen:
        if block not in available:
            raise CrossintError(
                f"the crosscoder does not read {hookpoint(block, 'mlp_in')}; MLP interactions "
                f"need the mlp_in hookpoint of each block (it reads mlp_in of blocks {available})"
            )
    names = [hookpoint(block, "mlp_in") for block in chosen]
    blocks = []
    for block, name, d_HD in zip(chosen, names, crosscoder.decoders(names, model), strict=True):
        b_dec_D = crosscoder.decoder_bias(name, model)
        target = dtype or d_HD.dtype
        mlp = mlp_on(mlp_weights_by_block[block], d_HD.device, target)
        blocks.append(MLPFeatureBlock(block, d_HD.to(target), b_dec_D.to(target), mlp))
    return blocks


def reconstructed_mlp_in(contrib: Contributions, block: MLPFeatureBlock) -> Tensor:
    """u_BD = Σ_k f_k·d_k + b_dec: the crosscoder's reconstruction of ``mlp_in``."""
    rows_BKD = block.d_HD[contrib.features_BK.clamp(min=0)].to(contrib.f_BK.dtype)
    return torch.einsum("bk,bkd->bd", contrib.f_BK, rows_BKD) + block.b_dec_D
