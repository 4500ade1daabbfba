"""`train_and_evaluate(config, workdir)`: the training loop behind `python -m jaxpref.train`.

Reading order: data -> mesh and sharded state -> checkpoint restore -> the loop (step, log, eval,
save, preemption and NaN handling). The step itself is `jaxpref.training.step.train_step`.
"""

from __future__ import annotations

import json
import signal
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
from jaxpref.evaluation import evaluator as evaluation
from jaxpref.evaluation import scoring
from jaxpref.models import reward_model
from jaxpref.models.source import load_model
from jaxpref.training import config as train_config
from jaxpref.training import data as train_data
from jaxpref.training import flops
from jaxpref.training import step as train_step_lib
from jaxpref.training import workdir as workdir_lib
from jaxpref.training.metrics import MetricsWriter, flatten_metrics


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, bad config); the message says why."""


# ----------------------------------------------------------------------------------------------
# Preemption: SIGTERM (what a TPU VM gets before maintenance) asks the loop to save and stop.
# ----------------------------------------------------------------------------------------------
class _StopRequest:
  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self):
    def handler(signum, frame):
      del frame
      logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
      self.requested = True

    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # Not the main thread (e.g. a notebook worker thread): no handler.
      self._previous = None
    return self

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, manager, step: int) -> bool:
    if jax.process_count() > 1:
      # Every process must agree on the step at which they all save.
      return bool(manager.reached_preemption(step)) or self.requested
    return self.requested


def _check_config(config: ml_collections.ConfigDict, mesh, model_cfg) -> None:
  if config.data.packing:
    if config.train.grad_accum_steps > 1:
      raise TrainingError(
        "data.packing=True does not support train.grad_accum_steps > 1 (packed "
        "rows do not split into micro-batches of whole items)"
      )
    try:
      reward_model.check_packable(model_cfg)
    except ValueError as e:
      raise TrainingError(str(e)) from None
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


def _save_run_files(config: ml_collections.ConfigDict, workdir: Path, model_cfg, data) -> None:
  workdir_lib.write_model_config(workdir, model_cfg)
  if jax.process_index() != 0:
    return
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  data.contract.write(workdir)
  tokenizer_dir = workdir / "tokenizer"
  if not tokenizer_dir.exists():
    input_contract.save_tokenizer(data.tokenizer, tokenizer_dir, data.contract)


class _FiniteGuard:
  """Whether every step's loss and gradient norm since the last check were finite.

  The flag and the first bad value stay on device (a few scalar ops per step, no sync); `check`
  reads them at logging / evaluation / checkpoint steps and stops the run with one line.
  """

  def __init__(self, since: int):
    self._since = since
    self._ok = None
    self._bad_value = None

  def update(self, metrics: dict[str, Any]) -> None:
    loss, grad_norm = metrics["loss"], metrics["grad_norm"]
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    bad_value = jnp.where(jnp.isfinite(loss), grad_norm, loss)
    if self._ok is None:
      self._ok, self._bad_value = ok, bad_value
    else:
      self._bad_value = jnp.where(self._ok, bad_value, self._bad_value)
      self._ok = self._ok & ok

  def check(self, step: int, last_checkpoint: int | None, checkpoint_dir: Path) -> None:
    if self._ok is None:
      return
    if not bool(self._ok):
      value = float(self._bad_value)
      raise TrainingError(
        f"loss became {value} between steps {self._since + 1} and {step}; stopping. The last "
        f"good checkpoint (step {last_checkpoint}) in {checkpoint_dir} is kept; lower "
        "train.learning_rate or check the data."
      )
    self._since, self._ok, self._bad_value = step, None, None


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
  train_step_lib.loss_config(config.loss)  # Bad loss settings fail here, before any data is read.

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
  _check_config(config, mesh, model_cfg)
  logging.info(
    "Mesh %s over %d devices (%d processes)",
    dict(mesh.shape),
    jax.device_count(),
    jax.process_count(),
  )
  data = train_data.prepare(config, tokenizer, mesh, contract=contract)
  num_tasks = len(data.task_names)
  _save_run_files(config, workdir, model_cfg, data)
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

  manager = workdir_lib.make_manager(
    workdir,
    keep=config.checkpoint.keep,
    async_save=config.checkpoint.async_save,
  )
  pipeline = data.train_pipeline
  if manager.latest_step() is not None:
    step, state, data_state = workdir_lib.restore(manager, None, program.abstract_sharded_state())
    pipeline.set_state(data_state)
    workdir_lib.log_resume(step, workdir)
  step = int(jax.device_get(state.step))

  step_fn = program.step_fn
  evaluator = evaluation.TrainEvaluator(
    model_cfg,
    data.eval_items,
    data.tokenizer,
    batch_size=config.eval.batch_size,
    min_bucket=config.data.min_bucket,
    contract=data.contract,
  )

  # --- The loop. ------------------------------------------------------------------------------
  writer = MetricsWriter(workdir)
  stop = _StopRequest().install()
  last_logged: dict[str, Any] = {}
  progress = None
  if jax.process_index() == 0 and step < total_steps:
    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=step, desc="train", unit="step")
  window_start, window_tokens, window_steps, window_flops = time.perf_counter(), 0.0, 0, 0.0
  guard = _FiniteGuard(since=step)
  device_kind = jax.devices()[0].device_kind
  try:
    while step < total_steps:
      if stop.should_stop(manager, step):
        guard.check(step, manager.latest_step(), workdir_lib.checkpoint_dir(workdir))
        workdir_lib.save(manager, step, state, pipeline.get_state(), force=True)
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
      guard.update(metrics)
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
        guard.check(step, manager.latest_step(), workdir_lib.checkpoint_dir(workdir))
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
        workdir_lib.save(manager, step, state, pipeline.get_state(), force=True)
  finally:
    stop.uninstall()
    manager.wait_until_finished()
    if progress is not None:
      progress.close()

  if step >= total_steps and config.eval.final and evaluator.has_data:
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
  writer.close()
  manager.close()
  return {"step": step, **last_logged, "_state": state}


def final_params(result: dict[str, Any]):
  """The parameters of a `train_and_evaluate` result (kept out of the logged metrics)."""
  return result["_state"].params


__all__ = ["TrainingError", "final_params", "train_and_evaluate"]
