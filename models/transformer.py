"""The reference decoder-only transformer LM, built from mpx.nn layers.

RMSNorm (pre-norm), RoPE, grouped-query attention, SwiGLU or GeGLU FFN or a top-k MoE FFN,
a tied or untied LM head; Gemma 3's additions as config fields (per-layer sliding or full
attention with their own RoPE bases, post-norms, (1 + w) RMSNorm, query_pre_attn_scalar).
Every layer takes its precision from the policy by its module path:

    embed                                   token embedding (attend() = tied LM head)
    layers_{i}/attn_norm, layers_{i}/mlp_norm, final_norm
    layers_{i}/attn_post_norm, layers_{i}/mlp_post_norm   post-norms (Gemma)
    layers_{i}/attn/{q_norm,k_norm}                 per-head q/k RMSNorm (Qwen3, Gemma)
    layers_{i}/attn/{q_proj,k_proj,v_proj,o_proj}   projections
    layers_{i}/attn/qk, layers_{i}/attn/pv          QK^T and PV contractions
    layers_{i}/mlp/{gate,up,down}                   SwiGLU or GeGLU FFN
    layers_{i}/moe/router                           MoE router (f32 in every preset)
    layers_{i}/moe/experts/{gate,up,down}           per-expert FP8 weights
    lm_head                                 untied LM head

Shapes: B batch, T query length, S key length, D model width, H query heads, G key/value
heads, K head dim, E experts, F FFN width, V vocabulary.

Example:
    >>> import jax, jax.numpy as jnp, mpx
    >>> from models import transformer, config
    >>> model = transformer.Transformer(config.preset("tiny"), mpx.policy.preset("fp8"))
    >>> tokens = jnp.zeros((2, 16), jnp.int32)
    >>> variables = model.init(jax.random.key(0), tokens)
    >>> model.apply(variables, tokens)[0].shape
    (2, 16, 256)
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig, RopeScaling
from mpx import nn as mnn
from mpx.policy import Policy, preset
from mpx.dot import upcast
from mpx.scaled import ScaledArray, quantize

Array = jax.Array
# Per layer: {"k": (N, S_max, G, K), "v": (N, S_max, G, K)}, each an array (bf16, f32) or
# an FP8 ScaledArray with one scale per (token, head): scale (N, S_max, G, 1), block
# (1, 1, 1, K); serve/kv_cache.py builds both kinds. N >= B cache rows: a batch uses B of them.
Cache = dict
ACTIVATION_AXES = ("batch", "seq", "act_embed")  # logical axes of the residual stream
LOGITS_AXES = ("batch", "seq", "vocab")


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> Array:
    """RoPE's angular frequencies (K/2,) f32: theta^(-2i/K), then context-extended.

    "linear" divides every frequency by the factor; "llama3" (Llama 3.1) divides the
    low frequencies (wavelength above original_max_len / low_freq_factor), keeps the
    high ones (below original_max_len / high_freq_factor) and blends in between.
    """
    half = head_dim // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (K/2,)
    if scaling.kind == "linear":
        return freqs / scaling.factor
    if scaling.kind == "llama3":
        wavelen = 2 * math.pi / freqs
        low_wavelen = scaling.original_max_len / scaling.low_freq_factor
        high_wavelen = scaling.original_max_len / scaling.high_freq_factor
        scaled = jnp.where(wavelen > low_wavelen, freqs / scaling.factor, freqs)
        smooth = (scaling.original_max_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, blended, scaled)
    return freqs


def rope(x: Array, positions: Array, theta: float, scaling: RopeScaling = RopeScaling()) -> Array:
    """Rotary position embedding of x (B, T, H, K) at integer positions (B, T), in f32.

    Pairs channel i with channel i + K/2 (the "rotate half" layout of Hugging Face's
    Llama-family checkpoints, whose q/k weights therefore load without permutation).
    """
    freqs = rope_frequencies(x.shape[-1], theta, scaling)  # (K/2,)
    angles = positions[..., None].astype(jnp.float32) * freqs  # (B, T, K/2)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def residual_init(n_layers: int):
    """Init of projections that write into the residual stream (o_proj, FFN down).

    GPT-2's scaling: variance 1 / (2 * n_layers) of fan-in init, so the residual stream's
    variance does not grow with depth at initialization.
    """
    return nn.initializers.variance_scaling(1.0 / (2 * n_layers), "fan_in", "truncated_normal")


def init_cache(config: ModelConfig, batch: int, dtype=jnp.bfloat16, length: int | None = None) -> list[Cache]:
    """An empty KV cache: one {"k", "v"} dict of (B, S_max, G, K) zeros per layer, bf16 as
    its bit patterns (see `as_bits`)."""
    shape = (batch, length or config.max_seq_len, config.n_kv_heads, config.head_dim)
    return [{"k": as_bits(jnp.zeros(shape, dtype)), "v": as_bits(jnp.zeros(shape, dtype))}
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


def _write_cache(cache: Cache, k: Array, v: Array, positions: Array, rows: Array | None) -> Cache:
    """Writes k, v (B, T, G, K) at their positions (B, T) into cache rows `rows` (B,)
    (None: the first B rows)."""
    rows = (jnp.arange(k.shape[0]) if rows is None else rows)[:, None]
    return {"k": _write_slot(cache["k"], k, rows, positions), "v": _write_slot(cache["v"], v, rows, positions)}


def _write_slot(slot, x: Array, rows: Array, positions: Array):
    if isinstance(slot, ScaledArray):  # FP8: each (token, head) vector gets its own scale as it is written
        q = quantize(x, slot.fmt, slot.block)
        return ScaledArray(as_bits(slot.data).at[rows, positions].set(as_bits(q.data)),
                           slot.scale.at[rows, positions].set(q.scale), slot.fmt, slot.block)
    dtype = _FLOATS.get(slot.dtype, slot.dtype)
    return as_bits(slot).at[rows, positions].set(as_bits(x.astype(dtype)))


def _read_slot(slot, batch: int, rows: Array | None, length: int | None) -> Array:
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


class SelfAttention(nn.Module):
    """Grouped-query self-attention with RoPE; optional KV cache for generation.

    With a cache, the new keys and values are written at their positions into cache rows
    `cache_rows` (B,) (None: the first B rows), and the queries attend over the first
    `cache_len` slots of those rows (None: every slot), so attention costs what the
    filled part of the cache holds, not its capacity. Every query must sit below
    `cache_len` to see its own key; slots at or past a query's position are masked, so
    any `cache_len` above the last query's position gives the same result.

    Block `layer`'s window and RoPE come from the config (`ModelConfig.window`, `.rope`):
    a sliding layer's mask hides keys more than its window behind, in the cache too.
    """

    config: ModelConfig
    policy: Policy | None = None
    cache_len: int | None = None
    layer: int = 0

    @nn.compact
    def __call__(self, x: Array, positions: Array, cache: Cache | None,
                 cache_rows: Array | None = None) -> tuple[Array, Cache | None]:
        c = self.config
        dense = lambda feats, name: mnn.DenseGeneral(feats, use_bias=c.qkv_bias, policy=self.policy,  # noqa: E731
                                                     name=name)
        q = dense((c.n_heads, c.head_dim), "q_proj")(x)  # (B, T, H, K)
        k = dense((c.n_kv_heads, c.head_dim), "k_proj")(x)  # (B, T, G, K)
        v = dense((c.n_kv_heads, c.head_dim), "v_proj")(x)  # (B, T, G, K)
        if c.qk_norm:  # Qwen3, Gemma 3: per-head RMSNorm of queries and keys, before RoPE
            q = mnn.RMSNorm(c.norm_eps, policy=self.policy, unit_offset=c.norm_unit_offset, name="q_norm")(q)
            k = mnn.RMSNorm(c.norm_eps, policy=self.policy, unit_offset=c.norm_unit_offset, name="k_norm")(k)
        theta, scaling = c.rope(self.layer)
        q, k = rope(q, positions, theta, scaling), rope(k, positions, theta, scaling)
        if cache is None:
            key_pos = query_pos = jnp.arange(x.shape[1])[None, :]  # (1, T)
        else:
            cache = _write_cache(cache, k, v, positions, cache_rows)
            k, v = (_read_slot(cache[n], x.shape[0], cache_rows, self.cache_len) for n in ("k", "v"))  # (B, S, G, K)
            # Later slots are empty or stale: the causal mask hides them too.
            key_pos, query_pos = jnp.arange(k.shape[1])[None, :], positions  # (1, S), (B, T)
        mask = attention_mask(query_pos, key_pos, c.window(self.layer))  # (B or 1, 1, T, S)
        out = mnn.grouped_attention(self, self.policy, q, k, v, mask, c.attn_scale)  # (B, T, H, K)
        out = mnn.DenseGeneral(c.d_model, axis=(-2, -1), policy=self.policy, name="o_proj",
                               kernel_init=residual_init(c.n_layers))(out)
        return out, cache


def swiglu_residual_format(down_recipe) -> str | None:
    """The format SwiGLU keeps its inputs in for the backward pass, given its down
    projection's recipe: the recipe's FP8 format when it asks for it
    (`DeepSeekV3.swiglu_residuals`, DeepSeek-V3 report 3.3), else None (gate and up as
    the projections return them)."""
    return down_recipe.fwd_format if down_recipe is not None and down_recipe.swiglu_residuals else None


def swiglu_residuals(module: nn.Module, policy: Policy | None) -> str | None:
    """`swiglu_residual_format` of the down projection under `module`."""
    return swiglu_residual_format(mnn.resolve_precision(module, policy, "down").recipe)


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)), act silu (SwiGLU) or gelu_tanh (GeGLU); the product is
    formed in f32, and under FP8 the down projection recomputes it in the backward pass
    whatever the activation (`mpx.nn.SwiGLUDense`)."""

    d_ff: int
    n_layers: int = 1
    policy: Policy | None = None
    activation: str = "silu"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gate = mnn.Dense(self.d_ff, policy=self.policy, name="gate")(x)
        up = mnn.Dense(self.d_ff, policy=self.policy, name="up")(x)
        return mnn.SwiGLUDense(x.shape[-1], policy=self.policy, name="down", kernel_init=residual_init(self.n_layers),
                               residual_format=swiglu_residuals(self, self.policy), activation=self.activation)(gate, up)


