"""Model configuration shared by every backbone.

One flat, frozen dataclass so that `--config.model.<field>=value` overrides work for every
architecture; fields that an architecture does not use are ignored by it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxpref.models.lora import LoraConfig

# Every architecture name; `jaxpref.models.registry.ARCHS` holds their implementations (a test
# checks the two agree). Kept here as plain names so that the config validates without importing
# the networks.
ARCHS = ("gpt_neox", "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3", "bert")
LAYER_TYPES = ("full_attention", "sliding_attention")
POOLINGS = ("last", "eos", "mean", "max", "cls", "pooler")
ATTENTIONS = ("auto", "blocked", "dense", "cudnn", "splash")  # jaxpref.models.attention


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a reward model.

  Attributes mirror the Hugging Face config fields of the same meaning; `from_hf` in
  `jaxpref.models.hf_io` translates a `config.json` into this class.
  """

  arch: str = "gpt_neox"
  vocab_size: int = 512
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 0  # 0 means num_heads (no grouped-query attention).
  head_dim: int = 0  # 0 means hidden_size // num_heads.
  intermediate_size: int = 256
  max_position_embeddings: int = 2048
  norm_eps: float = 1e-5
  hidden_act: str = "gelu"
  initializer_range: float = 0.02
  # Rotary position embeddings (GPT-NeoX and Llama).
  rotary_pct: float = 1.0
  rope_theta: float = 10000.0
  # Hugging Face `rope_scaling` as sorted (key, value) items so the config stays hashable.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  # GPT-NeoX.
  use_parallel_residual: bool = True
  # Llama: biases on q/k/v/o projections and on the MLP.
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  # Sliding-window attention (Mistral, Qwen2/3, Gemma): a query sees the `sliding_window` latest
  # keys (itself included) on the layers whose `layer_types` entry is "sliding_attention"; an
  # empty `layer_types` means every layer slides when `sliding_window` > 0.
  sliding_window: int = 0
  layer_types: tuple[str, ...] = ()
  # RoPE base of the sliding layers (Gemma-3); 0 means `rope_theta`. Sliding layers never scale.
  rope_local_theta: float = 0.0
  # Gemma: scores scaled by query_pre_attn_scalar ** -0.5 (0 means head_dim) and soft-capped as
  # cap * tanh(score / cap) (0 means no cap).
  query_pre_attn_scalar: float = 0.0
  attn_logit_softcap: float = 0.0
  # Mixture of experts (Qwen3-MoE): every layer's MLP is `num_experts` gated MLPs of
  # `moe_intermediate_size`, `num_experts_per_tok` of them chosen per token by a softmax router.
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = False
  # BERT.
  type_vocab_size: int = 2
  # Special tokens (used by `eos` pooling and by tokenisation).
  pad_token_id: int | None = None
  eos_token_id: int | None = None
  bos_token_id: int | None = None
  # Reward head.
  pooling: str = "last"
  head_bias: bool = False
  # Numerics and memory.
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  # Causal self-attention (`jaxpref.models.attention`): "auto" picks per backend ("cudnn" on GPU,
  # "splash" on TPU, "blocked" on CPU). "blocked" splits the queries into blocks of
  # `attention_block` rows, skips the key blocks above the diagonal and recomputes each block's
  # probabilities in the backward pass (saves ~3/8 of the attention FLOPs at 4 blocks and keeps
  # O(L * block) instead of O(L^2) residuals per layer); "dense" is one XLA
  # `jax.nn.dot_product_attention` over all of L; "cudnn" / "splash" are the fused kernels, with
  # a logged fall-back to "blocked" where they cannot express a case. Same numbers every way (up
  # to float rounding); encoders (BERT) always use "dense".
  attention: str = "auto"
  attention_block: int = 128
  # Low-rank adapters on the backbone (`jaxpref.models.lora`); None = every parameter trains.
  lora: LoraConfig | None = None

  def __post_init__(self):
    # JSON (model_config.json) gives a list; the config must stay hashable (a static jit argument).
    object.__setattr__(self, "layer_types", tuple(self.layer_types or ()))
    if self.arch not in ARCHS:
      raise ValueError(f"model.arch={self.arch!r} is not supported; choose one of {ARCHS}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"model.pooling={self.pooling!r} is not supported; choose one of {POOLINGS}")
    if self.hidden_size % self.num_heads and not self.head_dim:
      raise ValueError(
        f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
        f"{self.num_heads}; set model.head_dim explicitly"
      )
    if self.kv_heads and self.num_heads % self.kv_heads:
      raise ValueError(
        f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads={self.kv_heads}"
      )
    if self.layer_types and len(self.layer_types) != self.num_layers:
      raise ValueError(
        f"model.layer_types has {len(self.layer_types)} entries but model.num_layers="
        f"{self.num_layers}"
      )
    bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
    if bad:
      raise ValueError(f"model.layer_types: {bad} unknown; use {LAYER_TYPES}")
    if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise ValueError(
        f"model.num_experts_per_tok={self.num_experts_per_tok} must be in [1, "
        f"model.num_experts={self.num_experts}]"
      )
    if self.attention not in ATTENTIONS:
      raise ValueError(
        f"model.attention={self.attention!r} is not supported; choose one of {ATTENTIONS}"
      )
    if self.attention_block < 1:
      raise ValueError(f"model.attention_block={self.attention_block} must be >= 1")
    for field in ("param_dtype", "dtype"):
      if getattr(self, field) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.{field}={getattr(self, field)!r}: use float32 or bfloat16")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: whether it uses the sliding window."""
    if not self.sliding_window:
      return (False,) * self.num_layers
    if not self.layer_types:
      return (True,) * self.num_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)


def freeze_rope_scaling(rope_scaling: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
  """Turns a Hugging Face `rope_scaling` dict into the hashable form ModelConfig stores."""
  if not rope_scaling:
    return None
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope_scaling.items()))
