"""The in-memory form of preference data: one `PreferenceItem` per compared set of responses."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import logging


@dataclasses.dataclass(frozen=True)
class PreferenceItem:
  """N >= 2 responses to one prompt, with a score each (higher preferred, equal = tie).

  Attributes:
    texts: the full texts the reward model reads (prompt and response together).
    scores: one per text; a score < 0 marks a padding response (no text needed, never compared).
    prompt: what the responses answer; used to keep one prompt on one side of a train/eval split.
    task: name of the task (dataset) the item belongs to, e.g. `helpful` or `dsp_academy`.
    source: where it was read from (a file path or `tfds:name/split`).
    index: 1-based line number for JSON-lines files, 0-based record index for JSON lists and TFDS.
  """

  texts: tuple[str, ...]
  scores: tuple[float, ...]
  prompt: str
  task: str
  source: str = ""
  index: int = -1

  @property
  def num_responses(self) -> int:
    return len(self.texts)

  @property
  def where(self) -> str:
    return f"{self.source}:{self.index}" if self.source else f"[record {self.index}]"


@dataclasses.dataclass
class DataSummary:
  """What reading (and later tokenising) a source did, so that nothing is lost silently.

  Attributes:
    source: the file (or files / TFDS split) read.
    read: records read (lines of a JSON-lines file, elements of a JSON list); a record that is
      not even valid JSON counts too.
    kept: items produced. Usually one per record; a domain-specific record yields one item per
      chosen domain and other response.
    skipped_by_reason: records (or derived items) dropped with `on_error="skip"`, by reason.
    kept_by_task: kept items per task.
    truncated: items with at least one response cut to `max_length` by tokenisation (filled in
      by `tokenize_items`).
  """

  source: str = ""
  read: int = 0
  kept: int = 0
  skipped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
  kept_by_task: dict[str, int] = dataclasses.field(default_factory=dict)
  truncated: int = 0

  @property
  def skipped(self) -> int:
    return sum(self.skipped_by_reason.values())

  def count_skip(self, reason: str, n: int = 1) -> None:
    self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + n

  def count_kept(self, task: str, n: int = 1) -> None:
    self.kept += n
    self.kept_by_task[task] = self.kept_by_task.get(task, 0) + n

  def merge(self, other: DataSummary) -> DataSummary:
    """Returns the sum of two summaries (e.g. of several files read for one run)."""
    out = DataSummary(
      source=", ".join(s for s in (self.source, other.source) if s),
      read=self.read + other.read,
      kept=self.kept + other.kept,
      truncated=self.truncated + other.truncated,
    )
    for part in (self, other):
      for reason, n in part.skipped_by_reason.items():
        out.count_skip(reason, n)
      for task, n in part.kept_by_task.items():
        out.kept_by_task[task] = out.kept_by_task.get(task, 0) + n
    return out

  def to_dict(self) -> dict[str, Any]:
    skipped_by_reason = dict(sorted(self.skipped_by_reason.items()))
    return {
      "source": self.source,
      "read": self.read,
      "kept": self.kept,
      "skipped": self.skipped,
      "skipped_by_reason": skipped_by_reason,
      "kept_by_task": dict(self.kept_by_task),
      "truncated": self.truncated,
    }

  def describe(self) -> str:
    """`read N records, kept K items, skipped S (reason=n, ...)`: for one-line messages."""
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped_by_reason.items()))
    text = f"read {self.read} records, kept {self.kept} items, skipped {self.skipped}"
    return f"{text} ({skipped})" if skipped else text

  def log(self) -> None:
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped_by_reason.items())) or "none"
    logging.info(
      "data %s: read %d records, kept %d items %s, skipped %d (%s), truncated %d",
      self.source,
      self.read,
      self.kept,
      dict(self.kept_by_task),
      self.skipped,
      skipped,
      self.truncated,
    )


def group_by_task(items: Iterable[PreferenceItem]) -> dict[str, list[PreferenceItem]]:
  """Groups items by task, tasks in order of first appearance."""
  groups: dict[str, list[PreferenceItem]] = collections.defaultdict(list)
  for item in items:
    groups[item.task].append(item)
  return dict(groups)


def as_task_lists(
  tasks: Mapping[str, Sequence[Any]] | Sequence[Sequence[Any]],
) -> tuple[list[str], list[Sequence[Any]]]:
  """Normalises `{name: items}` or `[items, ...]` to (task names, item lists) in order.

  For a plain list the name of task t is the `task` of the list (`TokenizedItems`) or of its
  first item, else `task{t}`.
  """
  if isinstance(tasks, Mapping):
    return [str(k) for k in tasks], [tasks[k] for k in tasks]
  names = []
  for t, items in enumerate(tasks):
    name = getattr(items, "task", None)
    if name is None and isinstance(items, Sequence) and items:
      name = getattr(items[0], "task", None)
    names.append(name or f"task{t}")
  if len(set(names)) != len(names):
    names = [f"{n}#{t}" for t, n in enumerate(names)]
  return names, list(tasks)
