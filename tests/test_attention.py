"""Attention feature interactions (SPEC §5): the pure functions against naive float64 loops on
tiny random models built here (GPT-2: absolute positions; Llama: rotary + grouped-query
attention; GPT-NeoX: partial rotary; GPT-Neo: a local window and no logit scale), the bound as a
property, `crossint attention` end to end with one-line errors, and its report section."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from conftest import assert_one_line_error
from crossint.analysis.attention import analyse_attention
from crossint.cli import main
from crossint.crosscoder.model import Crosscoder, CrosscoderConfig
from crossint.errors import CrossintError
from crossint.interactions import attention as attention_module
from crossint.interactions.attention import (
    AttentionMeter,
    PairTable,
    absolute_score_sums,
    attention_block,
    attention_feature_blocks,
    attention_scores,
    check_supported,
    cross_position,
    dominance_test,
    head_terms,
    masked_softmax,
    model_scores,
    pair_scores,
    pair_sums,
    query_contributions,
    query_overlap,
    query_spread,
)
from crossint.models.adapter import ModelAdapter
from test_adapter import _build as build_family_model

D_MODEL, VOCAB, S, H = 32, 100, 9, 10
FAMILIES = ["gpt2", "llama", "gpt_neox", "gpt_neo"]


def build_model(family: str):
    """A seeded tiny random model: 2 blocks, d_model 32, 4 query heads (Llama: 2 kv heads)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=64,
                                                 n_embd=D_MODEL, n_layer=2, n_head=4))
    elif family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, intermediate_size=64, max_position_embeddings=64,
            attention_bias=True))
    elif family == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=D_MODEL, num_attention_heads=4, num_hidden_layers=2,
            intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5))
    else:
        model = tf.GPTNeoForCausalLM(tf.GPTNeoConfig(
            vocab_size=VOCAB, max_position_embeddings=64, hidden_size=D_MODEL, num_layers=2,
            attention_types=[[["global", "local"], 1]], num_heads=4, intermediate_size=64,
            window_size=4))
    with torch.no_grad():  # larger weights: patterns far from uniform
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "wte" not in name:
                param.mul_(3.0)
            elif param.dim() == 1 and "bias" in name:
                param.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def subject(request):
    """(adapter, block-1 weights, its feature block, block-1 attn_in and attn_out on a context,
    random features with position 0 fixed like a BOS token)."""
    adapter = ModelAdapter(build_model(request.param), name=request.param)
    weights = adapter.attention_weights(1)
    generator = torch.Generator().manual_seed(3)
    d_HD = torch.randn(H, D_MODEL, generator=generator, dtype=torch.float64)
    c_D = torch.randn(D_MODEL, generator=generator, dtype=torch.float64) * 0.5
    fblock = attention_block(1, d_HD, c_D, weights)
    ids = torch.randint(3, VOCAB, (1, S), generator=generator)
    acts = adapter.capture(ids, ["blocks.1.attn_in", "blocks.1.attn_out"])
    features, f = random_features(generator, k=3, zero_slots=True)
    fixed = torch.zeros(S, dtype=torch.bool)
    fixed[0] = True
    return dict(adapter=adapter, weights=weights, fblock=fblock, d_HD=d_HD, c_D=c_D,
                attn_in=acts["blocks.1.attn_in"][0].double(),
                attn_out=acts["blocks.1.attn_out"][0].double(),
                features=features, f=f, fixed=fixed)


def random_features(generator: torch.Generator, k: int, zero_slots: bool = False,
                    n_features: int = H) -> tuple[Tensor, Tensor]:
    """Distinct random features per position (ascending), some slots padded (−1, f = 0)."""
    features = torch.stack([torch.randperm(n_features, generator=generator)[:k].sort().values
                            for _ in range(S)])
    f = torch.rand(S, k, generator=generator, dtype=torch.float64) * 2 + 0.2
    if zero_slots:
        drop = torch.rand(S, k, generator=generator) < 0.3
        drop[:, 0] = False
        drop[4] = True  # a position without any feature
        features, f = features.masked_fill(drop, -1), f.masked_fill(drop, 0.0)
    return features, f


