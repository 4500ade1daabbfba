"""From `config.data` to a resumable multi-task batch iterator and held-out splits per task."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from jaxpref import sharding
from jaxpref.data import packing, pipeline, reader, splits, tokenize
from jaxpref.data.errors import DataConfigError
from jaxpref.data.records import DataSummary, PreferenceItem, group_by_task
from jaxpref.models.config import ModelConfig


@dataclasses.dataclass
class TrainData:
  task_names: list[str]
  tokenizer: Any
  train_pipeline: Any  # iterator of per-process numpy batches with get_state() / set_state()
  eval_items: dict[str, list[PreferenceItem]]
  num_steps: int  # train.steps, or one epoch of the mixed data when that is 0
  summary: DataSummary
  model_cfg: ModelConfig


def split_files(text: str) -> list[str]:
  """The paths of a comma-separated `data.files`; `\\,` is a comma inside a path.

  A value that names one existing file is that file, commas and all.
  """
  if "," in text and Path(text.strip()).is_file():
    return [text.strip()]
  parts = re.split(r"(?<!\\),", text)
  return [p.replace("\\,", ",").strip() for p in parts if p.strip()]


def task_files(data: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """`(task_name, path)` per data file; names are file stems unless `data.task_names` is set."""
  files = split_files(data.files)
  if not files:
    raise DataConfigError("data.files is empty: give comma-separated preference files")
  names = [n.strip() for n in data.task_names.split(",") if n.strip()]
  if names and len(names) != len(files):
    raise DataConfigError(f"data.task_names has {len(names)} names for {len(files)} data.files")
  if not names:
    names = [Path(f).name.split(".")[0] for f in files]
  if len(set(names)) != len(names):
    raise DataConfigError(f"task names {names} are not unique; set data.task_names")
  return list(zip(names, files))


def select_tasks(available: list[str], wanted: str) -> list[str]:
  """The tasks of `available` named in `wanted` (comma-separated; "" = all), in their order.

  Selection comes after reading, so one task of a multi-task file (a domain of the
  domain-specific set) can be trained alone; its held-out split is the same as in a run on all
  tasks, since splits are per task and by prompt hash.
  """
  names = [n.strip() for n in wanted.split(",") if n.strip()]
  unknown = [n for n in names if n not in available]
  if unknown:
    raise DataConfigError(f"data.tasks: {unknown} not among the tasks of data.files {available}")
  return [t for t in available if t in names] if names else available


def _with_token_ids(cfg: ModelConfig, tokenizer) -> ModelConfig:
  """Fills the model's pad / eos ids from the tokenizer where the config leaves them unset."""
  changes = {}
  if cfg.pad_token_id is None and tokenizer.pad_token_id is not None:
    changes["pad_token_id"] = int(tokenizer.pad_token_id)
  if cfg.eos_token_id is None and tokenizer.eos_token_id is not None:
    changes["eos_token_id"] = int(tokenizer.eos_token_id)
  if len(tokenizer) > cfg.vocab_size:
    raise DataConfigError(
      f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is {cfg.vocab_size}"
    )
  return cfg.replace(**changes) if changes else cfg


def prepare(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> TrainData:
  """Reads every task's file, splits off held-out items, and builds the train pipeline."""
  data = config.data
  tokenizer_path = data.tokenizer or config.model.path
  if not tokenizer_path:
    raise DataConfigError(
      "no tokenizer: set data.tokenizer (an HF dir or tokenizer.json) or model.path"
    )
  tokenizer = tokenize.load_tokenizer(tokenizer_path)
  model_cfg = _with_token_ids(model_cfg, tokenizer)

  summary = DataSummary()
  train_items, eval_items = {}, {}
  for name, path in task_files(data):
    items, file_summary = reader.read_preferences(
      path,
      format=data.format,
      on_error=data.on_error,
      on_tie=data.on_tie or None,
      task=name,
      tokenizer=tokenizer,
    )
    summary = summary.merge(file_summary)
    if not items:
      raise DataConfigError(f"{path}: no usable preference items ({file_summary.describe()})")
    # A domain-specific file yields one task per domain (`<name>_<domain>`).
    for task, task_items in group_by_task(items).items():
      if task in train_items:
        raise DataConfigError(f"task {task!r} comes from two files; set data.task_names")
      train, held_out = splits.split_items(task_items, data.eval_fraction, seed=data.split_seed)
      train_items[task], eval_items[task] = train, held_out
      logging.info(
        "task %s: %d train / %d eval items from %s", task, len(train), len(held_out), path
      )
  task_names = select_tasks(list(train_items), data.tasks)
  responses_per_item = data.get("responses_per_item", 0) or max(
    2, max(item.num_responses for t in task_names for item in train_items[t])
  )
  train_pipeline = pipeline.build_train_pipeline(
    [train_items[t] for t in task_names],
    tokenizer,
    global_batch_size=config.train.batch_size,
    max_length=data.max_length,
    mixing=data.mixing,
    resampling_size=data.resampling_size or None,
    seed=config.train.seed,
    num_steps=config.train.steps or None,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    truncation_side=data.truncation_side,
    responses_per_item=responses_per_item,
    buckets=tokenize.length_buckets(data.max_length, data.min_bucket, data.bucket_multiple),
  )
  return TrainData(
    task_names=task_names,
    tokenizer=tokenizer,
    train_pipeline=train_pipeline,
    eval_items={t: eval_items[t] for t in task_names},
    num_steps=train_pipeline.num_steps,
    summary=summary,
    model_cfg=model_cfg,
  )


def pack_local_batch(
  local_batch: dict[str, np.ndarray], row_length: int, mesh: Mesh
) -> dict[str, np.ndarray]:
  """This process's part of a packed global batch (see `jaxpref.data.packing`).

  Every process must hold the same number of rows, so the count is agreed (the maximum over
  processes, one small all-gather per step) and rounded to a multiple of the batch-axis devices
  each process feeds; `packed_last_index` then indexes the global [R, row_length] array.
  """
  per_process = max(1, sharding.global_batch_size_multiple(mesh) // jax.process_count())
  rows = packing.rows_needed(local_batch, row_length)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    rows = int(np.max(multihost_utils.process_allgather(np.int32(rows))))
  rows = -(-rows // per_process) * per_process
  # Where this process's rows sit in the global array: the first row of its devices' shards.
  global_shape = (rows * jax.process_count(), row_length)
  index_map = sharding.batch_sharding(mesh, global_shape).devices_indices_map(global_shape)
  offset = min(
    index[0].start or 0
    for device, index in index_map.items()
    if device.process_index == jax.process_index()
  )
  return packing.pack_batch(local_batch, row_length=row_length, num_rows=rows, row_offset=offset)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded over the mesh's batch axes."""
  out = {}
  for name, local in local_batch.items():
    if name not in ("input_ids", "attention_mask", "scores", "task_ids", *packing.PACKED_KEYS):
      continue
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    out[name] = jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh, global_shape), local, global_shape
    )
  return out
