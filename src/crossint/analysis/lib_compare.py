"""PCA, LIB and a crosscoder's features on one yardstick (SPEC §11 and its Decisions).

For every block and representation: the fewest top-weighted edges that keep the next-token loss
within each tolerance of the loss with every edge kept, all other edges ablated (bisection over
the edge count, ``crossint.interactions.edges``), and the edge-weight distribution.

- PCA and LIB: edges run from node layer l to node layer l + 1 through block l (SPEC §11 E from
  `crossint lib`); ablating them recomputes block l's output per output function from the input
  functions whose edges are kept, the others at their mean (``masked_block_output``).
- Crosscoder: edges (i, j) at block l's MLP are SPEC §4.5's (feature j's contribution at the
  neurons feature i dominates), with the diagonal (i's own contribution there); ablating them
  rebuilds the MLP from the kept contributions and writes its output over ``blocks.l.mlp_out``.

The edges are ranked on the text `crossint lib` computed its edges on (the first
``edge_tokens`` held-out tokens); the losses are measured on the contexts that follow it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossint import rundir
from crossint.analysis.heldout import HeldoutRequest, heldout_batches, load_run
from crossint.analysis.lib import (
    COMPARE_FORMAT,
    COMPARE_TOKENS,
    PRECISION,
    TOLERANCES,
    BatchPass,
    LibResult,
    _bar,
    _count_tokens,
    _finite_json,
    _num,
    block_function,
    frozen,
    read_lib,
    run_batch,
)
from crossint.analysis.splicing import replace_where
from crossint.errors import CrossintError
from crossint.interactions.contributions import (
    feature_blocks,
    iter_contributions,
    mlp_in_blocks,
    neuron_stats,
)
from crossint.interactions.edges import (
    EdgeBisection,
    EdgeSet,
    EdgeSums,
    bipartite_modularity,
    cumulative_weight,
    dense_edges,
    distribution_stats,
    edge_order,
    feature_edge_mass,
    kept_mlp_output,
)
from crossint.interactions.lib import KINDS, LayerBasis, masked_block_output
from crossint.io import atomic_write_json, sha256_file
from crossint.models.hookpoints import hookpoint, split_hookpoint
from crossint.rundir import RunDir

REPRESENTATIONS = (*KINDS, "crosscoder")


# --- the loss text -------------------------------------------------------------------------------
@dataclass
class LossText:
    """Held-out batches captured once: node layers, block calls and crosscoder features."""

    batches: list[BatchPass]
    features: list[Tensor | None]

    @property
    def n_tokens(self) -> int:
        return int(sum(int(b.keep_BS[:, :-1].sum()) for b in self.batches))

    def mean_loss(self, adapter: Any,
                  patches_of: Callable[[int, BatchPass], dict] | None = None) -> float:
        """Mean next-token loss over the positions whose token is not special."""
        total, count = 0.0, 0
        with torch.no_grad():
            for index, batch in enumerate(self.batches):
                patches = patches_of(index, batch) if patches_of is not None else None
                losses_BS = adapter.token_losses(batch.ids_BS, patches=patches)
                mask_BS = batch.keep_BS[:, :-1]
                total += float(losses_BS[mask_BS].double().sum())
                count += int(mask_BS.sum())
        return total / max(count, 1)


def encode_batch(crosscoder: Any, batch: BatchPass) -> Tensor:
    """The crosscoder's features (T, H) of the batch's non-special tokens."""
    hookpoints = crosscoder.config.hookpoints
    acts_TXD = torch.stack([batch.acts[h][batch.keep_BS] for h in hookpoints], dim=1).float()
    return crosscoder.encode(acts_TXD.to(next(crosscoder.parameters()).device))


def loss_text(adapter: Any, batches: list[Tensor], names: list[str], crosscoder: Any,
              progress: bool) -> LossText:
    hookpoints = list(dict.fromkeys([*names, *crosscoder.config.hookpoints]))
    special, passes, features = adapter.special_token_ids(), [], []
    with torch.no_grad(), _bar(len(batches), "loss text", progress) as bar:
        for ids_BS in batches:
            batch = run_batch(adapter, ids_BS, hookpoints, range(adapter.n_blocks), special)
            passes.append(batch)
            features.append(encode_batch(crosscoder, batch))
            bar.update()
    return LossText(passes, features)


def split_text(adapter: Any, request: HeldoutRequest, edge_tokens: int,
               loss_tokens: int) -> tuple[list[Tensor], list[Tensor]]:
    """(the edge text: the first ``edge_tokens`` held-out tokens, the loss text: the contexts
    after it, at least ``loss_tokens`` tokens), both in batches of ``request.batch_size``."""
    edge = heldout_batches(adapter, dataclasses.replace(request, n_tokens=edge_tokens))
    used = _count_tokens(edge, adapter.special_token_ids())
    both = heldout_batches(adapter, dataclasses.replace(request, n_tokens=used + loss_tokens))
    contexts = torch.cat(both)[sum(len(b) for b in edge):]
    if len(contexts) == 0:
        raise CrossintError(f"the corpus {request.corpus!r} has no held-out text after the "
                            f"{edge_tokens} tokens the edges were computed on")
    return edge, list(contexts.split(request.batch_size))


# --- crosscoder edges ---------------------------------------------------------------------------
def crosscoder_edges(adapter: Any, crosscoder: Any, batches: list[Tensor], blocks: list[int],
                     progress: bool) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """Per block, SPEC §4.5 edges with the diagonal, ``(i_Q, j_Q, weight_Q)``: mass per token
    (float64), over the non-special tokens of ``batches``."""
    fblocks = feature_blocks(crosscoder, {l: adapter.mlp_weights(l) for l in blocks},
                             dtype=torch.float64)
    n_features = crosscoder.config.n_features
    sums = {fb.block: EdgeSums(n_features) for fb in fblocks}
    special, n_tokens = adapter.special_token_ids(), 0
    with torch.no_grad(), _bar(len(batches), "crosscoder edges", progress) as bar:
        for ids_BS in batches:
            batch = run_batch(adapter, ids_BS, crosscoder.config.hookpoints, [], special)
            f_TH = encode_batch(crosscoder, batch).double()
            n_tokens += f_TH.shape[0]
            for fb in fblocks:
                found = [feature_edge_mass(c, neuron_stats(c), fb.w_out_N)
                         for _, c in iter_contributions(f_TH, fb.d_HD, fb.mlp.W_in_DN)]
                if found:
                    sums[fb.block].add(*(torch.cat(part) for part in zip(*found, strict=True)))
            bar.update()
    return {l: s.edges(1.0 / max(n_tokens, 1)) for l, s in sums.items()}


# --- sparsity per representation and block -------------------------------------------------------
def _sparsity_entry(bisection: EdgeBisection, tolerances: Sequence[float],
                    loss_all: float) -> dict[str, Any]:
    """Edges needed for each tolerance above ``loss_all``; ``None`` where even every candidate
    edge misses the target (possible for a crosscoder: pairs never seen on the edge text are
    not candidates, yet ``loss_all`` keeps them)."""
    n_edges, reachable = bisection.n_edges, bisection.loss(bisection.n_edges)
    rows = []
    for tol in tolerances:
        target = loss_all + tol
        if reachable > target:
            rows.append({"tolerance": tol, "target": target, "edges": None, "lo": n_edges,
                         "loss": reachable, "fraction": None})
            continue
        found = bisection.search(target)
        rows.append({"tolerance": tol, "target": target, "edges": found.edges, "lo": found.lo,
                     "loss": found.loss,
                     "fraction": found.edges / n_edges if n_edges else float("nan")})
    return {"loss_all": loss_all, "loss_none": bisection.loss(0),
            "loss_candidates": reachable, "n_edges": n_edges, "sparsity": rows,
            "curve": [list(p) for p in bisection.curve()]}


def basis_sparsity(adapter: Any, text: LossText, bases: list[LayerBasis], l: int, E_IJ: Tensor,
                   tolerances: Sequence[float], precision: float) -> dict[str, Any]:
    """Interaction sparsity of a PCA or LIB basis at block l."""
    order, shape, name = edge_order(E_IJ), E_IJ.shape, bases[l].name
    out = hookpoint(l, "resid_post")

    def loss_of(k: int) -> float:
        mask = torch.zeros(E_IJ.numel(), dtype=torch.bool)
        mask[order[:k]] = True

        def patches(index: int, batch: BatchPass) -> dict:
            y_BSD = masked_block_output(block_function(adapter, batch, l), batch.acts[name],
                                        batch.keep_BS, bases[l], bases[l + 1], mask.view(shape))
            return {out: lambda _: y_BSD}

        return text.mean_loss(adapter, patches)

    bisection = EdgeBisection(loss_of, E_IJ.numel(), precision)
    entry = _sparsity_entry(bisection, tolerances, bisection.loss(E_IJ.numel()))
    return {"block": l, "from": name, "to": bases[l + 1].name, "n_in": shape[1],
            "n_out": shape[0], **entry, **distribution_stats(E_IJ),
            **bipartite_modularity(*dense_edges(E_IJ), *shape)}


def crosscoder_sparsity(adapter: Any, text: LossText, crosscoder: Any, l: int,
                        edges: tuple[Tensor, Tensor, Tensor], tolerances: Sequence[float],
                        precision: float) -> dict[str, Any]:
    """Interaction sparsity of the crosscoder's features at block l's MLP."""
    (fblock,) = feature_blocks(crosscoder, {l: adapter.mlp_weights(l)}, dtype=torch.float32)
    i_Q, j_Q, w_Q = edges
    order, n_features = edge_order(w_Q), crosscoder.config.n_features
    out = hookpoint(l, "mlp_out")

    def loss_of(k: int | None) -> float:
        kept = None if k is None else EdgeSet(i_Q[order[:k]], j_Q[order[:k]], n_features)

        def patches(index: int, batch: BatchPass) -> dict:
            f_TH = text.features[index]
            out_TD = kept_mlp_output(f_TH, fblock, kept)
            new_BSD = batch.acts[hookpoint(l, "resid_pre")].new_zeros(
                (*batch.keep_BS.shape, out_TD.shape[1]))
            new_BSD[batch.keep_BS] = out_TD.to(new_BSD.dtype)
            return {out: replace_where(new_BSD, ~batch.keep_BS)}

        return text.mean_loss(adapter, patches)

    entry = _sparsity_entry(EdgeBisection(loss_of, len(w_Q), precision), tolerances,
                            loss_of(None))
    self_Q = (i_Q == j_Q)[order]
    for row in entry["sparsity"]:
        row["self_edges"] = None if row["edges"] is None else int(self_Q[:row["edges"]].sum())
    off_Q = i_Q != j_Q
    return {"block": l, "from": "features", "to": out, "n_in": n_features, "n_out": n_features,
            **entry, "n_self_edges": int((~off_Q).sum()),
            **distribution_stats(w_Q[off_Q], n_features * (n_features - 1)),
            **bipartite_modularity(i_Q[off_Q], j_Q[off_Q], w_Q[off_Q], n_features, n_features)}


# --- the comparison ------------------------------------------------------------------------------
def check_crosscoder(adapter: Any, crosscoder: Any, run_dir: str | Path) -> list[int]:
    """The blocks whose MLP the crosscoder can rebuild on this model (one-line errors)."""
    if crosscoder.config.d_model != adapter.d_model:
        raise CrossintError(
            f"crosscoder {run_dir} reads width {crosscoder.config.d_model} but model "
            f"{adapter.name!r} has a residual stream of width {adapter.d_model}: compare a "
            f"crosscoder trained on this model")
    blocks = [split_hookpoint(h)[0] for h in crosscoder.config.hookpoints
              if split_hookpoint(h) is not None]
    if blocks and max(blocks) >= adapter.n_blocks:
        raise CrossintError(f"crosscoder {run_dir} reads block {max(blocks)} but model "
                            f"{adapter.name!r} has {adapter.n_blocks} blocks")
    usable = mlp_in_blocks(crosscoder)
    if not usable:
        raise CrossintError(f"crosscoder {run_dir} reads no blocks.L.mlp_in, so its features "
                            "have no MLP interactions to compare (train it on the paper layout)")
    return usable


def compare_lib(lib_dir: str | Path, run_dir: str | Path, *, n_tokens: int = COMPARE_TOKENS,
                tolerances: Sequence[float] = TOLERANCES, precision: float = PRECISION,
                device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """The lib_compare.json document: PCA, LIB (from ``lib_dir``) and the crosscoder of
    ``run_dir`` on the LIB's model and held-out text."""
    from crossint.models.adapter import load_model

    _check_options(n_tokens, tolerances, precision)
    lib = read_lib(lib_dir)
    crosscoder, trained_on = load_run(run_dir, command="lib")
    crosscoder.to(device)
    request = dataclasses.replace(HeldoutRequest.from_record(lib.document["request"]),
                                  device=device)
    adapter = load_model(request.model, device=device)
    blocks = check_crosscoder(adapter, crosscoder, run_dir)
    _check_lib_model(adapter, lib, lib_dir)
    _check_same_model(trained_on, lib.document["model"], run_dir, lib_dir)
    edge_tokens = int(lib.document["settings"]["edge_tokens"])
    seconds: dict[str, float] = {}
    with frozen(adapter.model):
        start = time.perf_counter()
        edge_text, loss_batches = split_text(adapter, request, edge_tokens, n_tokens)
        cc_edges = crosscoder_edges(adapter, crosscoder, edge_text, blocks, progress)
        text = loss_text(adapter, loss_batches, lib.document["node_layers"], crosscoder,
                         progress)
        seconds["prepare"] = time.perf_counter() - start
        representations = _measure_all(adapter, text, lib, crosscoder, cc_edges, tolerances,
                                       precision, progress, seconds)
    return {
        "format": COMPARE_FORMAT, "version": 1, "lib_dir": str(lib_dir), "run": str(run_dir),
        "model": request.model, "crosscoder_sha256": sha256_file(RunDir(run_dir).weights),
        "basis_sha256": lib.document.get("basis_sha256"),
        "request": dataclasses.replace(request, n_tokens=n_tokens).record(),
        "n_loss_tokens": text.n_tokens,
        "n_edge_tokens": _count_tokens(edge_text, adapter.special_token_ids()),
        "loss_model": text.mean_loss(adapter), "tolerances": list(tolerances),
        "precision": precision, "representations": representations,
        "weight_curves": weight_curves(lib, cc_edges), "seconds": seconds,
    }


