"""A resumable sweep of reward-model training: model size x data size x objective x seed.

  python -m jaxpref.experiments.scaling --config=configs/experiments/cpu_scaling.py --workdir=DIR

Each cell is one `jaxpref.training.trainer.train_and_evaluate` run in DIR/cells/<name>; the
trainer's final-evaluation hook hands the sweep the full per-task reports, whose reliability
bins go to the cell's reports.json. A cell whose reports.json exists is skipped, so an
interrupted sweep picks up where it stopped. The sweep then writes DIR/results.json (one row per
cell; paths in it are relative to DIR, or to the shared data folder as `<shared>/...`),
DIR/results.md (accuracy and ECE per task, mean ± std over seeds) and plots under DIR/plots/.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ml_collections

from jaxpref.experiments.report import write_report

SINGLE = "single"
OBJECTIVE_LOSS = {SINGLE: "ranking", "multitask": "multitask", "more": "more"}
REPORTS = "reports.json"  # Written last in a cell: its presence marks the cell done.


class SweepError(ValueError):
  """A sweep config that cannot run; the message names the key."""


class SweepStopped(RuntimeError):
  """A cell stopped on request (SIGTERM) before its last step: the sweep stops too (resumable)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  family: str  # decoder | minilm
  dims: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Cell:
  model: ModelSpec
  data_size: int
  objective: str
  seed: int
  task: str = ""  # Single-task cells train on one task only.

  @property
  def name(self) -> str:
    task = f"-{self.task}" if self.task else ""
    return f"{self.model.name}-n{self.data_size}-{self.objective}{task}-s{self.seed}"


def parse_models(text: str) -> list[ModelSpec]:
  """`name=decoder:hidden:layers:heads:intermediate` or `name=minilm:layers`, comma-separated."""
  specs = []
  for entry in filter(None, (e.strip() for e in text.split(","))):
    name, _, body = entry.partition("=")
    family, *dims = body.split(":")
    want = {"decoder": 4, "minilm": 1}.get(family)
    if not name or want is None or len(dims) != want or not all(d.isdigit() for d in dims):
      raise SweepError(
        f"sweep.models: bad entry {entry!r}; expected name=decoder:H:L:HEADS:FF or name=minilm:L"
      )
    if family == "minilm" and not 1 <= int(dims[0]) <= 6:
      raise SweepError(f"sweep.models: {entry!r}: all-MiniLM-L6-v2 has layers 1 to 6")
    specs.append(ModelSpec(name, family, tuple(int(d) for d in dims)))
  if not specs:
    raise SweepError("sweep.models is empty")
  return specs


def _ints(text: str, key: str) -> list[int]:
  try:
    values = [int(v) for v in str(text).split(",") if v.strip()]
  except ValueError as e:
    raise SweepError(f"{key}={text!r}: expected comma-separated integers") from e
  if not values:
    raise SweepError(f"{key} is empty")
  return values


def _objectives(text: str, key: str) -> list[str]:
  names = [o.strip() for o in text.split(",") if o.strip()]
  for name in names:
    if name not in OBJECTIVE_LOSS:
      raise SweepError(f"{key}: unknown {name!r}; choose from {sorted(OBJECTIVE_LOSS)}")
  return names


def sweep_tasks(config: ml_collections.ConfigDict) -> list[str]:
  """The sweep's tasks: `sweep.tasks`, or one per file of `base.data.files` (its task name).

  A file that holds several tasks (the domain-specific format: `<name>_<domain>`) needs
  `sweep.tasks`, since the tasks are only known once the file is read.
  """
  from jaxpref.training import data as train_data

  names = [t.strip() for t in config.sweep.tasks.split(",") if t.strip()]
  return names or [name for name, _ in train_data.task_files(config.base.data)]


