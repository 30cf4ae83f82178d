"""DeepSeek-V3 Hugging Face checkpoints: config.json, DeepSeek's per-expert and block-FP8
layouts in and out, and parity with transformers' logits and greedy tokens.

The fixtures (tests/fixtures/make_hf_fixtures.py) are tiny random DeepseekV3ForCausalLM
checkpoints: `deepseek_v3` in float32 with q through a latent and a multi-token-prediction
layer on disk, `deepseek_v3_fp8` in DeepSeek's released block-FP8 layout with ragged
128x128 blocks, a plain q_proj and a transformers-4 style config.json.
"""

import dataclasses
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import mpx
from models import transformer
from models.config import ModelConfig, RopeScaling
from serve import quantize as q
from store import hf
from store.hf import config as hf_config
from store.hf import save as save_lib
from store.hf import tensors
from store.hf import weights as W
from tests.test_hf import FIXTURES, _copy, _edit_config, _error, _logits, _reference, _rel_err, _rewrite

NAMES = ("deepseek_v3", "deepseek_v3_fp8")
E4M3_EPS = float(np.finfo(ml_dtypes.float8_e4m3fn).eps)  # 2^-3
BF16 = np.dtype(ml_dtypes.bfloat16)
MTP = "model.layers.3."  # deepseek_v3's multi-token-prediction layer (num_hidden_layers 3)


@pytest.fixture(scope="module")
def loaded():
    return {name: hf.load(FIXTURES / name) for name in NAMES}


def _tensors(directory) -> dict[str, np.ndarray]:
    st = tensors.SafetensorsFile(directory / "model.safetensors")
    return {n: np.array(st.tensor(n)) for n in st.names()}


