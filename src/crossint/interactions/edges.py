"""One yardstick for the interactions of any representation (SPEC §11 and its Decisions).

A representation's interactions at one block are weighted *edges* (receiver i, sender j): the
SPEC §11 edges between adjacent PCA or LIB node layers, or for a crosscoder the SPEC §4.5 mass of
feature j at the neurons feature i dominates (plus, on the diagonal, i's own contribution there).
The yardstick is the same for all:

- *interaction sparsity*: the fewest top-weighted edges that keep the model's loss within a
  tolerance of the loss with every edge kept, all others ablated (``bisect_edges``);
- the *edge-weight distribution*: Gini coefficient and the fraction of the weight held by the top
  1% of edges (``gini``, ``top_fraction``, ``cumulative_weight``).

The crosscoder's edge ablation (``kept_pre_activations``) rebuilds a block's MLP pre-activation
from the dominant feature's contribution at each neuron and the contributions whose edge to it
is kept; with no edge kept the MLP sees only c (its bias-only value), with every edge the full
reconstruction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from crossint.errors import CrossintError
from crossint.interactions.contributions import (
    Contributions,
    MLPFeatureBlock,
    NeuronStats,
    iter_contributions,
    neuron_stats,
    reconstructed_mlp_in,
)
from crossint.interactions.pairwise import interaction_mass

DENSE_TABLE_LIMIT = 1 << 26  # H² up to this: kept edges as a dense boolean table


# --- edge-weight distributions ----------------------------------------------------------------
def edge_order(weights: Tensor) -> Tensor:
    """Flat indices of ``weights`` by descending weight, ties by ascending index."""
    flat = weights.reshape(-1).double()
    return torch.sort(-flat, stable=True).indices


def top_edge_mask(weights: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly the ``k`` largest entries (ties: the earlier index)."""
    if not 0 <= k <= weights.numel():
        raise CrossintError(f"cannot keep {k} of {weights.numel()} edges")
    mask = torch.zeros(weights.numel(), dtype=torch.bool)
    mask[edge_order(weights)[:k]] = True
    return mask.reshape(weights.shape)


def gini(weights: Tensor) -> float:
    """Gini coefficient of non-negative weights: 0 when all are equal, → 1 when one edge holds
    everything (NaN without weight)."""
    x = torch.sort(weights.reshape(-1).double().clamp(min=0)).values
    n, total = x.numel(), float(x.sum()) if x.numel() else 0.0
    if n == 0 or total <= 0:
        return float("nan")
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float(2 * (ranks * x).sum() / (n * total) - (n + 1) / n)


def top_fraction(weights: Tensor, fraction: float = 0.01) -> float:
    """The share of the total weight held by the top ⌈fraction·n⌉ edges."""
    x = weights.reshape(-1).double().clamp(min=0)
    total = float(x.sum())
    if x.numel() == 0 or total <= 0:
        return float("nan")
    k = max(1, math.ceil(fraction * x.numel()))
    return float(torch.topk(x, k).values.sum() / total)


def cumulative_weight(weights: Tensor, n_points: int = 200) -> tuple[list[int], list[float]]:
    """(edge counts, fraction of the total weight in that many top edges) at about ``n_points``
    log-spaced counts from 1 to the number of edges: the curves of the edge-weight plot."""
    x = torch.sort(weights.reshape(-1).double().clamp(min=0), descending=True).values
    total = float(x.sum())
    if x.numel() == 0 or total <= 0:
        return [], []
    cumulative = torch.cumsum(x, 0) / total
    counts = torch.unique(torch.logspace(0, math.log10(x.numel()), n_points).round().long())
    counts = counts.clamp(1, x.numel())
    return counts.tolist(), cumulative[counts - 1].tolist()


