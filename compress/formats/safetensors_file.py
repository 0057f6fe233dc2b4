"""Memory-mapped safetensors reading, single files and sharded `*.index.json` sets.

The format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and byte range, then the raw data. We parse it
ourselves so that bfloat16 works with NumPy (through ml_dtypes), nothing is read
until asked for, and a malformed file is reported with its path and tensor name.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from compress.formats.tensor_source import FormatError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """One .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise FormatError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > size - 8 or header_len > 100_000_000:
                    raise FormatError(f"{path}: header length {header_len} does not fit a file of {size} bytes")
                header = json.loads(f.read(header_len))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: cannot read safetensors header: {e}") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        self._data_len = size - self._data_start
        for name, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise FormatError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            count = int(np.prod(entry["shape"], dtype=np.int64))
            if end > self._data_len or end - begin != count * np.dtype(DTYPES[entry["dtype"]]).itemsize:
                raise FormatError(
                    f"{path}: tensor {name!r} byte range {begin}..{end} does not match shape {entry['shape']} "
                    f"{entry['dtype']} within {self._data_len} data bytes (truncated or corrupted file?)"
                )
        self._mmap = None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self._entries[name]["dtype"]])

    def raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype, memory-mapped (no copy)."""
        if name not in self._entries:
            raise FormatError(f"{self.path}: no tensor named {name!r}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        buf = self._mmap[self._data_start + begin : self._data_start + end]
        return buf.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def read(self, name: str) -> np.ndarray:
        arr = self.raw(name)
        return arr.astype(np.float32) if np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16 else np.asarray(arr)


class SafetensorsSet:
    """All tensors of a model directory: `model.safetensors` or a sharded index."""

    def __init__(self, directory: str):
        self.path = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise FormatError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}") from e
            files = {}
            for fname in sorted(set(weight_map.values())):
                fpath = os.path.join(directory, fname)
                if not os.path.exists(fpath):
                    raise FormatError(f"{index}: names shard {fname!r}, which is missing from {directory}")
                files[fname] = SafetensorsFile(fpath)
            self._where = {}
            for name, fname in weight_map.items():
                if name not in files[fname]._entries:
                    raise FormatError(f"{index}: says tensor {name!r} is in {fname}, but that file lacks it")
                self._where[name] = files[fname]
        elif os.path.exists(single):
            f = SafetensorsFile(single)
            self._where = {name: f for name in f.names()}
        else:
            raise FormatError(f"{directory}: no model.safetensors or model.safetensors.index.json found")

    def names(self) -> list[str]:
        return list(self._where)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise FormatError(f"{self.path}: no tensor named {name!r}")
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def read(self, name: str) -> np.ndarray:
        return self._file(name).read(name)


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to `path` atomically (written beside, then renamed into place)."""
    names = {np.dtype(v): k for k, v in DTYPES.items()}
    header: dict = {}
    arrays = []
    offset = 0
    for name, value in tensors.items():
        arr = np.ascontiguousarray(value)
        if arr.dtype not in names:
            raise FormatError(f"{path}: cannot store tensor {name!r} of dtype {arr.dtype} in safetensors")
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)
