"""safetensors files, read memory-mapped and written tensor by tensor, in numpy.

The format: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}),
then the raw little-endian tensor bytes, offsets relative to the end of the header.
It is parsed here rather than through the `safetensors` package so that bfloat16 and
float8 tensors come back as exact ml_dtypes arrays, views into a memory map: a tensor
occupies host memory only while the caller converts it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_ALIGN = 8  # the header is padded with spaces so tensor data starts 8-byte aligned
_MAX_HEADER = 100 * 2**20


class TensorFileError(ValueError):
    """A safetensors file that cannot be read: bad header, unknown dtype, bad offsets."""


def _read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where tensor data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise TensorFileError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER:
            raise TensorFileError(f"{path}: not a safetensors file (header length {length})")
        text = f.read(length)
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TensorFileError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + length


class SafetensorsFile:
    """One safetensors file, memory-mapped: `names()`, `info(name)`, `tensor(name)`."""

    def __init__(self, path: str | Path):
        """Opens `path` and reads its header.

        Raises:
          TensorFileError: the file is not a safetensors file.
        """
        self.path = Path(path)
        header, self._start = _read_header(self.path)
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._map = None

    def names(self) -> list[str]:
        """The tensor names, in file order."""
        return list(self._entries)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype name, shape) of a tensor, read from the header only."""
        entry = self._entries[name]
        return entry["dtype"], tuple(entry["shape"])

    def tensor(self, name: str) -> np.ndarray:
        """A read-only array view of tensor `name` into the memory map.

        Raises:
          TensorFileError: an unknown dtype (naming it and the readable ones) or
            offsets that do not fit the shape or the file.
        """
        dtype_name, shape = self.info(name)
        if dtype_name not in DTYPES:
            raise TensorFileError(f"{self.path.name}: tensor {name} has dtype {dtype_name}, which mpx cannot "
                                  f"read; readable dtypes: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype_name]
        begin, end = self._entries[name]["data_offsets"]
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise TensorFileError(f"{self.path.name}: tensor {name}: {end - begin} bytes do not hold "
                                  f"{dtype_name} of shape {list(shape)}")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        if self._start + end > self._map.size:
            raise TensorFileError(f"{self.path.name}: tensor {name} runs past the end of the file (truncated?)")
        return self._map[self._start + begin:self._start + end].view(dtype).reshape(shape)


def dtype_name(dtype) -> str:
    """The safetensors name of a numpy/ml_dtypes dtype ("BF16" for bfloat16).

    Raises:
      TensorFileError: a dtype safetensors has no name for.
    """
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
        raise TensorFileError(f"no safetensors dtype for {dtype}; writable: {', '.join(_NAMES.values())}")
    return _NAMES[dtype]


def write(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> int:
    """Writes tensors, in the given order, as one safetensors file.

    Args:
      path: the file to write.
      tensors: (name, array) pairs; arrays are written little-endian, C order.
      metadata: optional "__metadata__" strings (e.g. {"format": "pt"}).

    Returns:
      The number of bytes written.
    """
    tensors = list(tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, array in tensors:
        header[name] = {"dtype": dtype_name(array.dtype), "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, array in tensors:
            f.write(np.ascontiguousarray(array).tobytes())
    return 8 + len(text) + offset
