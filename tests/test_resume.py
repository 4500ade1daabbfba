"""Resume robustness (issue 14): damaged checkpoints, changed configs or data, a second trainer,
signals inside a save, save failures, divergence, and stop/resume on two processes.

Fast tests work on the pieces (a tiny checkpoint, config files, the lock); in-process runs of the
tiny config cover the loop paths once each; `slow` ones go through the programs end to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as th

from jaxpref.training import lock, resume
from jaxpref.training import workdir as workdir_lib


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """One persistent XLA cache for this file's runs, in process and in subprocesses: most of them
  compile the same tiny step, and compiling it is most of a tiny run's time on 2 CPU cores."""
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  settings = {
    "jax_compilation_cache_dir": cache,
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
  }
  before = {name: getattr(jax.config, name) for name in settings}
  with pytest.MonkeyPatch.context() as patch:
    for name, value in settings.items():
      jax.config.update(name, value)
      patch.setenv(name.upper(), str(value))
    yield cache
  for name, value in before.items():
    jax.config.update(name, value)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory, preferences_dir) -> str:
  """The first 48 records of each shared file: reading all of them is most of a tiny run's start."""
  folder = tmp_path_factory.mktemp("small_data")
  paths = []
  for name in ("helpful", "harmless", "webgpt"):
    records = json.loads((preferences_dir / f"{name}.json").read_text())[:48]
    paths.append(folder / f"{name}.json")
    paths[-1].write_text(json.dumps(records))
  return ",".join(str(p) for p in paths)


def _config(files: str, **changes):
  return th.tiny_config(data__files=files, **changes)


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints: one line, the newest intact one instead.
# ----------------------------------------------------------------------------------------------
def _tiny_checkpoints(workdir: Path, steps=(1, 2)):
  manager = workdir_lib.make_manager(workdir, keep=0, async_save=False)
  for step in steps:
    state = {"params": {"w": jnp.full((64, 8), float(step))}}
    workdir_lib.save(manager, step, state, {"next_index": step}, force=True)
  manager.wait_until_finished()
  manager.close()
  return jax.eval_shape(lambda: {"params": {"w": jnp.zeros((64, 8))}})


def _damage(step_dir: Path, how: str) -> None:
  if how == "truncated":
    data_files = sorted((step_dir / "state").rglob("d/*"), key=lambda p: -p.stat().st_size)
    with open(data_files[0], "r+b") as f:
      f.truncate(data_files[0].stat().st_size // 2)
  elif how == "no_metadata":
    (step_dir / "state" / "_METADATA").unlink()
  elif how == "no_state":
    shutil.rmtree(step_dir / "state")


@pytest.mark.parametrize("how", ["truncated", "no_metadata", "no_state"])
def test_damaged_latest_checkpoint_falls_back_to_newest_intact(tmp_path, how, capfd):
  abstract = _tiny_checkpoints(tmp_path)
  _damage(tmp_path / "checkpoints" / "2", how)

  # eval / export: the newest intact step, one warning line; a damaged --step is a clear error.
  step, params = workdir_lib.restore_params(tmp_path, None, abstract["params"])
  assert step == 1 and float(np.asarray(params["w"]).max()) == 1.0
  err = capfd.readouterr().err
  lines = [line for line in err.splitlines() if "damaged" in line]
  assert len(lines) == 1 and "step 2" in lines[0], err
  with pytest.raises(workdir_lib.CheckpointDamagedError, match="step 2 .* is damaged"):
    workdir_lib.restore_params(tmp_path, 2, abstract["params"])

  # The trainer: restores step 1 and moves step 2 aside, so that it can save step 2 again.
  manager = workdir_lib.make_manager(tmp_path, keep=0, async_save=False)
  step, state, data_state = workdir_lib.restore_intact(manager, tmp_path, abstract)
  assert step == 1 and data_state == {"next_index": 1}
  assert sorted(manager.all_steps()) == [1]
  assert (tmp_path / "damaged_checkpoints" / "2").is_dir()
  workdir_lib.save(manager, 2, state, {"next_index": 2}, force=True)
  manager.close()


# ----------------------------------------------------------------------------------------------
# A workdir belongs to one run.
# ----------------------------------------------------------------------------------------------
def test_workdir_lock_names_the_holder_and_dies_with_it(tmp_path):
  with lock.WorkdirLock(tmp_path), pytest.raises(lock.WorkdirBusyError) as info:
    lock.WorkdirLock(tmp_path).acquire()
  assert f"pid {os.getpid()}" in str(info.value) and "\n" not in str(info.value)
  # A holder killed with -9 leaves the file but not the lock.
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from jaxpref.training.lock import WorkdirLock; "
      f"WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)",
    ],
    stdout=subprocess.PIPE,
    text=True,
    env=th.env_with(),
    cwd=th.REPO,
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(lock.WorkdirBusyError, match=f"pid {holder.pid}"):
      lock.WorkdirLock(tmp_path).acquire()
  finally:
    holder.kill()
    holder.wait()
  lock.WorkdirLock(tmp_path).acquire().release()