def distribution_stats(weights: Tensor, n_possible: int | None = None) -> dict[str, float]:
    """Gini and top-1% share over the given (non-zero) edges, and over all ``n_possible`` edges
    (the missing ones count as zero weight)."""
    nonzero = weights.reshape(-1)[weights.reshape(-1) > 0]
    stats = {"n_nonzero": int(nonzero.numel()), "gini_nonzero": gini(nonzero),
             "top1_fraction_nonzero": top_fraction(nonzero)}
    n_possible = int(n_possible if n_possible is not None else weights.numel())
    padded = torch.cat([nonzero.double(), torch.zeros(max(n_possible - nonzero.numel(), 0),
                                                      dtype=torch.float64)])
    stats.update(n_possible=n_possible, gini=gini(padded), top1_fraction=top_fraction(padded))
    return stats


# --- interaction sparsity: bisection over the number of kept edges -----------------------------
@dataclass(frozen=True)
class Sparsity:
    """The fewest top edges keeping the loss at most ``target``: ``edges`` passes, ``lo`` (−1:
    none tried) fails, so the answer lies in (lo, edges] (exact when edges − lo = 1)."""

    target: float
    edges: int
    lo: int
    loss: float


@dataclass
class EdgeBisection:
    """Bisection over k (the top-k edges kept) with every loss remembered, so that several
    targets share evaluations. ``loss_of(k)`` is the model's loss with the top k edges kept."""

    loss_of: Callable[[int], float]
    n_edges: int
    precision: float = 0.0  # stop when hi − lo ≤ max(1, precision·hi)
    losses: dict[int, float] = field(default_factory=dict)

    def loss(self, k: int) -> float:
        if k not in self.losses:
            value = float(self.loss_of(k))
            if not math.isfinite(value):
                raise CrossintError(f"the loss with {k} of {self.n_edges} edges kept is {value}")
            self.losses[k] = value
        return self.losses[k]

    def search(self, target: float) -> Sparsity:
        """The smallest k whose loss is at most ``target`` (assuming the loss falls as edges are
        added; with every edge kept it must pass)."""
        if self.loss(self.n_edges) > target:
            raise CrossintError(f"even with all {self.n_edges} edges the loss "
                                f"{self.losses[self.n_edges]:.4g} exceeds the target {target:.4g}")
        if self.loss(0) <= target:
            return Sparsity(target, 0, -1, self.losses[0])
        hi = min(k for k, v in self.losses.items() if v <= target)
        lo = max(k for k, v in self.losses.items() if v > target and k < hi)
        while hi - lo > max(1, self.precision * hi):
            mid = (lo + hi) // 2
            if self.loss(mid) <= target:
                hi = mid
            else:
                lo = mid
        return Sparsity(target, hi, lo, self.losses[hi])

    def curve(self) -> list[tuple[int, float]]:
        """Every evaluated (k, loss), ascending k."""
        return sorted(self.losses.items())


def bisect_edges(loss_of: Callable[[int], float], n_edges: int, targets: Sequence[float],
                 precision: float = 0.0) -> tuple[list[Sparsity], list[tuple[int, float]]]:
    """``Sparsity`` for each target (loosest first, sharing evaluations) and the loss curve."""
    if not 0 <= precision < 1:
        raise CrossintError(f"bisection precision must be in [0, 1), got {precision!r}")
    search = EdgeBisection(loss_of, n_edges, precision)
    found = {t: search.search(t) for t in sorted(targets, reverse=True)}
    return [found[t] for t in targets], search.curve()


