"""A minimal GGUF (v2/v3) container reader: scalar metadata and raw tensor bytes, nothing else.

`gguf.GGUFReader` builds a numpy view for every element of every metadata array; for SmolLM2 (98k tokenizer
strings) that takes about 10 s on a small CPU. We only need the scalar `llama.*` fields and the tensors, so
arrays are skipped (their length is kept) and the tensors are sliced from one memory map. Dequantization
itself is the `gguf` package's.

Layout (little endian): magic "GGUF", version u32, tensor count u64, metadata count u64; metadata entries
(key string, value type u32, value); tensor infos (name, n_dims u32, dims u64 x n_dims innermost first, type
u32, offset u64); padding to `general.alignment` (32); tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# value type id -> struct format of a scalar (8 = string, 9 = array are variable-sized)
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class ArrayInfo:
    """A skipped metadata array: its element type and length."""

    value_type: int
    length: int


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first): (rows, cols) for a matrix
    ggml_type: int
    data: np.ndarray = field(repr=False)  # raw bytes, (rows, bytes per row) uint8


class _Cursor:
    def __init__(self, buffer: np.ndarray):
        self.buffer, self.offset = buffer, 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        text = bytes(self.buffer[self.offset : self.offset + length]).decode("utf-8", errors="replace")
        self.offset += length
        return text

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.skip_array()
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"unknown GGUF value type {value_type}")
        return self.unpack(_SCALAR_FORMATS[value_type])

    def skip_array(self) -> ArrayInfo:
        item_type, length = self.unpack("<I"), self.unpack("<Q")
        if item_type in _SCALAR_FORMATS:
            self.offset += length * struct.calcsize(_SCALAR_FORMATS[item_type])
        else:  # strings (or nested arrays) have per-item lengths
            for _ in range(length):
                self.value(item_type)
        return ArrayInfo(item_type, length)


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """(metadata: key -> scalar, string or ArrayInfo, tensors in file order) of a GGUF file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(buffer[:4]) != MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    try:
        metadata, infos, header_end = _read_header(buffer)
    except struct.error as error:  # the header runs past the end of the file
        raise ValueError(f"{path} is truncated (an interrupted download?): {error}") from error
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-header_end // alignment) * alignment
    tensors = []
    for name, shape, ggml_type, offset in infos:
        block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        row_bytes = shape[-1] // block * type_bytes
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        start = data_start + offset
        if start + rows * row_bytes > buffer.size:
            raise ValueError(f"{path} is truncated (an interrupted download?): tensor {name} ends past the file")
        raw = buffer[start : start + rows * row_bytes].reshape(rows, row_bytes)
        tensors.append(TensorInfo(name, shape, ggml_type, raw))
    return metadata, tensors


def _read_header(buffer: np.ndarray) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """(metadata, tensor infos as (name, shape, type, offset), offset where the header ends)."""
    cursor = _Cursor(buffer)
    cursor.offset = len(MAGIC)
    version, n_tensors, n_fields = cursor.unpack("<I"), cursor.unpack("<Q"), cursor.unpack("<Q")
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported (2 or later)")
    metadata = {}
    for _ in range(n_fields):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
        infos.append((name, tuple(reversed(dims)), cursor.unpack("<I"), cursor.unpack("<Q")))
    return metadata, infos, cursor.offset
