"""Attention feature interactions of a trained crosscoder on held-out text (SPEC §5).

Orchestration only: the subject model runs on held-out text, the crosscoder encodes its
activations, and every number comes from :mod:`crossint.interactions.attention` with the
model's own attention weights (float64). One pass runs the strict dominance test per head and
accumulates the (query feature, key feature) score table over the pairs co-active within the
attention window, and the key overlaps of co-active query features; a second pass over the
stored (sparse) feature activations finds example contexts and the relative offsets of the top
pairs. The decisions SPEC §5 leaves open are listed in spec.md §5 and docs/attention.md.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossint import rundir
from crossint.analysis.heldout import (
    HeldoutRequest,
    capture_tokens,
    heldout_batches,
    load_subject,
    request_from,
    training_manifest,
)
from crossint.analysis.interactions import AnalysisSetup, check_model, select_site_blocks
from crossint.errors import CrossintError
from crossint.interactions.attention import (
    AttentionMeter,
    attention_feature_blocks,
    cross_position,
    pair_scores,
    query_spread,
    shares_pair_table,
    visibility,
)
from crossint.interactions.contributions import active_features
from crossint.io import atomic_write_json, atomic_write_text, json_safe, sha256_file
from crossint.models.hookpoints import hookpoint
from crossint.rundir import RunDir

ATTENTION_TOKENS = 20_000  # default held-out tokens
TOP_PAIRS = 20  # (query, key) feature pairs listed per head
TOP_OVERLAPS = 10  # query-feature pairs listed per head
EXAMPLES = 3  # example contexts per listed pair
NEAR_DOMINANT = 0.1  # a head whose mean ‖Δp‖₁ is at most this is close to one-feature dominance
GRID_FEATURES = 12  # query and key features of the heatmap
PATTERN_POSITIONS = 48  # positions of the example pattern kept in attention.json
OFFSETS_SHOWN = 8  # most frequent relative offsets listed per pair
MIN_PAIR_COUNT = 20  # position pairs a pair must meet at to be among the strongest pairs
LISTS = ("top_pairs", "strongest_pairs")
PAIR_COLUMNS = ("list", "block", "head", "a", "b", "count", "frequency", "weight", "score",
                "others", "cross", "cross_z", "cross_score", "mass", "mean_offset")



def select_attention_blocks(crosscoder: Any, blocks: Sequence[int] | None,
                            run_dir: str | Path, n_blocks: int) -> list[int]:
    """The requested blocks (default: every block whose attn_in the crosscoder reads)."""
    outside = sorted({b for b in blocks or () if not 0 <= b < n_blocks})
    if outside:
        raise CrossintError(
            f"block(s) {', '.join(map(str, outside))} out of range: the model has {n_blocks} "
            f"blocks (0..{n_blocks - 1})"
        )
    return select_site_blocks(crosscoder, blocks, run_dir, "attn_in",
                              "attention interactions need the attention inputs")


def prepare_attention(run_dir: str | Path, request: HeldoutRequest,
                      blocks: Sequence[int] | None = None) -> AnalysisSetup:
    """Load and check a run for `crossint attention` and read the held-out text."""
    crosscoder, adapter, request = load_subject(run_dir, request, "attention")
    check_model(crosscoder, adapter, training_manifest(run_dir), run_dir)
    block_ids = select_attention_blocks(crosscoder, blocks, run_dir, adapter.n_blocks)
    weights = {block: adapter.attention_weights(block) for block in block_ids}
    fblocks = attention_feature_blocks(crosscoder, weights, dtype=torch.float64)
    return AnalysisSetup(
        crosscoder=crosscoder, adapter=adapter, blocks=block_ids, fblocks=fblocks,
        hookpoints=list(crosscoder.config.hookpoints), special_ids=adapter.special_token_ids(),
        batches=heldout_batches(adapter, request), request=request,
    )


def context_features(f_TH: Tensor, keep_BS: Tensor) -> tuple[Tensor, Tensor]:
    """The kept tokens' active features back in (context, position, slot) layout (padding −1
    with f = 0, and at the special positions)."""
    active = active_features(f_TH)
    B, S = keep_BS.shape
    K = active.features_BK.shape[1]
    features_BSK = torch.full((B, S, K), -1, dtype=torch.int64, device=f_TH.device)
    f_BSK = f_TH.new_zeros((B, S, K))
    features_BSK[keep_BS] = active.features_BK
    f_BSK[keep_BS] = active.f_BK
    return features_BSK, f_BSK


@dataclass
class StoredContext:
    """One held-out context for the examples pass: token ids and active features (CPU)."""

    ids_S: Tensor
    features_SK: Tensor
    f_SK: Tensor


@dataclass
class MeasuredAttention:
    meters: list[AttentionMeter]
    contexts: list[StoredContext]
    n_tokens: int  # measured query positions (non-special tokens)


def measure_attention(setup: AnalysisSetup, progress: bool) -> MeasuredAttention:
    """The one pass: each context's dominance test, pair sums and key overlaps at each block."""
    from tqdm.auto import tqdm

    H = setup.crosscoder.config.n_features
    meters: list[AttentionMeter] = []
    for fblock in setup.fblocks:  # blocks with equal pair tables fill one (half the work)
        owner = next((m for m in meters if m.owns_pairs and shares_pair_table(
            m.fblock, fblock, setup.request.context_length)), None)
        meters.append(AttentionMeter(fblock, H, shared_pairs=owner and owner.pairs))
    measured = MeasuredAttention(meters, [], 0)
    with torch.no_grad():
        for ids_BS in tqdm(setup.batches, desc="attention", unit="batch", disable=not progress,
                           dynamic_ncols=True):
            captured = capture_tokens(setup.adapter, ids_BS.to(setup.request.device),
                                      setup.hookpoints, setup.special_ids)
            f_TH = setup.crosscoder.encode(captured.acts_TXD)
            features_BSK, f_BSK = context_features(f_TH, captured.keep_BS)
            for c in range(ids_BS.shape[0]):
                k = max(int((features_BSK[c] >= 0).sum(-1).max()), 1)
                features_SK, f_SK = features_BSK[c, :, :k], f_BSK[c, :, :k]
                for meter in meters:
                    attn_in_SD = captured.acts[hookpoint(meter.fblock.block, "attn_in")][c]
                    meter.update(attn_in_SD, features_SK, f_SK, ~captured.keep_BS[c])
                measured.contexts.append(StoredContext(ids_BS[c].cpu(), features_SK.cpu(),
                                                       f_SK.float().cpu()))
            measured.n_tokens += int(captured.keep_BS.sum())
    return measured