# --- naive float64 references ------------------------------------------------------------------
def rotate(x: Tensor, position: int, weights) -> Tensor:
    """Naive rotate-half rotary at one position (identity for absolute positions)."""
    if weights.positional != "rotary":
        return x
    out, half = x.clone(), weights.rotary_dim // 2
    for i in range(half):
        angle = position * float(weights.rotary_inv_freq[i])
        a, b = x[i], x[i + half]
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def visible(weights, t: int, s: int) -> bool:
    return ((not weights.causal or s <= t)
            and (weights.window is None or t - s < weights.window))


class Naive:
    """Every quantity of one head built by loops from the raw weights (kv head by h // rep)."""

    def __init__(self, sub: dict, h: int) -> None:
        w = sub["weights"]
        g = w.kv_head(h)
        self.w, self.scale = w, w.scale
        self.WQ, self.bQ = w.W_Q_ADd[h].double(), w.b_Q_Ad[h].double()
        self.WK, self.bK = w.W_K_ADd[g].double(), w.b_K_Ad[g].double()
        self.WV, self.bV = w.W_V_ADd[g].double(), w.b_V_Ad[g].double()
        self.WO = w.W_O_AdD[h].double()
        self.d, self.c = sub["d_HD"], sub["c_D"]
        self.slots = [[] if sub["fixed"][s] else
                      [(int(a), float(v)) for a, v in zip(sub["features"][s], sub["f"][s],
                                                          strict=True) if a >= 0]
                      for s in range(S)]
        self.x_fix = [sub["attn_in"][s] if sub["fixed"][s] else self.c for s in range(S)]
        self.x_hat = [self.x_fix[s] + sum((v * self.d[a] for a, v in self.slots[s]),
                                          torch.zeros(D_MODEL, dtype=torch.float64))
                      for s in range(S)]

    def q_fix(self, t):
        return rotate(self.x_fix[t] @ self.WQ + self.bQ, t, self.w)

    def k_fix(self, s):
        return rotate(self.x_fix[s] @ self.WK + self.bK, s, self.w)

    def q_feat(self, t, a, v):
        return rotate(v * self.d[a] @ self.WQ, t, self.w)

    def k_feat(self, s, b, v):
        return rotate(v * self.d[b] @ self.WK, s, self.w)

    def q(self, t):
        return rotate(self.x_hat[t] @ self.WQ + self.bQ, t, self.w)

    def k(self, s):
        return rotate(self.x_hat[s] @ self.WK + self.bK, s, self.w)

    def Q(self, a, b, t, s):
        return self.scale * float(rotate(self.d[a] @ self.WQ, t, self.w)
                                  @ rotate(self.d[b] @ self.WK, s, self.w))


def close(a, b, tol: float = 1e-9) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max()))))


# --- decomposition ------------------------------------------------------------------------------
def test_scores_split_exactly_into_feature_pairs(subject):
    fblock = subject["fblock"]
    terms = head_terms(fblock, subject["attn_in"], subject["features"], subject["f"],
                       subject["fixed"])
    score_ASS = attention_scores(terms.q_ASd, terms.k_ASd, fblock.scale)
    for h in range(fblock.n_heads):
        n = Naive(subject, h)
        for t in range(S):
            for s in range(S):
                direct = n.scale * float(n.q(t) @ n.k(s))
                assert close(score_ASS[h, t, s], direct), (h, t, s)
                # SPEC §5: the score is the sum of pair terms f_a f_b Q_ab plus bias terms
                split = n.scale * float(n.q_fix(t) @ n.k_fix(s))
                split += sum(n.scale * float(n.q_feat(t, a, v) @ n.k_fix(s))
                             for a, v in n.slots[t])
                split += sum(n.scale * float(n.q_fix(t) @ n.k_feat(s, b, v))
                             for b, v in n.slots[s])
                split += sum(va * vb * n.Q(a, b, t, s) for a, va in n.slots[t]
                             for b, vb in n.slots[s])
                assert close(split, direct), (h, t, s)


def test_pair_scores_depend_on_the_offset_only(subject):
    fblock, weights = subject["fblock"], subject["weights"]
    n = Naive(subject, 3)
    a, b = torch.tensor([1, 4, 7]), torch.tensor([2, 4, 0])
    for t, s in ((5, 2), (8, 5), (3, 3), (7, 1)):
        got = pair_scores(fblock, 3, a, b, torch.full((3,), t - s))
        assert close(got, [n.Q(int(x), int(y), t, s) for x, y in zip(a, b, strict=True)])
    if weights.positional == "absolute":
        assert close(pair_scores(fblock, 3, a, b), pair_scores(fblock, 3, a, b,
                                                               torch.tensor([0, 5, 9])))
    else:
        with pytest.raises(CrossintError, match="offset"):
            pair_scores(fblock, 3, a, b)


