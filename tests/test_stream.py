"""Training without a cache (crossint.data.stream): the streamed buffers are the harvest's shards,
training on a stream as large as its buffer equals training on the cache, a resumed stream
continues exactly, and `crossint train --model` reports bad input in one line."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import Interrupt, assert_one_line_error, interrupt_at
from crossint.cli import main
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.model import Crosscoder
from crossint.crosscoder.train import TrainConfig, train
from crossint.data.harvest import harvest
from crossint.data.stream import StreamingActivations, buffer_tokens_for_memory
from crossint.errors import CrossintError
from crossint.models.adapter import load_model

CONTEXT, MODEL_BATCH = 32, 8
STEPS, BATCH = 20, 64  # a budget of 1280 tokens


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def stream(adapter, corpus, n_tokens=STEPS * BATCH, buffer_tokens=STEPS * BATCH):
    return StreamingActivations(adapter, n_tokens, "paper", corpus=str(corpus),
                                context_length=CONTEXT, batch_size=MODEL_BATCH,
                                buffer_tokens=buffer_tokens)


def configs(source, **train_changes) -> tuple[CrosscoderConfig, TrainConfig]:
    cc = CrosscoderConfig(hookpoints=source.hookpoints, models=[source.model], d_model=32,
                          n_features=64, k=4)
    settings = {"steps": STEPS, "batch_size": BATCH, "checkpoint_every": 6, "log_every": 5}
    return cc, TrainConfig(**{**settings, **train_changes})


def weights(model: Crosscoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_buffers_are_the_harvest_shards_from_any_start(adapter, tiny_text_file, tmp_path):
    """Buffer b holds the tokens of shard b of the harvest of the same budget, row for row,
    also when the stream starts at a later buffer (a resume), and batches from a later start
    are the tail of the batches from the start."""
    cache = harvest(adapter, tmp_path / "cache", "paper", n_tokens=1000, corpus=str(tiny_text_file),
                    context_length=CONTEXT, batch_size=MODEL_BATCH, shard_tokens=300,
                    progress=False)
    source = stream(adapter, tiny_text_file, n_tokens=1000, buffer_tokens=300)
    buffers = [(index, b.clone()) for index, b in source._buffers(0, lambda n: None)]
    assert [index for index, _ in buffers] == [0, 1, 2, 3]  # the last holds 100 tokens
    for index, buffer_TXD in buffers:
        assert torch.equal(buffer_TXD, cache.read_shard(index))
    index, resumed_TXD = next(source._buffers(2, lambda n: None))
    assert index == 2 and torch.equal(resumed_TXD, cache.read_shard(2))
    every = list(itertools.islice(source.batches(50, seed=3), 20))
    later = list(itertools.islice(source.batches(50, seed=3, start_batch=7), 13))  # mid-buffer 1
    assert all(torch.equal(a, b) for a, b in zip(every[7:], later, strict=True))
    last = source.batches(50, seed=3, start_batch=19)
    assert torch.equal(next(last), every[19])
    with pytest.raises(CrossintError, match="fewer than training asked for"):
        next(last)


def test_training_on_a_stream_equals_training_on_its_cache(adapter, tiny_text_file, tmp_path):
    """One buffer as large as the budget: the batches and the normalisation sample are exactly
    the cache's, so the crosscoders are the same, bit for bit."""
    budget = STEPS * BATCH
    cache = harvest(adapter, tmp_path / "cache", "paper", n_tokens=budget,
                    corpus=str(tiny_text_file), context_length=CONTEXT, batch_size=MODEL_BATCH,
                    shard_tokens=budget, progress=False)
    source = stream(adapter, tiny_text_file)
    streamed_batches = itertools.islice(source.batches(BATCH, seed=0), STEPS)
    assert all(torch.equal(a, b) for a, b in zip(streamed_batches, cache.batches(BATCH, seed=0),
                                                  strict=False))
    assert torch.equal(source.sample(budget, seed=0), cache.sample(budget, seed=0))
    cc, tc = configs(source)
    from_cache = weights(train(cc, tc, cache, tmp_path / "cached", progress=False))
    streamed = weights(train(cc, tc, source, tmp_path / "streamed", progress=False))
    assert all(torch.equal(streamed[name], from_cache[name]) for name in from_cache)
    rows = [json.loads(line) for line in (tmp_path / "streamed/metrics.jsonl").open()]
    assert rows[-1]["step"] == STEPS and rows[-1]["fvu"] < rows[0]["fvu"]


def test_an_interrupted_stream_resumes_exactly_through_the_command(adapter, tiny_model_dir,
                                                                   tiny_text_file, tmp_path):
    """Buffers of 512 of the 1280 tokens; interrupted at step 9 (checkpoint at step 6, in the
    middle of buffer 0), `crossint train --model M --resume` rebuilds buffer 0 and ends with the
    weights of the uninterrupted run."""
    source = stream(adapter, tiny_text_file, buffer_tokens=512)
    cc, tc = configs(source)
    full = weights(train(cc, tc, source, tmp_path / "full", progress=False))
    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(cc, tc, source, run, extra_losses=[interrupt_at(9)], progress=False)
    assert torch.load(run / "checkpoint/state.pt", weights_only=True)["step"] == 6
    assert main(["train", "--model", str(tiny_model_dir), "--out", str(run), "--resume",
                 "--quiet"]) == 0
    document = json.loads((run / "config.json").read_text())
    assert document["source"]["stream"]["buffer_tokens"] == 512
    assert document["source"]["text"]["corpus"] == str(tiny_text_file)
    resumed = weights(Crosscoder.from_pretrained(run))
    assert all(torch.equal(full[name], resumed[name]) for name in full)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps == [5, 10, 15, 20]