def plan(config: ml_collections.ConfigDict) -> list[Cell]:
  """The cells of a sweep: a cross around the headline (model, data size) point (see config)."""
  sweep = config.sweep
  models = parse_models(sweep.models)
  sizes = _ints(sweep.data_sizes, "sweep.data_sizes")
  seeds = _ints(sweep.seeds, "sweep.seeds")
  objectives = _objectives(sweep.objectives, "sweep.objectives")
  if sweep.axis_objectives:
    axis_objectives = _objectives(sweep.axis_objectives, "sweep.axis_objectives")
    if SINGLE in axis_objectives:
      raise SweepError("sweep.axis_objectives: single-task cells run only at the headline point")
  else:
    axis_objectives = [o for o in objectives if o != SINGLE]
  by_name = {m.name: m for m in models}
  if sweep.headline_model not in by_name:
    raise SweepError(f"sweep.headline_model={sweep.headline_model!r} is not in sweep.models")
  if sweep.headline_data_size not in sizes:
    raise SweepError(f"sweep.headline_data_size={sweep.headline_data_size} not in data_sizes")
  head_model = by_name[sweep.headline_model]
  points = [(m, sweep.headline_data_size) for m in models]
  points += [(head_model, n) for n in sizes if n != sweep.headline_data_size]
  tasks = sweep_tasks(config)
  cells = []
  for model, size in points:
    headline = model is head_model and size == sweep.headline_data_size
    for objective in objectives if headline else axis_objectives:
      for seed in seeds if headline else seeds[:1]:
        for task in tasks if objective == SINGLE else [""]:
          cells.append(Cell(model, size, objective, seed, task))
  # Most informative first, so that a sweep stopped early has the headline comparison: every
  # objective at the headline point seed by seed, then the axes.
  off_headline = lambda c: (c.model, c.data_size) != (head_model, sweep.headline_data_size)
  return sorted(cells, key=lambda c: (off_headline(c), c.seed, c.objective == SINGLE))


def _minilm_dir(layers: int, seed: int, root: Path) -> Path:
  """A truncated MiniLM copy (fresh head from `seed`) under root, written once."""
  from jaxpref.models import hf_io, minilm

  out = root / "models" / f"minilm{layers}-s{seed}"
  if not (out / "config.json").is_file():
    cfg, params = minilm.load_minilm(num_layers=layers, head_seed=seed)
    hf_io.save_hf(out, cfg, params, tokenizer=minilm.minilm_path(), strict=False)
  return out


