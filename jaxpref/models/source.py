"""Where a reward model comes from: a config's `model.*` fields, an HF dir or a training workdir."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections

from jaxpref.models import reward_model
from jaxpref.models.config import ModelConfig
from jaxpref.training import workdir as workdir_lib

# Fields a user may change on top of a checkpoint or preset.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention", "attention_block")


def model_config_from_config(model: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig that `model.*` describes (random init from its size fields, or a preset)."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  if model.preset:
    from jaxpref.models import presets

    cfg = presets.preset(model.preset)
    changes = {k: model[k] for k in RUNTIME_FIELDS}
  else:
    cfg = ModelConfig()
    changes = {k: model[k] for k in fields if k in model and k != "rope_scaling"}
  if model.pooling:
    changes["pooling"] = model.pooling
  elif not model.preset:
    changes["pooling"] = "last"
  return cfg.replace(**changes)


def load_model(model: ml_collections.ConfigDict, seed: int) -> tuple[ModelConfig, dict | None]:
  """`(cfg, params)`: params from `model.path` (an HF dir) or None for a random init."""
  if not model.path:
    return model_config_from_config(model), None
  from jaxpref.models import hf_io

  cfg, params = hf_io.load_hf(model.path, head_seed=seed)
  changes = {k: model[k] for k in RUNTIME_FIELDS}
  if model.pooling:
    changes["pooling"] = model.pooling
  cfg = cfg.replace(**changes)
  params = jax.tree.map(lambda p: p.astype(cfg.jnp_param_dtype), params)
  return cfg, params


def load_for_inference(
  *, model: str | None = None, workdir: str | None = None, step: int | None = None
) -> tuple[ModelConfig, dict, str, int | None]:
  """Loads `(cfg, params, tokenizer_path, step)` from an HF dir or a jaxpref training workdir."""
  if bool(model) == bool(workdir):
    raise ValueError("give exactly one of --model=HF_DIR or --workdir=DIR")
  if model:
    from jaxpref.models import hf_io

    cfg, params = hf_io.load_hf(model)
    return cfg, params, model, None
  cfg = workdir_lib.read_model_config(workdir)
  abstract = reward_model.abstract_params(cfg)
  step, params = workdir_lib.restore_params(workdir, step, abstract)
  tokenizer_path = str(Path(workdir) / "tokenizer")
  return cfg, params, tokenizer_path, step
