"""`python -m jaxpref.aot` on 8 forced CPU devices: the memory plan's numbers add up."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxpref import aot

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny_overrides() -> list[str]:
  # Small shapes with sizes that 8 divides, so every 2-d weight is split over fsdp.
  return [
    "--config.model.vocab_size=512",
    "--config.model.hidden_size=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=4",
    "--config.model.intermediate_size=64",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=8",
    "--config.data.max_length=32",
    "--config.train.batch_size=8",
  ]


@pytest.fixture(scope="module")
def aot_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("aot") / "plan.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxpref.aot",
      f"--config={REPO_ROOT / 'configs' / 'tiny.py'}",
      "--topology=v4-8",
      "--num_cpu_devices=8",
      f"--json_out={out}",
      *_tiny_overrides(),
    ],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc


def _independent_param_count() -> int:
  from jaxpref.models import reward_model
  from jaxpref.models.config import ModelConfig

  cfg = ModelConfig(
    arch="gpt_neox",
    vocab_size=512,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    rotary_pct=0.25,
    max_position_embeddings=2048,
    pooling="last",
  )
  abstract = jax.eval_shape(lambda: reward_model.init_params(cfg, jax.random.PRNGKey(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))


def test_fsdp_bytes_add_up(aot_run):
  result, _ = aot_run
  assert result["num_devices"] == 8 and result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert result["param_count"] == _independent_param_count()
  assert result["param_bytes_total"] == 4 * result["param_count"]  # float32 parameters.
  # fsdp splits the weights 8 ways; only small 1-d leaves (biases, norms) stay whole.
  per_device_x8 = result["param_bytes_per_device"] * 8
  assert result["param_bytes_total"] <= per_device_x8 < 1.1 * result["param_bytes_total"]
  # AdamW keeps two moments per parameter, sharded like it (plus a few scalar counts).
  assert abs(result["opt_state_bytes_per_device"] - 2 * result["param_bytes_per_device"]) < 1024
  # The compiled step's inputs hold (at least) this device's params and moments; the donated state
  # is aliased to the outputs.
  state_bytes = result["param_bytes_per_device"] + result["opt_state_bytes_per_device"]
  assert result["argument_bytes"] >= state_bytes
  assert result["alias_bytes"] >= state_bytes
  assert result["temp_bytes"] > 0


@pytest.mark.skipif(aot.libtpu_available(), reason="libtpu is installed here")
def test_libtpu_absent_says_exactly_one_line(aot_run):
  _, proc = aot_run
  lines = [ln for ln in proc.stderr.splitlines() if "libtpu" in ln]
  assert lines == [aot.LIBTPU_MISSING.format(n=8)]
  assert lines[0].startswith("jaxpref.aot: libtpu is not importable")


def test_topology_devices():
  assert aot.topology_devices("v4-8") == 8  # one device per TensorCore
  assert aot.topology_devices("v5e:2x4") == aot.topology_devices("v5e-8") == 8
  assert aot.topology_devices("v5litepod-16") == 16
  assert aot.topology_devices("v5p-8") == aot.topology_devices("v5p:2x2x1") == 4  # megacore
  assert aot.topology_devices("tpu7x") is None
  assert aot.tpu_topology("v5e-8") == "v5e:2x4" and aot.tpu_topology("v5p-16") == "v5p:2x2x2"
  assert aot.tpu_topology("v4-8") == "v4-8"


def test_cost_and_roofline_fields(aot_run):
  """XLA's cost with every layer counted, the model FLOPs, and the roofline of the stand-in's chip
  (v4-8: one TensorCore, half a v4 chip, per device)."""
  from jaxpref.models.config import ModelConfig
  from jaxpref.training import flops, roofline

  result, proc = aot_run
  assert result["attention"] == "blocked"  # auto on the CPU stand-in
  # Packed rows with shared prompts, the trainer's default: one row per response at most.
  assert result["batch"] == "packed [16, 32]"
  cfg = ModelConfig(
    arch="gpt_neox", vocab_size=512, hidden_size=32, num_layers=2, num_heads=4,
    intermediate_size=64, rotary_pct=0.25,
  )  # fmt: skip
  model_total = flops.train_flops(cfg, [32] * (8 * 2))
  assert result["model_flops_total"] == pytest.approx(model_total)
  assert result["model_flops"] == pytest.approx(model_total / 8)
  # The compiled step does at least the model's work (blocked attention computes whole blocks)
  # and not wildly more; the loop-once count of the scanned program is smaller.
  assert 1.0 <= result["xla_to_model_flops"] < 2.5
  assert result["xla_to_model_flops"] == pytest.approx(result["xla_flops"] / result["model_flops"])
  assert result["xla_flops_loop_once"] < result["xla_flops"]
  v4 = roofline.CHIPS["v4"]
  assert result["chip"] == "TPU v4" and result["peak_flops"] == v4.peak_flops / 2
  assert result["hbm_bandwidth"] == v4.hbm_bandwidth / 2
  compute_s = result["xla_flops"] / result["peak_flops"]
  memory_s = result["xla_bytes_accessed"] / result["hbm_bandwidth"]
  assert result["roofline_compute_s"] == pytest.approx(compute_s)
  assert result["roofline_memory_s"] == pytest.approx(memory_s)
  assert result["roofline_step_s"] == pytest.approx(max(compute_s, memory_s))
  assert result["bound"] == ("compute" if compute_s > memory_s else "memory")
  mfu = result["model_flops"] / result["peak_flops"] / result["roofline_step_s"]
  assert result["mfu_at_roofline"] == pytest.approx(mfu)
  assert "cpu compiler" in result["note"]
  for row in ("| XLA / model FLOPs |", "| roofline step time |", "| MFU at the roofline |"):
    assert row in proc.stdout


def test_roofline_estimate_and_chip_names():
  from jaxpref.training import roofline

  chip = roofline.Chip("test", peak_flops=100.0, hbm_bandwidth=10.0, hbm_bytes=1.0, cores=2)
  r = roofline.estimate(chip, xla_flops=300.0, xla_bytes=20.0, model_flops=150.0)
  assert (r.compute_s, r.memory_s, r.step_s, r.bound) == (3.0, 2.0, 3.0, "compute")
  assert r.mfu_at_roofline == pytest.approx(0.5)
  half = roofline.estimate(chip, xla_flops=300.0, xla_bytes=20.0, model_flops=150.0,
                           cores_per_device=1)  # fmt: skip
  assert (half.peak_flops_per_device, half.step_s, half.bound) == (50.0, 6.0, "compute")
  assert roofline.estimate(chip, xla_flops=1.0, xla_bytes=100.0, model_flops=None).bound == "memory"
  for name, key in [("TPU v5 lite", "v5e"), ("v5p-8", "v5p"), ("v5e:2x4", "v5e"),
                    ("v5litepod-16", "v5e"), ("TPU v6 lite", "v6e"), ("H200", "h200")]:  # fmt: skip
    assert roofline.chip_for(name) is roofline.CHIPS[key]
  assert roofline.chip_for("cpu") is None


@pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu is not installed")
def test_tpu_topology_lowers_the_splash_kernel(tmp_path):
  """With libtpu: `auto` on a v5e-8 topology is splash, and the compiled step holds the Pallas
  (Mosaic) kernel, run per shard of the fsdp mesh."""
  out = tmp_path / "plan.json"
  overrides = [o for o in _tiny_overrides() if "max_length" not in o and "hidden_size" not in o]
  proc = subprocess.run(
    [
      sys.executable, "-m", "jaxpref.aot", f"--config={REPO_ROOT / 'configs' / 'tiny.py'}",
      "--topology=v5e-8", f"--json_out={out}", *overrides,
      "--config.data.max_length=128", "--config.model.hidden_size=64",
    ],
    cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["target"] == "tpu v5e-8" and result["num_devices"] == 8
  # Shared prompts: the two-call (cascade) splash, forward and backward kernels.
  assert result["attention"] == "splash" and "tpu_custom_call" in result["custom_calls"]
  assert result["batch"] == "packed [16, 128]"
  assert result["chip"] == "TPU v5e" and result["bound"] in ("compute", "memory")
