"""Writes the reference transformer's params as a Hugging Face model directory.

Two layouts:

* "bf16": every tensor bfloat16 (a MoE router float32, as transformers keeps it).
* "fp8": DeepSeek-V3's released block-FP8 layout. Each linear weight the fp8 policy
  quantizes (Q/K/V/O projections and MLA's latent ones, FFN, routed and shared experts)
  is `<name>.weight` float8_e4m3fn (out, in) plus `<name>.weight_scale_inv` float32 with
  one scale per 128x128 block (ceil-divided; weight * scale_inv dequantizes), one pair
  per routed expert; the router float32, everything else bfloat16; config.json gains
  `"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
  "dynamic", "weight_block_size": [128, 128]}` (+ `"scale_fmt": "ue8m0"` for
  power-of-two scales, DeepSeek-V3.1 / DeepGEMM style).

A model with multi-head latent attention is written as DeepseekV3ForCausalLM, its
routed experts one tensor each (`mlp.experts.{j}.gate_proj.weight`, ...) as DeepSeek
releases them; other models as their Llama-family architecture.

FP8 weights that are already 128x128-block ScaledArrays (an imported block-FP8
checkpoint) are written as they are, so export -> load -> export is bit-identical.

mpx's own models scale the embedding lookup by sqrt(d_model), which Llama does not:
their embedding is written pre-multiplied and the LM head untied (the tied head reads
the unscaled table), so the exported model computes the same function.

The directory is built beside `out` and renamed into place: nothing is half-written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import jax.numpy as jnp
import numpy as np

import mpx
from models import precision as roles
from models.config import ModelConfig
from store.hf import weights as W
from store.hf.config import HFError, from_model_config
from store.hf.tensors import write
from store.tokenizer import TOKENIZER_FILES, tokenizer_files  # noqa: F401 (re-exported)

PRECISIONS = ("fp8", "bf16")
SCALE_FORMATS = ("float32", "ue8m0")


def quantization_config(scale_format: str) -> dict:
    """config.json's quantization_config of the block-FP8 layout."""
    out = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(W.BLOCK)}
    return {**out, "scale_fmt": "ue8m0"} if scale_format == "ue8m0" else out


def export_config(config: ModelConfig) -> ModelConfig:
    """The config the written checkpoint has: no embedding scaling (folded into the table),
    unless its architecture scales them itself (Gemma: embed_scale_dtype "embedding")."""
    if not config.embed_scale or config.embed_scale_dtype == "embedding":
        return config
    return dataclasses.replace(config, embed_scale=False, tie_embeddings=False)


def is_fp8_layer(entry: W.Entry) -> bool:
    """Whether the fp8 policy gives this kernel an FP8 recipe (the layers serving quantizes;
    for DeepSeek-V3 every linear layer but the router and head, as its release stores)."""
    return entry.n_in is not None and roles.resolve(mpx.policy.preset("fp8"), entry.module).recipe is not None


def _float_dtype(entry: W.Entry) -> np.dtype:
    """The dtype of a tensor not written in FP8: float32 for a MoE router (its top-k flips
    easily; transformers keeps it float32), else bfloat16 (`models.precision.serving_dtype`)."""
    return np.dtype(roles.serving_dtype(entry.module, "bf16"))


def _is_pow2(scale) -> bool:
    mantissa, _ = np.frexp(np.asarray(scale, np.float32))
    return bool(np.all(mantissa == 0.5))


def _fp8_pair(entry: W.Entry, param, ue8m0: bool) -> tuple[np.ndarray, np.ndarray]:
    """(weight fp8 (out, in), weight_scale_inv) of a kernel, requantizing only if needed."""
    if isinstance(param, mpx.ScaledArray) and param.fmt.name == "e4m3" and (not ue8m0 or _is_pow2(param.scale)):
        try:
            return W.from_scaled(param)
        except HFError:
            pass  # another block shape: requantize below
    if isinstance(param, mpx.ScaledArray):
        param = param.dequantize()
    k, n = entry.hf_shape[1], entry.hf_shape[0]
    q = mpx.quantize(jnp.asarray(param, jnp.float32).reshape(k, n), "e4m3", mpx.Blocks(W.BLOCK), pow2_scale=ue8m0)
    return W.from_scaled(q)


