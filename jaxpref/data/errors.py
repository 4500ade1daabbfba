"""Errors raised for bad preference data, each a single line naming where the problem is."""

from __future__ import annotations

# Reasons a record can be rejected; the keys of `DataSummary.skipped_by_reason`.
INVALID_JSON = "invalid_json"
WRONG_TYPE = "wrong_type"
MISSING_KEY = "missing_key"
LENGTH_MISMATCH = "length_mismatch"
NON_FINITE_SCORE = "non_finite_score"
TOO_FEW_RESPONSES = "too_few_responses"
EMPTY_TEXT = "empty_text"
NO_PREFERENCE = "no_preference"  # All real responses tie.
DUPLICATE_TEXT = "duplicate_text"  # The same text scored differently: a contradiction.
REASONS = (
  INVALID_JSON,
  WRONG_TYPE,
  MISSING_KEY,
  LENGTH_MISMATCH,
  NON_FINITE_SCORE,
  TOO_FEW_RESPONSES,
  EMPTY_TEXT,
  NO_PREFERENCE,
  DUPLICATE_TEXT,
)


def one_line(text: str, limit: int = 200) -> str:
  """Collapses whitespace so a message stays on one line, and shortens it to `limit` chars."""
  flat = " ".join(str(text).split())
  return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class DataError(ValueError):
  """Bad preference data: the message is one line, `where: what is wrong`.

  Attributes:
    where: `path:line` for JSON-lines files, `path[record N]` for JSON lists and TFDS splits.
    reason: one of `REASONS` (or `config` for a bad data option).
    detail: what is wrong, without the location.
  """

  def __init__(self, where: str, detail: str, reason: str = WRONG_TYPE):
    self.where = where
    self.reason = reason
    self.detail = one_line(detail, limit=300)
    super().__init__(f"{where}: {self.detail}" if where else self.detail)


class DataConfigError(DataError):
  """A data option that cannot work with the data given (a batch size that does not divide...).

  A subclass of `DataError` so that command-line tools print it as one line too.
  """

  def __init__(self, detail: str):
    super().__init__("", detail, reason="config")