def test_second_trainer_on_a_busy_workdir_is_one_line(tmp_path):
  with lock.WorkdirLock(tmp_path):
    proc = th.run_train(tmp_path, check=False, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "is in use by another run" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "config.json").exists()


# ----------------------------------------------------------------------------------------------
# What a resume must share with its checkpoint; metrics rows after a resume.
# ----------------------------------------------------------------------------------------------
def test_config_changes_on_resume(tmp_path):
  config = th.tiny_config()
  resume.record_segment(tmp_path, 0, config)
  harmless = th.tiny_config(train__steps=8, eval__every_steps=2, train__learning_rate=1e-4)
  changed = resume.check_resume(tmp_path, 4, harmless)
  assert set(changed) == {"train.steps", "eval.every_steps", "train.learning_rate"}
  resume.record_segment(tmp_path, 4, harmless)
  assert sorted(resume.segment_configs(tmp_path)) == [0, 4]
  assert resume.config_at(tmp_path, 6)["train"]["steps"] == 8  # Written by the 2nd segment.
  assert resume.config_at(tmp_path, 4)["train"]["steps"] == 4

  for change, key in [
    (dict(loss__kind="ranking"), "loss.kind"),
    (dict(data__max_length=32), "data.max_length"),
    (dict(train__batch_size=12), "train.batch_size"),
  ]:
    with pytest.raises(resume.ResumeConfigError, match=rf"{key}.*--config.resume.force=True"):
      resume.check_resume(tmp_path, 6, th.tiny_config(train__steps=8, **change))
    forced = th.tiny_config(train__steps=8, resume__force=True, **change)
    assert key in resume.check_resume(tmp_path, 6, forced)

  # A key that the checkpoint's jaxpref did not have yet is recorded, not refused.
  saved = json.loads((tmp_path / "config.4.json").read_text())
  del saved["model"]["remat"], saved["loss"]["margin"]
  (tmp_path / "config.4.json").write_text(json.dumps(saved))
  assert "loss.margin" in resume.check_resume(tmp_path, 6, th.tiny_config(train__steps=8))

  from jaxpref.models import reward_model
  from jaxpref.models.source import model_config_from_config

  small = reward_model.abstract_params(model_config_from_config(config.model))
  big = reward_model.abstract_params(
    model_config_from_config(th.tiny_config(model__hidden_size=64).model)
  )
  with pytest.raises(resume.ResumeConfigError, match="shape"):
    resume.check_shapes(small, big, tmp_path)


def test_replayed_metrics_rows_are_dropped(tmp_path):
  rows = [{"step": s, "loss": 0.5} for s in (1, 2, 3, 4)] + [{"step": 4, "eval/x": 1.0}]
  (tmp_path / "metrics.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo'  # a line cut by a kill
  )
  assert resume.drop_metrics_after(tmp_path, 2) == 4
  assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
    1,
    2,
  ]