def test_grouped_query_heads_read_their_kv_head(subject):
    fblock, weights = subject["fblock"], subject["weights"]
    for h in range(weights.n_heads):
        assert torch.equal(fblock.W_K_ADd[h], weights.W_K_ADd[weights.kv_head(h)].double())
    expected = {"llama": 2}.get(subject["adapter"].family, 4)
    assert weights.n_kv_heads == expected and int(fblock.kv_head_A.max()) + 1 == expected


def test_model_pattern_rebuilds_the_models_attention_output(subject):
    # the rotation, scale, window and kv heads of the decomposition are the model's own
    fblock = subject["fblock"]
    attn_in = subject["attn_in"]
    terms = head_terms(fblock, attn_in, subject["features"][:, :0], subject["f"][:, :0],
                       torch.ones(S, dtype=torch.bool))
    pattern_ASS = masked_softmax(model_scores(fblock, attn_in), terms.visible_SS)
    out_SD = torch.einsum("ast,atd,adD->sD", pattern_ASS, terms.v_ASd, fblock.W_O_AdD)
    out_SD = out_SD + subject["weights"].b_O_D.double()
    assert close(out_SD, subject["attn_out"], 1e-4)


# --- the dominance test -------------------------------------------------------------------------
def naive_dominance(sub: dict, h: int) -> dict[str, list]:
    """Strongest query feature per query (max over visible keys of |its score part|), strongest
    key feature per key (max over the measured queries that see it), patterns and errors."""
    n, w = Naive(sub, h), sub["weights"]
    measured = [t for t in range(S) if not sub["fixed"][t]]

    def strongest(options, strength):
        best = None
        for a, v in options:  # first maximum wins
            if best is None or strength(a, v) > best[2]:
                best = (a, v, strength(a, v))
        return best

    q_keep, k_keep = {}, {}
    for t in range(S):
        q_keep[t] = strongest(n.slots[t], lambda a, v, t=t: max(
            abs(n.scale * float(n.q_feat(t, a, v) @ n.k(s))) for s in range(S)
            if visible(w, t, s)))
    for s in range(S):
        k_keep[s] = strongest(n.slots[s], lambda b, v, s=s: max(
            [abs(n.scale * float(n.q(t) @ n.k_feat(s, b, v))) for t in measured
             if visible(w, t, s)], default=0.0))
    out = {key: [] for key in ("error", "delta_max", "delta_range", "output_error",
                               "query_feature")}
    for t in measured:
        keys = [s for s in range(S) if visible(w, t, s)]
        q_dom = n.q_fix(t) + (n.q_feat(t, *q_keep[t][:2]) if q_keep[t] else 0)
        full = torch.tensor([n.scale * float(n.q(t) @ n.k(s)) for s in keys],
                            dtype=torch.float64)
        dom = torch.tensor([n.scale * float(q_dom @ (n.k_fix(s) + (
            n.k_feat(s, *k_keep[s][:2]) if k_keep[s] else 0))) for s in keys],
                           dtype=torch.float64)
        p, p_dom = full.softmax(0), dom.softmax(0)
        u = [(n.x_hat[s] @ n.WV + n.bV) @ n.WO for s in keys]
        out["error"].append(float((p - p_dom).abs().sum()))
        out["delta_max"].append(float((full - dom).abs().max()))
        out["delta_range"].append(float((full - dom).max() - (full - dom).min()))
        out["output_error"].append(float(sum(float(p[i] - p_dom[i]) * u[i]
                                             for i in range(len(keys))).norm()))
        out["query_feature"].append(q_keep[t][0] if q_keep[t] else -1)
    return out


