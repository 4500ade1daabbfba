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

from absl import app, flags, logging

from jaxpref import cli
from jaxpref.data.errors import DataConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the module imports cleanly."""
  flags.DEFINE_string("model", None, "A local Hugging Face reward-model dir.")
  flags.DEFINE_string("workdir", None, "A jaxpref training workdir (instead of --model).")
  flags.DEFINE_integer("step", None, "Checkpoint step with --workdir (default: the latest).")
  flags.DEFINE_multi_string("data", [], "Preference data file(s); repeat the flag for several.")
  flags.DEFINE_string("output", None, "Output directory.")
  define_contract_flags()
  define_packing_flags()
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


def define_packing_flags() -> None:
  """How responses are laid out for the model, shared by `jaxpref.eval` and `jaxpref.score`."""
  flags.DEFINE_boolean(
    "packing",
    True,
    "Score packed rows (causal decoders with last-token pooling; same rewards, fewer positions).",
  )
  flags.DEFINE_boolean(
    "shared_prompts",
    True,
    "With --packing, compute the prompt the responses of an item (or best-of-n record) share "
    "once (same rewards).",
  )


def contract_from_flags(cfg, *, model=None, workdir=None, flag_values=FLAGS):
  """`(tokenizer, contract)` of the model, with the contract flags applied."""
  from jaxpref.data import contract as input_contract
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


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.data:
    raise app.UsageError("--data is required (repeat it for several files)")
  if not FLAGS.output:
    raise app.UsageError("--output is required")
  from jaxpref.evaluation import report as report_lib
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
    packing=FLAGS.packing,
    share_prompts=FLAGS.shared_prompts,
  )
  run = {"model": FLAGS.model, "workdir": FLAGS.workdir, "step": step}
  reports = report_lib.evaluate_files(
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
    result = report_lib.fit_and_store_temperature(
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
  print(report_lib.markdown_table(reports), end="")
  where = f"step {step} of {FLAGS.workdir}" if FLAGS.workdir else FLAGS.model
  print(f"jaxpref.eval: {where} -> {FLAGS.output}/report.json", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(
    lambda argv: cli.run_main("jaxpref.eval", main, argv),
    flags_parser=cli.parse_flags_or_exit("jaxpref.eval"),
  )