# --- per head: dominance and the top pairs -------------------------------------------------------
def pair_row(a: int, b: int, count: float, weight: float, Q: float, others: float,
             cross: float, spread: float, n_tokens: int) -> dict[str, Any]:
    """One listed (query feature a, key feature b) pair of a head."""
    return {"a": a, "b": b, "count": int(count), "frequency": count / n_tokens,
            "weight": weight / count, "score": Q, "others": others, "cross": cross,
            "cross_z": cross / spread if spread > 0 else float("nan"),
            "cross_score": cross * weight / count, "mass": abs(cross) * weight / n_tokens}


def ranked_pairs(a_E: Tensor, b_E: Tensor, count_E: Tensor, weight_E: Tensor,
                 score_E: Tensor, n_features: int, n_tokens: int, n_top: int,
                 ) -> dict[str, Any]:
    """A head's listed pairs: ``top_pairs`` by cross-position mass |Q_ab − Q̄_a,others|·Σ f_a f_b
    per query token (strength × frequency), ``strongest_pairs`` by the departure per meeting
    |cross_score| among pairs met at least MIN_PAIR_COUNT times; and the fraction of the pair
    score mass that departs from the query feature's average."""
    Q_E, others_E, cross_E = cross_position(a_E, weight_E, score_E, n_features)
    spread_E = query_spread(a_E, weight_E, Q_E, n_features)
    mass_E = (cross_E.abs() * weight_E).nan_to_num(0.0)
    total = float((Q_E.abs() * weight_E).sum())
    strength_E = (mass_E / count_E).masked_fill(count_E < MIN_PAIR_COUNT, 0.0)

    def rows(rank_E: Tensor) -> list[dict[str, Any]]:
        top = rank_E.topk(min(n_top, rank_E.numel())).indices.tolist()
        return [pair_row(int(a_E[e]), int(b_E[e]), float(count_E[e]), float(weight_E[e]),
                         float(Q_E[e]), float(others_E[e]), float(cross_E[e]),
                         float(spread_E[e]), n_tokens) for e in top if rank_E[e] > 0]

    return {"cross_position_fraction": float(mass_E.sum()) / total if total > 0
            else float("nan"), "top_pairs": rows(mass_E), "strongest_pairs": rows(strength_E)}


