"""Per-device memory plan of training and serving a model on a mesh, on paper (nothing is allocated).

    python -m models.plan --model deepseek_v3_671b --mesh data=8,fsdp=32,tensor=8 --policy fp8 \\
        --batch 256 --seq 4096

prints the parameter count (and, for MoE, the parameters one token goes through: each MoE
block's top_k routed experts, not all of them; embedding and head included) and, per
device, the bytes of

training:

* params: the f32 master weights, each sharded by the reference model's rules
  (`models.sharding.PARAM_AXES`);
* optimizer state: the training optimizer's state (bf16 Adam moments shard like their
  params; counters replicated);
* gradients: one f32 gradient per parameter, sharded like its parameter;
* FP8 scale state: amax histories of delayed/static recipes (replicated);
* weight copies (estimate): the copy of each matmul's weight that its backward pass keeps
  for dgrad: E4M3 (one byte) under an FP8 recipe, the compute-dtype cast (bf16: two)
  without one, none when the weight is used in its own dtype; at the weight's sharding
  (a copy gathered over fsdp and kept would be fsdp times larger); a rematerialized
  block's only while it is recomputed;
* activations: an estimate (below);

serving (the same mesh and sharding rules):

* weights in the policy's storage dtypes, as `serve.quantize` stores a checkpoint under a
  policy (`serve.generate --policy`): the kernel of a matmul with a block-scaled recipe
  (DeepSeekV3) as E4M3 data and one scale per 128 x 128 block of its 2-D (K, N) view
  ((1, 128, 128) blocks of an (E, K, F) expert kernel), with a per-tensor recipe as data
  and one scale (delayed and static ones too, which serving refuses), every other param in
  its layer's compute dtype (norms and the MoE router f32 under the presets);
* KV cache (`--kv-cache`): `ModelConfig.cache_slots` for `--batch` sequences of `--seq`
  tokens, per layer keys and values (B, S, G, K) or, for multi-head latent attention, the
  latent (B, S, C) and the shared RoPE key (B, S, R); bf16, f32 or FP8 (one f32 scale per
  token and slot vector, as serve/kv_cache.py), sharded by `mpx.sharding.cache_specs`;

and the cache's bytes per token in bf16 and FP8, for MLA beside what grouped-query or
multi-head attention would cache for the same heads: keys (nope + rope wide) and values.

Params, optimizer state, gradients, scale state and serving weights come from
`jax.eval_shape` of the real initializers (and of `mpx.quantize`) under the real sharding
rules, so they are exact: the per-device bytes of an initialized, sharded train state and
of `serve.quantize.quantize_params` equal them (tests/test_plan.py checks tiny, small and
a tiny MLA + MoE model).

`--mtp N` adds DeepSeek-V3's N multi-token-prediction modules (report section 2.2; the
released model has one, `num_nextn_predict_layers`): module k is a block `layers_{L + k}`
(L = n_layers; MoE where the config says so) and `mtp_{k}/{enorm, hnorm, eh_proj, norm}`:
RMSNorms of the next token's embedding and of the previous depth's hidden state, their
(2D, D) projection and the norm before the output head, which like the embedding is the
main model's. It counts in every row (its block's KV cache too, as speculative decoding
needs). The released checkpoint also stores its own copy of the embedding and the head.

Activation estimate: the tensors each block saves for its backward pass, per token, in
the dtypes the policy gives each layer, for the B*T / (data * fsdp) tokens of one device
(one microbatch); tensors in the tensor-parallel region (heads, FFN hidden) are divided
by the tensor axis size. Per block:

* the f32 block input and mid-block residual, and each norm's output as the dots that
  read it keep it (their compute dtype, or under an FP8 recipe the one-byte E4M3 copy of
  `fp8_residuals`; dots of one precision share one copy);
* attention: q, k and v as QK^T and PV keep them, the softmax's two f32 row statistics per
  query head (the probabilities are recomputed in the backward pass: one query block's f32
  probabilities, their gradient and its bf16 copy, T per query per head, are live at a
  time; with an FP8 recipe on QK^T the f32 probabilities and their compute-dtype
  copy are saved per block instead), the attention output; q/k norms (Qwen3, Gemma) keep
  q and k as projected;
* multi-head latent attention trains in its expanded form: every head gets its own keys
  (qk_nope + qk_rope wide) and values (v_head_dim), saved as multi-head attention of those
  widths saves them; on top come its latents, q_a_proj's and kv_a_proj's outputs (the
  latent norms' inputs) and the norms' outputs as q_b_proj and kv_b_proj keep them. The
  latent shrinks the KV cache, not the training activations;
* a dense FFN: gate and up (one byte each when the down projection's recipe asks for it,
  `DeepSeekV3.swiglu_residuals`) and the down projection's input (none when it recomputes
  SwiGLU's product, `mpx.dot.recomputes_swiglu`); GeGLU keeps what SwiGLU does;
* MoE with dispatch by sorting (`models.moe`): the router's f32 logits and scores and per
  (token, expert) pair its expert id, sort position and weight; then per pair (top_k per
  token, no capacity: N * top_k rows) the gathered row as the grouped matmul keeps it
  (`mpx.dot.ragged.ragged_dot` keeps its E4M3 rows under an FP8 recipe with
  fp8_residuals, the input as it came otherwise), gate and up, the SwiGLU product (one
  byte as the grouped down projection keeps it under FP8) and the expert's output (for its weight's gradient); balanced routing is
  assumed (a device holding a popular expert gets more rows). Shared experts count as a
  dense FFN of width n_shared_experts * moe_d_ff;
* post-norms (Gemma) keep the attention and FFN outputs.

Remat: a rematerialized block keeps only its f32 input, plus one block's full set while it
is recomputed. The final norm and the f32 logits and log-softmax (vocabulary on tensor)
are added once, and once more per MTP module with its embedding input and eh_proj's kept
input. It ignores XLA's fusion and buffer reuse, so read it as an upper-bound-style
estimate within a small factor, not a measurement.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

import mpx
from models import config as model_config
from models import precision as roles
from models import sharding, transformer
from models.ffn import swiglu_residual_format
from mpx import attention
from mpx import config as config_io
from mpx import dot as dot_lib
from mpx import nn as mnn
from mpx import optim
from mpx import policy as policy_lib
from mpx import sharding as sharding_lib
from mpx.scaled import ScaledArray

MODELS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
CACHE_KINDS = ("bf16", "fp8", "fp32")  # serve/kv_cache.py's KINDS
TRAINING_ROWS = (("params", "params (f32 masters)"), ("optimizer", "optimizer state"),
                 ("gradients", "gradients (f32)"), ("scale_state", "FP8 scale state"),
                 ("weight_copies", "weight copies (estimate)"), ("activations", "activations (estimate)"))
SERVING_KINDS = (("fp8", "FP8 data"), ("scales", "FP8 scales"), ("bfloat16", "bf16"), ("float16", "fp16"),
                 ("float32", "f32"))
_PROBE_TOKENS = 8  # the sequence length of the traced init: no param depends on it


def per_device_bytes(tree: Any, mesh, dtype=None) -> int:
    """Bytes one device holds of a state tree of the reference model, sharded by its rules.

    Args:
      tree: arrays or ShapeDtypeStructs (FP8 `ScaledArray`s included).
      mesh: a Mesh or AbstractMesh.
      dtype: count every leaf in this dtype instead of its own (e.g. f32 gradients).
    """
    return sharding_lib.per_device_bytes(tree, mesh, sharding.PARAM_AXES, dtype=dtype)


def _bytes(dtype) -> int:
    return np.dtype(dtype).itemsize


# --------------------------------------------------------------------------- model shapes


class _MTPProjection(nn.Module):
    """The layers of DeepSeek-V3's multi-token-prediction module besides its block:
    enorm, hnorm, eh_proj (2D -> D) and the norm before the shared output head."""

    config: model_config.ModelConfig
    policy: mpx.Policy | None = None

    def setup(self):
        c = self.config
        self.enorm = mnn.RMSNorm(c.norm_eps, policy=self.policy, unit_offset=c.norm_unit_offset)
        self.hnorm = mnn.RMSNorm(c.norm_eps, policy=self.policy, unit_offset=c.norm_unit_offset)
        self.eh_proj = mnn.Dense(c.d_model, policy=self.policy)
        self.norm = mnn.RMSNorm(c.norm_eps, policy=self.policy, unit_offset=c.norm_unit_offset)

    def project(self, hidden: jax.Array, embedded: jax.Array) -> jax.Array:
        return self.eh_proj(jnp.concatenate([self.enorm(embedded), self.hnorm(hidden)], axis=-1))

    def head_norm(self, x: jax.Array) -> jax.Array:
        return self.norm(x)


class MultiTokenPrediction(nn.Module):
    """DeepSeek-V3's `depth` MTP modules (see the module doc), for their shapes:
    (hidden (B, T, D), embedded (B, T, D), positions (B, T)) -> the last module's (B, T, D)."""

    config: model_config.ModelConfig
    policy: mpx.Policy | None = None
    depth: int = 1

    @nn.compact
    def __call__(self, hidden: jax.Array, embedded: jax.Array, positions: jax.Array) -> jax.Array:
        c = self.config
        for k in range(self.depth):
            layer = c.n_layers + k
            mtp = _MTPProjection(c, self.policy, name=f"mtp_{k}")
            block = transformer.Block(c, use_moe=c.is_moe_layer(layer), policy=self.policy, layer=layer,
                                      name=f"layers_{layer}")
            hidden = mtp.head_norm(block(mtp.project(hidden, embedded), positions, None)[0])
        return hidden


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """What `jax.eval_shape` of the model's init gives (nothing allocated).

    Attributes:
      params, scale_state: ShapeDtypeStruct trees (the MTP modules' merged in).
      linear: {module path: feature axes of its kernel} of every matmul layer (None for
        an (E, K, F) expert kernel).
    """

    params: dict
    scale_state: dict
    linear: dict


