"""absl flags that every data-reading command shares (`--on_error`, `--on_tie`)."""

from __future__ import annotations

from typing import Any

from absl import flags

from jaxpref.data.reader import ON_ERROR, ON_TIE


def define_on_error_flags() -> None:
  """Defines `--on_error` (raise|skip) and `--on_tie` (raise|skip|keep, default: as on_error)."""
  flags.DEFINE_enum(
    "on_error",
    "raise",
    list(ON_ERROR),
    "Bad data records: 'raise' stops at the first with a one-line error naming "
    "file and line; 'skip' drops them and reports counts by reason.",
  )
  flags.DEFINE_enum(
    "on_tie",
    None,
    list(ON_TIE),
    "Items whose responses all tie (no preference): raise, skip (counted) or "
    "keep; default: as --on_error.",
  )


def read_kwargs_from_flags(flag_values: Any = flags.FLAGS) -> dict[str, str | None]:
  """`{"on_error": ..., "on_tie": ...}` for `read_preferences` from the parsed flags."""
  return {"on_error": flag_values.on_error, "on_tie": flag_values.on_tie}