def top_overlaps_of_head(first_E: Tensor, second_E: Tensor, valid_E: Tensor, cos_E: Tensor,
                         n_top: int) -> list[dict[str, Any]]:
    """Query-feature pairs whose key preferences agree or oppose most consistently (largest
    |Σ cos|), with the mean cosine and the count of query positions."""
    order = cos_E.abs().topk(min(n_top, cos_E.numel())).indices.tolist()
    return [{"a": int(first_E[e]), "a2": int(second_E[e]), "count": int(valid_E[e]),
             "overlap": float(cos_E[e] / valid_E[e])} for e in order if valid_E[e] > 0]


def block_heads(meter: AttentionMeter, n_tokens: int, n_top: int) -> list[dict[str, Any]]:
    """The per-head rows of one block: dominance, key overlap, top pairs and top overlaps."""
    fblock = meter.fblock
    rows = meter.head_rows()
    a_E, b_E, count_E, weight_E, score_AE = meter.pair_table()
    first_E, second_E, overlap_columns = meter.overlaps.result()
    A = fblock.n_heads
    for h, row in enumerate(rows):
        row.update({
            "block": fblock.block, "kv_head": int(fblock.kv_head_A[h]),
            "near_dominant": row["pattern_error"] <= NEAR_DOMINANT,
            **ranked_pairs(a_E, b_E, count_E, weight_E, score_AE[h], meter.n_features,
                           n_tokens, n_top),
            "top_overlaps": top_overlaps_of_head(first_E, second_E, overlap_columns[1 + h],
                                                 overlap_columns[1 + A + h], TOP_OVERLAPS),
        })
    return rows


