"""`train_and_evaluate(config, workdir)`: the training loop behind `python -m jaxpref.train`.

Reading order: data -> mesh and sharded state -> checkpoint restore -> the loop (step, log, eval,
save, preemption and NaN handling). The step itself is `jaxpref.train_step.train_step`.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxpref import (
  checkpointing,
  evaluation,
  flops,
  objectives,
  scoring,
  sharding,
  train_config,
  train_data,
  train_state,
)
from jaxpref.metrics_writer import MetricsWriter, flatten_metrics
from jaxpref.model_source import load_model
from jaxpref.models import reward_model
from jaxpref.train_step import train_step


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


def _save_run_files(config: ml_collections.ConfigDict, workdir: Path, model_cfg, tokenizer) -> None:
  checkpointing.write_model_config(workdir, model_cfg)
  if jax.process_index() != 0:
    return
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  tokenizer_dir = workdir / "tokenizer"
  if not tokenizer_dir.exists():
    tokenizer.save_pretrained(str(tokenizer_dir))


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
    config: a config from `configs/*.py` (see `jaxpref.train_config.base_config`).
    workdir: where checkpoints, logs, the effective config and the tokenizer go. A run started
      again with the same workdir resumes from its latest complete checkpoint.
    on_final_eval: called once, on every process, with the full reports of the final held-out
      evaluation, `{task: calibration_report}` plus `"all"` (see
      `jaxpref.calibration.calibration_report`: reliability bins and every metric, of which
      eval_final.json keeps the scalars). Not called when there is no final evaluation (a run
      stopped early, `eval.final=False`, or no held-out items).
  """
  train_config.validate(config)
  workdir = Path(workdir)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  loss_cfg = objectives.LossConfig(
    kind=config.loss.kind,
    more_alpha=config.loss.more_alpha,
    more_normalize=config.loss.more_normalize,
    margin=config.loss.margin,
    center_rewards_coef=config.loss.center_rewards_coef,
  )

  # --- Model and data. ------------------------------------------------------------------------
  model_cfg, loaded_params = load_model(config.model, seed=config.train.seed)
  train_config.check_lengths(config, model_cfg)
  if loaded_params is not None and (bad := scoring.non_finite_leaves(loaded_params)):
    # Otherwise the first step's loss is NaN and the message blames the learning rate.
    from jaxpref.models.hf_io import CheckpointError

    raise CheckpointError(
      f"model.path={config.model.path}: the checkpoint's weights are not finite ({len(bad)} "
      f"arrays with NaN/inf, first {bad[0]})"
    )
  data = train_data.prepare(config, model_cfg)
  model_cfg = data.model_cfg
  num_tasks = len(data.task_names)
  _save_run_files(config, workdir, model_cfg, data.tokenizer)
  total_steps = data.num_steps
  logging.info(
    "Tasks %s; %d train steps of %d items", data.task_names, total_steps, config.train.batch_size
  )

  # --- Mesh and sharded state. ----------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  _check_config(config, mesh, model_cfg)
  logging.info(
    "Mesh %s over %d devices (%d processes)",
    dict(mesh.shape),
    jax.device_count(),
    jax.process_count(),
  )
  optimizer, schedule = train_state.make_optimizer(config.train, total_steps)
  rng = jax.random.PRNGKey(config.train.seed)
  init_fn = functools.partial(train_state.init_state, model_cfg, optimizer, num_tasks)
  abstract_state = jax.eval_shape(init_fn, rng)
  state_shardings = train_state.state_shardings(model_cfg, abstract_state, mesh)
  if loaded_params is None:
    # Initialised under jit straight into its shards: no host ever holds the full weights.
    state = jax.jit(init_fn, out_shardings=state_shardings)(rng)
  else:
    params = jax.device_put(loaded_params, state_shardings.params)
    state = jax.jit(lambda r, p: init_fn(r, params=p), out_shardings=state_shardings)(rng, params)
    del loaded_params, params

  manager = checkpointing.make_manager(
    workdir,
    every_steps=config.checkpoint.every_steps,
    keep=config.checkpoint.keep,
    async_save=config.checkpoint.async_save,
  )
  pipeline = data.train_pipeline
  if manager.latest_step() is not None:
    abstract = checkpointing.abstract_with_shardings(abstract_state, state_shardings)
    step, state, data_state = checkpointing.restore(manager, None, abstract)
    pipeline.set_state(data_state)
    checkpointing.log_resume(step, workdir)
  step = int(jax.device_get(state.step))

  step_fn = jax.jit(
    functools.partial(
      train_step,
      model_cfg=model_cfg,
      loss_cfg=loss_cfg,
      optimizer=optimizer,
      schedule=schedule,
      num_tasks=num_tasks,
      grad_accum_steps=config.train.grad_accum_steps,
    ),
    in_shardings=(state_shardings, None),
    out_shardings=(state_shardings, None),
    donate_argnums=0,
  )
  evaluator = evaluation.TrainEvaluator(
    model_cfg,
    data.eval_items,
    data.tokenizer,
    batch_size=config.eval.batch_size,
    max_length=config.data.max_length,
    min_bucket=config.data.min_bucket,
    truncation_side=config.data.truncation_side,
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
  device_kind = jax.devices()[0].device_kind
  try:
    while step < total_steps:
      if stop.should_stop(manager, step):
        checkpointing.save(manager, step, state, pipeline.get_state(), force=True)
        logging.warning("Stopped at step %d on request; checkpoint saved.", step)
        break
      local_batch = next(pipeline)
      # Model FLOPs of the global batch, estimated from this process's share of it.
      window_flops += jax.process_count() * flops.train_flops(
        model_cfg, local_batch["attention_mask"].sum(-1).ravel()
      )
      if config.data.packing:
        local_batch = train_data.pack_local_batch(local_batch, config.data.max_length, mesh)
      batch = train_data.global_batch(local_batch, mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      # Two scalars per step, fetched anyway for the progress bar: the NaN guard. Finite gradients
      # too, so that the parameters a later checkpoint saves are finite.
      loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        loss = loss if not math.isfinite(loss) else grad_norm
        raise TrainingError(
          f"loss became {loss} at step {step}; stopping. The last good checkpoint "
          f"(step {manager.latest_step()}) in {checkpointing.checkpoint_dir(workdir)} is kept; "
          "lower train.learning_rate or check the data."
        )
      window_steps += 1
      window_tokens += float(metrics["tokens"])
      if progress is not None:
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
      if step % config.train.log_every_steps == 0 or step == total_steps:
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
      if config.eval.every_steps and step % config.eval.every_steps == 0 and step < total_steps:
        eval_scalars = evaluator.evaluate(state.params)
        writer.write(step, eval_scalars)
      if step % config.checkpoint.every_steps == 0 or step == total_steps:
        checkpointing.save(manager, step, state, pipeline.get_state(), force=True)
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
