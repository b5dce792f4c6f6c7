"""Per-feature profiles on held-out text: what each crosscoder feature fires on and what it
interacts with (the inputs of SPEC §10 clustering and of the report's feature cards).

One pass over held-out text keeps every token's sparse feature activations, its token id and
where it sits in its context, and accumulates the SPEC §4.5 pairwise matrix summed over the
analysed blocks. Everything else (top-activating contexts, activation histograms, co-activation
Gram matrix) is derived from the stored sparse activations afterwards, without another pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse

from crossint.analysis.heldout import HeldoutRequest, capture_tokens, request_from
from crossint.errors import CrossintError

CONTEXT_BEFORE = 12  # tokens of left context shown with an activating token
CONTEXT_AFTER = 3
HISTOGRAM_BINS = 20


@dataclass
class FeatureSample:
    """Held-out activations of every feature, with the text they came from.

    ``f_TH``: sparse (CSR, float32) activations of the T non-special tokens. ``ids_CS``: the
    contexts (token ids); ``where_T2``: (context, position) of each token. ``interaction_HH``:
    SPEC §4.5 I summed over ``blocks`` (sparse CSR float64, mass per token: only co-active pairs
    have entries, so large dictionaries fit). ``request``: the resolved held-out request.
    """

    f_TH: sparse.csr_matrix
    ids_CS: np.ndarray
    where_T2: np.ndarray
    interaction_HH: sparse.csr_matrix
    blocks: list[int]
    token_text: dict[int, str]
    model: str
    request: HeldoutRequest

    @property
    def n_tokens(self) -> int:
        return self.f_TH.shape[0]

    def active_counts_H(self) -> np.ndarray:
        """Tokens on which each feature is active."""
        return np.diff(self.f_TH.tocsc().indptr)

    def top_tokens(self, k: int) -> list[np.ndarray]:
        """Per feature, the token indices (into T) of its ``k`` largest activations, largest
        first (fewer if it fired on fewer tokens)."""
        f_csc = self.f_TH.tocsc()
        tops = []
        for h in range(f_csc.shape[1]):
            lo, hi = f_csc.indptr[h], f_csc.indptr[h + 1]
            rows, values = f_csc.indices[lo:hi], f_csc.data[lo:hi]
            order = np.argsort(-values, kind="stable")[:k]
            tops.append(rows[order])
        return tops

    def context(self, t: int) -> dict[str, Any]:
        """The text around token ``t``: its pieces and which one is the activating token."""
        c, s = self.where_T2[t]
        start = max(0, s - CONTEXT_BEFORE)
        stop = min(self.ids_CS.shape[1], s + CONTEXT_AFTER + 1)
        pieces = [self.token_text[int(i)] for i in self.ids_CS[c, start:stop]]
        return {"tokens": pieces, "mark": int(s - start)}

    def gram_HH(self) -> np.ndarray:
        """Σ_t f_i(t) f_j(t) (float64), for the cosine of activation patterns."""
        f = self.f_TH.astype(np.float64)
        return (f.T @ f).toarray()


def activation_histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    """Counts of a feature's non-zero activations in ``bins`` equal bins from 0 to its max."""
    top = float(values.max()) if values.size else 1.0
    counts, edges = np.histogram(values, bins=bins, range=(0.0, top if top > 0 else 1.0))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


FEATURE_TOKENS = 20_000  # default held-out tokens


def collect_features(
    run_dir: str | Path,
    request: HeldoutRequest | None = None,
    *,
    blocks: Sequence[int] | None = None,
    progress: bool = True,
    **text: Any,
) -> FeatureSample:
    """Run the subject model on held-out text (``request``, or its fields as keywords; default
    20,000 tokens) and keep the crosscoder's feature activations and the pairwise interaction
    matrix at its MLP blocks."""
    from crossint.analysis.interactions import prepare_analysis

    request = request_from(request, text, n_tokens=FEATURE_TOKENS)
    return sample_features(prepare_analysis(run_dir, "cluster", request, blocks), progress)


