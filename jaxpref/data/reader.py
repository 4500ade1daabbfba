"""`read_preferences`: a local file of any supported format -> validated `PreferenceItem`s."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from absl import logging

from jaxpref.data import errors, formats, sources
from jaxpref.data.records import DataSummary, PreferenceItem

ON_ERROR = ("raise", "skip")
ON_TIE = ("raise", "skip", "keep")


def default_task_name(path: str | Path) -> str:
  """`helpful.json` -> `helpful`, `harmless-base-test.jsonl.gz` -> `harmless-base-test`."""
  name = Path(path).name
  for suffix in (".gz", ".jsonl", ".json"):
    name = name.removesuffix(suffix)
  return name


def read_preferences(
  path: str | Path,
  *,
  format: str = "auto",  # noqa: A002 - the natural name for the option.
  on_error: str = "raise",
  on_tie: str | None = None,
  task: str | None = None,
  template: str | None = None,
  tokenizer: Any = None,
  domains: Sequence[str] | None = None,
  domain_pairs: bool = True,
) -> tuple[list[PreferenceItem], DataSummary]:
  """Reads and validates a preference file (JSON list or JSON lines, optionally gzipped).

  Args:
    path: the file.
    format: `text_score`, `chosen_rejected`, `hh_rlhf`, `domain_specific`, or `auto` (decided
      from the keys of the first record that is a JSON object).
    on_error: `raise` a one-line `DataError` naming file and line/record at the first bad
      record, or `skip` bad records, counting them by reason in the summary.
    on_tie: what to do with items whose real responses all tie (no strict preference):
      `raise`, `skip` (count) or `keep` (they add nothing to a pairwise loss); None follows
      `on_error`.
    task: task name of the items; default the file name without suffixes (`helpful`), and `dsp`
      for the domain-specific format, whose tasks are `<task>_<domain>`.
    template: joins a `prompt` and a response, with fields `{prompt}` and `{response}`. Default
      `{prompt}{response}` (TRL) for `chosen_rejected`, and the authors'
      `## Human:\\n{prompt}\\n\\n## Assistant:\\n{response}` for `domain_specific`.
    tokenizer: renders chat-message records with its chat template.
    domains: domains that become tasks in the domain-specific format (default the four of DSP:
      academy, business, entertainment, literature).
    domain_pairs: domain-specific records as pairs (default, the authors' conversion) or as one
      item per domain with all responses.

  Returns:
    (items, summary); the summary is also logged.

  Raises:
    DataError: a bad record with `on_error="raise"`, a JSON list that does not parse, or a file
      whose format cannot be detected.
    DataConfigError: a bad option (template, chat records without a chat template).
  """
  return read_records(
    sources.iter_records(path),
    source=str(path),
    default_task=default_task_name(path),
    format=format,
    on_error=on_error,
    on_tie=on_tie,
    task=task,
    template=template,
    tokenizer=tokenizer,
    domains=domains,
    domain_pairs=domain_pairs,
  )


def read_records(
  records: Iterable[sources.RawRecord],
  *,
  source: str,
  default_task: str,
  format: str = "auto",  # noqa: A002
  on_error: str = "raise",
  on_tie: str | None = None,
  task: str | None = None,
  template: str | None = None,
  tokenizer: Any = None,
  domains: Sequence[str] | None = None,
  domain_pairs: bool = True,
) -> tuple[list[PreferenceItem], DataSummary]:
  """`read_preferences` for records from any source (a file, a TFDS split).

  A record's own string `task` key, when it has one, names its task unless `task` is given
  (not for the domain-specific format, whose tasks are per domain).
  """
  if format != "auto" and format not in formats.FORMATS:
    raise errors.DataConfigError(f"format={format!r}: choose auto or one of {formats.FORMATS}")
  if on_error not in ON_ERROR:
    raise errors.DataConfigError(f"on_error={on_error!r}: choose one of {ON_ERROR}")
  if on_tie is not None and on_tie not in ON_TIE:
    raise errors.DataConfigError(f"on_tie={on_tie!r}: choose one of {ON_TIE} or None")
  if template is not None:
    formats.check_template(template)
  records = list(records)
  summary = DataSummary(source=source)
  if format == "auto":
    format = next((f for r in records if (f := formats.detect_format(r.value)) is not None), None)
    if format is None:
      if not records:
        logging.warning("data %s: no records", source)
        return [], summary
      bad = [r for r in records if r.error is not None]
      if bad:
        # No record parsed at all: the first bad record says why better than "no format".
        if on_error == "raise":
          raise errors.DataError(
            bad[0].where,
            f"{bad[0].error} [{errors.INVALID_JSON}; on_error='skip' skips and counts such "
            "records]",
            errors.INVALID_JSON,
          )
        summary.read = len(records)
        summary.count_skip(errors.INVALID_JSON, len(bad))
        summary.log()
        return [], summary
      raise errors.DataError(
        source,
        "cannot detect the format: no record has the keys text/score, "
        "chosen/rejected or query/responses; pass format=",
        errors.MISSING_KEY,
      )
  per_record_task = task is None and format != "domain_specific"
  if task is None:
    task = "dsp" if format == "domain_specific" else default_task
  opts = formats.FormatOptions(
    task=task, template=template, tokenizer=tokenizer, domains=domains, domain_pairs=domain_pairs
  )
  items = []
  for item in _parse_records(
    records,
    formats.PARSERS[format],
    opts,
    summary,
    on_error,
    on_tie or on_error,
    source,
    per_record_task,
  ):
    items.append(item)
    summary.count_kept(item.task)
  summary.log()
  return items, summary


def _parse_records(
  records: Iterable[sources.RawRecord],
  parser,
  opts: formats.FormatOptions,
  summary: DataSummary,
  on_error: str,
  on_tie: str,
  source: str,
  per_record_task: bool,
):
  def handle(where: str, e: formats.RecordError) -> None:
    policy = on_tie if e.reason == errors.NO_PREFERENCE else on_error
    if policy == "raise":
      hint = "on_tie" if e.reason == errors.NO_PREFERENCE else "on_error"
      raise errors.DataError(
        where, f"{e.detail} [{e.reason}; {hint}='skip' skips and counts such records]", e.reason
      )
    summary.count_skip(e.reason)

  for rec in records:
    summary.read += 1
    if rec.error is not None:
      handle(rec.where, formats.RecordError(errors.INVALID_JSON, rec.error))
      continue
    try:
      candidates = parser(rec.value, opts)
    except formats.RecordError as e:
      handle(rec.where, e)
      continue
    for cand in candidates:
      try:
        texts, scores = formats.validate_candidate(cand, allow_ties=on_tie == "keep")
      except formats.RecordError as e:
        handle(f"{rec.where} ({cand.label})" if cand.label else rec.where, e)
        continue
      task = cand.task
      if per_record_task and isinstance(rec.value.get("task"), str) and rec.value["task"]:
        task = rec.value["task"]
      yield PreferenceItem(
        texts=texts, scores=scores, prompt=cand.prompt, task=task, source=source, index=rec.index
      )


def read_many(paths: Iterable[str | Path], **kwargs) -> tuple[list[PreferenceItem], DataSummary]:
  """Reads several files with the same options; returns all items and the merged summary."""
  items: list[PreferenceItem] = []
  summary = DataSummary()
  for path in paths:
    file_items, file_summary = read_preferences(path, **kwargs)
    items.extend(file_items)
    summary = summary.merge(file_summary)
  return items, summary
