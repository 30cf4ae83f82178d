"""The KV cache for generation: an explicit pytree, in bf16, f32 or FP8.

One dict per layer (the list index is the layer), its slots those of
`ModelConfig.cache_slots`:

    "k": keys   (B, S_max, G, K)    G key/value heads, K head dim
    "v": values (B, S_max, G, K)

or, for multi-head latent attention (DeepSeek-V3), the latent and the shared RoPE key:

    "latent": (B, S_max, C)        C = kv_lora_rank
    "k_rope": (B, S_max, R)        R = qk_rope_head_dim

Each is a plain array (f32, or bf16 held as its uint16 bit patterns) or, for an FP8
cache, an `mpx.ScaledArray`:

    data:  uint8   (B, S_max, G, K)    the bit patterns of float8_e4m3fn values
    scale: float32 (B, S_max, G, 1)    one scale per (token, head)
    block: (1, 1, 1, K)

Bit patterns, because XLA on CPU rewrites a whole bf16 or float8 array whenever one
token is scattered into it, while it writes unsigned integers in place
(`models.transformer.as_bits`; benchmarks/kv_capacity.py measures it); attention
reinterprets only the slots it reads.

This module is the serving side's one home for the cache: its kinds, `init`, its size
and `constrain` (its shardings under a mesh layout). The attention layer
(`models.transformer`) writes the keys and values of each new token at its position; an FP8
cache quantizes each head's K-vector with its own scale as it is written (a 1 x K tile,
like DeepSeek-V3's 1x128 activation tiles), so no calibration is needed and no later
token can overflow an earlier token's scale. Attention dequantizes on read, and reads
only the first `cache_len` slots of its rows (a power-of-two span above the positions in
use, chosen by `serve.engine` and `serve.slots`), so a large capacity costs memory, not
time. Slots past a row's position are stale or empty and masked out by position.

Memory per element: bf16 2 bytes; FP8 1 + 4 / K bytes (1.125 for K = 32), K the width of
the slot's last axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.transformer import as_bits
from mpx import formats
from mpx import sharding
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


def _slot(shape: tuple[int, ...], kind: str) -> jax.Array | ScaledArray:
    if kind != "fp8":
        return as_bits(jnp.zeros(shape, jnp.bfloat16 if kind == "bf16" else jnp.float32))
    fmt = formats.get(FP8_FORMAT)
    return ScaledArray(as_bits(jnp.zeros(shape, fmt.dtype)), jnp.ones(shape[:-1] + (1,), jnp.float32), fmt,
                       (1,) * (len(shape) - 1) + (shape[-1],))


def init(config: ModelConfig, batch: int, kind: str = "bf16", length: int | None = None) -> list[dict]:
    """An empty cache for `batch` rows of up to `length` (default max_seq_len) tokens.

    Args:
      config: the model's shape (layers, kv heads, head dim).
      batch: rows.
      kind: "bf16", "fp32" or "fp8" (E4M3 with per-(token, head) scales).
      length: slots per row.

    Returns:
      A list of dicts of slots, one per layer (see the module docstring).

    Raises:
      ValueError: for an unknown kind.
    """
    check_kind(kind)
    rows = (batch, length or config.max_seq_len)
    return [{name: _slot(rows + shape, kind) for name, shape in config.cache_slots.items()}
            for _ in range(config.n_layers)]


def constrain(cache, layout: sharding.Layout | None):
    """Inside jit: pins `cache` to its shardings under `layout` (batch on data x fsdp, kv
    heads on tensor); returns it unchanged when `layout` is None (one device)."""
    if layout is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, sharding.cache_shardings(cache, layout.mesh))


def nbytes(cache) -> int:
    """Bytes the cache holds (FP8 data, scales and bf16/f32 arrays alike)."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(cache)))


def bytes_per_token(config: ModelConfig, kind: str) -> float:
    """Cache bytes per token of one row, over all layers."""
    check_kind(kind)
    total = 0.0
    for shape in config.cache_slots.values():
        per_elem = {"bf16": 2.0, "fp32": 4.0, "fp8": 1.0 + 4.0 / shape[-1]}[kind]
        total += math.prod(shape) * per_elem
    return config.n_layers * total
