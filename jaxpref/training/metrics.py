"""Run logs: `WORKDIR/metrics.jsonl` (one JSON object per logged step) and TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np


def flatten_metrics(
  metrics: dict[str, Any], task_names: list[str] | tuple[str, ...] = ()
) -> dict[str, float]:
  """Scalars stay as they are; arrays with a task axis become `<name>/<task>` entries."""
  flat: dict[str, float] = {}
  for name, value in metrics.items():
    array = np.asarray(value)
    if array.ndim == 0:
      flat[name] = float(array)
    elif array.ndim == 1 and task_names and array.shape[0] == len(task_names):
      base = name.removesuffix("_t")  # `task_loss_t` -> `task_loss/<task>`
      for task, item in zip(task_names, array):
        flat[f"{base}/{task}"] = float(item)
    else:
      for index, item in enumerate(array.reshape(-1)):
        flat[f"{name}/{index}"] = float(item)
  return flat


def _json_value(value: float) -> float | str:
  return value if math.isfinite(value) else str(value)


class MetricsWriter:
  """Appends metrics to `metrics.jsonl` and TensorBoard; a no-op on processes other than 0."""

  def __init__(
    self, workdir: str | Path, *, tensorboard: bool = True, purge_step: int | None = None
  ):
    """`purge_step`: a resumed run's first new step; TensorBoard drops events from it on."""
    self.active = jax.process_index() == 0
    self._tb = None
    self._file = None
    if not self.active:
      return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._file = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge_step)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
