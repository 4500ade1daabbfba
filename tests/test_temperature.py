"""Temperature scaling: recovers a known miscalibration and agrees with a scipy minimiser."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.evaluation import calibration, temperature


def calibrated_items(seed: int, n_items: int = 20000, n: int = 2):
  """Rewards whose Bradley-Terry probabilities are the true preference probabilities.

  Preferences are drawn from Plackett-Luce, whose pairwise marginals are Bradley-Terry.
  """
  rng = np.random.default_rng(seed)
  rewards_bn = rng.normal(scale=1.5, size=(n_items, n)).astype(np.float32)
  gumbel_bn = rng.gumbel(size=(n_items, n))
  ranks_bn = np.argsort(np.argsort(rewards_bn + gumbel_bn, axis=1), axis=1)
  return rewards_bn, ranks_bn.astype(np.float32)


@pytest.mark.parametrize("n", [2, 3])
def test_recovers_the_temperature_of_overconfident_rewards(n):
  rewards_bn, scores_bn = calibrated_items(n, n=n)
  fit = temperature.fit_temperature(5.0 * rewards_bn, scores_bn)
  assert fit.temperature == pytest.approx(5.0, rel=0.1)
  assert fit.nll_after < fit.nll_before - 0.1
  assert fit.ece_after < 0.02 < 0.1 < fit.ece_before
  assert not fit.at_bound
  # The fitted T applied through the metrics gives the reported NLL and ECE.
  report = calibration.calibration_report(
    5.0 * rewards_bn, scores_bn, temperature=fit.temperature, n_bootstrap=0
  )
  assert report["nll"] == pytest.approx(fit.nll_after, rel=1e-4)
  assert report["ece_10"] == pytest.approx(fit.ece_after, abs=1e-5)


def test_calibrated_rewards_keep_temperature_near_one():
  rewards_bn, scores_bn = calibrated_items(0)
  fit = temperature.fit_temperature(rewards_bn, scores_bn)
  assert fit.temperature == pytest.approx(1.0, abs=0.1)
  assert fit.nll_after <= fit.nll_before + 1e-6


def test_matches_scipy_bounded_minimiser():
  optimize = pytest.importorskip("scipy.optimize")
  rng = np.random.default_rng(3)
  logits = rng.normal(loc=0.8, scale=2.0, size=500)  # r_chosen - r_rejected

  def nll(log_t):
    return np.mean(np.logaddexp(0.0, -logits * math.exp(-log_t)))

  expected = optimize.minimize_scalar(
    nll, bounds=(-5, 5), method="bounded", options={"xatol": 1e-8}
  )
  log_t, loss = temperature.fit_log_temperature(
    jnp.asarray(logits, jnp.float32), jnp.ones(500, bool)
  )
  assert float(log_t) == pytest.approx(expected.x, abs=1e-3)
  assert float(loss) == pytest.approx(expected.fun, rel=1e-5)


def test_degenerate_cases():
  none = temperature.fit_temperature(np.zeros((4, 2)), -np.ones((4, 2)))
  assert none.temperature == 1.0 and none.n_pairs == 0 and float(none) == 1.0
  # Perfectly separated pairs: the NLL keeps falling as T -> 0, so the fit stops at the bound.
  separable = temperature.fit_temperature(np.array([[2.0, 0.0]] * 8), np.array([[1.0, 0.0]] * 8))
  assert separable.at_bound and separable.temperature < 1e-2
  assert set(separable.to_dict()) >= {"temperature", "nll_before", "nll_after", "ece_after"}


def test_bad_input_is_a_clear_error():
  with pytest.raises(ValueError, match=r"must both be \[B, N\]"):
    temperature.fit_temperature(np.zeros((4, 2)), np.zeros((4, 3)))
  with pytest.raises(ValueError, match="non-finite"):
    temperature.fit_temperature(np.array([[np.inf, 0.0]]), np.array([[1.0, 0.0]]))
