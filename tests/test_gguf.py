"""GGUF files as checkpoints: transformers' logits and token ids, dequantization, export.

The fixtures under tests/fixtures/gguf/ are tiny GGUF files written with the `gguf`
package, with transformers' reference outputs (tests/fixtures/make_gguf_fixtures.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import transformer
from models.config import ModelConfig
from serve import export as export_lib
from serve import sources
from store import gguf as gguf_lib
from store import hf
from store import tokenizer as tokenizer_lib

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "gguf"
NAMES = ("llama", "qwen2", "gemma3")
T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURES / "reference.npz")


@pytest.fixture(scope="module")
def loaded():
    return {name: sources.load_checkpoint(FIXTURES / f"{name}.gguf") for name in NAMES}


def _texts(reference) -> list[str]:
    return [str(t) for t in reference["texts"]]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, loaded, reference):
    ckpt = loaded[name]
    ids = [reference[f"{name}/{i}/ids"] for i in range(len(_texts(reference)))]
    batch = np.zeros((len(ids), max(map(len, ids))), np.int32)  # right-padded: causal, so prefixes are exact
    for row, seq in zip(batch, ids):
        row[:len(seq)] = seq
    model = transformer.Transformer(ckpt.config)
    logits = np.asarray(jax.jit(model.apply)({"params": ckpt.params}, jnp.asarray(batch))[0])
    for i, seq in enumerate(ids):
        want = reference[f"{name}/{i}/logits"]
        err = np.abs(logits[i, :len(seq)] - want).max() / np.abs(want).max()
        assert err < 1e-4, (name, i, err)


@pytest.mark.parametrize("name", NAMES)
def test_token_ids_match_transformers(name, reference):
    tok = tokenizer_lib.make_tokenizer(str(FIXTURES / f"{name}.gguf"))
    for i, text in enumerate(_texts(reference)):
        assert tok.encode_prompt(text) == reference[f"{name}/{i}/ids"].tolist(), text
        assert tok.encode(text) == reference[f"{name}/{i}/ids_plain"].tolist(), text
    first = _texts(reference)[0]
    assert tok.decode_clean(tok.encode_prompt(first)) == first


def test_the_files_chat_template_stop_ids_and_bos():
    llama = tokenizer_lib.make_tokenizer(str(FIXTURES / "llama.gguf"))
    file = gguf_lib.open_file(FIXTURES / "llama.gguf")
    assert llama.chat_template == file.get("tokenizer.chat_template")
    assert llama.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert llama.stop_ids == [2] and llama.encode_prompt("the")[0] == 1
    qwen = tokenizer_lib.make_tokenizer(str(FIXTURES / "qwen2.gguf"))
    assert qwen.decode(qwen.stop_ids) == "<|im_end|>" and "<|im_start|>" in qwen.chat_template
    assert qwen.encode_prompt("the") == qwen.encode("the")  # add_bos_token false


def _reverse_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' LlamaTensorProcessor._reverse_permute_weights, written out."""
    dim = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


