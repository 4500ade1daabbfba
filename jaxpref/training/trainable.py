"""Which parameters train: the split of the parameter tree into a trainable and a frozen part.

Without LoRA everything trains. With LoRA (`model_cfg.lora`) only the adapters and the reward
head train (`jaxpref.models.lora.is_trainable`); the frozen base gets no gradient (the step
differentiates with respect to the trainable part only) and no optimizer state (the optimizer is
initialised on the trainable part), which is where LoRA's memory saving comes from. The train
state keeps the whole tree, so checkpoints, export and evaluation see one parameter tree as
before.
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util

from jaxpref.models import lora
from jaxpref.models.config import ModelConfig


def split(model_cfg: ModelConfig, params: Any) -> tuple[Any, Any]:
  """(trainable, frozen) parameter trees; `join` puts them back together."""
  if model_cfg.lora is None:
    return params, {}
  flat = traverse_util.flatten_dict(params)
  trainable = {path: leaf for path, leaf in flat.items() if lora.is_trainable(path)}
  frozen = {path: leaf for path, leaf in flat.items() if not lora.is_trainable(path)}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def join(trainable: Any, frozen: Any) -> Any:
  """The whole parameter tree from the two parts of `split`."""
  if not frozen:
    return trainable
  flat = traverse_util.flatten_dict(frozen) | traverse_util.flatten_dict(trainable)
  return traverse_util.unflatten_dict(flat)


def trainable_params(model_cfg: ModelConfig, params: Any) -> Any:
  return split(model_cfg, params)[0]