def pair_grid(meter: AttentionMeter, head: int, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Q_ab of one head over the first GRID_FEATURES query and key features of its top pairs
    (None where the pair never met)."""
    queries = list(dict.fromkeys(p["a"] for p in pairs))[:GRID_FEATURES]
    keys = list(dict.fromkeys(p["b"] for p in pairs))[:GRID_FEATURES]
    a_E, b_E, _, weight_E, score_AE = meter.pair_table()
    H = meter.n_features
    table_E = a_E * H + b_E
    wanted = torch.tensor([a * H + b for a in queries for b in keys], dtype=torch.int64,
                          device=table_E.device)
    where = torch.searchsorted(table_E, wanted).clamp(max=max(table_E.numel() - 1, 0))
    found = (table_E[where] == wanted) if table_E.numel() else torch.zeros_like(wanted, dtype=bool)
    Q_E = score_AE[head] / weight_E
    values = [float(Q_E[w]) if ok else None for w, ok in zip(where.tolist(), found.tolist(),
                                                             strict=True)]
    n = len(keys)
    return {"block": meter.fblock.block, "head": head, "query_features": queries,
            "key_features": keys, "scores": [values[i * n:(i + 1) * n] for i in
                                             range(len(queries))]}


# --- the examples pass ---------------------------------------------------------------------------
def token_pieces(ids_S: Tensor, query: int, key: int, text: dict[int, str]
                 ) -> dict[str, Any]:
    """The tokens around a (query, key) position pair, with both marked; a long gap is cut."""
    lo, hi = min(query, key), max(query, key)
    S = ids_S.numel()
    spans = ([range(max(0, lo - 4), min(S, hi + 3))] if hi - lo <= 24 else
             [range(max(0, lo - 4), lo + 5), range(hi - 8, min(S, hi + 3))])
    pieces: list[str] = []
    marks = {}
    for index, span in enumerate(spans):
        if index:
            pieces.append(" … ")
        for position in span:
            if position in (query, key):
                marks[position] = len(pieces)
            pieces.append(text[int(ids_S[position])])
    return {"tokens": pieces, "query_mark": marks[query], "key_mark": marks[key]}


def offset_counts(hit_QSS: Tensor) -> Tensor:
    """count_QG[q, o + S − 1] = #{(t, s): hit_QSS[q, t, s], t − s = o} for every offset o in
    (−S, S): the sums along each diagonal (exact: integer counts in float64)."""
    Q, S, _ = hit_QSS.shape
    positions = torch.arange(S, device=hit_QSS.device)
    offset_SS = positions[:, None] - positions[None, :] + (S - 1)
    return hit_QSS.new_zeros((Q, 2 * S - 1), dtype=torch.float64).index_add_(
        1, offset_SS.flatten(), hit_QSS.flatten(1).double())


class PairExamples:
    """The best occurrence per context of listed (a, b) feature pairs at one block (the
    largest f_a(t)·f_b(s) over visible position pairs), the top ``n`` over contexts, and the
    count of occurrences per relative offset t − s."""

    def __init__(self, a_Q: Tensor, b_Q: Tensor, fblock: Any, n: int, n_positions: int) -> None:
        self.a_Q, self.b_Q, self.fblock, self.n = a_Q, b_Q, fblock, n
        self.S = n_positions
        self.visible_SS = visibility(n_positions, fblock.causal, fblock.window).double()
        self.best: list[list[tuple[float, int, int, int]]] = [[] for _ in range(a_Q.numel())]
        self.offset_count_G = torch.zeros(a_Q.numel() * (2 * n_positions - 1),
                                          dtype=torch.float64)

    def update(self, c: int, context: StoredContext) -> None:
        f_SK, features_SK = context.f_SK.double(), context.features_SK
        if features_SK.shape[0] != self.S:
            return
        f_a_SQ = ((features_SK[:, :, None] == self.a_Q) * f_SK[:, :, None]).sum(1)
        f_b_SQ = ((features_SK[:, :, None] == self.b_Q) * f_SK[:, :, None]).sum(1)
        count_QG = self.offset_count_G.view(self.a_Q.numel(), 2 * self.S - 1)
        for start in range(0, self.a_Q.numel(), 256):
            part = slice(start, start + 256)
            w_QSS = f_a_SQ[:, part].T[:, :, None] * f_b_SQ[:, part].T[:, None, :]
            value_Q, where_Q = w_QSS.mul_(self.visible_SS).flatten(1).max(dim=1)
            count_QG[part] += offset_counts(w_QSS > 0)
            for q in (value_Q > 0).nonzero().flatten().tolist():
                t, s = divmod(int(where_Q[q]), self.S)
                self._keep(start + q, (float(value_Q[q]), c, t, s))

    def _keep(self, q: int, candidate: tuple[float, int, int, int]) -> None:
        best = self.best[q]
        best.append(candidate)
        best.sort(key=lambda item: -item[0])
        del best[self.n:]

    def offsets(self, q: int) -> list[tuple[int, int]]:
        """(offset t − s, count) of pair q, most frequent first."""
        count_G = self.offset_count_G.view(-1, 2 * self.S - 1)[q]
        present = count_G.nonzero().flatten().tolist()
        pairs = [(index - self.S + 1, int(count_G[index])) for index in present]
        return sorted(pairs, key=lambda item: (-item[1], item[0]))


def add_examples(setup: AnalysisSetup, measured: MeasuredAttention,
                 heads: list[dict[str, Any]], n_examples: int) -> None:
    """Fill each listed pair's ``examples``, ``mean_offset`` and ``offsets`` (the second
    pass over the stored contexts, which it empties)."""
    tokenizer = setup.adapter.tokenizer
    used = sorted({int(i) for context in measured.contexts for i in context.ids_S})
    text = {i: tokenizer.decode([i]) if tokenizer is not None else str(i) for i in used}
    S = setup.request.context_length
    for meter in measured.meters:
        fblock = meter.fblock
        rows = [row for row in heads if row["block"] == fblock.block]
        wanted = list(dict.fromkeys((p["a"], p["b"]) for row in rows for name in LISTS
                                    for p in row[name]))
        if not wanted:
            continue
        a_Q = torch.tensor([a for a, _ in wanted])
        b_Q = torch.tensor([b for _, b in wanted])
        examples = PairExamples(a_Q, b_Q, fblock, n_examples, S)
        for c, context in enumerate(measured.contexts):
            examples.update(c, context)
        index = {pair: q for q, pair in enumerate(wanted)}
        for row in rows:
            for pair in (p for name in LISTS for p in row[name]):
                describe_pair(pair, examples, index[(pair["a"], pair["b"])], row["head"],
                              measured.contexts, text)
    measured.contexts.clear()


def describe_pair(pair: dict[str, Any], examples: PairExamples, q: int, head: int,
                  contexts: list[StoredContext], text: dict[int, str]) -> None:
    """A listed pair's offsets (with Q_ab at each offset for rotary models) and examples."""
    fblock = examples.fblock
    offsets = examples.offsets(q)
    total = sum(count for _, count in offsets)
    pair["mean_offset"] = (sum(o * count for o, count in offsets) / total if total
                           else float("nan"))
    shown = offsets[:OFFSETS_SHOWN]
    offset_Q = torch.tensor([o for o, _ in shown], dtype=torch.int64)
    n = len(shown)
    scores = pair_scores(fblock, head, torch.full((n,), pair["a"]), torch.full((n,), pair["b"]),
                         offset_Q).tolist() if n else []
    pair["offsets"] = [{"offset": o, "count": count, "score": score}
                       for (o, count), score in zip(shown, scores, strict=True)]
    pair["examples"] = []
    for weight, c, t, s in examples.best[q]:
        Q = float(pair_scores(fblock, head, torch.tensor([pair["a"]]), torch.tensor([pair["b"]]),
                              torch.tensor([t - s]))[0])
        pair["examples"].append({"context": c, "query": t, "key": s, "weight": weight,
                                 "score": weight * Q,
                                 **token_pieces(contexts[c].ids_S, t, s, text)})


