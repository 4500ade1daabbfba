"""Orbax checkpoints of the train state and the data iterator, saved together and atomically.

Layout of a workdir:
  WORKDIR/config.json          the config of the run's first segment (written by the trainer)
  WORKDIR/config.<step>.json   the config of a segment resumed at <step> with harmless changes
                               (`jaxpref.training.resume`)
  WORKDIR/.lock                held by the running trainer (`jaxpref.training.lock`)
  WORKDIR/model_config.json    the ModelConfig, so export / eval / score need no config file
  WORKDIR/tokenizer/           the tokenizer the run used
  WORKDIR/reward_stats.json    held-out reward mean / std (`jaxpref.evaluation.reward_stats`)
  WORKDIR/checkpoints/<step>/  {state, data} items written by Orbax (tmp dir + rename: a run killed
                               mid-save leaves no half checkpoint that a restart would pick up)
  WORKDIR/damaged_checkpoints/<step>/  a checkpoint that failed to restore, moved aside by the
                               trainer so that the step can be saved again (kept for inspection)
  WORKDIR/diverged_checkpoints/<step>/  checkpoints saved from diverging weights, moved aside by
                               the trainer's divergence guard

A checkpoint damaged after it was written (a truncated file, a missing `_METADATA` or `state/`) is
reported in one line and skipped for the newest intact one; see docs/preemption.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxpref.models.config import ModelConfig, freeze_rope_scaling
from jaxpref.models.lora import LoraConfig


class CheckpointNotFoundError(FileNotFoundError):
  pass


class CheckpointDamagedError(CheckpointNotFoundError):
  """A checkpoint asked for by step that is incomplete or cannot be read; the message says why."""


class CheckpointSaveError(RuntimeError):
  """Saving a checkpoint failed (disk full, permissions...); the message names step and cause."""


# What every complete checkpoint of ours holds (Orbax writes them before the final rename).
_REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "data")


def checkpoint_dir(workdir: str | Path) -> Path:
  return Path(workdir) / "checkpoints"


def is_checkpoint_step(step: int, every_steps: int, total_steps: int) -> bool:
  """The checkpoint cadence (its one owner): every `checkpoint.every_steps` and the last step."""
  return step == total_steps or (every_steps > 0 and step % every_steps == 0)


def make_manager(
  workdir: str | Path,
  *,
  keep: int,
  async_save: bool = True,
  read_only: bool = False,
) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    # Every `save` call is meant (the cadence is `is_checkpoint_step`); the manager keeps,
    # writes and finds checkpoints.
    save_interval_steps=1,
    max_to_keep=keep if keep > 0 else None,
    enable_async_checkpointing=async_save,
    create=not read_only,
    read_only=read_only,
    cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(
    checkpoint_dir(workdir).absolute(), options=options, item_names=("state", "data")
  )


def _cause(error: BaseException) -> str:
  """The innermost OS error of a save failure ('No space left on device'), else its first line."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return f"{seen.strerror} (errno {seen.errno})"
    text = str(seen)
    for marker in ("No space left on device", "File too large", "Permission denied"):
      if marker in text:
        return marker
    seen = seen.__cause__ or seen.__context__
  return _one_line(error)


def save_error(manager: ocp.CheckpointManager, step: int, error: BaseException):
  return CheckpointSaveError(
    f"could not save the checkpoint of step {step} in {manager.directory}: {_cause(error)}"
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_state: dict | None,
  *,
  force: bool = False,
) -> bool:
  """Starts saving `step` (in the background with async saves); a failure is a
  `CheckpointSaveError` naming the step (see `check_saved` for a background failure)."""
  args = ocp.args.Composite(
    # PyTree handlers on both sides (a manager keeps one handler per item): the restore is
    # partial, see `restore`.
    state=ocp.args.PyTreeSave(state),
    data=ocp.args.JsonSave(data_state or {}),
  )
  try:
    return manager.save(step, args=args, force=force)
  except Exception as e:  # noqa: BLE001 - reported in one line, with the step.
    raise save_error(manager, step, e) from e


def check_saved(manager: ocp.CheckpointManager, step: int | None, *, wait: bool = False) -> None:
  """Raises `CheckpointSaveError` for `step` if its background save failed (`wait`: finish it)."""
  try:
    if wait:
      manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:  # noqa: BLE001 - reported in one line, with the step.
    raise save_error(manager, step, e) from e


def damage(workdir: str | Path, step: int) -> str | None:
  """Why the checkpoint of `step` is incomplete (a missing file), or None if it looks complete.

  Only the layout is checked here; a truncated array file shows when it is read (see
  `restore_intact`).
  """
  step_dir = checkpoint_dir(workdir) / str(step)
  for name in _REQUIRED_FILES:
    if not (step_dir / name).exists():
      return f"{name} is missing"
  return None


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  text = text[:200] + "..." if len(text) > 200 else text
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  # A partial restore reads the leaves the current state has: checkpoints written before
  # `TrainState.rng` was removed keep that (unused) leaf on disk and still resume.
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=_restore_args(abstract_state), partial_restore=True
      ),
      data=ocp.args.JsonRestore(),
    ),
  )
  return restored["state"], dict(restored["data"] or {})


