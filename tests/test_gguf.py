"""GGUF checkpoints (llama.cpp): tiny random models written with the `gguf` package's GGUFWriter,
exactly as llama.cpp's converter lays them out, then loaded through crossint.load_model."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from conftest import TINY_TEXT, build_tiny_tokenizer
from crossint.cli import main
from crossint.errors import CrossintError
from crossint.models.adapter import ModelAdapter, load_model

N_BLOCKS, D_MODEL, D_MLP, N_HEADS, N_KV_HEADS = 2, 32, 64, 4, 2


@pytest.fixture(scope="module")
def gguf():
    return pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tokenizer():
    # 320 > the byte alphabet + special token, so the BPE has merges to write.
    return build_tiny_tokenizer(vocab_size=320)


def _llama_cpp_permute(w, n_heads: int):
    """llama.cpp's convert_hf_to_gguf reorders each q/k head's rows from the rotate-half to the
    interleaved rotary layout; transformers' loader must undo it."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))  # fmt: skip


def write_gguf(gguf, model, tokenizer, path, quantize=None):
    """Write a transformers model and its byte-level BPE tokenizer to ``path`` the way
    llama.cpp's converter does: GGUF tensor names from gguf's own name map, llama q/k permuted,
    GPT-2 Conv1D weights stored out×in, 2-D weights optionally quantised (e.g. Q8_0)."""
    import numpy as np

    config = model.config
    arch = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}[config.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    if arch == "gpt2":
        n_blocks, n_heads, n_kv = config.n_layer, config.n_head, config.n_head
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(4 * config.n_embd)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        n_blocks, n_heads = config.num_hidden_layers, config.num_attention_heads
        n_kv = config.num_key_value_heads
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(config.hidden_size // n_heads)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_block_count(n_blocks)
    writer.add_head_count(n_heads)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == tokenizer.eos_token else 1 for t in tokens])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                             for m in state["model"]["merges"]])  # fmt: skip
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, n_blocks)
    for key, tensor in model.state_dict().items():
        module, suffix = key.rsplit(".", 1)
        name = names.get_name(module)
        if name is None:
            continue  # buffers such as GPT-2's causal mask
        w = tensor.detach().float().numpy()
        role = name.rsplit(".", 1)[-1]
        if arch == "llama" and role in ("attn_q", "attn_k"):
            w = _llama_cpp_permute(w, n_heads if role == "attn_q" else n_kv)
        if arch == "gpt2" and w.ndim == 2 and role in ("attn_qkv", "attn_output", "ffn_up",
                                                       "ffn_down"):  # fmt: skip
            w = w.T
        w = np.ascontiguousarray(w)
        if quantize is not None and w.ndim == 2:
            writer.add_tensor(f"{name}.{suffix}", gguf.quants.quantize(w, quantize),
                              raw_dtype=quantize)  # fmt: skip
        else:
            writer.add_tensor(f"{name}.{suffix}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _random_model(family: str, vocab_size: int, tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab_size, hidden_size=D_MODEL, intermediate_size=D_MLP,
        num_hidden_layers=N_BLOCKS, num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    else:
        # transformers reads a GPT-2 file's context length into n_ctx only, so n_positions must
        # be GPT-2's default 1024 for the position table to fit.
        model = tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=vocab_size, n_positions=1024, n_embd=D_MODEL, n_layer=N_BLOCKS,
            n_head=N_HEADS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ))  # fmt: skip
    with torch.no_grad():  # norms and biases away from their 1/0 init, so wrong ones show
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_llama(gguf, tokenizer, tmp_path_factory):
    """(the original transformers model, the .gguf file written from it)."""
    model = _random_model("llama", len(tokenizer), tokenizer)
    path = write_gguf(gguf, model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return model, path


@pytest.fixture(scope="module")
def adapter(tiny_llama):
    return load_model(tiny_llama[1])


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))


