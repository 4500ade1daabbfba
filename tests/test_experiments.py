"""The scaling sweep: cell planning, the smoke sweep end to end on real data, and resuming."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from jaxpref.experiments import report, scaling

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "experiments" / "cpu_scaling.py"
PREFERENCES = ROOT.parent / "shared" / "data" / "preferences"


def _config(arg=None):
  spec = importlib.util.spec_from_file_location("cpu_scaling", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_plan_is_a_cross_around_the_headline_point():
  cells = scaling.plan(_config())
  names = [c.name for c in cells]
  assert len(names) == len(set(names))
  # 3 models at 800 + dec128 at 100 -> 4 points x (multitask, more); 2 more seeds at the headline;
  # single-task (3 tasks x 3 seeds) only at the headline.
  assert len(cells) == 4 * 2 + 2 * 2 + 9
  assert {c.seed for c in cells if c.model.name != "dec128"} == {0}
  assert {c.task for c in cells if c.objective == "single"} == {"helpful", "harmless", "webgpt"}
  assert all(
    c.objective != "single" or (c.model.name, c.data_size) == ("dec128", 800) for c in cells
  )


@pytest.mark.parametrize("text", ["x=decoder:1:2", "=minilm:2", "m=gpt:2", "m=minilm:two", ""])
def test_bad_model_specs_name_the_key(text):
  with pytest.raises(scaling.SweepError, match="sweep.models"):
    scaling.parse_models(text)


def test_single_task_cells_train_one_file_with_a_third_of_the_batch(tmp_path):
  config = _config("smoke")
  cell = next(c for c in scaling.plan(config) if c.task == "webgpt")
  c = scaling.cell_config(config, cell, tmp_path)
  assert Path(c.data.files).name == "webgpt.json"
  assert c.train.batch_size == config.base.train.batch_size // 3
  assert c.loss.kind == "ranking"
  assert c.data.resampling_size == 48


def test_mean_std_is_the_sample_std():
  m, s, n = report.mean_std([0.5, 0.7, 0.9])
  assert (n, round(m, 6), round(s, 6)) == (3, 0.7, 0.2)


@pytest.mark.skipif(
  not (PREFERENCES / "webgpt.json").is_file(),
  reason=f"shared preference data not found under {PREFERENCES}",
)
def test_smoke_sweep_writes_results_and_resumes(tmp_path):
  config = _config("smoke")
  results = scaling.run_sweep(config, tmp_path)
  assert results["ran"] == 5 and results["skipped"] == 0 and not results["failed"]
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert len(on_disk["cells"]) == 5
  for row in on_disk["cells"]:
    # Each row's numbers are the cell's own eval_final.json, read independently here.
    evals = json.loads((Path(row["workdir"]) / "eval_final.json").read_text())
    for task, metrics in row["eval"].items():
      assert metrics["accuracy"] == evals[f"eval/{task}/accuracy"]
      assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n_pairs"] > 0
    assert set(row["eval"]) == ({row["task"]} if row["task"] else {"helpful", "harmless", "webgpt"})
  # MORE weights in metrics.jsonl are a distribution over the 3 tasks.
  more = next(r for r in on_disk["cells"] if r["objective"] == "more")
  for line in (Path(more["workdir"]) / "metrics.jsonl").read_text().splitlines():
    weights = [v for k, v in json.loads(line).items() if k.startswith("task_weight/")]
    if weights:
      assert len(weights) == 3 and math.isclose(sum(weights), 1.0, abs_tol=1e-4)
  md = (tmp_path / "results.md").read_text()
  multitask = next(r for r in on_disk["cells"] if r["objective"] == "multitask")
  assert f"| dec16 | {multitask['n_params']:,} | 48 | multitask | 1 | " in md
  assert f"{multitask['eval']['webgpt']['accuracy']:.3f}" in md
  for name in ("ece_vs_model_size", "accuracy_vs_data_size", "more_lambdas", "reliability"):
    assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000

  stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("cells/*/eval_final.json")}
  again = scaling.run_sweep(config, tmp_path)
  assert again["ran"] == 0 and again["skipped"] == 5
  assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("cells/*/eval_final.json")} == stamps
  assert [r["eval"] for r in again["cells"]] == [r["eval"] for r in on_disk["cells"]]
