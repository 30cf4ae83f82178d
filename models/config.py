"""Configuration of the reference transformer language model, with presets."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from mpx import config as config_io
from mpx.activations import ACTIVATIONS

ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
REMATS = ("none", "full", "non_fp8")
# Hugging Face's names for what a layer's attention sees (Gemma 3's `layer_types`).
LAYER_TYPES = ("full_attention", "sliding_attention")
EMBED_SCALE_DTYPES = ("float32", "embedding")
# How a MoE router picks a token's experts (DeepSeek's `topk_method`): "greedy" the top_k
# scores; "group_limited_greedy" (DeepSeek-V2) the top_k within the topk_group groups of
# highest max score; "noaux_tc" (DeepSeek-V3) the same with groups ranked by the sum of
# their two highest scores, both after adding the learned per-expert bias (selection only).
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROUTER_SCORES = ("softmax", "sigmoid")


class FieldError(config_io.ConfigError):
    """A `ModelConfig` or `RopeScaling` value out of range; `fields` names every field at
    fault (`key` is the field when there is one, else "": the constraint joins several)."""

    def __init__(self, message: str, *fields: str):
        super().__init__(message, fields[0] if len(fields) == 1 else "")
        self.fields = fields


def _is_int(value: Any) -> bool:
    # bool is an Integral: `n_layers: true` must not pass for 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check(field: str, value: Any, ok: bool, requirement: str) -> None:
    """Raises FieldError `<field> must be <requirement>; got <value>` unless `ok`."""
    if not ok:
        raise FieldError(f"{field} must be {requirement}; got {value!r}", field)


def _check_int(field: str, value: Any, low: int) -> None:
    _check(field, value, _is_int(value) and value >= low, f"an integer >= {low}")


def _check_positive(field: str, value: Any) -> None:
    _check(field, value, _is_finite(value) and value > 0, "a finite number > 0")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Context extension of RoPE's frequencies (Hugging Face's `rope_scaling`).

    Attributes:
      kind: "none"; "linear" (every frequency divided by `factor`, position
        interpolation); or "llama3" (Llama 3.1: wavelengths above
        original_max_len / low_freq_factor divided by `factor`, those below
        original_max_len / high_freq_factor kept, a smooth blend between).
      factor: the context extension factor.
      low_freq_factor, high_freq_factor, original_max_len: the llama3 band edges;
        original_max_len is also YaRN's pre-training context.
      beta_fast, beta_slow: YaRN's band edges in rotations over original_max_len:
        dimensions turning more than beta_fast times keep their frequency, those
        turning less than beta_slow times are divided by `factor`, a linear ramp between.
      mscale, mscale_all_dim: YaRN's attention temperature (DeepSeek): cos and sin are
        multiplied by m(mscale) / m(mscale_all_dim), and the softmax scale of MLA by
        m(mscale_all_dim)^2, where m(a) = 0.1 * a * ln(factor) + 1 (1 when factor <= 1);
        with mscale 0, cos and sin get m(1).

    Raises (on construction):
      FieldError: an unknown kind, a factor that is not a finite number > 0,
        original_max_len < 1, or llama3 band edges out of order.
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        _check("kind", self.kind, self.kind in ROPE_SCALINGS, f"one of {', '.join(map(repr, ROPE_SCALINGS))}")
        for field in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            _check_positive(field, getattr(self, field))
        for field in ("mscale", "mscale_all_dim"):
            value = getattr(self, field)
            _check(field, value, _is_finite(value) and value >= 0, "a finite number >= 0")
        _check_int("original_max_len", self.original_max_len, 1)
        if self.kind == "llama3" and not self.low_freq_factor < self.high_freq_factor:
            raise FieldError(f"llama3 rope_scaling needs low_freq_factor < high_freq_factor; got "
                             f"{self.low_freq_factor}, {self.high_freq_factor}", "low_freq_factor", "high_freq_factor")

    def temperature(self, mscale: float) -> float:
        """YaRN's m(mscale) = 0.1 * mscale * ln(factor) + 1 (1 unless yarn with factor > 1)."""
        if self.kind != "yarn" or self.factor <= 1:
            return 1.0
        return 0.1 * mscale * math.log(self.factor) + 1.0

    @property
    def rotary_gain(self) -> float:
        """What YaRN multiplies cos and sin by: m(mscale) / m(mscale_all_dim), or m(1)
        without both."""
        if self.mscale and self.mscale_all_dim:
            return self.temperature(self.mscale) / self.temperature(self.mscale_all_dim)
        return self.temperature(1.0)


