"""Reward models: GPT-NeoX (Pythia), Llama family and BERT-style encoders."""

from jaxpref.models.config import ModelConfig
from jaxpref.models.reward_model import (
  RewardModel,
  abstract_params,
  apply,
  count_params,
  init_params,
  logical_axes,
  pool,
)

__all__ = [
  "ModelConfig",
  "RewardModel",
  "abstract_params",
  "apply",
  "count_params",
  "init_params",
  "logical_axes",
  "pool",
]
