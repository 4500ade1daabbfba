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

Batch = dict[str, jax.Array]


def _loss_fn(
  params,
  objective_state,
  batch: Batch,
  *,
  model_cfg: ModelConfig,
  loss_cfg: objectives.LossConfig,
  num_tasks: int,
):
  rewards_bn, pooled_bnd = scoring.score_batch(model_cfg, params, batch)
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
  grad_fn = jax.value_and_grad(
    functools.partial(_loss_fn, model_cfg=model_cfg, loss_cfg=loss_cfg, num_tasks=num_tasks),
    has_aux=True,
  )
  if grad_accum_steps > 1 and "packed_input_ids" in batch:
    raise ValueError(
      "data.packing does not support train.grad_accum_steps > 1 (packed rows do "
      "not split into micro-batches of whole items); use one or the other"
    )
  if grad_accum_steps == 1:
    (loss, (objective_state, metrics)), grads = grad_fn(state.params, state.objective, batch)
  else:
    micro = _split_microbatches(batch, grad_accum_steps)

    def accumulate(carry, micro_batch):
      grads_sum, objective_state = carry
      (loss, (objective_state, metrics)), grads = grad_fn(
        state.params, objective_state, micro_batch
      )
      grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
      return (grads_sum, objective_state), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, objective_state), (losses, metrics_m) = jax.lax.scan(
      accumulate, (zeros, state.objective), micro
    )
    grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    loss = losses.mean()
    metrics = jax.tree.map(lambda m: m.mean(0), metrics_m)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
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
