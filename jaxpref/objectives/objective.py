"""Training objectives: Bradley-Terry ranking, MultiTask, and MORE, as one jittable loss function.

`objective_loss` is meant to sit inside `jax.value_and_grad(..., has_aux=True)` in the train step:
it returns the scalar loss plus `(new_state, metrics)`. All reductions are over the whole
(global) batch it is given, so under `jit` with a batch sharded over many devices, XLA adds the
cross-device sums and every device sees the same task weights and momentum.

MORE (Multi-Objective Reward learning, Zeng et al. 2023) re-weights tasks every step with MGDA
on the reward head: for each task t, g_t is the gradient of that task's mean ranking loss with
respect to the head kernel, with the pooled embeddings held fixed. Because rewards are
`pooled @ kernel (+ bias)`, it has the closed form

    g_t = (1 / P_t) * sum_{b in task t} sum_n  dS_b/dr_bn * pooled_bn,

where S_b is item b's sum of pair terms and P_t the task's pair count. The momentum
`m_t <- (1 - alpha) m_t + alpha g_t`, the normalisation and the min-norm weights follow the paper;
`docs/objectives.md` has the math and each deliberate difference from the official code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxpref.objectives import losses

KINDS = ("ranking", "multitask", "more")
NORMALIZATIONS = ("l2", "loss", "loss+", "none")
# When a task takes part in a step: `pairs`, when the batch holds at least one of its untied pairs
# (jaxpref); `items`, when it holds any of its items, ties included (the official code).
TASK_PRESENCES = ("pairs", "items")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which objective to train with, and its options (`--config.loss.<field>=value`).

  Attributes:
    kind: `ranking` (mean Bradley-Terry loss over the batch), `multitask` (tasks weighted
      uniformly; equal to `ranking` by construction, see docs) or `more` (MGDA task weights).
    more_alpha: MORE momentum coefficient on the new gradient, in (0, 1]; 1 means no momentum.
    more_normalize: how MORE normalises task gradients before MGDA: `l2`, `loss`, `loss+`, `none`.
    margin: subtracted from every reward difference, `-log sigmoid(r_i - r_j - margin)`.
    center_rewards_coef: adds `coef * mean(r^2)` over real responses (keeps rewards centred).
    task_presence: which tasks take part in a step (counted in the loss's task factor T, and
      weighted by MORE): `pairs`, those with at least one untied pair in the batch; `items`,
      those with any item in the batch, ties included, as the official code (a tie-only task
      then gets a MORE weight from its decayed momentum, and T counts it).
  """

  kind: str = "ranking"
  more_alpha: float = 0.99
  more_normalize: str = "l2"
  margin: float = 0.0
  center_rewards_coef: float = 0.0
  task_presence: str = "pairs"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"loss.kind={self.kind!r} is not supported; choose one of {KINDS}")
    if self.more_normalize not in NORMALIZATIONS:
      raise ValueError(
        f"loss.more_normalize={self.more_normalize!r} is not supported; choose one "
        f"of {NORMALIZATIONS}"
      )
    if self.task_presence not in TASK_PRESENCES:
      raise ValueError(
        f"loss.task_presence={self.task_presence!r} is not supported; choose one "
        f"of {TASK_PRESENCES}"
      )
    for field in ("more_alpha", "margin", "center_rewards_coef"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"loss.{field}={value!r} must be a finite number")
    if not 0.0 < self.more_alpha <= 1.0:
      raise ValueError(f"loss.more_alpha={self.more_alpha} must be in (0, 1]")
    if self.center_rewards_coef < 0:
      raise ValueError(f"loss.center_rewards_coef={self.center_rewards_coef} must be >= 0")

  def replace(self, **changes) -> LossConfig:
    return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class ObjectiveState:
  """Per-task state carried across steps (and checkpointed with the train state).

  Attributes:
    momentum_td: MORE's momentum of each task's head gradient, float32 [T, D].
    seen_t: whether task t has been in a batch yet (its first gradient initialises its momentum).
  """

  momentum_td: jax.Array
  seen_t: jax.Array


