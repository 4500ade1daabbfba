"""Calibration metrics against independent computations (torchmetrics, numpy and Python loops)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.evaluation import calibration

BIN_COUNTS = (5, 10, 20)


def random_predictions(seed: int, n: int = 4000):
  rng = np.random.default_rng(seed)
  probs = rng.random(n).astype(np.float32)
  # Labels drawn from a distorted version of the probabilities, so the model is miscalibrated.
  labels = (rng.random(n) < probs**1.7).astype(np.float32)
  valid = rng.random(n) < 0.8
  return probs, labels, valid


def loop_bins(probs, labels, edges):
  """Per-bin (count, mean p, mean y) with explicit interval tests, the paper's convention."""
  out = []
  for b in range(len(edges) - 1):
    lo, hi = edges[b], edges[b + 1]
    in_bin = (probs <= hi) if b == 0 else (probs > lo) & (probs <= hi)
    if b == len(edges) - 2:
      in_bin = probs > lo  # the last bin takes everything above its lower edge
    if b == 0 and len(edges) == 2:
      in_bin = np.ones_like(probs, bool)
    n = int(in_bin.sum())
    out.append((n, probs[in_bin].mean() if n else 0.0, labels[in_bin].mean() if n else 0.0))
  return out


def loop_errors(probs, labels, edges):
  bins = loop_bins(probs.astype(np.float64), labels.astype(np.float64), edges)
  gaps = [abs(p - y) for n, p, y in bins if n]
  ece = sum(n * abs(p - y) for n, p, y in bins) / len(probs)
  return {"ece": ece, "ace": sum(gaps) / len(gaps), "mce": max(gaps)}


# ---------------------------------------------------------------------------------------------
# calibration_errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bins", BIN_COUNTS)
def test_ece_and_mce_match_torchmetrics(n_bins):
  torch = pytest.importorskip("torch")
  tm = pytest.importorskip("torchmetrics.functional.classification")
  probs, labels, valid = random_predictions(n_bins)
  ours = calibration.calibration_errors(probs, labels, n_bins, valid=valid)
  preds_t = torch.from_numpy(probs[valid])
  target_t = torch.from_numpy(labels[valid]).long()
  ece = tm.binary_calibration_error(preds_t, target_t, n_bins=n_bins, norm="l1")
  mce = tm.binary_calibration_error(preds_t, target_t, n_bins=n_bins, norm="max")
  np.testing.assert_allclose(float(ours["ece"]), float(ece), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(ours["mce"]), float(mce), rtol=1e-5, atol=1e-6)
  assert float(ours["ece"]) > 0.02  # the data are miscalibrated: the test can fail


