"""Every script in benchmarks/ runs with `--smoke --json OUT` and writes the keys it documents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# script -> (keys the JSON must have, needs the shared data)
EXPECTED = {
  "train_throughput.py": (
    {"sides", "ratio_tokens_per_s", "real_tokens", "max_abs_loss_diff_vs_torch", "rounds"},
    True,
  ),
  "scoring_throughput.py": (
    {"rows", "ratio_vs_transformers_input_order", "max_abs_reward_diff"},
    True,
  ),
  "memory_plan.py": ({"rows", "seq_len", "global_batch"}, False),
  "more_overhead.py": ({"step_ms_median", "ratio_more_over_multitask"}, False),
  "calibration_throughput.py": ({"rows", "pairs"}, False),
  "data_throughput.py": ({"rows", "items_per_task"}, True),
  "device_throughput.py": ({"sides", "real_tokens", "attention", "model_flops", "torch"}, False),
  "shared_prompts.py": ({"files", "max_length"}, True),
}
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


def test_every_script_is_listed():
  assert set(SCRIPTS) == set(EXPECTED), "add new benchmark scripts to EXPECTED"


# more_overhead's and train_throughput's smoke runs are slow (several sides compiled and timed in
# subprocesses); their step is the trainer's, exercised by every training test, and
# device_throughput's smoke run (by default) times the same step against PyTorch.
SLOW_SCRIPTS = {"more_overhead.py", "train_throughput.py"}


@pytest.mark.parametrize(
  "script",
  [pytest.param(s, marks=pytest.mark.slow) if s in SLOW_SCRIPTS else s for s in SCRIPTS],
)
def test_smoke(script, tmp_path):
  keys, needs_data = EXPECTED.get(script, (set(), False))
  if needs_data and not SHARED_DATA.is_dir():
    pytest.skip(f"shared data not found at {SHARED_DATA}")
  out = tmp_path / "out.json"
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert isinstance(result, dict) and result
  assert keys <= set(result), f"missing keys {keys - set(result)}"
  if script == "train_throughput.py":
    # Same weights, batches and updates on every side: the losses must agree.
    assert max(result["max_abs_loss_diff_vs_torch"].values()) < 1e-3
    assert all(row["real_tokens_per_s"] > 0 for row in result["sides"].values())
    packed, padded = result["sides"]["jaxpref packed"], result["sides"]["jaxpref buckets"]
    assert packed["positions"] <= padded["positions"]
  if script == "device_throughput.py":
    # Both sides ran (the PyTorch one on the CPU in --smoke) and trained on the same real tokens.
    assert set(result["sides"]) == {"jaxpref", "PyTorch"} and result["attention"] == "blocked"
    assert all(row["real_tokens_per_s"] > 0 for row in result["sides"].values())
    assert result["ratio_tokens_per_s"] > 0 and result["model_flops"] > 0
  if script == "scoring_throughput.py":
    assert result["max_abs_reward_diff"] < 1e-4
  if script == "shared_prompts.py":
    helpful = result["files"]["helpful"]
    assert helpful["shared_tokens"] < helpful["real_tokens"]
    assert helpful["shared_packed_positions"] <= helpful["packed_positions"]
  if script == "memory_plan.py":
    row = result["rows"][0]
    assert row["optimizer_per_device"] == 2 * row["params_per_device"]
    # pythia-1.4b without its LM head is ~1.31B parameters.
    assert 1.2e9 < row["num_params"] < 1.45e9


def test_best_of_n_smoke(tmp_path):
  if not SHARED_DATA.is_dir():
    pytest.skip(f"shared data not found at {SHARED_DATA}")
  out = tmp_path / "out.json"
  script = ROOT / "benchmarks" / "scoring_throughput.py"
  proc = subprocess.run(
    [sys.executable, str(script), "--smoke", "--best_of_n", "4", "--json", str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert {r["scorer"].split(" (")[0] for r in rows} == {"jaxpref Scorer", "transformers"}
  assert all(r["max_abs_reward_diff"] < 1e-4 for r in rows)
