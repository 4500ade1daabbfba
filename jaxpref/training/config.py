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
    if field.name in ("rope_scaling", "lora"):
      continue  # rope_scaling: only through a checkpoint or preset; lora: its own group below.
    if default is None:
      c.model[field.name] = ml_collections.FieldReference(None, field_type=int)
    else:
      c.model[field.name] = default
  # With `path` (or `preset`) set, the checkpoint decides the architecture; only these apply:
  # dtype, param_dtype, remat, and pooling when non-empty ("" = the checkpoint's own, else "last").
  c.model.pooling = ""

  # LoRA (jaxpref.models.lora): rank 0 = off (every parameter trains). With rank > 0 the base
  # weights are frozen (no gradients, no optimizer state); the adapters and the reward head train.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0  # the update is scaled by alpha / rank, as in PEFT
  # Comma-separated: "attention", "mlp", "all", or dense-layer names / dotted path tails
  # ("q_proj,v_proj", "attention.dense").
  c.lora.targets = "attention,mlp"
  c.lora.dropout = 0.0

  c.data = ml_collections.ConfigDict()
  # Comma-separated data files, one task each (task name = file stem unless `task_names` is set);
  # write a comma inside a path as `\\,`.
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
  # Special tokens around each text: auto (the tokenizer's own + EOS) | paper | tokenizer | none.
  # With max_length and truncation_side this makes the input contract stored with the run
  # (docs/what_the_model_sees.md).
  c.data.special_tokens = "auto"
  # N, the response axis of a training batch: 0 = the largest number of responses of any training
  # item (2 for pairwise data); items with fewer are padded and their padding is never compared.
  # A ranked list of N responses trains on all its N(N-1)/2 ordered pairs.
  c.data.responses_per_item = 0
  c.data.eval_fraction = 0.1
  c.data.split_seed = 0
  c.data.mixing = "resample"  # resample | proportional
  c.data.resampling_size = 0  # items per task per epoch; 0 = the largest task's size
  c.data.min_bucket = 32
  # Padded lengths: powers of two from min_bucket (0), or every multiple of this above it (less
  # padding, more compiled shapes; 64 suits max_length 512 on CPU).
  c.data.bucket_multiple = 0
  # Pack each batch's responses end to end into rows of max_length tokens: same rewards and
  # gradients, fewer positions (jaxpref.data.packing). Decoders with last-token pooling only;
  # other models, and train.grad_accum_steps > 1, use padded batches whatever this says.
  c.data.packing = True
  # With packing, the responses of an item share one copy of their common prefix (the prompt):
  # exact for causal decoders, computed once instead of once per response.
  c.data.shared_prompts = True

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
  c.checkpoint.keep = 3  # 0 = keep every checkpoint
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


