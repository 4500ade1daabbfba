"""Reward models: GPT-NeoX, Llama, Mistral, Qwen2/3, Qwen3-MoE, Gemma-2/3 and BERT backbones."""

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
