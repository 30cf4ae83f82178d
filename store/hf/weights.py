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
"""

from __future__ import annotations

import dataclasses
import math

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
    """

    hf: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    n_in: int | None = None

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.n_in is None:
            return (math.prod(self.shape),) if self.path[-1] == "bias" else self.shape
        return math.prod(self.shape[self.n_in:]), math.prod(self.shape[:self.n_in])

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


def entries(config: ModelConfig) -> list[Entry]:
    """Every tensor of a checkpoint of `config`, in checkpoint order.

    Raises:
      HFError: a mixture-of-experts config (no Llama-family layout).
    """
    if config.n_experts:
        raise HFError("mixture-of-experts models have no Llama-family checkpoint layout")
    shapes = param_shapes(config)
    candidates = [Entry("model.embed_tokens.weight", ("embed", "embedding"), ())]
    for i in range(config.n_layers):
        candidates += _layer_entries(i, config.post_norms)
    candidates += [Entry("model.norm.weight", ("final_norm", "scale"), ()),
                   Entry("lm_head.weight", ("lm_head", "kernel"), (), 1)]
    return [dataclasses.replace(e, shape=shapes[e.path]) for e in candidates if e.path in shapes]


def check_shape(entry: Entry, shape: tuple[int, ...], what: str = "") -> None:
    """Raises HFError naming the tensor and both shapes when `shape` is not its HF shape."""
    if tuple(shape) != entry.hf_shape:
        raise HFError(f"tensor {entry.hf}{what} has shape {list(shape)}; the config gives {list(entry.hf_shape)}")


def to_param(entry: Entry, array: np.ndarray) -> np.ndarray:
    """A float32 mpx param from its HF tensor (one copy)."""
    if entry.n_in is None:
        return np.asarray(array, np.float32).reshape(entry.shape)
    return np.ascontiguousarray(np.asarray(array).T, np.float32).reshape(entry.shape)


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


def to_hf(entry: Entry, param) -> np.ndarray:
    """The HF (out, in) float32 tensor of an mpx param (a ScaledArray is dequantized)."""
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
