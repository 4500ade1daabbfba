"""The reward model: a backbone, a pooling of its last hidden states, and a linear head.

Everything that crosses `jit` is a pytree: `init_params(cfg, rng) -> params` and
`apply(cfg, params, input_ids_bl, attention_mask_bl) -> outputs`. Parameters are stored unboxed;
their logical axis names come from `logical_axes(cfg)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpref.models import layers, lora, registry
from jaxpref.models.config import ModelConfig


def last_token_index(attention_mask_bl: jax.Array) -> jax.Array:
  """Index of the last real token of each row (works for left and right padding)."""
  positions_l = jnp.arange(attention_mask_bl.shape[-1])
  return jnp.maximum(jnp.max(jnp.where(attention_mask_bl > 0, positions_l, -1), axis=-1), 0)


def first_token_index(attention_mask_bl: jax.Array) -> jax.Array:
  """Index of the first real token of each row (0 for right padding)."""
  return jnp.argmax(attention_mask_bl > 0, axis=-1)


def _gather_b(hidden_bld: jax.Array, index_b: jax.Array) -> jax.Array:
  return jnp.take_along_axis(hidden_bld, index_b[:, None, None], axis=1)[:, 0]


def pool(
  hidden_bld: jax.Array,
  attention_mask_bl: jax.Array,
  input_ids_bl: jax.Array,
  pooling: str,
  eos_token_id: int | None,
) -> jax.Array:
  """Pools hidden states into one vector per sequence.

  Args:
    hidden_bld: final hidden states.
    attention_mask_bl: 1 on real tokens, 0 on padding (either side).
    input_ids_bl: token ids (used by `eos` pooling).
    pooling: `last` (last real token, what HF `*ForSequenceClassification` uses), `eos` (last
      occurrence of `eos_token_id`, else the last real token), `mean`, `max`, `cls`/`pooler`
      (first real token; `pooler` adds BERT's dense+tanh in `RewardModel`).
    eos_token_id: id used by `eos` pooling.

  Returns:
    pooled_bd.
  """
  mask_bl = attention_mask_bl > 0
  if pooling == "last":
    return _gather_b(hidden_bld, last_token_index(attention_mask_bl))
  if pooling == "eos":
    if eos_token_id is None:
      raise ValueError("model.pooling='eos' needs model.eos_token_id")
    is_eos_bl = mask_bl & (input_ids_bl == eos_token_id)
    positions_l = jnp.arange(input_ids_bl.shape[-1])
    eos_b = jnp.max(jnp.where(is_eos_bl, positions_l, -1), axis=-1)
    index_b = jnp.where(eos_b >= 0, eos_b, last_token_index(attention_mask_bl))
    return _gather_b(hidden_bld, index_b)
  if pooling in ("cls", "pooler"):
    return _gather_b(hidden_bld, first_token_index(attention_mask_bl))
  hidden32_bld = hidden_bld.astype(jnp.float32)
  if pooling == "mean":
    weights_bl = mask_bl.astype(jnp.float32)
    total_bd = jnp.einsum("bld,bl->bd", hidden32_bld, weights_bl)
    return total_bd / jnp.maximum(weights_bl.sum(-1, keepdims=True), 1.0)
  if pooling == "max":
    masked_bld = jnp.where(mask_bl[..., None], hidden32_bld, -jnp.inf)
    pooled_bd = jnp.max(masked_bld, axis=1)
    return jnp.where(jnp.isfinite(pooled_bd), pooled_bd, 0.0)
  raise ValueError(f"unknown pooling {pooling!r}")


def packable(cfg: ModelConfig) -> bool:
  """Whether packed rows give this model's rewards: a causal decoder (segments must not see later
  ones) with `last` pooling."""
  return registry.get(cfg.arch).decoder and cfg.pooling == "last"


def check_packable(cfg: ModelConfig) -> None:
  """Refuses packed rows for a model that is not `packable`."""
  if not packable(cfg):
    raise ValueError(
      f"data.packing needs a decoder with last-token pooling; model.arch={cfg.arch!r}, "
      f"model.pooling={cfg.pooling!r}"
    )


def gather_flat(hidden_rld: jax.Array, flat_index_s: jax.Array) -> jax.Array:
  """Rows `flat_index_s` (row * L + column; -1 gives zeros) of the flattened [R * L, D] states.

  A one-hot contraction rather than a gather: with rows sharded over devices it is a local
  product and an all-reduce of [S, D], where a gather would collect every row first.
  """
  r, length, _ = hidden_rld.shape
  onehot_srl = (flat_index_s[:, None] == jnp.arange(r * length)[None]).reshape(-1, r, length)
  return jnp.einsum("srl,rld->sd", onehot_srl.astype(hidden_rld.dtype), hidden_rld)


class RewardModel(nn.Module):
  """Backbone -> pooling -> linear head with one output (no bias unless `cfg.head_bias`)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    input_ids_bl: jax.Array,
    attention_mask_bl: jax.Array,
    *,
    output_hidden_states: bool = False,
    packed: dict[str, jax.Array] | None = None,
  ) -> dict[str, Any]:
    cfg = self.cfg
    # A backbone is called as `backbone(input_ids_bl, attention_mask_bl, output_hidden_states=..)`
    # (decoders also take `segment_ids_bl`, `positions_bl`, `branch_ids_bl`) and returns
    # `(hidden_bld, states)`: the final (normed) hidden states and, if asked, what Hugging Face
    # returns with `output_hidden_states=True` stacked as [num_layers + 1, B, L, D].
    backbone = registry.get(cfg.arch).backbone(cfg, "backbone")
    # LoRA (cfg.lora) adds its adapters to the backbone's targeted dense layers; else a no-op.
    with lora.adapters(cfg) as lora_matched:
      if packed is None:
        hidden_bld, hidden_states = backbone(
          input_ids_bl, attention_mask_bl, output_hidden_states=output_hidden_states
        )
        pooled_bd = pool(hidden_bld, attention_mask_bl, input_ids_bl, cfg.pooling, cfg.eos_token_id)
      else:
        check_packable(cfg)
        hidden_rld, hidden_states = backbone(
          input_ids_bl,
          attention_mask_bl,
          output_hidden_states=output_hidden_states,
          segment_ids_bl=packed["segment_ids"],
          positions_bl=packed["positions"],
          branch_ids_bl=packed.get("branch_ids"),
        )
        pooled_bd = gather_flat(hidden_rld, packed["last_index"])
    if cfg.lora is not None and self.is_initializing():
      lora.check_targets(cfg, lora_matched)
    if cfg.pooling == "pooler":
      pooled_bd = jnp.tanh(
        layers.dense(cfg, cfg.hidden_size, ("embed", "mlp"), use_bias=True, name="pooler")(
          pooled_bd
        )
      )
    # The head runs in float32 whatever the compute dtype: rewards feed sigmoids of differences.
    pooled_bd = pooled_bd.astype(jnp.float32)
    head = nn.Dense(
      1,
      use_bias=cfg.head_bias,
      dtype=jnp.float32,
      param_dtype=cfg.jnp_param_dtype,
      kernel_init=nn.with_logical_partitioning(layers.normal_init(cfg), ("embed", None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
      name="score",
    )
    rewards_b = head(pooled_bd)[:, 0]
    outputs = {"rewards": rewards_b, "pooled": pooled_bd}
    if output_hidden_states:
      outputs["hidden_states"] = hidden_states
    return outputs


def _dummy_inputs():
  return jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Randomly initialised parameters (unboxed), as transformers would initialise them."""
  boxed = RewardModel(cfg).init(rng, *_dummy_inputs())["params"]
  return nn.meta.unbox(boxed)


def abstract_params(cfg: ModelConfig) -> dict:
  """Shapes and dtypes of the parameters, with no weights materialised."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def logical_axes(cfg: ModelConfig) -> dict:
  """A pytree of `PartitionSpec`s of logical axis names, one per parameter."""
  boxed = jax.eval_shape(lambda: RewardModel(cfg).init(jax.random.key(0), *_dummy_inputs()))
  return nn.get_partition_spec(boxed)["params"]


def apply(
  cfg: ModelConfig,
  params: dict,
  input_ids_bl: jax.Array,
  attention_mask_bl: jax.Array,
  *,
  output_hidden_states: bool = False,
  packed: dict[str, jax.Array] | None = None,
  dropout_rng: jax.Array | None = None,
) -> dict[str, Any]:
  """Runs the reward model. Returns `rewards` [B] (float32), `pooled` [B, D] and, if asked,
  `hidden_states` [num_layers + 1, B, L, D].

  With `packed` ({"segment_ids", "positions" [R, L], "last_index" [S], optionally
  "branch_ids" [R, L] for shared prompts}, see `jaxpref.data.packing`), the inputs are packed
  rows [R, L] and the outputs are per sequence:
  `rewards` [S], `pooled` [S, D]; `hidden_states` stays per row.

  `dropout_rng` turns on dropout where the model has some (LoRA's `lora.dropout`, in training).
  """
  return RewardModel(cfg).apply(
    {"params": params},
    input_ids_bl,
    attention_mask_bl,
    output_hidden_states=output_hidden_states,
    packed=packed,
    rngs=None if dropout_rng is None else {"dropout": dropout_rng},
  )


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
