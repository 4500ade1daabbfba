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
  assert aot.topology_devices("v4-8") == 8
  assert aot.topology_devices("v5e:2x4") is None
