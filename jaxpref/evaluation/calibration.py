"""Pairwise calibration metrics of a reward model: ECE/ACE/MCE, accuracy, NLL and Brier score.

Definitions follow the paper's evaluation code (Zeng et al., arXiv 2312.07401). For every item and
every ordered pair (i, j) of its responses whose scores are both real (>= 0) and differ, the model
predicts p = sigmoid((r_i - r_j) / T) for the label y = [score_i > score_j]. Both orders of a pair
count (so the predictions are symmetric around 0.5); ties and padded responses give nothing.

Binning convention (the paper's `np.searchsorted(edges[1:-1], p)`): bin b holds
edges[b] < p <= edges[b + 1], except that the first bin also holds p == edges[0]. Uniform edges are
`linspace(0, 1, n_bins + 1)`; quantile edges are the `linspace(0, 1, n_bins + 1)` quantiles of the
valid predictions, interpolated linearly like `np.percentile`.

Everything below except `calibration_report` is jittable; arrays are flattened over items and
ordered pairs i != j in the order (item, i, j), so the pairwise helpers return fixed-size
[B * N * (N - 1)] arrays with a validity mask.

(Over 400 lines on purpose: every metric, the binning and the report share these pairwise and
binning helpers and their conventions; split, one definition would live in two files.)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("uniform", "quantile")
_SUM_CHUNKS = 256


# ---------------------------------------------------------------------------------------------
# (rewards, scores) -> ordered pairs
# ---------------------------------------------------------------------------------------------


def _check_pair_inputs(rewards_bn: jax.Array, scores_bn: jax.Array) -> None:
  if jnp.ndim(rewards_bn) != 2 or jnp.shape(rewards_bn) != jnp.shape(scores_bn):
    raise ValueError(
      f"rewards_bn and scores_bn must both be [B, N]; got {jnp.shape(rewards_bn)} and "
      f"{jnp.shape(scores_bn)}"
    )


def ordered_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices (i, j) of the n * (n - 1) ordered pairs i != j of n responses, row-major."""
  return np.nonzero(~np.eye(n, dtype=bool))


def _off_diagonal(x_bnn: jax.Array) -> jax.Array:
  """[B, N, N] -> [B, N * (N - 1)] without the diagonal, in `ordered_pairs` order.

  In the flattened matrix without its first entry, every diagonal entry ends a row of N + 1, so
  reshapes and a slice drop them (a gather with the `ordered_pairs` indices is ~8x slower on CPU).
  """
  b, n, _ = x_bnn.shape
  rows = x_bnn.reshape(b, n * n)[:, 1:].reshape(b, n - 1, n + 1)
  return rows[:, :, :n].reshape(b, n * (n - 1))