def model_shapes(config, policy, mtp: int = 0) -> ModelShapes:
    """The param and scale-state shapes of `config` under `policy`, with `mtp` MTP modules.

    Cached: tracing DeepSeek-V3's 61 blocks takes seconds, and a plan per mesh reuses it.
    """
    return _model_shapes(config, policy, mtp)


@functools.lru_cache(maxsize=4)
def _model_shapes(config, policy, mtp: int) -> ModelShapes:
    linear: dict = {}
    tokens = jax.ShapeDtypeStruct((1, _PROBE_TOKENS), jnp.int32)
    with nn.intercept_methods(roles.linear_recorder(linear)):
        variables = dict(jax.eval_shape(transformer.Transformer(config, policy).init, jax.random.key(0), tokens))
        if mtp:
            x = jax.ShapeDtypeStruct((1, _PROBE_TOKENS, config.d_model), jnp.float32)
            extra = jax.eval_shape(MultiTokenPrediction(config, policy, mtp).init, jax.random.key(0), x, x, tokens)
            variables = {k: {**variables.get(k, {}), **extra.get(k, {})} for k in {*variables, *extra}}
    return ModelShapes(variables["params"], variables.get("fp8_state", {}), linear)


def _leaf(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def activated_params(params: dict, config) -> int:
    """Parameters one token goes through: each MoE block's routed experts count top_k / n_experts."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        routed = "/moe/experts/" in "/" + sharding_lib.path_str(path)
        total += int(leaf.size) * config.top_k // config.n_experts if routed else int(leaf.size)
    return total


def input_embedding_params(params: dict, config) -> int:
    """The untied input embedding's parameters (a lookup, no matmul); 0 when tied to the head."""
    return 0 if config.tie_embeddings else int(params["embed"]["embedding"].size)


# --------------------------------------------------------------------------- serving weights


@functools.lru_cache(maxsize=None)
def _quantized_shape(shape: tuple, fmt: str, block: tuple, scale_format: str) -> ScaledArray:
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda v: mpx.quantize(v, fmt, mpx.Blocks(block), scale_format=scale_format), x)