def sample_features(setup: Any, progress: bool = True) -> FeatureSample:
    """:func:`collect_features` on a prepared run (``analysis.interactions.AnalysisSetup``)."""
    from tqdm.auto import tqdm

    from crossint.interactions import PairwiseAccumulator, active_features
    from crossint.interactions.mlp import block_records

    crosscoder, adapter, batches = setup.crosscoder, setup.adapter, setup.batches
    H = crosscoder.config.n_features
    pairwise = PairwiseAccumulator(H, setup.blocks)
    pieces, where, first_context = [], [], 0
    with torch.no_grad():
        for ids_BS in tqdm(batches, desc="features", unit="batch", disable=not progress,
                           dynamic_ncols=True):
            _, keep_BS, acts_TXD = capture_tokens(adapter, ids_BS.to(setup.request.device),
                                                  setup.hookpoints, setup.special_ids)
            batch_f_TH = crosscoder.encode(acts_TXD)
            for _, records in block_records(setup.fblocks, active_features(batch_f_TH)):
                pairwise.update(records)
            pieces.append(sparse.csr_matrix(batch_f_TH.float().cpu().numpy()))
            context_T, position_T = keep_BS.cpu().nonzero(as_tuple=True)
            where.append(np.stack([context_T.numpy() + first_context, position_T.numpy()], 1))
            first_context += ids_BS.shape[0]
    f_TH = sparse.vstack(pieces, format="csr") if pieces else sparse.csr_matrix((0, H))
    if f_TH.shape[0] == 0:
        raise CrossintError(f"corpus {setup.request.corpus!r} gave no usable (non-special) "
                            "tokens")
    ids_CS = torch.cat(batches).numpy()
    used = np.unique(ids_CS)
    token_text = {int(i): adapter.tokenizer.decode([int(i)]) for i in used}
    interaction = pairwise.result().interaction_matrix()
    if interaction.is_sparse:
        rows, cols = interaction.indices().numpy()
        interaction_HH = sparse.csr_matrix((interaction.values().numpy(), (rows, cols)),
                                           shape=(H, H))
    else:
        interaction_HH = sparse.csr_matrix(interaction.numpy())
    return FeatureSample(
        f_TH=f_TH, ids_CS=ids_CS, where_T2=np.concatenate(where), interaction_HH=interaction_HH,
        blocks=setup.blocks, token_text=token_text, model=adapter.name, request=setup.request,
    )


def feature_profiles(
    sample: FeatureSample,
    features: Sequence[int],
    decoder_norm_HX: np.ndarray,
    hookpoints: Sequence[str],
    n_contexts: int = 8,
    n_partners: int = 8,
) -> list[dict[str, Any]]:
    """One record per feature in ``features``: frequency, top contexts, activation histogram,
    decoder norm per hookpoint, and its strongest interaction partners (by (I + Iᵀ)/2)."""
    f_csc = sample.f_TH.tocsc()
    tops = sample.top_tokens(n_contexts)
    symmetric_HH = ((sample.interaction_HH + sample.interaction_HH.T) / 2).tocsr()
    profiles = []
    for h in features:
        values = f_csc.data[f_csc.indptr[h]:f_csc.indptr[h + 1]]
        row = symmetric_HH[h].toarray().ravel()
        row[h] = 0.0
        partners = [int(j) for j in np.argsort(-row, kind="stable")[:n_partners] if row[j] > 0]
        contexts = []
        for t in tops[h]:
            contexts.append({**sample.context(int(t)),
                             "activation": float(sample.f_TH[int(t), h])})
        profiles.append({
            "id": int(h),
            "frequency": values.size / max(sample.n_tokens, 1),
            "max_activation": float(values.max()) if values.size else 0.0,
            "contexts": contexts,
            "histogram": activation_histogram(values),
            "decoder_norm": {name: float(decoder_norm_HX[h, x])
                             for x, name in enumerate(hookpoints)},
            "partners": [{"j": j, "interaction": float(row[j])} for j in partners],
        })
    return profiles
