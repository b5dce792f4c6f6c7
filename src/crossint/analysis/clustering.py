"""Feature clustering by interaction, with two baselines and an offline coherence score
(SPEC §10).

Three similarity matrices over the same features, each clustered by affinity propagation on
**precomputed** affinities (the paper's code passed the interaction matrix as Euclidean feature
vectors by mistake):

- ``interaction``: A = (I + Iᵀ)/2 of SPEC §4.5, normalised as A_ij / sqrt(a_i a_j) with
  a_i = Σ_j A_ij, so a feature's affinities do not scale with how often it fires;
- ``decoder``: cosine of the decoder vectors (all hookpoints concatenated, folded units);
- ``activation``: cosine of the activation patterns over held-out tokens.

Coherence without a language model: each feature's set of top-activating token ids; a cluster's
coherence is the mean pairwise Jaccard overlap of its members' sets; a method's coherence is the
mean over its clusters of two or more features, compared with random clusters of the same sizes
drawn from the same features (z-score).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from crossint import rundir
from crossint.errors import CrossintError

METHODS = ("interaction", "decoder", "activation")
AP_SCHEDULE = ((0.9, 1000), (0.97, 4000))  # (damping, max_iter), tried in turn
AFFINITY_CLUSTERS = 30  # clusters drawn in affinity.png (all of them would be unreadable)


# --- similarities --------------------------------------------------------------------------------
def normalised_interaction(interaction_HH: Any, features_U: Sequence[int] | None = None,
                           ) -> np.ndarray:
    """A_ij / sqrt(a_i a_j) with A = (I + Iᵀ)/2 and a_i = Σ_{j≠i} A_ij (over all features), for
    the ``features_U`` (default all) as a dense U×U array; zero diagonal, and zero rows for
    features with no interaction mass. ``interaction_HH`` may be dense or scipy-sparse."""
    from scipy import sparse

    I = sparse.csr_matrix(interaction_HH)
    I.setdiag(0.0)
    A = ((I + I.T) / 2).tocsr()
    a = np.asarray(A.sum(axis=1)).ravel()
    inv = np.where(a > 0, 1.0 / np.sqrt(np.where(a > 0, a, 1.0)), 0.0)
    index = np.arange(A.shape[0]) if features_U is None else np.asarray(features_U)
    A_UU = A[index][:, index].toarray()
    return A_UU * inv[index][:, None] * inv[index][None, :]


def cosine_rows(X_UF: np.ndarray) -> np.ndarray:
    """Cosine similarity between the rows of ``X_UF`` (zero rows have similarity 0)."""
    norm = np.linalg.norm(X_UF, axis=1)
    unit = X_UF / np.where(norm > 0, norm, 1.0)[:, None]
    return unit @ unit.T


def cosine_from_gram(gram_UU: np.ndarray) -> np.ndarray:
    """Cosine similarity from a Gram matrix G_ij = <x_i, x_j>."""
    diag = np.sqrt(np.clip(np.diag(gram_UU), 0.0, None))
    inv = np.where(diag > 0, 1.0 / np.where(diag > 0, diag, 1.0), 0.0)
    return gram_UU * inv[:, None] * inv[None, :]


# --- affinity propagation ------------------------------------------------------------------------
def resolve_preference(similarity_UU: np.ndarray, preference: str | float) -> float:
    """``"median"`` / ``"min"`` of the off-diagonal similarities, or a number."""
    if isinstance(preference, (int, float)) and not isinstance(preference, bool):
        if not np.isfinite(preference):
            raise CrossintError(f"preference must be finite, got {preference!r}")
        return float(preference)
    U = similarity_UU.shape[0]
    off = similarity_UU[~np.eye(U, dtype=bool)]
    if preference == "median":
        return float(np.median(off)) if off.size else 0.0
    if preference == "min":
        return float(off.min()) if off.size else 0.0
    raise CrossintError(f"preference must be 'median', 'min' or a number, got {preference!r}")


def affinity_propagation(similarity_UU: np.ndarray, preference: float, seed: int = 0,
                         schedule: Sequence[tuple[float, int]] = AP_SCHEDULE,
                         ) -> tuple[np.ndarray, bool]:
    """Cluster labels (0..C-1) of affinity propagation on precomputed similarities, and whether
    it converged. ``schedule``: (damping, max_iter) tried in turn until one converges (messages
    oscillate on sparse affinities; more damping settles them). Points it leaves unassigned
    become singletons."""
    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    U = similarity_UU.shape[0]
    if U == 0:
        return np.zeros(0, dtype=np.int64), True
    if U == 1:
        return np.zeros(1, dtype=np.int64), True
    for damping, max_iter in schedule:
        model = AffinityPropagation(affinity="precomputed", preference=preference,
                                    damping=damping, max_iter=max_iter, convergence_iter=50,
                                    random_state=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            labels = model.fit_predict(similarity_UU)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        if converged:
            break
    labels = np.asarray(labels, dtype=np.int64)
    unassigned = labels < 0
    if unassigned.any():
        base = labels.max() + 1 if (~unassigned).any() else 0
        labels[unassigned] = base + np.arange(int(unassigned.sum()))
    _, labels = np.unique(labels, return_inverse=True)
    return labels, converged


def clusters_from_labels(labels_U: np.ndarray, features_U: Sequence[int]) -> list[list[int]]:
    """Feature ids per cluster, largest cluster first (ties by smallest feature id)."""
    features_U = np.asarray(features_U)
    groups = [sorted(int(f) for f in features_U[labels_U == c]) for c in np.unique(labels_U)]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


# --- coherence -----------------------------------------------------------------------------------
def jaccard_matrix(sets: Sequence[set[int]]) -> np.ndarray:
    """|a ∩ b| / |a ∪ b| for every pair of sets (0 when both are empty)."""
    from scipy import sparse

    vocab = sorted(set().union(*sets)) if sets else []
    column = {v: c for c, v in enumerate(vocab)}
    rows = [m for m, s in enumerate(sets) for _ in s]
    cols = [column[v] for s in sets for v in s]
    B = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(sets), len(vocab)))
    inter = (B @ B.T).toarray()
    size = np.asarray(B.sum(axis=1)).ravel()
    union = size[:, None] + size[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def mean_cluster_coherence(J_UU: np.ndarray, members: Sequence[np.ndarray]) -> tuple[float, int]:
    """Mean over clusters of ≥ 2 members of their mean pairwise J; and how many such clusters."""
    scores = []
    for m in members:
        if len(m) < 2:
            continue
        block = J_UU[np.ix_(m, m)]
        scores.append((block.sum() - np.trace(block)) / (len(m) * (len(m) - 1)))
    return (float(np.mean(scores)) if scores else float("nan")), len(scores)


def coherence(J_UU: np.ndarray, labels_U: np.ndarray, n_random: int = 200, seed: int = 0,
              ) -> dict[str, Any]:
    """The clusters' coherence, the same for ``n_random`` random clusterings with the same
    sizes, and the z-score of the real one against them."""
    members = [np.flatnonzero(labels_U == c) for c in np.unique(labels_U)]
    score, n_scored = mean_cluster_coherence(J_UU, members)
    sizes = [len(m) for m in members]
    rng = np.random.default_rng(seed)
    boundaries = np.cumsum(sizes)[:-1]
    random_scores = []
    if n_scored:
        for _ in range(n_random):
            permuted = np.split(rng.permutation(len(labels_U)), boundaries)
            random_scores.append(mean_cluster_coherence(J_UU, permuted)[0])
    mean = float(np.mean(random_scores)) if random_scores else float("nan")
    std = float(np.std(random_scores)) if random_scores else float("nan")
    z = (score - mean) / std if random_scores and std > 0 else float("nan")
    return {"score": score, "random_mean": mean, "random_std": std, "z": z,
            "n_clusters_scored": n_scored, "n_random": len(random_scores)}


def cluster_similarities(
    similarities: dict[str, np.ndarray],
    features_U: Sequence[int],
    token_sets: Sequence[set[int]],
    preference: str | float = "median",
    n_random: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Affinity propagation on every method's similarity matrix over ``features_U`` and the
    coherence of each clustering; the clusters.json dict (without provenance)."""
    if len(features_U) < 2:
        raise CrossintError(
            f"clustering needs at least 2 active features, got {len(features_U)}: use more "
            "held-out tokens (--tokens) or a lower --min-count"
        )
    J_UU = jaccard_matrix(token_sets)
    document: dict[str, Any] = {"n_features": len(features_U), "features": list(features_U),
                                "n_clusters": {}, "sizes": {}, "coherence": {}, "clusters": {},
                                "preference": {}, "converged": {}}
    for method, S_UU in similarities.items():
        if S_UU.shape != (len(features_U), len(features_U)):
            raise CrossintError(f"{method} similarity has shape {S_UU.shape}, expected "
                                f"{(len(features_U),) * 2}")
        value = resolve_preference(S_UU, preference)
        labels, converged = affinity_propagation(S_UU, value, seed=seed)
        clusters = clusters_from_labels(labels, features_U)
        document["n_clusters"][method] = len(clusters)
        document["sizes"][method] = [len(c) for c in clusters]
        document["clusters"][method] = clusters
        document["preference"][method] = value
        document["converged"][method] = converged
        document["coherence"][method] = coherence(J_UU, labels, n_random=n_random, seed=seed)
    return document


