"""Bradley-Terry pair terms, the ranking loss, and min-norm (MGDA) task weights.

Everything here is a pure function of arrays, safe under `jax.jit` and `jax.vmap`. The objectives
built from these pieces (ranking, MultiTask, MORE) live in `jaxpref.objectives.objective`.

Pair semantics (shared with the data pipeline and evaluation): for every ordered pair (i, j) of an
item's responses with `score_i > score_j` and both scores >= 0 there is one term
`-log sigmoid(r_i - r_j - margin)`; ties and padded responses (score < 0) give nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Gram matrices and line searches feed an optimiser whose answer must be right to ~1e-7: never let
# an accelerator run them in TF32/bf16.
_HIGHEST = jax.lax.Precision.HIGHEST


def pair_mask(scores_bn: jax.Array) -> jax.Array:
  """valid_bnn[b, i, j]: response i is preferred to response j and neither is a pad."""
  real_bn = scores_bn >= 0
  return (scores_bn[:, :, None] > scores_bn[:, None, :]) & real_bn[:, :, None] & real_bn[:, None, :]


def _margin_bnn(margin, num_items: int) -> jax.Array:
  margin = jnp.asarray(margin, jnp.float32)
  if margin.ndim == 0:
    return margin[None, None, None]
  if margin.ndim == 1:
    if margin.shape[0] != num_items:
      raise ValueError(
        f"margin has shape {margin.shape}; expected a scalar, [B={num_items}] or [B, N, N]"
      )
    return margin[:, None, None]
  if margin.ndim == 3:
    return margin
  raise ValueError(f"margin has shape {margin.shape}; expected a scalar, [B] or [B, N, N]")


def pair_terms(
  rewards_bn: jax.Array, scores_bn: jax.Array, *, margin: float | jax.Array = 0.0
) -> tuple[jax.Array, jax.Array]:
  """Per ordered pair Bradley-Terry terms.

  Args:
    rewards_bn: rewards of N responses for each of B items.
    scores_bn: their preference scores (higher preferred, equal = tie, < 0 = pad).
    margin: subtracted from `r_i - r_j`; a scalar, one per item `[B]`, or one per pair `[B, N, N]`.

  Returns:
    `(terms_bnn, valid_bnn)`: `terms_bnn[b, i, j] = -log sigmoid(r_i - r_j - margin)` where
    `valid_bnn[b, i, j]` and exactly 0 elsewhere (with a zero, NaN-free gradient there too).
  """
  valid_bnn = pair_mask(scores_bn)
  diff_bnn = (rewards_bn[:, :, None] - rewards_bn[:, None, :]).astype(jnp.float32)
  diff_bnn = diff_bnn - _margin_bnn(margin, rewards_bn.shape[0])
  # The inner `where` keeps the gradient finite where pads hold arbitrary (even infinite) rewards.
  safe_diff_bnn = jnp.where(valid_bnn, diff_bnn, 0.0)
  terms_bnn = jnp.where(valid_bnn, -jax.nn.log_sigmoid(safe_diff_bnn), 0.0)
  return terms_bnn, valid_bnn


def ranking_loss(
  rewards_bn: jax.Array, scores_bn: jax.Array, *, margin: float | jax.Array = 0.0
) -> jax.Array:
  """Mean Bradley-Terry loss over all valid pairs of the batch (0 when there are none)."""
  terms_bnn, valid_bnn = pair_terms(rewards_bn, scores_bn, margin=margin)
  num_pairs = jnp.sum(valid_bnn, dtype=jnp.float32)
  return jnp.sum(terms_bnn) / jnp.maximum(num_pairs, 1.0)


def pair_accuracy(rewards_bn: jax.Array, scores_bn: jax.Array) -> jax.Array:
  """Fraction of valid pairs with `r_i > r_j` (a tie in reward counts as wrong; 0 with no pairs)."""
  valid_bnn = pair_mask(scores_bn)
  correct_bnn = valid_bnn & (rewards_bn[:, :, None] > rewards_bn[:, None, :])
  num_pairs = jnp.sum(valid_bnn, dtype=jnp.float32)
  return jnp.sum(correct_bnn, dtype=jnp.float32) / jnp.maximum(num_pairs, 1.0)


# ------------------------------------------------------------------------------------------------
# Min-norm point of a convex hull (MGDA task weights)
# ------------------------------------------------------------------------------------------------


def _two_task_weights(vectors_td: jax.Array, mask_t: jax.Array) -> jax.Array:
  """Closed form for T = 2: argmin_g ||v1 + g (v0 - v1)||^2 on [0, 1]."""
  diff_d = vectors_td[0] - vectors_td[1]
  curvature = jnp.dot(diff_d, diff_d, precision=_HIGHEST)
  slope = jnp.dot(vectors_td[1], diff_d, precision=_HIGHEST)
  # Identical (or both zero) vectors: every weighting is optimal; split evenly.
  gamma = jnp.where(
    curvature > 0, jnp.clip(-slope / jnp.where(curvature > 0, curvature, 1.0), 0.0, 1.0), 0.5
  )
  both = jnp.stack([gamma, 1.0 - gamma])
  only_t = mask_t.astype(vectors_td.dtype)
  return jnp.where(mask_t[0] & mask_t[1], both, only_t)


def _affine_minimizer(
  factor_kt: jax.Array, center_k: jax.Array, active_t: jax.Array, rcond: float
) -> jax.Array:
  """argmin_w ||c + R w|| subject to sum(w) = 1 and w = 0 off `active_t` (any sign).

  Null-space method: w = w0 + P y with w0 uniform on the active set and P the projector onto
  its zero-sum directions, then y by an SVD least-squares solve. Working with R (not R^T R)
  keeps the conditioning unsquared, so nearly dependent tasks are still resolved in float32.
  Among several minimisers (affinely dependent tasks) it returns the one closest to uniform,
  which is why identical vectors get equal weights. Dropping singular values below `rcond`
  costs at most about (rcond * max singular value)^2 in the objective near a minimiser inside
  the simplex.
  """
  active_f = active_t.astype(factor_kt.dtype)
  count = jnp.maximum(jnp.sum(active_f), 1.0)
  uniform_t = active_f / count
  projector_tt = jnp.diag(active_f) - active_f[:, None] * active_f[None, :] / count
  matrix_kt = jnp.dot(factor_kt, projector_tt, precision=_HIGHEST)
  target_k = -(center_k + jnp.dot(factor_kt, uniform_t, precision=_HIGHEST))
  u_kk, sing_k, vt_kt = jnp.linalg.svd(matrix_kt, full_matrices=False)
  # An absolute cutoff: the caller scales the vectors to unit largest norm, so singular values
  # below `rcond` are rounding noise (identical vectors leave offsets of ~1e-8). A cutoff
  # relative to the largest singular value would keep that noise when it is all there is, and
  # turn identical vectors into one-hot weights that differ between eager and jit.
  keep_k = sing_k > rcond * jnp.maximum(jnp.max(sing_k), 1.0)
  coeffs_k = jnp.dot(u_kk.T, target_k, precision=_HIGHEST)
  coeffs_k = jnp.where(keep_k, coeffs_k / jnp.where(keep_k, sing_k, 1.0), 0.0)
  step_t = jnp.dot(projector_tt, jnp.dot(vt_kt.T, coeffs_k, precision=_HIGHEST), precision=_HIGHEST)
  return jnp.where(active_t, uniform_t + step_t, 0.0)


def min_norm_weights(
  vectors_td: jax.Array,
  mask_t: jax.Array | None = None,
  *,
  max_iters: int | None = None,
  rel_tol: float = 1e-6,
  rcond: float = 1e-5,
) -> jax.Array:
  """Weights of the min-norm point of the convex hull of T vectors (the MGDA sub-problem).

  Solves `argmin_{w in simplex} ||sum_t w_t v_t||^2`. T = 1 and T = 2 are closed form. For T > 2
  this is an active-set method in the spirit of Wolfe's min-norm-point algorithm, inside a
  `lax.while_loop` on a T-dimensional reduction of the problem (one thin QR of the vectors'
  offsets from their mean, computed once): starting from uniform weights on all tasks, each step
  either jumps to the affine minimiser of the active set (when its weights are positive) or
  moves towards it until a weight reaches zero and drops that task; at an affine minimiser it
  stops if the Frank-Wolfe duality gap (a bound on the suboptimality) is below `rel_tol`, else it
  adds the most descending task. It ends after a handful of steps (about 2T) with the answer
  exact up to float32 rounding (about 1e-7 of the largest squared norm in the objective), where
  the paper's Frank-Wolfe stops at a 1e-5 change in the weights.

  Degenerate inputs are fine: identical or zero vectors, opposite or collinear ones, and T larger
  than D; among equally good answers the least-norm one (e.g. equal weights for identical
  vectors) is returned, and nothing divides by zero.

  Args:
    vectors_td: T vectors of dimension D (float).
    mask_t: optional bool [T]; tasks with False (absent from the batch) get weight exactly 0 and
      take no part in the problem. If all are False the result is all zeros.
    max_iters: cap on active-set steps for T > 2 (static); default `4 * T + 8`.
    rel_tol: stopping tolerance on the duality gap, relative to the largest squared norm.
    rcond: singular-value cutoff of the least-squares solves for affine minimisers, relative to
      the vectors scaled to unit largest norm (so absolute: noise below it is dropped).

  Returns:
    weights_t: non-negative, summing to 1 over the masked-in tasks.
  """
  vectors_td = jnp.asarray(vectors_td)
  if not jnp.issubdtype(vectors_td.dtype, jnp.floating):
    vectors_td = vectors_td.astype(jnp.float32)
  if vectors_td.ndim != 2:
    raise ValueError(f"min_norm_weights expects vectors_td of shape [T, D], got {vectors_td.shape}")
  num_tasks = vectors_td.shape[0]
  dtype = vectors_td.dtype
  if mask_t is None:
    mask_t = jnp.ones((num_tasks,), bool)
  mask_t = jnp.asarray(mask_t, bool)
  if num_tasks == 1:
    return mask_t.astype(dtype)
  if num_tasks == 2:
    return _two_task_weights(vectors_td, mask_t)
  if max_iters is None:
    max_iters = 4 * num_tasks + 8

  # The weights do not change when all vectors are scaled together: unit largest norm makes the
  # tolerances absolute. Then write each vector as centre + offset and factor the offsets once,
  # U^T = Q R (thin QR). On the simplex sum_t w_t v_t = c + U^T w, so
  # ||sum_t w_t v_t||^2 = ||c - Q Q^T c||^2 + ||Q^T c + R w||^2: a T-dimensional problem that
  # keeps the small differences between nearly coinciding vectors, which a Gram matrix of the
  # raw vectors would round away in float32.
  vectors_td = jnp.where(mask_t[:, None], vectors_td, 0.0)
  max_norm = jnp.sqrt(jnp.max(jnp.sum(vectors_td * vectors_td, axis=1)))
  vectors_td = vectors_td / jnp.where(max_norm > 0, max_norm, 1.0)
  count = jnp.maximum(jnp.sum(mask_t), 1).astype(dtype)
  center_d = jnp.sum(vectors_td, axis=0) / count
  offsets_td = jnp.where(mask_t[:, None], vectors_td - center_d, 0.0)
  basis_dk, factor_kt = jnp.linalg.qr(offsets_td.T, mode="reduced")
  center_k = jnp.dot(basis_dk.T, center_d, precision=_HIGHEST)

  def outside_gap(weights_t, active_t):
    # At an affine minimiser every active vertex has the same gradient, so the duality gap is
    # decided by the inactive ones; looking only at those keeps rounding on the active vertices
    # from re-adding a vertex that is already in.
    residual_k = center_k + jnp.dot(factor_kt, weights_t, precision=_HIGHEST)
    grad_t = jnp.dot(residual_k, factor_kt, precision=_HIGHEST)  # half the gradient, up to a
    # constant shared by all tasks (which the gap does not see)
    candidates_t = mask_t & ~active_t
    best_vertex = jnp.argmin(jnp.where(candidates_t, grad_t, jnp.inf))
    gap = 2.0 * (jnp.dot(weights_t, grad_t) - grad_t[best_vertex])
    return jnp.where(jnp.any(candidates_t), gap, 0.0), best_vertex

  def cond(carry):
    it, _, _, done = carry
    return (it < max_iters) & ~done

  def body(carry):
    it, weights_t, active_t, _ = carry
    affine_t = _affine_minimizer(factor_kt, center_k, active_t, rcond)
    inside = jnp.all(jnp.where(active_t, affine_t > 0, True))
    # Inside the simplex: take the affine minimiser, then stop or add the best new vertex.
    new_weights_t = jnp.where(active_t, affine_t, 0.0)
    gap, best_vertex = outside_gap(new_weights_t, active_t)
    converged = gap <= rel_tol
    grown_t = active_t.at[best_vertex].set(True)
    # Outside: walk towards it until the first weight reaches zero, and drop that task.
    shrink_t = active_t & (affine_t <= 0)
    ratio_t = jnp.where(
      shrink_t, weights_t / jnp.where(shrink_t, weights_t - affine_t, 1.0), jnp.inf
    )
    blocking = jnp.argmin(ratio_t)
    theta = jnp.clip(ratio_t[blocking], 0.0, 1.0)
    walked_t = jnp.where(active_t, weights_t + theta * (affine_t - weights_t), 0.0)
    walked_t = jnp.maximum(walked_t.at[blocking].set(0.0), 0.0)
    dropped_t = active_t.at[blocking].set(False) & (walked_t > 0)
    weights_t = jnp.where(inside, new_weights_t, walked_t)
    active_t = jnp.where(inside, jnp.where(converged, active_t, grown_t), dropped_t)
    return it + 1, weights_t, active_t, inside & converged

  weights0_t = mask_t.astype(dtype) / jnp.maximum(jnp.sum(mask_t), 1).astype(dtype)
  carry0 = (jnp.asarray(0), weights0_t, mask_t, ~jnp.any(mask_t))
  _, weights_t, _, _ = jax.lax.while_loop(cond, body, carry0)
  weights_t = jnp.where(mask_t, jnp.maximum(weights_t, 0.0), 0.0)
  return weights_t / jnp.maximum(jnp.sum(weights_t), jnp.finfo(dtype).tiny)