def _check_options(n_tokens: int, tolerances: Sequence[float], precision: float) -> None:
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise CrossintError(f"--tokens must be a positive integer, got {n_tokens!r}")
    if not tolerances or any(not isinstance(t, (int, float)) or not t >= 0 for t in tolerances):
        raise CrossintError(f"--tolerances must be numbers >= 0 (nats), got {list(tolerances)}")
    if not 0 <= precision < 1:
        raise CrossintError(f"--precision must be in [0, 1), got {precision!r}")


def _check_same_model(trained_on: str, lib_model: str, run_dir: str | Path,
                      lib_dir: str | Path) -> None:
    """CrossintError unless the crosscoder was trained on the model the LIB was computed on (the
    same name, or paths to the same directory)."""
    def where(name: str) -> str:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name

    if trained_on != lib_model and where(trained_on) != where(lib_model):
        raise CrossintError(f"crosscoder {run_dir} was trained on model {trained_on!r} but the "
                            f"LIB in {lib_dir} on {lib_model!r}: compare runs of one model")


def _check_lib_model(adapter: Any, lib: LibResult, lib_dir: str | Path) -> None:
    info = lib.document.get("model_info") or {}
    if info.get("d_model") != adapter.d_model or info.get("n_blocks") != adapter.n_blocks:
        raise CrossintError(f"{lib_dir} was computed on a model of width {info.get('d_model')} "
                            f"with {info.get('n_blocks')} blocks, not on {adapter.name!r}")