# ----------------------------------------------------------------------------------------------
# The loop, in process (what a notebook does): signals inside a save, a full disk, divergence.
# ----------------------------------------------------------------------------------------------
def _steps_on_disk(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _restored_params(workdir: Path, step=None):
  from jaxpref.models import reward_model

  cfg = workdir_lib.read_model_config(workdir)
  return workdir_lib.restore_params(workdir, step, reward_model.abstract_params(cfg))


@pytest.mark.usefixtures("shared_dir")
def test_signal_inside_an_async_save_stops_cleanly_and_resumes(tmp_path, monkeypatch, small_files):
  """SIGINT, then (resumed) SIGTERM, each arriving while the checkpoint of its step is being
  written: the loop must not save that step again (StepAlreadyExistsError) nor go on."""
  from jaxpref.training import trainer

  original = workdir_lib.save
  signal_at = {}

  def save_then_signal(manager, step, *args, **kwargs):
    saved = original(manager, step, *args, **kwargs)  # Async: still being written.
    if step in signal_at:
      os.kill(os.getpid(), signal_at.pop(step))
    return saved

  monkeypatch.setattr(workdir_lib, "save", save_then_signal)
  workdir = tmp_path / "run"
  signal_at[2] = signal.SIGINT
  result = trainer.train_and_evaluate(_config(small_files, train__steps=6), workdir)
  assert result["step"] == 2 and _steps_on_disk(workdir) == [2]
  assert not (workdir / "eval_final.json").exists()

  signal_at[4] = signal.SIGTERM
  result = trainer.train_and_evaluate(_config(small_files, train__steps=6), workdir)
  assert result["step"] == 4 and _steps_on_disk(workdir) == [2, 4]
  assert _restored_params(workdir)[0] == 4
  assert sorted(th.losses_by_step(workdir).items()) == [
    (s, v) for s, v in sorted(th.losses_by_step(workdir).items()) if len(v) == 1
  ]
  assert sorted(th.losses_by_step(workdir)) == [1, 2, 3, 4]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Handlers given back.


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str):
  path.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
  )
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.usefixtures("shared_dir")
def test_disk_full_is_one_line_at_the_step_and_keeps_the_last_checkpoint(tmp_path, small_files):
  """A 13 MiB tmpfs holds the tokenizer (3.5 MiB) and one checkpoint (6.3 MiB), not two."""
  from jaxpref.training import trainer

  with _small_tmpfs(tmp_path / "small", "13m") as workdir:
    config = _config(small_files, train__steps=6)
    with pytest.raises(workdir_lib.CheckpointSaveError) as info:
      trainer.train_and_evaluate(config, workdir)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message, message
    assert message.startswith(f"could not save the checkpoint of step 4 in {workdir}"), message
    step, params = _restored_params(workdir)
    assert step == 2 and all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


@pytest.mark.usefixtures("shared_dir")
def test_divergence_keeps_the_last_checkpoint_with_sound_weights(tmp_path, small_files):
  """lr 1e9 after a 10-step warmup: the step-1 update is 0, the step-2 one blows the weights up.
  The loss that shows it is step 3's, so the checkpoint of step 2 is set aside, not kept."""
  from jaxpref.training import trainer

  workdir = tmp_path / "run"
  config = _config(
    small_files,
    train__learning_rate=1e9,
    train__warmup_steps=10,
    train__steps=8,
    checkpoint__every_steps=1,
  )
  with pytest.raises(trainer.TrainingError) as info:
    trainer.train_and_evaluate(config, workdir)
  message = str(info.value)
  assert "\n" not in message and "at step 3" in message and "(step 1)" in message, message
  assert _steps_on_disk(workdir) == [1] and (workdir / "diverged_checkpoints" / "2").is_dir()
  _, params = _restored_params(workdir)
  assert max(float(np.abs(np.asarray(p)).max()) for p in jax.tree.leaves(params)) < 10

  # Resuming with a sane learning rate trains on from step 1 with finite losses.
  trainer.train_and_evaluate(
    _config(small_files, train__steps=6, checkpoint__every_steps=1), workdir
  )
  losses = th.losses_by_step(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(v).all() and len(v) == 1 for v in losses.values())
  assert (workdir / "config.1.json").is_file()


# ----------------------------------------------------------------------------------------------
# Two processes (jax.distributed on localhost): stop after the checkpoint of step 2, resume.
# ----------------------------------------------------------------------------------------------
# Warmup then constant: the learning rate of a step does not depend on the run length, so a run
# of 2 steps resumed to 4 is the same optimisation as a run of 4.
TWO_PROCESS = ("--config.train.schedule=constant", "--config.eval.final=False")


@pytest.fixture(scope="module")
def resumed_two_process_run(tmp_path_factory, small_files):
  workdir = tmp_path_factory.mktemp("two_process_resumed")
  flags = (*TWO_PROCESS, f"--config.data.files={small_files}")
  th.run_train_multiprocess(workdir, *flags, "--config.train.steps=2")
  results = th.run_train_multiprocess(workdir, *flags, "--config.train.steps=4")
  return workdir, flags, results


# Slow: two 2-process runs; the cross-process data state is covered in the default run by
# tests/test_data_pipeline.py and 2-process training by tests/test_train_distributed.py.
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_resume(resumed_two_process_run):
  workdir, _, results = resumed_two_process_run
  for result in results:
    assert "Resuming from the checkpoint of step 2" in result.stderr, result.stderr[-3000:]
  losses = th.losses_by_step(workdir)
  assert sorted(losses) == [1, 2, 3, 4] and all(len(v) == 1 for v in losses.values())
  assert _steps_on_disk(workdir) == [2, 4]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_stop_and_resume_equals_uninterrupted(resumed_two_process_run, tmp_path):
  workdir, flags, _ = resumed_two_process_run
  th.run_train_multiprocess(tmp_path, *flags, "--config.train.steps=4")
  expected, got = th.losses_by_step(tmp_path), th.losses_by_step(workdir)
  assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
  for step in expected:
    np.testing.assert_allclose(got[step][0], expected[step][0], rtol=1e-6, err_msg=f"{step}")


