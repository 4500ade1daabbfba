"""`python -m jaxpref.export --workdir=DIR [--step=N] --output=HF_DIR`: a trained RM to HF.

Writes a `*ForSequenceClassification` directory (one label) with the run's tokenizer, which
`transformers.AutoModelForSequenceClassification.from_pretrained(HF_DIR)` loads and which gives the
same rewards as jaxpref; `jaxpref.score --model=HF_DIR` reads it back.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from jaxpref import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the module imports cleanly."""
  flags.DEFINE_string("workdir", None, "A jaxpref training workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("output", None, "Directory to write the Hugging Face checkpoint to.")
  flags.mark_flags_as_required(["workdir", "output"])


def export(workdir: str | Path, output: str | Path, step: int | None = None) -> int:
  """Exports a checkpoint of `workdir` to `output`; returns the exported step."""
  from jaxpref.models import hf_io
  from jaxpref.models.source import load_for_inference

  cfg, params, tokenizer_path, step = load_for_inference(workdir=str(workdir), step=step)
  params = jax.tree.map(np.asarray, jax.device_get(params))
  hf_io.save_hf(output, cfg, params, tokenizer_path)
  temperature = Path(workdir) / "temperature.json"
  if temperature.is_file():
    shutil.copy(temperature, Path(output) / "temperature.json")
  return step


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  step = export(FLAGS.workdir, FLAGS.output, FLAGS.step)
  print(f"jaxpref.export: step {step} of {FLAGS.workdir} -> {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(
    lambda argv: cli.run_main("jaxpref.export", main, argv),
    flags_parser=cli.parse_flags_or_exit("jaxpref.export"),
  )