@pytest.mark.parametrize("n_bins", BIN_COUNTS)
def test_all_errors_match_a_numpy_loop(n_bins):
  probs, labels, valid = random_predictions(100 + n_bins)
  ours = calibration.calibration_errors(probs, labels, n_bins, valid=valid)
  expected = loop_errors(probs[valid], labels[valid], np.linspace(0, 1, n_bins + 1))
  for name in ("ece", "ace", "mce"):
    np.testing.assert_allclose(float(ours[name]), expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_bins", BIN_COUNTS)
def test_quantile_strategy_matches_numpy_percentile_bins(n_bins):
  probs, labels, valid = random_predictions(200 + n_bins)
  ours = calibration.calibration_errors(probs, labels, n_bins, "quantile", valid)
  binned = jax.jit(calibration.calibration_bins, static_argnums=(2, 3))(
    probs, labels, n_bins, "quantile", valid
  )
  edges = np.percentile(probs[valid].astype(np.float64), np.linspace(0, 100, n_bins + 1))
  np.testing.assert_allclose(np.asarray(binned.edges), edges, rtol=1e-6)
  expected = loop_errors(probs[valid], labels[valid], edges)
  for name in ("ece", "ace", "mce"):
    np.testing.assert_allclose(float(ours[name]), expected[name], rtol=1e-4, atol=1e-6)
  counts = np.asarray(binned.count)
  assert counts.max() - counts.min() <= 2  # equal mass


def test_bin_edge_convention_is_the_papers_searchsorted():
  n_bins = 10
  edges = np.asarray(calibration.bin_edges(None, n_bins))
  probs = np.concatenate([edges, [0.05, 0.5 + 1e-6, 0.999]]).astype(np.float32)
  ids = np.asarray(calibration.bin_ids(probs, jnp.asarray(edges)))
  np.testing.assert_array_equal(ids, np.searchsorted(edges[1:-1], probs, side="left"))
  assert ids[0] == 0 and ids[5] == 4 and ids[-4] == n_bins - 1  # p = 0, 0.5, 1.0


def test_no_valid_prediction_gives_zeros_not_nan():
  probs, labels, _ = random_predictions(0, 10)
  out = calibration.calibration_errors(probs, labels, 10, valid=np.zeros(10, bool))
  assert all(float(v) == 0.0 for v in out.values())
  out = calibration.calibration_errors(probs, labels, 5, "quantile", np.zeros(10, bool))
  assert all(float(v) == 0.0 for v in out.values())


def test_ece_sums_are_exact_for_millions_of_predictions():
  rng = np.random.default_rng(1)
  probs = rng.random(3_000_000).astype(np.float32)
  labels = (rng.random(3_000_000) < probs).astype(np.float32)
  ours = calibration.calibration_errors(probs, labels, 10)
  # float32 edges, like jaxpref's: ~1 in 3M predictions lands on the other side of a float64 edge.
  ids = np.searchsorted(np.linspace(0, 1, 11, dtype=np.float32)[1:-1], probs)
  gap = np.bincount(ids, probs.astype(np.float64) - labels, minlength=10)
  np.testing.assert_allclose(float(ours["ece"]), np.abs(gap).sum() / probs.size, atol=1e-9)


def test_bad_strategy_is_a_clear_error():
  with pytest.raises(ValueError, match="strategy must be one of"):
    calibration.calibration_errors(np.zeros(3), np.zeros(3), 5, "equal")


# ---------------------------------------------------------------------------------------------
# Pairwise helpers
# ---------------------------------------------------------------------------------------------


def random_lists(seed: int, n_items: int = 40, n: int = 3):
  """Items of N responses with tied scores, padded responses, tied rewards and all-pad rows."""
  rng = np.random.default_rng(seed)
  scores_bn = rng.integers(0, 3, size=(n_items, n)).astype(np.float32)
  scores_bn[rng.random((n_items, n)) < 0.2] = -1.0
  scores_bn[-1] = -1.0
  rewards_bn = rng.normal(size=(n_items, n)).astype(np.float32)
  rewards_bn[::7, 1] = rewards_bn[::7, 0]  # reward ties
  return rewards_bn, scores_bn


def loop_pairs(rewards_bn, scores_bn):
  out = []
  for rewards, scores in zip(rewards_bn.tolist(), scores_bn.tolist()):
    for i in range(len(scores)):
      for j in range(len(scores)):
        if i != j and scores[i] >= 0 and scores[j] >= 0 and scores[i] != scores[j]:
          p = 1.0 / (1.0 + math.exp(-(rewards[i] - rewards[j])))
          out.append((p, float(scores[i] > scores[j]), rewards[i] - rewards[j]))
  return out


@pytest.mark.parametrize("n", [2, 3, 5])
def test_pairwise_probs_labels_match_a_python_loop(n):
  rewards_bn, scores_bn = random_lists(n, n=n)
  probs, labels, valid = jax.jit(calibration.pairwise_probs_labels)(rewards_bn, scores_bn)
  assert probs.shape == (len(rewards_bn) * n * (n - 1),)
  expected = loop_pairs(rewards_bn, scores_bn)
  assert int(valid.sum()) == len(expected) > 0
  np.testing.assert_allclose(np.asarray(probs)[valid], [p for p, _, _ in expected], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(labels)[valid], [y for _, y, _ in expected])


def test_temperature_divides_the_reward_difference():
  rewards_bn, scores_bn = random_lists(0)
  probs, _, valid = calibration.pairwise_probs_labels(rewards_bn, scores_bn, temperature=2.5)
  expected = [1 / (1 + math.exp(-d / 2.5)) for _, _, d in loop_pairs(rewards_bn, scores_bn)]
  np.testing.assert_allclose(np.asarray(probs)[valid], expected, rtol=1e-6)


def test_accuracy_nll_brier_match_a_python_loop():
  rewards_bn, scores_bn = random_lists(3)
  pairs = loop_pairs(rewards_bn, scores_bn)
  strict = [d for _, y, d in pairs if y == 1.0]
  # A reward tie (d == 0) counts as wrong.
  assert any(d == 0.0 for d in strict)
  expected_acc = sum(d > 0 for d in strict) / len(strict)
  expected_nll = sum(-math.log(1 / (1 + math.exp(-d))) for d in strict) / len(strict)
  expected_brier = sum((p - y) ** 2 for p, y, _ in pairs) / len(pairs)

  @jax.jit
  def metrics(rewards_bn, scores_bn):
    probs, labels, valid = calibration.pairwise_probs_labels(rewards_bn, scores_bn)
    logits, _, _ = calibration.pairwise_logits_labels(rewards_bn, scores_bn)
    return (
      calibration.pairwise_accuracy(rewards_bn, scores_bn),
      calibration.nll(probs, labels, valid),
      calibration.nll_from_logits(logits, labels, valid),
      calibration.brier(probs, labels, valid),
    )

  acc, nll, nll_logits, brier = metrics(rewards_bn, scores_bn)
  np.testing.assert_allclose(float(acc), expected_acc, rtol=1e-6)
  np.testing.assert_allclose(float(nll), expected_nll, rtol=1e-5)
  np.testing.assert_allclose(float(nll_logits), expected_nll, rtol=1e-5)
  np.testing.assert_allclose(float(brier), expected_brier, rtol=1e-5)


def test_pairwise_shape_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match=r"must both be \[B, N\]"):
    calibration.pairwise_probs_labels(np.zeros((2, 3)), np.zeros((2, 2)))


