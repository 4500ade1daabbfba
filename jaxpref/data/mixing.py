"""Which items make up each training step: the paper's resampling and proportional mixing.

Both plans are pure functions of (seed, step), so any step's batch can be computed directly: a
restored pipeline, or another process, gets the same rows without replaying earlier steps.

Resampling (the paper's `--resampling`): every task is an endless stream of item indices cut
into epochs of `resampling_size` (R) positions. For a task of n items, with q, r = divmod(R, n),
epoch e holds every item q times plus r more drawn without replacement from a rotation through
the task (a fresh permutation each time the rotation wraps), then shuffled. So with R >= n every
item is seen in every epoch, and with R < n every item is seen once per ceil(n / R) epochs: no
item is starved. Step s takes positions [s k, (s + 1) k) of every task's stream, k = global batch
/ number of tasks, so every global batch holds exactly k items of every task. (The paper's code
instead kept the first R items of a larger task, always the same ones, and padded a smaller one
by sampling from copies of it.)

Proportional: all tasks' items form one stream, reshuffled every epoch; a batch holds tasks in
proportion to their sizes, on average.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxpref.data import errors

MIXINGS = ("resample", "proportional")
_CYCLE, _EPOCH, _PROPORTIONAL = 0, 1, 2  # Salts that keep the random streams apart.


@functools.lru_cache(maxsize=256)
def _permutation(seed: int, salt: int, task: int, index: int, n: int, shuffle: bool) -> np.ndarray:
  if not shuffle:
    return np.arange(n, dtype=np.int64)
  rng = np.random.default_rng([seed, salt, task, index])
  return rng.permutation(n).astype(np.int64)


def _rotation(seed: int, task: int, n: int, start: int, count: int, shuffle: bool) -> np.ndarray:
  """Positions [start, start + count) of a task's rotation: permutations of n, end to end."""
  positions = np.arange(start, start + count, dtype=np.int64)
  cycles, offsets = np.divmod(positions, n)
  out = np.empty(count, np.int64)
  for c in np.unique(cycles):
    sel = cycles == c
    out[sel] = _permutation(seed, _CYCLE, task, int(c), n, shuffle)[offsets[sel]]
  return out


@functools.lru_cache(maxsize=64)
def resample_epoch(
  seed: int, task: int, n: int, size: int, epoch: int, shuffle: bool
) -> np.ndarray:
  """Item indices of epoch `epoch` of a task of `n` items resampled to `size` (read-only)."""
  repeats, extra = divmod(size, n)
  plan = np.concatenate(
    [
      np.tile(np.arange(n, dtype=np.int64), repeats),
      _rotation(seed, task, n, epoch * extra, extra, shuffle),
    ]
  )
  if shuffle:
    plan = plan[_permutation(seed, _EPOCH, task, epoch, size, True)]
  plan.flags.writeable = False
  return plan


class MixingPlan:
  """Maps a step to the (task id, item index) rows of its global batch and of one process.

  Args:
    sizes: number of items of each task.
    global_batch_size: items per step over all processes.
    mixing: `resample` or `proportional`.
    resampling_size: R, positions per task per epoch (resample only); default the largest task.
    seed: seed of every permutation.
    shuffle: False keeps file order (tasks still interleave batch by batch).
    process_count: processes sharing each global batch; each gets an equal slice, holding (with
      `resample`) the same number of items of every task.
  """

  def __init__(
    self,
    sizes: list[int],
    global_batch_size: int,
    *,
    mixing: str = "resample",
    resampling_size: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    process_count: int = 1,
  ):
    if mixing not in MIXINGS:
      raise errors.DataConfigError(f"mixing={mixing!r}: choose one of {MIXINGS}")
    if not sizes or min(sizes) < 1:
      raise errors.DataConfigError(f"every task needs at least one item; task sizes {sizes}")
    if seed < 0:
      raise errors.DataConfigError(f"seed={seed} must be >= 0")
    num_tasks = len(sizes)
    if mixing == "resample":
      if global_batch_size % (num_tasks * process_count):
        raise errors.DataConfigError(
          f"global_batch_size={global_batch_size} must be divisible by the number of tasks "
          f"({num_tasks}) times the number of processes ({process_count}) so that every "
          "process gets the same number of items of every task"
        )
    elif global_batch_size % process_count:
      raise errors.DataConfigError(
        f"global_batch_size={global_batch_size} must be divisible by "
        f"the number of processes ({process_count})"
      )
    if resampling_size is not None and resampling_size < 1:
      raise errors.DataConfigError(f"resampling_size={resampling_size} must be >= 1")
    self.sizes = list(sizes)
    self.global_batch_size = global_batch_size
    self.mixing = mixing
    self.resampling_size = (resampling_size or max(sizes)) if mixing == "resample" else None
    self.seed, self.shuffle, self.process_count = seed, shuffle, process_count
    self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

  @property
  def per_task_batch(self) -> int:
    return self.global_batch_size // len(self.sizes)

  @property
  def epoch_items(self) -> int:
    """Items in one epoch: R per task when resampling, all items when proportional."""
    if self.mixing == "resample":
      return self.resampling_size * len(self.sizes)
    return int(self._offsets[-1])

  @property
  def steps_per_epoch(self) -> float:
    return self.epoch_items / self.global_batch_size

  def steps_for_epochs(self, num_epochs: float) -> int:
    """Steps that cover `num_epochs` epochs (rounded up, so no planned item is left out)."""
    return int(np.ceil(num_epochs * self.epoch_items / self.global_batch_size - 1e-9))

  def _task_stream(self, task: int, start: int, count: int) -> np.ndarray:
    size = self.resampling_size
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(positions, size)
    out = np.empty(count, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      plan = resample_epoch(self.seed, task, self.sizes[task], size, int(e), self.shuffle)
      out[sel] = plan[offsets[sel]]
    return out

  def _proportional_stream(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    total = int(self._offsets[-1])
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(positions, total)
    flat = np.empty(count, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      flat[sel] = _permutation(self.seed, _PROPORTIONAL, 0, int(e), total, self.shuffle)[
        offsets[sel]
      ]
    task_ids = np.searchsorted(self._offsets, flat, side="right") - 1
    return task_ids, flat - self._offsets[task_ids]

  def rows(self, step: int, process_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(task ids [b], item indices [b]) of the global batch (process_index None) or a slice.

    Global row order: process 0's slice, then process 1's, ...; within a slice (resample),
    task 0's items, then task 1's, ...
    """
    if self.mixing == "resample":
      k = self.per_task_batch
      k_proc = k // self.process_count
      procs = range(self.process_count) if process_index is None else [process_index]
      task_parts, item_parts = [], []
      for p in procs:
        for t in range(len(self.sizes)):
          item_parts.append(self._task_stream(t, step * k + p * k_proc, k_proc))
          task_parts.append(np.full(k_proc, t, np.int64))
      return np.concatenate(task_parts), np.concatenate(item_parts)
    b = self.global_batch_size
    if process_index is None:
      return self._proportional_stream(step * b, b)
    b_proc = b // self.process_count
    return self._proportional_stream(step * b + process_index * b_proc, b_proc)
