"""Hugging Face import: parity with transformers' logits, configs, safetensors, bad input.

The fixtures under tests/fixtures/hf/ are tiny random checkpoints written by
transformers (tests/fixtures/make_hf_fixtures.py) with the float32 logits transformers
computed for fixed tokens; torch and transformers are not needed here.
"""

import dataclasses
import json
import shutil
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import mpx
from models import transformer
from models.config import ModelConfig
from serve import quantize as q
from store import hf
from store.hf import config as hf_config
from store.hf import save as save_lib
from store.hf import tensors
from store.hf import weights as W

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
NAMES = ("llama3", "tinyllama", "mistral", "qwen2", "qwen3", "gemma3")
BF16_EPS = float(np.finfo(ml_dtypes.bfloat16).eps)  # 2^-7
E4M3_EPS = float(np.finfo(ml_dtypes.float8_e4m3fn).eps)  # 2^-3


def _reference(name):
    return np.load(FIXTURES / name / "reference.npz")


def _rel_err(logits, ref) -> float:
    return float(np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max())


def _logits(model_hf, spec, tokens):
    model = transformer.Transformer(model_hf.config, spec.policy())
    params = q.quantize_params(model_hf.params, model_hf.config, spec)
    return jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))[0]  # compiled: a few times faster


@pytest.fixture(scope="module")
def loaded():
    return {name: hf.load(FIXTURES / name) for name in NAMES}


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", NAMES)
def test_fp32_logits_match_transformers(loaded, name):
    ref = _reference(name)
    err = _rel_err(_logits(loaded[name], q.ServeSpec("fp32"), ref["tokens"]), ref["logits"])
    assert err <= 1e-4  # measured about 1e-6: f32 rounding only


@pytest.mark.parametrize("name", ["tinyllama", "qwen3", "gemma3"])  # bf16 weights; ragged 128-blocks; q/k norms
def test_bf16_and_fp8_logits_stay_within_their_format_bounds(loaded, name):
    ref = _reference(name)
    bf16 = _rel_err(_logits(loaded[name], q.ServeSpec("bf16"), ref["tokens"]), ref["logits"])
    fp8 = _rel_err(_logits(loaded[name], q.ServeSpec("fp8"), ref["tokens"]), ref["logits"])
    # Each matmul input rounds to the format once, relative error <= eps/2 per operand,
    # compounded over two blocks: a few eps; and each precision measurably loses.
    assert BF16_EPS / 8 <= bf16 <= 4 * BF16_EPS
    assert E4M3_EPS / 8 <= fp8 <= 2.5 * E4M3_EPS
    assert fp8 > 4 * bf16  # FP8 is a different, coarser path than bf16


def test_the_sliding_window_is_applied(loaded):
    ref = _reference("mistral")  # window 5 < 12 tokens
    m = loaded["mistral"]
    no_window = dataclasses.replace(m, config=dataclasses.replace(m.config, sliding_window=None))
    assert _rel_err(_logits(no_window, q.ServeSpec("fp32"), ref["tokens"]), ref["logits"]) > 1e-2


def test_configs_map_each_architecture(loaded):
    c = {name: m.config for name, m in loaded.items()}
    assert c["llama3"].rope_scaling.kind == "llama3" and c["llama3"].rope_scaling.original_max_len == 16
    assert not c["llama3"].tie_embeddings and c["tinyllama"].tie_embeddings
    assert c["tinyllama"].rope_scaling.kind == "linear" and c["tinyllama"].d_ff == 160
    assert c["mistral"].sliding_window == 5
    assert c["qwen2"].qkv_bias and not c["qwen2"].qk_norm
    assert c["qwen3"].qk_norm and c["qwen3"].head_dim == 16 and c["qwen3"].d_model == 32
    assert not any(cfg.embed_scale for name, cfg in c.items() if name != "gemma3")
    g = c["gemma3"]
    assert g.layer_types == ("sliding_attention",) * 3 + ("full_attention",) and g.sliding_window == 4
    assert [g.window(i) for i in range(4)] == [4, 4, 4, None] and g.query_pre_attn_scalar == 24
    assert (g.rope_theta, g.rope_local_theta) == (10000.0, 10.0) and g.rope(0)[0] == 10.0 and g.rope(3)[0] == 10000.0
    assert g.qk_norm and g.post_norms and g.norm_unit_offset and g.activation == "gelu_tanh" and g.head_dim == 32
    assert g.embed_scale and g.embed_scale_dtype == "embedding" and g.tie_embeddings and not g.qkv_bias


