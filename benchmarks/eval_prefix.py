"""Evaluation cost: patched passes that start at the patched block vs whole forward passes.

    python benchmarks/eval_prefix.py                 # trains a small crosscoder on storylm first
    python benchmarks/eval_prefix.py --run runs/abc  # or times an existing run (its own model)

Writes results/eval_prefix_<model>.json.

`crossint eval` splices every residual hookpoint's reconstruction, zeros and mean into the model
(SPEC §6.2). Before: one whole forward pass per hookpoint and variant (kept here, as
``whole_model_splices``, only to be timed against). Now: the three variants of a hookpoint share
one pass, stacked along the batch, that starts at the hookpoint's block from the unpatched
residual stream. Both paths run the whole ``evaluate`` on the same held-out text (model loading
included), timed in turns (median of --repeats), with one thread, and the splice pass alone
(the part that changed); the CE numbers of the two are compared too.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median

import torch

from common import print_table, write_results
from crossint.analysis.evaluate import _Passes, _reconstruct, _token_losses, evaluate
from crossint.analysis.splicing import TextLosses, replace_where
from crossint.cli import main as crossint_main
from crossint.data.harvest import harvest


def whole_model_splices(self: _Passes, batches, resid_hookpoints, mean_XD) -> TextLosses:
    """The previous ``_Passes.splices``: every variant of every hookpoint a whole forward pass."""
    mean_XD = mean_XD.to(self.device)
    losses = TextLosses()
    for ids_BS in batches:
        ids_BS = ids_BS.to(self.device)
        (acts, keep_BS, _), out = _reconstruct(self.adapter, self.crosscoder, ids_BS,
                                               self.hookpoints, self.special_ids)
        losses.new_batch(keep_BS[:, :-1])
        losses.add("model", _token_losses(self.adapter, ids_BS))
        for x, name in enumerate(self.hookpoints):
            if name not in resid_hookpoints:
                continue
            recon_BSD = torch.zeros_like(acts[name])
            recon_BSD[keep_BS] = out.recon_BXD[:, x].to(recon_BSD.dtype)
            variants = {"splice": recon_BSD, "zero": torch.zeros_like(recon_BSD),
                        "mean": mean_XD[x].expand_as(recon_BSD)}
            for variant, replacement_BSD in variants.items():
                patches = {name: replace_where(replacement_BSD, ~keep_BS)}
                losses.add(f"{name}/{variant}", _token_losses(self.adapter, ids_BS, patches))
        self.tick()
    return losses


@contextlib.contextmanager
def splices_timed(splices, seconds: list[float]) -> Iterator[None]:
    """``_Passes.splices`` replaced by ``splices``, its wall time appended to ``seconds``."""
    own = _Passes.splices

    def timed(self, *args):
        start = time.perf_counter()
        losses = splices(self, *args)
        seconds.append(time.perf_counter() - start)
        return losses

    _Passes.splices = timed
    try:
        yield
    finally:
        _Passes.splices = own


def train_small_run(root: Path, model: str, tokens: int, steps: int) -> Path:
    """A paper-layout crosscoder trained briefly: its quality does not change the timing."""
    cache = harvest(model, root / "cache", "paper", n_tokens=tokens, progress=False).path
    run = root / "run"
    code = crossint_main(["train", "--activations", str(cache), "--out", str(run),
                          "--features", "512", "--k", "16", "--steps", str(steps),
                          "--batch-size", "256", "--quiet"])
    if code != 0:
        raise SystemExit(f"training the benchmark crosscoder failed (exit {code})")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="an existing run (default: train one)")
    parser.add_argument("--model", default="storylm", help="model to train on without --run")
    parser.add_argument("--tokens", type=int, default=5000, help="held-out tokens evaluated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_small_run(Path(tmp), args.model, tokens=20_000, steps=200)
        paths = {"whole model": whole_model_splices, "started at the block": _Passes.splices}
        eval_s: dict[str, list[float]] = {path: [] for path in paths}
        splices_s: dict[str, list[float]] = {path: [] for path in paths}
        results = {}
        for _ in range(args.repeats):
            for path, splices in paths.items():
                with splices_timed(splices, splices_s[path]):
                    start = time.perf_counter()
                    results[path] = evaluate(run, n_tokens=args.tokens, progress=False)
                    eval_s[path].append(time.perf_counter() - start)

    old, new = results["whole model"], results["started at the block"]
    n_resid = len(new["ce_splice"])
    largest_difference = max(abs(old[key][h] - new[key][h]) for h in new["ce_splice"]
                             for key in ("ce_splice", "ce_zero", "ce_mean_ablation"))
    base_eval, base_splices = median(eval_s["whole model"]), median(splices_s["whole model"])
    rows = [{"splice passes": path, "eval_s": median(eval_s[path]),
             "eval_speedup": base_eval / median(eval_s[path]),
             "splice_pass_s": median(splices_s[path]),
             "splice_speedup": base_splices / median(splices_s[path])} for path in paths]
    print(f"model {new['model']}, {new['n_tokens']} held-out tokens, {n_resid} residual "
          f"hookpoints x 3 variants, {torch.get_num_threads()} thread; largest CE difference "
          f"between the paths {largest_difference:.2e}")
    print_table(rows)
    name = f"eval_prefix_{Path(new['model']).stem}"
    print("wrote", write_results(name, rows, model=new["model"],
                                 n_tokens=new["n_tokens"], residual_hookpoints=n_resid,
                                 largest_ce_difference=largest_difference))


if __name__ == "__main__":
    main()
