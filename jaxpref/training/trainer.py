"""`train_and_evaluate(config, workdir)`: the training loop behind `python -m jaxpref.train`.

Reading order: workdir lock and resume checks -> model, mesh, then data -> sharded state ->
checkpoint restore -> the loop (step, log, eval, save, preemption and divergence handling). The
step itself is built by `jaxpref.training.step.build_from_config`.

(About 500 lines on purpose: the loop and the handlers whose order it fixes (signals, the lock,
the divergence guard, save-failure checks) read top to bottom in one file; what they call lives in
`workdir`, `resume`, `lock` and `data`.)
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxpref import sharding
from jaxpref.data import batch as batch_lib
from jaxpref.data import contract as input_contract
from jaxpref.data.errors import DataConfigError
from jaxpref.evaluation import evaluator as evaluation
from jaxpref.evaluation import reward_stats, scoring
from jaxpref.models import lora, reward_model
from jaxpref.models.source import load_model
from jaxpref.training import config as train_config
from jaxpref.training import data as train_data
from jaxpref.training import flops, lock, resume
from jaxpref.training import step as train_step_lib
from jaxpref.training import workdir as workdir_lib
from jaxpref.training.metrics import MetricsWriter, flatten_metrics


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, bad config); the message says why."""


# ----------------------------------------------------------------------------------------------
# Preemption: SIGTERM (what a TPU VM or SLURM sends before it stops a job) or SIGINT (Ctrl-C) asks
# the loop to finish its step, save and stop with exit 0; a second signal exits at once (Orbax's
# tmp dir + rename means an unfinished save leaves no checkpoint a restart would pick up).
# ----------------------------------------------------------------------------------------------
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopRequest:
  def __init__(self):
    self.requested = False
    self._previous: dict[int, Any] = {}

  def install(self):
    def handler(signum, frame):
      del frame
      if self.requested:
        print(
          f"jaxpref.train: second signal {signum}: exiting now without saving; the last "
          "complete checkpoint stands.",
          file=sys.stderr,
          flush=True,
        )
        os._exit(128 + signum)
      logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
      self.requested = True

    for signum in _STOP_SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, handler)
      except ValueError:  # Not the main thread (e.g. a notebook worker thread): no handler.
        pass
    return self

  def uninstall(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def should_stop(self, manager, step: int) -> bool:
    if jax.process_count() > 1:
      # Every process must agree on the step at which they all save: a signal that reached one
      # process stops all of them.
      from jax.experimental import multihost_utils

      asked = multihost_utils.process_allgather(np.int32(self.requested))
      return bool(np.max(asked)) or bool(manager.reached_preemption(step))
    return self.requested


def _check_config(config: ml_collections.ConfigDict, mesh) -> None:
  multiple = sharding.global_batch_size_multiple(mesh) * config.train.grad_accum_steps
  if config.train.batch_size % config.train.grad_accum_steps:
    raise TrainingError(
      f"train.batch_size={config.train.batch_size} is not divisible by "
      f"train.grad_accum_steps={config.train.grad_accum_steps}"
    )
  if config.train.batch_size % jax.process_count():
    raise TrainingError(
      f"train.batch_size={config.train.batch_size} is not divisible by the "
      f"{jax.process_count()} processes"
    )
  if config.train.batch_size % multiple:
    logging.warning(
      "train.batch_size=%d is not a multiple of data x fsdp x grad_accum = %d: the "
      "batch axis will be replicated rather than split.",
      config.train.batch_size,
      multiple,
    )


def _save_run_files(
  config: ml_collections.ConfigDict,
  workdir: Path,
  model_cfg,
  data,
  *,
  start_step: int,
  changed: dict | None,
) -> None:
  workdir_lib.write_model_config(workdir, model_cfg)
  if start_step == 0 or changed:
    resume.record_segment(workdir, start_step, config)
  if jax.process_index() != 0:
    return
  data.contract.write(workdir)
  tokenizer_dir = workdir / "tokenizer"
  if not tokenizer_dir.exists():
    input_contract.save_tokenizer(data.tokenizer, tokenizer_dir, data.contract)


def _lock_workdir(workdir: Path) -> lock.WorkdirLock | None:
  """Process 0 locks the workdir; every process fails together if another run holds it."""
  held, error = None, None
  if jax.process_index() == 0:
    try:
      held = lock.WorkdirLock(workdir).acquire()
    except lock.WorkdirBusyError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    busy = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if int(busy) and error is None:
      error = lock.WorkdirBusyError(f"workdir {workdir} is in use by another run")
  if error is not None:
    raise error
  return held


class _DivergenceGuard:
  """Whether every step since the last check had a finite loss and gradient norm, and a loss
  under `factor` times its running average (0: finite only).

  The flags, the running average and the first bad step stay on device (a few scalar ops per
  step, no sync); `check` reads them at logging / evaluation / checkpoint steps. The loss of step
  s is that of the parameters saved at step s - 1: a bad step s means a checkpoint of s - 1 (or
  later) holds diverging weights, which `check` sets aside before it stops the run in one line.
  """

  def __init__(self, since: int, factor: float):
    self._since = since
    self._factor = factor
    self._average = None  # Kept across checks.
    self._ok = self._bad_value = self._bad_step = self._bad_spike = None

  def update(self, metrics: dict[str, Any], step: int) -> None:
    loss, grad_norm = metrics["loss"], metrics["grad_norm"]
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if self._average is None:
      spike, average = jnp.zeros((), bool), loss
    else:
      spike = (self._factor > 0) & (loss > self._factor * self._average)
      average = 0.9 * self._average + 0.1 * loss
    ok = finite & ~spike
    bad_value = jnp.where(jnp.isfinite(loss), grad_norm, loss)
    bad_value = jnp.where(finite, loss, bad_value)
    if self._ok is None:
      self._ok, self._bad_value, self._bad_spike = ok, bad_value, spike & finite
      self._bad_step = jnp.int32(step)
    else:
      first_bad = self._ok & ~ok
      self._bad_value = jnp.where(first_bad, bad_value, self._bad_value)
      self._bad_spike = jnp.where(first_bad, spike & finite, self._bad_spike)
      self._bad_step = jnp.where(first_bad, step, self._bad_step)
      self._ok = self._ok & ok
    self._average = average if self._average is None else jnp.where(ok, average, self._average)

  def check(self, step: int, manager, workdir: Path) -> None:
    if self._ok is None:
      return
    if not bool(self._ok):
      value, bad_step = float(self._bad_value), int(self._bad_step)
      problem = f"loss became {value:.4g}" if math.isfinite(value) else f"loss became {value}"
      if bool(self._bad_spike):
        problem += (
          f", over train.divergence_factor={self._factor:g} times its running average "
          f"{float(self._average):.4g}"
        )
      set_aside = _set_aside_diverged(manager, workdir, bad_step - 1)
      good = manager.latest_step()
      kept = (
        f"the last good checkpoint (step {good}) in {workdir_lib.checkpoint_dir(workdir)} is kept"
        if good is not None
        else "no checkpoint from before the divergence exists"
      )
      aside = f", diverged step(s) {set_aside} moved to diverged_checkpoints/" if set_aside else ""
      raise TrainingError(
        f"{problem} at step {bad_step}; stopping. {kept}{aside}; lower train.learning_rate or "
        "check the data."
      )
    self._since, self._ok = step, None


def _set_aside_diverged(manager, workdir: Path, from_step: int) -> list[int]:
  """Moves checkpoints of steps >= `from_step` (diverging weights) out of the way."""
  manager.wait_until_finished()
  bad = [s for s in sorted(manager.all_steps()) if s >= from_step]
  for s in bad:
    workdir_lib.move_aside(workdir, s, "diverged_checkpoints")
  manager.reload()
  return bad


def _host_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
  return jax.tree.map(np.asarray, jax.device_get(metrics))


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  *,
  on_final_eval: Callable[[dict[str, dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
  """Trains (or resumes) a reward model as `config` says; returns the last logged metrics.

  Args:
    config: a config from `configs/*.py` (see `jaxpref.training.config.base_config`).
    workdir: where checkpoints, logs, the effective config and the tokenizer go. A run started
      again with the same workdir resumes from its latest complete checkpoint.
    on_final_eval: called once, on every process, with the full reports of the final held-out
      evaluation, `{task: calibration_report}` plus `"all"` (see
      `jaxpref.evaluation.calibration.calibration_report`: reliability bins and every metric, of
      which eval_final.json keeps the scalars). Not called when there is no final evaluation (a
      run stopped early, `eval.final=False`, or no held-out items).
  """
  train_config.validate(config)
  workdir = Path(workdir)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  workdir_lock = _lock_workdir(workdir)
  stop = _StopRequest().install()
  try:
    return _train(config, workdir, stop, on_final_eval)
  finally:
    stop.uninstall()
    if workdir_lock is not None:
      workdir_lock.release()


def _train(
  config: ml_collections.ConfigDict,
  workdir: Path,
  stop: _StopRequest,
  on_final_eval: Callable[[dict[str, dict[str, Any]]], None] | None,
) -> dict[str, Any]:
  train_step_lib.loss_config(config.loss)  # Bad loss settings fail here, before any data is read.
  manager = workdir_lib.make_manager(
    workdir,
    keep=config.checkpoint.keep,
    async_save=config.checkpoint.async_save,
  )
  # A resume must mean the same run: checked before the (slow) data and model loading.
  latest = manager.latest_step()
  changed = resume.check_resume(workdir, latest, config) if latest is not None else None

  # --- Model, mesh, then data. ---------------------------------------------------------------
  # The mesh comes first so that each process reads only its own slices of a checkpoint; the
  # model config is settled (token ids from the tokenizer) before any data is read.
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  model_cfg, loaded_params = load_model(config.model, seed=config.train.seed, mesh=mesh)
  train_config.check_lengths(config, model_cfg)
  if loaded_params is not None and (bad := scoring.non_finite_leaves(loaded_params)):
    # Otherwise the first step's loss is NaN and the message blames the learning rate.
    from jaxpref.models.hf_io import CheckpointError

    raise CheckpointError(
      f"model.path={config.model.path}: the checkpoint's weights are not finite ({len(bad)} "
      f"arrays with NaN/inf, first {bad[0]})"
    )
  tokenizer = train_data.load_tokenizer(config)
  # The input contract (what the model sees) is decided once, here, and stored with the run.
  contract = train_data.configure_input(config, tokenizer, model_cfg)
  model_cfg = train_data.settle_model_config(model_cfg, tokenizer)
  try:
    model_cfg = model_cfg.replace(lora=lora.from_config(config.lora))
    if model_cfg.lora is not None:
      reward_model.abstract_params(model_cfg)  # A target naming no layer fails here, in one line.
  except ValueError as e:
    raise TrainingError(str(e)) from None
  if latest is not None and (workdir / "model_config.json").is_file():
    resume.check_shapes(
      reward_model.abstract_params(workdir_lib.read_model_config(workdir)),
      reward_model.abstract_params(model_cfg),
      workdir,
    )
  train_data.settle_packing(config, model_cfg)
  _check_config(config, mesh)
  logging.info(
    "Mesh %s over %d devices (%d processes)",
    dict(mesh.shape),
    jax.device_count(),
    jax.process_count(),
  )
  data = train_data.prepare(config, tokenizer, mesh, contract=contract)
  num_tasks = len(data.task_names)
  total_steps = data.num_steps
  logging.info(
    "Tasks %s; %d train steps of %d items", data.task_names, total_steps, config.train.batch_size
  )

  # --- Sharded state. -------------------------------------------------------------------------
  program = train_step_lib.build_from_config(
    config, model_cfg, num_tasks=num_tasks, total_steps=total_steps, mesh=mesh
  )
  # Initialised under jit straight into its shards: no host ever holds the full weights.
  state = program.init(jax.random.PRNGKey(config.train.seed), loaded_params)
  del loaded_params

  pipeline = data.train_pipeline
  restored = None
  if latest is not None:
    restored = workdir_lib.restore_intact(manager, workdir, program.abstract_sharded_state())
  step = 0
  if restored is not None:
    _, state, data_state = restored
    step = int(jax.device_get(state.step))
    try:
      # The data position is the train state's step, on every process.
      pipeline.set_state(data_state, step=step, force=config.resume.force)
    except DataConfigError as e:
      raise DataConfigError(f"{e}; or --config.resume.force=True to continue anyway") from None
    workdir_lib.log_resume(step, workdir)
    if changed:
      logging.warning(
        "Resuming with a changed config (recorded in config.%d.json): %s",
        step,
        ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()),
      )
    dropped = resume.drop_metrics_after(workdir, step)
    if dropped:
      logging.info("Dropped %d metrics.jsonl rows after step %d (replayed now).", dropped, step)
  _save_run_files(config, workdir, model_cfg, data, start_step=step, changed=changed)
  start_step = step
  saved_step = step if restored is not None else None  # The newest step on disk (or in flight).

  step_fn = program.step_fn
  evaluator = evaluation.TrainEvaluator(
    model_cfg,
    data.eval_items,
    data.tokenizer,
    batch_size=config.eval.batch_size,
    min_bucket=config.data.min_bucket,
    contract=data.contract,
    packing=config.data.packing,
    share_prompts=config.data.shared_prompts,
  )

  # --- The loop. ------------------------------------------------------------------------------
  writer = MetricsWriter(workdir, purge_step=step + 1 if step else None)
  trainable_count, total_count = lora.count_trainable(model_cfg, program.abstract_state.params)
  logging.info(
    "Parameters: %d trainable of %d (%.2f%%)",
    trainable_count,
    total_count,
    100.0 * trainable_count / total_count,
  )
  writer.write(step, {"trainable_params": trainable_count, "total_params": total_count})
  last_logged: dict[str, Any] = {}
  progress = None
  if jax.process_index() == 0 and step < total_steps:
    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=step, desc="train", unit="step")
  window_start, window_tokens, window_steps, window_flops = time.perf_counter(), 0.0, 0, 0.0
  guard = _DivergenceGuard(since=step, factor=config.train.divergence_factor)
  device_kind = jax.devices()[0].device_kind
  try:
    while step < total_steps:
      if stop.should_stop(manager, step):
        guard.check(step, manager, workdir)
        if step == saved_step:
          logging.warning("Stopped at step %d on request; its checkpoint is saved.", step)
        elif step == start_step:
          logging.warning("Stopped on request before the first step; nothing to save.")
        else:
          workdir_lib.save(manager, step, state, pipeline.get_state(), force=True)
          saved_step = step
          logging.warning("Stopped at step %d on request; checkpoint saved.", step)
        break
      local_batch = next(pipeline)  # Padded or packed, as config.data.packing says.
      # Model FLOPs of the global batch, estimated from this process's share of it.
      window_flops += jax.process_count() * flops.train_flops(
        model_cfg, batch_lib.response_lengths(local_batch).ravel()
      )
      batch = train_data.global_batch(local_batch, mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      # No host sync per step: the guard and the token count accumulate on device and are read
      # at logging, evaluation and checkpoint steps only.
      guard.update(metrics, step)
      if saved_step is not None and config.checkpoint.async_save:
        workdir_lib.check_saved(manager, saved_step)  # A failed background save, at once.
      window_steps += 1
      window_tokens = window_tokens + metrics["tokens"]
      if progress is not None:
        progress.update(1)
      is_log_step = step % config.train.log_every_steps == 0 or step == total_steps
      is_eval_step = (
        config.eval.every_steps and step % config.eval.every_steps == 0 and step < total_steps
      )
      is_save_step = workdir_lib.is_checkpoint_step(
        step, config.checkpoint.every_steps, total_steps
      )
      if is_log_step or is_eval_step or is_save_step:
        # Finite loss and gradients since the last check, so that no checkpoint saves
        # non-finite parameters.
        guard.check(step, manager, workdir)
      if is_log_step:
        if progress is not None:
          progress.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        window_tokens = float(window_tokens)
        elapsed = time.perf_counter() - window_start
        scalars = flatten_metrics(_host_metrics(metrics), data.task_names)
        scalars["step_time_s"] = elapsed / window_steps
        scalars["tokens_per_s"] = window_tokens / elapsed
        scalars["model_tflops_per_s"] = window_flops / elapsed / 1e12
        utilisation = flops.mfu(window_flops, elapsed, device_kind, jax.device_count())
        if utilisation is not None:
          scalars["mfu"] = utilisation
        writer.write(step, scalars)
        last_logged = {"step": step, **scalars}
        window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
        window_flops = 0.0
      if is_eval_step:
        eval_scalars = evaluator.evaluate(state.params)
        writer.write(step, eval_scalars)
      if is_save_step:
        if saved_step is not None:
          # Orbax waits for the previous save anyway; a failure of it is reported as its own.
          workdir_lib.check_saved(manager, saved_step, wait=True)
        workdir_lib.save(manager, step, state, pipeline.get_state(), force=True)
        saved_step = step
    if saved_step is not None:
      workdir_lib.check_saved(manager, saved_step, wait=True)
  finally:
    try:
      manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - the error in flight (if any) says more.
      logging.warning("Waiting for the last checkpoint save failed: %s", e)
    if progress is not None:
      progress.close()

  if step >= total_steps and config.eval.final and evaluator.has_data and not stop.requested:
    # Reports once, then the logged scalars from them (what `evaluator.evaluate` returns), so that
    # a caller who wants the reliability bins does not pay for a second evaluation.
    eval_reports = evaluator.reports(state.params)
    eval_scalars = evaluation.logged_scalars(eval_reports)
    if on_final_eval is not None:
      on_final_eval(eval_reports)
    writer.write(step, eval_scalars)
    last_logged.update(eval_scalars)
    if jax.process_index() == 0:
      (workdir / "eval_final.json").write_text(json.dumps(eval_scalars, indent=2))
      reward_stats.write(workdir, {**eval_reports["all"]["reward_stats"], "step": step})
  writer.close()
  manager.close()
  return {"step": step, **last_logged, "_state": state}


def final_params(result: dict[str, Any]):
  """The parameters of a `train_and_evaluate` result (kept out of the logged metrics)."""
  return result["_state"].params


__all__ = ["TrainingError", "final_params", "train_and_evaluate"]