def _measure_all(adapter: Any, text: LossText, lib: LibResult, crosscoder: Any,
                 cc_edges: dict[int, tuple[Tensor, Tensor, Tensor]],
                 tolerances: Sequence[float], precision: float, progress: bool,
                 seconds: dict[str, float]) -> dict[str, Any]:
    n_blocks = len(lib.edges["pca"])
    result: dict[str, Any] = {}
    with _bar(2 * n_blocks + len(cc_edges), "sparsity", progress) as bar:
        for kind in KINDS:
            start, rows = time.perf_counter(), []
            for l in range(n_blocks):
                rows.append(basis_sparsity(adapter, text, lib.bases[kind], l,
                                           lib.edges[kind][l], tolerances, precision))
                bar.update()
            result[kind] = {"blocks": rows, "total": _totals(rows, tolerances)}
            seconds[kind] = time.perf_counter() - start
        start, rows = time.perf_counter(), []
        for l, edges in sorted(cc_edges.items()):
            rows.append(crosscoder_sparsity(adapter, text, crosscoder, l, edges, tolerances,
                                            precision))
            bar.update()
        result["crosscoder"] = {"blocks": rows, "total": _totals(rows, tolerances)}
        seconds["crosscoder"] = time.perf_counter() - start
    return result


def _totals(rows: list[dict[str, Any]], tolerances: Sequence[float]) -> dict[str, Any]:
    def total(k: int) -> int | None:
        found = [r["sparsity"][k]["edges"] for r in rows]
        return None if None in found else sum(found)

    return {"n_edges": sum(r["n_edges"] for r in rows),
            "edges": {str(t): total(k) for k, t in enumerate(tolerances)}}