@pytest.mark.parametrize("name", NAMES)
def test_each_tensor_is_gguf_quants_dequantize_in_hf_layout(name):
    reader = gguf.GGUFReader(FIXTURES / f"{name}.gguf")
    file = gguf_lib.open_file(FIXTURES / f"{name}.gguf")
    tensors = gguf_lib.Tensors(file)
    cfg = tensors.cfg
    seen = set()
    for t in reader.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if name == "llama" and ".attn_q." in t.name:
            want = _reverse_permute(want, cfg["num_attention_heads"])
        elif name == "llama" and ".attn_k." in t.name:
            want = _reverse_permute(want, cfg["num_key_value_heads"])
        elif name == "gemma3" and "norm.weight" in t.name:  # transformers' Gemma2TensorProcessor
            want = want - 1
        hf_name = gguf_lib.model.hf_name(name, t.name)
        assert tensors.info(hf_name) == ("F32", want.shape)
        np.testing.assert_array_equal(tensors.tensor(hf_name), want, err_msg=t.name)
        seen.add(t.tensor_type.name)
    assert {"F32", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"} | ({"F16", "Q5_1"} if name != "gemma3" else set()) \
        <= seen


def test_config_from_metadata(loaded):
    llama, qwen = loaded["llama"].config, loaded["qwen2"].config
    assert (llama.vocab_size, llama.d_model, llama.n_layers, llama.n_heads, llama.n_kv_heads, llama.d_ff) == \
        (337, 64, 2, 4, 2, 256)
    assert not llama.tie_embeddings and not llama.qkv_bias and llama.rope_theta == 10000.0
    assert qwen.tie_embeddings and qwen.qkv_bias and qwen.rope_theta == 1e6
    assert hf.is_hf_dir(FIXTURES / "llama.gguf") and not hf.is_hf_dir(FIXTURES / "reference.npz")


def test_export_to_a_hugging_face_directory_reloads_equal(loaded, tmp_path):
    out = export_lib.export(str(FIXTURES / "qwen2.gguf"), str(tmp_path / "bf16"), precision="bf16")
    back = hf.load(out)
    assert back.config == loaded["qwen2"].config
    flat = dict(jax.tree_util.tree_flatten_with_path(loaded["qwen2"].params)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(back.params)[0]:
        want = np.asarray(jnp.asarray(flat[path], jnp.bfloat16), np.float32)
        np.testing.assert_array_equal(np.asarray(value, np.float32), want, err_msg=str(path))
    tok, exported = (tokenizer_lib.make_tokenizer(str(FIXTURES / "qwen2.gguf")), tokenizer_lib.make_tokenizer(str(out)))
    text = "Hello there, how are you?<|im_end|>"
    assert exported.encode_prompt(text) == tok.encode_prompt(text)
    assert exported.chat_template == tok.chat_template and exported.stop_ids == tok.stop_ids


def test_init_from_a_gguf_file(loaded):
    user = ModelConfig(init_from=str(FIXTURES / "llama.gguf"), max_seq_len=32)
    config = hf.resolve_init_from(user)
    assert dataclasses.replace(config, max_seq_len=256, init_from=None) == loaded["llama"].config
    params = hf.init_params(config)
    np.testing.assert_array_equal(np.asarray(params["layers_0"]["attn"]["q_proj"]["kernel"]),
                                  np.asarray(loaded["llama"].params["layers_0"]["attn"]["q_proj"]["kernel"]))


def _write(path: Path, arch: str, tensors: dict[str, np.ndarray], **meta) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        getattr(writer, f"add_{key}")(value)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gemma3_metadata_and_norms_map_to_hugging_face(tmp_path):
    rng = np.random.default_rng(0)
    norm, q = (1 + rng.standard_normal(8)).astype(np.float32), rng.standard_normal((8, 8)).astype(np.float32)
    path = _write(tmp_path / "g.gguf", "gemma3", {"blk.0.post_ffw_norm.weight": norm, "blk.0.attn_q.weight": q,
                                                   "blk.0.ffn_norm.weight": norm},
                  embedding_length=8, block_count=7, head_count=2, head_count_kv=1, feed_forward_length=16,
                  key_length=4, sliding_window=512, context_length=32768, vocab_size=16)
    cfg = gguf_lib.read_hf_config(path)
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["head_dim"] == 4 and cfg["sliding_window"] == 512
    assert cfg["layer_types"][5] == "full_attention" and cfg["layer_types"][:5] == ["sliding_attention"] * 5
    assert cfg["tie_word_embeddings"]
    tensors = gguf_lib.open_tensors(path)
    got = tensors["model.layers.0.post_feedforward_layernorm.weight"]
    np.testing.assert_array_equal(got.tensor("model.layers.0.post_feedforward_layernorm.weight"), norm - 1)
    np.testing.assert_array_equal(got.tensor("model.layers.0.pre_feedforward_layernorm.weight"), norm - 1)
    np.testing.assert_array_equal(got.tensor("model.layers.0.self_attn.q_proj.weight"), q)  # not permuted


def test_a_tensor_of_an_unsupported_type_is_refused(tmp_path):
    path = _write(tmp_path / "i.gguf", "llama", {"token_embd.weight": np.ones((4, 8), np.int8)})
    with pytest.raises(gguf_lib.GGUFError, match=r"i.gguf: tensor token_embd.weight has type I8"):
        gguf_lib.open_file(path).dequantize("token_embd.weight")
    assert "Q4_K" in gguf_lib.supported_types() and "I8" not in gguf_lib.supported_types()


@pytest.mark.parametrize("pre, split", [("qwen2", True), ("llama-bpe", False), (None, False)])
def test_byte_level_pre_tokenizer_follows_tokenizer_ggml_pre(pre, split, tmp_path):
    spelling = tokenizer_lib.bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + ["12", "<|x|>", "<|u|>"]
    meta = dict(tokenizer_model="gpt2", token_list=tokens, token_merges=["1 2"],
                token_types=[1] * 257 + [3, 4], embedding_length=8, block_count=1, head_count=2,
                feed_forward_length=16, **({"tokenizer_pre": pre} if pre else {}))
    path = _write(tmp_path / "b.gguf", "qwen2", {"token_embd.weight": np.ones((len(tokens), 8), np.float32)}, **meta)
    tok = tokenizer_lib.make_tokenizer(str(path))
    # Qwen2's split isolates each digit; llama3's keeps up to 3 digits, GPT-2's a run of them.
    assert tok.encode("12") == ([ord("1"), ord("2")] if split else [256])
    assert tok.encode("a<|x|>b<|u|>") == [ord("a"), 257, ord("b"), 258]  # control and user-defined tokens whole


@pytest.mark.parametrize("heads", [0, -2, True, "4"])
def test_gemma3_extras_leave_bad_sizes_to_the_config_checks(heads):
    # No division by a head count of 0: the config check names the key instead.
    class NoMetadata:
        def get(self, key, default=None):
            return default

    from store.gguf import model as gguf_model
    cfg = {"hidden_size": 64, "num_attention_heads": heads, "num_hidden_layers": 2}
    assert gguf_model._gemma3(NoMetadata(), cfg) == {}
    assert gguf_model._gemma3(NoMetadata(), {**cfg, "num_attention_heads": 2})["head_dim"] == 32