def test_dominance_test_matches_naive_loops(subject):
    fblock = subject["fblock"]
    terms = head_terms(fblock, subject["attn_in"], subject["features"], subject["f"],
                       subject["fixed"])
    test = dominance_test(terms, query_contributions(terms), fblock.W_O_AdD)
    measured = ~subject["fixed"]
    features = subject["features"]
    for h in range(fblock.n_heads):
        naive = naive_dominance(subject, h)
        assert close(test.pattern_error_AS[h, measured], naive["error"])
        assert close(test.delta_max_AS[h, measured], naive["delta_max"])
        assert close(test.delta_range_AS[h, measured], naive["delta_range"])
        assert close(test.output_error_AS[h, measured], naive["output_error"])
        has = (features >= 0).any(-1)
        chosen = torch.where(has, features.gather(1, test.query_slot_AS[h][:, None])[:, 0], -1)
        assert chosen[measured].tolist() == naive["query_feature"]
    assert bool((test.pattern_error_AS <= test.tight_bound_AS + 1e-12).all())
    assert bool((test.tight_bound_AS <= test.bound_AS + 1e-12).all())
    assert bool((test.output_error_AS <= test.output_bound_AS + 1e-12).all())


def test_query_overlap_matches_naive_loops(subject):
    fblock, w = subject["fblock"], subject["weights"]
    terms = head_terms(fblock, subject["attn_in"], subject["features"], subject["f"],
                       subject["fixed"])
    cos_ASKK, valid_ASKK = query_overlap(terms)
    for h in (0, fblock.n_heads - 1):
        n = Naive(subject, h)
        for t in range(1, S):
            keys = [s for s in range(S) if visible(w, t, s)]
            raw = [k for k in range(subject["features"].shape[1])
                   if subject["features"][t, k] >= 0]  # slot of each active feature
            parts = {k: torch.tensor([n.scale * float(n.q_feat(t, a, v) @ n.k(s)) for s in keys],
                                     dtype=torch.float64)
                     for k, (a, v) in zip(raw, n.slots[t], strict=True)}
            for k in parts:
                for m in (m for m in parts if m > k):
                    x, y = parts[k] - parts[k].mean(), parts[m] - parts[m].mean()
                    if len(keys) < 2:
                        assert not valid_ASKK[h, t, k, m]
                        continue
                    assert valid_ASKK[h, t, k, m]
                    assert close(cos_ASKK[h, t, k, m], float(x @ y / (x.norm() * y.norm())))
    assert not valid_ASKK[:, 0].any() and not valid_ASKK[:, 4].any()  # fixed / featureless


# --- the feature-pair table ---------------------------------------------------------------------
def naive_pair_sums(sub: dict, contexts) -> dict[tuple[int, int], list[float]]:
    w = sub["weights"]
    table: dict[tuple[int, int], list[float]] = {}
    naives = [Naive(sub, h) for h in range(w.n_heads)]
    for features, f in contexts:
        for t in range(1, S):
            for s in range(1, S):
                if not visible(w, t, s):
                    continue
                for a, va in [(int(a), float(v)) for a, v in zip(features[t], f[t],
                                                                  strict=True) if a >= 0]:
                    for b, vb in [(int(b), float(v)) for b, v in zip(features[s], f[s],
                                                                     strict=True) if b >= 0]:
                        row = table.setdefault((a, b), [0.0] * (2 + w.n_heads))
                        row[0] += 1
                        row[1] += va * vb
                        for h, n in enumerate(naives):
                            row[2 + h] += va * vb * n.Q(a, b, t, s)
    return table


