"""Evaluation batches: every item exactly once, in order; the last batch filled with dummy rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxpref.data import errors
from jaxpref.data.records import DataSummary, PreferenceItem
from jaxpref.data.tokenize import bucket_length, collate, options_for, tokenize_items


class EvalBatches:
  """Re-iterable batches over a fixed list of items (see `build_eval_batches`).

  Attributes:
    num_items: items evaluated.
    num_batches: global batches (the last may hold dummy rows).
    task_names: task of each task id.
    num_truncated: items with a response cut to `max_length`.
  """

  def __init__(
    self,
    tokenized,
    task_ids_i: np.ndarray,
    task_names: list[str],
    batch_size: int,
    num_responses: int,
    buckets: tuple[int, ...],
    padding_side: str,
    process_index: int,
    process_count: int,
  ):
    self._tok = tokenized
    self._task_ids_i = task_ids_i
    self._lengths_i = tokenized.item_lengths
    self.task_names = task_names
    self.batch_size = batch_size
    self.num_responses = num_responses
    self.buckets = buckets
    self.padding_side = padding_side
    self.process_index, self.process_count = process_index, process_count
    self.num_items = len(tokenized)
    self.num_batches = -(-self.num_items // batch_size)
    self.num_truncated = tokenized.num_truncated

  def __len__(self) -> int:
    return self.num_batches

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """This process's slice of global batch `index`."""
    lo = index * self.batch_size
    hi = min(lo + self.batch_size, self.num_items)
    length = bucket_length(max(int(self._lengths_i[lo:hi].max()), 1), self.buckets)
    per_proc = self.batch_size // self.process_count
    first = lo + self.process_index * per_proc
    items_b = np.arange(first, first + per_proc)
    valid_b = items_b < self.num_items
    rows = [
      (self._tok, int(i), int(self._task_ids_i[i])) if ok else None
      for i, ok in zip(items_b, valid_b)
    ]
    batch = collate(rows, self.num_responses, length, self.padding_side, self._tok.pad_id)
    batch["valid_b"] = valid_b
    batch["item_index"] = np.where(valid_b, items_b, -1).astype(np.int32)
    return batch

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for index in range(self.num_batches):
      yield self.batch(index)


def build_eval_batches(
  items: Sequence[PreferenceItem],
  tokenizer: Any,
  *,
  batch_size: int,
  max_length: int = 512,
  responses_per_item: int | None = None,
  task_names: Sequence[str] | None = None,
  buckets: Sequence[int] | None = None,
  truncation_side: str = "left",
  padding_side: str = "right",
  special_tokens: str = "auto",
  contract: Any = None,
  process_index: int = 0,
  process_count: int = 1,
  summary: DataSummary | None = None,
) -> EvalBatches:
  """Batches that cover every item exactly once, in order.

  The last global batch is filled with dummy rows: scores all -1, mask all zero,
  `valid_b` False and `item_index` -1, so they add no pairs and nothing is counted twice
  (the number of real rows of a batch is `valid_b.sum()`).

  Args:
    items: the items, of one or several tasks.
    tokenizer: Hugging Face tokenizer.
    batch_size: items per global batch (divisible by `process_count`).
    max_length: longest row in tokens.
    responses_per_item: N; default the largest number of responses of any item.
    task_names: task of each task id (to match the training run's ids); default the tasks in
      order of first appearance. An item whose task is not listed is an error.
    buckets, truncation_side, padding_side, special_tokens: see `TokenizeOptions`.
    contract: a `jaxpref.data.contract.InputContract`; when given it decides the length, sides
      and special tokens instead of `max_length` and the three arguments above.
    process_index, process_count: each process gets rows [p b, (p + 1) b) of every global batch,
      b = batch_size / process_count; the padded length is that of the whole global batch.
    summary: if given, its `truncated` count is increased.

  Returns:
    `EvalBatches` of dicts: the training keys (`input_ids`, `attention_mask`, `scores`,
    `task_ids`) plus `valid_b` bool [b] and `item_index` int32 [b] (position in `items`).
  """
  if batch_size < 1 or batch_size % process_count:
    raise errors.DataConfigError(
      f"eval batch_size={batch_size} must be a positive multiple of "
      f"the number of processes ({process_count})"
    )
  if not items:
    raise errors.DataConfigError("no items to evaluate")
  options = options_for(
    contract,
    max_length=max_length,
    truncation_side=truncation_side,
    padding_side=padding_side,
    special_tokens=special_tokens,
    buckets=buckets,
  )
  if task_names is None:
    task_names = list(dict.fromkeys(item.task for item in items))
  task_index = {name: t for t, name in enumerate(task_names)}
  unknown = next((item for item in items if item.task not in task_index), None)
  if unknown is not None:
    raise errors.DataConfigError(
      f"{unknown.where}: task {unknown.task!r} is not one of task_names {list(task_names)}"
    )
  task_ids_i = np.asarray([task_index[item.task] for item in items], np.int32)
  most = max(item.num_responses for item in items)
  if responses_per_item is None:
    responses_per_item = most
  elif most > responses_per_item:
    worst = next(item for item in items if item.num_responses == most)
    raise errors.DataConfigError(
      f"{worst.where} has {most} responses but responses_per_item={responses_per_item}"
    )
  tokenized = tokenize_items(items, tokenizer, options, summary=summary, task="eval")
  return EvalBatches(
    tokenized,
    task_ids_i,
    list(task_names),
    batch_size,
    responses_per_item,
    options.bucket_lengths,
    options.padding_side,
    process_index,
    process_count,
  )
