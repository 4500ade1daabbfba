"""`python -m jaxpref.train --config=configs/<name>.py --workdir=DIR [--config.a.b=value ...]`.

Parses flags, starts the multi-process runtime if needed, and calls
`jaxpref.training.trainer.train_and_evaluate`, which notebooks can call directly too.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxpref import cli

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
  try:
    result = trainer.train_and_evaluate(config, FLAGS.workdir)
  except (trainer.TrainingError, workdir_lib.CheckpointSaveError) as e:
    print(f"jaxpref.train: error: {e}", file=sys.stderr)
    sys.exit(1)
  logging.info("Finished at step %d", result["step"])


if __name__ == "__main__":
  app.run(
    lambda argv: cli.run_main("jaxpref.train", main, argv),
    flags_parser=cli.parse_flags_or_exit("jaxpref.train"),
  )