def test_gguf_loads_with_the_original_logits(tiny_llama, adapter):
    model, path = tiny_llama
    assert adapter.name == str(path)
    assert (adapter.family, adapter.model_type) == ("llama", "llama")
    assert (adapter.n_blocks, adapter.d_model, adapter.d_mlp) == (N_BLOCKS, D_MODEL, D_MLP)
    assert adapter.dtype == torch.float32
    # A plain dense model: no GGUF quantizer left attached.
    assert getattr(adapter.model, "hf_quantizer", None) is None
    assert getattr(adapter.model.config, "quantization_config", None) is None
    ids = _ids(adapter.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(adapter.logits(ids), model(ids).logits, rtol=1e-5, atol=1e-6)


def test_gguf_tokenizer_is_rebuilt_from_the_metadata(tokenizer, adapter):
    assert adapter.tokenizer is not None
    for text in [*TINY_TEXT, "Unseen words, digits 123 and ümlauts!"]:
        assert adapter.tokenizer(text).input_ids == tokenizer(text).input_ids
    assert adapter.tokenizer.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.eos_token_id in adapter.special_token_ids()


def test_gguf_capture_weights_and_unpermuted_attention(tiny_llama, adapter):
    model, _ = tiny_llama
    reference = ModelAdapter(model, name="reference")
    ids = _ids(adapter.vocab_size)
    got, want = adapter.capture(ids, "paper"), reference.capture(ids, "paper")
    assert list(got) == list(want) and len(got) == 4 * N_BLOCKS + 1
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    acts = adapter.capture(ids, ["blocks.1.mlp_in", "blocks.1.mlp_out"])
    torch.testing.assert_close(adapter.mlp_weights(1).forward(acts["blocks.1.mlp_in"]),
                               acts["blocks.1.mlp_out"], rtol=1e-5, atol=1e-6)  # fmt: skip
    # llama.cpp's q/k row permutation is undone: per-head weights equal the original's.
    for block in range(N_BLOCKS):
        a, b = adapter.attention_weights(block), reference.attention_weights(block)
        assert torch.equal(a.W_Q_ADd, b.W_Q_ADd) and torch.equal(a.W_K_ADd, b.W_K_ADd)
        assert a.n_kv_heads == N_KV_HEADS


def test_gguf_dequantises_to_the_requested_dtype(tiny_llama):
    model, path = tiny_llama
    half = load_model(path, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in half.model.parameters())
    ids = _ids(half.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(half.logits(ids).float(), model(ids).logits, rtol=0, atol=0.02)


def test_quantised_gguf_is_dequantised_exactly(gguf, tokenizer, tmp_path):
    q8 = gguf.GGMLQuantizationType.Q8_0
    model = _random_model("llama", len(tokenizer), tokenizer)
    path = write_gguf(gguf, model, tokenizer, tmp_path / "tiny-Q8_0.gguf", quantize=q8)
    adapter = load_model(path)
    assert adapter.dtype == torch.float32

    def round_trip(w):  # what llama.cpp's Q8_0 keeps of a weight, as float32
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q8), q8))

    layer, got = model.model.layers[1], adapter.model.model.layers[1]
    for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.o_proj",
                 "self_attn.q_proj", "self_attn.k_proj"):  # fmt: skip
        # Q8_0 blocks run along rows, so the q/k row permutation commutes with quantisation.
        want = round_trip(layer.get_submodule(name).weight.detach())
        assert torch.equal(got.get_submodule(name).weight, want), name
    ids = _ids(adapter.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(adapter.logits(ids), model(ids).logits, rtol=0, atol=0.02)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_other_gguf_families_load_exactly(gguf, tokenizer, tmp_path, family):
    model = _random_model(family, len(tokenizer), tokenizer)
    path = write_gguf(gguf, model, tokenizer, tmp_path / f"{family}.gguf")
    adapter = load_model(path)
    assert adapter.model_type == family
    ids = _ids(adapter.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(adapter.logits(ids), model(ids).logits, rtol=1e-5, atol=1e-6)
    acts = adapter.capture(ids, ["blocks.0.mlp_in", "blocks.0.mlp_out"])
    torch.testing.assert_close(adapter.mlp_weights(0).forward(acts["blocks.0.mlp_in"]),
                               acts["blocks.0.mlp_out"], rtol=1e-5, atol=1e-5)  # fmt: skip


def test_gguf_model_saves_as_a_plain_checkpoint(tiny_llama, adapter, tmp_path):
    adapter.model.save_pretrained(tmp_path / "hf")
    adapter.tokenizer.save_pretrained(tmp_path / "hf")
    again = load_model(tmp_path / "hf")
    ids = _ids(adapter.vocab_size)
    with torch.no_grad():
        assert torch.equal(again.logits(ids), adapter.logits(ids))


def test_a_directory_holding_gguf_files_points_at_them(tiny_llama):
    message = _error(tiny_llama[1].parent)
    assert f"pass its path: {tiny_llama[1]}" in message


def test_gguf_magic_is_recognised_without_the_suffix(tiny_llama, tmp_path):
    path = tmp_path / "weights.bin"
    shutil.copyfile(tiny_llama[1], path)
    assert load_model(path).n_blocks == N_BLOCKS


def test_harvest_cli_reads_a_gguf_file(tiny_llama, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "cache"
    code = main(["harvest", "--model", str(tiny_llama[1]), "--corpus", str(tiny_text_file),
                 "--tokens", "200", "--context-length", "16", "--batch-size", "4",
                 "--device", "cpu", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    assert manifest["complete"] and manifest["model"] == str(tiny_llama[1])
    assert manifest["model_info"]["model_type"] == "llama"


# -- errors: one line naming the file and why ----------------------------------------------------


def _error(path) -> str:
    with pytest.raises(CrossintError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_missing_gguf_file(tmp_path):
    message = _error(tmp_path / "nowhere.gguf")
    assert "nowhere.gguf" in message and "does not exist" in message


@pytest.mark.parametrize("cut", [100, 0.5, -10])
def test_truncated_gguf_file(tiny_llama, tmp_path, cut):
    data = tiny_llama[1].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    message = _error(path)
    assert str(path) in message and "truncated" in message


NOISE = bytes(range(256)) * 40


def test_garbage_gguf_files(tmp_path):
    path = tmp_path / "noise.gguf"
    for content in (NOISE, b""):
        path.write_bytes(content)
        message = _error(path)
        assert str(path) in message and "not a GGUF file" in message


def test_gguf_magic_then_garbage(gguf, tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(b"GGUF" + NOISE)
    message = _error(path)
    assert str(path) in message and "corrupt" in message


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_missing_gguf_packages(package, monkeypatch, capsys, tmp_path):
    if package != "gguf":
        pytest.importorskip("gguf")  # checked first
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(100))  # the package check comes before any parsing
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` now raises ImportError
    message = _error(path)
    assert f"needs the '{package}' package: pip install 'crossint[gguf]'" in message
    code = main(["harvest", "--model", str(path), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "crossint[gguf]" in err[0], err
    assert not (tmp_path / "c").exists()


def _metadata_only(gguf, path, arch: str):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(32064)  # room for default special tokens (phi3 puts them at 32000+)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_architecture_crossint_does_not_support(gguf, tmp_path):
    # transformers reads stablelm GGUF files; crossint's adapter has no table entry for it.
    path = _metadata_only(gguf, tmp_path / "stablelm.gguf", "stablelm")
    message = _error(path)
    assert str(path) in message and "unsupported model type 'stablelm'" in message
    assert ("crossint reads GGUF files of gemma2, gpt2, llama, mistral, phi3, qwen2, qwen3"
            in message)


def test_gguf_architecture_transformers_cannot_read(gguf, tmp_path):
    path = _metadata_only(gguf, tmp_path / "odd.gguf", "nonesuch")
    message = _error(path)
    assert str(path) in message and "nonesuch" in message
