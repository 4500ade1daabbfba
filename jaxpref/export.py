"""`python -m jaxpref.export --workdir=DIR [--step=N] --output=HF_DIR`: a trained RM to HF.

Writes a `*ForSequenceClassification` directory (one label) with the run's tokenizer, which
`transformers.AutoModelForSequenceClassification.from_pretrained(HF_DIR)` loads and which gives the
same rewards as jaxpref; `jaxpref.score --model=HF_DIR` reads it back.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from jaxpref import cli
from jaxpref.evaluation import reward_stats

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the module imports cleanly."""
  flags.DEFINE_string("workdir", None, "A jaxpref training workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("output", None, "Directory to write the Hugging Face checkpoint to.")
  flags.DEFINE_boolean(
    "adapter",
    False,
    "LoRA runs: write a PEFT adapter directory (adapter_config.json, "
    "adapter_model.safetensors, the reward head as a module to save) for the run's base "
    "checkpoint instead of merged weights.",
  )
  flags.mark_flags_as_required(["workdir", "output"])


def _base_model_path(workdir: Path) -> str:
  """The Hugging Face checkpoint a run started from (`model.path` of its config.json)."""
  config_path = workdir / "config.json"
  path = json.loads(config_path.read_text()).get("model", {}).get("path", "")
  if not path:
    from jaxpref.models.hf_io import CheckpointError

    raise CheckpointError(
      f"--adapter: {workdir} did not start from a Hugging Face checkpoint (model.path is empty "
      "in its config.json), so there is no base for the adapter; export merged weights instead"
    )
  return path


def export(
  workdir: str | Path, output: str | Path, step: int | None = None, *, adapter: bool = False
) -> int:
  """Exports a checkpoint of `workdir` to `output`; returns the exported step.

  LoRA runs are exported with the adapters merged into the weights (a plain checkpoint), or with
  `adapter=True` as a PEFT adapter directory for the run's base checkpoint. The run's held-out
  reward statistics (`reward_stats.json`, if any) go into the export.
  """
  from jaxpref.models import hf_io, lora, peft_io
  from jaxpref.models.source import load_for_inference

  workdir = Path(workdir)
  cfg, params, tokenizer_path, step = load_for_inference(workdir=str(workdir), step=step)
  params = jax.tree.map(np.asarray, jax.device_get(params))
  if adapter:
    if cfg.lora is None:
      raise hf_io.CheckpointError(f"--adapter: {workdir} is not a LoRA run (lora.rank=0)")
    peft_io.save_adapter(
      output, cfg, params, base_model=_base_model_path(workdir), tokenizer=tokenizer_path
    )
  else:
    cfg, params = lora.merge(cfg, params)
    hf_io.save_hf(output, cfg, params, tokenizer_path)
  for name in ("temperature.json",):
    if (workdir / name).is_file():
      shutil.copy(workdir / name, Path(output) / name)
  stats = reward_stats.read(workdir)
  if stats is not None:
    reward_stats.add_to_hf_config(output, stats)
  return step


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  step = export(FLAGS.workdir, FLAGS.output, FLAGS.step, adapter=FLAGS.adapter)
  print(f"jaxpref.export: step {step} of {FLAGS.workdir} -> {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(
    lambda argv: cli.run_main("jaxpref.export", main, argv),
    flags_parser=cli.parse_flags_or_exit("jaxpref.export"),
  )
