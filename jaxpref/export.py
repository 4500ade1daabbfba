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

import sys

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
  flags.DEFINE_boolean(
    "adapter",
    False,
    "LoRA runs: write a PEFT adapter directory (adapter_config.json, "
    "adapter_model.safetensors, the reward head as a module to save) for the run's base "
    "checkpoint instead of merged weights.",
  )
  flags.mark_flags_as_required(["workdir", "output"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from jaxpref.models.hf_export import export

  step = export(FLAGS.workdir, FLAGS.output, FLAGS.step, strict=FLAGS.strict, adapter=FLAGS.adapter)
  print(f"jaxpref.export: step {step} of {FLAGS.workdir} -> {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(
    lambda argv: cli.run_main("jaxpref.export", main, argv),
    flags_parser=cli.parse_flags_or_exit("jaxpref.export"),
  )
