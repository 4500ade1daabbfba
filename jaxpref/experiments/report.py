"""Tables and plots of a `jaxpref.experiments.scaling` sweep (results.md and plots/*.png)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from jaxpref.evaluation import plots

OBJECTIVE_ORDER = ("single", "multitask", "more")


def _tasks(rows: list[dict[str, Any]]) -> list[str]:
  return list(dict.fromkeys(t for r in rows for t in r["eval"]))


def group(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, list[float]]]]:
  """{(model, data size, objective): {task: {metric: [value per seed]}}}.

  Single-task cells (one task each) merge into one group per seed, so that every objective has a
  value per task and seed.
  """
  out: dict[tuple, dict[str, dict[str, list[float]]]] = defaultdict(
    lambda: defaultdict(lambda: defaultdict(list))
  )
  for r in sorted(rows, key=lambda r: r["seed"]):
    key = (r["model"], r["data_size"], r["objective"])
    for task, metrics in r["eval"].items():
      for metric, value in metrics.items():
        out[key][task][metric].append(float(value))
  return out


def mean_std(values: list[float]) -> tuple[float, float, int]:
  a = np.asarray(values, dtype=np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a)


def _fmt(values: list[float] | None) -> str:
  if not values:
    return "–"
  m, s, n = mean_std(values)
  return f"{m:.3f} ± {s:.3f}" if n > 1 else f"{m:.3f}"


def _key_order(keys, rows):
  params = {r["model"]: r["n_params"] for r in rows}
  return sorted(keys, key=lambda k: (params[k[0]], k[1], OBJECTIVE_ORDER.index(k[2])))


def markdown(results: dict[str, Any]) -> str:
  """results.md: one table per metric, rows = (model, data size, objective), columns = tasks."""
  rows = results["cells"]
  tasks = _tasks(rows)
  groups = group(rows)
  params = {r["model"]: r["n_params"] for r in rows}
  lines = [
    "# Sweep results",
    "",
    f"{len(rows)} cells ({results['ran']} run now, {results['skipped']} reused"
    f"{', ' + str(len(results.get('pending', []))) + ' pending' if results.get('pending') else ''}"
    f"); this invocation {results['sweep_wall_s']:.0f} s wall, the cells' own train+eval "
    f"{sum(r['wall_s'] for r in rows):.0f} s. Held-out prompt-hash splits; mean ± sample std over "
    "seeds (n = seeds; no ± means one seed).",
    "",
  ]
  # The worst task shows how a shared RM splits conflicting preferences between tasks, which a
  # mean over tasks hides: the lowest accuracy, the highest ECE.
  for metric, label, worst in (("accuracy", "Accuracy", min), ("ece_10", "ECE (10 bins)", max)):
    lines += [
      f"## {label}",
      "",
      "| model | params | data/task | objective | seeds | "
      + " | ".join(tasks)
      + " | mean | worst task |",
      "|" + "---|" * (len(tasks) + 7),
    ]
    for key in _key_order(groups, rows):
      g = groups[key]
      n = max(len(g[t][metric]) for t in g)
      per_seed = [[g[t][metric][s] for t in tasks if len(g[t][metric]) > s] for s in range(n)]
      cells = [_fmt(g[t][metric] if t in g else None) for t in tasks]
      lines.append(
        f"| {key[0]} | {params[key[0]]:,} | {key[1]} | {key[2]} | {n} | "
        + " | ".join(cells)
        + f" | {_fmt([np.mean(v) for v in per_seed])} | {_fmt([worst(v) for v in per_seed])} |"
      )
    lines.append("")
  lines += [
    "Plots: `plots/ece_vs_model_size.png`, `plots/accuracy_vs_data_size.png`, "
    "`plots/more_lambdas.png`, `plots/reliability.png`.",
    "",
  ]
  return "\n".join(lines)


def _line_plot(rows, x_key, fixed_key, fixed_value, metric, path, xlabel, ylabel, log_x=True):
  groups = group([r for r in rows if r[fixed_key] == fixed_value])
  fig = Figure(figsize=(6, 4), layout="constrained")
  ax = fig.add_subplot()
  for objective in OBJECTIVE_ORDER:
    points = []
    for (model, size, obj), g in groups.items():
      if obj != objective:
        continue
      x = next(r[x_key] for r in rows if r["model"] == model and r["data_size"] == size)
      n = max(len(g[t][metric]) for t in g)
      per_seed = [np.mean([g[t][metric][s] for t in g if len(g[t][metric]) > s]) for s in range(n)]
      m, s, _ = mean_std(per_seed)
      points.append((x, m, s))
    if points:
      xs, ms, ss = map(np.asarray, zip(*sorted(points)))
      ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=objective)
  if log_x:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend()
  ax.grid(alpha=0.3)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  return str(path)


def lambda_plot(rows: list[dict[str, Any]], path: Path, root: Path) -> str | None:
  """Per-task MORE weights over training, one panel per MORE cell (from metrics.jsonl).

  A row's `workdir` is relative to the sweep directory `root`.
  """
  more = [r for r in rows if r["objective"] == "more"]
  if not more:
    return None
  fig = Figure(figsize=(4 * min(len(more), 4), 3.2 * ((len(more) + 3) // 4)), layout="constrained")
  for k, r in enumerate(more):
    ax = fig.add_subplot((len(more) + 3) // 4, min(len(more), 4), k + 1)
    series = defaultdict(list)
    for line in (root / r["workdir"] / "metrics.jsonl").read_text().splitlines():
      record = json.loads(line)
      for key, value in record.items():
        if key.startswith("task_weight/"):
          series[key.split("/", 1)[1]].append((record["step"], value))
    for task, points in series.items():
      ax.plot(*zip(*points), label=task)
    ax.set_title(r["cell"], fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("MORE λ")
    if k == 0:
      ax.legend(fontsize=7)
  fig.savefig(path, dpi=100)
  return str(path)


def write_report(results: dict[str, Any], root: Path) -> dict[str, str]:
  """Writes results.md and the plots under root; returns {name: path}."""
  rows = results["cells"]
  config = results["config"]["sweep"]
  plot_dir = root / "plots"
  plot_dir.mkdir(parents=True, exist_ok=True)
  (root / "results.md").write_text(markdown(results))
  out = {"results.md": str(root / "results.md")}
  out["ece_vs_model_size"] = _line_plot(
    rows,
    "n_params",
    "data_size",
    config["headline_data_size"],
    "ece_10",
    plot_dir / "ece_vs_model_size.png",
    "parameters",
    "ECE (mean over tasks)",
  )
  out["accuracy_vs_data_size"] = _line_plot(
    rows,
    "data_size",
    "model",
    config["headline_model"],
    "accuracy",
    plot_dir / "accuracy_vs_data_size.png",
    "training items per task",
    "accuracy (mean over tasks)",
  )
  path = lambda_plot(rows, plot_dir / "more_lambdas.png", root)
  if path:
    out["more_lambdas"] = path
  # Reliability diagrams of the headline point, seed 0: objectives by tasks.
  grid: dict[str, dict[str, Any]] = {}
  for r in rows:
    if (
      r["model"] == config["headline_model"]
      and r["data_size"] == config["headline_data_size"]
      and r["seed"] == min(x["seed"] for x in rows)
    ):
      for task, bins in r["reliability"].items():
        if task != "all" or not r["task"]:
          grid.setdefault(r["objective"], {})[task] = bins
  if grid:
    out["reliability"] = plots.reliability_grid(
      grid,
      plot_dir / "reliability.png",
      title=f"{config['headline_model']}, {config['headline_data_size']} items/task, seed 0",
    )
  return out