def test_a_penalty_on_a_stream_uses_the_streams_model(adapter, tiny_text_file, tmp_path,
                                                     monkeypatch):
    """The interaction penalty reads the MLP weights of the model the stream already runs."""
    import crossint.models.adapter as adapters
    from crossint.interactions.penalty import DominancePenalty, train_with_penalty

    source = stream(adapter, tiny_text_file)
    monkeypatch.setattr(adapters, "load_model", lambda *a, **k: pytest.fail("loaded again"))
    cc, tc = configs(source, steps=4, checkpoint_every=4, log_every=2)
    train_with_penalty(cc, tc, source, tmp_path / "run", DominancePenalty(weight=3.0),
                       progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert rows[-1]["interaction"] > 0


def test_a_stream_runs_the_model_in_the_dtype_asked_for(adapter, tiny_model_dir,
                                                        tiny_text_file, tmp_path, capsys):
    """model_dtype bfloat16: the model runs in bfloat16 and the run records it; `crossint train
    --resume` without the flag keeps it, and with another dtype is refused (other activations)."""
    source = StreamingActivations(str(tiny_model_dir), STEPS * BATCH, "paper",
                                  corpus=str(tiny_text_file), context_length=CONTEXT,
                                  batch_size=MODEL_BATCH, buffer_tokens=512,
                                  model_dtype="bfloat16")
    assert next(source.adapter.model.parameters()).dtype == torch.bfloat16
    cc, tc = configs(source)
    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(cc, tc, source, run, extra_losses=[interrupt_at(9)], progress=False)
    assert json.loads((run / "config.json").read_text())["source"]["stream"]["model_dtype"] \
        == "bfloat16"
    resume = ["train", "--model", str(tiny_model_dir), "--out", str(run), "--resume", "--quiet"]
    code = main([*resume, "--model-dtype", "float32"])
    assert_one_line_error(capsys, code, "train", "cannot resume", "other activations")
    assert main(resume) == 0
    assert json.loads((run / "config.json").read_text())["status"] == "finished"
    with pytest.raises(CrossintError, match="runs in float32, not the model_dtype bfloat16"):
        StreamingActivations(adapter, 256, model_dtype="bfloat16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stream_in_bfloat16_with_autocast_trains(tiny_model_dir, tiny_text_file, tmp_path):
    model = load_model(str(tiny_model_dir), device="cuda", dtype="bfloat16")
    source = StreamingActivations(model, STEPS * BATCH, "paper", corpus=str(tiny_text_file),
                                  context_length=CONTEXT, batch_size=MODEL_BATCH,
                                  buffer_tokens=512, model_dtype="bfloat16")
    cc, tc = configs(source, device="cuda", autocast="bfloat16")
    train(cc, tc, source, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert rows[-1]["fvu"] < rows[0]["fvu"]


def test_the_default_buffer_is_a_power_of_two_in_a_quarter_of_memory():
    assert buffer_tokens_for_memory(4 * 1000 * 128, 128, 10**6) == 512
    assert buffer_tokens_for_memory(4 * 1000 * 128, 128, 300) == 300
    assert buffer_tokens_for_memory(None, 128, 300) == 300
    assert buffer_tokens_for_memory(100, 128, 300) == 0


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--model", "no/such-model"], ["no/such-model"]),
        (["--layout", "blocks.7.mlp_in"], ["blocks.7"]),
        (["--buffer-tokens", "32"], ["shuffle buffer of 32 tokens", "--buffer-tokens 64"]),
        (["--steps", "400"], ["ran out after", "25600"]),
        (["--activations", "cache", "--corpus", "x.txt"],
         ["--corpus", "only apply when streaming with --model"]),
    ],
)
def test_bad_stream_input_is_one_line(tiny_model_dir, tiny_text_file, tmp_path, capsys, flags,
                                      fragments):
    where = [] if {"--model", "--activations"} & set(flags) else ["--model", str(tiny_model_dir)]
    small = tmp_path / "small.txt"  # about 500 tokens: far fewer than 400 steps need
    small.write_text("\n".join(tiny_text_file.read_text().splitlines()[:40]) + "\n")
    corpus = [] if "--corpus" in flags else ["--corpus", str(small)]
    code = main(["train", *where, *corpus, "--context-length", str(CONTEXT), "--features", "64",
                 "--k", "4", "--batch-size", "64", "--steps", "4", *flags,
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert_one_line_error(capsys, code, "train", *fragments)
    assert not (tmp_path / "run").exists()
