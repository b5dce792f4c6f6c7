"""The Local Interaction Basis (SPEC §11): the math against naive float64 loops on a tiny GPT-2,
the yardstick (bisection, distributions, crosscoder edges), `crossint lib` and `crossint lib
--compare` end to end, and bad input failing with one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_one_line_error
from crossint.analysis.heldout import HeldoutRequest, heldout_batches
from crossint.analysis.lib import (
    BatchPass,
    block_function,
    frozen,
    head_function,
    next_layer_function,
    node_layers,
    run_batch,
)
from crossint.cli import main
from crossint.errors import CrossintError
from crossint.interactions.contributions import contributions, neuron_stats
from crossint.interactions.edges import (
    EdgeBisection,
    EdgeSet,
    EdgeSums,
    bipartite_modularity,
    bisect_edges,
    cumulative_weight,
    dense_edges,
    distribution_stats,
    edge_graph,
    feature_edge_mass,
    gini,
    kept_pre_activations,
    layered_modules,
    louvain_modules,
    top_edge_mask,
    top_fraction,
)
from crossint.interactions.lib import (
    LayerBasis,
    MomentAccumulator,
    check_full_rank,
    edge_sums,
    gradient_gram,
    integration_points,
    lib_basis,
    masked_block_output,
    pca_basis,
)
from crossint.interactions.pairwise import interaction_mass
from crossint.models.adapter import load_model


# --- a tiny float64 model and one batch of it ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny64(tiny_model_dir):
    adapter = load_model(str(tiny_model_dir), dtype=torch.float64)
    with frozen(adapter.model):
        yield adapter


@pytest.fixture(scope="module")
def batch(tiny64, tiny_text_file) -> BatchPass:
    request = HeldoutRequest(n_texts=2, corpus=str(tiny_text_file), context_length=6)
    (ids_BS,) = heldout_batches(tiny64, request)
    names = node_layers(tiny64.n_blocks)
    with torch.no_grad():
        return run_batch(tiny64, ids_BS, names, range(tiny64.n_blocks),
                         tiny64.special_token_ids())


def random_basis(name: str, dim: int, rank: int, seed: int) -> LayerBasis:
    """A LIB-like (non-orthogonal) basis from random moments."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    B = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    basis = lib_basis(name, torch.randn(dim, generator=g, dtype=torch.float64), A @ A.T / dim,
                      B[:, :rank] @ B[:, :rank].T)
    assert basis.dim == rank
    return basis


def jacobian(fn, x_BSD):
    """J[b, t, i, b', s, d] of fn at x (float64, autograd.functional)."""
    return torch.autograd.functional.jacobian(fn, x_BSD)


# --- moments, PCA and the LIB basis ------------------------------------------------------------
def test_moments_match_numpy_in_any_chunking():
    x_TD = torch.randn(500, 6, dtype=torch.float64) * torch.arange(1, 7) + 3.0
    moments = MomentAccumulator(6)
    for chunk in x_TD.split(77):
        moments.update(chunk)
    assert moments.n_tokens == 500
    torch.testing.assert_close(moments.mean(), x_TD.mean(0))
    centred = x_TD - x_TD.mean(0)
    torch.testing.assert_close(moments.covariance(), centred.T @ centred / 500)


def test_pca_truncates_directions_without_variance_and_reconstructs_the_rest():
    x_TD = torch.randn(300, 3, dtype=torch.float64) @ torch.randn(3, 5, dtype=torch.float64)
    moments = MomentAccumulator(5)
    moments.update(x_TD)
    basis = pca_basis("x", moments.mean(), moments.covariance())
    assert basis.dim == 3
    torch.testing.assert_close(basis.project(x_TD), x_TD)
    assert torch.all(basis.eig_J[:-1] >= basis.eig_J[1:])


def test_too_few_tokens_for_a_full_rank_covariance_say_how_many():
    check_full_rank(33, 32, "blocks.0.resid_pre")
    with pytest.raises(CrossintError, match="at least 33"):
        check_full_rank(32, 32, "blocks.0.resid_pre")


