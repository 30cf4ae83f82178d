"""Multi-head latent attention (MLA, DeepSeek-V2/V3), with a latent KV cache.

Per token x (D,), with H heads, C = kv_lora_rank, R = qk_rope_head_dim:

    q           = q_b_proj(q_a_norm(q_a_proj(x)))  or q_proj(x)    (H, nope + R)
    c, k_rope   = split(kv_a_proj(x), [C, R]);  c = kv_a_norm(c)   (C,), (R,)
    k_nope, v   = split(kv_b_proj(c), [nope, V])                   (H, nope), (H, V)
    k           = [k_nope, rope(k_rope) for every head]            (H, nope + R)
    out         = o_proj(attention(q with rope on its last R, k, v))

Without a cache (training, scoring) it computes exactly that ("expanded" form). With a
cache it keeps only c and rope(k_rope) per token (C + R values instead of 2 x H x K)
and attends in the absorbed form (DeepSeek's `attn_impl="absorb"`): kv_b_proj's key half
W_k (C, H, nope) is folded into the queries and its value half W_v (C, H, V) applied
after attention,

    scores = (q_nope W_k^T) . c + q_rope . k_rope,    out = (softmax(scores) . c) W_v,

which is multi-query attention over keys [c, k_rope] and values c: equal to the expanded
form up to float rounding. kv_b_proj's weight enters the absorbed form dequantized (when
serving stores it in FP8) in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.cache import Cache, attention_mask, read_slot, write_slots
from models.config import ModelConfig
from models.ffn import residual_init
from models.rope import rope
from mpx import nn as mnn
from mpx.policy import Policy
from mpx.scaled import ScaledArray, dequantize

Array = jax.Array


class LatentAttention(nn.Module):
    """MLA self-attention of block `layer`; the cache interface of `SelfAttention`.

    Params (under attn/): q_proj or q_a_proj, q_a_norm, q_b_proj; kv_a_proj, kv_a_norm,
    kv_b_proj, o_proj. Cache slots: "latent" (B, S, C) and "k_rope" (B, S, R).
    """

    config: ModelConfig
    policy: Policy | None = None
    cache_len: int | None = None
    layer: int = 0

    def _norm(self, name: str) -> mnn.RMSNorm:
        return mnn.RMSNorm(self.config.norm_eps, policy=self.policy, name=name)

    def _queries(self, x: Array) -> Array:
        c = self.config
        heads = (c.n_heads, c.head_dim)
        if c.q_lora_rank is None:
            return mnn.DenseGeneral(heads, policy=self.policy, name="q_proj")(x)
        q = mnn.Dense(c.q_lora_rank, policy=self.policy, name="q_a_proj")(x)
        return mnn.DenseGeneral(heads, policy=self.policy, name="q_b_proj")(self._norm("q_a_norm")(q))

    @nn.compact
    def __call__(self, x: Array, positions: Array, cache: Cache | None,
                 cache_rows: Array | None = None) -> tuple[Array, Cache | None]:
        c = self.config
        nope, r = c.qk_nope_head_dim, c.qk_rope_head_dim
        theta, scaling = c.rope(self.layer)
        q = self._queries(x)  # (B, T, H, nope + R)
        q = jnp.concatenate([q[..., :nope], rope(q[..., nope:], positions, theta, scaling, c.rope_interleave)], -1)
        kv = mnn.Dense(c.kv_lora_rank + r, policy=self.policy, name="kv_a_proj")(x)  # (B, T, C + R)
        latent = self._norm("kv_a_norm")(kv[..., :c.kv_lora_rank])  # (B, T, C)
        k_rope = rope(kv[..., None, c.kv_lora_rank:], positions, theta, scaling, c.rope_interleave)[:, :, 0]
        kv_b = mnn.DenseGeneral((c.n_heads, nope + c.v_head_dim), policy=self.policy, name="kv_b_proj")
        if cache is None:
            out = self._expanded(q, latent, k_rope, kv_b)
        else:
            out, cache = self._absorbed(q, latent, k_rope, kv_b, positions, cache, cache_rows)
        out = mnn.DenseGeneral(c.d_model, axis=(-2, -1), policy=self.policy, name="o_proj",
                               kernel_init=residual_init(c.n_layers))(out)
        return out, cache

    def _expanded(self, q: Array, latent: Array, k_rope: Array, kv_b: nn.Module) -> Array:
        c, (b, t, h, _) = self.config, q.shape
        kv = kv_b(latent)  # (B, T, H, nope + V)
        k_nope, v = kv[..., :c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None].astype(k_nope.dtype),
                                                      (b, t, h, c.qk_rope_head_dim))], axis=-1)
        pos = jnp.arange(t)[None, :]
        mask = attention_mask(pos, pos, c.window(self.layer))
        return mnn.grouped_attention(self, self.policy, q, k, v, mask, c.attn_scale)  # (B, T, H, V)

    def _kv_b_weight(self, kv_b: nn.Module, latent: Array) -> Array:
        """kv_b_proj's kernel as (C, H, nope + V) float32 (dequantized when stored in FP8)."""
        if self.is_initializing():
            kv_b(latent)  # creates the param
        kernel = self.variables["params"]["kv_b_proj"]["kernel"]
        if isinstance(kernel, ScaledArray):
            kernel = dequantize(kernel, jnp.float32)
        c = self.config
        return kernel.astype(jnp.float32).reshape(c.kv_lora_rank, c.n_heads, c.qk_nope_head_dim + c.v_head_dim)

    def _absorbed(self, q: Array, latent: Array, k_rope: Array, kv_b: nn.Module, positions: Array,
                  cache: Cache, cache_rows: Array | None) -> tuple[Array, Cache]:
        c, b = self.config, q.shape[0]
        w = self._kv_b_weight(kv_b, latent)
        w_k, w_v = w[..., :c.qk_nope_head_dim], w[..., c.qk_nope_head_dim:]  # (C, H, nope), (C, H, V)
        cache = write_slots(cache, {"latent": latent, "k_rope": k_rope}, positions, cache_rows)
        lat, kr = (read_slot(cache[n], b, cache_rows, self.cache_len) for n in ("latent", "k_rope"))  # (B, S, .)
        q_lat = jnp.einsum("bthn,chn->bthc", q[..., :c.qk_nope_head_dim].astype(jnp.float32), w_k)
        q_abs = jnp.concatenate([q_lat, q[..., c.qk_nope_head_dim:].astype(jnp.float32)], axis=-1)
        keys = jnp.concatenate([lat, kr], axis=-1).astype(jnp.float32)[:, :, None]  # (B, S, 1, C + R)
        mask = attention_mask(positions, jnp.arange(lat.shape[1])[None, :], c.window(self.layer))
        ctx = mnn.grouped_attention(self, self.policy, q_abs, keys, lat.astype(jnp.float32)[:, :, None], mask,
                                    c.attn_scale)  # (B, T, H, C)
        return jnp.einsum("bthc,chv->bthv", ctx.astype(jnp.float32), w_v), cache