def _fp8_kernel(kernel, n_out: int | None, recipe) -> ScaledArray:
    """The ShapeDtypeStructs of a kernel as serving stores it in FP8 (see the module doc)."""
    view = kernel.shape if n_out is None else (math.prod(kernel.shape[:-n_out]), math.prod(kernel.shape[-n_out:]))
    if recipe.tiled:
        block = (recipe.block, recipe.block) if n_out is not None else (1, recipe.block, recipe.block)
        return _quantized_shape(view, recipe.fwd_format, block, recipe.scale_format)
    return _quantized_shape(view, recipe.fwd_format, view, "f32")  # one scale per tensor


def serving_params(shapes: ModelShapes, policy) -> dict:
    """The serving params' ShapeDtypeStructs under `policy` (FP8 kernels as `ScaledArray`s)."""

    def convert(path, leaf):
        names = sharding_lib.path_str(path).split("/")
        module = "/".join(names[:-1])
        precision = roles.resolve(policy, module)
        if names[-1] == "kernel" and module in shapes.linear and precision.recipe is not None:
            return _fp8_kernel(leaf, shapes.linear[module], precision.recipe)
        return jax.ShapeDtypeStruct(leaf.shape, precision.compute_dtype)

    return jax.tree_util.tree_map_with_path(convert, shapes.params)


def serving_bytes(tree: dict, mesh) -> dict[str, int]:
    """Per-device bytes of serving params by kind: "fp8" (data), "scales", and dtype names."""
    out: dict[str, int] = collections.Counter()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, ScaledArray))[0]:
        name = sharding_lib.path_str(path)
        parts = [("fp8", name + "/data", leaf.data), ("scales", name + "/scale", leaf.scale)] \
            if isinstance(leaf, ScaledArray) else [(np.dtype(leaf.dtype).name, name, leaf)]
        for kind, part_path, part in parts:
            spec = sharding.spec_for(part_path, part.shape, mesh)
            out[kind] += sharding_lib.shard_elements(part.shape, spec, mesh) * _bytes(part.dtype)
    return dict(out)


# --------------------------------------------------------------------------- KV cache


def _cache_slot(shape: tuple, kind: str):
    if kind == "fp8":  # E4M3 bit patterns, one f32 scale per slot vector (serve/kv_cache.py)
        return {"data": jax.ShapeDtypeStruct(shape, jnp.uint8),
                "scale": jax.ShapeDtypeStruct(shape[:-1] + (1,), jnp.float32)}
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16 if kind == "bf16" else jnp.float32)