class Experts(nn.Module):
    """E SwiGLU experts with their own weights: (E, N, D) -> (E, N, D)."""

    n_experts: int
    d_ff: int
    policy: Policy | None = None
    activation: str = "silu"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        expert = lambda feats, name: mnn.ExpertDense(self.n_experts, feats, policy=self.policy, name=name)  # noqa: E731
        down = mnn.ExpertSwiGLUDense(self.n_experts, x.shape[-1], policy=self.policy, name="down",
                                     residual_format=swiglu_residuals(self, self.policy), activation=self.activation)
        return down(expert(self.d_ff, "gate")(x), expert(self.d_ff, "up")(x))


class MoE(nn.Module):
    """Top-k mixture of experts with an f32 router.

    Dispatch is dense: every expert runs on every token and the outputs are combined
    with the (sparse) top-k gate weights. That is exact and simple but costs E/k times
    the FLOPs of capacity-based dispatch; it suits the small models mpx trains on CPU.
    Returns the output and the load-balancing auxiliary loss (Switch Transformer form).
    """

    n_experts: int
    top_k: int
    d_ff: int
    policy: Policy | None = None
    activation: str = "silu"

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        logits = mnn.Dense(self.n_experts, policy=self.policy, name="router")(tokens).astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)  # (N, E)
        top_p, top_i = jax.lax.top_k(probs, self.top_k)  # (N, k)
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
        gates = jnp.sum(jax.nn.one_hot(top_i, self.n_experts) * top_p[..., None], axis=1)  # (N, E)
        expert_out = Experts(self.n_experts, self.d_ff, policy=self.policy, activation=self.activation,
                             name="experts")(
            jnp.broadcast_to(tokens, (self.n_experts, b * t, d))
        )  # (E, N, D)
        out = jnp.einsum("ne,end->nd", gates, expert_out.astype(jnp.float32))
        load = jnp.mean(jax.nn.one_hot(top_i[:, 0], self.n_experts), axis=0)
        aux = self.n_experts * jnp.sum(load * jnp.mean(probs, axis=0))
        return out.reshape(b, t, d), aux


