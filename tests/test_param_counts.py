"""Full-size presets: jaxpref's parameter count equals transformers' for the same config.

Neither side materialises weights: jaxpref uses `jax.eval_shape` (`abstract_params`), transformers
builds `AutoModelForSequenceClassification` (num_labels=1) on the `meta` device.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxpref.models import presets
from jaxpref.models import reward_model as rm


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_param_count_matches_transformers(name):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_cfg = {k: v for k, v in presets.PRESETS[name].items() if k != "architectures"}
  config = transformers.AutoConfig.for_model(**hf_cfg, num_labels=1)
  with torch.device("meta"):
    model = transformers.AutoModelForSequenceClassification.from_config(config)
  want = sum(p.numel() for p in model.parameters())
  params = rm.abstract_params(presets.preset(name))
  assert rm.count_params(params) == want
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))


def test_known_sizes_without_torch():
  # Pythia paper: 6,857,302,016 parameters with the untied LM head of 50432 x 4096; the reward
  # model drops that head and adds a 4096 x 1 score layer.
  params = rm.abstract_params(presets.preset("pythia-6.9b"))
  assert rm.count_params(params) == 6_857_302_016 - 50432 * 4096 + 4096
  cfg = presets.preset("llama-3.1-8b", dtype="bfloat16")
  assert (cfg.kv_heads, cfg.rope_theta, cfg.eos_token_id) == (8, 500000.0, 128001)
  assert dict(cfg.rope_scaling)["rope_type"] == "llama3" and cfg.dtype == "bfloat16"
  assert np.dtype(cfg.jnp_param_dtype) == np.float32


def test_unknown_preset_lists_known_ones():
  with pytest.raises(ValueError, match="pythia-1.4b"):
    presets.preset("pythia-1b")


def test_new_family_presets_read_their_switches():
  gemma3 = presets.preset("gemma-3-12b")
  assert gemma3.sliding_layers == tuple((i + 1) % 6 != 0 for i in range(48))
  assert (gemma3.sliding_window, gemma3.rope_local_theta, gemma3.rope_theta) == (1024, 1e4, 1e6)
  assert dict(gemma3.rope_scaling) == {"factor": 8.0, "rope_type": "linear"}
  gemma2 = presets.preset("gemma-2-9b")
  assert gemma2.sliding_layers[:4] == (True, False, True, False)
  assert (gemma2.attn_logit_softcap, gemma2.query_pre_attn_scalar) == (50.0, 256.0)
  assert presets.preset("mistral-7b-v0.1").sliding_layers == (True,) * 32
  assert presets.preset("mistral-7b-v0.3").sliding_window == 0
  moe = presets.preset("qwen3-30b-a3b")
  assert (moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob) == (128, 8, True)
  # The published 30.5B includes the untied LM head; the reward model has a 1-output head instead.
  lm_head = moe.vocab_size * moe.hidden_size
  assert 30.4e9 < rm.count_params(rm.abstract_params(moe)) + lm_head < 30.6e9
  qwen = presets.preset("qwen2.5-7b")
  assert qwen.sliding_window == 0 and qwen.arch == "qwen2" and qwen.kv_heads == 4


@pytest.mark.slow  # About a minute each: compiles a full-size train step for 8 CPU devices.
@pytest.mark.parametrize("name", ["gemma-3-12b", "qwen3-30b-a3b"])
def test_aot_plans_new_family_presets(tmp_path, name):
  import json
  import os
  import subprocess
  import sys
  from pathlib import Path

  repo = Path(__file__).resolve().parents[1]
  out = tmp_path / "plan.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxpref.aot",
      f"--config={repo / 'configs' / 'tiny.py'}",
      f"--config.model.preset={name}",
      "--config.model.dtype=bfloat16",
      "--config.model.remat=True",
      "--num_cpu_devices=8",
      "--config.mesh.data=1",
      "--config.mesh.fsdp=4",
      "--config.mesh.tensor=2",
      "--config.data.max_length=512",
      "--config.train.batch_size=8",
      f"--json_out={out}",
    ],
    cwd=repo,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  plan = json.loads(out.read_text())
  assert plan["param_count"] == rm.count_params(rm.abstract_params(presets.preset(name)))
  assert plan["param_bytes_per_device"] < plan["param_bytes_total"] / 7