def kv_cache_bytes(config, batch: int, seq: int, mesh, kind: str = "bf16", layers: int | None = None) -> int:
    """Per-device bytes of a `kind` KV cache of `config.cache_slots` for `batch` rows of
    `seq` tokens and `layers` layers (default n_layers), laid out by `cache_specs`."""
    cache = [{name: _cache_slot((batch, seq) + shape, kind) for name, shape in config.cache_slots.items()}
             for _ in range(layers or config.n_layers)]
    specs = jax.tree.leaves(sharding.cache_specs(cache, mesh), is_leaf=lambda x: isinstance(x, PartitionSpec))
    return sum(sharding_lib.shard_elements(leaf.shape, spec, mesh) * _bytes(leaf.dtype)
               for leaf, spec in zip(jax.tree.leaves(cache), specs))


def cache_bytes_per_token(slots: dict[str, tuple], layers: int, kind: str) -> float:
    """Cache bytes of one token over `layers` layers with `slots` ({name: per-token shape})
    in `kind` (FP8: 1 byte per value plus a 4-byte scale per slot vector)."""
    per_value = {"bf16": lambda k: 2.0, "fp32": lambda k: 4.0, "fp8": lambda k: 1.0 + 4.0 / k}[kind]
    return layers * sum(math.prod(shape) * per_value(shape[-1]) for shape in slots.values())


def expanded_cache_slots(config) -> dict[str, tuple] | None:
    """The keys and values grouped-query (multi-head when n_kv_heads = n_heads) attention
    with MLA's heads would cache per token: {"k": (G, nope + rope), "v": (G, v_head_dim)};
    None without MLA."""
    if not config.is_mla:
        return None
    return {"k": (config.n_kv_heads, config.head_dim), "v": (config.n_kv_heads, config.v_head_dim)}


# --------------------------------------------------------------------------- activation estimate


def _saved_input(precision, input_dtype) -> int:
    # An FP8 dot keeps its quantized input (one byte per element, `fp8_residuals`) or the
    # unquantized one; a plain dot keeps the cast copy.
    if precision.recipe is None:
        return _bytes(precision.compute_dtype)
    return 1 if precision.recipe.fp8_residuals else _bytes(input_dtype)


def _saved_inputs(precisions, input_dtype) -> int:
    """Bytes per element that several dots reading one input keep: one copy per precision."""
    return sum(_saved_input(p, input_dtype) for p in dict.fromkeys(precisions))


def _grouped_input(precision, input_dtype) -> int:
    # `ragged_dot` keeps its FP8 rows under a recipe with fp8_residuals (one byte; per-row
    # scales ignored), the input as it came under one without, the cast copy without a recipe.
    if precision.recipe is None:
        return _bytes(precision.compute_dtype)
    return 1 if precision.recipe.fp8_residuals else _bytes(input_dtype)


def _fused_attention(qk, pv) -> bool:
    """Whether attention runs `mpx.attention.softmax_attention` (no recipe on QK^T; PV in
    FP8 or not), which keeps no probabilities and recomputes them one layer at a time."""
    return qk.recipe is None


def _attention_scratch(qk, pv, heads: float, seq: int) -> float:
    """Bytes per token the fused attention's backward holds for one layer: one query
    block's recomputed f32 probabilities and their gradient, and the gradient's qk-dtype
    copy (`mpx.attention.QUERY_BLOCK` queries at a time)."""
    if not _fused_attention(qk, pv):
        return 0.0
    return heads * seq * (8 + _bytes(qk.output_dtype)) * min(attention.QUERY_BLOCK, seq) / seq


def _softmax(qk, pv, heads: int, seq: int, tensor: int) -> float:
    if _fused_attention(qk, pv):
        return heads * 8 / tensor  # the softmax's f32 row max and row sum
    return heads * seq * (4 + _bytes(pv.compute_dtype)) / tensor  # probabilities, f32 and pv copy


def _divide(count: int, n: int) -> float:
    return count / n if count % n == 0 else count


def _gqa_bytes(c, at, seq: int, tensor: int) -> float:
    """Grouped-query attention's saved tensors per token (module doc)."""
    h, g, k = c.n_heads, c.n_kv_heads, c.head_dim
    qk, pv = at("attn/qk"), at("attn/pv")
    x = c.d_model * _saved_inputs([at(f"attn/{n}_proj") for n in "qkv"], at("attn_norm").output_dtype)
    heads = h * k * _bytes(qk.compute_dtype) / tensor + _divide(g * k, tensor) * (
        _bytes(qk.compute_dtype) + _bytes(pv.compute_dtype))
    heads += _softmax(qk, pv, h, seq, tensor) + _saved_input(at("attn/o_proj"), pv.output_dtype) * h * k / tensor
    if c.qk_norm:  # each norm keeps its input: q and k as projected
        heads += (h * k / tensor + _divide(g * k, tensor)) * _bytes(at("attn/q_proj").output_dtype)
    return x + heads


def _latent(at, down: str, norm: str, up: str, width: int) -> float:
    """An MLA latent per token: its norm's input (the down projection's output) and the
    norm's output as the up projection keeps it."""
    return width * (_bytes(at(down).output_dtype) + _saved_input(at(up), at(norm).output_dtype))