# Lower bounds of the integer sizes; every one is an int (not a bool).
SIZES = {"vocab_size": 1, "d_model": 1, "n_layers": 1, "n_heads": 1, "n_kv_heads": 1, "d_ff": 1,
         "max_seq_len": 1, "n_experts": 0, "top_k": 1, "moe_every": 1, "first_k_dense": 0, "n_shared_experts": 0,
         "n_group": 1, "topk_group": 1, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "v_head_dim": 0}
FLAGS = ("tie_embeddings", "embed_scale", "qkv_bias", "qk_norm", "norm_unit_offset", "post_norms", "rope_interleave",
         "norm_topk_prob")
# Optional integer sizes (null: the feature is off).
OPTIONAL_SIZES = ("q_lora_rank", "kv_lora_rank", "moe_d_ff")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer (RMSNorm, RoPE, SwiGLU or GeGLU, GQA, optional MoE).

    Attributes:
      vocab_size: number of token ids (256 for the byte-level tokenizer).
      d_model: residual stream width.
      n_layers: number of transformer blocks.
      n_heads: query heads.
      n_kv_heads: key/value heads (grouped-query attention); divides n_heads.
      d_ff: hidden width of the SwiGLU FFN (per expert for MoE).
      max_seq_len: longest sequence (RoPE tables and KV cache size).
      rope_theta: RoPE base frequency.
      n_experts: 0 for a dense FFN, else number of MoE experts per block.
      top_k: experts per token when n_experts > 0.
      moe_every: use the MoE FFN in every n-th block (1 = all blocks).
      tie_embeddings: reuse the token embedding as the LM head.
      remat: "none", "full" (recompute every block) or "non_fp8" (skip recomputation
        of FP8 blocks, whose linear layers keep their inputs as E4M3: half of bf16's
        bytes, a quarter of f32's; seed section 3.2).
      norm_eps: RMSNorm epsilon.
      head_dim_override: per-head width when it is not d_model // n_heads (Qwen3,
        some Mistral models); None: d_model // n_heads.
      embed_scale: multiply the embedding lookup by sqrt(d_model) (Gemma style, mpx's
        own models); Hugging Face Llama-family models do not.
      qkv_bias: biases on the Q, K and V projections (Qwen2).
      qk_norm: RMSNorm over each query and key head before RoPE (Qwen3).
      sliding_window: each query sees at most this many keys, itself included
        (Mistral); None: the whole causal past.
      rope_scaling: RoPE context extension (Llama 3.1's "llama3", "linear"); of the
        full-attention layers only when layer_types is given.
      layer_types: per block, "full_attention" (the whole causal past) or
        "sliding_attention" (the last sliding_window keys), Gemma 3 style; None: every
        block sees sliding_window (Mistral: all, or the whole past when it is None).
      rope_local_theta: RoPE base of the "sliding_attention" blocks, which get no
        rope_scaling (Gemma 3's rope_local_base_freq); None: rope_theta.
      activation: the gated FFN's activation, "silu" (SwiGLU) or "gelu_tanh" (GeGLU
        with the tanh-approximated GELU, Gemma).
      norm_unit_offset: every RMSNorm multiplies by (1 + scale), its scale initialized
        to zeros (Gemma; the param holds Hugging Face's weight as stored).
      post_norms: RMSNorm of the attention and FFN outputs before each residual add
        (Gemma 2/3's post_attention_layernorm and post_feedforward_layernorm).
      query_pre_attn_scalar: attention logits are scaled by this ** -0.5 (Gemma);
        None: head_dim ** -0.5.
      embed_scale_dtype: where embed_scale's sqrt(d_model) multiplies: "float32" (the
        f32 lookup) or "embedding" (the embedding's compute dtype, sqrt(d_model)
        rounded to it, as transformers' Gemma does).
      kv_lora_rank: multi-head latent attention (MLA, DeepSeek-V2/V3) when set: keys
        and values come from a latent of this width (kv_a_proj_with_mqa, kv_a_layernorm,
        kv_b_proj), which with a shared RoPE key is all the KV cache holds; null:
        grouped-query attention.
      q_lora_rank: MLA queries through a latent of this width (q_a_proj,
        q_a_layernorm, q_b_proj); null: one q_proj.
      qk_nope_head_dim, qk_rope_head_dim, v_head_dim: MLA's per-head widths of the
        query/key part without and with RoPE, and of the values (0 without MLA).
      rope_interleave: RoPE rotates channel pairs (2i, 2i + 1) (DeepSeek's layout)
        instead of (i, i + K/2).
      first_k_dense: the first this many blocks have a dense FFN of width d_ff
        whatever moe_every says (DeepSeek's first_k_dense_replace).
      moe_d_ff: each expert's hidden width; null: d_ff.
      n_shared_experts: experts every token goes through besides its routed ones, as
        one SwiGLU of width n_shared_experts * moe_d_ff (DeepSeekMoE).
      router_score: "softmax" or "sigmoid" (DeepSeek-V3) of the router's logits.
      topk_method: "greedy", "group_limited_greedy" or "noaux_tc" (see TOPK_METHODS).
      n_group, topk_group: experts fall into n_group equal groups and a token's
        experts come from its topk_group best groups (1, 1: no grouping).
      norm_topk_prob: the chosen experts' scores are normalized to sum to 1.
      routed_scaling_factor: the routed experts' combined output is multiplied by this.
      init_from: a Hugging Face model directory to start training from: its
        config.json sets the shape (every field above but max_seq_len and remat) and
        its weights the initial params (store.hf.resolve_init_from, init_params).

    Raises (on construction):
      FieldError: a field of the wrong type or out of range (integer sizes >= 1,
        n_experts >= 0, rope_theta and norm_eps finite and > 0, head_dim_override an
        even integer >= 2, sliding_window >= 1, a known remat, activation or
        embed_scale_dtype, rope_local_theta and query_pre_attn_scalar finite and > 0 or
        null, layer_types a list of known names), or fields that do not fit together
        (n_heads dividing d_model without head_dim_override, n_kv_heads dividing
        n_heads, an even head_dim, top_k <= n_experts and moe_every <= n_layers for MoE,
        one layer type per layer, a sliding_window for "sliding_attention" layers).
        `fields` names the fields at fault.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 384
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    n_experts: int = 0
    top_k: int = 2
    moe_every: int = 1
    tie_embeddings: bool = True
    remat: str = "none"
    norm_eps: float = 1e-6
    head_dim_override: int | None = None
    embed_scale: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    rope_scaling: RopeScaling = RopeScaling()
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    activation: str = "silu"
    norm_unit_offset: bool = False
    post_norms: bool = False
    query_pre_attn_scalar: float | None = None
    embed_scale_dtype: str = "float32"
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    first_k_dense: int = 0
    moe_d_ff: int | None = None
    n_shared_experts: int = 0
    router_score: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    init_from: str | None = None

    def __post_init__(self):
        if isinstance(self.layer_types, list):  # hashable: the config is a static jit argument
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self._check_fields()
        self._check_gemma_fields()
        self._check_mla()
        self._check_moe()
        self._check_shape()

    def _check_fields(self):
        for field, low in SIZES.items():
            _check_int(field, getattr(self, field), low)
        _check_positive("rope_theta", self.rope_theta)
        _check_positive("norm_eps", self.norm_eps)
        for field in FLAGS:
            _check(field, getattr(self, field), isinstance(getattr(self, field), bool), "true or false")
        _check("remat", self.remat, self.remat in REMATS, f"one of {', '.join(map(repr, REMATS))}")
        override, window = self.head_dim_override, self.sliding_window
        _check("head_dim_override", override, override is None or (_is_int(override) and override >= 2
                                                                    and override % 2 == 0),
               "an even integer >= 2 (RoPE rotates pairs), or null")
        _check("sliding_window", window, window is None or (_is_int(window) and window >= 1),
               "an integer >= 1, or null")
        _check("rope_scaling", self.rope_scaling, isinstance(self.rope_scaling, RopeScaling), "a RopeScaling")
        _check("init_from", self.init_from, self.init_from is None or (isinstance(self.init_from, str)
                                                                       and self.init_from != ""),
               "a model directory, or null")

    def _check_gemma_fields(self):
        for field in ("rope_local_theta", "query_pre_attn_scalar"):
            value = getattr(self, field)
            _check(field, value, value is None or (_is_finite(value) and value > 0), "a finite number > 0, or null")
        _check("activation", self.activation, self.activation in ACTIVATIONS,
               f"one of {', '.join(map(repr, ACTIVATIONS))}")
        _check("embed_scale_dtype", self.embed_scale_dtype, self.embed_scale_dtype in EMBED_SCALE_DTYPES,
               f"one of {', '.join(map(repr, EMBED_SCALE_DTYPES))}")
        types = self.layer_types
        _check("layer_types", types, types is None or (isinstance(types, tuple) and all(
            isinstance(t, str) and t in LAYER_TYPES for t in types)),
               f"a list of {' or '.join(map(repr, LAYER_TYPES))}, one per layer, or null")
        if types is not None and len(types) != self.n_layers:
            raise FieldError(f"layer_types names {len(types)} layers; n_layers={self.n_layers}", "layer_types",
                             "n_layers")
        if types is not None and "sliding_attention" in types and self.sliding_window is None:
            raise FieldError("layer_types has 'sliding_attention' layers but sliding_window is null",
                             "layer_types", "sliding_window")

    def _check_mla(self):
        for field in OPTIONAL_SIZES:
            value = getattr(self, field)
            _check(field, value, value is None or (_is_int(value) and value >= 1), "an integer >= 1, or null")
        if self.kv_lora_rank is None:
            for field in ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, field):
                    raise FieldError(f"{field}={getattr(self, field)} is a multi-head latent attention field but "
                                     "kv_lora_rank is null (grouped-query attention)", field, "kv_lora_rank")
            return
        for field in ("qk_rope_head_dim", "v_head_dim"):
            _check(field, getattr(self, field), getattr(self, field) >= 1, "an integer >= 1 with kv_lora_rank set")
        _check("qk_rope_head_dim", self.qk_rope_head_dim, self.qk_rope_head_dim % 2 == 0,
               "an even integer (RoPE rotates pairs)")

    def _check_moe(self):
        _check("router_score", self.router_score, self.router_score in ROUTER_SCORES,
               f"one of {', '.join(map(repr, ROUTER_SCORES))}")
        _check("topk_method", self.topk_method, self.topk_method in TOPK_METHODS,
               f"one of {', '.join(map(repr, TOPK_METHODS))}")
        _check_positive("routed_scaling_factor", self.routed_scaling_factor)
        if not self.n_experts:
            return
        e, groups, k = self.n_experts, self.n_group, self.top_k
        if e % groups:
            raise FieldError(f"n_group={groups} must divide n_experts={e}", "n_group", "n_experts")
        if self.topk_group > groups:
            raise FieldError(f"topk_group={self.topk_group} must be in [1, n_group={groups}]", "topk_group", "n_group")
        if groups > 1 and k > self.topk_group * (e // groups):
            raise FieldError(f"top_k={k} exceeds the {self.topk_group} x {e // groups} experts of topk_group="
                             f"{self.topk_group} groups", "top_k", "topk_group")
        if self.topk_method == "noaux_tc" and e // groups < 2:
            raise FieldError(f"topk_method 'noaux_tc' ranks groups by their two best experts; n_experts={e} in "
                             f"n_group={groups} groups leaves {e // groups}", "n_group", "topk_method")
        if self.first_k_dense >= self.n_layers:
            raise FieldError(f"first_k_dense={self.first_k_dense} leaves none of n_layers={self.n_layers} blocks "
                             f"for the MoE FFN of n_experts={e}", "first_k_dense", "n_layers")

    def _check_shape(self):
        d, h, g = self.d_model, self.n_heads, self.n_kv_heads
        if not self.is_mla and self.head_dim_override is None and d % h:
            raise FieldError(f"d_model={d} must be divisible by n_heads={h} (or set head_dim_override)",
                             "d_model", "n_heads")
        if not self.is_mla and self.head_dim_override is None and (d // h) % 2:
            raise FieldError(f"head_dim = d_model // n_heads = {d // h} must be even for RoPE (d_model={d}, "
                             f"n_heads={h})", "d_model", "n_heads")
        if h % g:
            raise FieldError(f"n_heads={h} must be divisible by n_kv_heads={g}", "n_heads", "n_kv_heads")
        if self.n_experts and self.top_k > self.n_experts:
            raise FieldError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]", "top_k", "n_experts")
        if self.n_experts and self.moe_every > self.n_layers:
            raise FieldError(f"moe_every={self.moe_every} exceeds n_layers={self.n_layers}: no block would have "
                             f"the MoE FFN of n_experts={self.n_experts}", "moe_every", "n_layers")

    def check_vocab(self, ids: int, tokenizer: str) -> None:
        """Checks that the embedding has a row for every id of a tokenizer of `ids` ids.

        Raises:
          ValueError: naming `tokenizer`, its id count and vocab_size.
        """
        if ids > self.vocab_size:
            raise ValueError(f"tokenizer {tokenizer} has {ids} ids but the model's vocab_size is "
                             f"{self.vocab_size}: ids {self.vocab_size}..{ids - 1} have no embedding; use the "
                             "model's own tokenizer")

    @property
    def head_dim(self) -> int:
        """Per-head width of queries and keys (MLA: qk_nope_head_dim + qk_rope_head_dim)."""
        if self.is_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim_override or self.d_model // self.n_heads

    @property
    def is_mla(self) -> bool:
        """Whether attention is multi-head latent attention (kv_lora_rank set)."""
        return self.kv_lora_rank is not None

    @property
    def cache_slots(self) -> dict[str, tuple[int, ...]]:
        """What the KV cache holds per token and layer, by slot name: keys and values of
        every KV head ({"k", "v"}: (n_kv_heads, head_dim)), or for MLA the normalized
        latent and the shared RoPE key ({"latent": (kv_lora_rank,), "k_rope":
        (qk_rope_head_dim,)})."""
        if self.is_mla:
            return {"latent": (self.kv_lora_rank,), "k_rope": (self.qk_rope_head_dim,)}
        return {"k": (self.n_kv_heads, self.head_dim), "v": (self.n_kv_heads, self.head_dim)}

    @property
    def expert_d_ff(self) -> int:
        """Each routed expert's hidden width (moe_d_ff, else d_ff)."""
        return self.moe_d_ff or self.d_ff

    def window(self, layer: int) -> int | None:
        """How many keys (itself included) a query of block `layer` sees; None: all."""
        if self.layer_types is not None and self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    def rope(self, layer: int) -> tuple[float, RopeScaling]:
        """(RoPE base, RopeScaling) of block `layer`: a "sliding_attention" block of a
        config with rope_local_theta gets that base and no scaling."""
        if self.layer_types is not None and self.layer_types[layer] == "sliding_attention" and \
                self.rope_local_theta is not None:
            return self.rope_local_theta, RopeScaling()
        return self.rope_theta, self.rope_scaling

    @property
    def attn_scale(self) -> float:
        """The factor of the attention logits: query_pre_attn_scalar (or head_dim) ** -0.5."""
        scale = 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)  # as mpx.nn.grouped_attention's default
        if self.is_mla:  # DeepSeek: YaRN's temperature on every dimension, not only the rotary ones
            scale *= self.rope_scaling.temperature(self.rope_scaling.mscale_all_dim) ** 2
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` has the MoE FFN (every `moe_every`-th block, counting from 1,
        past the first `first_k_dense`)."""
        return self.n_experts > 0 and layer >= self.first_k_dense and layer % self.moe_every == self.moe_every - 1


PRESETS = {
    # CPU tests: seconds.
    "tiny": ModelConfig(),
    # CPU minutes.
    "small": ModelConfig(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=768, max_seq_len=256),
    # MoE variant of tiny, for tests of routing and per-expert FP8 weights.
    "tiny_moe": ModelConfig(n_experts=4, top_k=2, d_ff=256),
    # DeepSeek-V3's architecture at CPU scale: MLA, a dense first block, then DeepSeekMoE.
    "deepseek_v3_tiny": ModelConfig(
        d_model=128, n_layers=3, n_heads=4, n_kv_heads=4, d_ff=384, embed_scale=False,
        kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope_interleave=True, rope_scaling=RopeScaling("yarn", factor=4.0, original_max_len=32, mscale=1.0,
                                                       mscale_all_dim=1.0),
        tie_embeddings=False, first_k_dense=1, n_experts=8, top_k=2, n_group=4, topk_group=2, moe_d_ff=128,
        n_shared_experts=1,
        router_score="sigmoid", topk_method="noaux_tc", routed_scaling_factor=2.5),
    # ~1B parameters: GPU benchmarks.
    "1b": ModelConfig(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8,
                      d_ff=8192, max_seq_len=2048, tie_embeddings=False),
}


def preset(name: str) -> ModelConfig:
    """A model preset by name: tiny, small, tiny_moe, deepseek_v3_tiny, 1b.

    Raises:
      ValueError: naming the unknown preset and the known ones.
    """
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def from_section(section: Any) -> ModelConfig:
    """The `ModelConfig` a config file's `model` section describes.

    Args:
      section: a preset name ("tiny"), a mapping naming a `preset` plus the fields that
        differ from it (`{preset: small, n_layers: 6}`), or a mapping of fields (missing
        ones take the `ModelConfig` defaults).

    Returns:
      The validated `ModelConfig`.

    Raises:
      ConfigError: an unknown preset or key, a wrong type or an invalid value, naming
        the dotted key under `model`.
    """
    if isinstance(section, str):
        section = {"preset": section}
    if isinstance(section, dict) and "preset" in section:
        fields = [f.name for f in dataclasses.fields(ModelConfig)]
        config_io.check_keys(section, ["preset", *fields], "model")
        try:
            base = dataclasses.asdict(preset(section["preset"]))
        except (ValueError, TypeError) as e:
            raise config_io.ConfigError(f"model.preset: {e}", "model.preset") from None
        section = {**base, **{k: v for k, v in section.items() if k != "preset"}}
    return config_io.from_dict(ModelConfig, section, "model")
