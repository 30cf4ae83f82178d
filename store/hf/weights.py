"""Hugging Face tensor names and layouts <-> the reference transformer's params tree.

A Hugging Face linear weight is (out, in); the matching mpx kernel is (in..., out...)
(q_proj (D, H, K), o_proj (H, K, D), gate (D, F)), so `kernel = weight.T` reshaped, and
its 2-D (K, N) view (what serving quantizes) is exactly `weight.T`. A 128x128 block of
the weight is a 128x128 block of that view, so block-FP8 data and `weight_scale_inv`
transpose into an `mpx.ScaledArray` without requantizing.

    model.embed_tokens.weight                  embed/embedding            (V, D)
    model.layers.{i}.input_layernorm.weight    layers_{i}/attn_norm/scale
    model.layers.{i}.self_attn.{q,k,v,o}_proj  layers_{i}/attn/{q,k,v,o}_proj
    model.layers.{i}.self_attn.{q,k}_norm      layers_{i}/attn/{q,k}_norm (Qwen3)
    model.layers.{i}.post_attention_layernorm  layers_{i}/mlp_norm/scale
    model.layers.{i}.mlp.{gate,up,down}_proj   layers_{i}/mlp/{gate,up,down}
    model.norm.weight                          final_norm/scale
    lm_head.weight                             lm_head/kernel             (untied)

Gemma 3 (`post_norms`) names its four norms a block differently; each RMSNorm's scale
holds the stored weight w, the model multiplies by (1 + w) (`norm_unit_offset`; GGUF
files store 1 + w):

    model.layers.{i}.input_layernorm           layers_{i}/attn_norm/scale
    model.layers.{i}.post_attention_layernorm  layers_{i}/attn_post_norm/scale
    model.layers.{i}.pre_feedforward_layernorm layers_{i}/mlp_norm/scale
    model.layers.{i}.post_feedforward_layernorm layers_{i}/mlp_post_norm/scale
    model.layers.{i}.self_attn.{q,k}_norm      layers_{i}/attn/{q,k}_norm/scale

DeepSeek-V3 (multi-head latent attention, `kv_lora_rank`) names its attention and MoE
tensors as DeepSeek releases them, one tensor per routed expert; the experts of a block
are stacked into one (E, ...) kernel:

    model.layers.{i}.self_attn.q_proj                 layers_{i}/attn/q_proj     (D, H, Kqk) (no q_lora_rank)
    model.layers.{i}.self_attn.q_a_proj               layers_{i}/attn/q_a_proj   (D, Rq)
    model.layers.{i}.self_attn.q_a_layernorm          layers_{i}/attn/q_a_norm/scale
    model.layers.{i}.self_attn.q_b_proj               layers_{i}/attn/q_b_proj   (Rq, H, Kqk)
    model.layers.{i}.self_attn.kv_a_proj_with_mqa     layers_{i}/attn/kv_a_proj  (D, Rkv + Krope)
    model.layers.{i}.self_attn.kv_a_layernorm         layers_{i}/attn/kv_a_norm/scale
    model.layers.{i}.self_attn.kv_b_proj              layers_{i}/attn/kv_b_proj  (Rkv, H, Knope + Kv)
    model.layers.{i}.self_attn.o_proj                 layers_{i}/attn/o_proj     (H, Kv, D)
    model.layers.{i}.mlp.{gate,up,down}_proj          layers_{i}/mlp/...         (i < first_k_dense_replace)
    model.layers.{i}.mlp.gate.weight                  layers_{i}/moe/router/kernel      (D, E)
    model.layers.{i}.mlp.gate.e_score_correction_bias layers_{i}/moe/router/score_bias  (E,) (noaux_tc)
    model.layers.{i}.mlp.experts.{j}.{gate,up}_proj   layers_{i}/moe/experts/{gate,up}/kernel  (E, D, F)[j]
    model.layers.{i}.mlp.experts.{j}.down_proj        layers_{i}/moe/experts/down/kernel       (E, F, D)[j]
    model.layers.{i}.mlp.shared_experts.{...}_proj    layers_{i}/moe/shared/{gate,up,down}     (D, Fs) / (Fs, D)

where Kqk = qk_nope_head_dim + qk_rope_head_dim and Fs = n_shared_experts * F. A block-FP8
expert's 128x128 blocks stack into a ScaledArray of (1, 128, 128) blocks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from models import transformer
from models.config import ModelConfig
from mpx import formats, scaled
from store.hf.config import HFError

BLOCK = (128, 128)
_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj"}
_MLP = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: its Hugging Face name, mpx param path, mpx shape and layout.

    `n_in` is the number of input axes of a kernel (its HF weight is the transposed
    (K, N) view); None for tensors stored as they are (embeddings, norms, biases).
    `experts` > 0: the param stacks that many experts' kernels along its first axis, one
    HF tensor each, named by `hf` with "{j}" replaced by the expert's index (`names()`);
    `hf_shape` is then one expert's.
    """

    hf: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    n_in: int | None = None
    experts: int = 0

    @property
    def hf_shape(self) -> tuple[int, ...]:
        shape = self.shape[1:] if self.experts else self.shape
        if self.n_in is None:
            return (math.prod(shape),) if self.path[-1] == "bias" else shape
        return math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in])

    def names(self) -> list[str]:
        """The HF tensor names: `hf`, or one per expert."""
        return [self.hf.format(j=j) for j in range(self.experts)] if self.experts else [self.hf]

    @property
    def module(self) -> str:
        return "/".join(self.path[:-1])