def _copy_tree(tree: dict) -> dict:
    return {k: _copy_tree(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _config_json(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


# --------------------------------------------------------------------------- config.json


def test_config_json_maps_onto_latent_attention_and_deepseek_moe(loaded):
    c = loaded["deepseek_v3"].config
    assert (c.kv_lora_rank, c.q_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (32, 48, 16, 8, 16)
    assert c.is_mla and c.n_kv_heads == c.n_heads == 4 and c.head_dim == 24 and c.rope_interleave
    assert (c.n_experts, c.top_k, c.first_k_dense, c.d_ff, c.moe_d_ff, c.n_shared_experts) == (8, 2, 1, 64, 32, 1)
    assert (c.router_score, c.topk_method, c.n_group, c.topk_group) == ("sigmoid", "noaux_tc", 4, 2)
    assert c.norm_topk_prob and c.routed_scaling_factor == 2.5 and c.moe_every == 1
    assert c.rope_scaling == RopeScaling("yarn", 4.0, original_max_len=16, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                                         mscale_all_dim=0.707)
    assert [c.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert not c.embed_scale and not c.tie_embeddings and c.max_seq_len == 64
    f = loaded["deepseek_v3_fp8"].config  # rope_theta + rope_scaling {"type": "yarn"}, as DeepSeek writes it
    assert f.q_lora_rank is None and (f.d_model, f.d_ff, f.moe_d_ff, f.n_heads) == (160, 192, 144, 2)
    assert f.rope_scaling == c.rope_scaling and f.rope_theta == c.rope_theta == 10000.0


def test_both_config_styles_and_deepseeks_routing_keys_give_one_config(loaded):
    cfg = _config_json("deepseek_v3")
    rope = cfg.pop("rope_parameters")
    v4 = {**cfg, "rope_theta": rope.pop("rope_theta"),
          "rope_scaling": {"type" if k == "rope_type" else k: v for k, v in rope.items()}}
    released = {**v4, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1}
    assert hf.to_model_config(v4) == hf.to_model_config(released) == loaded["deepseek_v3"].config
    other = hf.to_model_config({**released, "topk_method": "group_limited_greedy", "scoring_func": "softmax"})
    assert (other.topk_method, other.router_score) == ("group_limited_greedy", "softmax")


def test_config_json_is_written_back_as_deepseek_v3(loaded):
    for m in loaded.values():
        written = hf_config.from_model_config(m.config, m.hf_config)
        assert written["architectures"] == ["DeepseekV3ForCausalLM"] and written["model_type"] == "deepseek_v3"
        assert written["num_nextn_predict_layers"] == 0 and written["head_dim"] == m.config.qk_rope_head_dim
        assert "rope_parameters" not in written and hf.to_model_config(written) == m.config
    c = dataclasses.replace(m.config, topk_method="greedy", router_score="softmax", norm_topk_prob=False)
    assert hf.to_model_config(hf_config.from_model_config(c)) == c
    assert hf.to_model_config(hf_config.from_model_config(dataclasses.replace(c, n_experts=0))).n_experts == 0
    with pytest.raises(hf.HFError, match="DeepseekV3ForCausalLM .* needs .*got n_kv_heads=1"):
        hf_config.from_model_config(dataclasses.replace(c, n_kv_heads=1))
    with pytest.raises(hf.HFError, match="needs multi-head latent attention"):
        hf_config.from_model_config(ModelConfig(n_experts=4))


_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
         "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32.0, "beta_slow": 1.0}


@pytest.mark.parametrize("updates, message", [
    ({"topk_method": "top2"}, "unknown topk_method 'top2'; allowed: 'greedy', 'group_limited_greedy', 'noaux_tc'"),
    ({"scoring_func": "relu"}, "unknown scoring_func 'relu'; allowed: 'softmax', 'sigmoid'"),
    ({"n_group": 3}, "n_group, n_routed_experts: n_group=3 must divide n_experts=8"),
    ({"topk_group": 5}, "topk_group, n_group: topk_group=5 must be in [1, n_group=4]"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok, topk_group: top_k=5 exceeds the 2 x 2 experts"),
    ({"attention_bias": True}, "DeepseekV3ForCausalLM with attention_bias: true is not supported"),
    ({"moe_layer_freq": 2}, "moe_layer_freq 2 is not supported; supported: 1"),
    ({"num_key_value_heads": 2}, "num_key_value_heads 2 must equal num_attention_heads 4"),
    ({"kv_lora_rank": None}, "lacks 'kv_lora_rank'"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim: qk_rope_head_dim must be an even integer"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'; supported: 'silu'"),
    ({"rope_parameters": {**_YARN, "truncate": False}}, "rope_parameters.truncate False is not supported"),
    ({"rope_parameters": {**_YARN, "original_max_position_embeddings": None}},
     "lacks 'rope_parameters.original_max_position_embeddings'"),
    ({"rope_parameters": {**_YARN, "mscale": "1"}}, "rope_parameters.mscale must be a number; got '1'"),
    ({"rope_parameters": {**_YARN, "rope_type": "longrope"}}, "unsupported rope scaling 'longrope'"),
])
def test_a_bad_deepseek_config_json_value_names_its_key(tmp_path, updates, message):
    (tmp_path / "config.json").write_text(json.dumps({**_config_json("deepseek_v3"), **updates}))
    with pytest.raises(hf.HFError) as err:
        hf.read_config(tmp_path)  # no weights read
    assert str(err.value).startswith(str(tmp_path / "config.json")) and message in str(err.value), err.value


def test_a_config_json_without_q_lora_rank_is_refused(tmp_path):
    cfg = _config_json("deepseek_v3")
    del cfg["q_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.HFError, match="lacks 'q_lora_rank' \\(null: queries through one q_proj\\)"):
        hf.read_config(tmp_path)


# --------------------------------------------------------------------------- tensors


def test_every_tensor_maps_to_its_param_and_back_exactly(loaded):
    m, stored = loaded["deepseek_v3"], _tensors(FIXTURES / "deepseek_v3")
    seen = set()
    for entry in W.entries(m.config):
        param = np.asarray(W.get(m.params, entry.path))
        for j, name in enumerate(entry.names()):
            np.testing.assert_array_equal(W.to_hf(entry, W.expert(param, j) if entry.experts else param), stored[name])
            seen.add(name)
    assert seen == {n for n in stored if not n.startswith(MTP)}
    down = W.get(m.params, ("layers_2", "moe", "experts", "down", "kernel"))  # (E, F, D), expert j's weight.T
    assert down.shape == (8, 32, 64)
    np.testing.assert_array_equal(down[5], stored["model.layers.2.mlp.experts.5.down_proj.weight"].T)


def test_the_multi_token_prediction_layer_is_skipped_with_one_note(loaded, tmp_path):
    (note,) = loaded["deepseek_v3"].notes
    assert note.startswith(f"skipped the multi-token-prediction layer(s) {MTP}* (16 tensors)") and \
        "next token only" in note
    assert loaded["deepseek_v3_fp8"].notes == ()
    d = _copy("deepseek_v3", tmp_path)
    _edit_config(d, num_nextn_predict_layers=0)  # then the layer's tensors fit no part of the model
    assert "tensor(s) model.layers.3." in _error(d) and "are not part of this model" in _error(d)


def test_bad_expert_tensors_are_named(tmp_path):
    d = _copy("deepseek_v3", tmp_path)
    _rewrite(d, lambda a: a.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    assert "tensor model.layers.2.mlp.experts.5.up_proj.weight is missing (the config gives shape [32, 64])" in \
        _error(d)
    d = _copy("deepseek_v3", tmp_path / "shape")
    _rewrite(d, lambda a: a.update({"model.layers.1.mlp.experts.3.down_proj.weight": np.zeros((64, 16), np.float32)}))
    assert "tensor model.layers.1.mlp.experts.3.down_proj.weight has shape [64, 16]; the config gives [64, 32]" in \
        _error(d)
    d = _copy("deepseek_v3_fp8", tmp_path / "mixed")
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"

    def to_float(arrays):
        arrays[name] = arrays[name].astype(np.float32)
        del arrays[name + "_scale_inv"]

    _rewrite(d, to_float)
    assert f"tensor {name} is not block-FP8 but model.layers.1.mlp.experts.0.gate_proj.weight is" in _error(d)


# --------------------------------------------------------------------------- export


def test_bf16_export_writes_deepseeks_layout_and_reads_back(loaded, tmp_path, capsys):
    from serve import export

    m, a = loaded["deepseek_v3"], tmp_path / "a"
    code = export.main(["--checkpoint", str(FIXTURES / "deepseek_v3"), "--out", str(a), "--precision", "bf16"])
    assert code == 0 and "note: skipped the multi-token-prediction layer(s)" in capsys.readouterr().err
    written, cfg = _tensors(a), json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["num_nextn_predict_layers"] == 0
    assert set(written) == {n for n in _tensors(FIXTURES / "deepseek_v3") if not n.startswith(MTP)}
    assert written["model.layers.1.mlp.gate.weight"].dtype == np.float32  # the router, as transformers keeps it
    assert written["model.layers.1.mlp.experts.7.down_proj.weight"].dtype == BF16
    again = hf.load(a)
    assert again.config == m.config and again.notes == ()
    for entry in W.entries(m.config):
        want = np.asarray(W.get(m.params, entry.path))
        want = want if entry.module.endswith("moe/router") else want.astype(BF16).astype(np.float32)
        np.testing.assert_array_equal(W.get(again.params, entry.path), want)
    export.export(str(a), str(tmp_path / "b"), precision="bf16")
    assert (a / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_fp8_export_writes_each_expert_in_block_fp8(loaded, tmp_path):
    m = loaded["deepseek_v3"]
    out = save_lib.save(tmp_path / "fp8", m.config, m.params, precision="fp8", base_config=m.hf_config)
    written = _tensors(out)
    fp8 = {n for n, a in written.items() if a.dtype == ml_dtypes.float8_e4m3fn}
    linears = {n for n in written if n.endswith("proj.weight") or n.endswith("proj_with_mqa.weight")}
    assert fp8 == linears and all(n + "_scale_inv" in written for n in fp8)
    assert "model.layers.2.mlp.experts.7.up_proj.weight" in fp8 and "model.layers.0.self_attn.kv_b_proj.weight" in fp8
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    kernel = W.get(hf.load(out, need_tokenizer=False).params, ("layers_1", "moe", "experts", "gate", "kernel"))
    assert isinstance(kernel, mpx.ScaledArray) and kernel.shape == (8, 64, 32) and kernel.block == (1, 64, 32)
    want = np.asarray(W.get(m.params, ("layers_1", "moe", "experts", "gate", "kernel")))
    err = np.abs(np.asarray(mpx.dequantize(kernel)) - want).max(axis=(1, 2)) / np.abs(want).max(axis=(1, 2))
    assert np.all(err <= E4M3_EPS / 2) and np.all(err > 0)  # one scale per expert: each within half an E4M3 step


def test_a_block_fp8_checkpoint_loads_as_stored_and_exports_bit_exactly(loaded, tmp_path):
    m, source = loaded["deepseek_v3_fp8"], _tensors(FIXTURES / "deepseek_v3_fp8")
    experts = W.get(m.params, ("layers_1", "moe", "experts", "down", "kernel"))
    assert isinstance(experts, mpx.ScaledArray) and experts.shape == (8, 144, 160) and experts.block == (1, 128, 128)
    assert experts.scale.shape == (8, 2, 2)  # ragged: 144 = 128 + 16, 160 = 128 + 32
    np.testing.assert_array_equal(np.asarray(experts.scale[3]).T,
                                  source["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"])
    a = save_lib.save(tmp_path / "a", m.config, m.params, precision="fp8", base_config=m.hf_config)
    written = _tensors(a)
    assert set(written) == set(source)
    for name, array in source.items():
        same = written[name].tobytes() == array.tobytes()
        assert same or (name == "model.layers.1.mlp.gate.weight" and  # the router: bf16 -> f32, exactly
                        np.array_equal(written[name], array.astype(np.float32))), name
    again = hf.load(a, need_tokenizer=False)
    assert again.config == m.config
    b = save_lib.save(tmp_path / "b", again.config, again.params, precision="fp8", base_config=m.hf_config)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_serving_keeps_the_stored_fp8_experts(loaded):
    from serve import sources

    served = sources.load_hf(FIXTURES / "deepseek_v3_fp8", q.ServeSpec("fp8")).params
    for name in ("gate", "up", "down"):
        got = W.get(served, ("layers_1", "moe", "experts", name, "kernel"))
        want = W.get(loaded["deepseek_v3_fp8"].params, ("layers_1", "moe", "experts", name, "kernel"))
        assert isinstance(got, mpx.ScaledArray) and np.asarray(got.data).tobytes() == np.asarray(want.data).tobytes()
        np.testing.assert_array_equal(got.scale, want.scale)
    assert W.get(served, ("layers_1", "moe", "router", "kernel")).dtype == jnp.float32


def test_training_starts_from_the_block_fp8_checkpoint_dequantized(loaded):
    config = hf.resolve_init_from(ModelConfig(init_from=str(FIXTURES / "deepseek_v3_fp8"), max_seq_len=32))
    params = hf.init_params(config)
    kernel = W.get(params, ("layers_1", "moe", "experts", "up", "kernel"))
    assert kernel.dtype == jnp.float32 and kernel.shape == (8, 160, 144)
    served = W.get(loaded["deepseek_v3_fp8"].params, ("layers_1", "moe", "experts", "up", "kernel"))
    np.testing.assert_array_equal(kernel, mpx.dequantize(served))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", NAMES)
def test_fp32_logits_match_transformers(loaded, name):
    ref = _reference(name)  # deepseek_v3_fp8: transformers' logits of the dequantized weights
    assert _rel_err(_logits(loaded[name], q.ServeSpec("fp32"), ref["tokens"]), ref["logits"]) <= 1e-4


def test_greedy_generation_matches_transformers(loaded):
    from serve import engine as engine_lib

    m, spec, ref = loaded["deepseek_v3"], q.ServeSpec("fp32"), _reference("deepseek_v3")
    engine = engine_lib.Engine(transformer.Transformer(m.config, spec.policy()),
                               {"params": q.quantize_params(m.params, m.config, spec)}, kv_cache="fp32", chunk=8)
    out, _ = engine.generate(ref["tokens"].tolist(), max_new_tokens=ref["greedy"].shape[1])  # the latent cache
    assert [g.tokens for g in out] == ref["greedy"].tolist()


def test_the_selection_bias_is_applied(loaded):
    m, ref = loaded["deepseek_v3"], _reference("deepseek_v3")
    params = _copy_tree(m.params)
    for layer in ("layers_1", "layers_2"):
        params[layer]["moe"]["router"]["score_bias"] = jnp.zeros_like(params[layer]["moe"]["router"]["score_bias"])
    unbiased = dataclasses.replace(m, params=params)
    assert _rel_err(_logits(unbiased, q.ServeSpec("fp32"), ref["tokens"]), ref["logits"]) > 1e-2
