"""The activation harvest (crossint.data.harvest) and cache (crossint.data.cache), tiny GPT-2."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from scipy.optimize import linear_sum_assignment

from conftest import TINY_TEXT
from crossint.data.cache import ActivationCache, TensorActivations, canonical_dtype
from crossint.data.corpus import iter_contexts, iter_texts
from crossint.data.harvest import harvest
from crossint.errors import CrossintError
from crossint.models.adapter import load_model

BASE = dict(hookpoints="paper", context_length=32, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def run(adapter, out, **kw):
    settings = {**BASE, "n_tokens": 1500, "shard_tokens": 400, "corpus": "stories", **kw}
    return harvest(adapter, out, **settings)


@pytest.fixture(scope="module")
def cache_dir(adapter, tmp_path_factory):
    """A float32 paper-layout cache: 2500 tokens in shards of 600 (the last holds 100)."""
    out = tmp_path_factory.mktemp("cache") / "c"
    run(adapter, out, n_tokens=2500, shard_tokens=600)
    return out


@pytest.fixture
def cache(cache_dir):
    return ActivationCache(cache_dir)


def copy_cache(cache_dir, tmp_path):
    return shutil.copytree(cache_dir, tmp_path / "copy")


@pytest.fixture(scope="module")
def stream(adapter):
    return expected_stream(adapter, 700)


def expected_stream(adapter, n_tokens, context_length=32, corpus="stories"):
    """The kept-token stream computed the obvious way: one context at a time, [n, X, D] float64."""
    names = adapter.resolve_layout("paper")
    special = torch.tensor(sorted(adapter.special_token_ids()))
    rows, have = [], 0
    for ctx in iter_contexts(iter_texts(corpus), adapter.tokenizer, context_length):
        acts = adapter.capture(ctx[None], names)
        keep = ~torch.isin(ctx, special)
        rows.append(torch.stack([acts[h][0][keep] for h in names], dim=1).double())
        have += int(keep.sum())
        if have >= n_tokens:
            break
    return torch.cat(rows)[:n_tokens]


def assert_same_rows(got_TXD, want_TXD, rtol):
    """``got`` is a row permutation of ``want`` up to rounding (rows may repeat: the first token
    after BOS sees only BOS and itself, so equal tokens there give equal rows)."""
    assert got_TXD.shape == want_TXD.shape
    got, want = got_TXD.double().flatten(1), want_TXD.double().flatten(1)
    rows, cols = linear_sum_assignment(torch.cdist(got, want).numpy())
    err = (got[rows] - want[cols]).abs().max()
    assert err <= rtol * want.abs().max(), float(err)


def sorted_rows(x_TXD):
    flat = x_TXD.reshape(len(x_TXD), -1).numpy()
    return flat[np.lexsort(flat.T[::-1])]


def shard_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard_*.safetensors"))}


# ---- harvest contents ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float16", 2e-3), ("bfloat16", 1e-2)])
def test_round_trip_each_dtype(adapter, stream, tmp_path, dtype, rtol):
    cache = run(adapter, tmp_path / dtype, n_tokens=700, shard_tokens=300, dtype=dtype)
    assert cache.dtype == dtype and cache.n_tokens == 700 and cache.shard_sizes == [300, 300, 100]
    want = stream
    start = 0
    for i, size in enumerate(cache.shard_sizes):
        shard = cache.read_shard(i)
        assert shard.dtype == torch.float32 and shard.shape == (size, 9, 32)
        assert_same_rows(shard, want[start : start + size], rtol)
        start += size
        with safe_open(str(tmp_path / dtype / f"shard_{i:05d}.safetensors"), "pt") as f:
            assert sorted(f.keys()) == sorted(cache.hookpoints)
            assert f.get_tensor("blocks.0.mlp_in").dtype == getattr(torch, dtype)


def test_shards_are_token_shuffled(stream, cache):
    want = stream[:600]
    shard = cache.read_shard(0).double()
    assert_same_rows(shard, want, 1e-5)
    in_order = (shard - want).abs().amax(dim=(1, 2)) < 1e-4
    assert in_order.float().mean() < 0.05


def test_special_tokens_excluded_by_default_and_kept_on_request(adapter, tmp_path):
    bos = adapter.tokenizer.bos_token_id
    bos_row = adapter.capture(torch.tensor([[bos]]), ["blocks.0.resid_pre"])["blocks.0.resid_pre"]
    bos_D = bos_row[0, 0]

    def n_bos_rows(cache):
        x = torch.cat([cache.read_shard(i)[:, 0] for i in range(cache.n_shards)])
        return int(((x - bos_D).abs().amax(1) < 1e-5).sum())

    plain = run(adapter, tmp_path / "plain", n_tokens=310, shard_tokens=310)
    special = run(
        adapter, tmp_path / "special", n_tokens=320, shard_tokens=320, include_special=True
    )
    assert n_bos_rows(plain) == 0
    assert n_bos_rows(special) == 10  # 320 tokens = 10 contexts of 32, each starting with BOS


def test_manifest_content(cache_dir, adapter):
    m = json.loads((cache_dir / "manifest.json").read_text())
    assert m["format"] == "crossint.activations" and m["format_version"] == 1
    assert m["model"] == adapter.name
    assert m["model_info"]["model_type"] == "gpt2" and m["model_info"]["d_model"] == 32
    assert m["hookpoints"] == adapter.resolve_layout("paper")
    assert m["dims"] == {h: 32 for h in m["hookpoints"]}
    assert (m["dtype"], m["context_length"], m["corpus"], m["seed"]) == (
        "float32",
        32,
        "stories",
        0,
    )
    assert m["include_special"] is False and m["complete"] is True
    assert m["n_tokens_target"] == m["n_tokens"] == 2500
    assert [s["n_tokens"] for s in m["shards"]] == [600, 600, 600, 600, 100]
    for s in m["shards"]:
        data = (cache_dir / s["file"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)


def test_harvest_is_deterministic_and_seeded(adapter, tmp_path, cache_dir):
    again = run(adapter, tmp_path / "again", n_tokens=2500, shard_tokens=600)
    assert shard_bytes(again.path) == shard_bytes(cache_dir)
    other = run(adapter, tmp_path / "other", n_tokens=600, shard_tokens=600, seed=1)
    assert (
        shard_bytes(other.path)["shard_00000.safetensors"]
        != shard_bytes(cache_dir)["shard_00000.safetensors"]
    )


def test_local_text_corpus(adapter, tmp_path, tiny_text_file):
    cache = run(adapter, tmp_path / "txt", corpus=str(tiny_text_file), n_tokens=500)
    m = cache.manifest
    assert m["corpus"] == str(tiny_text_file) and len(m["corpus_sha256"]) == 64
    assert cache.n_tokens == 500


def test_harvest_reads_no_heldout_document(adapter, tmp_path, monkeypatch):
    """A file corpus is split by document: what the harvest reads and what the analyses read as
    held-out text share no document and together cover the file; the manifest records the split,
    the same for every seed."""
    import crossint.data.corpus as corpus_module
    from crossint.analysis.heldout import HeldoutRequest, heldout_batches

    path = tmp_path / "many.txt"
    lines = [f"Story {i}: Tom saw {i % 7} red balls and {i % 5} blue birds." for i in range(150)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    seen: dict[str, list[str]] = {}
    original = corpus_module.iter_texts

    def recording(spec, *args, part="all", **kwargs):
        for text in original(spec, *args, part=part, **kwargs):
            seen.setdefault(part, []).append(text)
            yield text

    monkeypatch.setattr(corpus_module, "iter_texts", recording)
    with pytest.warns(RuntimeWarning, match="ran out after"):  # the whole harvest part is read
        cache = run(adapter, tmp_path / "c", corpus=str(path), n_tokens=10**6)
    request = HeldoutRequest(n_tokens=10**6, corpus=str(path), context_length=32)
    assert heldout_batches(adapter, request)  # the whole held-out part is read
    harvested, held_out = seen["harvest"], seen["heldout"]
    assert held_out and set(harvested).isdisjoint(held_out)
    assert sorted(harvested + held_out) == sorted(lines)
    split = corpus_module.split_corpus(path)
    assert cache.manifest["corpus_split"] == split.record()
    assert cache.manifest["corpus_split"]["method"] == "sha256"
    monkeypatch.setattr(corpus_module, "iter_texts", original)
    other_seed = run(adapter, tmp_path / "s3", corpus=str(path), n_tokens=200, seed=3)
    assert other_seed.manifest["corpus_split"] == split.record()


def test_caches_without_a_recorded_split(adapter, cache_dir, tmp_path, tiny_text_file):
    """Stories caches record no split (their seed splits them); a file cache written before the
    split (no corpus_split) still loads, but a partial one is not resumed under the split."""
    assert "corpus_split" not in ActivationCache(cache_dir).manifest
    cache = run(adapter, tmp_path / "c", corpus=str(tiny_text_file), n_tokens=300,
                shard_tokens=200)
    manifest_path = cache.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["corpus_split"]
    manifest_path.write_text(json.dumps(manifest))
    assert ActivationCache(cache.path).n_tokens == 300
    first = manifest["shards"][0]
    manifest.update(shards=[first], n_tokens=first["n_tokens"], complete=False)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CrossintError, match="older crossint that read the whole corpus"):
        run(adapter, cache.path, corpus=str(tiny_text_file), n_tokens=300, shard_tokens=200)
    manifest["corpus_split"] = {"method": "sha256", "heldout_fraction": 2.0}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CrossintError, match="invalid: 'corpus_split'"):
        ActivationCache(cache.path)


# ---- resume ------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_resume_after_interruption_is_byte_identical(adapter, tmp_path):
    settings = dict(n_tokens=1700, shard_tokens=350, batch_size=3)
    full = run(adapter, tmp_path / "full", **settings)

    def stop_after_second(index, entry):
        if index == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(adapter, tmp_path / "part", on_shard=stop_after_second, **settings)
    partial = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 2
    with pytest.raises(CrossintError, match=r"is incomplete \(700 of 1700 tokens.*same harvest"):
        ActivationCache(tmp_path / "part")

    written = []
    resumed = run(adapter, tmp_path / "part", on_shard=lambda i, e: written.append(i), **settings)
    assert written == [2, 3, 4]
    assert shard_bytes(resumed.path) == shard_bytes(full.path)
    assert resumed.manifest["shards"] == full.manifest["shards"]
    # The resume points fall inside batches, so the partial-batch path was exercised.
    assert any(s["next_skip"] for s in full.manifest["shards"][:-1])


def test_complete_cache_is_left_alone(adapter, cache_dir, tmp_path):
    path = copy_cache(cache_dir, tmp_path)
    before = (path / "manifest.json").read_bytes(), shard_bytes(path)
    calls = []
    cache = run(
        adapter, path, n_tokens=2500, shard_tokens=600, on_shard=lambda i, e: calls.append(i)
    )
    assert calls == [] and cache.n_tokens == 2500
    assert ((path / "manifest.json").read_bytes(), shard_bytes(path)) == before


def test_resume_with_other_settings_is_refused_and_loses_nothing(adapter, cache_dir, tmp_path):
    path = copy_cache(cache_dir, tmp_path)
    before = (path / "manifest.json").read_bytes(), shard_bytes(path)
    with pytest.raises(CrossintError, match=r"other settings \(context_length: 32 there, 16 now\)"):
        run(adapter, path, n_tokens=2500, shard_tokens=600, context_length=16)
    with pytest.raises(CrossintError, match=r"n_tokens_target: 2500 there, 3000 now"):
        run(adapter, path, n_tokens=3000, shard_tokens=600)
    assert ((path / "manifest.json").read_bytes(), shard_bytes(path)) == before


def test_rerun_repairs_a_corrupt_shard(adapter, cache_dir, tmp_path):
    path = copy_cache(cache_dir, tmp_path)
    good = shard_bytes(path)
    shard = path / "shard_00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.warns(RuntimeWarning, match="shard_00002.safetensors is missing, corrupt"):
        run(adapter, path, n_tokens=2500, shard_tokens=600)
    assert shard_bytes(path) == good
    ActivationCache(path).read_shard(2)


def test_non_cache_directory_is_refused(adapter, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CrossintError, match="is not empty and holds no activation cache"):
        run(adapter, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ---- harvest input errors ------------------------------------------------------------------------


def test_context_longer_than_model_maximum(adapter, tmp_path):
    with pytest.raises(
        CrossintError,
        match=r"context length 65 is longer than the maximum "
        r"context of model .* \(64 tokens\)",
    ):
        run(adapter, tmp_path / "out", context_length=65)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "layout,match",
    [
        ("blocks.9.mlp_in", r"unknown hookpoint 'blocks\.9\.mlp_in'"),
        (["blocks.0.mlp_in", "blocks.0.nope"], r"unknown hookpoint 'blocks\.0\.nope'"),
        ("papers", r"unknown layout 'papers'"),
    ],
)
def test_unknown_hookpoint_or_layout(adapter, tmp_path, layout, match):
    with pytest.raises(CrossintError, match=match):
        run(adapter, tmp_path / "out", hookpoints=layout)
    assert not (tmp_path / "out").exists()


def test_empty_corpus_writes_nothing(adapter, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CrossintError, match="is empty"):
        run(adapter, tmp_path / "out", corpus=str(empty))
    (tmp_path / "one.txt").write_text("Once upon a time there was a cat. " * 40 + "\n")
    short = tmp_path / "short.txt"
    short.write_text("Tom.\nSam.\n")  # one document is held out, the other is too short
    with pytest.raises(CrossintError, match="is empty: it holds"):
        run(adapter, tmp_path / "out", corpus=str(short))
    with pytest.raises(CrossintError, match="too small to split"):
        run(adapter, tmp_path / "out", corpus=str(tmp_path / "one.txt"))
    assert not (tmp_path / "out").exists()


def test_bad_numbers_and_dtype(adapter, tmp_path):
    with pytest.raises(CrossintError, match="n_tokens must be a positive integer"):
        run(adapter, tmp_path / "o", n_tokens=0)
    with pytest.raises(CrossintError, match="unsupported activation dtype 'int8'"):
        run(adapter, tmp_path / "o", dtype="int8")
    assert canonical_dtype("bf16") == "bfloat16" and canonical_dtype(torch.float16) == "float16"


def test_corpus_running_out_ends_the_cache_early(adapter, tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n".join(TINY_TEXT) + "\n")
    with pytest.warns(RuntimeWarning, match="ran out after"):
        cache = run(
            adapter,
            tmp_path / "out",
            corpus=str(corpus),
            n_tokens=100_000,
            shard_tokens=100,
            context_length=16,
        )
    assert 0 < cache.n_tokens < 100_000 and cache.manifest["corpus_exhausted"]
    assert sum(cache.shard_sizes) == cache.n_tokens
    assert cache.read_shard(cache.n_shards - 1).shape[0] == cache.shard_sizes[-1]


def _inject(adapter, monkeypatch, on_call, hookpoint, values):
    """Make the adapter's capture put ``values`` at kept positions of one batch."""
    original = adapter.capture
    special = torch.tensor(sorted(adapter.special_token_ids()))
    calls = [0]

    def capture(input_ids_BS, hookpoints, *args, **kwargs):
        out = original(input_ids_BS, hookpoints, *args, **kwargs)
        calls[0] += 1
        if calls[0] == on_call:
            keep = (~torch.isin(input_ids_BS, special)).nonzero()[: len(values)]
            for (b, s), v in zip(keep.tolist(), values, strict=True):
                out[hookpoint][b, s, 1] = v
        return out

    monkeypatch.setattr(adapter, "capture", capture)


