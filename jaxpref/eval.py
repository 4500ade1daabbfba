"""`python -m jaxpref.eval`: accuracy and calibration of a reward model, per data file.

  python -m jaxpref.eval --model=HF_DIR | --workdir=DIR [--step=N] --data=FILE [--data=FILE ...]
      --output=OUT [--max_length=N] [--truncation_side=left|right] [--special_tokens=MODE]
      [--on_error=raise|skip] [--fit_temperature]

The model's input contract decides what it sees (docs/what_the_model_sees.md): a workdir's or
export's stored one, or for an external checkpoint what transformers does with its tokenizer;
the contract flags override parts of it. Writes OUT/report.json (one entry per data file, keyed
by its name without extension, and `all`, plus `run`: the model, step and contract used),
OUT/report.md (a table) and OUT/reliability_<name>.png. Rewards come from the compiled scoring
function that training and `jaxpref.score` use.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from jaxpref import cli
from jaxpref.data.errors import DataConfigError, DataError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the module imports cleanly."""
  flags.DEFINE_string("model", None, "A local Hugging Face reward-model dir.")
  flags.DEFINE_string("workdir", None, "A jaxpref training workdir (instead of --model).")
  flags.DEFINE_integer("step", None, "Checkpoint step with --workdir (default: the latest).")
  flags.DEFINE_multi_string("data", [], "Preference data file(s); repeat the flag for several.")
  flags.DEFINE_string("output", None, "Output directory.")
  define_contract_flags()
  flags.DEFINE_integer("batch_size", 32, "Items per batch.")
  flags.DEFINE_string("format", "auto", "Data format (see docs/data.md); auto-detected by default.")
  flags.DEFINE_enum(
    "on_error",
    "raise",
    ["raise", "skip"],
    "Malformed records: raise (stop naming file:line) or skip them and count them.",
  )
  flags.DEFINE_enum(
    "on_tie",
    "keep",
    ["raise", "skip", "keep"],
    "Items whose responses all tie (they add no pair): keep, skip or raise.",
  )
  flags.DEFINE_integer("n_bootstrap", 1000, "Bootstrap replicates for the 95% intervals (0: none).")
  flags.DEFINE_boolean(
    "fit_temperature",
    False,
    "Fit a temperature on a prompt-hash half of the data, report ECE before and "
    "after on the other half, and store it as temperature.json with the model.",
  )
  flags.DEFINE_float(
    "temperature_fraction", 0.5, "Fraction of items (by prompt hash) used to fit the temperature."
  )


def define_contract_flags() -> None:
  """Overrides of the model's input contract, shared by `jaxpref.eval` and `jaxpref.score`."""
  from jaxpref.data.tokenize import SPECIAL_TOKENS

  flags.DEFINE_integer(
    "max_length", None, "Token length, special tokens included (default: the model's contract)."
  )
  flags.DEFINE_enum(
    "truncation_side",
    None,
    ["left", "right"],
    "Which end of a long text is cut (default: the model's contract).",
  )
  flags.DEFINE_enum(
    "special_tokens",
    None,
    list(SPECIAL_TOKENS),
    "Special tokens around each text (default: the model's contract; see "
    "docs/what_the_model_sees.md).",
  )


def contract_from_flags(cfg, *, model=None, workdir=None, flag_values=FLAGS):
  """`(tokenizer, contract)` of the model, with the contract flags applied."""
  from jaxpref.data import contract as input_contract
  from jaxpref.data.errors import DataConfigError
  from jaxpref.models.source import load_tokenizer_and_contract

  tokenizer, contract = load_tokenizer_and_contract(cfg, model=model, workdir=workdir)
  contract = input_contract.override(
    contract,
    tokenizer,
    max_length=flag_values.max_length,
    truncation_side=flag_values.truncation_side,
    special_tokens=flag_values.special_tokens,
  )
  if contract.max_length > cfg.max_position_embeddings:
    raise DataConfigError(
      f"max_length={contract.max_length} exceeds the model's max_position_embeddings="
      f"{cfg.max_position_embeddings}"
    )
  logging.info("input contract: %s", contract.describe())
  return tokenizer, contract


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
) -> dict[str, dict[str, Any]]:
  """Scores each file, writes report.json / report.md / reliability PNGs, returns the reports.

  Args:
    contract: the model's `InputContract` (`models.source.load_tokenizer_and_contract`); without
      it, `max_length` and `truncation_side` with special_tokens=auto.
    run: what report.json records under `run` (model, step); the contract is added.
    progress: show a progress bar per file.
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
      cfg, params, batches, progress=name if progress else None
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
    scored[name] = evaluation.collect_rewards(cfg, params, batches)
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


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.data:
    raise app.UsageError("--data is required (repeat it for several files)")
  if not FLAGS.output:
    raise app.UsageError("--output is required")
  from jaxpref.models.source import load_for_inference

  cfg, params, _, step = load_for_inference(
    model=FLAGS.model, workdir=FLAGS.workdir, step=FLAGS.step
  )
  tokenizer, contract = contract_from_flags(cfg, model=FLAGS.model, workdir=FLAGS.workdir)
  options = dict(
    contract=contract,
    batch_size=FLAGS.batch_size,
    on_error=FLAGS.on_error,
    on_tie=FLAGS.on_tie,
    data_format=FLAGS.format,
  )
  run = {"model": FLAGS.model, "workdir": FLAGS.workdir, "step": step}
  reports = evaluate_files(
    cfg,
    params,
    tokenizer,
    FLAGS.data,
    FLAGS.output,
    n_bootstrap=FLAGS.n_bootstrap,
    run=run,
    progress=True,
    **options,
  )
  if FLAGS.fit_temperature:
    result = fit_and_store_temperature(
      cfg,
      params,
      tokenizer,
      FLAGS.data,
      Path(FLAGS.model or FLAGS.workdir),
      fraction=FLAGS.temperature_fraction,
      **options,
    )
    (Path(FLAGS.output) / "temperature.json").write_text(json.dumps(result, indent=2))
    logging.info("temperature %.4f", result["temperature"])
  print(markdown_table(reports), end="")
  where = f"step {step} of {FLAGS.workdir}" if FLAGS.workdir else FLAGS.model
  print(f"jaxpref.eval: {where} -> {FLAGS.output}/report.json", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(
    lambda argv: cli.run_main("jaxpref.eval", main, argv),
    flags_parser=cli.parse_flags_or_exit("jaxpref.eval"),
  )