def _mla_bytes(c, at, seq: int, tensor: int) -> float:
    """Multi-head latent attention's saved tensors per token, expanded form (module doc)."""
    h, k, v = c.n_heads, c.head_dim, c.v_head_dim
    qk, pv = at("attn/qk"), at("attn/pv")
    readers = [at("attn/q_proj" if c.q_lora_rank is None else "attn/q_a_proj"), at("attn/kv_a_proj")]
    x = c.d_model * _saved_inputs(readers, at("attn_norm").output_dtype)
    latents = _latent(at, "attn/kv_a_proj", "attn/kv_a_norm", "attn/kv_b_proj", c.kv_lora_rank)
    if c.q_lora_rank is not None:
        latents += _latent(at, "attn/q_a_proj", "attn/q_a_norm", "attn/q_b_proj", c.q_lora_rank)
    heads = h * (2 * k * _bytes(qk.compute_dtype) + v * _bytes(pv.compute_dtype)) / tensor  # q, k, v per head
    heads += _softmax(qk, pv, h, seq, tensor) + _saved_input(at("attn/o_proj"), pv.output_dtype) * h * v / tensor
    return x + latents + heads


def _swiglu(at, prefix: str, width: int, tensor: int, grouped: bool = False) -> float:
    """Gate, up (or their FP8 tiles) and the down projection's input, per token."""
    up, down = at(f"{prefix}/up"), at(f"{prefix}/down")
    kept = 1 if swiglu_residual_format(down.recipe) else _bytes(up.output_dtype)
    if grouped:  # the grouped down projection keeps the f32 product (it never recomputes it)
        down_input = _grouped_input(down, jnp.float32)
    else:
        down_input = 0 if dot_lib.recomputes_swiglu(down.recipe) else _saved_input(down, jnp.float32)
    return (2 * kept + down_input) * width / tensor


def _dense_ffn_bytes(c, at, tensor: int) -> float:
    x = c.d_model * _saved_inputs([at("mlp/gate"), at("mlp/up")], at("mlp_norm").output_dtype)
    return x + _swiglu(at, "mlp", c.d_ff, tensor)


def _moe_bytes(c, at, tensor: int) -> float:
    """The MoE FFN's saved tensors per token, dispatch by sorting (module doc)."""
    norm_out = at("mlp_norm").output_dtype
    readers = [at("moe/router")] + ([at("moe/shared/gate"), at("moe/shared/up")] if c.n_shared_experts else [])
    x = c.d_model * _saved_inputs(readers, norm_out)
    router = 2 * c.n_experts * 4 + 12 * c.top_k  # f32 logits and scores; per pair int32 id and position, f32 weight
    experts, down = at("moe/experts/up"), at("moe/experts/down")
    pair = c.d_model * (_grouped_input(experts, norm_out) + _bytes(down.output_dtype))  # its row and its output
    pair += _swiglu(at, "moe/experts", c.expert_d_ff, tensor, grouped=True)
    shared = _swiglu(at, "moe/shared", c.n_shared_experts * c.expert_d_ff, tensor) if c.n_shared_experts else 0.0
    return x + router + c.top_k * pair + shared


def block_bytes_per_token(config, policy, layer: int, seq: int, tensor: int, moe: bool) -> float:
    """Bytes one block saves per token for backward (see the module doc), tensor-sharded."""
    c, at = config, lambda name: roles.resolve(policy, f"layers_{layer}/{name}")  # noqa: E731
    attn = (_mla_bytes if c.is_mla else _gqa_bytes)(c, at, seq, tensor)
    ffn = _moe_bytes(c, at, tensor) if moe else _dense_ffn_bytes(c, at, tensor)
    total = 2 * c.d_model * 4 + attn + ffn  # f32 block input and mid-block residual
    if c.post_norms:  # the post-norms keep the attention and FFN outputs
        ffn_out = 4 if moe else _bytes(at("mlp/down").output_dtype)  # the MoE output is f32
        total += c.d_model * (_bytes(at("attn/o_proj").output_dtype) + ffn_out)
    return total


def _head_bytes(config, tensor: int) -> float:
    return 2 * config.d_model * 4 + 2 * 4 * _divide(config.vocab_size, tensor)  # final norm, logits, log-softmax


def _mtp_bytes(config, policy, k: int, tensor: int) -> float:
    """An MTP module's tensors besides its block: the next token's f32 embedding, eh_proj's
    kept input (2D) and its head."""
    eh_proj = roles.resolve(policy, f"mtp_{k}/eh_proj")
    return config.d_model * (4 + 2 * _saved_input(eh_proj, roles.resolve(policy, f"mtp_{k}/enorm").output_dtype)) + \
        _head_bytes(config, tensor)


