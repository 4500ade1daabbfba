"""Loading a checkpoint sharded over two processes: each reads only its own slices.

Two JAX processes on localhost with 2 CPU devices each form a (data=1, fsdp=4) mesh;
`load_hf(..., mesh=mesh)` reads in each process only the slices of the safetensors files that its
two devices hold. Checked: the bytes each process read (its `rchar` from /proc, so every byte
read through any path counts) are about half the model; every local shard equals the same slice
of a plain one-process load; and `save_hf` from both processes (what `jaxpref.export` does in a
multi-process run) writes a checkpoint equal to the original. The checkpoint is stored in
bfloat16, the dtype of published checkpoints.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import train_helpers as th

from jaxpref.models import hf_io
from jaxpref.models import reward_model as rm
from jaxpref.models.config import ModelConfig

CFG = ModelConfig(
  arch="qwen2",
  vocab_size=8192,
  hidden_size=128,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  intermediate_size=256,
  hidden_act="silu",
  param_dtype="bfloat16",
  pad_token_id=0,
)

WORKER = textwrap.dedent(
  """
  import json, sys
  import jax
  import numpy as np

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  pid, port, ckpt, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  from jaxpref import sharding
  from jaxpref.models import hf_io

  def rchar():
    with open("/proc/self/io") as f:
      return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])

  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=1)
  # Warm-up: the measured load below then reads no module files, only tensor data.
  hf_io.load_hf(ckpt, mesh=mesh, param_dtype="bfloat16")
  before = rchar()
  cfg, params = hf_io.load_hf(ckpt, mesh=mesh, param_dtype="bfloat16")
  read = rchar() - before
  _, full = hf_io.load_hf(ckpt, param_dtype="bfloat16")
  checked = 0
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(full)):
    assert got.shape == want.shape and got.dtype == want.dtype
    for shard in got.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
      checked += 1
  hf_io.save_hf(out + "/export", cfg, params)
  print(json.dumps({"bytes_read": read, "shards_checked": checked,
                    "local_devices": len(jax.local_devices())}))
  """
)


@pytest.mark.multiprocess
def test_two_processes_read_only_their_slices(tmp_path):
  params = jax.jit(rm.init_params, static_argnums=0)(CFG, jax.random.key(0))
  ckpt = hf_io.save_hf(tmp_path / "ckpt", CFG, jax.tree.map(np.asarray, params))
  model_bytes = (ckpt / "model.safetensors").stat().st_size
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = th.free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(pid), str(port), str(ckpt), str(tmp_path)],
      env=th.env_with(2),
      cwd=th.REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for pid in range(2)
  ]
  results = []
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    results.append(json.loads(stdout.strip().splitlines()[-1]))
  for result in results:
    assert result["local_devices"] == 2 and result["shards_checked"] > 0
    # Half of every [.., embed] weight, plus the replicated norms and config files.
    assert 0.4 * model_bytes < result["bytes_read"] < 0.6 * model_bytes, (result, model_bytes)
  cfg, exported = hf_io.load_hf(Path(tmp_path) / "export", param_dtype="bfloat16")
  assert cfg == CFG
  jax.tree.map(np.testing.assert_array_equal, exported, jax.tree.map(np.asarray, params))
