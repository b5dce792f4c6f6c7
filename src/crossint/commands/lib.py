"""`crossint lib --model M --out DIR`: the Local Interaction Basis of a model and its graph;
`crossint lib --compare LIB RUN --out DIR`: PCA, LIB and a crosscoder's features on one
yardstick of interaction sparsity (SPEC §11)."""

from __future__ import annotations

import argparse

from crossint.commands import common

# = crossint.analysis.lib defaults; not imported so that `--help` never loads torch.
LIB_TOKENS = 20_000
COMPARE_TOKENS = 2_048
TOLERANCES = "0.01,0.05"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "lib",
        help="Local Interaction Basis of a model, and its interactions vs a crosscoder's "
             "(SPEC §11)",
        description=(
            "Without --compare: run the model on held-out text and compute, for every node "
            "layer (the residual stream entering each block and leaving the last), the PCA "
            "basis and the Local Interaction Basis (PCA + whitening, then the right singular "
            "vectors of the next layer's gradients, computed from the output backwards), and "
            "the edges E[i,j] between adjacent layers in both, with the graphs' modularity "
            "(Louvain). Writes OUT/lib.json, OUT/lib_basis.safetensors, OUT/lib_graph.png, "
            "OUT/pca_graph.png and OUT/edge_weights.png. "
            "With --compare LIB RUN: on the LIB's model and text, for PCA, LIB and the "
            "crosscoder RUN's features, the fewest top edges that keep the loss within each "
            "tolerance (bisection; all other edges ablated), the edge-weight distribution and "
            "the modularity. Writes OUT/lib_compare.json, OUT/edge_weights.png and "
            "OUT/edge_sparsity.png. Usage and decisions: docs/lib.md."
        ),
        epilog="examples: crossint lib --model storylm --tokens 20000 --out runs/lib;  "
               "crossint lib --compare runs/lib runs/base --out runs/lib_vs_cc",
    )
    parser.add_argument("--compare", nargs=2, metavar=("LIB", "RUN"),
                        help="compare the LIB in directory LIB with crosscoder run RUN")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", help="model name or path (default storylm; with --compare "
                                        "the LIB's model is used)")
    parser.add_argument("--tokens", type=int, metavar="N",
                        help=f"held-out tokens (default {LIB_TOKENS}; with --compare: the tokens "
                             f"the loss is measured on, default {COMPARE_TOKENS})")
    parser.add_argument("--corpus", help="stories (default) | FILE.txt | FILE.jsonl | hf:NAME")
    parser.add_argument("--seed", dest="text_seed", type=int, default=common.HELDOUT_SEED,
                        metavar="SEED", help="held-out story seed (default %(default)s)")
    parser.add_argument("--context-length", type=int, metavar="S",
                        help="default 128, or the model's maximum when shorter")
    parser.add_argument("--batch-size", dest="text_batch_size", type=int, default=16,
                        metavar="N", help="contexts per forward pass (default %(default)s)")
    add_basis_arguments(parser)
    add_compare_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def add_basis_arguments(parser: argparse.ArgumentParser) -> None:
    lib = parser.add_argument_group("the basis and the edges")
    lib.add_argument("--integration-steps", type=int, default=0, metavar="K",
                     help="integrated-gradient steps (midpoint rule); 0 = plain gradients "
                          "(default %(default)s)")
    lib.add_argument("--sources", type=int, default=16, metavar="R",
                     help="Rademacher sources per batch estimating the gradient Gram; 0 = exact "
                          "(one backward pass per position and output; slow) "
                          "(default %(default)s)")
    lib.add_argument("--edge-tokens", type=int, default=4096, metavar="N",
                     help="held-out tokens (a prefix of the text) whose edges are computed, "
                          "exactly: one Jacobian-vector product per basis function "
                          "(default %(default)s)")
    lib.add_argument("--rtol", type=float, default=1e-7,
                     help="truncate eigenvalues below rtol × the largest (default %(default)s)")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    compare = parser.add_argument_group("--compare")
    compare.add_argument("--tolerances", default=TOLERANCES, metavar="T1,T2",
                         help="loss tolerances in nats above the loss with every edge kept "
                              "(default %(default)s)")
    compare.add_argument("--precision", type=float, default=0.02,
                         help="stop the bisection when its bracket is within this fraction of "
                              "the edge count (0: exact; default %(default)s)")


def parse_tolerances(text: str) -> list[float]:
    from crossint.errors import CrossintError

    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not v >= 0 or v == float("inf") for v in values):
        raise CrossintError(f"--tolerances must be comma-separated numbers >= 0 (nats), got "
                            f"{text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    with common.locked_output(args.out, "lib"):
        return _compare(args) if args.compare else _build(args)


def _build(args: argparse.Namespace) -> int:
    from crossint.analysis.heldout import HeldoutRequest
    from crossint.analysis.lib import LibSettings, build_lib, format_lib_table, write_lib

    settings = LibSettings(integration_steps=args.integration_steps, sources=args.sources,
                           edge_tokens=args.edge_tokens, rtol=args.rtol)
    request = HeldoutRequest(
        n_tokens=LIB_TOKENS if args.tokens is None else args.tokens, corpus=args.corpus,
        seed=args.text_seed, context_length=args.context_length,
        batch_size=args.text_batch_size, model=args.model or "storylm", device=args.device)
    result = build_lib(request=request, settings=settings, progress=not args.quiet)
    paths = write_lib(result, args.out)
    print(format_lib_table(result.document))
    seconds = sum(result.document["seconds"].values())
    print(f"wrote {paths['json']}, {paths['basis'].name}, {paths['graph'].name}, "
          f"{paths['pca_graph'].name} and {paths['weights'].name} ({seconds / 60:.1f} min)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from crossint.analysis.lib_compare import compare_lib, format_compare_table, write_compare
    from crossint.errors import CrossintError

    if args.model:
        raise CrossintError("--model does not apply with --compare: the comparison runs on the "
                            "model the LIB was computed on")
    lib_dir, run_dir = args.compare
    document = compare_lib(lib_dir, run_dir,
                           n_tokens=COMPARE_TOKENS if args.tokens is None else args.tokens,
                           tolerances=parse_tolerances(args.tolerances),
                           precision=args.precision, device=args.device,
                           progress=not args.quiet)
    paths = write_compare(document, args.out)
    print(format_compare_table(document))
    seconds = sum(document["seconds"].values())
    print(f"wrote {paths['json']}, {paths['weights'].name} and {paths['sparsity'].name} "
          f"({seconds / 60:.1f} min)")
    return 0