def activation_bytes(config, policy, batch: int, seq: int, mesh, mtp: int = 0) -> int:
    """Estimated activation bytes per device for one forward/backward (module doc).

    Args:
      config: a `models.config.ModelConfig`.
      policy: the precision policy.
      batch, seq: global batch (sequences) and sequence length.
      mesh: Mesh or AbstractMesh.
      mtp: multi-token-prediction modules after the model's blocks.
    """
    tokens = batch * seq / sharding.batch_shards(mesh)
    tensor = mesh.shape["tensor"]
    saved, live = [_head_bytes(config, tensor)], 0.0
    for layer in range(config.n_layers + mtp):
        moe = config.is_moe_layer(layer)
        full = block_bytes_per_token(config, policy, layer, seq, tensor, moe)
        qk, pv = (roles.resolve(policy, f"layers_{layer}/attn/{name}") for name in ("qk", "pv"))
        live = max(live, _attention_scratch(qk, pv, config.n_heads / tensor, seq))
        if roles.is_remat(config, policy, layer):
            saved.append(config.d_model * 4)
            live = max(live, full)  # one block's set is live while it is recomputed
        else:
            saved.append(full)
    saved += [_mtp_bytes(config, policy, k, tensor) for k in range(mtp)]
    return int(tokens * (sum(saved) + live))


def _kept_weight(precision, param_dtype) -> int:
    """Bytes per weight a matmul's backward keeps of its weight (module doc)."""
    if precision.recipe is not None:
        return 1
    return 0 if np.dtype(precision.compute_dtype) == np.dtype(param_dtype) else _bytes(precision.compute_dtype)