def test_nan_and_inf_name_the_hookpoint_and_count(adapter, tmp_path, monkeypatch):
    _inject(adapter, monkeypatch, 6, "blocks.1.resid_mid", [float("nan")] * 3 + [float("inf")])
    with pytest.raises(
        CrossintError,
        match=r"^4 non-finite values \(NaN/Inf\) in the "
        r"activations at hookpoint blocks\.1\.resid_mid",
    ):
        run(adapter, tmp_path / "out", shard_tokens=300)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert not m["complete"] and len(m["shards"]) >= 1
    for s in m["shards"]:  # shards written before the error are intact
        data = (tmp_path / "out" / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"]


def test_float16_overflow_is_reported(adapter, tmp_path, monkeypatch):
    _inject(adapter, monkeypatch, 1, "blocks.0.attn_in", [1e6])
    with pytest.raises(CrossintError, match=r"^1 non-finite values.*blocks\.0\.attn_in.*float16"):
        run(adapter, tmp_path / "out", dtype="float16")


# ---- reading: errors ---------------------------------------------------------------------------


def test_checksum_mismatch_names_the_file(cache_dir, tmp_path):
    path = copy_cache(cache_dir, tmp_path)
    shard = path / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = ActivationCache(path)
    cache.read_shard(0)
    with pytest.raises(
        CrossintError,
        match=r"^checksum mismatch in .*copy/shard_00001\."
        r"safetensors: the file is corrupt or truncated; re-run the harvest$",
    ):
        cache.read_shard(1)
    with pytest.raises(CrossintError, match="checksum mismatch"):
        list(itertools.islice(cache.batches(500, seed=0), 10))


def test_truncated_shard_is_caught_on_open(cache_dir, tmp_path):
    path = copy_cache(cache_dir, tmp_path)
    shard = path / "shard_00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CrossintError, match=r"checksum mismatch in .*shard_00003\.safetensors"):
        ActivationCache(path)
    shard.unlink()  # an absent shard: refused by the readers that need it
    cache = ActivationCache(path)
    with pytest.raises(CrossintError, match=r"lacks 1 shard file\(s\) listed in its manifest "
                                            r"and needed here: shard_00003\.safetensors;"):
        cache.batches(100, seed=0)
    with pytest.raises(CrossintError, match=r"shard .*shard_00003\.safetensors .* is missing"):
        cache.read_shard(3)
    others = [r for r, part in enumerate(cache.shard_parts(2, seed=0)) if 3 not in part]
    assert next(cache.batches(100, seed=0, parts=2, part=others[0])).shape == (50, 9, 32)


def test_wrong_shape_in_a_shard(cache_dir, tmp_path):
    path = copy_cache(cache_dir, tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    tensors = {h: torch.zeros(600, 32) for h in m["hookpoints"]}
    tensors["blocks.1.mlp_in"] = torch.zeros(600, 16)
    shard = path / "shard_00000.safetensors"
    save_file(tensors, str(shard))
    m["shards"][0].update(
        bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest()
    )
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        CrossintError,
        match=r"holds blocks\.1\.mlp_in as float32 \(600, 16\), "
        r"the manifest says float32 \(600, 32\)",
    ):
        ActivationCache(path).read_shard(0)


def test_missing_or_broken_manifest(cache_dir, tmp_path):
    with pytest.raises(CrossintError, match="activation cache not found"):
        ActivationCache(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrossintError, match="activation cache manifest not found"):
        ActivationCache(tmp_path / "empty")
    path = copy_cache(cache_dir, tmp_path)
    manifest = path / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    with pytest.raises(CrossintError, match=r"manifest .*manifest\.json is corrupt"):
        ActivationCache(path)
    manifest.write_text(json.dumps({k: v for k, v in good.items() if k != "dims"}))
    with pytest.raises(CrossintError, match=r"manifest .* is invalid: 'dims' must give"):
        ActivationCache(path)
    manifest.write_text(json.dumps({**good, "n_tokens": 7}))
    with pytest.raises(CrossintError, match="differs from the sum of the shard token counts"):
        ActivationCache(path)


def test_mixed_widths_need_read_shard_dict(adapter, tmp_path):
    cache = run(
        adapter,
        tmp_path / "mix",
        hookpoints="blocks.0.mlp_pre,blocks.0.mlp_in",
        n_tokens=200,
        shard_tokens=200,
    )
    assert cache.dims == {"blocks.0.mlp_pre": 128, "blocks.0.mlp_in": 32}
    shard = cache.read_shard_dict(0)
    assert shard["blocks.0.mlp_pre"].shape == (200, 128)
    assert shard["blocks.0.mlp_in"].shape == (200, 32)
    with pytest.raises(
        CrossintError,
        match=r"widths differ \(blocks\.0\.mlp_pre: 128, "
        r"blocks\.0\.mlp_in: 32\).*read_shard_dict",
    ):
        cache.read_shard(0)
    with pytest.raises(CrossintError, match="widths differ"):
        cache.batches(10, seed=0)
    # mlp_pre is mlp_in through the first linear layer (SPEC §2): the two columns belong together.
    w = adapter.mlp_weights(0)
    pre = shard["blocks.0.mlp_in"].double() @ w.W_in_DN.double() + w.b_in_N.double()
    torch.testing.assert_close(pre, shard["blocks.0.mlp_pre"].double(), atol=1e-4, rtol=1e-4)


# ---- reading: batches and samples ------------------------------------------------------------


def test_read_shard_and_dict_agree(cache):
    stacked = cache.read_shard(1)
    as_dict = cache.read_shard_dict(1)
    for x, h in enumerate(cache.hookpoints):
        assert torch.equal(stacked[:, x], as_dict[h])


def test_batches_are_deterministic_epochs(cache):
    all_rows = sorted_rows(torch.cat([cache.read_shard(i) for i in range(cache.n_shards)]))
    first = list(itertools.islice(cache.batches(100, seed=3), 50))
    again = list(itertools.islice(cache.batches(100, seed=3), 50))
    other = list(itertools.islice(cache.batches(100, seed=4), 25))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=False))
    for a in first:
        assert a.dtype == torch.float32 and a.shape == (100, 9, 32)
    epoch0, epoch1 = torch.cat(first[:25]), torch.cat(first[25:])
    assert np.array_equal(sorted_rows(epoch0), all_rows)  # every token exactly once per epoch
    assert np.array_equal(sorted_rows(epoch1), all_rows)
    assert not torch.equal(epoch0, epoch1)