def norm(config: ModelConfig, policy: Policy | None, name: str) -> mnn.RMSNorm:
    """The config's RMSNorm ((1 + w) for Gemma) named `name`."""
    return mnn.RMSNorm(config.norm_eps, policy=policy, unit_offset=config.norm_unit_offset, name=name)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)); f32 residual.

    With `post_norms` (Gemma 2/3) each sublayer's output is normalized again before the
    add: x + attn_post_norm(attn(attn_norm(x))), x + mlp_post_norm(ffn(mlp_norm(x))).
    """

    config: ModelConfig
    use_moe: bool = False
    policy: Policy | None = None
    cache_len: int | None = None
    layer: int = 0

    @nn.compact
    def __call__(self, x: Array, positions: Array, cache: Cache | None, cache_rows: Array | None = None):
        c = self.config
        h = norm(c, self.policy, "attn_norm")(x)
        attn, cache = SelfAttention(c, policy=self.policy, cache_len=self.cache_len, layer=self.layer, name="attn")(
            h, positions, cache, cache_rows)
        if c.post_norms:
            attn = norm(c, self.policy, "attn_post_norm")(attn)
        x = x + attn.astype(jnp.float32)
        h = norm(c, self.policy, "mlp_norm")(x)
        if self.use_moe:
            ffn, aux = MoE(c.n_experts, c.top_k, c.d_ff, policy=self.policy, activation=c.activation, name="moe")(h)
        else:
            ffn = SwiGLU(c.d_ff, c.n_layers, policy=self.policy, activation=c.activation, name="mlp")(h)
            aux = jnp.zeros((), jnp.float32)
        if c.post_norms:
            ffn = norm(c, self.policy, "mlp_post_norm")(ffn)
        return x + ffn.astype(jnp.float32), cache, aux


class Transformer(nn.Module):
    """Decoder-only LM: tokens (B, T) -> (logits (B, T, V) f32, aux).

    aux = {"cache": updated KV cache or None, "moe_loss": mean MoE balance loss}.

    With a cache, `cache_len` (a static int) and `cache_rows` ((B,) int) choose what
    attention reads and writes (see `SelfAttention`): generation passes the smallest
    bucket of slots that holds every position of the call, so its cost follows the
    sequence's length, not the cache's capacity.

    `constrain(x, logical_axes)`, when given (e.g. `mpx.sharding.Layout.constrain`), pins
    the sharding of the residual stream ("batch", "seq", "act_embed") at every block
    boundary and of the logits ("batch", "seq", "vocab"); it never changes values.
    """

    config: ModelConfig
    policy: Policy | None = None
    constrain: Callable[[Array, tuple], Array] | None = None

    def _pin(self, x: Array, logical_axes: tuple) -> Array:
        return x if self.constrain is None else self.constrain(x, logical_axes)

    def _remat(self, layer: int) -> bool:
        if self.config.remat == "full":
            return True
        if self.config.remat == "non_fp8":
            # FP8 blocks save 4x smaller activations: the seed skips their recomputation.
            probe = "mlp/up" if not self.config.is_moe_layer(layer) else "moe/experts/up"
            policy = self.policy or preset("fp32")
            return policy.resolve(f"layers_{layer}/{probe}").recipe is None
        return False

    @nn.compact
    def __call__(self, tokens: Array, positions: Array | None = None, cache: list[Cache] | None = None, *,
                 cache_len: int | None = None, cache_rows: Array | None = None):
        c = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq) ids; got shape {tokens.shape}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        # Gemma-style: rows of RMS D**-0.5 keep tied-head logits O(1); the lookup is scaled
        # by sqrt(D) so the residual stream starts at unit RMS, on a par with the blocks
        # (unless embed_scale is off, as in Hugging Face's Llama family). Gemma's
        # checkpoints scale in the embedding's dtype (embed_scale_dtype "embedding").
        embed = mnn.Embed(c.vocab_size, c.d_model, policy=self.policy, name="embed",
                          embedding_init=nn.initializers.normal(stddev=c.d_model**-0.5))
        in_embedding = c.embed_scale and c.embed_scale_dtype == "embedding"
        x = embed(tokens, c.d_model**0.5 if in_embedding else None).astype(jnp.float32)  # (B, T, D) f32 residual
        if c.embed_scale and not in_embedding:
            x = x * jnp.float32(c.d_model**0.5)
        x = self._pin(x, ACTIVATION_AXES)
        new_cache, moe_losses = [], []
        for i in range(c.n_layers):
            block_cls = nn.remat(Block) if self._remat(i) else Block
            block = block_cls(c, use_moe=self.config.is_moe_layer(i), policy=self.policy, cache_len=cache_len,
                              layer=i, name=f"layers_{i}")
            x, layer_cache, aux = block(x, positions, None if cache is None else cache[i], cache_rows)
            x = self._pin(x, ACTIVATION_AXES)
            new_cache.append(layer_cache)
            moe_losses.append(aux)
        x = norm(c, self.policy, "final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = mnn.Dense(c.vocab_size, policy=self.policy, name="lm_head")(x)
        aux = {"cache": None if cache is None else new_cache, "moe_loss": jnp.mean(jnp.stack(moe_losses))}
        return self._pin(logits.astype(jnp.float32), LOGITS_AXES), aux


def count_params(params) -> int:
    """Number of parameters in a params pytree."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def param_count_estimate(config: ModelConfig) -> int:
    """Parameter count from the config alone (matches count_params of an initialized model)."""
    c = config
    attn = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    attn += c.head_dim * (c.n_heads + 2 * c.n_kv_heads) if c.qkv_bias else 0
    attn += 2 * c.head_dim if c.qk_norm else 0
    dense_ffn = 3 * c.d_model * c.d_ff
    moe_ffn = c.n_experts * dense_ffn + c.d_model * c.n_experts
    total = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2) + c.d_model  # + final norm
    for i in range(c.n_layers):
        is_moe = c.n_experts > 0 and i % c.moe_every == c.moe_every - 1
        total += attn + (moe_ffn if is_moe else dense_ffn) + (4 if c.post_norms else 2) * c.d_model
    return total
