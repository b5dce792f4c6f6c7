"""`crossint toys modadd`: train the modular-addition toy of the Local Interaction Basis
comparison (SPEC §11)."""

from __future__ import annotations

import argparse

# = crossint.toys.modadd.ModaddSettings defaults; not imported so that `--help` never loads torch.
MODADD_DEFAULTS = {
    "p": 113, "d_model": 128, "n_blocks": 1, "n_heads": 4, "d_mlp": 512, "steps": 3000,
    "batch_size": 512, "lr": 3e-3, "weight_decay": 1.0, "seed": 0, "threads": 1,
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "toys", help="small toy models trained by crossint (modular addition)",
        description="Toy models for the analyses. modadd: the modular-addition transformer of "
                    "the Local Interaction Basis comparison (docs/lib.md).")
    actions = parser.add_subparsers(dest="toy", metavar="TOY")
    actions.required = True
    modadd = actions.add_parser(
        "modadd", help="train a modular-addition transformer (a + b mod p)",
        description="Train a GPT-Neo on every sum 'a b = c' (c = a + b mod p) that crossint's "
                    "corpus split leaves for harvests, and save it with save_pretrained, its "
                    "corpus OUT/modadd.txt (held-out sums = the split's held-out part) and "
                    "OUT/training.json. Deterministic at a fixed --threads. Analyse it with "
                    "--model OUT --corpus OUT/modadd.txt --context-length 6.",
        epilog="example: crossint toys modadd --out models/modadd")
    modadd.add_argument("--out", required=True, help="output directory (replaced when complete)")
    for name, kind, text in (
            ("p", int, "modulus"), ("d_model", int, "residual width"),
            ("n_blocks", int, "transformer blocks"), ("n_heads", int, "attention heads"),
            ("d_mlp", int, "MLP width"), ("steps", int, "optimizer steps"),
            ("batch_size", int, "sums per step"), ("lr", float, "AdamW learning rate"),
            ("weight_decay", float, "AdamW weight decay"),
            ("seed", int, "seed of initialisation and batch order"),
            ("threads", int, "torch CPU threads")):
        modadd.add_argument("--" + name.replace("_", "-"), type=kind,
                            default=MODADD_DEFAULTS[name],
                            help=f"{text} (default {MODADD_DEFAULTS[name]})")
    modadd.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from crossint.toys.modadd import ModaddSettings, train_modadd

    settings = ModaddSettings(**{name: getattr(args, name) for name in MODADD_DEFAULTS})
    result = train_modadd(args.out, settings, progress=not args.quiet)
    for row in result["history"]:
        print(f"step {row['step']:>6}  train {row['train_loss']:.4f}  held-out "
              f"{row['heldout_loss']:.4f} (sum {row['heldout_answer_loss']:.4f}, accuracy "
              f"{row['heldout_accuracy']:.3f})")
    heldout = result["heldout"]
    print(f"held-out sums {result['n_heldout_sums']}: loss {heldout['loss']:.4f} nats (floor "
          f"log(p)/4 = {result['loss_floor']:.4f}), sum accuracy {heldout['accuracy']:.3f}; "
          f"trained in {result['train_seconds'] / 60:.1f} min; wrote {args.out}")
    return 0
