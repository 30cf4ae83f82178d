"""Configuration of the reference transformer language model, with presets."""

from __future__ import annotations

import dataclasses
from typing import Any

from mpx import config as config_io


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
        of FP8 blocks, whose saved activations are 4x smaller; seed section 3.2).
      norm_eps: RMSNorm epsilon.
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

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.d_model // self.n_heads} must be even for RoPE")
        if self.remat not in ("none", "full", "non_fp8"):
            raise ValueError(f"remat must be one of 'none', 'full', 'non_fp8'; got {self.remat!r}")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


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