# ---------------------------------------------------------------------------------------------
# calibration_report
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_items():
  rng = np.random.default_rng(7)
  n_items = 3000
  rewards_bn = rng.normal(scale=1.5, size=(n_items, 2)).astype(np.float32)
  prefer_first = rng.random(n_items) < 1 / (1 + np.exp(-(rewards_bn[:, 0] - rewards_bn[:, 1])))
  scores_bn = np.stack([prefer_first, ~prefer_first], axis=1).astype(np.float32)
  scores_bn[:100] = -1.0  # rows that only fill a batch
  scores_bn[100:150] = 1.0  # ties only
  return 2.0 * rewards_bn, scores_bn  # overconfident by a factor 2


@pytest.fixture(scope="module")
def report(synthetic_items):
  return calibration.calibration_report(*synthetic_items, n_bootstrap=400, seed=1)


def test_report_matches_independent_computations(synthetic_items, report):
  torch = pytest.importorskip("torch")
  tm = pytest.importorskip("torchmetrics.functional.classification")
  rewards_bn, scores_bn = synthetic_items
  pairs = loop_pairs(rewards_bn, scores_bn)
  probs = np.array([p for p, _, _ in pairs], np.float32)
  labels = np.array([y for _, y, _ in pairs], np.float32)
  assert report["n_pairs"] == len(pairs) // 2 == 2850
  assert report["n_ordered_pairs"] == len(pairs)
  assert report["n_items"] == 2850
  for n_bins in BIN_COUNTS:
    ece = tm.binary_calibration_error(
      torch.from_numpy(probs), torch.from_numpy(labels).long(), n_bins=n_bins, norm="l1"
    )
    np.testing.assert_allclose(report[f"ece_{n_bins}"], float(ece), rtol=1e-4, atol=1e-6)
  expected = loop_errors(probs, labels, np.linspace(0, 1, 11))
  np.testing.assert_allclose(report["ace_10"], expected["ace"], rtol=1e-4)
  np.testing.assert_allclose(report["mce_10"], expected["mce"], rtol=1e-4)
  strict = [d for _, y, d in pairs if y == 1.0]
  np.testing.assert_allclose(report["accuracy"], np.mean([d > 0 for d in strict]), rtol=1e-6)
  np.testing.assert_allclose(report["nll"], np.mean(np.logaddexp(0, -np.array(strict))), rtol=1e-5)
  np.testing.assert_allclose(report["brier"], np.mean((probs - labels) ** 2), rtol=1e-5)
  assert report["ece_10"] > 0.03  # overconfident


