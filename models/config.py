"""Configuration of the reference transformer language model, with presets."""

from __future__ import annotations

import dataclasses
from typing import Any

from mpx import config as config_io

ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Context extension of RoPE's frequencies (Hugging Face's `rope_scaling`).

    Attributes:
      kind: "none"; "linear" (every frequency divided by `factor`, position
        interpolation); or "llama3" (Llama 3.1: wavelengths above
        original_max_len / low_freq_factor divided by `factor`, those below
        original_max_len / high_freq_factor kept, a smooth blend between).
      factor: the context extension factor.
      low_freq_factor, high_freq_factor, original_max_len: the llama3 band edges.
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self):
        config_io.check_choice("rope_scaling kind", self.kind, ROPE_SCALINGS)
        if self.factor <= 0:
            raise ValueError(f"rope_scaling factor must be > 0; got {self.factor}")
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor; got "
                             f"{self.low_freq_factor}, {self.high_freq_factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer (RMSNorm, RoPE, SwiGLU, GQA, optional MoE).

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
      rope_scaling: RoPE context extension (Llama 3.1's "llama3", "linear").
      init_from: a Hugging Face model directory to start training from: its
        config.json sets the shape (every field above but max_seq_len and remat) and
        its weights the initial params (store.hf.resolve_init_from, init_params).
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
    init_from: str | None = None

    def __post_init__(self):
        if self.head_dim_override is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                             "(or set head_dim_override)")
        if self.head_dim_override is not None and self.head_dim_override < 2:
            raise ValueError(f"head_dim_override must be >= 2; got {self.head_dim_override}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None; got {self.sliding_window}")
        if self.remat not in ("none", "full", "non_fp8"):
            raise ValueError(f"remat must be one of 'none', 'full', 'non_fp8'; got {self.remat!r}")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` has the MoE FFN (every `moe_every`-th block, counting from 1)."""
        return self.n_experts > 0 and layer % self.moe_every == self.moe_every - 1


PRESETS = {
    # CPU tests: seconds.
    "tiny": ModelConfig(),
    # CPU minutes.
    "small": ModelConfig(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=768, max_seq_len=256),
    # MoE variant of tiny, for tests of routing and per-expert FP8 weights.
    "tiny_moe": ModelConfig(n_experts=4, top_k=2, d_ff=256),
    # ~1B parameters: GPU benchmarks.
    "1b": ModelConfig(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8,
                      d_ff=8192, max_seq_len=2048, tie_embeddings=False),
}


def preset(name: str) -> ModelConfig:
    """A model preset by name: tiny, small, tiny_moe, 1b.

    Raises:
      ValueError: naming the unknown preset and the known ones.
    """
    if name not in PRESETS:
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