def weight_copy_bytes(config, policy, shapes: ModelShapes, mesh) -> int:
    """Per-device bytes of the weight copies matmuls keep for their backward (module doc)."""
    matmuls = {path: f"{path}/kernel" for path in shapes.linear}
    if config.tie_embeddings:
        matmuls["embed"] = "embed/embedding"  # attend(): the tied head's matmul
    per_group: dict[str, int] = collections.Counter()
    for module, param in matmuls.items():
        leaf = _leaf(shapes.params, param)
        kept = _kept_weight(roles.resolve(policy, module), leaf.dtype)
        spec = sharding.spec_for(param, leaf.shape, mesh)
        per_group[module.split("/")[0]] += sharding_lib.shard_elements(leaf.shape, spec, mesh) * kept
    saved, live = 0, 0
    for group, count in per_group.items():
        layer = int(group[len("layers_"):]) if group.startswith("layers_") else None
        if layer is not None and roles.is_remat(config, policy, layer):
            live = max(live, count)
        else:
            saved += count
    return saved + live


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of training and serving a model (see the module doc for how each is counted).

    Attributes:
      mesh: axis sizes.
      num_params: parameters of the model (with its MTP modules).
      activated_params: parameters one token goes through (`activated_params`).
      input_embedding_params: of those, the untied input embedding's (a lookup).
      batch, seq: the batch (sequences) and sequence length of the activation / KV figures.
      mtp: multi-token-prediction modules counted.
      params, optimizer, gradients, scale_state, weight_copies, activations: training
        bytes per device.
      serving: serving weight bytes per device by kind ("fp8", "scales", dtype names).
      kv_cache: bytes per device of the `cache_kind` KV cache for batch x seq.
      cache_kind: "bf16", "fp8" or "fp32".
      cache_layers: layers with a KV cache (n_layers + mtp).
      cache_slots: per-token shape of each cache slot (`ModelConfig.cache_slots`).
      expanded_slots: what grouped-query/multi-head attention would cache instead (MLA
        only, `expanded_cache_slots`), or None.
    """

    mesh: dict
    num_params: int
    activated_params: int
    input_embedding_params: int
    batch: int
    seq: int
    mtp: int
    params: int
    optimizer: int
    gradients: int
    scale_state: int
    weight_copies: int
    activations: int
    serving: dict
    kv_cache: int
    cache_kind: str
    cache_layers: int
    cache_slots: dict
    expanded_slots: dict | None

    @property
    def training_total(self) -> int:
        """Everything training holds per device (no KV cache)."""
        return sum(getattr(self, key) for key, _ in TRAINING_ROWS)

    @property
    def serving_weights(self) -> int:
        """Serving weight bytes per device, every kind together."""
        return sum(self.serving.values())

    @property
    def serving_total(self) -> int:
        """Serving weights and the KV cache per device."""
        return self.serving_weights + self.kv_cache

    def cache_per_token(self, kind: str, expanded: bool = False) -> float:
        """KV cache bytes per token over every cached layer in `kind` (of the expanded slots)."""
        return cache_bytes_per_token(self.expanded_slots if expanded else self.cache_slots, self.cache_layers, kind)

    def _header(self) -> list[str]:
        devices = math.prod(self.mesh.values())
        shards = self.mesh.get("data", 1) * self.mesh.get("fsdp", 1)
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        count = f"{self.num_params:,} parameters ({self.num_params / 1e9:.2f} B)"
        if self.activated_params != self.num_params:
            without = self.activated_params - self.input_embedding_params
            count += (f", {self.activated_params:,} activated per token ({self.activated_params / 1e9:.2f} B; "
                      f"{without / 1e9:.2f} B without the input embedding)")
        return [count + (f", {self.mtp} MTP module(s) included" if self.mtp else ""),
                f"mesh {mesh} ({devices} devices); batch {self.batch} x seq {self.seq}: "
                f"{self.batch * self.seq / shards:,.0f} tokens per device"]

    def _cache_lines(self) -> list[str]:
        values = " + ".join(f"{name} {math.prod(shape)}" for name, shape in self.cache_slots.items())
        lines = [f"KV cache per token, {self.cache_layers} layers, {values} values a layer: "
                 f"bf16 {self.cache_per_token('bf16'):,.0f} B, fp8 {self.cache_per_token('fp8'):,.0f} B"]
        if self.expanded_slots is not None:
            (g, k), (_, v) = self.expanded_slots["k"], self.expanded_slots["v"]
            bf16 = self.cache_per_token("bf16", expanded=True)
            lines.append(f"  attention of the same {g} heads caching keys ({k}) and values ({v}): "
                         f"{g * (k + v):,} values a layer, bf16 {bf16:,.0f} B, "
                         f"fp8 {self.cache_per_token('fp8', expanded=True):,.0f} B "
                         f"({bf16 / self.cache_per_token('bf16'):.1f}x the latent)")
        return lines

    def table(self) -> str:
        """A readable table per device (GiB, or MiB for small runs)."""
        unit, scale = ("GiB", 2**30) if max(self.training_total, self.serving_total) >= 2**30 else ("MiB", 2**20)
        row = lambda label, value: f"{label:<30}{value / scale:>12.3f}"  # noqa: E731
        lines = self._header() + [f"{'training, per device':<30}{unit:>12}"]
        lines += [row(label, getattr(self, key)) for key, label in TRAINING_ROWS]
        lines += [row("training total", self.training_total), f"{'serving, per device':<30}{unit:>12}",
                  row("weights (policy storage)", self.serving_weights)]
        lines += [row(f"  {label}", self.serving[kind]) for kind, label in SERVING_KINDS if self.serving.get(kind)]
        lines += [row(f"KV cache ({self.cache_kind})", self.kv_cache), row("serving total", self.serving_total)]
        return "\n".join(lines + self._cache_lines())

    def to_dict(self) -> dict:
        """JSON-ready dict (bytes per device), with the totals and the per-token cache bytes."""
        per_token = {kind: self.cache_per_token(kind) for kind in CACHE_KINDS}
        expanded = None if self.expanded_slots is None else {
            kind: self.cache_per_token(kind, expanded=True) for kind in CACHE_KINDS}
        return {**dataclasses.asdict(self), "training_total": self.training_total,
                "serving_weights": self.serving_weights, "serving_total": self.serving_total,
                "cache_per_token": per_token, "expanded_cache_per_token": expanded}


def plan(config, policy, mesh, *, batch: int | None = None, seq: int | None = None, tx=None,
         moment_dtype: str = "bf16", mtp: int = 0, cache_kind: str = "bf16") -> MemoryPlan:
    """The per-device memory plan of training and serving `config` under `policy` on `mesh`.

    Args:
      config: a `models.config.ModelConfig`.
      policy: a `mpx.Policy`.
      mesh: a Mesh or AbstractMesh (`sharding.abstract_mesh`: no devices needed).
      batch: global batch in sequences (default: one per batch shard).
      seq: sequence length (default config.max_seq_len).
      tx: the optax optimizer (default: the training chain of train.loop: AdamW with a
        cosine schedule, global-norm clipping, `moment_dtype` moments, decay on matrices).
      moment_dtype: Adam moment storage when tx is None.
      mtp: DeepSeek-V3 multi-token-prediction modules to add (module doc).
      cache_kind: the serving KV cache's storage, one of CACHE_KINDS.

    Returns:
      A MemoryPlan.

    Raises:
      ValueError: mtp < 0, mtp with per-layer layer_types, or an unknown cache_kind.
    """
    config_io.check_choice("KV cache kind", cache_kind, CACHE_KINDS)
    config_io.check("mtp", mtp, isinstance(mtp, int) and mtp >= 0, "an integer >= 0")
    if mtp and config.layer_types is not None:
        raise ValueError(f"mtp={mtp} adds blocks past the {config.n_layers} that layer_types describes; "
                         "use a model without layer_types")
    batch = batch or sharding.batch_shards(mesh)
    seq = seq or config.max_seq_len
    # The chain train.loop builds from configs/tiny.yaml (the schedule adds a counter).
    tx = tx or optim.build("adamw", 1e-3, schedule="cosine", warmup_steps=1, total_steps=2, clip_norm=1.0,
                           moment_dtype=moment_dtype, weight_decay=0.1, mask=optim.matrices_only)
    shapes = model_shapes(config, policy, mtp)
    params = shapes.params
    return MemoryPlan(
        mesh=dict(mesh.shape), num_params=transformer.count_params(params),
        activated_params=activated_params(params, config),
        input_embedding_params=input_embedding_params(params, config), batch=batch, seq=seq, mtp=mtp,
        params=per_device_bytes(params, mesh), optimizer=per_device_bytes(jax.eval_shape(tx.init, params), mesh),
        gradients=per_device_bytes(params, mesh, dtype=jnp.float32),
        scale_state=per_device_bytes(shapes.scale_state, mesh),
        weight_copies=weight_copy_bytes(config, policy, shapes, mesh),
        activations=activation_bytes(config, policy, batch, seq, mesh, mtp),
        serving=serving_bytes(serving_params(shapes, policy), mesh),
        kv_cache=kv_cache_bytes(config, batch, seq, mesh, cache_kind, config.n_layers + mtp), cache_kind=cache_kind,
        cache_layers=config.n_layers + mtp, cache_slots=config.cache_slots, expanded_slots=expanded_cache_slots(config),
    )


# --------------------------------------------------------------------------- CLI


def load_model_config(spec: str) -> model_config.ModelConfig:
    """A ModelConfig from a preset name, a name under configs/models/, or a YAML path.

    A YAML file holds ModelConfig fields, optionally `preset: <name>` as the base and
    `extends: other.yaml`; it is read by `mpx.config` (unknown keys are errors).

    Raises:
      ValueError: an unknown name or an unknown field (naming the allowed ones).
      FileNotFoundError: a .yaml path that does not exist.
    """
    if spec in model_config.PRESETS:
        return model_config.preset(spec)
    is_path = spec.endswith((".yaml", ".yml"))
    path = Path(spec) if is_path else MODELS_DIR / f"{spec}.yaml"
    if not path.is_file():
        if is_path:
            raise FileNotFoundError(f"model config {spec!r} not found")
        known = list(model_config.PRESETS) + sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))
        raise ValueError(f"unknown model {spec!r}; known: {', '.join(known)} (or a .yaml path)")
    raw, _ = config_io.read_tree(path)
    try:
        base = _preset_fields(raw.pop("preset")) if "preset" in raw else {}
        return config_io.from_dict(model_config.ModelConfig, {**base, **raw})
    except config_io.ConfigError as e:
        raise config_io.ConfigError(f"{path}: {e}", e.key) from None


def _preset_fields(name) -> dict:
    try:
        return config_io.to_dict(model_config.preset(name))
    except ValueError as e:
        raise config_io.ConfigError(f"preset: {e}", "preset") from None


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line with exit status 2 (as
    store.cli's, which models/ may not import)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def _parse(argv) -> argparse.Namespace:
    parser = _ArgumentParser(prog="python -m models.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="preset (tiny, small, 1b, ...), configs/models name or YAML")
    parser.add_argument("--mesh", default="data=1", help="axis sizes, e.g. data=8,fsdp=32,tensor=8")
    parser.add_argument("--devices", type=int, help="device count (resolves a -1 axis)")
    parser.add_argument("--policy", default="fp8", help="precision preset or policy YAML")
    parser.add_argument("--batch", type=int, help="global batch in sequences (default: one per batch shard)")
    parser.add_argument("--seq", type=int, help="sequence length (default: the model's max_seq_len)")
    parser.add_argument("--moment-dtype", default="bf16", choices=("bf16", "f32"), help="Adam moment storage")
    parser.add_argument("--remat", choices=("none", "full", "non_fp8"), help="override the model's remat")
    parser.add_argument("--mtp", type=int, default=0,
                        help="add N DeepSeek-V3 multi-token-prediction modules (the released model has 1)")
    parser.add_argument("--kv-cache", default="bf16", choices=CACHE_KINDS, help="the serving KV cache's storage")
    parser.add_argument("--json", action="store_true", help="also print the plan as one JSON line")
    return parser.parse_args(argv)


def _check_sizes(args, mesh) -> None:
    for flag, value in (("--batch", args.batch), ("--seq", args.seq), ("--devices", args.devices)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be an integer >= 1; got {value}")
    if args.mtp < 0:
        raise ValueError(f"--mtp must be an integer >= 0; got {args.mtp}")
    shards = sharding.batch_shards(mesh)
    if args.batch is not None and args.batch % shards:
        raise ValueError(f"--batch {args.batch} does not split over the mesh's {shards} batch shards "
                         f"({args.mesh}); use a multiple of {shards}")


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        config = load_model_config(args.model)
        if args.remat:
            config = dataclasses.replace(config, remat=args.remat)
        is_file = args.policy.endswith((".yaml", ".yml"))
        pol = policy_lib.load(args.policy) if is_file else policy_lib.preset(args.policy)
        mesh = sharding.abstract_mesh(sharding.parse_mesh(args.mesh), args.devices)
        _check_sizes(args, mesh)
        result = plan(config, pol, mesh, batch=args.batch, seq=args.seq, moment_dtype=args.moment_dtype,
                      mtp=args.mtp, cache_kind=args.kv_cache)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model {args.model}, policy {pol.name}, remat {config.remat}, Adam moments {args.moment_dtype}")
    print(result.table())
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
