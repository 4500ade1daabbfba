"""The pure train step: `train_step(state, batch) -> (state, metrics)`, jitted once by the trainer.

The loss is the objectives module's (ranking, MultiTask or MORE) applied to the shared
`scoring.score_fn`. Gradient accumulation scans over micro-batches inside the step, threading the
MORE state through them, so one compiled step consumes one global batch.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxpref import objectives, scoring
from jaxpref.models.config import ModelConfig
from jaxpref.train_state import TrainState
from jaxpref.training import trainable

Batch = dict[str, jax.Array]


def _loss_fn(
  params,
  objective_state,
  batch: Batch,
  *,
  model_cfg: ModelConfig,
  loss_cfg: objectives.LossConfig,
  num_tasks: int,
  frozen_params=None,
  dropout_rng=None,
):
  # `params` is the trainable part; the frozen part (LoRA's base) gets no gradient.
  params = trainable.join(params, frozen_params)
  rewards_bn, pooled_bnd = scoring.score_batch(model_cfg, params, batch, dropout_rng=dropout_rng)
  loss, (new_objective_state, metrics) = objectives.objective_loss(
    loss_cfg,
    objective_state,
    rewards_bn,
    batch["scores"],
    batch["task_ids"],
    pooled_bnd,
    num_tasks=num_tasks,
  )
  return loss, (new_objective_state, metrics)


def _split_microbatches(batch: Batch, num_micro: int) -> Batch:
  # Rows are interleaved (row r goes to micro-batch r % num_micro) so that a batch laid out task by
  # task still gives every micro-batch items of every task.
  return jax.tree.map(
    lambda x: x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1), batch
  )


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  model_cfg: ModelConfig,
  loss_cfg: objectives.LossConfig,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  num_tasks: int,
  grad_accum_steps: int = 1,
) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer update on one global batch (see module docstring)."""
  train_params, frozen_params = trainable.split(model_cfg, state.params)
  grad_fn = jax.value_and_grad(
    functools.partial(
      _loss_fn,
      model_cfg=model_cfg,
      loss_cfg=loss_cfg,
      num_tasks=num_tasks,
      frozen_params=frozen_params,
    ),
    has_aux=True,
  )
  use_dropout = model_cfg.lora is not None and model_cfg.lora.dropout > 0
  dropout_rngs = [None] * grad_accum_steps
  if use_dropout:
    dropout_rngs = jax.random.split(jax.random.fold_in(state.rng, state.step), grad_accum_steps)
  if grad_accum_steps > 1 and "packed_input_ids" in batch:
    raise ValueError(
      "data.packing does not support train.grad_accum_steps > 1 (packed rows do "
      "not split into micro-batches of whole items); use one or the other"
    )
  if grad_accum_steps == 1:
    (loss, (objective_state, metrics)), grads = grad_fn(
      train_params, state.objective, batch, dropout_rng=dropout_rngs[0]
    )
  else:
    micro = _split_microbatches(batch, grad_accum_steps)

    def accumulate(carry, micro_and_rng):
      grads_sum, objective_state = carry
      micro_batch, dropout_rng = micro_and_rng
      (loss, (objective_state, metrics)), grads = grad_fn(
        train_params, objective_state, micro_batch, dropout_rng=dropout_rng
      )
      grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
      return (grads_sum, objective_state), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, train_params)
    (grads, objective_state), (losses, metrics_m) = jax.lax.scan(
      accumulate,
      (zeros, state.objective),
      (micro, dropout_rngs if use_dropout else None),
    )
    grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    loss = losses.mean()
    metrics = jax.tree.map(lambda m: m.mean(0), metrics_m)

  updates, opt_state = optimizer.update(grads, state.opt_state, train_params)
  params = trainable.join(optax.apply_updates(train_params, updates), frozen_params)
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state, objective=objective_state
  )
  metrics = dict(metrics)
  metrics["loss"] = loss
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics["learning_rate"] = schedule(state.step)
  # Real tokens and the positions computed for them (padding included): their ratio is the
  # bucketing / packing efficiency.
  metrics["tokens"], positions = scoring.batch_tokens(batch)
  metrics["positions"] = jnp.asarray(positions, jnp.float32)
  return new_state, metrics
