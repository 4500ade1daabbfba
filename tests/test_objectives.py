"""Tests for jaxpref.objectives.objective: ranking, MultiTask and MORE.

MORE is checked against `jax.grad` of each task's loss, against the two-task closed form, and
against a step-by-step re-creation of the paper's host-side procedure in PyTorch (a CPU copy of
the head, one backward per task, momentum, normalisation) with scipy as the min-norm solver.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.objectives import losses
from jaxpref.objectives import objective as objectives
from jaxpref.objectives.objective import LossConfig

NUM_TASKS = 3
DIM = 8


def _batch(seed, num_items=12, num_responses=2, num_tasks=NUM_TASKS, absent=()):
  """A random batch whose rewards come from a linear head on pooled embeddings."""
  rng = np.random.default_rng(seed)
  pooled = rng.normal(size=(num_items, num_responses, DIM)).astype(np.float32)
  kernel = rng.normal(size=(DIM,)).astype(np.float32) * 0.5
  bias = np.float32(0.3)
  scores = rng.integers(0, 3, size=(num_items, num_responses)).astype(np.float32)
  scores[:, 0] = 3.0  # at least one real pair per item, plus some ties among the others
  if num_responses > 2:
    scores[::4, -1] = -1.0  # pads
  present = [t for t in range(num_tasks) if t not in absent]
  task_ids = np.asarray(present, np.int32)[rng.integers(0, len(present), size=num_items)]
  task_ids[: len(present)] = present  # every non-absent task has an item
  return dict(pooled=pooled, kernel=kernel, bias=bias, scores=scores, task_ids=task_ids)


def _rewards(kernel, bias, pooled):
  return jnp.einsum("bnd,d->bn", pooled, kernel, precision="highest") + bias


@functools.partial(jax.jit, static_argnames=("cfg", "num_tasks"))
def _value_and_grad(cfg, state, rewards, scores, task_ids, pooled, margin_b, *, num_tasks):
  def loss_fn(rewards, state):
    return objectives.objective_loss(
      cfg, state, rewards, scores, task_ids, pooled, num_tasks=num_tasks, margin_b=margin_b
    )

  return jax.value_and_grad(loss_fn, has_aux=True)(rewards, state)


def _run(cfg, state, batch, num_tasks=NUM_TASKS, margin_b=None):
  """objective_loss under jit (compiled once per config and shapes), with d loss / d rewards."""
  rewards = _rewards(batch["kernel"], batch["bias"], batch["pooled"])
  (loss, (new_state, metrics)), grad = _value_and_grad(
    cfg,
    state,
    rewards,
    batch["scores"],
    batch["task_ids"],
    batch["pooled"],
    margin_b,
    num_tasks=num_tasks,
  )
  return loss, new_state, metrics, grad


def _task_sums_np(batch):
  """Per task: sum of pair terms and pair count, by loops (float64)."""
  rewards = np.asarray(_rewards(batch["kernel"], batch["bias"], batch["pooled"]), np.float64)
  scores = batch["scores"]
  sums = np.zeros(NUM_TASKS)
  counts = np.zeros(NUM_TASKS)
  for b in range(rewards.shape[0]):
    for i in range(rewards.shape[1]):
      for j in range(rewards.shape[1]):
        if scores[b, i] > scores[b, j] >= 0:
          sums[batch["task_ids"][b]] += np.logaddexp(0.0, -(rewards[b, i] - rewards[b, j]))
          counts[batch["task_ids"][b]] += 1
  return sums, counts


# ------------------------------------------------------------------------------------------------
# Config and state
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("kind", "mgda", "loss.kind='mgda' is not supported"),
    ("more_normalize", "l1", "loss.more_normalize='l1' is not supported"),
    ("more_alpha", 0.0, r"loss.more_alpha=0.0 must be in \(0, 1\]"),
    ("more_alpha", 1.5, "loss.more_alpha=1.5"),
    ("margin", float("nan"), "loss.margin=nan must be a finite number"),
    ("margin", "1", "loss.margin='1' must be a finite number"),
    ("center_rewards_coef", -1.0, "loss.center_rewards_coef=-1.0 must be >= 0"),
  ],
)
def test_loss_config_validates(field, value, message):
  with pytest.raises(ValueError, match=message):
    LossConfig(**{field: value})


def test_loss_config_defaults_and_hashable():
  cfg = LossConfig()
  assert (cfg.kind, cfg.more_alpha, cfg.more_normalize, cfg.margin, cfg.center_rewards_coef) == (
    "ranking",
    0.99,
    "l2",
    0.0,
    0.0,
  )
  assert hash(cfg.replace(kind="more")) == hash(LossConfig(kind="more"))


def test_state_is_a_pytree_that_round_trips():
  state = objectives.init_objective_state(4, 16)
  assert state.momentum_td.shape == (4, 16) and state.momentum_td.dtype == jnp.float32
  assert state.seen_t.shape == (4,) and state.seen_t.dtype == jnp.bool_
  state = state.replace(momentum_td=state.momentum_td + 1.5, seen_t=state.seen_t.at[2].set(True))
  leaves, treedef = jax.tree.flatten(state)
  assert len(leaves) == 2
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert isinstance(rebuilt, objectives.ObjectiveState)
  np.testing.assert_array_equal(rebuilt.momentum_td, state.momentum_td)
  np.testing.assert_array_equal(rebuilt.seen_t, state.seen_t)
  with pytest.raises(ValueError, match="num_tasks >= 1"):
    objectives.init_objective_state(0, 16)


def test_state_round_trips_through_an_orbax_checkpoint(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  state = objectives.init_objective_state(3, 4)
  state = state.replace(momentum_td=state.momentum_td - 0.25, seen_t=state.seen_t.at[1].set(True))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "objective", state)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "objective", state)
  assert isinstance(restored, objectives.ObjectiveState)
  assert restored.seen_t.dtype == jnp.bool_
  np.testing.assert_array_equal(restored.seen_t, state.seen_t)
  np.testing.assert_array_equal(restored.momentum_td, state.momentum_td)


def test_shape_errors_are_clear():
  batch = _batch(0)
  state = objectives.init_objective_state(NUM_TASKS, DIM)
  rewards = np.zeros(batch["scores"].shape, np.float32)
  with pytest.raises(ValueError, match="task_ids_b has shape"):
    objectives.objective_loss(
      LossConfig(),
      state,
      rewards,
      batch["scores"],
      batch["task_ids"][:3],
      batch["pooled"],
      num_tasks=NUM_TASKS,
    )
  with pytest.raises(ValueError, match="state holds 3 tasks but num_tasks=5"):
    objectives.objective_loss(
      LossConfig(), state, rewards, batch["scores"], batch["task_ids"], batch["pooled"], num_tasks=5
    )
  with pytest.raises(ValueError, match="needs the objective state and pooled_bnd"):
    objectives.objective_loss(
      LossConfig(kind="more"),
      state,
      rewards,
      batch["scores"],
      batch["task_ids"],
      None,
      num_tasks=NUM_TASKS,
    )


# ------------------------------------------------------------------------------------------------
# Per-task head gradients
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [0.0, 0.4])
def test_closed_form_head_grads_equal_autodiff(margin):
  batch = _batch(1, num_items=10, num_responses=3, absent=(1,))

  def task_loss(kernel, task):
    rewards = _rewards(kernel, batch["bias"], batch["pooled"])
    scores = jnp.where((batch["task_ids"] == task)[:, None], batch["scores"], -1.0)
    return losses.ranking_loss(rewards, scores, margin=margin)

  autodiff_td = jax.jit(jax.vmap(jax.grad(task_loss), in_axes=(None, 0)))(
    batch["kernel"], jnp.arange(NUM_TASKS)
  )
  rewards = _rewards(batch["kernel"], batch["bias"], batch["pooled"])
  closed_td = jax.jit(objectives.task_head_grads, static_argnames="num_tasks")(
    rewards, batch["scores"], batch["task_ids"], batch["pooled"], num_tasks=NUM_TASKS, margin=margin
  )
  np.testing.assert_allclose(np.asarray(closed_td), np.asarray(autodiff_td), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(closed_td)[1], 0.0)  # absent task
  assert np.all(np.linalg.norm(np.asarray(closed_td)[[0, 2]], axis=1) > 1e-3)


# ------------------------------------------------------------------------------------------------
# MultiTask and ranking
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("absent", [(), (2,)])
def test_multitask_equals_ranking_loss(absent):
  """With uniform weights over the tasks present, T * sum_t S_t / (T * P) is the pair mean:
  MultiTask equals the ranking loss for any task mix, including unequal pair counts."""
  batch = _batch(2, num_items=11, num_responses=3, absent=absent)
  sums, counts = _task_sums_np(batch)
  assert len(set(counts[counts > 0])) > 1  # unequal pair counts
  results = {kind: _run(LossConfig(kind=kind), None, batch) for kind in ("ranking", "multitask")}
  np.testing.assert_allclose(results["multitask"][0], results["ranking"][0], rtol=1e-6)
  np.testing.assert_allclose(results["multitask"][3], results["ranking"][3], rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(results["ranking"][0], sums.sum() / counts.sum(), rtol=1e-5)
  # It is deliberately not the mean of per-task means, which weights pairs differently here.
  present = counts > 0

  def mean_of_task_means(rewards):
    terms, _ = losses.pair_terms(rewards, batch["scores"])
    per_pair_w = 1.0 / (present.sum() * np.maximum(counts, 1))[batch["task_ids"]]
    return jnp.sum(per_pair_w[:, None, None] * terms)

  rewards = _rewards(batch["kernel"], batch["bias"], batch["pooled"])
  other_grad = jax.grad(mean_of_task_means)(rewards)
  assert np.max(np.abs(other_grad - results["multitask"][3])) > 1e-3
  for metrics in (results["ranking"][2], results["multitask"][2]):
    np.testing.assert_allclose(metrics["task_weight_t"], present / present.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["task_loss_t"], sums / np.maximum(counts, 1), rtol=1e-5)
    np.testing.assert_array_equal(metrics["task_pairs_t"], counts)


def test_uniform_lambda_in_more_equals_multitask(monkeypatch):
  batch = _batch(3, absent=(0,))
  monkeypatch.setattr(
    objectives.losses, "min_norm_weights", lambda v, mask: mask.astype(jnp.float32) / jnp.sum(mask)
  )
  state = objectives.init_objective_state(NUM_TASKS, DIM)
  rewards = _rewards(batch["kernel"], batch["bias"], batch["pooled"])
  results = {}
  for kind in ("more", "multitask"):
    # A fresh jit: the cached one may hold a trace made before the patch.
    fn = jax.jit(
      jax.value_and_grad(
        lambda r, kind=kind: objectives.objective_loss(
          LossConfig(kind=kind),
          state,
          r,
          batch["scores"],
          batch["task_ids"],
          batch["pooled"],
          num_tasks=NUM_TASKS,
        )[0]
      )
    )
    results[kind] = fn(rewards)
  np.testing.assert_allclose(results["more"][0], results["multitask"][0], rtol=1e-6)
  np.testing.assert_allclose(results["more"][1], results["multitask"][1], rtol=1e-6, atol=1e-9)


def test_margin_and_reward_centring():
  batch = _batch(4, num_responses=3)
  rewards = np.asarray(_rewards(batch["kernel"], batch["bias"], batch["pooled"]), np.float64)
  real = batch["scores"] >= 0
  base = _run(LossConfig(), None, batch)[0]
  centred = _run(LossConfig(center_rewards_coef=0.1), None, batch)[0]
  np.testing.assert_allclose(centred - base, 0.1 * np.mean(rewards[real] ** 2), rtol=1e-4)
  margin_b = np.linspace(0.0, 1.0, batch["scores"].shape[0]).astype(np.float32)
  for kind in ("ranking", "multitask"):
    with_margin = _run(LossConfig(kind=kind), None, batch, margin_b=margin_b)[0]
    expected = losses.ranking_loss(rewards.astype(np.float32), batch["scores"], margin=margin_b)
    np.testing.assert_allclose(with_margin, expected, rtol=1e-5)
  scalar = _run(LossConfig(margin=0.5), None, batch)[0]
  np.testing.assert_allclose(
    scalar, losses.ranking_loss(rewards.astype(np.float32), batch["scores"], margin=0.5), rtol=1e-5
  )
  assert scalar > base


# ------------------------------------------------------------------------------------------------
# MORE
# ------------------------------------------------------------------------------------------------


def _autodiff_task_grads(batch):
  def task_loss(kernel, task):
    rewards = _rewards(kernel, batch["bias"], batch["pooled"])
    scores = jnp.where((batch["task_ids"] == task)[:, None], batch["scores"], -1.0)
    return losses.ranking_loss(rewards, scores)

  return np.asarray(
    jax.vmap(jax.grad(task_loss), in_axes=(None, 0))(batch["kernel"], jnp.arange(NUM_TASKS)),
    np.float64,
  )


def test_more_two_tasks_matches_closed_form():
  batch = _batch(5, num_items=10, num_tasks=2)
  grads = _autodiff_task_grads(batch)[:2]
  unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  gamma = np.clip(np.dot(unit[1] - unit[0], unit[1]) / np.sum((unit[0] - unit[1]) ** 2), 0, 1)
  weights = np.array([gamma, 1 - gamma])
  sums, counts = _task_sums_np(batch)
  expected = 2 * np.sum(weights * sums[:2]) / counts.sum()
  state = objectives.init_objective_state(2, DIM)
  loss, new_state, metrics, _ = _run(LossConfig(kind="more"), state, batch, num_tasks=2)
  assert 0.02 < gamma < 0.98  # an interior solution, so the test sees the formula
  np.testing.assert_allclose(metrics["task_weight_t"], weights, atol=1e-5)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # First observation: the momentum is the gradient itself.
  np.testing.assert_allclose(new_state.momentum_td, grads, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["task_grad_norm_t"], np.linalg.norm(grads, axis=1), rtol=1e-5)


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_more_l2_gives_equal_weights_to_opposite_or_orthogonal_gradients(num_tasks):
  # One item per task; chosen embedding along a task's own axis, rejected at 0. The task
  # gradient is then a negative multiple of that axis (different magnitudes per task).
  kernel = np.zeros(DIM, np.float32)
  pooled = np.zeros((num_tasks, 2, DIM), np.float32)
  for t, scale in zip(range(num_tasks), (2.0, 0.3, 5.0)):
    pooled[t, 0, t] = scale
  batch = dict(
    pooled=pooled,
    kernel=kernel,
    bias=np.float32(0),
    task_ids=np.arange(num_tasks),
    scores=np.tile(np.array([1.0, 0.0], np.float32), (num_tasks, 1)),
  )
  state = objectives.init_objective_state(num_tasks, DIM)
  metrics = _run(LossConfig(kind="more"), state, batch, num_tasks)[2]
  np.testing.assert_allclose(metrics["task_weight_t"], 1.0 / num_tasks, atol=1e-6)
  # Opposite: flip task 1's axis so its gradient points against task 0's.
  opposite = dict(batch, pooled=pooled.copy())
  opposite["pooled"][1, 0] = -0.3 * np.eye(DIM, dtype=np.float32)[0]
  metrics = _run(LossConfig(kind="more"), state, opposite, num_tasks)[2]
  np.testing.assert_allclose(
    metrics["task_weight_t"][:2], 0.5 if num_tasks == 2 else [0.5, 0.5], atol=1e-6
  )
  # Without normalisation the smaller gradient gets the larger weight instead.
  metrics = _run(LossConfig(kind="more", more_normalize="none"), state, opposite, num_tasks)[2]
  assert metrics["task_weight_t"][1] > metrics["task_weight_t"][0] + 0.3


def _slsqp_weights(vectors):
  from scipy.optimize import minimize  # noqa: PLC0415

  num = len(vectors)
  if num == 1:
    return np.ones(1)
  gram = vectors @ vectors.T / np.max(np.sum(vectors**2, axis=1))
  res = minimize(
    lambda w: w @ gram @ w,
    np.full(num, 1 / num),
    jac=lambda w: 2 * gram @ w,
    method="SLSQP",
    bounds=[(0, 1)] * num,
    constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1}],
    options={"ftol": 1e-15, "maxiter": 500},
  )
  return res.x


class _PaperMore:
  """The paper's host-side MORE step, re-created: a CPU torch copy of the head, one backward per
  task present, momentum, `gradient_normalizer`, and a min-norm solve (scipy here, to be exact).
  Momentum starts from each task's first gradient (as jaxpref does; see docs).

  With `count_tie_only_tasks` every task with an item in the batch takes part, as in the official
  code: a task whose items all tie has a zero loss and gradient, its momentum decays, it gets a
  min-norm weight, and it counts in the task factor (`len(weights)` in `more_ranking_loss`).
  """

  def __init__(self, num_tasks, dim, alpha, normalize, count_tie_only_tasks=False):
    import torch  # noqa: PLC0415

    self.torch = torch
    self.momentum = [None] * num_tasks
    self.head = torch.nn.Linear(dim, 1, bias=True).double()
    self.alpha, self.normalize = alpha, normalize
    self.count_tie_only_tasks = count_tie_only_tasks

  def _ranking_loss(self, rewards, scores):
    torch = self.torch
    valid = (
      (scores[:, :, None] > scores[:, None, :])
      & (scores[:, :, None] >= 0)
      & (scores[:, None, :] >= 0)
    )
    diff = rewards[:, :, None] - rewards[:, None, :]
    return -(torch.nn.functional.logsigmoid(diff) * valid).sum() / valid.sum(), valid.sum()

  def step(self, batch):
    torch = self.torch
    with torch.no_grad():
      self.head.weight.copy_(torch.tensor(batch["kernel"][None], dtype=torch.float64))
      self.head.bias.fill_(float(batch["bias"]))
    pooled = torch.tensor(batch["pooled"], dtype=torch.float64)
    scores = torch.tensor(batch["scores"])
    task_ids = np.asarray(batch["task_ids"])
    rewards = self.head(pooled)[..., 0]
    present, task_losses, sums, total_pairs = [], [], {}, 0
    num_tasks_in_batch = 0
    for task in sorted(set(task_ids.tolist())):
      sel = torch.tensor(task_ids == task)
      loss, pairs = self._ranking_loss(rewards[sel], scores[sel])
      if pairs == 0:
        if self.count_tie_only_tasks and bool((scores[sel] >= 0).any()):
          num_tasks_in_batch += 1
          if self.momentum[task] is not None:  # a zero gradient: the momentum decays
            self.momentum[task] = (1 - self.alpha) * self.momentum[task]
            present.append(task)
            task_losses.append(0.0)
            sums[task] = 0.0
        continue
      num_tasks_in_batch += 1
      self.head.zero_grad()
      loss.backward(retain_graph=True)
      grad = self.head.weight.grad[0].numpy().copy()
      prev = self.momentum[task]
      self.momentum[task] = grad if prev is None else (1 - self.alpha) * prev + self.alpha * grad
      present.append(task)
      task_losses.append(loss.item())
      sums[task] = loss.item() * int(pairs)
      total_pairs += int(pairs)
    grads = [self.momentum[t] for t in present]
    norms = np.array([np.linalg.norm(g) or 1.0 for g in grads])
    if self.normalize == "l2":
      grads = [g / n for g, n in zip(grads, norms)]
    elif self.normalize == "loss":
      shifted = np.array(task_losses) + 1
      grads = [g / s for g, s in zip(grads, shifted / shifted.sum())]
    elif self.normalize == "loss+":  # a zero loss divides by 1 (jaxpref's guard, see docs)
      grads = [g / (n * (ls or 1.0)) for g, n, ls in zip(grads, norms, task_losses)]
    weights = np.zeros(len(self.momentum))
    weights[present] = _slsqp_weights(np.stack(grads))
    loss = num_tasks_in_batch * sum(weights[t] * sums[t] for t in present) / total_pairs
    return loss, weights


@pytest.mark.parametrize("normalize", ["l2", "loss", "loss+", "none"])
def test_more_matches_paper_procedure_over_steps(normalize):
  pytest.importorskip("torch")
  cfg = LossConfig(kind="more", more_alpha=0.7, more_normalize=normalize)
  paper = _PaperMore(NUM_TASKS, DIM, cfg.more_alpha, normalize)
  state = objectives.init_objective_state(NUM_TASKS, DIM)
  # Task 2 first appears at step 1, task 0 is absent at step 2.
  for step, absent in enumerate([(2,), (), (0,), ()]):
    batch = _batch(10 + step, num_items=9, num_responses=3, absent=absent)
    before = state
    loss, state, metrics, _ = _run(cfg, state, batch)
    expected_loss, expected_weights = paper.step(batch)
    np.testing.assert_allclose(metrics["task_weight_t"], expected_weights, atol=2e-4)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-4)
    for task in range(NUM_TASKS):
      if task in absent:  # absent: weight 0, momentum and seen flag untouched
        assert metrics["task_weight_t"][task] == 0.0
        np.testing.assert_array_equal(state.momentum_td[task], before.momentum_td[task])
        assert bool(state.seen_t[task]) == bool(before.seen_t[task])
      else:
        np.testing.assert_allclose(
          state.momentum_td[task], paper.momentum[task], rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("normalize", ["l2", "loss", "loss+", "none"])
def test_tie_only_task_counts_as_the_official_code_counts_it(normalize):
  """`task_presence=items` (the paper configs): a task whose items all tie in a batch keeps its
  place, as in the official code: its momentum decays, it gets a min-norm weight and counts in
  the task factor T (3 here, where `pairs` gives 2). `pairs` (jaxpref's default) leaves it out."""
  pytest.importorskip("torch")
  cfgs = {
    presence: LossConfig(
      kind="more", more_alpha=0.7, more_normalize=normalize, task_presence=presence
    )
    for presence in ("items", "pairs")
  }
  papers = {
    presence: _PaperMore(NUM_TASKS, DIM, 0.7, normalize, count_tie_only_tasks=presence == "items")
    for presence in cfgs
  }
  states = {p: objectives.init_objective_state(NUM_TASKS, DIM) for p in cfgs}
  for step in range(3):
    batch = _batch(20 + step, num_items=9)
    if step == 1:  # every item of task 1 ties (and a filler row of task 2 adds nothing)
      batch["scores"][batch["task_ids"] == 1] = 0.5
      batch["scores"][-1] = -1.0
    for presence, cfg in cfgs.items():
      before = states[presence]
      loss, states[presence], metrics, _ = _run(cfg, before, batch)
      expected_loss, expected_weights = papers[presence].step(batch)
      np.testing.assert_allclose(metrics["task_weight_t"], expected_weights, atol=2e-4)
      np.testing.assert_allclose(loss, expected_loss, rtol=1e-4)
      if step != 1:
        continue
      momentum_1 = states[presence].momentum_td[1]
      if presence == "items":
        assert float(metrics["tasks_present"]) == 3.0
        assert float(metrics["task_weight_t"][1]) > 0.0
        np.testing.assert_allclose(momentum_1, 0.3 * before.momentum_td[1], rtol=1e-6)
      else:
        assert float(metrics["tasks_present"]) == 2.0
        assert float(metrics["task_weight_t"][1]) == 0.0
        np.testing.assert_array_equal(momentum_1, before.momentum_td[1])


@pytest.mark.parametrize("presence", objectives.TASK_PRESENCES)
def test_tie_only_task_and_multitask(presence):
  """MultiTask stays the ranking loss under either task count; only the weights report differs.
  A task first met with ties only (no momentum yet) counts in T but gets no MORE weight."""
  batch = _batch(30, num_items=9)
  batch["scores"][batch["task_ids"] == 2] = 1.0
  state = objectives.init_objective_state(NUM_TASKS, DIM)
  loss, _, metrics, _ = _run(LossConfig(kind="multitask", task_presence=presence), state, batch)
  rewards = _rewards(batch["kernel"], batch["bias"], batch["pooled"])
  np.testing.assert_allclose(loss, losses.ranking_loss(rewards, batch["scores"]), rtol=1e-6)
  present = 3 if presence == "items" else 2
  np.testing.assert_allclose(metrics["task_weight_t"][:2], 1.0 / present, rtol=1e-6)
  loss, new_state, metrics, _ = _run(LossConfig(kind="more", task_presence=presence), state, batch)
  assert float(metrics["tasks_present"]) == present and float(metrics["task_weight_t"][2]) == 0
  assert not bool(new_state.seen_t[2])
  np.testing.assert_array_equal(new_state.momentum_td[2], 0.0)
  terms, _ = losses.pair_terms(rewards, batch["scores"])
  item_w = np.asarray(metrics["task_weight_t"])[batch["task_ids"]]
  expected = present * np.sum(item_w[:, None, None] * terms) / np.sum(terms > 0)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_task_presence_is_validated():
  with pytest.raises(ValueError, match="loss.task_presence='ties'"):
    LossConfig(task_presence="ties")


def test_more_weights_are_constants_and_embeddings_get_no_gradient():
  batch = _batch(6)
  cfg = LossConfig(kind="more")
  state = objectives.init_objective_state(NUM_TASKS, DIM)
  loss, _, metrics, grad_rewards = _run(cfg, state, batch)
  weights = np.asarray(metrics["task_weight_t"])

  def fixed_weight_loss(rewards):
    terms, valid = losses.pair_terms(rewards, batch["scores"])
    item_w = NUM_TASKS * weights[batch["task_ids"]]
    return jnp.sum(item_w[:, None, None] * terms) / jnp.sum(valid)

  rewards = _rewards(batch["kernel"], batch["bias"], batch["pooled"])
  np.testing.assert_allclose(
    grad_rewards, jax.grad(fixed_weight_loss)(rewards), rtol=1e-5, atol=1e-8
  )
  grad_pooled = jax.jit(
    jax.grad(
      lambda p: objectives.objective_loss(
        cfg, state, rewards, batch["scores"], batch["task_ids"], p, num_tasks=NUM_TASKS
      )[0]
    )
  )(jnp.asarray(batch["pooled"]))
  np.testing.assert_array_equal(grad_pooled, 0.0)


@pytest.mark.parametrize("kind", objectives.KINDS)
def test_pads_and_ties_change_nothing(kind):
  batch = _batch(7, num_items=8)
  cfg = LossConfig(kind=kind)
  state = objectives.init_objective_state(NUM_TASKS, DIM)
  base = _run(cfg, state, batch)
  # Add a filler row (all scores -1) and an all-tie item, both in task 1, with wild embeddings.
  extra = dict(batch)
  extra["pooled"] = np.concatenate([batch["pooled"], 40 * np.ones((2, 2, DIM), np.float32)])
  extra["scores"] = np.concatenate([batch["scores"], [[-1.0, -1.0], [0.5, 0.5]]]).astype(np.float32)
  extra["task_ids"] = np.concatenate([batch["task_ids"], [1, 1]]).astype(np.int32)
  padded = _run(cfg, state, extra)
  np.testing.assert_allclose(padded[0], base[0], rtol=1e-6)
  np.testing.assert_allclose(padded[3][:8], base[3], rtol=1e-5, atol=1e-9)
  np.testing.assert_array_equal(padded[3][8:], 0.0)
  for key in ("task_weight_t", "task_loss_t", "task_pairs_t", "task_grad_norm_t", "accuracy"):
    np.testing.assert_allclose(padded[2][key], base[2][key], rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(padded[1].momentum_td, base[1].momentum_td, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", objectives.KINDS)
def test_no_pairs_gives_zero_loss_and_no_nan(kind):
  batch = _batch(8, num_items=4)
  batch["scores"] = np.array([[-1, -1], [0.5, 0.5], [-1, 2.0], [1, 1]], np.float32)
  state = objectives.init_objective_state(NUM_TASKS, DIM)
  state = state.replace(momentum_td=state.momentum_td + 1.0, seen_t=state.seen_t.at[0].set(True))
  loss, new_state, metrics, grad = _run(
    LossConfig(kind=kind, center_rewards_coef=0.0), state, batch
  )
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, 0.0)
  for value in metrics.values():
    assert np.all(np.isfinite(np.asarray(value)))
  np.testing.assert_array_equal(metrics["task_weight_t"], 0.0)
  np.testing.assert_array_equal(new_state.momentum_td, state.momentum_td)
  np.testing.assert_array_equal(new_state.seen_t, state.seen_t)


def test_objective_vmaps_over_independent_runs():
  batches = [_batch(20 + k, absent=((k,) if k < NUM_TASKS else ())) for k in range(3)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
  cfg = LossConfig(kind="more")
  state = objectives.init_objective_state(NUM_TASKS, DIM)
  states = jax.tree.map(lambda x: jnp.stack([x] * 3), state)

  def one(batch, state):
    rewards = _rewards(batch["kernel"], batch["bias"], batch["pooled"])
    return objectives.objective_loss(
      cfg, state, rewards, batch["scores"], batch["task_ids"], batch["pooled"], num_tasks=NUM_TASKS
    )

  losses_v, (states_v, metrics_v) = jax.jit(jax.vmap(one))(stacked, states)
  for k, batch in enumerate(batches):
    loss, (new_state, metrics) = jax.jit(one)(batch, state)
    np.testing.assert_allclose(losses_v[k], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics_v["task_weight_t"][k], metrics["task_weight_t"], atol=1e-5)
    np.testing.assert_allclose(states_v.momentum_td[k], new_state.momentum_td, rtol=1e-5, atol=1e-8)


_SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxpref.objectives import objective as objectives
    rng = np.random.default_rng(0)
    B, N, D, T = 8, 2, 8, 3
    pooled = rng.normal(size=(B, N, D)).astype(np.float32)
    rewards = pooled @ rng.normal(size=D).astype(np.float32)
    scores = np.tile(np.array([1.0, 0.0], np.float32), (B, 1))
    task_ids = np.array([0, 1, 2, 0, 0, 1, 0, 0], np.int32)
    cfg = objectives.LossConfig(kind="more")
    state = objectives.init_objective_state(T, D)
    fn = jax.jit(jax.value_and_grad(lambda r, p, s, t, st: objectives.objective_loss(
        cfg, st, r, s, t, p, num_tasks=T), has_aux=True))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", *[None] * (x.ndim - 1))))
    out = {}
    for name, args in [("single", (rewards, pooled, scores, task_ids)),
                       ("sharded", tuple(map(shard, (rewards, pooled, scores, task_ids))))]:
      (loss, (new_state, metrics)), grad = fn(*args, state)
      out[name] = dict(loss=float(loss), weights=np.asarray(metrics["task_weight_t"]).tolist(),
                       grad=np.asarray(grad).tolist(),
                       momentum=np.asarray(new_state.momentum_td).tolist())
    out["devices"] = len(jax.devices())
    print(json.dumps(out))
""")


def test_sharded_global_batch_matches_single_device():
  """Per-device batch 1: with global reductions, 8 items on 8 devices give the same step."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", _SHARDED_SCRIPT],
    capture_output=True,
    text=True,
    env=env,
    timeout=240,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  for key in ("loss", "weights", "grad", "momentum"):
    np.testing.assert_allclose(out["sharded"][key], out["single"][key], rtol=1e-5, atol=1e-7)
