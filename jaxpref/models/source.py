"""Where a reward model comes from: a config's `model.*` fields, an HF dir or a training workdir."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jaxpref.data import contract as input_contract
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

  # The pooling goes to load_hf, which initialises the heads it needs (BERT's pooler).
  cfg, params = hf_io.load_hf(model.path, head_seed=seed, pooling=model.pooling or None)
  cfg = cfg.replace(**{k: model[k] for k in RUNTIME_FIELDS})
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


def load_tokenizer_and_contract(
  cfg: ModelConfig, *, model: str | None = None, workdir: str | None = None
) -> tuple[Any, input_contract.InputContract]:
  """The tokenizer, configured with the model's input contract, and the contract.

  A jaxpref workdir or export has its contract stored (`input_contract.json`); a workdir
  written before contracts were stored gets one inferred from its config.json (and says so); an
  external Hugging Face checkpoint gets what transformers does with its own tokenizer.
  """
  from jaxpref.data.tokenize import load_tokenizer

  source = workdir or model
  tokenizer_path = Path(workdir) / "tokenizer" if workdir else Path(model)
  tokenizer = load_tokenizer(tokenizer_path)
  contract = input_contract.read(source)
  if contract is not None:
    input_contract.apply(tokenizer, contract)
  elif workdir:
    contract = input_contract.infer_for_workdir(workdir, tokenizer, cfg)
  else:
    contract = input_contract.for_checkpoint(tokenizer, cfg)
  return tokenizer, contract
