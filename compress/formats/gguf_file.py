"""GGUF files (llama.cpp's format): metadata, and tensors dequantized to float32.

We parse the header ourselves (one pass over bytes: fast, and a malformed file is
reported with its path and what broke), memory-map the tensor data, and dequantize
one tensor at a time with `gguf.quants`, so loading never holds a float copy of the
whole model.

Layout: magic 'GGUF', version (u32), tensor count (u64), metadata count (u64),
metadata key/value pairs, tensor infos (name, dims innermost first, type, offset),
then the tensor data at the next multiple of `general.alignment` (default 32).
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from compress.formats.tensor_source import FormatError

# Tensor types we dequantize (others fail with a clear message).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise FormatError(f"{self.path}: truncated GGUF header at byte {self.pos}") from e
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise FormatError(f"{self.path}: string of {n} bytes runs past the end of the file at byte {self.pos}")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _ARRAY:
            item, n = self.unpack("<I"), self.unpack("<Q")
            if item == _STRING:
                return [self.string() for _ in range(n)]
            if item in _NUMPY:
                size = np.dtype(_NUMPY[item]).itemsize * n
                if self.pos + size > len(self.buf):
                    raise FormatError(f"{self.path}: array of {n} items runs past the end of the file")
                arr = np.frombuffer(self.buf, _NUMPY[item], n, self.pos).tolist()
                self.pos += size
                return arr
            return [self.value(item) for _ in range(n)]
        raise FormatError(f"{self.path}: unknown metadata value type {kind} at byte {self.pos}")


class GGUFFile:
    """One .gguf file: `metadata` (dict) and lazily dequantized tensors."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        if not os.path.exists(path):
            raise FormatError(f"{path}: no such GGUF file")
        self._data = np.memmap(path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._data), path)
        if bytes(self._data[:4]) != b"GGUF":
            raise FormatError(f"{path}: not a GGUF file (bad magic {bytes(self._data[:4])!r})")
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise FormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            kind, offset = cur.unpack("<I"), cur.unpack("<Q")
            infos.append((name, dims, kind, offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        start = cur.pos + (-cur.pos % alignment)
        self._tensors: dict[str, tuple[tuple[int, ...], Any, int, int]] = {}
        for name, dims, kind, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError as e:
                raise FormatError(f"{path}: tensor {name!r} has unknown type id {kind}") from e
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            shape = tuple(int(d) for d in reversed(dims))  # NumPy order: outermost first
            if shape and shape[-1] % block:
                raise FormatError(f"{path}: tensor {name!r} row width {shape[-1]} is not a multiple of {qtype.name} blocks")
            nbytes = int(np.prod(shape, dtype=np.int64)) // block * block_bytes
            begin = start + offset
            if begin + nbytes > len(self._data):
                raise FormatError(f"{path}: tensor {name!r} runs past the end of the file (truncated download?)")
            self._tensors[name] = (shape, qtype, begin, nbytes)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name)[0]

    def type_name(self, name: str) -> str:
        return self._tensor(name)[1].name

    def _tensor(self, name: str):
        if name not in self._tensors:
            raise FormatError(f"{self.path}: no tensor named {name!r}")
        return self._tensors[name]

    def read(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, in NumPy (outermost-first) shape."""
        import gguf

        shape, qtype, begin, nbytes = self._tensor(name)
        if qtype.name not in SUPPORTED_TYPES:
            raise FormatError(
                f"{self.path}: tensor {name!r} uses quantization {qtype.name}, which press cannot dequantize; "
                f"supported: {', '.join(SUPPORTED_TYPES)}"
            )
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        raw = self._data[begin : begin + nbytes].reshape(rows, -1)
        try:
            values = gguf.quants.dequantize(raw, qtype)
        except Exception as e:  # noqa: BLE001 - name the tensor whatever broke
            raise FormatError(f"{self.path}: tensor {name!r} ({qtype.name}) cannot be dequantized: {e}") from e
        return np.asarray(values, np.float32).reshape(shape)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise FormatError(f"{self.path}: metadata key {key!r} is missing")
        return self.metadata[key]
