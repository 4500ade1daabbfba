"""The multi-task training pipeline on grain: step -> batch, checkpointable, sharded by process.

`grain.MapDataset.range(num_steps).map(batch_for_step)` makes each element a whole per-process
batch, so the iterator's state is one number, the next step; grain's threads prefetch batches.

Assembling global arrays (multi-process): every process yields only its slice of the global
batch, `global_batch_size / process_count` rows, process p holding global rows
[p * b, (p + 1) * b). With a mesh that gives each process's devices one contiguous block of
the batch axis, in process order, build each global array with
`jax.make_array_from_process_local_data(NamedSharding(mesh, P(batch_axes)), local_array)`.
All processes pad to the same length: the bucket is computed from the whole global batch,
which every process derives cheaply from the shared seed. With packing, every process packs its
items into the same number of rows, computed the same way for every process from the plan, so
no step needs a collective; process p's rows are global rows [p * R, (p + 1) * R).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from jaxpref.data import errors, packing
from jaxpref.data.batch import PaddedBatch, TrainBatch
from jaxpref.data.mixing import MixingPlan
from jaxpref.data.records import PreferenceItem, as_task_lists
from jaxpref.data.tokenize import (
  TokenizedItems,
  bucket_length,
  collate,
  options_for,
  tokenize_items,
)


@dataclasses.dataclass(frozen=True)
class StepBatcher:
  """Computes the batch of one step for one process (what the grain map runs)."""

  tasks: tuple[TokenizedItems, ...]
  plan: MixingPlan
  num_responses: int
  buckets: tuple[int, ...]
  padding_side: str
  process_index: int
  process_count: int = 1
  pack_row_length: int = 0  # 0: padded batches; else pack into rows of this many tokens
  pack_row_multiple: int = 1  # each process's row count is a multiple of this
  share_prompts: bool = False  # packed: each item's common prefix once (jaxpref.data.packing)

  def global_length(self, step: int) -> int:
    """The bucketed length of the whole global batch: the same on every process."""
    task_ids, item_ids = self.plan.rows(step)
    longest = max(
      int(tok.item_lengths[item_ids[task_ids == t]].max(initial=1))
      for t, tok in enumerate(self.tasks)
    )
    return bucket_length(longest, self.buckets)

  def _groups(self, step: int, process_index: int) -> list[list[np.ndarray]]:
    """The token arrays of the responses of a process's items of a step, by item."""
    task_ids, item_ids = self.plan.rows(step, process_index)
    groups = []
    for t, i in zip(task_ids, item_ids):
      tok = self.tasks[t]
      responses = range(tok.item_starts[i], tok.item_starts[i + 1])
      groups.append(
        [tok.token_ids[tok.starts_r[r] : tok.starts_r[r] + tok.lengths_r[r]] for r in responses]
      )
    return groups

  def _rows_needed(self, step: int) -> int:
    return max(
      packing.rows_needed(
        self._groups(step, p), self.pack_row_length, share_prompts=self.share_prompts
      )
      for p in range(self.process_count)
    )

  @functools.cached_property
  def row_buckets(self) -> tuple[int, ...]:
    """The packed row counts a run uses: the median, 90th percentile and largest need of the
    first 32 steps (multiples of `pack_row_multiple`), so a run compiles about three step
    shapes, not one per step, for a few rows of padding."""
    needs = [self._rows_needed(step) for step in range(32)]
    m = self.pack_row_multiple
    return tuple(
      sorted({-(-int(np.quantile(needs, q, method="higher")) // m) * m for q in (0.5, 0.9, 1.0)})
    )

  def packed_rows(self, step: int) -> int:
    """Rows per process of a packed step: the smallest of `row_buckets` that holds what every
    process needs (rarely more: then a multiple of a quarter of the largest bucket). Every
    process computes the same number from the shared plan."""
    needed = self._rows_needed(step)
    for rows in self.row_buckets:
      if needed <= rows:
        return rows
    multiple = max(
      self.pack_row_multiple,
      self.row_buckets[-1] // 4 // self.pack_row_multiple * self.pack_row_multiple,
    )
    return -(-needed // multiple) * multiple

  def __call__(self, step: int) -> TrainBatch:
    step = int(step)
    task_ids, item_ids = self.plan.rows(step, self.process_index)
    rows = [(self.tasks[t], int(i), int(t)) for t, i in zip(task_ids, item_ids)]
    batch = PaddedBatch.from_dict(
      collate(rows, self.num_responses, self.global_length(step), self.padding_side)
    )
    if not self.pack_row_length:
      return batch
    num_rows = self.packed_rows(step)
    return packing.pack_batch(
      batch,
      row_length=self.pack_row_length,
      share_prompts=self.share_prompts,
      num_rows=num_rows,
      row_offset=self.process_index * num_rows,
    )


class PreferenceBatchIterator(grain.DatasetIterator):
  """Iterator of per-process numpy batch dicts with exact save/restore.

  `get_state()` is a small JSON-serialisable dict: the next step, a fingerprint of the pipeline's
  options and a content hash per task (token ids, lengths and scores). Neither depends on the
  process, so the state process 0 saves restores on every process; the position is the restored
  train state's step (`set_state(state, step=...)`), not one process's iterator. `set_state`
  refuses a state of other options or other data, naming the task, unless `force`. It is a
  `grain.DatasetIterator`, so `grain.checkpoint.CheckpointSave(iterator)` saves it with Orbax.

  Attributes:
    dataset: the `grain.MapDataset` of batches (`dataset[step]` gives any step's batch).
    task_names: task of each task id.
    num_steps: batches in the whole run.
    steps_per_epoch: steps per epoch (see `MixingPlan`).
    truncated_by_task: items cut to `max_length`, per task.
    task_hashes: content hash of each task's tokenised training items.
  """

  def __init__(
    self,
    dataset: grain.MapDataset,
    batcher: StepBatcher,
    task_names: list[str],
    read_options: grain.ReadOptions,
    fingerprint: str,
    accepted_fingerprints: Sequence[str] = (),
  ):
    self._inner = dataset.to_iter_dataset(read_options).__iter__()
    super().__init__(self._inner)
    self.dataset = dataset
    self.batcher = batcher
    self.task_names = task_names
    self.num_steps = len(dataset)
    self.steps_per_epoch = batcher.plan.steps_per_epoch
    self.truncated_by_task = {n: t.num_truncated for n, t in zip(task_names, batcher.tasks)}
    self.task_hashes = {n: content_hash(t) for n, t in zip(task_names, batcher.tasks)}
    self._fingerprint = fingerprint
    self._accepted = {fingerprint, *accepted_fingerprints}

  def __next__(self) -> TrainBatch:
    return next(self._inner)

  def get_state(self) -> dict[str, Any]:
    return {
      **self._inner.get_state(),
      "fingerprint": self._fingerprint,
      "task_hashes": self.task_hashes,
    }

  def set_state(
    self, state: dict[str, Any], *, step: int | None = None, force: bool = False
  ) -> None:
    """Restores a `get_state()`; `step` (the train state's) sets the position when given.

    Raises:
      errors.DataConfigError: the state is of other options or another task's content (and not
        `force`). A state saved before task hashes existed is accepted with a warning.
    """
    state = dict(state)
    fingerprint = state.pop("fingerprint", None)
    saved_hashes = state.pop("task_hashes", None)
    if saved_hashes is None:
      logging.warning(
        "The saved data-iterator state predates data identity checks; resuming unchecked."
      )
    elif not force:
      for task, saved in saved_hashes.items():
        if task in self.task_hashes and self.task_hashes[task] != saved:
          raise errors.DataConfigError(
            f"the training data of task {task!r} differs from the checkpoint's (content hash "
            f"{self.task_hashes[task]} != {saved}); resume with the same data and tokenizer"
          )
      if fingerprint not in self._accepted:
        raise errors.DataConfigError(
          "the saved data-iterator state belongs to a pipeline with other data or options "
          f"(tasks {sorted(saved_hashes)} vs {sorted(self.task_hashes)}, fingerprint "
          f"{fingerprint} != {self._fingerprint}); restore with the same tasks, batch size, "
          "seed and mixing"
        )
    if step is not None:
      if "next_index" in state and int(state["next_index"]) != step:
        logging.warning(
          "Data iterator saved at %s, train state at step %d: following the train state.",
          state["next_index"],
          step,
        )
      state["next_index"] = int(step)
    self._inner.set_state(state)


def content_hash(tok: TokenizedItems) -> str:
  """A hash of what a task trains on: every response's token ids, length and score, in order."""
  h = hashlib.sha256(tok.task.encode())
  for array in (tok.token_ids, tok.starts_r, tok.lengths_r, tok.scores_r, tok.item_starts):
    h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()[:16]


def _fingerprint(tasks: Sequence[TokenizedItems], config: dict[str, Any]) -> str:
  h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
  for tok in tasks:
    h.update(tok.task.encode())
    h.update(tok.item_lengths.tobytes())
    h.update(tok.scores_r.tobytes())
  return h.hexdigest()[:16]


def build_train_pipeline(
  tasks: Mapping[str, Sequence[PreferenceItem] | TokenizedItems]
  | Sequence[Sequence[PreferenceItem] | TokenizedItems],
  tokenizer: Any,
  *,
  global_batch_size: int,
  max_length: int = 512,
  mixing: str = "resample",
  resampling_size: int | None = None,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: float | None = None,
  num_steps: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  responses_per_item: int = 2,
  buckets: Sequence[int] | None = None,
  truncation_side: str = "left",
  padding_side: str = "right",
  special_tokens: str = "auto",
  contract: Any = None,
  num_threads: int = 2,
  prefetch: int = 4,
  packing_row_length: int = 0,
  packing_row_multiple: int = 1,
  share_prompts: bool = False,
) -> PreferenceBatchIterator:
  """Builds the multi-task training iterator.

  Args:
    tasks: `{task name: items}` or a list of item lists (task id = position); items are
      `PreferenceItem`s (tokenised here) or `TokenizedItems` (already tokenised).
    tokenizer: Hugging Face tokenizer (`load_tokenizer`); may be None if every task is
      tokenised already.
    global_batch_size: items per step over all processes; with `resample` divisible by
      (number of tasks) x `process_count`.
    max_length: longest row in tokens (special tokens included).
    mixing: `resample` (the paper's: equal items of every task in every batch) or
      `proportional` (all tasks pooled and shuffled).
    resampling_size: items per task per epoch with `resample`; default the largest task.
    seed: seed of the mixing and shuffling.
    shuffle: shuffle items (False: file order, for debugging).
    num_epochs: run length in epochs (rounded up to whole steps); default 1 if `num_steps` is
      not given.
    num_steps: run length in steps (exclusive with `num_epochs`).
    process_index, process_count: this process and how many share a global batch.
    responses_per_item: N, the response axis; items with fewer responses are padded with
      score -1 and an all-zero mask; an item with more is an error.
    buckets: allowed padded lengths, ending at `max_length`; default powers of two from 32.
    truncation_side, padding_side, special_tokens: see `TokenizeOptions`.
    contract: a `jaxpref.data.contract.InputContract`; when given it decides the length, sides
      and special tokens instead of the four arguments above.
    num_threads, prefetch: grain threads and batches prefetched.
    packing_row_length: 0 for padded batches; else pack every batch into rows of this many
      tokens (`jaxpref.data.packing`).
    packing_row_multiple: each process's packed row count is a multiple of this (the devices
      of the batch axes each process feeds).
    share_prompts: with packing, each item's responses share one copy of their common prefix
      (same rewards and gradients, fewer positions; `jaxpref.data.packing`).

  Returns:
    `PreferenceBatchIterator` yielding `PaddedBatch`es (input_ids / attention_mask int32
    [b, N, L], scores float32 [b, N], task_ids int32 [b], where b = global_batch_size /
    process_count and L is a bucket), or `PackedBatch`es with packing.
  """
  if num_epochs is not None and num_steps is not None:
    raise errors.DataConfigError("give num_epochs or num_steps, not both")
  if not 0 <= process_index < process_count:
    raise errors.DataConfigError(f"process_index={process_index} must be in [0, {process_count})")
  if global_batch_size < 1:
    raise errors.DataConfigError(f"global_batch_size={global_batch_size} must be >= 1")
  options = options_for(
    contract,
    max_length=max_length,
    truncation_side=truncation_side,
    padding_side=padding_side,
    special_tokens=special_tokens,
    buckets=buckets,
  )
  max_length, padding_side = options.max_length, options.padding_side
  names, lists = as_task_lists(tasks)
  tokenized = []
  for name, items in zip(names, lists):
    if isinstance(items, TokenizedItems):
      tok = items
    else:
      if tokenizer is None:
        raise errors.DataConfigError(f"task {name!r} is not tokenised and no tokenizer is given")
      tok = tokenize_items(items, tokenizer, options, task=name)
    if not len(tok):
      raise errors.DataConfigError(f"task {name!r} has no items")
    most = int(tok.responses_per_item.max())
    if most > responses_per_item:
      i = int(np.argmax(tok.responses_per_item))
      where = f"item {i}" if isinstance(items, TokenizedItems) else items[i].where
      raise errors.DataConfigError(
        f"task {name!r} ({where}) has {most} responses but responses_per_item={responses_per_item}"
        " (data.responses_per_item in a training config; 0 = the largest)"
      )
    if int(tok.item_lengths.max()) > max_length:
      raise errors.DataConfigError(
        f"task {name!r} was tokenised for a longer max_length than {max_length}"
      )
    tokenized.append(tok)
  plan = MixingPlan(
    [len(t) for t in tokenized],
    global_batch_size,
    mixing=mixing,
    resampling_size=resampling_size,
    seed=seed,
    shuffle=shuffle,
    process_count=process_count,
  )
  if num_steps is None:
    num_steps = plan.steps_for_epochs(1.0 if num_epochs is None else num_epochs)
  if num_steps < 1:
    raise errors.DataConfigError(f"the run has {num_steps} steps; need at least 1")
  batcher = StepBatcher(
    tasks=tuple(tokenized),
    plan=plan,
    num_responses=responses_per_item,
    buckets=options.bucket_lengths,
    padding_side=padding_side,
    process_index=process_index,
    process_count=process_count,
    pack_row_length=packing_row_length,
    pack_row_multiple=max(1, packing_row_multiple),
    share_prompts=bool(share_prompts and packing_row_length),
  )
  # The run length is left out: a run may be resumed with more steps (the batch of a step does
  # not depend on how many steps follow it). So is the process layout: every process must agree
  # on the fingerprint, and a step's global batch holds the same items on any number of
  # processes (only their row order differs).
  config = {
    "names": names,
    "global_batch_size": global_batch_size,
    "mixing": mixing,
    "resampling_size": plan.resampling_size,
    "seed": seed,
    "shuffle": shuffle,
    "responses_per_item": responses_per_item,
    "buckets": list(options.bucket_lengths),
    "padding_side": padding_side,
  }
  # Packing and shared prompts are left out too: they change the layout of a step's batch, not
  # its items, rewards or gradients, so a run may switch them on resume. Runs saved while the
  # packing settings were part of the fingerprint still resume with the same settings.
  fingerprints = [_fingerprint(tokenized, config)]
  if packing_row_length:
    legacy = dict(config, packing=[packing_row_length, max(1, packing_row_multiple)])
    fingerprints.append(_fingerprint(tokenized, legacy))
  dataset = grain.MapDataset.range(num_steps).map(batcher)
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  logging.info(
    "train data: tasks %s with %s items, %s mixing, %d steps (%.1f per epoch), "
    "global batch %d, %d processes",
    names,
    [len(t) for t in tokenized],
    mixing,
    num_steps,
    plan.steps_per_epoch,
    global_batch_size,
    process_count,
  )
  return PreferenceBatchIterator(
    dataset, batcher, names, read_options, fingerprints[0], accepted_fingerprints=fingerprints
  )
