"""The Local Interaction Basis of a model, and its interactions next to a crosscoder's (SPEC §11).

``build_lib`` runs the subject model on held-out text and computes, per node layer (the
residual stream entering each block, and leaving the last), the PCA and LIB bases and the SPEC
§11 edges between adjacent node layers in both. ``compare_lib`` measures PCA, LIB and a
crosscoder's features on one yardstick (``crossint.interactions.edges``): how many top edges
keep the loss within a tolerance when all others are ablated, and how concentrated the edge
weights are. Orchestration only: the math is in ``crossint.interactions.lib`` and
``crossint.interactions.edges``; decisions are listed in SPEC §11.

A block's function is the block module called directly with the arguments the model passed it
on this batch (recorded by a pre-hook during one capture pass), so computing block l never
reruns blocks 0..l−1; the last node layer's function is the model's head (final norm and
unembedding), reached by patching ``blocks.{L-1}.resid_post``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossint import rundir
from crossint.analysis.heldout import (
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_CORPUS,
    HeldoutRequest,
    heldout_batches,
    non_special_BS,
    request_from,
)
from crossint.config import JsonConfig, invalid, is_int, is_number
from crossint.errors import CrossintError
from crossint.interactions.edges import (
    bipartite_modularity,
    cumulative_weight,
    dense_edges,
    distribution_stats,
    edge_order,
    layered_modules,
)
from crossint.interactions.lib import (
    KINDS,
    RTOL,
    LayerBasis,
    MomentAccumulator,
    check_full_rank,
    edge_sums,
    gradient_gram,
    lib_basis,
    pca_basis,
)
from crossint.io import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from crossint.models.hookpoints import hookpoint

LIB_TOKENS = 20_000  # default held-out tokens of `crossint lib`
COMPARE_TOKENS = 2_048  # default held-out tokens whose loss `crossint lib --compare` bisects on
TOLERANCES = (0.01, 0.05)  # nats above the loss with every edge kept
PRECISION = 0.02  # bisection stops when the bracket is within 2% of the edge count
TOP_EDGES = 40  # edges listed per block in lib.json (and drawn in the graph: 20)
FORMAT = "crossint.lib"
COMPARE_FORMAT = "crossint.lib_compare"


# --- settings ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LibSettings(JsonConfig):
    """How the LIB is computed (SPEC §11 Decisions). ``integration_steps`` 0: plain gradients;
    ``sources`` Rademacher sources per batch for the gradient Gram (0: exact, one backward pass
    per output position and function); ``edge_tokens``: the held-out tokens (a prefix of the
    text) whose edges are computed, exactly; ``rtol``: eigenvalues below rtol × the largest are
    truncated; ``seed``: the sources' seed."""

    integration_steps: int = 0
    sources: int = 16
    edge_tokens: int = 4_096
    rtol: float = RTOL
    seed: int = 0

    def __post_init__(self) -> None:
        for name, least in (("integration_steps", 0), ("sources", 0), ("edge_tokens", 1),
                            ("seed", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < least:
                invalid("lib", name, value, f"an integer >= {least}")
        if not is_number(self.rtol) or not 0 < self.rtol < 1:
            invalid("lib", "rtol", self.rtol, "a number in (0, 1)")


def node_layers(n_blocks: int) -> list[str]:
    """The residual stream entering every block, then leaving the last one."""
    return [hookpoint(l, "resid_pre") for l in range(n_blocks)] + [
        hookpoint(n_blocks - 1, "resid_post")]


def lib_request(request: HeldoutRequest | None, fields: dict[str, Any]) -> HeldoutRequest:
    """The held-out text of `crossint lib`: ``LIB_TOKENS`` tokens of the built-in stories (held-out
    seed) of storylm, unless told otherwise; the context length stays None unless given
    (``build_lib`` takes 128, or the model's maximum when shorter)."""
    request = request_from(request, fields, n_tokens=LIB_TOKENS, model="storylm")
    if request.n_tokens is None:
        raise CrossintError("crossint lib counts held-out text in tokens (--tokens), not texts")
    return dataclasses.replace(request, model=request.model or "storylm",
                               corpus=request.corpus or DEFAULT_CORPUS,
                               text_field=request.text_field or "text")


# --- one batch of the subject model --------------------------------------------------------------
@dataclass
class BatchPass:
    """One capture pass over a batch of contexts: the node layers (B, S, D), the non-special
    mask, and the arguments the model passed to each recorded block."""

    ids_BS: Tensor
    keep_BS: Tensor
    acts: dict[str, Tensor]
    calls: dict[int, tuple[tuple, dict]]


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """While LIB differentiates through the model: its parameters need no gradient, and its
    attention runs the eager implementation (fused SDPA kernels have no forward-mode
    derivative; the eager one computes the same function)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        if attention not in (None, "eager"):
            config._attn_implementation = "eager"
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if attention not in (None, "eager"):
            config._attn_implementation = attention


def run_batch(adapter: Any, ids_BS: Tensor, names: Sequence[str], blocks: Sequence[int],
              special_ids: set[int]) -> BatchPass:
    """Capture ``names`` and record how the model calls each of ``blocks``."""
    calls: dict[int, tuple[tuple, dict]] = {}
    modules = adapter.module("blocks")

    def recorder(l: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            calls[l] = (args, kwargs)
        return hook

    handles = [modules[l].register_forward_pre_hook(recorder(l), with_kwargs=True)
               for l in blocks]
    try:
        ids_BS = ids_BS.to(adapter.device)
        acts = adapter.capture(ids_BS, list(names))
    finally:
        for handle in handles:
            handle.remove()
    for name, x_BSD in acts.items():
        if not torch.isfinite(x_BSD).all():
            raise CrossintError(f"model {adapter.name!r} produced NaN/Inf activations at {name}")
    return BatchPass(ids_BS, non_special_BS(ids_BS, special_ids), acts, calls)


def block_function(adapter: Any, batch: BatchPass, l: int) -> Callable[[Tensor], Tensor]:
    """Block l as a function of its input (B, S, D), with this batch's other arguments."""
    module = adapter.module("blocks")[l]
    args, kwargs = batch.calls[l]

    def fn(x_BSD: Tensor) -> Tensor:
        out = module(x_BSD, *args[1:], **kwargs) if args else module(
            **{**kwargs, "hidden_states": x_BSD})
        return out[0] if isinstance(out, (tuple, list)) else out

    return fn


def head_function(adapter: Any, batch: BatchPass) -> Callable[[Tensor], Tensor]:
    """The logits (B, S, V) as a function of the last node layer."""
    last = hookpoint(adapter.n_blocks - 1, "resid_post")
    return lambda x_BSD: adapter.logits(batch.ids_BS, patches={last: lambda _: x_BSD})


def next_layer_function(adapter: Any, batch: BatchPass, l: int,
                        basis_out: LayerBasis | None) -> Callable[[Tensor], Tensor]:
    """Node layer l -> the next node layer's basis functions (the logits after the last)."""
    if basis_out is None:
        return head_function(adapter, batch)
    block = block_function(adapter, batch, l)
    return lambda x_BSD: basis_out.encode(block(x_BSD))


# --- build the LIB -------------------------------------------------------------------------------
@dataclass
class LibResult:
    """Bases ({"pca"|"lib": [LayerBasis per node layer]}), edges ({kind: [E_IJ per block]},
    SPEC §11 E, float64) and the lib.json document."""

    bases: dict[str, list[LayerBasis]]
    edges: dict[str, list[Tensor]]
    document: dict[str, Any]


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)


def collect_moments(adapter: Any, batches: list[Tensor], names: list[str],
                    progress: bool) -> dict[str, MomentAccumulator]:
    """Mean and covariance of every node layer over the kept tokens."""
    moments = {name: MomentAccumulator(adapter.d_model) for name in names}
    special = adapter.special_token_ids()
    with torch.no_grad(), _bar(len(batches), "lib moments", progress) as bar:
        for ids_BS in batches:
            batch = run_batch(adapter, ids_BS, names, [], special)
            for name in names:
                moments[name].update(batch.acts[name][batch.keep_BS])
            bar.update()
    for name, moment in moments.items():
        check_full_rank(moment.n_tokens, adapter.d_model, name)
    return moments


def lib_bases(adapter: Any, batches: list[Tensor], names: list[str],
              moments: dict[str, MomentAccumulator], settings: LibSettings,
              progress: bool) -> list[LayerBasis]:
    """SPEC §11 steps 1–2 for every node layer, from the output backwards."""
    special, n_blocks = adapter.special_token_ids(), adapter.n_blocks
    bases: dict[int, LayerBasis] = {}
    with _bar(len(batches) * len(names), "lib bases", progress) as bar:
        for l in reversed(range(len(names))):
            name, moment = names[l], moments[names[l]]
            generator = torch.Generator().manual_seed(settings.seed * 1_000 + l)
            gram_DD = torch.zeros(adapter.d_model, adapter.d_model, dtype=torch.float64)
            for ids_BS in batches:
                with torch.no_grad():
                    batch = run_batch(adapter, ids_BS, [name], [l] if l < n_blocks else [],
                                      special)
                fn = next_layer_function(adapter, batch, l, bases.get(l + 1))
                gram_DD += gradient_gram(fn, batch.acts[name], batch.keep_BS, moment.mean(),
                                         steps=settings.integration_steps,
                                         sources=settings.sources or None, generator=generator)
                bar.update()
            bases[l] = lib_basis(name, moment.mean(), moment.covariance(),
                                 gram_DD / moment.n_tokens, settings.rtol)
    return [bases[l] for l in range(len(names))]


def basis_edges(adapter: Any, batches: list[Tensor], bases: list[LayerBasis],
                settings: LibSettings, progress: bool) -> list[Tensor]:
    """SPEC §11 E between every pair of adjacent node layers (one per block)."""
    special, names = adapter.special_token_ids(), [b.name for b in bases]
    sums = [torch.zeros(bases[l + 1].dim, bases[l].dim, dtype=torch.float64)
            for l in range(len(bases) - 1)]
    n_tokens = 0
    desc = f"{bases[0].kind} edges"
    with _bar(len(batches) * len(sums), desc, progress) as bar:
        for ids_BS in batches:
            with torch.no_grad():
                batch = run_batch(adapter, ids_BS, names, range(len(sums)), special)
            n_tokens += int(batch.keep_BS.sum())
            for l in range(len(sums)):
                fn = next_layer_function(adapter, batch, l, bases[l + 1])
                sums[l] += edge_sums(fn, batch.acts[names[l]], batch.keep_BS, bases[l],
                                     steps=settings.integration_steps)
                bar.update()
    return [s / max(n_tokens, 1) for s in sums]


ACTIVATION_FLOATS = 12  # floats a linearised block keeps per token and d_model + d_mlp (rough)


def lib_memory_bytes(adapter: Any, request: HeldoutRequest, settings: LibSettings) -> int:
    """A rough upper estimate of LIB's peak memory: one batch's linearised block or head for
    every integration point (the edges keep all of them at once) and the stored gradients of
    every Rademacher source, in the model's dtype."""
    tokens = request.batch_size * (request.context_length or DEFAULT_CONTEXT_LENGTH)
    width = adapter.d_model + getattr(adapter, "d_mlp", 4 * adapter.d_model)
    per_point = tokens * (ACTIVATION_FLOATS * width + adapter.vocab_size)
    stored = tokens * adapter.d_model * max(settings.sources, 1)
    itemsize = torch.empty(0, dtype=adapter.dtype).element_size()
    return itemsize * (max(settings.integration_steps, 1) * per_point + stored)


def check_lib_memory(adapter: Any, request: HeldoutRequest, settings: LibSettings) -> None:
    """CrossintError when ``lib_memory_bytes`` exceeds the device's free memory."""
    from crossint.crosscoder.memory import available_bytes, human_bytes

    needed, free = lib_memory_bytes(adapter, request, settings), available_bytes(
        torch.device(request.device or "cpu"))
    if free is not None and needed > free:
        raise CrossintError(
            f"LIB on {adapter.name!r} with {settings.integration_steps} integration steps and "
            f"batches of {request.batch_size} x {request.context_length} tokens needs about "
            f"{human_bytes(needed)} of memory but {human_bytes(free)} is free: lower "
            f"--integration-steps or --batch-size")


def build_lib(model: str | None = None, request: HeldoutRequest | None = None,
              settings: LibSettings | None = None, *, progress: bool = True,
              **request_fields: Any) -> LibResult:
    """PCA and LIB bases of every node layer of ``model`` and the edges between them, on
    held-out text (default ``LIB_TOKENS`` tokens of the built-in stories)."""
    from crossint.models.adapter import load_model

    settings = settings or LibSettings()
    if model is not None:
        request_fields = {**request_fields, "model": model}
    request = lib_request(request, request_fields)
    adapter = load_model(request.model, device=request.device)
    if request.context_length is None:  # 128, or a toy's shorter contexts (modadd: 6)
        request = dataclasses.replace(request, context_length=min(
            DEFAULT_CONTEXT_LENGTH, adapter.max_context or DEFAULT_CONTEXT_LENGTH))
    check_lib_memory(adapter, request, settings)
    names = node_layers(adapter.n_blocks)
    seconds: dict[str, float] = {}
    with frozen(adapter.model):
        start = time.perf_counter()
        batches = heldout_batches(adapter, request)
        edge_text = heldout_batches(adapter, dataclasses.replace(
            request, n_tokens=min(settings.edge_tokens, request.n_tokens)))
        moments = collect_moments(adapter, batches, names, progress)
        seconds["moments"] = time.perf_counter() - start
        bases = {"pca": [pca_basis(n, moments[n].mean(), moments[n].covariance(), settings.rtol)
                         for n in names]}
        start = time.perf_counter()
        bases["lib"] = lib_bases(adapter, batches, names, moments, settings, progress)
        seconds["lib_bases"] = time.perf_counter() - start
        edges = {}
        for kind in KINDS:
            start = time.perf_counter()
            edges[kind] = basis_edges(adapter, edge_text, bases[kind], settings, progress)
            seconds[f"{kind}_edges"] = time.perf_counter() - start
    document = lib_document(adapter, request, settings, names, bases, edges, seconds)
    document["n_tokens"] = next(iter(moments.values())).n_tokens
    document["n_edge_tokens"] = _count_tokens(edge_text, adapter.special_token_ids())
    return LibResult(bases, edges, document)


def _count_tokens(batches: list[Tensor], special_ids: set[int]) -> int:
    return int(sum(int(non_special_BS(ids_BS, special_ids).sum()) for ids_BS in batches))


def _top_edges(E_IJ: Tensor, n: int = TOP_EDGES) -> list[list[float]]:
    order = edge_order(E_IJ)[:n]
    n_in = E_IJ.shape[1]
    return [[int(k // n_in), int(k % n_in), float(E_IJ.reshape(-1)[k])] for k in order]


def lib_document(adapter: Any, request: HeldoutRequest, settings: LibSettings,
                 names: list[str], bases: dict[str, list[LayerBasis]],
                 edges: dict[str, list[Tensor]], seconds: dict[str, float]) -> dict[str, Any]:
    """lib.json: the settings, every layer's eigenvalues and dimension, edge statistics."""
    layers = [{"layer": name,
               **{f"{kind}_dim": bases[kind][k].dim for kind in KINDS},
               **{f"{kind}_eigenvalues": bases[kind][k].eig_J.tolist() for kind in KINDS}}
              for k, name in enumerate(names)]
    blocks = {kind: [{"block": l, "from": names[l], "to": names[l + 1],
                      "shape": list(E_IJ.shape), **distribution_stats(E_IJ),
                      **bipartite_modularity(*dense_edges(E_IJ), *E_IJ.shape),
                      "top_edges": _top_edges(E_IJ)}
                     for l, E_IJ in enumerate(edges[kind])] for kind in KINDS}
    graphs = {}
    for kind in KINDS:
        q, modules = layered_modules(edges[kind])
        graphs[kind] = {"modularity": q, "modules": modules}
    return {
        "format": FORMAT, "version": 1, "model": request.model,
        "model_info": {"family": adapter.family, "model_type": adapter.model_type,
                       "n_blocks": adapter.n_blocks, "d_model": adapter.d_model},
        "request": request.record(), "settings": settings.to_dict(), "node_layers": names,
        "layers": layers, "edges": blocks, "graph": graphs, "seconds": seconds,
    }


# --- files ---------------------------------------------------------------------------------------
def _tensors(result: LibResult) -> dict[str, Tensor]:
    tensors = {}
    for kind in KINDS:
        for k, basis in enumerate(result.bases[kind]):
            for field in ("mean_D", "C_DJ", "C_pinv_JD", "eig_J"):
                tensors[f"{kind}.{k}.{field}"] = getattr(basis, field).double().contiguous()
        for l, E_IJ in enumerate(result.edges[kind]):
            tensors[f"{kind}.edges.{l}"] = E_IJ.double().contiguous()
    return tensors


def write_lib(result: LibResult, out_dir: str | Path) -> dict[str, Path]:
    """lib_basis.safetensors, lib_graph.png, edge_weights.png, then lib.json (last)."""
    from safetensors.torch import save

    from crossint.report.plots import plot_edge_weights, plot_lib_graph

    paths = rundir.LIB.paths(out_dir)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(paths["basis"], save(_tensors(result)))
    names = result.document["node_layers"]
    for kind, role in (("lib", "graph"), ("pca", "pca_graph")):
        graph = result.document["graph"][kind]
        plot_lib_graph(names, [b.eig_J.tolist() for b in result.bases[kind]],
                       [_top_edges(E, 20) for E in result.edges[kind]], paths[role],
                       title=f"{kind.upper()} interaction graph (top 20 edges per block; "
                             f"Louvain modules coloured, Q {_num(graph['modularity'], '.2f')})",
                       modules=graph["modules"])
    curves = {f"{kind} {l}": cumulative_weight(E) for kind in KINDS
              for l, E in enumerate(result.edges[kind])}
    plot_edge_weights(curves, paths["weights"])
    document = {**result.document, "basis_sha256": sha256_file(paths["basis"])}
    atomic_write_json(paths["json"], _finite_json(document))
    return paths


def read_lib(lib_dir: str | Path) -> LibResult:
    """A `crossint lib` output directory (CrossintError naming what is missing)."""
    from safetensors.torch import load_file

    paths = rundir.LIB.paths(lib_dir)
    for role in ("json", "basis"):
        if not paths[role].is_file():
            raise CrossintError(f"{lib_dir} holds no {paths[role].name}: run `crossint lib "
                                f"--out {lib_dir}` first")
    document = read_json(paths["json"], rundir.LIB.what)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CrossintError(f"{paths['json']} is not a crossint lib result")
    tensors = load_file(str(paths["basis"]))
    names = document["node_layers"]
    bases = {kind: [LayerBasis(name, kind, *(tensors[f"{kind}.{k}.{f}"] for f in
                                              ("mean_D", "C_DJ", "C_pinv_JD", "eig_J")))
                    for k, name in enumerate(names)] for kind in KINDS}
    edges = {kind: [tensors[f"{kind}.edges.{l}"] for l in range(len(names) - 1)]
             for kind in KINDS}
    return LibResult(bases, edges, document)


def _finite_json(value: Any) -> Any:
    """NaN/Inf as null (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def format_lib_table(document: dict[str, Any]) -> str:
    """One line per block: dimensions and edge-weight concentration in PCA and LIB."""
    lines = [f"{'block':>5} {'pca dim':>8} {'lib dim':>8} {'pca gini':>9} {'lib gini':>9} "
             f"{'pca top1%':>10} {'lib top1%':>10} {'pca Q':>6} {'lib Q':>6}"]
    layers = document["layers"]
    for pca, lib in zip(document["edges"]["pca"], document["edges"]["lib"], strict=True):
        l = pca["block"]
        lines.append(f"{l:>5} {layers[l]['pca_dim']:>8} {layers[l]['lib_dim']:>8} "
                     f"{_num(pca['gini']):>9} {_num(lib['gini']):>9} "
                     f"{_num(pca['top1_fraction']):>10} {_num(lib['top1_fraction']):>10} "
                     f"{_num(pca.get('modularity'), '.2f'):>6} "
                     f"{_num(lib.get('modularity'), '.2f'):>6}")
    graph = document.get("graph", {})
    lines.append("modularity of the whole graph (Louvain): " + ", ".join(
        f"{kind} {_num(graph.get(kind, {}).get('modularity'))}" for kind in KINDS))
    return "\n".join(lines)


def _num(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else format(value, spec)
