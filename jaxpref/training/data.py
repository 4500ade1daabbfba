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
from jaxpref.data import contract as input_contract
from jaxpref.data import pipeline, reader, splits, tokenize
from jaxpref.data.batch import TrainBatch
from jaxpref.data.errors import DataConfigError
from jaxpref.data.records import DataSummary, PreferenceItem, group_by_task
from jaxpref.models import reward_model
from jaxpref.models.config import ModelConfig


@dataclasses.dataclass
class TrainData:
  task_names: list[str]
  tokenizer: Any
  train_pipeline: Any  # iterator of per-process numpy batches with get_state() / set_state()
  eval_items: dict[str, list[PreferenceItem]]
  num_steps: int  # train.steps, or one epoch of the mixed data when that is 0
  summary: DataSummary
  # What the model sees; stored with the run (None: special_tokens=auto, no contract).
  contract: input_contract.InputContract | None = None


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


def load_tokenizer(config: ml_collections.ConfigDict):
  """The run's tokenizer: `data.tokenizer`, else the checkpoint's (`model.path`)."""
  tokenizer_path = config.data.tokenizer or config.model.path
  if not tokenizer_path:
    raise DataConfigError(
      "no tokenizer: set data.tokenizer (an HF dir or tokenizer.json) or model.path"
    )
  return tokenize.load_tokenizer(tokenizer_path)


def configure_input(
  config: ml_collections.ConfigDict, tokenizer, cfg: ModelConfig
) -> input_contract.InputContract:
  """The run's input contract, decided once from `data.*` and the model; `tokenizer` is
  configured in place to apply it (a pad token that is not EOS, the special tokens, the
  truncation side and length) and is saved so with the run."""
  data = config.data
  contract = input_contract.configure(
    tokenizer,
    max_length=data.max_length,
    truncation_side=data.truncation_side,
    special_tokens=data.special_tokens,
    arch=cfg.arch,
    pooling=cfg.pooling,
    vocab_size=cfg.vocab_size,
    chat_template=bool(getattr(tokenizer, "chat_template", None)),
  )
  logging.info("input contract: %s", contract.describe())
  return contract


def settle_model_config(cfg: ModelConfig, tokenizer) -> ModelConfig:
  """The model config the run trains: the pad id is the (configured) tokenizer's, the eos id
  filled from it where the config leaves it unset, and the tokenizer checked against the
  vocabulary. Done before any data is read; nothing downstream changes the model config."""
  changes = {}
  if tokenizer.pad_token_id is not None and cfg.pad_token_id != tokenizer.pad_token_id:
    changes["pad_token_id"] = int(tokenizer.pad_token_id)
  if cfg.eos_token_id is None and tokenizer.eos_token_id is not None:
    changes["eos_token_id"] = int(tokenizer.eos_token_id)
  if len(tokenizer) > cfg.vocab_size:
    raise DataConfigError(
      f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is {cfg.vocab_size}"
    )
  return cfg.replace(**changes) if changes else cfg


def prepare(
  config: ml_collections.ConfigDict,
  tokenizer,
  mesh: Mesh | None = None,
  contract: input_contract.InputContract | None = None,
) -> TrainData:
  """Reads every task's file, splits off held-out items, and builds the train pipeline.

  With `data.packing`, the pipeline packs each process's items into rows (a multiple of the
  batch-axis devices each process feeds on `mesh`) that land at global rows
  [p * R, (p + 1) * R) of process p; `check_process_blocks` makes sure the mesh lays them there.
  """
  data = config.data
  row_multiple = 1
  if data.packing and mesh is not None:
    check_process_blocks(mesh)
    row_multiple = max(1, sharding.global_batch_size_multiple(mesh) // jax.process_count())

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
    responses_per_item=responses_per_item,
    buckets=tokenize.length_buckets(data.max_length, data.min_bucket, data.bucket_multiple),
    packing_row_length=data.max_length if data.packing else 0,
    packing_row_multiple=row_multiple,
    share_prompts=data.get("shared_prompts", False),
    contract=contract,
  )
  return TrainData(
    task_names=task_names,
    tokenizer=tokenizer,
    train_pipeline=train_pipeline,
    eval_items={t: eval_items[t] for t in task_names},
    num_steps=train_pipeline.num_steps,
    summary=summary,
    contract=contract,
  )


def settle_packing(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
  """Turns `data.packing` / `data.shared_prompts` off where they cannot apply, saying why.

  Packing is the default (the fast path); an encoder, a pooling other than `last`, or gradient
  accumulation (packed rows do not split into micro-batches of whole items) train on padded
  batches instead. The settled values are what the run stores and what every later step reads.
  """
  data = config.data
  if data.packing:
    why = None
    if not reward_model.packable(model_cfg):
      why = f"model.arch={model_cfg.arch} with model.pooling={model_cfg.pooling} reads padded rows"
    elif config.train.grad_accum_steps > 1:
      why = f"train.grad_accum_steps={config.train.grad_accum_steps} splits padded batches"
    if why:
      logging.info("data.packing off: %s", why)
      data.packing = False
  if not data.packing:
    data.shared_prompts = False


def check_process_blocks(mesh: Mesh) -> None:
  """Packed rows need each process's batch-axis shards to be one block, in process order."""
  per_process = max(1, sharding.global_batch_size_multiple(mesh) // jax.process_count())
  rows = per_process * jax.process_count()
  shape = (rows, 1)
  index_map = sharding.batch_sharding(mesh, shape).devices_indices_map(shape)
  for device, index in index_map.items():
    start = index[0].start or 0
    if not device.process_index * per_process <= start < (device.process_index + 1) * per_process:
      raise DataConfigError(
        "data.packing needs each process's devices to hold one block of the batch axis in "
        f"process order; mesh {dict(mesh.shape)} does not (device {device.id} of process "
        f"{device.process_index} holds row {start} of {rows})"
      )


def global_batch(local_batch: TrainBatch, mesh: Mesh) -> TrainBatch:
  """Assembles each process's rows into global arrays sharded over the mesh's batch axes."""

  def to_global(local: np.ndarray) -> jax.Array:
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh, global_shape), local, global_shape
    )

  return jax.tree.map(to_global, local_batch)