@pytest.mark.parametrize("change", [dict(layer_types=("full_attention",) * 4), dict(rope_local_theta=None),
                                    dict(query_pre_attn_scalar=None)], ids=["no_window", "one_rope", "head_dim_scale"])
def test_gemma3_features_each_change_the_logits(loaded, change):
    """The fixture exercises each: without it, the logits leave the reference."""
    ref, m = _reference("gemma3"), loaded["gemma3"]
    other = dataclasses.replace(m, config=dataclasses.replace(m.config, **change))
    assert _rel_err(_logits(other, q.ServeSpec("fp32"), ref["tokens"]), ref["logits"]) > 1e-3


def test_gemma3_reads_transformers_4_configs_and_writes_one_back(loaded):
    cfg = json.loads((FIXTURES / "gemma3" / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    v4 = {**cfg, "rope_theta": rope["full_attention"]["rope_theta"],
          "rope_local_base_freq": rope["sliding_attention"]["rope_theta"]}
    config = loaded["gemma3"].config
    assert hf.to_model_config(v4) == config
    v4.pop("layer_types")
    assert hf.to_model_config({**v4, "sliding_window_pattern": 4}) == config  # before layer_types
    assert hf.to_model_config({**v4, "sliding_window_pattern": 2}).layer_types == ("sliding_attention",
                                                                                 "full_attention") * 2
    written = hf_config.from_model_config(config, cfg)
    assert written["model_type"] == "gemma3_text" and written["hidden_activation"] == "gelu_pytorch_tanh"
    assert "rope_parameters" not in written and hf.to_model_config(written) == config
    with pytest.raises(hf.HFError, match="Gemma3ForCausalLM needs"):
        hf_config.from_model_config(dataclasses.replace(config, qk_norm=False))


def test_transformers_4_style_rope_keys_give_the_same_config(loaded):
    cfg = json.loads((FIXTURES / "llama3" / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in params.items()}
    assert hf.to_model_config(cfg) == loaded["llama3"].config


def test_sharded_and_single_file_checkpoints_load_the_same_tensors(loaded, tmp_path):
    index = json.loads((FIXTURES / "llama3" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    merged = {}
    for f in sorted(set(index["weight_map"].values())):
        st = tensors.SafetensorsFile(FIXTURES / "llama3" / f)
        merged.update({n: np.array(st.tensor(n)) for n in st.names()})
    directory = _copy("llama3", tmp_path, skip=("model-",))
    (directory / "model.safetensors.index.json").unlink()
    tensors.write(directory / "model.safetensors", merged.items())
    again = hf.load(directory)
    a, b = loaded["llama3"].params, again.params
    for entry in W.entries(again.config):
        np.testing.assert_array_equal(W.get(a, entry.path), W.get(b, entry.path))


def test_safetensors_written_here_read_with_the_reference_library(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((3,), np.float16)}
    tensors.write(tmp_path / "x.safetensors", arrays.items(), {"format": "pt"})
    with safetensors.safe_open(str(tmp_path / "x.safetensors"), framework="np") as f:
        assert sorted(f.keys()) == ["a", "b"] and f.metadata() == {"format": "pt"}
        for name, array in arrays.items():
            np.testing.assert_array_equal(f.get_tensor(name), array)
    bf = np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)
    tensors.write(tmp_path / "y.safetensors", [("c", bf)])
    back = tensors.SafetensorsFile(tmp_path / "y.safetensors").tensor("c")
    assert back.dtype == bf.dtype and back.tobytes() == bf.tobytes()


def test_loading_holds_one_model_plus_one_tensor(tmp_path):
    """Peak traced host memory while loading bf16 weights into float32 numpy params."""
    config = ModelConfig(vocab_size=1024, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512,
                         embed_scale=False, tie_embeddings=False)
    rng = np.random.default_rng(0)
    params = {}
    for entry in W.entries(config):
        W.put(params, entry.path, rng.standard_normal(entry.shape, np.float32))
    save_lib.save(tmp_path / "m", config, params, precision="bf16",
                  extra_files=save_lib.tokenizer_files(FIXTURES / "qwen2"))
    f32_bytes = sum(4 * int(np.prod(e.shape)) for e in W.entries(config))
    largest = max(4 * int(np.prod(e.shape)) for e in W.entries(config))
    tracemalloc.start()
    hf.load(tmp_path / "m", convert=lambda entry, value: value)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert f32_bytes <= peak <= 1.5 * f32_bytes + largest, (peak, f32_bytes)


# --------------------------------------------------------------------------- bad input


def _copy(name, tmp_path, skip=()) -> Path:
    out = tmp_path / name
    shutil.copytree(FIXTURES / name, out, ignore=lambda d, files: [f for f in files if f.startswith(skip)])
    return out


def _rewrite(directory: Path, change) -> None:
    """Rewrites model.safetensors through `change(dict of arrays)`."""
    path = directory / "model.safetensors"
    st = tensors.SafetensorsFile(path)
    arrays = {n: np.array(st.tensor(n)) for n in st.names()}
    del st
    change(arrays)
    tensors.write(path, arrays.items())


def _edit_config(directory: Path, **updates) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(updates)
    (directory / "config.json").write_text(json.dumps(cfg))


def _error(directory) -> str:
    with pytest.raises(hf.HFError) as err:
        hf.load(directory)
    return str(err.value)


def test_bad_directories_raise_one_clear_error(tmp_path):
    d = _copy("qwen2", tmp_path)
    (d / "config.json").unlink()
    assert "no config.json" in _error(d)
    d = _copy("qwen3", tmp_path)
    _edit_config(d, architectures=["GPT2LMHeadModel"])
    message = _error(d)
    assert "GPT2LMHeadModel" in message and all(a in message for a in hf.SUPPORTED)
    d = _copy("mistral", tmp_path)
    (d / "tokenizer.json").unlink()
    assert "no tokenizer.json" in _error(d)
    assert "no such model directory" in _error(tmp_path / "absent")


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16, "rope_theta": 500000.0}


@pytest.mark.parametrize("updates, message", [
    ({"hidden_size": -32}, "hidden_size: d_model must be an integer >= 1; got -32"),
    ({"num_attention_heads": 0}, "num_attention_heads: n_heads must be an integer >= 1; got 0"),
    ({"num_key_value_heads": 3}, "num_attention_heads, num_key_value_heads: n_heads=4 must be divisible by "
                                 "n_kv_heads=3"),
    ({"head_dim": 7}, "head_dim: head_dim_override must be an even integer >= 2"),
    ({"intermediate_size": 0}, "intermediate_size: d_ff must be an integer >= 1; got 0"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers must be an integer; got '2'"),
    ({"vocab_size": True}, "vocab_size must be an integer; got True"),
    ({"vocab_size": None}, "lacks 'vocab_size'"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be an integer >= 1; got 0"),
    ({"rms_norm_eps": 0}, "rms_norm_eps: norm_eps must be a finite number > 0; got 0"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false; got 'false'"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'; supported: 'silu'"),
    ({"rope_parameters": {**_LLAMA3_ROPE, "rope_type": "dynamic"}}, "unsupported rope scaling 'dynamic'"),
    ({"rope_parameters": {**_LLAMA3_ROPE, "rope_theta": -1}},
     "rope_parameters.rope_theta: rope_theta must be a finite number > 0"),
    ({"rope_theta": 0}, "json: rope_theta: rope_theta must be a finite number > 0; got 0.0"),
    ({"rope_parameters": {**_LLAMA3_ROPE, "factor": 0}}, "rope_parameters.factor: factor must be a finite number > 0"),
    ({"rope_parameters": {**_LLAMA3_ROPE, "original_max_position_embeddings": 0}},
     "rope_parameters.original_max_position_embeddings: original_max_len must be an integer >= 1; got 0"),
    ({"rope_parameters": {**_LLAMA3_ROPE, "low_freq_factor": 4.0}},
     "rope_parameters.low_freq_factor, rope_parameters.high_freq_factor: llama3 rope_scaling needs"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": -2.0}},
     "rope_scaling.factor: factor must be a finite number > 0; got -2.0"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 0},
     "sliding_window: sliding_window must be an integer >= 1, or null; got 0"),
])
def test_a_bad_config_json_value_names_the_file_and_its_key(tmp_path, updates, message):
    cfg = {**json.loads((FIXTURES / "llama3" / "config.json").read_text()), **updates}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.HFError) as err:
        hf.read_config(tmp_path)  # no weights read
    assert str(err.value).startswith(str(tmp_path / "config.json")) and message in str(err.value), err.value


_GEMMA3_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}


@pytest.mark.parametrize("updates, message", [
    ({"hidden_activation": "gelu"}, "unsupported hidden_activation 'gelu'; supported: 'gelu_pytorch_tanh'"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping 30.0 is not supported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention: true is not supported"),
    ({"layer_types": ["full_attention"]}, "layer_types, num_hidden_layers: layer_types names 1 layers; n_layers=4"),
    ({"layer_types": ["local"] * 4}, "layer_types: layer_types must be a list of 'full_attention' or"),
    ({"layer_types": "sliding_attention"}, "layer_types must be a list; got 'sliding_attention'"),
    ({"layer_types": None, "sliding_window_pattern": 0}, "sliding_window_pattern must be an integer >= 1; got 0"),
    ({"sliding_window": 0}, "sliding_window: sliding_window must be an integer >= 1, or null; got 0"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar: query_pre_attn_scalar must be a finite number > 0"),
    ({"rope_parameters": {**_GEMMA3_ROPE, "full_attention": {"rope_theta": 0}}},
     "rope_parameters.full_attention.rope_theta: rope_theta must be a finite number > 0; got 0.0"),
    ({"rope_parameters": {**_GEMMA3_ROPE, "sliding_attention": {"rope_theta": -1}}},
     "rope_parameters.sliding_attention.rope_theta: rope_local_theta must be a finite number > 0"),
    ({"rope_parameters": {**_GEMMA3_ROPE, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "rope scaling of the sliding layers (rope_parameters.sliding_attention) is not supported"),
    ({"rope_parameters": None, "rope_theta": 1e6, "rope_local_base_freq": "x"},
     "rope_local_base_freq must be a number; got 'x'"),
])
def test_a_bad_gemma3_config_json_value_names_its_key(tmp_path, updates, message):
    cfg = {**json.loads((FIXTURES / "gemma3" / "config.json").read_text()), **updates}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.HFError) as err:
        hf.read_config(tmp_path)
    assert str(err.value).startswith(str(tmp_path / "config.json")) and message in str(err.value), err.value


def test_bad_tensors_are_named(tmp_path):
    d = _copy("qwen2", tmp_path)
    _rewrite(d, lambda a: a.pop("model.layers.1.self_attn.k_proj.bias"))
    assert "model.layers.1.self_attn.k_proj.bias is missing" in _error(d)
    d = _copy("tinyllama", tmp_path / "shape")
    _rewrite(d, lambda a: a.update({"model.layers.0.mlp.up_proj.weight": np.zeros((32, 160), ml_dtypes.bfloat16)}))
    message = _error(d)
    assert "model.layers.0.mlp.up_proj.weight" in message and "[32, 160]" in message and "[160, 32]" in message
    d = _copy("tinyllama", tmp_path / "dtype")
    _rewrite(d, lambda a: a.update({"model.norm.weight": np.zeros((32,), np.int64)}))
    assert "model.norm.weight has dtype I64" in _error(d)
    d = _copy("tinyllama", tmp_path / "extra")
    _rewrite(d, lambda a: a.update({"model.layers.0.self_attn.o_proj.bias": np.zeros((32,), np.float32)}))
    assert "o_proj.bias" in _error(d)


def test_unknown_dtype_in_a_header_is_named(tmp_path):
    path = tmp_path / "odd.safetensors"
    tensors.write(path, [("x", np.zeros(4, np.float32))])
    raw = path.read_bytes().replace(b'"F32"', b'"F4X"')
    path.write_bytes(raw)
    with pytest.raises(tensors.TensorFileError, match="x has dtype F4X"):
        tensors.SafetensorsFile(path).tensor("x")


def test_block_fp8_scales_of_the_wrong_shape_are_named(tmp_path):
    d = _copy("qwen3", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps(cfg))

    def to_fp8(arrays):
        name = "model.layers.0.mlp.up_proj.weight"
        arrays[name] = np.asarray(arrays[name], np.float32).astype(ml_dtypes.float8_e4m3fn)
        arrays[name + "_scale_inv"] = np.ones((2, 2), np.float32)

    _rewrite(d, to_fp8)
    assert "up_proj.weight_scale_inv has shape [2, 2]" in _error(d)
    _edit_config(d, quantization_config={"quant_method": "gptq"})
    assert "unsupported quantization_config" in _error(d)


def test_mpx_is_not_confused_by_a_training_run(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert not hf.is_hf_dir(tmp_path / "run")
    assert hf.is_hf_dir(FIXTURES / "qwen2")


def test_training_starts_from_a_hugging_face_directory(loaded, tmp_path):
    user = ModelConfig(init_from=str(FIXTURES / "qwen3"), max_seq_len=32, remat="full")
    config = hf.resolve_init_from(user)
    assert config.qk_norm and config.head_dim == 16 and config.max_seq_len == 32 and config.remat == "full"
    params = hf.init_params(config)
    for entry in W.entries(config):
        np.testing.assert_array_equal(W.get(params, entry.path), W.get(loaded["qwen3"].params, entry.path))
    save_lib.save(tmp_path / "fp8", config, params, precision="fp8")  # block-FP8 weights come back dequantized
    fp8 = hf.init_params(dataclasses.replace(config, init_from=str(tmp_path / "fp8")))
    kernel = W.get(fp8, ("layers_0", "mlp", "up", "kernel"))
    assert kernel.dtype == jnp.float32 and not np.array_equal(kernel, W.get(params, ("layers_0", "mlp", "up", "kernel")))
    assert hf.resolve_init_from(ModelConfig()) == ModelConfig()
    with pytest.raises(hf.HFError, match="another model"):
        hf.init_params(dataclasses.replace(config, d_ff=96))


# --------------------------------------------------------------------------- serving and evaluation


def test_load_for_serving_quantizes_as_it_loads_and_keeps_block_fp8_as_stored(tmp_path):
    from serve import sources

    model, variables, tok, ckpt = sources.load_for_serving(FIXTURES / "tinyllama", q.ServeSpec("fp8"))
    kernel = variables["params"]["layers_0"]["mlp"]["down"]["kernel"]
    assert isinstance(kernel, mpx.ScaledArray) and ckpt.step == 0 and tok.chat_template
    assert variables["params"]["embed"]["embedding"].dtype == jnp.bfloat16
    assert sources.fp32_bytes(ckpt) == 4 * sum(int(np.prod(e.shape)) for e in W.entries(ckpt.config))
    save_lib.save(tmp_path / "fp8", ckpt.config, ckpt.params, precision="fp8",
                  extra_files=save_lib.tokenizer_files(FIXTURES / "tinyllama"))
    _, again, _, _ = sources.load_for_serving(tmp_path / "fp8", q.ServeSpec("fp8"))
    stored = again["params"]["layers_0"]["mlp"]["down"]["kernel"]
    assert np.asarray(stored.data).tobytes() == np.asarray(kernel.data).tobytes()  # served as stored
    _, f32, _, _ = sources.load_for_serving(tmp_path / "fp8", q.ServeSpec("fp32"))
    np.testing.assert_array_equal(f32["params"]["layers_0"]["mlp"]["down"]["kernel"], mpx.dequantize(stored))


def test_evaluate_on_any_text_ends_with_one_json_object(tmp_path, capsys):
    from serve import evaluate

    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 8})
                              for _ in range(4)))
    code = evaluate.main(["--checkpoint", str(FIXTURES / "llama3"), "--data", str(text), "--seq-len", "32",
                          "--windows", "4", "--variants", "bf16,fp8", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out[-1])["variants"]}
    assert list(rows) == ["fp32", "bf16", "fp8"]  # the fp32 reference leads
    assert set(rows["fp8"]) == {"name", "ppl", "ppl_change_pct", "weight_bytes", "logits_cos", "top1_agreement", "kl"}
    assert rows["fp32"]["ppl_change_pct"] == 0 and rows["fp32"]["kl"] == 0 and rows["fp32"]["top1_agreement"] == 1
    assert rows["fp8"]["weight_bytes"] < rows["bf16"]["weight_bytes"] < rows["fp32"]["weight_bytes"]
    assert rows["fp8"]["kl"] > rows["bf16"]["kl"] > 0 and rows["fp8"]["logits_cos"] < 1
    assert 1 < rows["fp32"]["ppl"] < 2 * 128  # a random 128-token model: near-uniform, finite


@pytest.mark.parametrize("argv, message", [
    (["--variants", "fp8,int4"], "unknown variant 'int4'"),
    (["--seq-len", "1000"], "--seq-len 1000 exceeds the model's context 256"),
    (["--windows", "0"], "--windows"),
])
def test_evaluate_text_mistakes_exit_2(tmp_path, capsys, argv, message):
    from serve import evaluate

    text = tmp_path / "t.txt"
    text.write_text("hello there " * 50)
    try:
        code = evaluate.main(["--checkpoint", str(FIXTURES / "qwen2"), "--data", str(text), *argv])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("program", ["generate", "evaluate", "export"])
def test_every_cli_refuses_a_bad_hugging_face_directory_in_one_line(tmp_path, capsys, program):
    import importlib

    d = _copy("qwen3", tmp_path)
    _edit_config(d, architectures=["BertModel"])
    argv = {"generate": ["--prompt", "hi"], "evaluate": [], "export": ["--out", str(tmp_path / "out")]}[program]
    code = importlib.import_module(f"serve.{program}").main(["--checkpoint", str(d), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: unsupported architecture BertModel") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_export_with_a_policy_writes_only_its_fp8_layers_and_reimports_bit_exactly(tmp_path):
    from serve import export, sources

    policy = tmp_path / "mlp_fp8.yaml"
    policy.write_text("name: mlp_fp8\nbase: bf16\nrules:\n  - match: mlp/*\n    recipe: deepseek_v3\n")
    a, b = tmp_path / "a", tmp_path / "b"
    export.export(str(FIXTURES / "qwen3"), str(a), policy=str(policy))
    st = tensors.SafetensorsFile(a / "model.safetensors")
    for name in st.names():
        dtype, _ = st.info(name)
        if ".mlp." in name and name.endswith("proj.weight"):
            assert dtype == "F8_E4M3" and name + "_scale_inv" in st.names()
        elif not name.endswith("_scale_inv"):
            assert dtype == "BF16", name  # attention, norms, embeddings
    spec = q.policy_spec(str(policy))
    served = sources.load_hf(a, spec).params
    direct = q.quantize_params(hf.load(FIXTURES / "qwen3").params, hf.read_config(FIXTURES / "qwen3"), spec)
    for layer in ("layers_0", "layers_1"):
        for name in ("gate", "up", "down"):
            got, want = served[layer]["mlp"][name]["kernel"], direct[layer]["mlp"][name]["kernel"]
            assert np.asarray(got.data).tobytes() == np.asarray(want.data).tobytes()
            np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))
    export.export(str(a), str(b), policy=str(policy))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with pytest.raises(hf.HFError, match="--policy .*--precision bf16"):
        export.export(str(FIXTURES / "qwen3"), str(tmp_path / "c"), precision="bf16", policy=str(policy))


def test_gemma3_cached_greedy_generation_equals_recomputing_past_the_window(loaded):
    from serve import engine as engine_lib

    m, spec = loaded["gemma3"], q.ServeSpec("fp32")
    engine = engine_lib.Engine(transformer.Transformer(m.config, spec.policy()),
                               {"params": q.quantize_params(m.params, m.config, spec)}, kv_cache="fp32", chunk=8)
    tokens = _reference("gemma3")["tokens"]
    prompts = [tokens[0, :9].tolist(), tokens[1, :6].tolist()]  # longer than the window of 4
    cached, _ = engine.generate(prompts, max_new_tokens=8)
    recomputed, _ = engine.generate(prompts, max_new_tokens=8, use_cache=False)
    assert [g.tokens for g in cached] == [g.tokens for g in recomputed] and len(cached[0].tokens) == 8


def test_gemma3_exports_and_reloads_as_gemma3(loaded, tmp_path):
    from serve import export

    out = export.export(str(FIXTURES / "gemma3"), str(tmp_path / "bf16"), precision="bf16")
    again, m = hf.load(out), loaded["gemma3"]
    written = json.loads((out / "config.json").read_text())
    assert again.config == m.config and written["architectures"] == ["Gemma3ForCausalLM"]
    names = set(tensors.SafetensorsFile(out / "model.safetensors").names())
    assert "lm_head.weight" not in names and "model.layers.0.post_feedforward_layernorm.weight" in names
    for entry in W.entries(m.config):  # bf16 weights: exported as they are
        np.testing.assert_array_equal(W.get(again.params, entry.path), W.get(m.params, entry.path))
    fp8 = hf.load(export.export(str(out), str(tmp_path / "fp8"), precision="fp8"))
    assert fp8.config == m.config and isinstance(W.get(fp8.params, ("layers_3", "mlp", "down", "kernel")), mpx.ScaledArray)
