"""Running `python -m jaxpref.train` on the tiny config in subprocesses, for the training tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")

# A few-second run: 3 tasks x 2 items per batch, 64 tokens, a 32-wide 2-layer model.
TINY_OVERRIDES = (
  "--config.train.batch_size=6",
  "--config.train.steps=4",
  "--config.train.log_every_steps=1",
  "--config.data.max_length=64",
  "--config.data.resampling_size=30",
  "--config.data.eval_fraction=0.02",
  "--config.model.hidden_size=32",
  "--config.model.intermediate_size=64",
  "--config.model.num_heads=2",
  "--config.checkpoint.every_steps=2",
  "--config.eval.batch_size=16",
)


def tiny_config(*, lock: bool = True, **changes):
  """configs/tiny.py with TINY_OVERRIDES and `section__name=value` changes, in process."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("tiny", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for flag in TINY_OVERRIDES:
    key, value = flag.removeprefix("--config.").split("=", 1)
    section, name = key.split(".")
    config[section][name] = type(config[section][name])(value)
  for key, value in changes.items():
    section, name = key.split("__")
    config[section][name] = value
  if lock:
    config.lock()
  return config


def env_with(devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("JAXPREF_SHARED", str(REPO.parent / "shared"))
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


def train_command(workdir: Path, *overrides: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "jaxpref.train",
    f"--config={TINY}",
    f"--workdir={workdir}",
    *TINY_OVERRIDES,
    *overrides,
  ]


def run_train(
  workdir: Path, *overrides: str, devices: int = 1, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
  proc = subprocess.run(
    train_command(workdir, *overrides),
    env=env_with(devices),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if check and proc.returncode != 0:
    raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def run_export(workdir: Path, output: Path, *flags: str) -> subprocess.CompletedProcess:
  """`python -m jaxpref.export --workdir=WORKDIR --output=OUTPUT`, checked."""
  return subprocess.run(
    [sys.executable, "-m", "jaxpref.export", f"--workdir={workdir}", f"--output={output}", *flags],
    check=True,
    env=env_with(),
    cwd=REPO,
    capture_output=True,
    text=True,
  )


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_train_multiprocess(
  workdir: Path, *overrides: str, num_processes: int = 2, timeout: float = 600
) -> list[subprocess.CompletedProcess]:
  port = free_port()
  procs = [
    subprocess.Popen(
      train_command(
        workdir,
        *overrides,
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={i}",
      ),
      env=env_with(1),
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(num_processes)
  ]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=timeout)
    results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
  for i, result in enumerate(results):
    if result.returncode != 0:
      raise AssertionError(f"process {i} failed ({result.returncode}):\n{result.stderr[-4000:]}")
  return results


def losses_by_step(workdir: Path) -> dict[int, list[float]]:
  """Every logged training loss per step (a resumed run may log a step twice)."""
  out: dict[int, list[float]] = {}
  path = Path(workdir) / "metrics.jsonl"
  for line in path.read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      out.setdefault(record["step"], []).append(record["loss"])
  return out


def metric_by_step(workdir: Path, name: str) -> list[float]:
  """A logged training metric, in step order (first value of each step)."""
  out: dict[int, float] = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if name in record:
      out.setdefault(record["step"], record[name])
  return [out[k] for k in sorted(out)]


def wait_for_step(workdir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
  """Blocks until metrics.jsonl has logged `step` (or the process ended / time ran out)."""
  deadline = time.time() + timeout
  path = Path(workdir) / "metrics.jsonl"
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(
        f"training ended early ({proc.returncode}): "
        f"{proc.stderr.read()[-3000:] if proc.stderr else ''}"
      )
    if path.exists() and any(s >= step for s in losses_by_step(workdir)):
      return
    time.sleep(0.2)
  raise AssertionError(f"step {step} not reached in {timeout} s")
