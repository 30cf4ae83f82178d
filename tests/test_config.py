"""Tests of train/config.py: YAML -> frozen dataclasses, extends, overrides, strict errors."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path
from typing import Literal

import pytest

from models.config import PRESETS
from train import config as config_lib
from train.config import ConfigError, TrainConfig, from_dict, load, to_dict

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_tiny_config_is_a_short_fp8_run():
    cfg = load(CONFIGS / "tiny.yaml")
    assert cfg.model == PRESETS["tiny"]
    assert cfg.precision == config_lib.PrecisionConfig(preset="fp8")
    assert (cfg.data.source, cfg.data.tokenizer) == ("builtin", "bytes")
    assert (cfg.data.seq_len, cfg.data.batch_size, cfg.steps) == (128, 16, 300)
    assert (cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps) == (3e-3, 20)
    assert cfg.optimizer.schedule == "cosine"
    assert cfg.run_dir == str(Path("runs") / "tiny")
    assert cfg.checkpoint_dir == str(Path("runs") / "tiny" / "checkpoints")


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp8"])
def test_precision_configs_change_only_precision(name):
    tiny, cfg = load(CONFIGS / "tiny.yaml"), load(CONFIGS / f"{name}.yaml")
    assert cfg.precision.preset == name
    assert cfg.run_dir == str(Path("runs") / name)
    assert dataclasses.replace(cfg, precision=tiny.precision, run_dir=tiny.run_dir) == tiny


def test_small_config_uses_the_small_model():
    tiny, small = load(CONFIGS / "tiny.yaml"), load(CONFIGS / "small.yaml")
    assert small.model == PRESETS["small"]
    assert dataclasses.replace(small, model=tiny.model, run_dir=tiny.run_dir) == tiny


def test_overrides_use_dotted_keys_and_yaml_values():
    cfg = load(CONFIGS / "tiny.yaml", ["optimizer.learning_rate=1e-3", "model.n_layers=4",
                                       "steps=50", "optimizer.clip_norm=null", "mesh.fsdp=2"])
    assert cfg.optimizer.learning_rate == 1e-3 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.model == dataclasses.replace(PRESETS["tiny"], n_layers=4)
    assert (cfg.steps, cfg.optimizer.clip_norm, cfg.mesh.fsdp) == (50, None, 2)


def test_ints_are_accepted_for_floats():
    cfg = load(CONFIGS / "tiny.yaml", ["optimizer.learning_rate=1", "model.rope_theta=500"])
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)
    assert isinstance(cfg.model.rope_theta, float)


def test_yaml_exponent_floats_without_a_dot(tmp_path):
    # PyYAML reads `3e-3` as a string (YAML 1.1); the loader reads it as a float.
    path = write(tmp_path, "c.yaml", "optimizer:\n  learning_rate: 3e-3\n  eps: 1E-8\n")
    cfg = load(path)
    assert (cfg.optimizer.learning_rate, cfg.optimizer.eps) == (3e-3, 1e-8)


@pytest.mark.parametrize("override, expected", [
    ("precision=bf16", config_lib.PrecisionConfig(preset="bf16")),
    ("precision=configs/policies/fp8.yaml",
     config_lib.PrecisionConfig(preset=None, policy_file="configs/policies/fp8.yaml")),
    ("precision.policy_file=my.yaml", config_lib.PrecisionConfig(preset=None, policy_file="my.yaml")),
    ("precision.preset=fp8_delayed", config_lib.PrecisionConfig(preset="fp8_delayed")),
])
def test_precision_is_replaced_whole(override, expected):
    assert load(CONFIGS / "tiny.yaml", [override]).precision == expected


def test_precision_with_both_fields_is_an_error(tmp_path):
    path = write(tmp_path, "c.yaml", "precision:\n  preset: fp8\n  policy_file: p.yaml\n")
    with pytest.raises(ConfigError, match="exactly one of preset and policy_file"):
        load(path)


def test_extends_deep_merges_sections(tmp_path):
    write(tmp_path, "base.yaml", """\
        optimizer: {learning_rate: 0.01, warmup_steps: 5, b2: 0.99}
        data: {seq_len: 64}
        steps: 10
        """)
    (tmp_path / "sub").mkdir()
    child = write(tmp_path, "sub/child.yaml", """\
        extends: ../base.yaml
        optimizer: {warmup_steps: 7}
        """)
    cfg = load(child)
    assert (cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps, cfg.optimizer.b2) == (0.01, 7, 0.99)
    assert (cfg.data.seq_len, cfg.steps) == (64, 10)
    assert cfg.run_dir == str(Path("runs") / "child")


def test_switching_model_preset_drops_inherited_field_overrides(tmp_path):
    write(tmp_path, "base.yaml", "model: {preset: tiny, n_layers: 3}\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nmodel: {preset: small}\n")
    assert load(tmp_path / "base.yaml").model.n_layers == 3
    assert load(child).model == PRESETS["small"]
    assert load(child, ["model.n_layers=6"]).model == dataclasses.replace(PRESETS["small"], n_layers=6)


def test_model_preset_shorthand(tmp_path):
    path = write(tmp_path, "c.yaml", "model: tiny_moe\n")
    assert load(path).model == PRESETS["tiny_moe"]


def test_overrides_must_be_a_list():
    with pytest.raises(TypeError, match="list of key=value"):
        load(CONFIGS / "tiny.yaml", "steps=5")


def test_model_from_full_fields(tmp_path):
    fields = "d_model: 64, n_layers: 1, n_heads: 2, n_kv_heads: 1, d_ff: 96"
    path = write(tmp_path, "c.yaml", f"model: {{{fields}}}\n")
    assert load(path).model == config_lib.ModelConfig(d_model=64, n_layers=1, n_heads=2,
                                                      n_kv_heads=1, d_ff=96)


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends cycle"):
        load(tmp_path / "a.yaml")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load(tmp_path / "nope.yaml")
    child = write(tmp_path, "c.yaml", "extends: base.yaml\n")
    with pytest.raises(FileNotFoundError, match="base.yaml"):
        load(child)


def test_unknown_key_names_dotted_key_file_suggestion_and_allowed_keys(tmp_path):
    path = write(tmp_path, "c.yaml", "optimizer:\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "'optimizer.learnig_rate'" in message and str(path) in message
    assert "did you mean 'learning_rate'" in message
    assert "weight_decay" in message and "moment_dtype" in message  # the allowed keys
    assert info.value.key == "optimizer.learnig_rate"


def test_unknown_key_in_an_extended_file_names_that_file(tmp_path):
    base = write(tmp_path, "base.yaml", "data:\n  seqlen: 64\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nsteps: 5\n")
    with pytest.raises(ConfigError, match=f"'data.seqlen'.*did you mean 'seq_len'.*{base}"):
        load(child)


@pytest.mark.parametrize("override, key", [
    ("model.n_laers=3", "model.n_laers"),
    ("stepz=3", "stepz"),
    ("checkpoint.directory=x", "checkpoint.directory"),
])
def test_unknown_override_keys(override, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'.*--set {override}"):
        load(CONFIGS / "tiny.yaml", [override])


@pytest.mark.parametrize("override, expected", [
    ("steps=abc", "steps: expected int, got 'abc'"),
    ("steps=true", "steps: expected int, got True"),  # bools are not ints
    ("model.n_layers=1.5", "model.n_layers: expected int, got 1.5"),
    ("optimizer.learning_rate=fast", "optimizer.learning_rate: expected float, got 'fast'"),
    ("optimizer.adaptive_clip=1", "optimizer.adaptive_clip: expected bool, got 1"),
    ("data.source=3", "data.source: expected str, got 3"),
    ("optimizer.clip_norm=big", "optimizer.clip_norm: expected float or null, got 'big'"),
    ("optimizer=5", "optimizer: expected a mapping"),
])
def test_type_mismatches_name_key_value_and_type(override, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load(CONFIGS / "tiny.yaml", [override])


@pytest.mark.parametrize("override, expected", [
    ("optimizer.schedule=linear", "schedule must be one of 'cosine', 'constant'; got 'linear'"),
    ("optimizer.moment_dtype=f16", "moment_dtype must be one of 'bf16', 'f32'"),
    ("optimizer.loss_scale=auto", "loss_scale must be one of 'none', 'dynamic', 'static'"),
    ("precision=fp9", "preset must be one of 'fp32', 'bf16'"),
    ("model.preset=huge", "unknown model preset 'huge'"),
    ("model.remat=some", "remat must be one of"),
    ("optimizer.learning_rate=0", "learning_rate must be a finite number > 0"),
    ("data.eval_fraction=1", "eval_fraction must be in"),
    ("mesh.fsdp=-1", "at most one axis may be -1"),
    ("checkpoint.keep=0", "keep must be >= 1"),
    ("data.seq_len=256", "data.seq_len=256 exceeds model.max_seq_len=128"),
    ("optimizer.microbatches=3", "microbatches=3 must divide data.batch_size=16"),
    ("model.vocab_size=100", "bytes tokenizer needs model.vocab_size >= 256"),
    ("data.eval_fraction=0", "eval_every=50 needs held-out data"),
])
def test_invalid_values_name_the_allowed_ones(override, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(")) as info:
        load(CONFIGS / "tiny.yaml", [override])
    assert f"--set {override}" in str(info.value)


@pytest.mark.parametrize("bad", ["steps", "=3", "optimizer.learning_rate=[1"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError, match="--set"):
        load(CONFIGS / "tiny.yaml", [bad])


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "c.yaml", "steps: [1\n")
    with pytest.raises(ConfigError, match=f"{path}: invalid YAML"):
        load(path)


def test_round_trip_through_yaml(tmp_path):
    cfg = load(CONFIGS / "small.yaml", ["precision.policy_file=configs/policies/fp8.yaml",
                                        "optimizer.clip_norm=null", "checkpoint.dir=/tmp/x"])
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    config_lib.dump(cfg, tmp_path / "resolved.yaml")
    assert load(tmp_path / "resolved.yaml") == cfg


def test_defaults_build_a_valid_config():
    assert from_dict(TrainConfig, {}) == TrainConfig()
    assert TrainConfig().checkpoint_dir == str(Path(".") / "checkpoints")


@dataclasses.dataclass(frozen=True)
class _Inner:
    size: int = 1
    name: str = "a"


@dataclasses.dataclass(frozen=True)
class _Outer:
    shape: tuple[int, ...] = ()
    pair: tuple[int, str] = (0, "")
    mode: Literal["x", "y"] = "x"
    inner: _Inner | None = None
    ratio: float = 0.5


def test_from_dict_handles_tuples_optionals_literals_and_nesting():
    out = from_dict(_Outer, {"shape": [2, 3], "pair": [1, "b"], "mode": "y",
                             "inner": {"size": 4}, "ratio": 1})
    assert out == _Outer(shape=(2, 3), pair=(1, "b"), mode="y", inner=_Inner(size=4), ratio=1.0)
    assert from_dict(_Outer, {"inner": None}) == _Outer()
    assert from_dict(_Outer, to_dict(out)) == out


@pytest.mark.parametrize("d, expected", [
    ({"shape": [2, "3"]}, r"shape\[1\]: expected int, got '3'"),
    ({"shape": 3}, "shape: expected a list of int"),
    ({"pair": [1]}, r"pair: expected a list of 2 items \(int, str\)"),
    ({"mode": "z"}, "mode: expected one of 'x', 'y'"),
    ({"inner": {"size": True}}, "inner.size: expected int, got True"),
    ({"inner": {"nme": "b"}}, "unknown key 'inner.nme' \\(did you mean 'name'\\?\\)"),
    ({"ratio": "1"}, "ratio: expected float"),
])
def test_from_dict_errors(d, expected):
    with pytest.raises(ConfigError, match=expected):
        from_dict(_Outer, d)


def test_model_section_resolves_the_same_for_training_and_serving():
    # serve.generate --config reads a training config's model section without train/.
    from models import config as model_config
    from serve import generate

    cfg = load(CONFIGS / "small.yaml")
    assert generate.expected_model(str(CONFIGS / "small.yaml")) == cfg.model
    assert model_config.from_section({"preset": "tiny", "n_layers": 3}) == model_config.ModelConfig(n_layers=3)
    assert model_config.from_section("small") == model_config.preset("small")
    with pytest.raises(ConfigError, match="model.n_layer' .did you mean 'n_layers'"):
        model_config.from_section({"preset": "tiny", "n_layer": 3})
    with pytest.raises(ConfigError, match="model.preset: unknown model preset 'huge'"):
        model_config.from_section({"preset": "huge"})


@pytest.mark.parametrize("override, message", [
    ("optimizer.learning_rate=.inf", "learning_rate must be a finite number > 0; got inf"),
    ("optimizer.learning_rate=nan", "learning_rate must be a finite number > 0; got nan"),
    ("optimizer.weight_decay=-inf", "weight_decay must be a finite number >= 0"),
    ("optimizer.eps=.nan", "eps must be a finite number > 0"),
    ("optimizer.clip_norm=inf", "clip_norm must be a finite number > 0, or null"),
])
def test_non_finite_numbers_are_rejected(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(CONFIGS / "tiny.yaml", [override])


# --------------------------------------------------------------------------- the model section


@pytest.mark.parametrize("fields, message, at_fault", [
    ({"vocab_size": 0}, "vocab_size must be an integer >= 1; got 0", None),
    ({"d_model": -128}, "d_model must be an integer >= 1; got -128", None),
    ({"n_layers": 0}, "n_layers must be an integer >= 1; got 0", None),
    ({"n_heads": 0}, "n_heads must be an integer >= 1; got 0", None),
    ({"n_kv_heads": -2}, "n_kv_heads must be an integer >= 1; got -2", None),
    ({"d_ff": 0}, "d_ff must be an integer >= 1; got 0", None),
    ({"max_seq_len": 0}, "max_seq_len must be an integer >= 1; got 0", None),
    ({"n_experts": -1}, "n_experts must be an integer >= 0; got -1", None),
    ({"top_k": 0}, "top_k must be an integer >= 1; got 0", None),
    ({"moe_every": 0}, "moe_every must be an integer >= 1; got 0", None),
    ({"n_layers": True}, "n_layers must be an integer >= 1; got True", None),  # bools are not ints
    ({"d_ff": 96.0}, "d_ff must be an integer >= 1; got 96.0", None),
    ({"d_model": "128"}, "d_model must be an integer >= 1; got '128'", None),
    ({"rope_theta": 0.0}, "rope_theta must be a finite number > 0; got 0.0", None),
    ({"rope_theta": float("inf")}, "rope_theta must be a finite number > 0; got inf", None),
    ({"norm_eps": -1e-6}, "norm_eps must be a finite number > 0; got -1e-06", None),
    ({"norm_eps": float("nan")}, "norm_eps must be a finite number > 0; got nan", None),
    ({"tie_embeddings": 1}, "tie_embeddings must be true or false; got 1", None),
    ({"qk_norm": "yes"}, "qk_norm must be true or false; got 'yes'", None),
    ({"remat": "some"}, "remat must be one of 'none', 'full', 'non_fp8'; got 'some'", None),
    ({"head_dim_override": 0}, "head_dim_override must be an even integer >= 2 (RoPE rotates pairs), or null; got 0",
     None),
    ({"head_dim_override": 7}, "head_dim_override must be an even integer >= 2", None),
    ({"sliding_window": 0}, "sliding_window must be an integer >= 1, or null; got 0", None),
    ({"rope_scaling": {"kind": "linear"}}, "rope_scaling must be a RopeScaling", None),
    ({"init_from": ""}, "init_from must be a model directory, or null; got ''", None),
    ({"layer_types": ("full_attention", "local")}, "layer_types must be a list of 'full_attention' or "
     "'sliding_attention', one per layer, or null", None),
    ({"layer_types": ("full_attention",)}, "layer_types names 1 layers; n_layers=2", ("layer_types", "n_layers")),
    ({"layer_types": ("sliding_attention",) * 2}, "layer_types has 'sliding_attention' layers but sliding_window "
     "is null", ("layer_types", "sliding_window")),
    ({"rope_local_theta": 0.0}, "rope_local_theta must be a finite number > 0, or null; got 0.0", None),
    ({"query_pre_attn_scalar": -1}, "query_pre_attn_scalar must be a finite number > 0, or null; got -1", None),
    ({"activation": "gelu"}, "activation must be one of 'silu', 'gelu_tanh'; got 'gelu'", None),
    ({"norm_unit_offset": 1}, "norm_unit_offset must be true or false; got 1", None),
    ({"post_norms": "yes"}, "post_norms must be true or false; got 'yes'", None),
    ({"embed_scale_dtype": "bf16"}, "embed_scale_dtype must be one of 'float32', 'embedding'; got 'bf16'", None),
    ({"d_model": 130}, "d_model=130 must be divisible by n_heads=4 (or set head_dim_override)", ("d_model", "n_heads")),
    ({"d_model": 100}, "head_dim = d_model // n_heads = 25 must be even for RoPE", ("d_model", "n_heads")),
    ({"n_kv_heads": 3}, "n_heads=4 must be divisible by n_kv_heads=3", ("n_heads", "n_kv_heads")),
    ({"n_experts": 2, "top_k": 3}, "top_k=3 must be in [1, n_experts=2]", ("top_k", "n_experts")),
    ({"n_experts": 2, "moe_every": 3}, "moe_every=3 exceeds n_layers=2: no block would have the MoE FFN",
     ("moe_every", "n_layers")),
])
def test_model_config_names_the_bad_field_its_value_and_what_is_allowed(fields, message, at_fault):
    from models import config as model_config

    with pytest.raises(model_config.FieldError) as info:
        model_config.ModelConfig(**fields)
    assert message in str(info.value)
    assert info.value.fields == (at_fault or tuple(fields))
    assert info.value.key == (info.value.fields[0] if len(info.value.fields) == 1 else "")


@pytest.mark.parametrize("fields, message", [
    ({"kind": "dynamic"}, "kind must be one of 'none', 'linear', 'llama3', 'yarn'; got 'dynamic'"),
    ({"kind": "linear", "factor": 0.0}, "factor must be a finite number > 0; got 0.0"),
    ({"factor": float("nan")}, "factor must be a finite number > 0; got nan"),
    ({"low_freq_factor": 0}, "low_freq_factor must be a finite number > 0; got 0"),
    ({"high_freq_factor": True}, "high_freq_factor must be a finite number > 0; got True"),
    ({"original_max_len": 0}, "original_max_len must be an integer >= 1; got 0"),
    ({"original_max_len": 8192.0}, "original_max_len must be an integer >= 1; got 8192.0"),
    ({"kind": "llama3", "low_freq_factor": 4.0, "high_freq_factor": 4.0},
     "llama3 rope_scaling needs low_freq_factor < high_freq_factor; got 4.0, 4.0"),
])
def test_rope_scaling_names_the_bad_field(fields, message):
    from models import config as model_config

    with pytest.raises(model_config.FieldError, match=re.escape(message)):
        model_config.RopeScaling(**fields)


def test_every_model_preset_and_default_is_valid():
    from models import config as model_config

    for preset in PRESETS.values():
        assert dataclasses.replace(preset) == preset  # __post_init__ runs again
    assert model_config.ModelConfig(rope_theta=10000, norm_eps=1) == model_config.ModelConfig(rope_theta=1e4,
                                                                                              norm_eps=1.0)


@pytest.mark.parametrize("override, key, message", [
    ("model.d_model=-128", "model.d_model", "model: d_model must be an integer >= 1; got -128"),
    ("model.rope_scaling.factor=0", "model.rope_scaling.factor",
     "model.rope_scaling: factor must be a finite number > 0; got 0.0"),
    ("model.rope_scaling.kind=dynamic", "model.rope_scaling.kind",
     "model.rope_scaling: kind must be one of 'none', 'linear', 'llama3', 'yarn'; got 'dynamic'"),
    ("model.sliding_window=0", "model.sliding_window", "model: sliding_window must be an integer >= 1, or null; got 0"),
    ("model.norm_eps=-1", "model.norm_eps", "model: norm_eps must be a finite number > 0; got -1.0"),
    ("model.activation=relu", "model.activation", "model: activation must be one of 'silu', 'gelu_tanh'; got 'relu'"),
])
def test_a_bad_model_field_is_named_with_the_one_setting_that_set_it(override, key, message):
    with pytest.raises(ConfigError) as info:
        load(CONFIGS / "tiny.yaml", [override])
    assert info.value.key == key
    assert str(info.value) == f"{message} (set in --set {override})"


def test_a_model_constraint_names_every_setting_of_the_section(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(CONFIGS / "tiny.yaml", ["model.n_kv_heads=3"])
    assert info.value.key == "model" and "n_heads=4 must be divisible by n_kv_heads=3" in str(info.value)
    assert f"set in {CONFIGS / 'tiny.yaml'}, --set model.n_kv_heads=3" in str(info.value)
    path = write(tmp_path, "c.yaml", f"extends: {CONFIGS / 'tiny.yaml'}\nmodel: {{preset: tiny, d_model: -128}}\n")
    with pytest.raises(ConfigError, match=re.escape(f"d_model must be an integer >= 1; got -128 (set in {path})")):
        load(path)


def test_serving_with_a_bad_model_section_names_the_field(tmp_path):
    from serve import generate

    path = write(tmp_path, "c.yaml", "model: {preset: small, n_heads: 0}\n")
    with pytest.raises(ConfigError, match="model: n_heads must be an integer >= 1; got 0"):
        generate.expected_model(str(path))


def test_check_vocab_names_the_tokenizer_and_both_sizes():
    from models import config as model_config

    tiny = model_config.ModelConfig(vocab_size=128)
    tiny.check_vocab(128, "'t.json'")
    with pytest.raises(ValueError, match=re.escape("tokenizer 'bytes' has 256 ids but the model's vocab_size is 128")):
        tiny.check_vocab(256, "'bytes'")