def cell_config(config: ml_collections.ConfigDict, cell: Cell, root: Path):
  """The training config of one cell."""
  c = copy.deepcopy(config.base)
  c.unlock()
  spec = cell.model
  if spec.family == "decoder":
    h, layers, heads, ff = spec.dims
    c.model.hidden_size, c.model.num_layers = h, layers
    c.model.num_heads, c.model.intermediate_size = heads, ff
  else:
    path = str(_minilm_dir(spec.dims[0], cell.seed, root))
    c.model.path, c.data.tokenizer = path, path
    c.train.learning_rate = config.sweep.minilm_learning_rate
  c.data.resampling_size = cell.data_size
  c.loss.kind = OBJECTIVE_LOSS[cell.objective]
  c.train.seed = cell.seed
  # Tasks are selected after reading, so this works for one file per task and for a file that
  # holds several (and for sweep.tasks naming only some of the files' tasks).
  c.data.tasks = cell.task or ",".join(sweep_tasks(config))
  if cell.task:
    # Same items per task per step as in the multi-task runs.
    c.train.batch_size = max(1, config.base.train.batch_size // len(sweep_tasks(config)))
  return c


def run_cell(config: ml_collections.ConfigDict, cell: Cell, root: Path) -> dict[str, Any]:
  """Trains one cell (unless done) and returns its row (see `_row`)."""
  from jaxpref.training import trainer
  from jaxpref.training import workdir as workdir_lib

  workdir = root / "cells" / cell.name
  if not (workdir / REPORTS).is_file():
    c = cell_config(config, cell, root)
    final: dict[str, Any] = {}
    start = time.perf_counter()
    result = trainer.train_and_evaluate(c, workdir, on_final_eval=final.update)
    wall = time.perf_counter() - start
    if result["step"] < c.train.steps:
      raise SweepStopped(f"{cell.name} stopped at step {result['step']}; rerun to resume")
    if not final:
      raise SweepError(f"{cell.name}: no final evaluation; check base.data.eval_fraction > 0")
    reliability = {task: report["reliability"] for task, report in final.items()}
    (workdir / REPORTS).write_text(json.dumps({"wall_s": wall, "reliability": reliability}))
    if not config.sweep.keep_checkpoints:
      shutil.rmtree(workdir_lib.checkpoint_dir(workdir), ignore_errors=True)
  return _row(cell, workdir, root)


def _row(cell: Cell, workdir: Path, root: Path) -> dict[str, Any]:
  """One results.json row: the cell, its per-task final metrics and reliability bins."""
  import jax
  import numpy as np

  from jaxpref.models import reward_model
  from jaxpref.training import workdir as workdir_lib

  evals = json.loads((workdir / "eval_final.json").read_text())
  extra = json.loads((workdir / REPORTS).read_text())
  per_task: dict[str, dict[str, float]] = {}
  for key, value in evals.items():
    _, task, metric = key.split("/", 2)
    if task != "all":
      per_task.setdefault(task, {})[metric] = value
  abstract = reward_model.abstract_params(workdir_lib.read_model_config(workdir))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  return {
    "cell": cell.name,
    "model": cell.model.name,
    "n_params": n_params,
    "data_size": cell.data_size,
    "objective": cell.objective,
    "seed": cell.seed,
    "task": cell.task,
    "wall_s": extra["wall_s"],
    "eval": per_task,
    "reliability": extra["reliability"],
    "workdir": workdir.relative_to(root).as_posix(),
  }


def portable(value: Any, prefixes: dict[str, str]) -> Any:
  """`value` (nested dicts / lists / strings) with the folders of `prefixes` replaced by labels.

  Wherever a string names a path under a folder (also inside comma-separated lists and error
  messages) the folder becomes its label; the label "" makes such paths relative to the folder,
  and a string that is the folder itself becomes the label or ".". This keeps machine-specific
  absolute paths out of results.json.
  """
  if isinstance(value, dict):
    return {k: portable(v, prefixes) for k, v in value.items()}
  if isinstance(value, list):
    return [portable(v, prefixes) for v in value]
  if isinstance(value, str):
    # Longest prefix first: the sweep dir may lie inside the shared folder, or the other way.
    for prefix in sorted(prefixes, key=len, reverse=True):
      label = prefixes[prefix]
      if value == prefix:
        return label or "."
      value = value.replace(prefix + "/", f"{label}/" if label else "")
  return value


def run_sweep(
  config: ml_collections.ConfigDict, workdir: str | Path, *, train: bool = True
) -> dict[str, Any]:
  """Runs (or resumes) every cell, then writes results.json, results.md and plots.

  With train=False only finished cells are reported (the others are listed as `pending`).
  """
  root = Path(workdir).absolute()
  root.mkdir(parents=True, exist_ok=True)
  cells = plan(config)
  start = time.perf_counter()
  rows, ran, failed, pending = [], 0, [], []
  for k, cell in enumerate(cells):
    done = (root / "cells" / cell.name / REPORTS).is_file()
    if not done and not train:
      pending.append(cell.name)
      continue
    print(f"[{k + 1}/{len(cells)}] {cell.name}{' (done, skipped)' if done else ''}", flush=True)
    try:
      rows.append(run_cell(config, cell, root))
    except SweepStopped:
      raise
    except Exception as e:  # One broken cell should not lose the rest of a long sweep.
      print(f"cell {cell.name} failed: {type(e).__name__}: {e}", flush=True)
      failed.append({"cell": cell.name, "error": f"{type(e).__name__}: {e}"})
      continue
    ran += not done
  results = {
    "cells": rows,
    "ran": ran,
    "skipped": len(cells) - ran - len(failed) - len(pending),
    "failed": failed,
    "pending": pending,
    "sweep_wall_s": time.perf_counter() - start,
    "config": json.loads(config.to_json_best_effort()),
  }
  prefixes = dict.fromkeys(_spellings(str(root)), "")
  if config.sweep.shared_root:
    prefixes.update(dict.fromkeys(_spellings(config.sweep.shared_root), "<shared>"))
  results = portable(results, prefixes)
  (root / "results.json").write_text(json.dumps(results, indent=1, default=float))
  write_report(results, root)
  return results


def _spellings(path: str) -> set[str]:
  """A folder as written and as resolved (they differ through symlinks or `..`)."""
  return {os.path.normpath(path), str(Path(path).resolve())}


def main(argv):
  del argv
  import jax
  from absl import flags

  workdir = flags.FLAGS.workdir
  if not jax.config.jax_compilation_cache_dir:
    # Cells differing only in seed or task compile the very same programs: compile them once.
    jax.config.update("jax_compilation_cache_dir", str(Path(workdir).absolute() / "jax_cache"))
  results = run_sweep(flags.FLAGS.config, workdir, train=not flags.FLAGS.report_only)
  print(
    f"{results['ran']} cells run, {results['skipped']} skipped, {len(results['failed'])} failed "
    f"in {results['sweep_wall_s']:.0f} s; results in {workdir}"
  )


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Sweep config file (`path[:variant]`).")
  flags.DEFINE_string("workdir", None, "Sweep directory (cells, results, plots).")
  flags.DEFINE_bool("report_only", False, "Only tabulate and plot the cells already finished.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
