"""Compact-proof bounds on one MLP block (SPEC §7; the decisions are in docs/spec.md §7).

Block l's MLP reads the crosscoder's reconstruction ``x̂ = c + Σ_h q_h`` (SPEC §4.7). An
*explanation* E of the MLP is a cheaper function of the features: ``full`` (the MLP of the whole
feature sum, E(x̂) = MLP(x̂)), ``keep`` (SPEC §6.1 keep-dominant: each neuron reads c and its
dominant feature) or ``independent`` (SPEC §4.7: each feature's effect alone on c, summed). A
*strategy* is a way for a verifier to bound, per token, without running the MLP,

    gap_E = ‖MLP(x̂) − E(x̂)‖                                  (0 for ``full``)

and, with the model's own input x, ``‖MLP(x) − E(x̂)‖ ≤ gap_E + ‖MLP(x) − MLP(x̂)‖`` (the second
term: :func:`reconstruction_bounds`). Strategies, cheapest to tightest:

- ``feature_table``: per-feature tables a_h = Σ_n ‖W_out[n]‖·|V_hn| (O(K) per token);
- ``lipschitz``: SPEC §4.3, Lip(φ)·Σ_n ‖W_out[n]‖·(S_n − Mx_n);
- ``interval``: per neuron the largest |φ'| between the kept and the full pre-activation
  (independent: on the hull of every partial sum, with a curvature bound), from a certified table
  of φ over the data range (:class:`ActivationTable`);
- ``lowrank_r{r}``: every neuron's change exactly, pushed through W_out by a rank-r singular
  value bound with a certified remainder (r = 0: the spectral norm);
- ``brute_force``: run the MLP (exact; the reference cost).

Every bound is a pure function of one chunk of tokens (:func:`chunk_bounds`) and its cost is
counted in FLOPs per token (:func:`strategy_flops`) and in table FLOPs (:func:`table_flops`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from crossint.errors import CrossintError
from crossint.interactions.additivity import (
    MLPTerms,
    constant_terms,
    full_post,
    independent_post,
    kept_post,
    neuron_output,
    virtual_rows,
)
from crossint.interactions.contributions import (
    ActiveFeatures,
    MLPFeatureBlock,
    magnitude_stats,
    mlp_on,
    resolve_chunk,
)

if TYPE_CHECKING:
    from crossint.models.adapter import MLPWeights

EXPLANATIONS: tuple[str, ...] = ("full", "keep", "independent")
RANKS: tuple[int, ...] = (0, 4, 16)
GAP_STRATEGIES: tuple[str, ...] = ("feature_table", "lipschitz", "interval",
                                   *(f"lowrank_r{r}" for r in RANKS))
STRATEGIES: tuple[str, ...] = ("brute_force", *GAP_STRATEGIES)
# FLOP conventions (docs/spec.md §7): one FLOP per float add, subtract, multiply, divide,
# comparison, absolute value, max or square root; a multiply-add is 2. One evaluation of φ, φ'
# or φ'' costs ACTIVATION_FLOPS (1 for piecewise-linear φ); a range query of an
# ActivationTable TABLE_QUERY_FLOPS (two cell indices and one max; the reads are free).
ACTIVATION_FLOPS = 10
TABLE_QUERY_FLOPS = 5
RECON_RANK = 16  # the rank of W_in the reconstruction term projects the input error on
INTERVAL_RANK = 8  # the rank of W_out the signed interval bound projects on
ROUNDING = 1e-9  # relative margin on every bound: absorbs the verifier's own float64 rounding
TABLE_STEP = 2.0 ** -6
# Piecewise-linear activations and their breakpoints (multiples of TABLE_STEP, so every table
# cell is one linear piece); every other activation is treated as smooth (C³).
PIECEWISE_LINEAR: dict[str, tuple[float, ...]] = {
    "relu": (0.0,), "leaky_relu": (0.0,), "relu6": (0.0, 6.0), "linear": (), "identity": (),
}
CHUNK_ELEMENTS = 1 << 21  # B·K·N elements per chunk when none is given
CONSTANT_RANGE = 50.0  # derivative bounds of smooth φ are estimated on at least [−50, 50]
CONSTANT_GRID = 4e-4
CONSTANT_MARGIN = 2.0


def strategies_for(explanation: str) -> tuple[str, ...]:
    """The strategies that bound an explanation (``full`` has no gap: brute force and the
    Lipschitz reconstruction term only)."""
    if explanation not in EXPLANATIONS:
        raise CrossintError(f"unknown explanation {explanation!r}: valid are "
                            f"{', '.join(EXPLANATIONS)}")
    return ("brute_force", "lipschitz") if explanation == "full" else STRATEGIES


def activation_flops(act_name: str) -> int:
    """FLOPs of one evaluation of φ (or a derivative)."""
    return 1 if act_name in PIECEWISE_LINEAR else ACTIVATION_FLOPS


# --- certified tables of φ over a range --------------------------------------------------------
def derivatives(act: Callable[[Tensor], Tensor], t: Tensor, order: int) -> list[Tensor]:
    """[φ(t), φ'(t), ..., φ^(order)(t)] by automatic differentiation (float64)."""
    t = t.detach().to(torch.float64).clone().requires_grad_(True)
    with torch.enable_grad():
        values = [act(t)]
        for _ in range(order):
            (grad,) = torch.autograd.grad(values[-1].sum(), t, create_graph=order > 1)
            values.append(grad)
    return [v.detach() for v in values]


def _no_finite_constant(act_name: str, lo: float, hi: float, what: str) -> CrossintError:
    return CrossintError(
        f"the MLP activation {act_name!r} has no finite Lipschitz constant on the data range "
        f"[{lo:.4g}, {hi:.4g}] ({what} is not finite there): no bound can be certified"
    )


@lru_cache(maxsize=32)
def _smooth_constants(act: Callable[[Tensor], Tensor], act_name: str, reach: float
                      ) -> tuple[float, float]:
    """(C2, C3) ≥ (sup|φ''|, sup|φ'''|) on [−reach, reach]: the largest |φ''| (automatic
    differentiation) and the largest difference quotient of φ'' on a CONSTANT_GRID grid, times
    CONSTANT_MARGIN: the one numerical estimate the certificates rest on. (φ''' itself is not
    differentiated: autograd's third derivative of the tanh GELU overflows in the tails.)"""
    n = int(2 * reach / CONSTANT_GRID) + 1
    t = torch.linspace(-reach, reach, n, dtype=torch.float64)
    values = derivatives(act, t, 2)
    if not all(torch.isfinite(v).all() for v in values):
        raise _no_finite_constant(act_name, -reach, reach, "φ, φ' or φ''")
    third = (values[2][1:] - values[2][:-1]).abs() / (t[1:] - t[:-1])
    return (CONSTANT_MARGIN * float(values[2].abs().max()),
            CONSTANT_MARGIN * float(third.max()))


class RangeTable:
    """Range-max (or min) queries over a fixed array of cell values: a sparse table, level k
    holding the op over every run of 2^k cells (O(C log C) to build, O(1) per query, one gather
    for a whole tensor of queries)."""

    def __init__(self, values_C: Tensor, op: str = "max") -> None:
        self.op = op
        combine = torch.maximum if op == "max" else torch.minimum
        n = values_C.numel()
        levels = [values_C]
        width = 1
        while 2 * width <= n:
            levels.append(combine(levels[-1][:-width], levels[-1][width:]))
            width *= 2
        pad = -math.inf if op == "max" else math.inf  # never read by a valid query
        self.flat = torch.full((len(levels), n), pad, dtype=values_C.dtype)
        for k, level in enumerate(levels):
            self.flat[k, :level.numel()] = level
        self.flat = self.flat.reshape(-1)
        self.n_cells = n
        self.n_levels = len(levels)
        self.n_build_flops = sum(level.numel() for level in levels[1:])

    def query(self, first: Tensor, last: Tensor) -> Tensor:
        """The max (or min) of cells first..last inclusive (elementwise index tensors)."""
        length = (last - first + 1).clamp(min=1)
        level = (torch.frexp(length.double()).exponent - 1).clamp(max=self.n_levels - 1)
        base = level * self.n_cells
        a = self.flat[base + first]
        b = self.flat[base + (last - (1 << level.long()) + 1).clamp(min=0)]
        return torch.maximum(a, b) if self.op == "max" else torch.minimum(a, b)


@dataclass(frozen=True, eq=False)
class ActivationTable:
    """φ on the grid ``t0 + i·step`` (i = 0..C): per cell certified ranges of φ', |φ''| and φ.

    Smooth φ: a cell's φ' lies within its endpoint values ± step²·C3/8 (the error of linear
    interpolation), |φ''| below its endpoint values + step·C3/2 and φ within its endpoint values
    ± step²·C2/8, with C2, C3 bounds on |φ''|, |φ'''| (:func:`_smooth_constants`).
    Piecewise-linear φ (breakpoints on the grid): each cell is one linear piece, so the ranges
    are exact; the curvature is infinite on the cells touching a breakpoint.
    ``tables``: range tables ``slope_lo`` (min φ'), ``slope_hi``, ``abs_slope`` (max |φ'|),
    ``curvature`` (max |φ''|) and ``abs_value`` (max |φ|).
    """

    act_name: str
    t0: float
    step: float
    n_cells: int
    tables: dict[str, RangeTable]
    flops: float

    @property
    def lo(self) -> float:
        return self.t0

    @property
    def hi(self) -> float:
        return self.t0 + self.n_cells * self.step

    def covers(self, lo: float, hi: float) -> bool:
        return self.lo <= lo and hi <= self.hi

    def cells(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The first and last cell meeting [a, b] (a ≤ b elementwise, inside the table)."""
        scale = 1.0 / self.step
        first = torch.floor((a.double() - self.t0) * scale - 1e-9).long()
        last = torch.floor((b.double() - self.t0) * scale + 1e-9).long()
        return first.clamp(0, self.n_cells - 1), last.clamp(0, self.n_cells - 1)

    def query(self, a: Tensor, b: Tensor, *names: str) -> list[Tensor]:
        """The named ranges over [a, b] (one cell lookup for all of them)."""
        first, last = self.cells(a, b)
        return [self.tables[name].query(first, last) for name in names]

    def slope_range(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(min φ', max φ') on [a, b]."""
        low, high = self.query(a, b, "slope_lo", "slope_hi")
        return low, high

    def max_abs_slope(self, a: Tensor, b: Tensor) -> Tensor:
        """max |φ'| on [a, b]: the Lipschitz constant of φ there."""
        return self.query(a, b, "abs_slope")[0]

    def max_curvature(self, a: Tensor, b: Tensor) -> Tensor:
        return self.query(a, b, "curvature")[0]

    def max_abs_value(self, a: Tensor, b: Tensor) -> Tensor:
        return self.query(a, b, "abs_value")[0]

    def lipschitz(self) -> float:
        """max |φ'| over the whole table."""
        ends = torch.tensor([self.lo]), torch.tensor([self.hi])
        return float(self.max_abs_slope(*ends)[0])


def build_table(act: Callable[[Tensor], Tensor], act_name: str, lo: float, hi: float,
                step: float = TABLE_STEP) -> ActivationTable:
    """A certified :class:`ActivationTable` of φ covering [lo, hi] (CrossintError if φ has no
    finite derivative there)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise _no_finite_constant(act_name, lo, hi, "the range itself")
    t0 = math.floor(min(lo, hi) / step) * step
    n_cells = max(1, math.ceil((max(lo, hi) - t0) / step))
    grid = t0 + step * torch.arange(n_cells + 1, dtype=torch.float64)
    if act_name in PIECEWISE_LINEAR:
        ranges = _piecewise_linear_cells(act, act_name, grid, step)
        per_point = 2
    else:
        reach = max(CONSTANT_RANGE, 2.0 ** math.ceil(math.log2(max(abs(lo), abs(hi), 1.0))))
        ranges = _smooth_cells(act, act_name, grid, step, reach)
        per_point = 3
    slope_lo, slope_hi, curvature, value_lo, value_hi = ranges
    for name, values in (("φ'", slope_lo), ("φ'", slope_hi), ("φ", value_lo), ("φ", value_hi)):
        if not torch.isfinite(values).all():
            raise _no_finite_constant(act_name, lo, hi, name)
    tables = {
        "slope_lo": RangeTable(slope_lo, "min"), "slope_hi": RangeTable(slope_hi, "max"),
        "abs_slope": RangeTable(torch.maximum(slope_lo.abs(), slope_hi.abs()), "max"),
        "curvature": RangeTable(curvature, "max"),
        "abs_value": RangeTable(torch.maximum(value_lo.abs(), value_hi.abs()), "max"),
    }
    flops = (n_cells + 1) * per_point * activation_flops(act_name) + 14 * n_cells + sum(
        t.n_build_flops for t in tables.values())
    return ActivationTable(act_name, t0, step, n_cells, tables, flops=float(flops))


def _smooth_cells(act: Callable[[Tensor], Tensor], act_name: str, grid: Tensor, step: float,
                  reach: float) -> tuple[Tensor, ...]:
    C2, C3 = _smooth_constants(act, act_name, reach)
    value, slope, curv = derivatives(act, grid, 2)
    slack1, slack2, slack0 = step * step * C3 / 8, step * C3 / 2, step * step * C2 / 8
    return (torch.minimum(slope[:-1], slope[1:]) - slack1,
            torch.maximum(slope[:-1], slope[1:]) + slack1,
            torch.maximum(curv[:-1].abs(), curv[1:].abs()) + slack2,
            torch.minimum(value[:-1], value[1:]) - slack0,
            torch.maximum(value[:-1], value[1:]) + slack0)


def _piecewise_linear_cells(act: Callable[[Tensor], Tensor], act_name: str, grid: Tensor,
                            step: float) -> tuple[Tensor, ...]:
    middle = (grid[:-1] + grid[1:]) / 2
    _, slope = derivatives(act, middle, 1)
    value = derivatives(act, grid, 0)[0]
    curvature = torch.zeros_like(middle)
    for point in PIECEWISE_LINEAR[act_name]:
        touching = (grid[:-1] - point).abs().le(step / 2) | (grid[1:] - point).abs().le(step / 2)
        curvature[touching] = math.inf
    return (slope, slope.clone(), curvature, torch.minimum(value[:-1], value[1:]),
            torch.maximum(value[:-1], value[1:]))


def cover(table: ActivationTable | None, act: Callable[[Tensor], Tensor], act_name: str,
          lo: float, hi: float) -> ActivationTable:
    """``table`` if it covers [lo, hi], else a wider one (grown geometrically, so a run's
    tables are rebuilt O(log range) times)."""
    if table is not None and table.covers(lo, hi):
        return table
    if table is not None:
        lo, hi = min(lo, table.lo), max(hi, table.hi)
    margin = 0.25 * (hi - lo) + 1.0
    return build_table(act, act_name, lo - margin, hi + margin)


# --- the output side: W_out's rows and singular values -----------------------------------------
@dataclass(frozen=True)
class OutputSpectrum:
    """‖W_out[n]‖ per neuron, the singular values of W_out (descending) and its left singular
    vectors (N × min(N, D)): W_out = U·diag(σ)·Vᵀ."""

    w_N: Tensor
    sigma_R: Tensor
    U_NR: Tensor


def output_spectrum(W_out_ND: Tensor) -> OutputSpectrum:
    W = W_out_ND.double()
    U_NR, sigma_R, _ = torch.linalg.svd(W, full_matrices=False)
    return OutputSpectrum(W.norm(dim=1), sigma_R, U_NR)


def rows_bound(abs_BN: Tensor, spectrum: OutputSpectrum) -> Tensor:
    """Σ_n ‖W_out[n]‖·a_n ≥ ‖Δ·W_out‖ for any |Δ_n| ≤ a_n (SPEC §4.3's triangle inequality)."""
    return abs_BN @ spectrum.w_N


def spectral_bound(abs_BN: Tensor, spectrum: OutputSpectrum) -> Tensor:
    """σ₁(W_out)·‖a‖ ≥ ‖Δ·W_out‖ for any |Δ_n| ≤ a_n."""
    return spectrum.sigma_R[0] * abs_BN.norm(dim=-1)


def lowrank_bound(delta_BN: Tensor, spectrum: OutputSpectrum, rank: int) -> Tensor:
    """‖Δ·W_out‖ ≤ sqrt(σ_r²‖Δ‖² + Σ_{i<r} (σ_i² − σ_r²)(Δ·u_i)²) (exact for r ≥ rank W_out).

    ‖Δ·W_out‖² = Σ_i σ_i² (Δ·u_i)² and Σ_{i≥r} (Δ·u_i)² ≤ ‖Δ‖² − Σ_{i<r} (Δ·u_i)²."""
    sigma = spectrum.sigma_R
    r = min(rank, sigma.numel())
    tail = sigma[r] ** 2 if r < sigma.numel() else sigma.new_zeros(())
    value = tail * delta_BN.pow(2).sum(dim=-1)
    if r:
        coords_BR = delta_BN @ spectrum.U_NR[:, :r]
        value = value + coords_BR.pow(2) @ (sigma[:r] ** 2 - tail)
    return value.clamp(min=0).sqrt()


def rows_or_spectral(abs_BN: Tensor, spectrum: OutputSpectrum) -> Tensor:
    return torch.minimum(rows_bound(abs_BN, spectrum), spectral_bound(abs_BN, spectrum))


# --- one block as a verifier sees it -----------------------------------------------------------
@dataclass(eq=False)
class BlockVerifier:
    """What a verifier of block l precomputes (its tables), and the activation table it grows
    as the data range widens."""

    block: MLPFeatureBlock
    spectrum: OutputSpectrum
    in_spectrum: OutputSpectrum  # of W_in (D×N): its left singular vectors live in D
    sigma_in: float  # ‖W_in‖₂
    sigma_up: float  # ‖W_up‖₂ (0: plain MLP)
    col_in_N: Tensor  # ‖W_in[:, n]‖
    col_up_N: Tensor | None
    base_N: Tensor  # h(c): the neurons with no feature active
    mlp: MLPWeights  # the block's MLP in float64
    table: ActivationTable | None = None
    rebuilds: int = 0
    table_flops_total: float = field(default=0.0)

    def ensure(self, lo: float, hi: float) -> ActivationTable:
        table = cover(self.table, self.mlp.act, self.mlp.act_name, lo, hi)
        if table is not self.table:
            self.table, self.rebuilds = table, self.rebuilds + 1
            self.table_flops_total += table.flops
        return table

    def lipschitz(self) -> float:
        """Lip(φ) for the global strategies: the adapter's constant, raised to the table's
        maximum slope where the data range needs it (an estimated constant can be too small
        far from 0)."""
        assert self.table is not None
        return max(float(self.mlp.lipschitz), self.table.lipschitz())


def block_verifier(block: MLPFeatureBlock) -> BlockVerifier:
    mlp = mlp_on(block.mlp, block.mlp.W_in_DN.device, torch.float64)
    W_in = mlp.W_in_DN
    c_N, cu_N = constant_terms(block)
    gated = mlp.W_up_DN is not None
    return BlockVerifier(
        block=block, spectrum=output_spectrum(mlp.W_out_ND),
        in_spectrum=output_spectrum(mlp.W_in_DN),
        sigma_in=float(torch.linalg.matrix_norm(W_in, ord=2)),
        sigma_up=float(torch.linalg.matrix_norm(mlp.W_up_DN.double(), ord=2)) if gated else 0.0,
        col_in_N=W_in.norm(dim=0),
        col_up_N=mlp.W_up_DN.double().norm(dim=0) if gated else None,
        base_N=neuron_output(mlp.act, c_N.double(), None if cu_N is None else cu_N.double()),
        mlp=mlp,
    )


# --- chunks of tokens --------------------------------------------------------------------------
@dataclass(frozen=True)
class BoundChunk:
    """One chunk of tokens at one block: the split contributions, the reconstruction x̂ and
    (when known) the model's own MLP input x."""

    terms: MLPTerms
    xhat_BD: Tensor
    x_BD: Tensor | None


@torch.no_grad()
def iter_chunks(active: ActiveFeatures, block: MLPFeatureBlock, x_TD: Tensor | None = None,
                chunk_tokens: int | None = None) -> Iterator[tuple[Tensor, BoundChunk]]:
    """``(tokens_B, BoundChunk)`` per chunk, float64, V only for the active rows. Tokens are
    taken in order of descending active count (so chunks carry little padding);
    ``tokens_B`` are their indices in the batch."""
    order_T = torch.argsort(active.counts_B, descending=True, stable=True)
    active = active.by_count()
    V_UN, Vu_UN = (None if t is None else t.double() for t in virtual_rows(active, block))
    c_N, cu_N = (None if t is None else t.double() for t in constant_terms(block))
    d_UD = block.d_HD.detach().index_select(0, active.distinct_U).to(V_UN.dtype)
    b_dec_D = block.b_dec_D.detach().to(V_UN.dtype)
    per_token = active.features_BK.shape[1] * V_UN.shape[1] * (1 if Vu_UN is None else 2)
    if chunk_tokens is None:  # larger than resolve_chunk's: the per-chunk work is many passes
        mean_count = float(active.counts_B.double().mean()) if active.n_tokens else 1.0
        per_mean = max(mean_count, 1.0) * V_UN.shape[1] * (1 if Vu_UN is None else 2)
        chunk_tokens = max(16, int(CHUNK_ELEMENTS // per_mean))
    chunk_tokens = resolve_chunk(chunk_tokens, active.f_BK.device, per_token)
    for start in range(0, active.n_tokens, chunk_tokens):
        chunk = active.slice(start, min(start + chunk_tokens, active.n_tokens))
        tokens_B = order_T[start:start + chunk.n_tokens]
        k = chunk.features_BK.shape[1]
        f_BK = chunk.f_BK.to(V_UN.dtype)
        rows_BK = chunk.row_BK[:, :k]
        pu_BKN = None if Vu_UN is None else f_BK[:, :, None] * Vu_UN[rows_BK]
        terms = MLPTerms(f_BK[:, :, None] * V_UN[rows_BK], c_N, pu_BKN, cu_N, chunk.mask_BK)
        xhat_BD = b_dec_D + torch.nn.functional.embedding_bag(
            rows_BK, d_UD, per_sample_weights=f_BK, mode="sum")
        x_BD = None if x_TD is None else x_TD[tokens_B].to(V_UN.dtype)
        yield tokens_B, BoundChunk(terms, xhat_BD, x_BD)


@dataclass(frozen=True)
class NeuronSums:
    """Per token and neuron: S, Mx and the dominant slot of |p| (SPEC §4.2), the full and the
    kept pre-activation z and k, the positive and negative parts P⁺, N⁻ and Σ p²; for gated
    MLPs the same for the up projection's contributions b, Σ|a||b| and b at the dominant slot."""

    S: Tensor
    Mx: Tensor
    slot: Tensor
    z: Tensor
    k: Tensor
    pos: Tensor
    sq: Tensor
    u: Tensor | None = None
    Su: Tensor | None = None
    posu: Tensor | None = None
    cross: Tensor | None = None
    b_dom: Tensor | None = None

    @property
    def neg(self) -> Tensor:
        return self.S - self.pos


def neuron_sums(terms: MLPTerms) -> NeuronSums:
    p = terms.p_BKN
    abs_p = p.abs()
    S, Mx, slot = magnitude_stats(abs_p)
    p_dom = p.gather(1, slot[:, None]).squeeze(1)
    sums = dict(S=S, Mx=Mx, slot=slot, z=terms.c_N + p.sum(dim=1), k=terms.c_N + p_dom,
                pos=p.clamp(min=0).sum(dim=1), sq=p.pow(2).sum(dim=1))
    if terms.pu_BKN is not None:
        pu = terms.pu_BKN
        sums.update(u=terms.cu_N + pu.sum(dim=1), Su=pu.abs().sum(dim=1),
                    posu=pu.clamp(min=0).sum(dim=1), cross=(abs_p * pu.abs()).sum(dim=1),
                    b_dom=pu.gather(1, slot[:, None]).squeeze(1))
    return NeuronSums(**sums)


def query_range(sums: NeuronSums, chunk: BoundChunk, verifier: BlockVerifier
                ) -> tuple[float, float]:
    """The pre-activations a chunk's bounds query: z, k, the hull c − N⁻ … c + P⁺ and the
    reconstruction segment ẑ ± ‖W_in[:, n]‖·‖x − x̂‖."""
    c = chunk.terms.c_N
    lows = [sums.z, sums.k, c - sums.neg]
    highs = [sums.z, sums.k, c + sums.pos]
    if chunk.x_BD is not None:
        reach_BN = (chunk.x_BD - chunk.xhat_BD).norm(dim=-1, keepdim=True) * verifier.col_in_N
        lows.append(sums.z - reach_BN)
        highs.append(sums.z + reach_BN)
    return (min(float(t.min()) for t in lows) if sums.z.numel() else 0.0,
            max(float(t.max()) for t in highs) if sums.z.numel() else 0.0)


# --- the strategies ----------------------------------------------------------------------------
def _keep_bounds(s: NeuronSums, terms: MLPTerms, v: BlockVerifier, table: ActivationTable,
                 exact_BN: Tensor) -> dict[str, Tensor]:
    """SPEC §4.3-style bounds on ‖MLP(x̂) − MLP_keep(x̂)‖: |φ(z) − φ(k)|·|u| per neuron."""
    spectrum, L = v.spectrum, v.lipschitz()
    up_abs = 1.0 if s.u is None else s.u.abs()
    out = {"lipschitz": L * rows_bound((s.S - s.Mx) * up_abs, spectrum)}
    mass_BK = terms.p_BKN.abs() @ spectrum.w_N  # = |f_k|·a_k, from the per-feature table
    out["feature_table"] = L * _up_max(terms) * (mass_BK.sum(1) - mass_BK.amax(1))
    out["interval"] = _keep_interval_bound(s, table, spectrum)
    out.update(_lowrank(exact_BN, spectrum))
    return out


def _keep_interval_bound(s: NeuronSums, table: ActivationTable, spectrum: OutputSpectrum
                         ) -> Tensor:
    """By the mean value theorem φ(z) − φ(k) = φ'(ξ)·(z − k) with φ'(ξ) in the table's slope
    range [m⁻, m⁺] over [k, z]. Two bounds, the smaller kept: the unsigned one
    (max|φ'|·|z − k| per neuron, through the rows or σ₁ of W_out) and the signed one: the
    midpoint change (m⁻ + m⁺)/2·(z − k) through a rank-INTERVAL_RANK bound of W_out, plus the
    radius (m⁺ − m⁻)/2·|z − k| through the rows or σ₁."""
    d_BN = s.z - s.k
    slope_abs, slope_lo, slope_hi = table.query(torch.minimum(s.z, s.k),
                                                torch.maximum(s.z, s.k),
                                                "abs_slope", "slope_lo", "slope_hi")
    up = 1.0 if s.u is None else s.u
    up_abs = 1.0 if s.u is None else s.u.abs()
    unsigned = rows_or_spectral(slope_abs * d_BN.abs() * up_abs, spectrum)
    middle_BN = (slope_lo + slope_hi) / 2 * d_BN * up
    radius_BN = (slope_hi - slope_lo) / 2 * d_BN.abs() * up_abs
    signed = (lowrank_bound(middle_BN, spectrum, INTERVAL_RANK)
              + rows_or_spectral(radius_BN, spectrum))
    return torch.minimum(unsigned, signed)


def _up_max(terms: MLPTerms) -> Tensor | float:
    """max_n |u_n| over every partial sum of the up contributions: ‖cu‖_∞ + Σ_k max_n |b_kn|
    (= |f_k|·max_n |Vu_kn|, a per-feature table); 1 for plain MLPs."""
    if terms.pu_BKN is None:
        return 1.0
    return terms.cu_N.abs().max() + terms.pu_BKN.abs().amax(dim=2).sum(dim=1)


def _lowrank(exact_BN: Tensor, spectrum: OutputSpectrum) -> dict[str, Tensor]:
    rows = rows_bound(exact_BN.abs(), spectrum)
    return {f"lowrank_r{r}": torch.minimum(rows, lowrank_bound(exact_BN, spectrum, r))
            for r in RANKS}


def _independent_bounds(s: NeuronSums, terms: MLPTerms, v: BlockVerifier,
                        table: ActivationTable, exact_BN: Tensor) -> dict[str, Tensor]:
    """Bounds on the SPEC §4.7 additivity error ‖MLP(x̂) − MLP_ind(x̂)‖.

    Per neuron, with g(a) = h(c + a) − h(c) and j the dominant slot, the defect
    g(Σa) − Σ_k g(a_k) = [g(Σa) − g(a_j)] − Σ_{k≠j} g(a_k) is at most
    L·(|Σ_{k≠j} a_k| + Σ_{k≠j} |a_k|) (first order), and at most
    sup|φ''|·Σ_{i<k} |a_i||a_k| = sup|φ''|·(S² − Σa²)/2 (second order; every partial sum lies in
    the hull c − N⁻ … c + P⁺). Gated MLPs add the up projection's terms (docs/spec.md §7)."""
    spectrum, L = v.spectrum, v.lipschitz()
    mass_BK = terms.p_BKN.abs() @ spectrum.w_N
    j_B = mass_BK.argmax(dim=1, keepdim=True)
    rest_B = mass_BK.sum(1) - mass_BK.gather(1, j_B).squeeze(1)
    if s.u is None:
        out = {"lipschitz": 2 * L * rows_bound(s.S - s.Mx, spectrum),
               "feature_table": 2 * L * rest_B}
    else:
        out = _gated_global_independent(s, terms, v, L, j_B, rest_B)
    out["interval"] = rows_or_spectral(_interval_independent(s, terms, v, table), spectrum)
    out.update(_lowrank(exact_BN, spectrum))
    return out


def _gated_global_independent(s: NeuronSums, terms: MLPTerms, v: BlockVerifier, L: float,
                              j_B: Tensor, rest_B: Tensor) -> dict[str, Tensor]:
    assert s.Su is not None and s.b_dom is not None and terms.pu_BKN is not None
    base_abs = v.mlp.act(terms.c_N).abs()  # |φ(c)| per neuron
    U_BN = terms.cu_N.abs() + s.Su
    Phi_BN = base_abs + L * s.S
    per_neuron = L * U_BN * (s.S - s.Mx) + Phi_BN * (s.Su - s.b_dom.abs())
    up_mass_BK = terms.pu_BKN.abs() @ v.spectrum.w_N
    up_rest_B = up_mass_BK.sum(1) - up_mass_BK.gather(1, j_B).squeeze(1)
    Phi_max = base_abs.max() + L * terms.p_BKN.abs().amax(dim=2).sum(dim=1)
    return {"lipschitz": 2 * rows_bound(per_neuron, v.spectrum),
            "feature_table": 2 * (L * _up_max(terms) * rest_B + Phi_max * up_rest_B)}


def _interval_independent(s: NeuronSums, terms: MLPTerms, v: BlockVerifier,
                          table: ActivationTable) -> Tensor:
    c = terms.c_N
    lo, hi = c - s.neg, c + s.pos
    M = table.max_abs_slope(lo, hi)
    C = table.max_curvature(lo, hi)
    pairs = (s.S.pow(2) - s.sq).clamp(min=0) / 2
    rest = (s.z - s.k).abs() + s.S - s.Mx
    if s.u is None:
        second = torch.where(pairs > 0, C * pairs, torch.zeros_like(pairs))
        return torch.minimum(M * rest, second)
    assert s.Su is not None and s.posu is not None and s.cross is not None
    cu, negu = terms.cu_N, s.Su - s.posu
    U = torch.maximum((cu - negu).abs(), (cu + s.posu).abs())
    Phi = table.max_abs_value(lo, hi)
    sum_b = s.u - cu
    first = M * U * rest + Phi * ((sum_b - s.b_dom).abs() + s.Su - s.b_dom.abs())
    curvature_part = torch.where(pairs > 0, C * U * pairs, torch.zeros_like(pairs))
    second = curvature_part + M * (s.S * s.Su - s.cross).clamp(min=0)
    return torch.minimum(first, second)


# --- the reconstruction term ‖MLP(x) − MLP(x̂)‖ -------------------------------------------------
def reconstruction_bounds(chunk: BoundChunk, s: NeuronSums, v: BlockVerifier,
                          table: ActivationTable) -> Tensor:
    """Per token, ‖MLP(x) − MLP(x̂)‖ ≤ ‖W_out‖₂·‖Δh‖. With r = x − x̂, ε = ‖r‖,
    ‖Δz‖ = ‖r·W_in‖ ≤ a rank-RECON_RANK singular value bound of W_in, and on the data range
    of the segment (ẑ ± ‖W_in[:, n]‖ε) L = max|φ'| and Φ = max|φ|: plain ‖Δh‖ ≤ L·‖Δz‖; gated
    ‖Δh‖ ≤ L·(‖û‖_∞ + max_n ‖W_up[:, n]‖ε)·‖Δz‖ + Φ·‖W_up‖₂·ε."""
    assert chunk.x_BD is not None
    r_BD = chunk.x_BD - chunk.xhat_BD
    eps_B = r_BD.norm(dim=-1)
    dz_B = torch.minimum(lowrank_bound(r_BD, v.in_spectrum, RECON_RANK), v.sigma_in * eps_B)
    reach_BN = eps_B[:, None] * v.col_in_N
    lo_B = (s.z - reach_BN).amin(dim=1)
    hi_B = (s.z + reach_BN).amax(dim=1)
    L_B = table.max_abs_slope(lo_B, hi_B)
    sigma_out = v.spectrum.sigma_R[0]
    if s.u is None:
        return sigma_out * L_B * dz_B
    assert v.col_up_N is not None
    Phi_B = table.max_abs_value(lo_B, hi_B)
    u_max_B = s.u.abs().amax(dim=1) + v.col_up_N.max() * eps_B
    return sigma_out * (L_B * u_max_B * dz_B + Phi_B * v.sigma_up * eps_B)


# --- one chunk: measured errors and every bound --------------------------------------------------
@dataclass(frozen=True)
class ChunkBounds:
    """Per token of a chunk: ``gap[E]`` = ‖MLP(x̂) − E(x̂)‖ measured, ``bounds[E][strategy]``
    its bounds, and with the model's input x: ``total[E]`` = ‖MLP(x) − E(x̂)‖ and
    ``recon_bound`` ≥ ‖MLP(x) − MLP(x̂)‖ (add it to a gap bound to bound the total)."""

    gap: dict[str, Tensor]
    bounds: dict[str, dict[str, Tensor]]
    total: dict[str, Tensor] | None
    recon_bound: Tensor | None
    outputs: dict[str, Tensor] | None = None  # each explanation's (and "zero"'s) MLP output

    def total_bound(self, explanation: str, strategy: str) -> Tensor:
        """A bound on ‖MLP(x) − E(x̂)‖ (brute force: the measured total)."""
        assert self.total is not None and self.recon_bound is not None
        if strategy == "brute_force":
            return self.total[explanation]
        if explanation == "full":
            return self.recon_bound
        return self.bounds[explanation][strategy] + self.recon_bound


@torch.no_grad()
def chunk_bounds(chunk: BoundChunk, verifier: BlockVerifier) -> ChunkBounds:
    """Every strategy's bound and the measured errors for one chunk (all float64)."""
    terms = chunk.terms
    mlp = verifier.mlp
    act, W_out = mlp.act, mlp.W_out_ND.double()
    s = neuron_sums(terms)
    table = verifier.ensure(*query_range(s, chunk, verifier))
    full_BN = full_post(terms, act)
    p_dom_BN = terms.p_BKN.gather(1, s.slot[:, None]).squeeze(1)
    posts = {"full": full_BN, "keep": kept_post(terms, act, p_dom_BN),
             "independent": independent_post(terms, act)}
    gap = {e: ((full_BN - post) @ W_out).norm(dim=-1) for e, post in posts.items()}
    bounds = {"keep": _keep_bounds(s, terms, verifier, table, full_BN - posts["keep"]),
              "independent": _independent_bounds(s, terms, verifier, table,
                                                 full_BN - posts["independent"])}
    for explanation, by_strategy in bounds.items():
        for strategy, value in by_strategy.items():
            by_strategy[strategy] = value * (1 + ROUNDING)
        by_strategy["brute_force"] = gap[explanation]
    total = recon = None
    if chunk.x_BD is not None:
        model_BN = mlp.post(chunk.x_BD)
        total = {e: ((model_BN - post) @ W_out).norm(dim=-1) for e, post in posts.items()}
        recon = reconstruction_bounds(chunk, s, verifier, table) * (1 + ROUNDING)
    posts["zero"] = kept_post(terms, act, torch.zeros_like(full_BN))  # SPEC §6.1 zero: z = c
    b_out = mlp.b_out_D.double()
    outputs = {e: mlp.to_residual(post @ W_out + b_out) for e, post in posts.items()}
    return ChunkBounds(gap, bounds, total, recon, outputs)


# --- what each strategy costs ------------------------------------------------------------------
def strategy_flops(explanation: str, strategy: str, K: float, N: int, D: int, gated: bool,
                   act_name: str, total: bool = False) -> float:
    """FLOPs per token of a strategy (``K`` active features; conventions at the top of this
    module; the formulas are spelled out in docs/bounds.md). ``total``: the bound on
    ‖MLP(x) − E(x̂)‖, i.e. plus :func:`reconstruction_flops` (brute force: plus running the
    MLP on x)."""
    phi = activation_flops(act_name)
    if strategy == "brute_force":
        flops = _brute_force_flops(explanation, K, N, D, gated, phi)
        return flops + (_mlp_forward_flops(N, D, gated, phi) if total else 0.0)
    if explanation == "full":
        return reconstruction_flops(K, N, D, gated) if total else 0.0
    table = _gap_flops[explanation]
    if strategy.startswith("lowrank_r"):
        flops = table["lowrank"](K, N, gated, phi, int(strategy.removeprefix("lowrank_r")))
    else:
        flops = table[strategy](K, N, gated, phi)
    return flops + (reconstruction_flops(K, N, D, gated) if total else 0.0)


def _mlp_forward_flops(N: int, D: int, gated: bool, phi: int) -> float:
    """z = x·W_in + b_in and φ(z) (gated: u = x·W_up + b_up and φ(z)·u)."""
    return 2 * D * N + N + phi * N + ((2 * D * N + 2 * N) if gated else 0)


def _brute_force_flops(explanation: str, K: float, N: int, D: int, gated: bool, phi: int
                       ) -> float:
    """x̂ from the features, the MLP on x̂, the explanation's own neurons, the difference
    through W_out and its norm."""
    common = 2 * K * D + _mlp_forward_flops(N, D, gated, phi) + N + 2 * N * D + 2 * D + 1
    if explanation == "full":  # the MLP on x̂ is the explanation: only the total is measured
        return common
    if explanation == "keep":  # p, |p| and the max, k = c + p_dom, h(k)
        return common + 3 * K * N + N + phi * N + (N if gated else 0)
    # every feature alone: c + p_k, h(c + p_k), Σ_k (h_k − h(c)), then h(c) + Σ
    return common + (4 + phi) * K * N + N + (3 * K * N if gated else 0)


def reconstruction_flops(K: float, N: int, D: int, gated: bool) -> float:
    """x̂, r = x − x̂ and ε = ‖r‖, the rank-RECON_RANK projection of r on W_in's singular
    vectors, ẑ (to know the data range), the per-neuron reach ẑ ± ‖W_in[:,n]‖ε, one table
    query and the product of constants (gated: also û and its max)."""
    r = min(RECON_RANK, D)
    flops = 2 * K * D + 3 * D + (2 * r * D + 3 * r + 4) + 2 * K * N + 6 * N + TABLE_QUERY_FLOPS + 4
    if gated:
        flops += 2 * K * N + 3 * N + TABLE_QUERY_FLOPS + 6
    return flops


def _keep_interval(K: float, N: int, gated: bool, phi: int) -> float:
    """p, Σ, |p| and the max (4KN); k, z − k, |z − k|, the interval's ends; one table
    lookup reading three ranges; the unsigned bound (product, rows, ℓ2, min); the signed one
    (midpoint and radius, their products, a rank-INTERVAL_RANK projection, rows, ℓ2)."""
    r = INTERVAL_RANK
    flops = 4 * K * N + (24 + TABLE_QUERY_FLOPS + 2 * r) * N + 3 * r + 8
    return flops + ((2 * K * N + 4 * N) if gated else 0)


def _keep_lowrank(K: float, N: int, gated: bool, phi: int, r: int) -> float:
    flops = 4 * K * N + (2 * phi + 7 + 2 * r) * N + 3 * r + 4
    return flops + ((2 * K * N + 3 * N) if gated else 0)


def _independent_lowrank(K: float, N: int, gated: bool, phi: int, r: int) -> float:
    flops = (4 + phi) * K * N + (phi + 8 + 2 * r) * N + 3 * r + 4
    return flops + ((5 * K * N + 2 * N) if gated else 0)


def _independent_interval(K: float, N: int, gated: bool, phi: int) -> float:
    flops = 9 * K * N + (2 * TABLE_QUERY_FLOPS + 19) * N + 3
    return flops + ((7 * K * N + (17 + TABLE_QUERY_FLOPS) * N) if gated else 0)


_gap_flops: dict[str, dict[str, Callable[..., float]]] = {
    "keep": {
        # p, |p|, Σ|p|, the max; S − Mx, ·‖W_out[n]‖, Σ; ·L   (gated: u, |u|, ·|u|)
        "lipschitz": lambda K, N, g, phi: 4 * K * N + 3 * N + 1 + ((2 * K * N + 3 * N) if g
                                                                   else 0),
        # |f_k|·a_k, Σ, max, difference, ·L   (gated: U_max = ‖cu‖_∞ + Σ |f_k|·m_k, ·U)
        "feature_table": lambda K, N, g, phi: 4 * K + 2 + ((2 * K + 2) if g else 0),
        "interval": _keep_interval,
        "lowrank": _keep_lowrank,
    },
    "independent": {
        "lipschitz": lambda K, N, g, phi: 4 * K * N + 3 * N + 1 + ((3 * K * N + 9 * N) if g
                                                                   else 0),
        "feature_table": lambda K, N, g, phi: 4 * K + 3 + ((6 * K + 6) if g else 0),
        "interval": _independent_interval,
        "lowrank": _independent_lowrank,
    },
}


def table_flops(strategy: str, H: int, N: int, D: int, gated: bool, act_name: str,
                activation_table: float = 0.0) -> float:
    """FLOPs of the tables a strategy precomputes once for a block: V = d·W_in for all H
    features (every strategy but ``feature_table`` reads p = f·V), the per-feature tables
    a_h = Σ_n ‖W_out[n]‖·|V_hn| (and m_h, b_h for gated MLPs), h(c), the activation table and
    the SVD of W_out (≈ 4·N·D² + 8·D³) with its row norms."""
    up = 2 if gated else 1
    V = 2 * H * D * N * up
    per_feature = 3 * H * N * (3 if gated else 1)
    base = 2 * D * N + activation_flops(act_name) * N
    svd = 2 * (4 * N * D * D + 8 * D ** 3) + 2 * N * D  # W_out's and W_in's
    if strategy == "feature_table":
        return V + per_feature + base
    if strategy == "brute_force":
        return V + base
    if strategy == "lipschitz":
        return V + 2 * N * D + base
    return V + base + svd + activation_table


__all__ = [
    "ACTIVATION_FLOPS", "EXPLANATIONS", "GAP_STRATEGIES", "RANKS", "STRATEGIES",
    "TABLE_QUERY_FLOPS", "ActivationTable", "BlockVerifier", "BoundChunk", "ChunkBounds",
    "NeuronSums", "OutputSpectrum", "RangeTable", "block_verifier", "build_table",
    "chunk_bounds", "cover", "derivatives", "iter_chunks", "lowrank_bound", "neuron_sums",
    "output_spectrum", "reconstruction_bounds", "reconstruction_flops", "rows_bound",
    "spectral_bound", "strategies_for", "strategy_flops", "table_flops",
]
