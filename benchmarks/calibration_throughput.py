"""ECE/ACE/MCE throughput: jaxpref (jitted) vs the paper's list-based computation, same run.

The baseline re-creates how the paper's evaluation (`compute_metrics` in the MORE repository)
gets calibration errors from (rewards, scores): pairwise differences and masks as dense arrays,
then, once per bin count, every [B, N, N] entry is turned into a Python list, filtered in a
Python loop, turned back into arrays and binned with `searchsorted` / `bincount`.

Both sides start from the same numpy [B, N] rewards and scores and produce ECE, ACE and MCE at
5, 10 and 20 uniform bins; the table also shows that their results agree.

  python benchmarks/calibration_throughput.py                # 1M preference pairs
  python benchmarks/calibration_throughput.py --smoke        # 10k pairs, seconds
  python benchmarks/calibration_throughput.py --json OUT.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time

import jax
import numpy as np

from jaxpref.evaluation import calibration

BINS = (5, 10, 20)


def paper_style_errors(rewards_bn: np.ndarray, scores_bn: np.ndarray, n_bins: int):
  """ECE, ACE, MCE the list-based way (one full pass per bin count, as the paper's code does)."""
  diff_bnn = rewards_bn[:, None, :] - rewards_bn[:, :, None]
  larger_bnn = (scores_bn[:, None, :] > scores_bn[:, :, None]).astype(np.float32)
  smaller_bnn = (scores_bn[:, None, :] < scores_bn[:, :, None]).astype(np.float32)
  real_bn = (scores_bn >= 0).astype(np.float32)
  mask_bnn = (larger_bnn + smaller_bnn) * real_bn[:, None, :] * real_bn[:, :, None]
  probs_bnn = 1.0 / (1.0 + np.exp(-diff_bnn))

  labels, probs = [], []
  for label, prob, keep in zip(
    larger_bnn.reshape(-1).tolist(), probs_bnn.reshape(-1).tolist(), mask_bnn.reshape(-1).tolist()
  ):
    if keep:
      labels.append(label)
      probs.append(prob)
  labels, probs = np.array(labels), np.array(probs)

  edges = np.linspace(0.0, 1.0, n_bins + 1)
  ids = np.searchsorted(edges[1:-1], probs)
  sum_p = np.bincount(ids, weights=probs, minlength=n_bins)
  sum_y = np.bincount(ids, weights=labels, minlength=n_bins)
  count = np.bincount(ids, minlength=n_bins)
  nonempty = count > 0
  mean_gap = np.abs(sum_p[nonempty] - sum_y[nonempty]) / count[nonempty]
  return np.abs(sum_p - sum_y).sum() / len(probs), mean_gap.mean(), mean_gap.max()


@functools.partial(jax.jit, static_argnames=("bins",))
def jaxpref_errors(rewards_bn, scores_bn, bins=BINS):
  probs_p, labels_p, valid_p = calibration.pairwise_probs_labels(rewards_bn, scores_bn)
  out = {}
  for n_bins in bins:
    errors = calibration.calibration_errors(probs_p, labels_p, n_bins, "uniform", valid_p)
    out.update({f"{name}_{n_bins}": value for name, value in errors.items()})
  return out


def median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def synthetic(n_pairs: int, n_responses: int, seed: int):
  """Items of `n_responses` responses with distinct scores, so each gives n(n-1)/2 pairs."""
  rng = np.random.default_rng(seed)
  n_items = max(1, n_pairs // (n_responses * (n_responses - 1) // 2))
  rewards_bn = rng.normal(size=(n_items, n_responses)).astype(np.float32)
  # Scores that agree with the rewards two times in three, so that the errors are not trivial.
  noisy_bn = rewards_bn + rng.normal(scale=1.0, size=rewards_bn.shape)
  scores_bn = np.argsort(np.argsort(noisy_bn, axis=1), axis=1).astype(np.float32)
  return rewards_bn, scores_bn


def time_both(rewards_bn, scores_bn, bins, repeats: int, baseline_repeats: int, n_strict: int):
  """One table row: both implementations on the same inputs, timed and compared."""
  run_ours = lambda: jax.block_until_ready(jaxpref_errors(rewards_bn, scores_bn, bins))
  ours = run_ours()  # warm-up: compile
  ours_s = median_seconds(run_ours, repeats)
  paper = {}
  run_paper = lambda: paper.update({b: paper_style_errors(rewards_bn, scores_bn, b) for b in bins})
  paper_s = median_seconds(run_paper, baseline_repeats)
  max_diff = max(
    abs(float(ours[f"{name}_{b}"]) - float(paper[b][k]))
    for b in bins
    for k, name in enumerate(("ece", "ace", "mce"))
  )
  return {
    "bins": list(bins),
    "paper_s": paper_s,
    "jaxpref_s": ours_s,
    "speedup": paper_s / ours_s,
    "jaxpref_pairs_per_s": n_strict / ours_s,
    "max_abs_diff": max_diff,
    "ece": {str(b): float(ours[f"ece_{b}"]) for b in bins},
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pairs", type=int, default=1_000_000, help="preference pairs (strict)")
  parser.add_argument("--responses", type=int, default=2, help="responses per item (N)")
  parser.add_argument("--repeats", type=int, default=10, help="timed jaxpref calls (median)")
  parser.add_argument("--baseline_repeats", type=int, default=3, help="timed baseline calls")
  parser.add_argument("--smoke", action="store_true", help="10k pairs, 1 baseline repeat")
  parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.smoke:
    args.pairs, args.repeats, args.baseline_repeats = 10_000, 3, 1

  rewards_bn, scores_bn = synthetic(args.pairs, args.responses, args.seed)
  n_items, n = rewards_bn.shape
  n_strict = n_items * n * (n - 1) // 2

  rows = [
    time_both(rewards_bn, scores_bn, bins, args.repeats, args.baseline_repeats, n_strict)
    for bins in [(b,) for b in BINS] + [BINS]
  ]

  device = jax.devices()[0]
  print(
    f"{n_strict:,} preference pairs ({n_items:,} items x {n} responses, "
    f"{2 * n_strict:,} ordered predictions); device: {device.platform} ({device.device_kind})"
  )
  header = (
    f"{'bins':<12}{'paper list (s)':>16}{'jaxpref (ms)':>14}{'speed-up':>10}{'max |diff|':>12}"
  )
  print(header)
  print("-" * len(header))
  for row in rows:
    bins_text = ",".join(map(str, row["bins"]))
    print(
      f"{bins_text:<12}{row['paper_s']:>16.3f}{1e3 * row['jaxpref_s']:>14.2f}"
      f"{row['speedup']:>9.0f}x{row['max_abs_diff']:>12.1e}"
    )
  if args.json:
    result = {
      "benchmark": "calibration_throughput",
      "pairs": n_strict,
      "items": n_items,
      "responses": n,
      "repeats": args.repeats,
      "baseline_repeats": args.baseline_repeats,
      "device": f"{device.platform} ({device.device_kind})",
      "jax": jax.__version__,
      "python": platform.python_version(),
      "rows": rows,
    }
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