def param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{param path: shape} of the reference transformer under `config`."""
    model = transformer.Transformer(config)
    tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


# HF norm name -> mpx module, for blocks with post-norms (Gemma 2/3) and without.
_NORMS = {False: {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"},
          True: {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_post_norm",
                 "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_post_norm"}}


def _layer_entries(i: int, post_norms: bool = False) -> list[Entry]:
    pre, at = f"model.layers.{i}.", ("layers_" + str(i),)
    out = [Entry(f"{pre}{hf}.weight", at + (name, "scale"), ()) for hf, name in _NORMS[post_norms].items()]
    for hf, name in _ATTN.items():
        out.append(Entry(f"{pre}self_attn.{hf}.weight", at + ("attn", name, "kernel"), (), 2 if hf == "o_proj" else 1))
        out.append(Entry(f"{pre}self_attn.{hf}.bias", at + ("attn", name, "bias"), ()))
    for hf in ("q_norm", "k_norm"):
        out.append(Entry(f"{pre}self_attn.{hf}.weight", at + ("attn", hf, "scale"), ()))
    out += [Entry(f"{pre}mlp.{hf}.weight", at + ("mlp", name, "kernel"), (), 1) for hf, name in _MLP.items()]
    return out


def _mla_entries(i: int, c: ModelConfig) -> list[Entry]:
    pre, at = f"model.layers.{i}.self_attn.", ("layers_" + str(i), "attn")
    d, h = c.d_model, c.n_heads
    if c.q_lora_rank is None:
        out = [Entry(pre + "q_proj.weight", at + ("q_proj", "kernel"), (d, h, c.head_dim), 1)]
    else:
        out = [Entry(pre + "q_a_proj.weight", at + ("q_a_proj", "kernel"), (d, c.q_lora_rank), 1),
               Entry(pre + "q_a_layernorm.weight", at + ("q_a_norm", "scale"), (c.q_lora_rank,)),
               Entry(pre + "q_b_proj.weight", at + ("q_b_proj", "kernel"), (c.q_lora_rank, h, c.head_dim), 1)]
    latent, kv_head = c.kv_lora_rank, c.qk_nope_head_dim + c.v_head_dim
    return out + [
        Entry(pre + "kv_a_proj_with_mqa.weight", at + ("kv_a_proj", "kernel"), (d, latent + c.qk_rope_head_dim), 1),
        Entry(pre + "kv_a_layernorm.weight", at + ("kv_a_norm", "scale"), (latent,)),
        Entry(pre + "kv_b_proj.weight", at + ("kv_b_proj", "kernel"), (latent, h, kv_head), 1),
        Entry(pre + "o_proj.weight", at + ("o_proj", "kernel"), (h, c.v_head_dim, d), 2)]


def _ffn_entries(hf: str, path: tuple[str, ...], d: int, f: int, experts: int = 0) -> list[Entry]:
    """gate/up (D, F) and down (F, D) kernels, stacked (E, ...) for `experts` > 0."""
    stack = (experts,) if experts else ()
    return [Entry(f"{hf}.{name}.weight", path + (mine, "kernel"), stack + ((f, d) if mine == "down" else (d, f)), 1,
                  experts) for name, mine in _MLP.items()]


def _deepseek_ffn_entries(i: int, c: ModelConfig) -> list[Entry]:
    pre, at = f"model.layers.{i}.mlp", ("layers_" + str(i),)
    if not c.is_moe_layer(i):
        return _ffn_entries(pre, at + ("mlp",), c.d_model, c.d_ff)
    at += ("moe",)
    out = [Entry(pre + ".gate.weight", at + ("router", "kernel"), (c.d_model, c.n_experts), 1)]
    if c.topk_method == "noaux_tc":
        out.append(Entry(pre + ".gate.e_score_correction_bias", at + ("router", "score_bias"), (c.n_experts,)))
    out += _ffn_entries(pre + ".experts.{j}", at + ("experts",), c.d_model, c.expert_d_ff, c.n_experts)
    if c.n_shared_experts:
        out += _ffn_entries(pre + ".shared_experts", at + ("shared",), c.d_model, c.n_shared_experts * c.expert_d_ff)
    return out


def deepseek_entries(config: ModelConfig) -> list[Entry]:
    """Every tensor of a DeepSeek-V3 checkpoint of `config` (multi-head latent attention),
    in checkpoint order, shapes from the config alone."""
    c, d = config, config.d_model
    out = [Entry("model.embed_tokens.weight", ("embed", "embedding"), (c.vocab_size, d))]
    for i in range(c.n_layers):
        at = ("layers_" + str(i),)
        out.append(Entry(f"model.layers.{i}.input_layernorm.weight", at + ("attn_norm", "scale"), (d,)))
        out += _mla_entries(i, c)
        out.append(Entry(f"model.layers.{i}.post_attention_layernorm.weight", at + ("mlp_norm", "scale"), (d,)))
        out += _deepseek_ffn_entries(i, c)
    out.append(Entry("model.norm.weight", ("final_norm", "scale"), (d,)))
    if not c.tie_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head", "kernel"), (d, c.vocab_size), 1))
    return out


def entries(config: ModelConfig) -> list[Entry]:
    """Every tensor of a checkpoint of `config`, in checkpoint order.

    Raises:
      HFError: a mixture-of-experts config without multi-head latent attention (no
        checkpoint layout).
    """
    if config.is_mla:
        return deepseek_entries(config)
    if config.n_experts:
        raise HFError("mixture-of-experts models with grouped-query attention have no supported checkpoint layout")
    shapes = param_shapes(config)
    candidates = [Entry("model.embed_tokens.weight", ("embed", "embedding"), ())]
    for i in range(config.n_layers):
        candidates += _layer_entries(i, config.post_norms)
    candidates += [Entry("model.norm.weight", ("final_norm", "scale"), ()),
                   Entry("lm_head.weight", ("lm_head", "kernel"), (), 1)]
    return [dataclasses.replace(e, shape=shapes[e.path]) for e in candidates if e.path in shapes]


def check_shape(entry: Entry, shape: tuple[int, ...], what: str = "", name: str | None = None) -> None:
    """Raises HFError naming the tensor (`name`, default entry.hf) and both shapes when
    `shape` is not its HF shape."""
    if tuple(shape) != entry.hf_shape:
        raise HFError(f"tensor {name or entry.hf}{what} has shape {list(shape)}; the config gives "
                      f"{list(entry.hf_shape)}")


def to_param(entry: Entry, array: np.ndarray) -> np.ndarray:
    """A float32 mpx param from its HF tensor (one copy); one expert's for stacked entries."""
    shape = entry.shape[1:] if entry.experts else entry.shape
    if entry.n_in is None:
        return np.asarray(array, np.float32).reshape(shape)
    return np.ascontiguousarray(np.asarray(array).T, np.float32).reshape(shape)