@pytest.mark.parametrize("batch_size,window_shards", [(100, 4), (333, 4), (333, 1), (2000, 2)])
def test_start_batch_equals_skipping(cache, batch_size, window_shards):
    fresh = list(itertools.islice(cache.batches(batch_size, 5, window_shards=window_shards), 30))
    for k in (0, 1, 7, 8, 24, 25, 26):
        resumed = cache.batches(batch_size, 5, start_batch=k, window_shards=window_shards)
        for want, got in zip(fresh[k : k + 4], resumed, strict=False):
            assert torch.equal(want, got)


def test_start_batch_reads_only_the_window_it_needs(cache, monkeypatch):
    loads = []
    original = cache._stacked
    monkeypatch.setattr(cache, "_stacked", lambda idx: loads.append(tuple(idx)) or original(idx))
    # Batch 126 of 100 tokens is token 100 of epoch 5: inside the epoch's first window.
    batch = next(cache.batches(100, 0, start_batch=126))
    assert len(loads) == 1
    fresh = list(itertools.islice(ActivationCache(cache.path).batches(100, 0), 127))
    assert torch.equal(batch, fresh[126])


def test_memory_budget(cache_dir, tmp_path):
    path = copy_cache(cache_dir, tmp_path)
    in_memory = ActivationCache(path)
    on_disk = ActivationCache(path, memory_budget=0)
    a = list(itertools.islice(in_memory.batches(250, 1), 12))
    b = list(itertools.islice(on_disk.batches(250, 1), 12))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for shard in path.glob("shard_*.safetensors"):
        shard.unlink()
    in_memory.read_shard(4)  # served from memory after the first epoch
    with pytest.raises(CrossintError, match="is missing"):
        on_disk.read_shard(4)