def test_lib_coordinates_have_covariance_lambda_and_unit_gradient_gram():
    """In LIB coordinates f = (x − μ)·C the activations have covariance diag(Λ) and the
    gradient Gram (M' carried into f) is the identity: the defining properties of SPEC §11."""
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64)
    grads_QD = torch.randn(50, 6, generator=g, dtype=torch.float64)
    moments = MomentAccumulator(6)
    moments.update(x_TD)
    M_DD = grads_QD.T @ grads_QD
    basis = lib_basis("x", moments.mean(), moments.covariance(), M_DD)
    f_TR = basis.encode(x_TD)
    torch.testing.assert_close(f_TR.T @ (f_TR - f_TR.mean(0)) / 400, torch.diag(basis.eig_J))
    # ∂/∂f = C_pinv·∂/∂x, so the gradient Gram in f is C_pinv M' C_pinvᵀ.
    torch.testing.assert_close(basis.C_pinv_JD @ M_DD @ basis.C_pinv_JD.T, torch.eye(6,
                               dtype=torch.float64))
    torch.testing.assert_close(basis.C_pinv_JD @ basis.C_DJ, torch.eye(6, dtype=torch.float64))


# --- block functions ----------------------------------------------------------------------------
def test_replayed_blocks_and_head_reproduce_the_model(tiny64, batch):
    names = node_layers(tiny64.n_blocks)
    with torch.no_grad():
        for l in range(tiny64.n_blocks):
            torch.testing.assert_close(block_function(tiny64, batch, l)(batch.acts[names[l]]),
                                       batch.acts[names[l + 1]])
        torch.testing.assert_close(head_function(tiny64, batch)(batch.acts[names[-1]]),
                                   tiny64.logits(batch.ids_BS))


