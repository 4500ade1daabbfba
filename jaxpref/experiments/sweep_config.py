"""The `sweep` half of a `jaxpref.experiments.scaling` config: every key, with its default.

A sweep config (`configs/experiments/*.py`) is a ConfigDict with two parts: `base`, an ordinary
training config (`jaxpref.training.config.base_config`) shared by every cell, and `sweep`, which
says which cells to run. Start `sweep` from `base_sweep_config()` and set what you need.
"""

from __future__ import annotations

import ml_collections


def base_sweep_config() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  # Comma-separated `name=decoder:hidden:layers:heads:intermediate` (random init, on top of
  # base.model) or `name=minilm:layers` (the pretrained all-MiniLM-L6-v2 encoder truncated to its
  # first 1-6 layers, mean pooling, fresh reward head seeded by the cell's seed).
  s.models = ""
  # Items per task per epoch (`data.resampling_size` of each cell), comma-separated.
  s.data_sizes = ""
  s.objectives = "single,multitask,more"  # single = one ranking-loss RM per task.
  s.seeds = "0,1,2"
  # The grid is a cross around this point: every model at headline_data_size, every data size
  # with headline_model; the single-task objective and seeds beyond the first run only there.
  s.headline_model = ""
  s.headline_data_size = 0
  # Objectives at the other points of the cross; "" = sweep.objectives without single.
  s.axis_objectives = ""
  # Tasks, comma-separated; "" = one per file of base.data.files (its task name). A file that
  # holds several tasks (the domain-specific format: `<name>_<domain>`) must list them here.
  # Multi-task cells train on these tasks (`data.tasks`), single-task cells on one of them with
  # base.train.batch_size / #tasks items per step: the items per task per step of the others.
  s.tasks = ""
  s.minilm_learning_rate = 1e-4  # train.learning_rate of MiniLM cells (decoders: base's).
  # Paths under this folder are written as `<shared>/...` in results.json ("" = left as they are).
  s.shared_root = ""
  # Checkpoints of finished cells are deleted (only their metrics and reports are read).
  s.keep_checkpoints = False
  return s