@pytest.mark.parametrize("sparse", [False, True])
def test_pair_table_matches_naive_loops(subject, sparse):
    fblock = subject["fblock"]
    generator = torch.Generator().manual_seed(11)
    contexts = [(subject["features"], subject["f"]), random_features(generator, k=2)]
    table = PairTable(H, 2 + fblock.n_heads, dense_cells=0 if sparse else 1 << 20,
                      merge_entries=7)
    assert table.dense != sparse
    for features, f in contexts:
        sums = pair_sums(fblock, features, f, subject["fixed"])
        table.add(sums.a_E, sums.b_E, [sums.count_E, sums.weight_E, *sums.score_AE])
    a_E, b_E, columns = table.result()
    naive = naive_pair_sums(subject, contexts)
    assert sorted(naive) == list(zip(a_E.tolist(), b_E.tolist(), strict=True))
    expected = torch.tensor([naive[key] for key in sorted(naive)], dtype=torch.float64)
    assert close(torch.stack(columns, dim=1), expected)
    # the meter keeps score sums per context only for rotary models; the table is the same
    meter = AttentionMeter(fblock, H, dense_cells=0 if sparse else 1 << 20, merge_entries=7)
    for features, f in contexts:
        meter.update(subject["attn_in"], features, f, subject["fixed"])
    a2_E, b2_E, count_E, weight_E, score_AE = meter.pair_table()
    assert torch.equal(a2_E, a_E) and torch.equal(b2_E, b_E)
    assert close(torch.stack([count_E, weight_E, *score_AE], dim=1), expected)
    # cross-position interaction: Q_ab against the mean over the other key features a meets
    Q_E, others_E, cross_E = cross_position(a_E, columns[1], columns[2], H)
    spread_E = query_spread(a_E, columns[1], Q_E, H)
    for e, (a, b) in enumerate(zip(a_E.tolist(), b_E.tolist(), strict=True)):
        rows = {key: value for key, value in naive.items() if key[0] == a}
        other = [value for key, value in rows.items() if key[1] != b]
        Q = naive[(a, b)][2] / naive[(a, b)][1]
        assert close(Q_E[e], Q)
        if other:
            mean = sum(v[2] for v in other) / sum(v[1] for v in other)
            assert close(others_E[e], mean) and close(cross_E[e], Q - mean)
        else:
            assert math.isnan(float(others_E[e]))
        weights = [v[1] for v in rows.values()]
        scores = [v[2] / v[1] for v in rows.values()]
        mean_all = sum(wt * q for wt, q in zip(weights, scores, strict=True)) / sum(weights)
        variance = sum(wt * (q - mean_all) ** 2 for wt, q in zip(weights, scores, strict=True))
        assert close(spread_E[e], math.sqrt(variance / sum(weights)), 1e-6)


def test_absolute_pair_score_is_one_number_per_pair(subject, monkeypatch):
    fblock = subject["fblock"]
    sums = pair_sums(fblock, subject["features"], subject["f"], subject["fixed"])
    if subject["weights"].positional != "absolute":
        with pytest.raises(CrossintError, match="offsets"):
            absolute_score_sums(fblock, sums.a_E, sums.b_E, sums.weight_E)
        return
    for h in range(fblock.n_heads):
        Q_E = pair_scores(fblock, h, sums.a_E, sums.b_E)
        assert close(sums.score_AE[h], Q_E * sums.weight_E)
    dense = absolute_score_sums(fblock, sums.a_E, sums.b_E, sums.weight_E)
    monkeypatch.setattr(attention_module, "DENSE_CELLS", 0)  # the chunked path of a large H
    chunked = absolute_score_sums(fblock, sums.a_E, sums.b_E, sums.weight_E, chunk=5)
    assert close(dense, sums.score_AE) and close(chunked, sums.score_AE)


def test_meter_accumulates_and_never_breaks_the_bound(subject):
    fblock = subject["fblock"]
    meter = AttentionMeter(fblock, H, dense_cells=0, merge_entries=5)
    for _ in range(2):
        meter.update(subject["attn_in"], subject["features"], subject["f"], subject["fixed"])
    rows = meter.head_rows()
    assert len(rows) == fblock.n_heads
    for row in rows:
        assert row["n_queries"] == 2 * (S - 1)
        assert row["bound_violations"] == row["tight_bound_violations"] == 0
        assert row["output_bound_violations"] == 0
        assert 0 <= row["pattern_error"] <= row["tight_bound"] <= row["bound"]
        assert 0 < row["query_share"] <= 1 and row["recon_pattern_error"] >= 0
    full, dominant = meter.first_patterns
    assert full.shape == dominant.shape == (fblock.n_heads, S, S)


def test_blocks_with_equal_windows_share_one_pair_table(subject):
    fblock = subject["fblock"]
    other = dataclasses.replace(fblock, block=0)
    shared = attention_module.shares_pair_table(fblock, other, S)
    assert shared == (subject["weights"].positional == "absolute")
    if not shared:
        return
    context = (subject["attn_in"], subject["features"], subject["f"], subject["fixed"])
    alone, owner = AttentionMeter(other, H), AttentionMeter(fblock, H)
    sharer = AttentionMeter(other, H, shared_pairs=owner.pairs)
    for meter in (alone, owner, sharer):
        meter.update(*context)
    for mine, theirs in zip(sharer.pair_table(), alone.pair_table(), strict=True):
        assert torch.equal(mine, theirs)
    narrower = dataclasses.replace(fblock, window=2)  # different visible pairs: its own table
    assert not attention_module.shares_pair_table(fblock, narrower, S)


