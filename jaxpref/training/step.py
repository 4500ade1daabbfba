"""The pure train step `train_step(state, batch) -> (state, metrics)` and its one builder.

`build_train_step` / `build_from_config` jit it once with the state's shardings and donation;
the trainer, `jaxpref.aot`, the benchmarks and the tests all use that builder.

The loss is the objectives module's (ranking, MultiTask or MORE) applied to the shared
`scoring.score_fn`. Gradient accumulation scans over micro-batches inside the step, threading the
MORE state through them, so one compiled step consumes one global batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from jaxpref.data.batch import PackedBatch, TrainBatch
from jaxpref.evaluation import scoring
from jaxpref.models import attention, lora
from jaxpref.models.config import ModelConfig
from jaxpref.objectives import objective as objectives
from jaxpref.training import state as train_state
from jaxpref.training import trainable
from jaxpref.training.state import TrainState

Batch = TrainBatch


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
    batch.scores,
    batch.task_ids,
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
  seed: int = 0,
) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer update on one global batch (see module docstring); `seed` seeds dropout."""
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
  # LoRA's dropout: one key per step (and micro-batch), a function of the state, so resume is exact.
  use_dropout = model_cfg.lora is not None and model_cfg.lora.dropout > 0
  dropout_rngs = [None] * grad_accum_steps
  if use_dropout:
    step_key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    dropout_rngs = jax.random.split(step_key, grad_accum_steps)
  if grad_accum_steps > 1 and isinstance(batch, PackedBatch):
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
  metrics["tokens"], positions = batch.tokens()
  metrics["positions"] = jnp.asarray(positions, jnp.float32)
  return new_state, metrics


def loss_config(loss: ml_collections.ConfigDict) -> objectives.LossConfig:
  """The typed objective settings of `config.loss`."""
  return objectives.LossConfig(
    kind=loss.kind,
    more_alpha=loss.more_alpha,
    more_normalize=loss.more_normalize,
    margin=loss.margin,
    center_rewards_coef=loss.center_rewards_coef,
    task_presence=loss.get("task_presence", "pairs"),
  )


# The abstract PRNG key `init_state` is traced with (`jax.random.PRNGKey`'s shape and type).
_ABSTRACT_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """The train step and everything built with it, made once by `build_train_step`.

  The trainer, `jaxpref.aot`, the benchmarks and the tests all take their step from here, so a
  timed or compiled step is the product's step: same optimizer chain, objective, shardings and
  donation.

  Attributes:
    model_cfg, loss_cfg, optimizer, schedule, num_tasks, grad_accum_steps: what the step closes
      over.
    mesh: the device mesh, or None for a plain single-device jit (tests, host benchmarks).
    abstract_state: shapes and dtypes of the TrainState (no shardings).
    state_shardings: NamedShardings of every state leaf (None without a mesh).
    step_fn: `step_fn(state, batch) -> (state, metrics)`, jitted; the state is donated.
  """

  model_cfg: ModelConfig
  loss_cfg: objectives.LossConfig
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  num_tasks: int
  grad_accum_steps: int
  mesh: Mesh | None
  abstract_state: TrainState
  state_shardings: TrainState | None
  step_fn: Callable[[TrainState, Batch], tuple[TrainState, dict[str, Any]]]

  def init(self, rng: jax.Array, params: Any = None) -> TrainState:
    """A fresh state, initialised under jit straight into its shards (random unless `params`)."""
    init_fn = functools.partial(
      train_state.init_state, self.model_cfg, self.optimizer, self.num_tasks
    )
    if params is None:
      return jax.jit(init_fn, out_shardings=self.state_shardings)(rng)
    if self.state_shardings is not None:  # LoRA's adapters are not loaded: init_state adds them.
      params = jax.device_put(params, lora.without_adapters(self.state_shardings.params))
    return jax.jit(lambda r, p: init_fn(r, params=p), out_shardings=self.state_shardings)(
      rng, params
    )

  def abstract_sharded_state(self) -> TrainState:
    """`abstract_state` with each leaf's sharding attached (for restore and AOT lowering)."""
    if self.state_shardings is None:
      return self.abstract_state
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      self.abstract_state,
      self.state_shardings,
    )


def _traced_on(mesh: Mesh, fn: Callable) -> Callable:
  """`fn`, traced with `mesh` as the attention kernels' mesh (`jaxpref.models.attention`): Pallas
  kernels then run per shard, and `model.attention=auto` resolves for the mesh's platform."""

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with attention.kernel_mesh(mesh):
      return fn(*args, **kwargs)

  return traced


def build_train_step(
  model_cfg: ModelConfig,
  *,
  loss_cfg: objectives.LossConfig,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  num_tasks: int,
  mesh: Mesh | None = None,
  grad_accum_steps: int = 1,
  seed: int = 0,
) -> TrainProgram:
  """Jits `train_step` once for this model, objective and optimizer (on `mesh` when given)."""
  init_fn = functools.partial(train_state.init_state, model_cfg, optimizer, num_tasks)
  abstract_state = jax.eval_shape(init_fn, _ABSTRACT_KEY)
  step = functools.partial(
    train_step,
    model_cfg=model_cfg,
    loss_cfg=loss_cfg,
    optimizer=optimizer,
    schedule=schedule,
    num_tasks=num_tasks,
    grad_accum_steps=grad_accum_steps,
    seed=seed,
  )
  if mesh is None:
    state_shardings = None
    step_fn = jax.jit(step, donate_argnums=0)
  else:
    state_shardings = train_state.state_shardings(model_cfg, abstract_state, mesh)
    step = _traced_on(mesh, step)
    step_fn = jax.jit(
      step,
      in_shardings=(state_shardings, None),
      out_shardings=(state_shardings, None),
      donate_argnums=0,
    )
  return TrainProgram(
    model_cfg=model_cfg,
    loss_cfg=loss_cfg,
    optimizer=optimizer,
    schedule=schedule,
    num_tasks=num_tasks,
    grad_accum_steps=grad_accum_steps,
    mesh=mesh,
    abstract_state=abstract_state,
    state_shardings=state_shardings,
    step_fn=step_fn,
  )


def build_from_config(
  config: ml_collections.ConfigDict,
  model_cfg: ModelConfig,
  *,
  num_tasks: int,
  total_steps: int,
  mesh: Mesh | None,
) -> TrainProgram:
  """The trainer's step for `config`: its objective, AdamW chain and schedule, and mesh."""
  optimizer, schedule = train_state.make_optimizer(config.train, max(1, total_steps))
  return build_train_step(
    model_cfg,
    loss_cfg=loss_config(config.loss),
    optimizer=optimizer,
    schedule=schedule,
    num_tasks=num_tasks,
    mesh=mesh,
    grad_accum_steps=config.train.grad_accum_steps,
    seed=config.train.seed,
  )
