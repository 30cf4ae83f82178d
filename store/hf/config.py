"""Hugging Face config.json <-> `models.config.ModelConfig`, for the Llama family and Gemma 3.

Supported architectures and what each adds to Llama's (RMSNorm, RoPE in the "rotate
half" layout, grouped-query attention, SwiGLU, no embedding scaling):

* LlamaForCausalLM (Llama 2/3/3.x, TinyLlama, SmolLM, ...): rope scaling none, linear
  or llama3.
* MistralForCausalLM: `sliding_window` (each query sees that many keys, itself
  included; null: the whole past).
* Qwen2ForCausalLM: biases on the Q, K and V projections.
* Qwen3ForCausalLM: per-head RMSNorm of queries and keys; an explicit head_dim.
* Gemma3ForCausalLM (model_type gemma3_text, Gemma 3's text model): `layer_types`
  (sliding or full attention, each with its own RoPE base), q/k RMSNorm, four norms a
  block, RMSNorm by (1 + w), GeGLU (gelu_pytorch_tanh), `query_pre_attn_scalar`,
  embeddings scaled by sqrt(hidden_size) in their dtype; no logit soft-capping.
* DeepseekV3ForCausalLM (model_type deepseek_v3): multi-head latent attention
  (kv_lora_rank, q_lora_rank or a plain q_proj, interleaved RoPE, YaRN with DeepSeek's
  mscale / mscale_all_dim), DeepSeekMoE after `first_k_dense_replace` dense blocks
  (routed experts in n_group groups, `scoring_func`, `topk_method`, a learned selection
  bias for noaux_tc, shared experts, `routed_scaling_factor`). transformers' own
  DeepseekV3 always routes as topk_method "noaux_tc" with sigmoid scores, the values
  DeepSeek's config.json spells; the other methods are read as DeepSeek's code defines
  them. Multi-token-prediction layers (`num_nextn_predict_layers`) are not part of the
  model (`mtp_layers`).

Both config styles are read: `rope_theta` + `rope_scaling` ({"type"/"rope_type", ...};
transformers 4; Gemma 3 adds `rope_local_base_freq` and, before `layer_types`,
`sliding_window_pattern`) and `rope_parameters` (transformers 5; Gemma 3's holds
"full_attention" and "sliding_attention" sections).
"""

from __future__ import annotations

import json
from pathlib import Path

from models import config as model_config
from models.config import ModelConfig, RopeScaling

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM",
             "DeepseekV3ForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3_text", "DeepseekV3ForCausalLM": "deepseek_v3"}
GEMMA3 = "Gemma3ForCausalLM"
DEEPSEEK_V3 = "DeepseekV3ForCausalLM"
# transformers' defaults (DeepseekV3Config) for the routing keys a config.json may leave
# out; the routing itself is DeepSeek-V3's whatever transformers' config says.
DEEPSEEK_V3_DEFAULTS = {"first_k_dense_replace": 3, "n_shared_experts": 1, "n_group": 8, "topk_group": 4,
                        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rope_interleave": True,
                        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1,
                        "num_nextn_predict_layers": 1}
# transformers' defaults for keys a Gemma 3 config.json may leave out.
GEMMA3_DEFAULTS = {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6,
                   "query_pre_attn_scalar": 256, "sliding_window": 4096}
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
DEEPSEEK_ROPE_TYPES = {**ROPE_TYPES, "yarn": "yarn"}  # YaRN only where the attention applies its mscale_all_dim
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
              "sliding_window": "sliding_window", "layer_types": "layer_types",
              "query_pre_attn_scalar": "query_pre_attn_scalar", "rope_local_theta": "rope_local_base_freq",
              "n_experts": "n_routed_experts", "top_k": "num_experts_per_tok", "first_k_dense": "first_k_dense_replace",
              "moe_d_ff": "moe_intermediate_size", "router_score": "scoring_func"}
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
    fields = dict(kind=DEEPSEEK_ROPE_TYPES[kind], factor=get("factor", _REQUIRED if kind == "yarn" else 1.0))
    if kind == "yarn":
        fields.update(_yarn_fields(scaling, source, section))
    if kind == "llama3":
        fields.update(low_freq_factor=get("low_freq_factor", _REQUIRED), high_freq_factor=get("high_freq_factor",
                                                                                               _REQUIRED),
                      original_max_len=_get(scaling, "original_max_position_embeddings", "int", source, _REQUIRED,
                                            f"{section}.original_max_position_embeddings"))
    try:
        return RopeScaling(**fields)
    except model_config.FieldError as err:
        raise _invalid(err, ROPE_KEYS, source, f"{section}.") from None


