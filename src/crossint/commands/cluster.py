"""`crossint cluster RUN --out DIR`: cluster a crosscoder's features by their MLP interactions
and by two baselines, with an offline coherence score (SPEC §10)."""

from __future__ import annotations

import argparse

from crossint.commands import common
from crossint.rundir import CLUSTERS, JUDGE


def parse_preference(text: str) -> str | float:
    """'median', 'min' or a number."""
    if text in ("median", "min"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'median', 'min' or a number, got {text!r}") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cluster",
        help="cluster features by interaction vs decoder / activation baselines (SPEC §10)",
        description=(
            "Run the crosscoder's subject model on held-out text, measure the pairwise MLP "
            "interaction matrix I (SPEC §4.5) and every feature's activations, and cluster the "
            "active features by affinity propagation on three precomputed similarities: the "
            "symmetrised, normalised interaction matrix, the cosine of decoder vectors, and the "
            "cosine of activation patterns. Each clustering's coherence is the mean pairwise "
            "Jaccard overlap of its features' top-activating token sets, against random "
            "clusters of the same sizes (z-score). Writes OUT/clusters.json (n_clusters, "
            "sizes, coherence, clusters per method), OUT/features.json (top contexts, "
            "activation histogram, decoder norms and interaction partners per feature), "
            "OUT/coherence.png and OUT/affinity.png. With --judge, a language model behind an "
            "OpenAI-compatible endpoint (CROSSINT_JUDGE_URL, CROSSINT_JUDGE_KEY, "
            "CROSSINT_JUDGE_MODEL) picks a held-out feature's description among 5 (OUT/judge.json)."
        ),
        epilog="example: crossint cluster runs/pen --out runs/pen/clusters",
    )
    common.add_run_arguments(parser, CLUSTERS)
    group = parser.add_argument_group("held-out text")
    common.add_heldout_text_arguments(group, tokens=20_000)
    group = parser.add_argument_group("clustering")
    group.add_argument("--min-count", type=int, default=5,
                       help="cluster features active on at least this many held-out tokens "
                            "(default %(default)s)")
    group.add_argument("--max-features", type=int, default=4000,
                       help="cluster at most this many features, the most frequent (affinity "
                            "propagation costs O(M²) memory and time; default %(default)s)")
    group.add_argument("--top-k", type=int, default=20,
                       help="top-activating tokens per feature for the coherence score "
                            "(default %(default)s)")
    group.add_argument("--preference", type=parse_preference, default="median",
                       help="affinity-propagation preference: median (default) or min of the "
                            "similarities, or a number; lower gives fewer clusters")
    group.add_argument("--random", type=int, default=200, dest="n_random",
                       help="random clusterings for the coherence baseline (default %(default)s)")
    group.add_argument("--contexts", type=int, default=8,
                       help="top contexts stored per feature (default %(default)s)")
    group = parser.add_argument_group("language-model judge (optional)")
    group.add_argument("--judge", action="store_true",
                       help="also run the judge protocol against CROSSINT_JUDGE_URL")
    group.add_argument("--judge-clusters", type=int, default=20,
                       help="clusters judged per method (default %(default)s)")
    common.add_analysis_run_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with common.locked_output(common.output_dir(args, CLUSTERS), "cluster"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from crossint.analysis.clustering import cluster_run, write_cluster_outputs
    from crossint.io import atomic_write_json

    request = common.heldout_request(args)  # bad text flags fail before anything is loaded
    endpoint = None
    if args.judge:  # fail before the long pass when the endpoint is not configured
        from crossint.analysis.judge import JudgeEndpoint

        endpoint = JudgeEndpoint.from_env()
    document, profiles, similarities = cluster_run(
        args.run_dir, request,
        min_count=args.min_count, max_features=args.max_features, top_k=args.top_k,
        preference=args.preference, n_random=args.n_random, n_contexts=args.contexts,
        progress=not args.quiet,
    )
    out_dir = common.output_dir(args, CLUSTERS)
    paths = write_cluster_outputs(document, profiles, similarities, out_dir)
    print(f"{document['n_features']} features clustered on {document['n_tokens']} held-out "
          f"tokens -> {out_dir}")
    print(f"{'method':<13}{'clusters':>9}{'coherence':>11}{'random':>9}{'z':>7}")
    for method, c in document["coherence"].items():
        print(f"{method:<13}{document['n_clusters'][method]:>9}{c['score']:>11.4f}"
              f"{c['random_mean']:>9.4f}{c['z']:>7.1f}")
    if endpoint is not None:
        from crossint.analysis.judge import judge_clusters

        verdict = judge_clusters(document["clusters"], profiles, endpoint,
                                 n_clusters=args.judge_clusters, progress=not args.quiet)
        atomic_write_json(out_dir / JUDGE.name, verdict)
        for method, r in verdict["methods"].items():
            accuracy = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
            print(f"judge {method}: {accuracy} over {r['n_trials']} clusters "
                  f"(chance {verdict['chance']:.2f})")
    print(f"wrote {paths['json']}")
    return 0
