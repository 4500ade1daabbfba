"""`python -m jaxpref.export --workdir=DIR [--step=N] --output=HF_DIR`: a trained RM to HF.

Writes a `*ForSequenceClassification` directory (one label) with the run's tokenizer configured
with its input contract (docs/what_the_model_sees.md), so that a plain
`AutoTokenizer.from_pretrained(HF_DIR)(texts, truncation=True)` +
`AutoModelForSequenceClassification.from_pretrained(HF_DIR)` (or a `text-classification` pipeline
with `function_to_apply="none"`) gives the rewards jaxpref gives; `jaxpref.score --model=HF_DIR`
reads it back. A model transformers cannot reproduce (a BERT with mean pooling, say) is refused
unless `--nostrict`, which writes a checkpoint that only jaxpref scores faithfully.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from absl import app, flags

from jaxpref import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the module imports cleanly."""
  flags.DEFINE_string("workdir", None, "A jaxpref training workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("output", None, "Directory to write the Hugging Face checkpoint to.")
  flags.DEFINE_boolean(
    "strict",
    True,
    "Refuse a model that transformers would score differently (e.g. a BERT with mean "
    "pooling); --nostrict writes it anyway, for jaxpref (`jaxpref.score --model=`) only.",
  )
  flags.mark_flags_as_required(["workdir", "output"])


def export(
  workdir: str | Path, output: str | Path, step: int | None = None, *, strict: bool = True
) -> int:
  """Exports a checkpoint of `workdir` to `output`; returns the exported step."""
  import jax

  from jaxpref.data import contract as input_contract
  from jaxpref.models import hf_io, registry
  from jaxpref.models.source import load_for_inference, load_tokenizer_and_contract

  cfg, params, _, step = load_for_inference(workdir=str(workdir), step=step)
  reason = registry.get(cfg.arch).why_incompatible(cfg)
  if strict and reason:
    fix = "model.pooling=pooler" if cfg.arch == "bert" else "model.pooling=last"
    raise hf_io.CheckpointError(
      f"{reason}: transformers would give other rewards. Train with --config.{fix} for a "
      "checkpoint transformers reproduces, or pass --nostrict to export one that only jaxpref "
      "scores faithfully (jaxpref.score --model=OUTPUT)"
    )
  tokenizer, contract = load_tokenizer_and_contract(cfg, workdir=str(workdir))
  cfg = cfg.replace(pad_token_id=contract.pad_id)
  # save_hf gathers sharded (also multi-process) arrays itself; process 0 writes the files.
  hf_io.save_hf(output, cfg, params, None, pad_token_id=contract.pad_id, strict=strict)
  if jax.process_index() == 0:
    input_contract.save_tokenizer(tokenizer, output, contract)
  temperature = Path(workdir) / "temperature.json"
  if temperature.is_file():
    shutil.copy(temperature, Path(output) / "temperature.json")
  return step


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  step = export(FLAGS.workdir, FLAGS.output, FLAGS.step, strict=FLAGS.strict)
  print(f"jaxpref.export: step {step} of {FLAGS.workdir} -> {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(
    lambda argv: cli.run_main("jaxpref.export", main, argv),
    flags_parser=cli.parse_flags_or_exit("jaxpref.export"),
  )
