"""Pairwise MLP feature interactions (SPEC §4.5–§4.6).

* :class:`PairwiseAccumulator` — the corrected Figure-3 matrix
  ``I[i,j] = (1/T) Σ_tokens Σ_blocks Σ_n 1[dom(b,n)=i]·‖W_out[n]‖·|p[b,n,j]|`` (j ≠ i), kept per
  block so (i, j, block) triplets can be ranked, plus co-occurrence counts ``C[i,j]``. Mass from
  every neuron is summed (per token a K×K matrix ``M[d,k] = Σ_n 1[slot dom(n)=d]·w_n·|p[k,n]|``
  from one batched product, then an ``index_add`` that adds duplicates correctly). Dense storage
  for small H, sparse coalesced (key, value) lists for large H.
* The proposal's measures for chosen pairs: ratio ``r_n(i,j)``, Hadamard ``‖V_i ⊙ V_j‖₁`` and the
  exact second difference Δ² (:class:`PairMeasureAccumulator`), and Spearman rank correlation
  of the cheap measures with Δ².
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from crossint.crosscoder.sparse import sparse_codes, sparse_decode
from crossint.errors import CrossintError
from crossint.interactions.contributions import (
    Contributions,
    MLPFeatureBlock,
    NeuronStats,
    virtual_weights,
)

STORAGES: tuple[str, ...] = ("auto", "dense", "sparse")
RANKINGS: tuple[str, ...] = ("total", "strength", "frequency")
# "auto" stores densely up to this many (block, i, j) cells: 2^24 float64 = 128 MiB.
DENSE_MAX_CELLS = 1 << 24
_MIN_PENDING = 1 << 20  # sparse entries buffered before a merge


# --- per-chunk pieces --------------------------------------------------------------------------
def interaction_mass(
    contrib: Contributions, stats: NeuronStats, w_out_N: Tensor, with_self: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """SPEC §4.5 mass of one chunk at one block as (i_E, j_E, mass_E), summed over neurons per
    token: entry (b, i, j) = Σ_n 1[dom(b,n) = i]·‖W_out[n]‖·|p[b,n,j]| for j ≠ i, non-zero only.
    ``with_self``: also j = i, the dominant feature's own weighted contribution at the neurons
    it dominates (the diagonal the LIB comparison's edges keep)."""
    features_BK = contrib.features_BK
    n_slots = features_BK.shape[1]
    weighted_BKN = contrib.p_BKN.abs() * w_out_N
    dominant_BKN = torch.zeros_like(weighted_BKN).scatter_(
        1, stats.slot_BN[:, None, :], (stats.Mx_BN > 0).to(weighted_BKN.dtype)[:, None, :]
    )
    mass_BKK = torch.bmm(dominant_BKN, weighted_BKN.transpose(1, 2))  # [b, dominant, other]
    valid_BK = features_BK >= 0
    keep_BKK = valid_BK[:, :, None] & valid_BK[:, None, :] & (mass_BKK > 0)
    if not with_self:
        keep_BKK &= ~torch.eye(n_slots, dtype=torch.bool, device=keep_BKK.device)
    b_E, d_E, k_E = keep_BKK.nonzero(as_tuple=True)
    return features_BK[b_E, d_E], features_BK[b_E, k_E], mass_BKK[b_E, d_E, k_E]


def cooccurring_pairs(features_BK: Tensor) -> tuple[Tensor, Tensor]:
    """Ordered pairs (i, j), i ≠ j, of features active on the same token, once per token."""
    n_slots = features_BK.shape[1]
    valid_BK = features_BK >= 0
    both_BKK = valid_BK[:, :, None] & valid_BK[:, None, :]
    both_BKK &= ~torch.eye(n_slots, dtype=torch.bool, device=both_BKK.device)
    b_E, k1_E, k2_E = both_BKK.nonzero(as_tuple=True)
    return features_BK[b_E, k1_E], features_BK[b_E, k2_E]


def _coalesce(keys_E: Tensor, values_E: Tensor) -> tuple[Tensor, Tensor]:
    """Sum the values of equal keys; keys come back sorted and unique."""
    unique_G, inverse_E = torch.unique(keys_E, return_inverse=True)
    sums_G = torch.zeros(unique_G.shape[0], dtype=values_E.dtype, device=values_E.device)
    return unique_G, sums_G.index_add_(0, inverse_E, values_E)


class _SparseSum:
    """A growing key → sum map: chunks are coalesced on arrival and merged in batches."""

    def __init__(self, device: torch.device) -> None:
        self.keys = torch.zeros(0, dtype=torch.int64, device=device)
        self.values = torch.zeros(0, dtype=torch.float64, device=device)
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._n_pending = 0

    def add(self, keys_E: Tensor, values_E: Tensor) -> None:
        if keys_E.numel() == 0:
            return
        keys_E, values_E = _coalesce(keys_E, values_E.to(torch.float64))
        self._pending.append((keys_E, values_E))
        self._n_pending += keys_E.numel()
        if self._n_pending > max(self.keys.numel(), _MIN_PENDING):
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        keys = torch.cat([self.keys, *(k for k, _ in self._pending)])
        values = torch.cat([self.values, *(v for _, v in self._pending)])
        self._pending, self._n_pending = [], 0
        self.keys, self.values = _coalesce(keys, values)


# --- the accumulator ---------------------------------------------------------------------------
class PairwiseAccumulator:
    """Accumulates SPEC §4.5 over chunks of tokens.

    ``update(records)`` takes one chunk's ``(block, contributions, stats)`` for every block (the
    same tokens at each block); ``result()`` returns a :class:`PairwiseResult`. ``storage``:
    ``"dense"`` (L·H² float64 mass + H² counts), ``"sparse"`` (only pairs that ever co-occur) or
    ``"auto"`` (dense up to L·H² = 2^24 cells).
    """

    def __init__(self, n_features: int, blocks: Sequence[int], storage: str = "auto") -> None:
        if not isinstance(n_features, int) or n_features < 1:
            raise CrossintError(f"n_features must be a positive integer, got {n_features!r}")
        if storage not in STORAGES:
            raise CrossintError(
                f"unknown pairwise storage {storage!r}: valid choices are {', '.join(STORAGES)}"
            )
        self.blocks = sorted(set(int(b) for b in blocks))
        if not self.blocks:
            raise CrossintError("pairwise interactions need at least one block")
        self.n_features = n_features
        cells = len(self.blocks) * n_features**2
        if storage == "auto":
            storage = "dense" if cells <= DENSE_MAX_CELLS else "sparse"
        self.storage = storage
        self.n_tokens = 0
        self._position = {block: x for x, block in enumerate(self.blocks)}
        self._mass: Tensor | _SparseSum | None = None
        self._count: Tensor | _SparseSum | None = None

    def _init_storage(self, device: torch.device) -> None:
        H, L = self.n_features, len(self.blocks)
        if self.storage == "dense":
            self._mass = torch.zeros(L * H * H, dtype=torch.float64, device=device)
            self._count = torch.zeros(H * H, dtype=torch.float64, device=device)
        else:
            self._mass, self._count = _SparseSum(device), _SparseSum(device)

    def update(
        self, records: Sequence[tuple[MLPFeatureBlock, Contributions, NeuronStats]]
    ) -> None:
        """Add one chunk of tokens (counted once), with its contributions at every block."""
        if not records:
            return
        features_BK = records[0][1].features_BK
        if self._mass is None:
            self._init_storage(features_BK.device)
        H = self.n_features
        for block, contrib, stats in records:
            if block.block not in self._position:
                raise CrossintError(
                    f"block {block.block} was not declared to the pairwise accumulator "
                    f"(blocks {self.blocks})"
                )
            if contrib.features_BK.shape[0] != features_BK.shape[0]:
                raise CrossintError("pairwise update: every block must see the same tokens")
            i_E, j_E, mass_E = interaction_mass(contrib, stats, block.w_out_N)
            keys_E = (self._position[block.block] * H + i_E) * H + j_E
            self._add(self._mass, keys_E, mass_E)
        i_E, j_E = cooccurring_pairs(features_BK)
        self._add(self._count, i_E * H + j_E, torch.ones_like(i_E, dtype=torch.float64))
        self.n_tokens += features_BK.shape[0]

    @staticmethod
    def _add(store: Tensor | _SparseSum | None, keys_E: Tensor, values_E: Tensor) -> None:
        if isinstance(store, _SparseSum):
            store.add(keys_E, values_E)
        else:
            assert store is not None
            store.index_add_(0, keys_E, values_E.to(store.dtype))  # duplicates add up

    def result(self) -> PairwiseResult:
        H, L = self.n_features, len(self.blocks)
        if self._mass is None:
            self._init_storage(torch.device("cpu"))
        mass, count = self._mass, self._count
        if isinstance(mass, _SparseSum):
            assert isinstance(count, _SparseSum)
            mass.flush()
            count.flush()
            return PairwiseResult(H, list(self.blocks), self.n_tokens, "sparse",
                                  mass.keys, mass.values, count.keys, count.values)
        assert isinstance(mass, Tensor) and isinstance(count, Tensor)
        mass_keys = mass.nonzero().squeeze(1)
        count_keys = count.nonzero().squeeze(1)
        return PairwiseResult(H, list(self.blocks), self.n_tokens, "dense",
                              mass_keys, mass[mass_keys], count_keys, count[count_keys],
                              dense_mass_LHH=mass.view(L, H, H).clone(),
                              dense_count_HH=count.view(H, H).clone())


@dataclass
class PairwiseResult:
    """Accumulated pairwise interactions. Raw sums are kept as sorted (key, value) lists:
    mass key = (block position·H + i)·H + j, count key = i·H + j."""

    n_features: int
    blocks: list[int]
    n_tokens: int
    storage: str
    mass_keys_E: Tensor
    mass_E: Tensor
    count_keys_E: Tensor
    count_E: Tensor
    dense_mass_LHH: Tensor | None = field(default=None, repr=False)
    dense_count_HH: Tensor | None = field(default=None, repr=False)

    def _split(self, keys_E: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        H = self.n_features
        return keys_E // (H * H), (keys_E // H) % H, keys_E % H

    def interaction_matrix(self, block: int | None = None) -> Tensor:
        """I (H×H) of SPEC §4.5, mass / T: summed over blocks, or at one ``block``. Dense storage
        gives a dense tensor, sparse storage a coalesced sparse COO tensor."""
        H, T = self.n_features, max(self.n_tokens, 1)
        if block is not None and block not in self.blocks:
            raise CrossintError(f"no pairwise data for block {block}; blocks are {self.blocks}")
        if self.dense_mass_LHH is not None:
            if block is None:
                return self.dense_mass_LHH.sum(dim=0) / T
            return self.dense_mass_LHH[self.blocks.index(block)] / T
        x_E, i_E, j_E = self._split(self.mass_keys_E)
        values_E = self.mass_E
        if block is not None:
            keep_E = x_E == self.blocks.index(block)
            i_E, j_E, values_E = i_E[keep_E], j_E[keep_E], values_E[keep_E]
        indices = torch.stack([i_E, j_E])
        return torch.sparse_coo_tensor(indices, values_E / T, (H, H),
                                       check_invariants=False).coalesce()

    def cooccurrence(self) -> Tensor:
        """C[i, j]: tokens on which both i and j are active (dense or sparse like I)."""
        if self.dense_count_HH is not None:
            return self.dense_count_HH
        H = self.n_features
        indices = torch.stack([self.count_keys_E // H, self.count_keys_E % H])
        return torch.sparse_coo_tensor(indices, self.count_E, (H, H),
                                       check_invariants=False).coalesce()

    def triplets(self) -> dict[str, Tensor]:
        """Every (i, j, block) with interaction mass: ``total`` = its I entry (mass / T),
        ``count`` = C[i, j], ``strength`` = mass / C[i, j] (mean per co-active token)."""
        H = self.n_features
        x_E, i_E, j_E = self._split(self.mass_keys_E)
        where_E = torch.searchsorted(self.count_keys_E, i_E * H + j_E)
        where_E = where_E.clamp(max=max(self.count_keys_E.numel() - 1, 0))
        count_E = (self.count_E[where_E] if self.count_E.numel()
                   else torch.zeros_like(self.mass_E))
        block_ids = torch.tensor(self.blocks, dtype=torch.int64, device=x_E.device)
        return {
            "i": i_E,
            "j": j_E,
            "block": block_ids[x_E],
            "total": self.mass_E / max(self.n_tokens, 1),
            "count": count_E,
            "strength": self.mass_E / count_E.clamp_min(1),
        }

    def top_triplets(self, n: int, by: str = "total") -> dict[str, Tensor]:
        """The ``n`` strongest triplets ranked ``by`` total (I), strength (per co-active token)
        or frequency (co-occurrence count; ties broken by total)."""
        if by not in RANKINGS:
            raise CrossintError(f"unknown ranking {by!r}: valid choices are {', '.join(RANKINGS)}")
        rows = self.triplets()
        if by == "frequency":
            # count is an exact integer, so count + total/(max total+1) orders by count, then total
            total = rows["total"]
            key = rows["count"] + total / (total.max() + 1 if total.numel() else 1)
        else:
            key = rows[by]
        order = key.argsort(descending=True, stable=True)[:n]
        return {name: values[order] for name, values in rows.items()}


# --- SPEC §4.6 measures for chosen pairs -------------------------------------------------------
def hadamard_measure(V_i_QN: Tensor, V_j_QN: Tensor) -> Tensor:
    """SPEC §4.6 ‖V[i,:] ⊙ V[j,:]‖₁ (weights only, data-independent)."""
    return (V_i_QN * V_j_QN).abs().sum(dim=-1)


def ratio_measure(p_i_EN: Tensor, p_j_EN: Tensor, w_N: Tensor) -> Tensor:
    """SPEC §4.6 r_n(i,j) = min(|p_i|,|p_j|) / max(|p_i|,|p_j|), averaged over neurons with
    weights w_N, per co-active (token, pair). A neuron both features miss (max = 0) counts 0."""
    a_EN, b_EN = p_i_EN.abs(), p_j_EN.abs()
    high_EN = torch.maximum(a_EN, b_EN)
    ratio_EN = torch.where(high_EN > 0, torch.minimum(a_EN, b_EN) / high_EN.clamp_min(1e-300),
                           torch.zeros_like(high_EN))
    return (ratio_EN * w_N).sum(dim=-1) / w_N.sum()


def second_difference(
    mlp_forward: Callable[[Tensor], Tensor], u_ED: Tensor, q_i_ED: Tensor, q_j_ED: Tensor
) -> Tensor:
    """SPEC §4.6 Δ² = ‖MLP(u) − MLP(u − q_i) − MLP(u − q_j) + MLP(u − q_i − q_j)‖."""
    out_4ED = mlp_forward(torch.stack([u_ED, u_ED - q_i_ED, u_ED - q_j_ED,
                                       u_ED - q_i_ED - q_j_ED]))
    return (out_4ED[0] - out_4ED[1] - out_4ED[2] + out_4ED[3]).norm(dim=-1)


class PairMeasureAccumulator:
    """Ratio measure and exact Δ² of chosen (i, j, block) triplets averaged over the tokens
    where both features are active, plus their Hadamard measure. Feed batches of f_BH.

    Δ² costs four MLP evaluations per co-active (token, pair): meant for the top pairs only.
    """

    def __init__(
        self,
        blocks: Sequence[MLPFeatureBlock],
        i_Q: Tensor,
        j_Q: Tensor,
        block_Q: Tensor,
        chunk_pairs: int = 4096,
    ) -> None:
        by_id = {b.block: b for b in blocks}
        missing = sorted(set(block_Q.tolist()) - set(by_id))
        if missing:
            raise CrossintError(f"pairs name blocks {missing}, but only {sorted(by_id)} are given")
        if not (i_Q.shape == j_Q.shape == block_Q.shape) or i_Q.dim() != 1:
            raise CrossintError("i, j and block must be 1-d tensors of the same length")
        self.i_Q, self.j_Q, self.block_Q = i_Q.long(), j_Q.long(), block_Q.long()
        self.chunk_pairs = chunk_pairs
        self._groups = []  # (block, pair indices, V_i, V_j)
        hadamard_Q = torch.zeros(i_Q.shape[0], dtype=torch.float64)
        for block_id in sorted(set(block_Q.tolist())):
            block = by_id[block_id]
            where_Q = (self.block_Q == block_id).nonzero().squeeze(1)
            device = block.d_HD.device
            with torch.no_grad():
                V_i_QN = virtual_weights(block.d_HD[self.i_Q[where_Q].to(device)],
                                         block.mlp.W_in_DN)
                V_j_QN = virtual_weights(block.d_HD[self.j_Q[where_Q].to(device)],
                                         block.mlp.W_in_DN)
            hadamard_Q[where_Q] = hadamard_measure(V_i_QN, V_j_QN).double().cpu()
            self._groups.append((block, where_Q, V_i_QN, V_j_QN))
        self.hadamard_Q = hadamard_Q
        n = i_Q.shape[0]
        self._ratio_Q = torch.zeros(n, dtype=torch.float64)
        self._delta2_Q = torch.zeros(n, dtype=torch.float64)
        self._count_Q = torch.zeros(n, dtype=torch.float64)

    @torch.no_grad()
    def update(self, f_BH: Tensor) -> None:
        codes = sparse_codes(f_BH)
        for block, where_Q, V_i_QN, V_j_QN in self._groups:
            dtype, device = block.d_HD.dtype, block.d_HD.device
            f_dev_BH = f_BH.to(device=device, dtype=dtype)
            i_Q, j_Q = self.i_Q[where_Q].to(device), self.j_Q[where_Q].to(device)
            f_i_BQ, f_j_BQ = f_dev_BH[:, i_Q], f_dev_BH[:, j_Q]
            b_E, q_E = ((f_i_BQ != 0) & (f_j_BQ != 0)).nonzero(as_tuple=True)
            if b_E.numel() == 0:
                continue
            u_BD = sparse_decode(codes, block.d_HD[:, None, :])[:, 0] + block.b_dec_D
            w_N = block.w_out_N
            for start in range(0, b_E.numel(), self.chunk_pairs):
                b, q = b_E[start:start + self.chunk_pairs], q_E[start:start + self.chunk_pairs]
                f_i_E, f_j_E = f_i_BQ[b, q], f_j_BQ[b, q]
                ratio_E = ratio_measure(f_i_E[:, None] * V_i_QN[q], f_j_E[:, None] * V_j_QN[q],
                                        w_N)
                delta2_E = second_difference(
                    block.mlp.forward, u_BD[b],
                    f_i_E[:, None] * block.d_HD[i_Q[q]], f_j_E[:, None] * block.d_HD[j_Q[q]],
                )
                target = where_Q.to(device)[q]
                self._ratio_Q.index_add_(0, target.cpu(), ratio_E.double().cpu())
                self._delta2_Q.index_add_(0, target.cpu(), delta2_E.double().cpu())
                self._count_Q.index_add_(0, target.cpu(),
                                         torch.ones(target.shape[0], dtype=torch.float64))

    def result(self) -> dict[str, Tensor]:
        """Per pair: ``ratio`` and ``delta2`` (means over co-active tokens; NaN if never
        co-active), ``coactive`` token count and ``hadamard``."""
        count_Q = self._count_Q
        nan_Q = torch.full_like(count_Q, float("nan"))
        return {
            "ratio": torch.where(count_Q > 0, self._ratio_Q / count_Q.clamp_min(1), nan_Q),
            "delta2": torch.where(count_Q > 0, self._delta2_Q / count_Q.clamp_min(1), nan_Q),
            "coactive": count_Q.clone(),
            "hadamard": self.hadamard_Q.clone(),
        }


# --- rank correlation --------------------------------------------------------------------------
def average_ranks(x_Q: Tensor) -> Tensor:
    """Ranks 1..n with ties given their average rank (float64)."""
    sorted_Q, order_Q = x_Q.double().sort(stable=True)
    _, inverse_Q, counts_G = torch.unique_consecutive(sorted_Q, return_inverse=True,
                                                      return_counts=True)
    ends_G = counts_G.cumsum(0).double()
    mean_rank_G = ends_G - (counts_G.double() - 1) / 2
    ranks_Q = torch.empty_like(sorted_Q)
    ranks_Q[order_Q] = mean_rank_G[inverse_Q]
    return ranks_Q


def spearman(x_Q: Tensor, y_Q: Tensor) -> float:
    """Spearman rank correlation over the entries where both are finite (NaN if undefined)."""
    keep_Q = torch.isfinite(x_Q) & torch.isfinite(y_Q)
    if int(keep_Q.sum()) < 2:
        return float("nan")
    rx_Q, ry_Q = average_ranks(x_Q[keep_Q]), average_ranks(y_Q[keep_Q])
    rx_Q, ry_Q = rx_Q - rx_Q.mean(), ry_Q - ry_Q.mean()
    denominator = float((rx_Q.norm() * ry_Q.norm()).item())
    return float((rx_Q @ ry_Q).item()) / denominator if denominator > 0 else float("nan")


def measure_correlations(reference_Q: Tensor, measures: dict[str, Tensor]) -> dict[str, Any]:
    """Spearman correlation of each cheap measure with the reference (Δ²) over the same pairs."""
    return {name: spearman(values_Q.cpu(), reference_Q.cpu())
            for name, values_Q in measures.items()}
