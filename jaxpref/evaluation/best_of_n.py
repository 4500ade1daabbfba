"""Scoring records for `python -m jaxpref.score`: reading JSON records, their texts (plain,
lists, prompt + responses for best-of-n), rewards through the shared `Scorer`, the best index.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from absl import logging

from jaxpref.data.errors import DataError
from jaxpref.evaluation import reward_stats

TEMPERATURE_FILE = "temperature.json"


def read_temperature(model_dir: str | Path) -> float:
  path = Path(model_dir) / TEMPERATURE_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"{path} not found: run `python -m jaxpref.eval ... "
      "--fit_temperature` first, or drop --apply_temperature"
    )
  return float(json.loads(path.read_text())["temperature"])


def record_texts(record: Any, where: str, template: str) -> tuple[str, list[str]]:
  """`(kind, texts)` of one input record; kind is `single`, `list` or `best_of_n`."""
  if not isinstance(record, dict):
    raise DataError(where, f"expected a JSON object, got {type(record).__name__}")
  if "text" in record:
    text = record["text"]
    if isinstance(text, str):
      texts, kind = [text], "single"
    elif isinstance(text, list) and not text:
      raise DataError(where, "'text' is an empty list: nothing to score")
    elif isinstance(text, list) and all(isinstance(t, str) for t in text):
      texts, kind = text, "list"
    else:
      raise DataError(where, "'text' must be a string or a list of strings")
  elif "prompt" in record and "responses" in record:
    prompt, responses = record["prompt"], record["responses"]
    if (
      not isinstance(prompt, str)
      or not isinstance(responses, list)
      or not responses
      or not all(isinstance(r, str) for r in responses)
    ):
      raise DataError(
        where, "'prompt' must be a string and 'responses' a non-empty list of strings"
      )
    texts = [template.format(prompt=prompt, response=r) for r in responses]
    kind = "best_of_n"
  else:
    raise DataError(where, "a record needs 'text' (string or list) or 'prompt' + 'responses'")
  if any(not t for t in texts):
    raise DataError(where, "empty text")
  return kind, texts


def read_records(path: str, on_error: str) -> tuple[list[tuple[int, dict]], Counter]:
  """Parsed records with their line numbers; skipped records counted by reason.

  The same reader as training and evaluation (`jaxpref.data.sources`): gzip, encodings, a BOM,
  duplicate keys and bad lines give the same one-line errors, and `on_error="skip"` counts them.
  """
  from jaxpref.data import sources

  records, skipped = [], Counter()
  for rec in sources.iter_records(path):
    if rec.error is not None:
      if on_error == "raise":
        raise DataError(
          rec.where, f"{rec.error} [invalid_json; --on_error=skip skips and counts such records]"
        )
      skipped["invalid_json"] += 1
      logging.warning("skipping %s: %s", rec.where, rec.error)
      continue
    records.append((rec.index, rec.value))
  if not records and not skipped:
    raise DataError(path, "no records to score (an empty file)", "config")
  return records, skipped


def score_records(
  scorer,
  tokenizer,
  records,
  *,
  template: str,
  on_error: str,
  source: str,
  contract=None,
  max_length: int | None = None,
  temperature: float = 1.0,
  stats: dict[str, Any] | None = None,
  progress: bool = False,
  counts: Counter | None = None,
) -> tuple[list[dict], Counter]:
  """Adds rewards to each record (see module docstring); returns the output records and skips.

  Args:
    contract: the model's `InputContract` (`models.source.load_tokenizer_and_contract`); without
      it, what transformers does with `tokenizer` and `max_length` (default: the tokenizer's).

    stats: `jaxpref.evaluation.reward_stats` to standardise the rewards: (reward - mean) / std.
    counts: if given, gets `truncated` (texts cut) and `identical_after_truncation` (best-of-n
      records with distinct responses that tie once cut) added.

  Returns:
    The output records and a Counter of skipped records by reason.
  """
  from jaxpref.data import contract as input_contract
  from jaxpref.data.tokenize import encode_texts

  if contract is None:
    contract = input_contract.for_checkpoint(tokenizer, scorer.cfg)
    if max_length:
      contract = contract.replace(max_length=max_length)
  skipped: Counter = Counter()
  parsed = []
  for line_no, record in records:
    try:
      parsed.append((record, *record_texts(record, f"{source}:{line_no}", template)))
    except DataError as e:
      if on_error == "raise":
        raise
      skipped["bad_record"] += 1
      logging.warning("skipping %s", e)
  flat_texts = [t for _, _, texts in parsed for t in texts]
  if not flat_texts:
    return [], skipped
  encoded, cut = encode_texts(flat_texts, tokenizer, contract.tokenize_options())
  group_sizes = [len(texts) for _, _, texts in parsed]
  rewards = (
    scorer.score_token_ids(encoded, group_sizes=group_sizes, progress=progress) / temperature
  )
  counts = Counter() if counts is None else counts
  counts["truncated"] += int(cut.sum())
  if stats is not None:
    rewards = reward_stats.normalize(rewards, stats)
  outputs, offset = [], 0
  for record, kind, texts in parsed:
    values = [float(r) for r in rewards[offset : offset + len(texts)]]
    rows = {encoded[i].tobytes() for i in range(offset, offset + len(texts))}
    if kind == "best_of_n" and len(rows) < len(set(texts)):
      counts["identical_after_truncation"] += 1
    offset += len(texts)
    out = dict(record)
    if kind == "single":
      out["reward"] = values[0]
    else:
      out["rewards"] = values
      if kind == "best_of_n":
        out["best_index"] = int(max(range(len(values)), key=values.__getitem__))
    outputs.append(out)
  return outputs, skipped
