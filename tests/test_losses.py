"""Tests for jaxpref.objectives.losses: pair terms, ranking loss, and min-norm (MGDA) weights.

References are independent: Python loops over pairs for the loss, and scipy's SLSQP for the
min-norm problem.
"""

from __future__ import annotations

import itertools
import math

import jax
import numpy as np
import pytest

from jaxpref.objectives import losses

scipy_optimize = pytest.importorskip("scipy.optimize")

# Eager calls would compile the solver's loop op by op; jit compiles it once per shape.
_solve = jax.jit(losses.min_norm_weights)


# ------------------------------------------------------------------------------------------------
# Pair terms and the ranking loss
# ------------------------------------------------------------------------------------------------


def _reference_pairs(rewards, scores, margin=0.0):
  """List of (b, i, j, term) by plain loops over the pair semantics."""
  margin = np.broadcast_to(np.asarray(margin, np.float64), (rewards.shape[0],))
  out = []
  for b in range(rewards.shape[0]):
    for i, j in itertools.permutations(range(rewards.shape[1]), 2):
      if scores[b, i] >= 0 and scores[b, j] >= 0 and scores[b, i] > scores[b, j]:
        d = float(rewards[b, i]) - float(rewards[b, j]) - margin[b]
        out.append((b, i, j, math.log1p(math.exp(-d)) if d > -30 else -d))
  return out


def _random_batch(rng, num_items=6, num_responses=4):
  rewards = rng.normal(size=(num_items, num_responses)).astype(np.float32) * 2
  # Small integer scores give ties; -1 marks pads; one item is all pads, one all ties.
  scores = rng.integers(-1, 3, size=(num_items, num_responses)).astype(np.float32)
  scores[0] = -1.0
  scores[1] = 2.0
  return rewards, scores


@pytest.mark.parametrize("per_item_margin", [False, True])
def test_pair_terms_match_loops(per_item_margin):
  rng = np.random.default_rng(0)
  rewards, scores = _random_batch(rng)
  margin = rng.uniform(0, 1, size=rewards.shape[0]).astype(np.float32) if per_item_margin else 0.3
  terms, valid = jax.jit(losses.pair_terms)(rewards, scores, margin=margin)
  expected_terms = np.zeros(terms.shape)
  expected_valid = np.zeros(valid.shape, bool)
  for b, i, j, term in _reference_pairs(rewards, scores, margin):
    expected_terms[b, i, j] = term
    expected_valid[b, i, j] = True
  np.testing.assert_array_equal(np.asarray(valid), expected_valid)
  np.testing.assert_allclose(np.asarray(terms), expected_terms, rtol=1e-5, atol=1e-6)


def test_ranking_loss_and_accuracy_match_loops():
  rng = np.random.default_rng(1)
  rewards, scores = _random_batch(rng)
  pairs = _reference_pairs(rewards, scores)
  assert len(pairs) > 3
  expected_loss = np.mean([t for *_, t in pairs])
  expected_acc = np.mean([rewards[b, i] > rewards[b, j] for b, i, j, _ in pairs])
  np.testing.assert_allclose(
    jax.jit(losses.ranking_loss)(rewards, scores), expected_loss, rtol=1e-5
  )
  np.testing.assert_allclose(jax.jit(losses.pair_accuracy)(rewards, scores), expected_acc)


def test_ranking_loss_is_numerically_stable_and_nan_free():
  # Huge reward gaps: a naive log(sigmoid(.)) gives inf; the terms must stay exact.
  rewards = np.array([[-200.0, 200.0], [200.0, -200.0]], np.float32)
  scores = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
  np.testing.assert_allclose(losses.ranking_loss(rewards, scores), 200.0, rtol=1e-6)
  # No valid pair at all (pads and ties): loss 0, gradient 0, no NaN, even with inf pad rewards.
  rewards = np.array([[np.inf, -np.inf], [1.0, 2.0]], np.float32)
  scores = np.array([[-1.0, -1.0], [0.5, 0.5]], np.float32)
  loss, grad = jax.jit(jax.value_and_grad(losses.ranking_loss))(rewards, scores)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_ranking_loss_ignores_pads_and_ties():
  rng = np.random.default_rng(2)
  rewards = rng.normal(size=(4, 2)).astype(np.float32)
  scores = np.tile(np.array([1.0, 0.0], np.float32), (4, 1))
  base = losses.ranking_loss(rewards, scores)
  # A third response that is a pad, and an extra tied item, with arbitrary rewards.
  rewards3 = np.concatenate([rewards, rng.normal(size=(4, 1)).astype(np.float32) * 50], axis=1)
  scores3 = np.concatenate([scores, -np.ones((4, 1), np.float32)], axis=1)
  rewards3 = np.concatenate([rewards3, [[3.0, -3.0, 7.0]]]).astype(np.float32)
  scores3 = np.concatenate([scores3, [[0.7, 0.7, 0.7]]]).astype(np.float32)
  np.testing.assert_allclose(losses.ranking_loss(rewards3, scores3), base, rtol=1e-6)


