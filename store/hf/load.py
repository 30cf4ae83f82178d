"""Loads a Hugging Face model directory into the reference transformer's params.

    hf = load("path/to/SmolLM2-135M")                 # f32 params (ScaledArrays for block-FP8)
    hf = load(path, convert=my_quantizer)             # converted tensor by tensor as loaded

The directory holds config.json, model.safetensors (or model-0000i-of-0000n.safetensors
with model.safetensors.index.json) and tokenizer.json, with tokenizer_config.json and
generation_config.json where present. Tensors are read from memory maps one at a
time and handed to `convert` right away, so peak host memory is the converted model
plus one float32 tensor (a block's stacked experts count as one). A block-FP8
checkpoint (DeepSeek-V3's layout, see serve/export.py) loads its FP8 weights as
`mpx.ScaledArray`s, bit for bit. DeepSeek-V3's multi-token-prediction layers are skipped
on purpose, which `HFModel.notes` says.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from store import gguf as gguf_lib
from store.hf import weights as W
from store.hf.config import HFError, mtp_layers, read_json, to_model_config
from store.hf.tensors import SafetensorsFile, TensorFileError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
SCALE_SUFFIX = "_scale_inv"
# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# convert(entry, value) -> leaf: value is a float32 numpy array in the mpx layout, or
# a ScaledArray for a block-FP8 weight.
Convert = Callable[[W.Entry, Any], Any]


@dataclasses.dataclass(frozen=True)
class HFModel:
    """A loaded Hugging Face directory.

    Attributes:
      config: the model's shape as the reference transformer's config.
      params: nested params dict (leaves as `convert` returned them).
      path: the directory.
      hf_config: config.json.
      tokenizer_config: tokenizer_config.json ({} when absent).
      generation_config: generation_config.json ({} when absent).
      notes: what a caller may want to print about the load (tensors skipped on purpose).
    """

    config: ModelConfig
    params: dict
    path: Path
    hf_config: dict
    tokenizer_config: dict
    generation_config: dict
    notes: tuple[str, ...] = ()

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` is a directory that looks like a Hugging Face model (config.json,
    safetensors files or a tokenizer.json in it), rather than an mpx training run."""
    path = Path(path)
    if gguf_lib.is_gguf(path):  # a GGUF file reads as a directory would (store/gguf)
        return True
    if not path.is_dir() or (path / "checkpoints").is_dir():
        return False
    return any((path / n).is_file() for n in ("config.json", INDEX, "tokenizer.json")) or any(path.glob("*.safetensors"))


def _open_files(path: Path) -> dict[str, SafetensorsFile]:
    """{tensor name: the open file holding it}."""
    if gguf_lib.is_gguf(path):
        return gguf_lib.open_tensors(path)
    if (path / INDEX).is_file():
        weight_map = read_json(path / INDEX, "the shard index").get("weight_map") or {}
        files = {f: path / f for f in sorted(set(weight_map.values()))}
        missing = [str(p.name) for p in files.values() if not p.is_file()]
        if missing:
            raise HFError(f"{path}: {INDEX} names missing shard(s) {', '.join(missing)}")
    elif (path / SINGLE).is_file():
        files = {SINGLE: path / SINGLE}
    else:
        raise HFError(f"{path}: no {SINGLE} or {INDEX} (safetensors weights)")
    where = {}
    for name, file in files.items():
        handle = SafetensorsFile(file)
        where.update({t: handle for t in handle.names()})
    return where


def _check_quantization(hf_config: dict) -> None:
    """HFError for a quantization_config other than block-FP8 E4M3 (128x128)."""
    q = hf_config.get("quantization_config")
    if not q:
        return
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3" or \
            list(q.get("weight_block_size") or []) != list(W.BLOCK):
        raise HFError(f"unsupported quantization_config {q}; supported: quant_method fp8, fmt e4m3, "
                      f"weight_block_size {list(W.BLOCK)}")


def _is_fp8(name: str, where: dict[str, SafetensorsFile]) -> bool:
    return name in where and where[name].info(name)[0] == "F8_E4M3" and name + SCALE_SUFFIX in where


def _read_tensor(entry: W.Entry, name: str, where: dict[str, SafetensorsFile]):
    """HF tensor `name` of `entry`, checked: a float array (out, in), or the (F8_E4M3
    weight, float32 scale_inv) pair of a block-FP8 one."""
    if name not in where:
        raise HFError(f"tensor {name} is missing (the config gives shape {list(entry.hf_shape)})")
    file = where[name]
    dtype, shape = file.info(name)
    W.check_shape(entry, shape, name=name)
    scale_name = name + SCALE_SUFFIX
    if _is_fp8(name, where):
        _, scale_shape = where[scale_name].info(scale_name)
        if tuple(scale_shape) != W.scale_shape(entry):
            raise HFError(f"tensor {scale_name} has shape {list(scale_shape)}; 128x128 blocks of "
                          f"{list(entry.hf_shape)} give {list(W.scale_shape(entry))}")
        return file.tensor(name), where[scale_name].tensor(scale_name).astype(np.float32)
    if dtype not in FLOAT_DTYPES:
        raise HFError(f"tensor {name} has dtype {dtype}; expected one of {', '.join(FLOAT_DTYPES)} "
                      f"(or F8_E4M3 with {scale_name})")
    return file.tensor(name)