def test_sample(cache):
    everything = torch.cat([cache.read_shard(i) for i in range(cache.n_shards)])
    all_rows = Counter(r.tobytes() for r in everything.reshape(2500, -1).numpy())
    s = cache.sample(700, seed=1)
    assert s.shape == (700, 9, 32) and s.dtype == torch.float32
    rows = Counter(r.tobytes() for r in s.reshape(700, -1).numpy())
    assert not rows - all_rows  # drawn without replacement from the cache's tokens
    assert torch.equal(s, cache.sample(700, seed=1))
    assert not torch.equal(s, cache.sample(700, seed=2))
    assert cache.sample(10**6, seed=0).shape[0] == 2500


def test_parts_deal_the_shards_and_each_reads_only_its_own(cache, monkeypatch):
    """parts=2: two fixed, disjoint halves of the shards; part r streams its own shards alone,
    50 rows of every 100-row batch, and the whole-cache batch is the parts' rows in order."""
    dealt = cache.shard_parts(2, seed=3)
    assert sorted(dealt[0] + dealt[1]) == list(range(cache.n_shards))
    assert sorted(len(p) for p in dealt) == [2, 3] and dealt == cache.shard_parts(2, seed=3)
    assert cache.shard_parts(1, seed=3) == [list(range(cache.n_shards))]
    whole = list(itertools.islice(cache.batches(100, 3), 5))
    assert all(torch.equal(a, b) for a, b in
               zip(whole, cache.batches(100, 3, parts=1), strict=False))  # one part: the cache
    both = list(itertools.islice(cache.batches(100, 3, parts=2), 40))
    loads = []
    original = cache._stacked
    monkeypatch.setattr(cache, "_stacked", lambda idx: loads.append(tuple(idx)) or original(idx))
    for r in (0, 1):
        loads.clear()
        own = list(itertools.islice(cache.batches(100, 3, parts=2, part=r), 40))
        assert all(torch.equal(b[50 * r : 50 * (r + 1)], o) for b, o in zip(both, own,
                                                                            strict=True))
        assert {i for window in loads for i in window} <= set(dealt[r])
        mine = torch.cat([cache.read_shard(i) for i in dealt[r]])
        first_epoch = torch.cat(own)[: len(mine)]
        assert np.array_equal(sorted_rows(first_epoch), sorted_rows(mine))  # each token once
        for k in (0, 3, 17):  # resuming a part skips exactly
            resumed = cache.batches(100, 3, start_batch=k, parts=2, part=r)
            assert all(torch.equal(a, b) for a, b in zip(own[k : k + 3], resumed, strict=False))


