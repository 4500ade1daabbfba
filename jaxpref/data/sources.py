"""Raw records from local files: a JSON list or JSON lines, either optionally gzipped."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxpref.data import errors

_GZIP_MAGIC = b"\x1f\x8b"
_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclasses.dataclass(frozen=True)
class RawRecord:
  """One record of a file, parsed as JSON, or the reason it could not be.

  Attributes:
    where: `path:line` (JSON lines) or `path[record N]` (JSON list), for error messages.
    index: the 1-based line number or the 0-based record index.
    value: the parsed JSON value (None when `error` is set).
    error: why the record is not valid JSON, or None.
  """

  where: str
  index: int
  value: Any = None
  error: str | None = None


def read_bytes(path: str | Path) -> bytes:
  """The file's content, gunzipped when it starts with the gzip magic number."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such preference data file")
  data = path.read_bytes()
  if data[:2] == _GZIP_MAGIC:
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise errors.DataError(str(path), f"cannot gunzip: {e}", errors.INVALID_JSON) from None
  return data


def iter_records(path: str | Path) -> Iterator[RawRecord]:
  """Yields the records of a JSON-list or JSON-lines file (gzipped or not).

  The layout is decided by the content, not the suffix: a file whose first non-blank character
  is `[` is one JSON list, anything else is JSON lines (blank lines are ignored). A bad line of a
  JSON-lines file is yielded with `error` set, so that the caller may skip it; a JSON list that
  does not parse raises `DataError` with its line and column, since nothing after the break can
  be located.
  """
  data = read_bytes(path)
  stripped = data.lstrip()
  if stripped[:1] == b"[":
    yield from _iter_json_list(str(path), data)
  else:
    yield from _iter_json_lines(str(path), data)


def _iter_json_lines(path: str, data: bytes) -> Iterator[RawRecord]:
  for line_no, raw in enumerate(data.split(b"\n"), start=1):
    if not raw.strip():
      continue
    where = f"{path}:{line_no}"
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      yield RawRecord(where, line_no, error=f"not UTF-8 text ({e.reason} at byte {e.start})")
      continue
    try:
      value = json.loads(text)
    except json.JSONDecodeError as e:
      yield RawRecord(where, line_no, error=f"invalid JSON: {e.msg} at column {e.colno}")
      continue
    yield RawRecord(where, line_no, value=value)


def _iter_json_list(path: str, data: bytes) -> Iterator[RawRecord]:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise errors.DataError(
      path, f"not UTF-8 text ({e.reason} at byte {e.start})", errors.INVALID_JSON
    ) from None
  decoder = json.JSONDecoder()

  def fail(pos: int, msg: str) -> errors.DataError:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return errors.DataError(f"{path}:{line}:{col}", f"invalid JSON: {msg}", errors.INVALID_JSON)

  pos = _WHITESPACE.match(text, 0).end() + 1  # Past the opening `[`.
  pos = _WHITESPACE.match(text, pos).end()
  if text[pos : pos + 1] == "]":
    pos = len(text) if not text[pos + 1 :].strip() else pos + 1
    if pos != len(text):
      raise fail(pos, "extra data after the closing ]")
    return
  index = 0
  while True:
    try:
      value, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise fail(e.pos, e.msg) from None
    yield RawRecord(f"{path}[record {index}]", index, value=value)
    index += 1
    pos = _WHITESPACE.match(text, end).end()
    sep = text[pos : pos + 1]
    if sep == ",":
      pos = _WHITESPACE.match(text, pos + 1).end()
    elif sep == "]":
      if text[pos + 1 :].strip():
        raise fail(pos + 1, "extra data after the closing ]")
      return
    else:
      raise fail(pos, "expected ',' or ']' after a record" if sep else "unterminated list")