# --- a run ---------------------------------------------------------------------------------------
def decoder_matrix(crosscoder: Any) -> tuple[np.ndarray, np.ndarray]:
    """The decoder vectors of every feature, all hookpoints concatenated (H, X·D), and their
    norm per hookpoint (H, X), in folded (raw activation) units."""
    import torch

    with torch.no_grad():
        rows = [d.double().cpu() for d in crosscoder.decoders(list(crosscoder.config.hookpoints))]
    stacked_HXD = torch.stack(rows, dim=1)
    return stacked_HXD.flatten(1).numpy(), stacked_HXD.norm(dim=-1).numpy()


def cluster_run(
    run_dir: Any,
    request: Any = None,
    *,
    min_count: int = 5,
    max_features: int = 4000,
    top_k: int = 20,
    preference: str | float = "median",
    n_random: int = 200,
    n_contexts: int = 8,
    progress: bool = True,
    **text: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, np.ndarray]]:
    """Cluster a run's features three ways (SPEC §10) on held-out text: ``request`` (a
    ``crossint.analysis.heldout.HeldoutRequest``) or its fields as keywords (default 20,000
    tokens of the training cache's corpus, held out).

    Returns the clusters.json dict, one profile per feature active on the held-out tokens
    (features.json: top contexts, histogram, decoder norms, partners, cluster per method; {} for
    features not clustered), and the similarity matrices (for plots)."""
    from crossint.analysis.features import (
        FEATURE_TOKENS,
        feature_profiles,
        sample_features,
    )
    from crossint.analysis.heldout import request_from
    from crossint.analysis.interactions import prepare_analysis

    settings = {"min_count": min_count, "max_features": max_features, "top_k": top_k,
                "preference": preference, "n_random": n_random}
    for name, value in (("min count", min_count), ("max features", max_features),
                        ("top k", top_k), ("random clusterings", n_random)):
        if not isinstance(value, int) or value < 1:
            raise CrossintError(f"{name} must be a positive integer, got {value!r}")
    request = request_from(request, text, n_tokens=FEATURE_TOKENS)
    setup = prepare_analysis(run_dir, "cluster", request)
    sample = sample_features(setup, progress)
    decoder_HF, decoder_norm_HX = decoder_matrix(setup.crosscoder)
    counts_H = sample.active_counts_H()
    candidates, features = choose_features(sample.interaction_HH, counts_H, min_count,
                                           max_features)
    similarities = feature_similarities(sample, features, decoder_HF)
    document = cluster_similarities(similarities, features.tolist(),
                                    top_token_sets(sample, features, top_k),
                                    preference=preference, n_random=n_random)
    document.update(run_provenance(run_dir, sample, counts_H, candidates))
    document["settings"] = settings
    # every feature that fired gets a profile (its card), clustered or not
    profiles = feature_profiles(sample, np.flatnonzero(counts_H > 0).tolist(), decoder_norm_HX,
                                setup.hookpoints, n_contexts=n_contexts)
    mark_clusters(profiles, document["clusters"])
    return document, profiles, similarities


