"""The KV cache as the model reads and writes it: slots of bit patterns, FP8 or float.

Per layer, one dict of slots, each (N, S_max, ...) for N >= B cache rows (a batch uses
B of them): {"k", "v"} of (G, K) per token for grouped-query attention, {"latent",
"k_rope"} of (kv_lora_rank,) and (qk_rope_head_dim,) for multi-head latent attention
(`ModelConfig.cache_slots`). A slot is an array (bf16 as its uint16 bit patterns, f32)
or an FP8 `ScaledArray` with one scale per (token, head) vector (block (1, 1, ..., K));
serve/kv_cache.py builds every kind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from mpx.dot import upcast
from mpx.scaled import ScaledArray, quantize

Array = jax.Array
Cache = dict


def init_cache(config: ModelConfig, batch: int, dtype=jnp.bfloat16, length: int | None = None) -> list[Cache]:
    """An empty KV cache: one dict of zeros per layer, a (B, S_max, ...) array per slot of
    `ModelConfig.cache_slots` ({"k", "v"} of (G, K); MLA: {"latent", "k_rope"}), bf16 as
    its bit patterns (see `as_bits`)."""
    n = (batch, length or config.max_seq_len)
    return [{name: as_bits(jnp.zeros(n + shape, dtype)) for name, shape in config.cache_slots.items()}
            for _ in range(config.n_layers)]


# A cache slot of 1- or 2-byte floats is stored as its unsigned-integer bit patterns: XLA on
# CPU rewrites a whole bf16 or float8 array when a token is scattered into it (and a
# bitcast of the whole array costs as much), so decode would pay for the cache's capacity,
# not its filled part; into unsigned integers it scatters in place. Reads reinterpret only
# the slots they attend.
_BITS = {1: jnp.uint8, 2: jnp.uint16}
_FLOATS = {jnp.dtype(jnp.uint16): jnp.bfloat16}  # what a plain uint16 slot holds


def as_bits(x: Array) -> Array:
    """The bit patterns of a bf16 or float8 array (uint16 / uint8); other arrays as they are."""
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize in _BITS:
        return jax.lax.bitcast_convert_type(x, _BITS[x.dtype.itemsize])
    return x


def _from_bits(x: Array, dtype) -> Array:
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def write_slots(cache: Cache, new: dict[str, Array], positions: Array, rows: Array | None) -> Cache:
    """Writes each `new[name]` (B, T, ...) at its positions (B, T) into slot `name` of
    cache rows `rows` (B,) (None: the first B rows)."""
    b = next(iter(new.values())).shape[0]
    rows = (jnp.arange(b) if rows is None else rows)[:, None]
    return {**cache, **{n: _write_slot(cache[n], x, rows, positions) for n, x in new.items()}}


def _write_slot(slot, x: Array, rows: Array, positions: Array):
    if isinstance(slot, ScaledArray):  # FP8: each (token, head) vector gets its own scale as it is written
        q = quantize(x, slot.fmt, slot.block)
        return ScaledArray(as_bits(slot.data).at[rows, positions].set(as_bits(q.data)),
                           slot.scale.at[rows, positions].set(q.scale), slot.fmt, slot.block)
    dtype = _FLOATS.get(slot.dtype, slot.dtype)
    return as_bits(slot).at[rows, positions].set(as_bits(x.astype(dtype)))


def read_slot(slot, batch: int, rows: Array | None, length: int | None) -> Array:
    """The keys or values attended: the first `length` slots (None: all) of cache rows
    `rows` (None: the first `batch` rows), dequantized."""
    length = slot.shape[1] if length is None else length
    if rows is None:
        slot = jax.tree.map(lambda x: x[:batch, :length], slot)
    else:
        slot = jax.tree.map(lambda x: jnp.take(x[:, :length], rows, axis=0), slot)
    if isinstance(slot, ScaledArray):  # scale (B, S, G, 1) broadcasts over each head vector
        return upcast(_from_bits(slot.data, slot.fmt.dtype), jnp.float32) * slot.scale
    return _from_bits(slot, _FLOATS.get(slot.dtype, slot.dtype))


def attention_mask(query_pos: Array, key_pos: Array, window: int | None) -> Array:
    """(B, 1, T, S) bool: key j visible to query i when j <= i (and i - j < window)."""
    delta = query_pos[:, :, None] - key_pos[:, None, :]  # (B, T, S)
    visible = delta >= 0
    if window is not None:
        visible &= delta < window
    return visible[:, None]