def _fp8_experts(param, ue8m0: bool) -> mpx.ScaledArray:
    """A stacked (E, K, N) expert kernel in (1, 128, 128) blocks, quantized at once (blocks
    never cross experts) unless it already is."""
    block = (1,) + mpx.scaled.resolve_block(mpx.Blocks(W.BLOCK), param.shape[1:])
    if isinstance(param, mpx.ScaledArray):
        if param.fmt.name == "e4m3" and tuple(param.block) == block and (not ue8m0 or _is_pow2(param.scale)):
            return param
        param = param.dequantize()
    return mpx.quantize(jnp.asarray(param, jnp.float32), "e4m3", mpx.Blocks(block), pow2_scale=ue8m0)


def _source_param(entry: W.Entry, params, config: ModelConfig):
    """The param for `entry`, reading the tied table for an untied export's LM head."""
    if entry.path == ("lm_head", "kernel") and config.tie_embeddings:
        return np.asarray(W.get(params, ("embed", "embedding")), np.float32).T
    value = W.get(params, entry.path)
    if entry.path == ("embed", "embedding") and export_config(config).embed_scale != config.embed_scale:
        return np.asarray(value, np.float32) * np.float32(config.d_model**0.5)
    return value


def hf_tensors(config: ModelConfig, params, precision: str, scale_format: str = "float32",
               fp8_layer: Callable[[W.Entry], bool] = is_fp8_layer) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs of the checkpoint, one tensor at a time, in checkpoint order.

    `fp8_layer(entry)` picks the kernels an fp8 export writes in block-FP8.

    Raises:
      HFError: an unknown precision or scale format, a config with no checkpoint layout.
    """
    if precision not in PRECISIONS:
        raise HFError(f"unknown export precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if scale_format not in SCALE_FORMATS:
        raise HFError(f"unknown scale format {scale_format!r}; allowed: {', '.join(SCALE_FORMATS)}")
    for entry in W.entries(export_config(config)):
        param = _source_param(entry, params, config)
        fp8 = precision == "fp8" and entry.n_in is not None and fp8_layer(entry)
        if fp8 and entry.experts:
            param = _fp8_experts(param, scale_format == "ue8m0")
        for j, name in enumerate(entry.names()):
            value = W.expert(param, j) if entry.experts else param
            if fp8:
                data, scale_inv = _fp8_pair(entry, value, scale_format == "ue8m0")
                yield name, data
                yield name + "_scale_inv", scale_inv
            else:
                yield name, W.to_hf(entry, value).astype(_float_dtype(entry))


def _prepare_out(out: Path, force: bool) -> Path:
    """A fresh staging directory beside `out`; HFError if `out` is in the way."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise HFError(f"--out {out} exists and is not empty; pass --force to replace it")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def save(out: str | Path, config: ModelConfig, params, *, precision: str = "fp8", scale_format: str = "float32",
         base_config: dict | None = None, extra_files: dict[str, bytes] | None = None, force: bool = False,
         fp8_layer: Callable[[W.Entry], bool] = is_fp8_layer) -> Path:
    """Writes a Hugging Face model directory.

    Args:
      out: the directory to create (refused if it exists and is not empty, unless force).
      config: the model's shape.
      params: nested params (float arrays and/or 128x128-block ScaledArrays).
      precision: "fp8" (block-FP8, see the module docstring) or "bf16".
      scale_format: "float32" scales, or "ue8m0" (powers of two).
      base_config: a source config.json whose other keys (token ids, ...) carry over.
      extra_files: {file name: bytes} written as they are (tokenizer files).
      force: replace an existing non-empty `out`.
      fp8_layer: which kernels an fp8 export writes in block-FP8 (default: those the fp8
        preset quantizes); the rest are bf16.

    Returns:
      The directory.

    Raises:
      HFError: `out` in the way, an unknown precision or scale format, a model with no
        checkpoint layout. Nothing is left behind on error.
    """
    out = Path(out)
    hf_config = from_model_config(export_config(config), base_config)
    hf_config.pop("quantization_config", None)
    hf_config["torch_dtype"] = "bfloat16"
    hf_config.pop("dtype", None)
    if precision == "fp8":
        hf_config["quantization_config"] = quantization_config(scale_format)
    staging = _prepare_out(out, force)
    try:
        write(staging / "model.safetensors", hf_tensors(config, params, precision, scale_format, fp8_layer),
              {"format": "pt"})
        _write_json(staging / "config.json", hf_config)
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