def test_report_bootstrap_intervals_are_plausible(report):
  for name, point in (("accuracy_ci", report["accuracy"]), ("ece_10_ci", report["ece_10"])):
    lo, hi = report[name]
    assert lo < point < hi, name
  # The accuracy interval should be close to the binomial one, 2 * 1.96 * sqrt(a (1 - a) / n).
  acc, n = report["accuracy"], report["n_pairs"]
  binomial_width = 2 * 1.96 * math.sqrt(acc * (1 - acc) / n)
  width = report["accuracy_ci"][1] - report["accuracy_ci"][0]
  assert 0.75 * binomial_width < width < 1.25 * binomial_width


def test_report_reliability_bins(report):
  bins = report["reliability"]
  assert bins["n_bins"] == 10 and len(bins["edges"]) == 11
  assert sum(bins["count"]) == report["n_ordered_pairs"]
  assert bins["ece"] == report["ece_10"]
  ece = sum(
    c * abs(p - y)
    for c, p, y in zip(bins["count"], bins["confidence"], bins["frequency"])
    if c  # empty bins hold None
  ) / sum(bins["count"])
  np.testing.assert_allclose(ece, report["ece_10"], rtol=1e-5)
  # Both orders of each pair are binned, so the diagram is point-symmetric about (0.5, 0.5).
  np.testing.assert_array_equal(bins["count"], bins["count"][::-1])


def test_report_without_pairs_and_bad_input():
  empty = calibration.calibration_report(np.zeros((3, 2)), -np.ones((3, 2)), n_bootstrap=10)
  assert empty["n_pairs"] == 0 and empty["ece_10"] == 0.0 and empty["accuracy_ci"] is None
  rewards_bn = np.zeros((3, 2), np.float32)
  rewards_bn[2, 1] = np.nan
  with pytest.raises(ValueError, match="non-finite values \\(first at item 2\\)"):
    calibration.calibration_report(rewards_bn, np.zeros((3, 2)))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    calibration.calibration_report(np.zeros((3, 2)), np.zeros((3, 2)), temperature=0.0)


def test_odd_bin_count_middle_bin_cancels():
  """docs/calibration.md: with both orders of every pair, an odd bin count's middle bin holds p
  and 1 - p with opposite labels and cancels exactly, however wrong the predictions are."""
  rng = np.random.default_rng(0)
  p_k = rng.uniform(0.42, 0.58, size=500).astype(np.float32)  # all in the middle of 5 bins
  y_k = np.zeros(500, np.float32)  # every prediction wrong-sided
  probs, labels = np.concatenate([p_k, 1 - p_k]), np.concatenate([y_k, 1 - y_k])
  ece_5 = float(calibration.calibration_errors(probs, labels, n_bins=5)["ece"])
  ece_4 = float(calibration.calibration_errors(probs, labels, n_bins=4)["ece"])
  assert ece_5 < 1e-6 and ece_4 > 0.05
