"""Scoring preference items with the shared compiled scorer, and calibration reports of them.

Used by the eval CLI (`jaxpref.eval`), by evaluation during training (`TrainEvaluator`) and by the
experiments: every path goes through `scoring.compiled_score_fn`, the function `jaxpref.score`
and the train step use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxpref.data import eval_batches, tokenize
from jaxpref.data import packing as packing_lib
from jaxpref.data.batch import PaddedBatch
from jaxpref.data.contract import InputContract
from jaxpref.data.records import PreferenceItem
from jaxpref.evaluation import calibration, reward_stats, scoring
from jaxpref.models import reward_model
from jaxpref.models.config import ModelConfig

# The metrics logged per task during training (the full report has more).
LOGGED_METRICS = ("accuracy", "n_pairs", "ece_10", "ace_10", "mce_10", "nll", "brier")


def tokenized_eval_batches(
  items: Sequence[PreferenceItem],
  tokenizer,
  *,
  batch_size: int,
  max_length: int | None = None,
  truncation_side: str = "left",
  min_bucket: int = 32,
  contract: InputContract | None = None,
) -> list[dict[str, np.ndarray]]:
  """Fixed-size, length-bucketed batches holding every item exactly once (see `valid_b`).

  With `contract` (the model's input contract) its length, sides and special tokens are used;
  without, `max_length` and `truncation_side` with `special_tokens="auto"`.
  """
  if contract is not None:
    max_length = contract.max_length
  if max_length is None:
    raise ValueError("give max_length or contract")
  return list(
    eval_batches.build_eval_batches(
      items,
      tokenizer,
      batch_size=batch_size,
      max_length=max_length,
      truncation_side=truncation_side,
      buckets=tokenize.length_buckets(max_length, min_bucket),
      contract=contract,
    )
  )


def concat_padded(
  rewards_list: Sequence[np.ndarray], scores_list: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
  """Stacks [b_k, N_k] rewards/scores into [sum b_k, max N_k], padding scores with -1 (ignored)."""
  width = max(r.shape[1] for r in rewards_list)
  pad = lambda a, value: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value)
  return (
    np.concatenate([pad(r, 0.0) for r in rewards_list]).astype(np.float32),
    np.concatenate([pad(s, -1.0) for s in scores_list]).astype(np.float32),
  )


def collect_rewards(
  cfg: ModelConfig,
  params,
  batches: Sequence[dict[str, np.ndarray]],
  *,
  progress: str | None = None,
  packing: bool = True,
  share_prompts: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """Rewards and scores of every real item in `batches`, as [num_items, N_max] arrays.

  Responses beyond an item's own count are padded with score -1 (ignored by every metric).
  `progress`: a description to show a progress bar with (None: no bar).
  `packing`, `share_prompts`: score each batch packed, each item's common prompt once, where the
  model allows (`reward_model.packable`); the rewards are those of the padded batch.
  """
  score = scoring.compiled_score_fn(cfg)
  packed = packing and reward_model.packable(cfg)
  rewards, scores = [], []
  if progress:
    from tqdm.auto import tqdm

    batches = tqdm(batches, desc=progress, unit="batch")
  for batch in batches:
    scoring.check_token_ids(int(np.max(batch["input_ids"], initial=0)), cfg.vocab_size)
    if packed:
      b, n, length = np.shape(batch["input_ids"])
      rewards_g = scoring.score_packed(
        cfg,
        params,
        packing_lib.batch_sequences(PaddedBatch.from_dict(batch)),
        row_length=length,
        share_prompts=share_prompts,
        row_multiple=max(1, b * n // 4),
        num_sequences=b * n,
      )
      rewards_bn = np.stack(rewards_g)
    else:
      rewards_bn, _ = score(params, batch["input_ids"], batch["attention_mask"])
    valid_b = np.asarray(batch["valid_b"], bool)
    rewards.append(np.asarray(jax.device_get(rewards_bn))[valid_b])
    scores.append(np.asarray(batch["scores"])[valid_b])
    real_bn = scores[-1] >= 0  # Padding responses (score -1) may hold anything.
    scoring.check_finite_rewards(rewards[-1][real_bn], params)
  if not rewards:
    return np.zeros((0, 2), np.float32), np.full((0, 2), -1.0, np.float32)
  return concat_padded(rewards, scores)


def report_for(rewards_bn: np.ndarray, scores_bn: np.ndarray, **kwargs) -> dict[str, Any]:
  return calibration.calibration_report(rewards_bn, scores_bn, **kwargs)


class TrainEvaluator:
  """Per-task accuracy and calibration on held-out splits, during and after training.

  Batches are tokenised once; each call scores them with the current parameters and returns
  flat scalars `eval/<task>/<metric>` plus `eval/all/<metric>` over every task together.
  """

  def __init__(
    self,
    cfg: ModelConfig,
    eval_items: Mapping[str, Sequence[PreferenceItem]],
    tokenizer,
    *,
    batch_size: int,
    max_length: int | None = None,
    min_bucket: int = 32,
    truncation_side: str = "left",
    n_bootstrap: int = 0,
    contract: InputContract | None = None,
    packing: bool = True,
    share_prompts: bool = True,
  ):
    self.cfg = cfg
    self.n_bootstrap = n_bootstrap
    self.layout = {"packing": packing, "share_prompts": share_prompts}
    self.batches = {
      task: tokenized_eval_batches(
        items,
        tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        truncation_side=truncation_side,
        min_bucket=min_bucket,
        contract=contract,
      )
      for task, items in eval_items.items()
      if items
    }

  @property
  def has_data(self) -> bool:
    return bool(self.batches)

  def reports(self, params) -> dict[str, dict[str, Any]]:
    """Full calibration reports per task and for all tasks together (`all`)."""
    per_task, all_rewards, all_scores = {}, [], []
    for task, batches in self.batches.items():
      rewards_bn, scores_bn = collect_rewards(self.cfg, params, batches, **self.layout)
      per_task[task] = report_for(rewards_bn, scores_bn, n_bootstrap=self.n_bootstrap)
      all_rewards.append(rewards_bn)
      all_scores.append(scores_bn)
    if all_rewards:
      pooled = concat_padded(all_rewards, all_scores)
      per_task["all"] = report_for(*pooled, n_bootstrap=self.n_bootstrap)
      per_task["all"]["reward_stats"] = reward_stats.compute(*pooled)
    return per_task

  def evaluate(self, params) -> dict[str, float]:
    return logged_scalars(self.reports(params))


def logged_scalars(reports: dict[str, dict[str, Any]]) -> dict[str, float]:
  """`eval/<task>/<metric>` scalars of per-task calibration reports (what training logs)."""
  return {
    f"eval/{task}/{name}": float(report[name])
    for task, report in reports.items()
    for name in LOGGED_METRICS
  }
