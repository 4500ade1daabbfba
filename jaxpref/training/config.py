"""The training config: every key that `python -m jaxpref.train` understands, with defaults.

Config files under `configs/` start from `base_config()` and change what they need; the returned
ConfigDict is locked, so a misspelt `--config.x.y=...` override fails with a clear message, and
ml_collections rejects values of the wrong type.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxpref.models.config import ModelConfig


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # Model: `path` is a local Hugging Face checkpoint dir; empty means random init from the size
  # fields below (or from `preset`, a name in `jaxpref.models.presets.PRESETS`).
  c.model = ml_collections.ConfigDict()
  c.model.path = ""
  c.model.preset = ""
  for field in dataclasses.fields(ModelConfig):
    default = field.default
    if field.name == "rope_scaling":
      continue  # Only settable through a checkpoint or preset.
    if default is None:
      c.model[field.name] = ml_collections.FieldReference(None, field_type=int)
    else:
      c.model[field.name] = default
  # With `path` (or `preset`) set, the checkpoint decides the architecture; only these apply:
  # dtype, param_dtype, remat, and pooling when non-empty ("" = the checkpoint's own, else "last").
  c.model.pooling = ""

  c.data = ml_collections.ConfigDict()
  # Comma-separated data files, one task each (task name = file stem unless `task_names` is set).
  c.data.files = ""
  c.data.task_names = ""
  # Comma-separated tasks to train and evaluate on, out of those the files give (a
  # domain-specific file gives several, `<name>_<domain>`); "" = all. Task ids follow file order.
  c.data.tasks = ""
  c.data.format = "auto"
  c.data.on_error = "raise"  # raise | skip (count and skip bad records)
  c.data.on_tie = ""  # items whose responses all tie: raise | skip | keep; "" follows on_error
  # Tokenizer: an HF model dir or a tokenizer.json; empty = `model.path`.
  c.data.tokenizer = ""
  c.data.max_length = 512
  c.data.truncation_side = "left"
  c.data.eval_fraction = 0.1
  c.data.split_seed = 0
  c.data.mixing = "resample"  # resample | proportional
  c.data.resampling_size = 0  # items per task per epoch; 0 = the largest task's size
  c.data.min_bucket = 32
  # Padded lengths: powers of two from min_bucket (0), or every multiple of this above it (less
  # padding, more compiled shapes; 64 suits max_length 512 on CPU).
  c.data.bucket_multiple = 0
  # Pack each training batch's responses end to end into rows of max_length tokens (decoders
  # with last-token pooling; same rewards and gradients, fewer positions; jaxpref.data.packing).
  c.data.packing = False

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global, in preference items
  c.train.steps = 0  # 0 = one epoch of the resampled data
  c.train.learning_rate = 1e-5
  c.train.warmup_steps = 0
  c.train.schedule = "cosine"  # cosine | linear | constant
  c.train.end_lr_fraction = 0.0
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.grad_clip = 1.0  # global norm; 0 = off
  c.train.grad_accum_steps = 1
  c.train.seed = 0
  c.train.log_every_steps = 10
  # Divergence guard: stop when the loss is non-finite or above this multiple of its running
  # average; checkpoints saved from the diverging weights are set aside (0 = non-finite only).
  c.train.divergence_factor = 100.0

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = "multitask"  # ranking | multitask | more
  c.loss.more_alpha = 0.99
  c.loss.more_normalize = "l2"  # l2 | loss | loss+ | none
  c.loss.margin = 0.0
  c.loss.center_rewards_coef = 0.0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0  # 0 = no periodic eval (a final eval still runs when there is eval data)
  c.eval.batch_size = 32
  c.eval.final = True

  # Resume (docs/preemption.md): force=True continues a workdir whose checkpoint came from another
  # objective, data or model settings, or whose training data changed content.
  c.resume = ml_collections.ConfigDict()
  c.resume.force = False

  # Mesh: -1 = all remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.lock()
  return config