def choose_features(interaction_HH: Any, counts_H: np.ndarray, min_count: int,
                    max_features: int) -> tuple[np.ndarray, np.ndarray]:
    """The candidates (active on at least ``min_count`` tokens, with interaction mass) and the
    clustered features: the ``max_features`` most frequent candidates, in id order (affinity
    propagation is U×U)."""
    mass_H = (np.asarray(interaction_HH.sum(axis=1)).ravel()
              + np.asarray(interaction_HH.sum(axis=0)).ravel())
    candidates = np.flatnonzero((counts_H >= min_count) & (mass_H > 0))
    order = np.argsort(-counts_H[candidates], kind="stable")[:max_features]
    return candidates, np.sort(candidates[order])


def feature_similarities(sample: Any, features: np.ndarray, decoder_HF: np.ndarray,
                         ) -> dict[str, np.ndarray]:
    """The three U×U similarities over ``features`` (``METHODS``)."""
    gram = sample.gram_HH()[np.ix_(features, features)]
    return {
        "interaction": normalised_interaction(sample.interaction_HH, features),
        "decoder": cosine_rows(decoder_HF[features]),
        "activation": cosine_from_gram(gram),
    }


def top_token_sets(sample: Any, features: np.ndarray, top_k: int) -> list[set[int]]:
    """Per feature, the token ids of its ``top_k`` largest activations (for coherence)."""
    tops = sample.top_tokens(top_k)
    return [set(sample.ids_CS[tuple(sample.where_T2[tops[h]].T)].tolist()) for h in features]