def test_parts_sample_and_refusals(cache):
    dealt = cache.shard_parts(2, seed=1)
    sample = cache.sample(700, seed=1, parts=2)
    assert sample.shape == (700, 9, 32)
    for r in (0, 1):
        own = cache.sample(700, seed=1, parts=2, part=r)
        assert torch.equal(sample[350 * r : 350 * (r + 1)], own)
        mine = Counter(x.tobytes() for x in torch.cat(
            [cache.read_shard(i) for i in dealt[r]]).reshape(-1, 9 * 32).numpy())
        assert not Counter(x.tobytes() for x in own.reshape(350, -1).numpy()) - mine
    smallest = min(sum(cache.shard_sizes[i] for i in p) for p in dealt)
    assert cache.sample(10**6, seed=1, parts=2).shape[0] == 2 * smallest
    assert cache.part_tokens(2, seed=1) == [sum(cache.shard_sizes[i] for i in p) for p in dealt]
    for call, match in (
        (lambda: cache.batches(100, 0, parts=6), r"has 5 shard\(s\), fewer than the 6 parts"),
        (lambda: cache.batches(101, 0, parts=2), "batch size 101 does not split into 2"),
        (lambda: cache.batches(3000, 0, parts=2), "gives 1500 tokens to a batch of 3000, but "
                                                  "the smallest part holds"),
        (lambda: cache.batches(100, 0, parts=2, part=2), r"part must lie in \[0, 2\)"),
        (lambda: cache.sample(100, 0, parts=2, part=-1), r"part must lie in \[0, 2\)"),
    ):
        with pytest.raises(CrossintError, match=match) as refused:
            call()
        assert "\n" not in str(refused.value)


