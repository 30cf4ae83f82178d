"""The reference decoder-only transformer LM, built from mpx.nn layers.

RMSNorm (pre-norm), RoPE, grouped-query or multi-head latent attention (`models.mla`),
SwiGLU or GeGLU FFN or a mixture of experts (`models.moe`), a tied or untied LM head;
Gemma 3's additions as config fields (per-layer sliding or full attention with their own
RoPE bases, post-norms, (1 + w) RMSNorm, query_pre_attn_scalar) and DeepSeek-V3's (MLA,
shared and routed experts with group-limited sigmoid routing, dense first blocks).
Every layer takes its precision from the policy by its module path:

    embed                                   token embedding (attend() = tied LM head)
    layers_{i}/attn_norm, layers_{i}/mlp_norm, final_norm
    layers_{i}/attn_post_norm, layers_{i}/mlp_post_norm   post-norms (Gemma)
    layers_{i}/attn/{q_norm,k_norm}                 per-head q/k RMSNorm (Qwen3, Gemma)
    layers_{i}/attn/{q_proj,k_proj,v_proj,o_proj}   projections
    layers_{i}/attn/{q_a_proj,q_b_proj,kv_a_proj,kv_b_proj}, .../{q_a_norm,kv_a_norm}   MLA
    layers_{i}/attn/qk, layers_{i}/attn/pv          QK^T and PV contractions
    layers_{i}/mlp/{gate,up,down}                   SwiGLU or GeGLU FFN
    layers_{i}/moe/router                           MoE router (f32 in every preset)
    layers_{i}/moe/experts/{gate,up,down}           per-expert FP8 weights
    layers_{i}/moe/shared/{gate,up,down}            shared experts (DeepSeekMoE)
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

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.cache import Cache, as_bits, attention_mask, init_cache, read_slot, write_slots  # noqa: F401 (re-exported)
from models.config import ModelConfig
from models.ffn import SwiGLU, residual_init
from models.mla import LatentAttention
from models.moe import ExpertParallel, MoE
from models.precision import is_remat
from models.rope import rope
from mpx import nn as mnn
from mpx.policy import Policy, preset

Array = jax.Array
ACTIVATION_AXES = ("batch", "seq", "act_embed")  # logical axes of the residual stream
LOGITS_AXES = ("batch", "seq", "vocab")


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
            cache = write_slots(cache, {"k": k, "v": v}, positions, cache_rows)
            k, v = (read_slot(cache[n], x.shape[0], cache_rows, self.cache_len) for n in ("k", "v"))  # (B, S, G, K)
            # Later slots are empty or stale: the causal mask hides them too.
            key_pos, query_pos = jnp.arange(k.shape[1])[None, :], positions  # (1, S), (B, T)
        mask = attention_mask(query_pos, key_pos, c.window(self.layer))  # (B or 1, 1, T, S)
        out = mnn.grouped_attention(self, self.policy, q, k, v, mask, c.attn_scale)  # (B, T, H, K)
        out = mnn.DenseGeneral(c.d_model, axis=(-2, -1), policy=self.policy, name="o_proj",
                               kernel_init=residual_init(c.n_layers))(out)
        return out, cache


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
    expert_parallel: ExpertParallel | None = None

    @nn.compact
    def __call__(self, x: Array, positions: Array, cache: Cache | None, cache_rows: Array | None = None):
        c = self.config
        h = norm(c, self.policy, "attn_norm")(x)
        attention = LatentAttention if c.is_mla else SelfAttention
        attn, cache = attention(c, policy=self.policy, cache_len=self.cache_len, layer=self.layer, name="attn")(
            h, positions, cache, cache_rows)
        if c.post_norms:
            attn = norm(c, self.policy, "attn_post_norm")(attn)
        x = x + attn.astype(jnp.float32)
        h = norm(c, self.policy, "mlp_norm")(x)
        if self.use_moe:
            ffn, aux = MoE(c, policy=self.policy, expert_parallel=self.expert_parallel, name="moe")(h)
        else:
            ffn = SwiGLU(c.d_ff, c.n_layers, policy=self.policy, activation=c.activation, name="mlp")(h)
            aux = {"moe_loss": jnp.zeros((), jnp.float32)}
        if c.post_norms:
            ffn = norm(c, self.policy, "mlp_post_norm")(ffn)
        return x + ffn.astype(jnp.float32), cache, aux


class Transformer(nn.Module):
    """Decoder-only LM: tokens (B, T) -> (logits (B, T, V) f32, aux).

    aux = {"cache": updated KV cache or None, "moe_loss": mean MoE balance loss over the
    blocks (0 in dense ones), "expert_load": (MoE blocks, E) each expert's share of the
    routed (token, expert) pairs, or None without MoE blocks}.

    With a cache, `cache_len` (a static int) and `cache_rows` ((B,) int) choose what
    attention reads and writes (see `SelfAttention`): generation passes the smallest
    bucket of slots that holds every position of the call, so its cost follows the
    sequence's length, not the cache's capacity.

    `expert_parallel` splits every MoE block's routed experts over a mesh axis
    (`models.moe.ExpertParallel`).

    `constrain(x, logical_axes)`, when given (e.g. `mpx.sharding.Layout.constrain`), pins
    the sharding of the residual stream ("batch", "seq", "act_embed") at every block
    boundary and of the logits ("batch", "seq", "vocab"); it never changes values.
    """

    config: ModelConfig
    policy: Policy | None = None
    constrain: Callable[[Array, tuple], Array] | None = None
    expert_parallel: ExpertParallel | None = None

    def _pin(self, x: Array, logical_axes: tuple) -> Array:
        return x if self.constrain is None else self.constrain(x, logical_axes)

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
        new_cache, moe_losses, loads = [], [], []
        for i in range(c.n_layers):
            block_cls = nn.remat(Block) if is_remat(self.config, self.policy or preset("fp32"), i) else Block
            block = block_cls(c, use_moe=self.config.is_moe_layer(i), policy=self.policy, cache_len=cache_len,
                              layer=i, expert_parallel=self.expert_parallel, name=f"layers_{i}")
            x, layer_cache, aux = block(x, positions, None if cache is None else cache[i], cache_rows)
            x = self._pin(x, ACTIVATION_AXES)
            new_cache.append(layer_cache)
            moe_losses.append(aux["moe_loss"])
            if "expert_load" in aux:
                loads.append(aux["expert_load"])
        x = norm(c, self.policy, "final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = mnn.Dense(c.vocab_size, policy=self.policy, role="head", name="lm_head")(x)
        aux = {"cache": None if cache is None else new_cache, "moe_loss": jnp.mean(jnp.stack(moe_losses)),
               "expert_load": jnp.stack(loads) if loads else None}
        return self._pin(logits.astype(jnp.float32), LOGITS_AXES), aux


def count_params(params) -> int:
    """Number of parameters in a params pytree."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def _attention_params(c: ModelConfig) -> int:
    if c.is_mla:
        q = c.d_model * c.n_heads * c.head_dim if c.q_lora_rank is None else \
            c.q_lora_rank * (c.d_model + 1 + c.n_heads * c.head_dim)
        kv = c.d_model * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
        kv += c.kv_lora_rank * c.n_heads * (c.qk_nope_head_dim + c.v_head_dim)
        return q + kv + c.n_heads * c.v_head_dim * c.d_model
    attn = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    attn += c.head_dim * (c.n_heads + 2 * c.n_kv_heads) if c.qkv_bias else 0
    return attn + (2 * c.head_dim if c.qk_norm else 0)


def _ffn_params(c: ModelConfig, moe: bool, activated: bool = False) -> int:
    if not moe:
        return 3 * c.d_model * c.d_ff
    experts = c.top_k if activated else c.n_experts
    routed = experts * 3 * c.d_model * c.expert_d_ff
    router = c.d_model * c.n_experts + (c.n_experts if c.topk_method == "noaux_tc" else 0)
    return routed + router + 3 * c.d_model * c.n_shared_experts * c.expert_d_ff


def param_count_estimate(config: ModelConfig, activated: bool = False) -> int:
    """Parameter count from the config alone (matches count_params of an initialized
    model); with `activated`, the parameters one token goes through (its top_k routed
    experts of each MoE block, not all of them; embeddings and head included)."""
    c = config
    total = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2) + c.d_model  # + final norm
    for i in range(c.n_layers):
        ffn = _ffn_params(c, c.is_moe_layer(i), activated)
        total += _attention_params(c) + ffn + (4 if c.post_norms else 2) * c.d_model
    return total