def run_provenance(run_dir: Any, sample: Any, counts_H: np.ndarray, candidates: np.ndarray,
                   ) -> dict[str, Any]:
    """What clusters.json records about the run, the held-out text and the features."""
    from crossint.io import sha256_file

    return {
        "run": str(run_dir),
        "crosscoder_sha256": sha256_file(f"{run_dir}/model.safetensors"),
        "model": sample.model,
        "corpus": sample.request.corpus,
        "seed": sample.request.seed,
        "context_length": sample.request.context_length,
        "request": sample.request.record(),
        "n_tokens": sample.n_tokens,
        "blocks": sample.blocks,
        "n_features_total": int(counts_H.size),
        "n_active": int((counts_H > 0).sum()),
        "n_candidates": int(candidates.size),
    }


def mark_clusters(profiles: list[dict[str, Any]], clusters: dict[str, list[list[int]]]) -> None:
    """Set every profile's ``cluster``: {method: index of its cluster} ({} if not clustered)."""
    position: dict[int, dict[str, int]] = {}
    for method, groups in clusters.items():
        for c, members in enumerate(groups):
            for h in members:
                position.setdefault(h, {})[method] = c
    for profile in profiles:
        profile["cluster"] = position.get(profile["id"], {})


def write_cluster_outputs(document: dict[str, Any], profiles: list[dict[str, Any]],
                          similarities: dict[str, np.ndarray], out_dir: Any) -> dict[str, Any]:
    """clusters.json, features.json and two plots (coherence vs random; the interaction
    affinities ordered by cluster) into ``out_dir``."""
    from pathlib import Path

    from crossint.io import atomic_write_json, json_safe
    from crossint.report.plots import plot_cluster_coherence, plot_ordered_affinity

    out_dir = Path(out_dir)
    paths = {**rundir.CLUSTERS.paths(out_dir), "features": out_dir / rundir.FEATURES.name}
    plot_cluster_coherence(document["coherence"], paths["coherence"])
    largest = document["clusters"]["interaction"][:AFFINITY_CLUSTERS]
    index = {h: m for m, h in enumerate(document["features"])}
    order = [index[h] for members in largest for h in members]
    plot_ordered_affinity(similarities["interaction"][np.ix_(order, order)],
                          [len(members) for members in largest], paths["affinity"],
                          title=f"Interaction affinity, {len(largest)} largest clusters")
    atomic_write_json(paths["features"], json_safe({"features": profiles}))
    atomic_write_json(paths["json"], json_safe(document))  # last: complete outputs
    return paths
