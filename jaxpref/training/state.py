"""The train state pytree, the optimizer, and their sharded initialisation."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from jaxpref import sharding
from jaxpref.models import lora, reward_model
from jaxpref.models.config import ModelConfig
from jaxpref.objectives import objective as objectives
from jaxpref.training import trainable


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed as one pytree."""

  step: jax.Array
  params: Any
  opt_state: Any
  objective: Any  # objectives.ObjectiveState (MORE momentum); tiny and replicated.


def learning_rate_schedule(train: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine / linear decay to `end_lr_fraction` of the peak, or constant."""
  peak, warmup = train.learning_rate, train.warmup_steps
  decay_steps = max(total_steps - warmup, 1)
  end = peak * train.end_lr_fraction
  if train.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=train.end_lr_fraction)
  elif train.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif train.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"train.schedule={train.schedule!r}: use cosine, linear or constant")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(
  train: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with gradient clipping; weight decay skips biases and norm scales (1-d parameters)."""
  schedule = learning_rate_schedule(train, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  chain = []
  if train.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(train.grad_clip))
  chain.append(
    optax.adamw(
      schedule,
      b1=train.b1,
      b2=train.b2,
      eps=train.eps,
      weight_decay=train.weight_decay,
      mask=decay_mask,
    )
  )
  return optax.chain(*chain), schedule


def init_state(
  model_cfg: ModelConfig,
  optimizer: optax.GradientTransformation,
  num_tasks: int,
  rng: jax.Array,
  params=None,
) -> TrainState:
  """A fresh state; random parameters unless `params` is given."""
  # The first half of a split, as before `TrainState.rng` was removed: same seed, same init.
  init_rng, _ = jax.random.split(rng)
  if params is None:
    params = reward_model.init_params(model_cfg, init_rng)
  else:  # Loaded weights: LoRA's adapters start fresh (a no-op without LoRA).
    params = lora.with_fresh_adapters(model_cfg, params, init_rng)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    # Only the trainable part has optimizer state (all of it unless LoRA freezes the base).
    opt_state=optimizer.init(trainable.trainable_params(model_cfg, params)),
    objective=objectives.init_objective_state(num_tasks, model_cfg.hidden_size),
  )


def state_shardings(model_cfg: ModelConfig, abstract_state: TrainState, mesh: Mesh):
  """NamedShardings of the whole state: parameters (and their Adam moments) by logical names,
  everything else replicated."""
  param_specs = reward_model.logical_axes(model_cfg)
  param_shardings = sharding.tree_shardings(abstract_state.params, param_specs, mesh)
  replicated = sharding.replicated(mesh)
  by_path = {
    _path_key(path): (leaf.shape, param_sharding)
    for (path, leaf), param_sharding in zip(
      jax.tree_util.tree_flatten_with_path(abstract_state.params)[0],
      jax.tree.leaves(param_shardings),
    )
  }

  def opt_leaf_sharding(path, leaf):
    # Adam's moments mirror the parameters (possibly inside masked / chained optax states): a leaf
    # whose path ends with a parameter's path and has its shape is sharded like that parameter.
    keys = _path_key(path)
    for start in range(len(keys)):
      match = by_path.get(keys[start:])
      if match is not None and match[0] == getattr(leaf, "shape", None):
        return match[1]
    return replicated

  opt_shardings = jax.tree_util.tree_map_with_path(opt_leaf_sharding, abstract_state.opt_state)
  return TrainState(
    step=replicated,
    params=param_shardings,
    opt_state=opt_shardings,
    objective=jax.tree.map(lambda _: replicated, abstract_state.objective),
  )


def _path_key(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