def stack_params(entry: Entry, arrays: Iterable[np.ndarray]) -> np.ndarray:
    """The (E, ...) float32 param of a stacked entry from its experts' HF tensors, filled
    expert by expert (one f32 expert beside the result)."""
    out = np.empty(entry.shape, np.float32)
    for j, array in enumerate(arrays):
        out[j] = to_param(entry, array)
    return out


def scale_shape(entry: Entry) -> tuple[int, ...]:
    """The (out, in) shape of a 128x128-block `weight_scale_inv`."""
    return tuple(-(-d // b) for d, b in zip(entry.hf_shape, BLOCK))


def to_scaled(entry: Entry, data: np.ndarray, scale_inv: np.ndarray, fmt: str = "e4m3") -> scaled.ScaledArray:
    """The (K, N) ScaledArray of a block-FP8 weight (out, in) and its scale_inv, exactly."""
    view = data.T  # (in, out) = the kernel's (K, N) view
    block = scaled.resolve_block(scaled.Blocks(BLOCK), view.shape)
    return scaled.ScaledArray(jnp.asarray(np.ascontiguousarray(view)),
                              jnp.asarray(np.ascontiguousarray(scale_inv.T), jnp.float32),
                              formats.get(fmt), block)


def stack_scaled(entry: Entry, pairs: Iterable[tuple[np.ndarray, np.ndarray]], fmt: str = "e4m3") -> scaled.ScaledArray:
    """The (E, K, N) ScaledArray, blocks (1, 128, 128), of a stacked entry's experts'
    block-FP8 (weight (out, in), scale_inv) pairs, exactly."""
    data, scales = zip(*((np.ascontiguousarray(d.T), np.ascontiguousarray(s.T)) for d, s in pairs))
    block = (1,) + scaled.resolve_block(scaled.Blocks(BLOCK), data[0].shape)
    return scaled.ScaledArray(jnp.asarray(np.stack(data)), jnp.asarray(np.stack(scales), jnp.float32),
                              formats.get(fmt), block)


def expert(param, j: int):
    """Expert `j` of a stacked (E, ...) param: an array, or a 2-D ScaledArray of a
    (1, ...)-blocked one."""
    if isinstance(param, scaled.ScaledArray):
        if param.block[0] != 1:
            raise HFError(f"a stacked expert kernel needs blocks of one expert; got block {param.block}")
        return scaled.ScaledArray(param.data[j], param.scale[j], param.fmt, tuple(param.block[1:]))
    return param[j]


def to_hf(entry: Entry, param) -> np.ndarray:
    """The HF (out, in) float32 tensor of an mpx param (a ScaledArray is dequantized); of
    one expert (`expert(param, j)`) for a stacked entry."""
    if isinstance(param, scaled.ScaledArray):
        param = scaled.dequantize(param)
    array = np.asarray(param, np.float32)
    if entry.n_in is None:
        return array.reshape(entry.hf_shape)
    return np.ascontiguousarray(array.reshape(entry.hf_shape[::-1]).T)


def from_scaled(q: scaled.ScaledArray) -> tuple[np.ndarray, np.ndarray]:
    """(weight (out, in) fp8, weight_scale_inv (out/128, in/128) f32) of a (K, N) ScaledArray.

    Raises:
      HFError: a ScaledArray whose blocks are not 128x128 over its 2-D view.
    """
    if q.ndim != 2 or tuple(q.block) != scaled.resolve_block(scaled.Blocks(BLOCK), q.shape):
        raise HFError(f"only 128x128-block FP8 weights export as block-FP8; got block {q.block} for {q.shape}")
    return np.ascontiguousarray(np.asarray(q.data).T), np.ascontiguousarray(np.asarray(q.scale, np.float32).T)


def get(params, path: tuple[str, ...]):
    """The leaf at `path` of a nested params dict."""
    for key in path:
        params = params[key]
    return params


def put(params: dict, path: tuple[str, ...], value) -> None:
    """Sets the leaf at `path` of a nested params dict, creating the dicts above it."""
    for key in path[:-1]:
        params = params.setdefault(key, {})
    params[path[-1]] = value
