"""The KV cache for generation: an explicit pytree, in bf16, f32 or FP8.

One dict per layer (the list index is the layer):

    "k": keys   (B, S_max, G, K)    G key/value heads, K head dim
    "v": values (B, S_max, G, K)

Each is a plain array (bf16 or f32) or, for an FP8 cache, an `mpx.ScaledArray`:

    data:  float8_e4m3fn (B, S_max, G, K)
    scale: float32       (B, S_max, G, 1)    one scale per (token, head)
    block: (1, 1, 1, K)

The transformer writes the keys and values of each new token at its position; an FP8
cache quantizes each head's K-vector with its own scale as it is written (a 1 x K tile,
like DeepSeek-V3's 1x128 activation tiles), so no calibration is needed and no later
token can overflow an earlier token's scale. Attention dequantizes on read. Slots past a
row's position are stale or empty and masked out by position.

Memory per element: bf16 2 bytes; FP8 1 + 4 / K bytes (1.125 for K = 32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models import transformer
from models.config import ModelConfig
from mpx import formats
from mpx.config import check_choice
from mpx.scaled import ScaledArray

KINDS = ("bf16", "fp8", "fp32")
FP8_FORMAT = "e4m3"


def check_kind(kind: str) -> str:
    """Returns `kind` if it is a cache kind.

    Raises:
      ValueError: naming the bad kind and the allowed ones.
    """
    check_choice("KV cache kind", kind, KINDS)
    return kind


def _fp8_slot(shape: tuple[int, ...]) -> ScaledArray:
    fmt = formats.get(FP8_FORMAT)
    return ScaledArray(jnp.zeros(shape, fmt.dtype), jnp.ones(shape[:-1] + (1,), jnp.float32), fmt,
                       (1,) * (len(shape) - 1) + (shape[-1],))


def init(config: ModelConfig, batch: int, kind: str = "bf16", length: int | None = None) -> list[dict]:
    """An empty cache for `batch` rows of up to `length` (default max_seq_len) tokens.

    Args:
      config: the model's shape (layers, kv heads, head dim).
      batch: rows.
      kind: "bf16", "fp32" or "fp8" (E4M3 with per-(token, head) scales).
      length: slots per row.

    Returns:
      A list of {"k", "v"} dicts, one per layer (see the module docstring).

    Raises:
      ValueError: for an unknown kind.
    """
    check_kind(kind)
    if kind != "fp8":
        return transformer.init_cache(config, batch, jnp.bfloat16 if kind == "bf16" else jnp.float32, length)
    shape = (batch, length or config.max_seq_len, config.n_kv_heads, config.head_dim)
    return [{"k": _fp8_slot(shape), "v": _fp8_slot(shape)} for _ in range(config.n_layers)]


def nbytes(cache) -> int:
    """Bytes the cache holds (FP8 data, scales and bf16/f32 arrays alike)."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(cache)))


def bytes_per_token(config: ModelConfig, kind: str) -> float:
    """Cache bytes per token of one row, over all layers."""
    check_kind(kind)
    per_elem = {"bf16": 2.0, "fp32": 4.0, "fp8": 1.0 + 4.0 / config.head_dim}[kind]
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * per_elem
