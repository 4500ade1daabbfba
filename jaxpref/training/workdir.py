"""Orbax checkpoints of the train state and the data iterator, saved together and atomically.

Layout of a workdir:
  WORKDIR/config.json          the effective run config (written by the trainer)
  WORKDIR/model_config.json    the ModelConfig, so export / eval / score need no config file
  WORKDIR/tokenizer/           the tokenizer the run used
  WORKDIR/checkpoints/<step>/  {state, data} items written by Orbax (tmp dir + rename: a run killed
                               mid-save leaves no half checkpoint that a restart would pick up)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxpref.models.config import ModelConfig, freeze_rope_scaling


class CheckpointNotFoundError(FileNotFoundError):
  pass


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


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_state: dict | None,
  *,
  force: bool = False,
) -> bool:
  args = ocp.args.Composite(
    # PyTree handlers on both sides (a manager keeps one handler per item): the restore is
    # partial, see `restore`.
    state=ocp.args.PyTreeSave(state),
    data=ocp.args.JsonSave(data_state or {}),
  )
  return manager.save(step, args=args, force=force)


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
  )


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
  return step, restored["state"], dict(restored["data"] or {})


def _restore_args(target: Any) -> Any:
  return jax.tree.map(
    lambda x: (
      ocp.ArrayRestoreArgs(sharding=x.sharding)
      if getattr(x, "sharding", None)
      else ocp.RestoreArgs(restore_type=None)
    ),
    target,
  )


def restore_params(workdir: str | Path, step: int | None, abstract_params: Any) -> tuple[int, Any]:
  """Only the parameters of a checkpoint (for eval / export), without the optimizer state."""
  manager = make_manager(workdir, keep=0, async_save=False, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    have = sorted(manager.all_steps())
    raise CheckpointNotFoundError(
      f"no checkpoint{'' if step is None else f' for step {step}'} in "
      f"{checkpoint_dir(workdir)}; have {have}"
    )
  # Only `params` is read: the optimizer state (twice the parameters' size) stays on disk.
  target = {"params": abstract_params}
  restore_args = _restore_args(target)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    ),
  )
  return step, restored["state"]["params"]


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
  return ModelConfig(**fields)


def log_resume(step: int, workdir: str | Path) -> None:
  logging.info("Resuming from the checkpoint of step %d in %s", step, checkpoint_dir(workdir))
