"""`python -m jaxpref.train --config=configs/<name>.py --workdir=DIR [--config.a.b=value ...]`.

Parses flags, starts the multi-process runtime if needed, and calls
`jaxpref.training.trainer.train_and_evaluate`, which notebooks can call directly too.
"""

from __future__ import annotations

import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxpref import cli
from jaxpref.training import config as train_config

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file from configs/.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the effective config.")
flags.DEFINE_enum(
  "on_error",
  None,
  ["raise", "skip"],
  "Bad data records: raise (default) or skip and count (overrides data.on_error).",
)
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.initialize_distributed()
  cli.quiet_library_tracebacks()
  from jaxpref.training import trainer
  from jaxpref.training import workdir as workdir_lib

  config = FLAGS.config
  if FLAGS.on_error:
    config.data.on_error = FLAGS.on_error
  # Every value checked before a model or data file is read (train_and_evaluate checks again,
  # for callers that skip this program).
  train_config.validate(config)
  start = time.perf_counter()
  try:
    result = trainer.train_and_evaluate(config, FLAGS.workdir)
  except (trainer.TrainingError, workdir_lib.CheckpointSaveError) as e:
    print(f"jaxpref.train: error: {e}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    # Printed, not logged: --verbosity does not hide the one summary a run ends with.
    print(run_summary(result, FLAGS.workdir, time.perf_counter() - start), file=sys.stderr)


def run_summary(result: dict, workdir: str, seconds: float) -> str:
  """The end of a run's console output: steps and time, held-out accuracy / ECE-10 per task,
  where the checkpoint is and how to export it."""
  from jaxpref.training import workdir as workdir_lib

  minutes, secs = divmod(int(round(seconds)), 60)
  lines = [f"jaxpref.train: finished at step {result['step']} in {minutes}m{secs:02d}s"]
  tasks = [k.split("/")[1] for k in result if k.startswith("eval/") and k.endswith("/accuracy")]
  if tasks:
    width = max(len(t) for t in tasks)
    lines.append(f"  {'held-out':<{width}}  accuracy  ECE-10  pairs")
    for task in tasks:
      lines.append(
        f"  {task:<{width}}  {result[f'eval/{task}/accuracy']:8.4f}  "
        f"{result[f'eval/{task}/ece_10']:6.4f}  {int(result[f'eval/{task}/n_pairs']):5d}"
      )
  else:
    lines.append("  no final held-out evaluation (eval.final=False, no held-out items, or stopped)")
  lines.append(f"  checkpoint: {workdir_lib.checkpoint_dir(workdir) / str(result['step'])}")
  lines.append(f"  export:     python -m jaxpref.export --workdir={workdir} --output={workdir}/hf")
  return "\n".join(lines)


def config_help() -> str:
  return (
    "config keys (set with --config.KEY=VALUE; defaults of train_config.base_config, which the "
    "files in configs/ change):\n" + train_config.describe_keys(train_config.base_config())
  )


if __name__ == "__main__":
  app.run(
    lambda argv: cli.run_main("jaxpref.train", main, argv),
    flags_parser=cli.parse_flags_or_exit("jaxpref.train", extra_help=config_help),
  )
