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
from typing import Any

from absl import app, flags, logging

from jaxpref import cli
from jaxpref.data.errors import DataError
from jaxpref.evaluation import reward_stats

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the module imports cleanly."""
  flags.DEFINE_string("model", None, "A local Hugging Face reward-model dir (or use --workdir).")
  flags.DEFINE_string("workdir", None, "A jaxpref training workdir (instead of --model).")
  flags.DEFINE_integer("step", None, "Checkpoint step with --workdir (default: the latest).")
  flags.DEFINE_string("data", None, "Input JSON-lines file (.jsonl or .jsonl.gz).")
  flags.DEFINE_string("output", None, "Output JSON-lines file.")
  from jaxpref.eval import define_contract_flags

  define_contract_flags()
  flags.DEFINE_integer("batch_size", 16, "Sequences per batch.")
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


TEMPERATURE_FILE = "temperature.json"


def read_temperature(model_dir: str | Path) -> float:
  path = Path(model_dir) / TEMPERATURE_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"{path} not found: run `python -m jaxpref.eval ... "
      "--fit_temperature` first, or drop --apply_temperature"
    )
  return float(json.loads(path.read_text())["temperature"])


def record_texts(record: Any, where: str, template: str) -> tuple[str, list[str]]:
  """`(kind, texts)` of one input record; kind is `single`, `list` or `best_of_n`."""
  if not isinstance(record, dict):
    raise DataError(where, f"expected a JSON object, got {type(record).__name__}")
  if "text" in record:
    text = record["text"]
    if isinstance(text, str):
      texts, kind = [text], "single"
    elif isinstance(text, list) and not text:
      raise DataError(where, "'text' is an empty list: nothing to score")
    elif isinstance(text, list) and all(isinstance(t, str) for t in text):
      texts, kind = text, "list"
    else:
      raise DataError(where, "'text' must be a string or a list of strings")
  elif "prompt" in record and "responses" in record:
    prompt, responses = record["prompt"], record["responses"]
    if (
      not isinstance(prompt, str)
      or not isinstance(responses, list)
      or not responses
      or not all(isinstance(r, str) for r in responses)
    ):
      raise DataError(
        where, "'prompt' must be a string and 'responses' a non-empty list of strings"
      )
    texts = [template.format(prompt=prompt, response=r) for r in responses]
    kind = "best_of_n"
  else:
    raise DataError(where, "a record needs 'text' (string or list) or 'prompt' + 'responses'")
  if any(not t for t in texts):
    raise DataError(where, "empty text")
  return kind, texts


def read_records(path: str, on_error: str) -> tuple[list[tuple[int, dict]], Counter]:
  """Parsed records with their line numbers; skipped records counted by reason.

  The same reader as training and evaluation (`jaxpref.data.sources`): gzip, encodings, a BOM,
  duplicate keys and bad lines give the same one-line errors, and `on_error="skip"` counts them.
  """
  from jaxpref.data import sources

  records, skipped = [], Counter()
  for rec in sources.iter_records(path):
    if rec.error is not None:
      if on_error == "raise":
        raise DataError(
          rec.where, f"{rec.error} [invalid_json; --on_error=skip skips and counts such records]"
        )
      skipped["invalid_json"] += 1
      logging.warning("skipping %s: %s", rec.where, rec.error)
      continue
    records.append((rec.index, rec.value))
  if not records and not skipped:
    raise DataError(path, "no records to score (an empty file)", "config")
  return records, skipped


def score_records(
  scorer,
  tokenizer,
  records,
  *,
  template: str,
  on_error: str,
  source: str,
  contract=None,
  max_length: int | None = None,
  temperature: float = 1.0,
  stats: dict[str, Any] | None = None,
  progress: bool = False,
  counts: Counter | None = None,
) -> tuple[list[dict], Counter]:
  """Adds rewards to each record (see module docstring); returns the output records and skips.

  Args:
    contract: the model's `InputContract` (`models.source.load_tokenizer_and_contract`); without
      it, what transformers does with `tokenizer` and `max_length` (default: the tokenizer's).

    stats: `jaxpref.evaluation.reward_stats` to standardise the rewards: (reward - mean) / std.
    counts: if given, gets `truncated` (texts cut) and `identical_after_truncation` (best-of-n
      records with distinct responses that tie once cut) added.

  Returns:
    The output records and a Counter of skipped records by reason.
  """
  from jaxpref.data import contract as input_contract
  from jaxpref.data.tokenize import encode_texts

  if contract is None:
    contract = input_contract.for_checkpoint(tokenizer, scorer.cfg)
    if max_length:
      contract = contract.replace(max_length=max_length)
  skipped: Counter = Counter()
  parsed = []
  for line_no, record in records:
    try:
      parsed.append((record, *record_texts(record, f"{source}:{line_no}", template)))
    except DataError as e:
      if on_error == "raise":
        raise
      skipped["bad_record"] += 1
      logging.warning("skipping %s", e)
  flat_texts = [t for _, _, texts in parsed for t in texts]
  if not flat_texts:
    return [], skipped
  encoded, cut = encode_texts(flat_texts, tokenizer, contract.tokenize_options())
  rewards = scorer.score_token_ids(encoded, progress=progress) / temperature
  counts = Counter() if counts is None else counts
  counts["truncated"] += int(cut.sum())
  if stats is not None:
    rewards = reward_stats.normalize(rewards, stats)
  outputs, offset = [], 0
  for record, kind, texts in parsed:
    values = [float(r) for r in rewards[offset : offset + len(texts)]]
    rows = {encoded[i].tobytes() for i in range(offset, offset + len(texts))}
    if kind == "best_of_n" and len(rows) < len(set(texts)):
      counts["identical_after_truncation"] += 1
    offset += len(texts)
    out = dict(record)
    if kind == "single":
      out["reward"] = values[0]
    else:
      out["rewards"] = values
      if kind == "best_of_n":
        out["best_index"] = int(max(range(len(values)), key=values.__getitem__))
    outputs.append(out)
  return outputs, skipped


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("data", "output"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  from jaxpref.eval import contract_from_flags
  from jaxpref.evaluation.scoring import Scorer
  from jaxpref.models.source import load_for_inference

  # The data first: a bad file fails in a second, before any weights are read.
  records, skipped = read_records(FLAGS.data, FLAGS.on_error)
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
  )
  temperature = read_temperature(FLAGS.model or FLAGS.workdir) if FLAGS.apply_temperature else 1.0
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
  outputs, more_skipped = score_records(
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