def _yarn_fields(scaling: dict, source: str, section: str) -> dict:
    """RopeScaling's YaRN fields, with transformers' defaults (mscale 0: absent)."""
    for key, ok in (("attention_factor", lambda v: v is None), ("truncate", lambda v: v in (None, True))):
        if not ok(scaling.get(key)):
            raise HFError(f"{source}: {section}.{key} {scaling[key]!r} is not supported (YaRN with DeepSeek's "
                          "mscale and truncated correction range only)")
    get = lambda key, default: _get(scaling, key, "number", source, default, f"{section}.{key}")  # noqa: E731
    return dict(original_max_len=_get(scaling, "original_max_position_embeddings", "int", source, _REQUIRED,
                                      f"{section}.original_max_position_embeddings"),
                beta_fast=get("beta_fast", 32.0), beta_slow=get("beta_slow", 1.0), mscale=get("mscale", 0.0),
                mscale_all_dim=get("mscale_all_dim", 0.0))


def _rope(cfg: dict, source: str, types: dict = ROPE_TYPES) -> tuple[float, str, RopeScaling]:
    """(rope_theta, the key it was read from, RopeScaling) of either config style; `types`:
    the rope types the architecture supports."""
    for section in ("rope_parameters", "rope_scaling"):
        if not isinstance(cfg.get(section) or {}, dict):
            raise HFError(f"{source}: {section} must be a JSON object or null; got {cfg[section]!r}")
    params = dict(cfg.get("rope_parameters") or {})
    section = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    scaling = dict(cfg.get("rope_scaling") or params)
    theta_key = "rope_theta" if cfg.get("rope_theta") is not None else "rope_parameters.rope_theta"
    theta = _get(cfg if theta_key == "rope_theta" else params, "rope_theta", "number", source, 10000.0, theta_key)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if not isinstance(kind, str) or kind not in types:
        raise HFError(f"{source}: unsupported rope scaling {kind!r} ({section}.rope_type); supported: "
                      f"{', '.join(types)}")
    if types[kind] == "none":
        return float(theta), theta_key, RopeScaling()
    return float(theta), theta_key, _rope_scaling(scaling, kind, source, section)