def test_ranking_loss_vmaps_over_a_leading_axis():
  rng = np.random.default_rng(3)
  batches = [_random_batch(rng) for _ in range(3)]
  rewards = np.stack([r for r, _ in batches])
  scores = np.stack([s for _, s in batches])
  batched = jax.jit(jax.vmap(losses.ranking_loss))(rewards, scores)
  singles = [losses.ranking_loss(r, s) for r, s in batches]
  np.testing.assert_allclose(np.asarray(batched), np.asarray(singles), rtol=1e-6)


def test_bad_margin_shape_is_a_clear_error():
  with pytest.raises(ValueError, match="margin has shape"):
    losses.pair_terms(np.zeros((3, 2)), np.zeros((3, 2)), margin=np.zeros(4))


# ------------------------------------------------------------------------------------------------
# Min-norm weights vs an independent QP solve
# ------------------------------------------------------------------------------------------------


def _qp_min_norm(vectors):
  """min ||w @ V||^2 on the simplex by SLSQP in float64, best of a few starts."""
  vectors = np.asarray(vectors, np.float64)
  num = vectors.shape[0]
  scale = max(np.max(np.sum(vectors**2, axis=1)), 1e-300)
  gram = vectors @ vectors.T / scale
  rng = np.random.default_rng(0)
  best = np.inf
  for start in [np.full(num, 1.0 / num), *rng.dirichlet(np.ones(num), size=2)]:
    res = scipy_optimize.minimize(
      lambda w: w @ gram @ w,
      start,
      jac=lambda w: 2 * gram @ w,
      method="SLSQP",
      bounds=[(0.0, 1.0)] * num,
      constraints=[
        {"type": "eq", "fun": lambda w: np.sum(w) - 1.0, "jac": lambda w: np.ones_like(w)}
      ],
      options={"ftol": 1e-15, "maxiter": 500},
    )
    weights = np.clip(res.x, 0, None) / np.sum(np.clip(res.x, 0, None))
    best = min(best, float(weights @ gram @ weights))
  return best  # relative to the largest squared norm


def _objective(weights, vectors):
  vectors = np.asarray(vectors, np.float64)
  scale = max(np.max(np.sum(vectors**2, axis=1)), 1e-300)
  point = np.asarray(weights, np.float64) @ vectors
  return float(point @ point) / scale


def _problems(rng, num_tasks, dim, count):
  """Random problems, most of them degenerate or ill-conditioned in some way."""
  out = []
  for k in range(count):
    vectors = rng.normal(size=(num_tasks, dim))
    kind = k % 8
    if kind == 1:
      vectors[1] = vectors[0]  # identical
    elif kind == 2:
      vectors[1] = -vectors[0]  # opposite
    elif kind == 3:
      vectors[0] = 0.0  # zero
    elif kind == 4:
      vectors = np.outer(rng.normal(size=num_tasks), vectors[0])  # collinear
    elif kind == 5:
      vectors[-1] = 0.5 * vectors[0] + 0.5 * vectors[1]  # affinely dependent
    elif kind == 6:
      vectors = vectors[0] + 1e-3 * vectors  # nearly identical: float32 Gram matrices fail here
    elif kind == 7:
      vectors *= np.logspace(-3, 1, num_tasks)[:, None]  # very different norms
    out.append(vectors * rng.choice([1e-4, 1.0, 30.0]))
  return np.stack(out).astype(np.float32)


@pytest.mark.parametrize(
  ("num_tasks", "dim"),
  [(2, 3), (2, 64), (3, 2), (3, 16), (4, 3), (5, 128), (6, 4), (8, 2), (8, 32)],
)
def test_min_norm_weights_match_qp(num_tasks, dim):
  rng = np.random.default_rng(num_tasks * 100 + dim)
  problems = _problems(rng, num_tasks, dim, count=16)
  weights = np.asarray(jax.jit(jax.vmap(losses.min_norm_weights))(problems), np.float64)
  assert np.all(weights >= 0)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
  for w, vectors in zip(weights, problems):
    ours = _objective(w, vectors)
    reference = _qp_min_norm(vectors)
    assert ours <= reference + 1e-6, (ours, reference, vectors)


def test_min_norm_weights_satisfy_kkt_in_float64_terms():
  """Independently of any solver: on the support the gradient is minimal (up to rounding)."""
  rng = np.random.default_rng(7)
  problems = rng.normal(size=(20, 6, 10)).astype(np.float32)
  weights = np.asarray(jax.vmap(losses.min_norm_weights)(problems), np.float64)
  for w, vectors in zip(weights, problems.astype(np.float64)):
    vectors = vectors / np.sqrt(np.max(np.sum(vectors**2, axis=1)))
    grad = vectors @ (w @ vectors)
    support = w > 1e-6
    assert np.max(grad[support]) - np.min(grad) < 1e-5