# --- the document --------------------------------------------------------------------------------
def example_pattern(measured: MeasuredAttention, heads: list[dict[str, Any]],
                    text_of: Any) -> dict[str, Any] | None:
    """Full and dominant patterns of the least dominant head on the first context (its first
    PATTERN_POSITIONS positions)."""
    measurable = [row for row in heads if row["n_queries"]]
    if not measurable or not measured.contexts:
        return None
    worst = max(measurable, key=lambda row: row["pattern_error"])
    meter = next(m for m in measured.meters if m.fblock.block == worst["block"])
    full_ASS, dominant_ASS = meter.first_patterns
    n = min(PATTERN_POSITIONS, full_ASS.shape[-1])
    ids_S = measured.contexts[0].ids_S[:n]
    h = worst["head"]

    def rounded(p_SS: Tensor) -> list[list[float]]:
        return [[round(float(v), 5) for v in row] for row in p_SS[:n, :n]]

    return {"block": worst["block"], "head": h, "context": 0,
            "tokens": [text_of(int(i)) for i in ids_S],
            "full": rounded(full_ASS[h]), "dominant": rounded(dominant_ASS[h])}


def summary_of(heads: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over heads and the heads closest to / furthest from one-feature dominance."""
    measured = [row for row in heads if row["n_queries"]]
    keys = ("pattern_error", "tight_bound", "bound", "relative_output_error",
            "recon_pattern_error", "query_share", "key_share", "query_overlap",
            "cross_position_fraction")

    def mean(key: str) -> float:
        values = [row[key] for row in measured
                  if isinstance(row[key], float) and math.isfinite(row[key])]
        return sum(values) / len(values) if values else float("nan")

    order = sorted(measured, key=lambda row: row["pattern_error"])
    label = [f"{row['block']}.{row['head']}" for row in order]
    return {**{key: mean(key) for key in keys},
            "bound_violations": sum(row["bound_violations"] + row["tight_bound_violations"]
                                    + row["output_bound_violations"] for row in measured),
            "near_dominant_heads": [x for x, row in zip(label, order, strict=True)
                                    if row["near_dominant"]],
            "most_dominant_head": label[0] if label else None,
            "least_dominant_head": label[-1] if label else None}


def block_info(fblock: Any) -> dict[str, Any]:
    return {"block": fblock.block, "positional": "rotary" if fblock.rotary else "absolute",
            "n_heads": fblock.n_heads, "n_kv_heads": int(fblock.kv_head_A.max()) + 1,
            "head_dim": fblock.head_dim, "scale": fblock.scale, "window": fblock.window,
            "causal": fblock.causal, "rotary_dim": fblock.rotary_dim}


def analyse_attention(
    run_dir: str | Path,
    request: HeldoutRequest | None = None,
    *,
    blocks: Sequence[int] | None = None,
    top_pairs: int = TOP_PAIRS,
    examples: int = EXAMPLES,
    progress: bool = True,
    **text: Any,
) -> dict[str, Any]:
    """Measure the attention interactions of a saved crosscoder (SPEC §5); returns the
    attention.json dict. ``request`` or its fields as keywords (default 20,000 held-out tokens
    of the training cache's corpus and context length); ``blocks``: default every block whose
    attn_in the crosscoder reads; ``top_pairs`` pairs listed per head with ``examples`` example
    contexts each."""
    for name, value in (("top pairs", top_pairs), ("examples", examples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CrossintError(f"{name} must be an integer >= 0, got {value!r}")
    request = request_from(request, text, n_tokens=ATTENTION_TOKENS)
    setup = prepare_attention(run_dir, request, blocks)
    measured = measure_attention(setup, progress)
    if measured.n_tokens == 0:
        raise CrossintError(f"corpus {setup.request.corpus!r} gave no usable (non-special) tokens")
    heads = [row for meter in measured.meters
             for row in block_heads(meter, measured.n_tokens, top_pairs)]
    grid = None
    listed = [row for row in heads if row["top_pairs"]]
    if listed:
        chosen = max(listed, key=lambda row: row["top_pairs"][0]["mass"])
        meter = next(m for m in measured.meters if m.fblock.block == chosen["block"])
        grid = pair_grid(meter, chosen["head"], chosen["top_pairs"])
    tokenizer = setup.adapter.tokenizer
    pattern = example_pattern(measured, heads, lambda i: tokenizer.decode([i]) if tokenizer
                              else str(i))
    add_examples(setup, measured, heads, examples)
    return json_safe({
        "run": str(run_dir), "crosscoder_sha256": sha256_file(RunDir(run_dir).weights),
        "model": setup.adapter.name, "corpus": setup.request.corpus,
        "seed": setup.request.seed, "context_length": setup.request.context_length,
        "n_tokens": measured.n_tokens, "blocks": setup.blocks,
        "attention": [block_info(fblock) for fblock in setup.fblocks],
        "summary": summary_of(heads), "per_head": heads, "pair_grid": grid,
        "example_pattern": pattern,
        "request": {**setup.request.record(), "blocks": None if blocks is None
                    else sorted(set(blocks)), "top_pairs": top_pairs, "examples": examples},
    })


# --- outputs -------------------------------------------------------------------------------------
def pairs_csv(result: dict[str, Any]) -> str:
    """Every head's listed pairs as CSV text (columns ``PAIR_COLUMNS``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(PAIR_COLUMNS), lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for name in LISTS:
        for row in result["per_head"]:
            for pair in row[name]:
                writer.writerow({key: "" if value is None else value for key, value in
                                 {"list": name, "block": row["block"], "head": row["head"],
                                  **pair}.items()})
    return buffer.getvalue()


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """attention.json, attention_pairs.csv and the three plots into ``out_dir``."""
    from crossint.report.plots import (
        plot_attention_dominance,
        plot_attention_pattern,
        plot_pair_heatmap,
    )

    paths = rundir.ATTENTION.paths(out_dir)
    atomic_write_text(paths["pairs_csv"], pairs_csv(result))
    heads = [row for row in result["per_head"] if row["n_queries"]]
    plot_attention_dominance([f"{row['block']}.{row['head']}" for row in heads],
                             [row["pattern_error"] for row in heads],
                             [row["tight_bound"] for row in heads],
                             [row["bound"] for row in heads], paths["dominance"])
    grid = result.get("pair_grid")
    if grid:
        plot_pair_heatmap(grid["query_features"], grid["key_features"], grid["scores"],
                          paths["heatmap"],
                          title=f"Q_ab of the top pairs, block {grid['block']} head "
                                f"{grid['head']}")
    pattern = result.get("example_pattern")
    if pattern:
        plot_attention_pattern(pattern["tokens"], pattern["full"], pattern["dominant"],
                               paths["pattern"],
                               title=f"block {pattern['block']} head {pattern['head']}, "
                                     "context 0")
    atomic_write_json(paths["json"], result)  # last: its presence means the outputs are complete
    return paths


def format_table(result: dict[str, Any], n_pairs: int = 1) -> str:
    """A short plain-text summary (printed by `crossint attention`)."""

    def fmt(value: Any, spec: str = ".3g") -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "n/a"

    lines = [f"model {result['model']}  tokens {result['n_tokens']}  blocks "
             f"{','.join(map(str, result['blocks']))}",
             f"{'head':<7}{'|Δp|₁':>9}{'tight':>9}{'2|Δs|∞':>9}{'out err':>9}{'recon':>9}"
             f"{'q share':>9}{'overlap':>9}{'cross':>8}  top pair a→b: Q (Q̄ others); "
             "strongest a→b: f_a·f_b·(Q − Q̄)"]
    for row in result["per_head"]:
        line = (f"{row['block']}.{row['head']:<5}{fmt(row['pattern_error'], '>9.3f')}"
                f"{fmt(row['tight_bound'], '>9.3f')}{fmt(row['bound'], '>9.3f')}"
                f"{fmt(row['relative_output_error'], '>9.3f')}"
                f"{fmt(row['recon_pattern_error'], '>9.3f')}{fmt(row['query_share'], '>9.3f')}"
                f"{fmt(row['query_overlap'], '>9.3f')}"
                f"{fmt(row['cross_position_fraction'], '>8.3f')}")
        for pair in row["top_pairs"][:n_pairs]:
            line += (f"  {pair['a']}→{pair['b']}: {fmt(pair['score'])} "
                     f"({fmt(pair['others'])})")
        for pair in row["strongest_pairs"][:n_pairs]:
            line += f"; {pair['a']}→{pair['b']}: {fmt(pair['cross_score'])}"
        lines.append(line)
    summary = result["summary"]
    lines.append(f"bound violations {summary['bound_violations']}; close to one-feature "
                 f"dominance (|Δp|₁ ≤ {NEAR_DOMINANT}): "
                 f"{', '.join(summary['near_dominant_heads']) or 'none'}")
    return "\n".join(lines)
