"""Shared pieces of the command-line entry points: distributed init and one-line errors."""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys
from pathlib import Path

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
  from jaxpref.evaluation import scoring
  from jaxpref.training import config as train_config
  from jaxpref.training import lock, resume
  from jaxpref.training import workdir as workdir_lib

  types = [
    data_errors.DataError,
    workdir_lib.CheckpointNotFoundError,
    sharding.MeshError,
    lock.WorkdirBusyError,
    resume.ResumeConfigError,
    FileNotFoundError,
    IsADirectoryError,
    scoring.RewardError,
    train_config.ConfigError,
  ]
  try:
    from jaxpref.models import hf_io

    types.append(hf_io.CheckpointError)
  except (ImportError, AttributeError):
    pass
  return tuple(types)


class _NoLibraryTracebacks(std_logging.Filter):
  """Keeps the line, drops the traceback, of errors that Orbax logs from its save threads: the
  program reports the failure itself, in one line naming the step (see
  `jaxpref.training.workdir.save`)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.exc_info and "/orbax/" in (record.pathname or ""):
      record.exc_info, record.exc_text = None, None
    return True


def quiet_library_tracebacks() -> None:
  std_logging.getLogger("absl").addFilter(_NoLibraryTracebacks())


def run_main(program: str, main_fn, argv) -> None:
  """Runs `main_fn(argv)`, turning user errors into `program: error: <one line>` and exit 2."""
  from jaxpref.data.errors import one_line

  try:
    main_fn(argv)
  except user_error_types() as e:
    print(f"{program}: error: {one_line(e, limit=600)}", file=sys.stderr)
    sys.exit(2)


# Program flags with a lower bound, checked after parsing (any program that defines them).
FLAG_MINIMUMS = {
  "batch_size": 1,
  "max_length": 2,
  "step": 0,
  "n_bootstrap": 0,
  "num_cpu_devices": 0,
  "temperature_fraction": 0.01,
}
HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


class _OnlyJaxprefInfo(std_logging.Filter):
  """Passes warnings and errors from anywhere, and INFO lines only from jaxpref's own modules."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE_DIRS)


# Code file names as Python records them (as imported) and resolved (through symlinks).
_PACKAGE_DIRS = tuple(
  str(d) + os.sep for d in (Path(__file__).parent, Path(__file__).resolve().parent)
)
_QUIET = _OnlyJaxprefInfo()


def define_console_flags() -> None:
  if "log_libraries" not in FLAGS:
    flags.DEFINE_boolean(
      "log_libraries",
      False,
      "Also show the INFO lines of libraries (Orbax, absl, tfds, grain); by default only "
      "jaxpref's own lines, and everyone's warnings, reach the console. --verbosity=1 turns "
      "them on too.",
    )


def quiet_console() -> None:
  """Keeps third-party INFO lines off the console unless --log_libraries / --verbosity >= 1."""
  handler = logging.get_absl_handler()
  handler.removeFilter(_QUIET)
  verbose = FLAGS["log_libraries"].value if "log_libraries" in FLAGS else False
  if not verbose and FLAGS["verbosity"].value < 1:
    handler.addFilter(_QUIET)
  # Libraries that log through Python's `logging` directly rather than absl.
  for name in ("orbax", "tensorflow_datasets", "grain", "jax._src.distributed"):
    std_logging.getLogger(name).setLevel(std_logging.INFO if verbose else std_logging.WARNING)


def parse_flags_or_exit(program: str, *, extra_help=None):
  """An `app.run` flags parser that reports a bad flag or config override in one line.

  `--help` prints the program's docstring, its flags and, through `extra_help()`, more (the
  config keys of `jaxpref.train`), and exits 0. A `--config=FILE` that does not load, and an
  override of a key the config does not have, are one line each (the latter with the nearest
  valid keys).
  """

  def fail(message: str) -> None:
    message = " ".join(str(message).replace("\\n", " ").split())
    if message[:1] in "'\"" and message[:1] == message[-1:]:
      message = message[1:-1]
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)

  define_console_flags()

  def parser(argv):
    if any(a in HELP_FLAGS for a in argv[1:]):
      print_help(argv, extra_help)
      sys.exit(0)
    try:
      rest = FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
      fail(_explain_flag_error(argv, e))
    if "config" in FLAGS and FLAGS["config"].present:
      try:
        # ml_collections keeps a config file's load error until the config is first used.
        FLAGS.config.keys()
      except Exception as e:  # The config file itself raised: its own message, one line.
        path = FLAGS["config"].config_filename
        if not Path(path.split(":")[0]).is_file():
          fail(f"--config={path}: no such config file")
        fail(f"--config={path}: {type(e).__name__}: {e.__cause__ or e}")
    for name, minimum in FLAG_MINIMUMS.items():
      value = FLAGS[name].value if name in FLAGS else None
      if isinstance(value, int | float) and not isinstance(value, bool) and value < minimum:
        fail(f"--{name}={value}: must be >= {minimum}")
    quiet_console()
    return rest

  return parser


def _explain_flag_error(argv, error: BaseException) -> str:
  """A bad `--config.a.b=v`: names the key and its nearest valid keys; else the error itself."""
  message = str(error)
  if "config" not in FLAGS or not isinstance(error, AttributeError | KeyError):
    return message.replace("\\'", "'")
  from jaxpref.training import config as train_config

  try:
    config = FLAGS["config"].value
  except Exception:
    config = None
  if config is None:
    config = train_config.base_config()
  valid = set(train_config.flat_keys(config))
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    key = arg.removeprefix("--config.").split("=", 1)[0]
    if key not in valid and not any(v.startswith(key + ".") for v in valid):
      near = train_config.nearest_keys(config, key)
      hint = f"; did you mean {', '.join('config.' + k for k in near)}?" if near else ""
      return f"unknown config key config.{key}{hint} (--help lists every key)"
  return message.replace("\\'", "'")


def print_help(argv, extra_help=None) -> None:
  """The program's usage (its module docstring), its own flags, and `extra_help()` if given."""
  main_module = sys.modules.get("__main__")
  doc = (getattr(main_module, "__doc__", None) or "").strip()
  if doc:
    print(doc + "\n")
  module_name = getattr(main_module, "__file__", None)
  text = FLAGS.module_help(module_name) if module_name else ""
  if "--helpfull" in argv:
    text = FLAGS.get_help()
  if text:
    print("flags:\n" + text)
  if extra_help is not None:
    print(extra_help())