def test_min_norm_weights_degenerate_cases():
  v = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  w = np.array([0.0, 1.0, 0.0, 0.0], np.float32)
  solve = _solve
  for num in (2, 3, 5):
    np.testing.assert_allclose(solve(np.stack([v] * num)), 1.0 / num, atol=1e-6)  # identical
    np.testing.assert_allclose(solve(np.zeros((num, 4))), 1.0 / num, atol=1e-6)  # all zero
  np.testing.assert_allclose(solve(np.stack([v, -v])), [0.5, 0.5], atol=1e-6)  # opposite
  np.testing.assert_allclose(solve(np.stack([v, -v, v, -v])), 0.25, atol=1e-6)
  # Orthogonal vectors of equal norm: uniform; of different norms: inverse squared norms.
  np.testing.assert_allclose(solve(np.eye(3, 4, dtype=np.float32)), 1 / 3, atol=1e-6)
  scaled = np.eye(3, 4, dtype=np.float32) * np.array([[1.0], [2.0], [4.0]], np.float32)
  expected = 1 / np.array([1.0, 4.0, 16.0])
  np.testing.assert_allclose(solve(scaled), expected / expected.sum(), atol=1e-6)
  # A zero vector is the min-norm point: all weight on it.
  np.testing.assert_allclose(solve(np.stack([v, 0 * v, w])), [0, 1, 0], atol=1e-6)
  # T = 1.
  np.testing.assert_array_equal(solve(v[None]), [1.0])
  np.testing.assert_array_equal(solve(np.zeros((1, 4), np.float32)), [1.0])
  for result in (solve(np.stack([v, -v * 1e-30, w])), solve(np.full((3, 4), 1e30, np.float32))):
    assert np.all(np.isfinite(np.asarray(result)))


def test_min_norm_weights_mask_drops_tasks():
  rng = np.random.default_rng(8)
  vectors = rng.normal(size=(5, 7)).astype(np.float32)
  mask = np.array([True, False, True, True, False])
  masked = np.asarray(jax.jit(losses.min_norm_weights)(vectors, mask))
  assert np.all(masked[~mask] == 0.0)
  np.testing.assert_allclose(masked[mask], _solve(vectors[mask]), atol=1e-6)
  # Two tasks present out of four goes through the general solver and must agree with the
  # two-task closed form; one present gets everything, none present gets nothing.
  two = np.array([False, True, False, True, False])
  np.testing.assert_allclose(np.asarray(_solve(vectors, two))[two], _solve(vectors[two]), atol=1e-6)
  one = np.array([False, False, True, False, False])
  np.testing.assert_array_equal(_solve(vectors, one), one.astype(np.float32))
  np.testing.assert_array_equal(_solve(vectors, np.zeros(5, bool)), 0.0)
  np.testing.assert_array_equal(_solve(vectors[:2], [False, True]), [0.0, 1.0])


def test_min_norm_weights_two_task_closed_form():
  rng = np.random.default_rng(9)
  for _ in range(20):
    v1, v2 = rng.normal(size=(2, 5))
    # min_g ||g v1 + (1 - g) v2||^2 by calculus, clipped to [0, 1].
    gamma = np.clip(np.dot(v2 - v1, v2) / np.dot(v1 - v2, v1 - v2), 0, 1)
    np.testing.assert_allclose(
      _solve(np.stack([v1, v2]).astype(np.float32)), [gamma, 1 - gamma], atol=2e-6
    )


def test_min_norm_weights_is_permutation_equivariant():
  rng = np.random.default_rng(10)
  vectors = rng.normal(size=(6, 9)).astype(np.float32)
  perm = rng.permutation(6)
  np.testing.assert_allclose(_solve(vectors)[perm], _solve(vectors[perm]), atol=1e-6)


@pytest.mark.parametrize("num_tasks", [3, 4, 5, 8])
def test_identical_vectors_get_equal_weights_eager_and_jit(num_tasks):
  """Identical task vectors: every weighting is optimal; the solver returns the uniform one, the
  same under jit and eagerly (a relative singular-value cutoff once gave one-hot weights)."""
  vector_d = np.random.default_rng(num_tasks).normal(size=(1, 64)).astype(np.float32)
  vectors_td = np.repeat(vector_d, num_tasks, axis=0)
  uniform = np.full(num_tasks, 1.0 / num_tasks)
  np.testing.assert_allclose(losses.min_norm_weights(vectors_td), uniform, atol=1e-6)
  np.testing.assert_allclose(jax.jit(losses.min_norm_weights)(vectors_td), uniform, atol=1e-6)