def init_objective_state(num_tasks: int, hidden_size: int) -> ObjectiveState:
  """The state before any step: zero momentum, no task seen."""
  if num_tasks < 1 or hidden_size < 1:
    raise ValueError(
      f"init_objective_state needs num_tasks >= 1 and hidden_size >= 1, got "
      f"{num_tasks} and {hidden_size}"
    )
  return ObjectiveState(
    momentum_td=jnp.zeros((num_tasks, hidden_size), jnp.float32),
    seen_t=jnp.zeros((num_tasks,), bool),
  )


def task_head_grads(
  rewards_bn: jax.Array,
  scores_bn: jax.Array,
  task_ids_b: jax.Array,
  pooled_bnd: jax.Array,
  *,
  num_tasks: int,
  margin: float | jax.Array = 0.0,
) -> jax.Array:
  """Closed-form gradient of each task's mean ranking loss w.r.t. the linear head's kernel.

  Assumes `rewards_bn = pooled_bnd @ kernel (+ bias)`; embeddings are treated as constants and
  nothing is differentiated through the result. A task without pairs gets a zero gradient.

  Returns:
    grads_td: float32 [num_tasks, D].
  """
  terms_bnn, valid_bnn = losses.pair_terms(
    jax.lax.stop_gradient(rewards_bn).astype(jnp.float32), scores_bn, margin=margin
  )
  return _head_grads(terms_bnn, valid_bnn, _task_onehot(task_ids_b, num_tasks), pooled_bnd)


def _head_grads(terms_bnn, valid_bnn, onehot_bt, pooled_bnd):
  terms_bnn = jax.lax.stop_gradient(terms_bnn)
  pooled_bnd = jax.lax.stop_gradient(pooled_bnd).astype(jnp.float32)
  # A term is -log sigmoid(d) and its derivative in d is -sigmoid(-d) = expm1(-term): each pair
  # pulls r_i up and r_j down by that much. Reusing the terms saves recomputing the sigmoids.
  pull_bnn = jnp.where(valid_bnn, -jnp.expm1(-terms_bnn), 0.0)
  dloss_drewards_bn = jnp.sum(pull_bnn, axis=1) - jnp.sum(pull_bnn, axis=2)
  pairs_t = jnp.einsum("bt,b->t", onehot_bt, jnp.sum(valid_bnn, axis=(1, 2), dtype=jnp.float32))
  grads_td = jnp.einsum(
    "bt,bn,bnd->td", onehot_bt, dloss_drewards_bn, pooled_bnd, precision=_HIGHEST
  )
  return grads_td / jnp.maximum(pairs_t, 1.0)[:, None]


def normalize_task_grads(
  grads_td: jax.Array, task_losses_t: jax.Array, present_t: jax.Array, how: str
) -> jax.Array:
  """MORE's gradient normalisation (as the paper's `gradient_normalizer`), over present tasks.

  `l2`: g / ||g||; `loss`: g / w with w = (loss + 1) normalised to sum 1 over present tasks;
  `loss+`: g / (||g|| * loss); `none`: g. A zero norm or loss divides by 1 instead.
  """
  norms_t = jnp.linalg.norm(grads_td, axis=1)
  safe_norms_t = jnp.where(norms_t > 0, norms_t, 1.0)
  if how == "l2":
    scale_t = safe_norms_t
  elif how == "loss":
    shifted_t = jnp.where(present_t, task_losses_t + 1.0, 0.0)
    scale_t = shifted_t / jnp.maximum(jnp.sum(shifted_t), 1.0)
    scale_t = jnp.where(present_t, scale_t, 1.0)
  elif how == "loss+":
    scale_t = safe_norms_t * jnp.where(task_losses_t > 0, task_losses_t, 1.0)
  elif how == "none":
    return grads_td
  else:
    raise ValueError(
      f"loss.more_normalize={how!r} is not supported; choose one of {NORMALIZATIONS}"
    )
  return grads_td / scale_t[:, None]


def _task_onehot(task_ids_b: jax.Array, num_tasks: int) -> jax.Array:
  # Ids outside [0, num_tasks) match no task (the data pipeline rejects them before jit).
  return (task_ids_b[:, None] == jnp.arange(num_tasks)[None, :]).astype(jnp.float32)