def pairwise_logits_labels(
  rewards_bn: jax.Array, scores_bn: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Reward differences, labels and validity of every ordered pair of each item's responses.

  Args:
    rewards_bn: [B, N] rewards.
    scores_bn: [B, N] preference scores (higher preferred, equal = tie, < 0 = padded response).

  Returns:
    `(logits_p, labels_p, valid_p)`, each [B * N * (N - 1)] in (item, i, j != i) order (see
    `ordered_pairs`): r_i - r_j (f32), [score_i > score_j] (f32), and whether both scores are
    >= 0 and differ (bool).
  """
  _check_pair_inputs(rewards_bn, scores_bn)
  rewards_bn = jnp.asarray(rewards_bn, jnp.float32)
  scores_bn = jnp.asarray(scores_bn, jnp.float32)
  real_bn = scores_bn >= 0
  logits_bm = _off_diagonal(rewards_bn[:, :, None] - rewards_bn[:, None, :])
  labels_bm = _off_diagonal(scores_bn[:, :, None] > scores_bn[:, None, :]).astype(jnp.float32)
  valid_bm = _off_diagonal(
    real_bn[:, :, None] & real_bn[:, None, :] & (scores_bn[:, :, None] != scores_bn[:, None, :])
  )
  return logits_bm.reshape(-1), labels_bm.reshape(-1), valid_bm.reshape(-1)


def pairwise_probs_labels(
  rewards_bn: jax.Array, scores_bn: jax.Array, *, temperature: float | jax.Array = 1.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Predicted preference probabilities sigmoid((r_i - r_j) / T) with labels and validity.

  Args:
    rewards_bn: [B, N] rewards.
    scores_bn: [B, N] preference scores (higher preferred, equal = tie, < 0 = padded response).
    temperature: T > 0 dividing the reward differences (1 = the model as trained).

  Returns:
    `(probs_p, labels_p, valid_p)`, each [B * N * (N - 1)] in (item, i, j != i) order.
  """
  logits_p, labels_p, valid_p = pairwise_logits_labels(rewards_bn, scores_bn)
  return jax.nn.sigmoid(logits_p / temperature), labels_p, valid_p


def pairwise_accuracy(rewards_bn: jax.Array, scores_bn: jax.Array) -> jax.Array:
  """Fraction of strict preferences (score_i > score_j, both >= 0) with r_i > r_j.

  A reward tie r_i == r_j counts as wrong. (The paper's code scores both orders of a pair and
  so gives a reward tie half credit; the two agree whenever rewards do not tie.) Returns 0 when
  there is no strict preference.
  """
  logits_p, labels_p, valid_p = pairwise_logits_labels(rewards_bn, scores_bn)
  strict_p = valid_p & (labels_p > 0)
  n_strict = jnp.sum(strict_p)
  return jnp.sum(strict_p & (logits_p > 0)) / jnp.maximum(n_strict, 1)


def _mask(valid: jax.Array | None, like: jax.Array) -> jax.Array:
  return jnp.ones(like.shape, bool) if valid is None else jnp.asarray(valid, bool).reshape(-1)


def nll(
  probs: jax.Array, labels: jax.Array, valid: jax.Array | None = None, *, eps: float = 1e-7
) -> jax.Array:
  """Mean binary cross-entropy of the valid predictions (probabilities clipped to [eps, 1-eps]).

  Over both orders of every pair this equals the mean Bradley-Terry loss -log sigmoid(r_i - r_j)
  over strict preferences; `nll_from_logits` computes it without clipping.
  """
  probs, labels = jnp.ravel(probs), jnp.ravel(labels).astype(jnp.float32)
  valid = _mask(valid, probs)
  probs = jnp.clip(probs, eps, 1.0 - eps)
  losses = -(labels * jnp.log(probs) + (1.0 - labels) * jnp.log1p(-probs))
  return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def nll_from_logits(
  logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
  """Mean binary cross-entropy of sigmoid(logits), computed stably from the logits."""
  logits, labels = jnp.ravel(logits), jnp.ravel(labels).astype(jnp.float32)
  valid = _mask(valid, logits)
  losses = -(labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits))
  return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def brier(probs: jax.Array, labels: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Mean squared error (p - y)^2 of the valid predictions."""
  probs, labels = jnp.ravel(probs), jnp.ravel(labels).astype(jnp.float32)
  valid = _mask(valid, probs)
  return jnp.sum(jnp.where(valid, (probs - labels) ** 2, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


# ---------------------------------------------------------------------------------------------
# Binning and calibration errors
# ---------------------------------------------------------------------------------------------


class CalibrationBins(NamedTuple):
  """Per-bin sums of a set of predictions (a pytree, so it crosses `jit`)."""

  edges: jax.Array  # [n_bins + 1]
  count: jax.Array  # [n_bins] number of valid predictions in the bin
  sum_probs: jax.Array  # [n_bins]
  sum_labels: jax.Array  # [n_bins]
  # sum(p - y) accumulated as such: the difference of the two sums above would lose the ECE's
  # precision to their float32 rounding once a bin holds ~1e5 predictions.
  sum_gaps: jax.Array  # [n_bins]


def _masked_quantiles(values: jax.Array, valid: jax.Array, qs: jax.Array) -> jax.Array:
  """`np.percentile(values[valid], 100 * qs)` (linear interpolation) with a traced mask."""
  n = jnp.sum(valid)
  sorted_v = jnp.sort(jnp.where(valid, values, jnp.inf))
  pos = qs * jnp.maximum(n - 1, 0).astype(jnp.float32)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
  frac = pos - lo
  # `where` rather than `lo + frac * (hi - lo)` so that an inf gap (n == 0) yields no NaN.
  lo_v, hi_v = sorted_v[lo], sorted_v[hi]
  out = jnp.where(frac > 0, lo_v + frac * (hi_v - lo_v), lo_v)
  return jnp.where(n > 0, out, qs)


def bin_edges(
  probs: jax.Array, n_bins: int, strategy: str = "uniform", valid: jax.Array | None = None
) -> jax.Array:
  """The n_bins + 1 bin edges of the given strategy ("uniform" or "quantile")."""
  qs = jnp.linspace(0.0, 1.0, n_bins + 1, dtype=jnp.float32)
  if strategy == "uniform":
    return qs
  if strategy == "quantile":
    probs = jnp.ravel(probs)
    return _masked_quantiles(probs, _mask(valid, probs), qs)
  raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")


def bin_ids(probs: jax.Array, edges: jax.Array) -> jax.Array:
  """Bin index of each prediction: bin b holds edges[b] < p <= edges[b + 1] (p <= edges[1] -> 0)."""
  inner = edges[1:-1]
  # A dense compare against the few inner edges: vectorises better than a per-element search.
  return jnp.sum(jnp.ravel(probs)[:, None] > inner[None, :], axis=1).astype(jnp.int32)


def calibration_bins(
  probs: jax.Array,
  labels: jax.Array,
  n_bins: int = 10,
  strategy: str = "uniform",
  valid: jax.Array | None = None,
) -> CalibrationBins:
  """Counts and sums of predictions and labels per bin (the data of a reliability diagram)."""
  probs, labels = jnp.ravel(probs).astype(jnp.float32), jnp.ravel(labels).astype(jnp.float32)
  weights = _mask(valid, probs).astype(jnp.float32)
  edges = bin_edges(probs, n_bins, strategy, valid)
  # A scatter-add accumulates sequentially in float32, which for millions of predictions loses
  # ~1e-5 of ECE; summing per contiguous chunk first and then across chunks keeps float32 exact
  # to ~1e-9 at the same cost. (A one-hot matmul is exact too but ~10x slower on CPU.)
  chunk_size = max(1, -(-probs.size // _SUM_CHUNKS))
  n_chunks = max(1, -(-probs.size // chunk_size))
  chunk_p = jnp.arange(probs.size, dtype=jnp.int32) // chunk_size
  segment_p = chunk_p * n_bins + bin_ids(probs, edges)
  count, sum_probs, sum_gaps = (
    jax.ops.segment_sum(x, segment_p, n_chunks * n_bins).reshape(n_chunks, n_bins).sum(0)
    for x in (weights, weights * probs, weights * (probs - labels))
  )
  return CalibrationBins(edges, count, sum_probs, sum_probs - sum_gaps, sum_gaps)


def errors_from_bins(bins: CalibrationBins) -> dict[str, jax.Array]:
  """ECE, ACE and MCE from per-bin sums (all 0 when there are no predictions)."""
  gap_k = jnp.abs(bins.sum_gaps)
  nonempty_k = bins.count > 0
  mean_gap_k = jnp.where(nonempty_k, gap_k / jnp.maximum(bins.count, 1), 0.0)
  return {
    "ece": jnp.sum(gap_k) / jnp.maximum(jnp.sum(bins.count), 1),
    "ace": jnp.sum(mean_gap_k) / jnp.maximum(jnp.sum(nonempty_k), 1),
    "mce": jnp.max(mean_gap_k),
  }


@functools.partial(jax.jit, static_argnames=("n_bins", "strategy"))
def calibration_errors(
  probs: jax.Array,
  labels: jax.Array,
  n_bins: int = 10,
  strategy: str = "uniform",
  valid: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Expected, average and maximum calibration error of binary predictions.

  ECE = sum_b |sum_{k in b} p_k - sum_{k in b} y_k| / n; ACE = mean over non-empty bins of
  |mean p - mean y|; MCE = max over bins of the same.

  Args:
    probs: predicted probabilities of the label being 1, any shape (flattened).
    labels: 0/1 labels, same size as `probs`.
    n_bins: number of bins (static).
    strategy: "uniform" (equal-width bins on [0, 1]) or "quantile" (equal-mass bins) (static).
    valid: optional boolean mask; invalid predictions are ignored.

  Returns:
    {"ece", "ace", "mce"}: float32 scalars (0 when no prediction is valid).
  """
  return errors_from_bins(calibration_bins(probs, labels, n_bins, strategy, valid))


# ---------------------------------------------------------------------------------------------
# Report with bootstrap intervals
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("bins", "ci_bins", "diagram_bins", "n_bootstrap"))
def _report_arrays(
  rewards_bn: jax.Array,
  scores_bn: jax.Array,
  temperature: jax.Array,
  key: jax.Array,
  *,
  bins: tuple[int, ...],
  ci_bins: int,
  diagram_bins: int,
  n_bootstrap: int,
) -> dict[str, Any]:
  n_items, n = rewards_bn.shape
  logits_p, labels_p, valid_p = pairwise_logits_labels(rewards_bn, scores_bn)
  logits_p = logits_p / temperature
  probs_p = jax.nn.sigmoid(logits_p)
  out = {
    "n_ordered_pairs": jnp.sum(valid_p),
    "accuracy": pairwise_accuracy(rewards_bn, scores_bn),
    "nll": nll_from_logits(logits_p, labels_p, valid_p),
    "brier": brier(probs_p, labels_p, valid_p),
  }
  for n_bins in sorted(set(bins) | {ci_bins, diagram_bins}):
    binned = calibration_bins(probs_p, labels_p, n_bins, "uniform", valid_p)
    for name, value in errors_from_bins(binned).items():
      out[f"{name}_{n_bins}"] = value
    if n_bins == diagram_bins:
      out["diagram"] = binned
  if n_bootstrap:
    ci_22 = _bootstrap_ci(logits_p, labels_p, valid_p, key, n_items, ci_bins, n_bootstrap)
    out["accuracy_ci"] = ci_22[:, 0]
    out[f"ece_{ci_bins}_ci"] = ci_22[:, 1]
  return out


_REPLICATES_PER_STEP = 8


def _bootstrap_ci(
  logits_p: jax.Array,
  labels_p: jax.Array,
  valid_p: jax.Array,
  key: jax.Array,
  n_items: int,
  n_bins: int,
  n_bootstrap: int,
) -> jax.Array:
  """[2.5%, 97.5%] percentiles ([2, 2]: rows lo/hi, columns accuracy/ECE) over resampled items."""
  # Per-item sufficient statistics [B, 2 + n_bins]: (correct, strict, sum(p - y) per bin). Every
  # strict preference adds two binned predictions, so a replicate's ECE is
  # sum_k |gap_k| / (2 * strict), and the replicate is one weighted sum over items.
  item_p = jnp.repeat(jnp.arange(n_items), logits_p.size // max(n_items, 1))
  probs_p = jax.nn.sigmoid(logits_p)
  strict_p = (valid_p & (labels_p > 0)).astype(jnp.float32)
  gap_p = jnp.where(valid_p, probs_p - labels_p, 0.0)
  segment_p = item_p * n_bins + bin_ids(probs_p, bin_edges(probs_p, n_bins))
  stats_bs = jnp.concatenate(
    [
      jax.ops.segment_sum(strict_p * (logits_p > 0), item_p, n_items)[:, None],
      jax.ops.segment_sum(strict_p, item_p, n_items)[:, None],
      jax.ops.segment_sum(gap_p, segment_p, n_items * n_bins).reshape(n_items, n_bins),
    ],
    axis=1,
  )

  def replicate_counts(replicate_key: jax.Array) -> jax.Array:
    # `bits % B` rather than `randint`: half the cost, with a bias of B / 2**32 (1e-4 at 500k).
    picks = jax.random.bits(replicate_key, (n_items,), jnp.uint32) % n_items
    return jnp.bincount(picks.astype(jnp.int32), length=n_items).astype(jnp.float32)

  def replicates(keys_r: jax.Array) -> jax.Array:
    # A few replicates at a time turn the weighted sums into one small matmul.
    totals_rs = jax.vmap(replicate_counts)(keys_r) @ stats_bs
    accuracy_r = totals_rs[:, 0] / jnp.maximum(totals_rs[:, 1], 1)
    ece_r = jnp.sum(jnp.abs(totals_rs[:, 2:]), axis=1) / jnp.maximum(2 * totals_rs[:, 1], 1)
    return jnp.stack([accuracy_r, ece_r], axis=1)

  n_steps = -(-n_bootstrap // _REPLICATES_PER_STEP)
  keys = jax.random.split(key, n_steps * _REPLICATES_PER_STEP)
  keys = keys.reshape(n_steps, _REPLICATES_PER_STEP)
  replicates_r2 = jax.lax.map(replicates, keys).reshape(-1, 2)[:n_bootstrap]
  return jnp.percentile(replicates_r2, jnp.array([2.5, 97.5]), axis=0)


def _bins_to_json(binned: CalibrationBins, ece: float) -> dict[str, Any]:
  count = np.asarray(binned.count, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    confidence = np.asarray(binned.sum_probs, np.float64) / count
    frequency = np.asarray(binned.sum_labels, np.float64) / count
  nullable = lambda xs: [None if np.isnan(x) else float(x) for x in xs]
  return {
    "n_bins": int(count.size),
    "edges": [float(e) for e in np.asarray(binned.edges)],
    "confidence": nullable(confidence),  # mean p in the bin; None when empty
    "frequency": nullable(frequency),  # mean y in the bin; None when empty
    "count": [int(c) for c in count],
    "ece": float(ece),
  }


def calibration_report(
  rewards_bn: Any,
  scores_bn: Any,
  *,
  bins: tuple[int, ...] = (5, 10, 20),
  n_bootstrap: int = 1000,
  seed: int = 0,
  temperature: float = 1.0,
  ci_bins: int = 10,
  diagram_bins: int = 10,
) -> dict[str, Any]:
  """All pairwise metrics of a set of scored items as a JSON-ready dict.

  Args:
    rewards_bn: [B, N] rewards (numpy or jax).
    scores_bn: [B, N] preference scores (higher preferred, equal = tie, < 0 = padded response).
    bins: bin counts for `ece_{b}`, `ace_{b}`, `mce_{b}` (uniform bins).
    n_bootstrap: bootstrap replicates (resampling items with replacement) for the 95% intervals
      `accuracy_ci` and `ece_{ci_bins}_ci`; 0 skips them.
    seed: seed of the bootstrap.
    temperature: T dividing reward differences before the sigmoid.
    ci_bins: bin count of the ECE whose interval is bootstrapped.
    diagram_bins: bin count of the per-bin data in `reliability` (for `jaxpref.evaluation.plots`).

  Returns:
    {"accuracy", "n_pairs" (strict preferences), "n_ordered_pairs" (predictions binned: both
    orders), "n_items" (items with at least one pair), "nll", "brier", "temperature",
    "ece_b"/"ace_b"/"mce_b" per bin count, "accuracy_ci" and "ece_10_ci" as [lo, hi],
    "reliability": {"n_bins", "edges", "confidence", "frequency", "count", "ece"}}.

  Raises:
    ValueError: on mismatched shapes or non-finite rewards.
  """
  rewards_bn = np.asarray(rewards_bn, np.float32)
  scores_bn = np.asarray(scores_bn, np.float32)
  _check_pair_inputs(rewards_bn, scores_bn)
  bad = np.argwhere(~np.isfinite(rewards_bn))
  if bad.size:
    raise ValueError(f"rewards_bn has {len(bad)} non-finite values (first at item {bad[0][0]})")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0; got {temperature}")
  # Items without a pair (ties only, or batch-filling rows) would only add noise to the bootstrap.
  real_bn = scores_bn >= 0
  has_pair_b = np.max(np.where(real_bn, scores_bn, -np.inf), axis=1, initial=-np.inf) > np.min(
    np.where(real_bn, scores_bn, np.inf), axis=1, initial=np.inf
  )
  rewards_bn, scores_bn = rewards_bn[has_pair_b], scores_bn[has_pair_b]
  arrays = _report_arrays(
    rewards_bn,
    scores_bn,
    jnp.float32(temperature),
    jax.random.key(seed),
    bins=tuple(bins),
    ci_bins=ci_bins,
    diagram_bins=diagram_bins,
    n_bootstrap=n_bootstrap if len(rewards_bn) else 0,
  )
  arrays = jax.device_get(arrays)
  n_ordered = int(arrays["n_ordered_pairs"])
  report: dict[str, Any] = {
    "accuracy": float(arrays["accuracy"]),
    "n_pairs": n_ordered // 2,
    "n_ordered_pairs": n_ordered,
    "n_items": int(len(rewards_bn)),
    "nll": float(arrays["nll"]),
    "brier": float(arrays["brier"]),
    "temperature": float(temperature),
  }
  for n_bins in bins:
    for name in ("ece", "ace", "mce"):
      report[f"{name}_{n_bins}"] = float(arrays[f"{name}_{n_bins}"])
  for name in ("accuracy_ci", f"ece_{ci_bins}_ci"):
    report[name] = [float(x) for x in arrays[name]] if name in arrays else None
  report["reliability"] = _bins_to_json(arrays["diagram"], arrays[f"ece_{diagram_bins}"])
  return report