# ----------------------------------------------------------------------------------------------
# Through the programs.
# ----------------------------------------------------------------------------------------------
def test_first_signal_asks_to_stop_and_a_second_exits_at_once(monkeypatch):
  from jaxpref.training import trainer

  exits = []
  monkeypatch.setattr(trainer.os, "_exit", exits.append)
  stop = trainer._StopRequest().install()
  try:
    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    assert stop.requested and exits == []
    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]
  finally:
    stop.uninstall()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
@pytest.mark.usefixtures("shared_dir")
def test_second_signal_exits_at_once_and_leaves_no_damaged_checkpoint(tmp_path, small_files):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    th.train_command(
      workdir,
      "--config.train.steps=1000",
      "--config.checkpoint.every_steps=1",
      f"--config.data.files={small_files}",
    ),
    env=th.env_with(),
    cwd=th.REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  th.wait_for_step(workdir, 3, proc)  # The save of step 2 waited for that of step 1.
  proc.send_signal(signal.SIGINT)
  proc.send_signal(signal.SIGTERM)  # Another signal, so that the two are not merged into one.
  _, err = proc.communicate(timeout=120)
  assert proc.returncode in (0, 128 + signal.SIGTERM), err[-3000:]
  if proc.returncode:
    assert "second signal" in err
  steps = _steps_on_disk(workdir)  # What an interrupted save left is no checkpoint.
  assert steps and steps[0] == 1, steps
  for step in steps:
    _, params = _restored_params(workdir, step)
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def _program(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", f"jaxpref.{module}", *args],
    env=th.env_with(),
    cwd=th.REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.slow
@pytest.mark.usefixtures("shared_dir")
def test_damaged_checkpoint_changed_data_and_config_through_the_programs(tmp_path):
  workdir = tmp_path / "run"
  th.run_train(workdir, "--config.eval.final=False")  # Checkpoints 2 and 4.
  (workdir / "checkpoints" / "4" / "state" / "_METADATA").unlink()

  # export and eval: the newest intact checkpoint, one warning line; --step=4 is one error line.
  out = _program("export", f"--workdir={workdir}", f"--output={tmp_path / 'hf'}")
  assert out.returncode == 0 and "step 2 of" in out.stderr, out.stderr[-3000:]
  assert out.stderr.count("is damaged") == 1 and "Traceback" not in out.stderr
  out = _program("export", f"--workdir={workdir}", "--step=4", f"--output={tmp_path / 'hf4'}")
  assert out.returncode == 2 and "step 4" in out.stderr and "Traceback" not in out.stderr
  data = th.tiny_config().data.files.split(",")[0]
  out = _program(
    "eval",
    f"--workdir={workdir}",
    f"--data={data}",
    f"--output={tmp_path / 'eval'}",
    "--max_length=64",
    "--n_bootstrap=0",
  )
  assert out.returncode == 0 and out.stderr.count("is damaged") == 1, out.stderr[-3000:]

  # A refused config change, then the same data with chosen and rejected swapped: one line each.
  proc = th.run_train(workdir, "--config.loss.kind=ranking", check=False)
  assert proc.returncode == 2 and "loss.kind" in proc.stderr and "Traceback" not in proc.stderr
  swapped = tmp_path / "helpful.json"
  records = json.loads(Path(data).read_text())
  swapped.write_text(json.dumps(records))  # Same content under another path: accepted...
  files = th.tiny_config().data.files.split(",")
  proc = th.run_train(workdir, f"--config.data.files={','.join([str(swapped), *files[1:]])}")
  assert "is damaged" in proc.stderr and "Resuming from the checkpoint of step 2" in proc.stderr
  assert _steps_on_disk(workdir) == [2, 4] and (workdir / "damaged_checkpoints" / "4").is_dir()
  # ...every preference inverted is not, naming the task, unless forced.
  for record in records:
    record["text"] = record["text"][::-1]
  swapped.write_text(json.dumps(records))
  proc = th.run_train(
    workdir, f"--config.data.files={','.join([str(swapped), *files[1:]])}", check=False
  )
  assert proc.returncode == 2 and "task 'helpful'" in proc.stderr, proc.stderr[-3000:]
  assert "--config.resume.force=True" in proc.stderr and "Traceback" not in proc.stderr
