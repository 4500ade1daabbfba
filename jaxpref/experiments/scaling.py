"""A resumable sweep of reward-model training: model size x data size x objective x seed.

  python -m jaxpref.experiments.scaling --config=configs/experiments/cpu_scaling.py --workdir=DIR

Each cell is one `jaxpref.trainer.train_and_evaluate` run in DIR/cells/<name>; a cell whose
eval_final.json exists is skipped, so an interrupted sweep picks up where it stopped. The sweep
then writes DIR/results.json (one row per cell), DIR/results.md (accuracy and ECE per task, mean
± std over seeds) and plots under DIR/plots/.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import ml_collections

SINGLE = "single"
OBJECTIVE_LOSS = {SINGLE: "ranking", "multitask": "multitask", "more": "more"}


class SweepError(ValueError):
  """A sweep config that cannot run; the message names the key."""


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


def task_files(base: ml_collections.ConfigDict) -> dict[str, str]:
  """{task name: file} of the base config (task = file stem)."""
  return {Path(f).stem: f for f in base.data.files.split(",") if f}


def plan(config: ml_collections.ConfigDict) -> list[Cell]:
  """The cells of a sweep: a cross around the headline (model, data size) point (see config)."""
  sweep = config.sweep
  models = parse_models(sweep.models)
  sizes = _ints(sweep.data_sizes, "sweep.data_sizes")
  seeds = _ints(sweep.seeds, "sweep.seeds")
  objectives = [o.strip() for o in sweep.objectives.split(",") if o.strip()]
  for o in objectives:
    if o not in OBJECTIVE_LOSS:
      raise SweepError(f"sweep.objectives: unknown {o!r}; choose from {sorted(OBJECTIVE_LOSS)}")
  by_name = {m.name: m for m in models}
  if sweep.headline_model not in by_name:
    raise SweepError(f"sweep.headline_model={sweep.headline_model!r} is not in sweep.models")
  if sweep.headline_data_size not in sizes:
    raise SweepError(f"sweep.headline_data_size={sweep.headline_data_size} not in data_sizes")
  head_model = by_name[sweep.headline_model]
  points = [(m, sweep.headline_data_size) for m in models]
  points += [(head_model, n) for n in sizes if n != sweep.headline_data_size]
  tasks = list(task_files(config.base))
  cells = []
  for model, size in points:
    headline = model is head_model and size == sweep.headline_data_size
    for objective in objectives:
      if objective == SINGLE and not headline:
        continue
      for seed in seeds if headline else seeds[:1]:
        for task in tasks if objective == SINGLE else [""]:
          cells.append(Cell(model, size, objective, seed, task))
  # Most informative first, so that a sweep stopped early has the headline comparison.
  return sorted(cells, key=lambda c: (c.objective == SINGLE, c.seed))


def _minilm_dir(layers: int, seed: int, root: Path) -> Path:
  """A truncated MiniLM copy (fresh head from `seed`) under root, written once."""
  from jaxpref.models import bert, hf_io

  out = root / "models" / f"minilm{layers}-s{seed}"
  if not (out / "config.json").is_file():
    cfg, params = bert.load_minilm(num_layers=layers, head_seed=seed)
    hf_io.save_hf(out, cfg, params, tokenizer=bert.minilm_path(), strict=False)
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
  if cell.task:
    c.data.files = task_files(config.base)[cell.task]
    # Same items per task per step as in the multi-task runs.
    c.train.batch_size = max(1, config.base.train.batch_size // len(task_files(config.base)))
  return c


def run_cell(config: ml_collections.ConfigDict, cell: Cell, root: Path) -> dict[str, Any]:
  """Trains one cell (unless done) and returns its row; reliability bins are kept in the cell."""
  from jaxpref import evaluation, trainer

  workdir = root / "cells" / cell.name
  reports_path = workdir / "reports.json"
  if not (workdir / "eval_final.json").is_file():
    c = cell_config(config, cell, root)
    start = time.perf_counter()
    captured = {}
    with _capture_reports(evaluation, captured):
      trainer.train_and_evaluate(c, workdir)
    wall = time.perf_counter() - start
    bins = {t: r["reliability"] for t, r in captured["reports"].items()}
    reports_path.write_text(json.dumps({"wall_s": wall, "reliability": bins}, default=float))
  return _row(cell, workdir)


@contextlib.contextmanager
def _capture_reports(evaluation_module, captured: dict[str, Any]):
  """Keeps the full reports (with reliability bins) of the trainer's final evaluation.

  The trainer logs only scalars; scoring the held-out sets again would re-read and re-tokenise
  every file, so the evaluator class it builds is swapped for one that remembers its reports.
  """
  original = evaluation_module.TrainEvaluator

  class Capturing(original):
    def reports(self, params):
      captured["reports"] = super().reports(params)
      return captured["reports"]

  evaluation_module.TrainEvaluator = Capturing
  try:
    yield
  finally:
    evaluation_module.TrainEvaluator = original


def _model_cfg(workdir: Path):
  from jaxpref import checkpointing

  return checkpointing.read_model_config(workdir)


def _row(cell: Cell, workdir: Path) -> dict[str, Any]:
  evals = json.loads((workdir / "eval_final.json").read_text())
  extra = json.loads((workdir / "reports.json").read_text())
  per_task: dict[str, dict[str, float]] = {}
  for key, value in evals.items():
    _, task, metric = key.split("/", 2)
    if task != "all":
      per_task.setdefault(task, {})[metric] = value
  cfg = _model_cfg(workdir)
  import jax
  import numpy as np

  from jaxpref.models import reward_model

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(reward_model.abstract_params(cfg)))
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
    "workdir": str(workdir),
  }


from jaxpref.experiments.report import write_report  # noqa: E402


def run_sweep(
  config: ml_collections.ConfigDict, workdir: str | Path, *, train: bool = True
) -> dict[str, Any]:
  """Runs (or resumes) every cell, then writes results.json, results.md and plots.

  With train=False only finished cells are reported (the others are counted as `pending`).
  """
  root = Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  cells = plan(config)
  start = time.perf_counter()
  rows, ran, failed, pending = [], 0, [], []
  for k, cell in enumerate(cells):
    done = (root / "cells" / cell.name / "eval_final.json").is_file()
    if not done and not train:
      pending.append(cell.name)
      continue
    print(f"[{k + 1}/{len(cells)}] {cell.name}{' (done, skipped)' if done else ''}", flush=True)
    try:
      rows.append(run_cell(config, cell, root))
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
    "sweep_wall_s": time.perf_counter() - start,
    "config": json.loads(config.to_json_best_effort()),
  }
  (root / "results.json").write_text(json.dumps(results, indent=1, default=float))
  write_report(results, root)
  return results


def main(argv):
  del argv
  from absl import flags

  workdir = flags.FLAGS.workdir
  results = run_sweep(flags.FLAGS.config, workdir, train=not flags.FLAGS.report_only)
  print(
    f"{results['ran']} cells run, {results['skipped']} skipped in "
    f"{results['sweep_wall_s']:.0f} s; results in {workdir}"
  )


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Sweep config file (`path[:variant]`).")
  flags.DEFINE_string("workdir", None, "Sweep directory (cells, results, plots).")
  flags.DEFINE_bool("report_only", False, "Only tabulate and plot the cells already finished.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