def test_offset_counts_match_naive_loops():
    from crossint.analysis.attention import offset_counts

    hit_QSS = torch.rand(4, S, S, generator=torch.Generator().manual_seed(5)) < 0.5
    count_QG = offset_counts(hit_QSS)
    for q in range(4):
        for o in range(1 - S, S):
            naive = sum(1 for t in range(S) for s in range(S) if t - s == o and hit_QSS[q, t, s])
            assert count_QG[q, o + S - 1] == naive


# --- the bound as a property --------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(2, 12), st.floats(1e-3, 200.0), st.integers(0, 2**31 - 1))
def test_softmax_bound_never_fails(n, size, seed):
    generator = torch.Generator().manual_seed(seed)
    score = torch.randn(3, n, n, generator=generator, dtype=torch.float64) * size
    delta = torch.randn(3, n, n, generator=generator, dtype=torch.float64) * size
    visible = torch.rand(n, n, generator=generator) < 0.6
    visible |= torch.eye(n, dtype=torch.bool)
    p, p_dom = masked_softmax(score, visible), masked_softmax(score - delta, visible)
    error = (p - p_dom).abs().sum(-1)
    inf = float("inf")
    top, bottom = delta.masked_fill(~visible, -inf).amax(-1), delta.masked_fill(~visible,
                                                                              inf).amin(-1)
    tight = (0.5 * (top - bottom)).clamp(max=2.0)
    spec = 2 * torch.maximum(top.abs(), bottom.abs())
    assert bool((error <= tight * (1 + 1e-9) + 1e-12).all())
    assert bool((tight <= spec + 1e-12).all())


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["gpt2", "llama"]), st.floats(0.1, 30.0), st.integers(0, 10_000))
def test_dominance_bound_never_fails(family, size, seed):
    weights = _weights(family)
    generator = torch.Generator().manual_seed(seed)
    d_HD = torch.randn(H, D_MODEL, generator=generator, dtype=torch.float64) * size
    fblock = attention_block(0, d_HD, torch.randn(D_MODEL, generator=generator,
                                                  dtype=torch.float64), weights)
    features, f = random_features(generator, k=3, zero_slots=True)
    fixed = torch.rand(S, generator=generator) < 0.2
    attn_in = torch.randn(S, D_MODEL, generator=generator, dtype=torch.float64) * size
    terms = head_terms(fblock, attn_in, features, f, fixed)
    test = dominance_test(terms, query_contributions(terms), fblock.W_O_AdD)
    finite = torch.isfinite(test.pattern_error_AS)
    assert bool(finite.all())
    assert bool((test.pattern_error_AS <= test.tight_bound_AS * (1 + 1e-9) + 1e-9).all())
    assert bool((test.pattern_error_AS <= test.bound_AS * (1 + 1e-9) + 1e-9).all())
    assert bool((test.output_error_AS <= test.output_bound_AS * (1 + 1e-9) + 1e-9).all())


_WEIGHTS: dict[str, object] = {}


def _weights(family: str):
    if family not in _WEIGHTS:
        _WEIGHTS[family] = ModelAdapter(build_model(family)).attention_weights(0)
    return _WEIGHTS[family]


def test_unsupported_attention_fails_with_a_clear_message():
    weights = _weights("gpt2")
    with pytest.raises(CrossintError, match="alibi position biases.*supported: absolute, rotary"):
        check_supported(dataclasses.replace(weights, positional="alibi"), 3)
    with pytest.raises(CrossintError, match="multiple"):
        check_supported(dataclasses.replace(weights, n_kv_heads=3), 0)


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2"])
def test_qk_norm_and_soft_capping_are_refused_naming_the_family(model_type):
    weights = ModelAdapter(build_family_model(model_type)).attention_weights(0)
    what = "normalises queries and keys" if model_type == "qwen3" else "soft-caps scores"
    with pytest.raises(CrossintError, match=f"{model_type} model {what}") as err:
        check_supported(weights, 0)
    assert "\n" not in str(err.value)


