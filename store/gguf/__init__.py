"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints.

A `FILE.gguf` goes wherever a model directory goes (`--checkpoint`, `model.init_from`):
store/hf/load.py asks `is_gguf` and then reads `read_hf_config(path)` (config.json keys
from the metadata) and `open_tensors(path)` (tensors under Hugging Face names,
dequantized to float32 one at a time from the memory map), so every architecture the
Hugging Face reader supports maps through the same `ModelConfig` and param layout.
The tokenizer is rebuilt from the metadata (store/gguf/tokenizer.py).

    is_gguf("model.Q4_K_M.gguf")             # True
    read_hf_config(path)["architectures"]    # ["LlamaForCausalLM"]
"""

from __future__ import annotations

import functools
from pathlib import Path

from store.gguf import tokenizer
from store.gguf.model import ARCHITECTURES, Tensors, hf_config
from store.gguf.reader import GGUFError, GGUFFile, is_gguf, supported_types

__all__ = ["ARCHITECTURES", "GGUFError", "GGUFFile", "Tensors", "hf_config", "is_gguf", "open_file", "open_tensors",
           "read_configs", "read_hf_config", "supported_types", "tokenizer"]


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)


def open_file(path: str | Path) -> GGUFFile:
    """The parsed GGUF file at `path` (parsed once while the file is unchanged).

    Raises:
      GGUFError: see `GGUFFile`.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    stat = path.stat()
    return _open(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def read_hf_config(path: str | Path) -> dict:
    """config.json (Hugging Face keys) of a GGUF file.

    Raises:
      GGUFError: an unreadable file, an unsupported architecture, missing sizes.
    """
    return hf_config(open_file(path))


def open_tensors(path: str | Path) -> dict[str, Tensors]:
    """{Hugging Face tensor name: the reader holding it}, as store.hf.load's safetensors map."""
    tensors = Tensors(open_file(path))
    return {name: tensors for name in tensors.names()}


def read_configs(path: str | Path, need_tokenizer: bool = True) -> tuple[dict, dict, dict]:
    """(config.json, tokenizer_config.json, generation_config.json) of a GGUF file (the
    last two {} for a file without tokenizer metadata when `need_tokenizer` is False).

    Raises:
      GGUFError: see `read_hf_config`; tokenizer metadata missing (or unusable) when
        `need_tokenizer`.
    """
    file = open_file(path)
    if not need_tokenizer and not tokenizer.has_tokenizer(file):
        return hf_config(file), {}, {}
    return hf_config(file), tokenizer.tokenizer_config(file), tokenizer.generation_config(file)