def _check_shapes(rewards_bn, scores_bn, task_ids_b, pooled_bnd, state, num_tasks):
  if rewards_bn.ndim != 2 or scores_bn.shape != rewards_bn.shape:
    raise ValueError(
      f"objective_loss: rewards_bn {rewards_bn.shape} and scores_bn "
      f"{scores_bn.shape} must both be [B, N]"
    )
  if task_ids_b.shape != rewards_bn.shape[:1]:
    raise ValueError(
      f"objective_loss: task_ids_b has shape {task_ids_b.shape}, expected [B={rewards_bn.shape[0]}]"
    )
  if pooled_bnd is not None and (pooled_bnd.ndim != 3 or pooled_bnd.shape[:2] != rewards_bn.shape):
    raise ValueError(
      f"objective_loss: pooled_bnd has shape {pooled_bnd.shape}, expected "
      f"[B, N, D] with [B, N] = {rewards_bn.shape}"
    )
  if state is not None and state.momentum_td.shape[0] != num_tasks:
    raise ValueError(
      f"objective_loss: state holds {state.momentum_td.shape[0]} tasks but num_tasks={num_tasks}"
    )
  if (
    state is not None
    and pooled_bnd is not None
    and state.momentum_td.shape[1] != pooled_bnd.shape[-1]
  ):
    raise ValueError(
      f"objective_loss: state momentum has D={state.momentum_td.shape[1]} but "
      f"pooled_bnd has D={pooled_bnd.shape[-1]}"
    )


