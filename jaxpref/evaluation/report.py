"""Evaluation reports of data files: accuracy / calibration per file and pooled, report.json,
report.md, reliability diagrams, and a fitted temperature (what `python -m jaxpref.eval` writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxpref.data.errors import DataConfigError, DataError

TABLE_COLUMNS = (
  "accuracy",
  "n_pairs",
  # An even bin count: with an odd one the middle bin cancels exactly (docs/calibration.md), so
  # ece_5 stays in report.json but is no headline.
  "ece_10",
  "ece_20",
  "ace_10",
  "mce_10",
  "nll",
  "brier",
)


def markdown_table(reports: dict[str, dict[str, Any]]) -> str:
  """One row per dataset; accuracy and ECE-10 with their bootstrap 95% intervals when present."""
  header = "| data | " + " | ".join(TABLE_COLUMNS) + " |"
  lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
  for name, report in reports.items():
    cells = []
    for column in TABLE_COLUMNS:
      value = report[column]
      cell = f"{value}" if isinstance(value, int) else f"{value:.4f}"
      interval = report.get(f"{column}_ci")
      if interval:
        cell += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
      cells.append(cell)
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def evaluate_files(
  cfg,
  params,
  tokenizer,
  data_files: list[str],
  output: str | Path,
  *,
  batch_size: int,
  on_error: str,
  contract=None,
  max_length: int | None = None,
  on_tie: str = "keep",
  data_format: str = "auto",
  truncation_side: str = "left",
  n_bootstrap: int = 1000,
  temperature: float = 1.0,
  run: dict[str, Any] | None = None,
  progress: bool = False,
  packing: bool = True,
  share_prompts: bool = True,
) -> dict[str, dict[str, Any]]:
  """Scores each file, writes report.json / report.md / reliability PNGs, returns the reports.

  Args:
    contract: the model's `InputContract` (`models.source.load_tokenizer_and_contract`); without
      it, `max_length` and `truncation_side` with special_tokens=auto.
    run: what report.json records under `run` (model, step); the contract is added.
    progress: show a progress bar per file.
    packing, share_prompts: see `evaluator.collect_rewards` (the rewards do not change).
  """
  from jaxpref.data import reader
  from jaxpref.evaluation import evaluator as evaluation
  from jaxpref.evaluation import plots, reward_stats

  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  reports, all_rewards, all_scores, summaries = {}, [], [], {}
  for path in data_files:
    name = Path(path).name.split(".")[0]
    if name in reports:
      raise DataConfigError(f"two data files are both named {name!r}; rename one")
    items, summary = reader.read_preferences(
      path, format=data_format, on_error=on_error, on_tie=on_tie, task=name, tokenizer=tokenizer
    )
    if not items:
      raise DataError(str(path), f"no items to evaluate ({summary.describe()})", "config")
    batches = evaluation.tokenized_eval_batches(
      items,
      tokenizer,
      batch_size=batch_size,
      max_length=max_length,
      truncation_side=truncation_side,
      contract=contract,
    )
    rewards_bn, scores_bn = evaluation.collect_rewards(
      cfg,
      params,
      batches,
      progress=name if progress else None,
      packing=packing,
      share_prompts=share_prompts,
    )
    reports[name] = evaluation.report_for(
      rewards_bn, scores_bn, n_bootstrap=n_bootstrap, temperature=temperature
    )
    reports[name]["data"] = summary.to_dict()
    summaries[name] = summary
    all_rewards.append(rewards_bn)
    all_scores.append(scores_bn)
  pooled = evaluation.concat_padded(all_rewards, all_scores)
  reports["all"] = evaluation.report_for(*pooled, n_bootstrap=n_bootstrap, temperature=temperature)
  # Reward mean / std over these files (`jaxpref.score --normalize` can use them).
  reports["all"]["reward_stats"] = reward_stats.compute(*pooled)
  reward_stats.write(output, reports["all"]["reward_stats"])
  for name, report in reports.items():
    plots.reliability_diagram(
      report, output / f"reliability_{name}.png", title=f"{name}: ECE-10 {report['ece_10']:.3f}"
    )
  run = dict(run or {})
  if contract is not None:
    run["contract"] = contract.to_dict()
  (output / "report.json").write_text(json.dumps({**reports, "run": run}, indent=2))
  (output / "report.md").write_text(markdown_table(reports))
  return reports


def fit_and_store_temperature(
  cfg, params, tokenizer, data_files, store_dir: Path, *, fraction: float, **kwargs
) -> dict[str, Any]:
  """Fits T on a prompt-hash split of all files; reports ECE before/after on the rest."""
  from jaxpref.data import reader, splits
  from jaxpref.evaluation import evaluator as evaluation
  from jaxpref.evaluation import temperature

  fit_items, test_items = [], []
  for path in data_files:
    items, _ = reader.read_preferences(
      path,
      format=kwargs["data_format"],
      on_error=kwargs["on_error"],
      on_tie=kwargs["on_tie"],
      task=Path(path).name.split(".")[0],
      tokenizer=tokenizer,
    )
    test, fit = splits.split_items(items, fraction)
    fit_items += fit
    test_items += test
  scored = {}
  for name, items in (("fit", fit_items), ("test", test_items)):
    batches = evaluation.tokenized_eval_batches(
      items,
      tokenizer,
      batch_size=kwargs["batch_size"],
      contract=kwargs["contract"],
    )
    scored[name] = evaluation.collect_rewards(
      cfg,
      params,
      batches,
      packing=kwargs.get("packing", True),
      share_prompts=kwargs.get("share_prompts", True),
    )
  fit = temperature.fit_temperature(*scored["fit"])
  before = evaluation.report_for(*scored["test"], n_bootstrap=0)
  after = evaluation.report_for(*scored["test"], n_bootstrap=0, temperature=fit.temperature)
  result = {
    "temperature": fit.temperature,
    "fit": fit.to_dict(),
    "held_out": {
      "ece_10_before": before["ece_10"],
      "ece_10_after": after["ece_10"],
      "nll_before": before["nll"],
      "nll_after": after["nll"],
      "n_pairs": before["n_pairs"],
    },
  }
  store_dir.mkdir(parents=True, exist_ok=True)
  (store_dir / "temperature.json").write_text(json.dumps(result, indent=2))
  return result
