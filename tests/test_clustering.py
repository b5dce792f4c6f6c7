"""Feature clustering (SPEC §10): the similarity and coherence math against naive float64
loops, affinity propagation on precomputed affinities, and `crossint cluster` on a trained
crosscoder of a tiny GPT-2 (outputs, top contexts, agreement with `crossint interactions`)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from crossint.analysis.clustering import (
    affinity_propagation,
    cluster_similarities,
    clusters_from_labels,
    coherence,
    cosine_from_gram,
    cosine_rows,
    jaccard_matrix,
    mean_cluster_coherence,
    normalised_interaction,
    resolve_preference,
)
from crossint.analysis.heldout import (
    HeldoutRequest,
    capture_tokens,
    heldout_batches,
    load_run,
)
from crossint.cli import main
from crossint.errors import CrossintError
from crossint.models.adapter import load_model

TEXT = ["--tokens", "600", "--context-length", "32", "--quiet"]


def one_line_error(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and err.startswith("crossint cluster: error: "), err
    for fragment in fragments:
        assert fragment in err, err


# --- the math ------------------------------------------------------------------------------------
def test_normalised_interaction_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    I = rng.exponential(size=(7, 7)) * (rng.random((7, 7)) < 0.5)
    I[3] = 0.0
    I[:, 3] = 0.0  # a feature without interaction mass
    got = normalised_interaction(I)
    subset = [6, 0, 3]
    assert np.allclose(normalised_interaction(I, subset), got[np.ix_(subset, subset)])
    from scipy import sparse

    assert np.allclose(normalised_interaction(sparse.csr_matrix(I)), got)
    A = [[(I[i, j] + I[j, i]) / 2 if i != j else 0.0 for j in range(7)] for i in range(7)]
    a = [sum(row) for row in A]
    for i, j in itertools.product(range(7), repeat=2):
        want = A[i][j] / math.sqrt(a[i] * a[j]) if a[i] > 0 and a[j] > 0 else 0.0
        assert got[i, j] == pytest.approx(want, abs=1e-12)
    assert np.allclose(got, got.T)


def test_cosines_match_naive_loops_and_zero_rows_are_orthogonal():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(6, 5))
    X[2] = 0.0
    by_rows, by_gram = cosine_rows(X), cosine_from_gram(X @ X.T)
    for i, j in itertools.product(range(6), repeat=2):
        ni, nj = math.sqrt(sum(v * v for v in X[i])), math.sqrt(sum(v * v for v in X[j]))
        want = sum(X[i] * X[j]) / (ni * nj) if ni and nj else 0.0
        assert by_rows[i, j] == pytest.approx(want, abs=1e-12)
        assert by_gram[i, j] == pytest.approx(want, abs=1e-12)


def test_jaccard_and_cluster_coherence_match_python_sets():
    sets = [{1, 2, 3}, {2, 3, 4}, set(), {9}, {1, 2, 3}]
    J = jaccard_matrix(sets)
    for i, j in itertools.product(range(5), repeat=2):
        union = sets[i] | sets[j]
        assert J[i, j] == pytest.approx(len(sets[i] & sets[j]) / len(union) if union else 0.0)
    members = [np.array([0, 1, 4]), np.array([2]), np.array([3])]
    score, n = mean_cluster_coherence(J, members)
    pairs = [(0, 1), (0, 4), (1, 4)]
    assert n == 1 and score == pytest.approx(sum(J[a, b] for a, b in pairs) / 3)


def test_coherence_z_is_large_for_planted_clusters_and_small_for_random_ones():
    rng = np.random.default_rng(2)
    topics = [set(range(10 * t, 10 * t + 10)) for t in range(6)]
    sets = [set(rng.choice(sorted(topics[m % 6]), 6, replace=False).tolist()) for m in range(60)]
    J = jaccard_matrix(sets)
    planted = np.arange(60) % 6
    good = coherence(J, planted, n_random=100)
    assert good["n_clusters_scored"] == 6 and good["z"] > 10
    assert good["random_mean"] < good["score"]
    shuffled = coherence(J, rng.permutation(planted), n_random=100)
    assert abs(shuffled["z"]) < 4


def test_affinity_propagation_takes_precomputed_affinities():
    # Block-diagonal affinities: the rows of two blocks are far apart as Euclidean vectors only
    # because of which columns they fill, so clustering them is the precomputed reading.
    S = np.full((9, 9), -1.0)
    for block in (range(0, 4), range(4, 9)):
        for i, j in itertools.product(block, repeat=2):
            S[i, j] = 0.9
    labels, converged = affinity_propagation(S, preference=resolve_preference(S, "median"))
    assert converged
    assert len(set(labels[:4])) == 1 and len(set(labels[4:])) == 1 and labels[0] != labels[4]
    assert clusters_from_labels(labels, [10, 11, 12, 13, 20, 21, 22, 23, 24]) == [
        [20, 21, 22, 23, 24], [10, 11, 12, 13]]


def test_affinity_propagation_retries_with_more_damping_and_reports_non_convergence():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(30, 3))
    S = -((X[:, None] - X[None]) ** 2).sum(-1)
    labels, converged = affinity_propagation(S, float(np.median(S)), schedule=((0.5, 3),))
    assert not converged and labels.shape == (30,) and labels.min() == 0
    labels, converged = affinity_propagation(S, float(np.median(S)),
                                             schedule=((0.5, 3), (0.9, 1000)))
    assert converged and 1 < labels.max() + 1 < 30


def test_preference_options():
    S = np.array([[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]])
    assert resolve_preference(S, "median") == 2.0
    assert resolve_preference(S, "min") == 1.0
    assert resolve_preference(S, -0.5) == -0.5
    with pytest.raises(CrossintError, match="preference"):
        resolve_preference(S, "mean")
    with pytest.raises(CrossintError, match="at least 2"):
        cluster_similarities({"interaction": np.zeros((1, 1))}, [0], [set()])


# --- a real run ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clustered(trained_paper_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("clusters")
    code = main(["cluster", str(trained_paper_run), "--out", str(out), "--min-count", "2",
                 "--random", "50", *TEXT])
    assert code == 0
    return out


def test_cluster_writes_every_output_and_partitions_the_features(clustered, capsys):
    document = json.loads((clustered / "clusters.json").read_text())
    for key in ("n_clusters", "sizes", "coherence", "clusters"):
        assert set(document[key]) == {"interaction", "decoder", "activation"}, key
    features = sorted(document["features"])
    assert len(features) == document["n_features"] >= 2
    for method, clusters in document["clusters"].items():
        assert sorted(h for c in clusters for h in c) == features, method
        assert document["sizes"][method] == [len(c) for c in clusters]
        assert document["n_clusters"][method] == len(clusters)
        c = document["coherence"][method]
        assert {"score", "random_mean", "random_std", "z"} <= set(c)
        assert 0.0 <= c["random_mean"] <= 1.0
    assert (clustered / "coherence.png").stat().st_size > 5000
    assert (clustered / "affinity.png").stat().st_size > 5000


def test_top_contexts_are_the_largest_activations_on_the_heldout_tokens(clustered,
                                                                        trained_paper_run):
    profiles = json.loads((clustered / "features.json").read_text())["features"]
    crosscoder, model_name = load_run(trained_paper_run)
    adapter = load_model(model_name)
    special = adapter.special_token_ids()
    # the CLI's default: the training cache's corpus, its held-out part
    request = HeldoutRequest(n_tokens=600, context_length=32).resolve(trained_paper_run)
    batches = heldout_batches(adapter, request)
    f = torch.cat([crosscoder.encode(capture_tokens(adapter, ids, list(
        crosscoder.config.hookpoints), special).acts_TXD) for ids in batches]).detach().double()
    for profile in profiles:
        h = profile["id"]
        column = f[:, h]
        want = column.sort(descending=True).values[:len(profile["contexts"])]
        got = torch.tensor([c["activation"] for c in profile["contexts"]], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), h
        assert profile["frequency"] == pytest.approx(float((column > 0).double().mean()))
        assert sum(profile["histogram"]["counts"]) == int((column > 0).sum())
        assert len(profile["decoder_norm"]) == len(crosscoder.config.hookpoints)
        for context in profile["contexts"]:
            assert 0 <= context["mark"] < len(context["tokens"])
    # every feature that fired has a card, clustered or not
    assert {p["id"] for p in profiles} == set(torch.nonzero(f.amax(dim=0) > 0)[:, 0].tolist())


def test_interaction_matrix_agrees_with_crossint_interactions(clustered, trained_paper_run,
                                                              tmp_path):
    from crossint.analysis.features import collect_features

    sample = collect_features(trained_paper_run, n_tokens=600, context_length=32,
                              progress=False)
    out = tmp_path / "inter"
    assert main(["interactions", str(trained_paper_run), "--out", str(out), "--top-pairs", "3",
                 "--delta2-pairs", "0", *TEXT]) == 0
    result = json.loads((out / "interactions.json").read_text())
    assert sample.n_tokens == result["n_tokens"]
    total = sample.interaction_HH.sum() - sample.interaction_HH.diagonal().sum()
    assert total == pytest.approx(result["pairwise_interaction"], rel=1e-9)


def test_bad_input_gives_one_line_errors(trained_paper_run, tmp_path, capsys, monkeypatch,
                                         tiny_model_dir, tiny_text_file):
    from crossint.data.harvest import harvest

    monkeypatch.delenv("CROSSINT_JUDGE_URL", raising=False)
    out = str(tmp_path / "out")
    one_line_error(capsys, main(["cluster", str(trained_paper_run), "--judge", "--out", out,
                                 *TEXT]), "CROSSINT_JUDGE_URL")
    one_line_error(capsys, main(["cluster", str(tmp_path / "missing"), "--out", out, *TEXT]),
                   "not found")
    one_line_error(capsys, main(["cluster", str(trained_paper_run), "--min-count", "0",
                                 "--out", out, *TEXT]), "positive integer")
    cache = harvest(str(tiny_model_dir), tmp_path / "resid", "resid", n_tokens=600,
                    corpus=str(tiny_text_file), context_length=32, progress=False).path
    run = tmp_path / "resid_run"
    assert main(["train", "--activations", str(cache), "--out", str(run), "--features", "16",
                 "--k", "2", "--steps", "5", "--batch-size", "64", "--quiet"]) == 0
    one_line_error(capsys, main(["cluster", str(run), "--out", out, *TEXT]), "mlp_in")
    assert not (tmp_path / "out").exists()


def test_max_features_keeps_the_most_frequent(clustered, trained_paper_run, tmp_path):
    out = tmp_path / "few"
    assert main(["cluster", str(trained_paper_run), "--out", str(out), "--min-count", "2",
                 "--max-features", "5", "--random", "10", *TEXT]) == 0
    few = json.loads((out / "clusters.json").read_text())
    every = json.loads((clustered / "clusters.json").read_text())
    frequency = {p["id"]: p["frequency"]
                 for p in json.loads((clustered / "features.json").read_text())["features"]
                 if p["id"] in every["features"]}
    assert few["n_features"] == 5 and few["n_candidates"] == every["n_features"]
    threshold = sorted(frequency.values(), reverse=True)[4]
    assert all(frequency[h] >= threshold for h in few["features"])
