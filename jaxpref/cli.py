"""Shared pieces of the command-line entry points: distributed init and one-line errors."""

from __future__ import annotations

import contextlib
import logging as logging_std
import sys

import jax
from absl import flags, logging

FLAGS = flags.FLAGS


def define_distributed_flags() -> None:
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 for multi-process CPU/GPU runs (TPU VMs and SLURM "
    "are detected automatically).",
  )
  flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
  flags.DEFINE_boolean(
    "distributed",
    None,
    "Force (True) or skip (False) jax.distributed.initialize(); by default it "
    "runs when --coordinator_address is given or a TPU pod / SLURM job is seen.",
  )


def _auto_distributed() -> bool:
  import os

  if os.environ.get("SLURM_NTASKS", "1") not in ("", "1") and "SLURM_PROCID" in os.environ:
    return True
  # GKE sets TPU_WORKER_HOSTNAMES; a TPU VM has accelerator device files, and
  # jax.distributed.initialize() finds its workers from the VM metadata (a single-host VM simply
  # gets one process).
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  import glob

  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime when this is a multi-process run."""
  use = FLAGS.distributed
  if use is None:
    use = FLAGS.coordinator_address is not None or _auto_distributed()
  if not use:
    return
  if FLAGS.coordinator_address is not None:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise SystemExit("error: --coordinator_address needs --num_processes and --process_id")
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
      # Cross-process collectives on CPU go through gloo.
      with contextlib.suppress(Exception):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  else:
    jax.distributed.initialize()
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def user_error_types() -> tuple[type[BaseException], ...]:
  """Errors caused by the user's input; printed as one line rather than a traceback."""
  from jaxpref import sharding
  from jaxpref.data import errors as data_errors
  from jaxpref.training import lock, resume
  from jaxpref.training import workdir as workdir_lib

  types = [
    data_errors.DataError,
    workdir_lib.CheckpointNotFoundError,
    sharding.MeshError,
    lock.WorkdirBusyError,
    resume.ResumeConfigError,
    FileNotFoundError,
  ]
  try:
    from jaxpref.models import hf_io

    types.append(hf_io.CheckpointError)
  except (ImportError, AttributeError):
    pass
  return tuple(types)


class _NoLibraryTracebacks(logging_std.Filter):
  """Keeps the line, drops the traceback, of errors that Orbax logs from its save threads: the
  program reports the failure itself, in one line naming the step (see `jaxpref.training.workdir.save`)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    if record.exc_info and "/orbax/" in (record.pathname or ""):
      record.exc_info, record.exc_text = None, None
    return True


def quiet_library_tracebacks() -> None:
  logging_std.getLogger("absl").addFilter(_NoLibraryTracebacks())


def run_main(program: str, main_fn, argv) -> None:
  """Runs `main_fn(argv)`, turning user errors into `program: error: <one line>` and exit 2."""
  try:
    main_fn(argv)
  except user_error_types() as e:
    print(f"{program}: error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags_or_exit(program: str):
  """An `app.run` flags parser that reports a bad flag or config override in one line."""

  def parser(argv):
    try:
      return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
      message = " ".join(str(e).replace("\\n", " ").split()).strip("'\"")
      print(f"{program}: error: {message}", file=sys.stderr)
      sys.exit(2)

  return parser
