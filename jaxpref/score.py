"""`python -m jaxpref.score --model=DIR --data=IN.jsonl --output=OUT.jsonl`: rewards for records.

Each input line is a JSON object, written back with what was computed added:
  {"text": "..."}                         -> + "reward"
  {"text": ["...", "..."]}                -> + "rewards"
  {"prompt": "...", "responses": [...]}   -> + "rewards", "best_index" (best-of-n / rejection
                                             sampling: the response with the highest reward)
Text is tokenised by the model's input contract (docs/what_the_model_sees.md): for a jaxpref
workdir or export the one it was trained with, for another Hugging Face checkpoint what
`AutoTokenizer.from_pretrained(DIR)(text, truncation=True, max_length=N)` gives; either way the
rewards match transformers' `AutoModelForSequenceClassification` on the exported / same
checkpoint. `--max_length`, `--truncation_side` and `--special_tokens` override parts of it.
Best-of-n records whose responses become identical once truncated are counted in the summary
(`identical_after_truncation`): their rewards tie. Batches are sorted by length and padded to a
few length buckets: one compilation per bucket.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from absl import app, flags, logging

from jaxpref import cli
from jaxpref.evaluation import reward_stats

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the module imports cleanly."""
  flags.DEFINE_string("model", None, "A local Hugging Face reward-model dir (or use --workdir).")
  flags.DEFINE_string("workdir", None, "A jaxpref training workdir (instead of --model).")
  flags.DEFINE_integer("step", None, "Checkpoint step with --workdir (default: the latest).")
  flags.DEFINE_string("data", None, "Input JSON-lines file (.jsonl or .jsonl.gz).")
  flags.DEFINE_string("output", None, "Output JSON-lines file.")
  from jaxpref.eval import define_contract_flags, define_packing_flags

  define_contract_flags()
  define_packing_flags()
  flags.DEFINE_integer(
    "batch_size", 16, "Sequences per forward pass (packed: about this many rows per call)."
  )
  flags.DEFINE_string(
    "template",
    "{prompt}{response}",
    "How a best-of-n record's prompt and response are joined into one text.",
  )
  flags.DEFINE_boolean(
    "apply_temperature",
    False,
    "Divide rewards by the temperature stored in the model dir / workdir "
    "(temperature.json, written by `jaxpref.eval --fit_temperature`).",
  )
  flags.DEFINE_boolean(
    "normalize",
    False,
    "Standardise rewards with the held-out mean / std stored with the model dir / workdir "
    "(reward_stats.json, or config.json's mean / std): (reward - mean) / std.",
  )
  flags.DEFINE_enum(
    "on_error",
    "raise",
    ["raise", "skip"],
    "Malformed records: raise (stop with file:line) or skip them and count them.",
  )
  flags.DEFINE_boolean("progress", True, "Show a progress bar.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("data", "output"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  from jaxpref.eval import contract_from_flags
  from jaxpref.evaluation import best_of_n
  from jaxpref.evaluation.scoring import Scorer
  from jaxpref.models.source import load_for_inference

  # The data first: a bad file fails in a second, before any weights are read.
  records, skipped = best_of_n.read_records(FLAGS.data, FLAGS.on_error)
  cfg, params, _, step = load_for_inference(
    model=FLAGS.model, workdir=FLAGS.workdir, step=FLAGS.step
  )
  tokenizer, contract = contract_from_flags(cfg, model=FLAGS.model, workdir=FLAGS.workdir)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  scorer = Scorer(
    cfg,
    params,
    batch_size=FLAGS.batch_size,
    max_length=contract.max_length,
    pad_token_id=pad_id,
    padding_side=contract.padding_side,
    packing=FLAGS.packing,
    share_prompts=FLAGS.shared_prompts,
  )
  temperature = (
    best_of_n.read_temperature(FLAGS.model or FLAGS.workdir) if FLAGS.apply_temperature else 1.0
  )
  counts: Counter = Counter()
  stats = None
  if FLAGS.normalize:
    if FLAGS.apply_temperature:
      raise app.UsageError("--normalize and --apply_temperature are exclusive; use one")
    stats = reward_stats.read(FLAGS.model or FLAGS.workdir)
    if stats is None:
      raise app.UsageError(
        f"--normalize: {FLAGS.model or FLAGS.workdir} has no reward statistics "
        f"({reward_stats.FILE} or config.json mean / std); train with held-out data or run "
        "jaxpref.eval first"
      )
  outputs, more_skipped = best_of_n.score_records(
    scorer,
    tokenizer,
    records,
    contract=contract,
    template=FLAGS.template,
    on_error=FLAGS.on_error,
    source=FLAGS.data,
    temperature=temperature,
    stats=stats,
    progress=FLAGS.progress and len(records) > 64,
    counts=counts,
  )
  skipped.update(more_skipped)
  Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
  with open(FLAGS.output, "w", encoding="utf-8") as f:
    for out in outputs:
      f.write(json.dumps(out, ensure_ascii=False) + "\n")
  summary = {
    "read": len(records) + skipped["invalid_json"],
    "scored": len(outputs),
    "skipped": dict(skipped),
    "truncated": counts["truncated"],
    "identical_after_truncation": counts["identical_after_truncation"],
  }
  if summary["identical_after_truncation"]:
    logging.warning(
      "%d best-of-n records have responses that are identical once cut to %d tokens on the "
      "%s: their rewards tie (raise --max_length or use --truncation_side=left)",
      summary["identical_after_truncation"],
      contract.max_length,
      contract.truncation_side,
    )
  print(f"jaxpref.score: {json.dumps(summary)} -> {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(
    lambda argv: cli.run_main("jaxpref.score", main, argv),
    flags_parser=cli.parse_flags_or_exit("jaxpref.score"),
  )
