"""Post-hoc temperature scaling of a reward model's pairwise preference probabilities.

One scalar T > 0 divides every reward difference: p = sigmoid((r_i - r_j) / T). It changes
neither the ranking nor the accuracy, only how confident the probabilities are. T is fitted on a
held-out split by minimising the pairwise NLL (the Bradley-Terry loss) over log T.

The NLL is convex in 1 / T, hence unimodal in log T, so a golden-section search on a bracket of
log T finds the global minimum without step sizes or a starting point to tune; 80 iterations
shrink the bracket below float32 resolution.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.evaluation import calibration

# log T is searched in [-LOG_T_BOUND, LOG_T_BOUND]: T in [1e-3, 1e3]. A fit at a bound means the
# data are separable (T -> 0) or the rewards carry no signal or the wrong sign (T -> inf).
LOG_T_BOUND = math.log(1e3)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclasses.dataclass(frozen=True)
class TemperatureFit:
  """A fitted temperature and the pairwise NLL and ECE before (T = 1) and after scaling.

  `float(fit)` is the temperature.
  """

  temperature: float
  nll_before: float
  nll_after: float
  ece_before: float
  ece_after: float
  n_pairs: int
  n_bins: int
  at_bound: bool

  def __float__(self) -> float:
    return self.temperature

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def scaled_nll(log_temperature: jax.Array, logits_p: jax.Array, valid_p: jax.Array) -> jax.Array:
  """Mean NLL of strict preferences at temperature exp(log_temperature).

  Only the y = 1 orientation of each pair is needed: the reversed order has the same loss.
  """
  losses = -jax.nn.log_sigmoid(logits_p * jnp.exp(-log_temperature))
  return jnp.sum(jnp.where(valid_p, losses, 0.0)) / jnp.maximum(jnp.sum(valid_p), 1)


@functools.partial(jax.jit, static_argnames=("n_iters",))
def fit_log_temperature(
  logits_p: jax.Array, valid_p: jax.Array, n_iters: int = 80
) -> tuple[jax.Array, jax.Array]:
  """Golden-section search of argmin_{log T} NLL on [-LOG_T_BOUND, LOG_T_BOUND].

  Args:
    logits_p: [P] reward differences r_i - r_j of strict preferences (score_i > score_j).
    valid_p: [P] which entries are real pairs.
    n_iters: bracket reductions (each by the golden ratio).

  Returns:
    (log_temperature, nll at it), f32 scalars.
  """
  loss = lambda t: scaled_nll(t, logits_p, valid_p)

  def step(_, state):
    lo, hi, x1, x2, f1, f2 = state
    # Keep the sub-bracket that holds the smaller value; reuse one interior point and its loss.
    left = f1 <= f2
    lo, hi = jnp.where(left, lo, x1), jnp.where(left, x2, hi)
    new_x = jnp.where(left, hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo))
    new_f = loss(new_x)
    x1, x2 = jnp.where(left, new_x, x2), jnp.where(left, x1, new_x)
    f1, f2 = jnp.where(left, new_f, f2), jnp.where(left, f1, new_f)
    return lo, hi, x1, x2, f1, f2

  lo, hi = jnp.float32(-LOG_T_BOUND), jnp.float32(LOG_T_BOUND)
  x1, x2 = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
  state = jax.lax.fori_loop(0, n_iters, step, (lo, hi, x1, x2, loss(x1), loss(x2)))
  lo, hi = state[0], state[1]
  best = 0.5 * (lo + hi)
  return best, loss(best)


def fit_temperature(rewards_bn: Any, scores_bn: Any, *, n_bins: int = 10) -> TemperatureFit:
  """Fits the temperature that minimises the pairwise NLL of held-out (rewards, scores).

  Args:
    rewards_bn: [B, N] rewards of a held-out split.
    scores_bn: [B, N] preference scores (higher preferred, equal = tie, < 0 = padded response).
    n_bins: uniform bins of the ECE reported before and after.

  Returns:
    A `TemperatureFit` (T = 1 when there is no strict preference).

  Raises:
    ValueError: on mismatched shapes or non-finite rewards.
  """
  rewards_bn = np.asarray(rewards_bn, np.float32)
  scores_bn = np.asarray(scores_bn, np.float32)
  if rewards_bn.ndim != 2 or rewards_bn.shape != scores_bn.shape:
    raise ValueError(
      f"rewards_bn and scores_bn must both be [B, N]; got {rewards_bn.shape} and {scores_bn.shape}"
    )
  bad = np.argwhere(~np.isfinite(rewards_bn))
  if bad.size:
    raise ValueError(f"rewards_bn has {len(bad)} non-finite values (first at item {bad[0][0]})")
  log_t, nll_before, nll_after, ece_before, ece_after, n_pairs = jax.device_get(
    _fit_and_evaluate(rewards_bn, scores_bn, n_bins=n_bins)
  )
  n_pairs = int(n_pairs)
  log_t = float(log_t) if n_pairs else 0.0
  return TemperatureFit(
    temperature=math.exp(log_t),
    nll_before=float(nll_before),
    nll_after=float(nll_after) if n_pairs else float(nll_before),
    ece_before=float(ece_before),
    ece_after=float(ece_after) if n_pairs else float(ece_before),
    n_pairs=n_pairs,
    n_bins=n_bins,
    at_bound=bool(n_pairs) and abs(log_t) > LOG_T_BOUND - 1e-3,
  )


@functools.partial(jax.jit, static_argnames=("n_bins",))
def _fit_and_evaluate(rewards_bn: jax.Array, scores_bn: jax.Array, *, n_bins: int):
  logits_p, labels_p, valid_p = calibration.pairwise_logits_labels(rewards_bn, scores_bn)
  strict_p = valid_p & (labels_p > 0)
  log_t, nll_after = fit_log_temperature(logits_p, strict_p)
  ece = lambda t: calibration.calibration_errors(
    jax.nn.sigmoid(logits_p / t), labels_p, n_bins, "uniform", valid_p
  )["ece"]
  nll_before = scaled_nll(jnp.float32(0.0), logits_p, strict_p)
  return log_t, nll_before, nll_after, ece(1.0), ece(jnp.exp(log_t)), jnp.sum(strict_p)