def _read_experts(entry: W.Entry, where: dict[str, SafetensorsFile]):
    """A stacked entry's value from its experts' tensors, all block-FP8 or all float."""
    names = entry.names()
    fp8 = _is_fp8(names[0], where)
    for name in names:
        if name in where and _is_fp8(name, where) != fp8:
            raise HFError(f"tensor {name} is {'not ' if fp8 else ''}block-FP8 but {names[0]} is "
                          f"{'' if fp8 else 'not '}(one block's experts are stored alike)")
    tensors = (_read_tensor(entry, name, where) for name in names)
    return W.stack_scaled(entry, tensors) if fp8 else W.stack_params(entry, tensors)


def _read_entry(entry: W.Entry, where: dict[str, SafetensorsFile]):
    """The entry's value: a float32 array in the mpx layout, or a ScaledArray."""
    if entry.experts:
        return _read_experts(entry, where)
    value = _read_tensor(entry, entry.hf, where)
    return W.to_scaled(entry, *value) if isinstance(value, tuple) else W.to_param(entry, value)


def _default_convert(entry: W.Entry, value):
    return jnp.asarray(value) if isinstance(value, np.ndarray) else value


def _check_leftovers(where: dict, used: set[str], config: ModelConfig) -> None:
    left = [n for n in where if n not in used and not n.endswith(_IGNORED_SUFFIXES)
            and not (config.tie_embeddings and n == "lm_head.weight")]
    if left:
        raise HFError(f"tensor(s) {', '.join(sorted(left)[:4])} are not part of this model "
                      f"(unsupported layers or a config that does not fit the weights)")


def _mtp_note(skipped: list[str], prefixes: tuple[str, ...]) -> tuple[str, ...]:
    if not skipped:
        return ()
    layers = ", ".join(p + "*" for p in prefixes if any(n.startswith(p) for n in skipped))
    return (f"skipped the multi-token-prediction layer(s) {layers} ({len(skipped)} tensors): mpx predicts the "
            "next token only",)


def load_params(path: Path, config: ModelConfig, convert: Convert | None = None,
                skip: tuple[str, ...] = ()) -> dict:
    """The params tree of the safetensors weights in `path`, converted tensor by tensor.

    `skip`: name prefixes of tensors that are not part of the model on purpose.

    Raises:
      HFError: missing files, a missing, misshapen, extra or unreadable tensor.
    """
    return _load_params(path, config, convert, skip)[0]


def _load_params(path: Path, config: ModelConfig, convert: Convert | None,
                 skip: tuple[str, ...]) -> tuple[dict, list[str]]:
    """(params, the names of the tensors skipped by prefix)."""
    convert = convert or _default_convert
    where = _open_files(path)
    params: dict = {}
    skipped = [n for n in where if n.startswith(skip)] if skip else []
    used: set[str] = set(skipped)
    try:
        for entry in W.entries(config):
            W.put(params, entry.path, convert(entry, _read_entry(entry, where)))
            used.update(n + suffix for n in entry.names() for suffix in ("", SCALE_SUFFIX))
    except TensorFileError as err:
        raise HFError(str(err)) from None
    _check_leftovers(where, used, config)
    return params, skipped


def _optional_json(path: Path) -> dict:
    return read_json(path, "") if path.is_file() else {}


def read_config(path: str | Path, max_seq_len: int | None = None,
                need: str = "a Hugging Face model directory needs one") -> ModelConfig:
    """The `ModelConfig` of a Hugging Face directory's config.json, or of a GGUF file's
    metadata (no weights read).

    Args:
      path: the directory or GGUF file.
      max_seq_len: as in `load`.
      need: what a missing config.json error says the caller needed.

    Raises:
      HFError: no such directory, no config.json, an unsupported architecture.
    """
    path = Path(path)
    if gguf_lib.is_gguf(path):
        return to_model_config(gguf_lib.read_hf_config(path), max_seq_len, str(path))
    if not path.is_dir():
        raise HFError(f"{path}: no such model directory")
    file = path / "config.json"
    return to_model_config(read_json(file, need), max_seq_len, str(file))


def load(path: str | Path, convert: Convert | None = None, *, max_seq_len: int | None = None,
         need_tokenizer: bool = True) -> HFModel:
    """Loads a Hugging Face model directory.

    Args:
      path: the directory.
      convert: called as `convert(entry, value)` on each tensor as it is loaded (value a
        float32 array in the mpx layout, or a ScaledArray for block-FP8 weights); returns
        the leaf to keep. Default: a jax array (ScaledArrays kept).
      max_seq_len: the serving context (default min(max_position_embeddings, 4096)).
      need_tokenizer: raise when there is no tokenizer.json.

    Returns:
      An `HFModel`.

    Raises:
      HFError: no such directory, no config.json, an unsupported architecture, missing
        or misshapen tensors, an unreadable dtype, no tokenizer.json.
    """
    path = Path(path)
    config = read_config(path, max_seq_len)
    if gguf_lib.is_gguf(path):
        configs = gguf_lib.read_configs(path, need_tokenizer)  # a bad tokenizer fails before the weights load
        return HFModel(config, load_params(path, config, convert), path, *configs)
    hf_config = read_json(path / "config.json", "")
    _check_quantization(hf_config)
    if need_tokenizer and not (path / "tokenizer.json").is_file():
        raise HFError(f"{path}: no tokenizer.json (mpx reads Hugging Face fast tokenizers only)")
    mtp = tuple(f"model.layers.{config.n_layers + k}." for k in range(mtp_layers(hf_config)))
    params, skipped = _load_params(path, config, convert, mtp)
    return HFModel(config, params, path, hf_config, _optional_json(path / "tokenizer_config.json"),
                   _optional_json(path / "generation_config.json"), _mtp_note(skipped, mtp))