def test_post_norms_and_residual_multipliers_are_analysed():
    check_supported(ModelAdapter(build_family_model("granite")).attention_weights(0), 0)
    gemma2 = ModelAdapter(build_family_model("gemma2")).attention_weights(0)
    check_supported(dataclasses.replace(gemma2, softcap=None), 0)  # Gemma 2 without the cap


# --- end to end ----------------------------------------------------------------------------------
MEASURE = ["--tokens", "600", "--context-length", "32", "--top-pairs", "5", "--examples", "2",
           "--quiet"]


@pytest.fixture(scope="module")
def attention_run(trained_paper_run, tmp_path_factory) -> Path:
    """A copy of the tiny GPT-2 paper-layout run with attention results in RUN/attention."""
    run = tmp_path_factory.mktemp("attention") / "run"
    shutil.copytree(trained_paper_run, run, ignore=shutil.ignore_patterns("checkpoint"))
    assert main(["attention", str(run), *MEASURE]) == 0
    return run


def test_cli_writes_every_output(attention_run, capsys):
    out = attention_run / "attention"
    for name in ("attention.json", "attention_pairs.csv", "attention_dominance.png",
                 "attention_pairs.png", "attention_pattern.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "attention.json").read_text())
    assert result["blocks"] == [0, 1] and result["n_tokens"] >= 600
    assert [(r["block"], r["head"]) for r in result["per_head"]] == [(b, h) for b in (0, 1)
                                                                    for h in range(4)]
    assert result["summary"]["bound_violations"] == 0
    for row in result["per_head"]:
        assert row["pattern_error"] <= row["tight_bound"] <= row["bound"]
        assert 0 < len(row["top_pairs"]) <= 5 and row["n_pairs"] > 0
        for pair in row["top_pairs"]:
            assert pair["count"] >= 1 and pair["offsets"] and len(pair["examples"]) <= 2
            example = pair["examples"][0]
            assert example["query"] >= example["key"]  # causal
            assert {example["query_mark"], example["key_mark"]} <= set(
                range(len(example["tokens"])))
            # absolute positions: one Q_ab at every offset
            assert all(o["score"] == pytest.approx(pair["score"]) for o in pair["offsets"])
    lines = (out / "attention_pairs.csv").read_text().splitlines()
    assert lines[0].startswith("list,block,head,a,b") and len(lines) > 8
    assert result["request"]["blocks"] is None and result["request"]["top_pairs"] == 5
    grid = result["pair_grid"]
    assert len(grid["scores"]) == len(grid["query_features"])


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_text_file) -> Path:
    """A tiny Llama (rotary, 4 query heads on 2 kv heads) saved with a tokenizer, and a random
    crosscoder over its attn_in hookpoints saved as a run."""
    from conftest import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("llama")
    model = build_model("llama")
    tokenizer = build_tiny_tokenizer()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    hookpoints = ["blocks.0.attn_in", "blocks.1.resid_pre", "blocks.1.attn_in"]
    config = CrosscoderConfig(hookpoints=hookpoints, models=[str(root / "model")],
                              d_model=D_MODEL, n_features=24, activation="topk", k=3)
    crosscoder = Crosscoder(config, seed=0)
    with torch.no_grad():
        crosscoder.W_dec_HXD.mul_(20.0)
        crosscoder.b_dec_XD.normal_()
    crosscoder.save_pretrained(root / "run")
    return root / "run"


def test_rotary_gqa_run_end_to_end(llama_run, tiny_text_file):
    result = analyse_attention(llama_run, n_tokens=300, context_length=16,
                               corpus=str(tiny_text_file), top_pairs=4, examples=1,
                               progress=False)
    info = result["attention"][0]
    assert info["positional"] == "rotary" and info["n_kv_heads"] == 2 and info["n_heads"] == 4
    assert result["summary"]["bound_violations"] == 0
    assert [row["kv_head"] for row in result["per_head"][:4]] == [0, 0, 1, 1]
    varying = [pair for row in result["per_head"] for pair in row["top_pairs"]
               if len({round(o["score"], 12) for o in pair["offsets"]}) > 1]
    assert varying, "rotary pair scores should change with the offset"


