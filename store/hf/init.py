"""Starting a training run from a Hugging Face model directory or GGUF file (`model.init_from: DIR`).

    config = resolve_init_from(cfg.model)   # the directory's shape, the run's max_seq_len/remat
    params = init_params(config)            # float32 masters (block-FP8 weights dequantized)

The run then trains under any precision policy: masters are float32 whatever the
checkpoint stored, and the policy decides what each layer computes in.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

import mpx
from models.config import ModelConfig
from store.hf.config import HFError
from store.hf.load import load, read_config


def resolve_init_from(config: ModelConfig) -> ModelConfig:
    """`config` with the shape of its `init_from` directory (unchanged without one).

    The run keeps its own max_seq_len (training context) and remat.

    Raises:
      HFError: the directory has no usable config.json.
    """
    if not config.init_from:
        return config
    shape = read_config(config.init_from, config.max_seq_len,
                        need="model.init_from needs a Hugging Face directory or a GGUF file")
    return dataclasses.replace(shape, remat=config.remat, init_from=config.init_from)


def _to_f32(entry, value):
    if isinstance(value, mpx.ScaledArray):
        return mpx.dequantize(value, jnp.float32)
    return jnp.asarray(value, jnp.float32)


def init_params(config: ModelConfig) -> dict:
    """The float32 params of `config.init_from`, checked against `config`'s shape.

    Raises:
      HFError: no init_from, or a directory whose model differs from `config`.
    """
    if not config.init_from:
        raise HFError("init_params needs a config with init_from set")
    model = load(config.init_from, _to_f32, max_seq_len=config.max_seq_len, need_tokenizer=False)
    want = dataclasses.replace(model.config, remat=config.remat, init_from=config.init_from)
    if want != config:
        raise HFError(f"{config.init_from} holds another model than the run's config (resolve it first with "
                      f"resolve_init_from)")
    return model.params