# ----------------------------------------------------------------------------------------------
# Validation: every value checked up front, before any model or data is read, one line each.
# ----------------------------------------------------------------------------------------------
SCHEDULES = ("cosine", "linear", "constant")
MIXINGS = ("resample", "proportional")
TRUNCATION_SIDES = ("left", "right")
DTYPES = ("float32", "bfloat16", "float16")
# Shorter than this, a prompt and a response hardly fit: allowed, with a warning.
MIN_SENSIBLE_LENGTH = 16


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line naming the key."""


def _fail(key: str, value, why: str) -> ConfigError:
  return ConfigError(f"config: {key}={value!r}: {why}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every value of a training config that can be checked without the model or data.

  Raises:
    ConfigError: the first bad value, as `config: key=value: what is wrong / what is allowed`.
  """
  from jaxpref.data import formats, reader
  from jaxpref.models import config as model_config
  from jaxpref.objectives import objective as objectives

  def at_least(key: str, minimum: float) -> None:
    section, name = key.split(".")
    value = config[section][name]
    if value < minimum:
      raise _fail(key, value, f"must be >= {minimum}")

  def one_of(key: str, allowed) -> None:
    section, name = key.split(".")
    value = config[section][name]
    if value not in allowed:
      raise _fail(key, value, f"choose one of {', '.join(repr(a) for a in allowed)}")

  for key in (
    "train.batch_size",
    "train.log_every_steps",
    "train.grad_accum_steps",
    "checkpoint.every_steps",
    "eval.batch_size",
    "data.min_bucket",
  ):
    at_least(key, 1)
  for key in ("train.steps", "train.warmup_steps", "eval.every_steps", "data.bucket_multiple"):
    at_least(key, 0)
  # checkpoint.keep=0 keeps every checkpoint.
  for key in ("train.weight_decay", "train.grad_clip", "data.resampling_size", "checkpoint.keep"):
    at_least(key, 0)
  at_least("train.divergence_factor", 0)  # 0 = stop on non-finite values only.
  lr = config.train.learning_rate
  if not lr > 0 or lr != lr:
    raise _fail("train.learning_rate", lr, "must be > 0 (a negative rate is gradient ascent)")
  if not 0 <= config.train.end_lr_fraction <= 1:
    raise _fail("train.end_lr_fraction", config.train.end_lr_fraction, "must be in [0, 1]")
  for key in ("train.b1", "train.b2"):
    value = config.train[key.split(".")[1]]
    if not 0 <= value < 1:
      raise _fail(key, value, "must be in [0, 1)")
  if not config.train.eps > 0:
    raise _fail("train.eps", config.train.eps, "must be > 0")
  if config.train.batch_size % config.train.grad_accum_steps:
    raise ConfigError(
      f"config: train.batch_size={config.train.batch_size} is not divisible by "
      f"train.grad_accum_steps={config.train.grad_accum_steps}"
    )
  one_of("train.schedule", SCHEDULES)

  if config.data.max_length < 2:
    raise _fail("data.max_length", config.data.max_length, "must be >= 2 tokens")
  if not 0 <= config.data.eval_fraction < 1:
    raise _fail("data.eval_fraction", config.data.eval_fraction, "must be in [0, 1)")
  one_of("data.format", ("auto", *formats.FORMATS))
  one_of("data.on_error", reader.ON_ERROR)
  one_of("data.on_tie", ("", *reader.ON_TIE))
  one_of("data.mixing", MIXINGS)
  one_of("data.truncation_side", TRUNCATION_SIDES)
  if "responses_per_item" in config.data:
    at_least("data.responses_per_item", 0)
    if config.data.responses_per_item == 1:
      raise _fail("data.responses_per_item", 1, "must be 0 (the data's largest) or >= 2")

  one_of("loss.kind", objectives.KINDS)
  one_of("loss.more_normalize", objectives.NORMALIZATIONS)
  try:
    objectives.LossConfig(
      kind=config.loss.kind,
      more_alpha=config.loss.more_alpha,
      more_normalize=config.loss.more_normalize,
      margin=config.loss.margin,
      center_rewards_coef=config.loss.center_rewards_coef,
    )
  except ValueError as e:
    raise ConfigError(f"config: {e}") from None

  one_of("model.pooling", ("", *model_config.POOLINGS))
  one_of("model.dtype", DTYPES)
  one_of("model.param_dtype", DTYPES)
  one_of("model.attention", model_config.ATTENTIONS)
  if not config.model.path and not config.model.preset:
    one_of("model.arch", model_config.ARCHS)
  for axis in ("data", "fsdp", "tensor"):
    value = config.mesh[axis]
    if value != -1 and value < 1:
      raise _fail(f"mesh.{axis}", value, "must be >= 1, or -1 for all remaining devices")


def check_lengths(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
  """`data.max_length` against the model: beyond learned positions is an error, beyond rotary
  positions and tiny lengths a warning (they run, but are rarely meant).

  Raises:
    ConfigError: max_length beyond a learned (BERT) position table.
  """
  from absl import logging

  max_length, positions = config.data.max_length, model_cfg.max_position_embeddings
  if max_length > positions:
    if model_cfg.arch == "bert":
      raise _fail(
        "data.max_length", max_length, f"the model has only {positions} learned positions"
      )
    logging.warning(
      "data.max_length=%d exceeds the model's max_position_embeddings=%d: rotary positions "
      "beyond it were never trained",
      max_length,
      positions,
    )
  if max_length < MIN_SENSIBLE_LENGTH:
    logging.warning(
      "data.max_length=%d is tiny: most texts will be cut to their last %d tokens",
      max_length,
      max_length,
    )


def nearest_keys(config: ml_collections.ConfigDict, key: str) -> list[str]:
  """Valid dotted keys closest to a misspelt `key` (`train.learnin_rate` -> learning_rate)."""
  import difflib

  keys = flat_keys(config)
  close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
  if not close:  # A right name in the wrong section: `train.more_alpha`.
    last = key.split(".")[-1]
    close = [k for k in keys if k.split(".")[-1] == last]
  return close


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf key of `config`, dotted (`train.learning_rate`)."""
  out = []
  for name in sorted(config.keys()):
    value = config[name]
    if isinstance(value, ml_collections.ConfigDict):
      out += flat_keys(value, f"{prefix}{name}.")
    else:
      out.append(f"{prefix}{name}")
  return out


def describe_keys(config: ml_collections.ConfigDict) -> str:
  """`key = default` per line, for `--help`."""
  lines = []
  for key in flat_keys(config):
    value = config
    for part in key.split("."):
      value = value[part]
    lines.append(f"  --config.{key}={value!r}")
  return "\n".join(lines)
