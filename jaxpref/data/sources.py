"""Raw records from local files: a JSON list or JSON lines, either optionally gzipped."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxpref.data import errors

_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
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
  """The file's content as UTF-8 bytes: gunzipped when it starts with the gzip magic number, a
  UTF-8 byte-order mark dropped.

  Raises:
    FileNotFoundError: no such file (or a directory).
    DataError: a truncated or corrupt gzip file, UTF-16 / UTF-32 text, or binary content; each
      a one-line message naming the file and what to do.
  """
  path = Path(path)
  if path.is_dir():
    raise FileNotFoundError(f"{path}: is a directory, not a preference data file")
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such preference data file")
  data = path.read_bytes()
  if data[:2] == _GZIP_MAGIC:
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
      raise errors.DataError(
        str(path), f"cannot gunzip (truncated or corrupt .gz file): {e}", errors.INVALID_JSON
      ) from None
  elif path.suffix == ".gz" and data:
    raise errors.DataError(
      str(path), "named .gz but not gzip-compressed (no gzip header)", errors.INVALID_JSON
    )
  return check_text_encoding(str(path), data)


def check_text_encoding(where: str, data: bytes) -> bytes:
  """`data` without a UTF-8 BOM; a one-line `DataError` for UTF-16/32 text or binary bytes.

  Line-level UTF-8 errors (a Latin-1 byte in one record) are left to the record reader, which
  reports them per line and can skip them; a file that cannot be text at all fails here.
  """
  if data.startswith(_UTF8_BOM):
    return data[len(_UTF8_BOM) :]
  head = data[:4096]
  # UTF-16 without a BOM: ASCII text has a zero byte in every other position.
  quarter = len(head) // 4
  utf16 = head.startswith(_UTF16_BOMS) or (
    len(head) >= 4 and (head[1::2].count(0) > quarter or head[0::2].count(0) > quarter)
  )
  if utf16:
    raise errors.DataError(
      where,
      "the file is UTF-16 (or UTF-32) text, not UTF-8: convert it, e.g. "
      "`iconv -f UTF-16 -t UTF-8 IN > OUT`",
      errors.INVALID_JSON,
    )
  if b"\x00" in head or _binary_fraction(head) > 0.1:
    raise errors.DataError(
      where,
      "binary content, not JSON text (a wrong file, or compressed without a .gz header?)",
      errors.INVALID_JSON,
    )
  return data


def _binary_fraction(head: bytes) -> float:
  """The fraction of control bytes other than tab/newline/CR in `head` (0 for text)."""
  if not head:
    return 0.0
  control = sum(1 for b in head if b < 32 and b not in (9, 10, 13))
  return control / len(head)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  """A JSON object hook: duplicate keys are an error, not silently last-wins."""
  out: dict[str, Any] = {}
  for key, value in pairs:
    if key in out:
      raise DuplicateKeyError(key)
    out[key] = value
  return out


class DuplicateKeyError(ValueError):
  def __init__(self, key: str):
    self.key = key
    super().__init__(f"duplicate key {key!r} in one JSON object (which value is meant?)")


def loads(text: str) -> Any:
  """`json.loads` that refuses duplicate keys in an object (raises `DuplicateKeyError`)."""
  return json.loads(text, object_pairs_hook=_reject_duplicate_keys)


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


def _not_utf8(e: UnicodeDecodeError) -> str:
  return (
    f"not UTF-8 text ({e.reason} at byte {e.start}; Latin-1 or cp1252? convert with "
    "`iconv -f latin1 -t UTF-8`)"
  )


def _iter_json_lines(path: str, data: bytes) -> Iterator[RawRecord]:
  for line_no, raw in enumerate(data.split(b"\n"), start=1):
    if not raw.strip():
      continue
    where = f"{path}:{line_no}"
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      yield RawRecord(where, line_no, error=_not_utf8(e))
      continue
    try:
      value = loads(text)
    except json.JSONDecodeError as e:
      yield RawRecord(where, line_no, error=f"invalid JSON: {e.msg} at column {e.colno}")
      continue
    except DuplicateKeyError as e:
      yield RawRecord(where, line_no, error=str(e))
      continue
    yield RawRecord(where, line_no, value=value)


def _iter_json_list(path: str, data: bytes) -> Iterator[RawRecord]:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise errors.DataError(path, _not_utf8(e), errors.INVALID_JSON) from None
  decoder = json.JSONDecoder(object_pairs_hook=_reject_duplicate_keys)

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
    where = f"{path}[record {index}]"
    try:
      value, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise fail(e.pos, e.msg) from None
    except DuplicateKeyError as e:
      # The record's extent is unknown without a second parse that keeps duplicates.
      _, end = json.JSONDecoder().raw_decode(text, pos)
      yield RawRecord(where, index, error=str(e))
    else:
      yield RawRecord(where, index, value=value)
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