def _check_supported(arch: str, cfg: dict, source: str) -> None:
    if arch == GEMMA3:
        return _check_gemma3(cfg, source)
    if arch == DEEPSEEK_V3:
        return _check_deepseek(cfg, source)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise HFError(f"{source}: unsupported hidden_act {act!r}; supported: 'silu' (SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag) and arch != "Qwen2ForCausalLM":
            raise HFError(f"{arch} with {flag}: true is not supported (biases on o_proj/FFN)")
    if cfg.get("use_sliding_window") and arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        raise HFError(f"{arch} with use_sliding_window: true is not supported")


def _check_gemma3(cfg: dict, source: str) -> None:
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise HFError(f"{source}: unsupported hidden_activation {act!r}; supported: 'gelu_pytorch_tanh' (GeGLU)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise HFError(f"{source}: {key} {cfg[key]!r} is not supported (Gemma 3 has null)")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if cfg.get(key):
            raise HFError(f"{source}: {GEMMA3} with {key}: true is not supported")


def _check_deepseek(cfg: dict, source: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise HFError(f"{source}: unsupported hidden_act {act!r}; supported: 'silu' (SwiGLU)")
    if cfg.get("attention_bias"):
        raise HFError(f"{source}: {DEEPSEEK_V3} with attention_bias: true is not supported (biases on q_a_proj, "
                      "kv_a_proj_with_mqa and o_proj)")
    freq = cfg.get("moe_layer_freq", DEEPSEEK_V3_DEFAULTS["moe_layer_freq"])
    if freq != 1:
        raise HFError(f"{source}: moe_layer_freq {freq!r} is not supported; supported: 1 (every block past "
                      "first_k_dense_replace has the MoE FFN)")
    for key, allowed in (("topk_method", model_config.TOPK_METHODS), ("scoring_func", model_config.ROUTER_SCORES)):
        value = cfg.get(key) or DEEPSEEK_V3_DEFAULTS[key]
        if not isinstance(value, str) or value not in allowed:
            raise HFError(f"{source}: unknown {key} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _deepseek_moe(cfg: dict, n_layers: int, source: str) -> dict:
    """ModelConfig's MoE fields of a DeepSeek-V3 config.json (none when every block is dense)."""
    get = lambda key, kind: _get(cfg, key, kind, source, DEEPSEEK_V3_DEFAULTS.get(key, _REQUIRED))  # noqa: E731
    dense, experts = get("first_k_dense_replace", "int"), get("n_routed_experts", "int")
    if experts == 0 or dense >= n_layers:
        return {}
    return dict(n_experts=experts, top_k=get("num_experts_per_tok", "int"), first_k_dense=dense,
                moe_d_ff=get("moe_intermediate_size", "int"), n_shared_experts=get("n_shared_experts", "int"),
                router_score=cfg.get("scoring_func") or DEEPSEEK_V3_DEFAULTS["scoring_func"],
                topk_method=cfg.get("topk_method") or DEEPSEEK_V3_DEFAULTS["topk_method"],
                n_group=get("n_group", "int"), topk_group=get("topk_group", "int"),
                norm_topk_prob=get("norm_topk_prob", "bool"),
                routed_scaling_factor=float(get("routed_scaling_factor", "number")))


def _deepseek_fields(cfg: dict, shape: dict, source: str) -> tuple[dict, dict]:
    """(ModelConfig fields DeepSeek-V3 sets, {field: config.json key} for errors)."""
    get = lambda key, kind, default=_REQUIRED: _get(cfg, key, kind, source, default)  # noqa: E731
    if "q_lora_rank" not in cfg:
        raise HFError(f"{source} lacks 'q_lora_rank' (null: queries through one q_proj)")
    heads, kv_heads = shape["n_heads"], shape["n_kv_heads"]
    if kv_heads != heads:
        raise HFError(f"{source}: num_key_value_heads {kv_heads} must equal num_attention_heads {heads} "
                      "(multi-head latent attention has a key and a value per head)")
    theta, theta_key, scaling = _rope(cfg, source, DEEPSEEK_ROPE_TYPES)
    fields = dict(rope_theta=theta, rope_scaling=scaling, embed_scale=False, head_dim_override=None,
                  kv_lora_rank=get("kv_lora_rank", "int"), q_lora_rank=get("q_lora_rank", "int", None),
                  qk_nope_head_dim=get("qk_nope_head_dim", "int"), qk_rope_head_dim=get("qk_rope_head_dim", "int"),
                  v_head_dim=get("v_head_dim", "int"),
                  rope_interleave=get("rope_interleave", "bool", DEEPSEEK_V3_DEFAULTS["rope_interleave"]),
                  **_deepseek_moe(cfg, shape["n_layers"], source))
    return fields, {"rope_theta": theta_key}


def mtp_layers(cfg: dict) -> int:
    """How many multi-token-prediction layers follow the model's blocks in its checkpoint
    (DeepSeek-V3's `num_nextn_predict_layers`, transformers' `num_mtp_layers`); 0 for other
    architectures."""
    if (cfg.get("architectures") or [None])[0] != DEEPSEEK_V3:
        return 0
    value = cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers"))
    value = DEEPSEEK_V3_DEFAULTS["num_nextn_predict_layers"] if value is None else value
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _section(cfg: dict, key: str, source: str) -> dict:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise HFError(f"{source}: {key} must be a JSON object or null; got {value!r}")
    return value


def _scaling_of(section: dict, name: str, source: str) -> RopeScaling:
    """The RopeScaling of one rope_parameters-style section called `name`, for errors."""
    kind = section.get("rope_type") or section.get("type") or "default"
    if not isinstance(kind, str) or kind not in ROPE_TYPES:
        raise HFError(f"{source}: unsupported rope scaling {kind!r} ({name}.rope_type); supported: "
                      f"{', '.join(ROPE_TYPES)}")
    return RopeScaling() if ROPE_TYPES[kind] == "none" else _rope_scaling(section, kind, source, name)


def _gemma3_rope(cfg: dict, source: str) -> tuple[dict, dict]:
    """(ModelConfig fields of Gemma 3's RoPE, {field: the config.json key it came from})."""
    params = _section(cfg, "rope_parameters", source)
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5
        full_key, local_key = "rope_parameters.full_attention", "rope_parameters.sliding_attention"
        full, local = _section(params, "full_attention", source), _section(params, "sliding_attention", source)
        theta = _get(full, "rope_theta", "number", source, GEMMA3_DEFAULTS["rope_theta"], full_key + ".rope_theta")
        local_theta = _get(local, "rope_theta", "number", source, GEMMA3_DEFAULTS["rope_local_base_freq"],
                           local_key + ".rope_theta")
        scaling, keys = _scaling_of(full, full_key, source), (full_key + ".rope_theta", local_key + ".rope_theta")
        if _scaling_of(local, local_key, source) != RopeScaling():
            raise HFError(f"{source}: rope scaling of the sliding layers ({local_key}) is not supported")
    else:  # transformers 4: rope_theta (+ rope_scaling) for the full layers
        theta, theta_key, scaling = _rope({**cfg, "rope_theta": cfg.get("rope_theta", GEMMA3_DEFAULTS["rope_theta"])},
                                          source)
        local_theta = _get(cfg, "rope_local_base_freq", "number", source, GEMMA3_DEFAULTS["rope_local_base_freq"])
        keys = (theta_key, "rope_local_base_freq")
    fields = dict(rope_theta=float(theta), rope_local_theta=float(local_theta), rope_scaling=scaling)
    return fields, dict(zip(("rope_theta", "rope_local_theta"), keys))


def _gemma3_layer_types(cfg: dict, n_layers: int, source: str) -> tuple:
    """`layer_types`, or those of transformers 4's `sliding_window_pattern` (every n-th full)."""
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list):
            raise HFError(f"{source}: layer_types must be a list; got {types!r}")
        return tuple(types)
    key = "sliding_window_pattern" if "sliding_window_pattern" in cfg else "_sliding_window_pattern"
    pattern = _get(cfg, key, "int", source, GEMMA3_DEFAULTS["sliding_window_pattern"])
    if pattern < 1:
        raise HFError(f"{source}: {key} must be an integer >= 1; got {pattern}")
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(max(n_layers, 0)))


def _gemma3_fields(cfg: dict, shape: dict, source: str) -> tuple[dict, dict]:
    """(ModelConfig fields Gemma 3 adds, {field: config.json key} for errors)."""
    fields, keys = _gemma3_rope(cfg, source)
    fields.update(
        layer_types=_gemma3_layer_types(cfg, shape["n_layers"], source),
        sliding_window=_get(cfg, "sliding_window", "int", source, GEMMA3_DEFAULTS["sliding_window"]),
        query_pre_attn_scalar=float(_get(cfg, "query_pre_attn_scalar", "number", source,
                                         GEMMA3_DEFAULTS["query_pre_attn_scalar"])),
        embed_scale=True, embed_scale_dtype="embedding", qk_norm=True, norm_unit_offset=True, post_norms=True,
        activation="gelu_tanh", tie_embeddings=_get(cfg, "tie_word_embeddings", "bool", source, True))
    return fields, keys


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
    positions = _get(cfg, "max_position_embeddings", "int", source, 2048)
    if positions < 1:
        raise HFError(f"{source}: max_position_embeddings must be an integer >= 1; got {positions}")
    if arch == GEMMA3:
        fields, field_keys = _gemma3_fields(cfg, shape, source)
    elif arch == DEEPSEEK_V3:
        fields, field_keys = _deepseek_fields(cfg, shape, source)
    else:
        theta, theta_key, scaling = _rope(cfg, source)
        window = _get(cfg, "sliding_window", "int", source, None) if arch == "MistralForCausalLM" else None
        fields = dict(rope_theta=theta, embed_scale=False, qkv_bias=arch == "Qwen2ForCausalLM",
                      qk_norm=arch == "Qwen3ForCausalLM", sliding_window=window, rope_scaling=scaling)
        field_keys = {"rope_theta": theta_key}
    try:
        return ModelConfig(**{**shape, **fields}, max_seq_len=max_seq_len or min(positions, DEFAULT_MAX_SEQ_LEN))
    except model_config.FieldError as err:
        keys = {**FIELD_KEYS, **field_keys, **({"max_seq_len": "max_seq_len"} if max_seq_len else {})}
        raise _invalid(err, keys, source) from None


def architecture_of(config: ModelConfig) -> str:
    """The architecture whose modeling code computes what `config` computes.

    Raises:
      HFError: a config no supported architecture expresses (MoE without multi-head
        latent attention, embedding scaling, two features of different architectures).
    """
    if config.is_mla:
        return _check_deepseek_config(config)
    if config.n_experts:
        raise HFError("a mixture of experts exports as DeepseekV3ForCausalLM, which needs multi-head latent "
                      "attention (kv_lora_rank); no supported architecture has one with grouped-query attention")
    if _gemma3_like(config):
        return _check_gemma3_config(config)
    features = [a for a, on in (("Qwen3ForCausalLM", config.qk_norm), ("Qwen2ForCausalLM", config.qkv_bias),
                                ("MistralForCausalLM", config.sliding_window is not None)) if on]
    if len(features) > 1:
        raise HFError(f"no supported architecture has the features of both {features[0]} and {features[1]}")
    return features[0] if features else "LlamaForCausalLM"


# What a config must hold to be Gemma 3's (ModelConfig field: value).
_GEMMA3_FIELDS = {"activation": "gelu_tanh", "norm_unit_offset": True, "post_norms": True, "qk_norm": True,
                  "embed_scale": True, "embed_scale_dtype": "embedding", "qkv_bias": False}


def _gemma3_like(config: ModelConfig) -> bool:
    return config.activation != "silu" or config.norm_unit_offset or config.post_norms or \
        config.layer_types is not None or config.embed_scale_dtype != "float32"


def _check_gemma3_config(config: ModelConfig) -> str:
    off = [f"{k}={getattr(config, k)!r}" for k, v in _GEMMA3_FIELDS.items() if getattr(config, k) != v]
    if off or config.layer_types is None:
        off += [] if config.layer_types is not None else ["layer_types=None"]
        raise HFError(f"no supported architecture computes this config: {GEMMA3} needs "
                      f"{', '.join(f'{k}={v!r}' for k, v in _GEMMA3_FIELDS.items())} and layer_types; got "
                      f"{', '.join(off)}")
    return GEMMA3


# What a config must hold to be DeepSeek-V3's (ModelConfig field: value).
_DEEPSEEK_FIELDS = {"activation": "silu", "norm_unit_offset": False, "post_norms": False, "qk_norm": False,
                    "qkv_bias": False, "sliding_window": None, "layer_types": None, "query_pre_attn_scalar": None,
                    "moe_every": 1}


def _check_deepseek_config(config: ModelConfig) -> str:
    off = [f"{k}={getattr(config, k)!r}" for k, v in _DEEPSEEK_FIELDS.items() if getattr(config, k) != v]
    if config.n_kv_heads != config.n_heads:
        off.append(f"n_kv_heads={config.n_kv_heads} (n_heads={config.n_heads})")
    if off:
        raise HFError(f"no supported architecture computes this config: {DEEPSEEK_V3} (multi-head latent "
                      f"attention) needs {', '.join(f'{k}={v!r}' for k, v in _DEEPSEEK_FIELDS.items())} and "
                      f"n_kv_heads = n_heads; got {', '.join(off)}")
    return DEEPSEEK_V3


def _deepseek_json(config: ModelConfig) -> dict:
    """DeepSeek-V3's keys: MLA's, and the MoE's (every block dense: first_k_dense_replace =
    num_hidden_layers)."""
    out = dict(kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank,
               qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
               v_head_dim=config.v_head_dim, head_dim=config.qk_rope_head_dim, rope_interleave=config.rope_interleave,
               attention_bias=False, num_nextn_predict_layers=0, moe_layer_freq=1,
               n_routed_experts=config.n_experts, num_experts_per_tok=config.top_k,
               first_k_dense_replace=config.first_k_dense if config.n_experts else config.n_layers,
               moe_intermediate_size=config.expert_d_ff, n_shared_experts=config.n_shared_experts,
               n_group=config.n_group, topk_group=config.topk_group, norm_topk_prob=config.norm_topk_prob,
               routed_scaling_factor=config.routed_scaling_factor, scoring_func=config.router_score,
               topk_method=config.topk_method)
    return out


def _gemma3_json(config: ModelConfig) -> dict:
    """Gemma 3's keys (transformers 4 style, which transformers 5 reads as well)."""
    scalar = config.query_pre_attn_scalar or config.head_dim
    return dict(hidden_activation="gelu_pytorch_tanh", layer_types=list(config.layer_types),
                sliding_window=config.sliding_window,
                query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,  # transformers 5: an int
                rope_local_base_freq=config.rope_local_theta or config.rope_theta, final_logit_softcapping=None,
                attn_logit_softcapping=None)


def _rope_json(config: ModelConfig) -> dict:
    s = config.rope_scaling
    if s.kind == "none":
        return {}
    out = {"rope_type": s.kind, "factor": s.factor}
    if s.kind == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                   original_max_position_embeddings=s.original_max_len)
    if s.kind == "yarn":
        out.update(original_max_position_embeddings=s.original_max_len, beta_fast=s.beta_fast, beta_slow=s.beta_slow,
                   mscale=s.mscale, mscale_all_dim=s.mscale_all_dim)
    return {"rope_scaling": out}


def from_model_config(config: ModelConfig, base: dict | None = None) -> dict:
    """config.json for `config`, over the keys of `base` (a source config.json) if given.

    The transformers-4 style (rope_theta, rope_scaling) that every version reads.
    """
    arch = architecture_of(config)
    dropped = ("rope_parameters", "rope_scaling", "sliding_window_pattern", "_sliding_window_pattern", "hidden_act",
               "num_mtp_layers", "qk_head_dim")
    out = {k: v for k, v in (base or {}).items() if k not in dropped}
    out.update(architectures=[arch], model_type=MODEL_TYPES[arch], vocab_size=config.vocab_size,
               hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=config.n_layers,
               num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
               rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
               tie_word_embeddings=config.tie_embeddings, **_rope_json(config))
    out.setdefault("max_position_embeddings", config.max_seq_len)
    if arch == GEMMA3:
        out.update(_gemma3_json(config))
    else:
        out["hidden_act"] = "silu"
    if arch == DEEPSEEK_V3:
        out.update(_deepseek_json(config))
    if arch == "MistralForCausalLM":
        out["sliding_window"] = config.sliding_window
    return out