# --- crosscoder edges (SPEC §4.5 with the diagonal) -------------------------------------------
def feature_edge_mass(contrib: Contributions, stats: NeuronStats,
                      w_out_N: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per token, ``(i_E, j_E, mass_E)``: SPEC §4.5 for j ≠ i, and for j = i the dominant
    feature's own weighted contribution at the neurons it dominates."""
    return interaction_mass(contrib, stats, w_out_N, with_self=True)


class EdgeSums:
    """Edge weights summed over chunks: (i, j) keys coalesced as they arrive (float64)."""

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.sums = torch.zeros(0, dtype=torch.float64)

    def add(self, i_E: Tensor, j_E: Tensor, mass_E: Tensor) -> None:
        keys = torch.cat([self.keys, (i_E * self.n_features + j_E).cpu().long()])
        values = torch.cat([self.sums, mass_E.detach().cpu().double()])
        self.keys, inverse = torch.unique(keys, return_inverse=True)
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64).index_add_(0, inverse, values)

    def edges(self, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """``(i_Q, j_Q, weight_Q)``, sorted by key."""
        return (self.keys // self.n_features, self.keys % self.n_features, self.sums * scale)


class EdgeSet:
    """A set of kept (i, j) edges among ``n_features`` features: a dense boolean table for
    moderate H, sorted keys otherwise."""

    def __init__(self, i_Q: Tensor, j_Q: Tensor, n_features: int) -> None:
        self.n_features = n_features
        keys = (i_Q.long() * n_features + j_Q.long()).cpu()
        if n_features * n_features <= DENSE_TABLE_LIMIT:
            self.table: Tensor | None = torch.zeros(n_features * n_features, dtype=torch.bool)
            self.table[keys] = True
            self.keys = None
        else:
            self.table, self.keys = None, torch.sort(torch.unique(keys)).values

    def contains(self, i: Tensor, j: Tensor) -> Tensor:
        """Elementwise membership of (i, j); negative indices (padding) are never members."""
        valid = (i >= 0) & (j >= 0)
        keys = (i.clamp(min=0) * self.n_features + j.clamp(min=0)).long()
        if self.table is not None:
            return self.table.to(keys.device)[keys] & valid
        assert self.keys is not None
        sorted_keys = self.keys.to(keys.device)
        at = torch.searchsorted(sorted_keys, keys).clamp(max=max(len(sorted_keys) - 1, 0))
        found = sorted_keys[at] == keys if len(sorted_keys) else torch.zeros_like(valid)
        return found & valid


def kept_pre_activations(contrib: Contributions, stats: NeuronStats,
                         kept: EdgeSet | None) -> Tensor:
    """B×N: Σ_k p[b,k,n] over the slots whose edge (dom(b,n), feature(b,k)) is kept (the
    dominant feature itself through the diagonal edge); ``kept`` None keeps every edge, seen or
    not (the full reconstruction). Add c for the pre-activation."""
    if kept is None:
        return contrib.z_BN
    dominant_BN = contrib.features_BK.gather(1, stats.slot_BN)
    keep_BKN = kept.contains(dominant_BN[:, None, :], contrib.features_BK[:, :, None])
    return (contrib.p_BKN * keep_BKN).sum(dim=1)


def kept_mlp_output(f_TH: Tensor, block: MLPFeatureBlock, kept: EdgeSet | None,
                    chunk_tokens: int | None = None) -> Tensor:
    """Block l's MLP output (T×D) rebuilt from the features with only the ``kept`` edges (None:
    all): ``φ(c + kept_pre_activations)·W_out + b_out`` (a gated MLP's up projection reads the whole
    reconstructed ``mlp_in``, as in SPEC §4.3)."""
    mlp = block.mlp
    parts = []
    for _, contrib in iter_contributions(f_TH.to(block.d_HD.dtype), block.d_HD, mlp.W_in_DN,
                                         chunk_tokens):
        z_BN = block.c_N + kept_pre_activations(contrib, neuron_stats(contrib), kept)
        post_BN = mlp.act(z_BN)
        if mlp.gated:
            assert mlp.W_up_DN is not None and mlp.b_up_N is not None
            post_BN = post_BN * (reconstructed_mlp_in(contrib, block) @ mlp.W_up_DN + mlp.b_up_N)
        parts.append(mlp.to_residual(post_BN @ mlp.W_out_ND + mlp.b_out_D))
    if not parts:
        return block.d_HD.new_zeros((0, mlp.W_out_ND.shape[1]))
    return torch.cat(parts)


# --- modularity (Louvain, networkx) -----------------------------------------------------------
MODULARITY_SEED = 0  # Louvain visits nodes in a random order: fixed, so the modules are repeatable


def _networkx() -> Any:
    try:
        import networkx
    except ImportError as e:
        raise CrossintError("modularity needs networkx: pip install 'crossint[graph]'") from e
    return networkx


def edge_graph(u_Q: Tensor, v_Q: Tensor, weight_Q: Tensor, n_nodes: int) -> Any:
    """An undirected weighted networkx graph on nodes 0..n_nodes−1 with edges (u, v, weight);
    zero weights dropped, repeated pairs (either direction) summed."""
    nx = _networkx()
    keep = weight_Q > 0
    lo_Q = torch.minimum(u_Q[keep], v_Q[keep]).long()
    hi_Q = torch.maximum(u_Q[keep], v_Q[keep]).long()
    keys, inverse = torch.unique(lo_Q * n_nodes + hi_Q, return_inverse=True)
    sums = torch.zeros(len(keys), dtype=torch.float64).index_add_(
        0, inverse, weight_Q[keep].double())
    graph = nx.Graph()
    graph.add_nodes_from(range(n_nodes))
    graph.add_weighted_edges_from(zip((keys // n_nodes).tolist(), (keys % n_nodes).tolist(),
                                      sums.tolist(), strict=True))
    return graph


def louvain_modules(graph: Any, seed: int = MODULARITY_SEED) -> tuple[float, list[int]]:
    """(modularity Q, module of every node) of networkx's Louvain partition of ``graph``
    (weighted, resolution 1). Q is NaN for a graph without weight; isolated nodes are their
    own modules."""
    nx = _networkx()
    module_N = [0] * graph.number_of_nodes()
    if graph.size(weight="weight") <= 0:
        for k, node in enumerate(graph.nodes):
            module_N[node] = k
        return float("nan"), module_N
    communities = nx.community.louvain_communities(graph, weight="weight", seed=seed)
    communities = sorted(communities, key=lambda c: (-len(c), min(c)))
    for m, community in enumerate(communities):
        for node in community:
            module_N[node] = m
    return float(nx.community.modularity(graph, communities, weight="weight")), module_N


def bipartite_modularity(i_Q: Tensor, j_Q: Tensor, weight_Q: Tensor, n_out: int,
                         n_in: int, seed: int = MODULARITY_SEED) -> dict[str, Any]:
    """Modularity of one block's graph: its ``n_in`` input functions (senders j) and ``n_out``
    output functions (receivers i) as distinct nodes, edge (i, j) weighted by its weight. The
    same construction for a basis (E[i, j]) and for a crosscoder's features (§4.5 with the
    diagonal), so the numbers compare."""
    graph = edge_graph(i_Q.long() + n_in, j_Q.long(), weight_Q, n_in + n_out)
    q, module_N = louvain_modules(graph, seed)
    sizes = torch.bincount(torch.tensor(module_N, dtype=torch.long)) if module_N else None
    touched = sizes[sizes > 1] if sizes is not None else torch.zeros(0)
    return {"modularity": q, "n_modules": int(touched.numel()),
            "module_sizes": sorted(touched.tolist(), reverse=True)[:10]}


def dense_edges(E_IJ: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(i_Q, j_Q, weight_Q)`` of the non-zero entries of a dense edge matrix."""
    i_Q, j_Q = (E_IJ > 0).nonzero(as_tuple=True)
    return i_Q, j_Q, E_IJ[i_Q, j_Q]


def layered_modules(edges: Sequence[Tensor], seed: int = MODULARITY_SEED
                    ) -> tuple[float, list[list[int]]]:
    """Louvain over a whole layered graph: node layer k has ``edges[k].shape[1]`` nodes (and the
    last ``edges[-1].shape[0]``); ``edges[l]`` (I×J) joins layer l's node j to layer l + 1's
    node i. Returns (modularity, the module of every node per layer)."""
    sizes = [E.shape[1] for E in edges] + ([edges[-1].shape[0]] if edges else [])
    offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    parts = [dense_edges(E) for E in edges]
    u_Q = torch.cat([i + offsets[l + 1] for l, (i, _, _) in enumerate(parts)] or [torch.zeros(0)])
    v_Q = torch.cat([j + offsets[l] for l, (_, j, _) in enumerate(parts)] or [torch.zeros(0)])
    w_Q = torch.cat([w.double() for _, _, w in parts] or [torch.zeros(0)])
    q, module_N = louvain_modules(edge_graph(u_Q.long(), v_Q.long(), w_Q, offsets[-1]), seed)
    return q, [module_N[offsets[k]:offsets[k + 1]] for k in range(len(sizes))]
