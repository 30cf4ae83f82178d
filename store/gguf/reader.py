"""GGUF files (llama.cpp's format), opened with the `gguf` package's memory-mapped reader.

    file = GGUFFile("model.Q4_K_M.gguf")
    file.architecture, file.get("llama.block_count")    # metadata
    file.dequantize("blk.0.attn_q.weight")               # float32, (rows, columns)

`gguf.GGUFReader` maps the file and parses the header, metadata and tensor table;
tensor bytes are read only when a tensor is dequantized, one tensor at a time. A file
that is not GGUF, is cut short, or holds a tensor type the `gguf` package cannot
dequantize raises `GGUFError` naming the file and what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from store.hf.config import HFError

MAGIC = b"GGUF"
SUFFIX = ".gguf"


class GGUFError(HFError):
    """A GGUF file mpx cannot use: not GGUF, truncated, unsupported architecture or tensor type."""


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a file named *.gguf or starting with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == SUFFIX:
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def _float_types():
    import gguf

    t = gguf.GGMLQuantizationType
    return {t.F32: np.float32, t.F16: np.float16, t.F64: np.float64}


def supported_types() -> list[str]:
    """Names of the tensor types mpx reads: plain floats and every type `gguf.quants` dequantizes."""
    from gguf import quants

    return [t.name for t in _float_types()] + [t.name for t in quants._type_traits]


class GGUFFile:
    """One GGUF file: metadata (`get`), tensor table (`names`, `shape`, `type_name`), `dequantize`."""

    def __init__(self, path: str | Path):
        """Opens `path` (memory-mapped) and parses its header.

        Raises:
          GGUFError: no such file, not a GGUF file, or a header or tensor table that
            does not fit the file (truncated).
        """
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such GGUF file")
        with open(self.path, "rb") as f:
            if f.read(4) != MAGIC:
                raise GGUFError(f"{self.path}: not a GGUF file (it does not start with {MAGIC.decode()})")
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except Exception as err:  # the reader raises ValueError, IndexError, KeyError... on a bad file
            raise GGUFError(f"{self.path}: unreadable GGUF file (truncated or corrupt: "
                            f"{type(err).__name__}: {' '.join(str(err).split())[:160]})") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        """The metadata value under `key` (a str, number, bool or list), or `default`.

        Values are parsed once (a vocabulary's token list is long); do not modify them.
        """
        if key not in self._values:
            field = self._reader.get_field(key)
            self._values[key] = None if field is None else field.contents()
        value = self._values[key]
        return default if value is None else value

    def has(self, key: str) -> bool:
        return self._reader.get_field(key) is not None

    @property
    def architecture(self) -> str:
        """general.architecture ("llama", "qwen2", ...).

        Raises:
          GGUFError: the file names none.
        """
        arch = self.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFError(f"{self.path}: no general.architecture in the metadata")
        return arch

    def names(self) -> list[str]:
        """The tensor names, in file order."""
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, outermost dimension first ((rows, columns) of a matrix)."""
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        """A tensor's GGML type name ("F32", "Q4_K", ...)."""
        return self._tensors[name].tensor_type.name

    def check_type(self, name: str) -> None:
        """Raises GGUFError when tensor `name` has a type mpx cannot dequantize."""
        from gguf import quants

        qtype = self._tensors[name].tensor_type
        if qtype not in _float_types() and qtype not in quants._type_traits:
            raise GGUFError(f"{self.path}: tensor {name} has type {qtype.name}, which mpx cannot read; "
                            f"supported: {', '.join(supported_types())}")

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as float32, of `shape(name)` (read from the map now).

        Raises:
          GGUFError: an unsupported tensor type.
        """
        from gguf import quants

        self.check_type(name)
        tensor = self._tensors[name]
        floats = _float_types()
        if tensor.tensor_type in floats:
            data = np.asarray(tensor.data).view(floats[tensor.tensor_type]).astype(np.float32)
        else:
            data = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        return data.reshape(self.shape(name))