def _agree(ok: bool) -> bool:
  """True when `ok` holds on every process (a restore that failed on one fails on all)."""
  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils

  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def move_aside(workdir: str | Path, step: int, folder: str = "damaged_checkpoints") -> None:
  """Moves a step out of `checkpoints/` into `WORKDIR/<folder>/`, so that a resumed run neither
  restores it nor collides with it when it saves that step again (all processes call this)."""
  if jax.process_index() == 0:
    target = Path(workdir) / folder / str(step)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
      target = target.with_name(f"{step}.{int(time.time())}")
    shutil.move(str(checkpoint_dir(workdir) / str(step)), str(target))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"jaxpref_move_aside_{folder}_{step}")


def restore_intact(
  manager: ocp.CheckpointManager, workdir: str | Path, abstract_state: Any
) -> tuple[int, Any, dict] | None:
  """Restores the newest intact checkpoint as `(step, state, data_state)`; None if there is none.

  A damaged newer step is reported in one warning line and moved to `damaged_checkpoints/`
  (see the module docstring), so that the resumed run can write that step again.
  """
  workdir = Path(workdir)
  for step in sorted(manager.all_steps(), reverse=True):
    problem = damage(workdir, step)
    restored = None
    if problem is None:
      try:
        restored = _restore_step(manager, step, abstract_state)
      except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint.
        problem = _one_line(e)
    if _agree(problem is None):
      return (step, *restored)
    logging.warning(
      "Checkpoint of step %d in %s is damaged (%s); moved to %s and skipped.",
      step,
      checkpoint_dir(workdir),
      problem or "unreadable on another process",
      Path(workdir) / "damaged_checkpoints",
    )
    move_aside(workdir, step)
    manager.reload()
  return None


def restore(
  manager: ocp.CheckpointManager, step: int | None, abstract_state: Any
) -> tuple[int, Any, dict]:
  """Restores `(step, state, data_state)`; `step=None` means the latest complete checkpoint."""
  if step is None:
    step = manager.latest_step()
  if step is None:
    raise CheckpointNotFoundError(f"no checkpoint in {manager.directory}")
  if step not in manager.all_steps():
    raise CheckpointNotFoundError(
      f"no checkpoint for step {step} in {manager.directory}; have {sorted(manager.all_steps())}"
    )
  return (step, *_restore_step(manager, step, abstract_state))


def _restore_args(target: Any) -> Any:
  # Unsharded leaves go to the first local device. Giving every leaf a sharding also keeps Orbax
  # from reading the saved one, which it warns is unsafe on a different topology.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda x: ocp.ArrayRestoreArgs(sharding=getattr(x, "sharding", None) or device), target
  )


def _restore_params_step(manager: ocp.CheckpointManager, step: int, abstract_params: Any):
  # Only `params` is read: the optimizer state (twice the parameters' size) stays on disk.
  target = {"params": abstract_params}
  restore_args = _restore_args(target)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    ),
  )
  return restored["state"]["params"]


def restore_params(workdir: str | Path, step: int | None, abstract_params: Any) -> tuple[int, Any]:
  """Only the parameters of a checkpoint (for eval / export), without the optimizer state.

  `step=None` takes the newest intact checkpoint: a damaged newer one is reported in one line on
  stderr and skipped (left where it is: eval and export never write to a workdir). A damaged
  `step` asked for explicitly is a `CheckpointDamagedError`.
  """
  with _orbax_warnings_off():  # "read only" warnings about the read-only manager we asked for.
    manager = make_manager(workdir, keep=0, async_save=False, read_only=True)
  have = sorted(manager.all_steps())
  if step is not None and step not in have:
    raise CheckpointNotFoundError(
      f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; have {have}"
    )
  if not have:
    raise CheckpointNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
  for candidate in [step] if step is not None else reversed(have):
    problem = damage(workdir, candidate)
    if problem is None:
      try:
        return candidate, _restore_params_step(manager, candidate, abstract_params)
      except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint.
        problem = _one_line(e)
    message = f"checkpoint of step {candidate} in {checkpoint_dir(workdir)} is damaged ({problem})"
    if step is not None:
      raise CheckpointDamagedError(f"{message}; intact steps may be among {have}")
    print(f"warning: {message}; trying an older one", file=sys.stderr)
  raise CheckpointDamagedError(f"every checkpoint in {checkpoint_dir(workdir)} is damaged")


@contextlib.contextmanager
def _orbax_warnings_off():
  """Orbax logs through absl; its warnings about options we chose on purpose are noise."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def write_model_config(workdir: str | Path, cfg: ModelConfig) -> None:
  if jax.process_index() != 0:
    return
  path = Path(workdir) / "model_config.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True))


def read_model_config(workdir: str | Path) -> ModelConfig:
  path = Path(workdir) / "model_config.json"
  if not path.is_file():
    raise CheckpointNotFoundError(f"{path} not found: is {workdir} a jaxpref training workdir?")
  fields = json.loads(path.read_text())
  fields["rope_scaling"] = freeze_rope_scaling(
    fields.get("rope_scaling") and dict(fields["rope_scaling"])
  )
  fields["lora"] = LoraConfig.from_dict(fields.get("lora"))
  return ModelConfig(**fields)


def log_resume(step: int, workdir: str | Path) -> None:
  logging.info("Resuming from the checkpoint of step %d in %s", step, checkpoint_dir(workdir))