# --- outputs -------------------------------------------------------------------------------------
def weight_curves(lib: LibResult,
                  cc_edges: dict[int, tuple[Tensor, Tensor, Tensor]]) -> dict[str, Any]:
    """Cumulative edge-weight curves (``cumulative_weight``) of every representation and block:
    PCA and LIB edges, and the crosscoder's SPEC §4.5 matrix (off-diagonal)."""
    curves = {f"{kind} {l}": cumulative_weight(E) for kind in KINDS
              for l, E in enumerate(lib.edges[kind])}
    for l, (i_Q, j_Q, w_Q) in sorted(cc_edges.items()):
        curves[f"crosscoder {l}"] = cumulative_weight(w_Q[i_Q != j_Q])
    return {label: [counts, fractions] for label, (counts, fractions) in curves.items()}


def write_compare(document: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """lib_compare.json (last) and its plots: edge-weight distributions (one figure, every
    representation and block) and the loss against the number of kept edges."""
    from crossint.report.plots import plot_edge_sparsity, plot_edge_weights

    paths = rundir.LIB_COMPARE.paths(out_dir)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    plot_edge_weights({label: (c[0], c[1]) for label, c in document["weight_curves"].items()},
                      paths["weights"])
    plot_edge_sparsity({f"{rep} {row['block']}": (row["curve"], row["loss_all"])
                        for rep, entry in document["representations"].items()
                        for row in entry["blocks"]}, document["tolerances"], paths["sparsity"])
    atomic_write_json(paths["json"], _finite_json(document))
    return paths


def format_compare_table(document: dict[str, Any]) -> str:
    """One line per representation and block: edges needed at each tolerance."""
    tols = document["tolerances"]
    head = " ".join(f"{'k@' + format(t, 'g'):>9}" for t in tols)
    lines = [f"{'representation':<14} {'block':>5} {'nodes':>6} {'edges':>9} {'L_all':>7} "
             f"{'L_none':>7} {head} {'gini':>6} {'top1%':>6} {'Q':>5}"]
    for rep in REPRESENTATIONS:
        for row in document["representations"].get(rep, {}).get("blocks", []):
            ks = " ".join(f"{_num(s['edges'], 'd'):>9}" for s in row["sparsity"])
            lines.append(f"{rep:<14} {row['block']:>5} {row['n_in']:>6} {row['n_edges']:>9} "
                         f"{_num(row['loss_all']):>7} {_num(row['loss_none']):>7} {ks} "
                         f"{_num(row['gini'], '.2f'):>6} {_num(row['top1_fraction'], '.2f'):>6} "
                         f"{_num(row.get('modularity'), '.2f'):>5}")
    lines.append(f"model loss {document['loss_model']:.4f} nats on {document['n_loss_tokens']} "
                 f"tokens; tolerances in nats above each L_all")
    return "\n".join(lines)