# --- the gradient Gram against naive loops ------------------------------------------------------
def naive_gradient_gram(fn, x_BSD, keep_BS, centre_D, steps):
    B, S, D = x_BSD.shape
    integrated = 0
    for alpha, weight in integration_points(steps):
        x_alpha = torch.where(keep_BS[..., None], centre_D + alpha * (x_BSD - centre_D), x_BSD)
        integrated = integrated + weight * jacobian(fn, x_alpha)
    E = integrated.shape[2]
    M = torch.zeros(D, D, dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            for i in range(E):
                for s in range(S):
                    if keep_BS[b, t] and keep_BS[b, s]:
                        g = integrated[b, t, i, b, s]
                        M += torch.outer(g, g)
    return M


@pytest.mark.parametrize("steps", [0, 2])
def test_gradient_gram_exact_equals_naive_loops(tiny64, batch, steps):
    names = node_layers(tiny64.n_blocks)
    basis_out = random_basis(names[1], tiny64.d_model, 5, seed=1)
    fn = next_layer_function(tiny64, batch, 0, basis_out)
    x = batch.acts[names[0]]
    centre = x[batch.keep_BS].mean(0)
    got = gradient_gram(fn, x, batch.keep_BS, centre, steps=steps, sources=None)
    want = naive_gradient_gram(fn, x, batch.keep_BS, centre, steps)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_gradient_gram_of_the_head_and_its_stochastic_estimate(tiny64, batch):
    names = node_layers(tiny64.n_blocks)
    fn = next_layer_function(tiny64, batch, tiny64.n_blocks, None)  # the logits
    x, keep = batch.acts[names[-1]], batch.keep_BS
    exact = gradient_gram(fn, x, keep, x[keep].mean(0), sources=None)
    torch.testing.assert_close(exact, naive_gradient_gram(fn, x, keep, x[keep].mean(0), 0),
                               rtol=1e-9, atol=1e-9)
    generator = torch.Generator().manual_seed(0)
    estimate = gradient_gram(fn, x, keep, x[keep].mean(0), sources=400, generator=generator)
    error = float((estimate - exact).norm() / exact.norm())
    assert error < 0.15, error


def test_non_finite_gradients_are_one_line():
    x = torch.ones(1, 3, 2, dtype=torch.float64)
    keep = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(CrossintError, match="non-finite gradients"):
        gradient_gram(lambda v: v * float("inf"), x, keep, torch.zeros(2, dtype=torch.float64),
                      sources=2)


# --- edges against naive loops -------------------------------------------------------------------
def naive_edge_sums(fn, x_BSD, keep_BS, basis_in, steps):
    B, S, _ = x_BSD.shape
    x_BSD = torch.where(keep_BS[..., None], basis_in.project(x_BSD), x_BSD)
    f_BSJ = basis_in.encode(x_BSD)
    integrated = 0
    for alpha, weight in integration_points(steps):
        x_alpha = torch.where(keep_BS[..., None],
                              basis_in.mean_D + alpha * (x_BSD - basis_in.mean_D), x_BSD)
        integrated = integrated + weight * jacobian(fn, x_alpha)
    E, J = integrated.shape[2], basis_in.dim
    sums = torch.zeros(E, J, dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            if not keep_BS[b, t]:
                continue
            for i in range(E):
                for j in range(J):
                    a = sum(f_BSJ[b, s, j] * (integrated[b, t, i, b, s] @ basis_in.C_pinv_JD[j])
                            for s in range(S) if keep_BS[b, s])
                    sums[i, j] += a * a
    return sums


@pytest.mark.parametrize("steps", [0, 3])
def test_edges_equal_naive_loops(tiny64, batch, steps):
    names = node_layers(tiny64.n_blocks)
    basis_in = random_basis(names[0], tiny64.d_model, 4, seed=2)
    basis_out = random_basis(names[1], tiny64.d_model, 3, seed=3)
    fn = next_layer_function(tiny64, batch, 0, basis_out)
    got = edge_sums(fn, batch.acts[names[0]], batch.keep_BS, basis_in, steps=steps)
    want = naive_edge_sums(fn, batch.acts[names[0]], batch.keep_BS, basis_in, steps)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


def test_masked_block_output_equals_one_run_per_output(tiny64, batch):
    names = node_layers(tiny64.n_blocks)
    basis_in = random_basis(names[0], tiny64.d_model, 4, seed=4)
    basis_out = random_basis(names[1], tiny64.d_model, 3, seed=5)
    block = block_function(tiny64, batch, 0)
    x, keep = batch.acts[names[0]], batch.keep_BS
    mask = torch.tensor([[1, 0, 1, 0], [1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        got = masked_block_output(block, x, keep, basis_in, basis_out, mask)
        f_out = torch.zeros(*x.shape[:2], 3, dtype=torch.float64)
        for i in range(3):
            x_i = torch.where(keep[..., None], basis_in.decode(basis_in.encode(x) * mask[i]), x)
            f_out[..., i] = basis_out.encode(block(x_i))[..., i]
        want = torch.where(keep[..., None], basis_out.decode(f_out), block(x))
        torch.testing.assert_close(got, want)
        every = masked_block_output(block, x, keep, basis_in, basis_out,
                                    torch.ones(3, 4, dtype=torch.bool))
        projected = torch.where(keep[..., None], basis_in.project(x), x)
        torch.testing.assert_close(every, torch.where(
            keep[..., None], basis_out.project(block(projected)), block(x)))


# --- the yardstick -------------------------------------------------------------------------------
def test_bisection_finds_the_fewest_edges_and_shares_evaluations():
    calls = []

    def loss_of(k: int) -> float:
        calls.append(k)
        return 1.0 + 10.0 / (1 + k)  # falls as edges are kept

    n = 1000
    found, curve = bisect_edges(loss_of, n, [1.0 + 10 / 101 + 1e-12, 1.0 + 10 / 11 + 1e-12])
    assert [f.edges for f in found] == [100, 10]
    assert all(f.lo == f.edges - 1 for f in found)
    assert len(calls) == len(set(calls)) == len(curve)
    assert len(calls) < 2 * (math.log2(n) + 2)
    rough, _ = bisect_edges(loss_of, n, [1.0 + 10 / 101 + 1e-12], precision=0.1)
    assert rough[0].edges >= 100 and rough[0].edges - rough[0].lo <= max(1, 0.1 * rough[0].edges)
    zero, _ = bisect_edges(loss_of, n, [20.0])
    assert zero[0].edges == 0
    with pytest.raises(CrossintError, match="exceeds the target"):
        EdgeBisection(loss_of, n).search(0.5)


def test_top_edges_gini_and_top_fraction():
    w = torch.tensor([[3.0, 1.0], [3.0, 0.0]])
    assert top_edge_mask(w, 1).tolist() == [[True, False], [False, False]]  # ties: earlier index
    assert top_edge_mask(w, 3).sum() == 3
    assert gini(torch.ones(10)) == pytest.approx(0.0)
    assert gini(torch.tensor([0.0] * 99 + [1.0])) == pytest.approx(0.99)
    assert top_fraction(torch.tensor([0.0] * 99 + [1.0])) == pytest.approx(1.0)
    assert top_fraction(torch.ones(200)) == pytest.approx(0.01)
    counts, fractions = cumulative_weight(torch.tensor([4.0, 3.0, 2.0, 1.0]), n_points=4)
    assert counts[0] == 1 and counts[-1] == 4 and fractions[0] == pytest.approx(0.4)
    stats = distribution_stats(torch.tensor([1.0, 1.0, 0.0]), n_possible=10)
    assert stats["n_nonzero"] == 2 and stats["gini_nonzero"] == pytest.approx(0.0)
    assert stats["gini"] == pytest.approx(0.8)


def naive_modularity(weights: dict[tuple[int, int], float], module: list[int]) -> float:
    """Newman's Q = Σ_uv [A_uv − k_u k_v / 2m] δ(c_u, c_v) / 2m by loops, in float64."""
    n = len(module)
    A = [[0.0] * n for _ in range(n)]
    for (u, v), w in weights.items():
        A[u][v] += w
        A[v][u] += w
    k = [sum(row) for row in A]
    two_m = sum(k)
    return sum(A[u][v] - k[u] * k[v] / two_m for u in range(n) for v in range(n)
               if module[u] == module[v]) / two_m


def test_louvain_modularity_equals_the_definition_and_finds_planted_modules():
    g = torch.Generator().manual_seed(0)
    E_IJ = torch.rand(6, 5, generator=g, dtype=torch.float64) ** 4
    E_IJ[E_IJ < 0.05] = 0
    i_Q, j_Q, w_Q = dense_edges(E_IJ)
    q, module_N = louvain_modules(edge_graph(i_Q + 5, j_Q, w_Q, 11))
    weights = {(int(i) + 5, int(j)): float(w) for i, j, w in zip(i_Q, j_Q, w_Q, strict=True)}
    assert q == pytest.approx(naive_modularity(weights, module_N), abs=1e-12)
    assert bipartite_modularity(i_Q, j_Q, w_Q, 6, 5)["modularity"] == pytest.approx(q)
    planted = torch.zeros(4, 4, dtype=torch.float64)
    planted[:2, :2], planted[2:, 2:] = 1.0, 1.0
    found = bipartite_modularity(*dense_edges(planted), 4, 4)
    assert found["modularity"] == pytest.approx(0.5) and found["n_modules"] == 2
    q2, modules = layered_modules([planted, planted])
    assert q2 == pytest.approx(0.5)
    assert modules[0] == modules[1] == modules[2] and modules[0][0] != modules[0][3]
    assert math.isnan(bipartite_modularity(*dense_edges(torch.zeros(2, 2)), 2, 2)["modularity"])


def test_a_zero_covariance_is_one_line():
    with pytest.raises(CrossintError, match="covariance is zero"):
        pca_basis("blocks.0.resid_pre", torch.zeros(3), torch.zeros(3, 3))
    with pytest.raises(CrossintError, match="covariance is zero"):
        lib_basis("blocks.0.resid_pre", torch.zeros(3), torch.zeros(3, 3), torch.eye(3))


def random_contributions(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f_BH = torch.relu(torch.randn(5, 9, generator=g, dtype=torch.float64) - 0.3)
    d_HD = torch.randn(9, 4, generator=g, dtype=torch.float64)
    W_in_DN = torch.randn(4, 7, generator=g, dtype=torch.float64)
    contrib = contributions(f_BH, d_HD, W_in_DN)
    return f_BH, contrib, neuron_stats(contrib), torch.rand(7, generator=g, dtype=torch.float64)


def test_crosscoder_edges_equal_naive_loops_and_section_4_5_off_the_diagonal():
    f_BH, contrib, stats, w_N = random_contributions()
    sums = EdgeSums(9)
    sums.add(*feature_edge_mass(contrib, stats, w_N))
    i_Q, j_Q, mass_Q = sums.edges()
    got = torch.zeros(9, 9, dtype=torch.float64)
    got[i_Q, j_Q] = mass_Q
    want = torch.zeros(9, 9, dtype=torch.float64)
    p_BKN, features_BK = contrib.p_BKN, contrib.features_BK
    for b in range(f_BH.shape[0]):
        for n in range(7):
            abs_K = p_BKN[b, :, n].abs()
            if abs_K.max() == 0:
                continue
            i = int(features_BK[b, int(abs_K.argmax())])
            for k in range(features_BK.shape[1]):
                if features_BK[b, k] >= 0:
                    want[i, int(features_BK[b, k])] += w_N[n] * abs_K[k]
    torch.testing.assert_close(got, want)
    off = EdgeSums(9)
    off.add(*interaction_mass(contrib, stats, w_N))
    oi, oj, om = off.edges()
    off_dense = torch.zeros(9, 9, dtype=torch.float64)
    off_dense[oi, oj] = om
    torch.testing.assert_close(off_dense, want * (1 - torch.eye(9, dtype=torch.float64)))


def test_kept_edges_interpolate_from_bias_only_to_the_full_reconstruction():
    _, contrib, stats, _ = random_contributions(1)
    features = torch.arange(9)
    everything = EdgeSet(features.repeat_interleave(9), features.repeat(9), 9)
    nothing = EdgeSet(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 9)
    diagonal = EdgeSet(features, features, 9)
    torch.testing.assert_close(kept_pre_activations(contrib, stats, everything), contrib.z_BN)
    torch.testing.assert_close(kept_pre_activations(contrib, stats, None), contrib.z_BN)
    assert kept_pre_activations(contrib, stats, nothing).abs().max() == 0
    dominant = contrib.p_BKN.gather(1, stats.slot_BN[:, None]).squeeze(1)
    torch.testing.assert_close(kept_pre_activations(contrib, stats, diagonal), dominant)
    sparse = EdgeSet.__new__(EdgeSet)  # the sorted-keys path gives the same answer
    sparse.n_features, sparse.table = 9, None
    sparse.keys = torch.sort(features * 9 + features).values
    torch.testing.assert_close(kept_pre_activations(contrib, stats, sparse), dominant)


# --- the command ---------------------------------------------------------------------------------
LIB_ARGS = ["--tokens", "120", "--context-length", "16", "--edge-tokens", "40", "--sources",
            "4", "--quiet"]


@pytest.fixture(scope="module")
def lib_dir(tiny_model_dir, tiny_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lib") / "lib"
    code = main(["lib", "--model", str(tiny_model_dir), "--corpus", str(tiny_text_file),
                 "--out", str(out), *LIB_ARGS])
    assert code == 0
    return out


def test_lib_writes_the_basis_the_graph_and_the_edges(lib_dir):
    document = json.loads((lib_dir / "lib.json").read_text())
    assert document["node_layers"] == ["blocks.0.resid_pre", "blocks.1.resid_pre",
                                       "blocks.1.resid_post"]
    assert document["n_tokens"] >= 120 and 40 <= document["n_edge_tokens"] < 120
    for kind in ("pca", "lib"):
        assert len(document["edges"][kind]) == 2
        for block in document["edges"][kind]:
            assert 0 <= block["gini"] <= 1 and block["top_edges"][0][2] > 0
            assert -0.5 <= block["modularity"] <= 1 and block["n_modules"] >= 1
        graph = document["graph"][kind]
        assert [len(m) for m in graph["modules"]] == [layer[f"{kind}_dim"]
                                                       for layer in document["layers"]]
    for name in ("lib_basis.safetensors", "lib_graph.png", "pca_graph.png", "edge_weights.png"):
        assert (lib_dir / name).stat().st_size > 0


def test_compare_measures_three_representations(lib_dir, trained_paper_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["lib", "--compare", str(lib_dir), str(trained_paper_run), "--out", str(out),
                 "--tokens", "60", "--tolerances", "0.05,0.5", "--quiet"])
    assert code == 0, capsys.readouterr().err
    document = json.loads((out / "lib_compare.json").read_text())
    assert set(document["representations"]) == {"pca", "lib", "crosscoder"}
    for rep, entry in document["representations"].items():
        assert len(entry["blocks"]) == 2, rep
        for row in entry["blocks"]:
            assert len(row["sparsity"]) == 2
            loose, tight = row["sparsity"][1], row["sparsity"][0]
            if loose["edges"] is not None and tight["edges"] is not None:
                assert loose["edges"] <= tight["edges"] <= row["n_edges"]
            assert row["modularity"] is None or -0.5 <= row["modularity"] <= 1
            curve = dict((int(k), v) for k, v in row["curve"])
            assert curve[0] == pytest.approx(row["loss_none"])
    assert (out / "edge_weights.png").is_file() and (out / "edge_sparsity.png").is_file()
    assert "crosscoder" in capsys.readouterr().out
    from crossint.report.html import build_report

    page = build_report(trained_paper_run, include=[out])
    assert 'id="lib"' in page and "edges @ 0.05" in page


def test_too_few_tokens_is_one_line(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    code = main(["lib", "--model", str(tiny_model_dir), "--corpus", str(tiny_text_file),
                 "--tokens", "10", "--context-length", "8", "--out", str(tmp_path / "x"),
                 "--quiet"])
    assert_one_line_error(capsys, code, "lib", "at least 33", "--tokens")


def test_a_crosscoder_of_another_width_is_one_line(tiny_text_file, trained_paper_run, tmp_path,
                                                   capsys):
    from tests.conftest import build_tiny_gpt2

    narrow = build_tiny_gpt2(tmp_path / "narrow", d_model=16)
    capsys.readouterr()  # the save's progress bar
    code = main(["lib", "--model", str(narrow), "--corpus", str(tiny_text_file), "--tokens",
                 "60", "--context-length", "16", "--edge-tokens", "20", "--sources", "2",
                 "--out", str(tmp_path / "lib16"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    code = main(["lib", "--compare", str(tmp_path / "lib16"), str(trained_paper_run), "--out",
                 str(tmp_path / "cmp"), "--quiet"])
    assert_one_line_error(capsys, code, "lib", "width 32", "width 16")


def test_a_lib_of_another_model_of_the_same_width_is_one_line(tiny_text_file, trained_paper_run,
                                                              tmp_path, capsys):
    from tests.conftest import build_tiny_gpt2

    other = build_tiny_gpt2(tmp_path / "other", seed=1)
    capsys.readouterr()
    code = main(["lib", "--model", str(other), "--corpus", str(tiny_text_file), "--tokens",
                 "60", "--context-length", "16", "--edge-tokens", "20", "--sources", "2",
                 "--out", str(tmp_path / "lib_other"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    code = main(["lib", "--compare", str(tmp_path / "lib_other"), str(trained_paper_run),
                 "--out", str(tmp_path / "cmp"), "--quiet"])
    assert_one_line_error(capsys, code, "lib", "was trained on model", "one model")


def test_too_many_integration_steps_for_the_memory_is_one_line(tiny_model_dir, tiny_text_file,
                                                               tmp_path, capsys):
    code = main(["lib", "--model", str(tiny_model_dir), "--corpus", str(tiny_text_file),
                 "--integration-steps", str(10 ** 12), "--out", str(tmp_path / "x"), "--quiet"])
    assert_one_line_error(capsys, code, "lib", "integration steps", "--integration-steps")


@pytest.mark.parametrize("argv, fragment", [
    (["--tolerances", "0.1,x"], "--tolerances"),
    (["--tolerances", "-1"], "--tolerances"),
    (["--precision", "1.5"], "--precision"),
])
def test_bad_compare_options_are_one_line(lib_dir, trained_paper_run, tmp_path, capsys, argv,
                                          fragment):
    code = main(["lib", "--compare", str(lib_dir), str(trained_paper_run), "--out",
                 str(tmp_path / "c"), "--quiet", *argv])
    assert_one_line_error(capsys, code, "lib", fragment)


def test_compare_without_a_lib_is_one_line(trained_paper_run, tmp_path, capsys):
    code = main(["lib", "--compare", str(tmp_path), str(trained_paper_run), "--out",
                 str(tmp_path / "c"), "--quiet"])
    assert_one_line_error(capsys, code, "lib", "lib.json")