def objective_loss(
  loss_cfg: LossConfig,
  state: ObjectiveState | None,
  rewards_bn: jax.Array,
  scores_bn: jax.Array,
  task_ids_b: jax.Array,
  pooled_bnd: jax.Array | None,
  *,
  num_tasks: int,
  margin_b: jax.Array | None = None,
) -> tuple[jax.Array, tuple[ObjectiveState | None, dict[str, Any]]]:
  """The training loss selected by `loss_cfg.kind`, its new state, and its metrics.

  The loss is `T * sum_t w_t * S_t / P (+ coef * mean(r^2))`, where S_t is the sum of task t's
  pair terms, P the batch's pair count, T the number of present tasks (with at least one pair in
  the batch, or with `task_presence=items` at least one item) and w_t (held constant) is uniform
  over those tasks for `ranking`/`multitask` and MGDA's min-norm weights for `more`; absent tasks
  get w_t = 0 and keep their momentum.

  Args:
    loss_cfg: the objective and its options.
    state: per-task state; required for `more`, passed through (may be None) otherwise.
    rewards_bn: rewards from the model (differentiated).
    scores_bn: preference scores (< 0 marks a padded response).
    task_ids_b: task index of each item, in [0, num_tasks).
    pooled_bnd: the embeddings fed to the linear reward head (treated as constants); required
      for `more`; optional otherwise (then `task_grad_norm_t` is reported as 0).
    num_tasks: number of tasks in the run (static).
    margin_b: optional per-item margins replacing `loss_cfg.margin`.

  Returns:
    `(loss, (new_state, metrics))`; metrics are scalars plus `task_*_t` arrays of shape [T].
  """
  kind = loss_cfg.kind
  if kind == "more" and (state is None or pooled_bnd is None):
    raise ValueError("objective_loss: loss.kind='more' needs the objective state and pooled_bnd")
  task_ids_b = jnp.asarray(task_ids_b)
  _check_shapes(rewards_bn, scores_bn, task_ids_b, pooled_bnd, state, num_tasks)
  margin = loss_cfg.margin if margin_b is None else margin_b
  rewards_bn = rewards_bn.astype(jnp.float32)

  # Per item, then per task: the one visible place where tasks are reduced and weighted.
  terms_bnn, valid_bnn = losses.pair_terms(rewards_bn, scores_bn, margin=margin)
  correct_bnn = valid_bnn & (rewards_bn[:, :, None] > rewards_bn[:, None, :])
  onehot_bt = _task_onehot(task_ids_b, num_tasks)
  task_sums_t = jnp.einsum("bt,b->t", onehot_bt, jnp.sum(terms_bnn, axis=(1, 2)))
  task_pairs_t = jnp.einsum(
    "bt,b->t", onehot_bt, jnp.sum(valid_bnn, axis=(1, 2), dtype=jnp.float32)
  )
  task_correct_t = jnp.einsum(
    "bt,b->t", onehot_bt, jnp.sum(correct_bnn, axis=(1, 2), dtype=jnp.float32)
  )
  has_pairs_t = task_pairs_t > 0
  if loss_cfg.task_presence == "items":
    # Any real response makes an item; rows that only fill a batch (all scores < 0) do not.
    has_item_b = jnp.any(scores_bn >= 0, axis=1).astype(jnp.float32)
    present_t = has_pairs_t | (jnp.einsum("bt,b->t", onehot_bt, has_item_b) > 0)
  else:
    present_t = has_pairs_t
  num_present = jnp.sum(present_t, dtype=jnp.float32)
  task_losses_t = jax.lax.stop_gradient(task_sums_t) / jnp.maximum(task_pairs_t, 1.0)
  uniform_t = present_t.astype(jnp.float32) / jnp.maximum(num_present, 1.0)

  if pooled_bnd is not None:
    grads_td = _head_grads(terms_bnn, valid_bnn, onehot_bt, pooled_bnd)
  else:
    grads_td = jnp.zeros((num_tasks, 1), jnp.float32)

  new_state = state
  if kind == "more":
    alpha = loss_cfg.more_alpha
    # A present task without pairs (task_presence=items) has a zero gradient: its momentum
    # decays, as in the official code. One never seen has no direction yet and no weight.
    weighted_t = present_t & (has_pairs_t | state.seen_t)
    blended_td = jnp.where(
      state.seen_t[:, None], (1.0 - alpha) * state.momentum_td + alpha * grads_td, grads_td
    )
    momentum_td = jnp.where(weighted_t[:, None], blended_td, state.momentum_td)
    new_state = ObjectiveState(momentum_td=momentum_td, seen_t=state.seen_t | has_pairs_t)
    vectors_td = normalize_task_grads(
      momentum_td, task_losses_t, weighted_t, loss_cfg.more_normalize
    )
    weights_t = losses.min_norm_weights(vectors_td, weighted_t)
  else:
    weights_t = uniform_t
  weights_t = jax.lax.stop_gradient(weights_t)

  if kind == "ranking":
    rank_loss = losses.ranking_loss(rewards_bn, scores_bn, margin=margin)
  else:
    total_pairs = jnp.sum(task_pairs_t)
    rank_loss = num_present * jnp.sum(weights_t * task_sums_t) / jnp.maximum(total_pairs, 1.0)

  real_bn = (scores_bn >= 0).astype(jnp.float32)
  reward_sq_mean = jnp.sum(real_bn * rewards_bn**2) / jnp.maximum(jnp.sum(real_bn), 1.0)
  loss = rank_loss
  if loss_cfg.center_rewards_coef:
    loss = loss + loss_cfg.center_rewards_coef * reward_sq_mean

  all_pairs = jnp.sum(valid_bnn, dtype=jnp.float32)
  metrics = {
    "loss": loss,
    "ranking_loss": jnp.sum(terms_bnn) / jnp.maximum(all_pairs, 1.0),
    "accuracy": jnp.sum(correct_bnn, dtype=jnp.float32) / jnp.maximum(all_pairs, 1.0),
    "pairs": all_pairs,
    "tasks_present": num_present,
    "reward_sq_mean": reward_sq_mean,
    "task_loss_t": task_losses_t,
    "task_accuracy_t": task_correct_t / jnp.maximum(task_pairs_t, 1.0),
    "task_weight_t": weights_t,
    "task_grad_norm_t": jnp.linalg.norm(grads_td, axis=1),
    "task_pairs_t": task_pairs_t,
  }
  metrics = jax.tree.map(jax.lax.stop_gradient, metrics)
  return loss, (new_state, metrics)
