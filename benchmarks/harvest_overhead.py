"""Cost of capturing the paper-layout hookpoints compared with the bare forward pass.

    python benchmarks/harvest_overhead.py   # prints a table; writes results/harvest_overhead.json
    python benchmarks/harvest_overhead.py --device cuda --model-dtype bfloat16   # on a GPU

Same model (the embedded storylm by default), same batch of story contexts, timed in turns
(median of --repeats). Rows: the model's own forward pass with no hooks (logits included, which
the capture skips: it stops after the last block it needs); `ModelAdapter.capture` of the 17
paper-layout hookpoints; capture plus the harvest's gather of non-special tokens into one fp16
block (what goes into a shard); and the whole `harvest` (shuffling, checksums and atomic shard
writes included) end to end.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from common import print_table, time_interleaved, write_results
from crossint.data.corpus import iter_contexts, iter_texts
from crossint.data.harvest import Capture, harvest
from crossint.models.adapter import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="storylm")
    parser.add_argument("--layout", default="paper",
                        help="paper, resid or a comma-separated hookpoint list (SmolLM2's 17 "
                             "at blocks 13-16: see docs/benchmarks.md)")
    parser.add_argument("--corpus", default="stories")
    parser.add_argument("--batch", type=int, default=32, help="contexts per forward pass")
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--harvest-tokens", type=int, default=65_536)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--model-dtype", default="float32", help="float32, bfloat16 or float16")
    args = parser.parse_args()

    adapter = load_model(args.model, device=args.device, dtype=args.model_dtype)
    device = torch.device(args.device)
    names = adapter.resolve_layout(args.layout)
    contexts = itertools.islice(
        iter_contexts(iter_texts(args.corpus, seed=0), adapter.tokenizer, args.context_length),
        args.batch,
    )
    ids_BS = torch.stack(list(contexts))  # host ids: the capture validates them there
    on_device_BS = ids_BS.to(device)
    n_tokens = ids_BS.numel()
    capture = Capture(
        adapter,
        names,
        {n: adapter.hookpoint_dim(n) for n in names},
        torch.float16,
        include_special=False,
    )

    def bare():
        with torch.no_grad():
            adapter.model(on_device_BS, use_cache=False)

    def synchronised(fn):  # a GPU runs asynchronously: time the work, not the launch
        if device.type != "cuda":
            return fn
        return lambda: (fn(), torch.cuda.synchronize())

    timings = time_interleaved(
        {
            "bare forward": synchronised(bare),
            f"capture {len(names)} hookpoints": synchronised(lambda: adapter.capture(ids_BS,
                                                                                    names)),
            "capture + gather (fp16)": synchronised(lambda: capture.launch(0, ids_BS).ready()),
        },
        repeats=args.repeats,
    )
    base = timings["bare forward"]
    rows = [
        {
            "what": what,
            "ms_per_batch": 1e3 * t,
            "tokens_per_s": n_tokens / t,
            "overhead_vs_bare": t / base - 1,
        }
        for what, t in timings.items()
    ]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        harvest(
            adapter,
            out,
            names,
            n_tokens=args.harvest_tokens,
            corpus=args.corpus,
            context_length=args.context_length,
            batch_size=args.batch,
            dtype="float16",
            progress=False,
        )
        elapsed = time.perf_counter() - start
    rows.append(
        {
            "what": "harvest end to end (fp16)",
            "ms_per_batch": float("nan"),
            "tokens_per_s": args.harvest_tokens / elapsed,
            "overhead_vs_bare": float("nan"),
        }
    )
    print(
        f"model {args.model} ({args.model_dtype} on {args.device}), batch {args.batch} x "
        f"{args.context_length} tokens, {len(names)} hookpoints, {torch.get_num_threads()} threads"
    )
    print_table(rows)
    print(
        "wrote",
        write_results(
            ("harvest_overhead" if args.model == "storylm"
             else f"harvest_overhead_{Path(args.model).stem}")
            + ("" if args.device == "cpu" else f"_{args.device}_{args.model_dtype}"),
            rows,
            model=args.model,
            batch=args.batch,
            context_length=args.context_length,
            device=args.device,
            model_dtype=args.model_dtype,
        ),
    )


if __name__ == "__main__":
    main()
