"""The sweeps: cell planning, single-task cells of a one-file multi-task set, the smoke sweep end
to end on real data (portable results.json, resuming)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from jaxpref.data import reader, splits
from jaxpref.data.records import group_by_task
from jaxpref.experiments import report, scaling, sweep_config
from jaxpref.training import config as train_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "experiments"
DSP_TASKS = {"dsp_academy", "dsp_business", "dsp_entertainment", "dsp_literature"}


def _config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.lock()
  return config


@pytest.mark.parametrize("name", ["cpu_scaling", "cpu_domains"])
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_configs_load_locked_with_every_sweep_key_and_plan(name, arg):
  config = _config(name, arg)
  assert set(config.sweep) == set(sweep_config.base_sweep_config())
  assert set(config.base) == set(train_config.base_config())
  cells = scaling.plan(config)
  assert len({c.name for c in cells}) == len(cells)
  assert {c.objective for c in cells} == {"single", "multitask", "more"}


def test_cpu_scaling_plan_is_a_cross_around_the_headline_point():
  cells = scaling.plan(_config("cpu_scaling"))
  # Headline minilm2 @ 2000: (multitask, more) x 3 seeds + single (3 tasks x 3 seeds); axes
  # dec and minilm6 @ 2000 and minilm2 @ 100 with multitask (sweep.axis_objectives), seed 0.
  assert len(cells) == 6 + 9 + 3
  headline = [c for c in cells if (c.model.name, c.data_size) == ("minilm2", 2000)]
  assert cells[: len(headline)] == headline  # The headline comparison runs first, seed by seed.
  assert [c.seed for c in headline] == sorted(c.seed for c in headline)
  assert {(c.model.name, c.data_size, c.objective, c.seed) for c in cells[len(headline) :]} == {
    ("dec", 2000, "multitask", 0),
    ("minilm6", 2000, "multitask", 0),
    ("minilm2", 100, "multitask", 0),
  }
  assert {c.task for c in cells if c.objective == "single"} == {"helpful", "harmless", "webgpt"}


def test_cpu_domains_plan_has_four_tasks_and_a_multitask_size_axis():
  cells = scaling.plan(_config("cpu_domains"))
  # Headline minilm2: (multitask, more) x 3 seeds + 4 domains x 3 seeds; then dec, minilm4,
  # minilm6 with multitask only (sweep.axis_objectives).
  assert len(cells) == 6 + 12 + 3
  assert {c.task for c in cells if c.objective == "single"} == DSP_TASKS
  axis = [c for c in cells if c.model.name != "minilm2"]
  assert {(c.model.name, c.objective, c.seed) for c in axis} == {
    (m, "multitask", 0) for m in ("dec", "minilm4", "minilm6")
  }
  assert [c.model.dims for c in axis if c.model.family == "minilm"] == [(4,), (6,)]


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("models", "x=decoder:1:2", "sweep.models"),
    ("models", "m=minilm:7", "sweep.models"),
    ("objectives", "single,dpo", "sweep.objectives"),
    ("axis_objectives", "single", "sweep.axis_objectives"),
    ("headline_model", "nope", "sweep.headline_model"),
  ],
)
def test_bad_sweep_keys_are_named(key, value, match):
  config = _config("cpu_domains")
  config.sweep[key] = value
  with pytest.raises(scaling.SweepError, match=match):
    scaling.plan(config)


@pytest.mark.parametrize("text", ["x=decoder:1:2", "=minilm:2", "m=gpt:2", "m=minilm:two", ""])
def test_bad_model_specs_name_the_key(text):
  with pytest.raises(scaling.SweepError, match="sweep.models"):
    scaling.parse_models(text)


def test_single_task_cells_select_their_task_with_a_share_of_the_batch(tmp_path):
  config = _config("cpu_scaling", "smoke")
  cell = next(c for c in scaling.plan(config) if c.task == "webgpt")
  c = scaling.cell_config(config, cell, tmp_path)
  assert c.data.files == config.base.data.files  # Selected after reading, by `data.tasks`.
  assert c.data.tasks == "webgpt"
  assert c.train.batch_size == config.base.train.batch_size // 3
  assert c.loss.kind == "ranking"
  assert c.data.resampling_size == 48
  multitask = next(c for c in scaling.plan(config) if c.objective == "multitask")
  assert scaling.cell_config(config, multitask, tmp_path).data.tasks == "helpful,harmless,webgpt"


def test_portable_rewrites_path_prefixes_only():
  prefixes = {"/tmp/sweep": "", "/data/shared": "<shared>"}
  value = {
    "files": "/data/shared/a.json,/data/shared/b.json",
    "w": ["/tmp/sweep/cells/x", "/tmp/sweep", "/tmp/sweeps/y", "/data/shared_other/z"],
    "n": 3,
  }
  assert scaling.portable(value, prefixes) == {
    "files": "<shared>/a.json,<shared>/b.json",
    "w": ["cells/x", ".", "/tmp/sweeps/y", "/data/shared_other/z"],
    "n": 3,
  }


def test_mean_std_is_the_sample_std():
  m, s, n = report.mean_std([0.5, 0.7, 0.9])
  assert (n, round(m, 6), round(s, 6)) == (3, 0.7, 0.2)


def _strings(value):
  if isinstance(value, dict):
    for v in value.values():
      yield from _strings(v)
  elif isinstance(value, list):
    for v in value:
      yield from _strings(v)
  elif isinstance(value, str):
    yield value


def test_dsp_sweep_tasks_are_the_tasks_of_the_file(preferences_dir):
  items, summary = reader.read_preferences(
    preferences_dir / "domain_specific.json", on_error="skip", task="dsp"
  )
  assert set(group_by_task(items)) == set(scaling.sweep_tasks(_config("cpu_domains"))) == DSP_TASKS
  assert summary.skipped_by_reason == {"duplicate_text": 144, "empty_text": 4}


def test_single_task_cell_of_a_one_file_set_trains_only_its_task(tmp_path, preferences_dir):
  config = _config("cpu_domains", "smoke")
  cell = next(c for c in scaling.plan(config) if c.task == "dsp_business")
  row = scaling.run_cell(config, cell, tmp_path)
  assert set(row["eval"]) == {"dsp_business"} and set(row["reliability"]) == {"dsp_business", "all"}
  # Its held-out pairs are exactly the business pairs of the prompt-hash split, counted here.
  items, _ = reader.read_preferences(
    preferences_dir / "domain_specific.json", on_error="skip", task="dsp"
  )
  business = [i for i in items if i.task == "dsp_business"]
  _, held_out = splits.split_items(business, config.base.data.eval_fraction, seed=0)
  assert row["eval"]["dsp_business"]["n_pairs"] == len(held_out) > 0
  for line in (tmp_path / row["workdir"] / "metrics.jsonl").read_text().splitlines():
    tasks = {k.split("/")[1] for k in json.loads(line) if k.count("/") >= 1}
    assert tasks <= {"dsp_business", "all"}, tasks
  # The MiniLM cell ran the truncated pretrained encoder: 1 layer in the smoke variant.
  model_cfg = json.loads((tmp_path / row["workdir"] / "model_config.json").read_text())
  assert model_cfg["num_layers"] == 1 and model_cfg["arch"] == "bert"
  assert not (tmp_path / row["workdir"] / "checkpoints").exists()  # sweep.keep_checkpoints


def test_smoke_sweep_writes_portable_results_and_resumes(tmp_path, shared_dir):
  config = _config("cpu_scaling", "smoke")
  results = scaling.run_sweep(config, tmp_path)
  assert results["ran"] == 5 and results["skipped"] == 0 and not results["failed"]
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert len(on_disk["cells"]) == 5
  # No machine-specific absolute paths: cells relative to the sweep, data under <shared>.
  text = (tmp_path / "results.json").read_text()
  assert str(tmp_path) not in text and str(shared_dir.resolve()) not in text
  assert not [s for s in _strings(on_disk) if s.startswith("/")]
  assert on_disk["config"]["base"]["data"]["files"].startswith("<shared>/data/preferences/")
  for row in on_disk["cells"]:
    assert row["workdir"] == f"cells/{row['cell']}"
    # Each row's numbers are the cell's own eval_final.json, read independently here.
    evals = json.loads((tmp_path / row["workdir"] / "eval_final.json").read_text())
    for task, metrics in row["eval"].items():
      assert metrics["accuracy"] == evals[f"eval/{task}/accuracy"]
      assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n_pairs"] > 0
    assert set(row["eval"]) == ({row["task"]} if row["task"] else {"helpful", "harmless", "webgpt"})
    # Reliability bins from the trainer hook: each bin count sums to both orders of every pair.
    total = sum(m["n_pairs"] for m in row["eval"].values())
    assert set(row["reliability"]) == set(row["eval"]) | {"all"}
    for task, bins in row["reliability"].items():
      assert sum(bins["count"]) == 2 * (total if task == "all" else row["eval"][task]["n_pairs"])
  # MORE weights in metrics.jsonl are a distribution over the 3 tasks.
  more = next(r for r in on_disk["cells"] if r["objective"] == "more")
  for line in (tmp_path / more["workdir"] / "metrics.jsonl").read_text().splitlines():
    weights = [v for k, v in json.loads(line).items() if k.startswith("task_weight/")]
    if weights:
      assert len(weights) == 3 and math.isclose(sum(weights), 1.0, abs_tol=1e-4)
  md = (tmp_path / "results.md").read_text()
  multitask = next(r for r in on_disk["cells"] if r["objective"] == "multitask")
  assert f"| dec16 | {multitask['n_params']:,} | 48 | multitask | 1 | " in md
  assert f"{multitask['eval']['webgpt']['accuracy']:.3f}" in md
  worst = min(m["accuracy"] for m in multitask["eval"].values())
  assert f"| {sum(m['accuracy'] for m in multitask['eval'].values()) / 3:.3f} | {worst:.3f} |" in md
  for name in ("ece_vs_model_size", "accuracy_vs_data_size", "more_lambdas", "reliability"):
    assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000

  stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("cells/*/eval_final.json")}
  again = scaling.run_sweep(config, tmp_path)
  assert again["ran"] == 0 and again["skipped"] == 5
  assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("cells/*/eval_final.json")} == stamps
  assert [r["eval"] for r in again["cells"]] == [r["eval"] for r in on_disk["cells"]]
  # A cell without its reports.json (the last file a cell writes) is not done: it runs again.
  (tmp_path / on_disk["cells"][0]["workdir"] / "reports.json").unlink()
  third = scaling.run_sweep(config, tmp_path, train=False)
  assert third["pending"] == [on_disk["cells"][0]["cell"]] and third["skipped"] == 4
