"""Reading tensors, or slices of them, from a checkpoint's safetensors files.

The format is an 8-byte header length, a JSON header (dtype, shape, byte offsets of every tensor)
and the raw little-endian data. Reading it directly (rather than through `safetensors`' numpy
binding, which cannot represent bfloat16, the dtype most checkpoints are stored in) lets a
process read only the rows and columns its devices hold: `read(key, rows, cols)` issues one
`pread` per contiguous run of bytes and counts the bytes it read (`bytes_read`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxpref.models.convert import CheckpointError

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
  """One safetensors file: its header, and reads of whole tensors or 2-d slices."""

  def __init__(self, path: Path):
    self.path = path
    try:
      with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
    header.pop("__metadata__", None)
    self.header: dict[str, dict[str, Any]] = header
    self.data_start = 8 + length
    self._fd: int | None = None

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def dtype(self, key: str) -> np.dtype:
    name = self.header[key]["dtype"]
    if name not in DTYPES:
      raise CheckpointError(f"{self.path.name}: tensor {key} has unsupported dtype {name}")
    return np.dtype(DTYPES[name])

  def _pread(self, size: int, offset: int) -> bytes:
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    data = os.pread(self._fd, size, offset)
    if len(data) != size:
      raise CheckpointError(f"{self.path}: truncated file (tensor data ends early)")
    return data

  def read(self, key: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
    """The tensor, or rows [and columns] of it (a 1-d tensor takes `rows` only)."""
    shape, dtype = self.shape(key), self.dtype(key)
    begin = self.data_start + self.header[key]["data_offsets"][0]
    if rows is None and cols is None or not shape:
      count = int(np.prod(shape))
      return np.frombuffer(self._pread(count * dtype.itemsize, begin), dtype).reshape(shape)
    r0, r1, _ = (rows or slice(None)).indices(shape[0])
    if len(shape) == 1:
      data = self._pread((r1 - r0) * dtype.itemsize, begin + r0 * dtype.itemsize)
      return np.frombuffer(data, dtype)
    width = int(np.prod(shape[1:]))
    if len(shape) > 2 or cols is None or cols.indices(shape[1])[:2] == (0, shape[1]):
      data = self._pread((r1 - r0) * width * dtype.itemsize, begin + r0 * width * dtype.itemsize)
      return np.frombuffer(data, dtype).reshape((r1 - r0, *shape[1:]))
    c0, c1, _ = cols.indices(shape[1])
    out = np.empty((r1 - r0, c1 - c0), dtype)
    for i, row in enumerate(range(r0, r1)):
      offset = begin + (row * width + c0) * dtype.itemsize
      out[i] = np.frombuffer(self._pread((c1 - c0) * dtype.itemsize, offset), dtype)
    return out

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


class SafetensorsStore(Mapping):
  """Lazily read tensors of one or several safetensors files.

  Remembers which tensors were read (`read`) and how many bytes (`bytes_read`).
  """

  def __init__(self, files_by_key: dict[str, Path]):
    self._files_by_key = files_by_key
    self._files: dict[Path, SafetensorsFile] = {}
    self.read: set[str] = set()
    self.bytes_read = 0

  def file_of(self, key: str) -> Path:
    return self._files_by_key[key]

  def _file(self, key: str) -> SafetensorsFile:
    path = self._files_by_key[key]
    if path not in self._files:
      self._files[path] = SafetensorsFile(path)
    return self._files[path]

  def shape(self, key: str) -> tuple[int, ...]:
    return self._file(key).shape(key)

  def read_slice(self, key: str, rows: slice | None, cols: slice | None = None) -> np.ndarray:
    value = self._file(key).read(key, rows, cols)
    self.read.add(key)
    self.bytes_read += value.nbytes
    return value

  def __getitem__(self, key: str) -> np.ndarray:
    return self.read_slice(key, None, None)

  def __contains__(self, key: object) -> bool:
    # Mapping's default would read the tensor to answer.
    return key in self._files_by_key

  def __iter__(self) -> Iterator[str]:
    return iter(self._files_by_key)

  def __len__(self) -> int:
    return len(self._files_by_key)


def open_weights(directory: Path) -> SafetensorsStore:
  """The tensors of a checkpoint directory (model.safetensors, an index, or *.safetensors)."""
  index = directory / "model.safetensors.index.json"
  single = directory / "model.safetensors"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
    for shard in sorted(set(weight_map.values())):
      if not (directory / shard).is_file():
        raise CheckpointError(f"{index} lists shard {shard}, which is missing from {directory}")
    return SafetensorsStore({k: directory / v for k, v in weight_map.items()})
  files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
  if not files:
    others = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".h5")]
    hint = (
      (
        f"; found {others[0]}: jaxpref reads only safetensors (re-save it with transformers' "
        "save_pretrained, which writes safetensors)"
      )
      if others
      else ""
    )
    raise CheckpointError(
      f"no model.safetensors or model.safetensors.index.json in {directory}{hint}"
    )
  files_by_key: dict[str, Path] = {}
  for path in files:
    files_by_key |= dict.fromkeys(SafetensorsFile(path).keys(), path)
  return SafetensorsStore(files_by_key)
