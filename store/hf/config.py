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


def _rope(cfg: dict) -> tuple[float, RopeScaling]:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or params)
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise HFError(f"unsupported rope scaling {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    if ROPE_TYPES[kind] == "none":
        return theta, RopeScaling()
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise HFError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    fields = dict(kind=ROPE_TYPES[kind], factor=float(scaling.get("factor", 1.0)))
    if kind == "llama3":
        fields.update(low_freq_factor=float(scaling["low_freq_factor"]),
                      high_freq_factor=float(scaling["high_freq_factor"]),
                      original_max_len=int(scaling["original_max_position_embeddings"]))
    return theta, RopeScaling(**fields)


def _check_supported(arch: str, cfg: dict) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise HFError(f"unsupported hidden_act {act!r}; supported: 'silu' (SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag) and arch != "Qwen2ForCausalLM":
            raise HFError(f"{arch} with {flag}: true is not supported (biases on o_proj/FFN)")
    if cfg.get("use_sliding_window") and arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        raise HFError(f"{arch} with use_sliding_window: true is not supported")


def to_model_config(cfg: dict, max_seq_len: int | None = None) -> ModelConfig:
    """The `ModelConfig` of a supported config.json.

    Args:
      cfg: config.json as a dict.
      max_seq_len: the serving context (KV cache length); default
        min(max_position_embeddings, DEFAULT_MAX_SEQ_LEN).

    Raises:
      HFError: an unsupported architecture or option, or a missing or invalid field.
    """
    arch = architecture(cfg)
    _check_supported(arch, cfg)
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        theta, scaling = _rope(cfg)
        positions = int(cfg.get("max_position_embeddings", 2048))
        return ModelConfig(
            vocab_size=int(cfg["vocab_size"]), d_model=hidden, n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads), d_ff=int(cfg["intermediate_size"]),
            max_seq_len=max_seq_len or min(positions, DEFAULT_MAX_SEQ_LEN), rope_theta=theta,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            head_dim_override=None if head_dim * heads == hidden else head_dim, embed_scale=False,
            qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=cfg.get("sliding_window") if arch == "MistralForCausalLM" else None,
            rope_scaling=scaling)
    except KeyError as err:
        raise HFError(f"config.json lacks {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise HFError(f"config.json: {err}") from None


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
