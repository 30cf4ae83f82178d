"""Calibration for serving: static activation scales from observed inputs, and the
output temperature that undoes what FP8 does to the logits.

    hists = calibrate(ckpt.config, ckpt.params, calibration_batches(ckpt, 8))
    fp8_state = static_state(hists, "mse")          # StaticScaling's per-layer amax

`calibrate` runs the fp32 model over calibration batches and streams the input of every
DenseGeneral / ExpertDense layer into an `mpx.calibrate.Histogram` (collected with a
Flax method interceptor, inside jit). `static_state` turns the histograms into the
`fp8_state` of the StaticScaling recipe. `fit_logit_scale` fits a temperature on the
logits against a reference.
"""

from __future__ import annotations

from typing import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mpx
from models import precision as roles
from models import transformer
from models.config import ModelConfig
from mpx import calibrate as calibrate_lib
from mpx import dot as dot_lib
from mpx import nn as mnn
from mpx import config as config_lib
from mpx import recipes as recipes_lib
from serve.loader import Checkpoint, ServeError
from store import data as data_lib

__all__ = ["calibrate", "static_state", "calibration_batches", "token_stream", "fit_logit_scale"]


def _record_inputs(records: dict) -> Callable:
    """A Flax interceptor that stores the input of every dense layer by module path."""

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, mnn.LINEAR_TYPES):
            records[mnn.module_path(module)] = mnn.linear_input(module, args)
        return next_fun(*args, **kwargs)

    return record


def _observe_step(model: transformer.Transformer) -> Callable:
    @jax.jit
    def step(hists, params, tokens):
        records: dict = {}
        with nn.intercept_methods(_record_inputs(records)):
            model.apply({"params": params}, tokens)
        return {p: calibrate_lib.observe(h, records[p]) for p, h in hists.items()}

    return step


def calibrate(config: ModelConfig, params, batches: Iterable, *, bins: int = calibrate_lib.DEFAULT_BINS,
              paths: Iterable[str] | None = None) -> dict[str, calibrate_lib.Histogram]:
    """Histograms of every dense layer's input over `batches`, from the fp32 model.

    Args:
      config: the model's shape.
      params: f32 params.
      batches: (B, T) int token arrays.
      bins: histogram bins (a power of two).
      paths: the layers to observe (default: those the fp8 policy quantizes).

    Returns:
      {module path: Histogram}.
    """
    model = transformer.Transformer(config, mpx.policy.preset("fp32"))
    paths = list(roles.fp8_layers(config) if paths is None else paths)
    hists = {p: calibrate_lib.init_histogram(bins) for p in paths}
    step = _observe_step(model)
    for tokens in batches:
        hists = step(hists, params, jnp.asarray(tokens, jnp.int32))
    return hists


def static_state(hists: dict[str, calibrate_lib.Histogram], method: str, fmt: str = "e4m3", **options) -> dict:
    """The `fp8_state` collection of the StaticScaling recipe: calibrated lhs amax per layer.

    Returns:
      A nested dict {"layers_0": {"attn": {"q_proj": {"kernel": DotState}}}, ...}.
    """
    recipe = recipes_lib.StaticScaling(fwd_format=fmt)
    state: dict = {}
    for path, hist in hists.items():
        amax = calibrate_lib.calibrated_amax(hist, method, fmt, **options)
        entry = dot_lib.DotState(lhs=recipes_lib.AmaxHistory(jnp.reshape(amax, (1,))), rhs=recipe.init_state())
        node = state
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node["kernel"] = entry
    return state


def calibration_batches(ckpt_: Checkpoint, count: int, batch_size: int = 8, seq_len: int | None = None) -> list:
    """`count` training-split batches (B, T) of the checkpoint's own data (not held out)."""
    stream, _ = token_stream(ckpt_, batch_size, seq_len)
    state, out = data_lib.DataState(), []
    for _ in range(min(count, stream.steps_per_epoch)):
        batch, state = stream.batch(state)
        out.append(np.asarray(batch.inputs))
    return out


def token_stream(ckpt_: Checkpoint, batch_size: int, seq_len: int | None = None):
    """(TokenStream, tokenizer) of the checkpoint's own data, with another batch shape.

    Raises:
      ServeError: the data or tokenizer cannot be loaded.
    """
    data = dict(ckpt_.train_config.get("data", {}))
    data.update(batch_size=batch_size, seq_len=seq_len or data.get("seq_len", ckpt_.config.max_seq_len))
    try:
        cfg = config_lib.from_dict(data_lib.DataConfig, data, "data")
        return data_lib.build(cfg, ckpt_.config.vocab_size)
    except (FileNotFoundError, ImportError, ValueError) as err:
        raise ServeError(f"data of checkpoint {ckpt_.path}: {err}") from None


# --------------------------------------------------------------------------- logit temperature


def fit_logit_scale(logits: jax.Array, reference: jax.Array, *, low: float = 0.8, high: float = 1.25,
                    steps: int = 91) -> float:
    """The factor a on `logits` minimizing KL(softmax(reference) || softmax(a * logits)).

    Temperature scaling at the output layer: if FP8 compresses (or stretches)
    the logits, a > 1 (< 1) restores the distribution's sharpness. A grid search over
    [low, high], geometric.
    """
    grid = np.geomspace(low, high, steps).astype(np.float32)
    kls = jax.vmap(lambda a: mpx.metrics.kl_divergence(logits * a, reference))(jnp.asarray(grid))
    return float(grid[int(jnp.argmin(kls))])