def test_analysis_agrees_with_the_meter_on_one_context(llama_run, tiny_text_file):
    from crossint.analysis.attention import measure_attention, prepare_attention
    from crossint.analysis.heldout import HeldoutRequest

    request = HeldoutRequest(n_texts=1, context_length=16, corpus=str(tiny_text_file))
    setup = prepare_attention(llama_run, request, [1])
    measured = measure_attention(setup, progress=False)
    context = measured.contexts[0]
    acts = setup.adapter.capture(context.ids_S[None], ["blocks.1.attn_in"])
    fixed = torch.isin(context.ids_S, torch.tensor(sorted(setup.special_ids)))
    fblock = attention_feature_blocks(setup.crosscoder,
                                      {1: setup.adapter.attention_weights(1)})[0]
    meter = AttentionMeter(fblock, 24)
    meter.update(acts["blocks.1.attn_in"][0], context.features_SK, context.f_SK, fixed)
    ours, theirs = meter.head_rows(), measured.meters[0].head_rows()
    for a, b in zip(ours, theirs, strict=True):
        assert a["pattern_error"] == pytest.approx(b["pattern_error"], rel=1e-6)


def test_cli_errors_are_one_line(trained_paper_run, tmp_path, capsys):
    run = str(trained_paper_run)
    code = main(["attention", run, "--blocks", "5", "--out", str(tmp_path / "a"), *MEASURE])
    assert_one_line_error(capsys, code, "attention", "block(s) 5 out of range", "2 blocks")
    code = main(["attention", str(tmp_path / "missing"), *MEASURE])
    assert_one_line_error(capsys, code, "attention", "not found")
    code = main(["attention", run, "--top-pairs", "-1", "--out", str(tmp_path / "b"),
                 *MEASURE[:4], "--quiet"])
    assert_one_line_error(capsys, code, "attention", "top pairs must be an integer >= 0")
    config = json.loads((trained_paper_run / "config.json").read_text())
    model = config["crosscoder"]["models"][0]
    for hookpoints, blocks, fragments in (
        (["blocks.0.resid_pre", "blocks.1.resid_pre"], None,
         ("reads no blocks.{l}.attn_in", "paper layout")),
        (["blocks.0.attn_in", "blocks.1.resid_pre"], "1",
         ("no attn_in hookpoint for block(s) 1", "attn_in of blocks 0")),
    ):
        other = tmp_path / f"cc{len(hookpoints)}{blocks}"
        Crosscoder(CrosscoderConfig(hookpoints=hookpoints, models=[model], d_model=D_MODEL,
                                    n_features=16, activation="topk", k=2)).save_pretrained(other)
        code = main(["attention", str(other), *(["--blocks", blocks] if blocks else []),
                     *MEASURE])
        assert_one_line_error(capsys, code, "attention", *fragments)


def test_cli_rejects_another_model(trained_paper_run, tmp_path, capsys):
    from conftest import build_tiny_gpt2

    wide = build_tiny_gpt2(tmp_path / "wide", d_model=48)
    capsys.readouterr()
    code = main(["attention", str(trained_paper_run), "--model", str(wide), "--out",
                 str(tmp_path / "o"), *MEASURE])
    assert_one_line_error(capsys, code, "attention", "d_model 48", "width 32")
    deep = build_tiny_gpt2(tmp_path / "deep", n_blocks=3)
    capsys.readouterr()
    code = main(["attention", str(trained_paper_run), "--model", str(deep), "--out",
                 str(tmp_path / "o"), *MEASURE])
    assert_one_line_error(capsys, code, "attention", "does not match", "n_blocks 2")


def test_report_section_links_pairs_to_feature_cards(attention_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(attention_run, run)
    assert main(["cluster", str(run), "--min-count", "2", "--random", "10", "--tokens", "600",
                 "--context-length", "32", "--quiet"]) == 0
    assert main(["report", str(run)]) == 0
    text = (run / "report.html").read_text(encoding="utf-8")
    start = text.index('<section id="attention">')
    body = text[start:text.index("</section>", start)]
    assert body.count("data:image/png;base64,") == 3
    assert '<a href="#attention">' in text
    cards = set(re.findall(r'<div class="card" id="f(\d+)"', text))
    result = json.loads((run / "attention" / "attention.json").read_text())
    first = result["per_head"][0]["top_pairs"][0]
    for feature in (first["a"], first["b"]):
        if str(feature) in cards:
            assert f'href="#f{feature}"' in body
    assert {str(first["a"]), str(first["b"])} & cards  # listed pairs get cards first
    links = set(re.findall(r'href="#f(\d+)"', body))
    assert links and links <= cards
