"""Where a reward model comes from: a config's `model.*` fields, an HF dir or a training workdir."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxpref.data import contract as input_contract
from jaxpref.models import hf_io, presets, reward_model
from jaxpref.models.config import ModelConfig
from jaxpref.training import workdir as workdir_lib

# Fields a user may change on top of a checkpoint or preset.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention", "attention_block")


def model_config_from_config(model: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig that `model.*` describes (random init from its size fields, or a preset)."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  if model.preset:
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


def load_model(
  model: ml_collections.ConfigDict, seed: int, mesh: jax.sharding.Mesh | None = None
) -> tuple[ModelConfig, dict | None]:
  """`(cfg, params)`: params from `model.path` (an HF dir) or None for a random init.

  With `mesh`, the params come back sharded over it, each process having read only its own
  devices' slices of the checkpoint (`hf_io.load_hf(..., mesh=...)`).
  """
  if not model.path:
    return model_config_from_config(model), None
  # The pooling goes to load_hf, which initialises the heads it needs (BERT's pooler).
  cfg, params = hf_io.load_hf(
    model.path,
    head_seed=seed,
    mesh=mesh,
    param_dtype=model.param_dtype,
    pooling=model.pooling or None,
  )
  return cfg.replace(**{k: model[k] for k in RUNTIME_FIELDS}), params


def load_for_inference(
  *, model: str | None = None, workdir: str | None = None, step: int | None = None
) -> tuple[ModelConfig, dict, str, int | None]:
  """Loads `(cfg, params, tokenizer_path, step)` from an HF dir or a jaxpref training workdir."""
  if bool(model) == bool(workdir):
    raise ValueError("give exactly one of --model=HF_DIR or --workdir=DIR")
  if model:
    from jaxpref.models import peft_io

    if peft_io.is_adapter_dir(model):  # A PEFT LoRA adapter: merged onto its base checkpoint.
      cfg, params = peft_io.load_adapter(model)
      has_tokenizer = (Path(model) / "tokenizer_config.json").is_file()
      return cfg, params, model if has_tokenizer else peft_io.base_model_of(model), None
    cfg, params = hf_io.load_hf(model)
    return cfg, params, model, None
  cfg = workdir_lib.read_model_config(workdir)
  # A concrete target sharding: a checkpoint written by a multi-process run names devices that
  # this run may not have. One device, or replicated over all when this run is multi-process.
  if jax.process_count() == 1:
    target = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  else:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
    target = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target),
    reward_model.abstract_params(cfg),
  )
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