# ---- in-memory source ---------------------------------------------------------------------------


def test_tensor_activations_interface():
    acts = torch.randn(103, 3, 8, dtype=torch.float64)
    src = TensorActivations(acts, ["blocks.0.resid_pre", "blocks.0.mlp_in", "blocks.1.resid_pre"])
    assert src.n_tokens == 103 and src.dims == {h: 8 for h in src.hookpoints}
    fresh = list(itertools.islice(src.batches(10, seed=2), 40))
    assert all(b.dtype == torch.float32 and b.shape == (10, 3, 8) for b in fresh)
    # 103 tokens, batches of 10: the stream wraps into the next epoch mid-batch.
    stream = torch.cat(fresh)
    assert np.array_equal(sorted_rows(stream[:103]), sorted_rows(acts.float()))
    assert np.array_equal(sorted_rows(stream[103:206]), sorted_rows(acts.float()))
    for k in (0, 9, 10, 11, 25):
        got = list(itertools.islice(src.batches(10, seed=2, start_batch=k), 3))
        assert all(torch.equal(a, b) for a, b in zip(got, fresh[k : k + 3], strict=True))
    sample = src.sample(50, seed=0)
    assert sample.shape == (50, 3, 8) and torch.equal(sample, src.sample(50, seed=0))
    assert src.sample(1000, seed=0).shape == (103, 3, 8)


def test_tensor_activations_validation():
    with pytest.raises(CrossintError, match=r"3-d tensor \[T, X, D\], got \(4, 8\)"):
        TensorActivations(torch.zeros(4, 8), ["a"])
    with pytest.raises(CrossintError, match="need 2 distinct hookpoint names"):
        TensorActivations(torch.zeros(4, 2, 8), ["a"])
    with pytest.raises(CrossintError, match="need 2 distinct hookpoint names"):
        TensorActivations(torch.zeros(4, 2, 8), ["a", "a"])
    with pytest.raises(CrossintError, match="floating point"):
        TensorActivations(torch.zeros(4, 2, 8, dtype=torch.long), ["a", "b"])
    src = TensorActivations(torch.zeros(4, 2, 8), ["a", "b"])
    with pytest.raises(CrossintError, match="batch_size must be a positive integer"):
        src.batches(0, seed=0)
