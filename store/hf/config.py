"""Hugging Face config.json <-> `models.config.ModelConfig`, for the Llama family.

Supported architectures and what each adds to Llama's (RMSNorm, RoPE in the "rotate
half" layout, grouped-query attention, SwiGLU, no embedding scaling):

* LlamaForCausalLM (Llama 2/3/3.x, TinyLlama, SmolLM, ...): rope scaling none, linear
  or llama3.
* MistralForCausalLM: `sliding_window` (each query sees that many keys, itself
  included; null: the whole past).
* Qwen2ForCausalLM: biases on the Q, K and V projections.
* Qwen3ForCausalLM: per-head RMSNorm of queries and keys; an explicit head_dim.

Both config styles are read: `rope_theta` + `rope_scaling` ({"type"/"rope_type", ...};
transformers 4) and `rope_parameters` (transformers 5).
"""

from __future__ import annotations

import json
from pathlib import Path

from models import config as model_config
from models.config import ModelConfig, RopeScaling

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3"}
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
# KV caches are sized by max_seq_len; models that allow 128K positions would allocate
# gigabytes per sequence, so serving caps it unless asked for more.
DEFAULT_MAX_SEQ_LEN = 4096


class HFError(ValueError):
    """A Hugging Face directory mpx cannot use: missing files, unsupported model, bad tensors."""


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`.

    Raises:
      HFError: the file is missing or is not a JSON object.
    """
    if not path.is_file():
        raise HFError(f"{path.parent}: no {path.name} ({what})")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(value, dict):
        raise HFError(f"{path}: expected a JSON object")
    return value


def architecture(cfg: dict) -> str:
    """The supported architecture named by config.json's "architectures".

    Raises:
      HFError: none named, or one mpx does not support (naming the supported ones).
    """
    names = cfg.get("architectures") or []
    if not names:
        raise HFError(f"config.json names no architecture; supported: {', '.join(SUPPORTED)}")
    if names[0] not in SUPPORTED:
        raise HFError(f"unsupported architecture {names[0]}; supported: {', '.join(SUPPORTED)}")
    return names[0]


# The config.json key each ModelConfig / RopeScaling field is read from, for errors.
FIELD_KEYS = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
              "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size",
              "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
              "head_dim_override": "head_dim", "tie_embeddings": "tie_word_embeddings",
              "sliding_window": "sliding_window"}
ROPE_KEYS = {"kind": "rope_type", "factor": "factor", "low_freq_factor": "low_freq_factor",
             "high_freq_factor": "high_freq_factor", "original_max_len": "original_max_position_embeddings"}
_REQUIRED = object()
_KINDS = {  # what a JSON value of each kind is, and how to say it
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}


def _get(cfg: dict, key: str, kind: str, source: str, default=_REQUIRED, name: str | None = None):
    """cfg[key] checked to be a JSON value of `kind`; `default` when absent or null.

    Raises:
      HFError: a required key is absent, or the value has another type (naming
        `source`, the key as `name` and the value).
    """
    name = name or key
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise HFError(f"{source} lacks {name!r}")
        return default
    ok, what = _KINDS[kind]
    if not ok(value):
        raise HFError(f"{source}: {name} must be {what}; got {value!r}")
    return value


def _invalid(err: model_config.FieldError, keys: dict, source: str, prefix: str = "") -> HFError:
    """The HFError of a value ModelConfig or RopeScaling rejects, naming its config.json keys."""
    names = ", ".join(prefix + keys.get(field, field) for field in err.fields) or "config"
    return HFError(f"{source}: {names}: {err}")


def _rope_scaling(scaling: dict, kind: str, source: str, section: str) -> RopeScaling:
    get = lambda key, default: _get(scaling, key, "number", source, default, f"{section}.{key}")  # noqa: E731
    if get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError(f"{source}: partial rotary embeddings ({section}.partial_rotary_factor != 1) are not supported")
    fields = dict(kind=ROPE_TYPES[kind], factor=get("factor", 1.0))
    if kind == "llama3":
        fields.update(low_freq_factor=get("low_freq_factor", _REQUIRED), high_freq_factor=get("high_freq_factor",
                                                                                               _REQUIRED),
                      original_max_len=_get(scaling, "original_max_position_embeddings", "int", source, _REQUIRED,
                                            f"{section}.original_max_position_embeddings"))
    try:
        return RopeScaling(**fields)
    except model_config.FieldError as err:
        raise _invalid(err, ROPE_KEYS, source, f"{section}.") from None


def _rope(cfg: dict, source: str) -> tuple[float, RopeScaling]:
    for section in ("rope_parameters", "rope_scaling"):
        if not isinstance(cfg.get(section) or {}, dict):
            raise HFError(f"{source}: {section} must be a JSON object or null; got {cfg[section]!r}")
    params = dict(cfg.get("rope_parameters") or {})
    section = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    scaling = dict(cfg.get("rope_scaling") or params)
    if cfg.get("rope_theta") is not None:
        theta = _get(cfg, "rope_theta", "number", source)
    else:
        theta = _get(params, "rope_theta", "number", source, 10000.0, "rope_parameters.rope_theta")
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if not isinstance(kind, str) or kind not in ROPE_TYPES:
        raise HFError(f"{source}: unsupported rope scaling {kind!r} ({section}.rope_type); supported: "
                      f"{', '.join(ROPE_TYPES)}")
    if ROPE_TYPES[kind] == "none":
        return float(theta), RopeScaling()
    return float(theta), _rope_scaling(scaling, kind, source, section)


def _check_supported(arch: str, cfg: dict, source: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise HFError(f"{source}: unsupported hidden_act {act!r}; supported: 'silu' (SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag) and arch != "Qwen2ForCausalLM":
            raise HFError(f"{arch} with {flag}: true is not supported (biases on o_proj/FFN)")
    if cfg.get("use_sliding_window") and arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        raise HFError(f"{arch} with use_sliding_window: true is not supported")


def _shape(cfg: dict, source: str) -> dict:
    """The ModelConfig fields of config.json's sizes, each of the JSON type it must have."""
    get = lambda key, kind, default=_REQUIRED: _get(cfg, key, kind, source, default)  # noqa: E731
    hidden, heads = get("hidden_size", "int"), get("num_attention_heads", "int")
    # 0 or null: d_model // n_heads, as transformers does (n_heads < 1 is refused below).
    head_dim = get("head_dim", "int", 0) or (hidden // heads if heads > 0 else 0)
    return dict(vocab_size=get("vocab_size", "int"), d_model=hidden, n_layers=get("num_hidden_layers", "int"),
                n_heads=heads, n_kv_heads=get("num_key_value_heads", "int", heads),
                d_ff=get("intermediate_size", "int"), norm_eps=get("rms_norm_eps", "number", 1e-6),
                tie_embeddings=get("tie_word_embeddings", "bool", False),
                head_dim_override=None if head_dim * heads == hidden else head_dim)


def to_model_config(cfg: dict, max_seq_len: int | None = None, source: str = "config.json") -> ModelConfig:
    """The `ModelConfig` of a supported config.json.

    Args:
      cfg: config.json as a dict.
      max_seq_len: the serving context (KV cache length); default
        min(max_position_embeddings, DEFAULT_MAX_SEQ_LEN).
      source: the file `cfg` was read from, for errors.

    Raises:
      HFError: an unsupported architecture, activation or RoPE type; a missing field,
        or one of the wrong JSON type or out of range (naming `source`, the config.json
        key, the value and what is allowed).
    """
    arch = architecture(cfg)
    _check_supported(arch, cfg, source)
    shape = _shape(cfg, source)
    theta, scaling = _rope(cfg, source)
    positions = _get(cfg, "max_position_embeddings", "int", source, 2048)
    if positions < 1:
        raise HFError(f"{source}: max_position_embeddings must be an integer >= 1; got {positions}")
    window = _get(cfg, "sliding_window", "int", source, None) if arch == "MistralForCausalLM" else None
    try:
        return ModelConfig(
            **shape, max_seq_len=max_seq_len or min(positions, DEFAULT_MAX_SEQ_LEN), rope_theta=theta,
            embed_scale=False, qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=window, rope_scaling=scaling)
    except model_config.FieldError as err:
        raise _invalid(err, FIELD_KEYS, source) from None


def architecture_of(config: ModelConfig) -> str:
    """The architecture whose modeling code computes what `config` computes.

    Raises:
      HFError: a config no supported architecture expresses (MoE, embedding scaling,
        two features of different architectures).
    """
    if config.n_experts:
        raise HFError("mixture-of-experts models cannot be exported as a Llama-family checkpoint")
    features = [a for a, on in (("Qwen3ForCausalLM", config.qk_norm), ("Qwen2ForCausalLM", config.qkv_bias),
                                ("MistralForCausalLM", config.sliding_window is not None)) if on]
    if len(features) > 1:
        raise HFError(f"no supported architecture has the features of both {features[0]} and {features[1]}")
    return features[0] if features else "LlamaForCausalLM"


def _rope_json(config: ModelConfig) -> dict:
    s = config.rope_scaling
    if s.kind == "none":
        return {}
    out = {"rope_type": s.kind, "factor": s.factor}
    if s.kind == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                   original_max_position_embeddings=s.original_max_len)
    return {"rope_scaling": out}


def from_model_config(config: ModelConfig, base: dict | None = None) -> dict:
    """config.json for `config`, over the keys of `base` (a source config.json) if given.

    The transformers-4 style (rope_theta, rope_scaling) that every version reads.
    """
    arch = architecture_of(config)
    out = {k: v for k, v in (base or {}).items() if k not in ("rope_parameters", "rope_scaling")}
    out.update(architectures=[arch], model_type=MODEL_TYPES[arch], vocab_size=config.vocab_size,
               hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=config.n_layers,
               num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
               hidden_act="silu", rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
               tie_word_embeddings=config.tie_embeddings, **_rope_json(config))
    out.setdefault("max_position_embeddings", config.max_seq_len)
    if arch == "MistralForCausalLM":
        out["sliding_window"] = config.sliding_window
    return out
